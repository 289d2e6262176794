//! The policy admin API and the GUI qube's policy agent in the qrexec box
//! (dom0 and qubes as processes, the real qrexec programs and policy
//! daemon):
//!
//! * an admin qube reads a policy file with `policy.Get` and replaces it
//!   with `policy.Replace` over qrexec (dom0 runs `qubes-policy-admin` as
//!   the service): a broken policy is refused — the caller gets exit status
//!   1, dom0 logs `PolicyAdminSyntaxException Policy change validation
//!   failed: FILE:LINE: REASON`, the file and the decisions stay as they were
//!   — a good one is accepted and the next call after the policy daemon's
//!   reload is decided by it; a stale token is refused;
//! * `ask` from a qube whose GUI qube is `sys-gui` goes to `policy.Ask` in
//!   sys-gui over qrexec (a script standing in for qrexec-policy-agent,
//!   speaking its JSON), `notify=yes` sends `policy.Notify` there, and a
//!   qube without a GUI qube is still asked through the confirmation
//!   program.
#![allow(clippy::unwrap_used)] // reason: test code

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use system_tests::{QrexecBox, binary, write_executable};

fn run(mut cmd: Command, input: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// `qrexec-client-vm TARGET SERVICE` from `qube` with `input`.
fn call(b: &QrexecBox, qube: &str, target: &str, service: &str, input: &[u8]) -> Output {
    let mut cmd = b.client_vm(qube);
    cmd.args([target, service]);
    run(cmd, input)
}

/// Install `qubes-policy-admin` as dom0's `policy.*` services, managing the
/// box's policy directory (a wrapper sets what qrexec's clean environment
/// does not carry).
fn install_policy_admin(b: &QrexecBox) -> PathBuf {
    let log = b.dir.join("log").join("policy-admin.log");
    for service in [
        "policy.List",
        "policy.Get",
        "policy.Replace",
        "policy.Remove",
    ] {
        b.add_service(
            "dom0",
            service,
            &format!(
                "#!/bin/sh\nQREXEC_POLICY_DIR='{}' QREXEC_LEGACY_POLICY_PATH='{}' QREXEC_POLICY_ADMIN_LOG='{}' exec '{}' \"$@\"\n",
                b.policy_dir().display(),
                b.legacy_policy_dir().display(),
                log.display(),
                binary("qubes-policy-admin").display()
            ),
        );
    }
    log
}

/// Wait (generously: this is not a speed test; the 120 s bound only
/// catches a hang on a loaded machine) until `check` holds.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !check() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reloads(b: &QrexecBox) -> usize {
    b.log("policy-daemon").matches("loaded policy:").count()
}

#[test]
fn policy_replace_over_qrexec_from_an_admin_qube() {
    let mut b = QrexecBox::new("policy-admin");
    fs::write(
        b.policy_dir().join("20-admin.policy"),
        "policy.Get * admin @adminvm allow\npolicy.Replace * admin @adminvm allow\npolicy.List * admin @adminvm allow\n",
    )
    .unwrap();
    let demo = b.policy_dir().join("50-demo.policy");
    let denied = "test.Hello * work @adminvm deny\n";
    fs::write(&demo, denied).unwrap();
    b.start_qube(5, "admin");
    b.start_qube(6, "work");
    b.start_policy_daemon();
    b.add_service("dom0", "test.Hello", "#!/bin/sh\necho hello from dom0\n");
    let admin_log = install_policy_admin(&b);

    // Before: work may not call test.Hello.
    let out = call(&b, "work", "@adminvm", "test.Hello", b"");
    assert_eq!(out.status.code(), Some(126), "{out:?}");

    // The admin qube lists and reads the policy over qrexec.
    let out = call(&b, "admin", "@adminvm", "policy.List", b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        b.log("daemon.admin")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "20-admin\n50-demo\n");
    let out = call(&b, "admin", "@adminvm", "policy.Get+50-demo", b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let got = String::from_utf8(out.stdout).unwrap();
    let (token, content) = got.split_once('\n').unwrap();
    assert_eq!(content, denied);
    assert!(
        token.starts_with("sha256:") && token.len() == 7 + 64,
        "{token}"
    );

    // A broken policy is refused and never goes live.
    let broken = format!("{token}\ntest.Hello * work @adminvm allow\ntest.Hello * work\n");
    let out = call(
        &b,
        "admin",
        "@adminvm",
        "policy.Replace+50-demo",
        broken.as_bytes(),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(fs::read_to_string(&demo).unwrap(), denied);
    let canonical_demo = fs::canonicalize(&demo).unwrap();
    let reason = format!(
        "Policy change validation failed: {}:2: wrong number of fields",
        canonical_demo.display()
    );
    let service_log = b.log("daemon.admin");
    assert!(
        service_log.contains(&format!("PolicyAdminSyntaxException {reason}")),
        "dom0's qrexec log lacks the refusal:\n{service_log}"
    );
    let admin_log_text = fs::read_to_string(&admin_log).unwrap();
    assert!(
        admin_log_text.contains(&format!("policy.Replace+50-demo (admin): error: {reason}")),
        "{admin_log_text}"
    );
    let out = call(&b, "work", "@adminvm", "test.Hello", b"");
    assert_eq!(out.status.code(), Some(126), "still denied: {out:?}");

    // A good one is accepted and decides the next call.
    let loaded_before = reloads(&b);
    let good = format!("{token}\ntest.Hello * work @adminvm allow\n");
    let out = call(
        &b,
        "admin",
        "@adminvm",
        "policy.Replace+50-demo",
        good.as_bytes(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        b.log("daemon.admin")
    );
    assert_eq!(
        fs::read_to_string(&demo).unwrap(),
        "test.Hello * work @adminvm allow\n"
    );
    wait_until("the policy daemon to load the new policy", || {
        reloads(&b) > loaded_before
    });
    let out = call(&b, "work", "@adminvm", "test.Hello", b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        b.log("daemon.work")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from dom0\n");

    // The old token is stale now.
    let out = call(
        &b,
        "admin",
        "@adminvm",
        "policy.Replace+50-demo",
        broken.as_bytes(),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        b.log("daemon.admin")
            .contains("PolicyAdminTokenException Token mismatch")
    );

    // work may not use the admin API at all.
    let out = call(&b, "work", "@adminvm", "policy.Replace+50-demo", b"any\n");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert_eq!(
        fs::read_to_string(&demo).unwrap(),
        "test.Hello * work @adminvm allow\n"
    );
}

/// A policy daemon configured to reach the GUI qube through the box's
/// qrexec-client, killed on drop.
struct AgentDaemon(Child);

impl Drop for AgentDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent_daemon(b: &QrexecBox, ask_program: &Path) -> AgentDaemon {
    let socket = b.dir.join("policy.sock");
    let child = Command::new(binary("qrexec-policy-daemon"))
        .arg("--socket-path")
        .arg(&socket)
        .arg("--policy-path")
        .arg(b.policy_dir())
        .arg("--legacy-policy-path")
        .arg(b.legacy_policy_dir())
        .arg("--system-info")
        .arg(b.dir.join("qubes.json"))
        .arg("--eval-socket-path")
        .arg(b.dir.join("policy.EvalSimple"))
        .arg("--gui-socket-path")
        .arg(b.dir.join("policy.EvalGUI"))
        .arg("--ask-program")
        .arg(ask_program)
        .arg("--ask-timeout")
        .arg("30")
        .arg("--qrexec-client")
        .arg(binary("qrexec-client"))
        .arg("--qrexec-socket-dir")
        .arg(b.dir.join("run"))
        .env("VCHAN_SOCKET_DIR", b.dir.join("vchan"))
        .env("QREXEC_SERVICE_PATH", b.rpc_dir("dom0"))
        .stdin(Stdio::null())
        .stderr(fs::File::create(b.dir.join("log").join("policy-daemon.stderr")).unwrap())
        .spawn()
        .unwrap();
    let daemon = AgentDaemon(child);
    wait_until("qrexec-policy-daemon's socket", || socket.exists());
    daemon
}

#[test]
fn ask_and_notify_go_to_the_gui_qube_policy_agent() {
    let mut b = QrexecBox::new("policy-agent");
    fs::write(
        b.policy_dir().join("30-test.policy"),
        "test.Hello * work @anyvm ask default_target=vault\n\
         test.Hello * vault @anyvm ask\n\
         test.Note * work vault allow notify=yes\n",
    )
    .unwrap();
    b.start_qube(5, "work");
    b.start_qube(6, "vault");
    b.start_qube(7, "sys-gui");
    for (qube, service) in [
        ("vault", "test.Hello"),
        ("work", "test.Hello"),
        ("vault", "test.Note"),
    ] {
        b.add_service(
            qube,
            service,
            &format!("#!/bin/sh\necho {service} in {qube}\n"),
        );
    }
    // sys-gui's qrexec-policy-agent, as a script speaking its protocol.
    let record = b.dir.join("agent");
    fs::create_dir_all(&record).unwrap();
    fs::write(record.join("answer"), "allow:vault").unwrap();
    for service in ["policy.Ask", "policy.Notify"] {
        b.add_service(
            "sys-gui",
            service,
            &format!(
                "#!/bin/sh\necho \"$QREXEC_REMOTE_DOMAIN\" > '{dir}/{service}.from'\ncat > '{dir}/{service}.json'\n[ {service} = policy.Ask ] && cat '{dir}/answer'\nexit 0\n",
                dir = record.display()
            ),
        );
    }
    // The ask program (for qubes without a GUI qube) logs and allows work.
    let ask_program = b.dir.join("ask-program");
    write_executable(
        &ask_program,
        &format!(
            "#!/bin/sh\necho \"$@\" > '{}/program.args'\necho allow:work\n",
            record.display()
        ),
    );
    // work's GUI qube is sys-gui; vault has none.
    fs::write(
        b.dir.join("qubes.json"),
        r#"{"domains": {
  "dom0": {"type": "AdminVM", "power_state": "Running", "icon": "adminvm-black"},
  "work": {"type": "AppVM", "power_state": "Running", "guivm": "sys-gui", "icon": "appvm-blue"},
  "vault": {"type": "AppVM", "power_state": "Running", "guivm": null, "icon": "appvm-black"},
  "sys-gui": {"type": "AppVM", "power_state": "Running", "icon": "servicevm-red"}
}}"#,
    )
    .unwrap();
    let _daemon = start_agent_daemon(&b, &ask_program);

    // ask: sys-gui's agent is asked over qrexec and allows vault.
    let out = call(&b, "work", "vault", "test.Hello", b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        b.log("policy-daemon")
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "test.Hello in vault\n"
    );
    assert_eq!(
        fs::read_to_string(record.join("policy.Ask.from")).unwrap(),
        "dom0\n"
    );
    assert_eq!(
        fs::read_to_string(record.join("policy.Ask.json")).unwrap(),
        r#"{"source": "work", "service": "test.Hello", "argument": "+", "targets": ["sys-gui", "vault"], "default_target": "vault", "icons": {"dom0": "adminvm-black", "sys-gui": "servicevm-red", "vault": "appvm-black", "work": "appvm-blue"}}"#
    );
    // The agent refuses: the call is refused.
    fs::write(record.join("answer"), "deny").unwrap();
    let out = call(&b, "work", "vault", "test.Hello", b"");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    // An answer naming a target that was not offered is a deny.
    fs::write(record.join("answer"), "allow:dom0").unwrap();
    let out = call(&b, "work", "vault", "test.Hello", b"");
    assert_eq!(out.status.code(), Some(126), "{out:?}");

    // notify=yes: sys-gui is told about the allowed call.
    let out = call(&b, "work", "vault", "test.Note", b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        fs::read_to_string(record.join("policy.Notify.json")).unwrap(),
        r#"{"resolution": "allow", "service": "test.Note", "argument": "+", "source": "work", "target": "vault"}"#
    );
    // A denial with no rule notifies too (deny's default notify=yes).
    let out = call(&b, "work", "sys-gui", "test.Nothing", b"");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert_eq!(
        fs::read_to_string(record.join("policy.Notify.json")).unwrap(),
        r#"{"resolution": "deny", "service": "test.Nothing", "argument": "+", "source": "work", "target": "sys-gui"}"#
    );

    // vault has no GUI qube: the confirmation program answers.
    let out = call(&b, "vault", "work", "test.Hello", b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        b.log("policy-daemon")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "test.Hello in work\n");
    assert_eq!(
        fs::read_to_string(record.join("program.args")).unwrap(),
        "vault test.Hello +  sys-gui work\n" // empty DEFAULT_TARGET
    );
}
