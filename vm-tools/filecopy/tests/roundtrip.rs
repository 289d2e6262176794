//! Our `qfile-agent` piped into our `qfile-unpacker` (each one's stdout into
//! the other's stdin), and the `qvm-copy`/`qvm-move` front ends through a
//! stand-in `qrexec-client-vm` that does the same piping.
#![allow(clippy::unwrap_used)] // reason: test helpers; a panic is a test failure

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

pub fn pipe(mut agent: Command, mut unpacker: Command) -> (Output, Output) {
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
    let sent = sender.wait_with_output().unwrap();
    let received = receiver.wait_with_output().unwrap();
    (sent, received)
}

fn ours(bin: &str) -> Command {
    Command::new(match bin {
        "agent" => env!("CARGO_BIN_EXE_qfile-agent"),
        _ => env!("CARGO_BIN_EXE_qfile-unpacker"),
    })
}

fn unpacker_into(home: &Path, source: &str) -> Command {
    let mut command = ours("unpacker");
    command
        .env("HOME", home)
        .env("QREXEC_REMOTE_DOMAIN", source);
    command
}

#[test]
fn copies_a_tree_with_its_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    common::make_tree(&src, 20 * 1024 * 1024 + 17);
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let mut agent = ours("agent");
    agent.arg(src.join("tree"));
    let (sent, received) = pipe(agent, unpacker_into(&home, "client1"));
    assert!(
        sent.status.success(),
        "agent: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        received.status.success(),
        "unpacker: {}",
        String::from_utf8_lossy(&received.stderr)
    );
    let incoming = home.join("QubesIncoming/client1");
    let expected = common::describe(&src);
    assert_eq!(common::describe(&incoming), expected);
    assert!(
        expected
            .iter()
            .any(|l| l.starts_with("tree/a/big.bin file 755 size 20971537 mtime 1300000000.0")),
        "{expected:?}"
    );
    assert!(
        expected
            .iter()
            .any(|l| l == "tree/a/b/link-to-big link -> ../big.bin")
    );
    assert!(
        expected
            .iter()
            .any(|l| l.starts_with("tree/empty file 644 size 0 mtime 1400000000.999999999"))
    );
    assert!(expected.iter().any(|l| l.starts_with("tree/ro dir 555")));
    common::make_removable(tmp.path());
}

#[test]
fn refused_copy_fails_on_both_sides_with_qubes_message() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"one").unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join("QubesIncoming/vm")).unwrap();
    std::fs::write(home.join("QubesIncoming/vm/f"), b"already").unwrap();
    let mut agent = ours("agent");
    agent.arg(tmp.path().join("f"));
    let (sent, received) = pipe(agent, unpacker_into(&home, "vm"));
    assert_eq!(sent.status.code(), Some(1));
    assert_eq!(received.status.code(), Some(17));
    let message = String::from_utf8_lossy(&sent.stderr);
    assert!(
        message.contains("A file named \"f\" already exists in QubesIncoming dir"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(home.join("QubesIncoming/vm/f")).unwrap(),
        b"already"
    );
}

/// A stand-in `qrexec-client-vm`: `--filter-escape-chars-stderr -- TARGET
/// SERVICE AGENT ARGS...` runs AGENT piped into our unpacker with
/// QREXEC_REMOTE_DOMAIN=client1 and HOME=$FAKE_TARGET_HOME, and logs the
/// target and service.
fn fake_client(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("qrexec-client-vm");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = --filter-escape-chars-stderr ] || exit 99\n[ \"$2\" = -- ] || exit 98\n\
             echo \"$3 $4\" >> \"$FAKE_LOG\"\nshift 4\nfifo=$(mktemp -u)\nmkfifo \"$fifo\"\n\
             HOME=\"$FAKE_TARGET_HOME\" QREXEC_REMOTE_DOMAIN=client1 {} < \"$fifo\" | \"$@\" > \"$fifo\"\nstatus=$?\nrm -f \"$fifo\"\nexit $status\n",
            env!("CARGO_BIN_EXE_qfile-unpacker")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn qvm_copy_and_qvm_move_front_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let tree = common::make_tree(&src, 4096);
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let log = tmp.path().join("log");
    let client = fake_client(tmp.path());
    let expected = common::describe(&src);
    let front = |name: &str, args: &[&Path]| {
        let bin = match name {
            "qvm-copy-to-vm" => env!("CARGO_BIN_EXE_qvm-copy-to-vm"),
            "qvm-move-to-vm" => env!("CARGO_BIN_EXE_qvm-move-to-vm"),
            "qvm-copy" => env!("CARGO_BIN_EXE_qvm-copy"),
            _ => env!("CARGO_BIN_EXE_qvm-move"),
        };
        Command::new(bin)
            .arg("--without-progress")
            .args(args)
            .env("QREXEC_CLIENT_VM", &client)
            .env("QFILE_AGENT", env!("CARGO_BIN_EXE_qfile-agent"))
            .env("FAKE_TARGET_HOME", &home)
            .env("FAKE_LOG", &log)
            .output()
            .unwrap()
    };
    let out = front("qvm-copy-to-vm", &[Path::new("client2"), &tree]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        common::describe(&home.join("QubesIncoming/client1")),
        expected
    );
    assert!(tree.exists(), "copy keeps the source");
    // A move that collides fails, and keeps its source.
    let solo = tmp.path().join("solo");
    std::fs::write(&solo, b"mine").unwrap();
    std::fs::write(home.join("QubesIncoming/client1/solo"), b"theirs").unwrap();
    let out = front("qvm-move", &[&solo]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("A file named \"solo\" already exists in QubesIncoming dir")
    );
    assert_eq!(
        std::fs::read(&solo).unwrap(),
        b"mine",
        "a failed move must keep the source"
    );
    common::make_removable(&home);
    std::fs::remove_dir_all(home.join("QubesIncoming")).unwrap();
    // `rm -rf` of a read-only directory's contents needs root: make the
    // tree removable (modes only) before moving it.
    common::make_removable(&tree);
    let expected = common::describe(&src);
    let out = front("qvm-move-to-vm", &[Path::new("client2"), &tree]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        common::describe(&home.join("QubesIncoming/client1")),
        expected
    );
    assert!(!tree.exists(), "a successful move removes the source");
    // A name Qubes' safe-name check refuses selects the allow-all-names service.
    std::fs::write(src.join("bad\u{7}name"), b"x").unwrap();
    let _ = front("qvm-copy", &[&src.join("bad\u{7}name")]);
    // A symlink the receiver would refuse is refused before anything is sent.
    std::os::unix::fs::symlink("/etc", src.join("etc-link")).unwrap();
    let out = front("qvm-copy", &[&src]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Refusing to copy unsafe symbolic link"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [
            "client2 qubes.Filecopy",
            "@default qubes.Filecopy",
            "client2 qubes.Filecopy",
            "@default qubes.Filecopy+allow-all-names"
        ]
    );
    common::make_removable(tmp.path());
}
