//! `qubes.OpenInVM`: open one file in another qube (usually a new
//! disposable) and take it back if it was changed there, with the wire
//! format of qubes-core-agent-linux's `qopen-in-vm` / `vm-file-editor`.
//!
//! The sender (`qopen-in-vm`, run by `qrexec-client-vm` behind
//! `qvm-open-in-vm` / `qvm-open-in-dvm`) writes a fixed 256-byte name field
//! (the file's base name, NUL-terminated and NUL-padded, prefixed with
//! `view-only-` for a read-only view; a longer name keeps its last 255
//! bytes), then the file's contents, and closes its end. The handler
//! (`vm-file-editor`, behind the `qubes.OpenInVM` service) writes the file
//! into a fresh private directory `$TMPDIR/<source qube>-XXXXXX`, runs the
//! opening program on it and, if the file changed, sends its new contents
//! back and closes. Nothing back means "unchanged".
//!
//! The protocol has no length or checksum: the end of the stream is the end
//! of the file. Both sides bound what they accept ([`max_file_bytes`]) and
//! write into a temporary file first; the sender's front end replaces the
//! original (by `rename`, in the same directory) only after the whole call,
//! the far side's handler included, ended with status 0 and the content
//! differs from what was sent.
//!
//! Everything the handler reads is peer input: the name is checked and made
//! safe here ([`parse_name`]), the contents are size-bounded
//! ([`copy_bounded`]).
#![deny(clippy::indexing_slicing)]

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Size of the name field (Qubes' `DVM_FILENAME_SIZE`).
pub const NAME_FIELD_LEN: usize = 256;
/// Prefix of the name for a view-only open (Qubes' `DVM_VIEW_ONLY_PREFIX`).
pub const VIEW_ONLY_PREFIX: &[u8] = b"view-only-";
/// Largest file either side accepts unless [`MAX_BYTES_ENV`] says otherwise.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 << 30;
/// Environment variable overriding [`DEFAULT_MAX_FILE_BYTES`] (bytes).
pub const MAX_BYTES_ENV: &str = "QUBES_OPEN_IN_VM_MAX_BYTES";
/// Environment variable naming the handler's opening program: a shell
/// command, run as `sh -c 'COMMAND "$1"' vm-file-editor FILE`.
pub const OPEN_COMMAND_ENV: &str = "QUBES_OPEN_IN_VM_COMMAND";

/// The byte limit in force: [`MAX_BYTES_ENV`] if set to a number, else
/// [`DEFAULT_MAX_FILE_BYTES`].
pub fn max_file_bytes() -> Result<u64, String> {
    match std::env::var_os(MAX_BYTES_ENV) {
        None => Ok(DEFAULT_MAX_FILE_BYTES),
        Some(value) => value
            .to_str()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                format!(
                    "${MAX_BYTES_ENV} is {:?}: expected a number of bytes",
                    value.to_string_lossy()
                )
            }),
    }
}

/// The sender's name field for `path` (as `qopen-in-vm` builds it).
pub fn encode_name(path: &[u8], view_only: bool) -> [u8; NAME_FIELD_LEN] {
    let mut field = [0u8; NAME_FIELD_LEN];
    let base = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    let prefix: &[u8] = if view_only { VIEW_ONLY_PREFIX } else { b"" };
    // Room for the name: the field less the prefix and the final NUL; a
    // longer name keeps its end (where the extension is).
    let room = NAME_FIELD_LEN - prefix.len() - 1;
    let base = base.get(base.len().saturating_sub(room)..).unwrap_or(base);
    for (slot, byte) in field.iter_mut().zip(prefix.iter().chain(base)) {
        *slot = *byte;
    }
    field
}

/// What the handler takes from the name field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestName {
    /// The name to create, made of `[0-9A-Za-z._+@-]` only (every other
    /// byte replaced by `_`, as Qubes' handler does for the openers' sake).
    pub name: String,
    pub view_only: bool,
}

/// A name field the handler refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// The stream ended inside the name field.
    Truncated { got: usize },
    /// No NUL in the 256 bytes.
    NotTerminated,
    /// A `/` in the name (Qubes refuses it too).
    Slash,
    /// Empty, `.` or `..` (after removing the view-only prefix).
    NotAFileName(String),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Truncated { got } => write!(
                f,
                "the stream ended inside the file name ({got} of {NAME_FIELD_LEN} bytes)"
            ),
            NameError::NotTerminated => write!(
                f,
                "the file name is not NUL-terminated within {NAME_FIELD_LEN} bytes"
            ),
            NameError::Slash => write!(f, "filename contains /"),
            NameError::NotAFileName(name) => {
                write!(f, "the file name {name:?} is not a file name")
            }
        }
    }
}

/// Check and clean the 256-byte name field read from the sender.
pub fn parse_name(field: &[u8]) -> Result<RequestName, NameError> {
    if field.len() < NAME_FIELD_LEN {
        return Err(NameError::Truncated { got: field.len() });
    }
    let field = field.get(..NAME_FIELD_LEN).unwrap_or(field);
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(NameError::NotTerminated)?;
    let raw = field.get(..end).unwrap_or_default();
    let (view_only, raw) = match raw.strip_prefix(VIEW_ONLY_PREFIX) {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    let mut name = String::with_capacity(raw.len());
    for &byte in raw {
        match byte {
            b'/' => return Err(NameError::Slash),
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'.' | b'_' | b'-' | b'+' | b'@' => {
                name.push(char::from(byte))
            }
            _ => name.push('_'),
        }
    }
    if name.is_empty() || name == "." || name == ".." {
        return Err(NameError::NotAFileName(name));
    }
    Ok(RequestName { name, view_only })
}

/// Read the name field: exactly [`NAME_FIELD_LEN`] bytes, or
/// [`NameError::Truncated`].
pub fn read_name<R: Read>(input: &mut R) -> Result<Result<RequestName, NameError>, std::io::Error> {
    let mut field = [0u8; NAME_FIELD_LEN];
    let mut got = 0;
    while got < NAME_FIELD_LEN {
        let rest = field.get_mut(got..).unwrap_or_default();
        match input.read(rest) {
            Ok(0) => return Ok(Err(NameError::Truncated { got })),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(parse_name(&field))
}

/// Why a bounded copy stopped.
#[derive(Debug)]
pub enum CopyError {
    /// More than the limit arrived.
    TooLarge {
        limit: u64,
    },
    Read(std::io::Error),
    Write(std::io::Error),
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyError::TooLarge { limit } => write!(
                f,
                "the file is larger than {limit} bytes (the limit; set ${MAX_BYTES_ENV} to change it)"
            ),
            CopyError::Read(e) => write!(f, "read: {e}"),
            CopyError::Write(e) => write!(f, "write: {e}"),
        }
    }
}

/// Copy `input` to its end into `output`, refusing more than `limit`
/// bytes; returns the byte count.
pub fn copy_bounded<R: Read, W: Write>(
    input: &mut R,
    output: &mut W,
    limit: u64,
) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        total = total.saturating_add(n as u64);
        if total > limit {
            return Err(CopyError::TooLarge { limit });
        }
        output
            .write_all(buf.get(..n).unwrap_or_default())
            .map_err(CopyError::Write)?;
    }
}

/// Why the handler refused or failed a request.
#[derive(Debug)]
pub enum RequestError {
    Name(NameError),
    Create(PathBuf, std::io::Error),
    Contents(PathBuf, CopyError),
    Io(std::io::Error),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Name(e) => write!(f, "refusing the request: {e}"),
            RequestError::Create(path, e) => write!(f, "cannot create {}: {e}", path.display()),
            RequestError::Contents(path, e) => write!(
                f,
                "receiving the contents of {}: {e}; the request is refused",
                path.display()
            ),
            RequestError::Io(e) => write!(f, "reading the request: {e}"),
        }
    }
}

/// A file the handler received.
#[derive(Debug)]
pub struct Received {
    pub path: PathBuf,
    pub view_only: bool,
    pub size: u64,
}

/// The handler's whole input: the name field, then the contents (at most
/// `limit` bytes), written to a new file (mode 0600, `O_EXCL`,
/// `O_NOFOLLOW`) in `dir`. On any error nothing is left in `dir`.
pub fn receive_request<R: Read>(
    input: &mut R,
    dir: &Path,
    limit: u64,
) -> Result<Received, RequestError> {
    let request = read_name(input)
        .map_err(RequestError::Io)?
        .map_err(RequestError::Name)?;
    let path = dir.join(&request.name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|e| RequestError::Create(path.clone(), e))?;
    let copied = copy_bounded(input, &mut file, limit).and_then(|size| {
        file.flush().map_err(CopyError::Write)?;
        Ok(size)
    });
    match copied {
        Ok(size) => Ok(Received {
            path,
            view_only: request.view_only,
            size,
        }),
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(&path);
            Err(RequestError::Contents(path, e))
        }
    }
}

/// What the handler compares before and after the opening program: a
/// change of any of these means the file was edited (Qubes compares only
/// the mtime's seconds, which misses a quick edit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// Whether two open files have the same contents.
pub fn same_contents(a: &mut File, b: &mut File) -> std::io::Result<bool> {
    if a.metadata()?.len() != b.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(a, &mut x)?;
        let m = read_full(b, &mut y)?;
        if n != m || x.get(..n) != y.get(..m) {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(buf.get_mut(got..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)] // reason: tests

    use super::*;

    fn field(bytes: &[u8]) -> Vec<u8> {
        let mut f = bytes.to_vec();
        f.resize(NAME_FIELD_LEN, 0);
        f
    }

    #[test]
    fn names_are_encoded_as_qopen_in_vm_does() {
        let f = encode_name(b"/home/user/report.odt", false);
        assert_eq!(&f[..11], b"report.odt\0");
        assert!(f[11..].iter().all(|&b| b == 0));
        let f = encode_name(b"a.txt", true);
        assert_eq!(&f[..16], b"view-only-a.txt\0");
        // A long name keeps its last 255 bytes (245 for view-only).
        let long = [b"x".repeat(300), b".pdf".to_vec()].concat();
        let f = encode_name(&long, false);
        assert_eq!(f[255], 0);
        assert!(f[..255].ends_with(b".pdf"));
        assert_eq!(f.iter().position(|&b| b == 0), Some(255));
        let f = encode_name(&long, true);
        assert!(f.starts_with(b"view-only-x"));
        assert_eq!(f.iter().position(|&b| b == 0), Some(255));
        assert_eq!(
            parse_name(&f).unwrap().name.len(),
            245,
            "prefix + 245 + NUL fill the field"
        );
    }

    #[test]
    fn a_good_name_is_kept() {
        let r = parse_name(&field(b"Report-2024_v2+final@x.odt")).unwrap();
        assert_eq!(r.name, "Report-2024_v2+final@x.odt");
        assert!(!r.view_only);
        let r = parse_name(&field(b"view-only-notes.txt")).unwrap();
        assert_eq!((r.name.as_str(), r.view_only), ("notes.txt", true));
    }

    #[test]
    fn other_bytes_become_underscores() {
        let r = parse_name(&field("a b\x01\x1b[31m\u{e9}\u{202e}.txt".as_bytes())).unwrap();
        assert_eq!(r.name, "a_b___31m_____.txt");
        assert!(r.name.bytes().all(|b| b.is_ascii_graphic()));
        // Invalid UTF-8 too.
        let r = parse_name(&field(b"\xff\xfe.txt")).unwrap();
        assert_eq!(r.name, "__.txt");
    }

    #[test]
    fn slashes_and_dot_names_are_refused() {
        assert_eq!(parse_name(&field(b"../etc/passwd")), Err(NameError::Slash));
        assert_eq!(parse_name(&field(b"/etc/passwd")), Err(NameError::Slash));
        assert_eq!(parse_name(&field(b"a/b")), Err(NameError::Slash));
        assert_eq!(parse_name(&field(b"view-only-x/y")), Err(NameError::Slash));
        for bad in [&b".."[..], b".", b"", b"view-only-", b"view-only-.."] {
            assert!(
                matches!(parse_name(&field(bad)), Err(NameError::NotAFileName(_))),
                "{bad:?}"
            );
        }
        // "..x" and "x.." are ordinary names in one directory.
        assert_eq!(parse_name(&field(b"..x")).unwrap().name, "..x");
    }

    #[test]
    fn short_and_unterminated_fields_are_refused() {
        assert_eq!(parse_name(b"abc\0"), Err(NameError::Truncated { got: 4 }));
        assert_eq!(
            parse_name(&[b'a'; NAME_FIELD_LEN]),
            Err(NameError::NotTerminated)
        );
        let mut short: &[u8] = &field(b"x.txt")[..100];
        assert_eq!(
            read_name(&mut short).unwrap(),
            Err(NameError::Truncated { got: 100 })
        );
        assert!(
            NameError::Truncated { got: 100 }
                .to_string()
                .contains("100 of 256")
        );
    }

    #[test]
    fn bytes_after_the_nul_are_ignored() {
        let mut f = field(b"a.txt");
        f[200] = b'/';
        assert_eq!(parse_name(&f).unwrap().name, "a.txt");
    }

    #[test]
    fn copies_are_bounded() {
        let mut out = Vec::new();
        assert_eq!(copy_bounded(&mut &[7u8; 10][..], &mut out, 10).unwrap(), 10);
        assert_eq!(out, [7u8; 10]);
        let mut out = Vec::new();
        let err = copy_bounded(&mut &[7u8; 11][..], &mut out, 10).unwrap_err();
        assert!(matches!(err, CopyError::TooLarge { limit: 10 }));
        assert!(err.to_string().contains(MAX_BYTES_ENV));
    }

    #[test]
    fn a_request_lands_in_its_directory_or_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut stream = field(b"doc.txt");
        stream.extend_from_slice(b"hello");
        let got = receive_request(&mut &stream[..], dir.path(), 100).unwrap();
        assert_eq!(got.path, dir.path().join("doc.txt"));
        assert_eq!((got.size, got.view_only), (5, false));
        assert_eq!(std::fs::read(&got.path).unwrap(), b"hello");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&got.path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The same name again: O_EXCL refuses, the first file stays.
        let err = receive_request(&mut &stream[..], dir.path(), 100).unwrap_err();
        assert!(matches!(err, RequestError::Create(..)), "{err}");
        std::fs::remove_file(&got.path).unwrap();
        // Oversize: refused, nothing left.
        let mut big = field(b"big.bin");
        big.extend(std::iter::repeat_n(1u8, 101));
        let err = receive_request(&mut &big[..], dir.path(), 100).unwrap_err();
        assert!(err.to_string().contains("larger than 100 bytes"), "{err}");
        // A symlink planted at the name is not followed.
        let target = dir.path().join("target");
        std::os::unix::fs::symlink(&target, dir.path().join("doc.txt")).unwrap();
        assert!(receive_request(&mut &stream[..], dir.path(), 100).is_err());
        assert!(!target.exists());
        std::fs::remove_file(dir.path().join("doc.txt")).unwrap();
        // Hostile names: nothing created.
        for bad in [&b"../x"[..], b"..", b"/etc/x"] {
            let mut s = field(bad);
            s.extend_from_slice(b"data");
            assert!(receive_request(&mut &s[..], dir.path(), 100).is_err());
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn contents_compare() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        std::fs::write(&a, vec![5u8; 200_000]).unwrap();
        std::fs::write(&b, vec![5u8; 200_000]).unwrap();
        let mut other = vec![5u8; 200_000];
        other[150_000] = 6;
        std::fs::write(&c, other).unwrap();
        let open = |p: &Path| File::open(p).unwrap();
        assert!(same_contents(&mut open(&a), &mut open(&b)).unwrap());
        assert!(!same_contents(&mut open(&a), &mut open(&c)).unwrap());
    }
}
