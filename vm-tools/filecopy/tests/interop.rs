//! Interop with Qubes' own C `qfile-agent` and `qfile-unpacker`, built here
//! from `../shared/reference/` (qubes-linux-utils' `qrexec-lib` with
//! `make NO_REBUILD_TABLE=1`, then qubes-core-agent-linux's `qubes-rpc/`
//! pieces) into this test's target directory.
//!
//! * a tree copied ours -> theirs and theirs -> ours, piped directly, gives
//!   the same tree as the source;
//! * hostile streams get the same refusal (code on the wire, exit status)
//!   from both unpackers, and neither writes outside the incoming directory;
//! * both agents reject a receiver that answers with a wrong CRC.
//!
//! Qubes' unpacker bind-mounts the incoming directory and chroots into it,
//! which needs root: it runs in a private mount namespace (`unshare -m`) so
//! the host's mounts are never touched. Without root the test says so and
//! skips.
#![allow(clippy::unwrap_used)] // reason: test code; a panic is a test failure

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{end, entry, entry_with_len};
use qubes_filecopy::unpack::{UnpackOptions, unpack};

use common::qubes_c::{is_root, qubes};

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!(
                "SKIPPED: Qubes' qfile-unpacker needs root (bind mount + chroot) and the C build may need apt-get; run as root"
            );
            return;
        }
    };
}

/// Qubes' unpacker receiving into `dir` (explicit UID and directory), in a
/// private mount namespace.
fn their_unpacker(dir: &Path) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private"])
        .arg(&qubes().unpacker)
        .arg("0")
        .arg(dir);
    command
}

fn our_unpacker(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qfile-unpacker"));
    command
        .arg(rustix::process::getuid().as_raw().to_string())
        .arg(dir);
    command
}

fn pipe(mut agent: Command, mut unpacker: Command) -> (std::process::Output, std::process::Output) {
    let mut receiver = unpacker
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let to_receiver = receiver.stdin.take().unwrap();
    let from_receiver = receiver.stdout.take().unwrap();
    let sender = agent
        .stdin(Stdio::from(from_receiver))
        .stdout(Stdio::from(to_receiver))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (
        sender.wait_with_output().unwrap(),
        receiver.wait_with_output().unwrap(),
    )
}

fn copy_tree(agent: Command, unpacker: impl Fn(&Path) -> Command, label: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let tree = common::make_tree(&src, 8 * 1024 * 1024 + 3);
    let incoming = tmp.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let mut agent = agent;
    agent.current_dir(&src).arg("tree");
    let (sent, received) = pipe(agent, unpacker(&incoming));
    assert!(
        sent.status.success(),
        "{label}: agent: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        received.status.success(),
        "{label}: unpacker: {}",
        String::from_utf8_lossy(&received.stderr)
    );
    assert_eq!(
        common::describe(&incoming),
        common::describe(&src),
        "{label}"
    );
    assert!(tree.exists());
    common::make_removable(tmp.path());
}

#[test]
fn ours_to_theirs_and_theirs_to_ours() {
    need_root!();
    let q = qubes();
    copy_tree(
        Command::new(env!("CARGO_BIN_EXE_qfile-agent")),
        their_unpacker,
        "ours -> theirs",
    );
    copy_tree(Command::new(&q.agent), our_unpacker, "theirs -> ours");
    copy_tree(Command::new(&q.agent), their_unpacker, "theirs -> theirs");
}

struct Verdict {
    exit: Option<i32>,
    code: Option<u32>,
    last_name: Vec<u8>,
    incoming: Vec<String>,
}

/// Feed `stream` to an unpacker; check nothing appeared outside.
fn feed(stream: &[u8], unpacker: impl Fn(&Path) -> Command) -> Verdict {
    let tmp = tempfile::tempdir().unwrap();
    let incoming = tmp.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    std::fs::create_dir(tmp.path().join("outside")).unwrap();
    let before: Vec<String> = common::describe(tmp.path())
        .into_iter()
        .filter(|l| !l.starts_with("incoming"))
        .collect();
    let mut child = unpacker(&incoming)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(stream);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let after: Vec<String> = common::describe(tmp.path())
        .into_iter()
        .filter(|l| !l.starts_with("incoming"))
        .collect();
    assert_eq!(before, after, "written outside the incoming directory");
    let answer = qubes_filecopy::pack::read_answer(&out.stdout[..]);
    // A directory created just now has a fresh mtime; compare the rest.
    let incoming_listing = common::describe(&incoming)
        .into_iter()
        .map(
            |line| match (line.contains(" dir "), line.find(" mtime ")) {
                (true, Some(cut)) => line[..cut].to_string(),
                _ => line,
            },
        )
        .collect();
    common::make_removable(tmp.path());
    Verdict {
        exit: out.status.code(),
        code: answer.as_ref().map(|a| a.error_code),
        last_name: answer.map(|a| a.last_name).unwrap_or_default(),
        incoming: incoming_listing,
    }
}

#[test]
fn hostile_streams_get_the_same_refusal() {
    need_root!();
    let _ = qubes();
    let reg = 0o100_644;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut s = Vec::new();
    entry(&mut s, b"../escaped", reg, b"x");
    end(&mut s);
    cases.push(("../ name", s));
    let mut s = Vec::new();
    entry(&mut s, b"/tmp/absolute", reg, b"x");
    end(&mut s);
    cases.push(("absolute name", s));
    let mut s = Vec::new();
    entry(&mut s, b"d", 0o040_755, b"");
    entry(&mut s, b"d/etc", 0o120_777, b"/etc");
    end(&mut s);
    cases.push(("symlink to /etc", s));
    let mut s = Vec::new();
    entry(&mut s, b"top", 0o120_777, b"x");
    end(&mut s);
    cases.push(("top-level symlink", s));
    let mut s = Vec::new();
    entry_with_len(&mut s, b"oversize", reg, 1 << 63, b"");
    end(&mut s);
    cases.push(("oversize file", s));
    let mut s = Vec::new();
    entry_with_len(&mut s, b"cut", reg, 100, b"short");
    cases.push(("stream cut inside a file", s));
    let mut s = Vec::new();
    entry(&mut s, b"esc\x1b[31m", reg, b"x");
    end(&mut s);
    cases.push(("control character", s));
    let mut s = Vec::new();
    entry(&mut s, b"bad\xff", reg, b"x");
    end(&mut s);
    cases.push(("invalid UTF-8", s));
    let mut s = Vec::new();
    entry(&mut s, b"f", reg, b"x");
    cases.push(("no end marker", s));
    for (label, stream) in &cases {
        let theirs = feed(stream, their_unpacker);
        let ours = feed(stream, our_unpacker);
        assert_ne!(theirs.exit, Some(0), "{label}: Qubes' unpacker accepted it");
        assert_eq!(ours.exit, theirs.exit, "{label}: exit status");
        assert_eq!(ours.code, theirs.code, "{label}: error code on the wire");
        assert_eq!(ours.last_name, theirs.last_name, "{label}: last file name");
        assert_eq!(
            ours.incoming, theirs.incoming,
            "{label}: what is left in the incoming directory"
        );
        eprintln!(
            "{label}: both refuse with code {:?}, exit {:?}",
            ours.code, ours.exit
        );
    }
}

/// Run an agent against a receiver that unpacks correctly but reports a
/// wrong CRC.
fn agent_vs_lying_receiver(mut agent: Command) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"payload").unwrap();
    let incoming = tmp.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let mut child = agent
        .current_dir(tmp.path())
        .arg("f")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let from_agent = child.stdout.take().unwrap();
    let mut to_agent = child.stdin.take().unwrap();
    let dir = std::fs::File::open(&incoming).unwrap();
    let mut reply = Vec::new();
    let outcome = unpack(
        from_agent,
        &mut reply,
        dir.as_fd(),
        UnpackOptions::default(),
    );
    assert_eq!(outcome.code, 0);
    reply[8] ^= 0x01; // the CRC field
    to_agent.write_all(&reply).unwrap();
    drop(to_agent);
    child.wait_with_output().unwrap()
}

#[test]
fn both_agents_reject_a_wrong_crc() {
    need_root!();
    let theirs = agent_vs_lying_receiver(Command::new(&qubes().agent));
    let ours = agent_vs_lying_receiver(Command::new(env!("CARGO_BIN_EXE_qfile-agent")));
    for (who, out) in [("theirs", &theirs), ("ours", &ours)] {
        assert_eq!(out.status.code(), Some(1), "{who}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("File transfer failed: checksum mismatch"),
            "{who}: {stderr}"
        );
    }
}

/// Every non-ASCII code point our table allows, Qubes' table allows too
/// (we may refuse more names than Qubes, never fewer).
#[test]
fn unicode_table_is_within_qubes() {
    need_root!();
    let table = Path::new(&qubes().unpacker)
        .with_file_name("qubes-linux-utils/qrexec-lib/unicode-allowlist-table.c");
    let text = std::fs::read_to_string(&table).unwrap();
    let mut theirs: Vec<(u32, u32)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("case ") else {
            continue;
        };
        let rest = rest.trim_end_matches(':');
        let mut parts = rest
            .split(" ... ")
            .map(|p| u32::from_str_radix(p.trim_start_matches("0x"), 16).unwrap());
        let lo = parts.next().unwrap();
        theirs.push((lo, parts.next().unwrap_or(lo)));
    }
    assert!(theirs.len() > 100, "could not read {}", table.display());
    let allowed_by_qubes = |cp: u32| theirs.iter().any(|&(lo, hi)| lo <= cp && cp <= hi);
    let mut ours = 0;
    for &(lo, hi) in qubes_filecopy::unicode_table::ALLOWED {
        for cp in lo..=hi {
            assert!(allowed_by_qubes(cp), "we allow U+{cp:04X}, Qubes does not");
            ours += 1;
        }
    }
    eprintln!("our table allows {ours} non-ASCII code points, all allowed by Qubes");
}

/// Qubes' `vm-file-editor`, as the `qubes.OpenInVM` service of qube
/// `client1`, in a private mount namespace whose `/usr/bin/qubes-open` (the
/// path it runs) is `opener` (a read-only overlay on `/usr/bin`) and whose
/// `/tmp` (where it writes) is a tmpfs of its own.
fn their_editor(scratch: &Path, opener: &str) -> Command {
    let extra = scratch.join("overlay-bin");
    let _ = std::fs::create_dir(&extra);
    let script = extra.join("qubes-open");
    std::fs::write(&script, format!("#!/bin/sh\n{opener}\n")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = Command::new("unshare");
    command
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t overlay overlay -o \"lowerdir=$1:/usr/bin\" /usr/bin && mount -t tmpfs tmpfs /tmp && exec \"$2\"",
            "sh",
        ])
        .arg(&extra)
        .arg(&qubes().editor)
        .env("QREXEC_REMOTE_DOMAIN", "client1");
    command
}

fn our_editor(scratch: &Path, opener: &str) -> Command {
    let far = scratch.join("far-tmp");
    let _ = std::fs::create_dir(&far);
    let mut command = Command::new(env!("CARGO_BIN_EXE_vm-file-editor"));
    command
        .env("QREXEC_REMOTE_DOMAIN", "client1")
        .env("TMPDIR", far)
        .env("QUBES_OPEN_IN_VM_COMMAND", opener);
    command
}

/// `sender`'s stdout into `handler`'s stdin and back, dropping every copy
/// of the pipes here (a qubes.OpenInVM stream ends at its EOF).
fn open_pipe(
    mut sender: Command,
    mut handler: Command,
) -> (std::process::Output, std::process::Output) {
    let mut far = handler
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(handler);
    let to_far = far.stdin.take().unwrap();
    let from_far = far.stdout.take().unwrap();
    sender
        .stdin(Stdio::from(from_far))
        .stdout(Stdio::from(to_far))
        .stderr(Stdio::piped());
    let near = sender.spawn().unwrap();
    drop(sender);
    let sent = near.wait_with_output().unwrap();
    let handled = far.wait_with_output().unwrap();
    (sent, handled)
}

/// An opener for both handlers: `EDIT` on the file, then an old mtime
/// (Qubes' handler compares whole seconds).
fn opener(edit: &str) -> String {
    format!("f=\"$1\"; {edit}; touch -d 2001-01-01 \"$f\"")
}

#[test]
fn open_in_vm_between_ours_and_theirs() {
    need_root!();
    let q = qubes();
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = scratch.path().join("files");
    std::fs::create_dir(&dir).unwrap();
    // The opener writes the name it was given into the file.
    let edit = opener("basename \"$f\" > \"$f\"");
    type Pair<'a> = (&'a str, Command, Command);
    let pairs: Vec<Pair<'_>> = vec![
        (
            "theirs -> ours",
            Command::new(&q.qopen),
            our_editor(scratch.path(), &edit),
        ),
        (
            "ours -> theirs",
            Command::new(env!("CARGO_BIN_EXE_qopen-in-vm")),
            their_editor(scratch.path(), &edit),
        ),
        (
            "theirs -> theirs",
            Command::new(&q.qopen),
            their_editor(scratch.path(), &edit),
        ),
    ];
    let mut names = Vec::new();
    for (label, mut sender, editor) in pairs {
        let file = dir.join("my doc \u{e9}\u{7}.txt");
        std::fs::write(&file, b"original\n").unwrap();
        sender.arg(&file);
        let (sent, handled) = open_pipe(sender, editor);
        assert!(
            sent.status.success() && handled.status.success(),
            "{label}: {} / {}",
            String::from_utf8_lossy(&sent.stderr),
            String::from_utf8_lossy(&handled.stderr)
        );
        let got = std::fs::read_to_string(&file).unwrap();
        names.push(got.trim_end().to_string());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "{label}: temporary files left");
        std::fs::remove_file(&file).unwrap();
    }
    assert_eq!(
        names,
        ["my_doc____.txt", "my_doc____.txt", "my_doc____.txt"],
        "both handlers make the same safe name"
    );
    // Unchanged: nothing comes back, the file is left alone.
    let unchanged: Vec<(&str, Command, Command)> = vec![
        (
            "theirs -> ours",
            Command::new(&q.qopen),
            our_editor(scratch.path(), "true"),
        ),
        (
            "ours -> theirs",
            Command::new(env!("CARGO_BIN_EXE_qopen-in-vm")),
            their_editor(scratch.path(), "true"),
        ),
    ];
    for (label, mut sender, editor) in unchanged {
        let file = dir.join("same.txt");
        std::fs::write(&file, b"same\n").unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file).unwrap());
        sender.arg(&file);
        let (sent, handled) = open_pipe(sender, editor);
        assert!(sent.status.success() && handled.status.success(), "{label}");
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&meta), ino, "{label}");
        assert_eq!(std::fs::read(&file).unwrap(), b"same\n", "{label}");
        std::fs::remove_file(&file).unwrap();
    }
}

#[test]
fn open_in_vm_handlers_refuse_the_same_requests() {
    need_root!();
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mark = scratch.path().join("opened");
    let edit = opener(&format!("touch '{}'; echo edited > \"$f\"", mark.display()));
    let field = |name: &[u8]| {
        let mut f = name.to_vec();
        f.resize(qubes_filecopy::openinvm::NAME_FIELD_LEN, 0);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("slash", [field(b"../../etc/x"), b"data".to_vec()].concat()),
        ("absolute", [field(b"/etc/x"), b"data".to_vec()].concat()),
        ("dotdot", [field(b".."), b"data".to_vec()].concat()),
        ("empty", [field(b""), b"data".to_vec()].concat()),
        ("truncated", field(b"a.txt")[..100].to_vec()),
    ];
    for (what, stream) in &cases {
        for (side, mut editor) in [
            ("ours", our_editor(scratch.path(), &edit)),
            ("theirs", their_editor(scratch.path(), &edit)),
        ] {
            let _ = std::fs::remove_file(&mark);
            let mut child = editor
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let data = stream.clone();
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&data);
            });
            let out = child.wait_with_output().unwrap();
            writer.join().unwrap();
            assert_eq!(
                out.status.code(),
                Some(1),
                "{side} {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.stdout.is_empty(), "{side} {what}: sent something back");
            assert!(!mark.exists(), "{side} {what}: the opener ran");
        }
    }
}

/// Our `qvm-open-in-dvm` (which takes the answer through `qopen-in-vm
/// --receive-into` and decides on the call's status) against Qubes'
/// handler, through a stand-in `qrexec-client-vm` with the exit-code rule of
/// Qubes' and ours (the service's when non-zero, else the local program's).
#[test]
fn open_in_dvm_front_end_with_their_handler() {
    need_root!();
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let edit = opener("sed -i s/original/edited/ \"$f\"");
    let editor = their_editor(scratch.path(), &edit);
    let service = scratch.path().join("service");
    let program = editor.get_args().map(|a| a.to_string_lossy().into_owned());
    let quoted: Vec<String> = program.map(|a| format!("'{a}'")).collect();
    std::fs::write(
        &service,
        format!(
            "#!/bin/sh\nexport QREXEC_REMOTE_DOMAIN=client1\nexec unshare {}\n",
            quoted.join(" ")
        ),
    )
    .unwrap();
    let client = scratch.path().join("qrexec-client-vm");
    std::fs::write(
        &client,
        format!(
            "#!/bin/sh\nshift 3\nd=$(mktemp -d)\nmkfifo \"$d/f\"\n\
             {{ '{}' < \"$d/f\"; echo $? > \"$d/s\"; }} | \"$@\" > \"$d/f\"\n\
             l=$?; r=$(cat \"$d/s\"); rm -rf \"$d\"; [ \"$r\" != 0 ] && exit \"$r\"; exit \"$l\"\n",
            service.display()
        ),
    )
    .unwrap();
    for script in [&service, &client] {
        std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dir = scratch.path().join("files");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("doc.txt");
    std::fs::write(&file, b"original\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qvm-open-in-dvm"))
        .arg(&file)
        .env("QREXEC_CLIENT_VM", &client)
        .env("QOPEN_IN_VM", env!("CARGO_BIN_EXE_qopen-in-vm"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"edited\n");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644, "mode kept");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "nothing left");
}
