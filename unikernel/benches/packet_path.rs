//! The packet path, measured: ns per packet for an established TCP flow
//! (both directions), for a new flow at 10 and at 1 000 rules, and a NAT
//! lookup at 100 000 entries (hashbrown with the seeded hasher, against a
//! BTreeMap of the same keys — the comparison behind nat.rs's choice).
//!
//! Run: `cargo bench -p unikernel --bench packet_path` (short measurement
//! times; the machine is shared). Times are the benchmark thread's CPU time
//! (`/proc/thread-self/schedstat`, falling back to wall time), so that other
//! jobs on a loaded machine do not inflate them.
#![allow(clippy::unwrap_used)] // reason: benchmark code
#![allow(missing_docs)] // reason: criterion macros generate undocumented items

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant as StdInstant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber,
};
use unikernel::arp::CLIENT_SIDE_MAC;
use unikernel::nat::{FlowKey, NatTable};
use unikernel::router::{Caps, ClientConfig, ClientId, NetworkConfig, Router};
use unikernel::rules::RuleSet;

const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 1);
const UPLINK_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x02]);
const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0x00, 0x00, 0x01]);
const CLIENT: ClientId = ClientId {
    domid: 5,
    device: 0,
};
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 10);
const CLIENT_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x0a]);
const REMOTE: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);

fn eth(
    dst: EthernetAddress,
    src: EthernetAddress,
    ethertype: EthernetProtocol,
    payload: &[u8],
) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype,
    };
    let mut frame = vec![0u8; repr.buffer_len() + payload.len()];
    let mut view = EthernetFrame::new_unchecked(&mut frame);
    repr.emit(&mut view);
    view.payload_mut().copy_from_slice(payload);
    frame
}

/// A full-size TCP segment (1460 bytes of payload) in an Ethernet frame.
fn tcp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, to_client: bool) -> Vec<u8> {
    let payload = vec![0x5a; 1460];
    let tcp = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control: TcpControl::None,
        seq_number: TcpSeqNumber(1),
        ack_number: Some(TcpSeqNumber(1)),
        window_len: 64000,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &payload,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut packet = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
    let mut view = Ipv4Packet::new_unchecked(&mut packet);
    ip.emit(&mut view, &ChecksumCapabilities::default());
    tcp.emit(
        &mut TcpPacket::new_unchecked(view.payload_mut()),
        &IpAddress::from(src),
        &IpAddress::from(dst),
        &ChecksumCapabilities::default(),
    );
    if to_client {
        eth(UPLINK_MAC, GATEWAY_MAC, EthernetProtocol::Ipv4, &packet)
    } else {
        eth(CLIENT_SIDE_MAC, CLIENT_MAC, EthernetProtocol::Ipv4, &packet)
    }
}

fn router(rules: RuleSet) -> Router {
    let config = NetworkConfig {
        uplink_mac: UPLINK_MAC,
        ip: OUR_IP,
        gateway: GATEWAY,
        primary_dns: Some(Ipv4Addr::new(10, 139, 1, 1)),
        secondary_dns: Some(Ipv4Addr::new(10, 139, 1, 2)),
        ip6: None,
        gateway6: None,
        seed: 0xbe4c,
    };
    let mut caps = Caps::for_memory(256 << 20);
    caps.nat_entries = 200_000;
    caps.nat_entries_per_client = 200_000;
    let mut router = Router::new(config, caps, Instant::from_millis(0));
    router
        .add_client(
            CLIENT,
            ClientConfig {
                ip: CLIENT_IP,
                ip6: None,
                mac: Some(CLIENT_MAC),
            },
        )
        .unwrap();
    router.set_rules(CLIENT_IP.into(), rules);
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: GATEWAY_MAC,
        source_protocol_addr: GATEWAY,
        target_hardware_addr: UPLINK_MAC,
        target_protocol_addr: OUR_IP,
    };
    let mut payload = vec![0u8; arp.buffer_len()];
    arp.emit(&mut ArpPacket::new_unchecked(&mut payload));
    router.handle_uplink_frame(
        &eth(UPLINK_MAC, GATEWAY_MAC, EthernetProtocol::Arp, &payload),
        Instant::from_millis(0),
    );
    router
}

/// `count` rules: all but the last drop one host each (`dst4=…/32
/// proto=tcp dstports=…`), a few general ones, then an accept.
fn rules(count: usize) -> RuleSet {
    let mut entries: Vec<(String, String)> = vec![("policy".into(), "drop".into())];
    for i in 0..count.saturating_sub(1) {
        let value = if i % 100 == 99 {
            format!("action=drop proto=udp dstports={}-{}", 1000 + i, 1000 + i)
        } else {
            format!(
                "action=drop dst4=172.{}.{}.{}/32 proto=tcp dstports=1-1024",
                16 + i / 65536,
                (i / 256) % 256,
                i % 256
            )
        };
        entries.push((format!("{i:04}"), value));
    }
    entries.push((
        format!("{:04}", count.saturating_sub(1)),
        "action=accept proto=tcp".into(),
    ));
    let set = RuleSet::parse(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    assert!(set.error().is_none());
    assert_eq!(set.rules().len(), count);
    set
}

/// `count` rules that are not for one host (`proto=tcp dstports=N-N`,
/// none matching port 443) then an accept: found through the port index.
fn port_rules(count: usize) -> RuleSet {
    let mut entries: Vec<(String, String)> = vec![("policy".into(), "drop".into())];
    for i in 0..count.saturating_sub(1) {
        entries.push((
            format!("{i:04}"),
            format!("action=drop proto=tcp dstports={}-{}", 2000 + i, 2000 + i),
        ));
    }
    entries.push((
        format!("{:04}", count.saturating_sub(1)),
        "action=accept proto=tcp".into(),
    ));
    RuleSet::parse(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// `count` network-prefix rules without ports (`dst4=172.x.y.0/24`): found
/// through the prefix index (one lookup per prefix length in use).
fn prefix_rules(count: usize) -> RuleSet {
    let mut entries: Vec<(String, String)> = vec![("policy".into(), "drop".into())];
    for i in 0..count.saturating_sub(1) {
        entries.push((
            format!("{i:04}"),
            format!("action=drop dst4=172.{}.{}.0/24", 16 + i / 256, i % 256),
        ));
    }
    entries.push((
        format!("{:04}", count.saturating_sub(1)),
        "action=accept proto=tcp".into(),
    ));
    RuleSet::parse(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// CPU time this thread has run, or `None` where schedstat is missing.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// Runs `work` `iters` times and returns the CPU time it took.
fn cpu_time(iters: u64, mut work: impl FnMut()) -> Duration {
    let (cpu, wall) = (thread_cpu(), StdInstant::now());
    for _ in 0..iters {
        work();
    }
    match (cpu, thread_cpu()) {
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => wall.elapsed(),
    }
}

fn established(c: &mut Criterion) {
    let mut group = c.benchmark_group("established flow");
    // Equal-sized samples of ~50 ms: CPU time from schedstat moves in
    // scheduler ticks, so no sample may be tiny.
    group.sampling_mode(SamplingMode::Flat);
    let mut router = router(RuleSet::accept_all());
    let outbound = tcp_frame(CLIENT_IP, REMOTE, 40000, 443, false);
    router.handle_client_frame(CLIENT, &outbound, Instant::from_millis(1));
    let sent = router.pop_uplink_frame().unwrap();
    let nat_port = TcpPacket::new_checked(
        Ipv4Packet::new_checked(&sent[14..])
            .unwrap()
            .payload()
            .to_vec(),
    )
    .unwrap()
    .src_port();
    let inbound = tcp_frame(REMOTE, OUR_IP, 443, nat_port, true);
    let now = Instant::from_millis(2);
    group.bench_function(
        "established TCP flow, client to uplink (1500-byte frame)",
        |b| {
            b.iter_custom(|iters| {
                cpu_time(iters, || {
                    router.handle_client_frame(CLIENT, black_box(&outbound), now);
                    let frame = router.pop_uplink_frame().unwrap();
                    router.recycle(black_box(frame));
                })
            })
        },
    );
    group.bench_function(
        "established TCP flow, uplink to client (1500-byte frame)",
        |b| {
            b.iter_custom(|iters| {
                cpu_time(iters, || {
                    router.handle_uplink_frame(black_box(&inbound), now);
                    let frame = router.pop_client_frame(CLIENT).unwrap();
                    router.recycle(black_box(frame));
                })
            })
        },
    );
}

fn new_flows(c: &mut Criterion) {
    let mut group = c.benchmark_group("new flow");
    // Equal-sized samples of ~50 ms: CPU time from schedstat moves in
    // scheduler ticks, so no sample may be tiny.
    group.sampling_mode(SamplingMode::Flat);
    let sets = [
        ("10 host rules", rules(10)),
        ("1000 host rules", rules(1000)),
        ("1000 port rules", port_rules(1000)),
        ("1000 prefix rules", prefix_rules(1000)),
    ];
    for (name, set) in sets {
        let mut router = router(set.clone());
        // Frames to REMOTE port 443 from every source port: each is a new
        // flow decided by the last rule, after every other rule was skipped.
        let frames: Vec<Vec<u8>> = (0..50_000u16)
            .map(|i| tcp_frame(CLIENT_IP, REMOTE, 10_000 + i, 443, false))
            .collect();
        group.bench_function(
            format!("new TCP flow at {name} (decide + NAT insert + forward)"),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut done = 0u64;
                    while done < iters {
                        let batch = (iters - done).min(frames.len() as u64) as usize;
                        router.set_rules(CLIENT_IP.into(), set.clone()); // flush, untimed
                        let mut pending = frames[..batch].iter();
                        total += cpu_time(batch as u64, || {
                            if let Some(frame) = pending.next() {
                                router.handle_client_frame(CLIENT, frame, Instant::from_millis(3));
                                let out = router.pop_uplink_frame().unwrap();
                                router.recycle(out);
                            }
                        });
                        done += batch as u64;
                    }
                    total
                })
            },
        );
    }
}

fn nat_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("NAT lookup");
    // Equal-sized samples of ~50 ms: CPU time from schedstat moves in
    // scheduler ticks, so no sample may be tiny.
    group.sampling_mode(SamplingMode::Flat);
    let client: IpAddr = CLIENT_IP.into();
    let nat_address: IpAddr = OUR_IP.into();
    let mut table = NatTable::new(120_000, 120_000, 7);
    let mut keys = Vec::new();
    let mut tree = BTreeMap::new();
    for i in 0..100_000u32 {
        let key = FlowKey {
            src: client,
            dst: IpAddr::V4(Ipv4Addr::from(0x5db8_0000 + (i / 50_000))),
            src_port: (i % 50_000) as u16 + 1024,
            dst_port: 443,
            protocol: 6,
        };
        table
            .insert(client, key, Some(nat_address), None, None, 0)
            .unwrap();
        tree.insert(key, i);
        keys.push(key);
    }
    assert_eq!(table.len(), 100_000);
    // Visit keys in a scrambled order so the caches do not help.
    let order: Vec<usize> = (0..keys.len()).map(|i| (i * 7919) % keys.len()).collect();
    let mut next = 0usize;
    group.bench_function(
        "NAT lookup at 100 000 entries (hashbrown, seeded hasher)",
        |b| {
            b.iter_custom(|iters| {
                cpu_time(iters, || {
                    next = (next + 1) % order.len();
                    black_box(table.lookup(black_box(&keys[order[next]]), 1));
                })
            })
        },
    );
    group.bench_function(
        "NAT lookup at 100 000 entries (BTreeMap, for comparison)",
        |b| {
            b.iter_custom(|iters| {
                cpu_time(iters, || {
                    next = (next + 1) % order.len();
                    black_box(tree.get(black_box(&keys[order[next]])));
                })
            })
        },
    );
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! { name = benches; config = short(); targets = established, new_flows, nat_lookup }
criterion_main!(benches);
