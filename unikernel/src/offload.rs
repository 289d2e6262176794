//! Offload metadata of a frame, and the software fallbacks for it.
//!
//! A NIC may hand the firewall a frame whose transport checksum is not
//! filled in yet (*checksum partial*: virtio `VIRTIO_NET_HDR_F_NEEDS_CSUM`,
//! Xen `NETTXF_csum_blank`) and a TCP frame of up to 64 KiB that stands for
//! a run of segments of `gso_size` payload bytes each (*GSO*: virtio
//! `VIRTIO_NET_HDR_GSO_TCPV4/6`, Xen `XEN_NETIF_GSO_TYPE_TCPV4/6`). The
//! router forwards such a frame whole: it reads and rewrites headers only
//! (NAT, TTL, IPv4 options) and keeps the checksum partial, and the output
//! NIC either takes the frame as it is (a peer that negotiated it) or it is
//! cut here, in software ([`segment`], [`complete`]).
//!
//! One form inside the firewall, whatever the NIC's: [`Offload`] says
//! "partial" and "GSO with this segment size"; where the checksum starts
//! and lies follows from the headers (the transport header, TCP offset 16,
//! UDP offset 6), and the GSO type from the IP version. [`accept`] turns a
//! NIC's metadata into that form and checks it against the frame: the
//! frame comes from a peer, so every field is bounded and checked (a
//! partial checksum anywhere but the transport header of an unfragmented
//! TCP/UDP packet is completed in software right away; GSO only for TCP,
//! `gso_size` ≥ 1, at most [`MAX_SEGMENTS`] segments, IP lengths that
//! match the frame), and a partial checksum field is recomputed from the
//! headers (the pseudo-header sum over the transport length, as Linux's
//! `skb_checksum_setup` does for Xen frontends), so nothing of it is
//! trusted.
//!
//! Facts (Linux, read for behaviour): with a partial checksum the field
//! holds the folded pseudo-header sum, not complemented; the sender adds
//! the one's-complement sum from the transport header to the end and
//! stores its complement (`skb_checksum_help`). A GSO frame's field holds
//! the pseudo-header sum over its whole transport length;
//! `tcp_gso_segment` gives every segment its own length, sequence number
//! and checksum, clears FIN and PSH on all but the last and CWR on all but
//! the first; `inet_gso_segment` numbers IPv4 ids up from the first one.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;

use crate::wire::{ETH_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, PROTO_TCP, PROTO_UDP, be16, checksum};

/// Most segments one GSO frame may stand for. 64 KiB at the smallest
/// IPv4 MSS Linux sends (536) is 123 segments; a frame that would need
/// more (a tiny `gso_size`) is refused rather than cut into thousands.
pub const MAX_SEGMENTS: usize = 128;

/// Largest frame with offloads: Ethernet, a 40-byte IPv6 header and
/// 65 535 bytes of IPv6 payload (IPv4's total length stays below).
pub const MAX_OFFLOAD_FRAME: usize = ETH_LEN + 40 + 65_535;

/// Offload metadata of a frame in the firewall. See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offload {
    /// The transport checksum field holds the pseudo-header sum only.
    pub csum_partial: bool,
    /// TCP payload bytes per segment of a GSO frame; 0: not GSO.
    pub gso_size: u16,
}

impl Offload {
    /// No offloads: a complete frame.
    pub const NONE: Offload = Offload {
        csum_partial: false,
        gso_size: 0,
    };

    /// Whether this is a GSO frame.
    pub fn is_gso(self) -> bool {
        self.gso_size != 0
    }

    /// Whether the frame is complete as it is.
    pub fn is_none(self) -> bool {
        !self.csum_partial && self.gso_size == 0
    }
}

/// What the NIC said about a frame, in virtio's terms (Xen's map to them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicOffload {
    /// Checksum partial (`NEEDS_CSUM`, `NETTXF_csum_blank`).
    pub csum_partial: bool,
    /// Where the checksummed bytes start, from the frame's start (virtio
    /// `csum_start`; Xen gives none: 0 means "the transport header").
    pub csum_start: u16,
    /// Where the checksum field lies from `csum_start` (virtio
    /// `csum_offset`; with `csum_start` 0 ignored).
    pub csum_offset: u16,
    /// The GSO type.
    pub gso: GsoKind,
    /// Payload bytes per segment.
    pub gso_size: u16,
}

/// GSO types the firewall takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GsoKind {
    /// Not GSO.
    #[default]
    None,
    /// TCP over IPv4.
    TcpV4,
    /// TCP over IPv6.
    TcpV6,
    /// Any other type the NIC named (UDP, ECN, …): refused.
    Other,
}

/// Why a frame's offload metadata was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadError {
    /// The frame is too short or its IP lengths do not match it.
    Malformed,
    /// A GSO type we do not take, or one that does not match the frame
    /// (IP version, TCP, fragments, IPv6 extension headers).
    GsoType,
    /// `gso_size` 0, or more than [`MAX_SEGMENTS`] segments.
    GsoSize,
    /// The checksum position lies outside the frame.
    ChecksumPosition,
}

impl core::fmt::Display for OffloadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OffloadError::Malformed => "offloaded frame: IP lengths do not match the frame",
            OffloadError::GsoType => "offloaded frame: GSO type refused or not matching the frame",
            OffloadError::GsoSize => "offloaded frame: gso_size 0 or too many segments",
            OffloadError::ChecksumPosition => "offloaded frame: checksum position outside it",
        })
    }
}

/// The headers of an offloadable frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    v6: bool,
    /// Offset of the transport header in the frame.
    l4: usize,
    /// Transport protocol (TCP or UDP), `None` for anything else.
    protocol: Option<u8>,
    /// End of the IP packet in the frame.
    end: usize,
}

fn layout(frame: &[u8]) -> Result<Layout, OffloadError> {
    let ethertype = be16(frame, 12).ok_or(OffloadError::Malformed)?;
    let ip = frame.get(ETH_LEN..).ok_or(OffloadError::Malformed)?;
    match ethertype {
        ETHERTYPE_IPV4 => {
            let fixed = ip.first_chunk::<20>().ok_or(OffloadError::Malformed)?;
            let header_len = usize::from(fixed[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
            if fixed[0] >> 4 != 4 || header_len < 20 || total < header_len || total > ip.len() {
                return Err(OffloadError::Malformed);
            }
            let fragment = u16::from_be_bytes([fixed[6], fixed[7]]) & 0x3fff != 0;
            let protocol =
                (!fragment && matches!(fixed[9], PROTO_TCP | PROTO_UDP)).then_some(fixed[9]);
            Ok(Layout {
                v6: false,
                l4: ETH_LEN + header_len,
                protocol,
                end: ETH_LEN + total,
            })
        }
        ETHERTYPE_IPV6 => {
            let fixed = ip.first_chunk::<40>().ok_or(OffloadError::Malformed)?;
            let total = 40 + usize::from(u16::from_be_bytes([fixed[4], fixed[5]]));
            if fixed[0] >> 4 != 6 || total > ip.len() {
                return Err(OffloadError::Malformed);
            }
            // Only a transport header right behind the fixed header.
            let protocol = matches!(fixed[6], PROTO_TCP | PROTO_UDP).then_some(fixed[6]);
            Ok(Layout {
                v6: true,
                l4: ETH_LEN + 40,
                protocol,
                end: ETH_LEN + total,
            })
        }
        _ => Err(OffloadError::Malformed),
    }
}

fn checksum_offset(protocol: u8) -> usize {
    if protocol == PROTO_TCP { 16 } else { 6 }
}

/// The folded pseudo-header sum of the IP packet at `frame[ETH_LEN..]`
/// for `protocol` over `length` transport bytes.
fn pseudo(frame: &[u8], v6: bool, protocol: u8, length: usize) -> Option<u16> {
    let length = u32::try_from(length).ok()?;
    let ip = frame.get(ETH_LEN..)?;
    let sum = if v6 {
        let addresses = ip.get(8..40)?;
        let sum = checksum::add(checksum::add(0, addresses), &length.to_be_bytes());
        checksum::add(sum, &[0, 0, 0, protocol])
    } else {
        let addresses = ip.get(12..20)?;
        checksum::add(
            checksum::add(0, addresses),
            &[0, protocol, (length >> 8) as u8, length as u8],
        )
    };
    Some(checksum::fold(sum))
}

fn put16(bytes: &mut [u8], at: usize, value: u16) -> Option<()> {
    bytes
        .get_mut(at..at.checked_add(2)?)?
        .copy_from_slice(&value.to_be_bytes());
    Some(())
}

/// Completes a checksum the NIC left at an arbitrary position (`start`,
/// `offset` from the frame's start, as virtio has them): the field holds
/// the sender's partial sum, the bytes from `start` to the end are added.
fn complete_at(frame: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let field = start
        .checked_add(offset)
        .filter(|at| at.checked_add(2).is_some_and(|end| end <= frame.len()))
        .ok_or(OffloadError::ChecksumPosition)?;
    let body = frame.get(start..).ok_or(OffloadError::ChecksumPosition)?;
    let sum = checksum::finish(checksum::add(0, body));
    put16(frame, field, sum).ok_or(OffloadError::ChecksumPosition)
}

/// What a Linux frontend's TCPv4 GSO frame carries (MSS 1448, checksum
/// partial), accepted: for tests that build one.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: test helper; the tests' frames are valid.
pub fn accept_linux_tcp4_gso(frame: &mut [u8]) -> Offload {
    let nic = NicOffload {
        csum_partial: true,
        gso: GsoKind::TcpV4,
        gso_size: 1448,
        ..NicOffload::default()
    };
    accept(frame, nic).unwrap()
}

/// Checks a received frame's offload metadata and returns it in the
/// firewall's form (see the module docs); the frame's checksum field is
/// rewritten (recomputed pseudo-header sum, or completed in software for a
/// partial checksum elsewhere than a TCP/UDP transport header).
pub fn accept(frame: &mut [u8], nic: NicOffload) -> Result<Offload, OffloadError> {
    if !nic.csum_partial && nic.gso == GsoKind::None {
        return Ok(Offload::NONE);
    }
    if frame.len() > MAX_OFFLOAD_FRAME {
        return Err(OffloadError::Malformed);
    }
    let layout = layout(frame);
    if nic.gso == GsoKind::None {
        let transport = layout.ok().and_then(|l| Some((l, l.protocol?)));
        let start = usize::from(nic.csum_start);
        let offset = usize::from(nic.csum_offset);
        return match transport {
            Some((l, protocol))
                if nic.csum_start == 0
                    || (start == l.l4 && offset == checksum_offset(protocol)) =>
            {
                set_pseudo(frame, l, protocol)?;
                Ok(Offload {
                    csum_partial: true,
                    gso_size: 0,
                })
            }
            // Somewhere we do not rewrite: finished here, once.
            _ if nic.csum_start != 0 => {
                complete_at(frame, start, offset)?;
                Ok(Offload::NONE)
            }
            _ => Err(OffloadError::ChecksumPosition),
        };
    }
    let l = layout?;
    let wanted = if l.v6 { GsoKind::TcpV6 } else { GsoKind::TcpV4 };
    if nic.gso != wanted || l.protocol != Some(PROTO_TCP) {
        return Err(OffloadError::GsoType);
    }
    if nic.csum_partial && nic.csum_start != 0 && usize::from(nic.csum_start) != l.l4 {
        return Err(OffloadError::ChecksumPosition);
    }
    let headers = tcp_headers_end(frame, l)?;
    let payload = l.end.saturating_sub(headers);
    if nic.gso_size == 0 || payload.div_ceil(usize::from(nic.gso_size)) > MAX_SEGMENTS {
        return Err(OffloadError::GsoSize);
    }
    set_pseudo(frame, l, PROTO_TCP)?;
    Ok(Offload {
        csum_partial: true,
        gso_size: nic.gso_size,
    })
}

/// The end of the TCP header (data offset checked against the packet).
fn tcp_headers_end(frame: &[u8], l: Layout) -> Result<usize, OffloadError> {
    let offset = frame
        .get(l.l4 + 12)
        .map(|b| usize::from(b >> 4) * 4)
        .ok_or(OffloadError::Malformed)?;
    let end = l.l4 + offset;
    if offset < 20 || end > l.end {
        return Err(OffloadError::Malformed);
    }
    Ok(end)
}

fn set_pseudo(frame: &mut [u8], l: Layout, protocol: u8) -> Result<(), OffloadError> {
    let at = l.l4 + checksum_offset(protocol);
    if at + 2 > l.end {
        return Err(OffloadError::Malformed);
    }
    let sum = pseudo(frame, l.v6, protocol, l.end - l.l4).ok_or(OffloadError::Malformed)?;
    put16(frame, at, sum).ok_or(OffloadError::Malformed)
}

/// Where the checksummed bytes start and the field lies (virtio's
/// `csum_start`, `csum_offset`) and the TCP/IP header length (`hdr_len`)
/// of a frame the router built with `offload`; `None` for a frame that
/// does not fit it (then send it through [`finish`]).
pub fn positions(frame: &[u8]) -> Option<(u16, u16, u16, bool)> {
    let l = layout(frame).ok()?;
    let protocol = l.protocol?;
    let headers = if protocol == PROTO_TCP {
        tcp_headers_end(frame, l).ok()?
    } else {
        l.l4 + 8
    };
    Some((
        u16::try_from(l.l4).ok()?,
        checksum_offset(protocol) as u16,
        u16::try_from(headers).ok()?,
        l.v6,
    ))
}

/// Whether every segment of a GSO frame fits `mtu` (IP bytes): the IP and
/// TCP headers plus `gso_size` (Linux's `skb_gso_validate_network_len`).
/// `packet` is the IP packet.
pub fn segments_fit(packet: &[u8], ip_header_len: usize, gso_size: u16, mtu: usize) -> bool {
    let tcp = packet
        .get(ip_header_len + 12)
        .map_or(20, |b| usize::from(b >> 4) * 4);
    ip_header_len + tcp + usize::from(gso_size) <= mtu
}

/// Completes a partial checksum in place (a frame with `csum_partial` and
/// no GSO, for a NIC that cannot take it).
pub fn complete(frame: &mut [u8]) -> Result<(), OffloadError> {
    let l = layout(frame)?;
    let protocol = l.protocol.ok_or(OffloadError::ChecksumPosition)?;
    let at = l.l4 + checksum_offset(protocol);
    let body = frame.get(l.l4..l.end).ok_or(OffloadError::Malformed)?;
    let mut sum = checksum::finish(checksum::add(0, body));
    if protocol == PROTO_UDP && sum == 0 {
        sum = 0xffff;
    }
    put16(frame, at, sum).ok_or(OffloadError::Malformed)
}

/// Cuts a GSO frame into complete MTU-sized frames, each handed to `out`
/// (a scratch buffer it may keep); a partial non-GSO frame is completed
/// and handed on once; a frame without offloads as it is. Nothing is
/// handed on if the frame does not hold together (checked first).
pub fn finish(
    frame: &[u8],
    offload: Offload,
    scratch: &mut Vec<u8>,
    out: &mut dyn FnMut(&[u8]),
) -> Result<(), OffloadError> {
    if offload.is_none() {
        out(frame);
        return Ok(());
    }
    scratch.clear();
    if !offload.is_gso() {
        scratch.extend_from_slice(frame);
        complete(scratch)?;
        out(scratch);
        return Ok(());
    }
    let l = layout(frame)?;
    if l.protocol != Some(PROTO_TCP) {
        return Err(OffloadError::GsoType);
    }
    let headers_end = tcp_headers_end(frame, l)?;
    let headers = frame.get(..headers_end).ok_or(OffloadError::Malformed)?;
    let payload = frame
        .get(headers_end..l.end)
        .ok_or(OffloadError::Malformed)?;
    let size = usize::from(offload.gso_size);
    if size == 0 || payload.len().div_ceil(size) > MAX_SEGMENTS {
        return Err(OffloadError::GsoSize);
    }
    let seq = be32(frame, l.l4 + 4).ok_or(OffloadError::Malformed)?;
    let ip_id = be16(frame, ETH_LEN + 4).ok_or(OffloadError::Malformed)?;
    let flags = *frame.get(l.l4 + 13).ok_or(OffloadError::Malformed)?;
    let count = payload.len().div_ceil(size).max(1);
    let template = Template {
        layout: l,
        size,
        seq,
        ip_id,
        flags,
    };
    for (index, chunk) in payload
        .chunks(size)
        .chain(
            // A GSO frame without payload still goes out, as one segment.
            payload.is_empty().then_some(&[][..]),
        )
        .enumerate()
    {
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(chunk);
        let last = index + 1 == count;
        fix_segment(scratch, template, index, last).ok_or(OffloadError::Malformed)?;
        out(scratch);
    }
    Ok(())
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?.first_chunk::<4>()?;
    Some(u32::from_be_bytes(*word))
}

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Gives segment `index` (headers copied from the GSO frame, its payload
/// behind) its lengths, ids, sequence number, flags and checksums.
/// What every segment of one GSO frame derives its own fields from.
#[derive(Clone, Copy, Debug)]
struct Template {
    layout: Layout,
    size: usize,
    seq: u32,
    ip_id: u16,
    flags: u8,
}

fn fix_segment(segment: &mut [u8], t: Template, index: usize, last: bool) -> Option<()> {
    let Template {
        layout: l,
        size,
        seq,
        ip_id,
        flags,
    } = t;
    let ip_len = segment.len().checked_sub(ETH_LEN)?;
    if l.v6 {
        put16(
            segment,
            ETH_LEN + 4,
            u16::try_from(ip_len.checked_sub(40)?).ok()?,
        )?;
    } else {
        put16(segment, ETH_LEN + 2, u16::try_from(ip_len).ok()?)?;
        put16(segment, ETH_LEN + 4, ip_id.wrapping_add(index as u16))?;
        put16(segment, ETH_LEN + 10, 0)?;
        let header = segment.get(ETH_LEN..l.l4)?;
        let sum = checksum::finish(checksum::add(0, header));
        put16(segment, ETH_LEN + 10, sum)?;
    }
    let sequence = seq.wrapping_add(u32::try_from(index.checked_mul(size)?).ok()?);
    segment
        .get_mut(l.l4 + 4..l.l4 + 8)?
        .copy_from_slice(&sequence.to_be_bytes());
    let mut segment_flags = flags;
    if !last {
        segment_flags &= !(TCP_FIN | TCP_PSH);
    }
    if index != 0 {
        segment_flags &= !TCP_CWR;
    }
    *segment.get_mut(l.l4 + 13)? = segment_flags;
    put16(segment, l.l4 + 16, 0)?;
    let tcp_len = segment.len().checked_sub(l.l4)?;
    let pseudo = pseudo(segment, l.v6, PROTO_TCP, tcp_len)?;
    let sum = checksum::finish(checksum::add(u32::from(pseudo), segment.get(l.l4..)?));
    put16(segment, l.l4 + 16, sum)
}

/// Offloads a NIC can take on transmit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// Frames with a partial checksum.
    pub csum: bool,
    /// TCP/IPv4 GSO frames.
    pub tso4: bool,
    /// TCP/IPv6 GSO frames.
    pub tso6: bool,
}

impl TxOffloads {
    /// Whether a frame with `offload` (IPv6 or not) may go out as it is.
    pub fn take(self, offload: Offload, v6: bool) -> bool {
        if offload.is_gso() {
            self.csum && if v6 { self.tso6 } else { self.tso4 }
        } else {
            !offload.csum_partial || self.csum
        }
    }
}

/// GSO packets one NIC carried whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GsoCounts {
    /// Received whole (from the peer).
    pub rx: u64,
    /// Sent whole (to the peer).
    pub tx: u64,
    /// Frames sent from their own pages, lent to the peer instead of
    /// copied (Xen's netfront, `platform::xen::netfront::PageLender`).
    pub tx_lent: u64,
}

/// What a NIC's shared rings cost and lost, where it counts it (Xen's
/// netback and netfront; counts of the NIC's current connection): figures
/// per frame that timing noise does not blur, and the frames the device
/// itself refused or dropped, which the router never saw (its own drops
/// have reasons of their own).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingCounts {
    /// Grant-copy batches (one `GNTTABOP_copy` hypercall each on Xen).
    pub copy_batches: u64,
    /// Event-channel notifications sent to the peer.
    pub notifications: u64,
    /// Frames or requests from the peer the device refused: malformed
    /// slots, responses naming buffers we did not post, offload metadata
    /// that did not match, a failed copy. (A full receive queue refuses
    /// nothing: the peer's packet waits on its ring.)
    pub refused: u64,
    /// Frames for the peer the device dropped: no buffer posted, the
    /// device stopped, too long, a send that failed.
    pub dropped: u64,
    /// Packets from the peer copied to a buffer offset so that their whole
    /// pages land on ours (fewer grant-copy ops), then moved to its front
    /// (Xen's netback, `platform::xen::grant::best_copy_start`).
    pub realigned: u64,
}

/// A NIC that may carry offload metadata with its frames. The defaults are
/// a NIC without offloads: every frame received is complete, nothing
/// offloaded is given to it (the router cuts and completes such frames in
/// software first, [`finish`]).
pub trait OffloadNic: smoltcp::phy::Device {
    /// Receives one frame and its metadata (already through [`accept`]),
    /// handing both to `f`; `None` when nothing is there.
    fn receive_offloaded<R>(
        &mut self,
        now: smoltcp::time::Instant,
        f: impl FnOnce(&[u8], Offload) -> R,
    ) -> Option<R> {
        let (rx, _tx) = self.receive(now)?;
        Some(smoltcp::phy::RxToken::consume(rx, |frame| {
            f(frame, Offload::NONE)
        }))
    }

    /// Receives one frame into `frame`, replacing what it held, and
    /// returns its metadata (already through [`accept`]); `None` when
    /// nothing is there (`frame` may then have been cleared). The router
    /// forwards a frame it received this way in place, without copying it
    /// again, so a NIC that owns its received frames should hand its own
    /// buffer over here (swapping `frame`'s in for reuse) rather than copy
    /// it; the default copies what [`OffloadNic::receive_offloaded`] gives.
    fn receive_into(
        &mut self,
        now: smoltcp::time::Instant,
        frame: &mut Vec<u8>,
    ) -> Option<Offload> {
        self.receive_offloaded(now, |bytes, offload| {
            frame.clear();
            frame.extend_from_slice(bytes);
            offload
        })
    }

    /// GSO packets this NIC received and sent whole (status report);
    /// `None` when it does not count them.
    fn gso_counts(&self) -> Option<GsoCounts> {
        None
    }

    /// What its rings cost (status report); `None` when it has none.
    fn ring_counts(&self) -> Option<RingCounts> {
        None
    }

    /// What [`OffloadNic::transmit_offloaded`] takes as it is.
    fn tx_offloads(&self) -> TxOffloads {
        TxOffloads::default()
    }

    /// Ends a batch of frames given to [`OffloadNic::transmit_owned`] or
    /// [`OffloadNic::transmit_offloaded`]: a NIC that holds them back
    /// publishes them to its peer now (one notification for the batch).
    /// The router calls it after each batch.
    fn flush(&mut self) {}

    /// Sends one frame as [`OffloadNic::transmit_offloaded`] does, but may
    /// keep its buffer (taking it out of `frame`, which is then left
    /// empty): a NIC whose peer reads the frame where it is until it
    /// answers. `false` when the NIC has no room (nothing was sent,
    /// `frame` is as it was). The default copies.
    fn transmit_owned(
        &mut self,
        now: smoltcp::time::Instant,
        frame: &mut alloc::vec::Vec<u8>,
        offload: Offload,
    ) -> bool {
        self.transmit_offloaded(now, frame, offload)
    }

    /// Sends one frame with `offload` (one [`OffloadNic::tx_offloads`]
    /// takes); `false` when the NIC has no room (nothing was sent).
    fn transmit_offloaded(
        &mut self,
        now: smoltcp::time::Instant,
        frame: &[u8],
        offload: Offload,
    ) -> bool {
        let _ = offload;
        match self.transmit(now) {
            Some(tx) => {
                smoltcp::phy::TxToken::consume(tx, frame.len(), |buffer| {
                    buffer.copy_from_slice(frame)
                });
                true
            }
            None => false,
        }
    }
}
