//! ICMP the firewall answers or relays: echo replies from its own
//! addresses, the errors it sends (time exceeded, administratively
//! prohibited, fragmentation needed / packet too big; rate-limited), and
//! errors about a tracked flow relayed to the flow's other end (Linux
//! conntrack's RELATED), translated.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use core::net::IpAddr;

use crate::nat::{Direction, Millis};
use crate::wire::{PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, be16, checksum};

use super::ipv6;
use super::packet::{
    IcmpKind, IpMeta, decrement_ttl, ipv4_header, ipv6_header, is_broadcast_or_multicast,
    is_echo_request, parse_ip, refill_icmp_checksum, rewrite, rewrite_address_only,
};
use super::{DropReason, Out, Router};

/// Most ICMP errors the router sends per second (burst the same).
pub const ICMP_ERRORS_PER_SECOND: i64 = 1000;

/// The ICMP errors the router sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IcmpError {
    /// TTL / hop limit ran out here.
    TimeExceeded,
    /// The client's rules deny the flow (Linux's `REJECT --reject-with
    /// icmp-admin-prohibited` / `icmp6-adm-prohibited`).
    AdminProhibited,
    /// Too big for the next hop, and must not be fragmented.
    FragmentationNeeded(usize),
    /// A client's packet to the firewall itself that is not ICMP (Linux's
    /// input chain: `iifgroup 2 reject with icmp type host-prohibited`;
    /// for IPv6 its `_icmpv6` chain rejects with admin-prohibited).
    HostProhibited,
    /// Malformed IPv4 options: parameter problem (12/0) pointing at this
    /// byte of the header (Linux's `ip_options_compile`).
    ParameterProblem(u8),
    /// An IPv6 hop-by-hop option we do not know whose type asks for it:
    /// parameter problem, unrecognized option (4/2), pointing at it.
    UnrecognizedOption(u32),
}

impl Router {
    /// A client's packet to one of the firewall's own addresses, as Linux
    /// sys-firewall's input chains (`qubes-ipv4.nft`, `qubes-ipv6.nft`)
    /// take it: pings are answered, other ICMP is taken silently, DHCP
    /// (UDP port 68) dropped silently, everything else rejected (IPv4:
    /// host-prohibited, IPv6: admin-prohibited).
    #[inline(never)] // reason: not the forwarding path.
    pub(super) fn client_to_firewall(
        &mut self,
        index: usize,
        packet: &[u8],
        meta: &IpMeta,
        now: Millis,
    ) {
        if is_echo_request(meta) {
            return self.answer_firewall(Out::Client(index), packet, meta);
        }
        if !meta.v6 && meta.icmp_type == Some(13) && !meta.fragment {
            return self.answer_timestamp(index, packet, meta, now);
        }
        let icmp = meta.protocol == if meta.v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
        let dhcp = !meta.v6 && meta.protocol == PROTO_UDP && meta.dst_port == 68;
        if !icmp && !dhcp {
            self.icmp_error(
                Out::Client(index),
                packet,
                meta,
                IcmpError::HostProhibited,
                now,
            );
        }
        self.drop(DropReason::ToFirewall);
    }

    /// A client's ICMP timestamp request to the firewall: answered, as the
    /// Linux kernel does (`icmp_timestamp`): the originate timestamp
    /// copied, receive and transmit our milliseconds since midnight UTC.
    fn answer_timestamp(&mut self, index: usize, packet: &[u8], meta: &IpMeta, now: Millis) {
        let (IpAddr::V4(to), Some(request)) = (meta.src, packet.get(meta.header_len..)) else {
            return self.drop(DropReason::ToFirewall);
        };
        let (Some(id_seq), Some(originate)) = (request.get(4..8), request.get(8..12)) else {
            return self.drop(DropReason::Malformed);
        };
        if is_broadcast_or_multicast(meta.src) {
            return self.drop(DropReason::Broadcast);
        }
        let time = self.ms_since_midnight(now).to_be_bytes();
        let mut reply = self.buffer();
        reply.extend_from_slice(&ipv4_header(self.uplink.ip, to, PROTO_ICMP, 20));
        reply.extend_from_slice(&[14, 0, 0, 0]);
        reply.extend_from_slice(id_seq);
        reply.extend_from_slice(originate);
        reply.extend_from_slice(&time);
        reply.extend_from_slice(&time);
        let sum = checksum::finish(checksum::add(0, reply.get(20..).unwrap_or(&[])));
        if let Some(field) = reply.get_mut(22..24) {
            field.copy_from_slice(&sum.to_be_bytes());
        }
        self.send_ip(Out::Client(index), false, &reply);
        self.recycle(reply);
    }

    /// An IPv6 packet from `out` (addresses in `meta`, from
    /// `bare_ipv6_meta`) that `parse_ip` refused for `reason`: if its
    /// hop-by-hop header holds an unknown option that asks for it, a
    /// parameter problem goes back.
    #[cold]
    pub(super) fn unrecognized_option(
        &mut self,
        out: Out,
        packet: &[u8],
        meta: &IpMeta,
        reason: DropReason,
        now: Millis,
    ) {
        if reason != DropReason::UnsupportedProtocol {
            return;
        }
        if let Some(pointer) = ipv6::hop_by_hop_problem(packet) {
            self.icmp_error(
                out,
                packet,
                meta,
                IcmpError::UnrecognizedOption(pointer),
                now,
            );
        }
    }

    /// A packet to one of the firewall's own addresses: answer pings, drop
    /// the rest.
    pub(super) fn answer_firewall(&mut self, out: Out, packet: &[u8], meta: &IpMeta) {
        if !is_echo_request(meta) || meta.fragment {
            return self.drop(DropReason::ToFirewall);
        }
        if is_broadcast_or_multicast(meta.src) {
            return self.drop(DropReason::Broadcast);
        }
        let mut reply = self.buffer();
        reply.extend_from_slice(packet);
        let (src_at, len) = if meta.v6 { (8, 16) } else { (12, 4) };
        // Source and destination are adjacent: rotating the pair by one
        // address swaps them.
        if let Some(field) = reply.get_mut(src_at..src_at + 2 * len) {
            field.rotate_left(len);
        }
        let type_at = meta.header_len;
        let old_type = reply.get(type_at).copied().unwrap_or(0);
        let new_type = if meta.v6 { 129 } else { 0 };
        if let (Some(sum), Some(code)) =
            (be16(&reply, type_at + 2), reply.get(type_at + 1).copied())
        {
            let sum = checksum::adjust(sum, &[old_type, code], &[new_type, code]);
            if let Some(field) = reply.get_mut(type_at..type_at + 4) {
                field.copy_from_slice(&[new_type, code, (sum >> 8) as u8, sum as u8]);
            }
        }
        if meta.v6 {
            if let Some(hop) = reply.get_mut(7) {
                *hop = 64;
            }
        } else if let Some(header) = reply.get_mut(..meta.header_len)
            && header.len() >= 20
        {
            if let Some(ttl) = header.get_mut(8) {
                *ttl = 64;
            }
            if let Some(field) = header.get_mut(10..12) {
                field.copy_from_slice(&[0, 0]);
            }
            let sum = checksum::finish(checksum::add(0, header));
            if let Some(field) = header.get_mut(10..12) {
                field.copy_from_slice(&sum.to_be_bytes());
            }
        }
        self.send_ip(out, meta.v6, &reply);
        self.recycle(reply);
    }

    /// Sends an ICMP error about `packet` back out of `out` (where it came
    /// from), from the firewall's own address. Never about an ICMP error, a
    /// non-first fragment or a broadcast source (RFC 1122 §3.2.2, RFC 4443
    /// §2.4), and at most [`ICMP_ERRORS_PER_SECOND`] a second.
    pub(super) fn icmp_error(
        &mut self,
        out: Out,
        packet: &[u8],
        meta: &IpMeta,
        error: IcmpError,
        now: Millis,
    ) {
        if meta.icmp == IcmpKind::Error || meta.fragment || is_broadcast_or_multicast(meta.src) {
            return;
        }
        // Linux's icmp_send takes ICMP types 1, 2, 6, 7, 9 and 10 and any it
        // does not know (above 18) for errors too: it answers none of them.
        if !meta.v6
            && meta.protocol == PROTO_ICMP
            && meta
                .icmp_type
                .is_some_and(|t| matches!(t, 1 | 2 | 6 | 7 | 9 | 10) || t > 18)
        {
            return;
        }
        // Token bucket: refill one token per 1000/rate ms, burst = rate.
        let rate = ICMP_ERRORS_PER_SECOND;
        let elapsed = now.saturating_sub(self.icmp_tokens_at).max(0);
        let refill = elapsed.saturating_mul(rate) / 1000;
        if refill > 0 {
            self.icmp_tokens = (self.icmp_tokens + refill).min(rate);
            self.icmp_tokens_at = now;
        }
        if self.icmp_tokens <= 0 {
            self.counters.icmp_errors_suppressed += 1;
            return;
        }
        self.icmp_tokens -= 1;
        let (type4, code4, type6, code6, rest) = match error {
            IcmpError::TimeExceeded => (11, 0, 3, 0, 0u32),
            IcmpError::AdminProhibited => (3, 13, 1, 1, 0),
            IcmpError::HostProhibited => (3, 10, 1, 1, 0),
            IcmpError::ParameterProblem(at) => (12, 0, 4, 0, u32::from(at) << 24),
            IcmpError::UnrecognizedOption(at) => (12, 0, 4, 2, at),
            IcmpError::FragmentationNeeded(mtu) => (3, 4, 2, 0, mtu as u32),
        };
        let mut reply = self.buffer();
        match (meta.src, self.uplink.ip6) {
            (IpAddr::V4(to), _) => {
                let quote = packet.get(..packet.len().min(548)).unwrap_or(packet);
                let header = ipv4_header(self.uplink.ip, to, PROTO_ICMP, 8 + quote.len());
                reply.extend_from_slice(&header);
                reply.extend_from_slice(&[type4, code4, 0, 0]);
                reply.extend_from_slice(&rest.to_be_bytes());
                reply.extend_from_slice(quote);
                let sum = checksum::finish(checksum::add(0, reply.get(20..).unwrap_or(&[])));
                if let Some(field) = reply.get_mut(22..24) {
                    field.copy_from_slice(&sum.to_be_bytes());
                }
            }
            (IpAddr::V6(to), Some(ours)) => {
                let quote = packet.get(..packet.len().min(1232)).unwrap_or(packet);
                let header = ipv6_header(ours, to, PROTO_ICMPV6, 8 + quote.len());
                reply.extend_from_slice(&header);
                reply.extend_from_slice(&[type6, code6, 0, 0]);
                reply.extend_from_slice(&rest.to_be_bytes());
                reply.extend_from_slice(quote);
                let pseudo =
                    checksum::pseudo_v6(&ours, &to, PROTO_ICMPV6, (8 + quote.len()) as u32);
                let sum = checksum::finish(checksum::add(pseudo, reply.get(40..).unwrap_or(&[])));
                if let Some(field) = reply.get_mut(42..44) {
                    field.copy_from_slice(&sum.to_be_bytes());
                }
            }
            (IpAddr::V6(_), None) => {
                self.recycle(reply);
                return;
            }
        }
        self.counters.icmp_errors_sent += 1;
        self.send_ip(out, meta.v6, &reply);
        self.recycle(reply);
    }

    /// An ICMP error from outside about one of our translated flows: send
    /// it to the client with the outer destination and the quoted packet's
    /// source translated back.
    pub(super) fn related_from_uplink(&mut self, packet: &[u8], meta: &IpMeta, now: Millis) {
        let quote_at = meta.header_len + 8;
        let Some(quote) = packet.get(quote_at..) else {
            return self.drop(DropReason::Malformed);
        };
        let inner = match parse_ip(quote, false) {
            Ok(inner) if inner.v6 == meta.v6 && !inner.fragment => inner,
            _ => return self.drop(DropReason::IcmpErrorUnmatched),
        };
        // The quoted packet went out translated: its reverse is the flow's
        // reply key.
        let Some((id, Direction::Reply)) = self.nat.lookup(&inner.key().reversed(), now) else {
            return self.drop(DropReason::IcmpErrorUnmatched);
        };
        let Some(entry) = self.nat.get(id).copied() else {
            return;
        };
        let Some(&client) = self.by_address.get(&entry.owner) else {
            return self.drop(DropReason::IcmpErrorUnmatched);
        };
        if meta.ttl <= 1 {
            return self.drop(DropReason::TtlExceeded);
        }
        let mut owned = self.buffer();
        owned.extend_from_slice(packet);
        decrement_ttl(&mut owned, meta.v6);
        // The quoted packet: its source back to the client's address/port.
        if let Some(quoted) = owned.get_mut(quote_at..) {
            rewrite(
                quoted,
                &inner,
                true,
                entry.original.src,
                entry.original.src_port,
            );
        }
        // The outer destination (no ports to change: keep the ICMP header).
        let outer = IpMeta {
            protocol: 0,
            icmp: IcmpKind::Other,
            ..*meta
        };
        rewrite_address_only(&mut owned, &outer, false, entry.original.src);
        refill_icmp_checksum(&mut owned, meta.header_len, meta.src, entry.original.src);
        self.send_ip(Out::Client(client), meta.v6, &owned);
        self.recycle(owned);
    }

    /// An ICMP error a client sends about a flow it started (say, port
    /// unreachable for a reply it got): to the outside end, with the quoted
    /// packet and the outer source translated, like Linux conntrack's
    /// RELATED handling.
    pub(super) fn related_from_client(
        &mut self,
        index: usize,
        packet: &[u8],
        meta: &IpMeta,
        now: Millis,
    ) {
        let quote_at = meta.header_len + 8;
        let Some(quote) = packet.get(quote_at..) else {
            return self.drop(DropReason::Malformed);
        };
        let inner = match parse_ip(quote, false) {
            Ok(inner) if inner.v6 == meta.v6 && !inner.fragment && inner.dst == meta.src => inner,
            _ => return self.drop(DropReason::IcmpErrorUnmatched),
        };
        let Some((id, direction)) = self.nat.lookup(&inner.key().reversed(), now) else {
            return self.drop(DropReason::IcmpErrorUnmatched);
        };
        let Some(entry) = self.nat.get(id).copied() else {
            return;
        };
        // Only flows to the outside exist (clients are isolated).
        if direction != Direction::Original || entry.owner != meta.src || !entry.is_translated() {
            return self.drop(DropReason::IcmpErrorUnmatched);
        }
        let _ = index;
        let mut owned = self.buffer();
        owned.extend_from_slice(packet);
        decrement_ttl(&mut owned, meta.v6);
        if let Some(quoted) = owned.get_mut(quote_at..) {
            rewrite(quoted, &inner, false, entry.reply.dst, entry.reply.dst_port);
        }
        let outer = IpMeta {
            protocol: 0,
            icmp: IcmpKind::Other,
            ..*meta
        };
        rewrite_address_only(&mut owned, &outer, true, entry.reply.dst);
        refill_icmp_checksum(&mut owned, meta.header_len, entry.reply.dst, meta.dst);
        self.send_ip(Out::Uplink, meta.v6, &owned);
        self.recycle(owned);
    }
}
