//! Fuzzes the receiver (`qfile-unpacker`'s whole input): any byte stream
//! must be unpacked or refused without panicking, the receiver must always
//! answer with a parsable result, and nothing may appear next to the
//! incoming directory (all writes stay inside it).
#![no_main]

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qubes_filecopy::pack::read_answer;
use qubes_filecopy::unpack::{Limits, UnpackOptions, unpack};

fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("qubes-filecopy-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&base);
        base
    })
}

fn wipe(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.is_dir() {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
            if let Ok(entries) = std::fs::read_dir(path) {
                for entry in entries.flatten() {
                    wipe(&entry.path());
                }
            }
            let _ = std::fs::remove_dir(path);
        } else {
            let _ = std::fs::remove_file(path);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let incoming = base.join("incoming");
    wipe(&incoming);
    std::fs::create_dir(&incoming).expect("create the incoming directory");
    let dir = std::fs::File::open(&incoming).expect("open the incoming directory");
    let options = UnpackOptions {
        limits: Limits {
            max_bytes: 1 << 20,
            max_files: 64,
        },
        sync: false,
        ..UnpackOptions::default()
    };
    let mut reply = Vec::new();
    let outcome = unpack(data, &mut reply, dir.as_fd(), options);
    let answer = read_answer(&reply[..]).expect("the receiver always answers");
    assert_eq!(answer.error_code, outcome.code);
    let outside: Vec<_> = std::fs::read_dir(base)
        .expect("list the fuzz directory")
        .flatten()
        .map(|e| e.file_name())
        .filter(|name| name != "incoming")
        .collect();
    assert!(
        outside.is_empty(),
        "written outside the incoming directory: {outside:?}"
    );
});
