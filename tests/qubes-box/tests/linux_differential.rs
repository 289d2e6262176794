//! The differential test against Qubes' Linux sys-firewall (issue 11), as
//! root: the box (`qubes-box up`, the hosted firewall) and beside it, in its
//! own namespaces, Qubes' own Linux sys-firewall (`src/linuxfw.rs`: Qubes'
//! `qubes-*.nft` and the `qubes-firewall` tables written by Qubes' own
//! `qubesagent/firewall.py`, both read at test time from
//! `../shared/reference/qubes-core-agent-linux.tar.gz` beside the
//! repository, never copied into it). Both get the same random rule sets,
//! shaped as qubesd writes them, for client1; then client1 sends the same
//! random probe frames through each (`src/probe.rs`: TCP with any flags,
//! UDP, every ICMP/ICMPv6 type, other protocols, IPv4 options and
//! fragments, IPv6 extension headers and fragments, to sys-net and to
//! client2). Per probe it compares whether it arrived and which ICMP
//! rejection client1 got.
//!
//! Fails on any probe ours forwards (even in part) where Linux drops it,
//! always; on any other disagreement unless its class is listed in
//! [`PENDING`] (a fix under way) or is a Qubes accident ([`accident`]).
//! Prints the figures. `FW_DIFF_RULESETS` (default 16) and
//! `FW_DIFF_PROBES` (probes per rule set, default 70) scale it;
//! `FW_DIFF_SEED` replays a run; `FW_DIFF_FIREWALL_BIN` tests a given
//! `qubes-firewall-hosted` instead of building one.
#![allow(clippy::unwrap_used)] // reason: test code

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qubes_box::linuxfw::{self, LinuxFirewall};
use qubes_box::netbox;
use qubes_box::probe::{self, Outcome, Probe, Rng, Sink};

/// Disagreement classes whose fix is under way, reported but not failing the test while pending: a
/// probe's class (see [`class`]) holding the first text, where ours dropped
/// the probe. Never a class where ours forwards what Linux drops:
/// those always fail. Remove an entry once its fix is in.
const PENDING: &[(&str, &str)] = &[
    // Empty: every disagreement class found so far is fixed (issue 11:
    // ICMP replies and unknown types rejected under denying rules, ICMPv6
    // MLD/ND untracked, TCP without a flow invalid). A class listed here is
    // reported without failing the test, and only while ours drops.
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_qubes-box"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        .unwrap_or(false)
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Installs a Debian package when `program` is missing.
fn ensure(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap()
        .status
        .success();
    if found {
        return;
    }
    for args in [&["update", "-q"][..], &["install", "-y", "-q", package][..]] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "apt-get {args:?} failed (needed: {package})"
        );
    }
}

fn build_firewall() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "build",
            "-p",
            "unikernel",
            "--features",
            "hosted",
            "--bin",
            "qubes-firewall-hosted",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "building qubes-firewall-hosted failed");
}

/// The test's directory (Qubes' unpacked sources, the box's state),
/// removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The box, taken down on drop.
struct BoxUp {
    state: PathBuf,
    prefix: String,
}

impl Drop for BoxUp {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
            .args(["down", "--state-dir", &self.state.display().to_string()])
            .output();
    }
}

impl BoxUp {
    fn qubesdb(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(bin_dir().join(tool))
            .args(["-d", "sys-firewall"])
            .args(args)
            .env("QUBESDB_SOCKET_DIR", self.state.join("qubes"))
            .output()
            .unwrap()
    }

    fn status(&self) -> String {
        let out = Command::new(bin_dir().join("qrexec-client"))
            .arg(format!(
                "--socket-dir={}",
                self.state.join("qubes").display()
            ))
            .args([
                "-d",
                "sys-firewall",
                "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
            ])
            .env("VCHAN_SOCKET_DIR", self.state.join("vchan"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn commits(&self) -> Option<u64> {
        let status = self.status();
        let line = status.lines().find(|l| l.starts_with("qubesdb: "))?;
        let mut words = line.split_whitespace();
        words.find(|w| *w == "commits")?;
        words.next()?.parse().ok()
    }

    /// Replaces client1's rules as qubesd does and waits until the
    /// firewall has taken both commits.
    fn set_rules(&self, entries: &[(String, String)]) {
        let before = self.wait_for("the firewall's status", || self.commits());
        let ip = probe::CLIENT1;
        let rm = self.qubesdb(
            "qubesdb-rm",
            &[
                &format!("/qubes-firewall/{ip}/"),
                &format!("/qubes-firewall/{}/", probe::qubes_ip6(ip)),
            ],
        );
        assert!(rm.status.success(), "{}", text(&rm));
        let args: Vec<&str> = entries
            .iter()
            .flat_map(|(k, v)| [k.as_str(), v.as_str()])
            .collect();
        let write = self.qubesdb("qubesdb-write", &args);
        assert!(write.status.success(), "{}", text(&write));
        self.wait_for("the firewall taking the new rules", || {
            self.commits().filter(|c| *c >= before + 2)
        });
    }

    fn wait_for<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what} did not happen; firewall log:\n{}",
                std::fs::read_to_string(self.state.join("firewall.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A `wire.py capture` in a namespace, its frames collected by a thread.
struct Capture {
    child: Child,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wire(netns: &str, mode: &str, iface: &str) -> Child {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(python())
        .arg(workspace().join("tests/qubes-box/linuxfw/wire.py"))
        .args([mode, iface])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn python() -> String {
    "python3".into()
}

impl Capture {
    fn start(netns: &str, iface: &str) -> Capture {
        let mut child = wire(netns, "capture", iface);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n", "capture on {netns} {iface} did not start");
        let frames = Arc::new(Mutex::new(Vec::new()));
        let sink = frames.clone();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                let bytes: Option<Vec<u8>> = (0..line.len() / 2)
                    .map(|i| u8::from_str_radix(line.get(2 * i..2 * i + 2)?, 16).ok())
                    .collect();
                if let Some(bytes) = bytes {
                    sink.lock().unwrap().push(bytes);
                }
            }
        });
        Capture { child, frames }
    }

    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap())
    }

    fn snapshot(&self) -> Vec<Vec<u8>> {
        self.frames.lock().unwrap().clone()
    }
}

/// A `wire.py send` on client1's eth0.
struct Sender {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sender {
    fn start(netns: &str) -> Sender {
        let mut child = wire(netns, "send", "eth0");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n", "sender in {netns} did not start");
        Sender {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, frames: &[Vec<u8>]) {
        let mut text = String::new();
        for frame in frames {
            for b in frame {
                text.push_str(&format!("{b:02x}"));
            }
            text.push('\n');
        }
        text.push('\n');
        self.stdin.write_all(text.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "sent\n");
    }
}

/// One side of the comparison: its sender and captures.
struct Side {
    name: &'static str,
    sender: Sender,
    client1: Capture,
    client2: Capture,
    net: Capture,
}

impl Side {
    fn clear(&self) {
        self.client1.take();
        self.client2.take();
        self.net.take();
    }

    /// Sends a barrier and waits for its reply; then a short grace for
    /// frames still on their way to the other captures.
    fn barrier(&mut self, ident: u16) {
        let start = Instant::now();
        let mut last_sent: Option<Instant> = None;
        loop {
            if last_sent.is_none_or(|t| t.elapsed() > Duration::from_millis(500)) {
                self.sender.send(&[probe::barrier(ident)]);
                last_sent = Some(Instant::now());
            }
            if self
                .client1
                .snapshot()
                .iter()
                .any(|f| probe::is_barrier_reply(f, ident))
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{}: the firewall never answered the barrier ping",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    fn outcomes(&self, probes: &[Probe]) -> Vec<Outcome> {
        let at_client = self.client1.snapshot();
        let at_client2 = self.client2.snapshot();
        let at_net = self.net.snapshot();
        probes
            .iter()
            .map(|p| {
                let destination: &[Vec<u8>] = match p.sink {
                    Sink::Net => &at_net,
                    Sink::Client2 => &at_client2,
                    Sink::Firewall => &[],
                };
                probe::outcome(p, destination, &at_client)
            })
            .collect()
    }
}

/// The categories a probe counts in for the figures.
fn categories(probe: &Probe) -> Vec<&'static str> {
    let v6 = matches!(probe.dst, IpAddr::V6(_));
    let mut out = vec![match (probe.proto, v6) {
        (6, _) if probe.label.starts_with("tcp SYN ") || probe.label == "tcp SYN" => "TCP SYN",
        (6, _) => "TCP other flags",
        (17, _) => "UDP",
        (1, _) => "ICMP",
        (58, _) => "ICMPv6",
        _ => "other protocols",
    }];
    out.push(if v6 { "IPv6" } else { "IPv4" });
    for (needle, name) in [
        ("+fragments", "fragments"),
        ("+ipv4-option", "IPv4 options"),
        ("+ipv6-ext", "IPv6 extension headers"),
        ("to client2", "client to client"),
        ("to the firewall", "to the firewall itself"),
    ] {
        if probe.label.contains(needle) {
            out.push(name);
        }
    }
    out
}

/// A probe's class: its label and what each side did.
/// The label is coarsened: ICMP codes, IPv4 options, fragmentation and the
/// list of IPv6 extension headers are left out (the example keeps them).
fn class(probe: &Probe, ours: &Outcome, linux: &Outcome) -> String {
    let mut label = String::new();
    let mut words = probe.label.split(' ').peekable();
    while let Some(word) = words.next() {
        match word {
            "code" | "+ipv4-option" => {
                words.next();
            }
            "+fragments" | "reversed" => {}
            "+ipv6-ext" => {
                words.next();
                label.push_str(" +ipv6-ext");
            }
            _ => {
                if !label.is_empty() {
                    label.push(' ');
                }
                label.push_str(word);
            }
        }
    }
    let family = if matches!(probe.dst, IpAddr::V6(_)) {
        "IPv6"
    } else {
        "IPv4"
    };
    format!(
        "{family} {label}: ours {}, Linux {}",
        ours.describe(probe),
        linux.describe(probe)
    )
}

/// Whether `rule` (qubesd's text) matches `probe` by the rules' documented
/// meaning (Qubes' vm-interface and firewall.py), and, with `nexthdr_quirk`,
/// as Linux matches it: `proto=` as `ip6 nexthdr <proto>`, the first
/// next-header only.
fn rule_matches(rule: &str, probe: &Probe, nexthdr_quirk: bool) -> Option<bool> {
    let v6 = matches!(probe.dst, IpAddr::V6(_));
    let mut matches = true;
    let mut dstports: Option<(u16, u16)> = None;
    let mut proto: Option<&str> = None;
    let mut dns = false;
    for word in rule.split(' ') {
        let (key, value) = word.split_once('=')?;
        match key {
            "action" => {}
            "proto" => proto = Some(value),
            "dst4" | "dst6" => {
                let (net, len) = value.split_once('/')?;
                let len: u32 = len.parse().ok()?;
                matches &= match (probe.dst, net.parse::<IpAddr>().ok()?) {
                    (IpAddr::V4(d), IpAddr::V4(n)) => {
                        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                        u32::from(d) & mask == u32::from(n) & mask
                    }
                    (IpAddr::V6(d), IpAddr::V6(n)) => {
                        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                        u128::from(d) & mask == u128::from(n) & mask
                    }
                    _ => false,
                };
            }
            "dstports" => {
                let (a, b) = value.split_once('-')?;
                dstports = Some((a.parse().ok()?, b.parse().ok()?));
            }
            "icmptype" => matches &= probe.icmp_type == Some(value.parse().ok()?),
            "specialtarget" => dns = value == "dns",
            _ => return None,
        }
    }
    if let Some(p) = proto {
        let number = match p {
            "tcp" => 6,
            "udp" => 17,
            "icmp" if v6 => 58,
            "icmp" => 1,
            _ => return None,
        };
        matches &= probe.proto == number && !(nexthdr_quirk && probe.ipv6_ext);
    }
    if dns {
        // firewall.py: dstports other than 53 leave the rule out
        if dstports.is_some_and(|d| d != (53, 53)) {
            return Some(false);
        }
        dstports = Some((53, 53));
        matches &=
            probe.dst == IpAddr::V4(netbox::DNS[0]) || probe.dst == IpAddr::V4(netbox::DNS[1]);
    }
    if let Some((a, b)) = dstports {
        matches &=
            matches!(probe.proto, 6 | 17) && probe.port.is_some_and(|p| (a..=b).contains(&p));
    }
    Some(matches)
}

/// The verdict of a rule set for `probe` (true: accept), see
/// [`rule_matches`].
fn verdict(policy: &str, rules: &[String], probe: &Probe, nexthdr_quirk: bool) -> Option<bool> {
    for rule in rules {
        if rule_matches(rule, probe, nexthdr_quirk)? {
            return Some(rule.starts_with("action=accept"));
        }
    }
    Some(policy == "accept")
}

/// A disagreement caused by a Qubes accident rather than by us: Linux's
/// `ip6 nexthdr <proto>` (firewall.py prepare_rules, the `nft_rule += '
/// ip6 nexthdr {}'` line) looks at the first next-header only, so a
/// `proto=` rule never matches an IPv6 packet with an extension header,
/// while the documented meaning (and ours) is the transport protocol. Only
/// probes whose verdict this changes are excluded.
fn accident(probe: &Probe, policy: &str, rules: &[String]) -> Option<&'static str> {
    if probe.ipv6_ext && verdict(policy, rules, probe, true) != verdict(policy, rules, probe, false)
    {
        return Some(
            "IPv6 packet with an extension header whose verdict depends on a proto= rule: \
             firewall.py prepare_rules matches `ip6 nexthdr <proto>`, the first next-header only",
        );
    }
    None
}

/// A disagreement caused by Linux itself, not by Qubes' rules: its
/// `reject` (nf_send_unreach) sends no ICMP error for an IP protocol it
/// has no checksum rule for (measured with protocol 253 whether or not the
/// payload sums; GRE, ESP and SCTP are rejected), where ours answers
/// admin-prohibited as for any denied packet. Only that difference is
/// excused: both must have dropped the probe.
fn kernel_quirk(probe: &Probe, ours: &Outcome, linux: &Outcome) -> Option<&'static str> {
    let unusual = !matches!(probe.proto, 1 | 6 | 17 | 47 | 50 | 58 | 132);
    if unusual
        && ours.markers_arrived == 0
        && linux.markers_arrived == 0
        && linux.rejections.is_empty()
        && !ours.rejections.is_empty()
    {
        return Some(
            "IP protocol without a Linux checksum rule (253): ours rejects with \
             admin-prohibited, Linux's nf_send_unreach sends nothing",
        );
    }
    None
}

#[test]
fn the_firewall_decides_as_qubes_linux_sys_firewall() {
    if !is_root() {
        eprintln!("skipped: not root");
        return;
    }
    for tool in [
        "qubesdb-daemon",
        "qubesdb-write",
        "qubesdb-rm",
        "qrexec-daemon",
        "qrexec-client",
        "qrexec-agent",
    ] {
        if !bin_dir().join(tool).exists() {
            eprintln!("skipped: {tool} not built (run cargo build --workspace --bins)");
            return;
        }
    }
    let tarball = workspace().join("../shared/reference/qubes-core-agent-linux.tar.gz");
    assert!(
        tarball.exists(),
        "{} is missing: the differential test needs Qubes' qubes-core-agent-linux sources \
         beside the repository (../shared/reference/, as in CI)",
        tarball.display()
    );
    ensure("nft", "nftables");
    ensure("python3", "python3");
    let firewall_bin = std::env::var("FW_DIFF_FIREWALL_BIN").ok();
    if firewall_bin.is_none() {
        build_firewall();
    }

    let rulesets = env_number("FW_DIFF_RULESETS", 16);
    let per_set = env_number("FW_DIFF_PROBES", 70) as u32;
    let seed = std::env::var("FW_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "differential: seed {seed} (FW_DIFF_SEED={seed} replays), {rulesets} rule sets x {per_set} probes"
    );
    let mut rng = Rng::new(seed);

    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("qubes-linux-differential-{pid}"));
    let _work_guard = WorkDir(work.clone());
    let qubes_src = linuxfw::unpack_qubes_sources(&tarball, &work).unwrap();
    let boxed = BoxUp {
        state: work.join("box"),
        prefix: format!("qd{pid}-"),
    };
    let mut up = Command::new(env!("CARGO_BIN_EXE_qubes-box"));
    up.args([
        "up",
        "--state-dir",
        &boxed.state.display().to_string(),
        "--prefix",
        &boxed.prefix,
    ]);
    if let Some(bin) = &firewall_bin {
        up.args(["--firewall-bin", bin]);
    }
    let out = up.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mut linux = LinuxFirewall::up(
        &format!("ql{pid}-"),
        &qubes_src,
        &workspace().join("tests/qubes-box/linuxfw"),
        Path::new(&python()),
    )
    .unwrap();

    let bns = |m: &str| format!("{}{m}", boxed.prefix);
    linuxfw::silence_sys_net(&bns("sys-net")).unwrap();
    let mut sides = [
        Side {
            name: "ours",
            sender: Sender::start(&bns("client1")),
            client1: Capture::start(&bns("client1"), "eth0"),
            client2: Capture::start(&bns("client2"), "eth0"),
            net: Capture::start(&bns("sys-net"), "vif2.0"),
        },
        Side {
            name: "Linux",
            sender: Sender::start(&linux.netns("client1")),
            client1: Capture::start(&linux.netns("client1"), "eth0"),
            client2: Capture::start(&linux.netns("client2"), "eth0"),
            net: Capture::start(&linux.netns("net"), "vif2.0"),
        },
    ];

    // client2 keeps the box's rules (DNS only) on both sides; qubesd
    // publishes every connected client's addresses.
    let client2_entries =
        netbox::firewall_entries(probe::CLIENT2, "drop", &["action=accept specialtarget=dns"]);
    let connected = [
        (
            "/connected-ips".to_string(),
            format!("{} {}", probe::CLIENT1, probe::CLIENT2),
        ),
        (
            "/connected-ips6".to_string(),
            format!(
                "{} {}",
                probe::qubes_ip6(probe::CLIENT1),
                probe::qubes_ip6(probe::CLIENT2)
            ),
        ),
    ];
    let addresses: Vec<String> = [probe::CLIENT1, probe::CLIENT2]
        .iter()
        .flat_map(|ip| [ip.to_string(), probe::qubes_ip6(*ip).to_string()])
        .collect();

    let mut probes_total = 0u64;
    let mut agreed = 0u64;
    let mut excluded_sets: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut accidents: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut disagreements: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut ours_forwards_linux_drops = 0u64;
    let mut failing = 0u64;
    let mut next_id = 1u32;
    let mut per_category: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    let mut barrier_ident = 0xb000u16;

    for set in 0..=rulesets {
        // set 0: a warm-up (policy accept), so neighbour discovery is done
        let (policy, rules) = if set == 0 {
            ("accept".to_string(), Vec::new())
        } else {
            linuxfw::random_rules(&mut rng)
        };
        if let Some(reason) = rules.iter().find_map(|r| linuxfw::qubes_accident(r)) {
            *excluded_sets.entry(reason).or_default() += 1;
            continue;
        }
        let rule_refs: Vec<&str> = rules.iter().map(String::as_str).collect();
        let entries = netbox::firewall_entries(probe::CLIENT1, &policy, &rule_refs);
        boxed.set_rules(&entries);
        let mut all = entries.clone();
        all.extend(client2_entries.iter().cloned());
        all.extend(connected.iter().cloned());
        let errors = linux.apply(&all, &addresses).unwrap();
        assert!(
            errors.is_empty(),
            "Qubes' firewall.py refused rule set {set} (policy {policy}, rules {rules:?}), not a \
             known accident: {errors:?}"
        );

        let probes: Vec<Probe> = (0..per_set)
            .map(|_| {
                let p = probe::random_probe(&mut rng, next_id);
                next_id += 1;
                p
            })
            .collect();
        let frames: Vec<Vec<u8>> = probes.iter().flat_map(|p| p.frames.clone()).collect();
        for side in &mut sides {
            side.clear();
            side.sender.send(&frames);
        }
        barrier_ident = barrier_ident.wrapping_add(1);
        for side in &mut sides {
            side.barrier(barrier_ident);
        }
        if set == 0 {
            continue;
        }
        let ours = sides[0].outcomes(&probes);
        let theirs = sides[1].outcomes(&probes);
        for ((p, o), l) in probes.iter().zip(&ours).zip(&theirs) {
            probes_total += 1;
            for c in categories(p) {
                let entry = per_category.entry(c).or_insert((0, 0));
                entry.0 += 1;
                entry.1 += u64::from(o.agrees(l, p));
            }
            if o.agrees(l, p) {
                agreed += 1;
                continue;
            }
            if let Some(reason) = accident(p, &policy, &rules).or_else(|| kernel_quirk(p, o, l)) {
                *accidents.entry(reason).or_default() += 1;
                continue;
            }
            let forwards_more = o.markers_arrived > 0 && l.markers_arrived == 0
                || o.arrival(p) == probe::Arrival::Forwarded && l.arrival(p) != o.arrival(p);
            if forwards_more {
                ours_forwards_linux_drops += 1;
            }
            let c = class(p, o, l);
            let pending = !forwards_more
                && o.markers_arrived == 0
                && PENDING.iter().any(|(what, _)| c.contains(what));
            if !pending {
                failing += 1;
            }
            let example = format!(
                "policy {policy}, rules {rules:?}; probe {} to {}{}",
                p.label,
                p.dst,
                p.port.map(|x| format!(" port {x}")).unwrap_or_default()
            );
            disagreements
                .entry(c)
                .and_modify(|e| e.0 += 1)
                .or_insert((1, example));
        }
    }

    let compared = probes_total;
    eprintln!("differential against Qubes' Linux sys-firewall (seed {seed}):");
    let excused: u64 = accidents.values().sum();
    eprintln!(
        "  rule sets {rulesets} ({} excluded as Qubes accidents), probes {compared}, agreed \
         {agreed}, excused as Qubes/Linux accidents {excused}, agreement {:.1} % of the rest",
        excluded_sets.values().sum::<u64>(),
        if compared == excused {
            100.0
        } else {
            agreed as f64 * 100.0 / (compared - excused) as f64
        }
    );
    eprintln!("  probes ours forwards where Linux drops: {ours_forwards_linux_drops}");
    for (c, (n, a)) in &per_category {
        eprintln!("  {c}: {a}/{n} agree");
    }
    for (reason, n) in &excluded_sets {
        eprintln!("  excluded rule sets: {n} x {reason}");
    }
    for (reason, n) in &accidents {
        eprintln!("  Qubes/Linux accident, probes not counted as disagreeing: {n} x {reason}");
    }
    for (c, (n, example)) in &disagreements {
        let pending = PENDING
            .iter()
            .find(|(what, _)| c.contains(what) && c.contains(": ours dropped"))
            .map(|(_, why)| format!(" [pending, {why}]"))
            .unwrap_or_default();
        eprintln!("  DISAGREE {n} x {c}{pending}\n      e.g. {example}");
    }
    drop(sides);
    drop(linux);
    assert_eq!(
        ours_forwards_linux_drops, 0,
        "ours forwarded probes that Qubes' Linux sys-firewall drops (see above)"
    );
    assert_eq!(
        failing, 0,
        "disagreements with Qubes' Linux sys-firewall (see above)"
    );
}
