//! `qubes-box up|down|status`: the box's machines as Linux network
//! namespaces, wired the way Xen wires Qubes' VMs, with the dom0 services
//! as ordinary processes.
//!
//! Layout (addresses as a default Qubes install numbers them):
//! - `<prefix>sys-net` (domid 1): the "internet" — addresses on its `lo`:
//!   192.0.2.80 (HTTP on ports 80 and 8080, TCP and UDP echo on port 7),
//!   192.0.2.81 (HTTP on port 80), 2001:db8::80 (HTTP on port 80) and the
//!   Qubes virtual DNS addresses
//!   10.139.1.1/10.139.1.2 (DNS answering every A query with 192.0.2.80) —
//!   and `vif2.0`, 10.137.0.5 and fd09:24ef:4179::a89:5, the backend of
//!   the firewall's uplink (with
//!   `arp_notify`, so a restarted sys-net announces its new MAC);
//! - `<prefix>sys-firewall` (domid 2): no addresses, only layer 2: the TAP
//!   `eth0` (the hosted firewall's uplink) bridged to the veth from sys-net,
//!   and per client the TAP `vif<domid>.0` bridged to the veth from that
//!   client; `qubes-firewall-hosted` runs here and owns the TAPs;
//! - `<prefix>client1` (domid 3, 10.137.0.20, may use HTTP and DNS),
//!   `<prefix>client2` (domid 4, 10.137.0.21, DNS only) and, with
//!   `--clients N`, client3… (domid N+2, 10.137.0.N+19, HTTP and DNS), each
//!   with `eth0` and a default route via the firewall, 10.137.0.6, and a
//!   `qrexec-agent` serving the seed examples `test.Add` and `test.File`;
//!   clients can be added and removed while the box runs;
//! - dom0: the in-box xenstored (`backend/vif/<domid>/0/ip` under
//!   `/local/domain/2`), `qubesdb-daemon 2 sys-firewall` holding the
//!   firewall's QubesDB (network config, the `/qubes-netvm-*` keys, the
//!   per-client rules and `/connected-ips`/`/connected-ips6` listing every
//!   client ever added, as qubesd lists running and halted ones alike),
//!   `qrexec-daemon 2 sys-firewall` (socket `<state>/qubes/qrexec.2`, for
//!   `qrexec-client --socket-dir=<state>/qubes -d sys-firewall …`), one
//!   `qrexec-daemon` per client, `qrexec-policy-daemon` (socket
//!   `<state>/policy.sock`, policy in `<state>/policy.d` and the legacy
//!   files in `<state>/qubes-rpc-policy`; `ask` answered by
//!   `<state>/ask-program`), vchan sockets in `<state>/vchan`, and the
//!   box's qubesd (`crate::qubesd`: its registry of qubes in
//!   `<state>/qubes.d`, sockets `<state>/qubesd.sock` and
//!   `<state>/qubesd.internal.sock`, passed to dom0's processes in
//!   `QUBESD_SOCKET`/`QUBESD_INTERNAL_SOCKET`); each client also gets
//!   dom0's `qubesdb-daemon` for it, a home in `<state>/home/<name>` and
//!   the `qubes.Filecopy`/`qubes.OpenInVM` services (`crate::vmtools`).
//!
//! Every resource is written to `<state>/resources` *before* it is created,
//! so `down` (and `up` itself when a step fails) removes everything even
//! after a crash: processes are stopped (only if `/proc/<pid>/cmdline`
//! still names what we started), namespaces deleted (which deletes the
//! links, TAPs and bridges inside), the state directory removed. It must
//! never touch a namespace or process it did not record.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
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

/// A second "internet" host inside sys-net (HTTP on port 80 only), so
/// `dst4`/`dsthost` rules have something to leave out.
pub const WEB2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 81);
/// The IPv6 "internet" host inside sys-net (HTTP on port 80).
pub const WEB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80);
/// The firewall's IPv6 address (`/qubes-ip6`), as Qubes derives it from
/// the IPv4 one (`fd09:24ef:4179::a89:<last 16 bits>`).
pub const FIREWALL_IP6: Ipv6Addr = qubes_ip6(FIREWALL_IP);
/// sys-net's IPv6 address on the uplink (`/qubes-gateway6`).
pub const SYS_NET_IP6: Ipv6Addr = qubes_ip6(SYS_NET_IP);

/// Qubes' IPv6 address of a qube: `fd09:24ef:4179::a89:<last 16 bits of
/// its IPv4 address>`.
pub const fn qubes_ip6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, _, c, d] = ip.octets();
    Ipv6Addr::new(
        0xfd09,
        0x24ef,
        0x4179,
        0,
        0,
        0,
        0xa89,
        ((c as u16) << 8) | d as u16,
    )
}

/// The MAC Xen's netback gives every backend vif (the numerically largest
/// non-broadcast address), so sys-net's end of the firewall's uplink in
/// Qubes.
pub const XEN_BACKEND_MAC: &str = "fe:ff:ff:ff:ff:ff";

/// The TCP and UDP echo port on [`WEB`].
pub const ECHO_PORT: u16 = 7;
/// Most clients a box may have (domids 3.., addresses 10.137.0.20..).
pub const MAX_CLIENTS: u16 = 200;

/// One client qube: domid, name, address, firewall rules as dom0 writes
/// them (`policy`, then `0000`, `0001`, …).
#[derive(Clone, Debug)]
pub struct ClientQube {
    /// Domain id.
    pub domid: u16,
    /// Name (and namespace suffix).
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its rules.
    pub rules: Vec<String>,
}

/// Client number `n` (1-based) of the box: `client<n>`, domid `n + 2`,
/// address `10.137.0.<n + 19>`. client2 may use DNS only; every other
/// client TCP port 80 and DNS. `None` outside `1..=MAX_CLIENTS`.
pub fn client_qube(n: u16) -> Option<ClientQube> {
    if !(1..=MAX_CLIENTS).contains(&n) {
        return None;
    }
    let rules: &[&str] = if n == 2 {
        &["action=accept specialtarget=dns"]
    } else {
        &[
            "action=accept proto=tcp dstports=80-80",
            "action=accept specialtarget=dns",
        ]
    };
    Some(ClientQube {
        domid: n + 2,
        name: format!("client{n}"),
        ip: Ipv4Addr::new(10, 137, 0, u8::try_from(n + 19).ok()?),
        rules: rules.iter().map(|r| (*r).to_string()).collect(),
    })
}

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
    /// Options added to the firewall's command line (e.g. `--busy-poll 0`).
    pub firewall_args: Vec<String>,
    /// How many clients `up` starts (`client1`…).
    pub clients: u16,
    /// sys-net answers ARP for its uplink address and announces its MAC
    /// (the default). When false, its `vif2.0` has the MAC Xen's netback
    /// gives every backend vif, `fe:ff:ff:ff:ff:ff` (which a Linux
    /// firewall puts in a permanent neighbour entry for its gateway,
    /// `setup-ip`, and never ARPs for), answers no ARP request
    /// (`arp_ignore=8`) and sends no gratuitous ARP.
    pub sys_net_answers_arp: bool,
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

    /// Where client qube `name`'s qrexec services live
    /// (`QREXEC_SERVICE_PATH`, its `/etc/qubes-rpc`).
    pub fn rpc_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("rpc").join(name)
    }

    /// The socket of client qube `name`'s qrexec-agent (for
    /// `qrexec-client-vm --agent-socket=…`).
    pub fn agent_socket(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("agent.{name}.sock"))
    }

    /// The policy daemon's socket (`QREXEC_POLICY_SOCKET`).
    pub fn policy_socket(&self) -> PathBuf {
        self.state_dir.join("policy.sock")
    }

    /// The qrexec policy directory (`/etc/qubes/policy.d` of the box).
    pub fn policy_dir(&self) -> PathBuf {
        self.state_dir.join("policy.d")
    }

    /// The legacy (Qubes 4.0) policy directory read by `!compat-4.0`
    /// (`/etc/qubes-rpc/policy` of the box).
    pub fn legacy_policy_dir(&self) -> PathBuf {
        self.state_dir.join("qubes-rpc-policy")
    }

    /// Where the `test.File` service of the seed example reads from.
    pub fn file_storage(&self) -> PathBuf {
        self.state_dir.join("rpc-file-storage")
    }

    /// The path of a workspace binary.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// A recorded resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    /// A network namespace.
    Netns(String),
    /// A process: pid, the program name its cmdline must contain, and the
    /// machine it belongs to (`dom0`, `sys-net`, `client3`…; empty in
    /// older lists).
    Process(u32, String, String),
}

fn parse_resources(text: &str) -> Vec<Resource> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("netns"), Some(name), None, None) => Some(Resource::Netns(name.to_string())),
                (Some("pid"), Some(pid), Some(program), owner) => pid.parse().ok().map(|pid| {
                    Resource::Process(pid, program.to_string(), owner.unwrap_or("").to_string())
                }),
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
        Resource::Process(pid, program, owner) => writeln!(file, "pid {pid} {program} {owner}"),
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
    use std::os::unix::fs::FileTypeExt;
    // A generous bound: it only catches a program that never comes up,
    // not a slow start on a loaded machine.
    const LIMIT: Duration = Duration::from_secs(60);
    let start = Instant::now();
    loop {
        // A UNIX socket's path exists from bind(); connecting fails until
        // listen(), so a socket is ready once a connection is accepted.
        let ready = match fs::metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::os::unix::net::UnixStream::connect(path).is_ok()
            }
            Ok(_) => true,
            Err(_) => false,
        };
        if ready {
            return Ok(());
        }
        if start.elapsed() > LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{what} did not create {} (or accept on it) within {} s",
                    path.display(),
                    LIMIT.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a background process (its own process group, output to
/// `<state>/<log>.log`), recording it as belonging to `owner`.
#[allow(clippy::too_many_arguments)] // reason: one call site per kind of process; a struct would only rename them.
fn spawn(
    config: &BoxConfig,
    log: &str,
    owner: &str,
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
    record(
        config,
        &Resource::Process(child.id(), name, owner.to_string()),
    )?;
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
    if config.clients > MAX_CLIENTS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_CLIENTS} clients"),
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

fn qubesdb_write(config: &BoxConfig, entries: &[(String, String)]) -> io::Result<()> {
    for (path, value) in entries {
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
    Ok(())
}

fn xenstore(config: &BoxConfig) -> io::Result<Client> {
    Client::connect(&config.xenstored_socket()).map_err(io::Error::other)
}

/// sys-net: its namespace, its "internet" on `lo`, the backend `vif2.0` of
/// the firewall's uplink (whose other end joins the firewall's `br0`), and
/// its services. `arp_notify` makes its kernel announce its (new) MAC with
/// a gratuitous ARP when `vif2.0` comes up, as a restarted net qube's
/// interface does, so a running firewall learns the new gateway MAC.
fn build_sys_net(config: &BoxConfig) -> io::Result<()> {
    let sys_net = config.netns("sys-net");
    let firewall = config.netns(FIREWALL.1);
    netns_add(config, &sys_net)?;
    // On `lo`: needs no dummy-interface support in the kernel.
    for address in [WEB, WEB2, DNS[0], DNS[1]] {
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
    ip(&[
        "-n",
        &sys_net,
        "addr",
        "add",
        &format!("{WEB6}/128"),
        "dev",
        "lo",
    ])?;
    let backend = format!("vif{}.0", FIREWALL.0);
    ip(&[
        "link", "add", &backend, "netns", &sys_net, "type", "veth", "peer", "name", "uplink",
        "netns", &firewall,
    ])?;
    let arp_sysctls: &[String] = if config.sys_net_answers_arp {
        &[format!("net/ipv4/conf/{backend}/arp_notify=1")]
    } else {
        ip(&[
            "-n",
            &sys_net,
            "link",
            "set",
            &backend,
            "address",
            XEN_BACKEND_MAC,
        ])?;
        &[
            format!("net/ipv4/conf/{backend}/arp_notify=0"),
            format!("net/ipv4/conf/{backend}/arp_ignore=8"),
        ]
    };
    for sysctl in arp_sysctls {
        run(
            "ip",
            &["netns", "exec", &sys_net, "sysctl", "-q", "-w", sysctl],
        )?;
    }
    ip(&[
        "-n",
        &sys_net,
        "addr",
        "add",
        &format!("{SYS_NET_IP}/32"),
        "dev",
        &backend,
    ])?;
    if link_exists(&firewall, "br0") {
        ip(&["-n", &firewall, "link", "set", "uplink", "master", "br0"])?;
        ip(&["-n", &firewall, "link", "set", "uplink", "up"])?;
    } else {
        ip(&[
            "-n", &firewall, "tuntap", "add", "dev", "eth0", "mode", "tap",
        ])?;
        bridge(&firewall, "br0", &["uplink", "eth0"])?;
    }
    ip(&[
        "-n",
        &sys_net,
        "addr",
        "add",
        &format!("{SYS_NET_IP6}/128"),
        "dev",
        &backend,
        "nodad",
    ])?;
    // Up last, with the bridge port ready: the gratuitous ARP gets through.
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
        "-n",
        &sys_net,
        "route",
        "add",
        &format!("{FIREWALL_IP6}/128"),
        "dev",
        &backend,
    ])?;
    let self_exe = config.bin("qubes-box");
    let services: Vec<(String, Vec<String>)> = vec![
        (
            "http".into(),
            vec!["serve-http".into(), format!("{WEB}:80")],
        ),
        (
            "http8080".into(),
            vec!["serve-http".into(), format!("{WEB}:8080")],
        ),
        (
            "http-web2".into(),
            vec!["serve-http".into(), format!("{WEB2}:80")],
        ),
        (
            "http-web6".into(),
            vec!["serve-http".into(), format!("[{WEB6}]:80")],
        ),
        (
            "tcp-echo".into(),
            vec!["serve-tcp-echo".into(), format!("{WEB}:{ECHO_PORT}")],
        ),
        (
            "udp-echo".into(),
            vec!["serve-udp-echo".into(), format!("{WEB}:{ECHO_PORT}")],
        ),
        (
            "dns0".into(),
            vec![
                "serve-dns".into(),
                format!("{}:53", DNS[0]),
                WEB.to_string(),
            ],
        ),
        (
            "dns1".into(),
            vec![
                "serve-dns".into(),
                format!("{}:53", DNS[1]),
                WEB.to_string(),
            ],
        ),
    ];
    for (log, args) in &services {
        spawn(config, log, "sys-net", Some(&sys_net), &self_exe, args, &[])?;
    }
    Ok(())
}

fn link_exists(netns: &str, link: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", link])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// Restarts the net qube: stops its services, deletes its namespace (and
/// with it `vif2.0` and the firewall-side `uplink`), and builds it again
/// (a new veth pair: a new gateway MAC, unless
/// [`BoxConfig::sys_net_answers_arp`] is false). The firewall keeps
/// running.
pub fn restart_net(config: &BoxConfig) -> io::Result<()> {
    // Namespaces are cleaned up asynchronously: delete the veth pair
    // first, so its firewall-side end is gone before it is made again.
    let _ = ip(&[
        "-n",
        &config.netns("sys-net"),
        "link",
        "del",
        &format!("vif{}.0", FIREWALL.0),
    ]);
    stop_machine(config, "sys-net")?;
    build_sys_net(config)?;
    // The gratuitous ARP of `arp_notify` at link-up races the bridge: the
    // firewall-side port only forwards once the kernel's link watcher has
    // seen the carrier (up to a second later). Wait for that, then give
    // vif2.0 a fresh MAC, which makes the kernel announce it again
    // (NETDEV_CHANGEADDR with arp_notify): the firewall learns the new
    // gateway MAC as from any restarted net qube that announces itself.
    wait_forwarding(config, "uplink")?;
    if !config.sys_net_answers_arp {
        // Xen's backend MAC stays, as on Qubes, and nothing is announced.
        return Ok(());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let [_, a, b, c] = (nanos ^ std::process::id()).to_be_bytes();
    ip(&[
        "-n",
        &config.netns("sys-net"),
        "link",
        "set",
        &format!("vif{}.0", FIREWALL.0),
        "address",
        &format!("02:00:5e:{a:02x}:{b:02x}:{c:02x}"),
    ])
}

/// Waits (at most 5 s) until the bridge in the firewall's namespace
/// forwards on `port`. The kernel applies a port's carrier change
/// asynchronously (link watch, up to a second later); until then the
/// bridge drops what crosses the port — a client's first ARP for its
/// gateway, the firewall's first ARP for sys-net. A TAP gets its carrier
/// when the firewall attaches it.
fn wait_forwarding(config: &BoxConfig, port: &str) -> io::Result<()> {
    let firewall = config.netns(FIREWALL.1);
    let start = Instant::now();
    loop {
        let output = Command::new("ip")
            .args(["-n", &firewall, "-d", "link", "show", port])
            .output()?;
        if String::from_utf8_lossy(&output.stdout).contains("state forwarding") {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(5) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the bridge port {port} in {firewall} did not forward within 5 s{}",
                    if port.starts_with("vif") || port == "eth0" {
                        " (did the firewall attach its TAP? see firewall.log)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops every recorded process of `machine` and deletes its namespace.
fn stop_machine(config: &BoxConfig, machine: &str) -> io::Result<()> {
    for resource in recorded(config).iter().rev() {
        if let Resource::Process(pid, program, owner) = resource
            && owner == machine
        {
            stop_process(*pid, program);
        }
    }
    let netns = config.netns(machine);
    if netns_exists(&netns) {
        kill_netns_pids(&netns);
        ip(&["netns", "del", &netns])?;
    }
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}

/// dom0's qrexec policy, as the seed examples (Qubes' qrexec3 page) write
/// it in the legacy per-service files, read through `!compat-4.0`:
/// `test.Add` allowed between any qubes (the seed says `ask`; the box has
/// no one to ask), `test.File+testfile1` from client1 to client2 only,
/// every other `test.File` denied.
fn write_policy(config: &BoxConfig) -> io::Result<()> {
    fs::create_dir_all(config.policy_dir())?;
    fs::create_dir_all(config.legacy_policy_dir())?;
    fs::write(
        config.policy_dir().join("90-box-compat.policy"),
        "# The box's policy: the legacy files of the seed examples.\n!compat-4.0\n",
    )?;
    let legacy = config.legacy_policy_dir();
    fs::write(legacy.join("test.Add"), "$anyvm $anyvm allow\n")?;
    fs::write(
        legacy.join("test.File+testfile1"),
        "client1 client2 allow\n",
    )?;
    fs::write(legacy.join("test.File"), "$anyvm $anyvm deny\n")?;
    fs::create_dir_all(config.file_storage())?;
    fs::write(
        config.file_storage().join("testfile1"),
        "content of testfile1\n",
    )?;
    fs::write(
        config.file_storage().join("testfile2"),
        "content of testfile2\n",
    )?;
    Ok(())
}

/// The qrexec environment of every box process (dom0's and the qubes').
fn qrexec_env(config: &BoxConfig) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("VCHAN_SOCKET_DIR", config.vchan_dir()),
        ("QREXEC_POLICY_SOCKET", config.policy_socket()),
        ("QREXEC_POLICY_PATH", config.policy_dir()),
        ("QREXEC_LEGACY_POLICY_PATH", config.legacy_policy_dir()),
        ("QREXEC_LOG_DIR", config.state_dir.join("log")),
        ("QUBESD_SOCKET", crate::qubesd::socket(config)),
        (
            "QUBESD_INTERNAL_SOCKET",
            crate::qubesd::internal_socket(config),
        ),
    ]
}

/// A client's rules as qubesd writes them (qubes-core-admin
/// `reload_firewall_for_vm`): for each address family, under
/// `/qubes-firewall/<ip>/` and `/qubes-firewall/<ip6>/`, `policy` and the
/// rules of that family (`dst4` rules only for IPv4, `dst6` only for IPv6)
/// numbered `0000`…, then the empty write to the directory's own key that
/// commits them. (Removing the old directories first is the caller's.)
pub fn firewall_entries(ip: Ipv4Addr, policy: &str, rules: &[&str]) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    for (address, skip) in [
        (ip.to_string(), "dst6="),
        (qubes_ip6(ip).to_string(), "dst4="),
    ] {
        let base = format!("/qubes-firewall/{address}");
        entries.push((format!("{base}/policy"), policy.to_string()));
        let family = rules
            .iter()
            .filter(|rule| !rule.split_whitespace().any(|word| word.starts_with(skip)));
        for (index, rule) in family.enumerate() {
            entries.push((format!("{base}/{index:04}"), (*rule).to_string()));
        }
        entries.push((base, String::new()));
    }
    entries
}

/// The MAC of a qube's `eth0` as Qubes numbers them
/// (`00:16:3e:5e:6c:<qid>`, here with the domid), written to
/// `backend/vif/<domid>/0/mac` as the toolstack does.
pub fn client_mac(domid: u16) -> String {
    let [high, low] = domid.to_be_bytes();
    if high == 0 {
        format!("00:16:3e:5e:6c:{low:02x}")
    } else {
        format!("00:16:3e:5e:{high:02x}:{low:02x}")
    }
}

/// Adds client qube `client` to a running box, as Xen and qubesd do when a
/// VM starts: its rules in the firewall's QubesDB, its namespace and veth,
/// the firewall-side TAP `vif<domid>.0` bridged to it, its qrexec-agent
/// (with the seed services `test.Add` and `test.File`) and dom0's
/// qrexec-daemon for it, then `backend/vif/<domid>/0/ip` in XenStore
/// (which the firewall watches).
pub fn add_client(config: &BoxConfig, client: &ClientQube) -> io::Result<()> {
    crate::qubesd::Registry::new(config).register_client(client)?;
    connect_qube(config, client.ip)?;
    let rules: Vec<&str> = client.rules.iter().map(String::as_str).collect();
    qubesdb_write(config, &firewall_entries(client.ip, "drop", &rules))?;

    let firewall = config.netns(FIREWALL.1);
    let netns = config.netns(&client.name);
    netns_add(config, &netns)?;
    let veth = format!("veth{}", client.domid);
    let vif = format!("vif{}.0", client.domid);
    let bridge_name = format!("br{}", client.domid);
    let mac = client_mac(client.domid);
    ip(&[
        "link", "add", "eth0", "netns", &netns, "address", &mac, "type", "veth", "peer", "name",
        &veth, "netns", &firewall,
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
    let ip6 = qubes_ip6(client.ip);
    ip(&[
        "-n",
        &netns,
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "eth0",
        "nodad",
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
        &format!("{FIREWALL_IP6}/128"),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        &netns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &FIREWALL_IP6.to_string(),
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

    // qrexec: the qube's services (the seed examples) and agent, dom0's
    // daemon for it.
    let rpc = config.rpc_dir(&client.name);
    fs::create_dir_all(&rpc)?;
    write_executable(
        &rpc.join("test.Add"),
        "#!/bin/sh\n# our_test_add_server (seed: Qubes' qrexec3 page)\nread arg1 arg2\necho $(($arg1+$arg2))\n",
    )?;
    write_executable(
        &rpc.join("test.File"),
        &format!(
            "#!/bin/sh\n# seed: Qubes' qrexec3 page, storage in the box\nargument=\"$1\"\ncat \"{}/$argument\"\n",
            config.file_storage().display()
        ),
    )?;
    crate::vmtools::install(config, client, &rpc)?;
    start_qubesdb(config, client)?;
    let domid = PathBuf::from(client.domid.to_string());
    let mut env: Vec<(&str, PathBuf)> = qrexec_env(config);
    env.push(("VCHAN_DOMAIN", domid));
    env.push(("QREXEC_SERVICE_PATH", rpc));
    let env_refs: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    spawn(
        config,
        &format!("qrexec-agent-{}", client.name),
        &client.name,
        Some(&netns),
        &config.bin("qrexec-agent"),
        &[format!(
            "--agent-socket={}",
            config.agent_socket(&client.name).display()
        )],
        &env_refs,
    )?;
    let dom0_env: Vec<(&str, &Path)> = env_refs
        .iter()
        .filter(|(key, _)| *key != "VCHAN_DOMAIN" && *key != "QREXEC_SERVICE_PATH")
        .copied()
        .collect();
    spawn(
        config,
        &format!("qrexec-{}", client.name),
        &client.name,
        None,
        &config.bin("qrexec-daemon"),
        &[
            format!("--socket-dir={}", config.qubesdb_dir().display()),
            "-D".to_string(),
            format!(
                "--policy-program={}",
                config.bin("qrexec-policy-exec").display()
            ),
            format!(
                "--uuid={}",
                crate::qubesd::Registry::new(config)
                    .get(&client.name)
                    .map(|qube| qube.uuid)
                    .unwrap_or_default()
            ),
            client.domid.to_string(),
            client.name.clone(),
            "root".to_string(),
        ],
        &dom0_env,
    )?;

    let mut xs = xenstore(config)?;
    let home = format!("/local/domain/{}", FIREWALL.0);
    for (path, value) in [
        (
            format!("/local/domain/{}/name", client.domid),
            client.name.clone(),
        ),
        (
            format!("{home}/backend/vif/{}/0/ip", client.domid),
            format!("{} {ip6}", client.ip),
        ),
        (format!("{home}/backend/vif/{}/0/mac", client.domid), mac),
    ] {
        xs.write(&path, value.as_bytes())
            .map_err(io::Error::other)?;
    }
    Ok(())
}

/// dom0's QubesDB daemon for a client qube, holding the keys qubesd
/// writes for a qube (`crate::vmtools::qubesdb_entries`).
fn start_qubesdb(config: &BoxConfig, client: &ClientQube) -> io::Result<()> {
    let env: [(&str, &Path); 3] = [
        ("QUBESDB_SOCKET_DIR", &config.qubesdb_dir()),
        ("VCHAN_SOCKET_DIR", &config.vchan_dir()),
        ("QUBESDB_FOREGROUND", Path::new("1")),
    ];
    let _ = fs::remove_file(
        config
            .qubesdb_dir()
            .join(format!("qubesdb.{}.sock", client.name)),
    );
    spawn(
        config,
        &format!("qubesdb-{}", client.name),
        &client.name,
        None,
        &config.bin("qubesdb-daemon"),
        &[client.domid.to_string(), client.name.clone()],
        &env,
    )?;
    wait_for_path(
        &config
            .qubesdb_dir()
            .join(format!("qubesdb.{}.sock", client.name)),
        "qubesdb-daemon",
    )?;
    let mut command = Command::new(config.bin("qubesdb-write"));
    command.args(["-d", &client.name]);
    for (key, value) in crate::vmtools::qubesdb_entries(config, client) {
        command.args([key, value]);
    }
    let output = command
        .env("QUBESDB_SOCKET_DIR", config.qubesdb_dir())
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "qubesdb-write -d {}: {}",
            client.name,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Lists a qube in the firewall's `/connected-ips` and `/connected-ips6`,
/// as qubesd does for every qube whose netvm is the firewall, running or
/// not (qubes-core-admin `reload_connected_ips`: space-separated, rewritten
/// whole). Addresses already listed stay; a qube stays listed when it shuts
/// down (only a netvm change removes it), so [`remove_client`] leaves it.
pub fn connect_qube(config: &BoxConfig, ip: Ipv4Addr) -> io::Result<()> {
    for (key, address) in [
        ("/connected-ips", ip.to_string()),
        ("/connected-ips6", qubes_ip6(ip).to_string()),
    ] {
        let output = Command::new(config.bin("qubesdb-read"))
            .args(["-d", FIREWALL.1, key])
            .env("QUBESDB_SOCKET_DIR", config.qubesdb_dir())
            .output()?;
        let current = if output.status.success() {
            String::from_utf8_lossy(&output.stdout).into_owned()
        } else {
            String::new()
        };
        let mut words: Vec<&str> = current.split_whitespace().collect();
        if words.contains(&address.as_str()) {
            continue;
        }
        words.push(&address);
        qubesdb_write(config, &[(key.to_string(), words.join(" "))])?;
    }
    Ok(())
}

/// Removes client qube `client` from a running box, as when the VM shuts
/// down: its `backend/vif/<domid>` and domain entries leave XenStore, its
/// processes stop, its namespace goes (and with it the veth), then the
/// firewall-side TAP and bridge, its rules in QubesDB.
pub fn remove_client(config: &BoxConfig, client: &ClientQube) -> io::Result<()> {
    let mut xs = xenstore(config)?;
    xs.remove(&format!(
        "/local/domain/{}/backend/vif/{}",
        FIREWALL.0, client.domid
    ))
    .map_err(io::Error::other)?;
    xs.remove(&format!("/local/domain/{}", client.domid))
        .map_err(io::Error::other)?;
    let firewall = config.netns(FIREWALL.1);
    // The veth pair goes first, by its end in the firewall's namespace
    // (deleting one end deletes both at once): deleting the client's
    // namespace frees its end only when the kernel's namespace cleanup gets
    // to it, later, so an add-client right after found `veth<domid>` still
    // there ("File exists").
    let _ = ip(&[
        "-n",
        &firewall,
        "link",
        "del",
        &format!("veth{}", client.domid),
    ]);
    stop_machine(config, &client.name)?;
    let _ = ip(&[
        "-n",
        &firewall,
        "link",
        "del",
        &format!("br{}", client.domid),
    ]);
    let _ = ip(&[
        "-n",
        &firewall,
        "link",
        "del",
        &format!("vif{}.0", client.domid),
    ]);
    let _ = fs::remove_dir_all(config.rpc_dir(&client.name));
    let _ = fs::remove_file(config.agent_socket(&client.name));
    let output = Command::new(config.bin("qubesdb-rm"))
        .args([
            "-d",
            FIREWALL.1,
            &format!("/qubes-firewall/{}/", client.ip),
            &format!("/qubes-firewall/{}/", qubes_ip6(client.ip)),
        ])
        .env("QUBESDB_SOCKET_DIR", config.qubesdb_dir())
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "qubesdb-rm: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

fn build(config: &BoxConfig) -> io::Result<()> {
    let self_exe = config.bin("qubes-box");
    fs::create_dir_all(config.state_dir.join("log"))?;
    // dom0: xenstored (dom0's socket and the firewall's).
    spawn(
        config,
        "xenstored",
        "dom0",
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

    // The firewall's machine (layer 2 only: no IPv6 either, so its bridges
    // and ports never send link-local chatter into the clients' TAPs),
    // then sys-net with the uplink.
    netns_add(config, &config.netns(FIREWALL.1))?;
    for key in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &config.netns(FIREWALL.1),
                "sysctl",
                "-q",
                "-w",
                key,
            ],
        )?;
    }
    build_sys_net(config)?;

    // dom0: the box's qubesd (crate::qubesd), its registry of qubes, the
    // file-copy policy and ask program (crate::vmtools).
    crate::qubesd::Registry::new(config).register_builtin()?;
    spawn(
        config,
        "qubesd",
        "dom0",
        None,
        &self_exe,
        &[
            "qubesd".into(),
            "--state-dir".into(),
            config.state_dir.display().to_string(),
            "--prefix".into(),
            config.prefix.clone(),
            "--bin-dir".into(),
            config.bin_dir.display().to_string(),
        ],
        &[],
    )?;
    wait_for_path(&crate::qubesd::socket(config), "qubes-box qubesd")?;

    // dom0: the qrexec policy daemon.
    write_policy(config)?;
    crate::vmtools::write_policy(config)?;
    let policy_daemon = config.bin("qrexec-policy-daemon");
    let env = qrexec_env(config);
    let env_refs: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    if policy_daemon.exists() {
        spawn(
            config,
            "qrexec-policy-daemon",
            "dom0",
            None,
            &policy_daemon,
            &[
                "--socket-path".into(),
                config.policy_socket().display().to_string(),
                "--policy-path".into(),
                config.policy_dir().display().to_string(),
                "--legacy-policy-path".into(),
                config.legacy_policy_dir().display().to_string(),
                "--ask-program".into(),
                crate::vmtools::ask_program(config).display().to_string(),
                "--eval-socket-path".into(),
                config
                    .state_dir
                    .join("policy.EvalSimple")
                    .display()
                    .to_string(),
                "--gui-socket-path".into(),
                config
                    .state_dir
                    .join("policy.EvalGUI")
                    .display()
                    .to_string(),
            ],
            // QUBESD_INTERNAL_SOCKET: it asks the box's qubesd for the
            // system info on every request, as Qubes' policy daemon does.
            &env_refs,
        )?;
        wait_for_path(&config.policy_socket(), "qrexec-policy-daemon")?;
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
        "dom0",
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
    let entries: Vec<(String, String)> = vec![
        ("/name".into(), FIREWALL.1.into()),
        ("/qubes-vm-type".into(), "ProxyVM".into()),
        ("/qubes-ip".into(), FIREWALL_IP.to_string()),
        ("/qubes-netmask".into(), "255.255.255.255".into()),
        ("/qubes-gateway".into(), SYS_NET_IP.to_string()),
        ("/qubes-ip6".into(), FIREWALL_IP6.to_string()),
        ("/qubes-gateway6".into(), SYS_NET_IP6.to_string()),
        ("/qubes-primary-dns".into(), DNS[0].to_string()),
        ("/qubes-secondary-dns".into(), DNS[1].to_string()),
        // qubesd's keys for a qube that provides network (its clients see
        // the firewall as their gateway and the virtual DNS servers).
        ("/qubes-netvm-network".into(), FIREWALL_IP.to_string()),
        ("/qubes-netvm-gateway".into(), FIREWALL_IP.to_string()),
        ("/qubes-netvm-gateway6".into(), FIREWALL_IP6.to_string()),
        ("/qubes-netvm-netmask".into(), "255.255.255.255".into()),
        ("/qubes-netvm-primary-dns".into(), DNS[0].to_string()),
        ("/qubes-netvm-secondary-dns".into(), DNS[1].to_string()),
        // No qube connected yet; `add_client` lists each one.
        ("/connected-ips".into(), String::new()),
        ("/connected-ips6".into(), String::new()),
    ];
    qubesdb_write(config, &entries)?;

    // XenStore: the firewall's identity.
    let mut xs = xenstore(config)?;
    let home = format!("/local/domain/{}", FIREWALL.0);
    for (path, value) in [
        (format!("{home}/name"), FIREWALL.1.to_string()),
        (format!("{home}/domid"), FIREWALL.0.to_string()),
        (format!("{home}/device/vif/0/mac"), client_mac(FIREWALL.0)),
    ] {
        xs.write(&path, value.as_bytes())
            .map_err(io::Error::other)?;
    }

    // The clients.
    for n in 1..=config.clients {
        if let Some(client) = client_qube(n) {
            add_client(config, &client)?;
        }
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
    let env = qrexec_env(config);
    let env_refs: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    spawn(
        config,
        "qrexec-sys-firewall",
        "dom0",
        None,
        &config.bin("qrexec-daemon"),
        &qrexec_args,
        &env_refs,
    )?;

    // The firewall itself.
    if config.firewall {
        spawn(
            config,
            "firewall",
            FIREWALL.1,
            Some(&config.netns(FIREWALL.1)),
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
            ]
            .into_iter()
            .chain(config.firewall_args.iter().cloned())
            .collect::<Vec<String>>(),
            &[],
        )?;
        // Up means ready: the firewall attached its TAPs and the bridges
        // forward on them (else a client's first packets are lost).
        wait_forwarding(config, "eth0")?;
        for n in 1..=config.clients {
            if let Some(client) = client_qube(n) {
                wait_forwarding(config, &format!("vif{}.0", client.domid))?;
            }
        }
    }
    Ok(())
}

/// The pid of the running firewall process, if any.
pub fn firewall_pid(config: &BoxConfig) -> Option<u32> {
    recorded(config)
        .iter()
        .rev()
        .find_map(|resource| match resource {
            Resource::Process(pid, program, owner)
                if owner == FIREWALL.1 && process_matches(*pid, program) =>
            {
                Some(*pid)
            }
            _ => None,
        })
}

fn stop_process(pid: u32, program: &str) {
    if process_matches(pid, program) {
        let _ = run("kill", &["-TERM", &pid.to_string()]);
        let start = Instant::now();
        while process_matches(pid, program) && start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if process_matches(pid, program) {
            let _ = run("kill", &["-KILL", &pid.to_string()]);
        }
    }
}

fn kill_netns_pids(name: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            let _ = run("kill", &["-KILL", pid]);
        }
    }
}

/// Stops every recorded process and deletes every recorded namespace, then
/// the state directory. Safe to run repeatedly and after a failed `up`.
pub fn down(config: &BoxConfig) -> io::Result<()> {
    let resources = recorded(config);
    let mut problems = Vec::new();
    // Processes first (newest first), then namespaces.
    for resource in resources.iter().rev() {
        if let Resource::Process(pid, program, _) = resource {
            stop_process(*pid, program);
        }
    }
    // Anything still running inside a recorded namespace is stopped with it.
    for resource in resources.iter().rev() {
        if let Resource::Netns(name) = resource
            && netns_exists(name)
        {
            kill_netns_pids(name);
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
            Resource::Process(pid, program, _) => (
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
        let text = "netns qb-sys-net\npid 42 qubes-box\npid 43 qrexec-agent client3\n\
                    garbage line here too\npid x y\nnetns a b\n";
        assert_eq!(
            parse_resources(text),
            vec![
                Resource::Netns("qb-sys-net".into()),
                Resource::Process(42, "qubes-box".into(), String::new()),
                Resource::Process(43, "qrexec-agent".into(), "client3".into()),
            ]
        );
        assert!(client_qube(0).is_none());
        assert!(client_qube(MAX_CLIENTS + 1).is_none());
        let c10 = client_qube(10).unwrap();
        assert_eq!((c10.domid, c10.name.as_str()), (12, "client10"));
        assert_eq!(c10.ip, Ipv4Addr::new(10, 137, 0, 29));
        assert_eq!(client_qube(2).unwrap().rules.len(), 1);
        assert_eq!(client_mac(3), "00:16:3e:5e:6c:03");
        assert_eq!(
            qubes_ip6(Ipv4Addr::new(10, 137, 0, 20)).to_string(),
            "fd09:24ef:4179::a89:14"
        );
        assert_eq!(FIREWALL_IP6.to_string(), "fd09:24ef:4179::a89:6");
        let entries = firewall_entries(
            Ipv4Addr::new(10, 137, 0, 20),
            "drop",
            &[
                "action=accept dst4=192.0.2.80/32",
                "action=accept dst6=2001:db8::80/128",
                "action=accept proto=udp",
            ],
        );
        let text: Vec<String> = entries.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            text,
            [
                "/qubes-firewall/10.137.0.20/policy=drop",
                "/qubes-firewall/10.137.0.20/0000=action=accept dst4=192.0.2.80/32",
                "/qubes-firewall/10.137.0.20/0001=action=accept proto=udp",
                "/qubes-firewall/10.137.0.20=",
                "/qubes-firewall/fd09:24ef:4179::a89:14/policy=drop",
                "/qubes-firewall/fd09:24ef:4179::a89:14/0000=action=accept dst6=2001:db8::80/128",
                "/qubes-firewall/fd09:24ef:4179::a89:14/0001=action=accept proto=udp",
                "/qubes-firewall/fd09:24ef:4179::a89:14=",
            ]
        );
        assert_eq!(client_mac(0x1234), "00:16:3e:5e:12:34");
    }
}
