//! The router: every frame from a client vif or the uplink goes through
//! here, and this is the seam between the program flow (`firewall.rs`) and
//! the packet path.
//!
//! What it does (qubes-mirage-firewall's `Firewall.ipv4_from_client` /
//! `ipv4_from_netvm`, plus what mirage lacks):
//! - client → outside: the source must be the client's vif address
//!   (anti-spoofing); a known flow is translated by its NAT entry; a new
//!   flow is decided by the client's [`RuleSet`] once and, if accepted, gets
//!   a NAT entry (so the per-packet cost does not depend on the rules);
//! - a new flow the rules deny is answered with ICMP "administratively
//!   prohibited" (type 3 code 13 / ICMPv6 1/1), as Linux's qubes-firewall
//!   does (`REJECT --reject-with icmp-admin-prohibited` for `action=drop`
//!   and the policy); all ICMP errors we send share a 1 000/s token bucket;
//! - client → client: never forwarded. Linux's `qubes` table drops every
//!   new forwarded packet whose output is a client vif (`oifgroup 2 counter
//!   drop`); the sender's rules still run first (its `qubes-firewall`
//!   chain comes first in netfilter), so a flow they deny is rejected and
//!   one they accept is dropped silently (`ClientToClient`);
//! - ICMP errors a client sends about one of its flows go to the other end,
//!   translated (Linux's RELATED);
//! - outside → client: only through an existing NAT entry (replies, and ICMP
//!   errors about a flow, translated back to the inner flow); uplink packets
//!   claiming a client's or the firewall's own source are dropped;
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
//!   queued when the gateway's MAC changes are re-addressed, not lost;
//! - IPv6 (`/qubes-ip6` set): the same forwarding and NAT with `dst6` rules;
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
//! Not done (yet): IPv6 extension headers other than a lone Fragment
//! header are dropped (counted).
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
//! // address without rules is deny-all; replacing a set flushes that
//! // client's flows. Log `set.error()` (key + reason) if any.
//! router.set_rules(client_ip, RuleSet::parse(entries));
//! router.set_wall_clock(Some(unix_seconds), now);   // for expire=
//!
//! // Main loop (D: smoltcp::phy::Device):
//! router.pump_uplink(&mut uplink_nic, now);   // receive all, transmit queued
//! router.pump_client(id, &mut client_nic, now);
//! router.poll_timers(now);                    // NAT expiry, ARP/NDP, DNS
//! platform.wait(router.poll_at(now));         // `now` if frames are queued
//! // Frame by frame instead: handle_uplink_frame / handle_client_frame,
//! // pop_uplink_frame / pop_client_frame, recycle(buffer).
//!
//! // Frames a client queued for the uplink leave at the next pump_uplink
//! // (or call transmit_uplink(&mut nic, now) after the clients).
//! router.uplink_restarted();                 // the net qube came back
//!
//! // Status: counters() (per DropReason, DropReason::ALL / name()),
//! // uplink_counters(), client_counters(id), nat_len(), client_nat_len(id),
// pending_len(), rules_error(ip).
//! ```
//!
//! `clippy::indexing_slicing` is denied in this module: no index or slice
//! of a peer's bytes can panic (fixed headers are read through arrays from
//! `first_chunk`/`split_first_chunk`, everything else through `get`).
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::HashMap;
use smoltcp::phy::{Device, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;

use crate::arp::{
    self, Arp, CLIENT_SIDE_MAC, ETH_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, Ndp,
    UplinkArp,
};
use crate::client_net::Client;
pub use crate::client_net::{ClientConfig, ClientId, InterfaceCounters};
use crate::dns::Resolver;
use crate::fragments::{FragmentError, Reassembler, Reassembly, fragment_ipv4, fragment_ipv6};
use crate::nat::{Direction, FlowKey, Millis, NatError, NatTable, SeededState, TcpFlags};
use crate::rules::{
    FlowMeta, MatchContext, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RuleError, RuleSet,
    Verdict,
};
use crate::uplink::Uplink;

/// Internet checksum helpers (RFC 1071, incremental update per RFC 1624).
pub mod checksum {
    use core::net::{Ipv4Addr, Ipv6Addr};

    /// Adds `bytes` (big-endian 16-bit words, odd byte padded) to `sum`.
    pub fn add(sum: u32, bytes: &[u8]) -> u32 {
        let mut acc = u64::from(sum);
        let (words, tail) = bytes.as_chunks::<2>();
        for &word in words {
            acc += u64::from(u16::from_be_bytes(word));
        }
        if let Some(&last) = tail.first() {
            acc += u64::from(u16::from_be_bytes([last, 0]));
        }
        while acc > 0xffff_ffff {
            acc = (acc & 0xffff_ffff) + (acc >> 32);
        }
        acc as u32
    }

    /// Folds a sum to 16 bits.
    pub fn fold(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// The checksum field value for a sum.
    pub fn finish(sum: u32) -> u16 {
        !fold(sum)
    }

    /// IPv4 pseudo-header sum.
    pub fn pseudo_v4(src: &Ipv4Addr, dst: &Ipv4Addr, protocol: u8, length: u32) -> u32 {
        let sum = add(add(0, &src.octets()), &dst.octets());
        add(sum, &[0, protocol, (length >> 8) as u8, length as u8])
    }

    /// IPv6 pseudo-header sum.
    pub fn pseudo_v6(src: &Ipv6Addr, dst: &Ipv6Addr, protocol: u8, length: u32) -> u32 {
        let sum = add(add(0, &src.octets()), &dst.octets());
        add(sum, &length.to_be_bytes()) + u32::from(protocol)
    }

    /// Updates checksum field `check` for a change of `old` to `new` (equal
    /// even lengths): HC' = ~(~HC + ~m + m').
    pub fn adjust(check: u16, old: &[u8], new: &[u8]) -> u16 {
        let mut sum = u32::from(!check);
        let (old_words, _) = old.as_chunks::<2>();
        let (new_words, _) = new.as_chunks::<2>();
        for (&o, &n) in old_words.iter().zip(new_words) {
            sum += u32::from(!u16::from_be_bytes(o));
            sum += u32::from(u16::from_be_bytes(n));
        }
        !fold(sum)
    }
}

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
    SpoofedSource = "source address not allowed on this interface",
    NotForUs = "uplink packet not addressed to the firewall",
    ClientToClient = "client-to-client traffic (clients are isolated, as in Linux's qubes table)",
    ToFirewall = "client packet to the firewall itself",
    Broadcast = "broadcast or multicast destination",
    LinkLocal = "IPv6 link-local or neighbour-discovery traffic not for us",
    RulesDrop = "denied by the client's rules",
    RulesParseError = "client's rules failed to parse",
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IcmpKind {
    NotIcmp,
    EchoRequest,
    EchoReply,
    Error,
    Ndp,
    Other,
}

/// What the router reads from an IP packet.
#[derive(Clone, Copy, Debug)]
struct IpMeta {
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    header_len: usize,
    total_len: usize,
    ttl: u8,
    fragment: bool,
    src_port: u16,
    dst_port: u16,
    icmp: IcmpKind,
    icmp_type: Option<u8>,
    tcp: Option<TcpFlags>,
    /// For an IPv6 datagram we reassembled: its fragment id, to cut it
    /// again the same way if it does not fit the next link.
    frag_id: Option<u32>,
}

impl IpMeta {
    fn key(&self) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            protocol: self.protocol,
        }
    }
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Parses an IP packet (`strict`: verify the IPv4 header checksum and that
/// the whole packet is there; not for the quoted packet inside an ICMP
/// error).
/// Feeds one fragment to `reassembler`: `Ok(None)` while the datagram is
/// incomplete, the whole datagram and its parsed header once it is, or why
/// it was dropped. An IPv6 datagram keeps the Fragment header's
/// identification (bytes 44..48 after the fixed header) for re-fragmenting.
fn reassemble(
    reassembler: &mut Reassembler,
    packet: &[u8],
    meta: &IpMeta,
    now: i64,
) -> Result<Option<(Vec<u8>, IpMeta)>, DropReason> {
    let (outcome, frag_id) = if meta.v6 {
        (
            reassembler.push_ipv6(packet, now),
            packet
                .get(44..)
                .and_then(<[u8]>::first_chunk::<4>)
                .map(|id| u32::from_be_bytes(*id)),
        )
    } else {
        (reassembler.push(packet, now), None)
    };
    match outcome {
        Reassembly::Incomplete => Ok(None),
        Reassembly::Dropped(_) => Err(DropReason::Fragment),
        Reassembly::Complete(datagram) => {
            let mut whole = parse_ip(&datagram, true)?;
            whole.frag_id = frag_id;
            Ok(Some((datagram, whole)))
        }
    }
}

fn parse_ip(packet: &[u8], strict: bool) -> Result<IpMeta, DropReason> {
    let first = *packet.first().ok_or(DropReason::Malformed)?;
    let (v6, src, dst, protocol, header_len, total_len, ttl, fragment) = match first >> 4 {
        4 => {
            let header_len = usize::from(first & 0x0f) * 4;
            let header = packet.get(..header_len).ok_or(DropReason::Malformed)?;
            // The fixed 20 bytes as an array: constant offsets, no panics.
            let fixed = header.first_chunk::<20>().ok_or(DropReason::Malformed)?;
            let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
            if strict && (total_len < header_len || total_len > packet.len()) {
                return Err(DropReason::Malformed);
            }
            if strict && checksum::fold(checksum::add(0, header)) != 0xffff {
                return Err(DropReason::Malformed);
            }
            let flags = u16::from_be_bytes([fixed[6], fixed[7]]);
            let src = Ipv4Addr::new(fixed[12], fixed[13], fixed[14], fixed[15]);
            let dst = Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]);
            let fragment = flags & 0x3fff != 0;
            (
                false,
                IpAddr::V4(src),
                IpAddr::V4(dst),
                fixed[9],
                header_len,
                total_len,
                fixed[8],
                fragment,
            )
        }
        6 => {
            let header = packet.first_chunk::<40>().ok_or(DropReason::Malformed)?;
            let total_len = 40 + usize::from(u16::from_be_bytes([header[4], header[5]]));
            if strict && total_len > packet.len() {
                return Err(DropReason::Malformed);
            }
            let mut src = [0u8; 16];
            src.copy_from_slice(&header[8..24]);
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&header[24..40]);
            let protocol = header[6];
            // Upper-layer protocols only: an extension header (hop-by-hop,
            // routing, destination options, …) would hide the real one.
            if !matches!(
                protocol,
                PROTO_TCP
                    | PROTO_UDP
                    | PROTO_ICMPV6
                    | PROTO_FRAGMENT
                    | PROTO_GRE
                    | PROTO_ESP
                    | PROTO_SCTP
            ) {
                return Err(DropReason::UnsupportedProtocol);
            }
            let (src, dst) = (
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
            );
            let fragment = protocol == PROTO_FRAGMENT;
            (true, src, dst, protocol, 40, total_len, header[7], fragment)
        }
        _ => return Err(DropReason::Malformed),
    };
    let mut meta = IpMeta {
        v6,
        src,
        dst,
        protocol,
        header_len,
        total_len,
        ttl,
        fragment,
        src_port: 0,
        dst_port: 0,
        icmp: IcmpKind::NotIcmp,
        icmp_type: None,
        tcp: None,
        frag_id: None,
    };
    if fragment {
        return Ok(meta);
    }
    let end = if strict {
        total_len
    } else {
        packet.len().min(total_len)
    };
    let l4 = packet.get(header_len..end).ok_or(DropReason::Malformed)?;
    match protocol {
        PROTO_TCP => {
            meta.src_port = be16(l4, 0).ok_or(DropReason::Malformed)?;
            meta.dst_port = be16(l4, 2).ok_or(DropReason::Malformed)?;
            if strict {
                let offset = usize::from(*l4.get(12).ok_or(DropReason::Malformed)? >> 4) * 4;
                if offset < 20 || offset > l4.len() {
                    return Err(DropReason::Malformed);
                }
            }
            let flags = l4.get(13).copied().unwrap_or(0);
            meta.tcp = Some(TcpFlags {
                fin: flags & 1 != 0,
                syn: flags & 2 != 0,
                rst: flags & 4 != 0,
            });
        }
        PROTO_UDP => {
            meta.src_port = be16(l4, 0).ok_or(DropReason::Malformed)?;
            meta.dst_port = be16(l4, 2).ok_or(DropReason::Malformed)?;
            if strict && l4.len() < 8 {
                return Err(DropReason::Malformed);
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 if (protocol == PROTO_ICMPV6) == v6 => {
            let icmp_type = *l4.first().ok_or(DropReason::Malformed)?;
            if strict && l4.len() < 8 {
                return Err(DropReason::Malformed);
            }
            meta.icmp_type = Some(icmp_type);
            meta.icmp = match (v6, icmp_type) {
                (false, 8) | (true, 128) => IcmpKind::EchoRequest,
                (false, 0) | (true, 129) => IcmpKind::EchoReply,
                (false, 3 | 4 | 5 | 11 | 12) | (true, 1..=4) => IcmpKind::Error,
                (true, 133..=137) => IcmpKind::Ndp,
                _ => IcmpKind::Other,
            };
            if matches!(meta.icmp, IcmpKind::EchoRequest | IcmpKind::EchoReply) {
                let id = be16(l4, 4).ok_or(DropReason::Malformed)?;
                meta.src_port = id;
                meta.dst_port = id;
            }
        }
        // ICMP of the other family.
        PROTO_ICMP | PROTO_ICMPV6 => return Err(DropReason::UnsupportedProtocol),
        // Other protocols (GRE, ESP, SCTP, …) are tracked by address only,
        // like Linux's generic conntrack.
        _ => {}
    }
    Ok(meta)
}

fn l4_checksum_offset(meta: &IpMeta) -> Option<usize> {
    match meta.protocol {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_ICMP | PROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// Rewrites an address of `packet` (an IP packet described by `meta`) and,
/// with it, the port (or ICMP id) on the same side, fixing every checksum
/// incrementally. `source` picks the side.
fn rewrite(packet: &mut [u8], meta: &IpMeta, source: bool, address: IpAddr, port: u16) {
    let (addr_at, addr_len) = match (meta.v6, source) {
        (false, true) => (12, 4),
        (false, false) => (16, 4),
        (true, true) => (8, 16),
        (true, false) => (24, 16),
    };
    let mut new_addr = [0u8; 16];
    match address {
        IpAddr::V4(a) => new_addr[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => new_addr.copy_from_slice(&a.octets()),
    }
    let mut old_addr = [0u8; 16];
    let (Some(new_addr), Some(old_part), Some(current)) = (
        new_addr.get(..addr_len),
        old_addr.get_mut(..addr_len),
        packet.get(addr_at..addr_at + addr_len),
    ) else {
        return;
    };
    old_part.copy_from_slice(current);
    let old_addr = &*old_part;
    let is_icmp = matches!(meta.icmp, IcmpKind::EchoRequest | IcmpKind::EchoReply);
    let port_at = meta.header_len
        + match (is_icmp, source) {
            (true, _) => 4,
            (false, true) => 0,
            (false, false) => 2,
        };
    let old_port = be16(packet, port_at).unwrap_or(port);
    let l4_sum_at = l4_checksum_offset(meta).map(|o| meta.header_len + o);
    // Does the L4 checksum cover the address (pseudo header)?
    let pseudo = meta.protocol != PROTO_ICMP;
    if let Some(at) = l4_sum_at
        && let Some(old_sum) = be16(packet, at)
    {
        let udp_without_sum = meta.protocol == PROTO_UDP && !meta.v6 && old_sum == 0;
        if !udp_without_sum {
            let mut sum = old_sum;
            if pseudo {
                sum = checksum::adjust(sum, old_addr, new_addr);
            }
            sum = checksum::adjust(sum, &old_port.to_be_bytes(), &port.to_be_bytes());
            if meta.protocol == PROTO_UDP && sum == 0 {
                sum = 0xffff;
            }
            if let Some(field) = packet.get_mut(at..at + 2) {
                field.copy_from_slice(&sum.to_be_bytes());
            }
        }
    }
    let has_ports = is_icmp || matches!(meta.protocol, PROTO_TCP | PROTO_UDP);
    if has_ports && let Some(field) = packet.get_mut(port_at..port_at + 2) {
        field.copy_from_slice(&port.to_be_bytes());
    }
    if !meta.v6
        && let Some(old_sum) = be16(packet, 10)
    {
        let sum = checksum::adjust(old_sum, old_addr, new_addr);
        if let Some(field) = packet.get_mut(10..12) {
            field.copy_from_slice(&sum.to_be_bytes());
        }
    }
    if let Some(field) = packet.get_mut(addr_at..addr_at + addr_len) {
        field.copy_from_slice(new_addr);
    }
}

/// Decrements the TTL / hop limit (the caller checked it is > 1).
fn decrement_ttl(packet: &mut [u8], v6: bool) {
    if v6 {
        if let Some(hop) = packet.get_mut(7) {
            *hop = hop.saturating_sub(1);
        }
        return;
    }
    let (Some(ttl), Some(protocol), Some(sum)) = (
        packet.get(8).copied(),
        packet.get(9).copied(),
        be16(packet, 10),
    ) else {
        return;
    };
    let new_ttl = ttl.saturating_sub(1);
    let sum = checksum::adjust(sum, &[ttl, protocol], &[new_ttl, protocol]);
    if let Some(field) = packet.get_mut(8..12) {
        field.copy_from_slice(&[new_ttl, protocol, (sum >> 8) as u8, sum as u8]);
    }
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum::finish(checksum::add(0, &h));
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, payload_len: usize) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    h[6] = protocol;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

/// Most ICMP errors the router sends per second (burst the same).
pub const ICMP_ERRORS_PER_SECOND: i64 = 1000;

/// The ICMP errors the router sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IcmpError {
    /// TTL / hop limit ran out here.
    TimeExceeded,
    /// The client's rules deny the flow (Linux's `REJECT --reject-with
    /// icmp-admin-prohibited` / `icmp6-adm-prohibited`).
    AdminProhibited,
    /// Too big for the next hop, and must not be fragmented.
    FragmentationNeeded(usize),
}

/// IPv6 next header: Fragment.
const PROTO_FRAGMENT: u8 = 44;
/// GRE, tracked without ports.
const PROTO_GRE: u8 = 47;
/// ESP, tracked without ports.
const PROTO_ESP: u8 = 50;
/// SCTP, tracked without ports (its CRC does not cover the addresses).
const PROTO_SCTP: u8 = 132;

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
    no_rules: RuleSet,
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
}

const SPARE_BUFFERS: usize = 64;
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
            no_rules: RuleSet::deny_all(),
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
        }
    }

    /// Attaches a client vif.
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
    }

    /// Installs the rules of the client with address `client_ip` (from
    /// `/qubes-firewall/<client_ip>/`), replacing any earlier set and
    /// flushing that client's flows. A set that failed to parse denies all.
    pub fn set_rules(&mut self, client_ip: IpAddr, rules: RuleSet) {
        self.rules.insert(client_ip, rules);
        self.nat.flush_client(client_ip);
        self.update_wanted_names();
    }

    /// Forgets the rules of `client_ip` (back to deny-all), flushing its
    /// flows.
    pub fn remove_rules(&mut self, client_ip: IpAddr) {
        self.rules.remove(&client_ip);
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
        for frame in self.uplink.queue.take_all() {
            match gateway_frame_kind(&frame, old, old6) {
                Some(v6) => self.hold(v6, frame),
                None => self.recycle(frame),
            }
        }
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
    pub fn recycle(&mut self, mut frame: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS {
            frame.clear();
            self.spare.push(frame);
        }
    }

    fn enqueue(&mut self, out: Out, frame: Vec<u8>) {
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
        match queue.push(frame) {
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
    fn link_addresses(&mut self, out: Out, v6: bool) -> Option<(EthernetAddress, EthernetAddress)> {
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
    fn send_ipv6_fragments(&mut self, out: Out, packet: &[u8], id: u32) {
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

    fn send_ip(&mut self, out: Out, v6: bool, packet: &[u8]) {
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
    fn emit(&mut self, out: Out, v6: bool, frame: Vec<u8>) {
        if out == Out::Uplink {
            let resolved = if v6 {
                self.uplink.gateway6.and_then(|g| g.mac)
            } else {
                self.uplink.gateway.mac
            };
            if resolved.is_none() {
                return self.hold(v6, frame);
            }
        }
        self.enqueue(out, frame);
    }

    /// Puts an IP frame for the gateway in the pending queue (oldest
    /// dropped at the caps, counted) and asks for the gateway's MAC if a
    /// request is due. The frame's destination MAC is written when it
    /// leaves ([`Router::learned_gateway`]).
    fn hold(&mut self, v6: bool, frame: Vec<u8>) {
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
    fn learned_gateway(&mut self, v6: bool, mac: EthernetAddress) {
        if mac == UNRESOLVED_MAC || !mac.is_unicast() {
            return;
        }
        let neighbour_mac = if v6 {
            match self.uplink.gateway6.as_mut() {
                Some(gateway6) => &mut gateway6.mac,
                None => return,
            }
        } else {
            &mut self.uplink.gateway.mac
        };
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
        }
        self.flush_pending(v6, mac);
    }

    fn flush_pending(&mut self, v6: bool, mac: EthernetAddress) {
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
    fn expire_pending(&mut self, now: Millis) {
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
    fn ask_gateways(&mut self, now: Millis) {
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

    /// Takes a frame received on a client's vif.
    pub fn handle_client_frame(&mut self, id: ClientId, frame: &[u8], now: Instant) {
        let Some(index) = self.clients.iter().position(|c| c.id == id) else {
            self.drop(DropReason::UnknownClient);
            return;
        };
        self.clock = now.total_millis();
        self.client_frame(index, frame, now.total_millis());
    }

    fn client_frame(&mut self, index: usize, frame: &[u8], now: Millis) {
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
            ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => self.client_ip(index, payload, now),
            _ => self.drop(DropReason::UnsupportedEthertype),
        }
    }

    fn client_ip(&mut self, index: usize, packet: &[u8], now: Millis) {
        let meta = match parse_ip(packet, true) {
            Ok(meta) => meta,
            Err(reason) => return self.drop(reason),
        };
        let packet = packet.get(..meta.total_len).unwrap_or(packet);
        if meta.icmp == IcmpKind::Ndp {
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
                    self.forward_from_client(index, &datagram, &whole, now)
                }
                Err(reason) => self.drop(reason),
            }
            return;
        }
        self.forward_from_client(index, packet, &meta, now);
    }

    fn client_ndp(&mut self, index: usize, packet: &[u8], meta: &IpMeta) {
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
    fn forward_from_client(&mut self, index: usize, packet: &[u8], meta: &IpMeta, now: Millis) {
        if self.is_ours(meta.dst) {
            return self.answer_firewall(Out::Client(index), packet, meta);
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
        let key = meta.key();
        let (id, direction) = match self.nat.lookup(&key, now) {
            Some(found) => found,
            None => match self.new_flow(index, packet, meta, now) {
                Some(id) => (id, Direction::Original),
                None => return,
            },
        };
        self.nat.touch(id, direction, meta.tcp, now);
        let Some(entry) = self.nat.get(id).copied() else {
            return;
        };
        let (out, translate) = match direction {
            Direction::Original if entry.is_translated() => (Out::Uplink, true),
            Direction::Original => {
                match entry.peer_client.and_then(|ip| self.by_address.get(&ip)) {
                    Some(peer) => (Out::Client(*peer), false),
                    None => return self.drop(DropReason::NoFlow),
                }
            }
            // A reply from the peer of a client-to-client flow.
            Direction::Reply if !entry.is_translated() => match self.by_address.get(&entry.owner) {
                Some(owner) => (Out::Client(*owner), false),
                None => return self.drop(DropReason::NoFlow),
            },
            Direction::Reply => return self.drop(DropReason::NoFlow),
        };
        let v6 = meta.v6;
        self.forward((Out::Client(index), out), meta, packet, now, |ip| {
            decrement_ttl(ip, v6);
            if translate {
                rewrite(ip, meta, true, entry.reply.dst, entry.reply.dst_port);
            }
        });
    }

    /// Queues `packet` for `out` after `edit` (TTL, NAT) ran on it, with a
    /// single copy straight into the outgoing frame.
    fn forward(
        &mut self,
        (back, out): (Out, Out),
        meta: &IpMeta,
        packet: &[u8],
        now: Millis,
        edit: impl FnOnce(&mut [u8]),
    ) {
        let v6 = meta.v6;
        if packet.len() > self.caps.mtu {
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
        let mut frame = self.buffer();
        push_eth(
            &mut frame,
            dst_mac,
            src_mac,
            if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 },
        );
        frame.extend_from_slice(packet);
        if let Some(ip) = frame.get_mut(ETH_LEN..) {
            edit(ip);
        }
        self.emit(out, v6, frame);
    }

    /// Decides a new flow from client `index` and tracks it if accepted.
    /// A flow the rules deny is answered like Linux's `REJECT
    /// --reject-with icmp-admin-prohibited` (every Qubes rule with
    /// `action=drop`, and the policy, becomes such a REJECT in
    /// qubes-core-agent-linux's `prepare_rules`).
    fn new_flow(
        &mut self,
        index: usize,
        packet: &[u8],
        meta: &IpMeta,
        now: Millis,
    ) -> Option<crate::nat::EntryId> {
        match meta.icmp {
            IcmpKind::NotIcmp | IcmpKind::EchoRequest => {}
            IcmpKind::Error => {
                self.related_from_client(index, packet, meta, now);
                return None;
            }
            IcmpKind::EchoReply => {
                self.drop(DropReason::NoFlow);
                return None;
            }
            IcmpKind::Ndp | IcmpKind::Other => {
                self.drop(DropReason::UnsupportedProtocol);
                return None;
            }
        }
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
        let rules = self.rules.get(&meta.src).unwrap_or(&self.no_rules);
        let ctx = MatchContext {
            dns_servers: &self.dns_servers,
            now_unix: self.now_unix(now),
            names: &self.resolver,
        };
        let denied = match rules.decide(&flow, &ctx) {
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
        if self.by_address.contains_key(&meta.dst) {
            // Client-to-client isolation: Linux's `qubes` table drops every
            // new forwarded packet whose output is a client vif (chain
            // `forward`: `oifgroup 2 counter drop`), whatever the sender's
            // rules say. Its `qubes-firewall` forward chain has the same
            // priority and was registered later, so netfilter runs it first:
            // a flow the rules deny is rejected (above), one they accept is
            // dropped here, silently.
            self.drop(DropReason::ClientToClient);
            return None;
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

    /// A packet to one of the firewall's own addresses: answer pings, drop
    /// the rest.
    fn answer_firewall(&mut self, out: Out, packet: &[u8], meta: &IpMeta) {
        if meta.icmp != IcmpKind::EchoRequest || meta.fragment {
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
    fn icmp_error(
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

    /// Takes a frame received on the uplink.
    pub fn handle_uplink_frame(&mut self, frame: &[u8], now: Instant) {
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
            ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => self.uplink_ip(payload, now),
            _ => self.drop(DropReason::UnsupportedEthertype),
        }
    }

    fn uplink_ip(&mut self, packet: &[u8], now: Millis) {
        let meta = match parse_ip(packet, true) {
            Ok(meta) => meta,
            Err(reason) => return self.drop(reason),
        };
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
        if self.is_ours(meta.src) || self.by_address.contains_key(&meta.src) {
            return self.drop(DropReason::SpoofedSource);
        }
        if meta.fragment {
            match reassemble(&mut self.uplink_reassembler, packet, &meta, now) {
                Ok(None) => {}
                Ok(Some((datagram, whole))) => self.forward_from_uplink(&datagram, &whole, now),
                Err(reason) => self.drop(reason),
            }
            return;
        }
        self.forward_from_uplink(packet, &meta, now);
    }

    fn uplink_ndp(&mut self, packet: &[u8], meta: &IpMeta) {
        let (IpAddr::V6(src), Some(ours), Some(ndp)) = (
            meta.src,
            self.uplink.ip6,
            packet.get(meta.header_len..).and_then(Ndp::parse),
        ) else {
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

    fn forward_from_uplink(&mut self, packet: &[u8], meta: &IpMeta, now: Millis) {
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
            IcmpKind::EchoRequest => return self.answer_firewall(Out::Uplink, packet, meta),
            IcmpKind::Error => return self.related_from_uplink(packet, meta, now),
            IcmpKind::Other => return self.drop(DropReason::UnsupportedProtocol),
            _ => {}
        }
        let Some((id, Direction::Reply)) = self.nat.lookup(&meta.key(), now) else {
            return self.drop(DropReason::NoFlow);
        };
        let Some(entry) = self.nat.get(id).copied() else {
            return;
        };
        let Some(&client) = self.by_address.get(&entry.owner) else {
            return self.drop(DropReason::NoFlow);
        };
        if meta.ttl <= 1 {
            self.icmp_error(Out::Uplink, packet, meta, IcmpError::TimeExceeded, now);
            return self.drop(DropReason::TtlExceeded);
        }
        self.nat.touch(id, Direction::Reply, meta.tcp, now);
        let v6 = meta.v6;
        self.forward(
            (Out::Uplink, Out::Client(client)),
            meta,
            packet,
            now,
            |ip| {
                decrement_ttl(ip, v6);
                rewrite(ip, meta, false, entry.original.src, entry.original.src_port);
            },
        );
    }

    /// An ICMP error from outside about one of our translated flows: send
    /// it to the client with the outer destination and the quoted packet's
    /// source translated back.
    fn related_from_uplink(&mut self, packet: &[u8], meta: &IpMeta, now: Millis) {
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

    /// An ICMP error a client sends about a flow it is part of (say, port
    /// unreachable for a reply it got): to the flow's other end, with the
    /// quoted packet and the outer source translated for flows to the
    /// outside, like Linux conntrack's RELATED handling.
    fn related_from_client(&mut self, index: usize, packet: &[u8], meta: &IpMeta, now: Millis) {
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
        let (out, translate) = match direction {
            Direction::Original if entry.owner == meta.src && entry.is_translated() => {
                (Out::Uplink, true)
            }
            Direction::Original if entry.owner == meta.src => {
                match entry.peer_client.and_then(|ip| self.by_address.get(&ip)) {
                    Some(peer) => (Out::Client(*peer), false),
                    None => return self.drop(DropReason::IcmpErrorUnmatched),
                }
            }
            Direction::Reply if !entry.is_translated() && entry.peer_client == Some(meta.src) => {
                match self.by_address.get(&entry.owner) {
                    Some(owner) => (Out::Client(*owner), false),
                    None => return self.drop(DropReason::IcmpErrorUnmatched),
                }
            }
            _ => return self.drop(DropReason::IcmpErrorUnmatched),
        };
        let _ = index;
        let mut owned = self.buffer();
        owned.extend_from_slice(packet);
        decrement_ttl(&mut owned, meta.v6);
        if translate {
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
        }
        self.send_ip(out, meta.v6, &owned);
        self.recycle(owned);
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

    /// When the router next needs [`Router::poll_timers`] (`now` when
    /// frames are waiting to be transmitted).
    pub fn poll_at(&self, now: Instant) -> Option<Instant> {
        if self.has_output() {
            return Some(now);
        }
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
        for candidate in candidates.into_iter().flatten() {
            at = Some(at.map_or(candidate, |a: Millis| a.min(candidate)));
        }
        at.map(Instant::from_millis)
    }

    /// Whether any frame waits to be transmitted.
    pub fn has_output(&self) -> bool {
        !self.uplink.queue.is_empty() || self.clients.iter().any(|c| !c.queue.is_empty())
    }

    /// Takes the next frame for the uplink.
    pub fn pop_uplink_frame(&mut self) -> Option<Vec<u8>> {
        let frame = self.uplink.queue.pop()?;
        self.queued = self.queued.saturating_sub(frame.len());
        Some(frame)
    }

    /// Takes the next frame for a client.
    pub fn pop_client_frame(&mut self, id: ClientId) -> Option<Vec<u8>> {
        let frame = self.clients.iter_mut().find(|c| c.id == id)?.queue.pop()?;
        self.queued = self.queued.saturating_sub(frame.len());
        Some(frame)
    }

    /// Receives every frame the uplink NIC has (at most 256 per call), then
    /// transmits what is queued for it.
    pub fn pump_uplink<D: Device>(&mut self, device: &mut D, now: Instant) {
        for _ in 0..256 {
            let Some((rx, _tx)) = device.receive(now) else {
                break;
            };
            rx.consume(|frame| self.handle_uplink_frame(frame, now));
        }
        self.transmit_uplink(device, now);
    }

    /// Transmits what is queued for the uplink, as far as the NIC takes it.
    pub fn transmit_uplink<D: Device>(&mut self, device: &mut D, now: Instant) {
        while let Some(frame) = self.uplink.queue.pop() {
            match device.transmit(now) {
                Some(tx) => {
                    tx.consume(frame.len(), |buffer| buffer.copy_from_slice(&frame));
                    self.queued = self.queued.saturating_sub(frame.len());
                    self.recycle(frame);
                }
                None => {
                    self.uplink.queue.unpop(frame);
                    break;
                }
            }
        }
    }

    /// Receives every frame a client's NIC has (at most 256 per call), then
    /// transmits what is queued for it.
    pub fn pump_client<D: Device>(&mut self, id: ClientId, device: &mut D, now: Instant) {
        for _ in 0..256 {
            let Some((rx, _tx)) = device.receive(now) else {
                break;
            };
            rx.consume(|frame| self.handle_client_frame(id, frame, now));
        }
        self.transmit_client(id, device, now);
    }

    /// Transmits what is queued for a client, as far as its NIC takes it.
    pub fn transmit_client<D: Device>(&mut self, id: ClientId, device: &mut D, now: Instant) {
        let Some(index) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        while let Some(frame) = self.clients.get_mut(index).and_then(|c| c.queue.pop()) {
            match device.transmit(now) {
                Some(tx) => {
                    tx.consume(frame.len(), |buffer| buffer.copy_from_slice(&frame));
                    self.queued = self.queued.saturating_sub(frame.len());
                    self.recycle(frame);
                }
                None => {
                    if let Some(client) = self.clients.get_mut(index) {
                        client.queue.unpop(frame);
                    }
                    break;
                }
            }
        }
    }
}

fn rewrite_address_only(packet: &mut [u8], meta: &IpMeta, source: bool, address: IpAddr) {
    let (at, len) = match (meta.v6, source) {
        (false, true) => (12, 4),
        (false, false) => (16, 4),
        (true, true) => (8, 16),
        (true, false) => (24, 16),
    };
    let mut new = [0u8; 16];
    match address {
        IpAddr::V4(a) => new[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => new.copy_from_slice(&a.octets()),
    }
    let mut old = [0u8; 16];
    let (Some(new), Some(old)) = (new.get(..len), old.get_mut(..len)) else {
        return;
    };
    if let Some(current) = packet.get(at..at + len) {
        old.copy_from_slice(current);
    }
    if !meta.v6
        && let Some(sum) = be16(packet, 10)
    {
        let sum = checksum::adjust(sum, old, new);
        if let Some(field) = packet.get_mut(10..12) {
            field.copy_from_slice(&sum.to_be_bytes());
        }
    }
    if let Some(field) = packet.get_mut(at..at + len) {
        field.copy_from_slice(new);
    }
}

/// Recomputes the checksum of the ICMP message at `at` of an IP packet
/// (ICMPv6 includes the pseudo header of `src` → `dst`).
fn refill_icmp_checksum(packet: &mut [u8], at: usize, src: IpAddr, dst: IpAddr) {
    if let Some(field) = packet.get_mut(at + 2..at + 4) {
        field.copy_from_slice(&[0, 0]);
    }
    let body = packet.get(at..).unwrap_or(&[]);
    let sum = match (src, dst) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => checksum::finish(checksum::add(
            checksum::pseudo_v6(&src, &dst, PROTO_ICMPV6, body.len() as u32),
            body,
        )),
        _ => checksum::finish(checksum::add(0, body)),
    };
    if let Some(field) = packet.get_mut(at + 2..at + 4) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
}

/// The destination MAC of a frame waiting for the gateway's MAC: never
/// sent (all zeroes is no station's address).
const UNRESOLVED_MAC: EthernetAddress = EthernetAddress([0; 6]);

/// Whether an uplink frame is an IP packet for the gateway at `mac4` (IPv4)
/// or `mac6` (IPv6, neighbour discovery excluded): `Some(v6)`, else `None`
/// (ARP, NDP, anything to another MAC).
fn gateway_frame_kind(
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

fn push_eth(frame: &mut Vec<u8>, dst: EthernetAddress, src: EthernetAddress, ethertype: u16) {
    frame.extend_from_slice(&dst.0);
    frame.extend_from_slice(&src.0);
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

fn is_broadcast_or_multicast(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(a) => a.is_broadcast() || a.is_multicast() || a.is_unspecified(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unspecified(),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes packets it built itself.
mod tests {
    use super::*;

    #[test]
    fn incremental_checksum_matches_a_full_recompute() {
        let mut data: Vec<u8> = (0..64u32)
            .map(|i| (i.wrapping_mul(37) ^ 0x5a) as u8)
            .collect();
        for round in 0..200u32 {
            let before = checksum::finish(checksum::add(0, &data));
            let at = ((round as usize * 6) % 60) & !1;
            let old = [data[at], data[at + 1], data[at + 2], data[at + 3]];
            let new = (round.wrapping_mul(0x9e37_79b9)).to_be_bytes();
            data[at..at + 4].copy_from_slice(&new);
            let adjusted = checksum::adjust(before, &old, &new);
            let recomputed = checksum::finish(checksum::add(0, &data));
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(
                adjusted == recomputed
                    || (adjusted | recomputed) == 0xffff && (adjusted & recomputed) == 0,
                "round {round}: {adjusted:#06x} vs {recomputed:#06x}"
            );
        }
    }

    #[test]
    fn parse_ip_refuses_malformed_packets() {
        let cases: &[&[u8]] = &[
            &[],
            &[0x45],
            &[0x44; 20], // IHL 4
            &[0x46; 24], // options but total length nonsense
            &[0x60; 39], // short IPv6 header
            &[0x70; 40], // version 7
        ];
        for case in cases {
            assert!(parse_ip(case, true).is_err(), "{case:?}");
        }
        // A valid header whose total length runs past the buffer.
        let mut header = ipv4_header(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            PROTO_UDP,
            100,
        );
        assert_eq!(parse_ip(&header, true).err(), Some(DropReason::Malformed));
        // A bad header checksum.
        header[2..4].copy_from_slice(&28u16.to_be_bytes());
        let mut packet = header.to_vec();
        packet.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        assert_eq!(parse_ip(&packet, true).err(), Some(DropReason::Malformed));
        // Fixed: parses, ports read.
        packet[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum::finish(checksum::add(0, &packet[..20]));
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
        let meta = parse_ip(&packet, true).unwrap();
        assert_eq!(
            (meta.src_port, meta.dst_port, meta.protocol),
            (1, 2, PROTO_UDP)
        );
        // Every truncation of it fails cleanly or parses; never panics.
        for len in 0..packet.len() {
            let _ = parse_ip(&packet[..len], true);
            let _ = parse_ip(&packet[..len], false);
        }
    }

    #[test]
    fn rewrite_keeps_tcp_checksum_valid() {
        let src = Ipv4Addr::new(10, 137, 0, 10);
        let dst = Ipv4Addr::new(93, 184, 216, 34);
        let mut segment = alloc::vec![0u8; 24];
        segment[0..2].copy_from_slice(&40000u16.to_be_bytes());
        segment[2..4].copy_from_slice(&443u16.to_be_bytes());
        segment[12] = 0x50;
        segment[13] = 0x02;
        segment[20..24].copy_from_slice(b"data");
        let pseudo = checksum::pseudo_v4(&src, &dst, PROTO_TCP, 24);
        let sum = checksum::finish(checksum::add(pseudo, &segment));
        segment[16..18].copy_from_slice(&sum.to_be_bytes());
        let mut packet = ipv4_header(src, dst, PROTO_TCP, 24).to_vec();
        packet.extend_from_slice(&segment);
        let meta = parse_ip(&packet, true).unwrap();
        let nat = Ipv4Addr::new(10, 137, 0, 2);
        rewrite(&mut packet, &meta, true, IpAddr::V4(nat), 51000);
        decrement_ttl(&mut packet, false);
        assert_eq!(
            checksum::fold(checksum::add(0, &packet[..20])),
            0xffff,
            "IPv4 header checksum"
        );
        let pseudo = checksum::pseudo_v4(&nat, &dst, PROTO_TCP, 24);
        assert_eq!(
            checksum::fold(checksum::add(pseudo, &packet[20..])),
            0xffff,
            "TCP checksum"
        );
        assert_eq!(&packet[20..22], &51000u16.to_be_bytes());
        assert_eq!(packet[8], 63);
    }
}
