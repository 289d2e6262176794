//! The gateway's MAC on the uplink: learning it from ARP / NDP, asking for
//! it, and the bounded pending queue that holds frames for the uplink until
//! it is known (Linux's per-neighbour `unres_qlen`).
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;

use smoltcp::wire::EthernetAddress;

use crate::arp;
use crate::nat::Millis;
use crate::uplink::GATEWAY_FALLBACK_MAC;
use crate::wire::{ETH_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, PROTO_ICMPV6, be16};

use super::{DropReason, Out, Router};

impl Router {
    /// The net qube went away and came back (its vif was re-attached):
    /// forget its MACs so they are asked for again (at once). IP frames
    /// queued for the old gateway MAC are not lost: they move, in order, to
    /// the pending queues and leave for the new MAC once it is learned.
    /// ARP/NDP frames for the old link are dropped (they are answers and
    /// requests the new net qube did not send; we ask afresh). Flows stay:
    /// our address did not change.
    pub fn uplink_restarted(&mut self) {
        let old = self.uplink.gateway.mac;
        let old6 = self.uplink.gateway6.and_then(|g| g.mac);
        self.uplink.gateway = crate::uplink::Neighbour::new(self.uplink.gateway.ip);
        if let Some(gateway6) = self.uplink.gateway6.as_mut() {
            *gateway6 = crate::uplink::Neighbour::new(gateway6.ip);
        }
        self.queued = self.queued.saturating_sub(self.uplink.queue.bytes());
        for (frame, offload) in self.uplink.queue.take_all() {
            match gateway_frame_kind(&frame, old, old6) {
                Some(v6) => self.hold_offloaded(v6, frame, offload),
                None => self.recycle(frame),
            }
        }
    }

    /// Puts an IP frame for the gateway in the pending queue (oldest
    /// dropped at the caps, counted) and asks for the gateway's MAC if a
    /// request is due. The frame's destination MAC is written when it
    /// leaves ([`Router::learned_gateway`]).
    pub(super) fn hold(&mut self, v6: bool, frame: Vec<u8>) {
        let len = frame.len();
        if self.queued + len > self.caps.queue_bytes {
            self.uplink.counters.tx_queue_full += 1;
            self.counters.count(DropReason::QueueFull);
            self.recycle(frame);
            return self.ask_gateways(self.clock);
        }
        loop {
            let queue = if v6 {
                &mut self.uplink.pending6
            } else {
                &mut self.uplink.pending
            };
            let Some(oldest) = queue.make_room(len) else {
                break;
            };
            self.queued = self.queued.saturating_sub(oldest.len());
            self.counters.count(DropReason::PendingFull);
            self.recycle(oldest);
        }
        let queue = if v6 {
            &mut self.uplink.pending6
        } else {
            &mut self.uplink.pending
        };
        match queue.push(frame, self.clock) {
            Ok(()) => {
                self.queued += len;
                self.counters.pending_queued += 1;
            }
            Err(frame) => {
                self.counters.count(DropReason::PendingFull);
                self.recycle(frame);
            }
        }
        self.ask_gateways(self.clock);
    }

    /// The gateway (IPv4 or IPv6) told us its MAC: frames already queued
    /// for an older MAC of it are re-addressed, and the frames waiting for
    /// it leave in order (those past [`crate::uplink::PENDING_TIMEOUT`]
    /// are dropped, counted).
    /// A MAC that is no single station's (all zeroes, broadcast,
    /// multicast) is never believed, whoever announces it.
    pub(super) fn learned_gateway(&mut self, v6: bool, mac: EthernetAddress) {
        if mac == UNRESOLVED_MAC || !mac.is_unicast() {
            return;
        }
        let (neighbour_mac, fallback) = if v6 {
            match self.uplink.gateway6.as_mut() {
                Some(gateway6) => (&mut gateway6.mac, &mut gateway6.fallback),
                None => return,
            }
        } else {
            (
                &mut self.uplink.gateway.mac,
                &mut self.uplink.gateway.fallback,
            )
        };
        *fallback = false;
        let old = neighbour_mac.replace(mac);
        if let Some(old) = old
            && old != mac
        {
            for frame in self.uplink.queue.frames_mut() {
                if gateway_frame_kind(frame, Some(old), Some(old)) == Some(v6)
                    && let Some(dst) = frame.get_mut(..6)
                {
                    dst.copy_from_slice(&mac.0);
                }
            }
            if old != GATEWAY_FALLBACK_MAC {
                self.forget_sibling_gateway(!v6, old);
            }
        }
        self.flush_pending(v6, mac);
    }

    /// One family's gateway moved from `old` to a new MAC: the net qube was
    /// replaced (a restarted sys-net on a new MAC announces itself by ARP,
    /// but sends no unsolicited neighbour advertisement). If the other
    /// family's gateway was at `old` too, forget it and ask afresh, rather
    /// than sending that family's traffic to a station that is gone.
    fn forget_sibling_gateway(&mut self, v6: bool, old: EthernetAddress) {
        let forgot = if v6 {
            match self.uplink.gateway6.as_mut() {
                Some(gateway6) if gateway6.mac == Some(old) => {
                    *gateway6 = crate::uplink::Neighbour::new(gateway6.ip);
                    true
                }
                _ => false,
            }
        } else if self.uplink.gateway.mac == Some(old) {
            self.uplink.gateway = crate::uplink::Neighbour::new(self.uplink.gateway.ip);
            true
        } else {
            false
        };
        if forgot {
            self.ask_gateways(self.clock);
        }
    }

    pub(super) fn flush_pending(&mut self, v6: bool, mac: EthernetAddress) {
        loop {
            let queue = if v6 {
                &mut self.uplink.pending6
            } else {
                &mut self.uplink.pending
            };
            let Some((at, mut frame)) = queue.pop() else {
                break;
            };
            self.queued = self.queued.saturating_sub(frame.len());
            if self.clock.saturating_sub(at) >= crate::uplink::PENDING_TIMEOUT {
                self.counters.count(DropReason::PendingExpired);
                self.recycle(frame);
                continue;
            }
            if let Some(dst) = frame.get_mut(..6) {
                dst.copy_from_slice(&mac.0);
            }
            self.counters.pending_sent += 1;
            self.enqueue(Out::Uplink, frame);
        }
    }

    /// Drops (counted) the pending frames that waited too long.
    pub(super) fn expire_pending(&mut self, now: Millis) {
        for v6 in [false, true] {
            loop {
                let queue = if v6 {
                    &mut self.uplink.pending6
                } else {
                    &mut self.uplink.pending
                };
                let Some(frame) = queue.pop_expired(now) else {
                    break;
                };
                self.queued = self.queued.saturating_sub(frame.len());
                self.counters.count(DropReason::PendingExpired);
                self.recycle(frame);
            }
        }
    }

    /// Sends an ARP request for the gateway and an NDP solicitation for the
    /// IPv6 gateway when their MAC is unknown and the last request is at
    /// least [`crate::uplink::NEIGHBOUR_RETRY`] old.
    ///
    /// A gateway that left two requests unanswered
    /// ([`crate::uplink::FALLBACK_AFTER`]) gets
    /// [`GATEWAY_FALLBACK_MAC`], Linux sys-firewall's static neighbour: the
    /// waiting frames leave for it and we stop asking (a MAC the gateway
    /// announces later still replaces it).
    pub(super) fn ask_gateways(&mut self, now: Millis) {
        if self.uplink.gateway.fallback_due(now) {
            self.learned_gateway(false, GATEWAY_FALLBACK_MAC);
            self.uplink.gateway.fallback = true;
        }
        if self.uplink.gateway6.is_some_and(|g| g.fallback_due(now)) {
            self.learned_gateway(true, GATEWAY_FALLBACK_MAC);
            if let Some(gateway6) = self.uplink.gateway6.as_mut() {
                gateway6.fallback = true;
            }
        }
        if self.uplink.gateway.should_ask(now) {
            let request =
                arp::gateway_request(self.uplink.ip, self.uplink.mac, self.uplink.gateway.ip);
            let mut buffer = self.buffer();
            buffer.extend_from_slice(&request);
            self.enqueue(Out::Uplink, buffer);
        }
        if let (Some(ours), Some(gateway)) = (self.uplink.ip6, self.uplink.gateway6.as_mut())
            && gateway.should_ask(now)
        {
            let group = arp::solicited_node(gateway.ip);
            let request = arp::ndp_frame(
                arp::NDP_SOLICIT,
                self.uplink.mac,
                arp::multicast_mac(group),
                ours,
                group,
                gateway.ip,
                false,
                false,
            );
            let mut buffer = self.buffer();
            buffer.extend_from_slice(&request);
            self.enqueue(Out::Uplink, buffer);
        }
    }
}

/// The destination MAC of a frame waiting for the gateway's MAC: never
/// sent (all zeroes is no station's address).
pub(super) const UNRESOLVED_MAC: EthernetAddress = EthernetAddress([0; 6]);

/// Whether an uplink frame is an IP packet for the gateway at `mac4` (IPv4)
/// or `mac6` (IPv6, neighbour discovery excluded): `Some(v6)`, else `None`
/// (ARP, NDP, anything to another MAC).
pub(super) fn gateway_frame_kind(
    frame: &[u8],
    mac4: Option<EthernetAddress>,
    mac6: Option<EthernetAddress>,
) -> Option<bool> {
    let dst = frame.get(..6)?;
    match be16(frame, 12)? {
        ETHERTYPE_IPV4 => (Some(dst) == mac4.as_ref().map(|m| &m.0[..])).then_some(false),
        ETHERTYPE_IPV6 => {
            let ndp = frame.get(ETH_LEN + 6) == Some(&PROTO_ICMPV6)
                && matches!(
                    frame.get(ETH_LEN + 40),
                    Some(&arp::NDP_SOLICIT | &arp::NDP_ADVERT)
                );
            (!ndp && Some(dst) == mac6.as_ref().map(|m| &m.0[..])).then_some(true)
        }
        _ => None,
    }
}
