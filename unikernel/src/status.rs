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
#![forbid(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};
use core::net::IpAddr;

use crate::config::NetworkSettings;
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
    /// Why its rules were refused (then everything is dropped).
    pub rules_error: Option<String>,
}

/// Everything the status service shows.
#[derive(Clone, Debug, Default)]
pub struct StatusReport {
    /// Seconds since boot.
    pub uptime_seconds: u64,
    /// Wall clock (seconds since the epoch), once dom0 set it.
    pub wall_clock: Option<i64>,
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
    /// The clients.
    pub clients: Vec<ClientStatus>,
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
        writeln!(out)?;
        writeln!(out, "# clients: vif ip rules policy [rules_error]")?;
        for c in &self.clients {
            write!(
                out,
                "client vif{}.{} {} {} {}",
                c.domid, c.device, c.ip, c.rules, c.policy
            )?;
            match &c.rules_error {
                Some(error) => writeln!(out, " error={error:?}")?,
                None => writeln!(out)?,
            }
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
            }],
            drops: vec![("denied by the client's rules", 3), ("malformed", 0)],
            flows_created: 9,
            icmp_errors_sent: 0,
            nat_entries: 7,
            nat_capacity: 8192,
            clients: vec![
                ClientStatus {
                    domid: 5,
                    device: 0,
                    ip: "10.137.0.5".parse().unwrap(),
                    rules: 2,
                    policy: "drop",
                    rules_error: None,
                },
                ClientStatus {
                    domid: 6,
                    device: 0,
                    ip: "10.137.0.6".parse().unwrap(),
                    rules: 0,
                    policy: "drop",
                    rules_error: Some("0003: bad\nvalue".to_string()),
                },
            ],
            qubesdb: DbStats::default(),
            qrexec: AgentStats::default(),
        };
        let text = report.to_string();
        assert!(text.contains("uptime_seconds: 42\n"), "{text}");
        assert!(text.contains("interface uplink 5 500 6 600 1\n"), "{text}");
        assert!(
            text.contains("drop 3 denied by the client's rules\n"),
            "{text}"
        );
        assert!(text.contains("nat_entries: 7 of 8192\n"), "{text}");
        assert!(text.contains("client vif5.0 10.137.0.5 2 drop\n"), "{text}");
        // A newline in an error cannot forge a line.
        assert!(
            text.contains("client vif6.0 10.137.0.6 0 drop error=\"0003: bad\\nvalue\"\n"),
            "{text}"
        );
        assert!(text.contains("qrexec: started 0"), "{text}");
    }

    #[test]
    fn empty_report_says_what_is_missing() {
        let text = StatusReport::default().to_string();
        assert!(text.contains("waiting for QubesDB"));
        assert!(text.contains("qubes.SetDateTime not yet called"));
    }
}
