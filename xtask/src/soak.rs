//! `cargo xtask soak [SECONDS]`: the hosted firewall under load and under
//! attack, in a box of its own with 100 client qubes (root).
//!
//! The box (`qubes-box up --clients 100`, state `/run/qubes-box-soak`,
//! namespaces `qs-*`, release firewall) is timed coming up. Three
//! well-behaved clients then load it for the whole run: client3 and client4
//! download `GET /bytes/30000000` from sys-net's HTTP server in a loop
//! (throughput), client5 fetches `GET /` every 0.1 s (latency); both are
//! `soak/load.py` in the client's namespace. (HTTP rather than iperf3: the
//! box restarts its own HTTP server with sys-net, an iperf3 server would
//! die with the first restart.) The run is cut into equal phases (at least
//! 3 s each): `before`, one phase per attack, `after`. The attacks:
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
//!   sequential ones for the whole phase (the firewall's own qrexec
//!   counters, `refused_busy` included, are printed with them);
//! - `qubesdb`: client50's rules rewritten as fast as dom0's tools go (the
//!   rate is printed) while client101 is added, makes one HTTP request
//!   (NAT entries for its removal to take away) and is removed, in a loop;
//! - `sys-net`: sys-net restarted every 2 s (the server restarts with it,
//!   so this phase's throughput falls by design; downloads cut by a
//!   restart stall until their 5 s timeout, so `after` starts once both
//!   downloading clients have finished two downloads again, and the wait
//!   is printed; none within 30 s is a hang).
//!
//! Every packet an attack sends that the client's rules deny carries the
//! marker `QSOAKDENY`; `soak/sink.py` in sys-net counts every frame with it
//! (restarted with sys-net). A canary (an allowed SYN from client3, marked
//! `QSOAKCANARY`) is sent first: if the sink does not count it, the run
//! fails, since it could not see a leak either. After each phase:
//! `qubes.FirewallStatus` over qrexec (drops by reason, NAT entries; no
//! answer within 15 s is a hang), the firewall's VmRSS/VmHWM from `/proc`
//! (the status's `heap:` line is printed once: the hosted firewall does not
//! measure its heap, the C library owns it), whether its process is still
//! the same.
//!
//! It prints one table (throughput and latency per phase, ratio to
//! `before`, memory, NAT entries, leaked packets, what the attack did),
//! then the drops by reason per phase, and fails on a crash (firewall
//! process gone or replaced, or `panicked` in its log), a hang, a leaked
//! denied packet, a leaked NAT entry (the table holds more entries than
//! the attached clients own, from `qubes.FirewallStatus`), or memory growth: VmRSS after the `after` phase above
//! [`GROWTH_PERCENT`] % more than VmHWM after the first attack phase plus
//! [`GROWTH_SLACK_KIB`] (tables are allocated up front; a later phase that
//! keeps growing is a leak). Throughput ratios and NAT entries are
//! reported, not judged (a 2-core CI machine running the attackers, the
//! sink and the firewall shares its CPUs between them).
//!
//! Needs python3 (the attack, sink and load scripts, standard library
//! only) and iproute2; missing packages are installed with apt-get.
//! Everything it creates (the box's namespaces and state dir, processes
//! it starts) is removed again, also when a step fails; the scripts and
//! the sinks' counts stay in `target/soak/`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bench::{BoxUp, build_box, ensure_tools, quiet, require_root};

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
/// Concurrent qrexec calls in the qrexec phase.
const QREXEC_CONCURRENT: usize = 1000;
/// Memory growth allowed between the first attack phase and the end.
const GROWTH_PERCENT: u64 = 25;
const GROWTH_SLACK_KIB: u64 = 2048;

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
    "qubesdb",
    "sys-net",
    "after",
];

pub fn run(args: &[String]) -> Result<(), String> {
    let seconds = match args.first() {
        None => DEFAULT_SECONDS,
        Some(text) => text.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
            format!("soak: {text:?} is not a number of seconds (usage: cargo xtask soak [SECONDS])")
        })?,
    };
    require_root()?;
    ensure_tools(&[("ip", "iproute2"), ("python3", "python3")])?;
    let bin = build_box(true)?;
    let firewall = bin
        .parent()
        .map(|target| target.join("release").join("qubes-firewall-hosted"))
        .ok_or("soak: no target directory")?;
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
    soak(&bin, &firewall, &scripts, seconds)
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
    /// A download's bytes, and which client made it.
    Bytes(u64, &'static str),
    Latency(f64),
    Failure,
}

/// The well-behaved clients' load: the scripts and what they reported.
struct Load {
    _children: Vec<Reaped>,
    samples: Arc<Mutex<Vec<(Instant, Sample)>>>,
}

impl Load {
    fn start(bx: &BoxUp, scripts: &Path) -> Result<Load, String> {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut children = Vec::new();
        let load = scripts.join("load.py").to_string_lossy().into_owned();
        for (machine, mode) in [
            ("client3", "bench"),
            ("client4", "bench"),
            ("client5", "latency"),
        ] {
            let mut child = bx
                .in_machine(
                    machine,
                    "python3",
                    &[&load, mode, "192.0.2.80", "80", "30000000"],
                )
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
                        (Some("B"), Some(n)) => n.parse().ok().map(|n| Sample::Bytes(n, machine)),
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
                        .filter(|(at, s)| {
                            *at >= since && matches!(s, Sample::Bytes(_, w) if w == who)
                        })
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
    fn figures(&self, from: Instant, to: Instant) -> (f64, Option<f64>, Option<f64>, u64) {
        let Ok(all) = self.samples.lock() else {
            return (0.0, None, None, 0);
        };
        let mut bytes = 0u64;
        let mut latencies = Vec::new();
        let mut failures = 0;
        for (at, sample) in all.iter().filter(|(at, _)| *at >= from && *at < to) {
            let _ = at;
            match sample {
                Sample::Bytes(n, _) => bytes += n,
                Sample::Latency(ms) => latencies.push(*ms),
                Sample::Failure => failures += 1,
            }
        }
        latencies.sort_by(f64::total_cmp);
        let seconds = to.duration_since(from).as_secs_f64().max(1e-3);
        let median = latencies.get(latencies.len() / 2).copied();
        let worst = latencies.last().copied();
        (bytes as f64 / seconds / 1e6, median, worst, failures)
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
    let mut child = Command::new(bx.bin.join("qrexec-client"))
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

fn start_attack(
    phase: &str,
    bx: &Arc<BoxUp>,
    scripts: &Path,
    seconds: f64,
) -> Result<Attack, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut attack = Attack {
        children: Vec::new(),
        stop: Arc::clone(&stop),
        threads: Vec::new(),
    };
    let script = scripts.join("attack.py").to_string_lossy().into_owned();
    let flood = |client: u16, kind: &str| -> Result<Reaped, String> {
        let (ip, ip6) = client_addresses(client);
        bx.in_machine(
            &format!("client{client}"),
            "python3",
            &[
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
        .map(Reaped)
        .map_err(|e| format!("cannot start the {kind} attack: {e}"))
    };
    match phase {
        "before" | "after" => {}
        "syn" => attack.children.push(flood(10, "syn")?),
        "udp" => attack.children.push(flood(10, "udp")?),
        "fragments" => attack.children.push(flood(11, "fragments")?),
        "icmp-spoof" => attack.children.push(flood(12, "icmp-spoof")?),
        "qrexec" => {
            // A wave of concurrent calls, and sequential calls beside it
            // for the whole phase.
            let wave_bx = Arc::clone(bx);
            attack.threads.push(std::thread::spawn(move || {
                let ok = Arc::new(AtomicU64::new(0));
                let wave: Vec<_> = (0..QREXEC_CONCURRENT)
                    .map(|_| {
                        let (bx, ok) = (Arc::clone(&wave_bx), Arc::clone(&ok));
                        std::thread::spawn(move || {
                            if firewall_status(&bx, Duration::from_secs(30)).is_some() {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                        })
                    })
                    .collect();
                for thread in wave {
                    let _ = thread.join();
                }
                format!(
                    "{}/{QREXEC_CONCURRENT} concurrent calls answered",
                    ok.load(Ordering::SeqCst)
                )
            }));
            let bx = Arc::clone(bx);
            attack.threads.push(std::thread::spawn(move || {
                let (mut sequential, mut failed) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    match firewall_status(&bx, Duration::from_secs(15)) {
                        Some(_) => sequential += 1,
                        None => failed += 1,
                    }
                }
                format!("{sequential} sequential answered, {failed} not")
            }));
        }
        "qubesdb" => {
            let (rules_bx, rules_stop) = (Arc::clone(bx), Arc::clone(&stop));
            attack.threads.push(std::thread::spawn(move || {
                let start = Instant::now();
                let (ip, _) = client_addresses(50);
                let mut writes = 0u64;
                let mut errors = 0u64;
                let mut first_error = None;
                while !rules_stop.load(Ordering::SeqCst) {
                    let port = format!(
                        "action=accept proto=tcp dstports={0}-{0}",
                        1000 + writes % 1000
                    );
                    let rules = [
                        "action=accept proto=tcp dstports=80-80",
                        port.as_str(),
                        "action=accept specialtarget=dns",
                    ];
                    match rules_bx.set_rules(&ip, "drop", &rules) {
                        Ok(()) => writes += 1,
                        Err(error) => {
                            errors += 1;
                            first_error.get_or_insert(error);
                        }
                    }
                }
                format!(
                    "client50's rules rewritten {writes} times ({:.0}/s, {errors} errors{})",
                    writes as f64 / start.elapsed().as_secs_f64().max(1e-3),
                    first_error.map_or(String::new(), |e| format!(", the first: {e}"))
                )
            }));
            let (churn_bx, churn_stop) = (Arc::clone(bx), Arc::clone(&stop));
            attack.threads.push(std::thread::spawn(move || {
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
        "sys-net" => {
            let bx = Arc::clone(bx);
            attack.threads.push(std::thread::spawn(move || {
                let (mut restarts, mut errors) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    match quiet(
                        &bx.qubes_box(),
                        &["restart-net", "--state-dir", STATE, "--prefix", PREFIX],
                    ) {
                        Ok(_) => restarts += 1,
                        Err(_) => errors += 1,
                    }
                    let pause = Instant::now();
                    while !stop.load(Ordering::SeqCst) && pause.elapsed() < Duration::from_secs(2) {
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

struct Row {
    phase: &'static str,
    mbps: f64,
    median_ms: Option<f64>,
    worst_ms: Option<f64>,
    failures: u64,
    memory: Option<(u64, u64)>,
    nat: Option<(u64, u64, u64)>,
    leaked: u64,
    drops: BTreeMap<String, u64>,
    notes: String,
}

fn soak(bin: &Path, firewall: &Path, scripts: &Path, seconds: u64) -> Result<(), String> {
    let phase_seconds = (seconds as f64 / PHASES.len() as f64).max(3.0);
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
    println!(
        "soak: the sink sees what passes ({canary} canary frames); {:.1} s per phase",
        phase_seconds
    );

    let load = Load::start(&bx, scripts)?;
    // Let the load settle before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let mut rows: Vec<Row> = Vec::new();
    let first_status = firewall_status(&bx, Duration::from_secs(15)).unwrap_or_default();
    let heap = first_status
        .lines()
        .find(|l| l.starts_with("heap:"))
        .unwrap_or("heap: (no heap line in qubes.FirewallStatus)")
        .to_string();
    let mut previous_drops = drops(&first_status);
    let mut problems: Vec<String> = Vec::new();
    for phase in PHASES {
        let from = Instant::now();
        let attack = start_attack(phase, &bx, scripts, phase_seconds)?;
        std::thread::sleep(Duration::from_secs_f64(phase_seconds));
        let to = Instant::now();
        let notes = attack.stop();
        let mut notes = notes;
        if *phase == "sys-net" {
            // The restarts ended the sink with the old namespace.
            sinks.start(&bx)?;
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
        let (mbps, median_ms, worst_ms, failures) = load.figures(from, to);
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
        rows.push(Row {
            phase,
            mbps,
            median_ms,
            worst_ms,
            failures,
            memory,
            nat: nat(&status),
            leaked: sinks.leaked().0,
            drops: delta,
            notes,
        });
        if memory.is_none() {
            break;
        }
    }
    drop(load);

    // The table.
    let base = rows.first().map_or(0.0, |r| r.mbps);
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!();
    println!(
        "soak: {CLIENTS} clients, box up in {up_seconds:.1} s, {phase_seconds:.1} s per phase, well-behaved: client3+client4 HTTP downloads, client5 GET / every 0.1 s"
    );
    println!(
        "{:<11} {:>8} {:>6} {:>8} {:>8} {:>5} {:>8} {:>8} {:>14} {:>6}  attack",
        "phase",
        "MB/s",
        "ratio",
        "p50 ms",
        "max ms",
        "fail",
        "RSS KiB",
        "HWM KiB",
        "NAT (clients)",
        "leaked"
    );
    for r in &rows {
        let (rss, hwm) = r.memory.map_or(("-".into(), "-".into()), |(a, b)| {
            (a.to_string(), b.to_string())
        });
        let nat = r.nat.map_or("-".into(), |(n, _, c)| format!("{n} ({c})"));
        println!(
            "{:<11} {:>8.1} {:>6.2} {:>8} {:>8} {:>5} {:>8} {:>8} {:>14} {:>6}  {}",
            r.phase,
            r.mbps,
            if base > 0.0 { r.mbps / base } else { 0.0 },
            ms(r.median_ms),
            ms(r.worst_ms),
            r.failures,
            rss,
            hwm,
            nat,
            r.leaked,
            r.notes
        );
    }
    if let Some((_, capacity, _)) = rows.iter().find_map(|r| r.nat) {
        println!("NAT table capacity: {capacity}");
    }
    println!("qubes.FirewallStatus {heap}");
    println!("drops by reason (new in each phase):");
    for r in &rows {
        let list: Vec<String> = r.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "  {:<11} {}",
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
        && after.median_ms.is_none()
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
    drop(sinks);
    let bx = Arc::try_unwrap(bx).map_err(|_| "soak: the box is still in use")?;
    bx.down()?;
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
