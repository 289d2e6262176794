//! `cargo xtask soak [SECONDS] [--pin] [--control] [--phases a,b]`: the hosted firewall
//! under load and under attack, in a box of its own with 100 client qubes
//! (root).
//!
//! The box (`qubes-box up --clients 100`, state `/run/qubes-box-soak`,
//! namespaces `qs-*`, release firewall) is timed coming up. Every process
//! of the box but the firewall's and sys-net's is then niced (19), and so
//! is every attacker: on Qubes, dom0's daemons and the other qubes run on
//! CPUs of their own, here they share 2 with the firewall, and the figures
//! are to measure the firewall. Three well-behaved clients load it for the
//! whole run: client3 and client4 download `GET /bytes/30000000` from
//! sys-net's HTTP server in a loop (throughput, reported every 0.2 s),
//! client5 fetches `GET /` every 0.1 s (latency); both are `soak/load.py` in
//! the client's namespace. (HTTP rather than iperf3: the box restarts its
//! own HTTP server with sys-net, an iperf3 server would die with the first
//! restart.) The run is cut into phases: `before`, one per attack, `after`;
//! each attack is preceded by a quiet window of half its length, and its
//! ratio is its throughput over that window's (the machine's other load
//! drifts; a ratio to a `before` minutes earlier measured that drift). The
//! firewall's CPU use per attack says whether it was the bottleneck (near
//! 100 %, one core) or the machine was. The attacks:
//! - `syn`, `udp`: client10 floods SYNs / UDP to random ports (denied) and to
//!   allowed TCP 80 / DNS from random source ports (one NAT entry each: the
//!   client's NAT share fills up);
//! - `fragments`: client11 sends IPv4 and IPv6 first fragments that never
//!   complete and overlapping fragments (an allowed TCP 80 header rewritten
//!   at offset 0 to a denied port);
//! - `icmp-spoof`: client12 sends ICMP and ICMPv6 errors quoting flows that
//!   do not exist, and packets from random spoofed IPv4/IPv6 sources;
//!   (all four: `soak/attack.py`, hand-built frames on the client's eth0,
//!   at most [`ATTACK_RATE`] frames a second);
//! - `qrexec`: dom0 makes [`QREXEC_CONCURRENT`] concurrent
//!   `qubes.FirewallStatus` calls to the firewall and, beside them,
//!   [`QREXEC_SEQUENTIAL`] sequential ones (a full-length run, [`FULL_SECONDS`]
//!   or more; shorter runs scale the count down and say so); the phase lasts
//!   until they are done (the firewall's own qrexec counters, `refused_busy`
//!   included, are printed with them);
//! - `qrexec-vm`: [`QREXEC_CONCURRENT`] concurrent `test.Add` calls between
//!   clients (client6..9 to client20..39) through dom0's policy daemon, and
//!   sequential ones beside them for the phase (the firewall sees none of
//!   this; it measures the box's qrexec under the same load);
//! - `qubesdb`: client50's rules rewritten [`RULES_PER_SECOND`] times a
//!   second over one long-lived QubesDB connection (as qubesd keeps one;
//!   the rate reached is printed) while client101 is added, makes one HTTP
//!   request (NAT entries for its removal to take away) and is removed, in
//!   a loop;
//! - `sys-net`: sys-net restarted every 2 s. Every restart cuts the
//!   connections through it and its server restarts with it, so this
//!   phase's throughput falls by design and its ratio is not judged; what
//!   is reported is the recovery: per restart, the time until client5's
//!   next request sent after it is answered. Downloads cut by a restart
//!   stall until their 5 s timeout, so `after` starts once both
//!   downloading clients have finished two downloads again, and the wait
//!   is printed; none within 30 s is a hang.
//!
//! Every packet an attack sends that the client's rules deny carries the
//! marker `QSOAKDENY`; `soak/sink.py` in sys-net counts every frame with it
//! (restarted with sys-net). A canary (an allowed SYN from client3, marked
//! `QSOAKCANARY`) is sent first: if the sink does not count it, the run
//! fails, since it could not see a leak either. After each phase:
//! `qubes.FirewallStatus` over qrexec (drops by reason, NAT entries, the
//! heap in use and its high-water mark from the firewall's counting
//! allocator; no answer within 15 s is a hang), the firewall's VmRSS/VmHWM
//! from `/proc`, whether its process is still the same.
//!
//! It prints one table (per phase: length, the firewall's CPU, throughput
//! before and during, ratio, latency, memory, heap, NAT entries, leaked
//! packets, what the attack did), the attacks below the 80 % goal, the
//! sys-net recovery, the load average at the start and end, then the drops
//! by reason per phase, and fails on a crash (firewall process gone or
//! replaced, or `panicked` in its log), a hang, a leaked denied packet, a
//! leaked NAT entry (the table holds more entries than the attached clients
//! own, from `qubes.FirewallStatus`), or memory growth: VmRSS after the
//! `after` phase above [`GROWTH_PERCENT`] % more than VmHWM after the first
//! attack phase plus [`GROWTH_SLACK_KIB`], or the same of the heap's
//! high-water mark (tables are allocated up front; a later phase that
//! keeps growing is a leak). Throughput ratios are reported, not judged:
//! a 2-core machine shared with other work gives them a noise no
//! threshold survives; the table shows them with the firewall's CPU.
//!
//! `--pin` places the firewall on a CPU of its own (the last) and every
//! other process of the run (the box's daemons, sys-net, the clients, the
//! load and the attackers) on the others, with `taskset`, and steers the
//! receiving side's kernel work for the frames the firewall writes (the
//! bridge, the veth, the receiving qube's TCP stack) to those CPUs with
//! `rps_cpus` on the firewall namespace's devices: on Qubes the firewall
//! has its own vCPU, its attackers and the qubes it delivers to run on
//! other VMs' vCPUs.
//! Without it (the default, what CI runs) the scheduler shares every CPU
//! between them, so an attacker's own CPU use shows up as the firewall's
//! loss. The table says which it was.
//!
//! `--control` adds a same-run baseline: a control load, one download
//! like client3's (`soak/load.py`, `GET /bytes/30000000` in a loop), from
//! `qsk-client1` through a Linux kernel forwarding path (`bench box`'s:
//! a namespace with `ip_forward`, an nftables forward filter and
//! `masquerade`) to a server of its own (the box's `serve-http` in
//! `qsk-sys-net`: sys-net's namespace is replaced by every restart of the
//! `sys-net` phase, a link into it would go with it, and the control would
//! then measure the restarts). It runs for the whole run beside the
//! well-behaved load, never attacked, at nice 0 outside the others' cgroup
//! as that load is. The table then shows, beside each phase's ratio, the
//! control's MB/s in the same quiet window and during the attack, its
//! ratio, and ours over it: what the machine's shared CPUs lose is in
//! both, what is left is ours. Off by default: a bulk download through the
//! kernel takes as much CPU as it gets (on 2 cores, a share the firewall,
//! the load and the attackers otherwise have), so it changes the run CI
//! makes; with it, every runnable process at nice 0 also shrinks the
//! others' cgroup's share a little (one entity among more).
//!
//! `--phases a,b` runs only the named attack phases (in that order), each
//! with its quiet window, between `before` and `after`; the phase length
//! comes from the run time over the phases run. Besides the phases above
//! it takes `qubesdb-rules` and `qubesdb-clients`, the `qubesdb` phase's
//! rules rewrites alone and its client add/fetch/remove loop alone (never
//! run by default). Without it every phase runs (what CI runs).
//!
//! `SOAK_FIREWALL=PATH` runs another build of the firewall (an older
//! commit's, for a before/after under the same conditions).
//!
//! Needs python3 (the attack, sink and load scripts, standard library
//! only), iproute2, renice (bsdutils) and taskset (util-linux), with
//! `--control` also nftables and procps; missing packages are installed
//! with apt-get. Everything it creates (the box's namespaces and state dir,
//! the control's `qsk-*` namespaces, processes it starts) is removed again,
//! also when a step fails; the scripts and the sinks' counts stay in
//! `target/soak/`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bench::{
    BoxUp, KernelPath, build_box, build_kernel_path, ensure_tools, quiet, require_root,
};

/// The box's state dir and namespace prefix (distinct from the other
/// boxes: the test suite, the demo, the benchmark).
const STATE: &str = "/run/qubes-box-soak";
const PREFIX: &str = "qs-";
/// Client qubes in the box.
const CLIENTS: u16 = 100;
/// Default run time.
const DEFAULT_SECONDS: u64 = 120;
/// Frames a second per attacking client.
const ATTACK_RATE: u32 = 20_000;
/// Concurrent qrexec calls in the qrexec phases.
const QREXEC_CONCURRENT: usize = 1000;
/// Sequential qrexec calls to the firewall in a full-length run.
const QREXEC_SEQUENTIAL: u64 = 10_000;
/// The run length with full counts; shorter runs scale them down.
const FULL_SECONDS: u64 = 600;
/// Client rules rewrites a second in the qubesdb phase.
const RULES_PER_SECOND: f64 = 100.0;
/// sys-net restarted this often in its phase.
const SYS_NET_EVERY: Duration = Duration::from_secs(2);
/// Memory growth allowed between the first attack phase and the end.
const GROWTH_PERCENT: u64 = 25;
const GROWTH_SLACK_KIB: u64 = 2048;
/// The goal for the well-behaved clients' throughput during an attack,
/// over the quiet window before it (reported, not judged: see the docs).
const RATIO_GOAL: f64 = 0.8;

const ATTACK_PY: &str = include_str!("soak/attack.py");
const SINK_PY: &str = include_str!("soak/sink.py");
const LOAD_PY: &str = include_str!("soak/load.py");

/// The phases in order; the attack of each is started by [`start_attack`].
const PHASES: &[&str] = &[
    "before",
    "syn",
    "udp",
    "fragments",
    "icmp-spoof",
    "qrexec",
    "qrexec-vm",
    "qubesdb",
    "sys-net",
    "after",
];

/// Phases `--phases` may name besides [`PHASES`]' attacks, never run by
/// default: the `qubesdb` phase's two halves alone (to tell which costs).
const EXTRA_PHASES: &[&str] = &["qubesdb-rules", "qubesdb-clients"];

/// The phases to run: all of [`PHASES`] without a selection; with one
/// (`--phases a,b`, names of attack phases or [`EXTRA_PHASES`]), `before`,
/// the named attacks in the order given, `after`.
fn select_phases(list: Option<&str>) -> Result<Vec<&'static str>, String> {
    let Some(list) = list else {
        return Ok(PHASES.to_vec());
    };
    let mut selected = vec!["before"];
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let known = PHASES
            .iter()
            .chain(EXTRA_PHASES)
            .find(|p| **p == name && !matches!(**p, "before" | "after"))
            .ok_or_else(|| {
                format!(
                    "soak: unknown attack phase {name:?} (known: {})",
                    PHASES[1..PHASES.len() - 1]
                        .iter()
                        .chain(EXTRA_PHASES)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        if !selected.contains(known) {
            selected.push(known);
        }
    }
    if selected.len() < 2 {
        return Err("soak: --phases names no attack phase".into());
    }
    selected.push("after");
    Ok(selected)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: cargo xtask soak [SECONDS] [--pin] [--control] [--phases a,b]";
    let mut seconds = DEFAULT_SECONDS;
    let mut pin = false;
    let mut control = false;
    let mut phase_list = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--pin" {
            pin = true;
        } else if arg == "--control" {
            control = true;
        } else if arg == "--phases" {
            phase_list = Some(
                args.next()
                    .map(String::as_str)
                    .ok_or_else(|| format!("soak: --phases needs a list ({usage})"))?,
            );
        } else if let Some(list) = arg.strip_prefix("--phases=") {
            phase_list = Some(list);
        } else {
            seconds = arg
                .parse::<u64>()
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| format!("soak: {arg:?} is not a number of seconds ({usage})"))?;
        }
    }
    let phases = select_phases(phase_list)?;
    require_root()?;
    ensure_tools(&[
        ("ip", "iproute2"),
        ("python3", "python3"),
        ("renice", "bsdutils"),
        ("taskset", "util-linux"),
    ])?;
    if control {
        // The control's kernel path (bench box's).
        ensure_tools(&[("nft", "nftables"), ("sysctl", "procps")])?;
    }
    let bin = build_box(true)?;
    // SOAK_FIREWALL: another build of the firewall to measure (an older
    // commit's, for a before/after in the same conditions).
    let firewall = match std::env::var_os("SOAK_FIREWALL") {
        Some(path) => PathBuf::from(path),
        None => bin
            .parent()
            .map(|target| target.join("release").join("qubes-firewall-hosted"))
            .ok_or("soak: no target directory")?,
    };
    println!("soak: firewall {}", firewall.display());
    let scripts = bin
        .parent()
        .map(|target| target.join("soak"))
        .ok_or("soak: no target directory")?;
    std::fs::create_dir_all(&scripts).map_err(|e| format!("{}: {e}", scripts.display()))?;
    for (name, text) in [
        ("attack.py", ATTACK_PY),
        ("sink.py", SINK_PY),
        ("load.py", LOAD_PY),
    ] {
        std::fs::write(scripts.join(name), text)
            .map_err(|e| format!("{}: {e}", scripts.join(name).display()))?;
    }
    let placement = if pin { Placement::pin()? } else { None };
    soak(
        &bin, &firewall, &scripts, seconds, &phases, placement, control,
    )
}

/// `--pin`: the firewall on a CPU of its own, every other process of the
/// run on the others, as on Qubes, where sys-firewall has its own vCPU and
/// the clients, sys-net and dom0 run on theirs. Without it the scheduler
/// shares every CPU between the firewall, the load and the attackers.
#[derive(Clone, Copy)]
struct Placement {
    /// The firewall's CPU (the last one).
    firewall: usize,
    /// How many CPUs the rest shares (0 up to the firewall's).
    others: usize,
}

impl Placement {
    /// Pins this process (every thread: what it starts inherits the mask)
    /// to all CPUs but the last; the firewall moves to the last once it
    /// runs ([`Placement::place_firewall`]). `None`, said, on one CPU.
    fn pin() -> Result<Option<Placement>, String> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus < 2 {
            println!("soak: --pin needs 2 CPUs or more, this machine has {cpus}: not pinned");
            return Ok(None);
        }
        let placement = Placement {
            firewall: cpus - 1,
            others: cpus - 1,
        };
        quiet(
            "taskset",
            &[
                "-a",
                "-p",
                "-c",
                &placement.others_list(),
                &std::process::id().to_string(),
            ],
        )?;
        Ok(Some(placement))
    }

    fn others_list(&self) -> String {
        format!("0-{}", self.others - 1)
    }

    /// Moves the firewall (every thread) to its own CPU, and steers the
    /// kernel's receive work for what it writes to the others' CPUs: a
    /// frame written to a TAP is otherwise carried through the bridge,
    /// the veth and the receiving qube's whole TCP stack inside the
    /// firewall's `write` (a third of its time in a profile of the
    /// unpinned run), work that on Qubes the receiving qube's own vCPU
    /// does. Receive packet steering (`rps_cpus`) of every device in the
    /// firewall's namespace, the TAPs included, hands it to the others'
    /// CPUs.
    fn place_firewall(&self, pid: &str) -> Result<(), String> {
        quiet(
            "taskset",
            &["-a", "-p", "-c", &self.firewall.to_string(), pid],
        )?;
        let mask = format!("{:x}", (1u64 << self.others.min(63)) - 1);
        let script = format!(
            "for f in /sys/class/net/*/queues/rx-*/rps_cpus; do echo {mask} > \"$f\" || exit 1; done"
        );
        quiet(
            "ip",
            &[
                "netns",
                "exec",
                &format!("{PREFIX}sys-firewall"),
                "sh",
                "-c",
                &script,
            ],
        )
        .map(|_| ())
    }

    fn describe(this: Option<Placement>) -> String {
        match this {
            Some(p) => format!(
                "pinned (--pin): the firewall alone on CPU {}, every other process of the run on CPU {}, and the kernel's receive work for the frames the firewall writes steered there too (rps_cpus)",
                p.firewall,
                p.others_list()
            ),
            None => "not pinned: the firewall, the load and the attackers share every CPU (--pin: the firewall on a CPU of its own, as on Qubes)".to_string(),
        }
    }
}

/// A child process we started, killed (by its pid) and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One line of a load script, with when it arrived.
enum Sample {
    /// Bytes of a download that arrived (progress, about every 0.2 s).
    Bytes(u64),
    /// A whole download, and which client made it.
    Done(&'static str),
    Latency(f64),
    Failure,
}

/// The well-behaved clients' load: the scripts and what they reported.
struct Load {
    _children: Vec<Reaped>,
    samples: Arc<Mutex<Vec<(Instant, Sample)>>>,
}

impl Load {
    /// The well-behaved clients' load: client3 and client4 download,
    /// client5 measures latency, all to sys-net's server.
    fn start(bx: &BoxUp, scripts: &Path) -> Result<Load, String> {
        let load = scripts.join("load.py").to_string_lossy().into_owned();
        let commands = [
            ("client3", "bench"),
            ("client4", "bench"),
            ("client5", "latency"),
        ]
        .map(|(machine, mode)| {
            (
                machine,
                bx.in_machine(
                    machine,
                    "python3",
                    &[&load, mode, "192.0.2.80", "80", "30000000"],
                ),
            )
        });
        Load::spawn(commands)
    }

    /// Starts each load script (`load.py`, its output read line by line
    /// into the samples); `who` names it in [`Sample::Done`].
    fn spawn(commands: impl IntoIterator<Item = (&'static str, Command)>) -> Result<Load, String> {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut children = Vec::new();
        for (machine, mut command) in commands {
            let mut child = command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start the load in {machine}: {e}"))?;
            let stdout = child.stdout.take().ok_or("load script without stdout")?;
            let samples = Arc::clone(&samples);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let mut words = line.split_whitespace();
                    let sample = match (words.next(), words.next()) {
                        (Some("P"), Some(n)) => n.parse().ok().map(Sample::Bytes),
                        (Some("B"), Some(_)) => Some(Sample::Done(machine)),
                        (Some("L"), Some(ms)) => ms.parse().ok().map(Sample::Latency),
                        (Some("E"), _) => Some(Sample::Failure),
                        _ => None,
                    };
                    if let (Some(sample), Ok(mut all)) = (sample, samples.lock()) {
                        all.push((Instant::now(), sample));
                    }
                }
            });
            children.push(Reaped(child));
        }
        Ok(Load {
            _children: children,
            samples,
        })
    }

    /// Waits (at most `limit`) until every downloading client has finished
    /// two downloads since `since` (the first may have started before);
    /// returns how long that took, `None` if it did not happen.
    fn recovered(&self, since: Instant, limit: Duration) -> Option<Duration> {
        loop {
            let done = self.samples.lock().ok().is_some_and(|all| {
                ["client3", "client4"].iter().all(|who| {
                    all.iter()
                        .filter(|(at, s)| *at >= since && matches!(s, Sample::Done(w) if w == who))
                        .count()
                        >= 2
                })
            });
            if done {
                return Some(since.elapsed());
            }
            if since.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Throughput (MB/s), median and worst latency (ms) and failures
    /// between two instants.
    fn window(&self, from: Instant, to: Instant) -> Window {
        let Ok(all) = self.samples.lock() else {
            return Window::default();
        };
        let mut bytes = 0u64;
        let mut latencies = Vec::new();
        let mut failures = 0;
        for (at, sample) in all.iter().filter(|(at, _)| *at >= from && *at < to) {
            let _ = at;
            match sample {
                Sample::Bytes(n) => bytes += n,
                Sample::Done(_) => {}
                Sample::Latency(ms) => latencies.push(*ms),
                Sample::Failure => failures += 1,
            }
        }
        latencies.sort_by(f64::total_cmp);
        let seconds = to.duration_since(from).as_secs_f64().max(1e-3);
        let median = latencies.get(latencies.len() / 2).copied();
        let worst = latencies.last().copied();
        Window {
            mbps: bytes as f64 / seconds / 1e6,
            median_ms: median,
            worst_ms: worst,
            failures,
        }
    }
}

/// The sinks in sys-net (one per sys-net incarnation) and their counts.
struct Sinks {
    scripts: PathBuf,
    running: Vec<Reaped>,
    outputs: Vec<PathBuf>,
}

impl Sinks {
    fn start(&mut self, bx: &BoxUp) -> Result<(), String> {
        let out = self.scripts.join(format!("sink{}.out", self.outputs.len()));
        let _ = std::fs::remove_file(&out);
        let sink = self.scripts.join("sink.py").to_string_lossy().into_owned();
        let child = bx
            .in_machine("sys-net", "python3", &[&sink, &out.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the sink in sys-net: {e}"))?;
        self.running.push(Reaped(child));
        // Ready once it has written its first count.
        let start = Instant::now();
        while !out.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.outputs.push(out);
        Ok(())
    }

    /// Denied (marked) frames seen so far, the first one (hex) if any, and
    /// canary frames seen.
    fn leaked(&self) -> (u64, Option<String>, u64) {
        let (mut total, mut first, mut canaries) = (0, None, 0);
        for out in &self.outputs {
            let text = std::fs::read_to_string(out).unwrap_or_default();
            let words: Vec<&str> = text.split_whitespace().collect();
            let number = |at: usize| words.get(at).and_then(|n| n.parse::<u64>().ok());
            total += number(0).unwrap_or(0);
            canaries += number(3).unwrap_or(0);
            if let Some(hex) = words.get(2).filter(|h| **h != "-") {
                first.get_or_insert_with(|| (*hex).to_string());
            }
        }
        (total, first, canaries)
    }
}

/// The client's IPv4 and IPv6 address (`client<n>`: 10.137.0.(n+19)).
fn client_addresses(n: u16) -> (String, String) {
    let last = n + 19;
    (
        format!("10.137.0.{last}"),
        format!("fd09:24ef:4179::a89:{last:x}"),
    )
}

/// A running attack: child processes and threads, stopped on [`Attack::stop`].
struct Attack {
    children: Vec<Reaped>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<String>>,
    /// Set when the attack has done its count (the phase lasts until then).
    done: Option<Arc<AtomicBool>>,
    /// When each sys-net restart completed.
    restarts: Arc<Mutex<Vec<Instant>>>,
}

impl Attack {
    /// Stops it and returns what it did.
    fn stop(self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        let mut notes = Vec::new();
        for mut child in self.children {
            // The scripts end by themselves after the phase; wait a little.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut text = String::new();
            if let Some(mut out) = child.0.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut out, &mut text);
            }
            if let Some(sent) = text.split_whitespace().nth(1) {
                notes.push(format!("{sent} frames"));
            }
        }
        for thread in self.threads {
            if let Ok(note) = thread.join() {
                notes.push(note);
            }
        }
        notes.join(", ")
    }
}

/// `qubes.FirewallStatus` from dom0 over qrexec; `None` if no answer.
fn firewall_status(bx: &BoxUp, timeout: Duration) -> Option<String> {
    status_call(bx, timeout, false)
}

/// [`firewall_status`], the caller niced (`nice -n 19`) when `attacker`.
fn status_call(bx: &BoxUp, timeout: Duration, attacker: bool) -> Option<String> {
    let mut command = if attacker {
        let mut nice = Command::new("nice");
        nice.args(["-n", "19"]).arg(bx.bin.join("qrexec-client"));
        nice
    } else {
        Command::new(bx.bin.join("qrexec-client"))
    };
    let mut child = command
        .arg(format!(
            "--socket-dir={}",
            Path::new(&bx.state).join("qubes").display()
        ))
        .args([
            "-d",
            "sys-firewall",
            "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
        ])
        .env("VCHAN_SOCKET_DIR", Path::new(&bx.state).join("vchan"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });
    let start = Instant::now();
    let mut child = Reaped(child);
    loop {
        match child.0.try_wait() {
            Ok(Some(status)) => {
                let text = reader.join().ok()?;
                return (status.success() && text.starts_with("qubes-firewall status"))
                    .then_some(text);
            }
            Ok(None) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return None,
        }
    }
}

/// The cgroup (cgroup v1's cpu controller) of the attackers and of every
/// process of the box but the firewall's and sys-net's: together they get
/// the CPU share of one process ([`OTHERS_SHARES`], the shares of a
/// process at nice 0), however many they are (a wave of 1,000 qrexec
/// calls is thousands of processes; niced alone they would still outweigh
/// the firewall and the load 15 to 1).
const OTHERS: &str = "/sys/fs/cgroup/cpu/qubes-box-soak-others";
const OTHERS_SHARES: &str = "1024";

/// The others' cgroup, made for the run; its tasks go back to the root
/// cgroup and it is removed on drop.
struct OthersGroup;

impl OthersGroup {
    /// `None` where there is no cgroup v1 cpu controller to write to (the
    /// run then relies on nice alone and says so).
    fn make() -> Option<OthersGroup> {
        let dir = Path::new(OTHERS);
        if !dir.is_dir() {
            std::fs::create_dir(dir).ok()?;
        }
        std::fs::write(dir.join("cpu.shares"), OTHERS_SHARES).ok()?;
        Some(OthersGroup)
    }
}

impl Drop for OthersGroup {
    fn drop(&mut self) {
        let root = Path::new(OTHERS).parent().map(|p| p.join("tasks"));
        for _ in 0..50 {
            let tasks =
                std::fs::read_to_string(Path::new(OTHERS).join("tasks")).unwrap_or_default();
            if let Some(root) = &root {
                for tid in tasks.lines() {
                    let _ = std::fs::write(root, tid);
                }
            }
            if std::fs::remove_dir(OTHERS).is_ok() || !Path::new(OTHERS).exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Moves the calling thread into the others' cgroup (processes it spawns
/// from then on start there); nothing where there is none.
fn join_others() {
    if let Ok(link) = std::fs::read_link("/proc/thread-self")
        && let Some(tid) = link.file_name()
    {
        let _ = std::fs::write(Path::new(OTHERS).join("tasks"), tid.as_encoded_bytes());
    }
}

/// Moves a process (all its threads) into the others' cgroup.
fn move_to_others(pid: u32) -> bool {
    std::fs::write(Path::new(OTHERS).join("cgroup.procs"), pid.to_string()).is_ok()
}

/// Nices (19) every process of the box but the firewall's and sys-net's
/// (every thread of each: `setpriority` on a pid reaches one thread), so
/// that dom0's daemons and the other qubes' agents, whose work the attacks
/// multiply, take the CPU the firewall and the load leave: on Qubes they
/// run on other CPUs than sys-firewall. Returns how many were niced.
fn nice_the_rest(state: &str) -> usize {
    let resources = std::fs::read_to_string(Path::new(state).join("resources")).unwrap_or_default();
    let mut niced = 0;
    for line in resources.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(&"pid"), Some(pid), Some(owner)) = (words.first(), words.get(1), words.get(3))
        else {
            continue;
        };
        if matches!(*owner, "sys-firewall" | "sys-net") {
            continue;
        }
        if let Ok(pid) = pid.parse() {
            move_to_others(pid);
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        let tids: Vec<String> = tasks
            .filter_map(|t| Some(t.ok()?.file_name().to_string_lossy().into_owned()))
            .collect();
        let mut args = vec!["-n", "19", "-p"];
        args.extend(tids.iter().map(String::as_str));
        if quiet("renice", &args).is_ok() {
            niced += 1;
        }
    }
    niced
}

/// One qrexec call between clients through dom0's policy daemon: client
/// `from` calls `test.Add` in client `to` (allowed between any qubes) with
/// `1 2`, niced; true if it answered `3`.
fn vm_call(bx: &BoxUp, from: u16, to: u16) -> bool {
    let state = Path::new(&bx.state);
    let child = Command::new("nice")
        .args(["-n", "19"])
        .arg(bx.bin.join("qrexec-client-vm"))
        .arg(format!(
            "--agent-socket={}",
            state.join(format!("agent.client{from}.sock")).display()
        ))
        .args([&format!("client{to}"), "test.Add"])
        .env("VCHAN_SOCKET_DIR", state.join("vchan"))
        .env("VCHAN_DOMAIN", (from + 2).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, b"1 2\n");
    }
    let mut child = Reaped(child);
    let mut text = String::new();
    if let Some(mut out) = child.0.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut out, &mut text);
    }
    matches!(child.0.wait(), Ok(status) if status.success()) && text.trim() == "3"
}

/// Replaces client `n`'s rules as qubesd does (both address families:
/// remove the directory, write `policy` and the rules `0000`…, then the
/// empty commit write), the allowed port changing with `generation`.
fn rewrite_rules(
    db: &mut qubesdb::client::QdbClient,
    n: u16,
    generation: u64,
) -> Result<(), String> {
    let (ip, ip6) = client_addresses(n);
    let port = format!(
        "action=accept proto=tcp dstports={0}-{0}",
        1000 + generation % 1000
    );
    let rules = [
        "action=accept proto=tcp dstports=80-80",
        port.as_str(),
        "action=accept specialtarget=dns",
    ];
    for address in [ip, ip6] {
        let base = format!("/qubes-firewall/{address}");
        let fail = |what: &str, e: qubesdb::client::QdbError| format!("{what} {base}: {e}");
        db.rm(&format!("{base}/")).or_else(|e| match e {
            qubesdb::client::QdbError::NotFound => Ok(()),
            e => Err(fail("rm", e)),
        })?;
        db.write(&format!("{base}/policy"), b"drop")
            .map_err(|e| fail("write", e))?;
        for (index, rule) in rules.iter().enumerate() {
            db.write(&format!("{base}/{index:04}"), rule.as_bytes())
                .map_err(|e| fail("write", e))?;
        }
        db.write(&base, b"").map_err(|e| fail("commit", e))?;
    }
    Ok(())
}

/// How much each attack does; scaled down for short runs.
#[derive(Clone, Copy)]
struct Plan {
    /// Length of each attack phase (and of `before`/`after`).
    seconds: f64,
    /// Sequential qrexec calls to the firewall in the `qrexec` phase (the
    /// phase lasts until they are done).
    sequential: u64,
}

impl Plan {
    /// `phases`: the number of phases run, `before` and `after` included.
    fn new(run_seconds: u64, phases: usize) -> Plan {
        // Each attack phase has a quiet window of half its length before
        // it, and `before` and `after` one phase each.
        let attacks = phases.saturating_sub(2) as f64;
        let seconds = (run_seconds as f64 / (attacks * 1.5 + 2.0)).max(3.0);
        let scale = (run_seconds as f64 / FULL_SECONDS as f64).min(1.0);
        Plan {
            seconds,
            sequential: ((QREXEC_SEQUENTIAL as f64 * scale) as u64).max(100),
        }
    }

    fn quiet_seconds(&self) -> f64 {
        (self.seconds / 2.0).max(2.0)
    }

    fn full(&self) -> bool {
        self.sequential >= QREXEC_SEQUENTIAL
    }
}

fn start_attack(
    phase: &str,
    bx: &Arc<BoxUp>,
    scripts: &Path,
    plan: Plan,
) -> Result<Attack, String> {
    let seconds = plan.seconds;
    let stop = Arc::new(AtomicBool::new(false));
    let mut attack = Attack {
        children: Vec::new(),
        stop: Arc::clone(&stop),
        threads: Vec::new(),
        done: None,
        restarts: Arc::new(Mutex::new(Vec::new())),
    };
    let script = scripts.join("attack.py").to_string_lossy().into_owned();
    let flood = |client: u16, kind: &str| -> Result<Reaped, String> {
        let (ip, ip6) = client_addresses(client);
        // Niced: the attacker shares the machine's CPUs with the firewall
        // and the well-behaved load, not so on Qubes (its own vCPUs).
        bx.in_machine(
            &format!("client{client}"),
            "nice",
            &[
                "-n",
                "19",
                "python3",
                &script,
                kind,
                &ip,
                &ip6,
                &format!("{seconds:.1}"),
                &ATTACK_RATE.to_string(),
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(|child| {
            move_to_others(child.id());
            Reaped(child)
        })
        .map_err(|e| format!("cannot start the {kind} attack: {e}"))
    };
    match phase {
        "before" | "after" => {}
        "syn" => attack.children.push(flood(10, "syn")?),
        "udp" => attack.children.push(flood(10, "udp")?),
        "fragments" => attack.children.push(flood(11, "fragments")?),
        "icmp-spoof" => attack.children.push(flood(12, "icmp-spoof")?),
        "qrexec" => {
            // A wave of concurrent calls, and beside it the sequential
            // calls: the phase lasts until they are all done.
            let wave_bx = Arc::clone(bx);
            attack.threads.push(std::thread::spawn(move || {
                join_others();
                let ok = Arc::new(AtomicU64::new(0));
                let wave: Vec<_> = (0..QREXEC_CONCURRENT)
                    .map(|_| {
                        let (bx, ok) = (Arc::clone(&wave_bx), Arc::clone(&ok));
                        std::thread::spawn(move || {
                            if status_call(&bx, Duration::from_secs(60), true).is_some() {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                        })
                    })
                    .collect();
                for thread in wave {
                    let _ = thread.join();
                }
                format!(
                    "dom0 -> firewall: {}/{QREXEC_CONCURRENT} concurrent calls answered",
                    ok.load(Ordering::SeqCst)
                )
            }));
            let bx = Arc::clone(bx);
            let done = Arc::new(AtomicBool::new(false));
            attack.done = Some(Arc::clone(&done));
            let target = plan.sequential;
            attack.threads.push(std::thread::spawn(move || {
                join_others();
                let start = Instant::now();
                let (mut answered, mut failed) = (0u64, 0u64);
                while answered + failed < target && !stop.load(Ordering::SeqCst) {
                    // Not niced: one call at a time, each waited for.
                    match status_call(&bx, Duration::from_secs(15), false) {
                        Some(_) => answered += 1,
                        None => failed += 1,
                    }
                }
                done.store(true, Ordering::SeqCst);
                format!(
                    "{answered}/{target} sequential answered ({failed} not) in {:.0} s",
                    start.elapsed().as_secs_f64()
                )
            }));
        }
        "qrexec-vm" => {
            // Between clients through dom0's policy daemon: a wave of
            // concurrent calls (client6..9 to client20..39), and
            // sequential ones beside it for the phase.
            let wave_bx = Arc::clone(bx);
            attack.threads.push(std::thread::spawn(move || {
                join_others();
                let ok = Arc::new(AtomicU64::new(0));
                let wave: Vec<_> = (0..QREXEC_CONCURRENT)
                    .map(|i| {
                        let (bx, ok) = (Arc::clone(&wave_bx), Arc::clone(&ok));
                        let i = u16::try_from(i).unwrap_or(0);
                        std::thread::spawn(move || {
                            if vm_call(&bx, 6 + i % 4, 20 + i % 20) {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                        })
                    })
                    .collect();
                for thread in wave {
                    let _ = thread.join();
                }
                format!(
                    "client -> client (policy daemon): {}/{QREXEC_CONCURRENT} concurrent calls answered",
                    ok.load(Ordering::SeqCst)
                )
            }));
            let bx = Arc::clone(bx);
            attack.threads.push(std::thread::spawn(move || {
                join_others();
                let start = Instant::now();
                let (mut answered, mut failed) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    if vm_call(&bx, 9, 40) {
                        answered += 1;
                    } else {
                        failed += 1;
                    }
                }
                format!(
                    "{answered} sequential answered ({failed} not, {:.0}/s)",
                    answered as f64 / start.elapsed().as_secs_f64().max(1e-3)
                )
            }));
        }
        // `qubesdb-rules` and `qubesdb-clients` (only with `--phases`): its
        // two halves alone.
        "qubesdb" | "qubesdb-rules" | "qubesdb-clients" => {
            let (rules_bx, rules_stop) = (Arc::clone(bx), Arc::clone(&stop));
            if phase != "qubesdb-clients" {
                attack.threads.push(std::thread::spawn(move || {
                join_others();
                // One long-lived connection to the firewall's QubesDB
                // daemon (as qubesd keeps one), rewrites paced at
                // RULES_PER_SECOND.
                let socket = qubesdb::daemon::socket_path(
                    &Path::new(&rules_bx.state).join("qubes"),
                    "sys-firewall",
                );
                let mut db = match qubesdb::client::QdbClient::open_path(&socket) {
                    Ok(db) => db,
                    Err(error) => {
                        return format!(
                            "client50's rules not rewritten: cannot connect to {}: {error}",
                            socket.display()
                        );
                    }
                };
                let start = Instant::now();
                let (mut writes, mut errors) = (0u64, 0u64);
                let mut first_error = None;
                while !rules_stop.load(Ordering::SeqCst) {
                    let due = start + Duration::from_secs_f64(writes as f64 / RULES_PER_SECOND);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    match rewrite_rules(&mut db, 50, writes) {
                        Ok(()) => writes += 1,
                        Err(error) => {
                            errors += 1;
                            first_error.get_or_insert(error);
                            // Do not spin on a dead connection.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                format!(
                    "client50's rules rewritten {writes} times ({:.0}/s, paced at {RULES_PER_SECOND}/s, {errors} errors{})",
                    writes as f64 / start.elapsed().as_secs_f64().max(1e-3),
                    first_error.map_or(String::new(), |e| format!(", the first: {e}"))
                )
            }));
            }
            let (churn_bx, churn_stop) = (Arc::clone(bx), Arc::clone(&stop));
            if phase != "qubesdb-rules" {
                attack.threads.push(std::thread::spawn(move || {
                join_others();
                let qubes_box = churn_bx.qubes_box();
                let (mut cycles, mut errors, mut fetches) = (0u64, 0u64, 0u64);
                let mut first_error = None;
                while !churn_stop.load(Ordering::SeqCst) {
                    let add = quiet(
                        &qubes_box,
                        &[
                            "add-client",
                            "101",
                            "--state-dir",
                            STATE,
                            "--prefix",
                            PREFIX,
                        ],
                    );
                    // A flow of its own, so its removal has NAT entries
                    // to take away.
                    let fetched = quiet(
                        "ip",
                        &[
                            "netns",
                            "exec",
                            &format!("{PREFIX}client101"),
                            &qubes_box,
                            "http-get",
                            "192.0.2.80:80",
                            "/",
                        ],
                    );
                    if fetched.is_ok() {
                        fetches += 1;
                    }
                    let remove = quiet(
                        &qubes_box,
                        &[
                            "remove-client",
                            "101",
                            "--state-dir",
                            STATE,
                            "--prefix",
                            PREFIX,
                        ],
                    );
                    match (add, remove) {
                        (Ok(_), Ok(_)) => cycles += 1,
                        (Err(error), _) | (_, Err(error)) => {
                            errors += 1;
                            first_error.get_or_insert(error);
                        }
                    }
                }
                format!(
                    "client101 added, fetched from ({fetches} ok) and removed {cycles} times ({errors} errors{})",
                    first_error.map_or(String::new(), |e: String| format!(", the first: {e}"))
                )
            }));
            }
        }
        "sys-net" => {
            let bx = Arc::clone(bx);
            let done_at = Arc::clone(&attack.restarts);
            attack.threads.push(std::thread::spawn(move || {
                let (mut restarts, mut errors) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    match quiet(
                        &bx.qubes_box(),
                        &["restart-net", "--state-dir", STATE, "--prefix", PREFIX],
                    ) {
                        Ok(_) => {
                            restarts += 1;
                            if let Ok(mut all) = done_at.lock() {
                                all.push(Instant::now());
                            }
                        }
                        Err(_) => errors += 1,
                    }
                    let pause = Instant::now();
                    while !stop.load(Ordering::SeqCst) && pause.elapsed() < SYS_NET_EVERY {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                format!("sys-net restarted {restarts} times ({errors} errors)")
            }));
        }
        other => return Err(format!("soak: unknown phase {other}")),
    }
    Ok(attack)
}

/// The firewall process's VmRSS and VmHWM in KiB.
fn memory_kib(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system, in clock ticks of 1/100 s) the firewall
/// process has used.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Nanoseconds the firewall's main thread has spent runnable but waiting
/// for a CPU (the second field of `/proc/PID/schedstat`).
fn run_queue_ns(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    stat.split_whitespace().nth(1)?.parse().ok()
}

/// `drop N reason` lines of a status report.
fn drops(status: &str) -> BTreeMap<String, u64> {
    status
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("drop")).then_some(())?;
            let count = words.next()?.parse().ok()?;
            Some((words.next()?.to_string(), count))
        })
        .collect()
}

/// `nat_entries: N of M`, and the sum of the clients' NAT entries.
fn nat(status: &str) -> Option<(u64, u64, u64)> {
    let line = status.lines().find(|l| l.starts_with("nat_entries: "))?;
    let mut words = line.split_whitespace();
    let entries = words.nth(1)?.parse().ok()?;
    let capacity = words.nth(1)?.parse().ok()?;
    let clients = status
        .lines()
        .filter(|l| l.starts_with("client vif"))
        .filter_map(|l| l.split_whitespace().nth(5)?.parse::<u64>().ok())
        .sum();
    Some((entries, capacity, clients))
}

/// `heap: used N KiB` and `heap_peak: N KiB` of a status report.
fn heap_kib(status: &str) -> (Option<u64>, Option<u64>) {
    let number = |prefix: &str, at: usize| {
        status
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(at))
            .and_then(|n| n.parse::<u64>().ok())
    };
    (number("heap: used ", 2), number("heap_peak: ", 1))
}

/// What the well-behaved load did in one window.
#[derive(Clone, Copy, Default)]
struct Window {
    mbps: f64,
    median_ms: Option<f64>,
    worst_ms: Option<f64>,
    failures: u64,
}

/// The control's throughput (MB/s) in a phase's windows (`--control`).
#[derive(Clone, Copy)]
struct ControlRow {
    /// In the quiet window just before the attack (none for before/after).
    quiet: Option<f64>,
    during: f64,
}

impl ControlRow {
    fn ratio(&self) -> Option<f64> {
        let quiet = self.quiet?;
        (quiet > 0.0).then(|| self.during / quiet)
    }
}

struct Row {
    phase: &'static str,
    /// The control over the same windows (`--control`).
    control: Option<ControlRow>,
    /// The quiet window just before the attack (none for before/after).
    quiet: Option<Window>,
    during: Window,
    memory: Option<(u64, u64)>,
    heap: (Option<u64>, Option<u64>),
    nat: Option<(u64, u64, u64)>,
    leaked: u64,
    drops: BTreeMap<String, u64>,
    notes: String,
    seconds: f64,
    /// The firewall's CPU use during the attack (100: one core).
    cpu_percent: Option<f64>,
    /// The time it waited for a CPU while runnable, in % of the phase.
    wait_percent: Option<f64>,
}

impl Row {
    /// Throughput during the attack over the quiet window just before it.
    fn ratio(&self) -> Option<f64> {
        let quiet = self.quiet?;
        (quiet.mbps > 0.0).then(|| self.during.mbps / quiet.mbps)
    }
}

/// The control's namespaces (`--control`): its kernel path's.
const CONTROL_PREFIX: &str = "qsk-";

/// `--control`: a download like client3's, from `qsk-client1` through a
/// Linux kernel forwarding path (bench box's: `ip_forward`, nftables
/// filter and `masquerade`) to a server of its own (the box's
/// `serve-http`, as sys-net runs) in `qsk-sys-net`. Neither attacked nor
/// niced nor in the others' cgroup, like the well-behaved load. Dropped in
/// field order: the load, the server, then the namespaces.
struct Control {
    load: Load,
    _server: Reaped,
    _path: KernelPath,
}

impl Control {
    fn start(bx: &BoxUp, scripts: &Path) -> Result<Control, String> {
        let path = build_kernel_path(CONTROL_PREFIX)?;
        let qubes_box = bx.qubes_box();
        let server = Command::new("ip")
            .args(["netns", "exec", &format!("{CONTROL_PREFIX}sys-net")])
            .args([qubes_box.as_str(), "serve-http", "192.0.2.80:80"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the control's server: {e}"))?;
        let server = Reaped(server);
        // Up once a request through the path is answered.
        let client = format!("{CONTROL_PREFIX}client1");
        let start = Instant::now();
        loop {
            match quiet(
                "ip",
                &[
                    "netns",
                    "exec",
                    &client,
                    &qubes_box,
                    "http-get",
                    "192.0.2.80:80",
                    "/",
                ],
            ) {
                Ok(_) => break,
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    return Err(format!(
                        "soak: the control's server does not answer through the kernel path: {e}"
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let load = scripts.join("load.py").to_string_lossy().into_owned();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &client, "python3"]).args([
            load.as_str(),
            "bench",
            "192.0.2.80",
            "80",
            "30000000",
        ]);
        let load = Load::spawn([("control", command)])?;
        Ok(Control {
            load,
            _server: server,
            _path: path,
        })
    }
}

/// Recovery after each sys-net restart: from the restart's end to the end
/// of the first well-behaved request (client5's `GET /`) sent after it.
fn recoveries(load: &Load, restarts: &[Instant], until: Instant) -> Vec<Option<f64>> {
    let Ok(all) = load.samples.lock() else {
        return Vec::new();
    };
    restarts
        .iter()
        .enumerate()
        .map(|(i, restart)| {
            let next = restarts.get(i + 1).copied().unwrap_or(until);
            all.iter().find_map(|(at, sample)| match sample {
                Sample::Latency(ms)
                    if *at >= *restart
                        && at
                            .checked_sub(Duration::from_secs_f64(ms / 1e3))
                            .is_some_and(|sent| sent >= *restart)
                        && *at < next =>
                {
                    Some(at.duration_since(*restart).as_secs_f64())
                }
                _ => None,
            })
        })
        .collect()
}

fn soak(
    bin: &Path,
    firewall: &Path,
    scripts: &Path,
    seconds: u64,
    phases: &[&'static str],
    placement: Option<Placement>,
    control: bool,
) -> Result<(), String> {
    let plan = Plan::new(seconds, phases.len());
    let clients = CLIENTS.to_string();
    let firewall = firewall.to_string_lossy().into_owned();
    println!("soak: bringing up the box with {CLIENTS} client qubes");
    let start = Instant::now();
    let bx = Arc::new(BoxUp::up(
        bin,
        STATE,
        PREFIX,
        &["--firewall-bin", &firewall, "--clients", &clients],
    )?);
    let up_seconds = start.elapsed().as_secs_f64();
    let attached = bx.log("firewall").matches("added with IP").count();
    println!("soak: box up in {up_seconds:.1} s, {attached} clients attached to the firewall");
    if attached < usize::from(CLIENTS) {
        return Err(format!(
            "soak: only {attached} of {CLIENTS} clients attached to the firewall"
        ));
    }
    let pid = quiet(&bx.qubes_box(), &["firewall-pid", "--state-dir", STATE])?
        .trim()
        .to_string();
    if let Some(placement) = placement {
        placement.place_firewall(&pid)?;
    }
    println!("soak: CPUs: {}", Placement::describe(placement));
    let others = OthersGroup::make();
    let niced = nice_the_rest(STATE);
    let grouped = if others.is_some() {
        format!(
            " and in one cgroup (cpu.shares {OTHERS_SHARES}: together the CPU share of one process)"
        )
    } else {
        " (no cgroup v1 cpu controller: nice alone)".to_string()
    };

    let mut sinks = Sinks {
        scripts: scripts.to_path_buf(),
        running: Vec::new(),
        outputs: Vec::new(),
    };
    sinks.start(&bx)?;
    // The canary: an allowed, marked SYN the sink must see.
    let (ip3, ip3_6) = client_addresses(3);
    let script = scripts.join("attack.py").to_string_lossy().into_owned();
    // Three tries: on a loaded machine the sink may start late.
    for _ in 0..3 {
        quiet(
            "ip",
            &[
                "netns",
                "exec",
                &format!("{PREFIX}client3"),
                "python3",
                &script,
                "canary",
                &ip3,
                &ip3_6,
                "0.5",
                "20",
            ],
        )?;
        let canary_start = Instant::now();
        while sinks.leaked().2 == 0 && canary_start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if sinks.leaked().2 > 0 {
            break;
        }
    }
    let canary = sinks.leaked().2;
    if canary == 0 {
        return Err("soak: the sink in sys-net did not see the canary (an allowed, marked SYN from client3): it could not see a leak either".into());
    }
    let counts = if plan.full() {
        format!("full counts: {QREXEC_SEQUENTIAL} sequential qrexec calls")
    } else {
        format!(
            "counts scaled to the run: {} of {QREXEC_SEQUENTIAL} sequential qrexec calls (full at {FULL_SECONDS} s)",
            plan.sequential
        )
    };
    println!(
        "soak: the sink sees what passes ({canary} canary frames); {:.1} s per phase, each attack after {:.1} s quiet; {counts}",
        plan.seconds,
        plan.quiet_seconds()
    );

    // The control first: its server must answer before the loads start
    // together.
    let control = if control {
        Some(Control::start(&bx, scripts)?)
    } else {
        None
    };
    let load = Load::start(&bx, scripts)?;
    // Let the load settle before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let mut rows: Vec<Row> = Vec::new();
    let first_status = firewall_status(&bx, Duration::from_secs(15)).unwrap_or_default();
    let mut previous_drops = drops(&first_status);
    let mut problems: Vec<String> = Vec::new();
    let mut sys_net_recovery = String::new();
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    for phase in phases {
        let attacking = !matches!(*phase, "before" | "after");
        let quiet_window = attacking.then(|| {
            let from = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(plan.quiet_seconds()));
            (from, Instant::now())
        });
        let quiet = quiet_window.map(|(from, to)| load.window(from, to));
        // Progress, for profiles taken beside the run.
        println!("soak: {phase} starts");
        let from = Instant::now();
        let ticks_from = cpu_ticks(&pid);
        let waited_from = run_queue_ns(&pid);
        let attack = start_attack(phase, &bx, scripts, plan)?;
        let (done, restarts) = (attack.done.clone(), Arc::clone(&attack.restarts));
        std::thread::sleep(Duration::from_secs_f64(plan.seconds));
        // A counted attack lasts until its count is done (at most 30 min).
        if let Some(done) = done {
            while !done.load(Ordering::SeqCst) && from.elapsed() < Duration::from_secs(1800) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let to = Instant::now();
        let cpu_percent = ticks_from
            .zip(cpu_ticks(&pid))
            .map(|(a, b)| b.saturating_sub(a) as f64 / to.duration_since(from).as_secs_f64());
        let wait_percent = waited_from
            .zip(run_queue_ns(&pid))
            .map(|(a, b)| b.saturating_sub(a) as f64 / 1e7 / to.duration_since(from).as_secs_f64());
        let mut notes = attack.stop();
        if *phase == "sys-net" {
            // The restarts ended the sink with the old namespace.
            sinks.start(&bx)?;
            let restarts = restarts.lock().map(|r| r.clone()).unwrap_or_default();
            let times = recoveries(&load, &restarts, to);
            let mut known: Vec<f64> = times.iter().flatten().copied().collect();
            known.sort_by(f64::total_cmp);
            sys_net_recovery = format!(
                "{} restarts every {} s: client5 answered again after median {} s, max {} s ({} restarts without an answer before the next)",
                restarts.len(),
                SYS_NET_EVERY.as_secs(),
                known
                    .get(known.len() / 2)
                    .map_or("-".into(), |v| format!("{v:.2}")),
                known.last().map_or("-".into(), |v| format!("{v:.2}")),
                times.len() - known.len()
            );
            // Downloads cut by a restart stall until their timeout (5 s);
            // the `after` phase starts once the clients download again.
            match load.recovered(to, Duration::from_secs(30)) {
                Some(wait) => notes.push_str(&format!(
                    "; downloads again {:.1} s after the last restart phase ended",
                    wait.as_secs_f64()
                )),
                None => problems.push(
                    "hang: the well-behaved clients did not download again within 30 s of the sys-net restarts".into(),
                ),
            }
        }
        let during = load.window(from, to);
        let status = firewall_status(&bx, Duration::from_secs(15));
        if status.is_none() {
            problems.push(format!(
                "hang: qubes.FirewallStatus unanswered for 15 s after the {phase} phase"
            ));
        }
        let status = status.unwrap_or_default();
        if *phase == "qrexec"
            && let Some(line) = status.lines().find(|l| l.starts_with("qrexec: "))
        {
            notes.push_str(&format!(" (firewall {line})"));
        }
        let now_drops = drops(&status);
        let delta = now_drops
            .iter()
            .filter_map(|(reason, n)| {
                let before = previous_drops.get(reason).copied().unwrap_or(0);
                (*n > before).then(|| (reason.clone(), n - before))
            })
            .collect();
        if !now_drops.is_empty() {
            previous_drops = now_drops;
        }
        let memory = memory_kib(&pid);
        if memory.is_none() {
            problems.push(format!(
                "crash: the firewall process {pid} is gone after the {phase} phase"
            ));
        }
        // The control over the same windows.
        let control_row = control.as_ref().map(|c| ControlRow {
            quiet: quiet_window.map(|(from, to)| c.load.window(from, to).mbps),
            during: c.load.window(from, to).mbps,
        });
        rows.push(Row {
            phase,
            control: control_row,
            quiet,
            during,
            memory,
            heap: heap_kib(&status),
            nat: nat(&status),
            leaked: sinks.leaked().0,
            drops: delta,
            notes,
            seconds: to.duration_since(from).as_secs_f64(),
            cpu_percent,
            wait_percent,
        });
        if memory.is_none() {
            break;
        }
    }
    drop(load);
    let with_control = control.is_some();
    // Its load, its server and its namespaces.
    drop(control);
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // The table.
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let kib = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!();
    println!(
        "soak: {CLIENTS} clients, box up in {up_seconds:.1} s, {:.1} s per phase after {:.1} s quiet, {counts}",
        plan.seconds,
        plan.quiet_seconds()
    );
    println!(
        "well-behaved: client3+client4 HTTP downloads (MB/s), client5 GET / every 0.1 s (ms); attackers and {niced} processes of dom0 and the other qubes niced (nice -n 19){grouped}: on Qubes they have CPUs of their own"
    );
    println!(
        "load average (1, 5, 15 min, /proc/loadavg) at the start {}, at the end {}",
        load_start
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_end
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("CPUs: {}", Placement::describe(placement));
    // `--control`: three columns beside the ratio.
    let control_head = if with_control {
        format!(
            " {:>8} {:>8} {:>6} {:>8}",
            "ctl qMB", "ctl MB/s", "ctl", "ours/ctl"
        )
    } else {
        String::new()
    };
    // The phase column fits the longest name run (11 for the default set).
    let width = rows
        .iter()
        .map(|r| r.phase.len())
        .max()
        .unwrap_or(0)
        .max(11);
    println!(
        "{:<width$} {:>6} {:>6} {:>7} {:>8} {:>8} {:>6}{control_head} {:>7} {:>8} {:>5} {:>8} {:>8} {:>8} {:>8} {:>13} {:>6}  attack",
        "phase",
        "secs",
        "fw CPU",
        "fw wait",
        "quiet",
        "MB/s",
        "ratio",
        "p50 ms",
        "max ms",
        "fail",
        "RSS KiB",
        "HWM KiB",
        "heap",
        "heap HWM",
        "NAT (owned)",
        "leaked"
    );
    for r in &rows {
        let (rss, hwm) = r.memory.map_or(("-".into(), "-".into()), |(a, b)| {
            (a.to_string(), b.to_string())
        });
        let nat = r.nat.map_or("-".into(), |(n, _, c)| format!("{n} ({c})"));
        let two = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let control = r.control.map_or(String::new(), |c| {
            format!(
                " {:>8} {:>8.1} {:>6} {:>8}",
                c.quiet.map_or("-".into(), |q| format!("{q:.1}")),
                c.during,
                two(c.ratio()),
                two(r
                    .ratio()
                    .zip(c.ratio())
                    .and_then(|(ours, ctl)| { (ctl > 0.0).then(|| ours / ctl) }))
            )
        });
        println!(
            "{:<width$} {:>6.1} {:>6} {:>7} {:>8} {:>8.1} {:>6}{control} {:>7} {:>8} {:>5} {:>8} {:>8} {:>8} {:>8} {:>13} {:>6}  {}",
            r.phase,
            r.seconds,
            r.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
            r.wait_percent.map_or("-".into(), |c| format!("{c:.0}%")),
            r.quiet.map_or("-".into(), |q| format!("{:.1}", q.mbps)),
            r.during.mbps,
            r.ratio().map_or("-".into(), |v| format!("{v:.2}")),
            ms(r.during.median_ms),
            ms(r.during.worst_ms),
            r.during.failures,
            rss,
            hwm,
            kib(r.heap.0),
            kib(r.heap.1),
            nat,
            r.leaked,
            r.notes
        );
    }
    if let Some((_, capacity, _)) = rows.iter().find_map(|r| r.nat) {
        println!("NAT table capacity: {capacity}");
    }
    println!(
        "ratio: MB/s during the attack over the quiet window just before it (same clients, same machine load); goal >= {:.2}",
        RATIO_GOAL
    );
    if with_control {
        println!(
            "ctl: the control, one download like client3's from {CONTROL_PREFIX}client1 through a Linux kernel forwarding path (ip_forward + nftables masquerade, bench box's) to a server of its own, never attacked, at nice 0 outside the others' cgroup like the well-behaved load; ctl qMB, ctl MB/s: its MB/s in the same quiet window and during the attack; ctl: its ratio; ours/ctl: our ratio over it (1.00: we lose what the machine's shared CPUs lose)"
        );
    }
    println!(
        "fw CPU: the firewall process's CPU time during the attack (100% = one core; near it, the firewall is the bottleneck, well below it, the machine is); fw wait: the time it was runnable but waited for a CPU (/proc/PID/schedstat)"
    );
    let below: Vec<String> = rows
        .iter()
        .filter(|r| r.phase != "sys-net")
        .filter_map(|r| Some((r.phase, r.ratio()?)))
        .filter(|(_, ratio)| *ratio < RATIO_GOAL)
        .map(|(phase, ratio)| format!("{phase} {ratio:.2}"))
        .collect();
    println!(
        "  attacks below the goal: {}",
        if below.is_empty() {
            "none".to_string()
        } else {
            below.join(", ")
        }
    );
    if !sys_net_recovery.is_empty() {
        println!(
            "sys-net: every restart cuts the connections through it (its server restarts with it), so its ratio is not judged; {sys_net_recovery}"
        );
    }
    println!("drops by reason (new in each phase):");
    for r in &rows {
        let list: Vec<String> = r.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "  {:<width$} {}",
            r.phase,
            if list.is_empty() {
                "-".into()
            } else {
                list.join(", ")
            }
        );
    }

    // The verdict.
    let (leaked, first, _) = sinks.leaked();
    if leaked > 0 {
        problems.push(format!(
            "leak: the sink in sys-net saw {leaked} denied (marked) packets; the first: {}",
            first.unwrap_or_default()
        ));
    }
    if bx.log("firewall").contains("panicked") {
        problems.push("crash: the firewall's log has a panic".into());
    }
    if let Ok(now) = quiet(&bx.qubes_box(), &["firewall-pid", "--state-dir", STATE])
        && now.trim() != pid
    {
        problems.push(format!(
            "crash: the firewall process changed from {pid} to {}",
            now.trim()
        ));
    }
    if let Some(after) = rows.iter().find(|r| r.phase == "after")
        && after.during.median_ms.is_none()
    {
        problems.push("hang: no well-behaved request succeeded after the attacks".into());
    }
    // A NAT entry no attached client owns (a removed client's, say) leaked.
    for r in &rows {
        if let Some((entries, _, owned)) = r.nat
            && entries != owned
        {
            problems.push(format!(
                "NAT leak: after the {} phase the table holds {entries} entries, the attached clients own {owned}",
                r.phase
            ));
        }
    }
    let first_attack = rows.get(1).and_then(|r| r.memory);
    let last = rows.last().and_then(|r| r.memory);
    if let (Some((_, hwm)), Some((rss, _))) = (first_attack, last) {
        let bound = hwm + hwm * GROWTH_PERCENT / 100 + GROWTH_SLACK_KIB;
        if rss > bound {
            problems.push(format!(
                "memory growth: VmRSS {rss} KiB at the end, above {bound} KiB (VmHWM {hwm} KiB after the first attack + {GROWTH_PERCENT} % + {GROWTH_SLACK_KIB} KiB)"
            ));
        }
    }
    // The firewall's own allocations: the same bound on the heap's
    // high-water mark.
    let first_heap = rows.get(1).and_then(|r| r.heap.1);
    let last_heap = rows.last().and_then(|r| r.heap.1);
    if let (Some(first), Some(last)) = (first_heap, last_heap) {
        let bound = first + first * GROWTH_PERCENT / 100 + GROWTH_SLACK_KIB;
        if last > bound {
            problems.push(format!(
                "memory growth: heap high-water mark {last} KiB at the end, above {bound} KiB ({first} KiB after the first attack + {GROWTH_PERCENT} % + {GROWTH_SLACK_KIB} KiB)"
            ));
        }
    }
    drop(sinks);
    let bx = Arc::try_unwrap(bx).map_err(|_| "soak: the box is still in use")?;
    bx.down()?;
    drop(others);
    if problems.is_empty() {
        println!("soak: no crash, no hang, no denied packet or NAT entry leaked, memory flat");
        Ok(())
    } else {
        Err(format!("soak failed:\n  {}", problems.join("\n  ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "qubes-firewall status
uptime_seconds: 12

# drops: count reason
drop 0 fragment
drop 7 denied
drop 3 client's

nat_entries: 5 of 16384
flows_created: 9
client vif3.0 10.137.0.20 3 drop 2
client vif4.0 10.137.0.21 1 drop 2 error=\"bad\"
connected_ips: 10.137.0.20
";

    #[test]
    fn drops_by_reason_are_read() {
        let drops = drops(STATUS);
        assert_eq!(drops.get("denied"), Some(&7));
        assert_eq!(drops.get("client's"), Some(&3));
        assert_eq!(drops.get("fragment"), Some(&0));
        assert_eq!(drops.len(), 3);
    }

    #[test]
    fn nat_entries_and_the_clients_share_are_read() {
        assert_eq!(nat(STATUS), Some((5, 16384, 4)));
        assert_eq!(nat("qubes-firewall status\n"), None);
    }

    #[test]
    fn heap_and_its_high_water_mark_are_read() {
        let status = "heap: used 17173 KiB (no fixed size: a hosted process's heap grows from its C library)\nheap_peak: 19147 KiB\n";
        assert_eq!(heap_kib(status), (Some(17173), Some(19147)));
        assert_eq!(
            heap_kib("heap: used 3072 KiB free 9216 KiB of 12288 KiB\n"),
            (Some(3072), None)
        );
        assert_eq!(heap_kib("heap: not measured\n"), (None, None));
    }

    #[test]
    fn our_own_cpu_time_is_read() {
        assert!(cpu_ticks(&std::process::id().to_string()).is_some());
        assert!(run_queue_ns(&std::process::id().to_string()).is_some());
        assert_eq!(run_queue_ns("not-a-pid"), None);
        assert_eq!(cpu_ticks("not-a-pid"), None);
    }

    #[test]
    fn short_runs_scale_the_counts_and_full_runs_do_not() {
        let short = Plan::new(30, PHASES.len());
        assert!(!short.full());
        assert!(short.sequential < QREXEC_SEQUENTIAL);
        assert!(short.seconds >= 3.0);
        let full = Plan::new(FULL_SECONDS, PHASES.len());
        assert!(full.full());
        assert_eq!(full.sequential, QREXEC_SEQUENTIAL);
    }

    #[test]
    fn phases_are_selected_with_before_and_after() {
        assert_eq!(select_phases(None).unwrap(), PHASES);
        assert_eq!(
            select_phases(Some("qubesdb,syn,qubesdb")).unwrap(),
            ["before", "qubesdb", "syn", "after"]
        );
        assert_eq!(
            select_phases(Some("qubesdb-rules")).unwrap(),
            ["before", "qubesdb-rules", "after"]
        );
        assert!(select_phases(Some("nope")).is_err());
        assert!(select_phases(Some("before")).is_err());
        assert!(select_phases(Some("")).is_err());
        // One attack: longer phases than the whole soak's in the same time.
        assert!(Plan::new(60, 3).seconds > Plan::new(60, PHASES.len()).seconds);
    }

    #[test]
    fn client_addresses_follow_the_box() {
        assert_eq!(
            client_addresses(3),
            (
                "10.137.0.22".to_string(),
                "fd09:24ef:4179::a89:16".to_string()
            )
        );
    }
}
