//! The output side: Ethernet framing, the per-interface transmit queues
//! (one byte budget for all), IPv4 / IPv6 fragmentation to the MTU, and
//! handing frames for the uplink to the gateway logic while its MAC is
//! unknown.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;

use smoltcp::wire::EthernetAddress;

use crate::arp::CLIENT_SIDE_MAC;
use crate::fragments::{FragmentError, fragment_ipv4, fragment_ipv6};
use crate::nat::Millis;
use crate::offload::{self, Offload};
use crate::wire::{ETH_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
use crate::wire::{PROTO_TCP, PROTO_UDP};

use super::gateway::UNRESOLVED_MAC;
use super::icmp::IcmpError;
use super::packet::IpMeta;
use super::{DropReason, Out, Router};

impl Router {
    pub(super) fn enqueue(&mut self, out: Out, frame: Vec<u8>) {
        self.enqueue_offloaded(out, frame, Offload::NONE);
    }

    /// Checks the received frame's offload metadata against its parsed
    /// header and marks the header's checksum partial: offloads only on an
    /// unfragmented TCP/UDP packet without IPv6 extension headers, GSO only
    /// on TCP and with the checksum partial (what `crate::offload::accept`
    /// makes). `false`: the frame is malformed. Only called for a frame a
    /// NIC marked (`rx_offload` not `NONE`): a complete frame, every frame
    /// of a NIC without offloads, skips it and its header is not moved.
    pub(super) fn apply_offload(&self, meta: &mut IpMeta) -> bool {
        let offload = self.rx_offload;
        let transport = match meta.protocol {
            PROTO_TCP => true,
            PROTO_UDP => !offload.is_gso(),
            _ => false,
        };
        if !transport
            || meta.fragment
            || meta.extensions
            || (offload.is_gso() && !offload.csum_partial)
        {
            return false;
        }
        meta.csum_partial = offload.csum_partial;
        true
    }

    pub(super) fn enqueue_offloaded(&mut self, out: Out, frame: Vec<u8>, offload: Offload) {
        let length = frame.len() as u64;
        let over_budget = self.queued + frame.len() > self.caps.queue_bytes;
        let (queue, counters) = match out {
            Out::Uplink => (&mut self.uplink.queue, &mut self.uplink.counters),
            Out::Client(index) => match self.clients.get_mut(index) {
                Some(client) => (&mut client.queue, &mut client.counters),
                None => {
                    self.counters.count(DropReason::UnknownClient);
                    return;
                }
            },
        };
        if over_budget {
            counters.tx_queue_full += 1;
            self.counters.count(DropReason::QueueFull);
            self.recycle(frame);
            return;
        }
        match queue.push_offloaded(frame, offload) {
            Ok(()) => {
                self.queued += length as usize;
                counters.tx_frames += 1;
                counters.tx_bytes += length;
            }
            Err(frame) => {
                counters.tx_queue_full += 1;
                self.counters.count(DropReason::QueueFull);
                self.recycle(frame);
            }
        }
    }

    /// Builds an Ethernet frame around an IP packet for `out` and queues it
    /// (fragmenting IPv4 to the MTU). Returns the frame's buffer offset of
    /// the IP packet, or `None` if it could not be sent.
    /// The Ethernet destination and source for a frame out of `out`;
    /// `None` (counted) when there is no IPv6 gateway. While the gateway's
    /// MAC is unknown the destination is a placeholder (all zeroes) that
    /// [`Router::emit`] never lets out: the frame waits instead.
    pub(super) fn link_addresses(
        &mut self,
        out: Out,
        v6: bool,
    ) -> Option<(EthernetAddress, EthernetAddress)> {
        let addresses = match out {
            Out::Uplink => {
                let gateway = if v6 {
                    match self.uplink.gateway6 {
                        Some(gateway6) => gateway6.mac,
                        None => {
                            self.drop(DropReason::NoGateway);
                            return None;
                        }
                    }
                } else {
                    self.uplink.gateway.mac
                };
                (gateway.unwrap_or(UNRESOLVED_MAC), self.uplink.mac)
            }
            Out::Client(index) => match self.clients.get(index) {
                Some(client) => (client.mac, CLIENT_SIDE_MAC),
                None => {
                    self.drop(DropReason::UnknownClient);
                    return None;
                }
            },
        };
        Some(addresses)
    }

    /// Queues a reassembled IPv6 datagram for `out` in fragments.
    pub(super) fn send_ipv6_fragments(&mut self, out: Out, packet: &[u8], id: u32) {
        let Some((dst_mac, src_mac)) = self.link_addresses(out, true) else {
            return;
        };
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let result = fragment_ipv6(packet, self.caps.mtu, id, |piece| {
            let mut frame = Vec::with_capacity(ETH_LEN + piece.len());
            push_eth(&mut frame, dst_mac, src_mac, ETHERTYPE_IPV6);
            frame.extend_from_slice(piece);
            pieces.push(frame);
        });
        match result {
            Ok(()) => pieces
                .into_iter()
                .for_each(|frame| self.emit(out, true, frame)),
            Err(_) => self.drop(DropReason::Fragment),
        }
    }

    pub(super) fn send_ip(&mut self, out: Out, v6: bool, packet: &[u8]) {
        let Some((dst_mac, src_mac)) = self.link_addresses(out, v6) else {
            return;
        };
        let ethertype = if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
        let mtu = self.caps.mtu;
        if packet.len() > mtu {
            if v6 {
                // We neither fragment IPv6 nor send packet-too-big (yet).
                self.drop(DropReason::DontFragment);
                return;
            }
            let mut pieces: Vec<Vec<u8>> = Vec::new();
            let result = fragment_ipv4(packet, mtu, |piece| {
                let mut frame = Vec::with_capacity(ETH_LEN + piece.len());
                push_eth(&mut frame, dst_mac, src_mac, ethertype);
                frame.extend_from_slice(piece);
                pieces.push(frame);
            });
            match result {
                Ok(()) => pieces
                    .into_iter()
                    .for_each(|frame| self.emit(out, v6, frame)),
                Err(FragmentError::DontFragment) => self.drop(DropReason::DontFragment),
                Err(FragmentError::Unsupported) => self.drop(DropReason::Fragment),
            }
            return;
        }
        let mut frame = self.buffer();
        push_eth(&mut frame, dst_mac, src_mac, ethertype);
        frame.extend_from_slice(packet);
        self.emit(out, v6, frame);
    }

    /// Queues an IP frame built by [`Router::link_addresses`]: to the
    /// interface's queue, or, for the uplink while the gateway's MAC is
    /// unknown, to the pending queue.
    pub(super) fn emit(&mut self, out: Out, v6: bool, frame: Vec<u8>) {
        self.emit_offloaded(out, v6, frame, Offload::NONE);
    }

    /// [`Router::emit`] for a frame with offload metadata. One that has to
    /// wait for the gateway's MAC is finished in software first (the
    /// pending queue holds complete frames).
    pub(super) fn emit_offloaded(&mut self, out: Out, v6: bool, frame: Vec<u8>, offload: Offload) {
        if out == Out::Uplink {
            let resolved = if v6 {
                self.uplink.gateway6.and_then(|g| g.mac)
            } else {
                self.uplink.gateway.mac
            };
            if resolved.is_none() {
                return self.hold_offloaded(v6, frame, offload);
            }
        }
        self.enqueue_offloaded(out, frame, offload);
    }

    /// Holds a frame for the gateway (`gateway.rs`), cut or completed in
    /// software if it has offloads.
    pub(super) fn hold_offloaded(&mut self, v6: bool, frame: Vec<u8>, offload: Offload) {
        if offload.is_none() {
            return self.hold(v6, frame);
        }
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let mut scratch = self.buffer();
        let result = offload::finish(&frame, offload, &mut scratch, &mut |piece| {
            pieces.push(piece.to_vec())
        });
        self.recycle(scratch);
        self.recycle(frame);
        match result {
            Ok(()) => pieces.into_iter().for_each(|piece| self.hold(v6, piece)),
            Err(_) => self.drop(DropReason::Malformed),
        }
    }

    /// Queues `packet` for `out` after `edit` (TTL, NAT) ran on it, with a
    /// single copy straight into the outgoing frame.
    pub(super) fn forward(
        &mut self,
        (back, out): (Out, Out),
        meta: &IpMeta,
        held: Held<'_>,
        now: Millis,
        edit: impl FnOnce(&mut [u8]),
    ) {
        let packet = held.packet();
        let v6 = meta.v6;
        let offload = if meta.csum_partial {
            self.rx_offload
        } else {
            Offload::NONE
        };
        let too_big = if offload.is_gso() {
            // Within the MTU if every segment is (Linux's
            // `skb_gso_validate_network_len`).
            !offload::segments_fit(packet, meta.header_len, offload.gso_size, self.caps.mtu)
        } else {
            packet.len() > self.caps.mtu
        };
        if too_big {
            // An IPv6 datagram we reassembled goes out in fragments again,
            // like Linux conntrack does; any other IPv6 packet may not be
            // fragmented by a router.
            let refragment_v6 = v6 && meta.frag_id.is_some();
            let dont_fragment =
                !refragment_v6 && (v6 || packet.get(6).is_some_and(|flags| flags & 0x40 != 0));
            if dont_fragment {
                // Path MTU discovery: tell the sender (RFC 1191, RFC 8201).
                self.icmp_error(
                    back,
                    packet,
                    meta,
                    IcmpError::FragmentationNeeded(self.caps.mtu),
                    now,
                );
                return self.drop(DropReason::DontFragment);
            }
            if !offload.is_none() {
                return self.forward_finished(out, packet, offload, edit);
            }
            let mut owned = self.buffer();
            owned.extend_from_slice(packet);
            edit(&mut owned);
            match meta.frag_id {
                Some(id) if v6 => self.send_ipv6_fragments(out, &owned, id),
                _ => self.send_ip(out, v6, &owned),
            }
            self.recycle(owned);
            return;
        }
        let Some((dst_mac, src_mac)) = self.link_addresses(out, v6) else {
            return;
        };
        let ethertype = if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
        let mut frame = match held {
            // The received frame itself: its Ethernet header rewritten,
            // any padding behind the IP packet cut, no copy.
            Held::Frame { frame, len } => {
                let mut frame = core::mem::take(frame);
                frame.truncate(ETH_LEN + len);
                if let Some(header) = frame.first_chunk_mut::<ETH_LEN>() {
                    *header = eth_header(dst_mac, src_mac, ethertype);
                }
                frame
            }
            Held::Alone(packet) => {
                let mut frame = self.buffer();
                push_eth(&mut frame, dst_mac, src_mac, ethertype);
                frame.extend_from_slice(packet);
                frame
            }
        };
        if let Some(ip) = frame.get_mut(ETH_LEN..) {
            edit(ip);
        }
        self.emit_offloaded(out, v6, frame, offload);
    }

    /// An offloaded IPv4 packet (no DF) over the MTU: edited, cut or
    /// completed in software, and each piece fragmented to the MTU.
    #[cold]
    fn forward_finished(
        &mut self,
        out: Out,
        packet: &[u8],
        offload: Offload,
        edit: impl FnOnce(&mut [u8]),
    ) {
        let mut owned = self.buffer();
        // A placeholder Ethernet header: `offload::finish` takes frames.
        push_eth(
            &mut owned,
            EthernetAddress([0; 6]),
            EthernetAddress([0; 6]),
            ETHERTYPE_IPV4,
        );
        owned.extend_from_slice(packet);
        if let Some(ip) = owned.get_mut(ETH_LEN..) {
            edit(ip);
        }
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let mut scratch = self.buffer();
        let result = offload::finish(&owned, offload, &mut scratch, &mut |piece| {
            pieces.push(piece.get(ETH_LEN..).unwrap_or(&[]).to_vec())
        });
        self.recycle(scratch);
        self.recycle(owned);
        match result {
            Ok(()) => pieces
                .into_iter()
                .for_each(|piece| self.send_ip(out, false, &piece)),
            Err(_) => self.drop(DropReason::Malformed),
        }
    }
}

/// Where the IP packet being forwarded is: inside the frame received (the
/// router's own buffer, taken and edited in place when the packet leaves
/// whole) or in a buffer of its own (a reassembled datagram: copied).
pub(super) enum Held<'a> {
    /// `frame`'s IP packet is its `len` bytes after the Ethernet header
    /// (any padding behind them is cut when it is sent).
    Frame { frame: &'a mut Vec<u8>, len: usize },
    /// An IP packet on its own.
    Alone(&'a [u8]),
}

impl Held<'_> {
    /// The IP packet.
    pub(super) fn packet(&self) -> &[u8] {
        match self {
            Held::Frame { frame, len } => frame
                .get(ETH_LEN..)
                .map(|ip| ip.get(..*len).unwrap_or(ip))
                .unwrap_or(&[]),
            Held::Alone(packet) => packet,
        }
    }
}

/// An Ethernet header.
fn eth_header(dst: EthernetAddress, src: EthernetAddress, ethertype: u16) -> [u8; ETH_LEN] {
    let mut header = [0u8; ETH_LEN];
    header[..6].copy_from_slice(&dst.0);
    header[6..12].copy_from_slice(&src.0);
    header[12..].copy_from_slice(&ethertype.to_be_bytes());
    header
}

pub(super) fn push_eth(
    frame: &mut Vec<u8>,
    dst: EthernetAddress,
    src: EthernetAddress,
    ethertype: u16,
) {
    // Built on the stack and appended at once: one capacity check and one
    // 14-byte move per frame instead of three of each.
    frame.extend_from_slice(&eth_header(dst, src, ethertype));
}
