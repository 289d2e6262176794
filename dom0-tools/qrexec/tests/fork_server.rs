//! qrexec-agent hands calls to the user's qrexec-fork-server when its
//! socket takes them, and runs them itself when it is gone (ours with ours;
//! `tests/interop/forkserver.sh` pairs them with Qubes' C programs).
#![allow(clippy::unwrap_used)] // reason: test code

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DAEMON: &str = env!("CARGO_BIN_EXE_qrexec-daemon");
const CLIENT: &str = env!("CARGO_BIN_EXE_qrexec-client");
const AGENT: &str = env!("CARGO_BIN_EXE_qrexec-agent");
const FORK_SERVER: &str = env!("CARGO_BIN_EXE_qrexec-fork-server");

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn agent_hands_calls_to_the_fork_server() {
    let dir = std::env::temp_dir().join(format!("qrexec-fork-server-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    for sub in ["vchan", "run", "rpc"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let service = dir.join("rpc/test.Where");
    fs::write(&service, "#!/bin/sh\necho \"where=$RUN_BY arg=$1\"\n").unwrap();
    fs::set_permissions(&service, fs::Permissions::from_mode(0o755)).unwrap();
    let env = |cmd: &mut Command, domid: u32| {
        cmd.env("VCHAN_SOCKET_DIR", dir.join("vchan"))
            .env("VCHAN_DOMAIN", domid.to_string())
            .env("QREXEC_SERVICE_PATH", dir.join("rpc"))
            .env("QREXEC_POLICY_SOCKET", dir.join("no-policy.sock"))
            .env("QUBESD_SOCKET", dir.join("no-qubesd.sock"))
            .env("QUBESD_INTERNAL_SOCKET", dir.join("no-qubesd.sock"))
            .env("QUBES_RPC_CONFIG_PATH", dir.join("rpc-config"))
            .stdin(Stdio::null());
    };
    let mut children = Kill(Vec::new());
    let mut agent = Command::new(AGENT);
    agent
        .arg(format!(
            "--agent-socket={}",
            dir.join("agent.sock").display()
        ))
        .arg(format!(
            "--fork-server-socket={}",
            dir.join("fs.%s.sock").display()
        ))
        .env("RUN_BY", "agent");
    env(&mut agent, 8);
    children.0.push(agent.spawn().unwrap());
    let mut daemon = Command::new(DAEMON);
    daemon
        .arg("--direct")
        .arg(format!("--socket-dir={}", dir.join("run").display()))
        .arg("--policy-program=/bin/false")
        .args(["8", "vmF", "someone"]);
    env(&mut daemon, 0);
    children.0.push(daemon.spawn().unwrap());
    wait_for(&dir.join("run/qrexec.8"), "agent and daemon");

    let call = |user: &str| {
        let mut client = Command::new(CLIENT);
        client
            .arg(format!("--socket-dir={}", dir.join("run").display()))
            .args(["-d", "vmF"])
            .arg(format!("{user}:QUBESRPC test.Where+x dom0"));
        env(&mut client, 0);
        let out = client.output().unwrap();
        assert!(out.status.success(), "call failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // A user the agent can run calls as itself too (as root: root).
    let user = if rustix::process::geteuid().is_root() {
        "root"
    } else {
        "someone"
    };
    // The user's fork server, as the user would run it in their session.
    let mut fork_server = Command::new(FORK_SERVER);
    fork_server
        .arg(dir.join(format!("fs.{user}.sock")))
        .env("RUN_BY", "fork-server");
    env(&mut fork_server, 8);
    children.0.push(fork_server.spawn().unwrap());
    wait_for(&dir.join(format!("fs.{user}.sock")), "fork server");

    assert_eq!(call(user), "where=fork-server arg=x");
    assert_eq!(call(user), "where=fork-server arg=x", "a second call");
    // Another user has no fork server: the agent runs the call.
    if !rustix::process::geteuid().is_root() {
        assert_eq!(call("other"), "where=agent arg=x");
    }
    // The fork server gone (its socket refuses): the agent runs the call.
    let mut fs_child = children.0.pop().unwrap();
    fs_child.kill().unwrap();
    fs_child.wait().unwrap();
    assert_eq!(call(user), "where=agent arg=x");
    let _ = fs::remove_dir_all(&dir);
}
