//! Probe packets for the differential test against Qubes' Linux
//! sys-firewall (`tests/linux_differential.rs`): random Ethernet frames
//! from client1 (TCP with any flags, UDP, every ICMP and ICMPv6 type, other
//! IP protocols, IPv4 options, IPv4 fragments, IPv6 extension headers and
//! fragments, to sys-net's side or to client2), each carrying a marker
//! (`QDIF` + the probe's number) in its payload so that a capture at the
//! destination can tell which probes arrived, and a key in its IP header
//! (IPv4 identification, IPv6 flow label) so that an ICMP error sent back
//! to the client can be matched to the probe it is about.
//!
//! Captured frames are read from other machines: every parser here reads
//! through `get`, never panics and ignores what it does not understand.
#![deny(clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The marker's first four bytes; the next four are the probe's number.
pub const MARKER: [u8; 4] = *b"QDIF";
/// The MAC of the firewall's client-side interfaces, as in Qubes.
pub const GATEWAY_MAC: [u8; 6] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff];
/// client1's MAC (domid 3) and addresses, as in the box.
pub const CLIENT1_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x03];
/// client1's IPv4 address.
pub const CLIENT1: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 20);
/// client2's IPv4 address.
pub const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 21);
/// The firewall's IPv4 address (the clients' gateway).
pub const FIREWALL: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 6);

/// Qubes' IPv6 address of a qube (`fd09:24ef:4179::a89:<last 16 bits>`).
pub fn qubes_ip6(ip: Ipv4Addr) -> Ipv6Addr {
    crate::netbox::qubes_ip6(ip)
}

/// A small deterministic generator (SplitMix64): a run is replayed from
/// its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One element of a non-empty slice (the first when empty is impossible).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        items.get(self.below(items.len() as u64) as usize).copied()
    }
}

/// Where a probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// Out of the uplink, to sys-net.
    Net,
    /// To the other client.
    Client2,
    /// To the firewall's own address.
    Firewall,
}

/// One probe: its frames (several for fragments) and how to recognise it.
#[derive(Clone, Debug)]
pub struct Probe {
    /// Its number (in the marker).
    pub id: u32,
    /// What it is, for the report (`tcp SYN`, `icmp type 13`, …) and the
    /// class of a disagreement.
    pub label: String,
    /// Its destination address.
    pub dst: IpAddr,
    /// Its destination port (TCP/UDP), for the report.
    pub port: Option<u16>,
    /// Where it should arrive if forwarded.
    pub sink: Sink,
    /// The key of its IP header: IPv4 identification or IPv6 flow label.
    pub key: u32,
    /// How many markers it carries in all its frames.
    pub markers: usize,
    /// Its transport protocol number (6, 17, 1, 58, …).
    pub proto: u8,
    /// Its ICMP/ICMPv6 type.
    pub icmp_type: Option<u8>,
    /// Whether it is IPv6 with an extension header before the transport
    /// header (other than a Fragment header).
    pub ipv6_ext: bool,
    /// The frames to send, in order.
    pub frames: Vec<Vec<u8>>,
}

/// IPv4 destinations of probes and rules: hosts beyond sys-net (documentation
/// ranges), Qubes' DNS servers, client2 and the firewall itself.
pub const DST4: [Ipv4Addr; 9] = [
    Ipv4Addr::new(192, 0, 2, 80),
    Ipv4Addr::new(192, 0, 2, 1),
    Ipv4Addr::new(192, 0, 2, 200),
    Ipv4Addr::new(198, 51, 100, 7),
    Ipv4Addr::new(198, 51, 100, 130),
    Ipv4Addr::new(203, 0, 113, 5),
    Ipv4Addr::new(10, 139, 1, 1),
    Ipv4Addr::new(10, 139, 1, 2),
    CLIENT2,
];
/// IPv6 destinations of probes and rules.
pub const DST6: [Ipv6Addr; 5] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x1),
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x7),
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x5),
    Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 21),
];
/// Ports of probes and rules.
pub const PORTS: [u16; 10] = [22, 53, 80, 443, 1, 7, 1024, 8080, 53000, 65535];

/// A protocol number of the transport header.
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const SCTP: u8 = 132;

/// CRC-32C (Castagnoli), SCTP's checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The internet checksum of `data`, starting from `sum`.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        if let [a, b] = pair {
            sum = sum.wrapping_add(u32::from(u16::from_be_bytes([*a, *b])));
        }
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([*last, 0])));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut bytes = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&[0, proto]);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (s, d) => {
            let six = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            bytes.extend_from_slice(&six(s));
            bytes.extend_from_slice(&six(d));
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, proto]);
        }
    }
    u32::from(!checksum(0, &bytes))
}

/// Writes a 16-bit value at `at` (no-op when out of range).
fn put16(buf: &mut [u8], at: usize, value: u16) {
    if let Some(slot) = buf.get_mut(at..at + 2) {
        slot.copy_from_slice(&value.to_be_bytes());
    }
}

/// The transport segment of a probe, its checksum filled in.
#[derive(Clone, Debug)]
struct Segment {
    proto: u8,
    bytes: Vec<u8>,
}

fn finish_checksum(segment: &mut Segment, src: IpAddr, dst: IpAddr) {
    let at = match segment.proto {
        TCP => 16,
        UDP => 6,
        // GRE, ESP, SCTP: Linux verifies no ones'-complement sum
        47 | 50 | SCTP => return,
        // any other protocol: Linux rejects it only if its payload sums
        // as a TCP-style checksum would (nf_reject_verify_csum), so make
        // it sum (a field at offset 2 of the 8-byte header)
        _ => 2,
    };
    put16(&mut segment.bytes, at, 0);
    let start = if segment.proto == ICMP {
        0
    } else {
        pseudo_sum(src, dst, segment.proto, segment.bytes.len())
    };
    let mut sum = checksum(start, &segment.bytes);
    if segment.proto == UDP && sum == 0 {
        sum = 0xffff;
    }
    put16(&mut segment.bytes, at, sum);
}

fn marker(id: u32, count: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.extend_from_slice(&MARKER);
        out.extend_from_slice(&id.to_be_bytes());
    }
    out
}

fn ethernet(ethertype: u16, packet: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + packet.len());
    frame.extend_from_slice(&GATEWAY_MAC);
    frame.extend_from_slice(&CLIENT1_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(packet);
    frame
}

/// An IPv4 header (with `options`, padded to 4 bytes) and `payload`.
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    flags_offset: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = 5 + opts.len() / 4;
    let total = ihl * 4 + payload.len();
    let mut header = vec![(0x40 | ihl) as u8, 0];
    header.extend_from_slice(&(total as u16).to_be_bytes());
    header.extend_from_slice(&id.to_be_bytes());
    header.extend_from_slice(&flags_offset.to_be_bytes());
    header.extend_from_slice(&[64, proto, 0, 0]);
    header.extend_from_slice(&src.octets());
    header.extend_from_slice(&dst.octets());
    header.extend_from_slice(&opts);
    let sum = checksum(0, &header);
    put16(&mut header, 10, sum);
    header.extend_from_slice(payload);
    header
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, flow: u32, next: u8, payload: &[u8]) -> Vec<u8> {
    let first = (6u32 << 28) | (flow & 0xf_ffff);
    let mut packet = first.to_be_bytes().to_vec();
    packet.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    packet.extend_from_slice(&[next, 64]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

/// The kinds of transport a probe carries.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp(u8),
    Udp,
    Icmp(u8, u8),
    Other(u8),
}

/// TCP flag combinations: SYN most often.
const TCP_FLAGS: [(u8, &str); 8] = [
    (0x02, "SYN"),
    (0x02, "SYN"),
    (0x02, "SYN"),
    (0x02, "SYN"),
    (0x10, "ACK"),
    (0x12, "SYN-ACK"),
    (0x04, "RST"),
    (0x11, "FIN-ACK"),
];

/// Another IP protocol: GRE, ESP, SCTP, experimental.
const OTHER_PROTOS: [u8; 4] = [47, 50, 132, 253];

fn transport_label(t: Transport, v6: bool) -> String {
    match t {
        Transport::Tcp(flags) => {
            let name = TCP_FLAGS
                .iter()
                .find(|(f, _)| *f == flags)
                .map_or("?", |(_, n)| *n);
            format!("tcp {name}")
        }
        Transport::Udp => "udp".into(),
        Transport::Icmp(ty, code) if v6 => format!("icmpv6 type {ty} code {code}"),
        Transport::Icmp(ty, code) => format!("icmp type {ty} code {code}"),
        Transport::Other(p) => format!("ip protocol {p}"),
    }
}

/// ICMPv4 error types (they carry the header of another packet).
fn icmp4_is_error(ty: u8) -> bool {
    matches!(ty, 3 | 4 | 5 | 11 | 12)
}

fn icmp6_is_error(ty: u8) -> bool {
    ty < 128
}

/// Builds the transport segment. `inner` is the IP packet an ICMP error
/// quotes.
fn segment(
    t: Transport,
    id: u32,
    sport: u16,
    dport: u16,
    markers: usize,
    inner: &[u8],
    v6: bool,
) -> Segment {
    let payload = marker(id, markers);
    match t {
        Transport::Tcp(flags) => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&id.wrapping_mul(2_654_435_761).to_be_bytes());
            let ack: u32 = if flags & 0x10 != 0 { 1 } else { 0 };
            b.extend_from_slice(&ack.to_be_bytes());
            b.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
            b.extend_from_slice(&payload);
            Segment {
                proto: TCP,
                bytes: b,
            }
        }
        Transport::Udp => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&payload);
            Segment {
                proto: UDP,
                bytes: b,
            }
        }
        Transport::Icmp(ty, code) => {
            let mut b = vec![ty, code, 0, 0];
            let error = if v6 {
                icmp6_is_error(ty)
            } else {
                icmp4_is_error(ty)
            };
            if error {
                b.extend_from_slice(&[0, 0, 0, 0]);
                b.extend_from_slice(inner);
            } else {
                // identifier and sequence (echo, timestamp, mask, info…)
                b.extend_from_slice(&(id as u16).to_be_bytes());
                b.extend_from_slice(&((id >> 16) as u16).to_be_bytes());
            }
            b.extend_from_slice(&payload);
            Segment {
                proto: if v6 { ICMPV6 } else { ICMP },
                bytes: b,
            }
        }
        Transport::Other(SCTP) => {
            // a well-formed INIT (conntrack checks it), the marker in an
            // optional parameter (type 0x8fff: skip if unknown)
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // tag 0, checksum
            let chunk_len = 20 + 4 + payload.len();
            b.extend_from_slice(&[1, 0]);
            b.extend_from_slice(&(chunk_len as u16).to_be_bytes());
            b.extend_from_slice(&(id | 1).to_be_bytes()); // initiate tag
            b.extend_from_slice(&[0, 1, 0, 0, 0, 1, 0, 1]); // a_rwnd, streams
            b.extend_from_slice(&id.to_be_bytes()); // initial TSN
            b.extend_from_slice(&[0x8f, 0xff]);
            b.extend_from_slice(&((4 + payload.len()) as u16).to_be_bytes());
            b.extend_from_slice(&payload);
            let crc = crc32c(&b);
            if let Some(slot) = b.get_mut(8..12) {
                slot.copy_from_slice(&crc.to_le_bytes());
            }
            Segment {
                proto: SCTP,
                bytes: b,
            }
        }
        Transport::Other(p) => {
            let mut b = vec![0u8; 8];
            b.extend_from_slice(&payload);
            Segment { proto: p, bytes: b }
        }
    }
}

/// IPv4 options a probe may carry: NOPs, Record Route, Timestamp, Router
/// Alert.
const IPV4_OPTIONS: [(&[u8], &str); 4] = [
    (&[1, 1, 1, 1], "nop"),
    (&[7, 7, 4, 0, 0, 0, 0, 1], "record-route"),
    (&[68, 8, 5, 0, 0, 0, 0, 0], "timestamp"),
    (&[148, 4, 0, 0], "router-alert"),
];

/// IPv6 extension headers a probe may carry before its transport header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ext {
    HopByHop,
    DestOpts,
    Routing,
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::DestOpts => 60,
            Ext::Routing => 43,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Ext::HopByHop => "hop-by-hop",
            Ext::DestOpts => "dest-opts",
            Ext::Routing => "routing",
        }
    }
}

/// Random probe number `id` from client1.
pub fn random_probe(rng: &mut Rng, id: u32) -> Probe {
    let v6 = rng.chance(35);
    let dst: IpAddr = if v6 {
        IpAddr::V6(rng.pick(&DST6).unwrap_or(Ipv6Addr::LOCALHOST))
    } else if rng.chance(4) {
        IpAddr::V4(FIREWALL)
    } else {
        IpAddr::V4(rng.pick(&DST4).unwrap_or(Ipv4Addr::LOCALHOST))
    };
    let sink = match dst {
        IpAddr::V4(a) if a == CLIENT2 => Sink::Client2,
        IpAddr::V4(a) if a == FIREWALL => Sink::Firewall,
        IpAddr::V6(a) if a == qubes_ip6(CLIENT2) => Sink::Client2,
        _ => Sink::Net,
    };
    let transport = match rng.below(10) {
        0..=2 => Transport::Tcp(rng.pick(&TCP_FLAGS).map_or(2, |f| f.0)),
        3..=5 => Transport::Udp,
        6..=8 => {
            // every type over a run: the known ones often, any byte sometimes
            let known4: [u8; 15] = [0, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18];
            let known6: [u8; 16] = [
                1, 2, 3, 4, 128, 129, 130, 131, 132, 133, 134, 135, 136, 137, 143, 200,
            ];
            let ty = if rng.chance(30) {
                rng.below(256) as u8
            } else if v6 {
                rng.pick(&known6).unwrap_or(128)
            } else {
                rng.pick(&known4).unwrap_or(8)
            };
            let code = if rng.chance(15) { 1 } else { 0 };
            Transport::Icmp(ty, code)
        }
        _ => Transport::Other(rng.pick(&OTHER_PROTOS).unwrap_or(47)),
    };
    let port = match transport {
        Transport::Tcp(_) | Transport::Udp => Some(if rng.chance(20) {
            1 + rng.below(65535) as u16
        } else {
            rng.pick(&PORTS).unwrap_or(80)
        }),
        _ => None,
    };
    let sport = 20000 + (id % 40000) as u16;
    let mut label = transport_label(transport, v6);
    let fragmented = rng.chance(12);
    let markers = if fragmented { 6 } else { 1 };
    // an ICMP error quotes a packet "from" the destination to client1
    let inner = match dst {
        IpAddr::V4(d) => {
            let udp = [0x00, 0x35, 0x4e, 0x20, 0, 8, 0, 0];
            ipv4(d, CLIENT1, UDP, 1, 0, &[], &udp)
        }
        IpAddr::V6(d) => ipv6(
            d,
            qubes_ip6(CLIENT1),
            0,
            UDP,
            &[0x00, 0x35, 0x4e, 0x20, 0, 8, 0, 0],
        ),
    };
    let mut seg = segment(transport, id, sport, port.unwrap_or(0), markers, &inner, v6);
    let mut frames = Vec::new();
    let key;
    match dst {
        IpAddr::V4(d) => {
            key = id & 0xffff;
            finish_checksum(&mut seg, IpAddr::V4(CLIENT1), dst);
            let mut options: Vec<u8> = Vec::new();
            if rng.chance(15) {
                let (bytes, name) = rng.pick(&IPV4_OPTIONS).unwrap_or((&[1], "nop"));
                let mut bytes = bytes.to_vec();
                if name == "record-route" {
                    // pointer 4, room for one address
                    bytes = vec![7, 7, 4, 0, 0, 0, 0];
                }
                options.extend_from_slice(&bytes);
                label.push_str(&format!(" +ipv4-option {name}"));
            }
            if fragmented {
                label.push_str(" +fragments");
                // 8-byte aligned pieces, the first with the whole transport header
                let cut = if seg.bytes.len() > 32 { 24 } else { 16 };
                let reverse = rng.chance(30);
                let mut pieces = Vec::new();
                let mut offset = 0;
                while offset < seg.bytes.len() {
                    let end = (offset + cut).min(seg.bytes.len());
                    let more = end < seg.bytes.len();
                    let field = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
                    let piece = seg.bytes.get(offset..end).unwrap_or_default();
                    pieces.push(ethernet(
                        0x0800,
                        &ipv4(CLIENT1, d, seg.proto, key as u16, field, &options, piece),
                    ));
                    offset = end;
                }
                if reverse {
                    label.push_str(" reversed");
                    pieces.reverse();
                }
                frames = pieces;
            } else {
                frames.push(ethernet(
                    0x0800,
                    &ipv4(CLIENT1, d, seg.proto, key as u16, 0, &options, &seg.bytes),
                ));
            }
        }
        IpAddr::V6(d) => {
            key = id & 0xf_ffff;
            let src = qubes_ip6(CLIENT1);
            finish_checksum(&mut seg, IpAddr::V6(src), dst);
            let mut exts: Vec<Ext> = Vec::new();
            if rng.chance(35) {
                if rng.chance(35) {
                    exts.push(Ext::HopByHop);
                }
                for ext in [Ext::DestOpts, Ext::Routing, Ext::DestOpts] {
                    if rng.chance(40) && !exts.contains(&ext) {
                        exts.push(ext);
                    }
                }
                if exts.is_empty() {
                    exts.push(Ext::DestOpts);
                }
                let names: Vec<&str> = exts.iter().map(|e| e.name()).collect();
                label.push_str(&format!(" +ipv6-ext {}", names.join(",")));
            }
            // the chain before the transport (or fragment) header
            let build_chain = |last_next: u8| -> (u8, Vec<u8>) {
                let mut bytes = Vec::new();
                let first = exts.first().map_or(last_next, |e| e.number());
                for (i, ext) in exts.iter().enumerate() {
                    let next = exts.get(i + 1).map_or(last_next, |e| e.number());
                    match ext {
                        Ext::HopByHop | Ext::DestOpts => {
                            bytes.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                        }
                        Ext::Routing => {
                            // type 0, no segments left: ignored by routers
                            bytes.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
                        }
                    }
                }
                (first, bytes)
            };
            if fragmented {
                label.push_str(" +fragments");
                let (first, chain) = build_chain(44);
                let cut = 24;
                let mut offset = 0;
                let mut pieces = Vec::new();
                while offset < seg.bytes.len() {
                    let end = (offset + cut).min(seg.bytes.len());
                    let more = end < seg.bytes.len();
                    let mut payload = chain.clone();
                    let field = (offset as u16) | u16::from(more);
                    payload.extend_from_slice(&[seg.proto, 0]);
                    payload.extend_from_slice(&field.to_be_bytes());
                    payload.extend_from_slice(&(0x5100_0000 | id).to_be_bytes());
                    payload.extend_from_slice(seg.bytes.get(offset..end).unwrap_or_default());
                    pieces.push(ethernet(0x86dd, &ipv6(src, d, key, first, &payload)));
                    offset = end;
                }
                frames = pieces;
            } else {
                let (first, mut payload) = build_chain(seg.proto);
                payload.extend_from_slice(&seg.bytes);
                frames.push(ethernet(0x86dd, &ipv6(src, d, key, first, &payload)));
            }
        }
    }
    if sink == Sink::Client2 {
        label.push_str(" to client2");
    } else if sink == Sink::Firewall {
        label.push_str(" to the firewall");
    }
    let icmp_type = match transport {
        Transport::Icmp(ty, _) => Some(ty),
        _ => None,
    };
    let ipv6_ext = label.contains("+ipv6-ext");
    let proto = seg.proto;
    // the whole markers in the frames sent (a fragment boundary may cut one)
    let markers = frames
        .iter()
        .map(|f| markers_in(f, id))
        .sum::<usize>()
        .max(1);
    Probe {
        id,
        label,
        dst,
        port,
        sink,
        key,
        markers,
        proto,
        icmp_type,
        ipv6_ext,
        frames,
    }
}

/// An ICMP echo request from client1 to the firewall's own address
/// (identifier `ident`), answered by both firewalls: a barrier behind the
/// probes.
pub fn barrier(ident: u16) -> Vec<u8> {
    let mut seg = Segment {
        proto: ICMP,
        bytes: vec![8, 0, 0, 0],
    };
    seg.bytes.extend_from_slice(&ident.to_be_bytes());
    seg.bytes.extend_from_slice(&[0, 1]);
    finish_checksum(&mut seg, IpAddr::V4(CLIENT1), IpAddr::V4(FIREWALL));
    ethernet(
        0x0800,
        &ipv4(CLIENT1, FIREWALL, ICMP, ident, 0, &[], &seg.bytes),
    )
}

/// Whether `frame` is the echo reply to [`barrier`]`(ident)`.
pub fn is_barrier_reply(frame: &[u8], ident: u16) -> bool {
    let Some(ip) = frame.get(14..) else {
        return false;
    };
    if frame.get(12..14) != Some(&[0x08, 0x00][..]) || ip.get(9) != Some(&ICMP) {
        return false;
    }
    let ihl = usize::from(ip.first().copied().unwrap_or(0) & 0x0f) * 4;
    let icmp = ip.get(ihl..).unwrap_or_default();
    icmp.first() == Some(&0) && icmp.get(4..6) == Some(&ident.to_be_bytes()[..])
}

/// How many markers of probe `id` a frame holds.
pub fn markers_in(frame: &[u8], id: u32) -> usize {
    let mut needle = MARKER.to_vec();
    needle.extend_from_slice(&id.to_be_bytes());
    frame
        .windows(needle.len())
        .filter(|w| *w == needle.as_slice())
        .count()
}

/// Every probe number a frame holds markers of.
pub fn marker_ids(frame: &[u8]) -> Vec<u32> {
    let mut ids = Vec::new();
    for (i, w) in frame.windows(4).enumerate() {
        let found = frame
            .get(i + 4..i + 8)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .filter(|_| w == MARKER);
        if let Some(id) = found.map(u32::from_be_bytes)
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    ids
}

/// An ICMP or ICMPv6 error received by the client, about one of its
/// packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    /// Whether it is ICMPv6.
    pub v6: bool,
    /// Its type.
    pub ty: u8,
    /// Its code.
    pub code: u8,
    /// Who sent it.
    pub from: IpAddr,
    /// The quoted packet's destination.
    pub inner_dst: IpAddr,
    /// The quoted packet's key (IPv4 identification or IPv6 flow label).
    pub inner_key: u32,
}

fn v4_at(bytes: &[u8], at: usize) -> Option<Ipv4Addr> {
    let a: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(a))
}

fn v6_at(bytes: &[u8], at: usize) -> Option<Ipv6Addr> {
    let a: [u8; 16] = bytes.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(a))
}

/// Parses an ICMP/ICMPv6 error frame (`None` for anything else).
pub fn icmp_error(frame: &[u8]) -> Option<IcmpError> {
    let ethertype = frame.get(12..14)?;
    let ip = frame.get(14..)?;
    if ethertype == [0x08, 0x00] {
        if *ip.get(9)? != ICMP {
            return None;
        }
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        let icmp = ip.get(ihl..)?;
        let ty = *icmp.first()?;
        if !icmp4_is_error(ty) {
            return None;
        }
        let inner = icmp.get(8..)?;
        Some(IcmpError {
            v6: false,
            ty,
            code: *icmp.get(1)?,
            from: IpAddr::V4(v4_at(ip, 12)?),
            inner_dst: IpAddr::V4(v4_at(inner, 16)?),
            inner_key: u32::from(u16::from_be_bytes(inner.get(4..6)?.try_into().ok()?)),
        })
    } else if ethertype == [0x86, 0xdd] {
        if *ip.get(6)? != ICMPV6 {
            return None;
        }
        let icmp = ip.get(40..)?;
        let ty = *icmp.first()?;
        if !icmp6_is_error(ty) {
            return None;
        }
        let inner = icmp.get(8..)?;
        let first = u32::from_be_bytes(inner.get(0..4)?.try_into().ok()?);
        Some(IcmpError {
            v6: true,
            ty,
            code: *icmp.get(1)?,
            from: IpAddr::V6(v6_at(ip, 8)?),
            inner_dst: IpAddr::V6(v6_at(inner, 24)?),
            inner_key: first & 0xf_ffff,
        })
    } else {
        None
    }
}

/// What happened to one probe behind one firewall.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Markers that reached the destination (of [`Probe::markers`]).
    pub markers_arrived: usize,
    /// ICMP errors the client got about it from anyone but its
    /// destination: (ICMPv6?, type, code), sorted, duplicates removed.
    pub rejections: Vec<(bool, u8, u8)>,
}

/// How much of a probe arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Nothing.
    Dropped,
    /// Some of its fragments.
    Partly,
    /// All of it.
    Forwarded,
}

impl Outcome {
    /// How much of the probe arrived.
    pub fn arrival(&self, probe: &Probe) -> Arrival {
        if self.markers_arrived == 0 {
            Arrival::Dropped
        } else if self.arrived(probe) {
            Arrival::Forwarded
        } else {
            Arrival::Partly
        }
    }

    /// Whether two outcomes of `probe` agree: as much of it arrived, and
    /// the client got the same rejections.
    pub fn agrees(&self, other: &Outcome, probe: &Probe) -> bool {
        self.arrival(probe) == other.arrival(probe) && self.rejections == other.rejections
    }

    /// Whether the whole probe arrived.
    pub fn arrived(&self, probe: &Probe) -> bool {
        self.markers_arrived >= probe.markers
    }

    /// A short text for the report.
    pub fn describe(&self, probe: &Probe) -> String {
        let arrival = if self.markers_arrived == 0 {
            "dropped".to_string()
        } else if self.arrived(probe) {
            "forwarded".to_string()
        } else {
            format!(
                "partly forwarded ({}/{} pieces)",
                self.markers_arrived, probe.markers
            )
        };
        let rejections: Vec<String> = self
            .rejections
            .iter()
            .map(|(v6, t, c)| format!("{} {t}/{c}", if *v6 { "icmpv6" } else { "icmp" }))
            .collect();
        if rejections.is_empty() {
            arrival
        } else {
            format!("{arrival}, rejected with {}", rejections.join(" and "))
        }
    }
}

/// The outcome of `probe` from the frames captured at its destination and
/// at client1.
pub fn outcome(probe: &Probe, at_destination: &[Vec<u8>], at_client: &[Vec<u8>]) -> Outcome {
    let markers_arrived = at_destination
        .iter()
        .filter(|f| icmp_error(f).is_none())
        .map(|f| markers_in(f, probe.id))
        .sum();
    let mut rejections: Vec<(bool, u8, u8)> = at_client
        .iter()
        .filter_map(|f| icmp_error(f))
        .filter(|e| e.inner_dst == probe.dst && e.inner_key == probe.key && e.from != probe.dst)
        .map(|e| (e.v6, e.ty, e.code))
        .collect();
    rejections.sort_unstable();
    rejections.dedup();
    Outcome {
        markers_arrived,
        rejections,
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code on frames it built
mod tests {
    use super::*;

    #[test]
    fn probes_carry_their_marker_and_valid_checksums() {
        let mut rng = Rng::new(7);
        for id in 1..400 {
            let probe = random_probe(&mut rng, id);
            let found: usize = probe.frames.iter().map(|f| markers_in(f, id)).sum();
            assert_eq!(found, probe.markers, "{}", probe.label);
            assert!(found >= 1, "{}", probe.label);
            for frame in &probe.frames {
                assert_eq!(frame.get(0..6), Some(&GATEWAY_MAC[..]));
                if frame.get(12..14) == Some(&[8, 0][..]) {
                    let ihl = usize::from(frame[14] & 0xf) * 4;
                    assert_eq!(checksum(0, &frame[14..14 + ihl]), 0, "{}", probe.label);
                }
            }
        }
    }

    #[test]
    fn a_rejection_is_matched_to_its_probe_only() {
        let mut rng = Rng::new(1);
        let probe = loop {
            let p = random_probe(&mut rng, 42);
            if matches!(p.dst, IpAddr::V4(_)) && p.frames.len() == 1 {
                break p;
            }
        };
        // an ICMP admin-prohibited from the firewall quoting the probe
        let quoted = probe.frames[0][14..].to_vec();
        let mut icmp = vec![3, 13, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted);
        let error = ethernet(0x0800, &ipv4(FIREWALL, CLIENT1, ICMP, 9, 0, &[], &icmp));
        let got = outcome(&probe, &[], std::slice::from_ref(&error));
        assert_eq!(got.rejections, vec![(false, 3, 13)]);
        assert_eq!(got.markers_arrived, 0);
        let other = random_probe(&mut rng, 43);
        assert!(outcome(&other, &[], &[error]).rejections.is_empty());
        let arrived = outcome(&probe, &probe.frames, &[]);
        assert!(arrived.arrived(&probe));
        assert_eq!(marker_ids(&probe.frames[0]), vec![42]);
    }

    #[test]
    fn crc32c_matches_the_rfc_3720_vector() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn the_barrier_reply_is_recognised() {
        let request = barrier(0xb001);
        assert!(!is_barrier_reply(&request, 0xb001));
        let mut reply = request.clone();
        let ihl = usize::from(reply[14] & 0xf) * 4;
        reply[14 + ihl] = 0;
        assert!(is_barrier_reply(&reply, 0xb001));
        assert!(!is_barrier_reply(&reply, 0xb002));
    }
}
