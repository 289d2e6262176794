//! The `virtio_net_hdr` of TAP devices opened with `IFF_VNET_HDR`
//! ([`VnetHeader`]: parsed on receive and turned into the firewall's
//! offload metadata, [`crate::offload`]; built for the GSO and
//! checksum-partial frames the firewall forwards whole), and transmit
//! coalescing: runs of complete TCP/IPv4 segments of one flow (from a
//! sender that did not use GSO), queued back to back for the same TAP, are
//! written as one GSO frame (`VIRTIO_NET_HDR_GSO_TCPV4` and
//! `VIRTIO_NET_HDR_F_NEEDS_CSUM`), so the kernel moves one big packet
//! through its bridge and veth instead of up to 44 MTU-sized ones, each a
//! syscall and a trip through its stack. Only already-decided frames are
//! merged here.
//!
//! Facts: `struct virtio_net_hdr` (10 bytes: flags u8, gso_type u8,
//! hdr_len, gso_size, csum_start, csum_offset as native-endian u16 — little
//! endian on every host we run on) from Linux
//! `include/uapi/linux/virtio_net.h`; with NEEDS_CSUM the TCP checksum
//! field holds the pseudo-header sum over the whole GSO length, not
//! complemented (`__tcp_v4_send_check`); the kernel's `tcp_gso_segment`
//! then gives every segment its own length, sequence number, checksum,
//! and clears PSH/FIN on all but the last; `inet_gso_segment` numbers IP ids
//! from the first one up.
//!
//! Only frames that need nothing more than that are merged: IPv4 without
//! options or fragmentation and with DF set (RFC 6864: the id of a DF
//! packet carries no meaning), TCP with only ACK (and PSH), identical
//! Ethernet/IP/TCP headers but for length, id, checksums and sequence
//! number, consecutive sequence numbers, every segment but the last exactly
//! the first one's payload size. Everything else is written as it came,
//! after whatever was pending, so the order on the wire never changes. The
//! frames come from the router, but their contents from peers: nothing here
//! indexes without a check or panics on any bytes.

use std::vec::Vec;

/// `sizeof(struct virtio_net_hdr)`, the TAP's default vnet header size.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN` (a flag on the type; we do not take it).
pub const GSO_ECN: u8 = 0x80;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
/// Largest IP datagram a merged frame may carry.
const MAX_IP_LEN: usize = 62 * 1024;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

/// What a mergeable frame looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    /// Ethernet + IP + TCP header bytes.
    headers: usize,
    /// TCP payload bytes.
    payload: usize,
    seq: u32,
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    let pair = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*pair.first()?, *pair.get(1)?]))
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let quad = bytes.get(at..at.checked_add(4)?)?;
    let mut word = [0u8; 4];
    word.copy_from_slice(quad);
    Some(u32::from_be_bytes(word))
}

/// The frame as a segment we may merge, or `None`.
fn segment(frame: &[u8]) -> Option<Segment> {
    if be16(frame, 12)? != 0x0800 {
        return None;
    }
    let ip = frame.get(ETH_LEN..)?;
    // Version 4, no options.
    if *ip.first()? != 0x45 {
        return None;
    }
    let total = usize::from(be16(ip, 2)?);
    // Exactly the frame (no Ethernet padding, nothing missing).
    if total != ip.len() {
        return None;
    }
    let fragment = be16(ip, 6)?;
    // DF set, MF clear, offset 0.
    if fragment != 0x4000 || *ip.get(9)? != 6 {
        return None;
    }
    let tcp = ip.get(IP_LEN..)?;
    let offset = usize::from(*tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    if offset < 20 || flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_URG) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    let payload = tcp.len().checked_sub(offset)?;
    if payload == 0 {
        return None;
    }
    Some(Segment {
        headers: ETH_LEN + IP_LEN + offset,
        payload,
        seq: be32(tcp, 4)?,
    })
}

/// Whether `next` continues `first` (same headers but for the fields GSO
/// rewrites per segment).
fn same_flow(first: &[u8], next: &[u8], headers: usize) -> bool {
    let (Some(a), Some(b)) = (first.get(..headers), next.get(..headers)) else {
        return false;
    };
    a.iter().zip(b).enumerate().all(|(at, (x, y))| {
        let ip = at.wrapping_sub(ETH_LEN);
        let tcp = at.wrapping_sub(ETH_LEN + IP_LEN);
        match (ip, tcp) {
            // IP total length, id, header checksum.
            (2..=5 | 10 | 11, _) => true,
            // TCP sequence number and checksum.
            (_, 4..=7 | 16 | 17) => true,
            // TCP flags: PSH may differ.
            (_, 13) => (x | TCP_PSH) == (y | TCP_PSH),
            _ => x == y,
        }
    })
}

/// Adds `bytes` (from an even offset) to a ones' complement sum. Sums
/// 32-bit words into 64 bits and folds (2^16 and 2^32 are 1 modulo
/// 0xffff, so the result is the same sum as 16 bits at a time, faster).
fn checksum_add(sum: u32, bytes: &[u8]) -> u32 {
    let mut acc = u64::from(sum);
    let mut quads = bytes.chunks_exact(4);
    for quad in &mut quads {
        acc += u64::from(u32::from_be_bytes(quad.try_into().unwrap_or([0; 4])));
    }
    let mut pairs = quads.remainder().chunks_exact(2);
    for pair in &mut pairs {
        acc += u64::from(u16::from_be_bytes(pair.try_into().unwrap_or([0; 2])));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The coalescer of one TAP: at most one pending run.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// vnet header room + the first frame + the payloads appended.
    pending: Vec<u8>,
    first: Option<Segment>,
    segments: usize,
    next_seq: u32,
    psh: bool,
    /// Frames written as part of a merged GSO frame.
    pub merged_frames: u64,
    /// GSO frames written.
    pub gso_writes: u64,
}

impl Coalescer {
    /// Takes one frame for the TAP; calls `write` with each complete write
    /// (vnet header + frame) that must go out now, in order.
    pub fn push(&mut self, frame: &[u8], write: &mut dyn FnMut(&[u8])) {
        let Some(seg) = segment(frame) else {
            self.flush(write);
            let mut plain = Vec::with_capacity(VNET_HDR_LEN + frame.len());
            plain.resize(VNET_HDR_LEN, 0);
            plain.extend_from_slice(frame);
            write(&plain);
            return;
        };
        if let Some(first) = self.first {
            let pending_frame = self.pending.get(VNET_HDR_LEN..).unwrap_or(&[]);
            let fits = self.pending.len() - VNET_HDR_LEN - ETH_LEN + seg.payload <= MAX_IP_LEN;
            if seg.headers == first.headers
                && seg.seq == self.next_seq
                && seg.payload <= first.payload
                && fits
                && same_flow(pending_frame, frame, first.headers)
            {
                self.pending
                    .extend_from_slice(frame.get(seg.headers..).unwrap_or(&[]));
                self.segments += 1;
                self.next_seq = seg.seq.wrapping_add(seg.payload as u32);
                self.psh |= frame.get(ETH_LEN + IP_LEN + 13).copied().unwrap_or(0) & TCP_PSH != 0;
                if seg.payload < first.payload {
                    // A short segment ends a GSO run.
                    self.flush(write);
                }
                return;
            }
            self.flush(write);
        }
        self.pending.clear();
        self.pending.resize(VNET_HDR_LEN, 0);
        self.pending.extend_from_slice(frame);
        self.first = Some(seg);
        self.segments = 1;
        self.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        self.psh = false;
    }

    /// Whether a run is waiting.
    pub fn is_pending(&self) -> bool {
        self.first.is_some()
    }

    /// Writes the pending run, if any: as it came when it is one frame,
    /// else as one GSO frame.
    pub fn flush(&mut self, write: &mut dyn FnMut(&[u8])) {
        let Some(first) = self.first.take() else {
            return;
        };
        if self.segments > 1 && self.finish_gso(first).is_some() {
            self.merged_frames += self.segments as u64;
            self.gso_writes += 1;
        }
        write(&self.pending);
        self.pending.clear();
    }

    /// Turns the pending run into a GSO frame: vnet header, IP length and
    /// checksum, TCP PSH and the partial checksum.
    fn finish_gso(&mut self, first: Segment) -> Option<()> {
        let frame_len = self.pending.len().checked_sub(VNET_HDR_LEN)?;
        let ip_len = frame_len.checked_sub(ETH_LEN)?;
        let tcp_len = ip_len.checked_sub(IP_LEN)?;
        let ip_at = VNET_HDR_LEN + ETH_LEN;
        let tcp_at = ip_at + IP_LEN;
        let header = [F_NEEDS_CSUM, GSO_TCPV4]
            .into_iter()
            .chain((first.headers as u16).to_le_bytes())
            .chain((first.payload as u16).to_le_bytes())
            .chain(((ETH_LEN + IP_LEN) as u16).to_le_bytes())
            .chain(16u16.to_le_bytes());
        for (slot, byte) in self.pending.iter_mut().zip(header) {
            *slot = byte;
        }
        // IP: total length and header checksum.
        let ip = self.pending.get_mut(ip_at..tcp_at)?;
        ip.get_mut(2..4)?
            .copy_from_slice(&(ip_len as u16).to_be_bytes());
        ip.get_mut(10..12)?.copy_from_slice(&[0, 0]);
        let ip_sum = !fold(checksum_add(0, ip));
        ip.get_mut(10..12)?.copy_from_slice(&ip_sum.to_be_bytes());
        let mut pseudo = 0u32;
        pseudo = checksum_add(pseudo, ip.get(12..20)?);
        pseudo = pseudo.wrapping_add(6).wrapping_add(tcp_len as u32);
        // TCP: PSH if any segment had it; the pseudo-header sum.
        let tcp = self.pending.get_mut(tcp_at..)?;
        if self.psh {
            *tcp.get_mut(13)? |= TCP_PSH;
        }
        tcp.get_mut(16..18)?
            .copy_from_slice(&fold(pseudo).to_be_bytes());
        Some(())
    }
}

/// The parsed `virtio_net_hdr` of a frame we read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// `flags` (`F_NEEDS_CSUM`, `VIRTIO_NET_HDR_F_DATA_VALID`).
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `hdr_len`: Ethernet, IP and TCP header bytes.
    pub hdr_len: u16,
    /// `gso_size`: payload bytes per segment.
    pub gso_size: u16,
    /// `csum_start`: where the checksummed bytes start.
    pub csum_start: u16,
    /// `csum_offset`: where, from `csum_start`, the checksum goes.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// Parses the first [`VNET_HDR_LEN`] bytes (little-endian fields).
    pub fn parse(bytes: &[u8]) -> Option<VnetHeader> {
        let le = |at: usize| -> Option<u16> {
            let pair = bytes.get(at..at + 2)?;
            Some(u16::from_le_bytes([*pair.first()?, *pair.get(1)?]))
        };
        Some(VnetHeader {
            flags: *bytes.first()?,
            gso_type: *bytes.get(1)?,
            hdr_len: le(2)?,
            gso_size: le(4)?,
            csum_start: le(6)?,
            csum_offset: le(8)?,
        })
    }
}

impl VnetHeader {
    /// The header for a frame the firewall sends with `offload`
    /// (positions from [`crate::offload::positions`]); all zero for a
    /// complete frame.
    pub fn for_frame(frame: &[u8], offload: crate::offload::Offload) -> Option<VnetHeader> {
        if offload.is_none() {
            return Some(VnetHeader::default());
        }
        let (csum_start, csum_offset, headers, v6) = crate::offload::positions(frame)?;
        let gso_type = match (offload.is_gso(), v6) {
            (false, _) => GSO_NONE,
            (true, false) => GSO_TCPV4,
            (true, true) => GSO_TCPV6,
        };
        Some(VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: headers,
            gso_size: offload.gso_size,
            csum_start,
            csum_offset,
        })
    }

    /// The header as the kernel reads it (little-endian fields).
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let [h0, h1] = self.hdr_len.to_le_bytes();
        let [g0, g1] = self.gso_size.to_le_bytes();
        let [s0, s1] = self.csum_start.to_le_bytes();
        let [o0, o1] = self.csum_offset.to_le_bytes();
        [self.flags, self.gso_type, h0, h1, g0, g1, s0, s1, o0, o1]
    }

    /// The metadata in the firewall's terms, for [`crate::offload::accept`].
    pub fn nic_offload(self) -> crate::offload::NicOffload {
        use crate::offload::GsoKind;
        crate::offload::NicOffload {
            csum_partial: self.flags & F_NEEDS_CSUM != 0,
            csum_start: self.csum_start,
            csum_offset: self.csum_offset,
            gso: match self.gso_type & !GSO_ECN {
                GSO_NONE => GsoKind::None,
                GSO_TCPV4 if self.gso_type & GSO_ECN == 0 => GsoKind::TcpV4,
                GSO_TCPV6 if self.gso_type & GSO_ECN == 0 => GsoKind::TcpV6,
                _ => GsoKind::Other,
            },
            gso_size: self.gso_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    fn tcp_frame(seq: u32, payload: usize, flags: u8, id: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        let total = (IP_LEN + 20 + payload) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&[0x40, 0, 64, 6, 0xaa, 0xbb, 10, 0, 0, 1, 192, 0, 2, 80]);
        f.extend_from_slice(&[0x12, 0x34, 0, 80]);
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&7u32.to_be_bytes());
        f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0xcc, 0xdd, 0, 0]);
        f.extend((0..payload).map(|i| (i as u32).wrapping_add(seq) as u8));
        f
    }

    fn run(frames: &[Vec<u8>]) -> (Vec<Vec<u8>>, Coalescer) {
        let mut c = Coalescer::default();
        let mut out = Vec::new();
        for f in frames {
            c.push(f, &mut |w| out.push(w.to_vec()));
        }
        c.flush(&mut |w| out.push(w.to_vec()));
        (out, c)
    }

    #[test]
    fn a_run_of_segments_becomes_one_gso_frame() {
        let frames = [
            tcp_frame(1000, 1448, TCP_ACK, 1),
            tcp_frame(2448, 1448, TCP_ACK, 2),
            tcp_frame(3896, 100, TCP_ACK | TCP_PSH, 3),
        ];
        let (out, c) = run(&frames);
        assert_eq!(out.len(), 1);
        assert_eq!(c.gso_writes, 1);
        assert_eq!(c.merged_frames, 3);
        let w = &out[0];
        assert_eq!(w[0], F_NEEDS_CSUM);
        assert_eq!(w[1], GSO_TCPV4);
        assert_eq!(u16::from_le_bytes([w[2], w[3]]), 54); // headers
        assert_eq!(u16::from_le_bytes([w[4], w[5]]), 1448); // gso_size
        assert_eq!(u16::from_le_bytes([w[6], w[7]]), 34); // csum_start
        assert_eq!(u16::from_le_bytes([w[8], w[9]]), 16); // csum_offset
        let frame = &w[VNET_HDR_LEN..];
        assert_eq!(frame.len(), 54 + 1448 * 2 + 100);
        assert_eq!(be16(frame, 16), Some((frame.len() - 14) as u16));
        // A valid IP header checksum.
        assert_eq!(fold(checksum_add(0, &frame[14..34])), 0xffff);
        assert_eq!(frame[14 + 20 + 13] & TCP_PSH, TCP_PSH);
        // Payloads in order, byte for byte.
        let mut payload = Vec::new();
        for f in &frames {
            payload.extend_from_slice(&f[54..]);
        }
        assert_eq!(&frame[54..], &payload[..]);
        // The TCP checksum field holds the pseudo-header sum.
        let tcp_len = (frame.len() - 34) as u32;
        let pseudo = fold(checksum_add(0, &frame[26..34]) + 6 + tcp_len);
        assert_eq!(be16(frame, 34 + 16), Some(pseudo));
    }

    #[test]
    fn single_and_unmergeable_frames_pass_unchanged_in_order() {
        let syn = tcp_frame(1, 10, TCP_SYN | TCP_ACK, 1);
        let a = tcp_frame(1000, 1448, TCP_ACK, 2);
        let gap = tcp_frame(9000, 1448, TCP_ACK, 3); // not consecutive
        let mut other_port = tcp_frame(10448, 1448, TCP_ACK, 4);
        other_port[14 + 20 + 1] = 81;
        let arp = vec![0xffu8; 42];
        let (out, c) = run(&[
            syn.clone(),
            a.clone(),
            gap.clone(),
            other_port.clone(),
            arp.clone(),
        ]);
        assert_eq!(c.gso_writes, 0);
        let plain: Vec<Vec<u8>> = out.iter().map(|w| w[VNET_HDR_LEN..].to_vec()).collect();
        assert_eq!(plain, vec![syn, a, gap, other_port, arp]);
        assert!(out.iter().all(|w| w[..VNET_HDR_LEN] == [0; VNET_HDR_LEN]));
    }

    #[test]
    fn a_short_segment_ends_the_run_and_no_bigger_one_joins() {
        let (out, c) = run(&[
            tcp_frame(0, 1000, TCP_ACK, 1),
            tcp_frame(1000, 500, TCP_ACK, 2),
            tcp_frame(1500, 1000, TCP_ACK, 3),
            tcp_frame(2500, 1400, TCP_ACK, 4),
        ]);
        assert_eq!(out.len(), 3);
        assert_eq!(c.gso_writes, 1);
        assert_eq!(out[0][1], GSO_TCPV4);
        assert_eq!(out[1][1], GSO_NONE);
        assert_eq!(out[2][1], GSO_NONE);
    }

    #[test]
    fn runs_stop_below_the_ip_length_limit() {
        let frames: Vec<Vec<u8>> = (0..100)
            .map(|i| tcp_frame(i * 1448, 1448, TCP_ACK, i as u16))
            .collect();
        let (out, _) = run(&frames);
        for w in &out {
            assert!(w.len() - VNET_HDR_LEN - ETH_LEN <= MAX_IP_LEN);
        }
        let total: usize = out.iter().map(|w| w.len() - VNET_HDR_LEN - 54).sum();
        assert_eq!(total, 100 * 1448);
    }

    #[test]
    fn vnet_headers_round_trip_and_describe_the_frame() {
        let frame = tcp_frame(0, 3000, TCP_ACK, 1);
        let offload = crate::offload::Offload {
            csum_partial: true,
            gso_size: 1000,
        };
        let header = VnetHeader::for_frame(&frame, offload).unwrap();
        assert_eq!(
            header,
            VnetHeader {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1000,
                csum_start: 34,
                csum_offset: 16,
            }
        );
        assert_eq!(VnetHeader::parse(&header.to_bytes()), Some(header));
        let nic = header.nic_offload();
        assert_eq!(nic.gso, crate::offload::GsoKind::TcpV4);
        let ecn = VnetHeader {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..header
        };
        assert_eq!(ecn.nic_offload().gso, crate::offload::GsoKind::Other);
        assert_eq!(
            VnetHeader::for_frame(&frame, crate::offload::Offload::NONE),
            Some(VnetHeader::default())
        );
    }

    #[test]
    fn wide_checksum_equals_the_16_bit_one() {
        let slow = |bytes: &[u8]| {
            let mut sum = 0u32;
            for pair in bytes.chunks(2) {
                let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
                sum += u32::from(word);
            }
            fold(sum)
        };
        let mut seed = 7u32;
        for len in [0usize, 1, 2, 3, 4, 5, 7, 8, 1499, 1500, 65535] {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            assert_eq!(fold(checksum_add(0, &bytes)), slow(&bytes), "len {len}");
        }
        assert_eq!(fold(checksum_add(0, &[0xff; 1500])), 0xffff);
    }

    #[test]
    fn malformed_frames_never_panic_and_pass_unmerged() {
        let good = tcp_frame(0, 100, TCP_ACK, 1);
        for cut in 0..good.len() {
            let (out, c) = run(&[good[..cut].to_vec(), good[..cut].to_vec()]);
            assert_eq!(c.gso_writes, 0, "cut {cut}");
            assert_eq!(out.len(), 2);
        }
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut f = good.clone();
            for _ in 0..4 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let at = (seed as usize >> 8) % f.len();
                f[at] = (seed >> 24) as u8;
            }
            let _ = run(&[good.clone(), f.clone(), f]);
        }
    }
}
