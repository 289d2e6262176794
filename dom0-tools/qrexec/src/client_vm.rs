//! `qrexec-client-vm`: starts an RPC call from a Linux qube.
//!
//! `qrexec-client-vm [options] TARGET SERVICE[+ARG] [LOCAL_PROGRAM [ARGS…]]`
//! sends the agent (socket `/var/run/qubes/qrexec-agent` or
//! `--agent-socket`) a `MSG_TRIGGER_SERVICE4` (source empty unless
//! `--source-qube`) with ident `SOCKET`, and reads back 8 bytes: the
//! data vchan's domain and port. An immediate end of stream means dom0
//! refused: it prints `Request refused` and exits 126. Otherwise it offers
//! the data vchan as server and streams stdin/stdout — its own, or those of
//! LOCAL_PROGRAM, whose stdin/stdout become the service's stdout/stdin while
//! the caller's original fds are passed as `SAVED_FD_0`/`SAVED_FD_1`
//! (`SAVED_FD_2` with `PASS_LOCAL_STDERR`). `-p DATA` is sent before
//! stdin; `--use-stdin-socket` uses the stream socket on fd 0 both ways.
//! Local stdout is closed when the service's stdout ends. Exit code: the service's when
//! non-zero, otherwise the local program's (as `qrexec_process_io` returns). `$` in the target is read as `@` (old keyword form).
//!
//! Source: qubes-core-qrexec `agent/qrexec-client-vm.c`. Options are parsed
//! in POSIX mode so the local program's own flags are left alone.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use protocol::qrexec::{QREXEC_EXIT_REQUEST_REFUSED, Repr, RequestId, TriggerService4};

use crate::agent::QREXEC_AGENT_TRIGGER_PATH;
use crate::args::{self, OptSpec};
use crate::data::{self, EXIT_CODE_DISCONNECTED, Requester};
use crate::exec;
use crate::log_error;
use crate::stdio_socket;
use crate::vchan;
use crate::wire;

const SPECS: &[OptSpec] = &[
    OptSpec {
        short: Some('h'),
        long: Some("help"),
        takes_arg: false,
        id: "help",
    },
    OptSpec {
        short: None,
        long: Some("buffer-size"),
        takes_arg: true,
        id: "buffer-size",
    },
    OptSpec {
        short: Some('t'),
        long: Some("filter-escape-chars-stdout"),
        takes_arg: false,
        id: "t",
    },
    OptSpec {
        short: Some('T'),
        long: Some("filter-escape-chars-stderr"),
        takes_arg: false,
        id: "T",
    },
    OptSpec {
        short: None,
        long: Some("no-filter-escape-chars-stdout"),
        takes_arg: false,
        id: "no-t",
    },
    OptSpec {
        short: None,
        long: Some("no-filter-escape-chars-stderr"),
        takes_arg: false,
        id: "no-T",
    },
    OptSpec {
        short: Some('a'),
        long: Some("agent-socket"),
        takes_arg: true,
        id: "agent-socket",
    },
    OptSpec {
        short: Some('s'),
        long: Some("source-qube"),
        takes_arg: true,
        id: "source-qube",
    },
    OptSpec {
        short: Some('p'),
        long: Some("prefix-data"),
        takes_arg: true,
        id: "prefix-data",
    },
    OptSpec {
        short: None,
        long: Some("use-stdin-socket"),
        takes_arg: false,
        id: "use-stdin-socket",
    },
];

/// How long to wait for the service side to connect to our data vchan.
pub const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

fn usage() -> i32 {
    eprintln!(
        "usage: qrexec-client-vm [options] target_vmname program_ident [local_program [local program arguments]]"
    );
    eprintln!("Options:");
    eprintln!("  --buffer-size=BUFFER_SIZE - minimum vchan buffer size (default: 64k)");
    eprintln!(
        "  -t, --filter-escape-chars-stdout - filter non-ASCII and control characters on stdout (default if stdout is a terminal)"
    );
    eprintln!(
        "  -T, --filter-escape-chars-stderr - filter non-ASCII and control characters on stderr (default if stderr is a terminal)"
    );
    eprintln!("  --no-filter-escape-chars-stdout - opposite to --filter-escape-chars-stdout");
    eprintln!("  --no-filter-escape-chars-stderr - opposite to --filter-escape-chars-stderr");
    eprintln!("  --agent-socket=PATH - path to connect to, default: {QREXEC_AGENT_TRIGGER_PATH}");
    eprintln!(
        "  -p PREFIX-DATA, --prefix-data=PREFIX-DATA - send PREFIX-DATA before standard input (once)"
    );
    eprintln!(
        "  --use-stdin-socket - fd 0 is a stream socket: use it for both standard input and output"
    );
    eprintln!(
        "  -s SOURCE-QUBE, --source-qube=SOURCE-QUBE - the qube the call is relayed for (for the policy)"
    );
    2
}

/// Where the service's stdout goes, closed when the service's stdout ends
/// (as Qubes' client does), not only when the exit code arrives.
pub enum LocalOutput {
    /// Our own stdout: at EOF, fd 1 is pointed at `/dev/null`, so whoever
    /// reads our stdout sees the end.
    Stdout(File),
    /// The `--use-stdin-socket` socket: at EOF, its writing half is shut.
    Socket(File),
    /// The local program's stdin.
    Program(Box<dyn Write + Send>),
}

impl std::fmt::Debug for LocalOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LocalOutput::Stdout(_) => "LocalOutput::Stdout",
            LocalOutput::Socket(_) => "LocalOutput::Socket",
            LocalOutput::Program(_) => "LocalOutput::Program",
        })
    }
}

impl Write for LocalOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LocalOutput::Stdout(f) | LocalOutput::Socket(f) => f.write(buf),
            LocalOutput::Program(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LocalOutput::Stdout(f) | LocalOutput::Socket(f) => f.flush(),
            LocalOutput::Program(w) => w.flush(),
        }
    }
}

impl Drop for LocalOutput {
    fn drop(&mut self) {
        match self {
            LocalOutput::Stdout(_) => {
                if let Ok(null) = File::options().write(true).open("/dev/null") {
                    let _ = rustix::stdio::dup2_stdout(&null);
                }
            }
            LocalOutput::Socket(f) => {
                let _ = rustix::net::shutdown(&*f, rustix::net::Shutdown::Write);
            }
            LocalOutput::Program(_) => {}
        }
    }
}

/// The last of `-t`/`--no-filter…` wins; `None` if neither was given.
fn last_flag(parsed: &args::Parsed, on: &str, off: &str) -> Option<bool> {
    parsed
        .options
        .iter()
        .rev()
        .find(|(id, _)| *id == on || *id == off)
        .map(|(id, _)| *id == on)
}

fn dup_file(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<File> {
    Ok(File::from(rustix::io::dup(fd)?))
}

/// `qrexec-client-vm` main: returns the exit code.
pub fn main(argv: Vec<String>) -> i32 {
    if argv.get(1).map(String::as_str) == Some(stdio_socket::CALL_PROCESS_ARG) && argv.len() == 2 {
        return stdio_socket::call_process_main();
    }
    crate::log::init("qrexec-client-vm");
    let parsed = match args::parse(argv.get(1..).unwrap_or(&[]), SPECS, true) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("qrexec-client-vm: {e}");
            return usage();
        }
    };
    if parsed.has("help") || parsed.operands.len() < 2 {
        return usage();
    }
    let (Some(target), Some(service)) = (parsed.operands.first(), parsed.operands.get(1)) else {
        return usage();
    };
    let local_program = parsed.operands.get(2..).filter(|p| !p.is_empty());
    let prefix: Vec<&str> = parsed
        .options
        .iter()
        .filter(|(id, _)| *id == "prefix-data")
        .filter_map(|(_, v)| v.as_deref())
        .collect();
    if prefix.len() > 1
        || parsed
            .options
            .iter()
            .filter(|(id, _)| *id == "source-qube")
            .count()
            > 1
    {
        return usage();
    }
    let prefix = prefix.first().map(|p| p.as_bytes().to_vec());
    let stdin_socket = match parsed
        .options
        .iter()
        .filter(|(id, _)| *id == "use-stdin-socket")
        .count()
    {
        0 => false,
        1 => match rustix::net::sockopt::socket_type(std::io::stdin()) {
            Ok(rustix::net::SocketType::STREAM) => true,
            Ok(other) => {
                eprintln!(
                    "qrexec-client-vm: stdin was a socket of type {}, not SOCK_STREAM",
                    other.as_raw()
                );
                return 2;
            }
            Err(rustix::io::Errno::NOTSOCK) => {
                eprintln!("qrexec-client-vm: --use-stdin-socket passed, but stdin not a socket");
                return 2;
            }
            Err(e) => {
                eprintln!("qrexec-client-vm: getsockopt(0, SOL_SOCKET, SO_TYPE): {e}");
                return 2;
            }
        },
        _ => {
            eprintln!("qrexec-client-vm: --use-stdin-socket passed twice");
            return 2;
        }
    };
    if stdin_socket && local_program.is_some() {
        eprintln!("cannot spawn a local process with --use-stdin-socket");
        return usage();
    }
    let replace_stdout = last_flag(&parsed, "t", "no-t")
        .unwrap_or(local_program.is_none() && std::io::stdout().is_terminal());
    let replace_stderr = last_flag(&parsed, "T", "no-T").unwrap_or(std::io::stderr().is_terminal());
    let target = target.replace('$', "@");
    let socket = parsed
        .value("agent-socket")
        .unwrap_or(QREXEC_AGENT_TRIGGER_PATH);

    let mut trigger = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect: {e}");
            return 1;
        }
    };
    let Ok(ident) = RequestId::new(b"SOCKET") else {
        return 1;
    };
    let source = parsed.value("source-qube").unwrap_or("");
    // Always MSG_TRIGGER_SERVICE4, with an empty source unless
    // --source-qube was given: the only request Qubes' 4.4 agent accepts.
    let request = Repr::TriggerService4(TriggerService4 {
        source_domain: source.as_bytes(),
        target_domain: target.as_bytes(),
        request_id: ident,
        service_name: service.as_bytes(),
    });
    if let Err(e) = wire::write_message(&mut trigger, &request) {
        eprintln!("write(params) to agent: {e}");
        return 1;
    }
    let mut params = [0u8; 8];
    let mut got = 0;
    while let Some(rest) = params.get_mut(got..).filter(|rest| !rest.is_empty()) {
        match trigger.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("read: {e}");
                return 1;
            }
        }
    }
    if got == 0 {
        eprintln!("Request refused");
        return QREXEC_EXIT_REQUEST_REFUSED as i32;
    }
    if got != params.len() {
        eprintln!("read: short read from agent");
        return 1;
    }
    let connect_domain = u32::from_ne_bytes([params[0], params[1], params[2], params[3]]);
    let connect_port = u32::from_ne_bytes([params[4], params[5], params[6], params[7]]);

    let mut child = None;
    let mut call_process = None;
    let (input, output): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match local_program {
        Some(program) => {
            let Some(path) = program.first() else {
                return usage();
            };
            let mut saved = Vec::new();
            let mut cmd = Command::new(if path.contains('/') {
                path.clone()
            } else {
                format!("./{path}")
            });
            let name = Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.clone());
            // As Qubes: the program's stdin is a socketpair, and
            // QREXEC_AGENT_PID names a process of this call; SIGUSR1 to it
            // means "read my output from my stdin socket from now on".
            let (theirs, ours) = match stdio_socket::stdin_pair() {
                Ok(pair) => pair,
                Err(e) => {
                    eprintln!("socketpair: {e}");
                    return 1;
                }
            };
            let Ok(reader) = ours.try_clone() else {
                return 1;
            };
            call_process = stdio_socket::CallProcess::start();
            match call_process.as_ref() {
                Some(c) => cmd.env("QREXEC_AGENT_PID", c.pid()),
                None => cmd.env_remove("QREXEC_AGENT_PID"),
            };
            let pidfd = call_process
                .as_ref()
                .and_then(stdio_socket::CallProcess::pidfd);
            cmd.arg0(name)
                .args(program.get(1..).unwrap_or(&[]))
                .stdin(Stdio::from(theirs))
                .stdout(Stdio::piped());
            let fds = [
                std::os::fd::AsFd::as_fd(&std::io::stdin()).try_clone_to_owned(),
                std::os::fd::AsFd::as_fd(&std::io::stdout()).try_clone_to_owned(),
                std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned(),
            ];
            for (i, fd) in fds.into_iter().enumerate() {
                if i == 2 && std::env::var_os("PASS_LOCAL_STDERR").is_none() {
                    continue;
                }
                let Ok(fd) = fd else { continue };
                // A plain dup() (no close-on-exec) so the program inherits it.
                let Ok(inheritable) = rustix::io::dup(&fd) else {
                    continue;
                };
                cmd.env(
                    format!("SAVED_FD_{i}"),
                    std::os::fd::AsRawFd::as_raw_fd(&inheritable).to_string(),
                );
                saved.push(inheritable);
            }
            let spawned = cmd.spawn();
            drop(saved);
            drop(cmd);
            match spawned {
                Ok(mut c) => {
                    let Some(out) = c.stdout.take() else {
                        return 1;
                    };
                    child = Some(c);
                    (
                        Box::new(stdio_socket::SwitchingOutput::new(out, reader, pidfd)),
                        Box::new(LocalOutput::Program(Box::new(stdio_socket::SocketStdin(
                            ours,
                        )))),
                    )
                }
                Err(e) => {
                    eprintln!("execv: {e}");
                    return 1;
                }
            }
        }
        None => {
            let stdin = dup_file(std::os::fd::AsFd::as_fd(&std::io::stdin()));
            let stdout = if stdin_socket {
                dup_file(std::os::fd::AsFd::as_fd(&std::io::stdin())).map(LocalOutput::Socket)
            } else {
                dup_file(std::os::fd::AsFd::as_fd(&std::io::stdout())).map(LocalOutput::Stdout)
            };
            match (stdin, stdout) {
                (Ok(i), Ok(o)) => (Box::new(i), Box::new(o)),
                _ => return 1,
            }
        }
    };

    let input: Box<dyn Read + Send> = match prefix {
        Some(p) => Box::new(std::io::Cursor::new(p).chain(input)),
        None => input,
    };
    let remote = (|| -> crate::Result<u32> {
        let transport = vchan::from_env().map_err(|source| crate::Error::Io {
            context: "vchan".into(),
            source,
        })?;
        let mut vchan = transport
            .server(connect_domain, connect_port, Some(DATA_CONNECT_TIMEOUT))
            .map_err(|source| crate::Error::Io {
                context: "data vchan".into(),
                source,
            })?;
        let version = data::handshake(&mut *vchan, true)?;
        data::run_requester(
            vchan,
            version,
            Requester {
                input: Some(input),
                output,
                errors: Box::new(std::io::stderr()),
                replace_stdout,
                replace_stderr,
            },
        )
    })();
    drop(trigger);
    let remote_code = match remote {
        Ok(code) => code as i32,
        Err(e) => {
            log_error!("{e}");
            EXIT_CODE_DISCONNECTED as i32
        }
    };
    drop(call_process);
    // As Qubes' process_io: a non-zero remote status wins, otherwise the
    // local program's status.
    match child {
        Some(mut c) => match c.wait() {
            Ok(_) if remote_code != 0 => remote_code,
            Ok(status) => exec::exit_code(status) as i32,
            Err(e) => {
                eprintln!("wait for local process: {e}");
                remote_code
            }
        },
        None => remote_code,
    }
}
