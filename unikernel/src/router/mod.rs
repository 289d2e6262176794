//! The router: every frame from a client vif or the uplink goes through
//! here, and this is the seam between the program flow (`firewall.rs`) and
//! the packet path.
//!
//! What it does (qubes-mirage-firewall's `Firewall.ipv4_from_client` /
//! `ipv4_from_netvm`, plus what mirage lacks):
//! - client → outside: the source must be the client's vif address
//!   (anti-spoofing); a known flow is translated by its NAT entry; a new
//!   flow is decided by the client's [`RuleSet`] once and, if accepted, gets
//!   a NAT entry (so the per-packet cost does not depend on the rules).
//!   TCP as Linux conntrack takes it: a flow starts with a SYN or an ACK
//!   (mid-stream pickup); a SYN-ACK, RST or FIN without a flow, and bad
//!   flag sets anywhere, are invalid (rules first, then dropped);
//! - a new flow the rules deny is answered with ICMP "administratively
//!   prohibited" (type 3 code 13 / ICMPv6 1/1), as Linux's qubes-firewall
//!   does (`reject with icmp type admin-prohibited` for `action=drop`,
//!   the policy, and a set that failed to parse); a client with no rules
//!   at all is dropped silently (no chain: the forward policy drops);
//!   a client's non-ICMP packet to the firewall itself is rejected with
//!   host-prohibited (3/10; IPv6: 1/1), except DHCP (UDP 68), as Linux's
//!   input chains; its pings and (IPv4) timestamp requests are answered,
//!   like the Linux kernel does; IPv4 pings from the uplink are not answered (Linux takes
//!   ICMP from clients only), IPv6 ones are; all ICMP errors we send share
//!   a 1 000/s token bucket;
//! - client → client: never forwarded. Linux's `qubes` table drops every
//!   new forwarded packet whose output is a client vif (`oifgroup 2 counter
//!   drop`); the sender's rules still run first (its `qubes-firewall`
//!   chain comes first in netfilter), so a flow they deny is rejected and
//!   one they accept is dropped silently (`ClientToClient`). The same for
//!   an address listed in `/connected-ips`/`/connected-ips6` whose qube is
//!   not running (never sent to the net qube), and uplink packets with
//!   such a source are dropped (`isolation.rs`);
//! - ICMP as Linux conntrack sees it: queries (echo, timestamp 13,
//!   information 15, address mask 17; ICMPv6 echo 128, node information
//!   139) start flows the client's rules decide (`icmptype=`), keyed by
//!   identifier *and* type; their replies only match a flow; errors go
//!   with the flow they quote (RELATED; ICMPv6: every type below 128);
//!   every other type is invalid to conntrack, but the client's rules
//!   still run first: denied, it is rejected (except IPv4 types 1, 2, 6,
//!   7, 9, 10 and above 18, which Linux's `icmp_send` takes for errors);
//!   accepted, it is dropped silently (`ConntrackInvalid`). ICMPv6 MLD,
//!   neighbour and multicast router discovery (130–136, 143, 151, 152) to
//!   an address out there are left untracked by conntrack: the rules
//!   decide, and Linux forwards them untranslated (no connection, no
//!   masquerade), so do we;
//! - ICMP errors a client sends about one of its flows go to the outside
//!   end, translated (Linux's RELATED);
//! - outside → client: only through an existing NAT entry (replies, and ICMP
//!   errors about a flow, translated back to the inner flow); uplink packets
//!   claiming a client's or the firewall's own source are dropped;
//! - IPv4 options checked before anything else as Linux's
//!   `ip_options_compile` does (malformed: parameter problem; source
//!   routes dropped, `accept_source_route = 0`), record route and timestamp
//!   filled in on forwarding (`ipv4.rs`);
//! - TTL / hop limit decremented, ICMP time-exceeded sent when it runs out;
//!   IPv4 and IPv6 fragments reassembled (bounded, clients and uplink
//!   apart) and re-fragmented to the MTU; a DF packet (any IPv6 packet) over the MTU
//!   gets ICMP fragmentation-needed / packet-too-big;
//! - ARP/NDP: a fixed responder towards clients, the gateway's MAC learned
//!   on the uplink (`arp.rs`); pings to the firewall's own address answered;
//! - while the gateway's MAC (ARP, or NDP for `/qubes-gateway6`) is unknown
//!   — after boot, after `uplink_restarted()` — IP frames for the uplink
//!   wait in a bounded pending queue (Linux's per-neighbour `unres_qlen`;
//!   caps `pending_frames` / `pending_bytes`, oldest dropped at the cap,
//!   3 s expiry, all counted), the gateway is asked once a second, and the
//!   frames leave in order, addressed to the learned MAC, as soon as it is
//!   announced for the gateway's address. A waiting frame carries an
//!   all-zero placeholder MAC that never reaches a NIC; frames already
//!   queued when the gateway's MAC changes are re-addressed, not lost. A
//!   gateway that leaves two requests unanswered gets `fe:ff:ff:ff:ff:ff`
//!   (Linux sys-firewall's static neighbour from `setup-ip`): the waiting
//!   frames leave for it, before they expire;
//! - IPv6 (`/qubes-ip6` set): the same forwarding and NAT with `dst6` rules;
//!   fragments behind unfragmentable extension headers are reassembled and
//!   cut again behind the same part;
//! - `dsthost=` names resolved in the background by `dns.rs`;
//! - counters per interface and per drop reason; no formatted print per
//!   packet.
//!
//! Every table and queue has a cap from [`Caps`]; at the cap new work is
//! refused and counted. Nothing here may panic on a frame a peer sent, and
//! no frame a client's rules deny may ever leave on the uplink.
//!
//! Flows of protocols without ports (GRE, ESP, SCTP, …) are tracked by
//! address only, one per destination and protocol on the NAT address, with
//! Linux's generic 600 s timeout.
//!
//! IPv6 extension headers (hop-by-hop, routing, destination options,
//! authentication, Fragment) are walked to the transport header, at most
//! 8, as conntrack does; a hop-by-hop header's options are checked as a
//! router must; behind an extension header a `proto=` rule never matches,
//! as Qubes' `ip6 nexthdr` rules do not (`ipv6.rs`).
//!
//! ```text
//! use unikernel::router::{Router, NetworkConfig, Caps};
//! use unikernel::client_net::{ClientId, ClientConfig};
//! use unikernel::rules::RuleSet;
//!
//! // From QubesDB: /qubes-ip, /qubes-gateway, /qubes-primary-dns,
//! // /qubes-secondary-dns, /qubes-ip6, /qubes-gateway6; our uplink MAC from
//! // xenstore device/vif/0/mac; a seed from the platform.
//! let mut router = Router::new(NetworkConfig { .. }, Caps::for_memory(bytes), now);
//!
//! router.add_client(ClientId { domid, device }, ClientConfig { ip, ip6, mac })?;
//! router.remove_client(ClientId { domid, device });
//!
//! // After the commit write to /qubes-firewall/<ip>: entries below
//! // /qubes-firewall/<ip>/ with relative keys ("policy", "0000", …).
//! // Keyed by address: rules may arrive before or after the vif; an
//! // address no rules were ever set for is dropped silently (Linux has no
//! // chain for it); after remove_rules it is denied with rejects;
//! // replacing a set flushes that client's flows. Log `set.error()`
//! // (key + reason) if any.
//! router.set_rules(client_ip, RuleSet::parse(entries));
//! router.set_wall_clock(Some(unix_seconds), now);   // for expire=
//! // /connected-ips and /connected-ips6, both families in one list:
//! router.set_connected_ips(&addresses);
//!
//! // Main loop (D: smoltcp::phy::Device):
//! router.pump_uplink(&mut uplink_nic, now);   // receive all, transmit queued
//! router.pump_client(id, &mut client_nic, now);
//! router.poll_timers(now);                    // NAT expiry, ARP/NDP, DNS
//! // What pumps and timers queued for NICs pumped before them:
//! router.transmit_uplink(&mut uplink_nic, now);  // transmit_client too
//! platform.wait(router.poll_at(now));         // 1 ms if frames wait for room
//! // Frame by frame instead: handle_uplink_frame / handle_client_frame,
//! // pop_uplink_frame / pop_client_frame, recycle(buffer).
//! // The pumps receive into the router's own buffers (the NIC's
//! // `receive_into`, handle_*_frame_in_place): a frame forwarded whole
//! // leaves in the buffer it came in, its headers edited in place; the
//! // slice forms copy the frame into such a buffer first.
//!
//! // Frames a client queued for the uplink leave at the next pump_uplink
//! // (or call transmit_uplink(&mut nic, now) after the clients).
//! router.uplink_restarted();                 // the net qube came back
//!
//! // Status: counters() (per DropReason, DropReason::ALL / name()),
//! // uplink_counters(), client_counters(id), nat_len(), client_nat_len(id),
//! // pending_len(), rules_error(ip).
//! ```
//!
//! `clippy::indexing_slicing` is denied in this module: no index or slice
//! of a peer's bytes can panic (fixed headers are read through arrays from
//! `first_chunk`/`split_first_chunk`, everything else through `get`).
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::{HashMap, HashSet};
use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;

use crate::client_net::Client;
pub use crate::client_net::{ClientConfig, ClientId, InterfaceCounters};
use crate::dns::Resolver;
use crate::fragments::Reassembler;
use crate::nat::{Millis, NatTable, SeededState};
use crate::offload::{self, Offload, OffloadNic};
use crate::rules::{RuleError, RuleSet};
use crate::uplink::Uplink;
use crate::wire::PROTO_UDP;
/// Internet checksum helpers (moved to [`crate::wire::checksum`]).
pub use crate::wire::checksum;

/// Frames taken from one client's NIC per round of the main loop (the
/// uplink, which carries every client's replies, gets 256): one client's
/// flood is bounded to its share of the firewall's work per round.
pub const CLIENT_FRAMES_PER_ROUND: usize = 64;

mod from_client;
mod from_uplink;
mod gateway;
mod icmp;
mod ipv4;
mod ipv6;
mod isolation;
mod output;
mod packet;

pub use icmp::ICMP_ERRORS_PER_SECOND;
use packet::ipv4_header;

/// The firewall's network configuration, from QubesDB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Our MAC on the uplink (xenstore `device/vif/0/mac`).
    pub uplink_mac: EthernetAddress,
    /// `/qubes-ip`: our uplink address, also the gateway clients use.
    pub ip: Ipv4Addr,
    /// `/qubes-gateway`: the net qube.
    pub gateway: Ipv4Addr,
    /// `/qubes-primary-dns`
    pub primary_dns: Option<Ipv4Addr>,
    /// `/qubes-secondary-dns`
    pub secondary_dns: Option<Ipv4Addr>,
    /// `/qubes-ip6` (IPv6 forwarding is on when set).
    pub ip6: Option<Ipv6Addr>,
    /// `/qubes-gateway6`
    pub gateway6: Option<Ipv6Addr>,
    /// Randomness from the platform: hash keys, NAT probe order, DNS ids.
    pub seed: u64,
}

/// Caps of every table and queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// NAT / connection-tracking entries in total.
    pub nat_entries: usize,
    /// NAT entries one client may own.
    pub nat_entries_per_client: usize,
    /// Attached clients.
    pub clients: usize,
    /// Frames waiting per interface.
    pub queue_frames: usize,
    /// Bytes of frames waiting, all interfaces together (the pending
    /// queues included).
    pub queue_bytes: usize,
    /// Frames that may wait for the gateway's MAC, per IP version.
    pub pending_frames: usize,
    /// Bytes that may wait for the gateway's MAC, per IP version.
    pub pending_bytes: usize,
    /// Datagrams in reassembly.
    pub fragment_datagrams: usize,
    /// Bytes of fragment data held.
    pub fragment_bytes: usize,
    /// `dsthost` names cached.
    pub dns_names: usize,
    /// MTU of every interface (Qubes vifs: 1500).
    pub mtu: usize,
}

impl Caps {
    /// Caps for a VM of `memory_bytes`: one NAT entry per 2 KiB of memory
    /// (an entry with its slot and two index buckets costs about 250 bytes,
    /// reserved up front: ~12% of memory), between 1 024 and 1 000 000
    /// entries; one client may own a quarter; 256 frames per queue and
    /// 1/16 of memory for all queued frames; a quarter of a queue (64
    /// frames) and an eighth of the queue bytes (256 KiB at 32 MiB, near
    /// Linux's `unres_qlen_bytes` default of 212 992) may wait for the
    /// gateway's MAC; 64 datagrams and 1/32 of
    /// memory (64 KiB – 1 MiB) in reassembly; 256 names. A 32 MiB firewall
    /// gets 16 384 NAT entries (qubes-mirage-firewall's default is 5 000).
    pub fn for_memory(memory_bytes: usize) -> Caps {
        let nat_entries = (memory_bytes / 2048).clamp(1024, 1_000_000);
        let queue_frames = 256;
        let queue_bytes = (memory_bytes / 16).max(256 * 1514);
        Caps {
            nat_entries,
            nat_entries_per_client: (nat_entries / 4).max(256),
            clients: 256,
            queue_frames,
            queue_bytes,
            pending_frames: (queue_frames / 4).max(1),
            pending_bytes: (queue_bytes / 8).max(1514),
            fragment_datagrams: 64,
            fragment_bytes: (memory_bytes / 32).clamp(64 * 1024, 1024 * 1024),
            dns_names: 256,
            mtu: 1500,
        }
    }
}

macro_rules! drop_reasons {
    ($($name:ident = $text:literal,)*) => {
        /// Why a frame was dropped; each has a counter.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum DropReason { $(#[doc = $text] $name,)* }
        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// A short name for the status report.
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$name => $text,)* }
            }
        }
    };
}

drop_reasons! {
    Malformed = "malformed frame or packet",
    UnsupportedEthertype = "unsupported ethertype",
    UnsupportedProtocol = "unsupported IP protocol or extension header",
    ConntrackInvalid = "invalid to connection tracking: ICMP type, TCP flags (Linux: ct state invalid drop)",
    SpoofedSource = "source address not allowed on this interface",
    SourceRoute = "IPv4 source route (Linux: accept_source_route = 0)",
    NotForUs = "uplink packet not addressed to the firewall",
    ClientToClient = "client-to-client traffic (clients are isolated, as in Linux's qubes table)",
    ToFirewall = "client packet to the firewall itself",
    Broadcast = "broadcast or multicast destination",
    LinkLocal = "IPv6 link-local or neighbour-discovery traffic not for us",
    RulesDrop = "denied by the client's rules",
    RulesParseError = "client's rules failed to parse",
    NoRules = "no rules written for this client yet (/qubes-firewall/<ip>)",
    UnresolvedHost = "client's dsthost rule not resolved yet",
    NoFlow = "no NAT entry for this packet",
    NatTableFull = "NAT table full",
    NatClientShare = "client's NAT share used up",
    NatNoPort = "no free NAT port",
    TtlExceeded = "TTL or hop limit exceeded",
    NoGateway = "no IPv6 gateway (/qubes-gateway6 unset)",
    PendingFull = "waiting for the gateway MAC: queue full, oldest dropped",
    PendingExpired = "gateway MAC not learned within 3 s",
    NoIpv6 = "IPv6 without /qubes-ip6",
    Fragment = "fragment dropped",
    DontFragment = "too big with DF set",
    UnknownClient = "frame for an unknown client",
    IcmpErrorUnmatched = "ICMP error about no known flow",
    QueueFull = "transmit queue full",
    DnsAnswerRefused = "DNS answer refused",
}

/// Router-wide counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    drops: Vec<u64>,
    /// New flows accepted (NAT entries created).
    pub flows_created: u64,
    /// ICMP errors we sent (time exceeded, administratively prohibited,
    /// fragmentation needed).
    pub icmp_errors_sent: u64,
    /// ICMP errors not sent because of the rate limit.
    pub icmp_errors_suppressed: u64,
    /// DNS answers taken by the resolver.
    pub dns_answers: u64,
    /// Frames for the uplink that had to wait for the gateway's MAC.
    pub pending_queued: u64,
    /// Frames sent once the gateway's MAC was learned.
    pub pending_sent: u64,
    /// ICMPv6 messages conntrack leaves untracked (MLD, neighbour
    /// discovery) forwarded as they are, as Linux does when the client's
    /// rules accept them.
    pub untracked_forwarded: u64,
}

impl Counters {
    /// How many frames were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(reason as usize).copied().unwrap_or(0)
    }
    /// All frames dropped.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }
    fn count(&mut self, reason: DropReason) {
        if let Some(counter) = self.drops.get_mut(reason as usize) {
            *counter += 1;
        }
    }
}

/// Why a client could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterError {
    /// The cap on attached clients is reached.
    TooManyClients,
    /// This vif is already attached.
    DuplicateClient,
    /// Another client (or the firewall) already has this address.
    AddressInUse,
}

impl core::fmt::Display for RouterError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RouterError::TooManyClients => {
                "too many clients attached (cap reached); vif not served"
            }
            RouterError::DuplicateClient => "this vif is already attached",
            RouterError::AddressInUse => "address already used by another client or the firewall",
        })
    }
}

/// Where a forwarded frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    Uplink,
    Client(usize),
}

/// The router. See the module documentation.
#[derive(Debug)]
pub struct Router {
    uplink: Uplink,
    clients: Vec<Client>,
    by_address: HashMap<IpAddr, usize, SeededState>,
    rules: HashMap<IpAddr, RuleSet, SeededState>,
    /// `/connected-ips` and `/connected-ips6` (`isolation.rs`).
    connected: HashSet<IpAddr, SeededState>,
    /// The running clients' addresses and `connected` together: one
    /// lookup per uplink packet.
    client_addresses: HashSet<IpAddr, SeededState>,
    nat: NatTable,
    /// Fragments from clients and from the uplink are kept apart, so the
    /// net qube cannot crowd out the clients' datagrams (and the reverse).
    reassembler: Reassembler,
    uplink_reassembler: Reassembler,
    resolver: Resolver,
    dns_servers: Vec<IpAddr>,
    wall_clock: Option<(u64, Millis)>,
    counters: Counters,
    caps: Caps,
    spare: Vec<Vec<u8>>,
    /// Bytes in every transmit queue together (capped by `queue_bytes`).
    queued: usize,
    /// The time of the last call that told us (frame handlers, timers):
    /// when a frame starts waiting for the gateway's MAC.
    clock: Millis,
    next_sweep: Millis,
    icmp_tokens: i64,
    icmp_tokens_at: Millis,
    /// The offload metadata of the frame being handled (`crate::offload`);
    /// [`Offload::NONE`] between frames.
    rx_offload: Offload,
    /// Pieces of an offloaded frame cut in software, before they go out.
    pieces: Vec<Vec<u8>>,
}

const SPARE_BUFFERS: usize = 64;
/// How soon [`Router::poll_at`] asks to be called again while frames wait
/// for a NIC that had no room (its event normally comes first).
pub const OUTPUT_RETRY_MS: Millis = 1;
const SWEEP_INTERVAL: Millis = 1_000;

impl Router {
    /// A router for this configuration, with nothing attached.
    pub fn new(config: NetworkConfig, caps: Caps, now: Instant) -> Router {
        let hasher = SeededState::new(config.seed);
        let servers: Vec<Ipv4Addr> = [config.primary_dns, config.secondary_dns]
            .into_iter()
            .flatten()
            .collect();
        let dns_servers = servers.iter().copied().map(IpAddr::V4).collect();
        let counters = Counters {
            drops: alloc::vec![0; DropReason::ALL.len()],
            ..Counters::default()
        };
        let resolver = Resolver::new(
            servers,
            caps.dns_names,
            config.ip6.is_some(),
            config.seed.rotate_left(17),
        );
        let mut nat = NatTable::new(caps.nat_entries, caps.nat_entries_per_client, config.seed);
        nat.reserve_port(resolver.port());
        Router {
            uplink: Uplink::new(
                config.uplink_mac,
                config.ip,
                config.gateway,
                config.ip6,
                config.gateway6,
                caps.queue_frames,
                (caps.pending_frames, caps.pending_bytes),
            ),
            clients: Vec::new(),
            by_address: HashMap::with_hasher(hasher),
            rules: HashMap::with_hasher(hasher),
            connected: HashSet::with_hasher(hasher),
            client_addresses: HashSet::with_hasher(hasher),
            nat,
            reassembler: Reassembler::new(caps.fragment_datagrams, caps.fragment_bytes),
            uplink_reassembler: Reassembler::new(caps.fragment_datagrams, caps.fragment_bytes),
            resolver,
            dns_servers,
            wall_clock: None,
            counters,
            caps,
            spare: Vec::new(),
            queued: 0,
            clock: now.total_millis(),
            next_sweep: now.total_millis() + SWEEP_INTERVAL,
            icmp_tokens: ICMP_ERRORS_PER_SECOND,
            icmp_tokens_at: now.total_millis(),
            rx_offload: Offload::NONE,
            pieces: Vec::new(),
        }
    }

    /// Attaches a client vif (flows going to its addresses end).
    pub fn add_client(&mut self, id: ClientId, config: ClientConfig) -> Result<(), RouterError> {
        if self.clients.iter().any(|c| c.id == id) {
            return Err(RouterError::DuplicateClient);
        }
        if self.clients.len() >= self.caps.clients {
            return Err(RouterError::TooManyClients);
        }
        let addresses = [Some(IpAddr::V4(config.ip)), config.ip6.map(IpAddr::V6)];
        for address in addresses.iter().flatten() {
            if self.by_address.contains_key(address) || self.is_ours(*address) {
                return Err(RouterError::AddressInUse);
            }
        }
        // Flows other clients had going out to this address (before it
        // was a client's) end: clients never reach each other.
        self.nat
            .flush_destinations(|dst| addresses.iter().flatten().any(|a| a == dst));
        self.clients
            .push(Client::new(id, config, self.caps.queue_frames));
        self.reindex();
        Ok(())
    }

    /// Detaches a client vif: its queue and every flow from or to it go.
    /// Its rules stay (keyed by address, dom0 removes them itself).
    pub fn remove_client(&mut self, id: ClientId) -> bool {
        let Some(index) = self.clients.iter().position(|c| c.id == id) else {
            return false;
        };
        let client = self.clients.swap_remove(index);
        self.queued = self.queued.saturating_sub(client.queue.bytes());
        self.nat.flush_client(IpAddr::V4(client.config.ip));
        if let Some(ip6) = client.config.ip6 {
            self.nat.flush_client(IpAddr::V6(ip6));
        }
        self.reindex();
        true
    }

    fn reindex(&mut self) {
        self.by_address.clear();
        for (index, client) in self.clients.iter().enumerate() {
            self.by_address.insert(IpAddr::V4(client.config.ip), index);
            if let Some(ip6) = client.config.ip6 {
                self.by_address.insert(IpAddr::V6(ip6), index);
            }
        }
        self.rebuild_client_addresses();
    }

    /// Installs the rules of the client with address `client_ip` (from
    /// `/qubes-firewall/<client_ip>/`), replacing any earlier set and
    /// flushing that client's flows. A set that failed to parse denies all.
    pub fn set_rules(&mut self, client_ip: IpAddr, rules: RuleSet) {
        self.rules.insert(client_ip, rules);
        self.nat.flush_client(client_ip);
        self.update_wanted_names();
    }

    /// The rules of `client_ip` were removed: from now on it is denied
    /// everything, rejected (Linux's `firewall.py` then fails to read a
    /// policy and blocks the address with a single `action=drop` rule, a
    /// REJECT), and its flows are flushed.
    pub fn remove_rules(&mut self, client_ip: IpAddr) {
        self.rules.insert(client_ip, RuleSet::deny_all());
        self.nat.flush_client(client_ip);
        self.update_wanted_names();
    }

    fn update_wanted_names(&mut self) {
        let names: Vec<&str> = self
            .rules
            .values()
            .flat_map(|set| set.hostnames().iter().map(|n| n.as_str()))
            .collect();
        let now = self.next_sweep - SWEEP_INTERVAL;
        self.resolver.set_wanted(names, now);
    }

    /// The parse error of a client's rules, if any.
    pub fn rules_error(&self, client_ip: IpAddr) -> Option<&RuleError> {
        self.rules.get(&client_ip).and_then(RuleSet::error)
    }

    /// Tells the router the wall-clock time (unix seconds) at `now`, for
    /// `expire=` rules; `None` when unknown.
    pub fn set_wall_clock(&mut self, unix_seconds: Option<u64>, now: Instant) {
        self.wall_clock = unix_seconds.map(|secs| (secs, now.total_millis()));
    }

    /// The time for IPv4 timestamp options: milliseconds since midnight
    /// UTC, or (wall clock unknown) our clock with the top bit set, as RFC
    /// 791 asks.
    fn ms_since_midnight(&self, now: Millis) -> u32 {
        match self.wall_clock {
            Some((secs, at)) => {
                let ms = (secs % 86_400) * 1000 + now.saturating_sub(at).max(0) as u64;
                (ms % 86_400_000) as u32
            }
            None => 0x8000_0000 | (now as u32 & 0x7fff_ffff),
        }
    }

    /// Checks the IPv4 options of a whole packet from `back` (Linux's
    /// `ip_rcv_options`, before any other decision): `false` when it was
    /// dropped (a source route silently, malformed options with a
    /// parameter problem).
    #[cold]
    fn options_ok(&mut self, back: Out, packet: &[u8], meta: &packet::IpMeta, now: Millis) -> bool {
        if meta.v6 || meta.header_len <= 20 {
            return true;
        }
        match ipv4::check(packet.get(..meta.header_len).unwrap_or(&[])) {
            ipv4::Options::Forward => true,
            ipv4::Options::SourceRoute => {
                self.drop(DropReason::SourceRoute);
                false
            }
            ipv4::Options::Bad(pointer) => {
                self.icmp_error(
                    back,
                    packet,
                    meta,
                    icmp::IcmpError::ParameterProblem(pointer),
                    now,
                );
                self.drop(DropReason::Malformed);
                false
            }
        }
    }

    /// The IPv4 options to fill in when forwarding: `Some((our address,
    /// time))` for a packet that has options.
    fn options_stamp(&self, meta: &packet::IpMeta, now: Millis) -> Option<(Ipv4Addr, u32)> {
        (!meta.v6 && meta.header_len > 20).then(|| (self.uplink.ip, self.ms_since_midnight(now)))
    }

    fn now_unix(&self, now: Millis) -> Option<u64> {
        self.wall_clock
            .map(|(secs, at)| secs + (now.saturating_sub(at).max(0) / 1000) as u64)
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The uplink's traffic counters.
    pub fn uplink_counters(&self) -> &InterfaceCounters {
        &self.uplink.counters
    }

    /// One client's traffic counters.
    pub fn client_counters(&self, id: ClientId) -> Option<&InterfaceCounters> {
        self.clients
            .iter()
            .find(|c| c.id == id)
            .map(|c| &c.counters)
    }

    /// Live NAT / connection-tracking entries.
    pub fn nat_len(&self) -> usize {
        self.nat.len()
    }

    /// NAT / connection-tracking entries a client owns (flows it started,
    /// from its IPv4 and IPv6 addresses): the NAT table keeps the count, so
    /// this does not scan. `None` for an unknown vif.
    pub fn client_nat_len(&self, id: ClientId) -> Option<usize> {
        let client = self.clients.iter().find(|c| c.id == id)?;
        let v6 = client
            .config
            .ip6
            .map_or(0, |ip6| self.nat.owner_len(IpAddr::V6(ip6)));
        Some(self.nat.owner_len(IpAddr::V4(client.config.ip)) + v6)
    }

    /// Frames waiting for the gateway's MAC (IPv4 and IPv6 together).
    pub fn pending_len(&self) -> usize {
        self.uplink.pending.len() + self.uplink.pending6.len()
    }

    /// The gateway MAC, once learned.
    pub fn gateway_mac(&self) -> Option<EthernetAddress> {
        self.uplink.gateway.mac
    }

    /// Whether a gateway (IPv4 or IPv6) is reached through
    /// [`crate::uplink::GATEWAY_FALLBACK_MAC`] because it never answered
    /// ARP / NDP.
    pub fn gateway_uses_fallback_mac(&self) -> bool {
        self.uplink.gateway.fallback || self.uplink.gateway6.is_some_and(|g| g.fallback)
    }

    /// The DNS cache the `dsthost` rules use.
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    fn is_ours(&self, address: IpAddr) -> bool {
        match address {
            IpAddr::V4(a) => a == self.uplink.ip,
            IpAddr::V6(a) => Some(a) == self.uplink.ip6,
        }
    }

    fn drop(&mut self, reason: DropReason) {
        self.counters.count(reason);
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer
    }

    /// Gives a transmitted frame's buffer back for reuse.
    pub fn recycle(&mut self, frame: Vec<u8>) {
        // A buffer without capacity (one a frame was taken out of) is no
        // spare. Its old bytes stay: `buffer` clears it for the router's
        // own frames, and a NIC's `receive_into` that keeps it for a later
        // copy (`platform::xen::frames`) need not zero-fill it again.
        if self.spare.len() < SPARE_BUFFERS && frame.capacity() != 0 {
            self.spare.push(frame);
        }
    }

    /// A spare buffer for a NIC's `receive_into`, its old frame's bytes
    /// still in it (the NIC replaces them).
    fn receive_buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Runs the timers: NAT and fragment expiry, ARP/NDP for the gateway,
    /// DNS queries for `dsthost` rules.
    pub fn poll_timers(&mut self, now: Instant) {
        let now = now.total_millis();
        self.clock = now;
        if now >= self.next_sweep {
            let budget = (self.nat.capacity() / 30).max(4096);
            self.nat.expire(now, budget);
            self.reassembler.expire(now);
            self.uplink_reassembler.expire(now);
            self.next_sweep = now + SWEEP_INTERVAL;
        }
        self.expire_pending(now);
        self.ask_gateways(now);
        let mut queries: Vec<(Ipv4Addr, Vec<u8>)> = Vec::new();
        self.resolver.poll(now, &mut |server, message| {
            queries.push((server, message.to_vec()))
        });
        let port = self.resolver.port();
        for (server, message) in queries {
            let mut packet = Vec::with_capacity(28 + message.len());
            packet.extend_from_slice(&ipv4_header(
                self.uplink.ip,
                server,
                PROTO_UDP,
                8 + message.len(),
            ));
            packet.extend_from_slice(&port.to_be_bytes());
            packet.extend_from_slice(&53u16.to_be_bytes());
            packet.extend_from_slice(&((8 + message.len()) as u16).to_be_bytes());
            packet.extend_from_slice(&[0, 0]);
            packet.extend_from_slice(&message);
            let pseudo = checksum::pseudo_v4(
                &self.uplink.ip,
                &server,
                PROTO_UDP,
                (8 + message.len()) as u32,
            );
            let mut sum = checksum::finish(checksum::add(pseudo, packet.get(20..).unwrap_or(&[])));
            if sum == 0 {
                sum = 0xffff;
            }
            if let Some(field) = packet.get_mut(26..28) {
                field.copy_from_slice(&sum.to_be_bytes());
            }
            self.send_ip(Out::Uplink, false, &packet);
        }
    }

    /// When the router next needs [`Router::poll_timers`], or, while
    /// frames wait for a NIC that had no room, a retry of the transmit
    /// after [`OUTPUT_RETRY_MS`].
    pub fn poll_at(&self, now: Instant) -> Option<Instant> {
        let mut at = if self.nat.is_empty()
            && self.reassembler.is_empty()
            && self.uplink_reassembler.is_empty()
        {
            None
        } else {
            Some(self.next_sweep)
        };
        let candidates = [
            self.uplink.gateway.ask_at(),
            self.uplink.gateway6.and_then(|g| g.ask_at()),
            self.resolver.poll_at(),
            self.uplink.pending.expires_at(),
            self.uplink.pending6.expires_at(),
        ];
        // Frames still queued after every NIC was offered them wait for
        // a NIC's room, which its event announces (a netback's client
        // posting buffers, a netfront's backend answering): no busy loop
        // while a peer is slow, only a retry in case an event is missed.
        let retry = self
            .has_output()
            .then(|| now.total_millis() + OUTPUT_RETRY_MS);
        for candidate in candidates.into_iter().chain([retry]).flatten() {
            at = Some(at.map_or(candidate, |a: Millis| a.min(candidate)));
        }
        at.map(Instant::from_millis)
    }

    /// Whether any frame waits to be transmitted.
    pub fn has_output(&self) -> bool {
        !self.uplink.queue.is_empty() || self.clients.iter().any(|c| !c.queue.is_empty())
    }

    /// The clients a frame waits to be transmitted to.
    pub fn clients_with_output(&self) -> Vec<ClientId> {
        self.clients
            .iter()
            .filter(|c| !c.queue.is_empty())
            .map(|c| c.id)
            .collect()
    }

    /// Takes the next frame for the uplink. An offloaded frame (only the
    /// `*_offloaded` entry points make them) loses its metadata here: use
    /// [`Router::pop_uplink_frame_offloaded`] for those.
    pub fn pop_uplink_frame(&mut self) -> Option<Vec<u8>> {
        self.pop_uplink_frame_offloaded().map(|(frame, _)| frame)
    }

    /// Takes the next frame for the uplink, with its offload metadata.
    pub fn pop_uplink_frame_offloaded(&mut self) -> Option<(Vec<u8>, Offload)> {
        let (frame, offload) = self.uplink.queue.pop_offloaded()?;
        self.queued = self.queued.saturating_sub(frame.len());
        Some((frame, offload))
    }

    /// Takes the next frame for a client (see [`Router::pop_uplink_frame`]).
    pub fn pop_client_frame(&mut self, id: ClientId) -> Option<Vec<u8>> {
        self.pop_client_frame_offloaded(id).map(|(frame, _)| frame)
    }

    /// Takes the next frame for a client, with its offload metadata.
    pub fn pop_client_frame_offloaded(&mut self, id: ClientId) -> Option<(Vec<u8>, Offload)> {
        let (frame, offload) = self
            .clients
            .iter_mut()
            .find(|c| c.id == id)?
            .queue
            .pop_offloaded()?;
        self.queued = self.queued.saturating_sub(frame.len());
        Some((frame, offload))
    }

    /// Receives every frame the uplink NIC has (at most 256 per call), then
    /// transmits what is queued for it. Returns true when it stopped at
    /// that bound: the NIC may hold more, the caller must come back
    /// without waiting for an event.
    pub fn pump_uplink<D: OffloadNic>(&mut self, device: &mut D, now: Instant) -> bool {
        let mut more = true;
        let mut taken = 0usize;
        for _ in 0..256 {
            if taken >= self.round_bytes() {
                break;
            }
            let mut frame = self.receive_buffer();
            let Some(offload) = device.receive_into(now, &mut frame) else {
                self.recycle(frame);
                more = false;
                break;
            };
            taken += frame.len();
            self.handle_uplink_frame_in_place(&mut frame, offload, now);
            self.recycle(frame);
        }
        self.transmit_uplink(device, now);
        more
    }

    /// Transmits what is queued for the uplink, as far as the NIC takes it.
    pub fn transmit_uplink<D: OffloadNic>(&mut self, device: &mut D, now: Instant) {
        self.transmit(None, device, now);
    }

    /// Receives the frames a client's NIC has, at most
    /// [`CLIENT_FRAMES_PER_ROUND`] per call, then transmits what is queued
    /// for it. The main loop pumps every client once a round, so a client
    /// flooding us gets no more of the firewall's work than that per
    /// round; its excess waits in its own NIC's queue and is dropped there
    /// when that fills (the TAP's or the netback ring's), not in anyone
    /// else's. Returns true when it stopped at that budget (come back
    /// without waiting for an event, as for [`Router::pump_uplink`]).
    pub fn pump_client<D: OffloadNic>(
        &mut self,
        id: ClientId,
        device: &mut D,
        now: Instant,
    ) -> bool {
        let index = self.clients.iter().position(|c| c.id == id);
        let mut more = true;
        let mut taken = 0usize;
        for _ in 0..CLIENT_FRAMES_PER_ROUND {
            if taken >= self.round_bytes() {
                break;
            }
            let mut frame = self.receive_buffer();
            let Some(offload) = device.receive_into(now, &mut frame) else {
                self.recycle(frame);
                more = false;
                break;
            };
            taken += frame.len();
            match index {
                Some(index) => self.client_frame_at(index, &mut frame, offload, now),
                None => self.drop(DropReason::UnknownClient),
            }
            self.recycle(frame);
        }
        self.transmit_client(id, device, now);
        more
    }

    /// Bytes one NIC may hand us per round (a quarter of the transmit
    /// queues' byte cap): 256 GSO frames of 64 KiB from the uplink in one
    /// round would overflow the queues they go to before the clients'
    /// turns transmit them, dropping well-behaved traffic (`QueueFull`);
    /// what is over stays in the NIC's own queue for the next round.
    fn round_bytes(&self) -> usize {
        (self.caps.queue_bytes / 4).max(offload::MAX_OFFLOAD_FRAME)
    }

    /// Transmits what is queued for a client, as far as its NIC takes it.
    pub fn transmit_client<D: OffloadNic>(&mut self, id: ClientId, device: &mut D, now: Instant) {
        let Some(index) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        self.transmit(Some(index), device, now);
    }

    fn queue_mut(&mut self, client: Option<usize>) -> Option<&mut crate::client_net::FrameQueue> {
        match client {
            None => Some(&mut self.uplink.queue),
            Some(index) => self.clients.get_mut(index).map(|c| &mut c.queue),
        }
    }

    /// Hands queued frames to the NIC until it has no room. An offloaded
    /// frame the NIC cannot take is cut (GSO) or completed (checksum) in
    /// software first, its pieces going out in its place.
    fn transmit<D: OffloadNic>(&mut self, client: Option<usize>, device: &mut D, now: Instant) {
        self.transmit_batch(client, device, now);
        device.flush();
    }

    /// The frames of [`Self::transmit`], before the NIC's flush.
    fn transmit_batch<D: OffloadNic>(
        &mut self,
        client: Option<usize>,
        device: &mut D,
        now: Instant,
    ) {
        let offloads = device.tx_offloads();
        while let Some((mut frame, mut offload)) =
            self.queue_mut(client).and_then(|q| q.pop_offloaded())
        {
            self.queued = self.queued.saturating_sub(frame.len());
            let v6 = frame.get(12..14) == Some(&crate::wire::ETHERTYPE_IPV6.to_be_bytes()[..]);
            if !offload.is_gso() && offload.csum_partial && !offloads.take(offload, v6) {
                // Only the checksum to fill in: in place, no copy.
                if offload::complete(&mut frame).is_err() {
                    self.drop(DropReason::Malformed);
                    self.recycle(frame);
                    continue;
                }
                offload = Offload::NONE;
            }
            if offload.is_none() || offloads.take(offload, v6) {
                // The NIC may keep the buffer (a netfront lending its
                // pages); an empty one is not recycled.
                if device.transmit_owned(now, &mut frame, offload) {
                    self.recycle(frame);
                    continue;
                }
                self.queued += frame.len();
                if let Some(queue) = self.queue_mut(client) {
                    queue.unpop(frame, offload);
                }
                break;
            }
            // Cut in software; the pieces go back at the front of the
            // queue (as complete frames) and leave from there.
            let mut pieces = core::mem::take(&mut self.pieces);
            let mut scratch = self.buffer();
            let result = offload::finish(&frame, offload, &mut scratch, &mut |piece| {
                pieces.push(piece.to_vec())
            });
            self.recycle(scratch);
            self.recycle(frame);
            if result.is_err() {
                pieces.clear();
                self.drop(DropReason::Malformed);
            }
            while let Some(piece) = pieces.pop() {
                self.queued += piece.len();
                if let Some(queue) = self.queue_mut(client) {
                    queue.unpop(piece, Offload::NONE);
                }
            }
            self.pieces = pieces;
        }
    }
}
