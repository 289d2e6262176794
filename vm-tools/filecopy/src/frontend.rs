//! The command-line programs: `qfile-unpacker`, `qfile-agent` and the
//! `qvm-copy`, `qvm-copy-to-vm`, `qvm-move`, `qvm-move-to-vm` front ends,
//! with Qubes' options, messages and exit codes.
//!
//! The front ends run `qrexec-client-vm TARGET qubes.Filecopy qfile-agent
//! FILES...` (`$QREXEC_CLIENT_VM` and `$QFILE_AGENT` override the
//! `/usr/lib/qubes/` paths; see [`helper`] for our package's layout) and,
//! for a move, remove the sources only after the copy succeeded.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use rustix::fs::{Mode, OFlags};

use crate::names::{self, NameFlags};
use crate::pack::{Packer, SendError};
use crate::unpack::{self, UnpackOptions};

fn program() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "qfile".to_string())
}

/// The path of a helper program a front end runs: `$ENV` if set; else, for
/// a front end installed as `PREFIX/bin/NAME` with the helper at
/// `PREFIX/HELPER` (our package's `/usr/lib/qubes-rs/bin/` and
/// `/usr/lib/qubes-rs/`), that one; else Qubes' `/usr/lib/qubes/HELPER`.
pub fn helper(env: &str, name: &str) -> OsString {
    if let Some(path) = std::env::var_os(env) {
        return path;
    }
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        if dir.file_name()? != "bin" {
            return None;
        }
        let candidate = dir.parent()?.join(name);
        candidate.is_file().then_some(candidate)
    });
    match beside {
        Some(path) => path.into_os_string(),
        None => Path::new("/usr/lib/qubes").join(name).into_os_string(),
    }
}

fn fatal(message: &str) -> ExitCode {
    eprintln!("{}: Fatal error: {message}", program());
    ExitCode::from(1)
}

fn dup_file(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// `qfile-unpacker [--allow-all-names] [--allow-unsafe-symlinks] [-v]
/// [-w SPACE] [UID [DIR]]`: receive into `~/QubesIncoming/$QREXEC_REMOTE_DOMAIN`.
pub fn qfile_unpacker_main() -> ExitCode {
    let mut options = UnpackOptions::default();
    let mut positional: Vec<OsString> = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_bytes() {
            b"--allow-all-names" => options.names.allow_unsafe_characters = true,
            b"--no-allow-all-names" => options.names.allow_unsafe_characters = false,
            b"--allow-unsafe-symlinks" => options.names.allow_unsafe_symlinks = true,
            b"--no-allow-unsafe-symlinks" => options.names.allow_unsafe_symlinks = false,
            b"-v" | b"--verbose" => options.verbose = true,
            b"-w" | b"--wait-for-space" => {
                // Accepted for compatibility; we do not wait for free space.
                let value = args.next().unwrap_or_default();
                if value
                    .to_str()
                    .and_then(|v| v.parse::<u32>().ok())
                    .is_none_or(|v| v > i32::MAX as u32)
                {
                    eprintln!(
                        "qfile-unpacker: Space amount {} is invalid or exceeds {} bytes",
                        value.to_string_lossy(),
                        i32::MAX
                    );
                    return ExitCode::from(1);
                }
            }
            [b'-', ..] => {
                eprintln!("qfile-unpacker: unknown option {}", arg.to_string_lossy());
                return ExitCode::from(1);
            }
            _ => positional.push(arg),
        }
    }
    if positional.len() > 2 {
        eprintln!(
            "qfile-unpacker: Wrong number of non-option arguments (expected no more than 2, got {})",
            positional.len()
        );
        return ExitCode::from(1);
    }
    if let Some(uid) = positional.first().filter(|u| !u.is_empty()) {
        let me = rustix::process::getuid().as_raw().to_string();
        if uid.as_bytes() != me.as_bytes() {
            // Qubes' root-run variant switches to that user inside a chroot;
            // we only ever run as the receiving user.
            return fatal("Refusing to change to UID other than the caller's UID");
        }
    }
    let incoming: PathBuf = match positional.get(1) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let Some(source) = std::env::var_os("QREXEC_REMOTE_DOMAIN") else {
                return fatal("Cannot get remote domain name");
            };
            let bytes = source.as_bytes();
            if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
                return fatal("Cannot get remote domain name");
            }
            let Some(home) = std::env::var_os("HOME").or_else(home_from_passwd) else {
                return fatal("Cannot get home directory ($HOME, /etc/passwd)");
            };
            let root = Path::new(&home).join("QubesIncoming");
            let _ = rustix::fs::mkdir(&root, Mode::from_raw_mode(0o700));
            let dir = root.join(source);
            let _ = rustix::fs::mkdir(&dir, Mode::from_raw_mode(0o700));
            dir
        }
    };
    let dir = match rustix::fs::open(
        &incoming,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(_) => return fatal(&format!("Error chdir to {}", incoming.display())),
    };
    let (input, output) = match (
        dup_file(std::io::stdin().as_fd()),
        dup_file(std::io::stdout().as_fd()),
    ) {
        (Ok(i), Ok(o)) => (i, o),
        _ => return fatal("cannot use standard input/output"),
    };
    let input = std::io::BufReader::with_capacity(256 * 1024, input);
    let outcome = unpack::unpack(input, output, dir.as_fd(), options);
    if let Some(message) = &outcome.message {
        let name = outcome
            .last_name
            .as_deref()
            .map(unpack::printable)
            .unwrap_or_default();
        eprintln!(
            "qfile-unpacker: {message} (code {}, last file \"{name}\")",
            outcome.code
        );
    }
    ExitCode::from(outcome.exit_code() as u8)
}

/// Our own home directory from `/etc/passwd` (when `$HOME` is unset).
fn home_from_passwd() -> Option<OsString> {
    let uid = rustix::process::getuid().as_raw().to_string();
    let passwd = std::fs::read("/etc/passwd").ok()?;
    passwd.split(|&b| b == b'\n').find_map(|line| {
        let fields: Vec<&[u8]> = line.split(|&b| b == b':').collect();
        (fields.get(2) == Some(&uid.as_bytes())).then(|| {
            fields
                .get(5)
                .map(|h| OsString::from(std::ffi::OsStr::from_bytes(h)))
        })?
    })
}

/// `qfile-agent [--ignore-symlinks] [--] FILE...`: send on stdout, read the
/// answer on stdin.
pub fn qfile_agent_main() -> ExitCode {
    let mut ignore_symlinks = false;
    let mut options_done = false;
    let mut files = Vec::new();
    for (i, arg) in std::env::args_os().enumerate().skip(1) {
        if !options_done {
            match arg.as_bytes() {
                b"--ignore-symlinks" => {
                    ignore_symlinks = true;
                    continue;
                }
                b"--" => {
                    options_done = true;
                    continue;
                }
                _ => {}
            }
        }
        if arg.is_empty() {
            return fatal(&format!("Invalid empty argument {i}"));
        }
        files.push(PathBuf::from(arg));
    }
    let (input, output) = match (
        dup_file(std::io::stdin().as_fd()),
        dup_file(std::io::stdout().as_fd()),
    ) {
        (Ok(i), Ok(o)) => (i, o),
        _ => return fatal("cannot use standard input/output"),
    };
    let mut packer = Packer::new(std::io::BufWriter::with_capacity(256 * 1024, output), input);
    packer.ignore_symlinks = ignore_symlinks;
    let total = std::env::var("FILECOPY_TOTAL_BYTES")
        .ok()
        .and_then(|t| t.parse::<u64>().ok());
    if let (Ok("console"), Some(total)) = (std::env::var("PROGRESS_TYPE").as_deref(), total) {
        let mut shown = 0u64;
        packer.set_progress(Box::new(move |sent| {
            if sent >= shown + 15_000_000 || sent == total {
                shown = sent;
                eprint!("sent {}/{} KB\r", sent.div_ceil(1024), total.div_ceil(1024));
            }
        }));
    }
    let result = files
        .iter()
        .try_for_each(|f| packer.send_argument(f))
        .and_then(|()| packer.finish());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(SendError::Receiver(None)) => ExitCode::from(1),
        Err(SendError::Receiver(Some(message)) | SendError::Local(message)) => fatal(&message),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Copy,
    Move,
}

/// Walk the sources like `qubes-fs-tree-check`: `Ok((total_bytes,
/// all_names_safe))`, or a message for a source that cannot or must not be
/// sent (unreadable, `.`/`..`/`/`, a symlink the receiver would refuse).
fn tree_check(sources: &[PathBuf], ignore_symlinks: bool) -> Result<(u64, bool), String> {
    fn walk(
        path: &Path,
        name: &[u8],
        ignore_symlinks: bool,
        total: &mut u64,
        safe: &mut bool,
    ) -> Result<(), String> {
        let shown = unpack::printable(path.as_os_str().as_bytes());
        let meta = std::fs::symlink_metadata(path).map_err(|e| format!("fstatat({shown}): {e}"))?;
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Ok(()); // not sent
        }
        if kind.is_symlink() && ignore_symlinks {
            return Ok(());
        }
        let leaf = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
        if !names::safe_for_display(leaf) {
            *safe = false;
        }
        *total = total
            .checked_add(meta.len())
            .ok_or("Refusing to copy over 2**64 bytes")?;
        if kind.is_symlink() {
            let target = std::fs::read_link(path).map_err(|e| format!("readlink({shown}): {e}"))?;
            let target = target.as_os_str().as_bytes();
            if !names::safe_for_display(target) {
                *safe = false;
            }
            // Character checks are done above; only the structure here.
            let flags = NameFlags {
                allow_unsafe_characters: true,
                allow_non_canonical_symlinks: true,
                allow_unsafe_symlinks: false,
            };
            if names::validate_symlink(name, target, flags).is_err() {
                return Err(format!("Refusing to copy unsafe symbolic link {shown}"));
            }
        } else if kind.is_dir() {
            for entry in std::fs::read_dir(path).map_err(|e| format!("open({shown}): {e}"))? {
                let entry = entry.map_err(|e| format!("readdir({shown}): {e}"))?;
                let child = [name, b"/", entry.file_name().as_bytes()].concat();
                walk(&entry.path(), &child, ignore_symlinks, total, safe)?;
            }
        }
        Ok(())
    }
    let (mut total, mut safe) = (0, true);
    for (i, source) in sources.iter().enumerate() {
        let bytes = source.as_os_str().as_bytes();
        if bytes.is_empty() {
            return Err(format!(
                "Empty string (passed as argument {}) is not a valid path",
                i + 1
            ));
        }
        let (_, base) = crate::pack::split_argument(bytes);
        if base == b"." || base == b".." {
            return Err("Refusing to copy path with basename empty, ., or ..".to_string());
        }
        if base.first() == Some(&b'/') {
            return Err("Refusing to copy root directory".to_string());
        }
        walk(source, &base, ignore_symlinks, &mut total, &mut safe)?;
    }
    Ok((total, safe))
}

/// `qvm-copy`, `qvm-copy-to-vm`, `qvm-move`, `qvm-move-to-vm`.
pub fn qvm_copy_main(operation: Operation, to_vm: bool) -> ExitCode {
    let name = program();
    let min_args = if to_vm { 2 } else { 1 };
    let usage = |code: u8| {
        if to_vm {
            println!(
                "usage: {name} [--without-progress] [--ignore-symlinks] destination_qube_name FILE [FILE ...]"
            );
        } else {
            println!("usage: {name} [--without-progress] [--ignore-symlinks] FILE [FILE ...]");
        }
        let verb = if operation == Operation::Move {
            "Move"
        } else {
            "Copy"
        };
        println!("{verb} FILE to ~/QubesIncoming/[THIS QUBE'S NAME]/ in the destination qube.");
        ExitCode::from(code)
    };
    let mut progress = "console";
    let mut ignore_symlinks = false;
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut first = 0;
    while let Some(arg) = args.get(first) {
        match arg.as_bytes() {
            b"--without-progress" => progress = "none",
            b"--with-progress" => progress = "console",
            b"--ignore-symlinks" => ignore_symlinks = true,
            b"--no-ignore-symlinks" => ignore_symlinks = false,
            b"-h" | b"--help" => return usage(0),
            b"--" => {
                first += 1;
                break;
            }
            [b'-', ..] => return usage(1),
            _ => break,
        }
        first += 1;
    }
    let mut rest = args.split_off(first.min(args.len()));
    if rest.len() < min_args {
        return usage(1);
    }
    let target = if to_vm {
        eprintln!(
            "In order to avoid typing target qube name twice, use qvm-copy/qvm-move instead of qvm-copy-to-vm/qvm-move-to-vm."
        );
        rest.remove(0)
    } else {
        OsString::from("@default")
    };
    let sources: Vec<PathBuf> = rest
        .iter()
        .map(|s| {
            let bytes = s.as_bytes();
            let trimmed = bytes
                .strip_suffix(b"/")
                .filter(|t| !t.is_empty())
                .unwrap_or(bytes);
            PathBuf::from(std::ffi::OsStr::from_bytes(trimmed))
        })
        .collect();
    let (total, safe) = match tree_check(&sources, ignore_symlinks) {
        Ok(result) => result,
        Err(message) => {
            eprintln!("{name}: {message}");
            return ExitCode::from(1);
        }
    };
    let service = if safe {
        "qubes.Filecopy"
    } else {
        "qubes.Filecopy+allow-all-names"
    };
    let client = std::env::var_os("QREXEC_CLIENT_VM")
        .unwrap_or_else(|| "/usr/lib/qubes/qrexec-client-vm".into());
    let agent = helper("QFILE_AGENT", "qfile-agent");
    let mut command = Command::new(client);
    command
        .args(["--filter-escape-chars-stderr", "--"])
        .arg(&target)
        .arg(service)
        .arg(agent);
    if ignore_symlinks {
        command.arg("--ignore-symlinks");
    }
    command
        .arg("--")
        .args(&sources)
        .env("PROGRESS_TYPE", progress);
    if progress == "console" {
        command.env("FILECOPY_TOTAL_BYTES", total.to_string());
    }
    let status = match command.status() {
        Ok(status) => status,
        Err(error) => {
            eprintln!("{name}: cannot run qrexec-client-vm: {error}");
            return ExitCode::from(1);
        }
    };
    if !status.success() {
        return ExitCode::from(status.code().map_or(1, |c| c as u8));
    }
    if operation == Operation::Move {
        for source in &sources {
            let removed = match std::fs::symlink_metadata(source) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(source),
                Ok(_) => std::fs::remove_file(source),
                Err(e) => Err(e),
            };
            if let Err(error) = removed {
                eprintln!("{name}: cannot remove {}: {error}", source.display());
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
