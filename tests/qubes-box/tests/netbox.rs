//! `qubes-box up|status|down` for real (root, as CI runs): namespaces,
//! links, sys-net's services, dom0's xenstored and qubesdb-daemon with the
//! firewall's configuration; then a clean teardown, and a failed `up` that
//! leaves nothing behind. The hosted firewall is not started here
//! (`--no-firewall`): it needs `--features hosted` and its own test.
#![allow(clippy::unwrap_used)] // reason: test code

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qubes_box(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qubes-box"))
        .args(args)
        .output()
        .unwrap()
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_qubes-box"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Root, `ip`, and the workspace's qubesdb binaries (built by
/// `cargo xtask test`, which builds every binary first).
fn can_run() -> Result<(), String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default();
    if uid != "0" {
        return Err("not root".into());
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
            return Err(format!(
                "{tool} not built (run cargo build --workspace --bins)"
            ));
        }
    }
    Ok(())
}

fn namespaces_with(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Takes the box down if the test fails half-way (the test itself checks
/// a clean `down` when it gets that far).
struct DownOnPanic(String);

impl Drop for DownOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = qubes_box(&["down", "--state-dir", &self.0]);
        }
    }
}

#[test]
fn box_comes_up_serves_and_goes_down_cleanly() {
    if let Err(reason) = can_run() {
        eprintln!("skipped: {reason}");
        return;
    }
    let prefix = format!("qbt{}-", std::process::id());
    let state = std::env::temp_dir().join(format!("qubes-box-state-{}", std::process::id()));
    let state_arg = state.display().to_string();
    let _cleanup = DownOnPanic(state_arg.clone());
    let up = qubes_box(&[
        "up",
        "--state-dir",
        &state_arg,
        "--prefix",
        &prefix,
        "--no-firewall",
    ]);
    assert!(up.status.success(), "{}", text(&up));
    let mut names = namespaces_with(&prefix);
    names.sort();
    assert_eq!(
        names,
        ["client1", "client2", "sys-firewall", "sys-net"].map(|m| format!("{prefix}{m}"))
    );
    let status = qubes_box(&["status", "--state-dir", &state_arg]);
    assert!(status.status.success(), "{}", text(&status));

    // sys-net's services, from inside sys-net.
    let sys_net = format!("{prefix}sys-net");
    let exe = env!("CARGO_BIN_EXE_qubes-box");
    let web = Command::new("ip")
        .args([
            "netns",
            "exec",
            &sys_net,
            exe,
            "http-get",
            "192.0.2.80:80",
            "/",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&web.stdout),
        "hello from sys-net\n",
        "{}",
        text(&web)
    );
    let dns = Command::new("ip")
        .args([
            "netns",
            "exec",
            &sys_net,
            exe,
            "dns-query",
            "10.139.1.2:53",
            "example.com",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&dns.stdout),
        "192.0.2.80\n",
        "{}",
        text(&dns)
    );

    // dom0: the firewall's QubesDB and XenStore.
    let read = Command::new(bin_dir().join("qubesdb-read"))
        .args([
            "-d",
            "sys-firewall",
            "/qubes-ip",
            "/qubes-firewall/10.137.0.20/0000",
        ])
        .env("QUBESDB_SOCKET_DIR", state.join("qubes"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&read.stdout),
        "10.137.0.6\naction=accept proto=tcp dstports=80-80\n",
        "{}",
        text(&read)
    );
    let xs = qubes_box(&[
        "xenstore-read",
        "--socket",
        &state.join("xenstored.sock").display().to_string(),
        "/local/domain/2/backend/vif/4/0/ip",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&xs.stdout),
        "10.137.0.21 fd09:24ef:4179::a89:15\n",
        "{}",
        text(&xs)
    );

    // The firewall's side of the wiring: TAPs bridged to the clients.
    let links = Command::new("ip")
        .args(["-n", &format!("{prefix}sys-firewall"), "-br", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    for name in ["eth0", "vif3.0", "vif4.0", "br0", "br3", "br4"] {
        assert!(
            links.lines().any(|l| l.starts_with(name)),
            "{name} missing in\n{links}"
        );
    }

    // A second `up` on the same state refuses.
    let again = qubes_box(&[
        "up",
        "--state-dir",
        &state_arg,
        "--prefix",
        &prefix,
        "--no-firewall",
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    let resources = std::fs::read_to_string(state.join("resources")).unwrap();
    let down = qubes_box(&["down", "--state-dir", &state_arg]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(namespaces_with(&prefix).is_empty());
    assert!(!state.exists());
    for line in resources.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["pid", pid, program] = words.as_slice() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&cmdline).contains(program),
                "{program} ({pid}) still running"
            );
        }
    }
    // `down` again is harmless.
    assert!(
        qubes_box(&["down", "--state-dir", &state_arg])
            .status
            .success()
    );
}

#[test]
fn failed_up_leaves_nothing_behind() {
    if let Err(reason) = can_run() {
        eprintln!("skipped: {reason}");
        return;
    }
    let prefix = format!("qbf{}-", std::process::id());
    let state = std::env::temp_dir().join(format!("qubes-box-fail-{}", std::process::id()));
    // A bin dir with qubes-box but without qubesdb-daemon: up fails after
    // namespaces, links and processes already exist.
    let bins = std::env::temp_dir().join(format!("qubes-box-bins-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bins);
    std::fs::create_dir_all(&bins).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qubes-box"), bins.join("qubes-box")).unwrap();
    let up = qubes_box(&[
        "up",
        "--state-dir",
        &state.display().to_string(),
        "--prefix",
        &prefix,
        "--bin-dir",
        &bins.display().to_string(),
        "--no-firewall",
    ]);
    assert!(!up.status.success());
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(stderr.contains("qubesdb-daemon"), "{stderr}");
    assert!(stderr.contains("removed"), "{stderr}");
    assert!(namespaces_with(&prefix).is_empty());
    assert!(!state.exists());
    let _ = std::fs::remove_dir_all(&bins);
}
