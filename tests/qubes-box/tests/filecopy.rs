//! Files between qubes and into disposables, in the box (root, as CI runs),
//! through the real policy daemon and our qrexec daemons and agents, with
//! the file-copy tools of `vm-tools/filecopy` installed in the qubes by
//! the box (`qubes_box::vmtools`), and the box's qubesd
//! (`qubes_box::qubesd`). Issue 13's demos:
//!
//! 1. `qvm-copy-to-vm client2 DIR` from client1: a tree with nested
//!    directories, a 200 MiB file, a symlink inside the tree, an empty file
//!    and set mtimes arrives identical (SHA-256 of every file, modes,
//!    sizes, link targets, mtimes to the nanosecond) in client2's
//!    `~/QubesIncoming/client1/`; `qvm-move-to-vm` removes the source after
//!    a successful copy and keeps it when the policy refuses the call or
//!    the receiver refuses the files.
//! 2. The same under an `ask` rule (client2 to client1), answered `allow`
//!    and `deny` by the box's ask program.
//! 3. A hostile sender (a Python script speaking the wire format) through
//!    qrexec to client2's `qubes.Filecopy`: `../`, an absolute name, a
//!    symlink to `/etc`, a file of 2^63 bytes and a truncated file are each
//!    refused with Qubes' error code, nothing is written outside the
//!    incoming directory, and the receiver's error is in client2's log. A
//!    hostile receiver answering a wrong CRC makes our sender fail (and a
//!    move keep its source).
//! 4. `qvm-open-in-dvm` from client1: a disposable appears (the box's
//!    qubesd creates and starts it), its `qubes.OpenInVM` edits the file,
//!    the edited file comes back, the disposable is gone afterwards.
//! 5. A call to a halted qube (`test.Add`, allowed with the default
//!    `autostart`) starts it through the box's qubesd.
#![allow(clippy::unwrap_used)] // reason: test code

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use qubes_box::netbox::BoxConfig;
use qubes_box::qubesd::Registry;
use qubes_box::vmtools;

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_qubes-box"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        .unwrap_or(false)
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Root, python3 (from the distribution when missing) and the tools the
/// box runs (`cargo build --workspace --bins`, as CI does first): false (test skipped, said on stderr) when the box
/// cannot run. Once for the tests of this file.
fn ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        if !is_root() {
            eprintln!("skipped: not root");
            return false;
        }
        if Command::new("python3").arg("-V").output().is_err() {
            for args in [&["update", "-q"][..], &["install", "-y", "-q", "python3"]] {
                let status = Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()
                    .unwrap();
                assert!(status.success(), "apt-get {args:?} failed");
            }
        }
        for tool in [
            "qubesdb-daemon",
            "qubesdb-write",
            "qubesdb-read",
            "qrexec-daemon",
            "qrexec-client",
            "qrexec-agent",
            "qrexec-client-vm",
            "qrexec-policy-daemon",
            "qrexec-policy-exec",
            "qfile-agent",
            "qfile-unpacker",
            "qvm-copy-to-vm",
            "qvm-move-to-vm",
        ] {
            if !bin_dir().join(tool).exists() {
                eprintln!("skipped: {tool} not built (run cargo build --workspace --bins)");
                return false;
            }
        }
        true
    })
}

/// A running box (no firewall process: files need no network), taken
/// down when dropped.
struct Up {
    config: BoxConfig,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
            .args([
                "down",
                "--state-dir",
                &self.config.state_dir.display().to_string(),
            ])
            .output();
    }
}

fn bring_up(tag: &str, clients: u16) -> Up {
    let config = BoxConfig {
        state_dir: std::env::temp_dir().join(format!("qubes-box-{tag}-{}", std::process::id())),
        prefix: format!("q{tag}{}-", std::process::id()),
        bin_dir: bin_dir(),
        firewall: false,
        firewall_bin: None,
        firewall_args: Vec::new(),
        clients,
        sys_net_answers_arp: true,
    };
    let out = Command::new(env!("CARGO_BIN_EXE_qubes-box"))
        .args([
            "up",
            "--no-firewall",
            "--clients",
            &clients.to_string(),
            "--state-dir",
            &config.state_dir.display().to_string(),
            "--prefix",
            &config.prefix,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    Up { config }
}

impl Up {
    fn home(&self, qube: &str) -> PathBuf {
        vmtools::home(&self.config, qube)
    }

    fn incoming(&self, qube: &str, from: &str) -> PathBuf {
        self.home(qube).join("QubesIncoming").join(from)
    }

    /// Runs `program args` in `qube` (its namespace, home, tools).
    fn run_in(&self, qube: &str, program: &str, args: &[&str]) -> Output {
        let domid = Registry::new(&self.config).get(qube).unwrap().domid;
        vmtools::command(&self.config, qube, domid, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.config.state_dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// Deterministic bytes (xorshift), so the 200 MiB file is not all zeros.
fn write_pattern(path: &Path, size: usize, seed: u64) {
    let mut file = fs::File::create(path).unwrap();
    let mut state = seed | 1;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in chunk.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        let n = left.min(chunk.len());
        file.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
}

fn set_mtime(path: &Path, secs: u64, nanos: u32) {
    let time = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    fs::File::open(path)
        .unwrap()
        .set_times(fs::FileTimes::new().set_accessed(time).set_modified(time))
        .unwrap();
}

/// A tree: nested directories, a file of `big` bytes, a symlink inside
/// the tree, an empty file, files with other modes, set mtimes (with
/// nanoseconds) on files and directories.
fn make_tree(root: &Path, big: usize) {
    let deep = root.join("a/b/c");
    fs::create_dir_all(&deep).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    write_pattern(&deep.join("big.bin"), big, 0x1234_5678);
    fs::write(root.join("a/notes.txt"), "notes\n").unwrap();
    fs::write(root.join("a/b/script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(
        root.join("a/b/script.sh"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    fs::File::create(root.join("empty")).unwrap();
    std::os::unix::fs::symlink("a/b/c/big.bin", root.join("link-to-big")).unwrap();
    std::os::unix::fs::symlink("../notes.txt", root.join("a/b/up-link")).unwrap();
    for (i, path) in [
        "a/b/c/big.bin",
        "a/notes.txt",
        "a/b/script.sh",
        "empty",
        "a/b/c",
        "a/b",
        "a",
        "empty-dir",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(
            &root.join(path),
            1_600_000_000 + i as u64 * 1000,
            123_456_789 + i as u32,
        );
    }
}

/// What must arrive identical: per relative path its kind, permission
/// bits, size, link target, mtime (seconds and nanoseconds; not for
/// symlinks, whose own times Qubes does not carry) and SHA-256.
fn describe(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>, files: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else {
                let kind = if meta.is_dir() { "dir" } else { "file" };
                format!(
                    "{kind} mode {:o} size {} mtime {}.{:09}",
                    meta.mode() & 0o7777,
                    if meta.is_dir() { 0 } else { meta.len() },
                    meta.mtime(),
                    meta.mtime_nsec()
                )
            };
            out.insert(rel, what);
            if meta.is_dir() {
                walk(root, &path, out, files);
            } else if meta.is_file() {
                files.push(path);
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut files = Vec::new();
    walk(root, root, &mut out, &mut files);
    if !files.is_empty() {
        let sums = Command::new("sha256sum").args(&files).output().unwrap();
        assert!(sums.status.success(), "{}", text(&sums));
        for line in String::from_utf8(sums.stdout).unwrap().lines() {
            let (sum, path) = line.split_once("  ").unwrap();
            let rel = Path::new(path)
                .strip_prefix(root)
                .unwrap()
                .display()
                .to_string();
            out.get_mut(&rel)
                .unwrap()
                .push_str(&format!(" sha256 {sum}"));
        }
    }
    out
}

/// Speaks qubes.Filecopy's wire format (qubes-linux-utils' qrexec-lib:
/// `struct file_header` little-endian: namelen incl. NUL, mode, filelen
/// u64, atime, atime_nsec, mtime, mtime_nsec; the name; the data; a header
/// with namelen 0 ends the stream), as qrexec-client-vm's local program:
/// stdout goes to the receiver, stdin is its answer (`struct
/// result_header`: error code u32, pad, CRC u64; then the name of the
/// last file). Prints `hostile sender: code N last NAME` on stderr (its
/// stdout goes to the receiver).
///
/// `send CASE [PATH]`: a hostile sender; `receive-bad-crc`: a hostile
/// receiver (a qubes.Filecopy service) that reads the stream to its end
/// marker and answers success with a wrong CRC.
const WIRE_PY: &str = r#"
import os, struct, sys
def hdr(name, mode, size):
    n = name.encode() + b'\0'
    return struct.pack('<IIQIIII', len(n), mode, size, 0, 0, 1600000000, 0) + n
END = struct.pack('<IIQIIII', 0, 0, 0, 0, 0, 0, 0)
if sys.argv[1] == 'send':
    case = sys.argv[2]
    if case == 'dotdot':
        data = hdr('../escape-dotdot', 0o100644, 4) + b'evil' + END
    elif case == 'absolute':
        data = hdr(sys.argv[3], 0o100644, 4) + b'evil' + END
    elif case == 'symlink-etc':
        data = (hdr('d', 0o40755, 0) + hdr('d/etc', 0o120777, 4) + b'/etc'
                + hdr('d/etc/escape-symlink', 0o100644, 4) + b'evil' + hdr('d', 0o40755, 0) + END)
    elif case == 'oversize':
        data = hdr('oversize', 0o100644, 1 << 63) + b'evil'
    elif case == 'truncated':
        data = hdr('truncated', 0o100644, 1000) + b'only this'
    else:
        sys.exit('unknown case ' + case)
    try:
        os.write(1, data)
    except BrokenPipeError:
        pass
    os.close(1)
    answer = sys.stdin.buffer.read()
    if len(answer) < 16:
        sys.stderr.write('no answer (%d bytes)\n' % len(answer)); sys.exit(0)
    code, _, crc = struct.unpack('<IIQ', answer[:16])
    last = b''
    if len(answer) >= 20:
        (n,) = struct.unpack('<I', answer[16:20])
        last = answer[20:20 + n]
    sys.stderr.write('hostile sender: code %d last %s\n' % (code, last.decode(errors='replace')))
elif sys.argv[1] == 'receive-bad-crc':
    # Read the stream to its end marker (the sender waits for the answer
    # without closing its end).
    inp = sys.stdin.buffer
    while True:
        h = inp.read(32)
        if len(h) < 32:
            break
        namelen, mode, size = struct.unpack('<IIQ', h[:16])
        if namelen == 0:
            break
        inp.read(namelen)
        if mode & 0o170000 in (0o100000, 0o120000):
            inp.read(size)
    sys.stdout.buffer.write(struct.pack('<IIQ', 0, 0, 0xdeadbeef) + struct.pack('<I', 0))
"#;

#[test]
fn files_between_qubes_copy_move_ask_and_hostile_streams() {
    if !ready() {
        return;
    }
    let up = bring_up("fc", 2);
    let config = &up.config;
    let wire = config.state_dir.join("wire.py");
    fs::write(&wire, WIRE_PY).unwrap();
    // qrexec-client-vm runs its local program without a PATH search.
    let python = Command::new("sh")
        .args(["-c", "command -v python3"])
        .output()
        .unwrap();
    let python = String::from_utf8(python.stdout).unwrap().trim().to_string();
    assert!(python.starts_with('/'), "no python3: {python:?}");

    // 1. A tree with a 200 MiB file from client1 to client2.
    let source = up.home("client1").join("DIR");
    make_tree(&source, 200 << 20);
    let before = describe(&source);
    let started = std::time::Instant::now();
    let out = up.run_in("client1", "qvm-copy-to-vm", &["client2", "DIR"]);
    let seconds = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("qvm-copy-to-vm of 200 MiB and the tree: {seconds:.1} s");
    let arrived = up.incoming("client2", "client1").join("DIR");
    assert_eq!(describe(&arrived), before);
    assert!(before["a/b/c/big.bin"].contains(&format!("size {}", 200 << 20)));
    assert_eq!(before["link-to-big"], "link -> a/b/c/big.bin");
    assert!(before["empty"].contains("size 0 "));
    assert!(source.exists(), "a copy keeps its source");

    // qvm-move-to-vm: the source goes only after a successful copy.
    let moveme = up.home("client1").join("MOVEME");
    make_tree(&moveme, 4096);
    let moved = describe(&moveme);
    let out = up.run_in("client1", "qvm-move-to-vm", &["client2", "MOVEME"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!moveme.exists(), "a successful move removes the source");
    assert_eq!(
        describe(&up.incoming("client2", "client1").join("MOVEME")),
        moved
    );
    // Refused by the policy (nothing allows client1 to sys-net): kept.
    make_tree(&moveme, 4096);
    let out = up.run_in("client1", "qvm-move-to-vm", &["sys-net", "MOVEME"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Request refused"),
        "{}",
        text(&out)
    );
    assert_eq!(describe(&moveme), moved, "a refused move keeps the source");
    // Refused by the receiver (MOVEME is already there: EEXIST): kept.
    let out = up.run_in("client1", "qvm-move-to-vm", &["client2", "MOVEME"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(describe(&moveme), moved, "a failed move keeps the source");

    // 2. Under `ask` (client2 to client1), answered by the ask program.
    let asked = up.home("client2").join("ASKED");
    make_tree(&asked, 64 << 10);
    let asked_tree = describe(&asked);
    fs::write(vmtools::ask_answer(config), "allow:client1\n").unwrap();
    let out = up.run_in("client2", "qvm-copy-to-vm", &["client1", "ASKED"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        describe(&up.incoming("client1", "client2").join("ASKED")),
        asked_tree
    );
    let questions = fs::read_to_string(vmtools::ask_log(config)).unwrap();
    assert!(
        questions.lines().count() == 1 && questions.starts_with("client2 qubes.Filecopy "),
        "{questions}"
    );
    fs::write(vmtools::ask_answer(config), "deny\n").unwrap();
    let denied = up.home("client2").join("DENIED");
    make_tree(&denied, 1024);
    let out = up.run_in("client2", "qvm-copy-to-vm", &["client1", "DENIED"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Request refused"),
        "{}",
        text(&out)
    );
    assert!(!up.incoming("client1", "client2").join("DENIED").exists());
    let questions = fs::read_to_string(vmtools::ask_log(config)).unwrap();
    assert_eq!(questions.lines().count(), 2, "{questions}");

    // 3. Hostile streams into client2's qubes.Filecopy through qrexec.
    let escape_abs = config.state_dir.join("escape-absolute");
    let incoming = up.incoming("client2", "client1");
    let before_hostile = describe(&incoming);
    let cases: [(&str, Option<&Path>, &str); 5] = [
        // EILSEQ: names with `..` or absolute.
        ("dotdot", None, "code 84 last ../escape-dotdot"),
        ("absolute", Some(&escape_abs), "code 84"),
        // ENOLINK: an absolute symlink target.
        ("symlink-etc", None, "code 67 last /etc"),
        // EDQUOT: more than a file may hold.
        ("oversize", None, "code 122 last oversize"),
        // Qubes' LEGAL_EOF: the stream ends inside the file.
        ("truncated", None, "code 31415926 last truncated"),
    ];
    for (case, path, expected) in cases {
        let mut args = vec![
            "client2",
            "qubes.Filecopy",
            &python,
            wire.to_str().unwrap(),
            "send",
            case,
        ];
        if let Some(path) = path {
            args.push(path.to_str().unwrap());
        }
        let out = up.run_in("client1", "qrexec-client-vm", &args);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            // (its line may land inside the receiver's message, which
            // comes in pieces)
            said.contains(&format!("hostile sender: {expected}")),
            "{case}: expected {expected:?}\n{}",
            text(&out)
        );
    }
    // What a refused stream leaves: only the entries complete before the
    // refusal (as Qubes' unpacker), here the directory `d` that came
    // before the symlink to /etc, empty.
    let mut after_hostile = describe(&incoming);
    let d = after_hostile.remove("d").unwrap_or_default();
    assert!(d.starts_with("dir "), "{d}");
    assert_eq!(fs::read_dir(incoming.join("d")).unwrap().count(), 0);
    assert_eq!(
        after_hostile, before_hostile,
        "a refused stream leaves nothing else in the incoming directory"
    );
    assert!(!escape_abs.exists());
    assert!(
        !up.home("client2")
            .join("QubesIncoming/escape-dotdot")
            .exists()
    );
    assert!(!Path::new("/etc/escape-symlink").exists());
    // The receiver's errors, in client2's agent log (which may hold one
    // message in several lines, one per write of the service).
    let receiver_log = up.log("qrexec-agent-client2");
    assert!(
        receiver_log.matches("qfile-unpacker: ").count() >= 5,
        "{receiver_log}"
    );
    for said in [
        "../escape-dotdot",
        escape_abs.to_str().unwrap(),
        "symlink would point outside",
        "9223372036854775808 bytes",
        "truncated",
    ] {
        assert!(
            receiver_log.contains(said),
            "client2's log does not report {said}:\n{receiver_log}"
        );
    }

    // A hostile receiver answering a wrong CRC: our sender fails, a move
    // keeps its source.
    let service = config.rpc_dir("client2").join("qubes.Filecopy");
    let real_service = fs::read_to_string(&service).unwrap();
    fs::write(
        &service,
        format!(
            "#!/bin/sh\nexec python3 {} receive-bad-crc\n",
            wire.display()
        ),
    )
    .unwrap();
    let crc = up.home("client1").join("CRC");
    make_tree(&crc, 1024);
    let crc_tree = describe(&crc);
    let out = up.run_in("client1", "qvm-move-to-vm", &["client2", "CRC"]);
    fs::write(&service, real_service).unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"),
        "{}",
        text(&out)
    );
    assert_eq!(describe(&crc), crc_tree, "a failed move keeps the source");
}

/// Demos 4 and 5: the disposable and the autostart go through the box's
/// qubesd, called by our dom0 qrexec tools.
#[test]
fn disposables_and_autostart_through_the_box_qubesd() {
    if !ready() {
        return;
    }
    for tool in ["qopen-in-vm", "qvm-open-in-dvm", "vm-file-editor"] {
        assert!(
            bin_dir().join(tool).exists(),
            "{tool} not built (cargo build --workspace --bins)"
        );
    }
    let up = bring_up("dv", 3);
    let config = &up.config;
    let registry = Registry::new(config);

    // 4. qvm-open-in-dvm from client1.
    let document = up.home("client1").join("document.txt");
    fs::write(&document, "the original text\n").unwrap();
    let qubes_before: Vec<String> = registry.all().into_iter().map(|q| q.name).collect();
    let out = up.run_in("client1", "qvm-open-in-dvm", &["document.txt"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fs::read_to_string(&document).unwrap(),
        format!("the original text\n{}\n", vmtools::BOX_EDITOR_LINE),
        "the edited file came back"
    );
    let qubesd_log = up.log("qubesd");
    let created: Vec<&str> = qubesd_log
        .lines()
        .filter_map(|l| l.strip_prefix("qubesd: created "))
        .collect();
    assert_eq!(created.len(), 1, "{qubesd_log}");
    let dispvm = created[0].split_whitespace().next().unwrap().to_string();
    // Our qrexec-daemon asks as dom0, as Qubes' does.
    assert!(
        created[0].ends_with("from default-dvm for dom0"),
        "{qubesd_log}"
    );
    assert!(
        qubesd_log.contains(&format!("qubesd: started {dispvm}")),
        "{qubesd_log}"
    );
    // The file was opened in the disposable, by the box's editor there,
    // and the disposable's own QubesDB says what it is.
    assert_eq!(
        fs::read_to_string(vmtools::open_log(config)).unwrap(),
        format!("{dispvm} DispVM document.txt\n")
    );
    // The disposable is killed once the call has ended (by client1's
    // qrexec-daemon, after qvm-open-in-dvm returned): wait for it (at most
    // a minute, on a loaded machine), then nothing of it is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while registry.get(&dispvm).is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let qubesd_log = up.log("qubesd");
    assert!(
        qubesd_log.contains(&format!("qubesd: killed {dispvm}")),
        "{qubesd_log}"
    );
    assert!(registry.get(&dispvm).is_none());
    assert!(!qubes_box::netbox::netns_exists(&config.netns(&dispvm)));
    assert!(!config.agent_socket(&dispvm).exists());
    assert!(!vmtools::home(config, &dispvm).exists());
    let qubes_after: Vec<String> = registry.all().into_iter().map(|q| q.name).collect();
    assert_eq!(qubes_after, qubes_before);

    // 5. client3 halted; a call to it starts it.
    let client3 = qubes_box::netbox::client_qube(3).unwrap();
    qubes_box::netbox::remove_client(config, &client3).unwrap();
    let halted = registry.get("client3").unwrap();
    assert_eq!(registry.power_state(&halted), "Halted");
    let mut call = vmtools::command(config, "client1", 3, "qrexec-client-vm");
    let mut child = call
        .args(["client3", "test.Add"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"1 2\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    assert_eq!(registry.power_state(&halted), "Running");
    assert!(up.log("qubesd").contains("qubesd: started client3"));
}
