//! The uplink: the firewall's own interface to the net qube.
//!
//! Holds the firewall's uplink addresses (`/qubes-ip`, `/qubes-ip6`) and MAC,
//! the gateway (`/qubes-gateway`, `/qubes-gateway6`) and what we learned of
//! its MAC, when we last asked for it, the transmit queue and the counters.
//! It also holds the pending queues ([`PendingQueue`]): IP frames for the
//! gateway that wait while its MAC (IPv4 ARP, IPv6 NDP) is unknown, like
//! Linux's per-neighbour `unres_qlen` queue, so a client's first packets
//! after boot or after a net qube restart are not lost.
//! A gateway that does not answer gets Linux sys-firewall's static
//! neighbour MAC ([`GATEWAY_FALLBACK_MAC`]) after [`FALLBACK_AFTER`].
//! The router decides what goes out; this module never forwards anything by
//! itself, never believes a gateway MAC that was not announced for the
//! gateway's address, and never lets a pending frame grow past its caps or
//! outlive [`PENDING_TIMEOUT`].
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::wire::EthernetAddress;

use crate::client_net::{FrameQueue, InterfaceCounters};
use crate::nat::Millis;

/// How often to ask for a gateway MAC we do not know yet.
pub const NEIGHBOUR_RETRY: Millis = 1_000;

/// How long the gateway may leave our requests for its MAC unanswered
/// (two of them, [`NEIGHBOUR_RETRY`] apart) before we use
/// [`GATEWAY_FALLBACK_MAC`]: before a waiting frame expires.
pub const FALLBACK_AFTER: Millis = 2 * NEIGHBOUR_RETRY;

/// The MAC used for a gateway that does not answer ARP / NDP: Linux
/// sys-firewall never asks, it sets this as a permanent neighbour for
/// `/qubes-gateway` and `/qubes-gateway6` (qubes-core-agent-linux
/// `network/setup-ip`); it is the MAC of Qubes' vif backends.
pub const GATEWAY_FALLBACK_MAC: EthernetAddress =
    EthernetAddress([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);

/// How long a frame may wait for the gateway's MAC. Linux gives up on an
/// unresolved neighbour after `mcast_solicit` (3) probes `retrans_time`
/// (1 s) apart and frees its `arp_queue` (net/core/neighbour.c,
/// `neigh_timer_handler`); we do the same with our 1 s [`NEIGHBOUR_RETRY`].
pub const PENDING_TIMEOUT: Millis = 3_000;

/// Frames waiting for the gateway's MAC, oldest first, each with the time
/// it was queued. Capped by frame count and by bytes; at either cap the
/// *oldest* frame makes room (as Linux's `__neigh_event_send` does): the
/// oldest is the one whose sender is closest to retransmitting it anyway
/// (a TCP SYN after 1 s) and the closest to expiry, while the newest is
/// the one still wanted.
///
/// The frames carry a placeholder destination MAC; whoever takes them out
/// writes the gateway's learned MAC first.
#[derive(Debug)]
pub struct PendingQueue {
    frames: VecDeque<(Millis, Vec<u8>)>,
    cap_frames: usize,
    cap_bytes: usize,
    bytes: usize,
}

impl PendingQueue {
    /// A queue of at most `cap_frames` frames and `cap_bytes` bytes.
    pub fn new(cap_frames: usize, cap_bytes: usize) -> PendingQueue {
        PendingQueue {
            frames: VecDeque::new(),
            cap_frames,
            cap_bytes,
            bytes: 0,
        }
    }

    /// The oldest frame, if one must go to make room for a frame of `len`
    /// bytes. Call until `None`, then [`PendingQueue::push`].
    pub fn make_room(&mut self, len: usize) -> Option<Vec<u8>> {
        if self.frames.len() < self.cap_frames && self.bytes + len <= self.cap_bytes {
            return None;
        }
        self.pop().map(|(_, frame)| frame)
    }

    /// Queues a frame at `now`; hands it back if it can never fit (larger
    /// than the byte cap, a zero cap) or [`PendingQueue::make_room`] was
    /// not called first.
    pub fn push(&mut self, frame: Vec<u8>, now: Millis) -> Result<(), Vec<u8>> {
        if self.frames.len() >= self.cap_frames || self.bytes + frame.len() > self.cap_bytes {
            return Err(frame);
        }
        self.bytes += frame.len();
        self.frames.push_back((now, frame));
        Ok(())
    }

    /// Takes the oldest frame and when it was queued.
    pub fn pop(&mut self) -> Option<(Millis, Vec<u8>)> {
        let (at, frame) = self.frames.pop_front()?;
        self.bytes = self.bytes.saturating_sub(frame.len());
        Some((at, frame))
    }

    /// Takes the oldest frame if it has waited [`PENDING_TIMEOUT`] at `now`.
    pub fn pop_expired(&mut self, now: Millis) -> Option<Vec<u8>> {
        let (at, _) = self.frames.front()?;
        if now.saturating_sub(*at) < PENDING_TIMEOUT {
            return None;
        }
        self.pop().map(|(_, frame)| frame)
    }

    /// When the oldest frame expires.
    pub fn expires_at(&self) -> Option<Millis> {
        self.frames
            .front()
            .map(|(at, _)| at.saturating_add(PENDING_TIMEOUT))
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes of the frames waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A neighbour (the gateway) we must find the MAC of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour<A> {
    /// Its address.
    pub ip: A,
    /// Its MAC, once learned.
    pub mac: Option<EthernetAddress>,
    /// When we last asked.
    pub last_request: Option<Millis>,
    /// When we first asked (since the MAC was last unknown).
    pub first_request: Option<Millis>,
    /// Whether `mac` is [`GATEWAY_FALLBACK_MAC`], taken because nobody
    /// answered (a MAC the gateway announces replaces it).
    pub fallback: bool,
}

impl<A: Copy> Neighbour<A> {
    /// A neighbour we know nothing about yet.
    pub fn new(ip: A) -> Neighbour<A> {
        Neighbour {
            ip,
            mac: None,
            last_request: None,
            first_request: None,
            fallback: false,
        }
    }

    /// Whether the requests went unanswered for [`FALLBACK_AFTER`] at
    /// `now`: time to use [`GATEWAY_FALLBACK_MAC`].
    pub fn fallback_due(&self, now: Millis) -> bool {
        self.mac.is_none()
            && self
                .first_request
                .is_some_and(|at| now.saturating_sub(at) >= FALLBACK_AFTER)
    }

    /// Whether a request should go out now (unknown MAC, not asked within
    /// [`NEIGHBOUR_RETRY`]); notes the request when it says yes.
    pub fn should_ask(&mut self, now: Millis) -> bool {
        if self.mac.is_some() {
            return false;
        }
        match self.last_request {
            Some(at) if now.saturating_sub(at) < NEIGHBOUR_RETRY => false,
            _ => {
                self.last_request = Some(now);
                self.first_request.get_or_insert(now);
                true
            }
        }
    }

    /// When the next request (or the fallback) is due, if the MAC is
    /// unknown.
    pub fn ask_at(&self) -> Option<Millis> {
        if self.mac.is_some() {
            return None;
        }
        let ask = self.last_request.map_or(0, |at| at + NEIGHBOUR_RETRY);
        let fallback = self.first_request.map(|at| at + FALLBACK_AFTER);
        Some(fallback.map_or(ask, |f| f.min(ask)))
    }
}

/// The uplink interface state.
#[derive(Debug)]
pub struct Uplink {
    /// Our MAC on the uplink.
    pub mac: EthernetAddress,
    /// `/qubes-ip`
    pub ip: Ipv4Addr,
    /// `/qubes-ip6`
    pub ip6: Option<Ipv6Addr>,
    /// `/qubes-gateway` and its MAC.
    pub gateway: Neighbour<Ipv4Addr>,
    /// `/qubes-gateway6` and its MAC.
    pub gateway6: Option<Neighbour<Ipv6Addr>>,
    /// Frames waiting for the NIC.
    pub queue: FrameQueue,
    /// IPv4 frames waiting for the gateway's MAC.
    pub pending: PendingQueue,
    /// IPv6 frames waiting for the IPv6 gateway's MAC.
    pub pending6: PendingQueue,
    /// Traffic counters.
    pub counters: InterfaceCounters,
}

impl Uplink {
    /// The uplink with nothing learned yet: `queue_cap` frames for the NIC,
    /// `pending_cap` (frames, bytes) per pending queue.
    pub fn new(
        mac: EthernetAddress,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
        gateway6: Option<Ipv6Addr>,
        queue_cap: usize,
        pending_cap: (usize, usize),
    ) -> Uplink {
        Uplink {
            mac,
            ip,
            ip6,
            gateway: Neighbour::new(gateway),
            gateway6: gateway6.filter(|_| ip6.is_some()).map(Neighbour::new),
            queue: FrameQueue::new(queue_cap),
            pending: PendingQueue::new(pending_cap.0, pending_cap.1),
            pending6: PendingQueue::new(pending_cap.0, pending_cap.1),
            counters: InterfaceCounters::default(),
        }
    }
}

#[allow(clippy::indexing_slicing)] // reason: test code and test doubles; a panic there is a failed test
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_until_learned_at_most_once_a_second() {
        let mut n = Neighbour::new(Ipv4Addr::new(10, 137, 0, 1));
        assert_eq!(n.ask_at(), Some(0));
        assert!(n.should_ask(0));
        assert!(!n.should_ask(999));
        assert_eq!(n.ask_at(), Some(1000));
        assert!(n.should_ask(1000));
        n.mac = Some(EthernetAddress([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]));
        assert!(!n.should_ask(5000));
        assert_eq!(n.ask_at(), None);
    }

    #[test]
    fn fallback_is_due_two_requests_after_the_first() {
        let mut n = Neighbour::new(Ipv4Addr::new(10, 137, 0, 1));
        assert!(!n.fallback_due(10_000), "never asked: nothing is due");
        assert!(n.should_ask(500));
        assert!(!n.fallback_due(500 + FALLBACK_AFTER - 1));
        assert!(n.should_ask(1500));
        // The next request would be at 2 500, the fallback is at 2 500 too.
        assert_eq!(n.ask_at(), Some(500 + FALLBACK_AFTER));
        assert!(n.fallback_due(500 + FALLBACK_AFTER));
        n.mac = Some(GATEWAY_FALLBACK_MAC);
        assert!(
            !n.fallback_due(100_000),
            "a known MAC is never replaced by it"
        );
    }

    #[test]
    fn ipv6_gateway_only_with_our_ipv6() {
        let mac = EthernetAddress([0, 0x16, 0x3e, 0, 0, 1]);
        let gw6 = Some("fd09::1".parse().unwrap());
        let u = Uplink::new(
            mac,
            Ipv4Addr::new(10, 137, 0, 2),
            Ipv4Addr::new(10, 137, 0, 1),
            None,
            gw6,
            8,
            (4, 4096),
        );
        assert!(u.gateway6.is_none());
        let u = Uplink::new(
            mac,
            Ipv4Addr::new(10, 137, 0, 2),
            Ipv4Addr::new(10, 137, 0, 1),
            gw6,
            gw6,
            8,
            (4, 4096),
        );
        assert!(u.gateway6.is_some());
    }

    #[test]
    fn pending_queue_drops_the_oldest_at_either_cap() {
        let mut q = PendingQueue::new(3, 250);
        for (i, len) in [100usize, 60, 40].into_iter().enumerate() {
            assert!(q.make_room(len).is_none());
            q.push(alloc::vec![i as u8; len], i as Millis).unwrap();
        }
        assert_eq!((q.len(), q.bytes()), (3, 200));
        // The frame cap: the oldest (frame 0) goes.
        assert_eq!(q.make_room(10).map(|f| f[0]), Some(0));
        assert!(q.make_room(10).is_none());
        q.push(alloc::vec![3; 10], 3).unwrap();
        // The byte cap: 110 + 220 > 250 pushes out frames 1 and 2.
        assert_eq!(q.make_room(220).map(|f| f[0]), Some(1));
        assert_eq!(q.make_room(220).map(|f| f[0]), Some(2));
        assert!(q.make_room(220).is_none());
        q.push(alloc::vec![4; 220], 4).unwrap();
        assert_eq!((q.len(), q.bytes()), (2, 230));
        // Exactly at the byte cap fits.
        let mut full = PendingQueue::new(8, 100);
        full.push(alloc::vec![0; 100], 0).unwrap();
        assert!(full.make_room(0).is_none());
        // A frame larger than the byte cap never fits.
        assert!(q.push(alloc::vec![5; 251], 5).is_err());
        assert_eq!(q.pop().map(|(at, f)| (at, f[0])), Some((3, 3)));
    }

    #[test]
    fn pending_frames_expire_after_the_timeout_in_order() {
        let mut q = PendingQueue::new(8, 8000);
        q.push(alloc::vec![1], 100).unwrap();
        q.push(alloc::vec![2], 900).unwrap();
        assert_eq!(q.expires_at(), Some(100 + PENDING_TIMEOUT));
        assert!(q.pop_expired(100 + PENDING_TIMEOUT - 1).is_none());
        assert_eq!(q.pop_expired(100 + PENDING_TIMEOUT), Some(alloc::vec![1]));
        assert!(q.pop_expired(100 + PENDING_TIMEOUT).is_none());
        assert_eq!(q.expires_at(), Some(900 + PENDING_TIMEOUT));
        assert_eq!(q.pop_expired(i64::MAX), Some(alloc::vec![2]));
        assert!(q.is_empty() && q.expires_at().is_none() && q.bytes() == 0);
    }
}
