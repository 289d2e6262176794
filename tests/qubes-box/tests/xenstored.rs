//! The real `qubes-box xenstored` on a temp socket, exercised with real
//! `xsd_sockmsg` messages: raw golden bytes, the box client, the CLI, watches
//! (initial fire, changes below, removal), errors as `xsd_errors` strings,
//! guest-relative paths, and a malformed message.
#![allow(clippy::unwrap_used)] // reason: test code

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use qubes_box::client::{Client, ClientError};

struct Server {
    dir: PathBuf,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

fn server(test: &str) -> Server {
    let dir = std::env::temp_dir().join(format!("qubes-box-xs-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
        .arg("xenstored")
        .arg("--socket")
        .arg(dir.join("socket"))
        .arg("--guest-socket")
        .arg(format!("3={}", dir.join("guest3").display()))
        .spawn()
        .unwrap();
    wait_for(&dir.join("socket"));
    wait_for(&dir.join("guest3"));
    Server { dir, child }
}

fn client(s: &Server, socket: &str) -> Client {
    let c = Client::connect(&s.dir.join(socket)).unwrap();
    c.set_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

fn header(kind: u32, req_id: u32, tx_id: u32, len: u32) -> Vec<u8> {
    [kind, req_id, tx_id, len]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn read_message(stream: &mut UnixStream) -> (Vec<u8>, Vec<u8>) {
    let mut h = [0u8; 16];
    stream.read_exact(&mut h).unwrap();
    let len = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    (h.to_vec(), payload)
}

#[test]
fn golden_bytes_write_read_and_enoent() {
    let s = server("golden");
    let mut raw = UnixStream::connect(s.dir.join("socket")).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // XS_WRITE (11) "backend/vif/5/0/ip\0" "10.137.0.5", req 1.
    let mut write = header(11, 1, 0, 30);
    write.extend_from_slice(b"/backend/vif/5/0/ip\x0010.137.0.5");
    assert_eq!(write.len(), 16 + 30);
    raw.write_all(&write).unwrap();
    assert_eq!(
        read_message(&mut raw),
        (header(11, 1, 0, 3), b"OK\0".to_vec())
    );
    // XS_READ (2), req 2.
    let mut read = header(2, 2, 0, 20);
    read.extend_from_slice(b"/backend/vif/5/0/ip\0");
    raw.write_all(&read).unwrap();
    assert_eq!(
        read_message(&mut raw),
        (header(2, 2, 0, 10), b"10.137.0.5".to_vec())
    );
    // XS_READ of a missing node: XS_ERROR (16) "ENOENT\0", ids echoed.
    let mut missing = header(2, 77, 0, 6);
    missing.extend_from_slice(b"/nope\0");
    raw.write_all(&missing).unwrap();
    assert_eq!(
        read_message(&mut raw),
        (header(16, 77, 0, 7), b"ENOENT\0".to_vec())
    );
    // XS_DIRECTORY (1).
    let mut dir = header(1, 3, 0, 17);
    dir.extend_from_slice(b"/backend/vif/5/0\0");
    raw.write_all(&dir).unwrap();
    assert_eq!(
        read_message(&mut raw),
        (header(1, 3, 0, 3), b"ip\0".to_vec())
    );
    // TRANSACTION_START (6) and END (7) are accepted.
    let mut start = header(6, 4, 0, 1);
    start.push(0);
    raw.write_all(&start).unwrap();
    let (h, payload) = read_message(&mut raw);
    assert_eq!(&h[0..4], &6u32.to_le_bytes());
    let tx: u32 = std::str::from_utf8(&payload[..payload.len() - 1])
        .unwrap()
        .parse()
        .unwrap();
    assert!(tx > 0);
    let mut end = header(7, 5, tx, 2);
    end.extend_from_slice(b"T\0");
    raw.write_all(&end).unwrap();
    assert_eq!(
        read_message(&mut raw),
        (header(7, 5, tx, 3), b"OK\0".to_vec())
    );
    // An invalid path is EINVAL.
    let mut bad = header(2, 6, 0, 6);
    bad.extend_from_slice(b"/a//b\0");
    raw.write_all(&bad).unwrap();
    assert_eq!(
        read_message(&mut raw),
        (header(16, 6, 0, 7), b"EINVAL\0".to_vec())
    );
}

#[test]
fn watches_fire_initially_and_on_changes_from_other_connections() {
    let s = server("watch");
    let mut watcher = client(&s, "socket");
    let mut writer = client(&s, "socket");
    watcher.watch("/backend/vif", "vifs").unwrap();
    assert_eq!(
        watcher.next_event().unwrap(),
        ("/backend/vif".to_string(), "vifs".to_string())
    );
    writer
        .write("/backend/vif/7/0/ip", b"10.137.0.7 fe80::1")
        .unwrap();
    assert_eq!(
        watcher.next_event().unwrap(),
        ("/backend/vif/7/0/ip".to_string(), "vifs".to_string())
    );
    assert_eq!(writer.directory("/backend/vif").unwrap(), vec!["7"]);
    writer.remove("/backend/vif/7").unwrap();
    assert_eq!(
        watcher.next_event().unwrap(),
        ("/backend/vif/7".to_string(), "vifs".to_string())
    );
    assert_eq!(writer.read("/backend/vif/7/0/ip").unwrap(), None);
    watcher.unwatch("/backend/vif", "vifs").unwrap();
    match watcher.unwatch("/backend/vif", "vifs") {
        Err(ClientError::Daemon(code)) => assert_eq!(code, "ENOENT"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn guest_socket_resolves_relative_paths_under_its_domain() {
    let s = server("guest");
    let mut guest = client(&s, "guest3");
    let mut dom0 = client(&s, "socket");
    guest.watch("control/shutdown", "ctl").unwrap();
    assert_eq!(guest.next_event().unwrap().0, "control/shutdown");
    dom0.write("/local/domain/3/control/shutdown", b"poweroff")
        .unwrap();
    assert_eq!(
        guest.next_event().unwrap(),
        ("control/shutdown".to_string(), "ctl".to_string())
    );
    assert_eq!(
        guest.read("control/shutdown").unwrap(),
        Some(b"poweroff".to_vec())
    );
    guest.write("control/shutdown", b"").unwrap();
    assert_eq!(
        dom0.read("/local/domain/3/control/shutdown").unwrap(),
        Some(Vec::new())
    );
}

#[test]
fn cli_writes_what_the_firewall_reads() {
    let s = server("cli");
    let socket = s.dir.join("socket");
    let status = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
        .args(["xenstore-write", "--socket"])
        .arg(&socket)
        .args(["/backend/vif/12/0/ip", "10.137.0.12"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
        .args(["xenstore-read", "--socket"])
        .arg(&socket)
        .arg("/backend/vif/12/0/ip")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "10.137.0.12\n");
    let out = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
        .args(["xenstore-read", "--socket"])
        .arg(&socket)
        .arg("/backend/vif/99")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ENOENT"));
}

#[test]
fn oversized_message_closes_only_that_connection() {
    let s = server("oversized");
    let mut raw = UnixStream::connect(s.dir.join("socket")).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&header(11, 1, 0, 5000)).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(raw.read(&mut byte), Ok(0) | Err(_)));
    // Unknown message type: EINVAL, connection kept.
    let mut other = client(&s, "socket");
    other.send_raw(&header(999, 9, 0, 0)).unwrap();
    let (kind, req_id, payload) = other.next_message().unwrap();
    assert_eq!(kind, protocol::xenstore::MessageType::Error);
    assert_eq!(req_id, 9);
    assert_eq!(payload, b"EINVAL\0");
    other.write("/still", b"ok").unwrap();
}
