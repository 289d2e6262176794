//! `qubes-box up|down|status`: the box's machines as Linux network
//! namespaces, wired the way Xen wires Qubes' VMs, with the dom0 services
//! as ordinary processes.
//!
//! Layout (addresses as a default Qubes install numbers them):
//! - `<prefix>sys-net` (domid 1): the "internet" — addresses on its `lo`:
//!   192.0.2.80 (HTTP on port 80) and the Qubes virtual DNS addresses
//!   10.139.1.1/10.139.1.2 (DNS answering every A query with 192.0.2.80) —
//!   and `vif2.0`, 10.137.0.5, the backend of the firewall's uplink;
//! - `<prefix>sys-firewall` (domid 2): no addresses, only layer 2: the TAP
//!   `eth0` (the hosted firewall's uplink) bridged to the veth from sys-net,
//!   and per client the TAP `vif<domid>.0` bridged to the veth from that
//!   client; `qubes-firewall-hosted` runs here and owns the TAPs;
//! - `<prefix>client1` (domid 3, 10.137.0.20, may use HTTP and DNS) and
//!   `<prefix>client2` (domid 4, 10.137.0.21, DNS only), each with `eth0`
//!   and a default route via the firewall, 10.137.0.6;
//! - dom0: the in-box xenstored (`backend/vif/<domid>/0/ip` under
//!   `/local/domain/2`), `qubesdb-daemon 2 sys-firewall` holding the
//!   firewall's QubesDB (network config and per-client rules),
//!   `qrexec-daemon 2 sys-firewall` (socket `<state>/qubes/qrexec.2`, for
//!   `qrexec-client --socket-dir=<state>/qubes -d sys-firewall …`), vchan
//!   sockets in `<state>/vchan`.
//!
//! Every resource is written to `<state>/resources` *before* it is created,
//! so `down` (and `up` itself when a step fails) removes everything even
//! after a crash: processes are stopped (only if `/proc/<pid>/cmdline`
//! still names what we started), namespaces deleted (which deletes the
//! links, TAPs and bridges inside), the state directory removed. It must
//! never touch a namespace or process it did not record.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;

/// The firewall's domain id and name.
pub const FIREWALL: (u16, &str) = (2, "sys-firewall");
/// The firewall's address (`/qubes-ip`), the clients' gateway.
pub const FIREWALL_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 6);
/// sys-net's address on the firewall's uplink (`/qubes-gateway`).
pub const SYS_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 5);
/// Qubes' virtual DNS servers.
pub const DNS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 139, 1, 1), Ipv4Addr::new(10, 139, 1, 2)];
/// The "internet" host inside sys-net.
pub const WEB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);

/// One client qube: domid, name, address, firewall rules as dom0 writes
/// them (`policy`, then `0000`, `0001`, …).
#[derive(Clone, Copy, Debug)]
pub struct ClientQube {
    /// Domain id.
    pub domid: u16,
    /// Name (and namespace suffix).
    pub name: &'static str,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its rules.
    pub rules: &'static [&'static str],
}

/// The two clients of the box.
pub const CLIENTS: [ClientQube; 2] = [
    ClientQube {
        domid: 3,
        name: "client1",
        ip: Ipv4Addr::new(10, 137, 0, 20),
        rules: &[
            "action=accept proto=tcp dstports=80-80",
            "action=accept specialtarget=dns",
        ],
    },
    ClientQube {
        domid: 4,
        name: "client2",
        ip: Ipv4Addr::new(10, 137, 0, 21),
        rules: &["action=accept specialtarget=dns"],
    },
];

/// How a box is set up.
#[derive(Clone, Debug)]
pub struct BoxConfig {
    /// Where the box keeps sockets, logs and its resource list.
    pub state_dir: PathBuf,
    /// Prefix of every namespace name.
    pub prefix: String,
    /// Where the workspace binaries are (`qubesdb-daemon`, `qubesdb-write`,
    /// `qubes-firewall-hosted`, `qubes-box`).
    pub bin_dir: PathBuf,
    /// Start the hosted firewall (it must have been built with
    /// `--features hosted`).
    pub firewall: bool,
    /// The firewall binary to run instead of `<bin_dir>/qubes-firewall-hosted`
    /// (e.g. a release build for measurements).
    pub firewall_bin: Option<PathBuf>,
}

impl BoxConfig {
    /// The namespace of a machine.
    pub fn netns(&self, machine: &str) -> String {
        format!("{}{machine}", self.prefix)
    }

    fn resources(&self) -> PathBuf {
        self.state_dir.join("resources")
    }

    /// dom0's xenstored socket.
    pub fn xenstored_socket(&self) -> PathBuf {
        self.state_dir.join("xenstored.sock")
    }

    /// The firewall's own xenstored socket (relative paths under
    /// `/local/domain/2`).
    pub fn firewall_xenstored_socket(&self) -> PathBuf {
        self.state_dir.join("xenstored.2.sock")
    }

    /// Where qubesdb-daemon sockets live (`QUBESDB_SOCKET_DIR`).
    pub fn qubesdb_dir(&self) -> PathBuf {
        self.state_dir.join("qubes")
    }

    /// Where vchan sockets live (`VCHAN_SOCKET_DIR`).
    pub fn vchan_dir(&self) -> PathBuf {
        self.state_dir.join("vchan")
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// A recorded resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    /// A network namespace.
    Netns(String),
    /// A process: pid and the program name its cmdline must contain.
    Process(u32, String),
}

fn parse_resources(text: &str) -> Vec<Resource> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("netns"), Some(name), None) => Some(Resource::Netns(name.to_string())),
                (Some("pid"), Some(pid), Some(program)) => pid
                    .parse()
                    .ok()
                    .map(|pid| Resource::Process(pid, program.to_string())),
                _ => None,
            }
        })
        .collect()
}

/// The resources a box recorded.
pub fn recorded(config: &BoxConfig) -> Vec<Resource> {
    fs::read_to_string(config.resources())
        .map(|text| parse_resources(&text))
        .unwrap_or_default()
}

fn record(config: &BoxConfig, resource: &Resource) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.resources())?;
    match resource {
        Resource::Netns(name) => writeln!(file, "netns {name}"),
        Resource::Process(pid, program) => writeln!(file, "pid {pid} {program}"),
    }?;
    file.sync_all()
}

/// Runs a command; an error names the command and its stderr.
fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| io::Error::new(error.kind(), format!("cannot run {program}: {error}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

/// Is process `pid` alive and still running `program`?
pub fn process_matches(pid: u32, program: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            let text = String::from_utf8_lossy(&cmdline);
            text.contains(program) && !is_zombie(pid)
        })
        .unwrap_or(false)
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s == "Z"))
        })
        .unwrap_or(false)
}

/// Does network namespace `name` exist?
pub fn netns_exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

fn wait_for_path(path: &Path, what: &str) -> io::Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not create {} within 10 s", path.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts a background process (its own process group, output to
/// `<state>/<log>.log`), recording it.
fn spawn(
    config: &BoxConfig,
    log: &str,
    netns: Option<&str>,
    program: &Path,
    args: &[String],
    env: &[(&str, &Path)],
) -> io::Result<()> {
    if !program.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not built (cargo build --workspace --bins)",
                program.display()
            ),
        ));
    }
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.state_dir.join(format!("{log}.log")))?;
    let mut command = match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(program);
            command
        }
        None => Command::new(program),
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    for (key, value) in env {
        command.env(key, value);
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = command.spawn()?;
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    record(config, &Resource::Process(child.id(), name))?;
    // The child outlives us; it is reaped by init after `up` exits.
    drop(child);
    Ok(())
}

fn netns_add(config: &BoxConfig, name: &str) -> io::Result<()> {
    record(config, &Resource::Netns(name.to_string()))?;
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

fn bridge(netns: &str, bridge: &str, ports: &[&str]) -> io::Result<()> {
    ip(&["-n", netns, "link", "add", bridge, "type", "bridge"])?;
    for port in ports {
        ip(&["-n", netns, "link", "set", port, "master", bridge])?;
        ip(&["-n", netns, "link", "set", port, "up"])?;
    }
    ip(&["-n", netns, "link", "set", bridge, "up"])
}

/// Brings the whole box up; on any failure takes down what was made.
pub fn up(config: &BoxConfig) -> io::Result<()> {
    if recorded(config)
        .iter()
        .any(|r| matches!(r, Resource::Netns(name) if netns_exists(name)))
    {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "a box is already up in {} (run qubes-box down first)",
                config.state_dir.display()
            ),
        ));
    }
    let _ = fs::remove_dir_all(&config.state_dir);
    fs::create_dir_all(config.qubesdb_dir())?;
    fs::create_dir_all(config.vchan_dir())?;
    match build(config) {
        Ok(()) => Ok(()),
        Err(error) => {
            let _ = down(config);
            Err(error)
        }
    }
}

fn build(config: &BoxConfig) -> io::Result<()> {
    let self_exe = config.bin("qubes-box");
    // dom0: xenstored (dom0's socket and the firewall's).
    spawn(
        config,
        "xenstored",
        None,
        &self_exe,
        &[
            "xenstored".into(),
            "--socket".into(),
            config.xenstored_socket().display().to_string(),
            "--guest-socket".into(),
            format!(
                "{}={}",
                FIREWALL.0,
                config.firewall_xenstored_socket().display()
            ),
        ],
        &[],
    )?;
    wait_for_path(&config.xenstored_socket(), "xenstored")?;

    // Machines.
    let sys_net = config.netns("sys-net");
    let firewall = config.netns(FIREWALL.1);
    netns_add(config, &sys_net)?;
    netns_add(config, &firewall)?;
    for client in CLIENTS {
        netns_add(config, &config.netns(client.name))?;
    }

    // sys-net's "internet" and the firewall's uplink.
    // On `lo`: needs no dummy-interface support in the kernel.
    for address in [WEB, DNS[0], DNS[1]] {
        ip(&[
            "-n",
            &sys_net,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "lo",
        ])?;
    }
    let backend = format!("vif{}.0", FIREWALL.0);
    ip(&[
        "link", "add", &backend, "netns", &sys_net, "type", "veth", "peer", "name", "uplink",
        "netns", &firewall,
    ])?;
    ip(&[
        "-n",
        &sys_net,
        "addr",
        "add",
        &format!("{SYS_NET_IP}/32"),
        "dev",
        &backend,
    ])?;
    ip(&["-n", &sys_net, "link", "set", &backend, "up"])?;
    ip(&[
        "-n",
        &sys_net,
        "route",
        "add",
        &format!("{FIREWALL_IP}/32"),
        "dev",
        &backend,
    ])?;
    ip(&[
        "-n", &firewall, "tuntap", "add", "dev", "eth0", "mode", "tap",
    ])?;
    bridge(&firewall, "br0", &["uplink", "eth0"])?;

    // Clients.
    for client in CLIENTS {
        let netns = config.netns(client.name);
        let veth = format!("veth{}", client.domid);
        let vif = format!("vif{}.0", client.domid);
        let bridge_name = format!("br{}", client.domid);
        ip(&[
            "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &veth, "netns",
            &firewall,
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/32", client.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &format!("{FIREWALL_IP}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &FIREWALL_IP.to_string(),
        ])?;
        ip(&["-n", &firewall, "tuntap", "add", "dev", &vif, "mode", "tap"])?;
        bridge(&firewall, &bridge_name, &[&veth, &vif])?;
    }

    // sys-net's services.
    spawn(
        config,
        "http",
        Some(&sys_net),
        &self_exe,
        &["serve-http".into(), format!("{WEB}:80")],
        &[],
    )?;
    for (index, dns) in DNS.iter().enumerate() {
        spawn(
            config,
            &format!("dns{index}"),
            Some(&sys_net),
            &self_exe,
            &["serve-dns".into(), format!("{dns}:53"), WEB.to_string()],
            &[],
        )?;
    }

    // dom0: the firewall's QubesDB.
    let qubesdb_env: [(&str, &Path); 3] = [
        ("QUBESDB_SOCKET_DIR", &config.qubesdb_dir()),
        ("VCHAN_SOCKET_DIR", &config.vchan_dir()),
        ("QUBESDB_FOREGROUND", Path::new("1")),
    ];
    spawn(
        config,
        "qubesdb-sys-firewall",
        None,
        &config.bin("qubesdb-daemon"),
        &[FIREWALL.0.to_string(), FIREWALL.1.to_string()],
        &qubesdb_env,
    )?;
    wait_for_path(
        &config
            .qubesdb_dir()
            .join(format!("qubesdb.{}.sock", FIREWALL.1)),
        "qubesdb-daemon",
    )?;
    let mut entries: Vec<(String, String)> = vec![
        ("/name".into(), FIREWALL.1.into()),
        ("/qubes-vm-type".into(), "ProxyVM".into()),
        ("/qubes-ip".into(), FIREWALL_IP.to_string()),
        ("/qubes-netmask".into(), "255.255.255.255".into()),
        ("/qubes-gateway".into(), SYS_NET_IP.to_string()),
        ("/qubes-primary-dns".into(), DNS[0].to_string()),
        ("/qubes-secondary-dns".into(), DNS[1].to_string()),
    ];
    for client in CLIENTS {
        let base = format!("/qubes-firewall/{}", client.ip);
        entries.push((format!("{base}/policy"), "drop".into()));
        for (index, rule) in client.rules.iter().enumerate() {
            entries.push((format!("{base}/{index:04}"), (*rule).into()));
        }
        // The commit: an empty write to the client's key.
        entries.push((base, String::new()));
    }
    for (path, value) in &entries {
        let output = Command::new(config.bin("qubesdb-write"))
            .args(["-d", FIREWALL.1, path, value])
            .env("QUBESDB_SOCKET_DIR", config.qubesdb_dir())
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "qubesdb-write {path}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }

    // XenStore: the firewall's identity and its clients' vifs.
    let mut xs = Client::connect(&config.xenstored_socket()).map_err(io::Error::other)?;
    let home = format!("/local/domain/{}", FIREWALL.0);
    let mut nodes = vec![
        (format!("{home}/name"), FIREWALL.1.to_string()),
        (format!("{home}/domid"), FIREWALL.0.to_string()),
    ];
    for client in CLIENTS {
        nodes.push((
            format!("{home}/backend/vif/{}/0/ip", client.domid),
            client.ip.to_string(),
        ));
        nodes.push((
            format!("/local/domain/{}/name", client.domid),
            client.name.to_string(),
        ));
    }
    for (path, value) in &nodes {
        xs.write(path, value.as_bytes()).map_err(io::Error::other)?;
    }

    // dom0: the firewall's qrexec-daemon (connects to the agent's vchan 512
    // once the firewall offers it; `-D`: stay in the foreground).
    let mut qrexec_args = vec![
        format!("--socket-dir={}", config.qubesdb_dir().display()),
        "-D".to_string(),
    ];
    let policy = config.bin("qrexec-policy-exec");
    if policy.exists() {
        qrexec_args.push(format!("--policy-program={}", policy.display()));
    }
    qrexec_args.push(FIREWALL.0.to_string());
    qrexec_args.push(FIREWALL.1.to_string());
    spawn(
        config,
        "qrexec-sys-firewall",
        None,
        &config.bin("qrexec-daemon"),
        &qrexec_args,
        &[("VCHAN_SOCKET_DIR", &config.vchan_dir())],
    )?;

    // The firewall itself.
    if config.firewall {
        spawn(
            config,
            "firewall",
            Some(&firewall),
            &config
                .firewall_bin
                .clone()
                .unwrap_or_else(|| config.bin("qubes-firewall-hosted")),
            &[
                "--domid".into(),
                FIREWALL.0.to_string(),
                "--vchan-socket-dir".into(),
                config.vchan_dir().display().to_string(),
                "--xenstore-socket".into(),
                config.firewall_xenstored_socket().display().to_string(),
                "--uplink-tap".into(),
                "eth0".into(),
            ],
            &[],
        )?;
    }
    Ok(())
}

/// Stops every recorded process and deletes every recorded namespace, then
/// the state directory. Safe to run repeatedly and after a failed `up`.
pub fn down(config: &BoxConfig) -> io::Result<()> {
    let resources = recorded(config);
    let mut problems = Vec::new();
    // Processes first (newest first), then namespaces.
    for resource in resources.iter().rev() {
        if let Resource::Process(pid, program) = resource
            && process_matches(*pid, program)
        {
            let _ = run("kill", &["-TERM", &pid.to_string()]);
            let start = Instant::now();
            while process_matches(*pid, program) && start.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if process_matches(*pid, program) {
                let _ = run("kill", &["-KILL", &pid.to_string()]);
            }
        }
    }
    // Anything still running inside a recorded namespace is stopped with it.
    for resource in resources.iter().rev() {
        if let Resource::Netns(name) = resource
            && netns_exists(name)
        {
            if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    let _ = run("kill", &["-KILL", pid]);
                }
            }
            if let Err(error) = ip(&["netns", "del", name]) {
                problems.push(error.to_string());
            }
        }
    }
    if config.state_dir.exists()
        && let Err(error) = fs::remove_dir_all(&config.state_dir)
    {
        problems.push(format!(
            "cannot remove {}: {error}",
            config.state_dir.display()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(io::Error::other(problems.join("; ")))
    }
}

/// One line per recorded resource (`up`/`down`); `true` when all are up.
pub fn status(config: &BoxConfig) -> (bool, String) {
    let resources = recorded(config);
    if resources.is_empty() {
        return (false, "no box recorded\n".to_string());
    }
    let mut all_up = true;
    let mut text = String::new();
    for resource in &resources {
        let (alive, what) = match resource {
            Resource::Netns(name) => (netns_exists(name), format!("netns {name}")),
            Resource::Process(pid, program) => (
                process_matches(*pid, program),
                format!("process {program} ({pid})"),
            ),
        };
        all_up &= alive;
        text.push_str(&format!(
            "{:<5} {what}\n",
            if alive { "up" } else { "down" }
        ));
    }
    (all_up, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_list_roundtrips_and_ignores_garbage() {
        let text = "netns qb-sys-net\npid 42 qubes-box\ngarbage line here too\npid x y\n";
        assert_eq!(
            parse_resources(text),
            vec![
                Resource::Netns("qb-sys-net".into()),
                Resource::Process(42, "qubes-box".into())
            ]
        );
    }
}
