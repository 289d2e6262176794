//! `cargo xtask bench xen`: our firewall image against a Linux
//! sys-firewall on real Xen (under QEMU, TCG), in one run.
//!
//! `tests/xen/bench.sh` builds and boots the lab (see tests/xen/README.md,
//! "The benchmark"): dom0 plays sys-net (`iperf3 -s`); our image at Qubes'
//! size (1 vCPU, 16 MiB) and a Linux sys-firewall (Debian's kernel as a PV
//! domU, 2 vCPUs, 400 MiB, with Qubes' `qubes` and `qubes-firewall`
//! nftables tables as Qubes' own code generates them, masquerade,
//! netback and netfront) each serve one Linux client qube. Interleaved,
//! each test runs through ours, then through Linux: iperf3 TCP up
//! (client → dom0) and down (`-R`), then UDP up at a fixed rate (loss
//! reported), then a ping test (`ping -A`: each echo request as soon as
//! the last reply is in, so the round trip through the firewall idle),
//! with the other firewall and its client paused. During the TCP runs the
//! client also pings dom0 every 0.2 s: the round trip under that load. Around each
//! run dom0 reads `xl list`'s CPU time of the firewall, the client and
//! dom0. This module runs the script, reads the
//! `QFW-BENCH` lines from the serial log and prints both throughputs, the
//! ratio ours/Linux, the CPU time of each firewall domain, the TCP
//! sender's retransmissions, UDP loss and memory, and how often each
//! firewall notified its client and dom0 (their vifs' interrupts, per
//! 1,000 packets of the client's), the round trips, the lab's price of a
//! hypercall (from a PVH guest, ours' kind, and from the PV dom0), and with more than
//! one round each TCP test's ratio round by round (its spread, the mean
//! of the rounds with its 95 % confidence interval, Student's t, which
//! says whether the rounds tell the ratio from 100 % at all, and how many
//! rounds reached Linux). Under TCG only the ratio of one run means
//! anything. A run that failed
//! (say, a firewall the lab lost mid-series) is left out of the figures,
//! with the other firewall's run of the same test and round, and listed,
//! with whatever Xen logged of a crashed domain and each restart of ours.
//!
//! Env, passed on to bench.sh: `LAB` (default `/tmp/qubes-fw-xen-bench`),
//! `SECS` (10), `UDP_RATE` (20M), `ROUNDS` (1), `FLOWTABLE` (0), `PROFILE`
//! (0), `LOSE_OURS_AT` (0), `LINUX_VCPUS` (2, what Qubes gives a
//! sys-firewall; 1 gives it our one vCPU, an experiment), `TIMEOUT`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use crate::bench::require_root;
use crate::workspace_root;

/// The tests, in the order dom0 runs them.
const TESTS: [&str; 4] = ["tcp-up", "tcp-down", "udp", "ping"];
/// The tests that measure throughput (the first table's rows).
const THROUGHPUT_TESTS: [&str; 3] = ["tcp-up", "tcp-down", "udp"];

/// One `QFW-BENCH result` line.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    fw: String,
    test: String,
    /// The round (from 1) the run belongs to; `None` in logs from before
    /// rounds were named.
    round: Option<u32>,
    mbit: Option<f64>,
    /// (lost, total) datagrams of a UDP run.
    loss: Option<(u64, u64)>,
    /// The TCP sender's retransmitted segments (iperf3's `Retr`).
    retr: Option<u64>,
    rc: Option<i32>,
    fw_cpu_s: Option<f64>,
    wall_s: Option<f64>,
    /// Interrupts the client took for its vif (the firewall's
    /// notifications to it) over the run.
    client_irqs: Option<u64>,
    /// Packets the client's eth0 received plus those it sent.
    client_pkts: Option<u64>,
    /// Interrupts dom0 took for the firewall's uplink vif.
    dom0_irqs: Option<u64>,
    /// The mean round trip (ms) of the client's pings to dom0 during the
    /// run (busybox ping's `avg`).
    rtt_ms: Option<f64>,
    /// Echo replies the client received.
    pings: Option<u64>,
}

impl Run {
    /// Whether the run measured what it is for: a throughput, or for the
    /// ping test a round trip.
    fn failed(&self) -> bool {
        self.rc != Some(0)
            || if self.test == "ping" {
                self.rtt_ms.is_none()
            } else {
                self.mbit.is_none()
            }
    }
}

/// The `key=value` words of a line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn parse_run(line: &str) -> Option<Run> {
    let rest = &line[line.find("QFW-BENCH result ")? + "QFW-BENCH result ".len()..];
    let f = fields(rest);
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok());
    let int = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
    let loss = f.get("loss").and_then(|v| {
        let (lost, total) = v.split_once('/')?;
        Some((lost.parse().ok()?, total.parse().ok()?))
    });
    Some(Run {
        fw: f.get("fw")?.to_string(),
        test: f.get("test")?.to_string(),
        round: f.get("round").and_then(|v| v.parse().ok()),
        mbit: num("mbit"),
        loss,
        retr: f.get("retr").and_then(|v| v.parse().ok()),
        rc: f.get("rc").and_then(|v| v.parse().ok()),
        fw_cpu_s: num("fw_cpu_s"),
        wall_s: num("wall_s"),
        client_irqs: int("client_irqs"),
        client_pkts: int("client_rx_pkts")
            .zip(int("client_tx_pkts"))
            .map(|(rx, tx)| rx + tx),
        dom0_irqs: int("dom0_vif_irqs"),
        rtt_ms: f
            .get("rtt_ms")
            .and_then(|v| v.split('/').nth(1)?.parse().ok()),
        pings: int("pings"),
    })
}

/// `QFW-BENCH memory fw=… key=value…` lines: firewall → its fields.
fn parse_memory(log: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let Some(at) = line.find("QFW-BENCH memory ") else {
            continue;
        };
        let f = fields(&line[at..]);
        if let Some(fw) = f.get("fw") {
            out.insert(
                fw.to_string(),
                f.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
    }
    out
}

/// The lab's price of a hypercall from its `QFW-BENCH lab` line: from a
/// PVH guest (the minimal one, timed with and without the calls), the
/// kind of domain ours is, and from a dom0 process, PV as the Linux
/// firewall is here (empty without the line or its figures).
fn lab_calls(log: &str) -> String {
    let Some(line) = log.lines().find_map(|l| {
        l.find("QFW-BENCH lab ")
            .map(|at| &l[at + "QFW-BENCH lab ".len()..])
    }) else {
        return String::new();
    };
    let f = fields(line);
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok());
    let Some(calls) = num("calls").filter(|n| *n > 0.0) else {
        return String::new();
    };
    let pvh = num("pvh_calls_s")
        .zip(num("pvh_empty_s"))
        .map(|(with, without)| 1e6 * (with - without) / calls);
    let dom0 = num("dom0_calls_s").map(|s| 1e6 * s / calls);
    if pvh.is_none() && dom0.is_none() {
        return String::new();
    }
    format!(
        "lab: a hypercall takes {} µs from a PVH guest (ours' kind of domain), {} µs as a whole call from a process in the PV dom0 (system call, privcmd, hypercall; the Linux firewall is PV here); {calls:.0} calls each\n",
        show(pvh, 1),
        show(dom0, 1)
    )
}

/// Mean of the values present.
fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn show(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// The report of a run's log, and how many runs failed. Failed runs (a
/// firewall that crashed mid-series reports zero or nothing) are left out
/// of every figure and listed as warnings.
fn report(log: &str) -> Result<(String, usize), String> {
    let all: Vec<Run> = log.lines().filter_map(parse_run).collect();
    if all.is_empty() {
        return Err("no `QFW-BENCH result` line in the serial log: the lab did not get to the measurements (see the QFW-BENCH FAIL/info lines above and the log)".into());
    }
    // A failed run is left out, and with it the other firewall's run of
    // the same test in the same round, so that both means cover the same
    // rounds (the lab loses a firewall at random, not evenly).
    let partner_failed = |r: &Run| {
        r.round.is_some()
            && all
                .iter()
                .any(|o| o.fw != r.fw && o.test == r.test && o.round == r.round && o.failed())
    };
    let runs: Vec<Run> = all
        .iter()
        .filter(|r| !r.failed() && !partner_failed(r))
        .cloned()
        .collect();
    let of = |fw: &str, test: &str| -> Vec<&Run> {
        runs.iter()
            .filter(|r| r.fw == fw && r.test == test)
            .collect()
    };
    let mut out = String::new();
    out.push_str(&format!(
        "{:<9} {:>12} {:>12} {:>11} {:>11} {:>11} {:>12} {:>12}\n",
        "test",
        "ours Mbit/s",
        "Linux Mbit/s",
        "ours/Linux",
        "ours CPU s",
        "Linux CPU s",
        "ours loss",
        "Linux loss"
    ));
    for test in THROUGHPUT_TESTS {
        let (ours, linux) = (of("ours", test), of("linux", test));
        if ours.is_empty() && linux.is_empty() {
            continue;
        }
        let rate = |rs: &[&Run]| mean(rs.iter().map(|r| r.mbit));
        let cpu = |rs: &[&Run]| mean(rs.iter().map(|r| r.fw_cpu_s));
        let loss = |rs: &[&Run]| -> String {
            let retr: Vec<u64> = rs.iter().filter_map(|r| r.retr).collect();
            if !retr.is_empty() {
                return format!("{} retr", retr.iter().sum::<u64>());
            }
            let (lost, total) = rs
                .iter()
                .filter_map(|r| r.loss)
                .fold((0, 0), |(a, b), (l, t)| (a + l, b + t));
            if total == 0 {
                "-".into()
            } else {
                format!("{:.1} %", 100.0 * lost as f64 / total as f64)
            }
        };
        let (ro, rl) = (rate(&ours), rate(&linux));
        let ratio = match (ro, rl) {
            (Some(o), Some(l)) if l > 0.0 => Some(100.0 * o / l),
            _ => None,
        };
        out.push_str(&format!(
            "{:<9} {:>12} {:>12} {:>11} {:>11} {:>11} {:>12} {:>12}\n",
            test,
            show(ro, 2),
            show(rl, 2),
            ratio.map_or_else(|| "-".into(), |r| format!("{r:.0} %")),
            show(cpu(&ours), 1),
            show(cpu(&linux), 1),
            loss(&ours),
            loss(&linux),
        ));
    }
    out.push_str(&events(&runs));
    out.push_str(&latency(&runs));
    out.push_str(&per_round(&runs));
    let failed: Vec<&Run> = all.iter().filter(|r| r.failed()).collect();
    if !failed.is_empty() {
        let unpaired = all
            .iter()
            .filter(|r| !r.failed() && partner_failed(r))
            .count();
        out.push_str(&format!(
            "warning: {} of {} runs failed and are left out of the figures above, with the other firewall's {} run(s) of the same test and round\n",
            failed.len(),
            all.len(),
            unpaired
        ));
    }
    // The lab lost our firewall and the bench started it again; a
    // firewall domain that crashed leaves only Xen's word on it.
    for line in log.lines() {
        let Some(at) = line.find("QFW-BENCH info ") else {
            continue;
        };
        let info = line[at + "QFW-BENCH info ".len()..].trim();
        if info.starts_with("ours lost ") {
            out.push_str(&format!("warning: {info}\n"));
        } else if let Some(xen) = info.strip_prefix("xen: ") {
            out.push_str(&format!("warning: Xen logged: {xen}\n"));
        }
    }
    for r in &failed {
        out.push_str(&format!(
            "warning: run {} through {} failed (rc {:?}, {} s)\n",
            r.test,
            r.fw,
            r.rc,
            show(r.wall_s, 1)
        ));
    }
    let memory = parse_memory(log);
    for (fw, name) in [("ours", "ours "), ("linux", "Linux")] {
        let Some(m) = memory.get(fw) else {
            out.push_str(&format!("memory {name}: not reported\n"));
            continue;
        };
        let get = |k: &str| m.get(k).map_or("?", String::as_str);
        let used = if fw == "ours" {
            format!(
                "heap in use {} of {} KiB",
                get("heap_used_kib"),
                get("heap_total_kib")
            )
        } else {
            format!(
                "in use (MemTotal - MemAvailable) {} of {} KiB",
                get("used_kib"),
                get("total_kib")
            )
        };
        out.push_str(&format!(
            "memory {name}: domain {} MiB, {} vCPU, {used}\n",
            get("domain_mib"),
            get("vcpus")
        ));
    }
    out.push_str(&lab_calls(log));
    out.push_str("loss: datagrams lost in a UDP run; in a TCP row the sender's retransmitted segments (iperf3's Retr), over all rounds.\n");
    out.push_str("CPU s: the firewall domain's `xl list` Time(s) over the run (TCG: compare, do not read as absolute).\n");
    Ok((out, failed.len()))
}

/// Each TCP test's ratio ours/Linux round by round, where both runs of a
/// round measured, with their mean and its 95 % interval and how many
/// rounds reached 100 % (empty with fewer
/// than two such rounds): the spread from round to round, which in this
/// lab is wider than most changes one would measure.
fn per_round(runs: &[Run]) -> String {
    let mut out = String::new();
    for test in ["tcp-up", "tcp-down"] {
        let mut ratios: Vec<(u32, f64)> = Vec::new();
        for ours in runs.iter().filter(|r| r.fw == "ours" && r.test == test) {
            let Some(round) = ours.round else { continue };
            let linux = runs
                .iter()
                .find(|r| r.fw == "linux" && r.test == test && r.round == Some(round));
            if let (Some(o), Some(l)) = (ours.mbit, linux.and_then(|l| l.mbit))
                && l > 0.0
            {
                ratios.push((round, 100.0 * o / l));
            }
        }
        if ratios.len() < 2 {
            continue;
        }
        ratios.sort_by_key(|(round, _)| *round);
        if out.is_empty() {
            out.push_str("by round  ours/Linux in each round (both runs measured)\n");
        }
        let cells: Vec<String> = ratios
            .iter()
            .map(|(round, r)| format!("{round}: {r:.0} %"))
            .collect();
        let values: Vec<f64> = ratios.iter().map(|(_, r)| *r).collect();
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let met = values.iter().filter(|r| **r >= 100.0).count();
        let (mean, half) = mean_and_interval(&values);
        out.push_str(&format!(
            "{test:<9} {}   (range {low:.0}-{high:.0} %, mean {mean:.1} %, 95 % interval {:.1}-{:.1} %, {met} of {} rounds at 100 % or more)\n",
            cells.join(", "),
            mean - half,
            mean + half,
            ratios.len()
        ));
    }
    out
}

/// The mean of `values` (at least two) and the half-width of its 95 %
/// confidence interval (Student's t with n - 1 degrees of freedom): whether
/// a run's rounds can tell the ratio from 100 % at all.
fn mean_and_interval(values: &[f64]) -> (f64, f64) {
    // t(0.975, df) for df = 1..=10; 2.0 beyond (2.04 at 30, 1.96 at infinity).
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    let n = values.len();
    if n < 2 {
        return (values.first().copied().unwrap_or(0.0), f64::INFINITY);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T.get(n - 2).copied().unwrap_or(2.0);
    (mean, t * (variance / n as f64).sqrt())
}

/// The notifications each firewall sent its client and dom0, per 1,000
/// packets the client received and sent (empty when no run counted them).
fn events(runs: &[Run]) -> String {
    let per_thousand = |fw: &str, test: &str, count: fn(&Run) -> Option<u64>| {
        let (events, packets) = runs
            .iter()
            .filter(|r| r.fw == fw && r.test == test)
            .filter_map(|r| Some((count(r)?, r.client_pkts?)))
            .fold((0u64, 0u64), |(e, p), (de, dp)| (e + de, p + dp));
        (packets > 0).then(|| format!("{:.0}", 1000.0 * events as f64 / packets as f64))
    };
    let mut out = String::new();
    for test in TESTS {
        let cells = [
            per_thousand("ours", test, |r| r.client_irqs),
            per_thousand("linux", test, |r| r.client_irqs),
            per_thousand("ours", test, |r| r.dom0_irqs),
            per_thousand("linux", test, |r| r.dom0_irqs),
        ];
        if cells.iter().all(Option::is_none) {
            continue;
        }
        if out.is_empty() {
            out.push_str(&format!(
                "{:<9} {:>12} {:>12} {:>11} {:>11}   (firewall's notifications per 1,000 client packets)\n",
                "events", "ours>client", "Linux>client", "ours>dom0", "Linux>dom0"
            ));
        }
        let [a, b, c, d] = cells.map(|c| c.unwrap_or_else(|| "-".into()));
        out.push_str(&format!("{test:<9} {a:>12} {b:>12} {c:>11} {d:>11}\n"));
    }
    out
}

/// The mean round trip through each firewall: idle (the ping test) and
/// under each TCP run's load (empty when no run measured one).
fn latency(runs: &[Run]) -> String {
    let rtt = |fw: &str, test: &str| {
        mean(
            runs.iter()
                .filter(|r| r.fw == fw && r.test == test)
                .map(|r| r.rtt_ms),
        )
    };
    let mut out = String::new();
    for (test, label) in [
        ("ping", "idle"),
        ("tcp-up", "tcp-up"),
        ("tcp-down", "tcp-down"),
    ] {
        let (ours, linux) = (rtt("ours", test), rtt("linux", test));
        if ours.is_none() && linux.is_none() {
            continue;
        }
        if out.is_empty() {
            out.push_str(&format!(
                "{:<9} {:>12} {:>12} {:>11}   (ping client -> dom0, mean round trip; idle: ping -A, the next ping when the reply is in)\n",
                "rtt", "ours ms", "Linux ms", "ours/Linux"
            ));
        }
        let ratio = match (ours, linux) {
            (Some(o), Some(l)) if l > 0.0 => format!("{:.0} %", 100.0 * o / l),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{label:<9} {:>12} {:>12} {ratio:>11}\n",
            show(ours, 3),
            show(linux, 3)
        ));
    }
    let pings = |fw: &str| {
        let n: u64 = runs
            .iter()
            .filter(|r| r.fw == fw && r.test == "ping")
            .filter_map(|r| r.pings)
            .sum();
        (n > 0).then_some(n)
    };
    if let (Some(o), Some(l)) = (pings("ours"), pings("linux")) {
        out.push_str(&format!(
            "pings     {o:>12} {l:>12} {:>11}   (replies in the idle ping runs, all rounds)\n",
            format!("{:.0} %", 100.0 * o as f64 / l.max(1) as f64)
        ));
    }
    out
}

pub fn bench_xen() -> Result<(), String> {
    require_root()?;
    let root = workspace_root();
    let lab = std::env::var_os("LAB")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("qubes-fw-xen-bench"));
    let log = lab.join("out/bench-serial.log");
    let _ = std::fs::remove_file(&log);
    let status = Command::new(root.join("tests/xen/bench.sh"))
        .env("LAB", &lab)
        .status()
        .map_err(|e| format!("cannot start tests/xen/bench.sh: {e}"))?;
    let text = std::fs::read_to_string(&log)
        .map_err(|e| format!("{}: {e} (bench.sh exited with {status})", log.display()))?;
    let (table, failed) = report(&text)?;
    println!(
        "\n== cargo xtask bench xen: ours (image, 16 MiB) vs Linux sys-firewall, Xen under QEMU TCG =="
    );
    print!("{table}");
    println!("serial log: {}", log.display());
    if !status.success() {
        Err(format!("tests/xen/bench.sh exited with {status}"))
    } else if failed > 0 {
        Err(format!(
            "{failed} iperf3 run(s) failed (see the warnings and the QFW-BENCH info lines above)"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of the `nth` line of `text` (from 0) whose first word is
    /// `name`: a row of one of the report's tables.
    fn cells(text: &str, name: &str, nth: usize) -> Vec<String> {
        text.lines()
            .filter(|l| l.split_whitespace().next() == Some(name))
            .nth(nth)
            .unwrap_or_else(|| panic!("no row {nth} named {name} in {text}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    const LOG: &str = "\
[ 12.00] QFW-BENCH result fw=ours test=tcp-up mbit=10.0 loss= retr=7 rc=0 fw_cpu_s=9.5 client_cpu_s=3.0 dom0_cpu_s=2.0 wall_s=11.2
[ 13.00] QFW-BENCH result fw=linux test=tcp-up mbit=40.0 loss= rc=0 fw_cpu_s=4.5 client_cpu_s=3.0 dom0_cpu_s=2.0 wall_s=11.0
[ 14.00] QFW-BENCH result fw=ours test=udp mbit=5.0 loss=10/100 rc=0 fw_cpu_s=9.0 client_cpu_s=3.0 dom0_cpu_s=2.0 wall_s=11.0
[ 15.00] QFW-BENCH result fw=linux test=udp mbit= loss= rc=1 fw_cpu_s=0.1 client_cpu_s=0.1 dom0_cpu_s=0.1 wall_s=40.0
[ 16.00] QFW-BENCH memory fw=ours domain_mib=16 vcpus=1 heap_used_kib=900 heap_total_kib=12000
";

    #[test]
    fn parses_a_result_line() {
        let r = parse_run(LOG.lines().nth(2).unwrap_or_default()).expect("a run");
        assert_eq!(r.fw, "ours");
        assert_eq!(r.test, "udp");
        assert_eq!(r.mbit, Some(5.0));
        assert_eq!(r.loss, Some((10, 100)));
        assert_eq!(r.fw_cpu_s, Some(9.0));
        assert!(parse_run("QFW-BENCH info something").is_none());
    }

    #[test]
    fn report_has_the_ratio_loss_failures_and_memory() {
        let (text, failed) = report(LOG).expect("a report");
        assert_eq!(failed, 1);
        let up = text
            .lines()
            .find(|l| l.starts_with("tcp-up"))
            .expect("tcp-up row");
        assert!(up.contains("25 %"), "{up}");
        // Ours reported 7 retransmissions; Linux's line (an older client) none.
        assert!(up.contains("7 retr"), "{up}");
        assert_eq!(up.matches("retr").count(), 1, "{up}");
        let udp = text
            .lines()
            .find(|l| l.starts_with("udp"))
            .expect("udp row");
        assert!(udp.contains("10.0 %"), "{udp}");
        assert!(text.contains("warning: run udp through linux failed"));
        assert!(text.contains("heap in use 900 of 12000 KiB"));
        assert!(text.contains("memory Linux: not reported"));
        assert!(!text.contains("tcp-down"));
    }

    #[test]
    fn notifications_are_counted_per_thousand_client_packets() {
        let log = "\
QFW-BENCH result fw=ours test=tcp-down mbit=300 loss= retr=0 rc=0 client_irqs=500 client_rx_pkts=1500 client_tx_pkts=500 wall_s=11 dom0_vif_irqs=250
QFW-BENCH result fw=ours test=tcp-down mbit=310 loss= retr=0 rc=0 client_irqs=700 client_rx_pkts=1500 client_tx_pkts=500 wall_s=11 dom0_vif_irqs=350
QFW-BENCH result fw=linux test=tcp-down mbit=320 loss= retr=0 rc=0 client_irqs=1200 client_rx_pkts=1000 client_tx_pkts=500 wall_s=11
";
        let (text, failed) = report(log).expect("a report");
        assert_eq!(failed, 0);
        assert!(text.contains("ours>client"), "{text}");
        // Ours: 1200 events to the client and 600 to dom0 over 4000
        // packets; Linux: 1200 over 1500, nothing counted for dom0.
        assert_eq!(
            cells(&text, "tcp-down", 1),
            ["tcp-down", "300", "800", "150", "-"]
        );
        // Without counts (an older lab) there is no events table.
        assert!(!report(LOG).expect("a report").0.contains("ours>client"));
    }

    #[test]
    fn round_trips_idle_and_under_load_are_reported() {
        let log = "\
QFW-BENCH result fw=ours test=tcp-down mbit=300 loss= retr=0 rc=0 wall_s=11 rtt_ms=1.0/4.0/9.0 pings=50
QFW-BENCH result fw=linux test=tcp-down mbit=320 loss= retr=0 rc=0 wall_s=11 rtt_ms=1.0/2.0/5.0 pings=50
QFW-BENCH result fw=ours test=ping mbit= loss= retr= rc=0 wall_s=11 rtt_ms=0.200/0.300/1.000 pings=30000
QFW-BENCH result fw=ours test=ping mbit= loss= retr= rc=0 wall_s=11 rtt_ms=0.200/0.500/1.000 pings=20000
QFW-BENCH result fw=linux test=ping mbit= loss= retr= rc=0 wall_s=11 rtt_ms=0.100/0.200/0.900 pings=40000
";
        let (text, failed) = report(log).expect("a report");
        // A ping run has no throughput and has not failed for that.
        assert_eq!(failed, 0, "{text}");
        assert_eq!(
            cells(&text, "idle", 0),
            ["idle", "0.400", "0.200", "200", "%"]
        );
        assert_eq!(
            cells(&text, "pings", 0),
            [
                "pings", "50000", "40000", "125", "%", "(replies", "in", "the", "idle", "ping",
                "runs,", "all", "rounds)"
            ]
        );
        // The second tcp-down row is the rtt table's.
        assert_eq!(
            cells(&text, "tcp-down", 1).get(1).map(String::as_str),
            Some("4.000")
        );
        // No ping row in the throughput table (the lines before the
        // first other table's header).
        let throughput: Vec<&str> = text
            .lines()
            .take_while(|l| !l.starts_with("events") && !l.starts_with("rtt"))
            .collect();
        assert!(
            throughput.first().is_some_and(|l| l.starts_with("test")),
            "{text}"
        );
        assert!(!throughput.iter().any(|l| l.starts_with("ping")), "{text}");
        // A ping run without a round trip failed.
        let (_, failed) = report(
            "QFW-BENCH result fw=ours test=ping mbit= loss= rc=1 wall_s=40 rtt_ms= pings=\n",
        )
        .expect("a report");
        assert_eq!(failed, 1);
        // Without round trips (an older lab) there is no rtt table.
        assert!(!report(LOG).expect("a report").0.contains("rtt"));
    }

    #[test]
    fn failed_runs_are_left_out_of_the_means_and_xen_crashes_are_shown() {
        let log = "\
QFW-BENCH result fw=ours test=tcp-up mbit=400 loss= retr=0 rc=0 wall_s=11 rtt_ms=1/6.0/9 pings=50
QFW-BENCH result fw=linux test=tcp-up mbit=400 loss= retr=0 rc=0 wall_s=11 rtt_ms=1/6.0/9 pings=50
QFW-BENCH result fw=ours test=tcp-up mbit=0.00 loss= retr=1 rc=1 wall_s=41 rtt_ms=1/9.0/9 pings=25
QFW-BENCH result fw=linux test=tcp-up mbit=420 loss= retr=0 rc=0 wall_s=11 rtt_ms=1/7.0/9 pings=50
[ 236.72] (XEN) d1v0 Triple fault - invoking HVM shutdown action 1
QFW-BENCH info xen: (XEN) d1v0 Triple fault - invoking HVM shutdown action 1
";
        let (text, failed) = report(log).expect("a report");
        assert_eq!(failed, 1);
        let up = cells(&text, "tcp-up", 0);
        // Ours: 400 (the crashed run's 0 left out); Linux: the mean of 400 and 420.
        assert_eq!(up[1..4], ["400.00", "410.00", "98"], "{text}");
        assert!(
            text.contains("warning: 1 of 4 runs failed and are left out"),
            "{text}"
        );
        assert!(
            text.contains("warning: Xen logged: (XEN) d1v0 Triple fault"),
            "{text}"
        );
        // Ours' round trip leaves out the crashed run's 9.0 (the mean
        // would be 7.500); Linux's is the mean of 6.0 and 7.0.
        assert_eq!(cells(&text, "tcp-up", 1)[1..3], ["6.000", "6.500"]);
    }

    #[test]
    fn a_failed_run_takes_the_other_firewalls_run_of_its_round_out_and_restarts_are_shown() {
        let log = "\
QFW-BENCH result fw=ours test=tcp-up round=1 mbit=400 loss= retr=0 rc=0 wall_s=11
QFW-BENCH result fw=linux test=tcp-up round=1 mbit=420 loss= retr=0 rc=0 wall_s=11
QFW-BENCH result fw=ours test=tcp-down round=1 mbit=380 loss= retr=0 rc=0 wall_s=11
QFW-BENCH result fw=linux test=tcp-down round=1 mbit=400 loss= retr=0 rc=0 wall_s=11
QFW-BENCH result fw=ours test=tcp-up round=2 mbit=0.00 loss= retr=1 rc=1 wall_s=41
QFW-BENCH info ours lost before run 6 (state ---c--); restarting it and client-ours
QFW-BENCH result fw=linux test=tcp-up round=2 mbit=300 loss= retr=0 rc=0 wall_s=11
QFW-BENCH result fw=ours test=tcp-down round=2 mbit=390 loss= retr=0 rc=0 wall_s=11
QFW-BENCH result fw=linux test=tcp-down round=2 mbit=380 loss= retr=0 rc=0 wall_s=11
";
        let (text, failed) = report(log).expect("a report");
        assert_eq!(failed, 1);
        // Round 2's upload through Linux (300) goes with ours' failed one:
        // both upload means are round 1's.
        assert_eq!(
            cells(&text, "tcp-up", 0)[1..4],
            ["400.00", "420.00", "95"],
            "{text}"
        );
        // Both downloads of round 2 count (ours came back).
        assert_eq!(
            cells(&text, "tcp-down", 0)[1..4],
            ["385.00", "390.00", "99"],
            "{text}"
        );
        assert!(
            text.contains("warning: 1 of 8 runs failed and are left out of the figures above, with the other firewall's 1 run(s)"),
            "{text}"
        );
        assert!(
            text.contains("warning: ours lost before run 6 (state ---c--); restarting it"),
            "{text}"
        );
    }

    #[test]
    fn the_interval_of_the_mean_follows_students_t() {
        let (mean, half) = mean_and_interval(&[1.0, 2.0, 3.0]);
        assert!((mean - 2.0).abs() < 1e-9);
        // s = 1, n = 3: t(2) = 4.303 times 1 / sqrt(3).
        assert!((half - 4.303 / 3f64.sqrt()).abs() < 1e-9, "{half}");
        // Beyond ten degrees of freedom, t is taken as 2.
        let twelve = [10.0, 12.0].repeat(6);
        let (mean, half) = mean_and_interval(&twelve);
        assert!((mean - 11.0).abs() < 1e-9);
        let s = (12.0f64 / 11.0).sqrt();
        assert!((half - 2.0 * s / 12f64.sqrt()).abs() < 1e-9, "{half}");
        // Equal rounds: no spread.
        assert_eq!(mean_and_interval(&[100.0, 100.0]), (100.0, 0.0));
        // One round: no interval at all.
        assert!(mean_and_interval(&[95.0]).1.is_infinite());
    }

    #[test]
    fn each_rounds_ratio_is_listed_with_the_range_and_the_rounds_that_reach_linux() {
        let mut log = String::new();
        for (round, ours_up, linux_up, ours_down, linux_down) in [
            (1, 400, 440, 380, 400),
            (2, 430, 420, 0, 410),
            (3, 390, 390, 360, 400),
        ] {
            let rc = |mbit: u32| if mbit == 0 { 1 } else { 0 };
            for (fw, test, mbit) in [
                ("ours", "tcp-up", ours_up),
                ("linux", "tcp-up", linux_up),
                ("ours", "tcp-down", ours_down),
                ("linux", "tcp-down", linux_down),
            ] {
                log.push_str(&format!(
                    "QFW-BENCH result fw={fw} test={test} round={round} mbit={mbit} loss= retr=0 rc={} wall_s=11\n",
                    rc(mbit)
                ));
            }
        }
        let (text, failed) = report(&log).expect("a report");
        assert_eq!(failed, 1);
        assert!(
            text.contains("by round  ours/Linux in each round (both runs measured)\n"),
            "{text}"
        );
        assert!(
            text.contains("tcp-up    1: 91 %, 2: 102 %, 3: 100 %   (range 91-102 %, mean 97.8 %, 95 % interval 82.7-112.8 %, 2 of 3 rounds at 100 % or more)\n"),
            "{text}"
        );
        // Round 2's download failed through ours: rounds 1 and 3 only.
        assert!(
            text.contains(
                "tcp-down  1: 95 %, 3: 90 %   (range 90-95 %, mean 92.5 %, 95 % interval 60.7-124.3 %, 0 of 2 rounds at 100 % or more)\n"
            ),
            "{text}"
        );
        // One round has no spread to show.
        let (one, _) = report(
            &log.lines()
                .take(4)
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        )
        .expect("a report");
        assert!(!one.contains("by round"), "{one}");
    }

    #[test]
    fn the_labs_price_of_a_hypercall_is_reported() {
        let log = format!(
            "[ 12.00] QFW-BENCH lab calls=100000 pvh_empty_s=0.48 pvh_calls_s=4.25 dom0_calls_s=2.30\n{LOG}"
        );
        let (text, _) = report(&log).expect("a report");
        assert!(
            text.contains("lab: a hypercall takes 37.7 µs from a PVH guest (ours' kind of domain), 23.0 µs as a whole call from a process in the PV dom0"),
            "{text}"
        );
        assert!(text.contains("100000 calls each\n"), "{text}");
        // A PVH guest that did not come up ("-") leaves its figure out.
        let log = format!(
            "QFW-BENCH lab calls=100000 pvh_empty_s=- pvh_calls_s=- dom0_calls_s=2.30\n{LOG}"
        );
        let (text, _) = report(&log).expect("a report");
        assert!(text.contains("takes - µs from a PVH guest"), "{text}");
        // Older logs have no lab line.
        let (text, _) = report(LOG).expect("a report");
        assert!(!text.contains("lab:"), "{text}");
    }

    #[test]
    fn no_results_is_an_error() {
        assert!(report("QFW-BENCH FAIL the Linux firewall did not come up\n").is_err());
    }
}
