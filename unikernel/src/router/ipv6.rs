//! IPv6 extension headers, as a Linux router forwarding under nftables
//! and conntrack treats them:
//! - the chain is walked to the transport header (hop-by-hop, routing,
//!   destination options, authentication header; the Fragment header ends
//!   the walk, the datagram is reassembled and walked again), at most
//!   [`MAX_EXTENSION_HEADERS`] headers, like conntrack's
//!   `ipv6_skip_exthdr` (what `meta l4proto`, `tcp dport`, `icmpv6 type`
//!   and the connection tracking see);
//! - a hop-by-hop header is only valid first, and its options are checked
//!   as every router does (`ip6_parse_tlv`): padding of at most 7 bytes, of
//!   zeroes; at most 8 other options; an unknown option whose type says
//!   "discard" (the two high bits not 00) drops the packet, with an ICMPv6
//!   parameter problem (4/2, pointing at it) when they are 10, or 11 and
//!   the destination is not multicast ([`hop_by_hop_problem`]);
//! - routing and destination options are not ours to process (we are not
//!   the destination): they are forwarded untouched;
//! - Qubes' rules match `proto=` as `ip6 nexthdr <proto>`, which reads the
//!   *fixed* header's next header only: behind an extension header a
//!   `proto=` rule never matches, while `dstports=` without `proto=` and
//!   `specialtarget=dns` (`tcp dport`/`udp dport`, through `meta l4proto`)
//!   still do. [`decide_behind_extension_headers`] decides such a flow the
//!   same way.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use crate::rules::{Action, FlowMeta, MatchContext, RuleSet, Verdict};
use crate::wire::PROTO_FRAGMENT;

use super::DropReason;

/// Most extension headers walked before the transport header; more is
/// dropped (`UnsupportedProtocol`).
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// IPv6 next header: hop-by-hop options.
pub(super) const HOP_BY_HOP: u8 = 0;
/// IPv6 next header: routing.
pub(super) const ROUTING: u8 = 43;
/// IPv6 next header: destination options.
pub(super) const DESTINATION_OPTIONS: u8 = 60;
/// IPv6 next header: authentication header (its length is counted in
/// 4-byte words).
pub(super) const AUTHENTICATION: u8 = 51;

/// Where the walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Chain {
    /// The transport protocol, or [`PROTO_FRAGMENT`] for a fragment.
    pub(super) protocol: u8,
    /// The offset of the transport header (or of the Fragment header).
    pub(super) offset: usize,
    /// Whether an extension header came before it.
    pub(super) extensions: bool,
}

/// Walks the extension headers of the IPv6 packet `packet` (fixed header
/// included) within its first `end` bytes.
#[inline(never)] // reason: keeps parse_ip small for the IPv4 fast path.
pub(super) fn walk(packet: &[u8], end: usize) -> Result<Chain, DropReason> {
    let fixed = packet.first_chunk::<40>().ok_or(DropReason::Malformed)?;
    let mut next = fixed[6];
    let mut at = 40;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        if !matches!(
            next,
            HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS | AUTHENTICATION
        ) {
            return Ok(Chain {
                protocol: next,
                offset: at,
                extensions: at > 40,
            });
        }
        if next == HOP_BY_HOP && at != 40 {
            // Only valid right after the fixed header (RFC 8200 §4.3).
            return Err(DropReason::Malformed);
        }
        let &[following, length] = packet
            .get(at..end)
            .and_then(<[u8]>::first_chunk::<2>)
            .ok_or(DropReason::Malformed)?;
        let length = if next == AUTHENTICATION {
            (usize::from(length) + 2) * 4
        } else {
            (usize::from(length) + 1) * 8
        };
        let header = packet
            .get(at..at + length)
            .filter(|_| at + length <= end)
            .ok_or(DropReason::Malformed)?;
        if next == HOP_BY_HOP {
            check_hop_by_hop(header)?;
        }
        next = following;
        at += length;
    }
    Err(DropReason::UnsupportedProtocol)
}

/// Checks a hop-by-hop header's options as a forwarding router must.
fn check_hop_by_hop(header: &[u8]) -> Result<(), DropReason> {
    let mut options = header.get(2..).unwrap_or(&[]);
    let mut padding = 0;
    let mut others = 0;
    while let Some((&kind, rest)) = options.split_first() {
        if kind == 0 {
            // Pad1.
            padding += 1;
            if padding > 7 {
                return Err(DropReason::UnsupportedProtocol);
            }
            options = rest;
            continue;
        }
        let (&length, rest) = rest.split_first().ok_or(DropReason::Malformed)?;
        let length = usize::from(length);
        let value = rest.get(..length).ok_or(DropReason::Malformed)?;
        options = rest.get(length..).unwrap_or(&[]);
        if kind == 1 {
            // PadN: zeroes only.
            padding += length + 2;
            if padding > 7 || value.iter().any(|&b| b != 0) {
                return Err(DropReason::UnsupportedProtocol);
            }
            continue;
        }
        padding = 0;
        others += 1;
        if others > 8 {
            return Err(DropReason::UnsupportedProtocol);
        }
        match kind {
            // Router alert: no local listener, forwarded.
            5 if length == 2 => {}
            // Jumbo payload: never on a 1 500-byte link.
            0xc2 => return Err(DropReason::Malformed),
            // Unknown: the two high bits say skip (00) or discard.
            _ if kind >> 6 == 0 => {}
            _ => return Err(DropReason::UnsupportedProtocol),
        }
    }
    Ok(())
}

/// For an IPv6 packet [`walk`] refused: where its hop-by-hop header holds an
/// unknown option whose type asks for an ICMPv6 parameter problem (code 2,
/// "unrecognized option"): high bits 10 always, 11 unless the destination
/// is multicast (RFC 8200 §4.2, Linux's `ip6_tlvopt_unknown`). The offset
/// is from the start of the IPv6 header.
pub(super) fn hop_by_hop_problem(packet: &[u8]) -> Option<u32> {
    let fixed = packet.first_chunk::<40>()?;
    if fixed[6] != HOP_BY_HOP {
        return None;
    }
    let multicast = fixed[24] == 0xff;
    let length = (usize::from(*packet.get(41)?) + 1) * 8;
    let header = packet.get(40..40 + length)?;
    let mut at = 2;
    while let Some(&kind) = header.get(at) {
        if kind == 0 {
            at += 1;
            continue;
        }
        let option_length = usize::from(*header.get(at + 1)?);
        let known = matches!(kind, 1 | 5 | 0xc2);
        match kind >> 6 {
            2 if !known => return Some((40 + at) as u32),
            3 if !known && !multicast => return Some((40 + at) as u32),
            _ => {}
        }
        at += 2 + option_length;
    }
    None
}

/// Decides a new flow of an IPv6 packet whose transport header follows an
/// extension header, as Linux's nftables rules from Qubes' `firewall.py`
/// do: rules with `proto=` (`ip6 nexthdr …`) never match, the others are
/// tried in order, then the policy.
pub(super) fn decide_behind_extension_headers(
    rules: &RuleSet,
    flow: &FlowMeta,
    ctx: &MatchContext<'_>,
) -> Verdict {
    // A parse error or an unresolved name blocks everything, as usual.
    let verdict = rules.decide(flow, ctx);
    if matches!(
        verdict,
        Verdict::DroppedParseError | Verdict::DroppedUnresolvedHost
    ) {
        return verdict;
    }
    for rule in rules.rules() {
        if rule.proto.is_none() && rule.matches(flow, ctx) {
            return match rule.action {
                Action::Accept => Verdict::AcceptedByRule(rule.number),
                Action::Drop => Verdict::DroppedByRule(rule.number),
            };
        }
    }
    match rules.policy() {
        Action::Accept => Verdict::AcceptedByPolicy,
        Action::Drop => Verdict::DroppedByPolicy,
    }
}

/// Whether conntrack leaves an ICMPv6 message of this type untracked
/// (`nf_conntrack_icmpv6_error`'s `noct_valid_new`: MLD queries, reports
/// and done, router and neighbour solicitations and advertisements, MLDv2
/// reports, and since Linux 6.8 multicast router advertisements and
/// solicitations): neither a flow nor invalid, the rules alone decide.
pub(super) fn untracked_icmp(icmp_type: u8) -> bool {
    matches!(icmp_type, 130..=136 | 143 | 151 | 152)
}

/// Whether `protocol` (from [`walk`]) is a fragment.
pub(super) fn is_fragment(protocol: u8) -> bool {
    protocol == PROTO_FRAGMENT
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes packets it built itself.
mod tests {
    use super::*;
    use crate::rules::NoNames;
    use alloc::vec::Vec;
    use core::net::{IpAddr, Ipv6Addr};

    fn packet(first: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = alloc::vec![0u8; 40];
        p[0] = 0x60;
        p[6] = first;
        p.extend_from_slice(rest);
        p
    }

    #[test]
    fn the_walk_reaches_the_transport_header() {
        // Authentication header: length in 4-byte words, minus 2.
        let mut rest = alloc::vec![60, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        rest.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        rest.extend_from_slice(&[0; 20]);
        let p = packet(AUTHENTICATION, &rest);
        let chain = walk(&p, p.len()).unwrap();
        assert_eq!(
            (chain.protocol, chain.offset, chain.extensions),
            (6, 60, true)
        );
        // None at all.
        let p = packet(17, &[0; 8]);
        assert_eq!(
            walk(&p, p.len()),
            Ok(Chain {
                protocol: 17,
                offset: 40,
                extensions: false
            })
        );
        // A Fragment header ends the walk.
        let p = packet(
            DESTINATION_OPTIONS,
            &[44, 0, 1, 4, 0, 0, 0, 0, 6, 0, 0, 1, 0, 0, 0, 1],
        );
        assert_eq!(walk(&p, p.len()).unwrap().protocol, 44);
        // Cut short, or longer than the packet's payload length says.
        let p = packet(ROUTING, &[6, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(walk(&p, p.len()), Err(DropReason::Malformed));
        let p = packet(ROUTING, &[6, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(walk(&p, 44), Err(DropReason::Malformed));
        // Hop-by-hop anywhere but first.
        let p = packet(ROUTING, &[0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(walk(&p, p.len()), Err(DropReason::Malformed));
        // Every truncation fails cleanly.
        let p = packet(
            HOP_BY_HOP,
            &[60, 0, 1, 4, 0, 0, 0, 0, 6, 0, 1, 4, 0, 0, 0, 0],
        );
        for end in 0..p.len() {
            let _ = walk(&p[..end], end);
            let _ = walk(&p, end);
        }
    }

    #[test]
    fn hop_by_hop_options_are_checked() {
        let hbh = |options: &[u8]| {
            let mut h = alloc::vec![6, 0];
            h.extend_from_slice(options);
            check_hop_by_hop(&h)
        };
        assert_eq!(hbh(&[0, 0, 0, 0, 0, 0]), Ok(()));
        assert_eq!(hbh(&[1, 4, 0, 0, 0, 0]), Ok(()));
        assert_eq!(hbh(&[5, 2, 0, 0, 1, 0]), Ok(()), "router alert, Pad1, Pad1");
        assert_eq!(hbh(&[0x3e, 4, 9, 9, 9, 9]), Ok(()), "unknown, skip");
        for discard in [0x5e, 0x9e, 0xde] {
            assert_eq!(
                hbh(&[discard, 4, 9, 9, 9, 9]),
                Err(DropReason::UnsupportedProtocol)
            );
        }
        assert_eq!(
            hbh(&[1, 4, 0, 1, 0, 0]),
            Err(DropReason::UnsupportedProtocol)
        );
        assert_eq!(hbh(&[0x3e, 5, 9, 9, 9, 9]), Err(DropReason::Malformed));
        assert_eq!(hbh(&[0xc2, 4, 0, 0, 0, 0]), Err(DropReason::Malformed));
        let mut many = Vec::new();
        for _ in 0..9 {
            many.extend_from_slice(&[0x3e, 0]);
        }
        assert_eq!(hbh(&many), Err(DropReason::UnsupportedProtocol));
    }

    #[test]
    fn unknown_options_that_ask_for_it_get_a_parameter_problem() {
        let with = |kind: u8, dst_first: u8| {
            let mut p = packet(HOP_BY_HOP, &[6, 0, 1, 0, kind, 2, 0, 0]);
            p[24] = dst_first;
            p
        };
        assert_eq!(hop_by_hop_problem(&with(0x9e, 0x20)), Some(44));
        assert_eq!(hop_by_hop_problem(&with(0xde, 0x20)), Some(44));
        assert_eq!(hop_by_hop_problem(&with(0xde, 0xff)), None, "multicast");
        assert_eq!(hop_by_hop_problem(&with(0x9e, 0xff)), Some(44));
        assert_eq!(hop_by_hop_problem(&with(0x5e, 0x20)), None);
        assert_eq!(hop_by_hop_problem(&with(0x1e, 0x20)), None);
        assert_eq!(
            hop_by_hop_problem(&packet(ROUTING, &[6, 0, 0, 0, 0, 0, 0, 0])),
            None
        );
        for end in 0..48 {
            let _ = hop_by_hop_problem(&with(0x9e, 0x20)[..end]);
        }
    }

    #[test]
    fn behind_an_extension_header_proto_rules_never_match() {
        let rules = RuleSet::parse([
            ("policy", "drop"),
            ("0000", "action=accept proto=tcp"),
            ("0001", "action=accept dst6=2001:db8::1/128"),
        ]);
        let ctx = MatchContext {
            dns_servers: &[],
            now_unix: None,
            names: &NoNames,
        };
        let flow = |dst: &str| FlowMeta {
            dst: IpAddr::V6(dst.parse::<Ipv6Addr>().unwrap()),
            protocol: 6,
            dst_port: 22,
            icmp_type: None,
        };
        assert_eq!(
            rules.decide(&flow("2001:db8::2"), &ctx),
            Verdict::AcceptedByRule(0)
        );
        assert_eq!(
            decide_behind_extension_headers(&rules, &flow("2001:db8::2"), &ctx),
            Verdict::DroppedByPolicy
        );
        assert_eq!(
            decide_behind_extension_headers(&rules, &flow("2001:db8::1"), &ctx),
            Verdict::AcceptedByRule(1)
        );
        let broken = RuleSet::parse([("policy", "accept"), ("0000", "action=maybe")]);
        assert_eq!(
            decide_behind_extension_headers(&broken, &flow("2001:db8::1"), &ctx),
            Verdict::DroppedParseError
        );
    }
}
