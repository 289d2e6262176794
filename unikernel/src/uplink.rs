//! The uplink: the firewall's own interface to the net qube.
//!
//! Holds the firewall's uplink addresses (`/qubes-ip`, `/qubes-ip6`) and MAC,
//! the gateway (`/qubes-gateway`, `/qubes-gateway6`) and what we learned of
//! its MAC, when we last asked for it, the transmit queue and the counters.
//! The router decides what goes out; this module never forwards anything by
//! itself and never believes a gateway MAC that was not announced for the
//! gateway's address.
#![forbid(unsafe_code)]

use core::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::wire::EthernetAddress;

use crate::client_net::{FrameQueue, InterfaceCounters};
use crate::nat::Millis;

/// How often to ask for a gateway MAC we do not know yet.
pub const NEIGHBOUR_RETRY: Millis = 1_000;

/// A neighbour (the gateway) we must find the MAC of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour<A> {
    /// Its address.
    pub ip: A,
    /// Its MAC, once learned.
    pub mac: Option<EthernetAddress>,
    /// When we last asked.
    pub last_request: Option<Millis>,
}

impl<A: Copy> Neighbour<A> {
    /// A neighbour we know nothing about yet.
    pub fn new(ip: A) -> Neighbour<A> {
        Neighbour {
            ip,
            mac: None,
            last_request: None,
        }
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
                true
            }
        }
    }

    /// When the next request is due, if the MAC is unknown.
    pub fn ask_at(&self) -> Option<Millis> {
        if self.mac.is_some() {
            return None;
        }
        Some(self.last_request.map_or(0, |at| at + NEIGHBOUR_RETRY))
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
    /// Traffic counters.
    pub counters: InterfaceCounters,
}

impl Uplink {
    /// The uplink with nothing learned yet.
    pub fn new(
        mac: EthernetAddress,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
        gateway6: Option<Ipv6Addr>,
        queue_cap: usize,
    ) -> Uplink {
        Uplink {
            mac,
            ip,
            ip6,
            gateway: Neighbour::new(gateway),
            gateway6: gateway6.filter(|_| ip6.is_some()).map(Neighbour::new),
            queue: FrameQueue::new(queue_cap),
            counters: InterfaceCounters::default(),
        }
    }
}

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
        );
        assert!(u.gateway6.is_none());
        let u = Uplink::new(
            mac,
            Ipv4Addr::new(10, 137, 0, 2),
            Ipv4Addr::new(10, 137, 0, 1),
            gw6,
            gw6,
            8,
        );
        assert!(u.gateway6.is_some());
    }
}
