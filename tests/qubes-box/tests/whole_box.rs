//! The whole system in the box (root, as CI runs): `qubes-box up` with the
//! hosted firewall (`qubes-firewall-hosted`, built here with
//! `--features hosted` because a plain workspace build skips it), then
//! `qubes.FirewallStatus` over qrexec from dom0, traffic from the client
//! qubes through the firewall to sys-net, the
//! per-client rules enforced, a live rule change made with `qubesdb-write`
//! taking effect, and a poweroff through XenStore ending the process.
#![allow(clippy::unwrap_used)] // reason: test code

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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
        let out = self.in_netns(client, &["http-get", "192.0.2.80:80", "/"]);
        out.status.success() && out.stdout == b"hello from sys-net\n"
    }

    fn wait_until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{what} did not happen; firewall log:\n{}",
                std::fs::read_to_string(self.state.join("firewall.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn clients_reach_sys_net_through_the_hosted_firewall_under_their_rules() {
    if !is_root() {
        eprintln!("skipped: not root");
        return;
    }
    for tool in ["qubesdb-daemon", "qrexec-daemon", "qrexec-client"] {
        if !bin_dir().join(tool).exists() {
            eprintln!("skipped: {tool} not built (run cargo build --workspace --bins)");
            return;
        }
    }
    build_firewall();
    let up = Up {
        state: std::env::temp_dir().join(format!("qubes-box-whole-{}", std::process::id())),
        prefix: format!("qbw{}-", std::process::id()),
    };
    let out = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
        .args([
            "up",
            "--state-dir",
            &up.state.display().to_string(),
            "--prefix",
            &up.prefix,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

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
    let dns = up.in_netns("client1", &["dns-query", "10.139.1.1:53", "example.com"]);
    assert_eq!(
        String::from_utf8_lossy(&dns.stdout),
        "192.0.2.80\n",
        "{}",
        text(&dns)
    );

    // client2 may use DNS only.
    let dns = up.in_netns("client2", &["dns-query", "10.139.1.2:53", "example.com"]);
    assert_eq!(
        String::from_utf8_lossy(&dns.stdout),
        "192.0.2.80\n",
        "{}",
        text(&dns)
    );
    assert!(!up.web_from("client2"), "client2's HTTP must be dropped");

    // dom0 changes client2's rules live, the way qubesd writes them.
    let ip = "10.137.0.21";
    let rm = up.qubesdb("qubesdb-rm", &[&format!("/qubes-firewall/{ip}/")]);
    assert!(rm.status.success(), "{}", text(&rm));
    let write = up.qubesdb(
        "qubesdb-write",
        &[
            &format!("/qubes-firewall/{ip}/policy"),
            "drop",
            &format!("/qubes-firewall/{ip}/0000"),
            "action=accept proto=tcp dstports=80-80",
            &format!("/qubes-firewall/{ip}"),
            "",
        ],
    );
    assert!(write.status.success(), "{}", text(&write));
    up.wait_until("client2 allowed HTTP after the rule change", || {
        up.web_from("client2")
    });

    // The rules still hold for client1's other ports: nothing listens on
    // 8080 in sys-net, so a packet that got there would be refused by
    // sys-net's kernel ("Connection refused"); the firewall must stop it
    // first (dropped: a timeout; or rejected with an ICMP error: "No route
    // to host").
    let blocked = up.in_netns("client1", &["http-get", "192.0.2.80:8080", "/"]);
    assert!(!blocked.status.success());
    assert!(
        !String::from_utf8_lossy(&blocked.stderr).contains("refused"),
        "port 8080 reached sys-net: {}",
        text(&blocked)
    );

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
