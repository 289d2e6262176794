//! Fuzzes the whole packet path (`router.rs` and everything below it): any
//! bytes in on a client vif or the uplink never panic, and never leak:
//! - client A's rules deny all: nothing it sends ever makes a frame leave
//!   on the uplink or reach client B;
//! - client B accepts all, yet clients are isolated: nothing B sends
//!   reaches A unless the firewall wrote it (ICMP errors, ARP/NDP), and
//!   nothing leaves on the uplink for 10.137.0.12, a connected qube that is
//!   not running (`/connected-ips`);
//! - every IP frame that leaves on the uplink carries the firewall's own
//!   source address (clients are translated; the untracked ICMPv6 that
//!   Linux forwards untranslated cannot come from A, denied all, or B,
//!   which has no IPv6 address);
//! - frames towards a client only carry IP packets addressed to it (or
//!   ARP/NDP answers).
//!
//! Input: a sequence of records `[interface, flags, len_hi, len_lo, bytes…]`.
//! `interface % 3`: 0 client A, 1 client B (accept-all rules), 2 uplink.
//! `flags` bit 0: fix the IPv4 header checksum (so the fuzzer gets past
//! it); bits 1–7: milliseconds×256 to advance the clock (timers run).
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;
use unikernel::router::{Caps, ClientConfig, ClientId, NetworkConfig, Router};
use unikernel::rules::RuleSet;

const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 2);
const A: ClientId = ClientId {
    domid: 5,
    device: 0,
};
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 10);
const B: ClientId = ClientId {
    domid: 6,
    device: 0,
};
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 11);

fn our_ip6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0x0a89, 2)
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let header_len = usize::from(frame[14] & 0x0f) * 4;
    if header_len < 20 || frame.len() < 14 + header_len {
        return;
    }
    frame[24] = 0;
    frame[25] = 0;
    let mut sum = 0u32;
    for word in frame[14..14 + header_len].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = !(sum as u16);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// The IPv4 or IPv6 source and destination of an outgoing frame, if IP.
fn addresses(frame: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    match frame.get(12..14)? {
        [0x08, 0x00] => Some((frame.get(26..30)?.to_vec(), frame.get(30..34)?.to_vec())),
        [0x86, 0xdd] => Some((frame.get(22..38)?.to_vec(), frame.get(38..54)?.to_vec())),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let config = NetworkConfig {
        uplink_mac: EthernetAddress([0, 0x16, 0x3e, 0x5e, 0x6c, 2]),
        ip: OUR_IP,
        gateway: Ipv4Addr::new(10, 137, 0, 1),
        primary_dns: Some(Ipv4Addr::new(10, 139, 1, 1)),
        secondary_dns: Some(Ipv4Addr::new(10, 139, 1, 2)),
        ip6: Some(our_ip6()),
        gateway6: Some(Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0x0a89, 1)),
        seed: 1,
    };
    let mut caps = Caps::for_memory(16 << 20);
    caps.nat_entries = 64;
    caps.nat_entries_per_client = 32;
    caps.queue_frames = 16;
    caps.fragment_datagrams = 4;
    caps.fragment_bytes = 16 * 1024;
    let mut router = Router::new(config, caps, Instant::from_millis(0));
    let a6 = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0x0a89, 0x0a);
    router
        .add_client(
            A,
            ClientConfig {
                ip: A_IP,
                ip6: Some(a6),
                mac: None,
            },
        )
        .unwrap();
    router
        .add_client(
            B,
            ClientConfig {
                ip: B_IP,
                ip6: None,
                mac: None,
            },
        )
        .unwrap();
    router.set_rules(A_IP.into(), RuleSet::deny_all());
    router.set_rules(B_IP.into(), RuleSet::accept_all());
    let stopped = Ipv4Addr::new(10, 137, 0, 12);
    router.set_connected_ips(&[A_IP.into(), B_IP.into(), stopped.into()]);
    router.set_rules(
        "10.137.0.99".parse().unwrap(),
        RuleSet::parse([
            ("policy", "drop"),
            ("0000", "action=accept dsthost=example.com"),
        ]),
    );
    let ours4 = OUR_IP.octets().to_vec();
    let ours6 = our_ip6().octets().to_vec();
    let mut now = 0i64;
    let mut rest = data;
    while rest.len() >= 4 {
        let (interface, flags) = (rest[0] % 3, rest[1]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]))
            .min(rest.len() - 4)
            .min(9000);
        let mut frame = rest[4..4 + len].to_vec();
        rest = &rest[4 + len..];
        if flags & 1 != 0 {
            fix_ipv4_checksum(&mut frame);
        }
        now += i64::from(flags >> 1) * 256;
        let at = Instant::from_millis(now);
        router.poll_timers(at);
        // Timer output (ARP/NDP for the gateway, DNS queries) is ours.
        while let Some(out) = router.pop_uplink_frame() {
            if let Some((src, _)) = addresses(&out) {
                assert!(
                    src == ours4 || src == ours6,
                    "timer frame with a foreign source"
                );
            }
        }
        match interface {
            0 => router.handle_client_frame(A, &frame, at),
            1 => router.handle_client_frame(B, &frame, at),
            _ => router.handle_uplink_frame(&frame, at),
        }
        let mut uplink_frames = 0;
        while let Some(out) = router.pop_uplink_frame() {
            uplink_frames += 1;
            if let Some((src, dst)) = addresses(&out) {
                assert!(
                    src == ours4 || src == ours6,
                    "uplink frame with a foreign source: {out:?}"
                );
                assert_ne!(
                    dst,
                    stopped.octets().to_vec(),
                    "a frame for a connected, stopped qube went to the uplink"
                );
            }
        }
        if interface == 0 {
            assert_eq!(
                uplink_frames, 0,
                "deny-all client A got a frame out on the uplink"
            );
        }
        let mut to_b = 0;
        while let Some(out) = router.pop_client_frame(B) {
            to_b += 1;
            if let Some((_, dst)) = addresses(&out) {
                // IP to B: addressed to B (ICMP errors from us too).
                assert!(
                    dst == B_IP.octets().to_vec() || out.get(12..14) == Some(&[0x86, 0xdd]),
                    "frame to B not for B"
                );
            }
        }
        if interface == 0 {
            assert_eq!(to_b, 0, "deny-all client A reached client B");
        }
        while let Some(out) = router.pop_client_frame(A) {
            if let (Some((src, dst)), Some([0x08, 0x00])) = (addresses(&out), out.get(12..14)) {
                assert_eq!(dst, A_IP.octets().to_vec(), "IPv4 frame to A not for A");
                if interface == 1 {
                    assert_eq!(src, ours4, "client B reached client A");
                }
            }
        }
    }
    let _ = router.counters().dropped_total();
});
