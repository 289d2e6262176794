//! Checksum offload on Xen vifs: completing the partial TCP/UDP checksum a
//! peer leaves when it flags a frame `NETTXF_csum_blank` (netfront → us) or
//! `NETRXF_csum_blank` (netback → us).
//!
//! Facts (Xen `public/io/netif.h`; Linux `xen-netback` `checksum_setup`
//! and `skb_checksum_setup`, `skb_checksum_help`): a "blank" checksum is a
//! Linux `CHECKSUM_PARTIAL` frame: the TCP or UDP checksum field holds the
//! folded pseudo-header sum (not inverted) and the receiver completes it by
//! summing the whole L4 segment (that field included) and storing the
//! inverted fold (`0` becomes `0xffff`). Only IPv4 and IPv6 TCP/UDP can be
//! completed; Linux netback drops every other frame flagged blank (ARP,
//! ICMP, fragments, an L4 header that does not fit) and so do we.
//! `NETTXF_data_validated` / `NETRXF_data_validated` only say the sender
//! checked the checksum; the router never verifies TCP/UDP checksums (it
//! adjusts them incrementally when it rewrites addresses), so the flag
//! changes nothing here.
//!
//! Completing changes the two checksum bytes and nothing else, so a peer's
//! flags can make us drop a frame but never change what the rules decide.
#![deny(clippy::indexing_slicing)]

use core::net::{Ipv4Addr, Ipv6Addr};

use crate::wire::checksum;

/// Why a frame flagged with a blank checksum cannot be completed (and is
/// dropped, as Linux netback does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartialChecksumError {
    /// Not IPv4 or IPv6 (e.g. ARP, or a VLAN tag).
    NotIp,
    /// The IP header is cut short or inconsistent (version, header or total
    /// length beyond the frame).
    BadIpHeader,
    /// A fragment: the L4 header is not (all) here.
    Fragment,
    /// Not TCP or UDP (IPv6: after the extension headers Linux walks).
    NotTcpOrUdp,
    /// The TCP or UDP header does not fit in the packet.
    ShortL4,
}

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

fn byte(frame: &[u8], at: usize) -> Option<u8> {
    frame.get(at).copied()
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([byte(frame, at)?, byte(frame, at + 1)?]))
}

/// Completes the blank TCP/UDP checksum of an Ethernet frame in place.
/// On error the frame is left unchanged.
pub fn complete_partial_checksum(frame: &mut [u8]) -> Result<(), PartialChecksumError> {
    let ip = ETH_HEADER;
    let ethertype = be16(frame, 12).ok_or(PartialChecksumError::NotIp)?;
    let (protocol, l4_start, l4_end) = match ethertype {
        ETHERTYPE_IPV4 => locate_v4(frame, ip)?,
        ETHERTYPE_IPV6 => locate_v6(frame, ip)?,
        _ => return Err(PartialChecksumError::NotIp),
    };
    let (field, header) = match protocol {
        PROTO_TCP => (16, 20),
        PROTO_UDP => (6, 8),
        _ => return Err(PartialChecksumError::NotTcpOrUdp),
    };
    if l4_end < l4_start || l4_end - l4_start < header {
        return Err(PartialChecksumError::ShortL4);
    }
    let segment = frame
        .get(l4_start..l4_end)
        .ok_or(PartialChecksumError::BadIpHeader)?;
    let sum = checksum::finish(checksum::add(0, segment));
    let value = if sum == 0 { 0xffff } else { sum };
    let slot = frame
        .get_mut(l4_start + field..l4_start + field + 2)
        .ok_or(PartialChecksumError::ShortL4)?;
    slot.copy_from_slice(&value.to_be_bytes());
    Ok(())
}

/// (protocol, L4 start, L4 end) of an IPv4 packet at `ip`.
fn locate_v4(frame: &[u8], ip: usize) -> Result<(u8, usize, usize), PartialChecksumError> {
    let bad = PartialChecksumError::BadIpHeader;
    let first = byte(frame, ip).ok_or(bad)?;
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < 20 {
        return Err(bad);
    }
    let total = usize::from(be16(frame, ip + 2).ok_or(bad)?);
    if total < header_len || ip + total > frame.len() {
        return Err(bad);
    }
    let flags_fragment = be16(frame, ip + 6).ok_or(bad)?;
    if flags_fragment & 0x3fff != 0 {
        // More-fragments set or a non-zero offset.
        return Err(PartialChecksumError::Fragment);
    }
    let protocol = byte(frame, ip + 9).ok_or(bad)?;
    Ok((protocol, ip + header_len, ip + total))
}

/// (protocol, L4 start, L4 end) of an IPv6 packet at `ip`, after the
/// extension headers Linux's `skb_checksum_setup_ipv6` walks.
fn locate_v6(frame: &[u8], ip: usize) -> Result<(u8, usize, usize), PartialChecksumError> {
    let bad = PartialChecksumError::BadIpHeader;
    if byte(frame, ip).ok_or(bad)? >> 4 != 6 {
        return Err(bad);
    }
    let payload = usize::from(be16(frame, ip + 4).ok_or(bad)?);
    let end = ip + 40 + payload;
    if end > frame.len() {
        return Err(bad);
    }
    let mut next = byte(frame, ip + 6).ok_or(bad)?;
    let mut at = ip + 40;
    // Bounded: each header is at least 8 bytes of a frame of at most 64 KiB.
    loop {
        let len = match next {
            // Hop-by-hop, routing, destination options.
            0 | 43 | 60 => (usize::from(byte(frame, at + 1).ok_or(bad)?) + 1) * 8,
            // Authentication header.
            51 => (usize::from(byte(frame, at + 1).ok_or(bad)?) + 2) * 4,
            // Fragment: only an atomic one (offset 0, no more fragments).
            44 => {
                if be16(frame, at + 2).ok_or(bad)? & 0xfff9 != 0 {
                    return Err(PartialChecksumError::Fragment);
                }
                8
            }
            protocol => return Ok((protocol, at, end)),
        };
        next = byte(frame, at).ok_or(bad)?;
        at += len;
        if at > end {
            return Err(bad);
        }
    }
}

/// The pseudo-header sum a Linux sender leaves in a blank checksum field
/// (folded, not inverted), for the host tests and doubles.
pub fn partial_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: u32) -> u16 {
    checksum::fold(checksum::pseudo_v4(&src, &dst, protocol, l4_len))
}

/// See [`partial_v4`].
pub fn partial_v6(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, l4_len: u32) -> u16 {
    checksum::fold(checksum::pseudo_v6(&src, &dst, protocol, l4_len))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    const SRC4: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 10);
    const DST4: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 1);
    const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0xa89, 0xa);
    const DST6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0xa89, 1);

    /// An Ethernet frame carrying TCP or UDP over IPv4 or IPv6 whose L4
    /// checksum is blank (pseudo-header sum only), as Linux netfront sends.
    pub(crate) fn blank_frame(v6: bool, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let l4_header = if protocol == PROTO_TCP { 20 } else { 8 };
        let l4_len = l4_header + payload.len();
        let mut l4 = vec![0u8; l4_header];
        l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&80u16.to_be_bytes());
        if protocol == PROTO_TCP {
            l4[12] = 5 << 4;
            l4[13] = 0x02; // SYN
        } else {
            l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }
        l4.extend_from_slice(payload);
        let field = if protocol == PROTO_TCP { 16 } else { 6 };
        let partial = if v6 {
            partial_v6(SRC6, DST6, protocol, l4_len as u32)
        } else {
            partial_v4(SRC4, DST4, protocol, l4_len as u32)
        };
        l4[field..field + 2].copy_from_slice(&partial.to_be_bytes());
        let mut frame = vec![0u8; 12];
        frame[0..6].copy_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);
        frame[6..12].copy_from_slice(&[0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x11]);
        if v6 {
            frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(l4_len as u16).to_be_bytes());
            ip.extend_from_slice(&[protocol, 64]);
            ip.extend_from_slice(&SRC6.octets());
            ip.extend_from_slice(&DST6.octets());
            frame.extend_from_slice(&ip);
        } else {
            frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
            ip.extend_from_slice(&SRC4.octets());
            ip.extend_from_slice(&DST4.octets());
            let sum = checksum::finish(checksum::add(0, &ip));
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        frame.extend_from_slice(&l4);
        frame
    }

    /// Whether the frame's TCP/UDP checksum verifies (pseudo header + segment).
    pub(crate) fn l4_checksum_ok(frame: &[u8]) -> bool {
        let v6 = be16(frame, 12) == Some(ETHERTYPE_IPV6);
        let (protocol, start, end) = if v6 {
            locate_v6(frame, ETH_HEADER).unwrap()
        } else {
            locate_v4(frame, ETH_HEADER).unwrap()
        };
        let len = (end - start) as u32;
        let ip = &frame[ETH_HEADER..];
        let pseudo = if v6 {
            let src: [u8; 16] = ip[8..24].try_into().unwrap();
            let dst: [u8; 16] = ip[24..40].try_into().unwrap();
            checksum::pseudo_v6(&src.into(), &dst.into(), protocol, len)
        } else {
            let src: [u8; 4] = ip[12..16].try_into().unwrap();
            let dst: [u8; 4] = ip[16..20].try_into().unwrap();
            checksum::pseudo_v4(&src.into(), &dst.into(), protocol, len)
        };
        checksum::fold(checksum::add(pseudo, &frame[start..end])) == 0xffff
    }

    #[test]
    fn blank_tcp_and_udp_checksums_are_completed_over_ipv4_and_ipv6() {
        for v6 in [false, true] {
            for protocol in [PROTO_TCP, PROTO_UDP] {
                for len in [0usize, 1, 2, 7, 100, 1000, 1400] {
                    let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                    let mut frame = blank_frame(v6, protocol, &payload);
                    assert!(!l4_checksum_ok(&frame) || len == 0 && protocol == PROTO_UDP);
                    let before = frame.clone();
                    complete_partial_checksum(&mut frame).unwrap();
                    assert!(l4_checksum_ok(&frame), "v6={v6} proto={protocol} len={len}");
                    // Only the two checksum bytes changed.
                    let changed: Vec<usize> = (0..frame.len())
                        .filter(|&i| frame[i] != before[i])
                        .collect();
                    assert!(changed.len() <= 2, "{changed:?}");
                }
            }
        }
    }

    #[test]
    fn ethernet_padding_after_the_ip_packet_is_not_summed() {
        let mut frame = blank_frame(false, PROTO_UDP, b"abc");
        frame.extend_from_slice(&[0x55; 10]);
        complete_partial_checksum(&mut frame).unwrap();
        let end = frame.len() - 10;
        assert!(l4_checksum_ok(&frame[..end]));
    }

    #[test]
    fn ipv6_extension_headers_are_walked_and_fragments_refused() {
        // Hop-by-hop (8 bytes) before UDP.
        let mut frame = blank_frame(true, PROTO_UDP, b"hello");
        let at = ETH_HEADER + 40;
        let mut hbh = vec![PROTO_UDP, 0, 1, 4, 0, 0, 0, 0];
        frame[ETH_HEADER + 6] = 0;
        let payload = be16(&frame, ETH_HEADER + 4).unwrap() + 8;
        frame[ETH_HEADER + 4..ETH_HEADER + 6].copy_from_slice(&payload.to_be_bytes());
        frame.splice(at..at, hbh.drain(..));
        complete_partial_checksum(&mut frame).unwrap();
        let (protocol, start, _) = locate_v6(&frame, ETH_HEADER).unwrap();
        assert_eq!((protocol, start), (PROTO_UDP, at + 8));
        // A fragment header with more-fragments set.
        let mut frag = blank_frame(true, PROTO_UDP, b"hello");
        frag[ETH_HEADER + 6] = 44;
        let payload = be16(&frag, ETH_HEADER + 4).unwrap() + 8;
        frag[ETH_HEADER + 4..ETH_HEADER + 6].copy_from_slice(&payload.to_be_bytes());
        frag.splice(at..at, [PROTO_UDP, 0, 0, 1, 0, 0, 0, 9]);
        assert_eq!(
            complete_partial_checksum(&mut frag),
            Err(PartialChecksumError::Fragment)
        );
    }

    #[test]
    fn lying_blank_flags_are_refused_without_touching_the_frame() {
        let tcp4 = blank_frame(false, PROTO_TCP, b"x");
        let mut cases: Vec<(Vec<u8>, PartialChecksumError)> = Vec::new();
        // Too short to carry a TCP header: total length says 20 + 10.
        let mut short = tcp4.clone();
        short[ETH_HEADER + 2..ETH_HEADER + 4].copy_from_slice(&30u16.to_be_bytes());
        cases.push((short, PartialChecksumError::ShortL4));
        // Total length past the frame.
        let mut long = tcp4.clone();
        long[ETH_HEADER + 2..ETH_HEADER + 4].copy_from_slice(&1500u16.to_be_bytes());
        cases.push((long, PartialChecksumError::BadIpHeader));
        // Cut inside the IP header; header length below 20; wrong version.
        cases.push((
            tcp4[..ETH_HEADER + 10].to_vec(),
            PartialChecksumError::BadIpHeader,
        ));
        let mut ihl = tcp4.clone();
        ihl[ETH_HEADER] = 0x44;
        cases.push((ihl, PartialChecksumError::BadIpHeader));
        let mut version = tcp4.clone();
        version[ETH_HEADER] = 0x65;
        cases.push((version, PartialChecksumError::BadIpHeader));
        // A fragment (more fragments), a later fragment.
        let mut mf = tcp4.clone();
        mf[ETH_HEADER + 6] = 0x20;
        cases.push((mf, PartialChecksumError::Fragment));
        let mut later = tcp4.clone();
        later[ETH_HEADER + 7] = 0x10;
        cases.push((later, PartialChecksumError::Fragment));
        // ICMP; ARP; a frame too short for an EtherType.
        let mut icmp = tcp4.clone();
        icmp[ETH_HEADER + 9] = 1;
        cases.push((icmp, PartialChecksumError::NotTcpOrUdp));
        let mut arp = tcp4.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        cases.push((arp, PartialChecksumError::NotIp));
        cases.push((vec![0; 13], PartialChecksumError::NotIp));
        // IPv6 payload length past the frame; UDP cut short.
        let mut v6 = blank_frame(true, PROTO_UDP, b"");
        v6[ETH_HEADER + 4..ETH_HEADER + 6].copy_from_slice(&100u16.to_be_bytes());
        cases.push((v6, PartialChecksumError::BadIpHeader));
        let mut v6short = blank_frame(true, PROTO_UDP, b"");
        v6short[ETH_HEADER + 4..ETH_HEADER + 6].copy_from_slice(&4u16.to_be_bytes());
        cases.push((v6short, PartialChecksumError::ShortL4));
        for (i, (mut frame, want)) in cases.into_iter().enumerate() {
            let before = frame.clone();
            assert_eq!(complete_partial_checksum(&mut frame), Err(want), "case {i}");
            assert_eq!(frame, before, "case {i}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x1234_5678u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let seed = blank_frame(true, PROTO_TCP, &[1; 40]);
        let seed4 = blank_frame(false, PROTO_UDP, &[1; 40]);
        for round in 0..20_000 {
            let mut frame = if round % 2 == 0 {
                seed.clone()
            } else {
                seed4.clone()
            };
            let len = next() as usize % (frame.len() + 1);
            frame.truncate(len);
            for _ in 0..(next() % 4) {
                if !frame.is_empty() {
                    let at = next() as usize % frame.len();
                    frame[at] = next() as u8;
                }
            }
            let _ = complete_partial_checksum(&mut frame);
        }
    }
}
