//! Running what a qrexec call asks for: a shell command (`user:command`) or
//! an RPC service (`QUBESRPC service+arg source [name|keyword target]`).
//!
//! Services are looked up as Qubes 4.4's agent does (see [`crate::service`]):
//! `NAME+ARG` (`NAME+` without an argument) in every directory of
//! `QREXEC_SERVICE_PATH` (`:`-separated, default
//! `/usr/local/etc/qubes-rpc:/etc/qubes-rpc`), then `NAME`; a UNIX socket is
//! connected to, a `/dev/tcp…` link forwards to TCP, after the service's
//! `rpc-config` is applied (an invalid one refuses the call with 125). An
//! executable file is run
//! with the argument as `argv[1]` (when non-empty); a non-executable file is
//! the legacy form holding a command line, run with `/bin/sh -c`. The child
//! gets the variables describing a call ([`CALL_VARIABLES`]) removed (others,
//! such as `QREXEC_SERVICE_PATH`, stay, as in Qubes), then `QREXEC_REMOTE_DOMAIN`, `QREXEC_SERVICE_FULL_NAME`,
//! `QREXEC_SERVICE_ARGUMENT` (when the name has a `+`),
//! `QREXEC_REQUESTED_TARGET_TYPE` (+ `QREXEC_REQUESTED_TARGET` or
//! `QREXEC_REQUESTED_TARGET_KEYWORD`) are set as the multiplexer sets them.
//! A root agent runs a command for another user inside a PAM session
//! ([`pam`], with the `pam` feature) or, without it, switches to the user
//! (from `/etc/passwd`) itself; an unprivileged one runs everything as
//! itself. This module must never pass a
//! service name containing `/` (or `.`/`..`) to the file system, and never
//! run a command through anything but the fixed shell.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use protocol::qrexec::cmdline::{self, RpcCommand, TargetKind};
use protocol::qrexec::names;

pub mod pam;

/// Default service directories (`QREXEC_SERVICE_PATH` in `qrexec.h`).
pub const DEFAULT_SERVICE_PATH: &str = "/usr/local/etc/qubes-rpc:/etc/qubes-rpc";

/// The shell used for plain commands.
pub const SHELL: &str = "/bin/sh";

/// Exit code of a process as Qubes reports it: the code, or 128+signal.
pub fn exit_code(status: ExitStatus) -> u32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u32 & 0xff,
        (None, Some(signal)) => 128 + signal as u32,
        (None, None) => 255,
    }
}

/// The service directories from `QREXEC_SERVICE_PATH`.
pub fn service_path_from_env() -> Vec<PathBuf> {
    let text = std::env::var("QREXEC_SERVICE_PATH")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_PATH.to_string());
    text.split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// What a service name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceHandler {
    /// An executable file.
    Executable(PathBuf),
    /// A non-executable file holding a command line.
    CommandLine(String),
}

fn is_safe_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

fn handler_at(path: &Path) -> Option<ServiceHandler> {
    let meta = fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() == 0 {
        return None;
    }
    if meta.permissions().mode() & 0o111 != 0 {
        return Some(ServiceHandler::Executable(path.to_path_buf()));
    }
    let text = fs::read_to_string(path).ok()?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    (!line.is_empty()).then_some(ServiceHandler::CommandLine(line))
}

/// Find the handler of `full` (`name+arg`) whose bare name is `name`.
pub fn find_service(dirs: &[PathBuf], full: &str, name: &str) -> Option<ServiceHandler> {
    if !is_safe_component(name) {
        return None;
    }
    for dir in dirs {
        if is_safe_component(full)
            && let Some(h) = handler_at(&dir.join(full))
        {
            return Some(h);
        }
        if let Some(h) = handler_at(&dir.join(name)) {
            return Some(h);
        }
    }
    None
}

/// A user account from `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// Look `name` up in a passwd-format text.
pub fn parse_passwd(text: &str, name: &str) -> Option<Account> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [user, _, uid, gid, _, home, shell, ..] if *user == name => Some(Account {
                name: (*user).to_string(),
                uid: uid.parse().ok()?,
                gid: gid.parse().ok()?,
                home: (*home).to_string(),
                shell: (*shell).to_string(),
            }),
            _ => None,
        }
    })
}

/// Look a user up in `/etc/passwd`.
pub fn lookup_user(name: &str) -> Option<Account> {
    parse_passwd(&fs::read_to_string("/etc/passwd").ok()?, name)
}

/// How the child's stdio is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioMode {
    /// A socketpair for stdin (as Qubes' agent: the service may send its
    /// output there after SIGUSR1 to `QREXEC_AGENT_PID`), pipes for stdout
    /// and stderr.
    Piped,
    /// Pipes for stdin and stdout; stderr stays ours (a local program of
    /// qrexec-client or qrexec-client-vm).
    PipedKeepStderr,
    /// `/dev/null` for all three (`MSG_JUST_EXEC`).
    Null,
    /// Our own stdin, stdout and stderr (qrexec-client `-d dom0`).
    Inherit,
    /// A pipe for stdin, our own stdout and stderr (`-d dom0 -p`).
    PipedStdinOnly,
}

/// A connection to a socket or TCP service.
#[derive(Debug)]
pub enum ServiceStream {
    /// A UNIX-socket service.
    Unix(std::os::unix::net::UnixStream),
    /// A `/dev/tcp` service.
    Tcp(std::net::TcpStream),
}

impl ServiceStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            ServiceStream::Unix(s) => ServiceStream::Unix(s.try_clone()?),
            ServiceStream::Tcp(s) => ServiceStream::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self, how: std::net::Shutdown) {
        let _ = match self {
            ServiceStream::Unix(s) => s.shutdown(how),
            ServiceStream::Tcp(s) => s.shutdown(how),
        };
    }
}

impl Read for ServiceStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ServiceStream::Unix(s) => s.read(buf),
            ServiceStream::Tcp(s) => s.read(buf),
        }
    }
}

/// The writing half of a [`ServiceStream`]: dropping it (the caller's
/// stdin ended) shuts the connection for writing, or entirely with
/// `exit-on-client-eof`, which also ends the service's output.
#[derive(Debug)]
struct ServiceInput {
    stream: ServiceStream,
    exit_on_client_eof: bool,
    /// Told when the caller's input to the service is over.
    done: std::sync::mpsc::Sender<()>,
}

impl Write for ServiceInput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.stream {
            ServiceStream::Unix(s) => s.write(buf),
            ServiceStream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ServiceInput {
    fn drop(&mut self) {
        self.stream.shutdown(if self.exit_on_client_eof {
            std::net::Shutdown::Both
        } else {
            std::net::Shutdown::Write
        });
        let _ = self.done.send(());
    }
}

/// A connected socket or TCP service.
#[derive(Debug)]
pub struct Connected {
    /// The connection.
    pub stream: ServiceStream,
    /// Sent before the caller's data (the service descriptor and source,
    /// NUL-terminated, unless `skip-service-descriptor`).
    pub prefix: Vec<u8>,
    /// `exit-on-client-eof`.
    pub exit_on_client_eof: bool,
    /// `exit-on-service-eof`.
    pub exit_on_service_eof: bool,
}

impl Connected {
    /// `MSG_JUST_EXEC` of a socket service: send the prefix, then close.
    pub fn just_exec(mut self) {
        if !self.prefix.is_empty() {
            let _ = match &mut self.stream {
                ServiceStream::Unix(s) => s.write_all(&self.prefix),
                ServiceStream::Tcp(s) => s.write_all(&self.prefix),
            };
        }
        self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// The executing side of a data channel for this connection: the
    /// caller's stdin goes to the socket, the socket's data is the stdout,
    /// there is no stderr, and the exit code is 0.
    pub fn into_executor(self) -> std::io::Result<crate::data::Executor> {
        let mut writer = self.stream.try_clone()?;
        if !self.prefix.is_empty() {
            match &mut writer {
                ServiceStream::Unix(s) => s.write_all(&self.prefix)?,
                ServiceStream::Tcp(s) => s.write_all(&self.prefix)?,
            }
        }
        // The call ends (exit code 0) once the service's output has ended
        // and, unless exit-on-service-eof, the input side is over too: the
        // caller's stdin ended, a write to the service failed, or the
        // service shut its reading side (the socket hangs up).
        let (done, over) = std::sync::mpsc::channel();
        let wait: Box<dyn FnOnce() -> u32 + Send> = if self.exit_on_service_eof {
            Box::new(|| 0)
        } else {
            let hangup = done.clone();
            let watched = self.stream.try_clone()?;
            std::thread::Builder::new()
                .name("qrexec-socket-hangup".into())
                .spawn(move || {
                    let fd = match &watched {
                        ServiceStream::Unix(s) => std::os::fd::AsFd::as_fd(s),
                        ServiceStream::Tcp(s) => std::os::fd::AsFd::as_fd(s),
                    };
                    let mut fds = [rustix::event::PollFd::new(
                        &fd,
                        rustix::event::PollFlags::empty(),
                    )];
                    loop {
                        match rustix::event::poll(&mut fds, None) {
                            Ok(n) if n > 0 => break,
                            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
                            Err(_) => break,
                        }
                    }
                    let _ = hangup.send(());
                })?;
            let closer = self.stream.try_clone()?;
            Box::new(move || {
                let _ = over.recv();
                // Both directions are over: this also wakes the hang-up
                // watcher, which then lets go of its handle.
                closer.shutdown(std::net::Shutdown::Both);
                0
            })
        };
        Ok(crate::data::Executor {
            stdin: Some(Box::new(ServiceInput {
                stream: writer,
                exit_on_client_eof: self.exit_on_client_eof,
                done,
            })),
            stdout: Some(Box::new(self.stream)),
            stderr: None,
            wait,
            close_stdin_on_exit: false,
        })
    }
}

/// What [`spawn`] achieved.
#[derive(Debug)]
pub enum Launch {
    /// The process runs; with [`StdioMode::Piped`], also our end of its
    /// stdin socket (its `child.stdin` is then `None`).
    Started(Child, Option<std::os::unix::net::UnixStream>),
    /// A socket or `/dev/tcp` service is connected.
    Connected(Connected),
    /// The RPC service does not exist here (exit code 127).
    NotFound,
    /// The process could not be started; report this exit code.
    Failed(u32),
}

/// What to run and in which context.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The command part (after `user:`), or the whole dom0 command line.
    pub command: &'a [u8],
    /// The user to run as (`None`: as ourselves).
    pub user: Option<&'a str>,
    /// Service directories.
    pub service_path: &'a [PathBuf],
    /// Extra environment variables (after the `QREXEC*` clean-up).
    pub extra_env: &'a [(&'a str, String)],
    /// Stdio wiring.
    pub stdio: StdioMode,
    /// Shell for plain commands (`/bin/sh`, or bash for qrexec-client -l).
    pub shell: &'a str,
}

/// The environment variables that describe one call.
pub const CALL_VARIABLES: [&str; 7] = [
    "QREXEC_SERVICE_FULL_NAME",
    "QREXEC_REMOTE_DOMAIN",
    "QREXEC_REQUESTED_TARGET_TYPE",
    "QREXEC_SERVICE_ARGUMENT",
    "QREXEC_REQUESTED_TARGET",
    "QREXEC_REQUESTED_TARGET_KEYWORD",
    "QREXEC_AGENT_PID",
];

fn base_command(program: impl Into<OsString>, req: &Request<'_>) -> Command {
    let mut cmd = Command::new(program.into());
    // As Qubes: the variables describing a call are cleared (and set again
    // for a service); others, such as QREXEC_SERVICE_PATH, stay.
    for key in CALL_VARIABLES {
        cmd.env_remove(key);
    }
    for (key, value) in req.extra_env {
        cmd.env(key, value);
    }
    match req.stdio {
        StdioMode::Piped => {
            // stdin is set by spawn (a socketpair).
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        StdioMode::PipedKeepStderr => {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        }
        StdioMode::Null => {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        StdioMode::Inherit => {}
        StdioMode::PipedStdinOnly => {
            cmd.stdin(Stdio::piped());
        }
    }
    cmd
}

/// Whether running as `user` takes a PAM session: we are root and the
/// user is an existing account other than root.
fn needs_session(user: &str) -> bool {
    rustix::process::geteuid().is_root() && lookup_user(user).is_some_and(|a| a.uid != 0)
}

fn apply_user(cmd: &mut Command, user: Option<&str>) -> Result<(), u32> {
    let Some(user) = user else { return Ok(()) };
    if !rustix::process::geteuid().is_root() {
        // Unprivileged (tests, development): run as ourselves.
        return Ok(());
    }
    let Some(account) = lookup_user(user) else {
        crate::log_error!(
            "user {} does not exist",
            crate::log::escape(user.as_bytes())
        );
        return Err(1);
    };
    if account.uid != 0 {
        cmd.uid(account.uid).gid(account.gid);
    }
    cmd.env("HOME", &account.home)
        .env("USER", &account.name)
        .env("LOGNAME", &account.name)
        .env("SHELL", &account.shell);
    if Path::new(&account.home).is_dir() {
        cmd.current_dir(&account.home);
    }
    Ok(())
}

fn rpc_env(rpc: &RpcCommand<'_>) -> Vec<(&'static str, String)> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut env = vec![
        ("QREXEC_REMOTE_DOMAIN", text(rpc.source)),
        ("QREXEC_SERVICE_FULL_NAME", text(rpc.service)),
    ];
    if let Some(plus) = rpc.service.iter().position(|&b| b == b'+') {
        env.push((
            "QREXEC_SERVICE_ARGUMENT",
            text(rpc.service.get(plus + 1..).unwrap_or(&[])),
        ));
    }
    match rpc.requested_target {
        Some(t) => {
            env.push(("QREXEC_REQUESTED_TARGET_TYPE", t.kind.as_str().to_string()));
            env.push((
                match t.kind {
                    TargetKind::Name => "QREXEC_REQUESTED_TARGET",
                    TargetKind::Keyword => "QREXEC_REQUESTED_TARGET_KEYWORD",
                },
                text(t.target),
            ));
        }
        None => env.push(("QREXEC_REQUESTED_TARGET_TYPE", String::new())),
    }
    env
}

/// Start what `req` asks for.
pub fn spawn(req: &Request<'_>) -> Launch {
    let parsed = match cmdline::parse_command(req.command) {
        Ok(parsed) => parsed,
        Err(e) => {
            crate::log_error!("Could not parse command line: {e}");
            return Launch::Failed(protocol::qrexec::QREXEC_EXIT_PROBLEM);
        }
    };
    let mut cmd = match parsed {
        cmdline::Command::Shell { command, .. } => {
            let mut cmd = base_command(req.shell, req);
            cmd.arg("-c").arg(os_from_bytes(command));
            cmd
        }
        cmdline::Command::Rpc(rpc) => {
            let Ok(full) = std::str::from_utf8(rpc.service) else {
                return Launch::NotFound;
            };
            let Ok(descriptor) = names::split_service_descriptor(rpc.service) else {
                crate::log_error!("Service path invalid: {}", crate::log::escape(rpc.service));
                return Launch::NotFound;
            };
            let name = std::str::from_utf8(descriptor.name).unwrap_or("");
            let argument = descriptor
                .argument
                .and_then(|a| std::str::from_utf8(a).ok())
                .filter(|a| !a.is_empty());
            let lookup = if full.contains('+') {
                full.to_string()
            } else {
                format!("{full}+")
            };
            let problem = protocol::qrexec::QREXEC_EXIT_PROBLEM;
            let config = match crate::service::load_config(
                &crate::service::config_path_from_env(),
                &lookup,
                name,
            ) {
                Ok(c) => c,
                Err(e) => {
                    crate::log_error!("Cannot load service configuration: {e}");
                    return Launch::Failed(problem);
                }
            };
            let found = match crate::service::find(req.service_path, &lookup, name) {
                Ok(found) => found,
                Err(crate::service::LookupError::NotFound) => {
                    crate::log_error!("Service not found: {}", crate::log::escape(rpc.service));
                    return Launch::NotFound;
                }
                Err(crate::service::LookupError::Broken(e)) => {
                    crate::log_error!("Error finding service: {e}");
                    return Launch::Failed(problem);
                }
            };
            let user = config.force_user.as_deref().or(req.user);
            if config.wait_for_session && !rpc.nogui {
                wait_for_session(req.service_path, &rpc, user);
            }
            let prefix = if config.send_descriptor {
                let mut p = req.command.to_vec();
                if let Some(rest) = p.strip_prefix(protocol::qrexec::NOGUI_CMD_PREFIX) {
                    p = rest.to_vec();
                }
                if let Some(rest) = p.strip_prefix(b"QUBESRPC ".as_slice()) {
                    p = rest.to_vec();
                }
                p.push(0);
                p
            } else {
                Vec::new()
            };
            let connected = |stream| {
                Launch::Connected(Connected {
                    stream,
                    prefix: prefix.clone(),
                    exit_on_client_eof: config.exit_on_client_eof,
                    exit_on_service_eof: config.exit_on_service_eof,
                })
            };
            let handler = match found {
                crate::service::Found::Socket(path) => {
                    return match std::os::unix::net::UnixStream::connect(&path) {
                        Ok(s) => connected(ServiceStream::Unix(s)),
                        Err(e) => {
                            crate::log_error!("connect to {}: {e}", crate::service::show(&path));
                            Launch::Failed(problem)
                        }
                    };
                }
                crate::service::Found::Tcp(target) => {
                    return match crate::service::tcp_destination(&target, argument)
                        .and_then(|(h, p)| crate::service::tcp_connect(&h, &p))
                    {
                        Ok(s) => connected(ServiceStream::Tcp(s)),
                        Err(e) => {
                            crate::log_error!("{e}");
                            Launch::Failed(problem)
                        }
                    };
                }
                crate::service::Found::File(path) => match handler_at(&path) {
                    Some(h) => h,
                    None => {
                        crate::log_error!(
                            "Unknown service type (not executable, not a socket): {}",
                            crate::service::show(&path)
                        );
                        return Launch::Failed(problem);
                    }
                },
            };
            let mut env: Vec<(&str, String)> = req.extra_env.to_vec();
            env.extend(rpc_env(&rpc));
            let req = Request {
                extra_env: &env,
                user,
                ..req.clone()
            };
            match handler {
                ServiceHandler::Executable(path) => {
                    let mut cmd = base_command(path, &req);
                    cmd.args(argument);
                    cmd
                }
                ServiceHandler::CommandLine(line) => {
                    let mut cmd = base_command(SHELL, &req);
                    cmd.arg("-c").arg(line).arg("sh").args(argument);
                    cmd
                }
            }
        }
    };
    if let Some(user) = req.user.filter(|u| pam::ENABLED && needs_session(u)) {
        // A session for another user, held by our helper (see [`pam`]).
        let helper = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                crate::log_error!("cannot find our own program for the PAM session: {e}");
                return Launch::Failed(protocol::qrexec::QREXEC_EXIT_PROBLEM);
            }
        };
        cmd = pam::wrap(&cmd, user, base_command(helper, req));
    } else if let Err(code) = apply_user(&mut cmd, req.user) {
        return Launch::Failed(code);
    }
    let socket = if req.stdio == StdioMode::Piped {
        match crate::stdio_socket::stdin_pair() {
            Ok((theirs, ours)) => {
                cmd.stdin(Stdio::from(theirs));
                Some(ours)
            }
            Err(e) => {
                crate::log_error!("socketpair for the process's stdin: {e}");
                return Launch::Failed(protocol::qrexec::QREXEC_EXIT_PROBLEM);
            }
        }
    } else {
        None
    };
    match cmd.spawn() {
        Ok(child) => Launch::Started(child, socket),
        Err(e) => {
            crate::log_error!("cannot start process: {e}");
            Launch::Failed(protocol::qrexec::QREXEC_EXIT_PROBLEM)
        }
    }
}

/// Run `qubes.WaitForSession` (if installed) and wait for it: stdin is the
/// user name and a newline, `QREXEC_REMOTE_DOMAIN` the caller.
fn wait_for_session(dirs: &[PathBuf], rpc: &RpcCommand<'_>, user: Option<&str>) {
    let Ok(crate::service::Found::File(path)) =
        crate::service::find_file(dirs, "qubes.WaitForSession")
    else {
        crate::log_error!("Service not found: qubes.WaitForSession");
        return;
    };
    let mut cmd = Command::new(&path);
    cmd.env("QREXEC_REMOTE_DOMAIN", os_from_bytes(rpc.source))
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        crate::log_error!("cannot start {}", crate::service::show(&path));
        return;
    };
    let name = user
        .map(str::to_string)
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_default());
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(format!("{name}\n").as_bytes());
    }
    let _ = child.wait();
}

/// A service's stderr that is also written to our own log, one line per
/// chunk read, tagged `SERVICE-SOURCE` like qubes-rpc-multiplexer's
/// `logger -t "$1-$2"`. Unprintable bytes are escaped in the log only; the
/// bytes read are passed on unchanged.
#[derive(Debug)]
pub struct LoggedStderr<R> {
    inner: R,
    tag: String,
}

impl<R> LoggedStderr<R> {
    /// Wrap `inner`, logging under `tag`.
    pub fn new(inner: R, tag: String) -> Self {
        LoggedStderr { inner, tag }
    }
}

impl<R: std::io::Read> std::io::Read for LoggedStderr<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) {
            let text = chunk.strip_suffix(b"\n").unwrap_or(chunk);
            crate::log_error!("{}: {}", self.tag, crate::log::escape(text));
        }
        Ok(n)
    }
}

/// The log tag of an RPC command (`service-source`), if it is one.
pub fn stderr_tag(command: &[u8]) -> Option<String> {
    match cmdline::parse_command(command) {
        Ok(cmdline::Command::Rpc(rpc)) => Some(format!(
            "{}-{}",
            String::from_utf8_lossy(rpc.service),
            String::from_utf8_lossy(rpc.source)
        )),
        _ => None,
    }
}

/// An `OsString` holding `bytes` exactly (commands need not be UTF-8).
fn os_from_bytes(bytes: &[u8]) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    OsString::from_vec(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let text = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/zsh\n";
        let a = parse_passwd(text, "user").unwrap();
        assert_eq!((a.uid, a.gid), (1000, 1000));
        assert_eq!(a.home, "/home/user");
        assert!(parse_passwd(text, "nobody").is_none());
        assert!(parse_passwd("bad:x:y:0::/:/bin/sh", "bad").is_none());
    }

    #[test]
    fn service_lookup_order_and_safety() {
        let dir = std::env::temp_dir().join(format!("qrexec-exec-{}", std::process::id()));
        let a = dir.join("a");
        let b = dir.join("b");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(b.join("test.File+one"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(b.join("test.File+one"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(a.join("test.File"), "/usr/bin/server\n").unwrap();
        fs::write(a.join("empty"), "").unwrap();
        let dirs = vec![a.clone(), b.clone()];
        assert_eq!(
            find_service(&dirs, "test.File+one", "test.File"),
            Some(ServiceHandler::CommandLine("/usr/bin/server".into()))
        );
        assert_eq!(
            find_service(std::slice::from_ref(&b), "test.File+one", "test.File"),
            Some(ServiceHandler::Executable(b.join("test.File+one")))
        );
        assert_eq!(find_service(&dirs, "empty", "empty"), None);
        assert_eq!(find_service(&dirs, "..", ".."), None);
        assert_eq!(find_service(&dirs, "a/b", "a/b"), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn stderr_is_passed_on_and_tagged() {
        use std::io::Read;
        let mut r = LoggedStderr::new(&b"oops\n"[..], "test.Add+-vmA".into());
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"oops\n");
        assert_eq!(
            stderr_tag(b"QUBESRPC test.Add+ vmA").as_deref(),
            Some("test.Add+-vmA")
        );
        assert_eq!(stderr_tag(b"echo hi"), None);
    }

    #[test]
    fn rpc_environment() {
        let rpc = RpcCommand {
            nogui: false,
            service: b"test.File+testfile1",
            source: b"vm1",
            requested_target: None,
        };
        let env = rpc_env(&rpc);
        assert!(env.contains(&("QREXEC_SERVICE_ARGUMENT", "testfile1".into())));
        assert!(env.contains(&("QREXEC_REMOTE_DOMAIN", "vm1".into())));
        let rpc = RpcCommand {
            service: b"test.Add",
            ..rpc
        };
        assert!(
            !rpc_env(&rpc)
                .iter()
                .any(|(k, _)| *k == "QREXEC_SERVICE_ARGUMENT")
        );
    }
}
