//! Fuzzes the Qubes firewall rule parser and matcher (`rules.rs`): any
//! QubesDB entries dom0 (or a compromised dom0 tool) could write never make
//! it panic; a set that failed to parse denies every flow; a set that parsed
//! holds exactly the rule keys it was given, in numeric order.
//!
//! Input: lines `KEY<TAB>VALUE` (the entries below `/qubes-firewall/<ip>/`),
//! then the flows to decide are derived from the input bytes.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use unikernel::rules::{FlowMeta, MatchContext, NameLookup, NameState, RuleSet, Verdict};

/// Resolves every name to one fixed address per family.
struct AllNames([IpAddr; 1], [IpAddr; 1]);

impl NameLookup for AllNames {
    fn lookup(&self, _name: &str, ipv6: bool) -> NameState<'_> {
        NameState::Resolved(if ipv6 { &self.1 } else { &self.0 })
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let entries: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .collect();
    let set = RuleSet::parse(entries.iter().copied());
    let rule_keys = entries.iter().filter(|(k, _)| *k != "policy").count();
    if set.error().is_none() {
        assert_eq!(set.rules().len(), rule_keys);
        assert!(set.rules().windows(2).all(|w| w[0].number <= w[1].number));
    } else {
        assert!(set.rules().is_empty());
        let _ = set.error().map(|e| e.to_string());
    }
    let names = AllNames(
        [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))],
        [IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))],
    );
    let dns = [IpAddr::V4(Ipv4Addr::new(10, 139, 1, 1))];
    let ctx = MatchContext {
        dns_servers: &dns,
        now_unix: data.first().map(|b| u64::from(*b) << 24),
        names: &names,
    };
    for chunk in data.chunks(8).take(64) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        let dst = if b[0] & 1 == 0 {
            IpAddr::V4(Ipv4Addr::new(b[1], b[2], b[3], b[4]))
        } else {
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0,
                0,
                0,
                0,
                u16::from(b[1]),
                u16::from(b[2]),
            ))
        };
        let protocol = [1, 6, 17, 58, b[5]][usize::from(b[5] % 5)];
        let flow = FlowMeta {
            dst,
            protocol,
            dst_port: u16::from_be_bytes([b[6], b[7]]),
            icmp_type: Some(b[3]),
        };
        let verdict = set.decide(&flow, &ctx);
        if set.error().is_some() {
            assert_eq!(verdict, Verdict::DroppedParseError);
        }
        // The index must agree with a plain first-match scan.
        if set.error().is_none() {
            let linear = set
                .rules()
                .iter()
                .find(|r| r.matches(&flow, &ctx))
                .map(|r| r.number);
            match verdict {
                Verdict::AcceptedByRule(n) | Verdict::DroppedByRule(n) => {
                    assert_eq!(Some(n), linear)
                }
                Verdict::AcceptedByPolicy | Verdict::DroppedByPolicy => assert_eq!(linear, None),
                other => panic!("unexpected verdict {other:?}"),
            }
        }
    }
});
