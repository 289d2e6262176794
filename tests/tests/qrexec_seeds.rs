//! The seed examples end to end, with the real policy engine: seed 002's
//! `test.Add` (VM→VM with a local client program using `SAVED_FD_1`) under a
//! current-format policy, seed 001's argument-specific `test.File` policy in
//! the Qubes 4.0 format (read through `!compat-4.0`), and the fallback to
//! `qrexec-policy-exec` when the policy daemon is down.
#![allow(clippy::unwrap_used)] // reason: test code

use std::io::Write;
use std::process::{Command, Output, Stdio};

use system_tests::{QrexecBox, write_executable};

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

#[test]
fn seed_002_test_add_prints_3() {
    let mut b = QrexecBox::new("test-add");
    std::fs::write(
        b.policy_dir().join("30-test.policy"),
        "test.Add * vmA vmB allow\ntest.Add * @anyvm @anyvm deny\n",
    )
    .unwrap();
    b.start_qube(5, "vmA");
    b.start_qube(6, "vmB");
    b.start_qube(7, "vmC");
    b.start_policy_daemon();
    b.add_service(
        "vmB",
        "test.Add",
        "#!/bin/sh\nread arg1 arg2\necho $(($arg1+$arg2))\n",
    );
    b.add_service(
        "vmC",
        "test.Add",
        "#!/bin/sh\nread arg1 arg2\necho $(($arg1+$arg2))\n",
    );
    // /usr/bin/our_test_add_client of the seed, in the box instead.
    write_executable(
        &b.dir.join("our_test_add_client"),
        "#!/bin/sh\necho $1 $2\nexec cat >&$SAVED_FD_1\n",
    );
    let client = b.dir.join("our_test_add_client");
    let mut cmd = b.client_vm("vmA");
    cmd.args(["vmB", "test.Add", client.to_str().unwrap(), "1", "2"]);
    let out = run(cmd, b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        b.log("daemon.vmA")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n");

    // Not allowed to vmC, nor from vmC.
    let mut cmd = b.client_vm("vmA");
    cmd.args(["vmC", "test.Add", client.to_str().unwrap(), "1", "2"]);
    let out = run(cmd, b"");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "Request refused\n");
    let mut cmd = b.client_vm("vmC");
    cmd.args(["vmB", "test.Add"]);
    assert_eq!(run(cmd, b"1 1\n").status.code(), Some(126));
}

fn test_file_box(test: &str) -> QrexecBox {
    let mut b = QrexecBox::new(test);
    // Seed 001's policy, in the Qubes 4.0 format it is written in.
    let legacy = b.legacy_policy_dir();
    std::fs::write(
        legacy.join("test.File+testfile1"),
        "source_vm1 target_vm allow\n",
    )
    .unwrap();
    std::fs::write(
        legacy.join("test.File+testfile2"),
        "source_vm2 target_vm allow\n",
    )
    .unwrap();
    std::fs::write(legacy.join("test.File"), "$anyvm $anyvm deny\n").unwrap();
    std::fs::write(b.policy_dir().join("35-compat.policy"), "!compat-4.0\n").unwrap();
    b.start_qube(11, "source_vm1");
    b.start_qube(12, "source_vm2");
    b.start_qube(13, "target_vm");
    let storage = b.dir.join("rpc-file-storage");
    std::fs::create_dir_all(&storage).unwrap();
    std::fs::write(storage.join("testfile1"), "content of testfile1\n").unwrap();
    std::fs::write(storage.join("testfile2"), "content of testfile2\n").unwrap();
    b.add_service(
        "target_vm",
        "test.File",
        &format!(
            "#!/bin/sh\nargument=\"$1\" # service argument, also in QREXEC_SERVICE_ARGUMENT\n\
             [ \"$argument\" = \"$QREXEC_SERVICE_ARGUMENT\" ] || exit 9\n\
             cat {}/\"$argument\"\n",
            storage.display()
        ),
    );
    b
}

fn check_test_file_policy(b: &QrexecBox) {
    let call = |qube: &str, service: &str| {
        let mut cmd = b.client_vm(qube);
        cmd.args(["target_vm", service]);
        run(cmd, b"")
    };
    let out = call("source_vm1", "test.File+testfile1");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        b.log("daemon.source_vm1")
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "content of testfile1\n"
    );
    let out = call("source_vm2", "test.File+testfile2");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "content of testfile2\n"
    );
    for (qube, service) in [
        ("source_vm1", "test.File+testfile2"),
        ("source_vm2", "test.File+testfile1"),
        ("source_vm1", "test.File+testfile3"),
        ("source_vm1", "test.File"),
        ("target_vm", "test.File+testfile1"),
    ] {
        let out = call(qube, service);
        assert_eq!(out.status.code(), Some(126), "{qube} {service}: {out:?}");
        assert!(out.stdout.is_empty(), "{qube} {service} leaked data");
    }
}

#[test]
fn seed_001_test_file_argument_policy_with_policy_daemon() {
    let mut b = test_file_box("test-file-daemon");
    b.start_policy_daemon();
    check_test_file_policy(&b);
}

#[test]
fn seed_001_test_file_falls_back_to_policy_exec() {
    let mut b = test_file_box("test-file-exec");
    b.start_policy_daemon();
    b.stop_policy_daemon();
    check_test_file_policy(&b);
    assert!(
        b.log("daemon.source_vm1")
            .contains("using qrexec-policy-exec"),
        "{}",
        b.log("daemon.source_vm1")
    );
}

#[test]
fn vm_to_dom0_with_real_policy() {
    let mut b = QrexecBox::new("to-dom0");
    std::fs::write(
        b.policy_dir().join("30-test.policy"),
        "test.Ping * vmA @adminvm allow\n",
    )
    .unwrap();
    b.start_qube(5, "vmA");
    b.start_policy_daemon();
    b.add_service(
        "dom0",
        "test.Ping",
        "#!/bin/sh\necho \"pong for $QREXEC_REMOTE_DOMAIN via $QREXEC_REQUESTED_TARGET_TYPE $QREXEC_REQUESTED_TARGET_KEYWORD$QREXEC_REQUESTED_TARGET\"\n",
    );
    for target in ["@adminvm", "dom0"] {
        let mut cmd = b.client_vm("vmA");
        cmd.args([target, "test.Ping"]);
        let out = run(cmd, b"");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{target}: {out:?}\n{}",
            b.log("daemon.vmA")
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.starts_with("pong for vmA via "), "{text}");
    }
}

#[test]
fn protocol_4_source_qube_reaches_the_policy() {
    // qrexec-client-vm --source-qube sends MSG_TRIGGER_SERVICE4; the daemon
    // passes requested_source= to the policy daemon, which only accepts a
    // qube asking for itself.
    let mut b = QrexecBox::new("source-qube");
    std::fs::write(
        b.policy_dir().join("30-test.policy"),
        "test.Add * vmA vmB allow\n",
    )
    .unwrap();
    b.start_qube(5, "vmA");
    b.start_qube(6, "vmB");
    b.start_policy_daemon();
    b.add_service("vmB", "test.Add", "#!/bin/sh\nread a b\necho $(($a+$b))\n");
    let mut cmd = b.client_vm("vmA");
    cmd.args(["--source-qube=vmA", "vmB", "test.Add"]);
    let out = run(cmd, b"2 3\n");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        b.log("policy-daemon")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "5\n");
    let mut cmd = b.client_vm("vmA");
    cmd.args(["--source-qube=vmB", "vmB", "test.Add"]);
    let out = run(cmd, b"2 3\n");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
}
