//! End-to-end tests of the four qrexec programs: dom0 and two or three
//! "qubes" as processes in a temp dir (see `common`), exercising every kind
//! of call, the failure modes, hostile peers, a 1 GiB transfer and 100
//! concurrent calls.
#![allow(clippy::unwrap_used)] // reason: test code

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{Qubes, default_user};

fn run_with_input(mut cmd: std::process::Command, input: &[u8]) -> Output {
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

fn two_vms(test: &str, rules: &str) -> Qubes {
    let mut q = Qubes::new(test, rules);
    q.start_vm(5, "vmA");
    q.start_vm(6, "vmB");
    q
}

#[test]
fn dom0_to_vm_exec_streams_stdio_and_exit_code() {
    let q = two_vms("exec", "");
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "DEFAULT:cat; echo to-stderr >&2; exit 3"]);
    let out = run_with_input(cmd, b"hello from dom0\n");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(out.stdout, b"hello from dom0\n");
    assert_eq!(out.stderr, b"to-stderr\n");

    // -E: exit 0 whatever the remote code; explicit user.
    let mut cmd = q.client();
    cmd.args(["-E", "-d", "vmA", &format!("{}:exit 7", default_user())]);
    assert_eq!(run_with_input(cmd, b"").status.code(), Some(0));

    // -t replaces unprintable bytes on stdout.
    let mut cmd = q.client();
    cmd.args(["-t", "-d", "vmA", "DEFAULT:printf 'a\\033b\\n'"]);
    assert_eq!(run_with_input(cmd, b"").stdout, b"a_b\n");
}

#[test]
fn root_agent_runs_commands_as_the_requested_user() {
    if default_user() != "root" {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let q = two_vms("user", "");
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "nobody:id -un; echo $HOME $USER"]);
    let out = run_with_input(cmd, b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("nobody\n"), "{text}");
    assert!(text.ends_with(" nobody\n"), "{text}");
    // An unknown user: the command does not run.
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "no-such-user-here:echo ran"]);
    let out = run_with_input(cmd, b"");
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn just_exec_starts_command_and_reports_zero() {
    let q = two_vms("justexec", "");
    let marker = q.dir.join("marker");
    let mut cmd = q.client();
    cmd.args([
        "-e",
        "-d",
        "vmA",
        &format!("DEFAULT:echo started > {}", marker.display()),
    ]);
    let out = run_with_input(cmd, b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "command did not run");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn missing_service_is_127_and_refused_call_is_126() {
    let q = two_vms(
        "codes",
        "\"vmA vmB test.Allowed\"*) allow root vmB vmB;;\n\"vmA vmZ test.Allowed\"*) allow root vmZ vmZ;;",
    );
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "DEFAULT:QUBESRPC test.Missing dom0"]);
    assert_eq!(run_with_input(cmd, b"").status.code(), Some(127));

    let mut cmd = q.client_vm("vmA");
    cmd.args(["vmB", "test.Denied"]);
    let out = run_with_input(cmd, b"");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "Request refused\n");
    assert!(q.policy_calls().contains("vmA vmB test.Denied"));

    // Allowed by policy but not installed in the target: 127.
    let mut cmd = q.client_vm("vmA");
    cmd.args(["vmB", "test.Allowed"]);
    assert_eq!(run_with_input(cmd, b"").status.code(), Some(127));

    // Allowed by policy but the target qube is not running: refused.
    let mut cmd = q.client_vm("vmA");
    cmd.args(["vmZ", "test.Allowed"]);
    let out = run_with_input(cmd, b"");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
}

#[test]
fn vm_to_dom0_service_gets_qubes_environment() {
    let q = two_vms(
        "todom0",
        "\"vmA @adminvm test.Env\"*) printf 'user=x\\nresult=allow\\ntarget=dom0\\nautostart=False\\nrequested_target=@adminvm\\n'; exit 0;;",
    );
    q.add_service(
        "dom0",
        "test.Env",
        "#!/bin/sh\necho dom0-service-stderr >&2\nread line\necho \"got=$line arg=$1 remote=$QREXEC_REMOTE_DOMAIN full=$QREXEC_SERVICE_FULL_NAME \
         sarg=$QREXEC_SERVICE_ARGUMENT type=$QREXEC_REQUESTED_TARGET_TYPE kw=$QREXEC_REQUESTED_TARGET_KEYWORD \
         leak=${QREXEC_LEAK-none}\"\n",
    );
    let mut cmd = q.client_vm("vmA");
    cmd.args(["@adminvm", "test.Env+xyz"])
        .env("QREXEC_LEAK", "bad");
    let out = run_with_input(cmd, b"ping\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got=ping arg=xyz remote=vmA full=test.Env+xyz sarg=xyz type=keyword kw=adminvm leak=none\n"
    );
    // The dom0 service's stderr goes to the per-qube log, not to the qube.
    assert!(out.stderr.is_empty(), "{out:?}");
    assert!(q.log("daemon", "vmA").contains("dom0-service-stderr"));
}

#[test]
fn vm_to_vm_seed_test_add_prints_3() {
    // Seed 002: test.Add with a local client program that uses SAVED_FD_1.
    let q = two_vms(
        "testadd",
        "\"vmA vmB test.Add\"|\"vmA vmB test.Warn\") allow root vmB vmB;;",
    );
    q.add_service(
        "vmB",
        "test.Add",
        "#!/bin/sh\nread arg1 arg2\necho $(($arg1+$arg2))\n",
    );
    common::write_executable(
        &q.dir.join("our_test_add_client"),
        "#!/bin/sh\necho $1 $2\nexec cat >&$SAVED_FD_1\n",
    );
    let mut cmd = q.client_vm("vmA");
    cmd.args([
        "vmB",
        "test.Add",
        q.dir.join("our_test_add_client").to_str().unwrap(),
        "1",
        "2",
    ]);
    let out = run_with_input(cmd, b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"3\n");
    // The target saw the call from vmA with the '+' Qubes appends.
    assert!(q.policy_calls().contains("vmA vmB test.Add"));

    // A service's stderr reaches the caller and the target's log.
    q.add_service("vmB", "test.Warn", "#!/bin/sh\necho careful >&2\n");
    let mut cmd = q.client_vm("vmA");
    cmd.args(["vmB", "test.Warn"]);
    let out = run_with_input(cmd, b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stderr, b"careful\n");
    assert!(
        q.log("agent", "vmB").contains("test.Warn+-vmA: careful"),
        "{}",
        q.log("agent", "vmB")
    );
}

#[test]
fn seed_test_file_argument_specific_policy() {
    // Seed 001: test.File+testfile1 allowed from source_vm1 only; other
    // arguments and other sources denied.
    let mut q = Qubes::new(
        "testfile",
        "\"source_vm1 target_vm test.File+testfile1\") allow root target_vm target_vm;;\n\
         \"source_vm2 target_vm test.File+testfile2\") allow root target_vm target_vm;;",
    );
    q.start_vm(11, "source_vm1");
    q.start_vm(12, "source_vm2");
    q.start_vm(13, "target_vm");
    let storage = q.dir.join("rpc-file-storage");
    std::fs::create_dir_all(&storage).unwrap();
    std::fs::write(storage.join("testfile1"), "content of testfile1\n").unwrap();
    std::fs::write(storage.join("testfile2"), "content of testfile2\n").unwrap();
    q.add_service(
        "target_vm",
        "test.File",
        &format!(
            "#!/bin/sh\nargument=\"$1\"\n[ \"$argument\" = \"$QREXEC_SERVICE_ARGUMENT\" ] || exit 9\ncat {}/\"$argument\"\n",
            storage.display()
        ),
    );
    let call = |vm: &str, service: &str| {
        let mut cmd = q.client_vm(vm);
        cmd.args(["target_vm", service]);
        run_with_input(cmd, b"")
    };
    let out = call("source_vm1", "test.File+testfile1");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"content of testfile1\n");
    let out = call("source_vm2", "test.File+testfile2");
    assert_eq!(out.stdout, b"content of testfile2\n");
    for (vm, service) in [
        ("source_vm1", "test.File+testfile2"),
        ("source_vm2", "test.File+testfile1"),
        ("source_vm1", "test.File"),
    ] {
        let out = call(vm, service);
        assert_eq!(out.status.code(), Some(126), "{vm} {service}: {out:?}");
        assert!(out.stdout.is_empty());
    }
}

/// 1 MiB pseudo-random block; block `i` carries `i` in its first 8 bytes so
/// lost, duplicated or reordered data is detected.
fn block(base: &[u8], i: u64) -> Vec<u8> {
    let mut b = base.to_vec();
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

fn base_block() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn one_gib_round_trip_is_byte_exact() {
    const BLOCKS: u64 = 1024; // 1 GiB
    let q = two_vms("bulk", "");
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "DEFAULT:cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let base = base_block();
    let writer_base = base.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..BLOCKS {
            stdin.write_all(&block(&writer_base, i)).unwrap();
        }
    });
    let mut got = vec![0u8; 1 << 20];
    for i in 0..BLOCKS {
        stdout.read_exact(&mut got).unwrap();
        assert!(got == block(&base, i), "block {i} differs");
    }
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} extra bytes", rest.len());
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    eprintln!(
        "1 GiB dom0->vmA->dom0 in {:.2?} ({:.0} MB/s each way)",
        start.elapsed(),
        1024.0 * 1.048_576 / start.elapsed().as_secs_f64()
    );
}

#[test]
fn peer_disconnecting_mid_stream_ends_call_without_hanging() {
    let mut q = two_vms("disconnect", "\"vmA vmB test.Add\") allow root vmB vmB;;");
    q.add_service("vmB", "test.Add", "#!/bin/sh\nread a b\necho $(($a+$b))\n");
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "DEFAULT:while :; do echo data; done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 4096];
    stdout.read_exact(&mut buf).unwrap();
    q.kill_agent("vmA");
    let deadline = Instant::now() + Duration::from_secs(20);
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink);
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "qrexec-client hangs after the peer vanished"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    drain.join().unwrap();
    assert!(!status.success(), "{status:?}");
    // vmA's daemon waits for a new agent (as Qubes' does) and serves it.
    assert!(
        !q.daemon_exited("vmA"),
        "daemon must survive an agent restart"
    );
    q.restart_agent("vmA");
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "DEFAULT:echo back"]);
    assert_eq!(run_with_input(cmd, b"").stdout, b"back\n");
    // The other qube is unaffected.
    let mut cmd = q.client();
    cmd.args(["-d", "vmB", "DEFAULT:echo still fine"]);
    assert_eq!(run_with_input(cmd, b"").stdout, b"still fine\n");
}

fn daemon_hello(stream: &mut UnixStream) {
    let mut hello = [0u8; 12];
    stream.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], &[0x00, 0x03, 0, 0, 4, 0, 0, 0]);
    assert_eq!(u32::from_ne_bytes(hello[8..].try_into().unwrap()), 3);
}

#[test]
fn garbage_from_clients_is_cut_off_alone() {
    let q = two_vms("garbage", "\"vmA vmB test.Add\") allow root vmB vmB;;");
    q.add_service("vmB", "test.Add", "#!/bin/sh\nread a b\necho $(($a+$b))\n");
    let sock = q.dir.join("run").join("qrexec.vmA");
    let evil: Vec<Vec<u8>> = vec![
        b"this is not a qrexec message at all".to_vec(),
        // HELLO, then a command header claiming 1 GiB.
        [
            &[0x00, 0x03, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0][..],
            &[0x00, 0x02, 0, 0, 0, 0, 0, 0x40][..],
        ]
        .concat(),
        // HELLO, then EXEC_CMDLINE whose command is not NUL-terminated.
        [
            &[0x00, 0x03, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0][..],
            &[
                0x00, 0x02, 0, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'a', b':', b'b',
            ][..],
        ]
        .concat(),
        // HELLO, then SERVICE_CONNECT for an ident nobody asked for.
        [
            &[0x00, 0x03, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0][..],
            &[0x02, 0x02, 0, 0, 40, 0, 0, 0, 6, 0, 0, 0, 1, 2, 0, 0][..],
            b"SOCKET99\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        ]
        .concat(),
    ];
    for bytes in evil {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        daemon_hello(&mut s);
        let _ = s.write_all(&bytes);
        let mut rest = Vec::new();
        // The daemon closes the connection (EOF), without answering.
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "daemon answered garbage: {rest:?}");
    }
    // Garbage on the agent socket too.
    let mut s = UnixStream::connect(q.agent_socket("vmA")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&[0xff; 64]);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    // Everything still works.
    let mut cmd = q.client_vm("vmA");
    cmd.args(["vmB", "test.Add"]);
    let out = run_with_input(cmd, b"40 2\n");
    assert_eq!(out.stdout, b"42\n", "{out:?}");
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "DEFAULT:echo ok"]);
    assert_eq!(run_with_input(cmd, b"").stdout, b"ok\n");
}

#[test]
fn hundred_concurrent_calls() {
    let q = two_vms("concurrent", "\"vmA vmB test.Echo\"*) allow root vmB vmB;;");
    q.add_service("vmB", "test.Echo", "#!/bin/sh\necho \"$1:$(cat)\"\n");
    let mut children = Vec::new();
    for i in 0..100 {
        let mut cmd = if i % 2 == 0 {
            let mut c = q.client();
            c.args(["-d", "vmA", &format!("DEFAULT:echo \"{i}:$(cat)\"")]);
            c
        } else {
            let mut c = q.client_vm("vmA");
            c.args(["vmB", &format!("test.Echo+{i}")]);
            c
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("payload{i}").as_bytes())
            .unwrap();
        children.push((i, child));
    }
    for (i, child) in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "call {i}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{i}:payload{i}\n"),
            "call {i}"
        );
    }
}

#[test]
fn use_stdin_socket_carries_both_directions() {
    let q = two_vms("stdin-socket", "");
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = q.client();
    cmd.args([
        "--use-stdin-socket",
        "-d",
        "vmA",
        "DEFAULT:read x; echo \"<$x>\"",
    ])
    .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
    .stdout(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // our copy of the socket end, or EOF never comes
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    ours.write_all(b"over-socket\n").unwrap();
    ours.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    ours.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "<over-socket>\n");
    assert!(child.wait().unwrap().success());
}

#[test]
fn daemon_flags_and_usage() {
    let out = std::process::Command::new(common::DAEMON).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: "));
    let out = std::process::Command::new(common::CLIENT)
        .args(["-d", "x", "-e", "-l", "prog", "cmd"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only one of -e, -l, -c"));
    // `-d dom0` without `-c` runs the command here (as Qubes does), but not
    // with -e or -l.
    let out = std::process::Command::new(common::CLIENT)
        .args(["-d", "dom0", "-e", "user:cmd"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used without -c"));
    let out = std::process::Command::new(common::CLIENT)
        .args(["-d", "dom0", "DEFAULT:exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let out = std::process::Command::new(common::CLIENT_VM)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(common::CLIENT)
        .args(["--use-stdin-socket", "-d", "vm", "cmd"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin not a socket"));
}

#[test]
fn a_service_signalling_qrexec_agent_pid_switches_to_its_stdin_socket() {
    let q = two_vms("agentpid", "");
    // Qubes' services may send SIGUSR1 to $QREXEC_AGENT_PID to say "read my
    // output from my stdin socket from now on"; the signal must reach a
    // process of this call only, never the agent itself.
    let mut cmd = q.client();
    cmd.args([
        "-d",
        "vmA",
        "DEFAULT:test -n \"$QREXEC_AGENT_PID\" || exit 9; echo before; \
         kill -USR1 \"$QREXEC_AGENT_PID\"; echo signalled >&0; read x; echo \"got $x\" >&0",
    ]);
    let out = run_with_input(cmd, b"input\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "before\nsignalled\ngot input\n"
    );
    // The agent still serves calls, and without the signal stdout is used.
    let mut cmd = q.client();
    cmd.args(["-d", "vmA", "DEFAULT:echo still here; echo not here >&0"]);
    let out = run_with_input(cmd, b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still here\n");
}
