//! Frames from the uplink: ARP / NDP (our address, the gateway's MAC),
//! the DNS answers for `dsthost` rules, and replies of known flows
//! translated back to their client. Nothing from outside starts a flow.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;
use core::net::IpAddr;

use smoltcp::time::Instant;

use crate::arp::{self, Arp, Ndp, UplinkArp};
use crate::nat::{Direction, Millis};
use crate::offload::Offload;
use crate::wire::{ETH_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, PROTO_UDP};

use super::icmp::IcmpError;
use super::output::Held;
use super::packet::{
    IcmpKind, IpMeta, decrement_ttl, parse_ip, reassemble, rewrite, tcp_flags_valid,
};
use super::{DropReason, Out, Router, ipv4, packet};

impl Router {
    /// Takes a frame received on the uplink.
    pub fn handle_uplink_frame(&mut self, frame: &[u8], now: Instant) {
        self.handle_uplink_frame_offloaded(frame, Offload::NONE, now);
    }

    /// Takes a frame received on the uplink with its offload metadata (see
    /// [`Router::handle_client_frame_offloaded`]).
    pub fn handle_uplink_frame_offloaded(&mut self, frame: &[u8], offload: Offload, now: Instant) {
        let mut owned = self.buffer();
        owned.extend_from_slice(frame);
        self.handle_uplink_frame_in_place(&mut owned, offload, now);
        self.recycle(owned);
    }

    /// [`Router::handle_uplink_frame_offloaded`] for a frame in a buffer
    /// of ours (see [`Router::handle_client_frame_in_place`]).
    pub fn handle_uplink_frame_in_place(
        &mut self,
        frame: &mut Vec<u8>,
        offload: Offload,
        now: Instant,
    ) {
        self.rx_offload = offload;
        self.uplink_frame(frame, now);
        self.rx_offload = Offload::NONE;
    }

    fn uplink_frame(&mut self, frame: &mut Vec<u8>, now: Instant) {
        let now = now.total_millis();
        self.clock = now;
        self.uplink.counters.rx_frames += 1;
        self.uplink.counters.rx_bytes += frame.len() as u64;
        let Some((header, payload)) = frame.split_first_chunk::<ETH_LEN>() else {
            return self.drop(DropReason::Malformed);
        };
        match u16::from_be_bytes([header[12], header[13]]) {
            ETHERTYPE_ARP => {
                let Some(packet) = Arp::parse(payload) else {
                    return self.drop(DropReason::Malformed);
                };
                match arp::handle_uplink_arp(
                    &packet,
                    self.uplink.ip,
                    self.uplink.mac,
                    self.uplink.gateway.ip,
                ) {
                    UplinkArp::Ignore => {}
                    UplinkArp::GatewayIs(mac) => self.learned_gateway(false, mac),
                    UplinkArp::Answer(reply, learned) => {
                        if let Some(mac) = learned {
                            self.learned_gateway(false, mac);
                        }
                        let mut buffer = self.buffer();
                        buffer.extend_from_slice(&reply);
                        self.enqueue(Out::Uplink, buffer);
                    }
                }
            }
            ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => self.uplink_ip(frame, now),
            _ => self.drop(DropReason::UnsupportedEthertype),
        }
    }

    /// The IP packet behind `frame`'s Ethernet header.
    pub(super) fn uplink_ip(&mut self, frame: &mut Vec<u8>, now: Millis) {
        let packet = frame.get(ETH_LEN..).unwrap_or_default();
        let mut meta = match parse_ip(packet, true) {
            Ok(meta) => meta,
            Err(reason) => {
                let ours = |m: &IpMeta| self.is_ours(m.dst) && !self.is_client_address(m.src);
                if let Some(meta) = packet::bare_ipv6_meta(packet).filter(ours) {
                    self.unrecognized_option(Out::Uplink, packet, &meta, reason, now);
                }
                return self.drop(reason);
            }
        };
        if !self.rx_offload.is_none() && !self.apply_offload(&mut meta) {
            return self.drop(DropReason::Malformed);
        }
        let packet = packet.get(..meta.total_len).unwrap_or(packet);
        if meta.icmp == IcmpKind::Ndp {
            return self.uplink_ndp(packet, &meta);
        }
        if !self.is_ours(meta.dst) {
            return self.drop(if meta.v6 && self.uplink.ip6.is_none() {
                DropReason::NoIpv6
            } else {
                DropReason::NotForUs
            });
        }
        if self.is_ours(meta.src) || self.is_client_address(meta.src) {
            return self.drop(DropReason::SpoofedSource);
        }
        if meta.fragment {
            match reassemble(&mut self.uplink_reassembler, packet, &meta, now) {
                Ok(None) => {}
                Ok(Some((datagram, whole))) => {
                    self.forward_from_uplink(Held::Alone(&datagram), &whole, now)
                }
                Err(reason) => self.drop(reason),
            }
            return;
        }
        let len = packet.len();
        self.forward_from_uplink(Held::Frame { frame, len }, &meta, now);
    }

    pub(super) fn uplink_ndp(&mut self, packet: &[u8], meta: &IpMeta) {
        // Router solicitations (the net qube's kernel sends three when its
        // vif comes up), router advertisements, redirects: our uplink is
        // configured statically (`/qubes-ip6`, `/qubes-gateway6`), there
        // is nothing to answer or learn. Not malformed either.
        if !matches!(meta.icmp_type, Some(arp::NDP_SOLICIT | arp::NDP_ADVERT)) {
            return self.drop(DropReason::LinkLocal);
        }
        let Some(ours) = self.uplink.ip6 else {
            return self.drop(DropReason::NoIpv6);
        };
        let (IpAddr::V6(src), Some(ndp)) =
            (meta.src, packet.get(meta.header_len..).and_then(Ndp::parse))
        else {
            return self.drop(DropReason::Malformed);
        };
        if meta.ttl != 255 {
            return self.drop(DropReason::Malformed);
        }
        if let Some(gateway) = self.uplink.gateway6
            && ndp.kind == arp::NDP_ADVERT
            && ndp.target == gateway.ip
        {
            if let Some(mac) = ndp.lladdr.filter(|m| m.is_unicast()) {
                self.learned_gateway(true, mac);
            }
            return;
        }
        if ndp.kind == arp::NDP_SOLICIT && ndp.target == ours && !src.is_unspecified() {
            let Some(to_mac) = ndp.lladdr else { return };
            let reply = arp::ndp_frame(
                arp::NDP_ADVERT,
                self.uplink.mac,
                to_mac,
                ours,
                src,
                ours,
                true,
                false,
            );
            let mut buffer = self.buffer();
            buffer.extend_from_slice(&reply);
            self.enqueue(Out::Uplink, buffer);
        }
    }

    pub(super) fn forward_from_uplink(&mut self, held: Held<'_>, meta: &IpMeta, now: Millis) {
        let packet = held.packet();
        let options = !meta.v6 && meta.header_len > 20;
        if options && !self.options_ok(Out::Uplink, packet, meta, now) {
            return;
        }
        if meta.protocol == PROTO_UDP
            && meta.dst_port == self.resolver.port()
            && meta.src_port == 53
            && self.dns_servers.contains(&meta.src)
        {
            if let (IpAddr::V4(server), Some(message)) =
                (meta.src, packet.get(meta.header_len + 8..))
            {
                match self.resolver.handle_response(server, message, now) {
                    Ok(_) => self.counters.dns_answers += 1,
                    Err(_) => self.drop(DropReason::DnsAnswerRefused),
                }
            }
            return;
        }
        match meta.icmp {
            // Linux sys-firewall's IPv4 input chain takes ICMP from clients
            // only (`iifgroup 2 meta l4proto icmp accept`, policy drop);
            // its IPv6 one from everywhere.
            IcmpKind::Query if meta.v6 => return self.answer_firewall(Out::Uplink, packet, meta),
            IcmpKind::Query => return self.drop(DropReason::ToFirewall),
            IcmpKind::Error => return self.related_from_uplink(packet, meta, now),
            IcmpKind::Other => return self.drop(DropReason::ConntrackInvalid),
            _ => {}
        }
        if meta.tcp.is_some() && !tcp_flags_valid(meta.tcp_flags) {
            return self.drop(DropReason::ConntrackInvalid);
        }
        let Some((id, Direction::Reply)) = self.nat.lookup(&meta.key(), now) else {
            return self.drop(DropReason::NoFlow);
        };
        // Only the fields the rewrite needs, not a copy of the whole entry.
        let Some((owner, client_src, client_port)) = self
            .nat
            .get(id)
            .map(|entry| (entry.owner, entry.original.src, entry.original.src_port))
        else {
            return;
        };
        let Some(&client) = self.by_address.get(&owner) else {
            return self.drop(DropReason::NoFlow);
        };
        if meta.ttl <= 1 {
            self.icmp_error(Out::Uplink, packet, meta, IcmpError::TimeExceeded, now);
            return self.drop(DropReason::TtlExceeded);
        }
        self.nat.touch(id, Direction::Reply, meta.tcp, now);
        let v6 = meta.v6;
        let stamp = options.then(|| self.options_stamp(meta, now)).flatten();
        self.forward((Out::Uplink, Out::Client(client)), meta, held, now, |ip| {
            if let Some((ours, time)) = stamp {
                ipv4::record(ip, ours, time);
            }
            decrement_ttl(ip, v6);
            rewrite(ip, meta, false, client_src, client_port);
        });
    }
}
