//! Bounded IPv4 fragment reassembly, and fragmentation on output.
//!
//! The firewall must see the ports of a datagram to apply rules and NAT, so
//! fragments are reassembled first (as Linux conntrack does with
//! `nf_defrag_ipv4`) and the whole datagram is then routed; if it is bigger
//! than the outgoing MTU it is cut again ([`fragment_ipv4`]).
//!
//! Bounds: at most `max_datagrams` datagrams in reassembly (a quarter of
//! them per source address) and `max_bytes` of fragment data in total; a datagram not completed within 30 s (Linux's
//! `ipfrag_time`) is dropped; at most [`MAX_FRAGMENTS`] fragments per
//! datagram. Overlapping fragments drop the whole datagram (RFC 5722's rule
//! for IPv6, applied to IPv4 too: overlaps only serve to evade filters).
//! IPv6 fragments (a Fragment header right after the fixed header or after
//! the unfragmentable extension headers) are reassembled the same way and
//! cut again with [`fragment_ipv6`], behind the unfragmentable part Linux's
//! `ip6_find_1stfragopt` would keep.
//!
//! The input is a peer's bytes: nothing here may panic or grow past its
//! bounds (`clippy::indexing_slicing` is denied: headers are read through
//! fixed-size arrays from `split_first_chunk`, everything else via `get`).
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::wire::{Millis, checksum};

/// Reassembly timeout (Linux `net.ipv4.ipfrag_time`).
pub const REASSEMBLY_TIMEOUT: Millis = 30_000;
/// Most fragments accepted for one datagram.
pub const MAX_FRAGMENTS: usize = 64;
/// Largest IPv4 datagram.
pub const MAX_DATAGRAM: usize = 65_535;

/// Why a fragment (or its whole datagram) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentDrop {
    /// The header or lengths do not add up.
    Malformed,
    /// Too many datagrams or bytes in reassembly already.
    NoRoom,
    /// Overlaps an earlier fragment, or too many fragments.
    Overlap,
    /// The datagram would exceed 65 535 bytes.
    TooBig,
}

impl core::fmt::Display for FragmentDrop {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            FragmentDrop::Malformed => "fragment malformed (lengths do not add up)",
            FragmentDrop::NoRoom => "reassembly buffers full: fragment dropped",
            FragmentDrop::Overlap => "overlapping or too many fragments: datagram dropped",
            FragmentDrop::TooBig => "fragments exceed 65 535 bytes: datagram dropped",
        })
    }
}

impl core::fmt::Display for FragmentError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            FragmentError::DontFragment => "packet over the MTU with DF set",
            FragmentError::Unsupported => "cannot fragment a header with options",
        })
    }
}

/// What happened to a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Reassembly {
    /// Kept; the datagram is not complete yet.
    Incomplete,
    /// The datagram is complete: a whole IPv4 packet (header without
    /// fragment bits, fresh checksum).
    Complete(Vec<u8>),
    /// Dropped.
    Dropped(FragmentDrop),
}

/// One fragment as both families have it.
struct Fragment<'a> {
    /// (source, destination, identification, protocol / next header).
    key: (IpAddr, IpAddr, u32, u8),
    /// The header to keep for the datagram (IPv4 header / IPv6 fixed header).
    header: &'a [u8],
    payload: &'a [u8],
    offset: usize,
    more: bool,
    v6: bool,
}

#[derive(Debug)]
struct Pending {
    key: (IpAddr, IpAddr, u32, u8),
    header: Vec<u8>,
    data: Vec<u8>,
    ranges: Vec<(usize, usize)>,
    total: Option<usize>,
    started: Millis,
}

/// The reassembly buffers.
#[derive(Debug)]
pub struct Reassembler {
    pending: Vec<Pending>,
    max_datagrams: usize,
    max_bytes: usize,
    used_bytes: usize,
    /// When the oldest pending datagram started (`Millis::MAX`: none):
    /// a fragment walks the table for expired datagrams only once one can
    /// be, not on every fragment of a flood.
    oldest: Millis,
}

impl Reassembler {
    /// At most `max_datagrams` datagrams and `max_bytes` bytes at a time.
    pub fn new(max_datagrams: usize, max_bytes: usize) -> Reassembler {
        Reassembler {
            pending: Vec::new(),
            max_datagrams,
            max_bytes,
            used_bytes: 0,
            oldest: Millis::MAX,
        }
    }

    /// Most datagrams one source address may have in reassembly: a quarter
    /// of the slots (at least one), so one client cannot take them all.
    pub fn per_source(&self) -> usize {
        (self.max_datagrams / 4).max(1)
    }

    /// Datagrams being reassembled.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is being reassembled.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes one fragment: `packet` is a whole IPv4 packet (checked by the
    /// caller: version, header length and total length within the buffer)
    /// with MF set or a non-zero offset.
    pub fn push(&mut self, packet: &[u8], now: Millis) -> Reassembly {
        let Some(&first) = packet.first() else {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        };
        let header_len = usize::from(first & 0x0f) * 4;
        let (Some(header), Some(payload)) = (packet.get(..header_len), packet.get(header_len..))
        else {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        };
        // At least the 20-byte fixed header (a shorter IHL is malformed).
        let Some(fixed) = header.first_chunk::<20>() else {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        };
        let [
            _,
            _,
            _,
            _,
            id0,
            id1,
            fo0,
            fo1,
            _,
            protocol,
            _,
            _,
            s0,
            s1,
            s2,
            s3,
            d0,
            d1,
            d2,
            d3,
        ] = *fixed;
        let flags_offset = u16::from_be_bytes([fo0, fo1]);
        let fragment = Fragment {
            key: (
                IpAddr::V4(Ipv4Addr::new(s0, s1, s2, s3)),
                IpAddr::V4(Ipv4Addr::new(d0, d1, d2, d3)),
                u32::from(u16::from_be_bytes([id0, id1])),
                protocol,
            ),
            header,
            payload,
            offset: usize::from(flags_offset & 0x1fff) * 8,
            more: flags_offset & 0x2000 != 0,
            v6: false,
        };
        self.insert(fragment, now)
    }

    /// Takes one IPv6 fragment: `packet` is a whole IPv6 packet (checked by
    /// the caller) with a Fragment header (44), right after the fixed header
    /// or after the extension headers of the unfragmentable part
    /// (hop-by-hop, routing, destination options, authentication), which
    /// the first fragment's copy gives the datagram.
    pub fn push_ipv6(&mut self, packet: &[u8], now: Millis) -> Reassembly {
        let Some((frag_at, _)) = find_fragment_header(packet) else {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        };
        // Fixed-size arrays: the constant offsets below are checked at
        // compile time.
        let (Some(fixed), Some(header), Some(rest)) = (
            packet.first_chunk::<40>(),
            packet.get(..frag_at),
            packet.get(frag_at..),
        ) else {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        };
        let Some((&[next_header, _, of0, of1, id0, id1, id2, id3], payload)) =
            rest.split_first_chunk::<8>()
        else {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        };
        let mut src = [0u8; 16];
        src.copy_from_slice(&fixed[8..24]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&fixed[24..40]);
        let offset_flags = u16::from_be_bytes([of0, of1]);
        let id = u32::from_be_bytes([id0, id1, id2, id3]);
        let fragment = Fragment {
            key: (
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                id,
                next_header,
            ),
            header,
            payload,
            offset: usize::from(offset_flags >> 3) * 8,
            more: offset_flags & 1 != 0,
            v6: true,
        };
        self.insert(fragment, now)
    }

    fn insert(&mut self, fragment: Fragment<'_>, now: Millis) -> Reassembly {
        if now.saturating_sub(self.oldest) >= REASSEMBLY_TIMEOUT {
            self.expire(now);
        }
        let Fragment {
            key,
            header,
            payload,
            offset,
            more,
            v6,
        } = fragment;
        let end = offset + payload.len();
        let limit = if v6 {
            // The payload length counts the unfragmentable extension
            // headers too.
            MAX_DATAGRAM.saturating_sub(header.len().saturating_sub(40))
        } else {
            MAX_DATAGRAM - header.len()
        };
        if end > limit {
            return Reassembly::Dropped(FragmentDrop::TooBig);
        }
        if more && payload.len() % 8 != 0 || payload.is_empty() {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        }
        // One walk: the datagram's slot, else how many its source holds.
        let (mut found, mut from_source) = (None, 0);
        for (at, pending) in self.pending.iter().enumerate() {
            if pending.key.0 == key.0 {
                if pending.key == key {
                    found = Some(at);
                    break;
                }
                from_source += 1;
            }
        }
        let index = match found {
            Some(index) => index,
            None => {
                if self.pending.len() >= self.max_datagrams || from_source >= self.per_source() {
                    return Reassembly::Dropped(FragmentDrop::NoRoom);
                }
                self.pending.push(Pending {
                    key,
                    header: Vec::new(),
                    data: Vec::new(),
                    ranges: Vec::new(),
                    total: None,
                    started: now,
                });
                self.oldest = self.oldest.min(now);
                self.pending.len() - 1
            }
        };
        let grow = end.saturating_sub(self.pending.get(index).map_or(0, |p| p.data.len()));
        if self.used_bytes + grow > self.max_bytes {
            self.drop_at(index);
            return Reassembly::Dropped(FragmentDrop::NoRoom);
        }
        let Some(entry) = self.pending.get_mut(index) else {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        };
        let overlaps = entry.ranges.iter().any(|&(s, e)| offset < e && s < end);
        let beyond_total = entry
            .total
            .is_some_and(|total| end > total || (!more && end != total));
        let last_too_early = !more && entry.ranges.iter().any(|&(_, e)| e > end);
        if overlaps || beyond_total || last_too_early || entry.ranges.len() >= MAX_FRAGMENTS {
            self.drop_at(index);
            return Reassembly::Dropped(FragmentDrop::Overlap);
        }
        if entry.data.len() < end {
            entry.data.resize(end, 0);
        }
        self.used_bytes += grow;
        if let Some(place) = entry.data.get_mut(offset..end) {
            place.copy_from_slice(payload);
        }
        entry.ranges.push((offset, end));
        if offset == 0 {
            entry.header = header.to_vec();
        }
        if !more {
            entry.total = Some(end);
        }
        let covered: usize = entry.ranges.iter().map(|(s, e)| e - s).sum();
        match entry.total {
            Some(total) if covered == total && !entry.header.is_empty() => {
                let done = self.pending.swap_remove(index);
                self.used_bytes = self.used_bytes.saturating_sub(done.data.len());
                let datagram = if v6 {
                    assemble6(done.header, done.key.3, &done.data)
                } else {
                    assemble(done.header, &done.data)
                };
                Reassembly::Complete(datagram)
            }
            _ => Reassembly::Incomplete,
        }
    }

    fn drop_at(&mut self, index: usize) {
        if index < self.pending.len() {
            let gone = self.pending.swap_remove(index);
            self.used_bytes = self.used_bytes.saturating_sub(gone.data.len());
        }
    }

    /// Drops datagrams older than [`REASSEMBLY_TIMEOUT`]; returns how many.
    pub fn expire(&mut self, now: Millis) -> usize {
        let before = self.pending.len();
        let mut freed = 0;
        let mut oldest = Millis::MAX;
        self.pending.retain(|p| {
            let keep = now.saturating_sub(p.started) < REASSEMBLY_TIMEOUT;
            if keep {
                oldest = oldest.min(p.started);
            } else {
                freed += p.data.len();
            }
            keep
        });
        self.oldest = oldest;
        self.used_bytes = self.used_bytes.saturating_sub(freed);
        before - self.pending.len()
    }
}

fn assemble(mut header: Vec<u8>, data: &[u8]) -> Vec<u8> {
    let total = header.len() + data.len();
    if let Some(field) = header.get_mut(2..4) {
        field.copy_from_slice(&(total as u16).to_be_bytes());
    }
    if let Some([flags, offset_low]) = header.get_mut(6..8) {
        // Keep DF, clear MF and the offset.
        *flags &= 0x40;
        *offset_low = 0;
    }
    if let Some(field) = header.get_mut(10..12) {
        field.copy_from_slice(&[0, 0]);
    }
    let sum = checksum::finish(checksum::add(0, &header));
    if let Some(field) = header.get_mut(10..12) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
    header.extend_from_slice(data);
    header
}

/// An IPv6 datagram from its unfragmentable part (fixed header and the
/// extension headers before the Fragment header) and data: the Fragment
/// header is gone, its next header takes its place.
fn assemble6(mut header: Vec<u8>, next_header: u8, data: &[u8]) -> Vec<u8> {
    let next_at = find_fragment_header(&header).map_or(6, |(_, at)| at);
    let payload = header.len().saturating_sub(40) + data.len();
    if let Some(field) = header.get_mut(4..6) {
        field.copy_from_slice(&(payload as u16).to_be_bytes());
    }
    if let Some(field) = header.get_mut(next_at) {
        *field = next_header;
    }
    header.extend_from_slice(data);
    header
}

/// Most extension headers looked through for the Fragment header.
const MAX_UNFRAGMENTABLE: usize = 8;

/// The length of an IPv6 extension header whose type is `kind`, from its
/// second byte, for the headers that may come before a Fragment header.
fn extension_length(kind: u8, second: u8) -> Option<usize> {
    match kind {
        // Hop-by-hop, routing, destination options: 8-byte units.
        0 | 43 | 60 => Some((usize::from(second) + 1) * 8),
        // Authentication header: 4-byte units.
        51 => Some((usize::from(second) + 2) * 4),
        _ => None,
    }
}

/// Where an IPv6 packet's Fragment header is, and where the next-header
/// byte naming it is: `(offset, next_header_at)`. With `packet` cut just
/// before the Fragment header (an unfragmentable part), the position it
/// would be at. `None` if there is none among the first extension headers.
fn find_fragment_header(packet: &[u8]) -> Option<(usize, usize)> {
    let mut next_at = 6;
    let mut at = 40;
    for _ in 0..=MAX_UNFRAGMENTABLE {
        let kind = *packet.get(next_at)?;
        if kind == 44 || at == packet.len() {
            return (kind == 44).then_some((at, next_at));
        }
        let length = extension_length(kind, *packet.get(at + 1)?)?;
        next_at = at;
        at += length;
    }
    None
}

/// The unfragmentable part of an IPv6 packet when we cut it, as Linux's
/// `ip6_find_1stfragopt`: hop-by-hop, routing, and destination options
/// before a routing header (or with none after them). Returns its length
/// and where the next-header byte that follows it is.
fn unfragmentable(packet: &[u8]) -> Option<(usize, usize)> {
    let mut next_at = 6;
    let mut at = 40;
    let mut routing = false;
    for _ in 0..=MAX_UNFRAGMENTABLE {
        let kind = *packet.get(next_at)?;
        match kind {
            0 | 43 => routing |= kind == 43,
            60 if !routing => {}
            _ => return Some((at, next_at)),
        }
        let length = extension_length(kind, *packet.get(at + 1)?)?;
        if at + length > packet.len() {
            return None;
        }
        next_at = at;
        at += length;
    }
    None
}

/// Cuts a reassembled IPv6 packet into fragments of at most `mtu` bytes,
/// each the packet's unfragmentable part (fixed header, hop-by-hop,
/// routing, destination options before routing) then a Fragment header with
/// `id` (what Linux conntrack does when it forwards a datagram it
/// reassembled). A packet that fits is handed over whole.
pub fn fragment_ipv6(
    packet: &[u8],
    mtu: usize,
    id: u32,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), FragmentError> {
    if packet.len() <= mtu {
        emit(packet);
        return Ok(());
    }
    let (Some((unfragmentable_len, next_at)), true) = (unfragmentable(packet), packet.len() >= 40)
    else {
        return Err(FragmentError::Unsupported);
    };
    let (Some(header), Some(data)) = (
        packet.get(..unfragmentable_len),
        packet.get(unfragmentable_len..),
    ) else {
        return Err(FragmentError::Unsupported);
    };
    if mtu < unfragmentable_len + 16 {
        return Err(FragmentError::Unsupported);
    }
    // Each fragment's unfragmentable part: this copy with its own payload
    // length and next header 44 (Fragment).
    let mut fixed = header.to_vec();
    let Some(next_header) = fixed
        .get_mut(next_at)
        .map(|byte| core::mem::replace(byte, 44))
    else {
        return Err(FragmentError::Unsupported);
    };
    let chunk = (mtu - unfragmentable_len - 8) & !7;
    let mut buffer = Vec::with_capacity(mtu);
    let mut start = 0;
    while start < data.len() {
        let end = (start + chunk).min(data.len());
        let more = end < data.len();
        let payload = unfragmentable_len - 40 + 8 + end - start;
        if let Some(field) = fixed.get_mut(4..6) {
            field.copy_from_slice(&(payload as u16).to_be_bytes());
        }
        buffer.clear();
        buffer.extend_from_slice(&fixed);
        let offset_flags = ((start / 8) as u16) << 3 | u16::from(more);
        buffer.extend_from_slice(&[next_header, 0]);
        buffer.extend_from_slice(&offset_flags.to_be_bytes());
        buffer.extend_from_slice(&id.to_be_bytes());
        buffer.extend_from_slice(data.get(start..end).unwrap_or(&[]));
        emit(&buffer);
        start = end;
    }
    Ok(())
}

/// Why [`fragment_ipv4`] refused a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentError {
    /// DF is set and the packet is bigger than the MTU.
    DontFragment,
    /// The packet is malformed, or the MTU too small for its header.
    Unsupported,
}

/// Cuts an IPv4 packet into fragments of at most `mtu` bytes and hands each
/// to `emit`. A packet that fits is handed over whole. Header options go
/// whole into the first fragment; the later ones keep only the options
/// whose "copied" bit is set, the others overwritten with NOPs (the header
/// keeps its length), as Linux's `ip_options_fragment` does.
pub fn fragment_ipv4(
    packet: &[u8],
    mtu: usize,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), FragmentError> {
    if packet.len() <= mtu {
        emit(packet);
        return Ok(());
    }
    let first = *packet.first().ok_or(FragmentError::Unsupported)?;
    let header_len = usize::from(first & 0x0f) * 4;
    let (Some(header), Some(data)) = (packet.get(..header_len), packet.get(header_len..)) else {
        return Err(FragmentError::Unsupported);
    };
    let Some(fixed_part) = header.first_chunk::<20>() else {
        return Err(FragmentError::Unsupported);
    };
    if first >> 4 != 4 || mtu < header_len + 8 {
        return Err(FragmentError::Unsupported);
    }
    let flags_offset = u16::from_be_bytes([fixed_part[6], fixed_part[7]]);
    if flags_offset & 0x4000 != 0 {
        return Err(FragmentError::DontFragment);
    }
    let base_offset = usize::from(flags_offset & 0x1fff) * 8;
    let original_more = flags_offset & 0x2000 != 0;
    let chunk = (mtu - header_len) & !7;
    let mut later = header.to_vec();
    later_fragment_options(&mut later);
    let mut buffer = Vec::with_capacity(mtu);
    let mut start = 0;
    while start < data.len() {
        let end = (start + chunk).min(data.len());
        let more = end < data.len() || original_more;
        buffer.clear();
        buffer.extend_from_slice(if start == 0 { header } else { &later });
        let field = ((base_offset + start) / 8) as u16 | if more { 0x2000 } else { 0 };
        let total = (header_len + end - start) as u16;
        if let Some(edit) = buffer.get_mut(..header_len) {
            if let Some(length) = edit.get_mut(2..4) {
                length.copy_from_slice(&total.to_be_bytes());
            }
            if let Some(flags) = edit.get_mut(6..8) {
                flags.copy_from_slice(&field.to_be_bytes());
            }
            if let Some(sum) = edit.get_mut(10..12) {
                sum.copy_from_slice(&[0, 0]);
            }
            let sum = checksum::finish(checksum::add(0, edit));
            if let Some(field) = edit.get_mut(10..12) {
                field.copy_from_slice(&sum.to_be_bytes());
            }
        }
        buffer.extend_from_slice(data.get(start..end).unwrap_or(&[]));
        emit(&buffer);
        start = end;
    }
    Ok(())
}

/// The options of a fragment after the first: those without the copied bit
/// become NOPs.
fn later_fragment_options(header: &mut [u8]) {
    let mut at = 20;
    while let Some(&kind) = header.get(at) {
        match kind {
            0 => break,
            1 => at += 1,
            _ => {
                let length = usize::from(header.get(at + 1).copied().unwrap_or(0)).max(2);
                if kind & 0x80 == 0 {
                    let end = (at + length).min(header.len());
                    if let Some(option) = header.get_mut(at..end) {
                        option.fill(1);
                    }
                }
                at += length;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes packets it built itself.
mod tests {
    use super::*;

    fn datagram(len: usize) -> Vec<u8> {
        let mut p = alloc::vec![0u8; 20 + len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 137, 0, 10]);
        p[16..20].copy_from_slice(&[1, 1, 1, 1]);
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let sum = checksum::finish(checksum::add(0, &p[..20]));
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    fn split(p: &[u8], mtu: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        fragment_ipv4(p, mtu, |f| out.push(f.to_vec())).unwrap();
        out
    }

    #[test]
    fn fragment_and_reassemble_in_any_order() {
        let p = datagram(3000);
        let mut frags = split(&p, 1500);
        assert_eq!(frags.len(), 3);
        assert!(frags.iter().all(|f| f.len() <= 1500));
        frags.reverse();
        let mut r = Reassembler::new(4, 100_000);
        assert_eq!(r.push(&frags[0], 0), Reassembly::Incomplete);
        assert_eq!(r.push(&frags[1], 0), Reassembly::Incomplete);
        assert_eq!(r.push(&frags[2], 0), Reassembly::Complete(p));
        assert!(r.is_empty());
    }

    #[test]
    fn overlap_drops_the_datagram() {
        let p = datagram(3000);
        let frags = split(&p, 1500);
        let mut r = Reassembler::new(4, 100_000);
        assert_eq!(r.push(&frags[0], 0), Reassembly::Incomplete);
        assert_eq!(
            r.push(&frags[0], 0),
            Reassembly::Dropped(FragmentDrop::Overlap)
        );
        assert!(r.is_empty());
    }

    #[test]
    fn bounds_and_timeout() {
        let mut r = Reassembler::new(1, 100_000);
        let a = split(&datagram(3000), 1500);
        let mut b = datagram(3000);
        b[4] = 0x99;
        let b = split(&b, 1500);
        assert_eq!(r.push(&a[0], 0), Reassembly::Incomplete);
        assert_eq!(r.push(&b[0], 0), Reassembly::Dropped(FragmentDrop::NoRoom));
        assert_eq!(
            r.push(&b[0], REASSEMBLY_TIMEOUT),
            Reassembly::Incomplete,
            "old one expired"
        );
        let mut small = Reassembler::new(8, 1000);
        assert_eq!(
            small.push(&a[0], 0),
            Reassembly::Dropped(FragmentDrop::NoRoom)
        );
        assert!(small.is_empty());
    }

    #[test]
    fn one_source_gets_a_quarter_of_the_slots() {
        let mut r = Reassembler::new(8, 1_000_000);
        for id in 0..3u8 {
            let mut p = datagram(3000);
            p[5] = id;
            let first = split(&p, 1500).remove(0);
            let expected = if id < 2 {
                Reassembly::Incomplete
            } else {
                Reassembly::Dropped(FragmentDrop::NoRoom)
            };
            assert_eq!(r.push(&first, 0), expected);
        }
        let mut other = datagram(3000);
        other[15] = 11; // another source
        assert_eq!(r.push(&split(&other, 1500)[0], 0), Reassembly::Incomplete);
    }

    #[test]
    fn malformed_fragments() {
        let mut r = Reassembler::new(4, 100_000);
        assert_eq!(r.push(&[], 0), Reassembly::Dropped(FragmentDrop::Malformed));
        assert_eq!(
            r.push(&[0x4f; 10], 0),
            Reassembly::Dropped(FragmentDrop::Malformed)
        );
        let mut odd = datagram(13);
        odd[6] = 0x20; // MF with a payload not a multiple of 8
        assert_eq!(
            r.push(&odd, 0),
            Reassembly::Dropped(FragmentDrop::Malformed)
        );
        let mut short_ihl = datagram(16);
        short_ihl[0] = 0x44; // IHL 4: a 16-byte header is shorter than the fixed one
        short_ihl[6] = 0x20;
        assert_eq!(
            r.push(&short_ihl, 0),
            Reassembly::Dropped(FragmentDrop::Malformed)
        );
        let mut cut_fragment_header = datagram6(8);
        cut_fragment_header[6] = 44;
        cut_fragment_header.truncate(44); // Fragment header cut in half
        assert_eq!(
            r.push_ipv6(&cut_fragment_header, 0),
            Reassembly::Dropped(FragmentDrop::Malformed)
        );
        assert!(r.is_empty());
        let mut far = datagram(16);
        far[6] = 0x3f;
        far[7] = 0xff; // offset 65528 + 16 bytes > 65535
        assert_eq!(r.push(&far, 0), Reassembly::Dropped(FragmentDrop::TooBig));
    }

    fn datagram6(len: usize) -> Vec<u8> {
        let mut p = alloc::vec![0u8; 40 + len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8] = 0xfd;
        p[23] = 0x0a;
        p[24] = 0x20;
        p[39] = 0x80;
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    #[test]
    fn ipv6_fragment_and_reassemble() {
        let p = datagram6(3000);
        let mut frags = Vec::new();
        fragment_ipv6(&p, 1280, 0xabcd, |f| frags.push(f.to_vec())).unwrap();
        assert_eq!(frags.len(), 3);
        assert!(frags.iter().all(|f| f.len() <= 1280 && f[6] == 44));
        let mut r = Reassembler::new(4, 100_000);
        frags.swap(0, 2);
        assert_eq!(r.push_ipv6(&frags[0], 0), Reassembly::Incomplete);
        assert_eq!(r.push_ipv6(&frags[1], 0), Reassembly::Incomplete);
        assert_eq!(r.push_ipv6(&frags[2], 0), Reassembly::Complete(p));
        assert_eq!(
            r.push_ipv6(&[0x60; 20], 0),
            Reassembly::Dropped(FragmentDrop::Malformed)
        );
        let mut not_fragment = datagram6(100);
        not_fragment.truncate(60);
        assert_eq!(
            r.push_ipv6(&not_fragment, 0),
            Reassembly::Dropped(FragmentDrop::Malformed)
        );
    }

    #[test]
    fn ipv6_cut_behind_the_unfragmentable_part_and_reassembled() {
        // Fixed header, hop-by-hop, routing, destination options (after
        // the routing header: fragmentable), then 3 000 bytes of UDP.
        let mut p = datagram6(3000 + 24);
        p[6] = 0;
        let headers = [
            [43, 0, 1, 4, 0, 0, 0, 0],
            [60, 0, 4, 0, 0, 0, 0, 0],
            [17, 0, 1, 4, 0, 0, 0, 0],
        ];
        for (i, header) in headers.iter().enumerate() {
            p[40 + 8 * i..48 + 8 * i].copy_from_slice(header);
        }
        assert_eq!(unfragmentable(&p), Some((56, 48)));
        let mut frags = Vec::new();
        fragment_ipv6(&p, 1280, 0xabcd, |f| frags.push(f.to_vec())).unwrap();
        assert_eq!(frags.len(), 3);
        for f in &frags {
            assert!(f.len() <= 1280);
            assert_eq!((&f[..4], &f[7..40]), (&p[..4], &p[7..40]), "fixed header");
            assert_eq!(
                (f[6], f[40], f[48]),
                (0, 43, 44),
                "hop-by-hop, routing, Fragment"
            );
            assert_eq!(
                f[56], 60,
                "the Fragment header names the destination options"
            );
            assert_eq!(usize::from(u16::from_be_bytes([f[4], f[5]])), f.len() - 40);
        }
        let mut r = Reassembler::new(4, 100_000);
        assert_eq!(r.push_ipv6(&frags[2], 0), Reassembly::Incomplete);
        assert_eq!(r.push_ipv6(&frags[0], 0), Reassembly::Incomplete);
        assert_eq!(r.push_ipv6(&frags[1], 0), Reassembly::Complete(p));
        // Routing then destination options without anything after: the
        // walk stops at what is not an extension header.
        let mut q = datagram6(100);
        q[6] = 60;
        q[40..48].copy_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(unfragmentable(&q), Some((48, 40)), "no routing: kept");
        assert_eq!(find_fragment_header(&q), None);
    }

    #[test]
    fn ipv4_options_are_copied_as_linux_does() {
        // Record route (not copied) then loose source route (copied).
        let options = [7u8, 7, 4, 0, 0, 0, 0, 131, 7, 4, 1, 2, 3, 4, 0, 0];
        let mut p = datagram(3000);
        let mut with = p[..20].to_vec();
        with.extend_from_slice(&options);
        with.extend_from_slice(&p[20..]);
        p = with;
        p[0] = 0x45 + 4;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum::finish(checksum::add(0, &p[..36]));
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut frags = Vec::new();
        fragment_ipv4(&p, 1500, |f| frags.push(f.to_vec())).unwrap();
        assert_eq!(frags.len(), 3);
        assert_eq!(&frags[0][20..36], &options);
        for f in &frags[1..] {
            assert_eq!(&f[20..27], &[1; 7], "record route: NOPs");
            assert_eq!(&f[27..36], &options[7..], "source route kept");
        }
        for f in &frags {
            assert!(f.len() <= 1500);
            assert_eq!(checksum::fold(checksum::add(0, &f[..36])), 0xffff);
        }
        let mut r = Reassembler::new(4, 100_000);
        assert_eq!(r.push(&frags[1], 0), Reassembly::Incomplete);
        assert_eq!(r.push(&frags[2], 0), Reassembly::Incomplete);
        match r.push(&frags[0], 0) {
            Reassembly::Complete(whole) => assert_eq!(whole[36..], p[36..]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dont_fragment_is_refused() {
        let mut p = datagram(3000);
        p[6] = 0x40;
        assert_eq!(
            fragment_ipv4(&p, 1500, |_| {}),
            Err(FragmentError::DontFragment)
        );
        let small = datagram(100);
        assert_eq!(split(&small, 1500), alloc::vec![small]);
    }
}
