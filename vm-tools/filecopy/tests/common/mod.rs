//! Helpers shared by the integration tests: hand-built streams and tree
//! comparisons.
#![allow(clippy::unwrap_used)] // reason: test helpers; a panic is a test failure
#![allow(dead_code)]

pub mod qubes_c;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use qubes_filecopy::wire::FileHeader;

/// Append one entry (header, name with NUL, payload) to a stream.
pub fn entry(stream: &mut Vec<u8>, name: &[u8], mode: u32, payload: &[u8]) {
    entry_with_len(stream, name, mode, payload.len() as u64, payload);
}

pub fn entry_with_len(stream: &mut Vec<u8>, name: &[u8], mode: u32, filelen: u64, payload: &[u8]) {
    let header = FileHeader {
        namelen: name.len() as u32 + 1,
        mode,
        filelen,
        atime: 1_600_000_000,
        atime_nsec: 5,
        mtime: 1_500_000_000,
        mtime_nsec: 123_456_789,
    };
    stream.extend_from_slice(&header.emit());
    stream.extend_from_slice(name);
    stream.push(0);
    stream.extend_from_slice(payload);
}

pub fn end(stream: &mut Vec<u8>) {
    stream.extend_from_slice(&FileHeader::end_marker().emit());
}

/// A listing of a tree: relative path, kind, permissions, size, mtime
/// (seconds and nanoseconds for files), symlink target, content hash.
pub fn describe(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, path: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for child in entries {
        let meta = std::fs::symlink_metadata(&child).unwrap();
        let rel = child.strip_prefix(root).unwrap().display().to_string();
        if meta.file_type().is_symlink() {
            out.push(format!(
                "{rel} link -> {}",
                std::fs::read_link(&child).unwrap().display()
            ));
        } else if meta.is_dir() {
            out.push(format!(
                "{rel} dir {:o} mtime {}.{}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.mtime_nsec()
            ));
            walk(root, &child, out);
        } else {
            let data = std::fs::read(&child).unwrap();
            let mut crc = qubes_filecopy::crc32::Crc32::new();
            crc.update(&data);
            out.push(format!(
                "{rel} file {:o} size {} mtime {}.{} crc {:08x}",
                meta.mode() & 0o7777,
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec(),
                crc.value()
            ));
        }
    }
}

/// Build the standard test tree under `parent/tree`: nested directories, a
/// file of `big` bytes, a symlink inside the tree, an empty file, a
/// read-only directory, chosen mtimes.
pub fn make_tree(parent: &Path, big: usize) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let tree = parent.join("tree");
    std::fs::create_dir_all(tree.join("a/b/c")).unwrap();
    std::fs::create_dir_all(tree.join("ro")).unwrap();
    std::fs::write(tree.join("a/b/c/deep.txt"), b"deep\n").unwrap();
    std::fs::write(tree.join("empty"), b"").unwrap();
    std::fs::write(
        tree.join("caf\u{e9} \u{65e5}\u{672c}.txt"),
        "unicode name\n",
    )
    .unwrap();
    let data: Vec<u8> = (0..big)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(tree.join("a/big.bin"), &data).unwrap();
    std::fs::write(tree.join("ro/inside"), b"x").unwrap();
    std::os::unix::fs::symlink("../big.bin", tree.join("a/b/link-to-big")).unwrap();
    std::os::unix::fs::symlink("c/deep.txt", tree.join("a/b/link-to-deep")).unwrap();
    std::fs::set_permissions(
        tree.join("a/b/c/deep.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(
        tree.join("a/big.bin"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // mtimes (directories last, deepest first)
    let set = |p: &str, secs: i64, nsec: i64| {
        let file = std::fs::File::open(tree.join(p)).unwrap();
        let ts = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: secs,
                tv_nsec: nsec as _,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: secs,
                tv_nsec: nsec as _,
            },
        };
        rustix::fs::futimens(&file, &ts).unwrap();
    };
    set("a/b/c/deep.txt", 1_234_567_890, 111_222_333);
    set("a/big.bin", 1_300_000_000, 0);
    set("empty", 1_400_000_000, 999_999_999);
    set("ro/inside", 1_000_000_000, 1);
    set("a/b/c", 1_100_000_000, 42);
    set("a/b", 1_100_000_001, 43);
    set("a", 1_100_000_002, 44);
    set("ro", 1_100_000_003, 45);
    std::fs::set_permissions(tree.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
    tree
}

/// Make everything under `path` writable again so the tempdir can go.
pub fn make_removable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.is_dir()
    {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                make_removable(&entry.path());
            }
        }
    }
}
