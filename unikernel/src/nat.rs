//! Connection tracking and source NAT for the clients' flows.
//!
//! Every flow a client starts (TCP, UDP, ICMP echo) gets one entry holding
//! the flow as the client sent it (`original`) and as its replies arrive
//! (`reply`). Flows to the outside are translated to the firewall's uplink
//! address and a NAT port (or ICMP query id); client-to-client flows keep
//! their addresses (`reply.dst == original.src`) and exist so that replies
//! are let back in, like Linux's `ctstate ESTABLISHED,RELATED` rule. The
//! rules' decision is taken once per flow and stays with the entry, so the
//! per-packet cost does not grow with the rule count.
//!
//! Idle timeouts follow Linux conntrack's defaults
//! (`nf_conntrack_*_timeout*`, Documentation/networking/nf_conntrack-sysctl):
//! TCP SYN sent 120 s, established 432 000 s (5 days), after a FIN from
//! either side 120 s (time-wait), after an RST 10 s; UDP 30 s until a reply
//! is seen, then 120 s (`udp_timeout_stream`); ICMP 30 s. Expired entries
//! are dropped when looked up and by an incremental sweep (`expire`).
//!
//! Capacity is fixed at construction, with a per-client share so one client
//! cannot exhaust the table; at either cap the new flow is refused (the
//! caller counts it) — never an allocation failure. NAT ports are chosen
//! so that no two entries ever share a reply key: the client's own port is
//! kept when free (as Linux does), otherwise a keyed probe sequence over
//! 1024–65535 is tried, each candidate checked against the reply index.
//!
//! The table uses `hashbrown` maps with a hasher keyed from the boot seed
//! (the benchmark in `benches/packet_path.rs` compares it at 100 000
//! entries). This module must never translate a packet it has no entry for,
//! and never panic on a packet a peer sent (`clippy::indexing_slicing` is
//! denied here so the compiler checks that).
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use core::hash::{BuildHasher, Hasher};
use core::net::IpAddr;

use alloc::vec::Vec;
use hashbrown::HashMap;

use crate::wire::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// Milliseconds of the monotonic clock.
pub use crate::wire::Millis;

/// Idle timeouts, in milliseconds (Linux conntrack defaults).
pub mod timeouts {
    use super::Millis;
    /// TCP: SYN seen, no reply yet.
    pub const TCP_SYN_SENT: Millis = 120_000;
    /// TCP: replies seen.
    pub const TCP_ESTABLISHED: Millis = 432_000_000;
    /// TCP: a FIN was seen from either side.
    pub const TCP_CLOSING: Millis = 120_000;
    /// TCP: an RST was seen.
    pub const TCP_CLOSED: Millis = 10_000;
    /// UDP without a reply.
    pub const UDP: Millis = 30_000;
    /// UDP after a reply.
    pub const UDP_STREAM: Millis = 120_000;
    /// ICMP query.
    pub const ICMP: Millis = 30_000;
    /// Any other protocol (GRE, ESP, SCTP…), tracked by address only
    /// (`nf_conntrack_generic_timeout`).
    pub const GENERIC: Millis = 600_000;
}

/// Lowest NAT port handed out.
pub const NAT_PORT_MIN: u16 = 1024;
const NAT_PORT_COUNT: u32 = 65536 - NAT_PORT_MIN as u32;
/// Coprime with `NAT_PORT_COUNT` (= 2^10 · 63), so probing visits all ports.
const NAT_PORT_STEP: u32 = 7919;
/// How many candidate ports are tried before the flow is refused.
pub const NAT_PORT_PROBES: u32 = 128;

/// The five fields that identify a flow in one direction. For ICMP queries
/// both ports hold the query identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (TCP/UDP); for an ICMP query (echo, timestamp,
    /// information, address mask, node information) its identifier, for
    /// the query's reply its request type.
    pub src_port: u16,
    /// Destination port (TCP/UDP); for an ICMP query its request type (8,
    /// 13, 15, 17; ICMPv6 128, 139), for the reply its identifier. So
    /// queries of two types with one identifier are two flows, as in Linux
    /// conntrack, whose ICMP tuple holds the type.
    pub dst_port: u16,
    /// IP protocol number.
    pub protocol: u8,
}

impl FlowKey {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
        }
    }
}

/// Which way a packet travels on a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client that started the flow.
    Original,
    /// A reply, towards that client.
    Reply,
}

/// TCP flags the tracker looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    /// SYN
    pub syn: bool,
    /// FIN
    pub fin: bool,
    /// RST
    pub rst: bool,
}

/// The tracked state of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// Only the original direction has been seen.
    New,
    /// Both directions seen.
    Established,
    /// TCP FIN seen.
    Closing,
    /// TCP RST seen.
    Closed,
}

/// One tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEntry {
    /// The client address that owns the entry (for flushing and shares).
    pub owner: IpAddr,
    /// The flow as the client sent it.
    pub original: FlowKey,
    /// The flow as replies arrive (destination = the NAT address and port,
    /// or the client itself for client-to-client flows).
    pub reply: FlowKey,
    /// Where the flow goes: `None` to the uplink, `Some(ip)` to the client
    /// with that address.
    pub peer_client: Option<IpAddr>,
    /// Tracked state.
    pub state: FlowState,
    last_seen: Millis,
    timeout: Millis,
}

impl NatEntry {
    /// Whether packets of this flow are translated (to the uplink address).
    pub fn is_translated(&self) -> bool {
        self.reply.dst != self.original.src || self.reply.dst_port != self.original.src_port
    }
    fn expired(&self, now: Millis) -> bool {
        now.saturating_sub(self.last_seen) >= self.timeout
    }
}

/// Why a flow could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatError {
    /// The table is at its capacity.
    TableFull,
    /// This client has used up its share of the table.
    ClientShareFull,
    /// No free NAT port for this destination after the probe sequence.
    NoFreePort,
}

impl core::fmt::Display for NatError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            NatError::TableFull => "NAT table full: new flow refused until idle entries expire",
            NatError::ClientShareFull => {
                "this client uses its whole share of the NAT table: new flow refused"
            }
            NatError::NoFreePort => "no free NAT port towards this destination: new flow refused",
        })
    }
}

/// A hasher keyed by the boot seed (a folded multiply, like foldhash).
/// `Default` is an unkeyed state, for tables whose keys no peer chooses
/// (the rule index).
#[derive(Clone, Copy, Debug, Default)]
pub struct SeededState(u64);

impl SeededState {
    /// A hasher state keyed by `seed`.
    pub fn new(seed: u64) -> SeededState {
        SeededState(seed ^ 0x243f_6a88_85a3_08d3)
    }
}

/// The hasher built by [`SeededState`].
#[derive(Clone, Copy, Debug)]
pub struct SeededHasher(u64);

const MUL1: u64 = 0x9e37_79b9_7f4a_7c15;
const MUL2: u64 = 0xa076_1d64_78bd_642f;

fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl BuildHasher for SeededState {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher(self.0)
    }
}

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Whole 8-byte words, then the tail zero-padded (the same words
        // `chunks(8)` would give).
        let mut words = bytes.chunks_exact(8);
        for chunk in &mut words {
            if let Ok(word) = <[u8; 8]>::try_from(chunk) {
                self.write_u64(u64::from_le_bytes(word));
            }
        }
        let tail = words.remainder();
        if !tail.is_empty() {
            let mut word = [0u8; 8];
            for (slot, byte) in word.iter_mut().zip(tail) {
                *slot = *byte;
            }
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, value: u8) {
        self.write_u64(u64::from(value));
    }
    fn write_u16(&mut self, value: u16) {
        self.write_u64(u64::from(value));
    }
    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = folded_multiply(self.0 ^ value, MUL1);
    }
    fn write_u128(&mut self, value: u128) {
        self.write_u64(value as u64);
        self.write_u64((value >> 64) as u64);
    }
    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }
    fn finish(&self) -> u64 {
        folded_multiply(self.0, MUL2)
    }
}

/// An index into the table's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryId(u32);

/// The end of an owner's chain of slots.
const NO_SLOT: u32 = u32::MAX;

/// An owner's entry count and the first slot of its chain.
#[derive(Clone, Copy, Debug)]
struct Owner {
    count: u32,
    head: u32,
}

/// A slot and the direction the key it is stored under stands for, in one
/// word (the top bit: reply), so the one index of both directions takes no
/// more memory per key than a bare slot number did.
#[derive(Clone, Copy, Debug)]
struct Indexed(u32);

impl Indexed {
    const REPLY: u32 = 1 << 31;

    /// `slot` is below the table's capacity, itself below [`Indexed::REPLY`].
    fn new(slot: u32, direction: Direction) -> Indexed {
        match direction {
            Direction::Original => Indexed(slot & !Indexed::REPLY),
            Direction::Reply => Indexed(slot | Indexed::REPLY),
        }
    }

    fn slot(self) -> u32 {
        self.0 & !Indexed::REPLY
    }

    fn direction(self) -> Direction {
        if self.0 & Indexed::REPLY == 0 {
            Direction::Original
        } else {
            Direction::Reply
        }
    }
}

/// The connection-tracking / NAT table.
#[derive(Debug)]
pub struct NatTable {
    slots: Vec<Option<NatEntry>>,
    free: Vec<u32>,
    /// Every entry's original and reply key, each with its slot and the
    /// direction it stands for: one table, so a packet of either direction
    /// is found with one hash of its key and one probe (a reply used to
    /// miss in an originals' table first). A key is never both some flow's
    /// original and another's reply: `insert` refuses such a clash.
    flows: HashMap<FlowKey, Indexed, SeededState>,
    /// Per owner: how many entries, and the first of its chain.
    per_owner: HashMap<IpAddr, Owner, SeededState>,
    /// Per slot: the previous and next slot of its owner's chain
    /// ([`NO_SLOT`] at the ends), so flushing a client's flows (a rule
    /// change, the vif gone) walks that client's entries only, never the
    /// whole table.
    links: Vec<(u32, u32)>,
    /// Entries with a `peer_client` (a flow towards a client): only when
    /// there are any does a flush also look for them table-wide.
    peered: usize,
    capacity: usize,
    per_client: usize,
    hasher: SeededState,
    sweep_cursor: usize,
    reserved: Vec<u16>,
}

impl NatTable {
    /// A table of at most `capacity` flows, at most `per_client` of them
    /// owned by one client. Memory for `capacity` entries is reserved now.
    pub fn new(capacity: usize, per_client: usize, seed: u64) -> NatTable {
        let hasher = SeededState::new(seed);
        // Slot numbers leave the top bit free ([`Indexed`]).
        let capacity = capacity.min((Indexed::REPLY - 1) as usize);
        NatTable {
            slots: Vec::with_capacity(capacity),
            free: Vec::new(),
            flows: HashMap::with_capacity_and_hasher(capacity.saturating_mul(2), hasher),
            per_owner: HashMap::with_hasher(hasher),
            links: Vec::with_capacity(capacity),
            peered: 0,
            capacity,
            per_client: per_client.max(1),
            hasher,
            sweep_cursor: 0,
            reserved: Vec::new(),
        }
    }

    /// Keeps `port` of the NAT address for the firewall itself (its DNS
    /// client): no flow is ever translated to it.
    pub fn reserve_port(&mut self, port: u16) {
        if !self.reserved.contains(&port) {
            self.reserved.push(port);
        }
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        // Every slot holds an entry but the free ones.
        self.slots.len() - self.free.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table's capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries owned by `owner`.
    pub fn owner_len(&self, owner: IpAddr) -> usize {
        self.per_owner
            .get(&owner)
            .map_or(0, |owner| owner.count as usize)
    }

    /// The entry behind an id returned by a lookup.
    pub fn get(&self, id: EntryId) -> Option<&NatEntry> {
        self.slots.get(id.0 as usize).and_then(Option::as_ref)
    }

    /// Finds the flow a packet with this key belongs to, in either
    /// direction. An expired entry is removed and not returned.
    pub fn lookup(&mut self, key: &FlowKey, now: Millis) -> Option<(EntryId, Direction)> {
        let found = *self.flows.get(key)?;
        let (slot, direction) = (found.slot(), found.direction());
        let expired = self
            .get(EntryId(slot))
            .is_none_or(|entry| entry.expired(now));
        if expired {
            self.remove(EntryId(slot));
            return None;
        }
        Some((EntryId(slot), direction))
    }

    /// Notes a packet on a flow: refreshes its idle timer and follows TCP
    /// SYN/FIN/RST and replies.
    pub fn touch(&mut self, id: EntryId, direction: Direction, tcp: Option<TcpFlags>, now: Millis) {
        let Some(Some(entry)) = self.slots.get_mut(id.0 as usize) else {
            return;
        };
        entry.last_seen = now;
        if let Some(flags) = tcp {
            if flags.rst {
                entry.state = FlowState::Closed;
            } else if flags.fin {
                if entry.state != FlowState::Closed {
                    entry.state = FlowState::Closing;
                }
            } else if direction == Direction::Reply && entry.state == FlowState::New {
                entry.state = FlowState::Established;
            }
            entry.timeout = match entry.state {
                FlowState::New => timeouts::TCP_SYN_SENT,
                FlowState::Established => timeouts::TCP_ESTABLISHED,
                FlowState::Closing => timeouts::TCP_CLOSING,
                FlowState::Closed => timeouts::TCP_CLOSED,
            };
        } else if direction == Direction::Reply && entry.state == FlowState::New {
            entry.state = FlowState::Established;
            if entry.original.protocol == PROTO_UDP {
                entry.timeout = timeouts::UDP_STREAM;
            }
        }
    }

    /// Adds a new flow started by `owner`. `translate_to` is the uplink
    /// address for flows to the outside (a NAT port is allocated), `None` for
    /// client-to-client flows (`peer_client` says which client).
    pub fn insert(
        &mut self,
        owner: IpAddr,
        original: FlowKey,
        translate_to: Option<IpAddr>,
        peer_client: Option<IpAddr>,
        tcp: Option<TcpFlags>,
        now: Millis,
    ) -> Result<EntryId, NatError> {
        let timeout = match original.protocol {
            PROTO_TCP => timeouts::TCP_SYN_SENT,
            PROTO_UDP => timeouts::UDP,
            PROTO_ICMP | PROTO_ICMPV6 => timeouts::ICMP,
            _ => timeouts::GENERIC,
        };
        if self.len() >= self.capacity {
            self.expire(now, 64);
            if self.len() >= self.capacity {
                return Err(NatError::TableFull);
            }
        }
        if self.owner_len(owner) >= self.per_client {
            return Err(NatError::ClientShareFull);
        }
        if self.flows.contains_key(&original) {
            // The caller looks up before inserting; a clash here means the
            // key is already some flow's reply (a crafted collision).
            return Err(NatError::NoFreePort);
        }
        let is_icmp = matches!(original.protocol, PROTO_ICMP | PROTO_ICMPV6);
        let reply = match translate_to {
            None => original.reversed(),
            Some(nat_address) => self.allocate(&original, nat_address, is_icmp, now)?,
        };
        if self.flows.contains_key(&reply) {
            return Err(NatError::NoFreePort);
        }
        let entry = NatEntry {
            owner,
            original,
            reply,
            peer_client,
            state: FlowState::New,
            last_seen: now,
            timeout,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                if let Some(place) = self.slots.get_mut(slot as usize) {
                    *place = Some(entry);
                }
                slot
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        // The reply first: a flow of a host to itself on one port has
        // `reply == original`, and its packets are its original direction.
        self.flows
            .insert(reply, Indexed::new(slot, Direction::Reply));
        self.flows
            .insert(original, Indexed::new(slot, Direction::Original));
        self.link(slot, owner);
        if peer_client.is_some() {
            self.peered += 1;
        }
        let id = EntryId(slot);
        if tcp.is_some() {
            self.touch(id, Direction::Original, tcp, now);
        }
        Ok(id)
    }

    /// Whether `key` may become a new flow's reply key: no flow uses it,
    /// or only an expired flow's reply does (that flow is removed here).
    fn claim_reply_key(&mut self, key: &FlowKey, now: Millis) -> bool {
        match self.flows.get(key).copied() {
            None => true,
            Some(found)
                if found.direction() == Direction::Reply
                    && self
                        .get(EntryId(found.slot()))
                        .is_none_or(|e| e.expired(now)) =>
            {
                self.remove(EntryId(found.slot()));
                true
            }
            Some(_) => false,
        }
    }

    fn allocate(
        &mut self,
        original: &FlowKey,
        nat_address: IpAddr,
        is_icmp: bool,
        now: Millis,
    ) -> Result<FlowKey, NatError> {
        if !is_icmp && !matches!(original.protocol, PROTO_TCP | PROTO_UDP) {
            // No ports to tell flows apart: one flow per destination and
            // protocol on the NAT address, like Linux's generic NAT.
            let key = FlowKey {
                src: original.dst,
                dst: nat_address,
                src_port: 0,
                dst_port: 0,
                protocol: original.protocol,
            };
            return if self.claim_reply_key(&key, now) {
                Ok(key)
            } else {
                Err(NatError::NoFreePort)
            };
        }
        // An ICMP query's "ports" are its identifier and its request type
        // (see [`FlowKey`]): the identifier is what gets translated.
        let candidate = |port: u16| FlowKey {
            src: original.dst,
            dst: nat_address,
            src_port: original.dst_port,
            dst_port: port,
            protocol: original.protocol,
        };
        let start = (self.hasher.hash_one(original) % u64::from(NAT_PORT_COUNT)) as u32;
        let first = if original.src_port >= NAT_PORT_MIN || is_icmp {
            Some(original.src_port)
        } else {
            None
        };
        let probes = (0..NAT_PORT_PROBES).map(|i| {
            let offset = (start + i * NAT_PORT_STEP) % NAT_PORT_COUNT;
            (u32::from(NAT_PORT_MIN) + offset) as u16
        });
        for port in first.into_iter().chain(probes) {
            if self.reserved.contains(&port) {
                continue;
            }
            let key = candidate(port);
            if self.claim_reply_key(&key, now) {
                return Ok(key);
            }
        }
        Err(NatError::NoFreePort)
    }

    /// Removes one entry.
    pub fn remove(&mut self, id: EntryId) {
        let Some(place) = self.slots.get_mut(id.0 as usize) else {
            return;
        };
        let Some(entry) = place.take() else {
            return;
        };
        self.flows.remove(&entry.original);
        self.flows.remove(&entry.reply);
        self.unlink(id.0, entry.owner);
        if entry.peer_client.is_some() {
            self.peered = self.peered.saturating_sub(1);
        }
        self.free.push(id.0);
    }

    /// Puts `slot` at the head of `owner`'s chain and counts it.
    fn link(&mut self, slot: u32, owner: IpAddr) {
        let index = slot as usize;
        if self.links.len() <= index {
            self.links.resize(index + 1, (NO_SLOT, NO_SLOT));
        }
        let state = self.per_owner.entry(owner).or_insert(Owner {
            count: 0,
            head: NO_SLOT,
        });
        let old_head = state.head;
        state.count += 1;
        state.head = slot;
        if let Some(link) = self.links.get_mut(index) {
            *link = (NO_SLOT, old_head);
        }
        if let Some(link) = self.links.get_mut(old_head as usize) {
            link.0 = slot;
        }
    }

    /// Takes `slot` out of `owner`'s chain and its count.
    fn unlink(&mut self, slot: u32, owner: IpAddr) {
        let (prev, next) = self
            .links
            .get(slot as usize)
            .copied()
            .unwrap_or((NO_SLOT, NO_SLOT));
        if let Some(link) = self.links.get_mut(prev as usize) {
            link.1 = next;
        }
        if let Some(link) = self.links.get_mut(next as usize) {
            link.0 = prev;
        }
        if let Some(link) = self.links.get_mut(slot as usize) {
            *link = (NO_SLOT, NO_SLOT);
        }
        if let Some(state) = self.per_owner.get_mut(&owner) {
            if state.head == slot {
                state.head = next;
            }
            state.count = state.count.saturating_sub(1);
            if state.count == 0 {
                self.per_owner.remove(&owner);
            }
        }
    }

    /// Removes every flow `client` started and every flow towards it (rule
    /// change, client gone). Returns how many were removed.
    /// Walks that client's own chain; only while flows towards a client
    /// exist (`peer_client`, none today: clients are isolated) does it also
    /// look through the table for them.
    pub fn flush_client(&mut self, client: IpAddr) -> usize {
        let mut removed = 0;
        let mut slot = self.per_owner.get(&client).map_or(NO_SLOT, |o| o.head);
        // Bounded by the table's size even if a chain were ever corrupt.
        for _ in 0..self.slots.len() {
            if slot == NO_SLOT {
                break;
            }
            let next = self.links.get(slot as usize).map_or(NO_SLOT, |l| l.1);
            self.remove(EntryId(slot));
            removed += 1;
            slot = next;
        }
        if self.peered == 0 {
            return removed;
        }
        for slot in 0..self.slots.len() {
            let hit = self
                .slots
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|entry| entry.owner == client || entry.peer_client == Some(client));
            if hit {
                self.remove(EntryId(slot as u32));
                removed += 1;
            }
        }
        removed
    }

    /// Removes every flow towards an address `is_client` says is a
    /// client's, in one pass. Returns how many were removed.
    pub fn flush_destinations(&mut self, is_client: impl Fn(&IpAddr) -> bool) -> usize {
        let mut removed = 0;
        for slot in 0..self.slots.len() {
            let hit = self
                .slots
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|entry| is_client(&entry.original.dst));
            if hit {
                self.remove(EntryId(slot as u32));
                removed += 1;
            }
        }
        removed
    }

    /// Removes expired entries, looking at no more than `budget` slots from
    /// where the last sweep stopped. Returns how many were removed.
    pub fn expire(&mut self, now: Millis, budget: usize) -> usize {
        let mut removed = 0;
        let total = self.slots.len();
        if total == 0 {
            return 0;
        }
        for _ in 0..budget.min(total) {
            if self.sweep_cursor >= total {
                self.sweep_cursor = 0;
            }
            let slot = self.sweep_cursor;
            self.sweep_cursor += 1;
            let expired = self
                .slots
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|e| e.expired(now));
            if expired {
                self.remove(EntryId(slot as u32));
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    const NAT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 137, 0, 2));
    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 137, 0, 10));
    const CLIENT2: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 137, 0, 11));
    const REMOTE: IpAddr = IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1));

    fn key(src: IpAddr, sport: u16, protocol: u8) -> FlowKey {
        FlowKey {
            src,
            dst: REMOTE,
            src_port: sport,
            dst_port: 443,
            protocol,
        }
    }

    #[test]
    fn outbound_flow_is_translated_and_replies_found() {
        let mut t = NatTable::new(16, 16, 1);
        let k = key(CLIENT, 40000, PROTO_TCP);
        let id = t
            .insert(
                CLIENT,
                k,
                Some(NAT),
                None,
                Some(TcpFlags {
                    syn: true,
                    ..Default::default()
                }),
                0,
            )
            .unwrap();
        let e = *t.get(id).unwrap();
        assert_eq!(e.reply.dst, NAT);
        assert_eq!(e.reply.dst_port, 40000, "client port kept when free");
        assert!(e.is_translated());
        assert_eq!(t.lookup(&k, 1), Some((id, Direction::Original)));
        assert_eq!(t.lookup(&e.reply, 1), Some((id, Direction::Reply)));
        t.touch(id, Direction::Reply, Some(TcpFlags::default()), 2);
        assert_eq!(t.get(id).unwrap().state, FlowState::Established);
    }

    #[test]
    fn one_index_holds_both_directions_of_every_flow() {
        let mut t = NatTable::new(64, 64, 5);
        let mut flows = alloc::vec::Vec::new();
        for port in 1000..1040u16 {
            let k = key(CLIENT, port, PROTO_UDP);
            let id = t.insert(CLIENT, k, Some(NAT), None, None, 0).unwrap();
            flows.push((id, k, t.get(id).unwrap().reply));
        }
        assert_eq!(t.len(), 40);
        for &(id, original, reply) in &flows {
            assert_eq!(t.lookup(&original, 1), Some((id, Direction::Original)));
            assert_eq!(t.lookup(&reply, 1), Some((id, Direction::Reply)));
            // Neither key can start another flow.
            assert_eq!(
                t.insert(CLIENT2, reply, Some(NAT), None, None, 1),
                Err(NatError::NoFreePort)
            );
        }
        for &(id, original, reply) in flows.iter().step_by(2) {
            t.remove(id);
            assert_eq!(t.lookup(&original, 1), None);
            assert_eq!(t.lookup(&reply, 1), None);
        }
        assert_eq!(t.len(), 20);
        assert_eq!(t.flows.len(), 40);
        // A flow of a host to itself on one port: its one key is its
        // original direction.
        let own = FlowKey {
            src: CLIENT2,
            dst: CLIENT2,
            src_port: 7,
            dst_port: 7,
            protocol: PROTO_UDP,
        };
        let id = t.insert(CLIENT2, own, None, None, None, 1).unwrap();
        assert_eq!(t.lookup(&own, 1), Some((id, Direction::Original)));
        t.remove(id);
        assert_eq!(t.lookup(&own, 1), None);
        assert_eq!(t.len(), 20);
        // The packed slot and direction round-trip up to the largest slot.
        for slot in [0, 1, 12345, Indexed::REPLY - 1] {
            for direction in [Direction::Original, Direction::Reply] {
                let packed = Indexed::new(slot, direction);
                assert_eq!((packed.slot(), packed.direction()), (slot, direction));
            }
        }
    }

    #[test]
    fn ports_never_collide() {
        let mut t = NatTable::new(1000, 1000, 7);
        let mut replies = std::collections::HashSet::new();
        for i in 0..500u16 {
            // Two clients using the same source port to the same server.
            for client in [CLIENT, CLIENT2] {
                let id = t.insert(
                    client,
                    key(client, 5000 + (i % 3), PROTO_UDP),
                    Some(NAT),
                    None,
                    None,
                    0,
                );
                if let Ok(id) = id {
                    assert!(replies.insert(t.get(id).unwrap().reply));
                }
            }
        }
        assert_eq!(t.len(), replies.len());
        assert!(t.len() >= 6);
    }

    #[test]
    fn many_flows_get_distinct_ports() {
        let mut t = NatTable::new(5000, 5000, 9);
        let mut ports = std::collections::HashSet::new();
        for i in 0..3000u16 {
            let id = t
                .insert(CLIENT, key(CLIENT, i, PROTO_TCP), Some(NAT), None, None, 0)
                .unwrap();
            assert!(ports.insert(t.get(id).unwrap().reply.dst_port));
        }
    }

    #[test]
    fn caps_and_per_client_share() {
        let mut t = NatTable::new(4, 2, 1);
        t.insert(
            CLIENT,
            key(CLIENT, 2000, PROTO_UDP),
            Some(NAT),
            None,
            None,
            0,
        )
        .unwrap();
        t.insert(
            CLIENT,
            key(CLIENT, 2001, PROTO_UDP),
            Some(NAT),
            None,
            None,
            0,
        )
        .unwrap();
        assert_eq!(
            t.insert(
                CLIENT,
                key(CLIENT, 2002, PROTO_UDP),
                Some(NAT),
                None,
                None,
                0
            ),
            Err(NatError::ClientShareFull)
        );
        t.insert(
            CLIENT2,
            key(CLIENT2, 2000, PROTO_UDP),
            Some(NAT),
            None,
            None,
            0,
        )
        .unwrap();
        t.insert(
            CLIENT2,
            key(CLIENT2, 2001, PROTO_UDP),
            Some(NAT),
            None,
            None,
            0,
        )
        .unwrap();
        let third = IpAddr::V4(Ipv4Addr::new(10, 137, 0, 12));
        assert_eq!(
            t.insert(third, key(third, 2000, PROTO_UDP), Some(NAT), None, None, 0),
            Err(NatError::TableFull)
        );
        // Once idle entries expire there is room again.
        assert!(
            t.insert(
                third,
                key(third, 2000, PROTO_UDP),
                Some(NAT),
                None,
                None,
                timeouts::UDP
            )
            .is_ok()
        );
    }

    #[test]
    fn idle_timeouts_follow_state() {
        let mut t = NatTable::new(8, 8, 1);
        let udp = key(CLIENT, 3000, PROTO_UDP);
        let id = t.insert(CLIENT, udp, Some(NAT), None, None, 0).unwrap();
        assert!(t.lookup(&udp, timeouts::UDP - 1).is_some());
        t.touch(id, Direction::Original, None, timeouts::UDP - 1);
        assert!(t.lookup(&udp, 2 * timeouts::UDP - 2).is_some());
        assert!(
            t.lookup(&udp, 2 * timeouts::UDP - 1).is_none(),
            "unreplied UDP expires after 30 s idle"
        );
        assert!(t.is_empty());

        let tcp = key(CLIENT, 3001, PROTO_TCP);
        let syn = TcpFlags {
            syn: true,
            ..Default::default()
        };
        let id = t
            .insert(CLIENT, tcp, Some(NAT), None, Some(syn), 0)
            .unwrap();
        t.touch(
            id,
            Direction::Reply,
            Some(TcpFlags {
                syn: true,
                ..Default::default()
            }),
            1,
        );
        assert!(
            t.lookup(&tcp, 1 + timeouts::TCP_SYN_SENT).is_some(),
            "established lives long"
        );
        t.touch(
            id,
            Direction::Original,
            Some(TcpFlags {
                fin: true,
                ..Default::default()
            }),
            10,
        );
        assert!(t.lookup(&tcp, 10 + timeouts::TCP_CLOSING).is_none());
        let id = t
            .insert(CLIENT, tcp, Some(NAT), None, Some(syn), 0)
            .unwrap();
        t.touch(
            id,
            Direction::Reply,
            Some(TcpFlags {
                rst: true,
                ..Default::default()
            }),
            5,
        );
        assert!(t.lookup(&tcp, 5 + timeouts::TCP_CLOSED).is_none());
    }

    #[test]
    fn flush_and_sweep() {
        let mut t = NatTable::new(100, 100, 1);
        for p in 0..10 {
            t.insert(
                CLIENT,
                key(CLIENT, 2000 + p, PROTO_UDP),
                Some(NAT),
                None,
                None,
                0,
            )
            .unwrap();
            t.insert(
                CLIENT2,
                key(CLIENT2, 2000 + p, PROTO_UDP),
                Some(NAT),
                None,
                None,
                0,
            )
            .unwrap();
        }
        let c2c = FlowKey {
            src: CLIENT2,
            dst: CLIENT,
            src_port: 1,
            dst_port: 2,
            protocol: PROTO_TCP,
        };
        t.insert(CLIENT2, c2c, None, Some(CLIENT), None, 0).unwrap();
        assert_eq!(t.flush_client(CLIENT), 11, "own flows and flows towards it");
        assert_eq!(t.owner_len(CLIENT2), 10);
        assert_eq!(t.expire(timeouts::UDP - 1, 1000), 0, "nothing idle yet");
        let first = t.expire(timeouts::UDP, 5);
        assert!(
            first > 0 && first <= 5,
            "a sweep looks at no more than its budget"
        );
        assert_eq!(first + t.expire(timeouts::UDP, 1000), 10);
        assert!(t.is_empty());
    }

    #[test]
    fn portless_protocols_get_one_flow_per_destination() {
        let mut t = NatTable::new(8, 8, 1);
        let gre = FlowKey {
            src: CLIENT,
            dst: REMOTE,
            src_port: 0,
            dst_port: 0,
            protocol: 47,
        };
        let id = t.insert(CLIENT, gre, Some(NAT), None, None, 0).unwrap();
        let reply = t.get(id).unwrap().reply;
        assert_eq!(
            (reply.src, reply.dst, reply.src_port, reply.dst_port),
            (REMOTE, NAT, 0, 0)
        );
        let other = FlowKey {
            src: CLIENT2,
            ..gre
        };
        assert_eq!(
            t.insert(CLIENT2, other, Some(NAT), None, None, 0),
            Err(NatError::NoFreePort)
        );
        assert!(t.lookup(&gre, timeouts::GENERIC - 1).is_some());
        assert!(
            t.insert(CLIENT2, other, Some(NAT), None, None, 2 * timeouts::GENERIC)
                .is_ok(),
            "the idle one expired"
        );
    }

    #[test]
    fn reserved_ports_are_never_handed_out() {
        let mut t = NatTable::new(8, 8, 1);
        t.reserve_port(50000);
        let id = t
            .insert(
                CLIENT,
                key(CLIENT, 50000, PROTO_UDP),
                Some(NAT),
                None,
                None,
                0,
            )
            .unwrap();
        assert_ne!(t.get(id).unwrap().reply.dst_port, 50000);
        assert!(t.get(id).unwrap().reply.dst_port >= NAT_PORT_MIN);
    }

    #[test]
    fn flush_destination_ends_the_flows_towards_an_address() {
        let mut t = NatTable::new(8, 8, 1);
        let to_remote = key(CLIENT, 40000, PROTO_TCP);
        let to_client2 = FlowKey {
            dst: CLIENT2,
            ..key(CLIENT, 40001, PROTO_TCP)
        };
        t.insert(CLIENT, to_remote, Some(NAT), None, None, 0)
            .unwrap();
        t.insert(CLIENT, to_client2, Some(NAT), None, None, 0)
            .unwrap();
        assert_eq!(t.flush_destinations(|_| false), 0);
        assert_eq!(t.flush_destinations(|&d| d == CLIENT2), 1);
        assert_eq!(t.len(), 1);
        assert!(t.lookup(&to_client2, 0).is_none());
        assert!(t.lookup(&to_remote, 0).is_some());
        assert_eq!(t.owner_len(CLIENT), 1);
    }

    #[test]
    fn icmp_ids_are_translated_symmetrically() {
        let mut t = NatTable::new(8, 8, 1);
        let ping = FlowKey {
            src: CLIENT,
            dst: REMOTE,
            src_port: 77,
            dst_port: 8,
            protocol: PROTO_ICMP,
        };
        let id = t.insert(CLIENT, ping, Some(NAT), None, None, 0).unwrap();
        let reply = t.get(id).unwrap().reply;
        assert_eq!(
            (reply.src_port, reply.dst_port),
            (8, 77),
            "the reply's key: the request type, then the identifier (kept when free)"
        );
        // A timestamp request with the same identifier is another flow.
        let timestamp = FlowKey {
            dst_port: 13,
            ..ping
        };
        assert!(t.lookup(&timestamp, 0).is_none());
        let id_ts = t
            .insert(CLIENT, timestamp, Some(NAT), None, None, 0)
            .unwrap();
        assert_ne!(id_ts, id);
        assert_eq!(t.get(id_ts).unwrap().reply.src_port, 13);
        let ping2 = FlowKey {
            src: CLIENT2,
            ..ping
        };
        let id2 = t.insert(CLIENT2, ping2, Some(NAT), None, None, 0).unwrap();
        assert_ne!(t.get(id2).unwrap().reply, reply);
    }

    /// The per-owner chains stay what a scan of the table says, through
    /// inserts, removals, expiry and flushes in random order.
    #[test]
    fn owner_chains_match_the_table_through_random_churn() {
        let owners: alloc::vec::Vec<IpAddr> = (10..16)
            .map(|last| IpAddr::V4(Ipv4Addr::new(10, 137, 0, last)))
            .collect();
        let mut t = NatTable::new(512, 512, 3);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let scan = |t: &NatTable, owner: IpAddr| {
            t.slots
                .iter()
                .flatten()
                .filter(|entry| entry.owner == owner)
                .count()
        };
        let mut port = 1000u16;
        for round in 0..3000 {
            let owner = owners[(next() % owners.len() as u64) as usize];
            match next() % 10 {
                0..=5 => {
                    port = port.wrapping_add(1).max(1000);
                    let _ = t.insert(
                        owner,
                        key(owner, port, PROTO_UDP),
                        Some(NAT),
                        None,
                        None,
                        round,
                    );
                }
                6 | 7 => {
                    let slot = (next() % t.slots.len().max(1) as u64) as u32;
                    t.remove(EntryId(slot));
                }
                8 => {
                    let before = scan(&t, owner);
                    assert_eq!(t.flush_client(owner), before, "round {round}");
                }
                _ => {
                    t.expire(round, 16);
                }
            }
            for &o in &owners {
                assert_eq!(t.owner_len(o), scan(&t, o), "round {round}");
            }
        }
    }
}
