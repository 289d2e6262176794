//! `qrexec-client`: dom0's tool to run a command or service in a qube
//! through that qube's qrexec-daemon, to connect the two ends of a VM→VM call
//! (`-c`), and to run a service called from a VM in dom0 (`-d dom0 -c`).
//!
//! Behaviour and flags follow qubes-core-qrexec `daemon/qrexec-client.c` and
//! `qrexec-daemon-common.c`: `-d NAME` target; `-l PROG` local program whose
//! stdin/stdout replace ours; `-e` only start the command (`MSG_JUST_EXEC`);
//! `-E`/`--no-exit-code` exit 0 whatever the remote code; `-c
//! REQID,SRC,SRCID` answer a trigger; `-t`/`-T` replace unprintable bytes
//! on stdout/stderr; `-w SECS` connection timeout (default 5, 0 = none);
//! `-W` wait for the connection end in the VM→VM case; `-k` kill the
//! domain through qubesd (`admin.vm.Kill`) right before exiting, also
//! after `-c` (Qubes 4.4's client only does so without `-c`, although
//! `qrexec-policy-exec` passes `-k` with `-c` to end its disposables);
//! `-k` with a `@` keyword target is ignored; a `@dispvm:` target with `-c` is
//! refused (no autostart here, as in Qubes); see [`execute_vm`];
//! `--socket-dir=DIR`; `--use-stdin-socket`; `-p DATA` sent before stdin.
//! `-d dom0` without `-c` runs the dom0 command or service here, on our own
//! stdio, as Qubes does. Exit codes: the remote's, 125 on
//! a qrexec problem, 137 when a `-c` connection could not be set up. The
//! daemon's replies are parsed with the checked wire format; nothing a
//! daemon or agent sends can make this program panic.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::qrexec::names::target_refers_to_dom0;
use protocol::qrexec::{
    ConnectParams, ExecParams, QREXEC_EXIT_PROBLEM, QREXEC_EXIT_SERVICE_NOT_FOUND,
    QREXEC_PROTOCOL_V3, Repr, RequestId,
};

use crate::args::{self, OptSpec};
use crate::client_vm::LocalOutput;
use crate::data::{self, EXIT_CODE_DISCONNECTED, Executor, Requester};
use crate::error::{Error, IoContext, Result};
use crate::exec::{self, Launch, StdioMode};
use crate::log_error;
use crate::qubesd::Qubesd;
use crate::vchan::{self, Transport};
use crate::wire::{self, MessageBuf};

/// Default directory of the qrexec-daemon sockets.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/qubes";
/// Version qrexec-client and qrexec-daemon speak to each other.
pub const CLIENT_PROTOCOL_VERSION: u32 = QREXEC_PROTOCOL_V3;
/// Exit code of a failed `-c` connection.
pub const EXIT_CONNECT_FAILED: i32 = 137;

const SPECS: &[OptSpec] = &[
    OptSpec {
        short: Some('h'),
        long: Some("help"),
        takes_arg: false,
        id: "help",
    },
    OptSpec {
        short: Some('d'),
        long: None,
        takes_arg: true,
        id: "d",
    },
    OptSpec {
        short: Some('l'),
        long: None,
        takes_arg: true,
        id: "l",
    },
    OptSpec {
        short: Some('e'),
        long: None,
        takes_arg: false,
        id: "e",
    },
    OptSpec {
        short: Some('E'),
        long: Some("no-exit-code"),
        takes_arg: false,
        id: "E",
    },
    OptSpec {
        short: Some('c'),
        long: None,
        takes_arg: true,
        id: "c",
    },
    OptSpec {
        short: Some('t'),
        long: None,
        takes_arg: false,
        id: "t",
    },
    OptSpec {
        short: Some('T'),
        long: None,
        takes_arg: false,
        id: "T",
    },
    OptSpec {
        short: Some('w'),
        long: None,
        takes_arg: true,
        id: "w",
    },
    OptSpec {
        short: Some('W'),
        long: None,
        takes_arg: false,
        id: "W",
    },
    OptSpec {
        short: Some('k'),
        long: None,
        takes_arg: false,
        id: "k",
    },
    OptSpec {
        short: None,
        long: Some("socket-dir"),
        takes_arg: true,
        id: "socket-dir",
    },
    OptSpec {
        short: None,
        long: Some("use-stdin-socket"),
        takes_arg: false,
        id: "use-stdin-socket",
    },
    OptSpec {
        short: Some('p'),
        long: Some("prefix-data"),
        takes_arg: true,
        id: "prefix-data",
    },
];

fn usage(to_stderr: bool) -> String {
    let text = format!(
        "usage: qrexec-client [options] -d domain_name [-l local_prog|-c request_id,src_domain_name,src_domain_id|-e] user:remote_cmdline\n\
Options:\n\
  -h, --help - display usage\n\
  -e - exit after sending cmd\n\
  -E, --no-exit-code - always exit with 0 after command exits\n\
  -t - enables replacing problematic bytes with '_' in command output, -T is the same for stderr\n\
  -W - waits for connection end even in case of VM-VM (-c)\n\
  -c - connect to existing process (response to trigger service call)\n\
  -w timeout - override default connection timeout of 5s (set 0 for no timeout)\n\
  -k - kill the domain right before exiting\n\
  --socket-dir=PATH -  directory for qrexec socket, default: {DEFAULT_SOCKET_DIR}\n\
  --use-stdin-socket - use fd 0 (which must be socket) for both stdin and stdout\n\
  -p PREFIX-DATA, --prefix-data=PREFIX-DATA - send PREFIX-DATA before standard input\n"
    );
    if to_stderr {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    text
}

/// A connection to a qrexec-daemon after the `MSG_HELLO` exchange.
#[derive(Debug)]
pub struct DaemonConnection {
    stream: UnixStream,
}

/// Why a daemon could not be reached.
#[derive(Debug)]
pub enum ConnectError {
    /// No daemon listens for this domain (socket missing or refused).
    NotRunning(PathBuf),
    /// Anything else.
    Failed(Error),
}

impl DaemonConnection {
    /// Connect to `DIR/qrexec.<name>` and do the client handshake: the daemon
    /// sends HELLO first, we need at least version 3 and answer with 3.
    pub fn connect(socket_dir: &Path, name: &str) -> std::result::Result<Self, ConnectError> {
        let path = socket_dir.join(format!("qrexec.{name}"));
        let mut stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                log_error!("connect {}: {e}", path.display());
                return Err(ConnectError::NotRunning(path));
            }
            Err(source) => {
                return Err(ConnectError::Failed(Error::Io {
                    context: format!("connect {}", path.display()),
                    source,
                }));
            }
        };
        let handshake = (|| -> Result<()> {
            let version = wire::recv_hello(&mut stream, "qrexec-daemon")?;
            if version < QREXEC_PROTOCOL_V3 {
                return Err(Error::Usage(format!(
                    "Incompatible daemon protocol version (daemon {version}, client {CLIENT_PROTOCOL_VERSION})"
                )));
            }
            wire::send_hello(&mut stream, CLIENT_PROTOCOL_VERSION)
                .context(|| "Failed to send MSG_HELLO to daemon".into())
        })();
        handshake.map_err(ConnectError::Failed)?;
        Ok(DaemonConnection { stream })
    }

    /// Send a command message with `connect_port` 0 and read the daemon's
    /// answer: the data vchan's domain and port.
    pub fn negotiate(&mut self, request: &Repr<'_>) -> Result<ConnectParams> {
        wire::write_message(&mut self.stream, request).context(|| "write daemon".into())?;
        let mut buf = MessageBuf::new();
        let reply = wire::read_message(&mut self.stream, &mut buf, "qrexec-daemon")?;
        match (request, reply) {
            (
                Repr::ExecCmdline(_),
                Some(Repr::ExecCmdline(ExecParams {
                    connect,
                    cmdline: None,
                })),
            )
            | (
                Repr::JustExec(_),
                Some(Repr::JustExec(ExecParams {
                    connect,
                    cmdline: None,
                })),
            )
            | (
                Repr::ServiceConnect { .. },
                Some(Repr::ServiceConnect {
                    connect,
                    request_id: None,
                }),
            ) => Ok(connect),
            (_, Some(other)) => Err(Error::Unexpected {
                context: format!("Invalid response for 0x{:x}", u32::from(request.msg_type())),
                got: other.msg_type(),
            }),
            (_, None) => Err(Error::Eof("read daemon".into())),
        }
    }

    /// Send `MSG_SERVICE_CONNECT` for an already allocated data vchan.
    pub fn send_service_connect(&mut self, ident: RequestId, connect: ConnectParams) -> Result<()> {
        wire::write_message(
            &mut self.stream,
            &Repr::ServiceConnect {
                connect,
                request_id: Some(ident),
            },
        )
        .context(|| "write daemon".into())
    }

    /// Block until the daemon closes the connection (the call ended).
    pub fn wait_for_close(&mut self) {
        let mut buf = [0u8; 64];
        while matches!(self.stream.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// `-c REQID,SRC,SRCID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSpec {
    /// Request ident to answer.
    pub request_id: String,
    /// Calling qube's name.
    pub source_name: String,
    /// Calling qube's domain id.
    pub source_id: u32,
}

/// Parse `-c`.
pub fn parse_connect(text: &str) -> std::result::Result<ConnectSpec, String> {
    let bad = || {
        "Invalid -c parameter (should be: \"-c request_id,src_domain_name,src_domain_id\")"
            .to_string()
    };
    let (request_id, rest) = text.split_once(',').ok_or_else(bad)?;
    if request_id.len() >= protocol::qrexec::IDENT_LEN {
        return Err(format!(
            "Invalid -c parameter (request_id too long, max {})",
            protocol::qrexec::IDENT_LEN - 1
        ));
    }
    let (source_name, id) = rest.split_once(',').ok_or_else(bad)?;
    let source_id = id
        .parse::<u32>()
        .map_err(|_| format!("Invalid source domain ID: {id:?}"))?;
    Ok(ConnectSpec {
        request_id: request_id.to_string(),
        source_name: source_name.to_string(),
        source_id,
    })
}

fn dup_stdio(fd: std::os::fd::BorrowedFd<'_>) -> Result<File> {
    rustix::io::dup(fd).map(File::from).map_err(|e| Error::Io {
        context: "dup".into(),
        source: e.into(),
    })
}

fn stdin_file() -> Result<File> {
    dup_stdio(std::os::fd::AsFd::as_fd(&std::io::stdin()))
}

fn stdout_file() -> Result<File> {
    dup_stdio(std::os::fd::AsFd::as_fd(&std::io::stdout()))
}

fn timeout_from(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

/// Run a service called from a VM in dom0 (`-d dom0 -c ...`): returns the
/// exit code to exit with.
pub fn run_to_dom0(
    transport: &dyn Transport,
    socket_dir: &Path,
    spec: &ConnectSpec,
    remote_cmdline: &str,
    timeout: Option<Duration>,
    exit_with_code: bool,
) -> i32 {
    let ident = match RequestId::new(spec.request_id.as_bytes()) {
        Ok(id) => id,
        Err(e) => {
            log_error!("{e}");
            return QREXEC_EXIT_PROBLEM as i32;
        }
    };
    let mut daemon = match DaemonConnection::connect(socket_dir, &spec.source_id.to_string()) {
        Ok(d) => d,
        Err(_) => return QREXEC_EXIT_PROBLEM as i32,
    };
    let connect = match daemon.negotiate(&Repr::ServiceConnect {
        connect: ConnectParams {
            connect_domain: 0,
            connect_port: 0,
        },
        request_id: Some(ident),
    }) {
        Ok(c) => c,
        Err(e) => {
            log_error!("{e}");
            return QREXEC_EXIT_PROBLEM as i32;
        }
    };
    let env = [("QREXEC_REMOTE_DOMAIN", spec.source_name.clone())];
    let service_path = exec::service_path_from_env();
    let launch = exec::spawn(&exec::Request {
        command: remote_cmdline.as_bytes(),
        user: None,
        service_path: &service_path,
        extra_env: &env,
        // As in Qubes (`run_qrexec_to_dom0`), a dom0 service's stderr is not
        // sent to the calling qube: it stays ours, i.e. the daemon's per-qube
        // log `qrexec.<name>.log`.
        stdio: StdioMode::PipedKeepStderr,
        shell: "/bin/bash",
    });
    let mut vchan = match transport.client(connect.connect_domain, connect.connect_port, timeout) {
        Ok(v) => v,
        Err(e) => {
            log_error!("qrexec connection timeout: {e}");
            return QREXEC_EXIT_PROBLEM as i32;
        }
    };
    let version = match data::handshake(&mut *vchan, false) {
        Ok(v) => v,
        Err(e) => {
            log_error!("{e}");
            return QREXEC_EXIT_PROBLEM as i32;
        }
    };
    let code = match launch {
        Launch::Started(child, _) => run_child_as_executor(vchan, version, child),
        Launch::Connected(conn) => run_connected(vchan, version, conn),
        Launch::NotFound => {
            let _ = data::send_failed_exec(&mut *vchan, QREXEC_EXIT_SERVICE_NOT_FOUND, false);
            QREXEC_EXIT_SERVICE_NOT_FOUND
        }
        Launch::Failed(code) => {
            let _ = data::send_failed_exec(&mut *vchan, code, false);
            code
        }
    };
    drop(daemon);
    if exit_with_code { code as i32 } else { 0 }
}

/// Stream a started child's stdio over `vchan` as the executing side.
pub fn run_child_as_executor(
    vchan: Box<dyn vchan::Vchan>,
    version: u32,
    child: std::process::Child,
) -> u32 {
    run_child_logging_stderr(vchan, version, child, None, None)
}

/// Like [`run_child_as_executor`]; with `stderr_tag`, the service's stderr
/// is also logged locally under that tag (qubes-rpc-multiplexer tees it to
/// `logger -t SERVICE-SOURCE`). With `stdio_socket` (our end of the
/// child's stdin socket, and the pidfd of the call's stand-in process), the
/// child's stdin is that socket, and its output is read from it once the
/// stand-in is ended by SIGUSR1 ([`crate::stdio_socket`]).
pub fn run_child_logging_stderr(
    vchan: Box<dyn vchan::Vchan>,
    version: u32,
    mut child: std::process::Child,
    stderr_tag: Option<String>,
    stdio_socket: Option<(std::os::unix::net::UnixStream, Option<std::os::fd::OwnedFd>)>,
) -> u32 {
    let (stdin, stdout) = match stdio_socket {
        Some((socket, pidfd)) => {
            let reader = socket.try_clone().ok();
            let stdin =
                Some(Box::new(crate::stdio_socket::SocketStdin(socket)) as Box<dyn Write + Send>);
            let stdout = match (child.stdout.take(), reader) {
                (Some(out), Some(reader)) => Some(Box::new(
                    crate::stdio_socket::SwitchingOutput::new(out, reader, pidfd),
                ) as Box<dyn Read + Send>),
                (out, _) => out.map(|s| Box::new(s) as Box<dyn Read + Send>),
            };
            (stdin, stdout)
        }
        None => (
            child
                .stdin
                .take()
                .map(|s| Box::new(s) as Box<dyn Write + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    };
    let stderr = child.stderr.take().map(|s| match stderr_tag {
        Some(tag) => Box::new(exec::LoggedStderr::new(s, tag)) as Box<dyn Read + Send>,
        None => Box::new(s) as Box<dyn Read + Send>,
    });
    let executor = Executor {
        stdin,
        stdout,
        stderr,
        wait: Box::new(move || match child.wait() {
            Ok(status) => exec::exit_code(status),
            Err(_) => QREXEC_EXIT_PROBLEM,
        }),
        close_stdin_on_exit: true,
    };
    match data::run_executor(vchan, version, executor) {
        Ok(code) => code,
        Err(e) => {
            log_error!("{e}");
            QREXEC_EXIT_PROBLEM
        }
    }
}

/// `-d dom0` without `-c`: run `user:command` (a dom0 command or
/// `QUBESRPC` service) here with our own stdin/stdout/stderr; returns its
/// exit code (127 service not found, 125 any other failure to start).
pub fn run_in_dom0(remote_cmdline: &str, prefix: Option<Vec<u8>>) -> i32 {
    let command = match protocol::qrexec::cmdline::split_user(remote_cmdline.as_bytes()) {
        Ok(uc) => uc.command,
        Err(e) => {
            log_error!("{e}: {}", crate::log::escape(remote_cmdline.as_bytes()));
            return QREXEC_EXIT_PROBLEM as i32;
        }
    };
    let service_path = exec::service_path_from_env();
    let launch = exec::spawn(&exec::Request {
        command,
        user: None,
        service_path: &service_path,
        extra_env: &[],
        stdio: if prefix.is_some() {
            StdioMode::PipedStdinOnly
        } else {
            StdioMode::Inherit
        },
        shell: "/bin/bash",
    });
    match launch {
        Launch::Started(mut child, _) => {
            if let (Some(prefix), Some(mut stdin)) = (prefix, child.stdin.take()) {
                std::thread::spawn(move || {
                    if stdin.write_all(&prefix).is_ok() {
                        let _ = std::io::copy(&mut std::io::stdin(), &mut stdin);
                    }
                });
            }
            match child.wait() {
                Ok(status) => exec::exit_code(status) as i32,
                Err(_) => QREXEC_EXIT_PROBLEM as i32,
            }
        }
        Launch::NotFound => QREXEC_EXIT_SERVICE_NOT_FOUND as i32,
        Launch::Failed(code) => code as i32,
        Launch::Connected(_) => {
            log_error!("socket and /dev/tcp services are not supported for dom0 -> dom0 calls");
            QREXEC_EXIT_PROBLEM as i32
        }
    }
}

/// Serve a data channel with a connected socket or `/dev/tcp` service.
pub fn run_connected(vchan: Box<dyn vchan::Vchan>, version: u32, conn: exec::Connected) -> u32 {
    let executor = match conn.into_executor() {
        Ok(e) => e,
        Err(e) => {
            log_error!("cannot set up the service connection: {e}");
            let mut vchan = vchan;
            let _ = data::send_failed_exec(&mut *vchan, QREXEC_EXIT_PROBLEM, false);
            return QREXEC_EXIT_PROBLEM;
        }
    };
    match data::run_executor(vchan, version, executor) {
        Ok(code) => code,
        Err(e) => {
            log_error!("{e}");
            QREXEC_EXIT_PROBLEM
        }
    }
}

/// How a VM→VM call reaches its target (the arguments of Qubes'
/// `qrexec_execute_vm`).
#[derive(Debug, Clone, Copy)]
pub struct VmCall<'a> {
    /// The target: a qube name, `uuid:UUID`, or `@dispvm:TEMPLATE` /
    /// `@dispvm:uuid:UUID` for a new disposable.
    pub target: &'a str,
    /// Whether qubesd may start the target (`autostart=True`).
    pub autostart: bool,
    /// `MSG_JUST_EXEC` instead of `MSG_EXEC_CMDLINE`.
    pub just_exec: bool,
    /// Return only when the target's daemon closes the connection (`-W`;
    /// always so for a disposable).
    pub wait_connection_end: bool,
}

fn kill_disposable(qubesd: &Qubesd, name: &str) {
    if let Err(e) = qubesd.kill(name) {
        log_error!("qubesd could not kill disposable VM {name}: {e}");
    }
}

/// Connect to the target's daemon, starting the target through qubesd
/// first when it is a new disposable, or when its daemon is not running
/// and `autostart` allows it.
fn connect_target(
    socket_dir: &Path,
    qubesd: &Qubesd,
    target: &str,
    disposable: bool,
    autostart: bool,
) -> Option<DaemonConnection> {
    if !disposable {
        match DaemonConnection::connect(socket_dir, target) {
            Ok(d) => return Some(d),
            Err(ConnectError::NotRunning(_)) if autostart => {}
            Err(_) => return None,
        }
    }
    if let Err(e) = qubesd.start(target) {
        log_error!("qubesd could not start VM {target}: {e}");
        return None;
    }
    DaemonConnection::connect(socket_dir, target).ok()
}

/// Connect the two ends of a VM→VM call (`-c` with a VM target), as Qubes'
/// `qrexec_execute_vm`: for `@dispvm:TEMPLATE` a disposable is created
/// (`admin.vm.CreateDisposable`, asking for its `uuid:` when the template
/// is given by uuid), started (`admin.vm.Start`), called, and killed
/// (`admin.vm.Kill`) once its daemon closes the connection — or at once if
/// it cannot be started or reached, so no half-set-up disposable is left.
/// A target whose daemon is not running is started first when `autostart`
/// says so. Any qubesd error refuses the call (logged).
pub fn execute_vm(
    socket_dir: &Path,
    qubesd: &Qubesd,
    call: VmCall<'_>,
    spec: &ConnectSpec,
    cmd: &str,
) -> bool {
    if cmd.len() + 1 < 2 || cmd.len() + 1 > protocol::qrexec::MAX_QREXEC_CMD_LEN {
        log_error!(
            "Bad command: command line too long or empty: length {}",
            cmd.len() + 1
        );
        return false;
    }
    let Ok(ident) = RequestId::new(spec.request_id.as_bytes()) else {
        return false;
    };
    let mut wait_connection_end = call.wait_connection_end;
    let created;
    let (target, disposable) = match call.target.strip_prefix("@dispvm:") {
        Some(template) => {
            if !call.autostart {
                // A disposable that is never started cannot be connected to.
                log_error!("Target {} with autostart=False makes no sense", call.target);
                return false;
            }
            if call.just_exec {
                // It would be killed as soon as the command started.
                log_error!("Target {} with MSG_JUST_EXEC makes no sense", call.target);
                return false;
            }
            wait_connection_end = true;
            created = match qubesd.create_disposable(template, template.starts_with("uuid:")) {
                Ok(name) => name,
                Err(e) => {
                    log_error!("qubesd could not create disposable VM: {e}");
                    return false;
                }
            };
            (created.as_str(), true)
        }
        None => (call.target, false),
    };
    let Some(mut target_daemon) =
        connect_target(socket_dir, qubesd, target, disposable, call.autostart)
    else {
        if disposable {
            kill_disposable(qubesd, target);
        }
        return false;
    };
    let exec = ExecParams {
        connect: ConnectParams {
            connect_domain: spec.source_id,
            connect_port: 0,
        },
        cmdline: Some(cmd.as_bytes()),
    };
    let request = if call.just_exec {
        Repr::JustExec(exec)
    } else {
        Repr::ExecCmdline(exec)
    };
    let connect = match target_daemon.negotiate(&request) {
        Ok(c) => c,
        Err(e) => {
            log_error!("{e}");
            if disposable {
                kill_disposable(qubesd, target);
            }
            return false;
        }
    };
    let ok = match DaemonConnection::connect(socket_dir, &spec.source_id.to_string()) {
        Ok(mut source_daemon) => match source_daemon.send_service_connect(ident, connect) {
            Ok(()) => true,
            Err(e) => {
                log_error!("{e}");
                false
            }
        },
        Err(_) => false,
    };
    if wait_connection_end {
        target_daemon.wait_for_close();
    }
    if disposable {
        kill_disposable(qubesd, target);
    }
    ok
}

/// Everything after option parsing for a plain dom0→VM call.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// `-l`.
    pub local_program: Option<String>,
    /// `-e`.
    pub just_exec: bool,
    /// `-t`.
    pub replace_stdout: bool,
    /// `-T`.
    pub replace_stderr: bool,
    /// `-w`.
    pub timeout: Option<Duration>,
    /// `--use-stdin-socket`.
    pub use_stdin_socket: bool,
    /// `-p`: sent before stdin.
    pub prefix_data: Option<Vec<u8>>,
}

/// Run `remote_cmdline` in `domname` with our stdio (or the local program's);
/// returns the remote exit code.
pub fn run_in_vm(
    transport: &dyn Transport,
    socket_dir: &Path,
    domname: &str,
    remote_cmdline: &str,
    opts: &CallOptions,
) -> Result<u32> {
    let mut daemon = DaemonConnection::connect(socket_dir, domname).map_err(|e| match e {
        ConnectError::NotRunning(path) => Error::Usage(format!(
            "cannot connect to {}: is qrexec-daemon running for {domname}?",
            path.display()
        )),
        ConnectError::Failed(e) => e,
    })?;
    let exec = ExecParams {
        connect: ConnectParams::default(),
        cmdline: Some(remote_cmdline.as_bytes()),
    };
    let request = if opts.just_exec {
        Repr::JustExec(exec)
    } else {
        Repr::ExecCmdline(exec)
    };
    let connect = daemon.negotiate(&request)?;
    let mut local_child = None;
    let (input, output): (Option<Box<dyn Read + Send>>, Box<dyn Write + Send>) =
        if let Some(program) = &opts.local_program {
            let env = [("QREXEC_REMOTE_DOMAIN", domname.to_string())];
            let service_path = exec::service_path_from_env();
            match exec::spawn(&exec::Request {
                command: program.as_bytes(),
                user: None,
                service_path: &service_path,
                extra_env: &env,
                stdio: StdioMode::PipedKeepStderr,
                shell: "/bin/bash",
            }) {
                Launch::Started(mut child, _) => {
                    let out = child.stdout.take();
                    let inp = child.stdin.take();
                    local_child = Some(child);
                    match (out, inp) {
                        (Some(out), Some(inp)) => (Some(Box::new(out)), Box::new(inp)),
                        _ => return Err(Error::Usage("local program has no stdio".into())),
                    }
                }
                Launch::NotFound | Launch::Failed(_) | Launch::Connected(_) => {
                    return Err(Error::Usage(format!(
                        "cannot start local program {program}"
                    )));
                }
            }
        } else if opts.use_stdin_socket {
            (
                Some(Box::new(stdin_file()?)),
                Box::new(LocalOutput::Socket(stdin_file()?)),
            )
        } else if opts.just_exec {
            (None, Box::new(LocalOutput::Stdout(stdout_file()?)))
        } else {
            (
                Some(Box::new(stdin_file()?)),
                Box::new(LocalOutput::Stdout(stdout_file()?)),
            )
        };
    let input: Option<Box<dyn Read + Send>> = match (&opts.prefix_data, input) {
        (Some(prefix), Some(rest)) => {
            Some(Box::new(std::io::Cursor::new(prefix.clone()).chain(rest)))
        }
        (Some(prefix), None) => Some(Box::new(std::io::Cursor::new(prefix.clone()))),
        (None, input) => input,
    };
    let mut vchan = transport
        .server(connect.connect_domain, connect.connect_port, opts.timeout)
        .context(|| "qrexec connection timeout".into())?;
    let version = data::handshake(&mut *vchan, true)?;
    let code = data::run_requester(
        vchan,
        version,
        Requester {
            input,
            output,
            errors: Box::new(std::io::stderr()),
            replace_stdout: opts.replace_stdout,
            replace_stderr: opts.replace_stderr,
        },
    );
    let local_status = local_child.map(|mut child| {
        child
            .wait()
            .map(exec::exit_code)
            .unwrap_or(QREXEC_EXIT_PROBLEM)
    });
    drop(daemon);
    // As Qubes' process_io: a non-zero remote status wins, otherwise the
    // local program's status.
    match (code, local_status) {
        (Ok(0), Some(local)) => Ok(local),
        (code, _) => code,
    }
}

/// `qrexec-client` main: returns the process exit code.
pub fn main(argv: Vec<String>) -> i32 {
    crate::log::init("qrexec-client");
    let parsed = match args::parse(argv.get(1..).unwrap_or(&[]), SPECS, false) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("qrexec-client: {e}");
            usage(true);
            return 1;
        }
    };
    if parsed.has("help") {
        usage(false);
        return 0;
    }
    let (Some(domname), Some(remote_cmdline)) = (parsed.value("d"), parsed.operands.first()) else {
        usage(true);
        return 1;
    };
    let socket_dir = PathBuf::from(parsed.value("socket-dir").unwrap_or(DEFAULT_SOCKET_DIR));
    let connect = match parsed.value("c").map(parse_connect).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if parsed.options.iter().filter(|(id, _)| *id == "c").count() > 1 {
        eprintln!("qrexec-client: ERROR: -c passed more than once");
        usage(true);
        return 1;
    }
    let just_exec = parsed.has("e");
    let local_program = parsed.value("l").map(str::to_string);
    if usize::from(just_exec)
        + usize::from(connect.is_some())
        + usize::from(local_program.is_some())
        > 1
    {
        eprintln!("ERROR: only one of -e, -l, -c can be specified");
        usage(true);
        return 1;
    }
    if local_program.is_some() && parsed.has("use-stdin-socket") {
        eprintln!("ERROR: at most one of -l and --use-stdin-socket can be specified");
        usage(true);
        return 1;
    }
    if parsed.has("use-stdin-socket") {
        let is_socket = rustix::fs::fstat(std::io::stdin()).map(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket
        });
        if !matches!(is_socket, Ok(true)) {
            eprintln!("qrexec-client: --use-stdin-socket passed, but stdin not a socket");
            return 2;
        }
    }
    let timeout_secs = match parsed.value("w").map(str::parse::<u64>).transpose() {
        Ok(t) => t.unwrap_or(5),
        Err(_) => {
            eprintln!("qrexec-client: invalid connection timeout");
            return 1;
        }
    };
    let timeout = timeout_from(timeout_secs);
    let exit_with_code = !parsed.has("E");
    let transport = match vchan::from_env() {
        Ok(t) => t,
        Err(e) => {
            log_error!("{e}");
            return QREXEC_EXIT_PROBLEM as i32;
        }
    };

    if parsed
        .options
        .iter()
        .filter(|(id, _)| *id == "prefix-data")
        .count()
        > 1
    {
        eprintln!("qrexec-client: ERROR: -p passed more than once");
        usage(true);
        return 1;
    }
    let prefix_data = parsed.value("prefix-data").map(|p| p.as_bytes().to_vec());
    if target_refers_to_dom0(domname.as_bytes()) {
        let Some(spec) = connect else {
            if just_exec || local_program.is_some() {
                eprintln!(
                    "ERROR: when target domain is 'dom0', -e and -l cannot be used without -c"
                );
                usage(true);
                return 1;
            }
            return run_in_dom0(remote_cmdline, prefix_data);
        };
        return run_to_dom0(
            &*transport,
            &socket_dir,
            &spec,
            remote_cmdline,
            timeout,
            exit_with_code,
        );
    }
    let qubesd = Qubesd::from_env();
    if let Some(spec) = connect {
        // As Qubes' qrexec-client: never autostart here (a `@dispvm:`
        // target is refused; qrexec-policy-exec creates disposables itself).
        let ok = execute_vm(
            &socket_dir,
            &qubesd,
            VmCall {
                target: domname,
                autostart: false,
                just_exec,
                wait_connection_end: parsed.has("W"),
            },
            &spec,
            remote_cmdline,
        );
        if parsed.has("k") {
            kill_at_exit(&qubesd, domname);
        }
        return if ok { 0 } else { EXIT_CONNECT_FAILED };
    }
    let opts = CallOptions {
        local_program,
        just_exec,
        replace_stdout: parsed.has("t"),
        replace_stderr: parsed.has("T"),
        timeout,
        use_stdin_socket: parsed.has("use-stdin-socket"),
        prefix_data,
    };
    let rc = match run_in_vm(&*transport, &socket_dir, domname, remote_cmdline, &opts) {
        Ok(code) => {
            if exit_with_code {
                code as i32
            } else {
                0
            }
        }
        Err(Error::Eof(what)) => {
            log_error!("{what}: connection closed by peer");
            EXIT_CODE_DISCONNECTED as i32
        }
        Err(e) => {
            log_error!("{e}");
            QREXEC_EXIT_PROBLEM as i32
        }
    };
    if parsed.has("k") {
        kill_at_exit(&qubesd, domname);
    }
    rc
}

/// `-k`: kill the target through qubesd right before exiting (whether the
/// call worked or not, as Qubes does); a failure is logged.
fn kill_at_exit(qubesd: &Qubesd, domname: &str) {
    if domname.starts_with('@') {
        return;
    }
    if let Err(e) = qubesd.kill(domname) {
        log_error!("cannot kill domain {domname}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake qrexec-daemon socket answering with `reply` after the request.
    fn fake_daemon(hello_version: u32, reply: Vec<u8>) -> (PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "qrexec-client-unit-{}-{hello_version}-{}",
            std::process::id(),
            reply.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("qrexec.vm")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            wire::send_hello(&mut s, hello_version).unwrap();
            if wire::recv_hello(&mut s, "client").is_err() {
                return;
            }
            let mut buf = MessageBuf::new();
            let _ = wire::read_message(&mut s, &mut buf, "client");
            let _ = s.write_all(&reply);
        });
        (dir, t)
    }

    fn exec_request() -> Repr<'static> {
        Repr::ExecCmdline(ExecParams {
            connect: ConnectParams::default(),
            cmdline: Some(b"user:true"),
        })
    }

    #[test]
    fn negotiate_takes_the_daemons_answer() {
        let mut reply = Vec::new();
        wire::write_message(
            &mut reply,
            &Repr::ExecCmdline(ExecParams {
                connect: ConnectParams {
                    connect_domain: 5,
                    connect_port: 513,
                },
                cmdline: None,
            }),
        )
        .unwrap();
        let (dir, t) = fake_daemon(3, reply);
        let mut d = DaemonConnection::connect(&dir, "vm").unwrap();
        let c = d.negotiate(&exec_request()).unwrap();
        assert_eq!((c.connect_domain, c.connect_port), (5, 513));
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hostile_daemon_answers_are_errors() {
        let mut wrong_type = Vec::new();
        wire::write_message(&mut wrong_type, &Repr::ExitCode(0)).unwrap();
        let mut with_cmdline = Vec::new();
        wire::write_message(&mut with_cmdline, &exec_request()).unwrap();
        for reply in [
            wrong_type,
            with_cmdline,
            b"\x00\x02\x00\x00\xff\xff\xff\xff".to_vec(),
            b"\x00\x02".to_vec(),
            Vec::new(),
        ] {
            let (dir, t) = fake_daemon(3, reply);
            let mut d = DaemonConnection::connect(&dir, "vm").unwrap();
            assert!(d.negotiate(&exec_request()).is_err());
            drop(d);
            t.join().unwrap();
            let _ = std::fs::remove_dir_all(&dir);
        }
        // A daemon older than protocol 3 is refused at the handshake.
        let (dir, t) = fake_daemon(2, Vec::new());
        assert!(matches!(
            DaemonConnection::connect(&dir, "vm"),
            Err(ConnectError::Failed(_))
        ));
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        // No daemon at all.
        assert!(matches!(
            DaemonConnection::connect(Path::new("/nonexistent-qrexec-dir"), "vm"),
            Err(ConnectError::NotRunning(_))
        ));
    }

    #[test]
    fn connect_spec() {
        assert_eq!(
            parse_connect("SOCKET11,vm1,5").unwrap(),
            ConnectSpec {
                request_id: "SOCKET11".into(),
                source_name: "vm1".into(),
                source_id: 5
            }
        );
        assert!(parse_connect("a,b").is_err());
        assert!(parse_connect("a,b,c").is_err());
        assert!(parse_connect(&format!("{},b,1", "x".repeat(32))).is_err());
    }
}
