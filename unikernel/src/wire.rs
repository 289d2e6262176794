//! The bottom layer of the packet path: wire constants (EtherTypes, IP
//! protocol numbers), the Internet checksum, the monotonic clock type and
//! a bounds-checked big-endian read. Every networking module (`arp`,
//! `fragments`, `nat`, `rules`, `router`, …) builds on this one, and it
//! imports nothing from them, so no module imports from one above it.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

/// Milliseconds of the monotonic clock.
pub type Millis = i64;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// EtherType ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

/// IP protocol number: ICMP.
pub const PROTO_ICMP: u8 = 1;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 next header: Fragment.
pub const PROTO_FRAGMENT: u8 = 44;
/// GRE, tracked without ports.
pub const PROTO_GRE: u8 = 47;
/// ESP, tracked without ports.
pub const PROTO_ESP: u8 = 50;
/// SCTP, tracked without ports (its CRC does not cover the addresses).
pub const PROTO_SCTP: u8 = 132;

/// The big-endian 16-bit word at `at`, if `bytes` holds it.
pub fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Internet checksum helpers (RFC 1071, incremental update per RFC 1624).
pub mod checksum {
    use core::net::{Ipv4Addr, Ipv6Addr};

    /// Adds `bytes` (big-endian 16-bit words, odd byte padded) to `sum`.
    ///
    /// The bytes are summed four at a time (big-endian 32-bit words into
    /// a 64-bit accumulator, folded back to 32 bits): half the additions
    /// of 16-bit words, and the same one's-complement sum since 2^16 is 1
    /// modulo 0xffff. The result is congruent to the plain 16-bit word
    /// sum, not equal to it: use it through [`fold`] / [`finish`] or as
    /// the `sum` of another `add`, never with `+` (it may be near
    /// `u32::MAX`).
    #[inline]
    pub fn add(sum: u32, bytes: &[u8]) -> u32 {
        let mut acc = u64::from(sum);
        let (quads, rest) = bytes.as_chunks::<4>();
        for &quad in quads {
            acc += u64::from(u32::from_be_bytes(quad));
        }
        let (words, tail) = rest.as_chunks::<2>();
        for &word in words {
            acc += u64::from(u16::from_be_bytes(word));
        }
        if let Some(&last) = tail.first() {
            acc += u64::from(u16::from_be_bytes([last, 0]));
        }
        while acc > 0xffff_ffff {
            acc = (acc & 0xffff_ffff) + (acc >> 32);
        }
        acc as u32
    }

    /// Folds a sum to 16 bits: two end-around carries bring any `u32` there
    /// (at most 0x1fffe after the first, 0xffff after the second), no loop.
    pub fn fold(sum: u32) -> u16 {
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        sum as u16
    }

    /// The checksum field value for a sum.
    pub fn finish(sum: u32) -> u16 {
        !fold(sum)
    }

    /// IPv4 pseudo-header sum.
    pub fn pseudo_v4(src: &Ipv4Addr, dst: &Ipv4Addr, protocol: u8, length: u32) -> u32 {
        let sum = add(add(0, &src.octets()), &dst.octets());
        add(sum, &[0, protocol, (length >> 8) as u8, length as u8])
    }

    /// IPv6 pseudo-header sum.
    pub fn pseudo_v6(src: &Ipv6Addr, dst: &Ipv6Addr, protocol: u8, length: u32) -> u32 {
        let sum = add(add(0, &src.octets()), &dst.octets());
        add(add(sum, &length.to_be_bytes()), &[0, 0, 0, protocol])
    }

    /// Updates checksum field `check` for a change of `old` to `new` (equal
    /// even lengths): HC' = ~(~HC + ~m + m').
    pub fn adjust(check: u16, old: &[u8], new: &[u8]) -> u16 {
        let mut sum = u32::from(!check);
        let (old_words, _) = old.as_chunks::<2>();
        let (new_words, _) = new.as_chunks::<2>();
        for (&o, &n) in old_words.iter().zip(new_words) {
            sum += u32::from(!u16::from_be_bytes(o));
            sum += u32::from(u16::from_be_bytes(n));
        }
        !fold(sum)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes buffers it built itself.
mod tests {
    use super::*;

    #[test]
    fn incremental_checksum_matches_a_full_recompute() {
        let mut data: alloc::vec::Vec<u8> = (0..64u32)
            .map(|i| (i.wrapping_mul(37) ^ 0x5a) as u8)
            .collect();
        for round in 0..200u32 {
            let before = checksum::finish(checksum::add(0, &data));
            let at = ((round as usize * 6) % 60) & !1;
            let old = [data[at], data[at + 1], data[at + 2], data[at + 3]];
            let new = (round.wrapping_mul(0x9e37_79b9)).to_be_bytes();
            data[at..at + 4].copy_from_slice(&new);
            let adjusted = checksum::adjust(before, &old, &new);
            let recomputed = checksum::finish(checksum::add(0, &data));
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(
                adjusted == recomputed
                    || (adjusted | recomputed) == 0xffff && (adjusted & recomputed) == 0,
                "round {round}: {adjusted:#06x} vs {recomputed:#06x}"
            );
        }
    }

    #[test]
    fn sum_by_32_bit_words_folds_as_the_16_bit_word_sum() {
        // The reference: RFC 1071's 16-bit words, odd byte padded.
        fn reference(bytes: &[u8]) -> u16 {
            let mut sum: u64 = 0;
            for pair in bytes.chunks(2) {
                sum += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            sum as u16
        }
        let mut data: alloc::vec::Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(151) ^ 0xa5) as u8)
            .collect();
        data.extend_from_slice(&[0xff; 64]);
        for start in 0..8 {
            for len in 0..data.len() - start {
                let bytes = &data[start..start + len];
                assert_eq!(checksum::fold(checksum::add(0, bytes)), reference(bytes));
                // Chained (split at an even offset) from a large running sum.
                let half = len / 4 * 2;
                let chained =
                    checksum::add(checksum::add(0xffff_fff0, &bytes[..half]), &bytes[half..]);
                let mut expected = u64::from(reference(bytes)) + 0xffff_fff0;
                while expected > 0xffff {
                    expected = (expected & 0xffff) + (expected >> 16);
                }
                assert_eq!(
                    u64::from(checksum::fold(chained)),
                    expected,
                    "{start} {len}"
                );
            }
        }
        for sum in [
            0u32,
            1,
            0xffff,
            0x1_0000,
            0x1_fffe,
            0xffff_ffff,
            0x8000_ffff,
        ] {
            let mut slow = sum;
            while slow > 0xffff {
                slow = (slow & 0xffff) + (slow >> 16);
            }
            assert_eq!(u32::from(checksum::fold(sum)), slow, "{sum:#x}");
        }
    }

    #[test]
    fn be16_reads_in_bounds_only() {
        assert_eq!(be16(&[0x12, 0x34, 0x56], 1), Some(0x3456));
        assert_eq!(be16(&[0x12, 0x34, 0x56], 2), None);
        assert_eq!(be16(&[], 0), None);
    }
}
