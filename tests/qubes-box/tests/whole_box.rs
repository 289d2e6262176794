//! The whole system in the box (root, as CI runs): `qubes-box up` with the
//! hosted firewall (`qubes-firewall-hosted`, built here with
//! `--features hosted` because a plain workspace build skips it), then, in
//! one box to keep the run short (every wait bounded): `qubes.FirewallStatus`
//! over qrexec from dom0; allowed and denied TCP/UDP/ICMP by each rule field
//! (`proto`, `dstports`, `dst4`, `dst6` over the box's IPv6, `icmptype`,
//! `specialtarget=dns`, `dsthost` resolved through the box's DNS,
//! `policy`); rule changes written with `qubesdb-rm`/`qubesdb-write` as
//! qubesd writes them (both address families), one cutting an established
//! connection and allowing a new one; a spoofed source dropped; clients
//! isolated from each other even under `policy accept` and with a rule
//! naming the other (as Linux's `oifgroup 2 drop`); `expire=` (an option
//! qubesd never writes) blocking the client with the reason in
//! `qubes.FirewallStatus`; a client added and removed while the others
//! keep working; sys-net restarted (new namespace, new gateway MAC) with
//! traffic recovering and the same firewall process; the seed qrexec
//! examples between two client qubes through the policy daemon; ICMP
//! timestamp requests (type 13) rejected without and answered with
//! `icmptype=13`; TCP over IPv6 with a Destination Options header
//! forwarded under a `dst6` rule (and, as on Linux, not matched by
//! `proto=tcp`); a qube listed only in `/connected-ips` (never started)
//! protected from spoofing (sys-net cannot impersonate it, no client can
//! send as it); and a poweroff through XenStore ending the process.
//!
//! A second, smaller box (one client) runs beside it: its sys-net never
//! answers ARP and has Xen's backend MAC `fe:ff:ff:ff:ff:ff`, and still
//! carries the client's traffic.
#![allow(clippy::unwrap_used)] // reason: test code

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qubes_box::netbox::{self, BoxConfig};

/// Packets the standard library cannot send, from Python's standard
/// library (the test crate forbids unsafe code, so no raw sockets of its
/// own; no scapy):
/// - `timestamp ADDR`: one ICMP timestamp request (type 13); prints
///   `reply` (type 14 from ADDR), `prohibited` (type 3 code 13 from the
///   firewall) or `nothing` after 2 s;
/// - `dstopts [ADDR]:PORT`: HTTP GET over TCP/IPv6 with a Destination
///   Options header (PadN) on every segment the client sends
///   (`IPV6_DSTOPTS`); prints the response body.
const RAW_PY: &str = r#"
import socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
mode, target = sys.argv[1], sys.argv[2]
if mode == 'timestamp':
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = 0x5151
    body = struct.pack('!HH', ident, 1) + struct.pack('!III', 1000, 0, 0)
    msg = struct.pack('!BBH', 13, 0, 0) + body
    msg = struct.pack('!BBH', 13, 0, csum(msg)) + body
    s.sendto(msg, (target, 0))
    end = time.time() + 2
    while time.time() < end:
        s.settimeout(max(0.01, end - time.time()))
        try:
            data, (src, _) = s.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (data[0] & 15) * 4
        icmp = data[ihl:]
        if len(icmp) >= 8 and icmp[0] == 14 and src == target and icmp[4:6] == b'QQ':
            print('reply'); sys.exit(0)
        if len(icmp) >= 8 and icmp[0] == 3 and icmp[1] == 13:
            print('prohibited'); sys.exit(0)
    print('nothing')
elif mode == 'dstopts':
    host, port = target.rsplit(':', 1)
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    s.settimeout(3)
    s.connect((host.strip('[]'), int(port)))
    s.sendall(b'GET / HTTP/1.0\r\n\r\n')
    data = b''
    while True:
        chunk = s.recv(4096)
        if not chunk: break
        data += chunk
    sys.stdout.write(data.split(b'\r\n\r\n', 1)[-1].decode())
"#;

/// The drop counter of client-to-client traffic in qubes.FirewallStatus.
const CLIENT_TO_CLIENT: &str =
    "client-to-client traffic (clients are isolated, as in Linux's qubes table)";

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

/// Builds the hosted firewall into the same target directory.
fn build_firewall() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
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

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

struct Up {
    state: PathBuf,
    prefix: String,
    sys_net_answers_arp: bool,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
            .args(["down", "--state-dir", &self.state.display().to_string()])
            .output();
    }
}

impl Up {
    fn in_netns(&self, machine: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}{machine}", self.prefix)])
            .arg(env!("CARGO_BIN_EXE_qubes-box"))
            .args(args)
            .output()
            .unwrap()
    }

    fn qubesdb(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(bin_dir().join(tool))
            .args(["-d", "sys-firewall"])
            .args(args)
            .env("QUBESDB_SOCKET_DIR", self.state.join("qubes"))
            .output()
            .unwrap()
    }

    fn web_from(&self, client: &str) -> bool {
        self.http(client, "192.0.2.80:80")
    }

    fn http(&self, client: &str, address: &str) -> bool {
        let out = self.in_netns(client, &["http-get", address, "/"]);
        out.status.success() && out.stdout == b"hello from sys-net\n"
    }

    /// The client's count of TCP SYNs sent again (`TCPSynRetrans` of its
    /// namespace's /proc/net/netstat): a lost first SYN, or a lost ARP
    /// exchange before it, makes the kernel send the SYN again.
    fn syn_retransmits(&self, client: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{}{client}", self.prefix)])
            .args(["cat", "/proc/net/netstat"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // Pairs of lines: "TcpExt: names..." then "TcpExt: values...".
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
        let (names, values) = (lines[0], lines[1]);
        let at = names
            .split_whitespace()
            .position(|n| n == "TCPSynRetrans")
            .expect("TCPSynRetrans in /proc/net/netstat");
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    }

    fn udp(&self, client: &str, address: &str) -> bool {
        let out = self.in_netns(client, &["udp-echo", address, "box"]);
        out.status.success() && out.stdout == b"box\n"
    }

    fn ping(&self, client: &str, address: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}{client}", self.prefix)])
            .args(["ping", "-c", "1", "-W", "2", address])
            .output()
            .unwrap()
            .status
            .success()
    }

    /// [`RAW_PY`] in `machine`'s namespace; its stdout.
    fn raw(&self, machine: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{}{machine}", self.prefix)])
            .args(["python3", "-c", RAW_PY])
            .args(args)
            .output()
            .unwrap();
        let mut said = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            said.push_str(&format!(
                "[failed: {}]",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        said
    }

    fn config(&self) -> BoxConfig {
        BoxConfig {
            state_dir: self.state.clone(),
            prefix: self.prefix.clone(),
            bin_dir: bin_dir(),
            firewall: true,
            firewall_bin: None,
            firewall_args: Vec::new(),
            clients: 2,
            sys_net_answers_arp: self.sys_net_answers_arp,
        }
    }

    /// Replaces a client's rules as qubesd does, for both address
    /// families: remove the client's directories, write `policy` and
    /// `0000`…, then the empty commit write.
    fn set_rules(&self, ip: &str, policy: &str, rules: &[&str]) {
        let ip: std::net::Ipv4Addr = ip.parse().unwrap();
        let rm = self.qubesdb(
            "qubesdb-rm",
            &[
                &format!("/qubes-firewall/{ip}/"),
                &format!("/qubes-firewall/{}/", netbox::qubes_ip6(ip)),
            ],
        );
        assert!(rm.status.success(), "{}", text(&rm));
        let entries = netbox::firewall_entries(ip, policy, rules);
        let args: Vec<&str> = entries
            .iter()
            .flat_map(|(k, v)| [k.as_str(), v.as_str()])
            .collect();
        let write = self.qubesdb("qubesdb-write", &args);
        assert!(write.status.success(), "{}", text(&write));
    }

    fn firewall_status(&self) -> Output {
        Command::new(bin_dir().join("qrexec-client"))
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
            .unwrap()
    }

    /// A drop counter of the firewall's status report.
    fn drops(&self, reason: &str) -> u64 {
        let out = self.firewall_status();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let rest = line.strip_prefix("drop ")?;
                let (count, what) = rest.split_once(' ')?;
                (what == reason).then(|| count.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no drop counter {reason:?}: {}", text(&out)))
    }

    /// `qrexec-client-vm` in client qube `client` (its agent's socket and
    /// domain id), with stdin empty.
    fn client_vm(&self, client: &str, domid: u16, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}{client}", self.prefix)])
            .arg(bin_dir().join("qrexec-client-vm"))
            .arg(format!(
                "--agent-socket={}",
                self.state.join(format!("agent.{client}.sock")).display()
            ))
            .args(args)
            .env("VCHAN_SOCKET_DIR", self.state.join("vchan"))
            .env("VCHAN_DOMAIN", domid.to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A process in a client's namespace, killed by the caller.
    fn spawn_in(&self, machine: &str, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}{machine}", self.prefix)])
            .arg(env!("CARGO_BIN_EXE_qubes-box"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Waits until `check` holds. The bound (120 s) only catches a hang:
    /// on a loaded machine a rule change or a restart may take seconds.
    fn wait_until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{what} did not happen; firewall log:\n{}",
                std::fs::read_to_string(self.state.join("firewall.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Root, the workspace tools, ping and python3 (installed from the
/// distribution when missing), the hosted firewall built: false (test
/// skipped, said on stderr) when the box cannot run here. Done once for
/// the tests of this file, which run at the same time.
fn ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(prepare)
}

fn prepare() -> bool {
    if !is_root() {
        eprintln!("skipped: not root");
        return false;
    }
    for tool in [
        "qubesdb-daemon",
        "qubesdb-write",
        "qubesdb-rm",
        "qubesdb-read",
        "qrexec-daemon",
        "qrexec-client",
        "qrexec-agent",
        "qrexec-client-vm",
        "qrexec-policy-daemon",
        "qrexec-policy-exec",
    ] {
        if !bin_dir().join(tool).exists() {
            eprintln!("skipped: {tool} not built (run cargo build --workspace --bins)");
            return false;
        }
    }
    let missing: Vec<&str> = [("ping", "iputils-ping"), ("python3", "python3")]
        .into_iter()
        .filter(|(program, _)| Command::new(program).arg("-V").output().is_err())
        .map(|(_, package)| package)
        .collect();
    if !missing.is_empty() {
        // Like every other dependency of the box, from the distribution.
        let mut install = vec!["install", "-y", "-q"];
        install.extend(&missing);
        for args in [&["update", "-q"][..], &install[..]] {
            let status = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .unwrap();
            assert!(status.success(), "apt-get {args:?} failed");
        }
    }
    build_firewall();
    true
}

/// `qubes-box up` with its own state directory and namespace prefix
/// (`tag` keeps two boxes of one test run apart) and extra arguments.
fn bring_up(tag: &str, extra: &[&str]) -> Up {
    let up = Up {
        state: std::env::temp_dir().join(format!("qubes-box-{tag}-{}", std::process::id())),
        prefix: format!("qb{tag}{}-", std::process::id()),
        sys_net_answers_arp: !extra.contains(&"--sys-net-no-arp"),
    };
    let out = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
        .args([
            "up",
            "--state-dir",
            &up.state.display().to_string(),
            "--prefix",
            &up.prefix,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    up
}

#[test]
fn clients_reach_sys_net_through_the_hosted_firewall_under_their_rules() {
    if !ready() {
        return;
    }
    let up = bring_up("w", &[]);

    // `up` returns once the firewall has attached its TAPs and the bridges
    // forward on them: the very first request gets through at once. A
    // lost first SYN or ARP would make the client send its SYN again, which
    // its kernel counts (not timed: a loaded machine may be slow, it does
    // not lose packets; only an answer later than the SYN's first timeout,
    // 1 s, would be counted too).
    let retransmits = up.syn_retransmits("client1");
    let first = Instant::now();
    assert!(up.web_from("client1"), "the first request after up failed");
    assert_eq!(
        up.syn_retransmits("client1"),
        retransmits,
        "client1 sent its first SYN again (a packet was lost), the request took {:?}",
        first.elapsed()
    );

    // The firewall reports its networking up with an empty
    // /qubes-iptables-error, as Qubes' own firewall does.
    up.wait_until("/qubes-iptables-error written", || {
        let out = up.qubesdb("qubesdb-read", &["/qubes-iptables-error"]);
        out.status.success() && out.stdout == b"\n"
    });

    // dom0 asks the firewall for its status over qrexec (qrexec-client →
    // qrexec-daemon → the firewall's agent on vchan 512, data on 513).
    up.wait_until("qubes.FirewallStatus over qrexec", || {
        let out = Command::new(bin_dir().join("qrexec-client"))
            .arg(format!("--socket-dir={}", up.state.join("qubes").display()))
            .args([
                "-d",
                "sys-firewall",
                "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
            ])
            .env("VCHAN_SOCKET_DIR", up.state.join("vchan"))
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        out.status.success()
            && report.starts_with("qubes-firewall status")
            && report.contains("client vif3.0 10.137.0.20")
            && report.contains("client vif4.0 10.137.0.21")
    });

    // client1 may use HTTP and DNS.
    up.wait_until("client1 reaching sys-net's web server", || {
        up.web_from("client1")
    });
    // A bulk download (runs of TCP segments the hosted platform writes to
    // the client's TAP merged as GSO frames): every byte arrives, no
    // stall from a bad checksum.
    let bulk = up.in_netns("client1", &["http-bench", "192.0.2.80:80", "20000000"]);
    let got: u64 = String::from_utf8_lossy(&bulk.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        bulk.status.success() && (20_000_000..20_000_200).contains(&got),
        "{}",
        text(&bulk)
    );
    let dns = up.in_netns("client1", &["dns-query", "10.139.1.1:53", "example.com"]);
    assert_eq!(
        String::from_utf8_lossy(&dns.stdout),
        "192.0.2.80\n",
        "{}",
        text(&dns)
    );

    // IPv6 too (rules are written for both families).
    assert!(up.http("client1", "[2001:db8::80]:80"), "client1 over IPv6");

    // client2 may use DNS only.
    let dns = up.in_netns("client2", &["dns-query", "10.139.1.2:53", "example.com"]);
    assert_eq!(
        String::from_utf8_lossy(&dns.stdout),
        "192.0.2.80\n",
        "{}",
        text(&dns)
    );
    assert!(!up.web_from("client2"), "client2's HTTP must be dropped");

    // proto/dstports: client1 may use TCP 80 only (and DNS): HTTP on 8080
    // (which sys-net serves) and UDP echo are denied; the firewall refuses
    // them before sys-net ever sees them.
    let denied_before = up.drops("denied by the client's rules");
    let blocked = up.in_netns("client1", &["http-get", "192.0.2.80:8080", "/"]);
    assert!(!blocked.status.success(), "dstports: 8080 got through");
    assert!(
        !String::from_utf8_lossy(&blocked.stderr).contains("refused"),
        "port 8080 reached sys-net: {}",
        text(&blocked)
    );
    assert!(!up.udp("client1", "192.0.2.80:7"), "proto: UDP got through");
    assert!(up.drops("denied by the client's rules") >= denied_before + 2);
    // specialtarget=dns allows DNS only: client2's other UDP is denied.
    assert!(!up.udp("client2", "192.0.2.80:7"));

    // A spoofed source: client1 sends from an address that is not its own
    // (a second address on eth0, used as source towards 192.0.2.81).
    let spoofed_before = up.drops("source address not allowed on this interface");
    let client1 = format!("{}client1", up.prefix);
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", text(&out));
    };
    ip(&[
        "-n",
        &client1,
        "addr",
        "add",
        "10.137.0.99/32",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &client1,
        "route",
        "add",
        "192.0.2.81/32",
        "via",
        "10.137.0.6",
        "src",
        "10.137.0.99",
    ]);
    assert!(
        !up.http("client1", "192.0.2.81:80"),
        "spoofed source got through"
    );
    assert!(
        up.drops("source address not allowed on this interface") > spoofed_before,
        "the spoofed packets were not counted as such"
    );
    ip(&["-n", &client1, "route", "del", "192.0.2.81/32"]);
    ip(&[
        "-n",
        &client1,
        "addr",
        "del",
        "10.137.0.99/32",
        "dev",
        "eth0",
    ]);
    up.wait_until("client1 reaching 192.0.2.81 from its own address", || {
        up.http("client1", "192.0.2.81:80")
    });

    // dst4: only 192.0.2.80.
    let c1 = "10.137.0.20";
    up.set_rules(
        c1,
        "drop",
        &["action=accept proto=tcp dst4=192.0.2.80/32 dstports=80-80"],
    );
    up.wait_until("dst4 rule applied", || !up.http("client1", "192.0.2.81:80"));
    assert!(up.http("client1", "192.0.2.80:80"), "dst4: .80 denied");
    assert!(
        !up.http("client1", "[2001:db8::80]:80"),
        "dst4: a rule for IPv4 allowed IPv6"
    );

    // dst6: IPv6 is wired (/qubes-ip6, the clients' second address); the
    // rule allows 2001:db8::80 over IPv6 and nothing over IPv4.
    up.set_rules(
        c1,
        "drop",
        &["action=accept proto=tcp dst6=2001:db8::1/128 dstports=80-80"],
    );
    up.wait_until("dst6 rule for another host applied", || {
        !up.http("client1", "192.0.2.80:80")
    });
    assert!(
        !up.http("client1", "[2001:db8::80]:80"),
        "dst6: ::80 allowed"
    );
    up.set_rules(
        c1,
        "drop",
        &["action=accept proto=tcp dst6=2001:db8::80/128 dstports=80-80"],
    );
    up.wait_until("dst6 rule applied", || {
        up.http("client1", "[2001:db8::80]:80")
    });
    assert!(!up.http("client1", "192.0.2.80:80"), "dst6: IPv4 allowed");

    // dsthost: resolved by the firewall through the box's DNS (which
    // answers 192.0.2.80 for every name).
    up.set_rules(
        c1,
        "drop",
        &["action=accept proto=tcp dsthost=web.example dstports=80-80"],
    );
    up.wait_until("dsthost resolved and applied", || {
        up.http("client1", "192.0.2.80:80")
    });
    assert!(!up.http("client1", "192.0.2.81:80"), "dsthost: .81 allowed");

    // icmptype: echo requests (type 8) only when a rule says so.
    up.set_rules(c1, "drop", &["action=accept proto=tcp dstports=80-80"]);
    up.wait_until("rules without ICMP applied", || up.web_from("client1"));
    assert!(
        !up.ping("client1", "192.0.2.80"),
        "ICMP allowed without a rule"
    );
    up.set_rules(
        c1,
        "drop",
        &[
            "action=accept proto=icmp icmptype=8",
            "action=accept proto=tcp dstports=80-80",
        ],
    );
    up.wait_until("ping allowed by icmptype=8", || {
        up.ping("client1", "192.0.2.80")
    });
    // policy: accept with no rules lets everything through.
    up.set_rules(c1, "accept", &[]);
    up.wait_until("policy accept applied", || {
        up.udp("client1", "192.0.2.80:7")
    });
    assert!(up.http("client1", "192.0.2.80:8080"));
    assert!(up.http("client1", "192.0.2.81:80"));

    // A live rule change cuts an established connection and allows a new
    // one: a TCP echo connection allowed by `dstports=7` is cut when the
    // rules become "TCP 80 only", and HTTP (denied before) now works.
    up.set_rules(c1, "drop", &["action=accept proto=tcp dstports=7-7"]);
    up.wait_until("echo-only rules applied", || !up.web_from("client1"));
    let mut hold = up.spawn_in("client1", &["tcp-hold", "192.0.2.80:7"]);
    let mut hold_in = hold.stdin.take().unwrap();
    let mut hold_out = BufReader::new(hold.stdout.take().unwrap());
    let mut line = String::new();
    hold_out.read_line(&mut line).unwrap();
    assert_eq!(line, "connected\n");
    writeln!(hold_in, "before").unwrap();
    line.clear();
    hold_out.read_line(&mut line).unwrap();
    assert_eq!(line, "echo before\n");
    up.set_rules(c1, "drop", &["action=accept proto=tcp dstports=80-80"]);
    up.wait_until("HTTP allowed after the live change", || {
        up.web_from("client1")
    });
    writeln!(hold_in, "after").unwrap();
    line.clear();
    hold_out.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("cut: "),
        "the established connection survived the rule change: {line:?}"
    );
    let _ = hold.kill();
    let _ = hold.wait();

    // Client to client: never, as on Linux (`oifgroup 2 drop`) — not under
    // Qubes' default `policy accept`, not with a rule naming client2.
    let mut echo = up.spawn_in("client2", &["serve-tcp-echo", "10.137.0.21:7"]);
    let to_echo = |up: &Up, from: &str, address: &str| {
        let mut child = up.spawn_in(from, &["tcp-hold", address]);
        writeln!(child.stdin.take().unwrap(), "hi").unwrap();
        let out = child.wait_with_output().unwrap();
        out.status.success() && out.stdout == b"connected\necho hi\n"
    };
    // The echo server works (so a failure below is the firewall's).
    up.wait_until("client2's echo server answering locally", || {
        to_echo(&up, "client2", "10.137.0.21:7")
    });
    up.set_rules(c1, "accept", &[]);
    up.wait_until("policy accept applied", || {
        up.udp("client1", "192.0.2.80:7")
    });
    let isolated_before = up.drops(CLIENT_TO_CLIENT);
    assert!(
        !to_echo(&up, "client1", "10.137.0.21:7"),
        "client1 reached client2 under policy accept"
    );
    up.set_rules(
        c1,
        "drop",
        &[
            "action=accept proto=tcp dstports=80-80",
            "action=accept proto=tcp dst4=10.137.0.21/32 dstports=7-7",
        ],
    );
    up.wait_until("rule naming client2 applied", || up.web_from("client1"));
    assert!(
        !to_echo(&up, "client1", "10.137.0.21:7"),
        "client1 reached client2 with a rule naming it"
    );
    assert!(up.drops(CLIENT_TO_CLIENT) > isolated_before);
    let _ = echo.kill();
    let _ = echo.wait();

    // A rule option qubesd never writes (`expire=`, `comment=`, …) blocks
    // the client, as Linux's "Unsupported rule option(s)", and
    // qubes.FirewallStatus says why.
    up.set_rules(
        c1,
        "accept",
        &["action=accept proto=tcp dstports=80-80 expire=1700000000"],
    );
    up.wait_until("expire= blocking client1", || !up.web_from("client1"));
    let status = String::from_utf8_lossy(&up.firewall_status().stdout).into_owned();
    let line = status
        .lines()
        .find(|l| l.starts_with("client vif3.0 10.137.0.20 "))
        .unwrap_or_else(|| panic!("no client1 line: {status}"));
    assert!(
        line.contains("error=") && line.contains("unsupported rule option 'expire'"),
        "{line}"
    );
    assert!(
        !up.ping("client1", "192.0.2.80"),
        "expire=: ICMP got through"
    );
    up.set_rules(c1, "drop", &["action=accept proto=tcp dstports=80-80"]);
    up.wait_until("client1 unblocked", || up.web_from("client1"));

    let config = up.config();
    let client3 = netbox::client_qube(3).unwrap();
    // A client added and removed while the others keep working.
    netbox::add_client(&config, &client3).unwrap();
    up.wait_until("client3 reaching sys-net", || up.web_from("client3"));
    assert!(up.web_from("client1"));
    let status = String::from_utf8_lossy(&up.firewall_status().stdout).into_owned();
    assert!(status.contains("client vif5.0 10.137.0.22"), "{status}");
    netbox::remove_client(&config, &client3).unwrap();
    assert!(!netbox::netns_exists(&format!("{}client3", up.prefix)));
    up.wait_until("client3 gone from the firewall", || {
        let status = String::from_utf8_lossy(&up.firewall_status().stdout).into_owned();
        status.starts_with("qubes-firewall status") && !status.contains("vif5.0")
    });
    assert!(
        up.web_from("client1"),
        "client1 broken by client3's removal"
    );
    assert!(
        up.in_netns("client2", &["dns-query", "10.139.1.1:53", "a.example"])
            .status
            .success()
    );

    // Issue 11 in the box: what a Linux sys-firewall does that needs the
    // router to walk past echo and errors, IPv6 extension headers and
    // /connected-ips.
    up.set_rules(
        c1,
        "drop",
        &[
            "action=accept proto=icmp icmptype=8",
            "action=accept proto=tcp dstports=80-80",
        ],
    );
    up.wait_until("rules with echo but not timestamp applied", || {
        up.ping("client1", "192.0.2.80")
    });
    // ICMP timestamp (type 13): a new flow the rules decide, as Linux's
    // conntrack makes it: denied (and rejected) without a rule for it...
    assert_eq!(
        up.raw("sys-net", &["timestamp", "192.0.2.80"]),
        "reply\n",
        "sys-net's own kernel must answer ICMP timestamp requests (the control)"
    );
    assert_eq!(
        up.raw("client1", &["timestamp", "192.0.2.80"]),
        "prohibited\n",
        "ICMP timestamp without icmptype=13"
    );
    // ...and answered with `icmptype=13`.
    up.set_rules(
        c1,
        "drop",
        &[
            "action=accept proto=icmp icmptype=13",
            "action=accept proto=tcp dstports=80-80",
        ],
    );
    up.wait_until("ICMP timestamp allowed by icmptype=13", || {
        up.raw("client1", &["timestamp", "192.0.2.80"]) == "reply\n"
    });
    assert!(
        !up.ping("client1", "192.0.2.80"),
        "icmptype=13 allowed echo"
    );

    // An IPv6 packet with a Destination Options header is forwarded under
    // the rules like any other (the header walked to TCP): a rule for the
    // destination accepts it...
    up.set_rules(c1, "drop", &["action=accept dst6=2001:db8::80/128"]);
    up.wait_until("dst6 rule without proto applied", || {
        up.http("client1", "[2001:db8::80]:80")
    });
    assert_eq!(
        up.raw("client1", &["dstopts", "[2001:db8::80]:80"]),
        "hello from sys-net\n",
        "TCP over IPv6 with a Destination Options header"
    );
    // ...but, as on Linux, `proto=tcp` does not: qubesd's rule becomes
    // `ip6 nexthdr tcp`, which reads the IPv6 header's own next header
    // (60 here), so the policy rejects it (EACCES from the ICMPv6
    // administratively-prohibited).
    up.set_rules(
        c1,
        "drop",
        &["action=accept proto=tcp dst6=2001:db8::80/128 dstports=80-80"],
    );
    up.wait_until("dst6 rule with proto=tcp applied", || {
        up.http("client1", "[2001:db8::80]:80")
    });
    let said = up.raw("client1", &["dstopts", "[2001:db8::80]:80"]);
    assert!(
        said.contains("PermissionError"),
        "proto=tcp matched behind a Destination Options header: {said}"
    );

    // A qube connected to the firewall but not running (client4, listed in
    // /connected-ips only) is protected from spoofing: sys-net cannot
    // impersonate it (it answers for 10.137.0.23 itself here), and no
    // client may send as it.
    let client4 = netbox::client_qube(4).unwrap();
    netbox::connect_qube(&config, client4.ip).unwrap();
    up.wait_until("the firewall listing client4 as connected", || {
        String::from_utf8_lossy(&up.firewall_status().stdout)
            .lines()
            .any(|l| l.starts_with("connected_ips:") && l.contains(" 10.137.0.23"))
    });
    let sys_net = format!("{}sys-net", up.prefix);
    ip(&["-n", &sys_net, "addr", "add", "10.137.0.23/32", "dev", "lo"]);
    let mut impostor = up.spawn_in("sys-net", &["serve-tcp-echo", "10.137.0.23:7"]);
    up.wait_until("the impostor answering inside sys-net", || {
        to_echo(&up, "sys-net", "10.137.0.23:7")
    });
    up.set_rules(c1, "accept", &[]);
    up.wait_until("policy accept applied", || {
        to_echo(&up, "client1", "192.0.2.80:7")
    });
    assert!(
        !to_echo(&up, "client1", "10.137.0.23:7"),
        "sys-net impersonated client4, which is connected but not running"
    );
    let _ = impostor.kill();
    let _ = impostor.wait();
    ip(&["-n", &sys_net, "addr", "del", "10.137.0.23/32", "dev", "lo"]);
    let spoofed_before = up.drops("source address not allowed on this interface");
    let client2 = format!("{}client2", up.prefix);
    ip(&[
        "-n",
        &client2,
        "addr",
        "add",
        "10.137.0.23/32",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &client2,
        "route",
        "add",
        "192.0.2.81/32",
        "via",
        "10.137.0.6",
        "src",
        "10.137.0.23",
    ]);
    assert!(
        !up.http("client2", "192.0.2.81:80"),
        "client2 sent as client4"
    );
    assert!(up.drops("source address not allowed on this interface") > spoofed_before);
    ip(&["-n", &client2, "route", "del", "192.0.2.81/32"]);
    ip(&[
        "-n",
        &client2,
        "addr",
        "del",
        "10.137.0.23/32",
        "dev",
        "eth0",
    ]);
    up.set_rules(c1, "drop", &["action=accept proto=tcp dstports=80-80"]);
    up.wait_until("client1 back to HTTP only", || {
        !up.udp("client1", "192.0.2.80:7")
    });

    // sys-net restarts (new namespace, new veth: a new gateway MAC); the
    // same firewall process carries traffic again.
    let pid = netbox::firewall_pid(&config).unwrap();
    netbox::restart_net(&config).unwrap();
    up.wait_until("client1 reaching the restarted sys-net", || {
        up.web_from("client1")
    });
    // IPv6 too: the new sys-net announced its MAC by ARP only, and the
    // firewall asks for the IPv6 gateway again.
    up.wait_until("client1 reaching the restarted sys-net over IPv6", || {
        up.http("client1", "[2001:db8::80]:80")
    });
    assert_eq!(
        netbox::firewall_pid(&config),
        Some(pid),
        "the firewall was restarted"
    );

    // The seed qrexec examples between client qubes, through the policy
    // daemon (legacy per-argument policy files, `!compat-4.0`).
    let add_client = up.state.join("our_test_add_client");
    std::fs::write(
        &add_client,
        "#!/bin/sh\necho $1 $2\nexec cat >&$SAVED_FD_1\n",
    )
    .unwrap();
    let chmod = Command::new("chmod")
        .arg("755")
        .arg(&add_client)
        .status()
        .unwrap();
    assert!(chmod.success());
    let out = up.client_vm(
        "client1",
        3,
        &[
            "client2",
            "test.Add",
            add_client.to_str().unwrap(),
            "1",
            "2",
        ],
    );
    assert_eq!(out.stdout, b"3\n", "{}", text(&out));
    let out = up.client_vm("client1", 3, &["client2", "test.File+testfile1"]);
    assert_eq!(out.stdout, b"content of testfile1\n", "{}", text(&out));
    for (client, domid, target, service) in [
        ("client2", 4, "client1", "test.File+testfile1"),
        ("client1", 3, "client2", "test.File+testfile2"),
        ("client1", 3, "client2", "test.File"),
    ] {
        let out = up.client_vm(client, domid, &[target, service]);
        assert_eq!(
            out.status.code(),
            Some(126),
            "{client} {service}: {}",
            text(&out)
        );
        assert!(out.stdout.is_empty());
    }

    // The toolstack powers the firewall off through XenStore; it
    // acknowledges (writes "") and the hosted platform exits with status 0.
    let socket = up.state.join("xenstored.sock").display().to_string();
    let xs = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qubes-box"))
            .args(args)
            .output()
            .unwrap()
    };
    let write = xs(&[
        "xenstore-write",
        "--socket",
        &socket,
        "/local/domain/2/control/shutdown",
        "poweroff",
    ]);
    assert!(write.status.success(), "{}", text(&write));
    up.wait_until("the firewall exiting on poweroff", || {
        std::fs::read_to_string(up.state.join("firewall.log"))
            .unwrap_or_default()
            .contains("exiting (PowerOff, status 0)")
    });
    let ack = xs(&[
        "xenstore-read",
        "--socket",
        &socket,
        "/local/domain/2/control/shutdown",
    ]);
    assert_eq!(ack.stdout, b"\n", "{}", text(&ack));
}

/// A net qube that never answers ARP (and never announces its MAC) still
/// carries traffic: sys-net's end of the uplink has Xen's backend MAC
/// `fe:ff:ff:ff:ff:ff`, which a Linux sys-firewall uses for its gateway
/// without asking (`setup-ip`: a permanent neighbour entry), and which the
/// firewall falls back to when its ARP requests go unanswered.
#[test]
fn a_net_qube_that_never_answers_arp_still_carries_traffic() {
    if !ready() {
        return;
    }
    let up = bring_up("a", &["--sys-net-no-arp", "--clients", "1"]);
    // sys-net really is silent: its vif2.0 ignores every ARP request.
    let sysctl = Command::new("ip")
        .args(["netns", "exec", &format!("{}sys-net", up.prefix)])
        .args(["sysctl", "-n", "net.ipv4.conf.vif2/0.arp_ignore"])
        .output()
        .unwrap();
    assert_eq!(sysctl.stdout, b"8\n", "{}", text(&sysctl));
    up.wait_until("client1 reaching sys-net without ARP answers", || {
        up.web_from("client1")
    });
    let status = String::from_utf8_lossy(&up.firewall_status().stdout).into_owned();
    assert!(
        status.contains("\ngateway_mac: fe:ff:ff:ff:ff:ff (fallback"),
        "the firewall does not say it uses the fallback MAC: {status}"
    );
    let dns = up.in_netns("client1", &["dns-query", "10.139.1.1:53", "example.com"]);
    assert_eq!(
        String::from_utf8_lossy(&dns.stdout),
        "192.0.2.80\n",
        "{}",
        text(&dns)
    );
}
