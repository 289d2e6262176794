//! The real `qubesdb-daemon` and `qubesdb-*` binaries in a temp dir, with a
//! scripted VM on the vchan socket (`vchan.0.<domid>.111.sock`): the initial
//! MULTIREAD dump, writes/removes pushed live, the VM's own writes, watches,
//! and hostile input from both sides.
#![allow(clippy::unwrap_used)] // reason: test code

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use protocol::qubesdb::{HEADER_LEN, MessageType, Repr};

struct Box0 {
    dir: PathBuf,
    daemon: Option<Child>,
    name: String,
}

impl Drop for Box0 {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failed test shows what the daemon said (its stderr is kept in
        // a file, not mixed into every test's output).
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.dir.join("daemon.log"))
        {
            eprintln!("qubesdb-daemon's stderr:\n{log}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Box0 {
    fn new(test: &str, domid: u16, name: &str) -> Box0 {
        let dir = std::env::temp_dir().join(format!("qubesdb-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let daemon = Command::new(env!("CARGO_BIN_EXE_qubesdb-daemon"))
            .args([domid.to_string(), name.to_string()])
            .env("QUBESDB_FOREGROUND", "1")
            .env("QUBESDB_SOCKET_DIR", &dir)
            .env("VCHAN_SOCKET_DIR", &dir)
            .env_remove("VCHAN_DOMAIN")
            .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
            .spawn()
            .unwrap();
        let this = Box0 {
            dir,
            daemon: Some(daemon),
            name: name.to_string(),
        };
        wait_for(&this.dir.join(format!("qubesdb.{name}.sock")));
        this
    }

    fn tool(&self, tool: &str, args: &[&str]) -> Output {
        let exe = match tool {
            "read" => env!("CARGO_BIN_EXE_qubesdb-read"),
            "write" => env!("CARGO_BIN_EXE_qubesdb-write"),
            "rm" => env!("CARGO_BIN_EXE_qubesdb-rm"),
            "list" => env!("CARGO_BIN_EXE_qubesdb-list"),
            "multiread" => env!("CARGO_BIN_EXE_qubesdb-multiread"),
            "watch" => env!("CARGO_BIN_EXE_qubesdb-watch"),
            _ => unreachable!(),
        };
        Command::new(exe)
            .arg("-d")
            .arg(&self.name)
            .args(args)
            .env("QUBESDB_SOCKET_DIR", &self.dir)
            .output()
            .unwrap()
    }

    fn ok(&self, tool: &str, args: &[&str]) -> String {
        let out = self.tool(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn vm(&self, domid: u16) -> Vm {
        let path = self.dir.join(format!("vchan.0.{domid}.111.sock"));
        let start = Instant::now();
        loop {
            match UnixStream::connect(&path) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    return Vm { stream };
                }
                Err(_) => {
                    assert!(start.elapsed() < Duration::from_secs(10), "no vchan server");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// The VM's end of the QubesDB vchan.
struct Vm {
    stream: UnixStream,
}

/// A message as the test sees it.
#[derive(Debug, PartialEq, Eq)]
struct Msg {
    kind: MessageType,
    path: String,
    data: Vec<u8>,
}

fn msg(kind: MessageType, path: &str, data: &[u8]) -> Msg {
    Msg {
        kind,
        path: path.to_string(),
        data: data.to_vec(),
    }
}

fn encode(kind: MessageType, path: &str, data: &[u8]) -> Vec<u8> {
    let repr = Repr {
        msg_type: kind,
        path,
        data,
    };
    let mut out = vec![0u8; repr.buffer_len()];
    repr.emit(&mut out).unwrap();
    out
}

impl Vm {
    fn send(&mut self, kind: MessageType, path: &str, data: &[u8]) {
        self.stream.write_all(&encode(kind, path, data)).unwrap();
    }

    fn recv(&mut self) -> Msg {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header).unwrap();
        let len = u32::from_le_bytes(header[68..72].try_into().unwrap()) as usize;
        let mut bytes = header.to_vec();
        bytes.resize(HEADER_LEN + len, 0);
        self.stream.read_exact(&mut bytes[HEADER_LEN..]).unwrap();
        let repr = Repr::parse_bytes(&bytes).unwrap();
        msg(repr.msg_type, repr.path, repr.data)
    }

    /// The full-sync exchange: MULTIREAD of the empty path, entries until the
    /// empty-path terminator.
    fn sync(&mut self) -> Vec<(String, Vec<u8>)> {
        self.send(MessageType::Multiread, "", b"");
        let mut entries = Vec::new();
        loop {
            let m = self.recv();
            assert_eq!(m.kind, MessageType::RespMultiread);
            if m.path.is_empty() {
                assert!(m.data.is_empty());
                return entries;
            }
            entries.push((m.path, m.data));
        }
    }

    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }
}

/// A VM that connects the moment the vchan is offered (Qubes' client
/// retries every 0.1 ms): the daemon accepts it and removes the socket
/// path at once. Starting must not wait for that path to be seen (it
/// used to, and gave up after 5 s with "not offered within 5 s").
#[test]
fn vm_connecting_at_the_first_instant_is_served() {
    let test = "eager";
    let dir = std::env::temp_dir().join(format!("qubesdb-{test}-{}", std::process::id()));
    let path = dir.join("vchan.0.9.111.sock");
    let connector = std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            if let Ok(stream) = UnixStream::connect(&path) {
                return stream;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no vchan server");
            std::thread::yield_now();
        }
    });
    let b = Box0::new(test, 9, "fw9");
    let stream = connector.join().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut vm = Vm { stream };
    assert!(vm.sync().is_empty());
    // The daemon kept running: a local tool's write reaches the VM.
    b.ok("write", &["/qubes-ip", "10.137.0.9"]);
    assert_eq!(
        vm.recv(),
        msg(MessageType::Write, "/qubes-ip", b"10.137.0.9")
    );
}

#[test]
fn vm_gets_a_full_dump_then_live_writes_and_removes() {
    let b = Box0::new("sync", 5, "fw");
    b.ok(
        "write",
        &["/qubes-ip", "10.137.0.5", "/qubes-gateway", "10.137.0.1"],
    );
    b.ok("write", &["/qubes-primary-dns", "10.139.1.1"]);
    let mut vm = b.vm(5);
    let dump = vm.sync();
    // Whole database in descending order (db-cmds.c handle_multiread).
    let paths: Vec<&str> = dump.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        vec!["/qubes-primary-dns", "/qubes-ip", "/qubes-gateway"]
    );
    assert_eq!(dump[1].1, b"10.137.0.5");

    // dom0 changes rules: rm dir, policy, rules, commit (empty write).
    // The rm of an absent dir is NOENT (the tool fails) and not forwarded.
    assert_eq!(
        b.tool("rm", &["/qubes-firewall/10.137.0.9/"]).status.code(),
        Some(1)
    );
    b.ok("write", &["/qubes-firewall/10.137.0.9/policy", "drop"]);
    b.ok(
        "write",
        &[
            "/qubes-firewall/10.137.0.9/0000",
            "action=accept proto=tcp dstports=443-443",
        ],
    );
    b.ok("write", &["/qubes-firewall/10.137.0.9", ""]);
    assert_eq!(
        vm.recv(),
        msg(
            MessageType::Write,
            "/qubes-firewall/10.137.0.9/policy",
            b"drop"
        )
    );
    vm.send(
        MessageType::RespOk,
        "/qubes-firewall/10.137.0.9/policy",
        b"",
    );
    assert_eq!(
        vm.recv(),
        msg(
            MessageType::Write,
            "/qubes-firewall/10.137.0.9/0000",
            b"action=accept proto=tcp dstports=443-443"
        )
    );
    assert_eq!(
        vm.recv(),
        msg(MessageType::Write, "/qubes-firewall/10.137.0.9", b"")
    );
    b.ok("rm", &["/qubes-firewall/10.137.0.9/"]);
    assert_eq!(
        vm.recv(),
        msg(MessageType::Rm, "/qubes-firewall/10.137.0.9/", b"")
    );
    // The commit key is not under the removed directory.
    assert_eq!(
        b.ok("list", &["-f", "/qubes-firewall/"]),
        "/qubes-firewall/10.137.0.9\n"
    );
    assert_eq!(b.ok("read", &["/qubes-firewall/10.137.0.9"]), "\n");
}

#[test]
fn vm_writes_reach_local_tools_and_watches() {
    let b = Box0::new("vmwrite", 7, "fw2");
    let mut vm = b.vm(7);
    assert!(vm.sync().is_empty());
    let watcher = Command::new(env!("CARGO_BIN_EXE_qubesdb-watch"))
        .args(["-d", "fw2", "/qubes-iptables-error"])
        .env("QUBESDB_SOCKET_DIR", &b.dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Give the watcher time to register, then the VM reports success.
    std::thread::sleep(Duration::from_millis(300));
    vm.send(MessageType::Write, "/qubes-iptables-error", b"");
    assert_eq!(
        vm.recv(),
        msg(MessageType::RespOk, "/qubes-iptables-error", b"")
    );
    let out = watcher.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "/qubes-iptables-error\n"
    );
    assert_eq!(
        b.ok("read", &["-f", "/qubes-iptables-error"]),
        "/qubes-iptables-error = \n"
    );
    // The VM's NUL-containing value is refused with RESP_ERROR, link kept.
    vm.stream
        .write_all(&{
            let mut m = encode(MessageType::Write, "/x", b"ab");
            let last = m.len() - 1;
            m[last] = 0;
            m
        })
        .unwrap();
    assert_eq!(vm.recv(), msg(MessageType::RespError, "/x", b""));
    vm.send(MessageType::Rm, "/qubes-iptables-error", b"");
    assert_eq!(
        vm.recv(),
        msg(MessageType::RespOk, "/qubes-iptables-error", b"")
    );
    let out = b.tool("read", &["/qubes-iptables-error"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Failed to read /qubes-iptables-error\n"
    );
}

#[test]
fn hostile_vm_loses_only_its_link_and_can_resync() {
    let b = Box0::new("hostile", 9, "fw3");
    b.ok("write", &["/qubes-ip", "10.137.0.9"]);
    // A local-only command on the vchan.
    let mut vm = b.vm(9);
    vm.send(MessageType::Read, "/qubes-ip", b"");
    assert!(vm.closed());
    // A second MULTIREAD.
    let mut vm = b.vm(9);
    assert_eq!(vm.sync().len(), 1);
    vm.send(MessageType::Multiread, "", b"");
    assert_eq!(vm.recv().kind, MessageType::RespError);
    assert!(vm.closed());
    // Garbage header: data_len far too big.
    let mut vm = b.vm(9);
    let mut garbage = [0xffu8; HEADER_LEN];
    garbage[0] = 1;
    vm.stream.write_all(&garbage).unwrap();
    assert!(vm.closed());
    // RM of something the VM never had: desynchronised, link dropped.
    let mut vm = b.vm(9);
    vm.sync();
    vm.send(MessageType::Rm, "/nope", b"");
    assert_eq!(vm.recv(), msg(MessageType::RespErrorNoent, "/nope", b""));
    assert!(vm.closed());
    // The daemon still serves the tools, and a well-behaved VM resyncs.
    assert_eq!(b.ok("read", &["/qubes-ip"]), "10.137.0.9\n");
    let mut vm = b.vm(9);
    assert_eq!(
        vm.sync(),
        vec![("/qubes-ip".to_string(), b"10.137.0.9".to_vec())]
    );
    b.ok("write", &["/qubes-ip", "10.137.0.10"]);
    assert_eq!(
        vm.recv(),
        msg(MessageType::Write, "/qubes-ip", b"10.137.0.10")
    );
}

#[test]
fn tools_print_like_qubesdb_cmd() {
    let b = Box0::new("tools", 11, "fw4");
    b.ok("write", &["/a/x", "1", "/a/y", "tab\there", "/b", "2"]);
    assert_eq!(b.ok("multiread", &["/a/"]), "x = 1\ny = tab\\x09here\n");
    assert_eq!(
        b.ok("multiread", &["-f", "/a/"]),
        "/a/x = 1\n/a/y = tab\\x09here\n"
    );
    assert_eq!(b.ok("read", &["-r", "/a/y"]), "tab\there\n");
    assert_eq!(b.ok("list", &["/"]), "a/x\na/y\nb\n");
    let out = b.tool("write", &["/only-path"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Invalid number of parameters\n"
    );
    let out = b.tool("rm", &["/missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Failed to remove /missing\n"
    );
    let out = b.tool("read", &["-q", "/missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.is_empty());
    let out = b.tool("write", &["relative", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(env!("CARGO_BIN_EXE_qubesdb-read"))
        .args(["-d", "no-such-vm", "/a"])
        .env("QUBESDB_SOCKET_DIR", &b.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Failed connect to no-such-vm daemon\n"
    );
}

#[test]
fn local_garbage_gets_resp_error_and_the_connection_survives() {
    let b = Box0::new("localgarbage", 12, "fw5");
    let mut client = UnixStream::connect(b.dir.join("qubesdb.fw5.sock")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // RESP_OK is not a client command.
    client
        .write_all(&encode(MessageType::RespOk, "/a", b""))
        .unwrap();
    let mut reply = [0u8; HEADER_LEN];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], u8::from(MessageType::RespError));
    assert_eq!(&reply[1..3], b"/a");
    // Bad path characters, with data to discard.
    let mut bad = encode(MessageType::Write, "/a", b"xyz");
    bad[2] = b' ';
    client.write_all(&bad).unwrap();
    client.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], u8::from(MessageType::RespError));
    // Still usable.
    client
        .write_all(&encode(MessageType::Write, "/ok", b"1"))
        .unwrap();
    client.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], u8::from(MessageType::RespOk));
    assert_eq!(b.ok("read", &["/ok"]), "1\n");
}

#[test]
fn daemon_detaches_and_reports_ready() {
    let dir = std::env::temp_dir().join(format!("qubesdb-detach-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_qubesdb-daemon"))
        .args(["13", "fw6"])
        .env("QUBESDB_SOCKET_DIR", &dir)
        .env("QUBESDB_LOG_DIR", &dir)
        .env("VCHAN_SOCKET_DIR", &dir)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("QUBESDB_FOREGROUND")
        .status()
        .unwrap();
    assert!(status.success());
    // Ready means the sockets exist already.
    assert!(dir.join("qubesdb.fw6.sock").exists());
    assert!(dir.join("vchan.0.13.111.sock").exists());
    assert!(dir.join("qubesdb.fw6.log").exists());
    let pid: i32 = std::fs::read_to_string(dir.join("qubesdb.fw6.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let killed = Command::new("kill").arg(pid.to_string()).status().unwrap();
    assert!(killed.success());
    let _ = std::fs::remove_dir_all(&dir);

    let out = Command::new(env!("CARGO_BIN_EXE_qubesdb-daemon"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("Usage: "));
}

#[test]
fn dom0_daemon_is_also_the_local_one_and_has_no_vchan() {
    let b = Box0::new("dom0", 0, "dom0");
    assert!(b.dir.join("qubesdb.sock").exists());
    assert!(!b.dir.join("vchan.0.0.111.sock").exists());
    b.ok("write", &["/qubes-vm-type", "AdminVM"]);
    // Without -d the tools use the local socket.
    let out = Command::new(env!("CARGO_BIN_EXE_qubesdb-read"))
        .arg("/qubes-vm-type")
        .env("QUBESDB_SOCKET_DIR", &b.dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "AdminVM\n");
}
