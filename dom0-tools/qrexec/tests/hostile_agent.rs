//! qrexec-daemon facing a hostile qube: the test plays the qube's agent on
//! the vchan and sends malformed triggers. Bad request idents and service
//! names are refused with `MSG_SERVICE_REFUSED` echoing the ident exactly as
//! received (as Qubes does); a message the negotiated protocol does not
//! allow ends the daemon (exit 1, sockets removed) without affecting any
//! other qube. Also: daemonising, the start-up timeout and `qrexec-client -l`.
#![allow(clippy::unwrap_used)] // reason: test code

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{DAEMON, Qubes};

const HEADER: usize = 8;

fn header(msg_type: u32, len: usize) -> Vec<u8> {
    [msg_type.to_ne_bytes(), (len as u32).to_ne_bytes()].concat()
}

fn fixed(text: &[u8], len: usize) -> Vec<u8> {
    let mut field = text.to_vec();
    field.resize(len, 0);
    field
}

fn trigger3(target: &[u8], ident: &[u8; 32], service: &[u8]) -> Vec<u8> {
    let body = [&fixed(target, 64)[..], &ident[..], service].concat();
    [header(0x212, body.len()), body].concat()
}

fn ident(text: &[u8]) -> [u8; 32] {
    let mut raw = [0u8; 32];
    raw[..text.len()].copy_from_slice(text);
    raw
}

fn read_msg(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut head = [0u8; HEADER];
    s.read_exact(&mut head).unwrap();
    let msg_type = u32::from_ne_bytes(head[..4].try_into().unwrap());
    let len = u32::from_ne_bytes(head[4..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (msg_type, body)
}

struct FakeQube {
    agent: UnixStream,
    daemon: Child,
}

fn fake_qube(q: &Qubes, domid: u32, name: &str, version: u32) -> FakeQube {
    let listener = UnixListener::bind(
        q.dir
            .join("vchan")
            .join(format!("vchan.{domid}.0.512.sock")),
    )
    .unwrap();
    let daemon = Command::new(DAEMON)
        .arg("--direct")
        .arg(format!("--socket-dir={}", q.dir.join("run").display()))
        .arg(format!(
            "--policy-program={}",
            q.dir.join("policy").display()
        ))
        .args([&domid.to_string(), name, "user"])
        .env("VCHAN_SOCKET_DIR", q.dir.join("vchan"))
        .env("VCHAN_DOMAIN", "0")
        .env("QREXEC_POLICY_SOCKET", q.dir.join("policy.sock"))
        .stdin(Stdio::null())
        .stderr(
            std::fs::File::create(q.dir.join("log").join(format!("daemon.{name}.stderr"))).unwrap(),
        )
        .spawn()
        .unwrap();
    let (mut agent, _) = listener.accept().unwrap();
    agent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The agent speaks first, with the protocol version under test.
    agent
        .write_all(&[header(0x300, 4), version.to_ne_bytes().to_vec()].concat())
        .unwrap();
    let (t, body) = read_msg(&mut agent);
    assert_eq!(t, 0x300);
    // As Qubes' daemon: the answer is the negotiated (lower) version.
    assert_eq!(body, version.min(4).to_ne_bytes());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !q.dir.join("run").join(format!("qrexec.{domid}")).exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    FakeQube { agent, daemon }
}

fn expect_refused(agent: &mut UnixStream, raw_ident: &[u8; 32]) {
    let (t, body) = read_msg(agent);
    assert_eq!(t, 0x203, "expected MSG_SERVICE_REFUSED");
    assert_eq!(body, raw_ident, "refusal must echo the ident as received");
}

#[test]
fn malformed_triggers_are_refused_and_protocol_violations_end_the_daemon() {
    let mut q = Qubes::new("hostile", "\"evil vmB test.Add\"*) allow root vmB vmB;;");
    q.start_vm(6, "vmB");
    let mut evil = fake_qube(&q, 9, "evil", 3);

    // Service name without its NUL terminator.
    let id = ident(b"SOCKET7");
    evil.agent
        .write_all(&trigger3(b"vmB", &id, b"test.Add"))
        .unwrap();
    expect_refused(&mut evil.agent, &id);

    // Service name with a NUL inside.
    let id = ident(b"SOCKET8");
    evil.agent
        .write_all(&trigger3(b"vmB", &id, b"test\0Add\0"))
        .unwrap();
    expect_refused(&mut evil.agent, &id);

    // Request ident with a forbidden byte, and with garbage after its NUL.
    let id = ident(b"bad/ident");
    evil.agent
        .write_all(&trigger3(b"vmB", &id, b"test.Add\0"))
        .unwrap();
    expect_refused(&mut evil.agent, &id);
    let mut id = ident(b"SOCKET9");
    id[20] = b'x';
    evil.agent
        .write_all(&trigger3(b"vmB", &id, b"test.Add\0"))
        .unwrap();
    expect_refused(&mut evil.agent, &id);

    // Service name starting with '+', and an empty one.
    let id = ident(b"SOCKET10");
    evil.agent
        .write_all(&trigger3(b"vmB", &id, b"+x\0"))
        .unwrap();
    expect_refused(&mut evil.agent, &id);
    evil.agent.write_all(&trigger3(b"vmB", &id, b"\0")).unwrap();
    expect_refused(&mut evil.agent, &id);

    // A well-formed request the policy denies (target name sanitised first).
    let id = ident(b"SOCKET11");
    evil.agent
        .write_all(&trigger3(b"vm;B", &id, b"test.Add\0"))
        .unwrap();
    expect_refused(&mut evil.agent, &id);
    assert!(
        q.policy_calls().contains("evil vm_B test.Add"),
        "{}",
        q.policy_calls()
    );

    // The v2 trigger is not allowed in protocol 3: the daemon gives up on
    // this qube, removes its sockets and exits 1.
    let body = [
        fixed(b"test.Add", 64),
        fixed(b"vmB", 32),
        ident(b"SOCKET12").to_vec(),
    ]
    .concat();
    evil.agent
        .write_all(&[header(0x210, body.len()), body].concat())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = evil.daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "daemon kept talking to a broken agent"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1));
    assert!(!q.dir.join("run").join("qrexec.9").exists());
    assert!(!q.dir.join("run").join("qrexec.evil").exists());

    // vmB's daemon is untouched.
    let mut cmd = q.client();
    cmd.args(["-d", "vmB", "DEFAULT:echo alive"]);
    assert_eq!(cmd.output().unwrap().stdout, b"alive\n");
}

#[test]
fn protocol_2_agent_uses_the_fixed_size_trigger() {
    let q = Qubes::new("hostile-v2", "");
    let mut old = fake_qube(&q, 9, "old", 2);
    let trigger2 = |service: &[u8], target: &[u8], id: &[u8; 32]| {
        let body = [fixed(service, 64), fixed(target, 32), id.to_vec()].concat();
        [header(0x210, body.len()), body].concat()
    };
    // Bad ident and policy denial are refusals, echoing the ident.
    let id = ident(b"13 bad/");
    old.agent
        .write_all(&trigger2(b"test.Add", b"vmB", &id))
        .unwrap();
    expect_refused(&mut old.agent, &id);
    let id = ident(b"13");
    old.agent
        .write_all(&trigger2(b"test.Add", b"vmB", &id))
        .unwrap();
    expect_refused(&mut old.agent, &id);
    assert!(q.policy_calls().contains("old vmB test.Add"));
    // MSG_TRIGGER_SERVICE3 is not part of protocol 2: the daemon gives up.
    old.agent
        .write_all(&trigger3(b"vmB", &ident(b"14"), b"test.Add\0"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while old.daemon.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn oversized_header_from_agent_ends_daemon() {
    let q = Qubes::new("hostile-len", "");
    let mut evil = fake_qube(&q, 9, "evil", 3);
    // TRIGGER_SERVICE3 claiming 1 GiB: refused before reading the body.
    evil.agent.write_all(&header(0x212, 1 << 30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while evil.daemon.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = std::fs::read_to_string(q.dir.join("log").join("daemon.evil.stderr")).unwrap();
    assert!(log.contains("agent sent invalid message"), "{log}");
}

fn find_process_with(arg: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline);
            (text.contains("qrexec-daemon") && text.contains(arg)).then_some(pid)
        })
}

#[test]
fn daemonised_daemon_logs_to_file_and_startup_times_out() {
    let q = Qubes::new("daemonize", "");
    // No agent for vmX: the parent gives up after QREXEC_STARTUP_TIMEOUT.
    let start = Instant::now();
    let out = Command::new(DAEMON)
        .arg(format!("--socket-dir={}", q.dir.join("run").display()))
        .args(["12", "vmX"])
        .env("VCHAN_SOCKET_DIR", q.dir.join("vchan"))
        .env("QREXEC_LOG_DIR", q.dir.join("log"))
        .env("QREXEC_STARTUP_TIMEOUT", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(15));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Cannot connect to 'vmX' qrexec agent for 1 seconds, giving up"),
        "{out:?}"
    );

    // With an agent: the parent returns 0 once connected, the daemon keeps
    // running in the background and logs to LOG_DIR/qrexec.NAME.log.
    let other_run = q.dir.join("run2");
    std::fs::create_dir_all(&other_run).unwrap();
    let agent = Command::new(common::AGENT)
        .arg(format!(
            "--agent-socket={}",
            q.dir.join("agent.vmD.sock").display()
        ))
        .env("VCHAN_SOCKET_DIR", q.dir.join("vchan"))
        .env("VCHAN_DOMAIN", "13")
        .env("QREXEC_SERVICE_PATH", q.dir.join("rpc"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Command::new(DAEMON)
        .arg(format!("--socket-dir={}", other_run.display()))
        .args(["13", "vmD", common::default_user()])
        .env("VCHAN_SOCKET_DIR", q.dir.join("vchan"))
        .env("QREXEC_LOG_DIR", q.dir.join("log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(q.dir.join("log").join("qrexec.vmD.log").exists());
    let mut cmd = q.client();
    cmd.arg(format!("--socket-dir={}", other_run.display()))
        .args(["-d", "vmD", "DEFAULT:echo from-vmD"]);
    assert_eq!(cmd.output().unwrap().stdout, b"from-vmD\n");
    let pid = find_process_with(other_run.to_str().unwrap()).expect("background daemon");
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let mut agent = agent;
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn client_local_program_replaces_stdio() {
    let q = {
        let mut q = Qubes::new("local-prog", "");
        q.start_vm(5, "vmA");
        q
    };
    // The local program sends 21, reads the remote's answer, reports it on
    // stderr (which stays qrexec-client's).
    let mut cmd = q.client();
    cmd.args([
        "-d",
        "vmA",
        "-l",
        "echo 21; read x; echo \"got=$x remote=$QREXEC_REMOTE_DOMAIN\" >&2",
        "DEFAULT:read a; echo $((a*2))",
    ]);
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "got=42 remote=vmA\n");
}
