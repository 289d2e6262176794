//! `cargo xtask bench KIND`: the project's measurements (`bench qrexec`:
//! see `bench_qrexec.rs`; `bench xen`: see `bench_xen.rs`).
//!
//! `bench box` measures the hosted firewall in Qubes in a box against what
//! a Linux `sys-firewall` does: iperf3 from a client qube to a server in
//! sys-net (both directions, `-R` for sys-net → client) through
//! `qubes-firewall-hosted` (release build, 10 clients attached), then
//! through the same topology routed and masqueraded by the Linux kernel
//! (a namespace with `ip_forward` and an nftables forward filter plus
//! `masquerade`). It prints both figures, the ratio, and the firewall
//! process's VmRSS/VmHWM from `/proc` (goals: at least 80 % of the kernel
//! path with offloads on, under 32 MiB RSS). The hosted firewall runs twice,
//! as it starts by default and with busy polling off (`--busy-poll 0`); each
//! run also prints the CPU it took (the firewall process's, and the whole
//! machine's busy share from `/proc/stat`), and the ratio is given per busy
//! CPU as well. A further figure is the kernel path with its
//! segmentation/checksum offloads turned off (ethtool): the kernel then
//! moves one MTU-sized frame at a time — the per-packet baseline (the
//! hosted firewall's TAPs use offloads: GSO and checksum-partial frames go
//! through the core whole, which rewrites their headers only, and leave as
//! GSO frames).
//!
//! Missing tools (iperf3, nftables, iproute2, procps, ethtool) are installed with
//! `apt-get install -y` after one `apt-get update`. Everything it creates
//! (namespaces with its own prefixes, the box's state dir) is removed
//! again, also when a step fails; it must never touch anything else.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{run_command, workspace_root};

/// Seconds each iperf3 run lasts.
const SECONDS: u32 = 5;
/// Clients attached to the firewall while it is measured.
const CLIENTS: u16 = 10;
/// iperf3's port.
const IPERF_PORT: u16 = 5201;
/// The box's state dir and namespace prefix for the benchmark.
const BOX_STATE: &str = "/run/qubes-box-bench";
const BOX_PREFIX: &str = "qbb-";
/// The kernel path's namespace prefix.
const KERNEL_PREFIX: &str = "qbk-";

pub fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("box") => bench_box(),
        Some("qrexec") => crate::bench_qrexec::bench_qrexec(),
        Some("xen") => crate::bench_xen::bench_xen(),
        Some(other) => Err(format!(
            "unknown benchmark `{other}` (known: box, qrexec, xen)"
        )),
        None => Err("usage: cargo xtask bench box|qrexec|xen".into()),
    }
}

/// Commands the box needs and the Debian packages that carry them.
pub const BOX_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
    ("ethtool", "ethtool"),
];

fn have(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
}

/// Installs the packages of every missing command (one `apt-get update`).
pub fn ensure_tools(tools: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(command, _)| !have(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {}", missing.join(" "));
    run_command(Command::new("apt-get").args(["update", "-q"]))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Must run as root (namespaces, TAPs, nftables).
pub fn require_root() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if root {
        Ok(())
    } else {
        Err("must run as root (network namespaces, TAP devices, nftables)".into())
    }
}

/// Builds what the box runs: every workspace binary (debug) and the hosted
/// firewall (debug and, for measurements, release). Returns the debug
/// binary directory.
pub fn build_box(release_firewall: bool) -> Result<PathBuf, String> {
    let root = workspace_root();
    run_command(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--workspace", "--bins"]),
    )?;
    let mut firewall = Command::new("cargo");
    firewall.current_dir(&root).args([
        "build",
        "-p",
        "unikernel",
        "--features",
        "hosted",
        "--bin",
        "qubes-firewall-hosted",
    ]);
    if release_firewall {
        firewall.arg("--release");
    }
    run_command(&mut firewall)?;
    Ok(target_dir().join("debug"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs a command quietly; an error carries its stderr.
pub fn quiet(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        ))
    }
}

/// A box brought up by `qubes-box up`, taken down on drop.
pub struct BoxUp {
    pub bin: PathBuf,
    pub state: String,
    pub prefix: String,
}

impl BoxUp {
    pub fn up(bin: &Path, state: &str, prefix: &str, extra: &[&str]) -> Result<BoxUp, String> {
        let qubes_box = bin.join("qubes-box");
        let qubes_box = qubes_box.to_string_lossy().into_owned();
        // A box left over from an interrupted run goes first.
        let _ = quiet(&qubes_box, &["down", "--state-dir", state]);
        let mut args = vec!["up", "--state-dir", state, "--prefix", prefix];
        args.extend_from_slice(extra);
        quiet(&qubes_box, &args)?;
        Ok(BoxUp {
            bin: bin.to_path_buf(),
            state: state.to_string(),
            prefix: prefix.to_string(),
        })
    }

    pub fn qubes_box(&self) -> String {
        self.bin.join("qubes-box").to_string_lossy().into_owned()
    }

    /// `ip netns exec <prefix><machine> PROGRAM ARGS...`
    pub fn in_machine(&self, machine: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &format!("{}{machine}", self.prefix)])
            .arg(program)
            .args(args);
        command
    }

    /// A QubesDB tool of dom0 on the firewall's database.
    pub fn qubesdb(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let output = Command::new(self.bin.join(tool))
            .args(["-d", "sys-firewall"])
            .args(args)
            .env("QUBESDB_SOCKET_DIR", Path::new(&self.state).join("qubes"))
            .output()
            .map_err(|e| format!("cannot run {tool}: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "{tool} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// Replaces a client's rules the way qubesd does (qubes-core-admin
    /// `reload_firewall_for_vm`), for both address families: remove the
    /// client's directory, write `policy` and that family's rules as
    /// `0000`…, then the empty commit write.
    pub fn set_rules(&self, ip: &str, policy: &str, rules: &[&str]) -> Result<(), String> {
        let ip: std::net::Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let [_, _, c, d] = ip.octets();
        // Qubes' IPv6 address of a qube: fd09:24ef:4179::a89:<last 16 bits>.
        let ip6 = std::net::Ipv6Addr::new(
            0xfd09,
            0x24ef,
            0x4179,
            0,
            0,
            0,
            0xa89,
            u16::from_be_bytes([c, d]),
        );
        for (address, skip) in [(ip.to_string(), "dst6="), (ip6.to_string(), "dst4=")] {
            self.qubesdb("qubesdb-rm", &[&format!("/qubes-firewall/{address}/")])?;
            let mut args = vec![
                format!("/qubes-firewall/{address}/policy"),
                policy.to_string(),
            ];
            let family = rules
                .iter()
                .filter(|rule| !rule.split_whitespace().any(|word| word.starts_with(skip)));
            for (index, rule) in family.enumerate() {
                args.push(format!("/qubes-firewall/{address}/{index:04}"));
                args.push((*rule).to_string());
            }
            args.push(format!("/qubes-firewall/{address}"));
            args.push(String::new());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.qubesdb("qubesdb-write", &args)?;
        }
        Ok(())
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(Path::new(&self.state).join(format!("{name}.log")))
            .unwrap_or_default()
    }

    pub fn down(&self) -> Result<(), String> {
        quiet(&self.qubes_box(), &["down", "--state-dir", &self.state]).map(|_| ())
    }
}

impl Drop for BoxUp {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

/// Kills a child we started, by its pid, and reaps it.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run's result in bits per second (the receiver's sum).
fn iperf_bits(json: &str) -> Option<f64> {
    json_number_after(json, "\"sum_received\"", "\"bits_per_second\":")
}

/// The TCP sender's retransmitted segments over the run (`sum_sent`).
fn iperf_retransmits(json: &str) -> Option<u64> {
    json_number_after(json, "\"sum_sent\"", "\"retransmits\":").map(|n| n as u64)
}

/// The number behind `key` in the last object named `object` of
/// iperf3's JSON.
fn json_number_after(json: &str, object: &str, key: &str) -> Option<f64> {
    let at = json.rfind(object)?;
    let rest = json.get(at..)?;
    let start = rest.find(key)? + key.len();
    let number: String = rest
        .get(start..)?
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == 'E' || *c == '+')
        .collect();
    number.parse().ok()
}

/// iperf3 from a namespace to `server` (`reverse`: the server sends), after
/// starting a one-shot server in `server_netns`: bits per second, and the
/// sender's retransmissions.
fn iperf(
    client_netns: &str,
    server_netns: &str,
    reverse: bool,
) -> Result<(f64, Option<u64>), String> {
    let server = Command::new("ip")
        .args(["netns", "exec", server_netns, "iperf3", "-s", "-1", "-B"])
        .arg("192.0.2.80")
        .args(["-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start iperf3 -s: {e}"))?;
    let _server = Reaped(server);
    let start = Instant::now();
    loop {
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            client_netns.into(),
            "iperf3".into(),
            "-c".into(),
            "192.0.2.80".into(),
            "-p".into(),
            IPERF_PORT.to_string(),
            "-t".into(),
            SECONDS.to_string(),
            "-J".into(),
        ];
        if reverse {
            args.push("-R".into());
        }
        let output = Command::new("ip")
            .args(&args)
            .output()
            .map_err(|e| format!("cannot run iperf3: {e}"))?;
        let json = String::from_utf8_lossy(&output.stdout);
        if output.status.success()
            && let Some(bits) = iperf_bits(&json)
        {
            return Ok((bits, iperf_retransmits(&json)));
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "iperf3 from {client_netns} failed: {}",
                json.chars().take(600).collect::<String>()
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The process's VmRSS and VmHWM in KiB.
fn memory_kib(pid: &str) -> Result<(u64, u64), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => Err(format!("/proc/{pid}/status has no VmRSS/VmHWM")),
    }
}

/// One direction's iperf3 run: what arrived, and the CPU it took.
#[derive(Clone, Copy)]
struct Run {
    /// Bits per second the receiver got.
    bits: f64,
    /// TCP segments the sender retransmitted.
    retransmits: Option<u64>,
    /// The whole machine's busy share over the run (all CPUs, 0-100 %).
    machine_busy: f64,
    /// The firewall process's CPU, in % of one CPU (hosted runs only).
    firewall_cpu: Option<f64>,
}

struct Figures {
    up: Run,
    down: Run,
}

/// `/proc/stat`'s `cpu` line: (busy, total) ticks since boot, and the
/// number of `cpuN` lines.
fn machine_ticks() -> Result<(u64, u64, usize), String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    parse_machine_ticks(&stat).ok_or_else(|| "/proc/stat has no cpu line".to_string())
}

fn parse_machine_ticks(stat: &str) -> Option<(u64, u64, usize)> {
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    let ticks: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total, cpus.max(1)))
}

/// A process's utime + stime in ticks (`/proc/<pid>/stat` fields 14, 15).
fn process_ticks(pid: &str) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    parse_process_ticks(&stat).ok_or_else(|| format!("/proc/{pid}/stat: no utime/stime"))
}

fn parse_process_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: count the fields
    // after its last ')'. The first of them is field 3 (state); utime is
    // field 14, stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n).and_then(|f| f.parse::<u64>().ok());
    Some(field(11)? + field(12)?)
}

/// `iperf` with the machine's (and the firewall process's) CPU counted
/// around it.
fn iperf_cpu(
    client_netns: &str,
    server_netns: &str,
    reverse: bool,
    firewall_pid: Option<&str>,
) -> Result<Run, String> {
    let (busy0, total0, cpus) = machine_ticks()?;
    let fw0 = firewall_pid.map(process_ticks).transpose()?;
    let (bits, retransmits) = iperf(client_netns, server_netns, reverse)?;
    let (busy1, total1, _) = machine_ticks()?;
    let fw1 = firewall_pid.map(process_ticks).transpose()?;
    let total = total1.saturating_sub(total0).max(1) as f64;
    Ok(Run {
        bits,
        retransmits,
        machine_busy: busy1.saturating_sub(busy0) as f64 / total * 100.0,
        firewall_cpu: fw0
            .zip(fw1)
            .map(|(a, b)| b.saturating_sub(a) as f64 / total * cpus as f64 * 100.0),
    })
}

fn measure_hosted(
    bin: &Path,
    firewall: &Path,
    busy_poll: bool,
) -> Result<(Figures, (u64, u64)), String> {
    let firewall = firewall.to_string_lossy().into_owned();
    let clients = CLIENTS.to_string();
    let mut args = vec!["--firewall-bin", &firewall, "--clients", &clients];
    if !busy_poll {
        args.extend(["--firewall-arg", "--busy-poll", "--firewall-arg", "0"]);
    }
    let bx = BoxUp::up(bin, BOX_STATE, BOX_PREFIX, &args)?;
    // client1 may reach iperf3 (and keeps its HTTP and DNS rules).
    bx.set_rules(
        "10.137.0.20",
        "drop",
        &[
            "action=accept proto=tcp dstports=80-80",
            &format!("action=accept proto=tcp dstports={IPERF_PORT}-{IPERF_PORT}"),
            "action=accept specialtarget=dns",
        ],
    )?;
    let client = format!("{BOX_PREFIX}client1");
    let server = format!("{BOX_PREFIX}sys-net");
    let pid = quiet(&bx.qubes_box(), &["firewall-pid", "--state-dir", BOX_STATE])?;
    let up = iperf_cpu(&client, &server, false, Some(pid.trim()))?;
    let down = iperf_cpu(&client, &server, true, Some(pid.trim()))?;
    let attached = bx.log("firewall").matches("added with IP").count();
    if attached < usize::from(CLIENTS) {
        return Err(format!(
            "only {attached} of {CLIENTS} clients attached to the firewall"
        ));
    }
    let memory = memory_kib(pid.trim())?;
    bx.down()?;
    Ok((Figures { up, down }, memory))
}

/// A Linux kernel forwarding path's namespaces, deleted on drop:
/// `<prefix>client1` (10.137.0.20) → `<prefix>sys-firewall` (`ip_forward`,
/// [`NFT_RULES`]: a forward filter and `masquerade`) → `<prefix>sys-net`
/// (192.0.2.80 on its loopback), what a Linux `sys-firewall` does. `bench
/// box` measures it against the hosted firewall; `soak --control` runs a
/// control load through it.
pub struct KernelPath {
    names: Vec<String>,
}

impl Drop for KernelPath {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = quiet("ip", &["netns", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    quiet("ip", args).map(|_| ())
}

/// What a Linux sys-firewall does: forward between the client's vif and
/// the uplink, nftables filtering new flows per client (established ones
/// pass by conntrack) and masquerading out of the uplink.
const NFT_RULES: &str = "\
table ip qubes {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname \"vif3.0\" ip saddr 10.137.0.20 tcp dport { 80, 5201 } accept
        iifname \"vif3.0\" ip saddr 10.137.0.20 ip daddr { 10.139.1.1, 10.139.1.2 } udp dport 53 accept
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"eth0\" masquerade
    }
}
";

/// Builds the kernel path with namespaces named `<prefix>...` (any left
/// over from an interrupted run are deleted first).
pub fn build_kernel_path(prefix: &str) -> Result<KernelPath, String> {
    let net = format!("{prefix}sys-net");
    let fw = format!("{prefix}sys-firewall");
    let client = format!("{prefix}client1");
    for name in [&net, &fw, &client] {
        let _ = quiet("ip", &["netns", "del", name]);
    }
    let path = KernelPath {
        names: vec![net.clone(), fw.clone(), client.clone()],
    };
    for name in [&net, &fw, &client] {
        ip(&["netns", "add", name])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
    }
    ip(&["-n", &net, "addr", "add", "192.0.2.80/32", "dev", "lo"])?;
    ip(&[
        "link", "add", "vif2.0", "netns", &net, "type", "veth", "peer", "name", "eth0", "netns",
        &fw,
    ])?;
    ip(&["-n", &net, "addr", "add", "10.137.0.5/32", "dev", "vif2.0"])?;
    ip(&["-n", &net, "link", "set", "vif2.0", "up"])?;
    ip(&["-n", &net, "route", "add", "10.137.0.6/32", "dev", "vif2.0"])?;
    ip(&["-n", &fw, "addr", "add", "10.137.0.6/32", "dev", "eth0"])?;
    ip(&["-n", &fw, "link", "set", "eth0", "up"])?;
    ip(&["-n", &fw, "route", "add", "10.137.0.5/32", "dev", "eth0"])?;
    ip(&["-n", &fw, "route", "add", "default", "via", "10.137.0.5"])?;
    ip(&[
        "link", "add", "eth0", "netns", &client, "type", "veth", "peer", "name", "vif3.0", "netns",
        &fw,
    ])?;
    ip(&["-n", &fw, "link", "set", "vif3.0", "up"])?;
    ip(&["-n", &fw, "route", "add", "10.137.0.20/32", "dev", "vif3.0"])?;
    ip(&[
        "-n",
        &client,
        "addr",
        "add",
        "10.137.0.20/32",
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &client, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &client,
        "route",
        "add",
        "10.137.0.6/32",
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        &client,
        "route",
        "add",
        "default",
        "via",
        "10.137.0.6",
    ])?;
    quiet(
        "ip",
        &[
            "netns",
            "exec",
            &fw,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    // The firewall answers ARP for the addresses it routes to, as Qubes'
    // Linux firewall does on vifs (proxy ARP); here plain routes suffice
    // because each side has a host route to the other.
    let rules = std::env::temp_dir().join(format!("{prefix}{}.nft", std::process::id()));
    std::fs::write(&rules, NFT_RULES).map_err(|e| e.to_string())?;
    let loaded = quiet(
        "ip",
        &["netns", "exec", &fw, "nft", "-f", &rules.to_string_lossy()],
    );
    let _ = std::fs::remove_file(&rules);
    loaded?;
    Ok(path)
}

/// Turns off segmentation/receive offloads and checksum offload on every
/// link of the kernel path, so the kernel moves one MTU-sized frame at a
/// time (the per-packet baseline).
fn offloads_off() -> Result<(), String> {
    for (machine, link) in [
        ("sys-net", "vif2.0"),
        ("sys-firewall", "eth0"),
        ("sys-firewall", "vif3.0"),
        ("client1", "eth0"),
    ] {
        quiet(
            "ip",
            &[
                "netns",
                "exec",
                &format!("{KERNEL_PREFIX}{machine}"),
                "ethtool",
                "-K",
                link,
                "tso",
                "off",
                "gso",
                "off",
                "gro",
                "off",
                "tx",
                "off",
                "rx",
                "off",
                "sg",
                "off",
            ],
        )?;
    }
    Ok(())
}

fn measure_kernel(offloads: bool) -> Result<Figures, String> {
    let _path = build_kernel_path(KERNEL_PREFIX)?;
    if !offloads {
        offloads_off()?;
    }
    let client = format!("{KERNEL_PREFIX}client1");
    let server = format!("{KERNEL_PREFIX}sys-net");
    let up = iperf_cpu(&client, &server, false, None)?;
    let down = iperf_cpu(&client, &server, true, None)?;
    Ok(Figures { up, down })
}

fn bench_box() -> Result<(), String> {
    require_root()?;
    ensure_tools(BOX_TOOLS)?;
    let bin = build_box(true)?;
    let firewall = target_dir().join("release").join("qubes-firewall-hosted");
    println!(
        "bench box: iperf3 -t {SECONDS}, client1 -> sys-net (up) and sys-net -> client1 (down, -R)"
    );
    let (hosted, (rss, hwm)) = measure_hosted(&bin, &firewall, true)?;
    let (no_poll, _) = measure_hosted(&bin, &firewall, false)?;
    let kernel = measure_kernel(true)?;
    let plain = measure_kernel(false)?;
    let gbit = |run: &Run| run.bits / 1e9;
    let cpu = |figures: &Figures| {
        let fw = |run: &Run| {
            run.firewall_cpu
                .map_or(String::new(), |c| format!("firewall {c:.0} % of a CPU, "))
        };
        format!(
            "  CPU: up {}machine {:.0} % busy; down {}machine {:.0} % busy",
            fw(&figures.up),
            figures.up.machine_busy,
            fw(&figures.down),
            figures.down.machine_busy
        )
    };
    let retr = |run: &Run| {
        run.retransmits
            .map_or_else(|| "?".to_string(), |n| n.to_string())
    };
    let line = |what: &str, figures: &Figures| {
        println!(
            "{what}: up {:.2} Gbit/s, down {:.2} Gbit/s (TCP retransmissions: up {}, down {})",
            gbit(&figures.up),
            gbit(&figures.down),
            retr(&figures.up),
            retr(&figures.down)
        );
        println!("{}", cpu(figures));
    };
    line(
        &format!("hosted firewall (release, {CLIENTS} clients, busy polling as default)"),
        &hosted,
    );
    line(
        "hosted firewall, busy polling off (--busy-poll 0)",
        &no_poll,
    );
    line("Linux kernel (ip_forward + nftables masquerade)", &kernel);
    line(
        "Linux kernel, offloads off (one MTU frame at a time)",
        &plain,
    );
    let ratio = |a: &Run, b: &Run| a.bits / b.bits.max(1.0) * 100.0;
    println!(
        "ratio hosted/kernel: up {:.1} %, down {:.1} % (goal: at least 80 %)",
        ratio(&hosted.up, &kernel.up),
        ratio(&hosted.down, &kernel.down)
    );
    println!(
        "ratio hosted without busy polling/kernel: up {:.1} %, down {:.1} %",
        ratio(&no_poll.up, &kernel.up),
        ratio(&no_poll.down, &kernel.down)
    );
    // Throughput per busy CPU: busy polling spends CPU on waiting.
    let per_cpu =
        |a: &Run, b: &Run| ratio(a, b) * b.machine_busy.max(0.1) / a.machine_busy.max(0.1);
    println!(
        "ratio hosted/kernel per busy CPU: up {:.1} %, down {:.1} % (without busy polling: up {:.1} %, down {:.1} %)",
        per_cpu(&hosted.up, &kernel.up),
        per_cpu(&hosted.down, &kernel.down),
        per_cpu(&no_poll.up, &kernel.up),
        per_cpu(&no_poll.down, &kernel.down)
    );
    println!(
        "ratio hosted/kernel without offloads: up {:.1} %, down {:.1} %",
        ratio(&hosted.up, &plain.up),
        ratio(&hosted.down, &plain.down)
    );
    println!(
        "firewall memory with {CLIENTS} clients: VmRSS {:.1} MiB, VmHWM {:.1} MiB (goal: under 32 MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_from_proc() {
        let stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n\
                    cpu1 50 3 25 400 10 2 1 0 0 0\nintr 12345\n";
        // Busy: everything but idle and iowait; two CPUs.
        assert_eq!(parse_machine_ticks(stat), Some((160, 980, 2)));
        assert_eq!(parse_machine_ticks("intr 1\n"), None);
        // A command name with spaces and a ')' does not shift the fields.
        let proc = "4242 (qubes fw) x) S 1 2 3 4 5 6 7 8 9 10 70 30 0 0 20 0 1 0";
        assert_eq!(parse_process_ticks(proc), Some(100));
        assert_eq!(parse_process_ticks("4242 (short) S 1 2"), None);
    }

    #[test]
    fn iperf_json_receiver_sum() {
        let json = r#"{"end": {"sum_sent": {"bits_per_second": 5.0e9},
            "sum_received": {"seconds": 5, "bits_per_second": 4.5e9, "x": 1}}}"#;
        assert_eq!(iperf_bits(json), Some(4.5e9));
        assert_eq!(iperf_bits("{}"), None);
        assert_eq!(
            iperf_bits(r#""sum_received": {"bits_per_second": 123456.5}"#),
            Some(123456.5)
        );
    }

    #[test]
    fn iperf_json_sender_retransmits() {
        // The interval sums come first; the end's sum_sent is the run's.
        let json = r#"{"intervals": [{"sum": {"retransmits": 3}}],
            "end": {"sum_sent": {"bytes": 10, "retransmits": 45, "sender": true},
            "sum_received": {"bits_per_second": 4.5e9}}}"#;
        assert_eq!(iperf_retransmits(json), Some(45));
        assert_eq!(iperf_retransmits(r#"{"end": {"sum_sent": {}}}"#), None);
    }
}
