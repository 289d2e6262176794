//! The client side: one [`Client`] per client qube's vif, and the bounded
//! frame queues every interface transmits from.
//!
//! A client is known by its vif (`backend/vif/<domid>/<device>`) and the
//! addresses dom0 gave it (`backend/vif/<domid>/<device>/ip`); everything it
//! sends must come from those addresses (anti-spoofing is enforced by the
//! router, which owns the clients). Frames towards a client wait in its
//! queue until the platform's NIC takes them; at the cap the newest frame is
//! dropped and counted. This module never looks inside a frame.
#![forbid(unsafe_code)]

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::wire::EthernetAddress;

use crate::offload::Offload;

/// A client's vif: `backend/vif/<domid>/<device>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId {
    /// The client qube's domain id.
    pub domid: u16,
    /// The vif's device number.
    pub device: u32,
}

/// What the program flow knows about a new client vif.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// The client's IPv4 address (first token of `.../ip`).
    pub ip: Ipv4Addr,
    /// Its IPv6 address, when dom0 gave one.
    pub ip6: Option<Ipv6Addr>,
    /// Its MAC (`.../mac`), if known; otherwise learned from its frames.
    pub mac: Option<EthernetAddress>,
}

/// Per-interface traffic counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames queued for transmission.
    pub tx_frames: u64,
    /// Bytes queued for transmission.
    pub tx_bytes: u64,
    /// Frames refused because the transmit queue was full.
    pub tx_queue_full: u64,
}

/// A bounded queue of frames waiting for a NIC, each with its offload
/// metadata ([`Offload`]: a GSO frame counts its whole length).
#[derive(Debug)]
pub struct FrameQueue {
    frames: VecDeque<(Vec<u8>, Offload)>,
    cap: usize,
    bytes: usize,
}

impl FrameQueue {
    /// A queue of at most `cap` frames.
    pub fn new(cap: usize) -> FrameQueue {
        FrameQueue {
            frames: VecDeque::with_capacity(cap.min(1024)),
            cap,
            bytes: 0,
        }
    }

    /// Queues a complete frame; hands it back when the queue is full.
    pub fn push(&mut self, frame: Vec<u8>) -> Result<(), Vec<u8>> {
        self.push_offloaded(frame, Offload::NONE)
    }

    /// Queues a frame with its offload metadata; hands it back when the
    /// queue is full.
    pub fn push_offloaded(&mut self, frame: Vec<u8>, offload: Offload) -> Result<(), Vec<u8>> {
        if self.frames.len() >= self.cap {
            return Err(frame);
        }
        self.bytes += frame.len();
        self.frames.push_back((frame, offload));
        Ok(())
    }

    /// Takes the oldest frame, without its offload metadata (for frames
    /// known to be complete; see [`FrameQueue::pop_offloaded`]).
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        self.pop_offloaded().map(|(frame, _)| frame)
    }

    /// Takes the oldest frame and its offload metadata.
    pub fn pop_offloaded(&mut self) -> Option<(Vec<u8>, Offload)> {
        let (frame, offload) = self.frames.pop_front()?;
        self.bytes = self.bytes.saturating_sub(frame.len());
        Some((frame, offload))
    }

    /// Puts a frame back at the front (the NIC had no room after all).
    pub fn unpop(&mut self, frame: Vec<u8>, offload: Offload) {
        self.bytes += frame.len();
        self.frames.push_front((frame, offload));
    }

    /// Bytes of the frames waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether the queue is at its cap.
    pub fn is_full(&self) -> bool {
        self.frames.len() >= self.cap
    }

    /// The waiting frames, oldest first, to rewrite in place (lengths must
    /// stay: the byte count is not updated).
    pub fn frames_mut(&mut self) -> impl Iterator<Item = &mut [u8]> {
        self.frames
            .iter_mut()
            .map(|(frame, _)| frame.as_mut_slice())
    }

    /// Takes every waiting frame, oldest first.
    pub fn take_all(&mut self) -> VecDeque<(Vec<u8>, Offload)> {
        self.bytes = 0;
        core::mem::take(&mut self.frames)
    }

    /// Drops every waiting frame.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }
}

/// One attached client.
#[derive(Debug)]
pub struct Client {
    /// Its vif.
    pub id: ClientId,
    /// Its addresses and MAC.
    pub config: ClientConfig,
    /// The MAC frames to it are sent to (configured or learned).
    pub mac: EthernetAddress,
    /// Frames waiting for its vif.
    pub queue: FrameQueue,
    /// Its traffic counters.
    pub counters: InterfaceCounters,
}

impl Client {
    /// A new client with an empty queue of `queue_cap` frames.
    pub fn new(id: ClientId, config: ClientConfig, queue_cap: usize) -> Client {
        Client {
            id,
            config,
            mac: config.mac.unwrap_or(EthernetAddress::BROADCAST),
            queue: FrameQueue::new(queue_cap),
            counters: InterfaceCounters::default(),
        }
    }

    /// Whether `ip` is one of this client's addresses.
    pub fn owns(&self, ip: core::net::IpAddr) -> bool {
        match ip {
            core::net::IpAddr::V4(v4) => v4 == self.config.ip,
            core::net::IpAddr::V6(v6) => Some(v6) == self.config.ip6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn queue_is_bounded_and_ordered() {
        let mut q = FrameQueue::new(2);
        q.push(vec![1]).unwrap();
        q.push(vec![2]).unwrap();
        assert_eq!(q.push(vec![3]), Err(vec![3]));
        assert!(q.is_full());
        assert_eq!(q.bytes(), 2);
        assert_eq!(q.pop(), Some(vec![1]));
        q.unpop(vec![1], Offload::NONE);
        assert_eq!(q.pop(), Some(vec![1]));
        assert_eq!(q.pop(), Some(vec![2]));
        assert!(q.is_empty());
    }

    #[test]
    fn client_owns_its_addresses() {
        let config = ClientConfig {
            ip: Ipv4Addr::new(10, 137, 0, 10),
            ip6: Some("fd09:24ef:4179::a89:a".parse().unwrap()),
            mac: None,
        };
        let c = Client::new(
            ClientId {
                domid: 3,
                device: 0,
            },
            config,
            4,
        );
        assert!(c.owns("10.137.0.10".parse().unwrap()));
        assert!(c.owns("fd09:24ef:4179::a89:a".parse().unwrap()));
        assert!(!c.owns("10.137.0.11".parse().unwrap()));
        assert_eq!(c.mac, EthernetAddress::BROADCAST);
    }
}
