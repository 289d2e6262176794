//! Frames from a client vif: ARP and NDP towards the fixed responder,
//! anti-spoofing, reassembly, and forwarding — a known flow by its NAT
//! entry, a new one decided by the client's rules.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;
use core::net::IpAddr;

use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;

use crate::arp::{self, Arp, CLIENT_SIDE_MAC, Ndp};
use crate::nat::{Direction, Millis, NatError};
use crate::offload::Offload;
use crate::rules::{FlowMeta, MatchContext, Verdict};
use crate::wire::{ETH_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6};

use super::icmp::IcmpError;
use super::output::Held;
use super::packet::{
    IcmpKind, IpMeta, bare_ipv6_meta, decrement_ttl, is_broadcast_or_multicast, parse_ip,
    reassemble, rewrite, tcp_flags_valid, tcp_starts_flow,
};
use super::{ClientId, DropReason, Out, Router};
use super::{ipv4, ipv6};

impl Router {
    /// Takes a frame received on a client's vif.
    pub fn handle_client_frame(&mut self, id: ClientId, frame: &[u8], now: Instant) {
        self.handle_client_frame_offloaded(id, frame, Offload::NONE, now);
    }

    /// Takes a frame received on a client's vif with its offload metadata
    /// (from [`crate::offload::accept`]): a partial checksum stays
    /// partial, a GSO frame is forwarded whole (see `crate::offload`).
    pub fn handle_client_frame_offloaded(
        &mut self,
        id: ClientId,
        frame: &[u8],
        offload: Offload,
        now: Instant,
    ) {
        let mut owned = self.buffer();
        owned.extend_from_slice(frame);
        self.handle_client_frame_in_place(id, &mut owned, offload, now);
        self.recycle(owned);
    }

    /// [`Router::handle_client_frame_offloaded`] for a frame in a buffer
    /// of ours ([`crate::offload::OffloadNic::receive_into`]): a frame
    /// forwarded whole is taken out of `frame` (left empty, without
    /// capacity) and its headers rewritten in place, with no copy.
    pub fn handle_client_frame_in_place(
        &mut self,
        id: ClientId,
        frame: &mut Vec<u8>,
        offload: Offload,
        now: Instant,
    ) {
        let Some(index) = self.clients.iter().position(|c| c.id == id) else {
            self.drop(DropReason::UnknownClient);
            return;
        };
        self.client_frame_at(index, frame, offload, now);
    }

    /// [`Router::handle_client_frame_in_place`] for the client at `index`.
    pub(super) fn client_frame_at(
        &mut self,
        index: usize,
        frame: &mut Vec<u8>,
        offload: Offload,
        now: Instant,
    ) {
        self.clock = now.total_millis();
        self.rx_offload = offload;
        self.client_frame(index, frame, now.total_millis());
        self.rx_offload = Offload::NONE;
    }

    pub(super) fn client_frame(&mut self, index: usize, frame: &mut Vec<u8>, now: Millis) {
        let Some(client) = self.clients.get_mut(index) else {
            return;
        };
        client.counters.rx_frames += 1;
        client.counters.rx_bytes += frame.len() as u64;
        let Some((header, payload)) = frame.split_first_chunk::<ETH_LEN>() else {
            self.drop(DropReason::Malformed);
            return;
        };
        let mut source = [0u8; 6];
        source.copy_from_slice(&header[6..12]);
        let source = EthernetAddress(source);
        if client.config.mac.is_none() && source.is_unicast() {
            client.mac = source;
        }
        let client_ip = client.config.ip;
        match u16::from_be_bytes([header[12], header[13]]) {
            ETHERTYPE_ARP => {
                let Some(request) = Arp::parse(payload) else {
                    self.drop(DropReason::Malformed);
                    return;
                };
                if request.sender_ip != client_ip && !request.sender_ip.is_unspecified() {
                    self.drop(DropReason::SpoofedSource);
                    return;
                }
                if let Some(reply) = arp::answer_client_arp(&request, client_ip) {
                    let mut buffer = self.buffer();
                    buffer.extend_from_slice(&reply);
                    self.enqueue(Out::Client(index), buffer);
                }
            }
            ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => self.client_ip(index, frame, now),
            _ => self.drop(DropReason::UnsupportedEthertype),
        }
    }

    /// The IP packet behind `frame`'s Ethernet header.
    pub(super) fn client_ip(&mut self, index: usize, frame: &mut Vec<u8>, now: Millis) {
        let packet = frame.get(ETH_LEN..).unwrap_or_default();
        let mut meta = match parse_ip(packet, true) {
            Ok(meta) => meta,
            Err(reason) => {
                let client = self.clients.get(index);
                let owned = |m: &IpMeta| client.is_some_and(|c| c.owns(m.src));
                if let Some(meta) = bare_ipv6_meta(packet).filter(owned) {
                    self.unrecognized_option(Out::Client(index), packet, &meta, reason, now);
                }
                return self.drop(reason);
            }
        };
        if !self.rx_offload.is_none() && !self.apply_offload(&mut meta) {
            return self.drop(DropReason::Malformed);
        }
        let packet = packet.get(..meta.total_len).unwrap_or(packet);
        // Neighbour discovery for this link (to us, to a multicast group, to
        // a link-local address); other ND messages are forwarded traffic
        // like any other (untracked by conntrack, `new_flow`).
        let on_link = |dst: IpAddr| match dst {
            IpAddr::V6(dst) => dst.is_multicast() || dst.is_unicast_link_local(),
            IpAddr::V4(_) => false,
        };
        if meta.icmp == IcmpKind::Ndp && (self.is_ours(meta.dst) || on_link(meta.dst)) {
            if matches!(meta.icmp_type, Some(arp::NDP_SOLICIT | arp::NDP_ADVERT)) {
                return self.client_ndp(index, packet, &meta);
            }
            // Router solicitations, redirects…: clients are configured
            // statically (`/qubes-gateway6`), nothing to answer.
            return self.drop(DropReason::LinkLocal);
        }
        if let IpAddr::V6(src) = meta.src
            && (src.is_unicast_link_local() || src.is_unspecified() || meta.dst.is_multicast())
        {
            // MLD reports, link-local chatter: never routed.
            return self.drop(DropReason::LinkLocal);
        }
        let Some(client) = self.clients.get(index) else {
            return;
        };
        if !client.owns(meta.src) {
            return self.drop(DropReason::SpoofedSource);
        }
        if meta.fragment {
            match reassemble(&mut self.reassembler, packet, &meta, now) {
                Ok(None) => {}
                Ok(Some((datagram, whole))) => {
                    self.forward_from_client(index, Held::Alone(&datagram), &whole, now)
                }
                Err(reason) => self.drop(reason),
            }
            return;
        }
        let len = packet.len();
        self.forward_from_client(index, Held::Frame { frame, len }, &meta, now);
    }

    pub(super) fn client_ndp(&mut self, index: usize, packet: &[u8], meta: &IpMeta) {
        let Some(client) = self.clients.get(index) else {
            return;
        };
        let (client_ip6, client_mac) = (client.config.ip6, client.mac);
        let (IpAddr::V6(src), Some(ndp)) =
            (meta.src, packet.get(meta.header_len..).and_then(Ndp::parse))
        else {
            return self.drop(DropReason::Malformed);
        };
        let from_client =
            Some(src) == client_ip6 || src.is_unicast_link_local() || src.is_unspecified();
        if !from_client || meta.ttl != 255 {
            return self.drop(DropReason::SpoofedSource);
        }
        if ndp.kind != arp::NDP_SOLICIT || Some(ndp.target) == client_ip6 || src.is_unspecified() {
            return;
        }
        let reply = arp::ndp_frame(
            arp::NDP_ADVERT,
            CLIENT_SIDE_MAC,
            ndp.lladdr.unwrap_or(client_mac),
            ndp.target,
            src,
            ndp.target,
            true,
            true,
        );
        let mut buffer = self.buffer();
        buffer.extend_from_slice(&reply);
        self.enqueue(Out::Client(index), buffer);
    }

    /// A whole (reassembled) packet from client `index`, source checked.
    pub(super) fn forward_from_client(
        &mut self,
        index: usize,
        held: Held<'_>,
        meta: &IpMeta,
        now: Millis,
    ) {
        let packet = held.packet();
        let options = !meta.v6 && meta.header_len > 20;
        if options && !self.options_ok(Out::Client(index), packet, meta, now) {
            return;
        }
        if self.is_ours(meta.dst) {
            return self.client_to_firewall(index, packet, meta, now);
        }
        if is_broadcast_or_multicast(meta.dst) {
            return self.drop(DropReason::Broadcast);
        }
        if meta.ttl <= 1 {
            self.icmp_error(
                Out::Client(index),
                packet,
                meta,
                IcmpError::TimeExceeded,
                now,
            );
            return self.drop(DropReason::TtlExceeded);
        }
        if meta.tcp.is_some() && !tcp_flags_valid(meta.tcp_flags) {
            // Invalid even within a flow: decided as one (rules, then the
            // invalid drop).
            self.new_flow(index, packet, meta, now);
            return;
        }
        let key = meta.key();
        let (id, direction) = match self.nat.lookup(&key, now) {
            Some(found) => found,
            None => match self.new_flow(index, packet, meta, now) {
                Some(id) => (id, Direction::Original),
                None => return,
            },
        };
        self.nat.touch(id, direction, meta.tcp, now);
        // Only the fields the rewrite needs, not a copy of the whole entry.
        let Some((translated, nat_src, nat_port)) = self
            .nat
            .get(id)
            .map(|entry| (entry.is_translated(), entry.reply.dst, entry.reply.dst_port))
        else {
            return;
        };
        // Every flow a client starts goes out translated: clients are
        // isolated (`isolation.rs`), no flow is ever tracked between two.
        if direction != Direction::Original || !translated {
            return self.drop(DropReason::NoFlow);
        }
        let v6 = meta.v6;
        let stamp = options.then(|| self.options_stamp(meta, now)).flatten();
        self.forward((Out::Client(index), Out::Uplink), meta, held, now, |ip| {
            if let Some((ours, time)) = stamp {
                ipv4::record(ip, ours, time);
            }
            decrement_ttl(ip, v6);
            rewrite(ip, meta, true, nat_src, nat_port);
        });
    }

    /// An ICMPv6 message conntrack leaves untracked (MLD, neighbour
    /// discovery) that the client's rules accepted: Linux forwards it
    /// without a connection and so without NAT (its `masquerade` only sees
    /// tracked packets), the client's own address as the source.
    fn forward_untracked(&mut self, index: usize, packet: &[u8], meta: &IpMeta, now: Millis) {
        if self.uplink.ip6.is_none() {
            return self.drop(DropReason::NoIpv6);
        }
        self.counters.untracked_forwarded += 1;
        self.forward(
            (Out::Client(index), Out::Uplink),
            meta,
            Held::Alone(packet),
            now,
            |ip| {
                decrement_ttl(ip, true);
            },
        );
    }

    /// Decides a new flow from client `index` and tracks it if accepted.
    /// A flow the rules deny is answered like Linux's `REJECT
    /// --reject-with icmp-admin-prohibited` (every Qubes rule with
    /// `action=drop`, and the policy, becomes such a REJECT in
    /// qubes-core-agent-linux's `prepare_rules`).
    #[inline(never)] // reason: the slow path; keeps forwarding's code small.
    pub(super) fn new_flow(
        &mut self,
        index: usize,
        packet: &[u8],
        meta: &IpMeta,
        now: Millis,
    ) -> Option<crate::nat::EntryId> {
        // How conntrack sees the packet. Whatever it says, the client's
        // `qubes-firewall` chain runs first (it comes first in netfilter):
        // a flow its rules deny is rejected; only then does the `qubes`
        // table drop what conntrack calls invalid.
        let tracking = match meta.icmp {
            // A TCP segment that cannot start a connection (SYN-ACK, RST,
            // FIN, bad flags), or bad flags within one.
            IcmpKind::NotIcmp if meta.tcp.is_some() && !tcp_starts_flow(meta.tcp_flags) => {
                Tracking::Invalid
            }
            // Flows conntrack starts: any protocol, ICMP queries.
            IcmpKind::NotIcmp | IcmpKind::Query => Tracking::New,
            IcmpKind::Error => {
                self.related_from_client(index, packet, meta, now);
                return None;
            }
            _ if meta.v6 && meta.icmp_type.is_some_and(ipv6::untracked_icmp) => Tracking::Untracked,
            // A reply without its query, a type conntrack does not know.
            IcmpKind::QueryReply | IcmpKind::Ndp | IcmpKind::Other => Tracking::Invalid,
        };
        let flow = FlowMeta {
            dst: meta.dst,
            protocol: meta.protocol,
            dst_port: if meta.icmp == IcmpKind::NotIcmp {
                meta.dst_port
            } else {
                0
            },
            icmp_type: meta.icmp_type,
        };
        let Some(rules) = self.rules.get(&meta.src) else {
            // No rules ever written for this address: Linux has no chain
            // for it, its forward chain's policy drops, silently.
            self.drop(DropReason::NoRules);
            return None;
        };
        let ctx = MatchContext {
            dns_servers: &self.dns_servers,
            now_unix: self.now_unix(now),
            names: &self.resolver,
        };
        let verdict = if meta.extensions {
            ipv6::decide_behind_extension_headers(rules, &flow, &ctx)
        } else {
            rules.decide(&flow, &ctx)
        };
        let denied = match verdict {
            Verdict::AcceptedByRule(_) | Verdict::AcceptedByPolicy => None,
            Verdict::DroppedByRule(_) | Verdict::DroppedByPolicy => Some(DropReason::RulesDrop),
            Verdict::DroppedParseError => Some(DropReason::RulesParseError),
            Verdict::DroppedUnresolvedHost => Some(DropReason::UnresolvedHost),
        };
        if let Some(reason) = denied {
            self.icmp_error(
                Out::Client(index),
                packet,
                meta,
                IcmpError::AdminProhibited,
                now,
            );
            self.drop(reason);
            return None;
        }
        // Client-to-client isolation (`isolation.rs`): after the rules, as
        // in Linux.
        if self.isolated(meta.dst) {
            return None;
        }
        match tracking {
            Tracking::New => {}
            Tracking::Invalid => {
                self.drop(DropReason::ConntrackInvalid);
                return None;
            }
            Tracking::Untracked => {
                self.forward_untracked(index, packet, meta, now);
                return None;
            }
        }
        let translate_to = match meta.dst {
            IpAddr::V4(_) => IpAddr::V4(self.uplink.ip),
            IpAddr::V6(_) => match self.uplink.ip6 {
                Some(ip6) => IpAddr::V6(ip6),
                None => {
                    self.drop(DropReason::NoIpv6);
                    return None;
                }
            },
        };
        match self.nat.insert(
            meta.src,
            meta.key(),
            Some(translate_to),
            None,
            meta.tcp,
            now,
        ) {
            Ok(id) => {
                self.counters.flows_created += 1;
                Some(id)
            }
            Err(error) => {
                self.drop(match error {
                    NatError::TableFull => DropReason::NatTableFull,
                    NatError::ClientShareFull => DropReason::NatClientShare,
                    NatError::NoFreePort => DropReason::NatNoPort,
                });
                None
            }
        }
    }
}

/// How Linux conntrack takes a packet that has no connection yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracking {
    /// It starts one.
    New,
    /// Invalid: the `qubes` table drops it.
    Invalid,
    /// Left untracked (some ICMPv6): forwarded as it is.
    Untracked,
}
