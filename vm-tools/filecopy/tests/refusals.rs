//! Every refusal of the receiver, on hand-built hostile streams: the code
//! sent back, the last name, the exit status, nothing written outside the
//! incoming directory and no half-written file left inside it.
#![allow(clippy::unwrap_used)] // reason: test helpers; a panic is a test failure

mod common;

use std::os::fd::AsFd;
use std::path::Path;

use common::{end, entry, entry_with_len};
use qubes_filecopy::errno::*;
use qubes_filecopy::pack::{Answer, judge, read_answer};
use qubes_filecopy::unpack::{Limits, Outcome, UnpackOptions, unpack};

const REG: u32 = 0o100_644;
const DIR: u32 = 0o040_755;
const LNK: u32 = 0o120_777;

struct Run {
    outcome: Outcome,
    answer: Answer,
    incoming: Vec<String>,
    outside: Vec<String>,
}

/// Unpack `stream` into `<tmp>/home/QubesIncoming/src` and list what is in
/// the incoming directory and what is outside it (in `<tmp>`).
fn run_with(stream: &[u8], options: UnpackOptions, prepare: impl FnOnce(&Path, &Path)) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let incoming = tmp.path().join("home/QubesIncoming/src");
    std::fs::create_dir_all(&incoming).unwrap();
    std::fs::create_dir(tmp.path().join("outside")).unwrap();
    prepare(tmp.path(), &incoming);
    let before_outside = outside_listing(tmp.path());
    let dir = std::fs::File::open(&incoming).unwrap();
    let mut reply = Vec::new();
    let outcome = unpack(stream, &mut reply, dir.as_fd(), options);
    let answer = read_answer(&reply[..]).expect("the receiver always answers");
    let outside = outside_listing(tmp.path());
    assert_eq!(
        before_outside, outside,
        "something was written outside the incoming directory"
    );
    let listing = common::describe(&incoming);
    common::make_removable(tmp.path());
    Run {
        outcome,
        answer,
        incoming: listing,
        outside,
    }
}

fn outside_listing(tmp: &Path) -> Vec<String> {
    let mut all = common::describe(tmp);
    all.retain(|line| {
        !line.starts_with("home/QubesIncoming/src/") && !line.starts_with("home/QubesIncoming/src ")
    });
    all
}

fn run(stream: &[u8]) -> Run {
    run_with(stream, UnpackOptions::default(), |_, _| {})
}

fn assert_refused(run: &Run, code: u32, last: Option<&[u8]>) {
    assert_eq!(run.outcome.code, code, "{:?}", run.outcome);
    assert_eq!(run.answer.error_code, code);
    assert_eq!(run.outcome.exit_code(), (code & 0xFF) as i32);
    assert_ne!(run.outcome.exit_code(), 0);
    if let Some(last) = last {
        assert_eq!(run.answer.last_name, last);
    }
    assert!(run.outcome.message.is_some());
    let _ = &run.outside;
}

#[test]
fn accepts_a_plain_stream_and_reports_crc() {
    let mut s = Vec::new();
    entry(&mut s, b"d", DIR, b"");
    entry(&mut s, b"d/f", REG, b"hello");
    entry(&mut s, b"d/l", LNK, b"f");
    entry(&mut s, b"d", DIR, b"");
    end(&mut s);
    let r = run(&s);
    assert_eq!(r.outcome.code, 0, "{:?}", r.outcome);
    let mut crc = qubes_filecopy::crc32::Crc32::new();
    crc.update(&s);
    assert_eq!(r.answer.crc32, u64::from(crc.value()));
    assert_eq!(judge(Some(&r.answer), crc.value()), Ok(()));
    assert_eq!(r.answer.last_name, b"d");
    assert!(
        r.incoming
            .iter()
            .any(|l| l.starts_with("d/f file 644 size 5 mtime 1500000000.123456789")),
        "{:?}",
        r.incoming
    );
    assert!(r.incoming.contains(&"d/l link -> f".to_string()));
}

#[test]
fn refuses_parent_directory_names() {
    for name in [&b"../evil"[..], b"a/../../evil", b"..", b"a/.."] {
        let mut s = Vec::new();
        entry(&mut s, name, REG, b"x");
        end(&mut s);
        let r = run(&s);
        assert_refused(&r, EILSEQ, Some(name));
        assert!(r.incoming.is_empty());
    }
}

#[test]
fn refuses_absolute_names() {
    let mut s = Vec::new();
    entry(&mut s, b"/tmp/evil", REG, b"x");
    end(&mut s);
    assert_refused(&run(&s), EILSEQ, Some(b"/tmp/evil"));
}

#[test]
fn refuses_control_characters_and_bad_utf8() {
    for name in [
        &b"a\nb"[..],
        b"esc\x1b[0m",
        b"\xff\xfe",
        b"rtl\xe2\x80\xaeexe.txt",
        b"a\x7f",
    ] {
        let mut s = Vec::new();
        entry(&mut s, name, REG, b"x");
        end(&mut s);
        assert_refused(&run(&s), EILSEQ, Some(name));
    }
    // the same names pass with --allow-all-names
    let mut s = Vec::new();
    entry(&mut s, b"a\nb", REG, b"x");
    end(&mut s);
    let mut options = UnpackOptions::default();
    options.names.allow_unsafe_characters = true;
    assert_eq!(run_with(&s, options, |_, _| {}).outcome.code, 0);
}

#[test]
fn refuses_bad_directory_names() {
    let mut s = Vec::new();
    entry(&mut s, b"../d", DIR, b"");
    end(&mut s);
    assert_refused(&run(&s), EILSEQ, Some(b"../d"));
}

#[test]
fn refuses_symlinks_out_of_the_tree() {
    for (name, target) in [
        (&b"d/l"[..], &b"/etc"[..]),
        (b"l", b"x"),
        (b"d/l", b"../x"),
        (b"d/e/l", b"../../x"),
    ] {
        let mut s = Vec::new();
        entry(&mut s, b"d", DIR, b"");
        entry(&mut s, b"d/e", DIR, b"");
        entry(&mut s, name, LNK, target);
        end(&mut s);
        let r = run(&s);
        assert_refused(&r, ENOLINK, Some(target));
        assert!(
            !r.incoming.iter().any(|l| l.contains("link")),
            "{:?}",
            r.incoming
        );
    }
}

#[test]
fn never_follows_a_received_symlink() {
    // d/l -> . is a valid link, but d/l/x must not be written through it.
    let mut s = Vec::new();
    entry(&mut s, b"d", DIR, b"");
    entry(&mut s, b"d/l", LNK, b".");
    entry(&mut s, b"d/l/x", REG, b"through the link");
    end(&mut s);
    let r = run(&s);
    assert_ne!(r.outcome.code, 0);
    assert!(
        !r.incoming.iter().any(|l| l.starts_with("d/x")),
        "{:?}",
        r.incoming
    );
}

#[test]
fn never_follows_a_planted_symlink() {
    // A symlink already in the incoming directory (left by an earlier copy
    // with --allow-unsafe-symlinks, or by the user) pointing outside.
    let mut s = Vec::new();
    entry(&mut s, b"planted/x", REG, b"escape");
    end(&mut s);
    let r = run_with(&s, UnpackOptions::default(), |tmp, incoming| {
        std::os::unix::fs::symlink(tmp.join("outside"), incoming.join("planted")).unwrap();
    });
    assert_ne!(r.outcome.code, 0);
    assert_eq!(r.answer.last_name, b"planted");
    let mut s = Vec::new();
    entry(&mut s, b"planted", REG, b"escape");
    end(&mut s);
    let r = run_with(&s, UnpackOptions::default(), |tmp, incoming| {
        std::os::unix::fs::symlink(tmp.join("outside/file"), incoming.join("planted")).unwrap();
    });
    assert_refused(&r, EEXIST, Some(b"planted"));
}

#[test]
fn refuses_oversize_files() {
    let mut s = Vec::new();
    entry_with_len(&mut s, b"huge", REG, 1 << 63, b"");
    end(&mut s);
    let r = run(&s);
    assert_refused(&r, EDQUOT, Some(b"huge"));
    assert!(r.incoming.is_empty(), "{:?}", r.incoming);
}

#[test]
fn enforces_byte_and_file_limits() {
    let mut s = Vec::new();
    entry(&mut s, b"a", REG, b"12345");
    entry(&mut s, b"b", REG, b"678");
    end(&mut s);
    let mut options = UnpackOptions {
        limits: Limits {
            max_bytes: 7,
            max_files: 0,
        },
        ..UnpackOptions::default()
    };
    let r = run_with(&s, options, |_, _| {});
    assert_refused(&r, EDQUOT, Some(b"b"));
    assert_eq!(r.incoming.len(), 1, "{:?}", r.incoming);
    options.limits = Limits {
        max_bytes: 0,
        max_files: 1,
    };
    let r = run_with(&s, options, |_, _| {});
    assert_refused(&r, EDQUOT, Some(b"a"));
    assert_eq!(r.incoming.len(), 1, "{:?}", r.incoming);
}

#[test]
fn refuses_overlong_names_and_targets() {
    let mut s = Vec::new();
    s.extend_from_slice(
        &qubes_filecopy::wire::FileHeader {
            namelen: 16384,
            mode: REG,
            ..Default::default()
        }
        .emit(),
    );
    let r = run(&s);
    assert_refused(&r, ENAMETOOLONG, None);
    assert!(r.answer.last_name.is_empty());
    let mut s = Vec::new();
    entry(&mut s, b"d", DIR, b"");
    entry(&mut s, b"d/l", LNK, &vec![b'a'; 16384]);
    end(&mut s);
    assert_refused(&run(&s), ENAMETOOLONG, Some(b"d/l"));
}

#[test]
fn leaves_no_half_written_file() {
    for use_tmpfile in [true, false] {
        let mut s = Vec::new();
        entry_with_len(&mut s, b"partial", REG, 1000, b"only some bytes");
        let options = UnpackOptions {
            use_tmpfile,
            ..UnpackOptions::default()
        };
        let r = run_with(&s, options, |_, _| {});
        assert_refused(&r, LEGAL_EOF, Some(b"partial"));
        assert!(
            r.incoming.is_empty(),
            "tmpfile {use_tmpfile}: {:?}",
            r.incoming
        );
    }
}

#[test]
fn refuses_a_stream_without_end_marker() {
    let mut s = Vec::new();
    entry(&mut s, b"f", REG, b"x");
    let r = run(&s);
    assert_refused(&r, EREMOTEIO, Some(b"f"));
    // the complete file before the cut is kept, as Qubes keeps it
    assert_eq!(r.incoming.len(), 1);
}

#[test]
fn refuses_other_file_types() {
    let mut s = Vec::new();
    entry(&mut s, b"fifo", 0o010_644, b"");
    end(&mut s);
    assert_refused(&run(&s), EINVAL, Some(b"fifo"));
    let mut s = Vec::new();
    entry(&mut s, b"d", DIR, b"");
    end(&mut s);
    let options = UnpackOptions {
        allow_directories: false,
        ..UnpackOptions::default()
    };
    assert_refused(&run_with(&s, options, |_, _| {}), EINVAL, Some(b"d"));
}

#[test]
fn refuses_bad_nanoseconds() {
    let mut s = Vec::new();
    s.extend_from_slice(
        &qubes_filecopy::wire::FileHeader {
            namelen: 2,
            mode: REG,
            filelen: 1,
            mtime_nsec: 1_000_000_000,
            ..Default::default()
        }
        .emit(),
    );
    s.extend_from_slice(b"f\0x");
    end(&mut s);
    let r = run(&s);
    assert_refused(&r, EINVAL, Some(b"f"));
    assert!(r.incoming.is_empty());
}

#[test]
fn refuses_to_overwrite() {
    let mut s = Vec::new();
    entry(&mut s, b"f", REG, b"new");
    end(&mut s);
    let r = run_with(&s, UnpackOptions::default(), |_, incoming| {
        std::fs::write(incoming.join("f"), b"old").unwrap()
    });
    assert_refused(&r, EEXIST, Some(b"f"));
    assert!(r.incoming[0].contains("size 3"));
}

#[test]
fn sender_detects_a_crc_mismatch() {
    let answer = Answer {
        error_code: 0,
        crc32: 0xDEAD_BEEF,
        last_name: b"f".to_vec(),
        last_name_cut: false,
    };
    assert_eq!(
        judge(Some(&answer), 0x1234_5678),
        Err(Some("File transfer failed: checksum mismatch".to_string()))
    );
}
