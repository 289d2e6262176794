//! The text of `qubes.FirewallStatus`: what the firewall is doing, for a
//! human in dom0 (`qrexec-client -d sys-firewall
//! 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0'`).
//!
//! The program flow gathers the numbers into a [`StatusReport`] (from the
//! router's counters, the QubesDB copy and the qrexec agent) and this module
//! only formats them: one `key: value` block per section, stable names, one
//! line per interface, drop reason and client, so a script can grep it.
//! It must never hold state of its own, never allocate per packet (it runs
//! only when dom0 asks) and never print anything a client qube could inject
//! unescaped (rule errors and names are written with `{:?}`).
//! The heap line (`heap: used N KiB free N KiB of N KiB`) is what the Xen
//! test greps to show the image's memory at `memory = 16`; a heap without a
//! fixed size (the hosted process's, counted by its global allocator) shows
//! `used` only, and `heap_peak: N KiB` follows where the platform keeps the
//! high-water mark (the soak reports it). Where the platform counts its
//! clock's readings (the Xen image), `clock: from_tsc N at_wake N
//! at_switch N` says how many read the TSC and how many took the time Xen
//! last put us on a CPU instead, after a sleep or between sleeps (and,
//! if those times were refused, by how much one differed from the TSC).
#![forbid(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};
use core::net::IpAddr;

use crate::config::NetworkSettings;
use crate::platform::{ClockCounts, HeapUsage};
use crate::qrexec::AgentStats;
use crate::qubesdb::DbStats;

/// Traffic counters of one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceStatus {
    /// `uplink`, or `vif<domid>.<device>` for a client.
    pub name: String,
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames refused because the transmit queue was full.
    pub tx_queue_full: u64,
    /// GSO packets the NIC received and sent whole, where it counts them
    /// (Xen netback/netfront; counts of the NIC's current connection).
    pub gso: Option<crate::offload::GsoCounts>,
    /// Grant-copy batches and notifications of its rings, and the frames
    /// the device refused or dropped, where it counts them (Xen
    /// netback/netfront).
    pub ring: Option<crate::offload::RingCounts>,
}

/// One client qube.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientStatus {
    /// Its domain id.
    pub domid: u16,
    /// Its vif device number.
    pub device: u32,
    /// Its address.
    pub ip: IpAddr,
    /// Number of rules in force.
    pub rules: usize,
    /// The policy when no rule matches (`accept` / `drop`).
    pub policy: &'static str,
    /// NAT / connection-tracking entries it owns (flows it started, IPv4
    /// and IPv6).
    pub nat_entries: usize,
    /// Why its rules were refused (then everything is dropped).
    pub rules_error: Option<String>,
}

/// The frames for the uplink that wait for the gateway's MAC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingStatus {
    /// Waiting now (IPv4 and IPv6).
    pub waiting: usize,
    /// Frames that had to wait, since boot.
    pub queued: u64,
    /// Sent once the MAC was learned, since boot.
    pub sent: u64,
    /// Dropped after waiting too long, since boot.
    pub expired: u64,
    /// Dropped (the oldest) because the queue was full, since boot.
    pub dropped_full: u64,
}

/// Everything the status service shows.
#[derive(Clone, Debug, Default)]
pub struct StatusReport {
    /// Seconds since boot.
    pub uptime_seconds: u64,
    /// Wall clock (seconds since the epoch), once dom0 set it.
    pub wall_clock: Option<i64>,
    /// The heap's use, where the platform measures it (the Xen image's
    /// talc, the hosted process's counting allocator).
    pub heap: Option<HeapUsage>,
    /// Where the clock's readings came from, where the platform counts it.
    pub clock: Option<ClockCounts>,
    /// The network configuration, once known.
    pub network: Option<NetworkSettings>,
    /// Per-interface counters (uplink first).
    pub interfaces: Vec<InterfaceStatus>,
    /// Drops by reason (`reason`, count).
    pub drops: Vec<(&'static str, u64)>,
    /// New flows accepted (NAT entries created) since boot.
    pub flows_created: u64,
    /// ICMP errors sent (time exceeded).
    pub icmp_errors_sent: u64,
    /// NAT entries in use.
    pub nat_entries: usize,
    /// NAT table capacity.
    pub nat_capacity: usize,
    /// The pending queues for the gateway's MAC.
    pub pending: PendingStatus,
    /// The gateway's MAC, once known.
    pub gateway_mac: Option<[u8; 6]>,
    /// True when a gateway (IPv4 or IPv6) never answered ARP/NDP and is
    /// reached through Linux's static `fe:ff:ff:ff:ff:ff`.
    pub gateway_fallback: bool,
    /// The clients.
    pub clients: Vec<ClientStatus>,
    /// Every connected qube's address from `/connected-ips` and
    /// `/connected-ips6`, running or not (protected from spoofing).
    pub connected_ips: Vec<IpAddr>,
    /// Words of those keys that are not addresses (not protected).
    pub connected_ips_ignored: Vec<String>,
    /// The QubesDB copy.
    pub qubesdb: DbStats,
    /// The qrexec agent.
    pub qrexec: AgentStats,
}

impl StatusReport {
    /// Writes the report.
    pub fn write_to(&self, out: &mut dyn Write) -> fmt::Result {
        writeln!(out, "qubes-firewall status")?;
        writeln!(out, "uptime_seconds: {}", self.uptime_seconds)?;
        match self.wall_clock {
            Some(seconds) => writeln!(out, "wall_clock_unix: {seconds}")?,
            None => writeln!(
                out,
                "wall_clock_unix: unknown (qubes.SetDateTime not yet called)"
            )?,
        }
        match self.heap {
            Some(heap) if heap.total > 0 => writeln!(
                out,
                "heap: used {} KiB free {} KiB of {} KiB",
                heap.used >> 10,
                heap.free() >> 10,
                heap.total >> 10
            )?,
            Some(heap) => writeln!(
                out,
                "heap: used {} KiB (no fixed size: a hosted process's heap grows from its C library)",
                heap.used >> 10
            )?,
            None => writeln!(out, "heap: not measured")?,
        }
        if let Some(heap) = self.heap.filter(|heap| heap.peak > 0) {
            writeln!(out, "heap_peak: {} KiB", heap.peak >> 10)?;
        }
        if let Some(clock) = self.clock {
            write!(
                out,
                "clock: from_tsc {} at_wake {} at_switch {}",
                clock.from_tsc, clock.at_wake, clock.at_switch
            )?;
            match clock.wake_times_refused {
                Some(lag) => writeln!(out, " wake_times_refused_at_difference_ns {lag}")?,
                None => writeln!(out)?,
            }
        }
        match &self.network {
            Some(network) => {
                writeln!(
                    out,
                    "network_source: {}",
                    if network.from_cmdline {
                        "kernel command line"
                    } else {
                        "QubesDB"
                    }
                )?;
                writeln!(out, "ip: {}", network.ip)?;
                writeln!(out, "gateway: {}", network.gateway)?;
                writeln!(
                    out,
                    "dns: {} {}",
                    network.primary_dns, network.secondary_dns
                )?;
                if let (Some(ip6), Some(gateway6)) = (network.ip6, network.gateway6) {
                    writeln!(out, "ip6: {ip6}")?;
                    writeln!(out, "gateway6: {gateway6}")?;
                }
            }
            None => writeln!(out, "network_source: none yet (waiting for QubesDB)")?,
        }
        writeln!(out)?;
        writeln!(
            out,
            "# interfaces: name rx_frames rx_bytes tx_frames tx_bytes tx_queue_full"
        )?;
        for i in &self.interfaces {
            writeln!(
                out,
                "interface {} {} {} {} {} {}",
                i.name, i.rx_frames, i.rx_bytes, i.tx_frames, i.tx_bytes, i.tx_queue_full
            )?;
        }
        if self.interfaces.iter().any(|i| i.gso.is_some()) {
            writeln!(
                out,
                "# gso: name packets_received_whole packets_sent_whole frames_sent_from_lent_pages"
            )?;
            for i in &self.interfaces {
                if let Some(gso) = i.gso {
                    writeln!(out, "gso {} {} {} {}", i.name, gso.rx, gso.tx, gso.tx_lent)?;
                }
            }
        }
        if self.interfaces.iter().any(|i| i.ring.is_some()) {
            writeln!(
                out,
                "# rings: name grant_copy_batches notifications_sent refused_from_peer dropped_to_peer copies_realigned"
            )?;
            for i in &self.interfaces {
                if let Some(ring) = i.ring {
                    writeln!(
                        out,
                        "ring {} {} {} {} {} {}",
                        i.name,
                        ring.copy_batches,
                        ring.notifications,
                        ring.refused,
                        ring.dropped,
                        ring.realigned
                    )?;
                }
            }
        }
        writeln!(out)?;
        writeln!(out, "# drops: count reason")?;
        for (reason, count) in &self.drops {
            writeln!(out, "drop {count} {reason}")?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "nat_entries: {} of {}",
            self.nat_entries, self.nat_capacity
        )?;
        writeln!(out, "flows_created: {}", self.flows_created)?;
        writeln!(out, "icmp_errors_sent: {}", self.icmp_errors_sent)?;
        let p = &self.pending;
        writeln!(
            out,
            "gateway_pending: waiting {} queued {} sent {} expired {} dropped_full {}",
            p.waiting, p.queued, p.sent, p.expired, p.dropped_full
        )?;
        match self.gateway_mac {
            Some([a, b, c, d, e, f]) => write!(
                out,
                "gateway_mac: {a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}"
            )?,
            None => write!(out, "gateway_mac: unknown")?,
        }
        if self.gateway_fallback {
            write!(
                out,
                " (fallback: the gateway did not answer ARP/NDP; fe:ff:ff:ff:ff:ff as Linux's setup-ip)"
            )?;
        }
        writeln!(out)?;
        writeln!(out)?;
        writeln!(
            out,
            "# clients: vif ip rules policy nat_entries [rules_error]"
        )?;
        for c in &self.clients {
            write!(
                out,
                "client vif{}.{} {} {} {} {}",
                c.domid, c.device, c.ip, c.rules, c.policy, c.nat_entries
            )?;
            match &c.rules_error {
                Some(error) => writeln!(out, " error={error:?}")?,
                None => writeln!(out)?,
            }
        }
        write!(out, "connected_ips:")?;
        if self.connected_ips.is_empty() {
            write!(out, " none")?;
        }
        for address in &self.connected_ips {
            write!(out, " {address}")?;
        }
        writeln!(out)?;
        for word in &self.connected_ips_ignored {
            writeln!(out, "connected_ips_ignored: {word:?}")?;
        }
        writeln!(out)?;
        let db = &self.qubesdb;
        writeln!(
            out,
            "qubesdb: entries {} bytes {} writes {} removals {} commits {} refused_full {}",
            db.entries, db.bytes, db.writes, db.removals, db.commits, db.refused_full
        )?;
        let q = &self.qrexec;
        writeln!(
            out,
            "qrexec: started {} completed {} failed {} refused_busy {} refused_platform {} control_errors {} ignored {}",
            q.calls_started,
            q.calls_completed,
            q.calls_failed,
            q.calls_refused_busy,
            q.calls_refused_platform,
            q.control_errors,
            q.ignored_messages
        )
    }
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use core::net::Ipv4Addr;

    #[test]
    fn report_has_one_greppable_line_per_item() {
        let report = StatusReport {
            uptime_seconds: 42,
            wall_clock: Some(1_438_359_043),
            heap: Some(HeapUsage {
                used: 3 << 20,
                total: (12 << 20) + 512,
                peak: 0,
            }),
            clock: Some(ClockCounts {
                from_tsc: 7,
                at_wake: 1234,
                at_switch: 56,
                wake_times_refused: None,
            }),
            network: Some(NetworkSettings {
                ip: Ipv4Addr::new(10, 137, 0, 2),
                gateway: Ipv4Addr::new(10, 137, 0, 1),
                primary_dns: Ipv4Addr::new(10, 139, 1, 1),
                secondary_dns: Ipv4Addr::new(10, 139, 1, 2),
                ip6: None,
                gateway6: None,
                from_cmdline: false,
            }),
            interfaces: vec![InterfaceStatus {
                name: "uplink".into(),
                rx_frames: 5,
                rx_bytes: 500,
                tx_frames: 6,
                tx_bytes: 600,
                tx_queue_full: 1,
                gso: Some(crate::offload::GsoCounts {
                    rx: 4,
                    tx: 2,
                    tx_lent: 1,
                }),
                ring: Some(crate::offload::RingCounts {
                    copy_batches: 0,
                    notifications: 9,
                    refused: 2,
                    dropped: 4,
                    realigned: 5,
                }),
            }],
            drops: vec![("denied by the client's rules", 3), ("malformed", 0)],
            flows_created: 9,
            icmp_errors_sent: 0,
            nat_entries: 7,
            nat_capacity: 8192,
            pending: PendingStatus {
                waiting: 2,
                queued: 11,
                sent: 8,
                expired: 1,
                dropped_full: 0,
            },
            gateway_mac: Some([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]),
            gateway_fallback: true,
            clients: vec![
                ClientStatus {
                    domid: 5,
                    device: 0,
                    ip: "10.137.0.5".parse().unwrap(),
                    rules: 2,
                    policy: "drop",
                    nat_entries: 7,
                    rules_error: None,
                },
                ClientStatus {
                    domid: 6,
                    device: 0,
                    ip: "10.137.0.6".parse().unwrap(),
                    rules: 0,
                    policy: "drop",
                    nat_entries: 0,
                    rules_error: Some("0003: bad\nvalue".to_string()),
                },
            ],
            connected_ips: vec!["10.137.0.5".parse().unwrap(), "10.137.0.9".parse().unwrap()],
            connected_ips_ignored: vec!["/connected-ips: \"x\"".to_string()],
            qubesdb: DbStats::default(),
            qrexec: AgentStats::default(),
        };
        let text = report.to_string();
        let golden = "\
qubes-firewall status
uptime_seconds: 42
wall_clock_unix: 1438359043
heap: used 3072 KiB free 9216 KiB of 12288 KiB
clock: from_tsc 7 at_wake 1234 at_switch 56
network_source: QubesDB
ip: 10.137.0.2
gateway: 10.137.0.1
dns: 10.139.1.1 10.139.1.2

# interfaces: name rx_frames rx_bytes tx_frames tx_bytes tx_queue_full
interface uplink 5 500 6 600 1
# gso: name packets_received_whole packets_sent_whole frames_sent_from_lent_pages
gso uplink 4 2 1
# rings: name grant_copy_batches notifications_sent refused_from_peer dropped_to_peer copies_realigned
ring uplink 0 9 2 4 5

# drops: count reason
drop 3 denied by the client's rules
drop 0 malformed

nat_entries: 7 of 8192
flows_created: 9
icmp_errors_sent: 0
gateway_pending: waiting 2 queued 11 sent 8 expired 1 dropped_full 0
gateway_mac: fe:ff:ff:ff:ff:ff (fallback: the gateway did not answer ARP/NDP; fe:ff:ff:ff:ff:ff as Linux's setup-ip)

# clients: vif ip rules policy nat_entries [rules_error]
client vif5.0 10.137.0.5 2 drop 7
client vif6.0 10.137.0.6 0 drop 0 error=\"0003: bad\\nvalue\"
connected_ips: 10.137.0.5 10.137.0.9
connected_ips_ignored: \"/connected-ips: \\\"x\\\"\"

qubesdb: entries 0 bytes 0 writes 0 removals 0 commits 0 refused_full 0
qrexec: started 0 completed 0 failed 0 refused_busy 0 refused_platform 0 control_errors 0 ignored 0\n";
        assert_eq!(text, golden);
        // A newline in a rule error cannot forge a line: one line per item.
        assert_eq!(text.lines().filter(|l| l.starts_with("client ")).count(), 2);
    }

    #[test]
    fn empty_report_says_what_is_missing() {
        let text = StatusReport::default().to_string();
        assert!(text.contains("waiting for QubesDB"));
        assert!(text.contains("qubes.SetDateTime not yet called"));
        assert!(text.contains("heap: not measured\n"));
        assert!(!text.contains("heap_peak"));
        assert!(!text.contains("clock:"));
        let refused = StatusReport {
            clock: Some(ClockCounts {
                from_tsc: 9,
                at_wake: 0,
                at_switch: 0,
                wake_times_refused: Some(-12_000_000),
            }),
            ..StatusReport::default()
        };
        assert!(refused.to_string().contains(
            "\nclock: from_tsc 9 at_wake 0 at_switch 0 wake_times_refused_at_difference_ns -12000000\n"
        ));
    }

    #[test]
    fn a_heap_without_fixed_size_shows_used_and_the_peak() {
        let report = StatusReport {
            heap: Some(HeapUsage {
                used: 3 << 20,
                total: 0,
                peak: 5 << 20,
            }),
            ..StatusReport::default()
        };
        let text = report.to_string();
        assert!(
            text.contains("\nheap: used 3072 KiB (no fixed size"),
            "{text}"
        );
        assert!(text.contains("\nheap_peak: 5120 KiB\n"), "{text}");
        assert!(!text.contains(" free "), "{text}");
    }
}
