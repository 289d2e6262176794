//! The receiving side (`qfile-unpacker`, the `qubes.Filecopy` service): reads
//! a qrexec-lib stream from another qube and recreates the tree below one
//! incoming directory.
//!
//! Must never: write outside the incoming directory (every path is validated
//! by [`crate::names`] first, then opened component by component with
//! `openat(O_NOFOLLOW|O_DIRECTORY)` from the incoming directory's fd, so no
//! symlink is ever followed, received or pre-existing); leave a half-written
//! file (contents go to an `O_TMPFILE` inode, get their mode and times, and
//! only then are linked in; without `O_TMPFILE` the file is created with mode
//! 0 and unlinked on any error); panic or trust a length from the stream.
//! Errors are answered to the sender with Qubes' `result_header` /
//! `result_header_ext` and the process exits with the errno, as Qubes' does.
#![deny(clippy::indexing_slicing)]

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::crc32::Crc32;
use crate::errno::{EDQUOT, EILSEQ, EINVAL, ENAMETOOLONG, ENOLINK, EREMOTEIO, LEGAL_EOF};
use crate::names::{self, NameFlags};
use crate::wire::{
    EntryKind, FILE_HEADER_LEN, FileHeader, FileHeaderPacket, MAX_PATH_LENGTH, ResultReport,
};

/// Limits on one transfer; 0 means unlimited (Qubes' qfile-unpacker sets
/// none; its library enforces them when a caller does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_files: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    pub names: NameFlags,
    pub limits: Limits,
    pub allow_symlinks: bool,
    pub allow_directories: bool,
    pub verbose: bool,
    /// Use `O_TMPFILE` + `linkat` through this `/proc/self/fd` directory.
    pub use_tmpfile: bool,
    /// `syncfs` the incoming directory's filesystem before answering (as
    /// Qubes does); only the fuzzer turns it off.
    pub sync: bool,
}

impl Default for UnpackOptions {
    /// qfile-unpacker's defaults: directories, symlinks (targets checked,
    /// non-canonical forms allowed), safe characters only, no limits.
    fn default() -> Self {
        Self {
            names: NameFlags {
                allow_non_canonical_symlinks: true,
                ..NameFlags::default()
            },
            limits: Limits::default(),
            allow_symlinks: true,
            allow_directories: true,
            verbose: false,
            use_tmpfile: true,
            sync: true,
        }
    }
}

/// How a transfer ended: the code sent to the sender (0 on success) and the
/// process exit status that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: u32,
    pub last_name: Option<Vec<u8>>,
    /// Human-readable reason for the receiver's own stderr; `None` on success.
    pub message: Option<String>,
    pub files: u64,
    pub bytes: u64,
}

impl Outcome {
    /// Qubes' unpacker exits with the errno (truncated by `exit()`); an
    /// invalid timestamp makes it exit 1.
    pub fn exit_code(&self) -> i32 {
        (self.code & 0xFF) as i32
    }
}

#[derive(Debug)]
struct Refusal {
    code: u32,
    last_name: Option<Vec<u8>>,
    message: String,
}

fn refuse(code: u32, name: Option<&[u8]>, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        last_name: name.map(<[u8]>::to_vec),
        message: message.into(),
    }
}

fn errno_of(error: rustix::io::Errno) -> u32 {
    error.raw_os_error().unsigned_abs()
}

fn io_errno(error: &io::Error) -> u32 {
    error.raw_os_error().map_or(EINVAL, i32::unsigned_abs)
}

/// Printable form of an untrusted name for messages.
pub fn printable(name: &[u8]) -> String {
    name.iter()
        .map(|&b| {
            if (0x20..=0x7E).contains(&b) && b != b'"' {
                char::from(b)
            } else {
                '_'
            }
        })
        .collect()
}

enum ReadEnd {
    Eof,
    Error(u32),
}

/// The input stream, with the CRC of every byte consumed.
struct CrcReader<R> {
    inner: R,
    crc: Crc32,
}

impl<R: Read> CrcReader<R> {
    fn read_all(&mut self, buf: &mut [u8]) -> Result<(), ReadEnd> {
        let mut got = 0;
        while let Some(rest) = buf.get_mut(got..) {
            if rest.is_empty() {
                break;
            }
            match self.inner.read(rest) {
                Ok(0) => return Err(ReadEnd::Eof),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadEnd::Error(io_errno(&e))),
            }
        }
        self.crc.update(buf);
        Ok(())
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, ReadEnd> {
        loop {
            match self.inner.read(buf) {
                Ok(0) => return Err(ReadEnd::Eof),
                Ok(n) => {
                    self.crc.update(buf.get(..n).unwrap_or(&[]));
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadEnd::Error(io_errno(&e))),
            }
        }
    }
}

const COPY_BUFFER: usize = 128 * 1024;

struct Unpacker<'a, R> {
    input: CrcReader<R>,
    dir: BorrowedFd<'a>,
    procfs: Option<OwnedFd>,
    options: UnpackOptions,
    total_bytes: u64,
    total_files: u64,
    buffer: Vec<u8>,
}

/// Unpack one stream from `input` into `dir`, answer on `output`, and say how
/// it went. Never panics on any input.
pub fn unpack<R: Read, W: Write>(
    input: R,
    mut output: W,
    dir: BorrowedFd<'_>,
    options: UnpackOptions,
) -> Outcome {
    let procfs = if options.use_tmpfile {
        rustix::fs::open(
            "/proc/self/fd",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
    } else {
        None
    };
    let mut unpacker = Unpacker {
        input: CrcReader {
            inner: input,
            crc: Crc32::new(),
        },
        dir,
        procfs,
        options,
        total_bytes: 0,
        total_files: 0,
        buffer: vec![0u8; COPY_BUFFER],
    };
    let mut last_name: Vec<u8> = Vec::new();
    let result = unpacker.run(&mut last_name);
    // Make what was written durable before saying so (as Qubes' syncfs).
    if options.sync {
        let _ = rustix::fs::syncfs(dir);
    }
    let (code, last, message) = match result {
        Ok(()) => (0, Some(last_name), None),
        Err(refusal) => (refusal.code, refusal.last_name, Some(refusal.message)),
    };
    let report = ResultReport {
        error_code: code,
        crc32: u64::from(unpacker.input.crc.value()),
        last_name: last.clone(),
    };
    if let Err(error) = output
        .write_all(&report.emit())
        .and_then(|()| output.flush())
    {
        eprintln!("qfile-unpacker: cannot send the result to the sender: {error}");
    }
    Outcome {
        code,
        last_name: last,
        message,
        files: unpacker.total_files,
        bytes: unpacker.total_bytes,
    }
}

/// Open the directory holding the last component of `name`, one component at
/// a time, never following a symlink. Returns the fd (if not `dir` itself)
/// and the last component.
fn open_parent<'n>(
    dir: BorrowedFd<'_>,
    name: &'n [u8],
) -> Result<(Option<OwnedFd>, &'n [u8]), Refusal> {
    let mut components = name.split(|&b| b == b'/').peekable();
    let mut current: Option<OwnedFd> = None;
    while let Some(component) = components.next() {
        if components.peek().is_none() {
            return Ok((current, component));
        }
        if component.is_empty() || component == b"." || component == b".." {
            // names::validate_* refused these already; refuse again, never follow.
            return Err(refuse(EILSEQ, Some(name), "path component not allowed"));
        }
        let base = current.as_ref().map_or(dir, AsFd::as_fd);
        let flags = OFlags::RDONLY
            | OFlags::DIRECTORY
            | OFlags::NOFOLLOW
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        match rustix::fs::openat(base, component, flags, Mode::empty()) {
            Ok(fd) => current = Some(fd),
            Err(e) => {
                return Err(refuse(
                    errno_of(e),
                    Some(component),
                    format!(
                        "cannot open directory \"{}\" of \"{}\": {e}",
                        printable(component),
                        printable(name)
                    ),
                ));
            }
        }
    }
    Err(refuse(EILSEQ, Some(name), "empty name"))
}

fn timestamps(header: &FileHeader, name: &[u8]) -> Result<Timestamps, Refusal> {
    const MAX_NSEC: u32 = 999_999_999;
    for nsec in [header.atime_nsec, header.mtime_nsec] {
        if nsec > MAX_NSEC {
            return Err(refuse(
                EINVAL,
                Some(name),
                format!("Invalid nanoseconds value {nsec}"),
            ));
        }
    }
    Ok(Timestamps {
        last_access: Timespec {
            tv_sec: i64::from(header.atime),
            tv_nsec: i64::from(header.atime_nsec) as _,
        },
        last_modification: Timespec {
            tv_sec: i64::from(header.mtime),
            tv_nsec: i64::from(header.mtime_nsec) as _,
        },
    })
}

/// Permission bits we apply: Qubes applies `mode & 07777` on a `nosuid`
/// bind mount; we have no such mount, so set-id bits are dropped instead.
fn permissions(mode: u32) -> Mode {
    Mode::from_raw_mode((mode & 0o1777) as _)
}

impl<R: Read> Unpacker<'_, R> {
    fn run(&mut self, last_name: &mut Vec<u8>) -> Result<(), Refusal> {
        loop {
            let mut raw = [0u8; FILE_HEADER_LEN];
            match self.input.read_all(&mut raw) {
                Ok(()) => {}
                Err(ReadEnd::Eof) => {
                    return Err(refuse(
                        EREMOTEIO,
                        Some(last_name),
                        "the sender closed the stream before the end-of-transfer marker",
                    ));
                }
                Err(ReadEnd::Error(code)) => {
                    return Err(refuse(code, Some(last_name), "cannot read from the sender"));
                }
            }
            let header = match FileHeaderPacket::new_checked(&raw[..]) {
                Ok(packet) => FileHeader::parse(&packet),
                Err(e) => return Err(refuse(EINVAL, None, e.to_string())),
            };
            if header.namelen == 0 {
                return Ok(());
            }
            self.total_files += 1;
            let max_files = self.options.limits.max_files;
            if max_files != 0 && self.total_files > max_files {
                return Err(refuse(
                    EDQUOT,
                    Some(last_name),
                    format!("more than {max_files} files"),
                ));
            }
            self.one_entry(&header, last_name)?;
        }
    }

    fn read_or_eof(&mut self, buf: &mut [u8], name: Option<&[u8]>) -> Result<(), Refusal> {
        match self.input.read_all(buf) {
            Ok(()) => Ok(()),
            Err(ReadEnd::Eof) => Err(refuse(
                LEGAL_EOF,
                name,
                "the stream ended in the middle of an entry",
            )),
            Err(ReadEnd::Error(code)) => Err(refuse(code, name, "cannot read from the sender")),
        }
    }

    fn one_entry(&mut self, header: &FileHeader, last_name: &mut Vec<u8>) -> Result<(), Refusal> {
        let namelen = header.namelen as usize;
        if namelen > MAX_PATH_LENGTH - 1 {
            return Err(refuse(
                ENAMETOOLONG,
                None,
                format!("file name of {namelen} bytes is too long"),
            ));
        }
        let mut raw_name = vec![0u8; namelen];
        self.read_or_eof(&mut raw_name, None)?;
        // The name is a C string: it ends at the first NUL.
        let end = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        raw_name.truncate(end);
        *last_name = raw_name;
        let name: &[u8] = last_name;
        match EntryKind::from_mode(header.mode) {
            EntryKind::Regular => self.regular(header, name)?,
            EntryKind::Symlink if self.options.allow_symlinks => self.symlink(header, name)?,
            EntryKind::Directory if self.options.allow_directories => {
                self.directory(header, name)?
            }
            _ => {
                return Err(refuse(
                    EINVAL,
                    Some(name),
                    format!("file type of mode {:o} not accepted", header.mode),
                ));
            }
        }
        if self.options.verbose && EntryKind::from_mode(header.mode) != EntryKind::Directory {
            eprintln!("{}", printable(name));
        }
        Ok(())
    }

    fn check_name(&self, name: &[u8]) -> Result<(), Refusal> {
        names::validate_file_name(name, self.options.names)
            .map_err(|code| refuse(code, Some(name), "forbidden file name (absolute, `..`, `.`, empty component, control or unsafe character, or invalid UTF-8)"))
    }

    fn regular(&mut self, header: &FileHeader, name: &[u8]) -> Result<(), Refusal> {
        self.check_name(name)?;
        let times = timestamps(header, name)?;
        let (parent, leaf) = open_parent(self.dir, name)?;
        let parent = parent.as_ref().map_or(self.dir, AsFd::as_fd);
        let size = header.filelen;
        let max = self.options.limits.max_bytes;
        if size > i64::MAX as u64
            || (max != 0 && size > max)
            || (max != 0 && self.total_bytes > max - size)
        {
            return Err(refuse(
                EDQUOT,
                Some(name),
                format!("file of {size} bytes is over the size limit"),
            ));
        }
        let (file, tmpfile) = self.create(parent, leaf, name)?;
        let written = self.copy_contents(&file, size, name).and_then(|()| {
            rustix::fs::fchmod(&file, permissions(header.mode))
                .and_then(|()| rustix::fs::futimens(&file, &times))
                .map_err(|e| {
                    refuse(
                        errno_of(e),
                        Some(name),
                        format!("cannot set mode and times: {e}"),
                    )
                })
        });
        self.total_bytes = self.total_bytes.saturating_add(size);
        match (written, tmpfile) {
            (Ok(()), true) => self.link_tmpfile(&file, parent, leaf, name),
            (Ok(()), false) => Ok(()),
            (Err(refusal), true) => Err(refusal), // the anonymous inode goes with the fd
            (Err(refusal), false) => {
                let _ = rustix::fs::unlinkat(parent, leaf, AtFlags::empty());
                Err(refusal)
            }
        }
    }

    fn create(
        &mut self,
        parent: BorrowedFd<'_>,
        leaf: &[u8],
        name: &[u8],
    ) -> Result<(OwnedFd, bool), Refusal> {
        if self.procfs.is_some() {
            let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC | OFlags::NOCTTY;
            match rustix::fs::openat(parent, ".", flags, Mode::from_raw_mode(0o700)) {
                Ok(fd) => return Ok((fd, true)),
                Err(e)
                    if e == rustix::io::Errno::NOENT
                        || e == rustix::io::Errno::OPNOTSUPP
                        || e == rustix::io::Errno::ISDIR =>
                {
                    self.procfs = None; // no O_TMPFILE here: fall back for good
                }
                Err(e) => {
                    return Err(refuse(
                        errno_of(e),
                        Some(name),
                        format!("cannot create file: {e}"),
                    ));
                }
            }
        }
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY;
        rustix::fs::openat(parent, leaf, flags, Mode::empty())
            .map(|fd| (fd, false))
            .map_err(|e| refuse(errno_of(e), Some(name), format!("cannot create file: {e}")))
    }

    fn link_tmpfile(
        &self,
        file: &OwnedFd,
        parent: BorrowedFd<'_>,
        leaf: &[u8],
        name: &[u8],
    ) -> Result<(), Refusal> {
        let Some(procfs) = &self.procfs else {
            return Err(refuse(
                EINVAL,
                Some(name),
                "no /proc/self/fd to link the file",
            ));
        };
        let fd_name = format!("{}", std::os::fd::AsRawFd::as_raw_fd(file));
        rustix::fs::linkat(
            procfs,
            fd_name.as_str(),
            parent,
            leaf,
            AtFlags::SYMLINK_FOLLOW,
        )
        .map_err(|e| refuse(errno_of(e), Some(name), format!("cannot create file: {e}")))
    }

    fn copy_contents(&mut self, file: &OwnedFd, size: u64, name: &[u8]) -> Result<(), Refusal> {
        let mut left = size;
        let mut buffer = std::mem::take(&mut self.buffer);
        let result = (|| {
            while left > 0 {
                let want = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(buffer.len());
                let chunk = buffer.get_mut(..want).unwrap_or(&mut []);
                let got = match self.input.read_some(chunk) {
                    Ok(n) => n,
                    Err(ReadEnd::Eof) => {
                        return Err(refuse(
                            LEGAL_EOF,
                            Some(name),
                            "the stream ended in the middle of a file",
                        ));
                    }
                    Err(ReadEnd::Error(code)) => {
                        return Err(refuse(code, Some(name), "cannot read from the sender"));
                    }
                };
                let mut data = chunk.get(..got).unwrap_or(&[]);
                while !data.is_empty() {
                    match rustix::io::write(file, data) {
                        Ok(n) => data = data.get(n..).unwrap_or(&[]),
                        Err(rustix::io::Errno::INTR) => {}
                        Err(e) => {
                            return Err(refuse(
                                errno_of(e),
                                Some(name),
                                format!("cannot write file: {e}"),
                            ));
                        }
                    }
                }
                left -= got as u64;
            }
            Ok(())
        })();
        self.buffer = buffer;
        result
    }

    fn directory(&mut self, header: &FileHeader, name: &[u8]) -> Result<(), Refusal> {
        self.check_name(name)?;
        let times = timestamps(header, name)?;
        let (parent, leaf) = open_parent(self.dir, name)?;
        let parent = parent.as_ref().map_or(self.dir, AsFd::as_fd);
        // First sight: create it rwx for us so its contents can be written;
        // the second header (after the contents) sets its mode and times.
        match rustix::fs::mkdirat(parent, leaf, Mode::from_raw_mode(0o700)) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(refuse(
                    errno_of(e),
                    Some(name),
                    format!("cannot create directory: {e}"),
                ));
            }
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::DIRECTORY;
        let fd = rustix::fs::openat(parent, leaf, flags, Mode::empty()).map_err(|e| {
            refuse(
                errno_of(e),
                Some(name),
                format!("cannot open directory: {e}"),
            )
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| {
            refuse(
                errno_of(e),
                Some(name),
                format!("cannot stat directory: {e}"),
            )
        })?;
        self.total_bytes = self
            .total_bytes
            .saturating_add(u64::try_from(stat.st_size).unwrap_or(0));
        rustix::fs::fchmod(&fd, permissions(header.mode))
            .and_then(|()| rustix::fs::futimens(&fd, &times))
            .map_err(|e| {
                refuse(
                    errno_of(e),
                    Some(name),
                    format!("cannot set mode and times: {e}"),
                )
            })
    }

    fn symlink(&mut self, header: &FileHeader, name: &[u8]) -> Result<(), Refusal> {
        if header.filelen > (MAX_PATH_LENGTH - 1) as u64 {
            return Err(refuse(
                ENAMETOOLONG,
                Some(name),
                format!("symlink target of {} bytes is too long", header.filelen),
            ));
        }
        let len = header.filelen as usize;
        self.total_bytes = self.total_bytes.saturating_add(len as u64);
        let max = self.options.limits.max_bytes;
        if max != 0 && self.total_bytes > max {
            return Err(refuse(EDQUOT, Some(name), "over the size limit"));
        }
        let mut target = vec![0u8; len];
        self.read_or_eof(&mut target, Some(name))?;
        let end = target.iter().position(|&b| b == 0).unwrap_or(target.len());
        target.truncate(end);
        if let Err(code) = names::validate_symlink(name, &target, self.options.names) {
            let why = if code == ENOLINK {
                "symlink would point outside its top-level directory (absolute, top-level link, or too many `..`)"
            } else {
                "forbidden symlink name or target"
            };
            return Err(refuse(
                code,
                Some(&target),
                format!(
                    "{why}: \"{}\" -> \"{}\"",
                    printable(name),
                    printable(&target)
                ),
            ));
        }
        let (parent, leaf) = open_parent(self.dir, name)?;
        let parent = parent.as_ref().map_or(self.dir, AsFd::as_fd);
        rustix::fs::symlinkat(target.as_slice(), parent, leaf).map_err(|e| {
            refuse(
                errno_of(e),
                Some(name),
                format!("cannot create symlink: {e}"),
            )
        })
    }
}
