//! The `qubes.OpenInVM` programs: the handler `vm-file-editor`, the sender
//! `qopen-in-vm` and the front ends `qvm-open-in-vm` / `qvm-open-in-dvm`
//! (see [`crate::openinvm`] for the wire format).
//!
//! The front ends run `qrexec-client-vm -- TARGET qubes.OpenInVM
//! qopen-in-vm [--view-only] --receive-into TMP -- FILE` (`$QREXEC_CLIENT_VM`
//! and `$QOPEN_IN_VM` override the `/usr/lib/qubes/` paths; see
//! [`crate::frontend::helper`] for our package's layout); `TMP` is a new
//! file next to `FILE`. Only when the whole call ended with status 0 (our
//! sender and the far side's handler) and `TMP` differs from `FILE` is `TMP`
//! renamed over `FILE`; otherwise `FILE` is left alone and `TMP` removed.
//! Run on its own (as Qubes' scripts do), `qopen-in-vm` makes that decision
//! itself when the answer ends.
//!
//! The handler opens the file with, in order: `--open-with COMMAND`,
//! `$QUBES_OPEN_IN_VM_COMMAND` (a shell command, given the file as `$1`),
//! `/usr/bin/qubes-open` when present (Qubes' mimeopen/xdg-open wrapper),
//! else `xdg-open`. An opener that fails is an error: nothing is sent back.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use crate::openinvm::{self, Stamp};

const EDITOR: &str = "vm-file-editor";

fn stdio_files() -> std::io::Result<(File, File)> {
    Ok((
        File::from(std::io::stdin().as_fd().try_clone_to_owned()?),
        File::from(std::io::stdout().as_fd().try_clone_to_owned()?),
    ))
}

/// Point fd 1 at /dev/null so that, once `out` (our duplicate of it) is
/// dropped, the peer sees the end of our stream.
fn detach_stdout() -> std::io::Result<()> {
    let null = File::options().write(true).open("/dev/null")?;
    rustix::stdio::dup2_stdout(&null)?;
    Ok(())
}

/// `vm-file-editor [--open-with COMMAND]`: the `qubes.OpenInVM` handler.
pub fn vm_file_editor_main() -> ExitCode {
    let mut open_with: Option<OsString> = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_bytes() {
            b"--open-with" => match args.next() {
                Some(command) => open_with = Some(command),
                None => return editor_fail("--open-with needs a command"),
            },
            _ => {
                return editor_fail(&format!(
                    "unexpected argument {:?} (usage: {EDITOR} [--open-with COMMAND])",
                    arg.to_string_lossy()
                ));
            }
        }
    }
    let open_with = open_with
        .or_else(|| std::env::var_os(openinvm::OPEN_COMMAND_ENV).filter(|c| !c.is_empty()));
    match run_editor(open_with) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => editor_fail(&message),
    }
}

fn editor_fail(message: &str) -> ExitCode {
    eprintln!("{EDITOR}: {message}");
    ExitCode::from(1)
}

fn run_editor(open_with: Option<OsString>) -> Result<(), String> {
    let Some(remote) = std::env::var_os("QREXEC_REMOTE_DOMAIN") else {
        return Err("Cannot get remote domain name".to_string());
    };
    let remote_ok = !remote.is_empty()
        && remote.len() <= 64
        && remote
            .as_bytes()
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && remote.as_bytes() != b"."
        && remote.as_bytes() != b"..";
    if !remote_ok {
        return Err(format!(
            "Invalid remote domain name: {}",
            crate::unpack::printable(remote.as_bytes())
        ));
    }
    let limit = openinvm::max_file_bytes()?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", remote.to_string_lossy()))
        .tempdir()
        .map_err(|e| {
            format!(
                "cannot create a directory in {}: {e}",
                std::env::temp_dir().display()
            )
        })?;
    let (mut input, output) = stdio_files().map_err(|e| format!("standard input/output: {e}"))?;
    let received =
        openinvm::receive_request(&mut input, dir.path(), limit).map_err(|e| e.to_string())?;
    drop(input);
    let path = received.path;
    if received.view_only {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    }
    let before = std::fs::symlink_metadata(&path)
        .map(|m| Stamp::of(&m))
        .map_err(|e| format!("stat {}: {e}", path.display()))?;

    let mut opener = match &open_with {
        Some(command) => {
            let mut script = OsString::from(command);
            script.push(" \"$1\"");
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(script).arg(EDITOR).arg(&path);
            c
        }
        None if Path::new("/usr/bin/qubes-open").exists() => {
            let mut c = Command::new("/usr/bin/qubes-open");
            c.arg(&path);
            c
        }
        None => {
            let mut c = Command::new("xdg-open");
            c.arg(&path);
            c
        }
    };
    // The opener must not write into our data stream: its stdout goes to
    // our stderr (the service's log).
    let log = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("stderr: {e}"))?;
    opener.stdin(Stdio::null()).stdout(Stdio::from(log));
    let shown = format!("{:?}", opener.get_program().to_string_lossy());
    let status = opener
        .status()
        .map_err(|e| format!("cannot run the opening program {shown}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "Unable to handle mimetype of the requested file: the opening program {} ended with {status}; nothing is sent back",
            match &open_with {
                Some(c) => format!("{:?}", c.to_string_lossy()),
                None => shown,
            }
        ));
    }
    let after = std::fs::symlink_metadata(&path)
        .map_err(|e| format!("the opened file {} is gone: {e}", path.display()))?;
    if !after.file_type().is_file() {
        return Err(format!(
            "the opened file {} is no longer a regular file; nothing is sent back",
            path.display()
        ));
    }
    let mut output = output;
    if !received.view_only && Stamp::of(&after) != before {
        let mut file = File::options()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        std::io::copy(&mut file, &mut output)
            .and_then(|_| output.flush())
            .map_err(|e| format!("sending the file back: {e}"))?;
    }
    detach_stdout().map_err(|e| format!("closing standard output: {e}"))?;
    drop(output);
    drop(dir);
    Ok(())
}

/// Where the answer goes and who decides about it.
enum Answer {
    /// `--receive-into PATH`: write it there; the front end decides.
    Into(PathBuf),
    /// On our own: a temporary file next to the original, settled here.
    Settle,
}

/// `qopen-in-vm [--view-only] [--receive-into PATH] [--] FILE`.
pub fn qopen_in_vm_main() -> ExitCode {
    let mut view_only = false;
    let mut receive_into = None;
    let mut file = None;
    let mut args = std::env::args_os().skip(1);
    let mut options_done = false;
    while let Some(arg) = args.next() {
        if !options_done {
            match arg.as_bytes() {
                b"--view-only" => {
                    view_only = true;
                    continue;
                }
                b"--receive-into" => {
                    let Some(path) = args.next() else {
                        return sender_fail("--receive-into needs a path");
                    };
                    receive_into = Some(PathBuf::from(path));
                    continue;
                }
                b"--" => {
                    options_done = true;
                    continue;
                }
                [b'-', _, ..] => return sender_fail(&format!("unknown option {arg:?}")),
                _ => {}
            }
        }
        if file.replace(PathBuf::from(arg)).is_some() {
            return sender_fail("only one file can be opened");
        }
    }
    let Some(file) = file else {
        return sender_fail("OpenInVM - no file given?");
    };
    let answer = match receive_into {
        Some(path) => Answer::Into(path),
        None => Answer::Settle,
    };
    match send_and_receive(&file, view_only, answer) {
        Ok(Some(message)) => {
            eprintln!("qopen-in-vm: {message}");
            ExitCode::from(1)
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(message) => sender_fail(&message),
    }
}

fn sender_fail(message: &str) -> ExitCode {
    eprintln!("qopen-in-vm: {message}");
    ExitCode::from(1)
}

/// Send `file`, read the answer; `Ok(Some(message))` when the edited copy
/// was kept aside instead of replacing `file`.
fn send_and_receive(
    file: &Path,
    view_only: bool,
    answer: Answer,
) -> Result<Option<String>, String> {
    let shown = file.display();
    let mut source = File::open(file).map_err(|e| format!("open {shown}: {e}"))?;
    let meta = source
        .metadata()
        .map_err(|e| format!("stat {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let sent = Stamp::of(&meta);
    let limit = openinvm::max_file_bytes()?;
    let (mut input, mut output) =
        stdio_files().map_err(|e| format!("standard input/output: {e}"))?;
    let field = openinvm::encode_name(file.as_os_str().as_bytes(), view_only);
    output
        .write_all(&field)
        .and_then(|()| std::io::copy(&mut source, &mut output).map(drop))
        .and_then(|()| output.flush())
        .map_err(|e| format!("send file to the other qube: {e}"))?;
    detach_stdout().map_err(|e| format!("closing standard output: {e}"))?;
    drop(output);
    if view_only {
        // Whatever comes back is discarded.
        let _ = std::io::copy(&mut input, &mut std::io::sink());
        return Ok(None);
    }
    match answer {
        Answer::Into(path) => {
            let mut into = File::options()
                .write(true)
                .truncate(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            let received = openinvm::copy_bounded(&mut input, &mut into, limit);
            if let Err(e) = received {
                let _ = into.set_len(0);
                return Err(format!(
                    "receiving the file back: {e}; {shown} is left unchanged"
                ));
            }
            Ok(None)
        }
        Answer::Settle => {
            // A symbolic link: its target is what gets replaced.
            let real = std::fs::canonicalize(file).map_err(|e| format!("{shown}: {e}"))?;
            let mut received = temp_next_to(&real)?;
            openinvm::copy_bounded(&mut input, received.0.as_file_mut(), limit)
                .map_err(|e| format!("receiving the file back: {e}; {shown} is left unchanged"))?;
            match settle(&real, sent, received)? {
                Settled::Unchanged | Settled::Replaced => Ok(None),
                Settled::Kept(path, why) => Ok(Some(format!(
                    "{why}; the edited file has been saved to {}",
                    path.display()
                ))),
            }
        }
    }
}

/// A new temporary file in `file`'s directory (so that a rename replaces
/// `file` atomically), or in `$TMPDIR` when that directory is not writable.
/// The flag says whether it is beside `file`.
pub fn temp_next_to(file: &Path) -> Result<(tempfile::NamedTempFile, bool), String> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{base}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".edited");
    builder
        .tempfile_in(dir)
        .map(|t| (t, true))
        .or_else(|_| builder.tempfile().map(|t| (t, false)))
        .map_err(|e| format!("cannot create a temporary file for the edited copy: {e}"))
}

/// What became of an answer.
#[derive(Debug)]
pub enum Settled {
    /// Nothing came back, or the same contents.
    Unchanged,
    /// The original was replaced (by rename) with the answer.
    Replaced,
    /// The answer was kept at this path, and why.
    Kept(PathBuf, String),
}

/// Decide about a complete answer: empty or identical → leave `original`
/// alone; `original` changed here since it was sent (its `sent` stamp) or
/// the answer is on another filesystem → keep the answer aside; otherwise
/// give it `original`'s permissions, sync it and rename it over `original`.
pub fn settle(
    original: &Path,
    sent: Stamp,
    (mut received, beside): (tempfile::NamedTempFile, bool),
) -> Result<Settled, String> {
    let shown = original.display();
    let length = received
        .as_file()
        .metadata()
        .map_err(|e| format!("stat the received file: {e}"))?
        .len();
    if length == 0 {
        return Ok(Settled::Unchanged);
    }
    let mut current = File::open(original).map_err(|e| format!("open {shown}: {e}"))?;
    let meta = current
        .metadata()
        .map_err(|e| format!("stat {shown}: {e}"))?;
    let keep = |received: tempfile::NamedTempFile, why: String| {
        received
            .keep()
            .map(|(_, path)| Settled::Kept(path, why))
            .map_err(|e| format!("keeping the edited copy: {e}"))
    };
    if Stamp::of(&meta) != sent {
        return keep(
            received,
            format!("{shown} was changed here while it was open in the other qube"),
        );
    }
    let file = received.as_file_mut();
    use std::io::Seek;
    file.rewind()
        .map_err(|e| format!("read the received file: {e}"))?;
    if openinvm::same_contents(&mut current, file)
        .map_err(|e| format!("compare with {shown}: {e}"))?
    {
        return Ok(Settled::Unchanged);
    }
    file.set_permissions(std::fs::Permissions::from_mode(
        meta.permissions().mode() & 0o7777,
    ))
    .and_then(|()| file.sync_all())
    .map_err(|e| format!("prepare the edited copy: {e}"))?;
    if !beside {
        return keep(
            received,
            format!("{shown} is in a directory where no temporary file can be made"),
        );
    }
    received
        .persist(original)
        .map(|_| Settled::Replaced)
        .map_err(|e| format!("replace {shown}: {}", e.error))
}

/// `qvm-open-in-vm [--view-only] [--] VM FILE` / `qvm-open-in-dvm
/// [--view-only] [--] FILE`.
pub fn qvm_open_main(dispvm: bool) -> ExitCode {
    let name = if dispvm {
        "qvm-open-in-dvm"
    } else {
        "qvm-open-in-vm"
    };
    let usage = |code: u8| {
        if dispvm {
            eprintln!("Usage: {name} [--view-only] [--] filename");
        } else {
            eprintln!("Usage: {name} [--view-only] [--] vmname filename");
        }
        ExitCode::from(code)
    };
    let mut view_only = false;
    let mut operands: Vec<OsString> = Vec::new();
    let mut dashdash = false;
    for arg in std::env::args_os().skip(1) {
        if !dashdash {
            match arg.as_bytes() {
                b"--" => {
                    dashdash = true;
                    continue;
                }
                b"--help" => return usage(0),
                b"--view-only" => {
                    view_only = true;
                    continue;
                }
                [b'-', ..] => return usage(2),
                _ => {}
            }
        }
        operands.push(arg);
    }
    let (target, file) = match (dispvm, operands.as_slice()) {
        (true, [file]) => (OsString::from("@dispvm"), file.clone()),
        (false, [vm, file]) => (vm.clone(), file.clone()),
        _ => return usage(2),
    };
    if target.is_empty() || file.is_empty() {
        return usage(2);
    }
    let path = PathBuf::from(&file);
    let is_url = is_url(file.as_bytes());
    if path.is_dir() {
        eprintln!("Error! \"{}\" is a directory.", path.display());
        return usage(2);
    }
    if !path.is_file() && !is_url {
        eprintln!("Error! \"{}\" is not a valid file or URL.", path.display());
        return usage(2);
    }
    // A disposable opening a file in another disposable could loop forever.
    if target.as_bytes() == b"@dispvm" || target.as_bytes().starts_with(b"@dispvm:") {
        let service = std::env::var("QREXEC_SERVICE_FULL_NAME").unwrap_or_default();
        if service.starts_with("qubes.OpenInVM+") || service.starts_with("qubes.OpenURL+") {
            eprintln!("Cannot prompt user, exiting to avoid possible infinite VM creation loop.");
            return ExitCode::from(1);
        }
    }
    let client = std::env::var_os("QREXEC_CLIENT_VM")
        .unwrap_or_else(|| "/usr/lib/qubes/qrexec-client-vm".into());
    let mut command = Command::new(client);
    command.arg("--").arg(&target);
    if is_url && !path.is_file() {
        let status = command
            .args([
                "qubes.OpenURL",
                "/bin/sh",
                "-c",
                "printf %s\\\\n \"$1\"; exec cat >/dev/null",
                "sh",
            ])
            .arg(&file)
            .stdin(Stdio::null())
            .status();
        return finish(name, status.map(|s| (s, None)));
    }
    let qopen = crate::frontend::helper("QOPEN_IN_VM", "qopen-in-vm");
    command.arg("qubes.OpenInVM").arg(qopen);
    if view_only {
        command.arg("--view-only");
        let status = command.arg("--").arg(&path).stdin(Stdio::null()).status();
        return finish(name, status.map(|s| (s, None)));
    }
    // A symbolic link: its target is what gets replaced (the link stays).
    let real = match std::fs::canonicalize(&path) {
        Ok(real) => real,
        Err(e) => {
            eprintln!("{name}: {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let sent = match std::fs::metadata(&real) {
        Ok(meta) => Stamp::of(&meta),
        Err(e) => {
            eprintln!("{name}: stat {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let received = match temp_next_to(&real) {
        Ok(t) => t,
        Err(message) => {
            eprintln!("{name}: {message}");
            return ExitCode::from(1);
        }
    };
    command
        .arg("--receive-into")
        .arg(received.0.path())
        .arg("--")
        .arg(&path)
        .stdin(Stdio::null());
    let status = match command.status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("{name}: cannot run qrexec-client-vm: {e}");
            return ExitCode::from(1);
        }
    };
    if !status.success() {
        // `received` is removed when dropped.
        return finish(name, Ok((status, Some(&path))));
    }
    match settle(&real, sent, received) {
        Ok(Settled::Unchanged | Settled::Replaced) => ExitCode::SUCCESS,
        Ok(Settled::Kept(kept, why)) => {
            eprintln!(
                "{name}: {why}; the edited file has been saved to {}",
                kept.display()
            );
            ExitCode::from(1)
        }
        Err(message) => {
            eprintln!("{name}: {message}; {} is left unchanged", path.display());
            ExitCode::from(1)
        }
    }
}

fn finish(
    name: &str,
    status: std::io::Result<(std::process::ExitStatus, Option<&PathBuf>)>,
) -> ExitCode {
    match status {
        Ok((status, _)) if status.success() => ExitCode::SUCCESS,
        Ok((status, file)) => {
            let code = status.code().map_or(1, |c| c.clamp(1, 255) as u8);
            match file {
                Some(file) => eprintln!(
                    "{name}: the call failed ({status}); {} is left unchanged",
                    file.display()
                ),
                None => eprintln!("{name}: the call failed ({status})"),
            }
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("{name}: cannot run qrexec-client-vm: {e}");
            ExitCode::from(1)
        }
    }
}

/// `scheme://...` as Qubes' script tests it: a letter, then letters,
/// digits or `+`, then `://`.
fn is_url(arg: &[u8]) -> bool {
    let Some(end) = arg.windows(3).position(|w| w == b"://") else {
        return false;
    };
    let scheme = arg.get(..end).unwrap_or_default();
    scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+')
}

#[cfg(test)]
mod tests {
    use super::is_url;

    #[test]
    fn urls_are_told_from_files() {
        assert!(is_url(b"https://example.org/x"));
        assert!(is_url(b"svn+ssh://h/p"));
        assert!(!is_url(b"1http://x"));
        assert!(!is_url(b"dir/a://b"));
        assert!(!is_url(b"report.txt"));
    }
}
