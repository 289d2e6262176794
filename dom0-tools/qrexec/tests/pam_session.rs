//! A root qrexec-agent runs a call for another user inside a PAM session
//! (`src/exec/pam.rs`). Needs root (a throwaway user and group, a PAM
//! service file in /etc/pam.d) and the crate's `pam` feature:
//! `cargo test -p qrexec --features pam --test pam_session`. Without root
//! the test says so and does nothing.
//!
//! The PAM service (named by `QREXEC_PAM_SERVICE`, so the system's `qrexec`
//! file is never touched) lets root in (`pam_rootok`), sets a variable
//! (`pam_env`) and records every session opened and closed (`pam_exec`).
#![cfg(feature = "pam")]
#![allow(clippy::unwrap_used)] // reason: test code

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DAEMON: &str = env!("CARGO_BIN_EXE_qrexec-daemon");
const CLIENT: &str = env!("CARGO_BIN_EXE_qrexec-client");
const AGENT: &str = env!("CARGO_BIN_EXE_qrexec-agent");

/// A user, a group and PAM service files that exist for one test.
struct Throwaway {
    user: String,
    group: String,
    pam_files: Vec<PathBuf>,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("userdel").arg(&self.user).status();
        let _ = Command::new("groupdel").arg(&self.group).status();
        for f in &self.pam_files {
            let _ = fs::remove_file(f);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?} failed: {status}");
}

#[test]
fn root_agent_runs_a_call_in_a_pam_session() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("pam_session: not root, skipped (needs a throwaway user and /etc/pam.d)");
        return;
    }
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("qrexec-pam-{pid}"));
    let _ = fs::remove_dir_all(&dir);
    for sub in ["vchan", "run", "log", "rpc", "home"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.join("rpc"), fs::Permissions::from_mode(0o755)).unwrap();
    let mut t = Throwaway {
        user: format!("qpam{pid}"),
        group: format!("qpamg{pid}"),
        pam_files: Vec::new(),
        dir: dir.clone(),
        children: Vec::new(),
    };
    run(Command::new("groupadd").arg(&t.group));
    run(Command::new("useradd")
        .args(["-M", "-s", "/bin/sh", "-G", &t.group, "-d"])
        .arg(dir.join("home"))
        .arg(&t.user));
    run(Command::new("chown").arg(&t.user).arg(dir.join("home")));

    let log = dir.join("sessions.log");
    write_mode(
        &dir.join("record.sh"),
        &format!(
            "#!/bin/sh\necho \"$PAM_TYPE $PAM_USER $PAM_SERVICE\" >> {}\n",
            log.display()
        ),
        0o755,
    );
    write_mode(
        &dir.join("pam_env.conf"),
        "QREXEC_PAM_TEST DEFAULT=from-pam\n",
        0o644,
    );
    let service = format!("qrexec-test-{pid}");
    let pam_file = PathBuf::from("/etc/pam.d").join(&service);
    t.pam_files.push(pam_file.clone());
    write_mode(
        &pam_file,
        &format!(
            "auth sufficient pam_rootok.so\nauth requisite pam_deny.so\naccount required pam_permit.so\n\
             session required pam_env.so readenv=0 user_readenv=0 conffile={}\n\
             session required pam_exec.so {}\n",
            dir.join("pam_env.conf").display(),
            dir.join("record.sh").display()
        ),
        0o644,
    );
    let denied = format!("qrexec-test-deny-{pid}");
    let denied_file = PathBuf::from("/etc/pam.d").join(&denied);
    t.pam_files.push(denied_file.clone());
    write_mode(
        &denied_file,
        "auth sufficient pam_rootok.so\nsession required pam_deny.so\n",
        0o644,
    );
    write_mode(
        &dir.join("rpc/test.Who"),
        "#!/bin/sh\necho \"user=$(id -un) groups=$(id -Gn) home=$HOME pwd=$(pwd) pam=$QREXEC_PAM_TEST remote=$QREXEC_REMOTE_DOMAIN\"\n",
        0o755,
    );

    let env = |cmd: &mut Command, domid: u32| {
        cmd.env("VCHAN_SOCKET_DIR", dir.join("vchan"))
            .env("VCHAN_DOMAIN", domid.to_string())
            .env("QREXEC_SERVICE_PATH", dir.join("rpc"))
            .env("QREXEC_POLICY_SOCKET", dir.join("no-policy.sock"))
            .env("QREXEC_LOG_DIR", dir.join("log"))
            .env("QUBESD_SOCKET", dir.join("no-qubesd.sock"))
            .env("QUBESD_INTERNAL_SOCKET", dir.join("no-qubesd.sock"))
            .env("QUBES_RPC_CONFIG_PATH", dir.join("rpc-config"))
            .env("QREXEC_PAM_SERVICE", &service);
    };
    let mut agent = Command::new(AGENT);
    agent
        .arg(format!(
            "--agent-socket={}",
            dir.join("agent.sock").display()
        ))
        .stdin(Stdio::null())
        .stderr(fs::File::create(dir.join("log/agent.stderr")).unwrap());
    env(&mut agent, 7);
    t.children.push(agent.spawn().unwrap());
    let mut daemon = Command::new(DAEMON);
    daemon
        .arg("--direct")
        .arg(format!("--socket-dir={}", dir.join("run").display()))
        .arg("--policy-program=/bin/false")
        .args(["7", "vmP", "root"])
        .stdin(Stdio::null())
        .stderr(fs::File::create(dir.join("log/daemon.stderr")).unwrap());
    env(&mut daemon, 0);
    t.children.push(daemon.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("run/qrexec.7").exists() {
        assert!(Instant::now() < deadline, "agent and daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut client = Command::new(CLIENT);
    client
        .arg(format!("--socket-dir={}", dir.join("run").display()))
        .args(["-d", "vmP"])
        .arg(format!("{}:QUBESRPC test.Who dom0", t.user))
        .stdin(Stdio::null());
    env(&mut client, 0);
    let out = client.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let agent_log = fs::read_to_string(dir.join("log/agent.stderr")).unwrap_or_default();
    assert!(
        out.status.success(),
        "call failed: {:?} {stdout} {}; agent: {agent_log}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.trim();
    assert!(line.contains(&format!("user={} ", t.user)), "{line}");
    assert!(
        line.contains(&format!(" {} ", t.group)) || line.ends_with(&t.group),
        "supplementary group missing: {line}"
    );
    assert!(
        line.contains(&format!("home={} ", dir.join("home").display())),
        "{line}"
    );
    assert!(
        line.contains(&format!("pwd={} ", dir.join("home").display())),
        "{line}"
    );
    assert!(
        line.contains("pam=from-pam "),
        "PAM environment missing: {line}"
    );
    assert!(line.ends_with("remote=dom0"), "{line}");
    let sessions = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        sessions,
        format!(
            "open_session {u} {service}\nclose_session {u} {service}\n",
            u = t.user
        ),
        "the session must be opened and closed once"
    );

    // A PAM service that refuses the session: nothing runs, 125.
    let marker = dir.join("ran");
    let refused = Command::new(AGENT)
        .args(["--qrexec-pam-session", &t.user, "--", "/usr/bin/touch"])
        .arg(&marker)
        .env("QREXEC_PAM_SERVICE", &denied)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(refused.code(), Some(125));
    assert!(!marker.exists(), "the command ran without a session");
}
