//! Offloaded frames through the router (`unikernel::offload`): a GSO TCP
//! frame with a partial checksum crosses whole, NAT fixing its
//! pseudo-header sum, and cut in software it is byte for byte what the
//! same data sent as plain MTU segments gives; the MTU check takes the
//! segment size; hostile metadata is refused.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // reason: test code

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;
use unikernel::arp::CLIENT_SIDE_MAC;
use unikernel::offload::{self, GsoKind, NicOffload, Offload, OffloadError};
use unikernel::router::checksum;
use unikernel::router::{Caps, ClientConfig, ClientId, DropReason, NetworkConfig, Router};
use unikernel::rules::RuleSet;

const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 1);
const UPLINK_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x02]);
const GATEWAY_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x01];
const A: ClientId = ClientId {
    domid: 5,
    device: 0,
};
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 10);
const A_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x0a];
const REMOTE: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);
const MSS: usize = 1448;

fn a_ip6() -> Ipv6Addr {
    "fd09:24ef:4179::a89:a".parse().unwrap()
}
fn our_ip6() -> Ipv6Addr {
    "fd09:24ef:4179::a89:2".parse().unwrap()
}
fn remote6() -> Ipv6Addr {
    "2001:db8::1".parse().unwrap()
}

fn router(ipv6: bool, resolved: bool) -> Router {
    let config = NetworkConfig {
        uplink_mac: UPLINK_MAC,
        ip: OUR_IP,
        gateway: GATEWAY,
        primary_dns: None,
        secondary_dns: None,
        ip6: ipv6.then(our_ip6),
        gateway6: ipv6.then(|| "fd09:24ef:4179::a89:1".parse().unwrap()),
        seed: 7,
    };
    let mut router = Router::new(config, Caps::for_memory(32 << 20), Instant::from_millis(0));
    router
        .add_client(
            A,
            ClientConfig {
                ip: A_IP,
                ip6: ipv6.then(a_ip6),
                mac: Some(EthernetAddress(A_MAC)),
            },
        )
        .unwrap();
    router.set_rules(IpAddr::V4(A_IP), RuleSet::parse([("policy", "accept")]));
    if ipv6 {
        router.set_rules(IpAddr::V6(a_ip6()), RuleSet::parse([("policy", "accept")]));
    }
    if resolved {
        // The gateway's ARP reply.
        let mut arp = Vec::new();
        arp.extend_from_slice(&UPLINK_MAC.0);
        arp.extend_from_slice(&GATEWAY_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        arp.extend_from_slice(&GATEWAY_MAC);
        arp.extend_from_slice(&GATEWAY.octets());
        arp.extend_from_slice(&UPLINK_MAC.0);
        arp.extend_from_slice(&OUR_IP.octets());
        router.handle_uplink_frame(&arp, Instant::from_millis(1));
        if ipv6 {
            router.handle_uplink_frame(&neighbour_advert(), Instant::from_millis(1));
        }
        while router.pop_uplink_frame().is_some() {}
    }
    router
}

/// The IPv6 gateway's neighbour advertisement to us.
fn neighbour_advert() -> Vec<u8> {
    let gateway6: Ipv6Addr = "fd09:24ef:4179::a89:1".parse().unwrap();
    let mut icmp = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
    icmp.extend_from_slice(&gateway6.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&GATEWAY_MAC);
    let pseudo = checksum::pseudo_v6(&gateway6, &our_ip6(), 58, icmp.len() as u32);
    let sum = checksum::finish(checksum::add(pseudo, &icmp));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&UPLINK_MAC.0);
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&gateway6.octets());
    f.extend_from_slice(&our_ip6().octets());
    f.extend_from_slice(&icmp);
    f
}

struct Tcp {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    flags: u8,
    ip_id: u16,
}

/// A complete Ethernet + IP + TCP frame (DF set on IPv4).
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], t: &Tcp, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    let tcp_len = 20 + payload.len();
    match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            ip.extend_from_slice(&t.ip_id.to_be_bytes());
            ip.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let sum = checksum::finish(checksum::add(0, &ip));
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            f.extend_from_slice(&[6, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => unreachable!(),
    }
    let l4 = f.len();
    f.extend_from_slice(&t.sport.to_be_bytes());
    f.extend_from_slice(&t.dport.to_be_bytes());
    f.extend_from_slice(&t.seq.to_be_bytes());
    f.extend_from_slice(&7u32.to_be_bytes());
    f.extend_from_slice(&[0x50, t.flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    let pseudo = match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_v4(&s, &d, 6, tcp_len as u32),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_v6(&s, &d, 6, tcp_len as u32),
        _ => unreachable!(),
    };
    let sum = checksum::finish(checksum::add(pseudo, &f[l4..]));
    f[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
    f
}

fn gso(kind: GsoKind, size: u16) -> NicOffload {
    NicOffload {
        csum_partial: true,
        csum_start: 0,
        csum_offset: 0,
        gso: kind,
        gso_size: size,
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn finish(frame: &[u8], offload: Offload) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    offload::finish(frame, offload, &mut scratch, &mut |piece| {
        out.push(piece.to_vec())
    })
    .unwrap();
    out
}

/// Opens a flow from A (SYN out) and returns the NAT port.
fn open_flow(router: &mut Router, src: IpAddr, dst: IpAddr) -> u16 {
    let syn = Tcp {
        src,
        dst,
        sport: 40000,
        dport: 443,
        seq: 1000,
        flags: 0x02,
        ip_id: 1,
    };
    let f = frame(CLIENT_SIDE_MAC.0, A_MAC, &syn, &[]);
    router.handle_client_frame(A, &f, Instant::from_millis(2));
    let out = router.pop_uplink_frame().expect("the SYN goes out");
    let l4 = if src.is_ipv4() { 34 } else { 54 };
    u16::from_be_bytes([out[l4], out[l4 + 1]])
}

fn forwards_a_gso_frame_whole(v6: bool) {
    // 1500 - 20 - 20 - 12 (timestamps) and its IPv6 counterpart.
    let mss: usize = if v6 { 1428 } else { MSS };
    let mut router = router(v6, true);
    assert_eq!(router.pending_len(), 0);
    let (src, dst, ours) = if v6 {
        (
            IpAddr::V6(a_ip6()),
            IpAddr::V6(remote6()),
            IpAddr::V6(our_ip6()),
        )
    } else {
        (IpAddr::V4(A_IP), IpAddr::V4(REMOTE), IpAddr::V4(OUR_IP))
    };
    let port = open_flow(&mut router, src, dst);
    let data = payload(4 * mss - 100);
    let big = Tcp {
        src,
        dst,
        sport: 40000,
        dport: 443,
        seq: 1001,
        flags: 0x18,
        ip_id: 100,
    };
    let mut f = frame(CLIENT_SIDE_MAC.0, A_MAC, &big, &data);
    let kind = if v6 { GsoKind::TcpV6 } else { GsoKind::TcpV4 };
    let offload = offload::accept(&mut f, gso(kind, mss as u16)).unwrap();
    assert_eq!(
        offload,
        Offload {
            csum_partial: true,
            gso_size: mss as u16
        }
    );
    router.handle_client_frame_offloaded(A, &f, offload, Instant::from_millis(3));
    let Some((out, out_offload)) = router.pop_uplink_frame_offloaded() else {
        let drops: Vec<_> = DropReason::ALL
            .iter()
            .filter(|r| router.counters().dropped(**r) > 0)
            .map(|r| r.name())
            .collect();
        panic!("not forwarded: {drops:?}");
    };
    assert!(
        router.pop_uplink_frame().is_none(),
        "one frame, not segments"
    );
    assert_eq!(out_offload, offload);
    assert_eq!(out.len(), f.len(), "whole");
    let segments = finish(&out, out_offload);
    assert_eq!(segments.len(), 4);
    // The same data as plain mss segments, through a second router in the
    // same state, gives the same bytes.
    let mut plain_router = router_with_flow(v6, src, dst);
    let mut expected = Vec::new();
    for (i, chunk) in data.chunks(mss).enumerate() {
        let last = i == 3;
        let seg = Tcp {
            seq: 1001 + (i * mss) as u32,
            flags: if last { 0x18 } else { 0x10 },
            ip_id: 100 + i as u16,
            ..big
        };
        let pf = frame(CLIENT_SIDE_MAC.0, A_MAC, &seg, chunk);
        plain_router.handle_client_frame(A, &pf, Instant::from_millis(3));
        expected.push(plain_router.pop_uplink_frame().expect("plain forwarded"));
    }
    assert_eq!(segments, expected);
    // Source translated.
    let at = if v6 { 14 + 8 } else { 14 + 12 };
    let ours_bytes: Vec<u8> = match ours {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    assert_eq!(&segments[0][at..at + ours_bytes.len()], &ours_bytes[..]);

    // The reply direction: a GSO frame from outside to the NAT port.
    let back = Tcp {
        src: dst,
        dst: ours,
        sport: 443,
        dport: port,
        seq: 5000,
        flags: 0x10,
        ip_id: 9,
    };
    let mut rf = frame(UPLINK_MAC.0, GATEWAY_MAC, &back, &data);
    let offload = offload::accept(&mut rf, gso(kind, mss as u16)).unwrap();
    router.handle_uplink_frame_offloaded(&rf, offload, Instant::from_millis(4));
    let (inbound, inbound_offload) = router.pop_client_frame_offloaded(A).expect("to A");
    assert_eq!(inbound_offload, offload);
    let mut expected_back = Vec::new();
    for (i, chunk) in data.chunks(mss).enumerate() {
        let seg = Tcp {
            seq: 5000 + (i * mss) as u32,
            ip_id: 9 + i as u16,
            ..back
        };
        let pf = frame(UPLINK_MAC.0, GATEWAY_MAC, &seg, chunk);
        plain_router.handle_uplink_frame(&pf, Instant::from_millis(4));
        expected_back.push(plain_router.pop_client_frame(A).expect("plain to A"));
    }
    assert_eq!(finish(&inbound, inbound_offload), expected_back);
}

fn router_with_flow(v6: bool, src: IpAddr, dst: IpAddr) -> Router {
    let mut r = router(v6, true);
    open_flow(&mut r, src, dst);
    r
}

#[test]
fn a_tcpv4_gso_frame_crosses_whole_and_cuts_into_the_plain_segments() {
    forwards_a_gso_frame_whole(false);
}

#[test]
fn a_tcpv6_gso_frame_crosses_whole_and_cuts_into_the_plain_segments() {
    forwards_a_gso_frame_whole(true);
}

#[test]
fn a_partial_checksum_stays_partial_and_completes_to_the_plain_one() {
    let mut router = router(false, true);
    open_flow(&mut router, IpAddr::V4(A_IP), IpAddr::V4(REMOTE));
    let t = Tcp {
        src: IpAddr::V4(A_IP),
        dst: IpAddr::V4(REMOTE),
        sport: 40000,
        dport: 443,
        seq: 1001,
        flags: 0x18,
        ip_id: 3,
    };
    let plain = frame(CLIENT_SIDE_MAC.0, A_MAC, &t, &payload(301));
    let mut partial = plain.clone();
    let nic = NicOffload {
        csum_partial: true,
        csum_start: 34,
        csum_offset: 16,
        ..NicOffload::default()
    };
    let offload = offload::accept(&mut partial, nic).unwrap();
    assert_eq!(
        offload,
        Offload {
            csum_partial: true,
            gso_size: 0
        }
    );
    assert_ne!(partial, plain, "the field now holds the pseudo-header sum");
    router.handle_client_frame_offloaded(A, &partial, offload, Instant::from_millis(3));
    let (out, o) = router.pop_uplink_frame_offloaded().unwrap();
    assert_eq!(o, offload);
    router.handle_client_frame(A, &plain, Instant::from_millis(3));
    let expected = router.pop_uplink_frame().unwrap();
    assert_eq!(finish(&out, o), vec![expected]);
}

#[test]
fn a_gso_frame_is_within_the_mtu_when_its_segments_are() {
    let mut router = router(false, true);
    open_flow(&mut router, IpAddr::V4(A_IP), IpAddr::V4(REMOTE));
    let t = Tcp {
        src: IpAddr::V4(A_IP),
        dst: IpAddr::V4(REMOTE),
        sport: 40000,
        dport: 443,
        seq: 1001,
        flags: 0x10,
        ip_id: 3,
    };
    // 1460 + 40 = 1500: fits.
    let mut f = frame(CLIENT_SIDE_MAC.0, A_MAC, &t, &payload(3 * 1460));
    let o = offload::accept(&mut f, gso(GsoKind::TcpV4, 1460)).unwrap();
    router.handle_client_frame_offloaded(A, &f, o, Instant::from_millis(3));
    assert!(router.pop_uplink_frame_offloaded().is_some());
    // 1461 + 40 with DF: fragmentation needed back to the client.
    let mut f = frame(CLIENT_SIDE_MAC.0, A_MAC, &t, &payload(3 * 1461));
    let o = offload::accept(&mut f, gso(GsoKind::TcpV4, 1461)).unwrap();
    router.handle_client_frame_offloaded(A, &f, o, Instant::from_millis(3));
    assert!(router.pop_uplink_frame().is_none());
    assert_eq!(router.counters().dropped(DropReason::DontFragment), 1);
    let icmp = router.pop_client_frame(A).expect("fragmentation needed");
    assert_eq!((icmp[14 + 20], icmp[14 + 21]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[14 + 26], icmp[14 + 27]]), 1500);
}

#[test]
fn a_gso_frame_waiting_for_the_gateway_waits_as_segments() {
    let mut router = router(false, false);
    let t = Tcp {
        src: IpAddr::V4(A_IP),
        dst: IpAddr::V4(REMOTE),
        sport: 40000,
        dport: 443,
        seq: 1001,
        flags: 0x10,
        ip_id: 3,
    };
    let mut f = frame(CLIENT_SIDE_MAC.0, A_MAC, &t, &payload(2 * MSS));
    let o = offload::accept(&mut f, gso(GsoKind::TcpV4, MSS as u16)).unwrap();
    router.handle_client_frame_offloaded(A, &f, o, Instant::from_millis(3));
    assert_eq!(router.pending_len(), 2, "held as two complete segments");
}

#[test]
fn offloads_that_do_not_match_the_packet_are_dropped() {
    let mut router = router(false, true);
    // GSO metadata on a UDP packet (the NIC layer let it through: the
    // router checks again).
    let mut udp = frame(
        CLIENT_SIDE_MAC.0,
        A_MAC,
        &Tcp {
            src: IpAddr::V4(A_IP),
            dst: IpAddr::V4(REMOTE),
            sport: 1,
            dport: 2,
            seq: 0,
            flags: 0x02,
            ip_id: 0,
        },
        &[],
    );
    udp[14 + 9] = 17;
    let before = router.counters().dropped(DropReason::Malformed);
    let claimed = Offload {
        csum_partial: true,
        gso_size: 1000,
    };
    router.handle_client_frame_offloaded(A, &udp, claimed, Instant::from_millis(3));
    assert_eq!(router.counters().dropped(DropReason::Malformed), before + 1);
    assert!(router.pop_uplink_frame().is_none());
}

#[test]
fn accept_refuses_hostile_metadata() {
    let t = Tcp {
        src: IpAddr::V4(A_IP),
        dst: IpAddr::V4(REMOTE),
        sport: 1,
        dport: 2,
        seq: 0,
        flags: 0x10,
        ip_id: 0,
    };
    let good = frame(CLIENT_SIDE_MAC.0, A_MAC, &t, &payload(3000));
    let try_with = |nic: NicOffload, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = good.clone();
        edit(&mut f);
        offload::accept(&mut f, nic)
    };
    let none = |_: &mut Vec<u8>| {};
    assert_eq!(
        try_with(gso(GsoKind::TcpV4, 0), &none),
        Err(OffloadError::GsoSize)
    );
    assert_eq!(
        try_with(gso(GsoKind::TcpV4, 10), &none),
        Err(OffloadError::GsoSize)
    );
    assert_eq!(
        try_with(gso(GsoKind::TcpV6, 1000), &none),
        Err(OffloadError::GsoType)
    );
    assert_eq!(
        try_with(gso(GsoKind::Other, 1000), &none),
        Err(OffloadError::GsoType)
    );
    // IP total length beyond the frame.
    let longer = |f: &mut Vec<u8>| f.truncate(f.len() - 1);
    assert_eq!(
        try_with(gso(GsoKind::TcpV4, 1000), &longer),
        Err(OffloadError::Malformed)
    );
    // A fragment.
    let fragment = |f: &mut Vec<u8>| f[14 + 7] = 1;
    assert_eq!(
        try_with(gso(GsoKind::TcpV4, 1000), &fragment),
        Err(OffloadError::GsoType)
    );
    // TCP data offset past the end.
    let doff = |f: &mut Vec<u8>| {
        let n = f.len();
        f.truncate(14 + 20 + 20);
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        f[34 + 12] = 0xf0;
        let _ = n;
    };
    assert_eq!(
        try_with(gso(GsoKind::TcpV4, 1000), &doff),
        Err(OffloadError::Malformed)
    );
    // A checksum position outside the frame.
    let far = NicOffload {
        csum_partial: true,
        csum_start: 60000,
        csum_offset: 16,
        ..NicOffload::default()
    };
    assert_eq!(try_with(far, &none), Err(OffloadError::ChecksumPosition));
    // Fine, as a check the test can fail.
    assert!(try_with(gso(GsoKind::TcpV4, 1000), &none).is_ok());
}

#[test]
fn no_bytes_make_accept_or_finish_panic() {
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let t = Tcp {
        src: IpAddr::V4(A_IP),
        dst: IpAddr::V4(REMOTE),
        sport: 1,
        dport: 2,
        seq: 0,
        flags: 0x10,
        ip_id: 0,
    };
    let base = frame(CLIENT_SIDE_MAC.0, A_MAC, &t, &payload(2000));
    let mut accepted = 0;
    for _ in 0..3000 {
        let mut f = base.clone();
        for _ in 0..(next() % 4) {
            let at = (next() as usize) % 60;
            f[at] = next() as u8;
        }
        f.truncate((next() as usize) % (base.len() + 1));
        let nic = NicOffload {
            csum_partial: next() % 2 == 0,
            csum_start: (next() % 80) as u16,
            csum_offset: (next() % 40) as u16,
            gso: [
                GsoKind::None,
                GsoKind::TcpV4,
                GsoKind::TcpV6,
                GsoKind::Other,
            ][(next() % 4) as usize],
            gso_size: (next() % 3000) as u16,
        };
        if let Ok(o) = offload::accept(&mut f, nic) {
            accepted += 1;
            let mut scratch = Vec::new();
            let mut total = 0;
            let _ = offload::finish(&f, o, &mut scratch, &mut |p| total += p.len());
            assert!(total <= f.len() * offload::MAX_SEGMENTS);
        }
    }
    assert!(accepted > 0);
}

/// A NIC that records what it is given; with `offloads` it takes GSO and
/// partial checksums as they are.
struct Recorder {
    sent: Vec<(Vec<u8>, Offload)>,
    offloads: bool,
}

struct RecTx<'a>(&'a mut Vec<(Vec<u8>, Offload)>);
struct NoRx;

impl smoltcp::phy::RxToken for NoRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&[])
    }
}

impl smoltcp::phy::TxToken for RecTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buffer = vec![0; len];
        let result = f(&mut buffer);
        self.0.push((buffer, Offload::NONE));
        result
    }
}

impl smoltcp::phy::Device for Recorder {
    type RxToken<'a> = NoRx;
    type TxToken<'a> = RecTx<'a>;
    fn receive(&mut self, _: Instant) -> Option<(NoRx, RecTx<'_>)> {
        None
    }
    fn transmit(&mut self, _: Instant) -> Option<RecTx<'_>> {
        Some(RecTx(&mut self.sent))
    }
    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        smoltcp::phy::DeviceCapabilities::default()
    }
}

impl offload::OffloadNic for Recorder {
    fn tx_offloads(&self) -> offload::TxOffloads {
        offload::TxOffloads {
            csum: self.offloads,
            tso4: self.offloads,
            tso6: self.offloads,
        }
    }
    fn transmit_offloaded(&mut self, _: Instant, frame: &[u8], offload: Offload) -> bool {
        self.sent.push((frame.to_vec(), offload));
        true
    }
}

#[test]
fn the_output_nic_gets_gso_frames_whole_or_cut_as_it_can_take_them() {
    for offloads in [true, false] {
        let mut router = router(false, true);
        open_flow(&mut router, IpAddr::V4(A_IP), IpAddr::V4(REMOTE));
        let t = Tcp {
            src: IpAddr::V4(A_IP),
            dst: IpAddr::V4(REMOTE),
            sport: 40000,
            dport: 443,
            seq: 1001,
            flags: 0x10,
            ip_id: 3,
        };
        let plain = frame(CLIENT_SIDE_MAC.0, A_MAC, &t, &payload(3 * MSS));
        let mut f = plain.clone();
        let o = offload::accept(&mut f, gso(GsoKind::TcpV4, MSS as u16)).unwrap();
        router.handle_client_frame_offloaded(A, &f, o, Instant::from_millis(3));
        // And a partial-checksum frame behind it.
        let small = frame(
            CLIENT_SIDE_MAC.0,
            A_MAC,
            &Tcp {
                seq: 1001 + 3 * MSS as u32,
                ..t
            },
            &payload(77),
        );
        let mut partial = small.clone();
        let po = offload::accept(
            &mut partial,
            NicOffload {
                csum_partial: true,
                ..NicOffload::default()
            },
        )
        .unwrap();
        router.handle_client_frame_offloaded(A, &partial, po, Instant::from_millis(3));
        let mut nic = Recorder {
            sent: Vec::new(),
            offloads,
        };
        router.transmit_uplink(&mut nic, Instant::from_millis(3));
        if offloads {
            assert_eq!(nic.sent.len(), 2);
            assert_eq!(nic.sent[0].1, o);
            assert_eq!(nic.sent[1].1, po);
        } else {
            // Cut and completed, in order: what the plain path gives.
            let mut reference = router_with_flow(false, IpAddr::V4(A_IP), IpAddr::V4(REMOTE));
            let mut expected = Vec::new();
            for (i, chunk) in payload(3 * MSS).chunks(MSS).enumerate() {
                let seg = Tcp {
                    seq: 1001 + (i * MSS) as u32,
                    ip_id: 3 + i as u16,
                    ..t
                };
                reference.handle_client_frame(
                    A,
                    &frame(CLIENT_SIDE_MAC.0, A_MAC, &seg, chunk),
                    Instant::from_millis(3),
                );
                expected.push((reference.pop_uplink_frame().unwrap(), Offload::NONE));
            }
            reference.handle_client_frame(A, &small, Instant::from_millis(3));
            expected.push((reference.pop_uplink_frame().unwrap(), Offload::NONE));
            assert_eq!(nic.sent, expected);
        }
    }
}
