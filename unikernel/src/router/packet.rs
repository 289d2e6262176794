//! What the router reads from and writes into an IP packet: the parsed
//! header ([`IpMeta`]), reassembly of a fragment into its datagram, NAT
//! rewrites with incremental checksum updates, TTL / hop-limit decrement,
//! and headers for the packets the firewall itself builds.
//!
//! Nothing here may panic on a peer's bytes: `clippy::indexing_slicing` is
//! denied, fixed headers are read through arrays.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::fragments::{Reassembler, Reassembly};
use crate::nat::{FlowKey, TcpFlags};
use crate::wire::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, be16, checksum};

use super::{DropReason, ipv6};

/// How Linux conntrack sees an ICMP / ICMPv6 message
/// (`nf_conntrack_proto_icmp.c`, `nf_conntrack_proto_icmpv6.c`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IcmpKind {
    NotIcmp,
    /// A query that starts a flow: echo (8), timestamp (13), information
    /// (15), address mask (17); ICMPv6 echo (128), node information (139).
    Query,
    /// The reply of a query (0, 14, 16, 18; ICMPv6 129, 140): only ever
    /// part of a flow.
    QueryReply,
    /// An error about another packet (3, 4, 5, 11, 12; ICMPv6 1–4):
    /// RELATED to the flow it quotes.
    Error,
    /// Neighbour discovery (ICMPv6 133–137): link-local, never routed.
    Ndp,
    /// Anything else: conntrack refuses it (`ct state invalid`, dropped).
    Other,
}

/// The request type an ICMP query or query reply belongs to (`None` for
/// every other message): the "port" its flow is keyed by.
pub(super) fn icmp_query_type(v6: bool, icmp_type: u8) -> Option<(IcmpKind, u8)> {
    match (v6, icmp_type) {
        (false, 8 | 13 | 15 | 17) | (true, 128 | 139) => Some((IcmpKind::Query, icmp_type)),
        (false, 0) => Some((IcmpKind::QueryReply, 8)),
        (false, 14 | 16 | 18) => Some((IcmpKind::QueryReply, icmp_type - 1)),
        (true, 129 | 140) => Some((IcmpKind::QueryReply, icmp_type - 1)),
        _ => None,
    }
}

/// TCP flags.
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;

/// Whether Linux conntrack takes a TCP segment with these flags at all
/// (`tcp_valid_flags`; PSH, ECE and CWR do not count): anything else is
/// invalid, in a flow or not.
pub(super) fn tcp_flags_valid(flags: u8) -> bool {
    /// One bit per valid combination of FIN, SYN, RST, ACK, URG (at most
    /// 0x37): a single shift on the per-packet path.
    const VALID: u64 = 1 << SYN
        | 1 << (SYN | URG)
        | 1 << (SYN | ACK)
        | 1 << RST
        | 1 << (RST | ACK)
        | 1 << (FIN | ACK)
        | 1 << (FIN | ACK | URG)
        | 1 << ACK
        | 1 << (ACK | URG);
    VALID >> (flags & (FIN | SYN | RST | ACK | URG)) & 1 != 0
}

/// Whether a TCP segment without a flow starts one in Linux conntrack: a
/// SYN, or (`nf_conntrack_tcp_loose`, on by default) an ACK picked up
/// mid-stream. A SYN-ACK, RST or FIN without a flow is invalid.
pub(super) fn tcp_starts_flow(flags: u8) -> bool {
    tcp_flags_valid(flags) && flags & (RST | FIN) == 0 && flags & (SYN | ACK) != SYN | ACK
}

/// Whether a message is an echo request (what the firewall answers itself).
pub(super) fn is_echo_request(meta: &IpMeta) -> bool {
    meta.icmp_type == Some(if meta.v6 { 128 } else { 8 }) && meta.icmp == IcmpKind::Query
}

/// What the router reads from an IP packet.
#[derive(Clone, Copy, Debug)]
pub(super) struct IpMeta {
    pub(super) v6: bool,
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) protocol: u8,
    pub(super) header_len: usize,
    pub(super) total_len: usize,
    pub(super) ttl: u8,
    pub(super) fragment: bool,
    pub(super) src_port: u16,
    pub(super) dst_port: u16,
    pub(super) icmp: IcmpKind,
    pub(super) icmp_type: Option<u8>,
    pub(super) tcp: Option<TcpFlags>,
    /// TCP: the flags byte as it came.
    pub(super) tcp_flags: u8,
    /// IPv6: an extension header comes before the transport header (the
    /// header at `header_len`).
    pub(super) extensions: bool,
    /// For an IPv6 datagram we reassembled: its fragment id, to cut it
    /// again the same way if it does not fit the next link.
    pub(super) frag_id: Option<u32>,
    /// The transport checksum field holds only the pseudo-header sum
    /// (a frame received with offloads, `crate::offload`): NAT adjusts
    /// it for the addresses only, the output NIC (or the software
    /// fallback) completes it.
    pub(super) csum_partial: bool,
}

impl IpMeta {
    pub(super) fn key(&self) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            protocol: self.protocol,
        }
    }
}

/// Feeds one fragment to `reassembler`: `Ok(None)` while the datagram is
/// incomplete, the whole datagram and its parsed header once it is, or why
/// it was dropped. An IPv6 datagram keeps the Fragment header's
/// identification (bytes 4..8 of the Fragment header at `header_len`) for
/// re-fragmenting.
pub(super) fn reassemble(
    reassembler: &mut Reassembler,
    packet: &[u8],
    meta: &IpMeta,
    now: i64,
) -> Result<Option<(Vec<u8>, IpMeta)>, DropReason> {
    let (outcome, frag_id) = if meta.v6 {
        (
            reassembler.push_ipv6(packet, now),
            packet
                .get(meta.header_len + 4..)
                .and_then(<[u8]>::first_chunk::<4>)
                .map(|id| u32::from_be_bytes(*id)),
        )
    } else {
        (reassembler.push(packet, now), None)
    };
    match outcome {
        Reassembly::Incomplete => Ok(None),
        Reassembly::Dropped(_) => Err(DropReason::Fragment),
        Reassembly::Complete(datagram) => {
            let mut whole = parse_ip(&datagram, true)?;
            whole.frag_id = frag_id;
            Ok(Some((datagram, whole)))
        }
    }
}

/// The addresses of an IPv6 packet that could not be parsed further, to
/// answer it with an ICMPv6 error (nothing else is filled in).
pub(super) fn bare_ipv6_meta(packet: &[u8]) -> Option<IpMeta> {
    let header = packet.first_chunk::<40>()?;
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&header[24..40]);
    Some(IpMeta {
        extensions: true,
        v6: true,
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        protocol: header[6],
        header_len: 40,
        total_len: packet.len(),
        ttl: header[7],
        fragment: false,
        src_port: 0,
        dst_port: 0,
        icmp: IcmpKind::NotIcmp,
        icmp_type: None,
        tcp: None,
        tcp_flags: 0,
        frag_id: None,
        csum_partial: false,
    })
}

/// Parses an IP packet (`strict`: verify the IPv4 header checksum and that
/// the whole packet is there; not for the quoted packet inside an ICMP
/// error).
pub(super) fn parse_ip(packet: &[u8], strict: bool) -> Result<IpMeta, DropReason> {
    let first = *packet.first().ok_or(DropReason::Malformed)?;
    let mut extensions = false;
    let (v6, src, dst, protocol, header_len, total_len, ttl, fragment) = match first >> 4 {
        4 => {
            let header_len = usize::from(first & 0x0f) * 4;
            let header = packet.get(..header_len).ok_or(DropReason::Malformed)?;
            // The fixed 20 bytes as an array: constant offsets, no panics.
            let fixed = header.first_chunk::<20>().ok_or(DropReason::Malformed)?;
            let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
            if strict && (total_len < header_len || total_len > packet.len()) {
                return Err(DropReason::Malformed);
            }
            if strict {
                // The common 20-byte header summed as the fixed-size array:
                // `add` inlined and unrolled, no loop.
                let sum = if header_len == 20 {
                    checksum::add(0, fixed)
                } else {
                    checksum::add(0, header)
                };
                if checksum::fold(sum) != 0xffff {
                    return Err(DropReason::Malformed);
                }
            }
            let flags = u16::from_be_bytes([fixed[6], fixed[7]]);
            let src = Ipv4Addr::new(fixed[12], fixed[13], fixed[14], fixed[15]);
            let dst = Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]);
            let fragment = flags & 0x3fff != 0;
            (
                false,
                IpAddr::V4(src),
                IpAddr::V4(dst),
                fixed[9],
                header_len,
                total_len,
                fixed[8],
                fragment,
            )
        }
        6 => {
            let header = packet.first_chunk::<40>().ok_or(DropReason::Malformed)?;
            let total_len = 40 + usize::from(u16::from_be_bytes([header[4], header[5]]));
            if strict && total_len > packet.len() {
                return Err(DropReason::Malformed);
            }
            let mut src = [0u8; 16];
            src.copy_from_slice(&header[8..24]);
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&header[24..40]);
            // The extension headers, walked to the transport header (or
            // the Fragment header) as conntrack does (`ipv6.rs`).
            let chain = ipv6::walk(packet, packet.len().min(total_len))?;
            extensions = chain.extensions;
            let (src, dst) = (
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
            );
            let fragment = ipv6::is_fragment(chain.protocol);
            (
                true,
                src,
                dst,
                chain.protocol,
                chain.offset,
                total_len,
                header[7],
                fragment,
            )
        }
        _ => return Err(DropReason::Malformed),
    };
    let mut meta = IpMeta {
        extensions,
        v6,
        src,
        dst,
        protocol,
        header_len,
        total_len,
        ttl,
        fragment,
        src_port: 0,
        dst_port: 0,
        icmp: IcmpKind::NotIcmp,
        icmp_type: None,
        tcp: None,
        tcp_flags: 0,
        frag_id: None,
        csum_partial: false,
    };
    if fragment {
        return Ok(meta);
    }
    let end = if strict {
        total_len
    } else {
        packet.len().min(total_len)
    };
    let l4 = packet.get(header_len..end).ok_or(DropReason::Malformed)?;
    match protocol {
        PROTO_TCP => {
            meta.src_port = be16(l4, 0).ok_or(DropReason::Malformed)?;
            meta.dst_port = be16(l4, 2).ok_or(DropReason::Malformed)?;
            if strict {
                let offset = usize::from(*l4.get(12).ok_or(DropReason::Malformed)? >> 4) * 4;
                if offset < 20 || offset > l4.len() {
                    return Err(DropReason::Malformed);
                }
            }
            let flags = l4.get(13).copied().unwrap_or(0);
            meta.tcp_flags = flags;
            meta.tcp = Some(TcpFlags {
                fin: flags & 1 != 0,
                syn: flags & 2 != 0,
                rst: flags & 4 != 0,
            });
        }
        PROTO_UDP => {
            meta.src_port = be16(l4, 0).ok_or(DropReason::Malformed)?;
            meta.dst_port = be16(l4, 2).ok_or(DropReason::Malformed)?;
            if strict && l4.len() < 8 {
                return Err(DropReason::Malformed);
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 if (protocol == PROTO_ICMPV6) == v6 => {
            let icmp_type = *l4.first().ok_or(DropReason::Malformed)?;
            if strict && l4.len() < 8 {
                return Err(DropReason::Malformed);
            }
            meta.icmp_type = Some(icmp_type);
            meta.icmp = match (v6, icmp_type) {
                // ICMPv6: every type below 128 is an error to conntrack
                // (`icmpv6_error`) and to `icmpv6_send`.
                (false, 3 | 4 | 5 | 11 | 12) | (true, 0..=127) => IcmpKind::Error,
                (true, 133..=137) => IcmpKind::Ndp,
                _ => IcmpKind::Other,
            };
            if let Some((kind, request)) = icmp_query_type(v6, icmp_type) {
                // Keyed like conntrack's tuple: identifier and type.
                let id = be16(l4, 4).ok_or(DropReason::Malformed)?;
                meta.icmp = kind;
                (meta.src_port, meta.dst_port) = match kind {
                    IcmpKind::Query => (id, u16::from(request)),
                    _ => (u16::from(request), id),
                };
            }
        }
        // ICMP of the other family.
        PROTO_ICMP | PROTO_ICMPV6 => return Err(DropReason::UnsupportedProtocol),
        // Other protocols (GRE, ESP, SCTP, …) are tracked by address only,
        // like Linux's generic conntrack.
        _ => {}
    }
    Ok(meta)
}

pub(super) fn l4_checksum_offset(meta: &IpMeta) -> Option<usize> {
    match meta.protocol {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_ICMP | PROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// Rewrites an address of `packet` (an IP packet described by `meta`) and,
/// with it, the port (or ICMP id) on the same side, fixing every checksum
/// incrementally. `source` picks the side.
pub(super) fn rewrite(packet: &mut [u8], meta: &IpMeta, source: bool, address: IpAddr, port: u16) {
    // The address as the packet's family holds it (an address of the
    // other family: zero-padded or cut, never a panic).
    let mut padded = [0u8; 16];
    match address {
        IpAddr::V4(a) => padded[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => padded = a.octets(),
    }
    // Per family with the address length a constant: the copies and
    // checksum updates below are a few fixed-size moves, not `memcpy`
    // calls (this runs for every forwarded packet).
    if meta.v6 {
        rewrite_sized::<16>(packet, meta, source, padded, port);
    } else if let Some(v4) = padded.first_chunk::<4>() {
        rewrite_sized::<4>(packet, meta, source, *v4, port);
    }
}

/// [`rewrite`] for a packet whose addresses are `N` bytes (4: IPv4, 16:
/// IPv6); `new_addr` is already that long.
fn rewrite_sized<const N: usize>(
    packet: &mut [u8],
    meta: &IpMeta,
    source: bool,
    new_addr: [u8; N],
    port: u16,
) {
    let addr_at = match (meta.v6, source) {
        (false, true) => 12,
        (false, false) => 16,
        (true, true) => 8,
        (true, false) => 24,
    };
    let Some(&old_addr) = packet.get(addr_at..).and_then(<[u8]>::first_chunk::<N>) else {
        return;
    };
    let is_icmp = matches!(meta.icmp, IcmpKind::Query | IcmpKind::QueryReply);
    let port_at = meta.header_len
        + match (is_icmp, source) {
            (true, _) => 4,
            (false, true) => 0,
            (false, false) => 2,
        };
    let old_port = be16(packet, port_at).unwrap_or(port);
    let l4_sum_at = l4_checksum_offset(meta).map(|o| meta.header_len + o);
    // Does the L4 checksum cover the address (pseudo header)?
    let pseudo = meta.protocol != PROTO_ICMP;
    if let Some(at) = l4_sum_at
        && let Some(old_sum) = be16(packet, at)
    {
        let udp_without_sum = meta.protocol == PROTO_UDP && !meta.v6 && old_sum == 0;
        if meta.csum_partial {
            // The field is the folded pseudo-header sum, not complemented:
            // only the addresses are in it, the ports are summed later.
            let sum = !checksum::adjust(!old_sum, &old_addr, &new_addr);
            if let Some(field) = packet.get_mut(at..at + 2) {
                field.copy_from_slice(&sum.to_be_bytes());
            }
        } else if !udp_without_sum {
            let mut sum = old_sum;
            if pseudo {
                sum = checksum::adjust(sum, &old_addr, &new_addr);
            }
            sum = checksum::adjust(sum, &old_port.to_be_bytes(), &port.to_be_bytes());
            if meta.protocol == PROTO_UDP && sum == 0 {
                sum = 0xffff;
            }
            if let Some(field) = packet.get_mut(at..at + 2) {
                field.copy_from_slice(&sum.to_be_bytes());
            }
        }
    }
    let has_ports = is_icmp || matches!(meta.protocol, PROTO_TCP | PROTO_UDP);
    if has_ports && let Some(field) = packet.get_mut(port_at..port_at + 2) {
        field.copy_from_slice(&port.to_be_bytes());
    }
    if !meta.v6
        && let Some(old_sum) = be16(packet, 10)
    {
        let sum = checksum::adjust(old_sum, &old_addr, &new_addr);
        if let Some(field) = packet.get_mut(10..12) {
            field.copy_from_slice(&sum.to_be_bytes());
        }
    }
    if let Some(field) = packet
        .get_mut(addr_at..)
        .and_then(<[u8]>::first_chunk_mut::<N>)
    {
        *field = new_addr;
    }
}

/// Decrements the TTL / hop limit (the caller checked it is > 1).
pub(super) fn decrement_ttl(packet: &mut [u8], v6: bool) {
    if v6 {
        if let Some(hop) = packet.get_mut(7) {
            *hop = hop.saturating_sub(1);
        }
        return;
    }
    let (Some(ttl), Some(protocol), Some(sum)) = (
        packet.get(8).copied(),
        packet.get(9).copied(),
        be16(packet, 10),
    ) else {
        return;
    };
    let new_ttl = ttl.saturating_sub(1);
    let sum = checksum::adjust(sum, &[ttl, protocol], &[new_ttl, protocol]);
    if let Some(field) = packet.get_mut(8..12) {
        field.copy_from_slice(&[new_ttl, protocol, (sum >> 8) as u8, sum as u8]);
    }
}

pub(super) fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum::finish(checksum::add(0, &h));
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

pub(super) fn ipv6_header(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    protocol: u8,
    payload_len: usize,
) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    h[6] = protocol;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

pub(super) fn rewrite_address_only(
    packet: &mut [u8],
    meta: &IpMeta,
    source: bool,
    address: IpAddr,
) {
    let (at, len) = match (meta.v6, source) {
        (false, true) => (12, 4),
        (false, false) => (16, 4),
        (true, true) => (8, 16),
        (true, false) => (24, 16),
    };
    let mut new = [0u8; 16];
    match address {
        IpAddr::V4(a) => new[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => new.copy_from_slice(&a.octets()),
    }
    let mut old = [0u8; 16];
    let (Some(new), Some(old)) = (new.get(..len), old.get_mut(..len)) else {
        return;
    };
    if let Some(current) = packet.get(at..at + len) {
        old.copy_from_slice(current);
    }
    if !meta.v6
        && let Some(sum) = be16(packet, 10)
    {
        let sum = checksum::adjust(sum, old, new);
        if let Some(field) = packet.get_mut(10..12) {
            field.copy_from_slice(&sum.to_be_bytes());
        }
    }
    if let Some(field) = packet.get_mut(at..at + len) {
        field.copy_from_slice(new);
    }
}

/// Recomputes the checksum of the ICMP message at `at` of an IP packet
/// (ICMPv6 includes the pseudo header of `src` → `dst`).
pub(super) fn refill_icmp_checksum(packet: &mut [u8], at: usize, src: IpAddr, dst: IpAddr) {
    if let Some(field) = packet.get_mut(at + 2..at + 4) {
        field.copy_from_slice(&[0, 0]);
    }
    let body = packet.get(at..).unwrap_or(&[]);
    let sum = match (src, dst) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => checksum::finish(checksum::add(
            checksum::pseudo_v6(&src, &dst, PROTO_ICMPV6, body.len() as u32),
            body,
        )),
        _ => checksum::finish(checksum::add(0, body)),
    };
    if let Some(field) = packet.get_mut(at + 2..at + 4) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
}

pub(super) fn is_broadcast_or_multicast(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(a) => a.is_broadcast() || a.is_multicast() || a.is_unspecified(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unspecified(),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes packets it built itself.
mod tests {
    use super::*;

    #[test]
    fn parse_ip_refuses_malformed_packets() {
        let cases: &[&[u8]] = &[
            &[],
            &[0x45],
            &[0x44; 20], // IHL 4
            &[0x46; 24], // options but total length nonsense
            &[0x60; 39], // short IPv6 header
            &[0x70; 40], // version 7
        ];
        for case in cases {
            assert!(parse_ip(case, true).is_err(), "{case:?}");
        }
        // A valid header whose total length runs past the buffer.
        let mut header = ipv4_header(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            PROTO_UDP,
            100,
        );
        assert_eq!(parse_ip(&header, true).err(), Some(DropReason::Malformed));
        // A bad header checksum.
        header[2..4].copy_from_slice(&28u16.to_be_bytes());
        let mut packet = header.to_vec();
        packet.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        assert_eq!(parse_ip(&packet, true).err(), Some(DropReason::Malformed));
        // Fixed: parses, ports read.
        packet[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum::finish(checksum::add(0, &packet[..20]));
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
        let meta = parse_ip(&packet, true).unwrap();
        assert_eq!(
            (meta.src_port, meta.dst_port, meta.protocol),
            (1, 2, PROTO_UDP)
        );
        // Every truncation of it fails cleanly or parses; never panics.
        for len in 0..packet.len() {
            let _ = parse_ip(&packet[..len], true);
            let _ = parse_ip(&packet[..len], false);
        }
    }

    #[test]
    fn rewrite_keeps_tcp_checksum_valid() {
        let src = Ipv4Addr::new(10, 137, 0, 10);
        let dst = Ipv4Addr::new(93, 184, 216, 34);
        let mut segment = alloc::vec![0u8; 24];
        segment[0..2].copy_from_slice(&40000u16.to_be_bytes());
        segment[2..4].copy_from_slice(&443u16.to_be_bytes());
        segment[12] = 0x50;
        segment[13] = 0x02;
        segment[20..24].copy_from_slice(b"data");
        let pseudo = checksum::pseudo_v4(&src, &dst, PROTO_TCP, 24);
        let sum = checksum::finish(checksum::add(pseudo, &segment));
        segment[16..18].copy_from_slice(&sum.to_be_bytes());
        let mut packet = ipv4_header(src, dst, PROTO_TCP, 24).to_vec();
        packet.extend_from_slice(&segment);
        let meta = parse_ip(&packet, true).unwrap();
        let nat = Ipv4Addr::new(10, 137, 0, 2);
        rewrite(&mut packet, &meta, true, IpAddr::V4(nat), 51000);
        decrement_ttl(&mut packet, false);
        assert_eq!(
            checksum::fold(checksum::add(0, &packet[..20])),
            0xffff,
            "IPv4 header checksum"
        );
        let pseudo = checksum::pseudo_v4(&nat, &dst, PROTO_TCP, 24);
        assert_eq!(
            checksum::fold(checksum::add(pseudo, &packet[20..])),
            0xffff,
            "TCP checksum"
        );
        assert_eq!(&packet[20..22], &51000u16.to_be_bytes());
        assert_eq!(packet[8], 63);
    }

    fn icmp4_packet(icmp_type: u8, ident: u16) -> Vec<u8> {
        let mut m = alloc::vec![icmp_type, 0, 0, 0, (ident >> 8) as u8, ident as u8, 0, 1];
        let sum = checksum::finish(checksum::add(0, &m));
        m[2..4].copy_from_slice(&sum.to_be_bytes());
        let src = Ipv4Addr::new(10, 137, 0, 10);
        let dst = Ipv4Addr::new(1, 1, 1, 1);
        let mut packet = ipv4_header(src, dst, PROTO_ICMP, m.len()).to_vec();
        packet.extend_from_slice(&m);
        packet
    }

    #[test]
    fn icmp_messages_are_classified_as_conntrack_does() {
        // Queries: (identifier, type); their replies: (request type, id).
        for (request, reply) in [(8u8, 0u8), (13, 14), (15, 16), (17, 18)] {
            let meta = parse_ip(&icmp4_packet(request, 0x1234), true).unwrap();
            assert_eq!(meta.icmp, IcmpKind::Query, "type {request}");
            assert_eq!((meta.src_port, meta.dst_port), (0x1234, u16::from(request)));
            let meta = parse_ip(&icmp4_packet(reply, 0x1234), true).unwrap();
            assert_eq!(meta.icmp, IcmpKind::QueryReply, "type {reply}");
            assert_eq!((meta.src_port, meta.dst_port), (u16::from(request), 0x1234));
            // The reply's key is the query's, reversed.
            let query = parse_ip(&icmp4_packet(request, 0x1234), true).unwrap();
            assert_eq!(
                (query.key().src_port, query.key().dst_port),
                (meta.key().dst_port, meta.key().src_port)
            );
        }
        for error in [3u8, 4, 5, 11, 12] {
            let meta = parse_ip(&icmp4_packet(error, 0), true).unwrap();
            assert_eq!(meta.icmp, IcmpKind::Error, "type {error}");
        }
        for other in [1u8, 2, 6, 7, 9, 10, 19, 30, 42, 255] {
            let meta = parse_ip(&icmp4_packet(other, 0), true).unwrap();
            assert_eq!(meta.icmp, IcmpKind::Other, "type {other}");
        }
        assert_eq!(icmp_query_type(true, 128), Some((IcmpKind::Query, 128)));
        assert_eq!(icmp_query_type(true, 139), Some((IcmpKind::Query, 139)));
        assert_eq!(
            icmp_query_type(true, 129),
            Some((IcmpKind::QueryReply, 128))
        );
        assert_eq!(
            icmp_query_type(true, 140),
            Some((IcmpKind::QueryReply, 139))
        );
        assert_eq!(icmp_query_type(true, 8), None);
        assert_eq!(icmp_query_type(false, 128), None);
    }

    #[test]
    fn tcp_flags_as_conntrack_takes_them() {
        let (fin, syn, rst, psh, ack, urg, ece) = (1u8, 2, 4, 8, 16, 32, 64);
        for ok in [
            syn,
            syn | ece | 128,
            ack | psh,
            ack | urg,
            fin | ack,
            rst,
            rst | ack,
            syn | ack,
        ] {
            assert!(tcp_flags_valid(ok), "{ok:#x}");
        }
        for bad in [
            0,
            fin,
            syn | fin,
            syn | rst,
            rst | fin,
            fin | psh | urg,
            syn | fin | ack,
        ] {
            assert!(!tcp_flags_valid(bad), "{bad:#x}");
        }
        for starts in [syn, syn | urg, ack, ack | psh] {
            assert!(tcp_starts_flow(starts), "{starts:#x}");
        }
        for invalid in [syn | ack, rst, rst | ack, fin | ack, 0, syn | fin] {
            assert!(!tcp_starts_flow(invalid), "{invalid:#x}");
        }
    }
}
