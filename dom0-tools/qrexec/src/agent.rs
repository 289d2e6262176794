//! `qrexec-agent`: a Linux qube's end of the qrexec control channel.
//!
//! It offers vchan port 512 to dom0 (it is the vchan server and sends
//! `MSG_HELLO` first), runs what qrexec-daemon asks — `MSG_EXEC_CMDLINE`
//! (stdio over a data vchan it connects to as client), `MSG_JUST_EXEC`
//! (stdio on `/dev/null`, only an exit code goes back) — and reports each
//! finished call with `MSG_CONNECTION_TERMINATED`. It serves
//! qrexec-client-vm on its agent socket (`/var/run/qubes/qrexec-agent`, or
//! `--agent-socket`): a client's `MSG_TRIGGER_SERVICE3`/`4` gets the ident
//! `SOCKET<n>` and goes to dom0; `MSG_SERVICE_CONNECT` for that ident hands
//! the client the data vchan's domain and port (8 bytes, no header), and
//! `MSG_SERVICE_REFUSED` just closes the client's socket, which the client
//! reports as "Request refused". When the client closes its socket the call
//! is over and the agent sends `MSG_CONNECTION_TERMINATED`.
//!
//! Source: qubes-core-qrexec `agent/qrexec-agent.c`, `qrexec-agent-data.c`.
//! A call the user's fork server may run (see [`fork_server`]) is
//! handed to it when its socket (`--fork-server-socket`, a pattern where
//! `%s` is the user; default `/var/run/qubes/qrexec-server.%s.sock`) accepts
//! the connection, as Qubes' agent does; `--no-fork-server` never tries.
//! Messages from a local
//! qrexec-client-vm are hostile input: malformed ones close that client
//! only. Commands run as the requested user when the agent is root, as the
//! agent's own user otherwise. Each call gets a stand-in process (this
//! program run with `--qrexec-call-process`) whose PID is the call's
//! `QREXEC_AGENT_PID`, so a service signalling it cannot end the agent; a
//! service's stdin is a socketpair, and SIGUSR1 to that PID makes the call
//! read the service's output from it ([`crate::stdio_socket`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protocol::qrexec::cmdline::split_user;
use protocol::qrexec::{
    self, ConnectParams, ExecParams, QREXEC_EXIT_PROBLEM, QREXEC_EXIT_SERVICE_NOT_FOUND,
    QREXEC_PROTOCOL_V2, QREXEC_PROTOCOL_V4, Repr, RequestId, TriggerService3, TriggerService4,
    VCHAN_BASE_PORT,
};

use crate::args::{self, OptSpec};
use crate::data::{self, LOCAL_PROTOCOL_VERSION};
use crate::exec::{self, Launch, StdioMode};

pub mod fork_server;
use crate::log::escape;
use crate::log_error;
pub use crate::stdio_socket::CALL_PROCESS_ARG;
use crate::stdio_socket::{self, CallProcess};
use crate::vchan::{self, Transport, Vchan};
use crate::wire::{self, MessageBuf};

/// Default agent socket (`QREXEC_AGENT_TRIGGER_PATH`).
pub const QREXEC_AGENT_TRIGGER_PATH: &str = "/var/run/qubes/qrexec-agent";
/// How long a qrexec-client-vm may take to send its request.
pub const TRIGGER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the requesting side's data vchan.
pub const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Agent {
    transport: Box<dyn Transport>,
    control: Mutex<Box<dyn Vchan>>,
    version: u32,
    clients: Mutex<HashMap<u32, (UnixStream, ClientSlot)>>,
    next_client: AtomicU32,
    active_clients: Arc<AtomicUsize>,
    service_path: Vec<PathBuf>,
    /// The fork server socket path pattern (`%s`: the user), if enabled.
    fork_server: Option<String>,
}

/// Most qrexec-client-vm connections served at once (`MAX_FDS`); more are
/// closed at once.
pub const MAX_CLIENTS: usize = 256;

/// One of the [`MAX_CLIENTS`] client slots, given back when dropped.
#[derive(Debug)]
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(counter: &Arc<AtomicUsize>) -> Option<Self> {
        let taken = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < MAX_CLIENTS).then_some(n + 1)
        });
        taken.ok().map(|_| ClientSlot(Arc::clone(counter)))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Agent {
    fn send(&self, repr: &Repr<'_>) {
        let mut control = lock(&self.control);
        if let Err(e) = wire::write_message(&mut **control, repr) {
            log_error!("Error while vchan send, exiting: {e}");
            std::process::exit(1);
        }
    }

    fn connection_terminated(&self, connect: ConnectParams) {
        self.send(&Repr::ConnectionTerminated(connect));
    }
}

fn client_id_from_ident(ident: &RequestId) -> Option<u32> {
    std::str::from_utf8(ident.as_bytes())
        .ok()?
        .strip_prefix("SOCKET")?
        .parse()
        .ok()
}

/// One qrexec-client-vm request: read it, give it an ident, forward it.
fn handle_trigger_client(agent: &Agent, mut stream: UnixStream, slot: ClientSlot) {
    // A client that connects and says nothing must not hold its slot forever.
    let _ = stream.set_read_timeout(Some(TRIGGER_READ_TIMEOUT));
    let mut buf = MessageBuf::new();
    let request = wire::read_message(&mut stream, &mut buf, "qrexec-client-vm");
    let _ = stream.set_read_timeout(None);
    let (target, source, service) = match request {
        Ok(Some(Repr::TriggerService3(t))) => (
            t.target_domain.to_vec(),
            Vec::new(),
            t.service_name.to_vec(),
        ),
        Ok(Some(Repr::TriggerService4(t))) => (
            t.target_domain.to_vec(),
            t.source_domain.to_vec(),
            t.service_name.to_vec(),
        ),
        other => {
            if let Err(e) = other {
                log_error!("{e}");
            }
            log_error!("Invalid request received from qrexec-client-vm, is it outdated?");
            return;
        }
    };
    let id = agent.next_client.fetch_add(1, Ordering::SeqCst);
    let Ok(ident) = RequestId::new(format!("SOCKET{id}").as_bytes()) else {
        return;
    };
    let repr = if agent.version >= QREXEC_PROTOCOL_V4 {
        Repr::TriggerService4(TriggerService4 {
            source_domain: &source,
            target_domain: &target,
            request_id: ident,
            service_name: &service,
        })
    } else if source.is_empty() {
        Repr::TriggerService3(TriggerService3 {
            target_domain: &target,
            request_id: ident,
            service_name: &service,
        })
    } else {
        log_error!(
            "--source-qube needs qrexec protocol 4, dom0 speaks {}",
            agent.version
        );
        return;
    };
    let mut check = vec![0u8; repr.buffer_len()];
    if let Err(e) = repr.emit(&mut check) {
        log_error!("Failed to retrieve/execute request from qrexec-client-vm: {e}");
        return;
    }
    lock(&agent.clients).insert(id, (stream, slot));
    agent.send(&repr);
}

/// dom0 accepted a qrexec-client-vm request: hand the client its data vchan
/// and report the end of the call when the client closes.
fn handle_service_connect(agent: &Arc<Agent>, connect: ConnectParams, ident: RequestId) {
    let stream = client_id_from_ident(&ident).and_then(|id| lock(&agent.clients).remove(&id));
    let Some((mut stream, slot)) = stream else {
        log_error!(
            "Got MSG_SERVICE_CONNECT from qrexec-daemon with invalid ident ({}), ignoring",
            escape(ident.as_bytes())
        );
        return;
    };
    let mut params = [0u8; 8];
    params[..4].copy_from_slice(&connect.connect_domain.to_ne_bytes());
    params[4..].copy_from_slice(&connect.connect_port.to_ne_bytes());
    let _ = stream.write_all(&params);
    let agent = Arc::clone(agent);
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        agent.connection_terminated(connect);
        drop(slot);
    });
}

fn handle_exec(agent: &Arc<Agent>, connect: ConnectParams, cmdline: &[u8], just_exec: bool) {
    if let Some(socket) = agent.fork_server.as_deref()
        && let Some(stream) = fork_server::try_hand_over(socket, connect, cmdline, just_exec)
    {
        // The fork server runs the call; its end is the end of the stream.
        let mut stream = stream;
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        agent.connection_terminated(connect);
        return;
    }
    let user = split_user(cmdline).ok().map(|uc| uc.user.to_vec());
    run_call(
        &*agent.transport,
        &agent.service_path,
        connect,
        cmdline,
        user.as_deref(),
        just_exec,
    );
    agent.connection_terminated(connect);
}

/// Run one call: connect its data vchan, run `cmdline` (`user:command`; as
/// `user` when given and we are root), stream, send the exit code. Returns
/// when the call is over.
pub fn run_call(
    transport: &dyn Transport,
    service_path: &[PathBuf],
    connect: ConnectParams,
    cmdline: &[u8],
    user: Option<&[u8]>,
    just_exec: bool,
) {
    // The call's stand-in process (see below) starts while the data vchan
    // is connected: starting a process is a large part of a short call's
    // latency. (Not ahead of the call: an idle agent has no children, as
    // Qubes' tests check.)
    let stand_in = std::thread::spawn(CallProcess::start);
    let mut vchan = match transport.client(
        connect.connect_domain,
        connect.connect_port,
        Some(DATA_CONNECT_TIMEOUT),
    ) {
        Ok(v) => v,
        Err(e) => {
            log_error!("Data vchan connection failed: {e}");
            return;
        }
    };
    let version = match data::handshake(&mut *vchan, true) {
        Ok(v) => v,
        Err(e) => {
            log_error!("{e}");
            return;
        }
    };
    // QREXEC_AGENT_PID names a process of this call only, as in Qubes
    // (where it is the per-call process): a service that signals it (Qubes'
    // services may send SIGUSR1) can only end that stand-in, never the agent
    // and every other call. Without one, no PID is given.
    let mut call_process = stand_in.join().ok().flatten();
    let call_pidfd = call_process.as_ref().and_then(CallProcess::pidfd);
    let env: Vec<(&str, String)> = call_process
        .as_ref()
        .map(|c| vec![("QREXEC_AGENT_PID", c.pid())])
        .unwrap_or_default();
    let stderr_tag = split_user(cmdline)
        .ok()
        .and_then(|uc| exec::stderr_tag(uc.command));
    let launch = match split_user(cmdline) {
        Ok(uc) => {
            let user = user.map(|u| String::from_utf8_lossy(u).into_owned());
            exec::spawn(&exec::Request {
                command: uc.command,
                user: user.as_deref(),
                service_path,
                extra_env: &env,
                stdio: if just_exec {
                    StdioMode::Null
                } else {
                    StdioMode::Piped
                },
                shell: exec::SHELL,
            })
        }
        Err(e) => {
            log_error!("{e}: {}", escape(cmdline));
            Launch::Failed(QREXEC_EXIT_PROBLEM)
        }
    };
    if just_exec {
        // Qubes' agent reports 0 once the command is started, whatever
        // becomes of it; a service that does not exist gives 127, one that
        // cannot be used 125.
        let code = match launch {
            Launch::Started(mut child, _) => {
                std::thread::spawn(move || child.wait());
                0
            }
            Launch::Connected(conn) => {
                conn.just_exec();
                0
            }
            Launch::NotFound => QREXEC_EXIT_SERVICE_NOT_FOUND,
            Launch::Failed(code) => code,
        };
        let _ = wire::write_message(&mut *vchan, &Repr::ExitCode(code));
        let _ = vchan.shutdown();
    } else {
        match launch {
            Launch::Started(child, socket) => {
                crate::client::run_child_logging_stderr(
                    vchan,
                    version,
                    child,
                    stderr_tag,
                    socket.map(|s| (s, call_pidfd)),
                );
            }
            Launch::Connected(conn) => {
                crate::client::run_connected(vchan, version, conn);
            }
            Launch::NotFound => {
                let _ = data::send_failed_exec(&mut *vchan, QREXEC_EXIT_SERVICE_NOT_FOUND, true);
                data::drain_in_background(vchan);
            }
            Launch::Failed(code) => {
                let _ = data::send_failed_exec(&mut *vchan, code, true);
                data::drain_in_background(vchan);
            }
        }
    }
    if let Some(c) = call_process.as_mut() {
        c.stop();
    }
}

fn control_loop(agent: &Arc<Agent>, mut reader: Box<dyn Vchan>) -> bool {
    let mut buf = MessageBuf::new();
    loop {
        let repr = match wire::read_message(&mut *reader, &mut buf, "qrexec-daemon") {
            Ok(Some(repr)) => repr,
            Ok(None) => return true,
            Err(e) => {
                log_error!("{e}");
                return false;
            }
        };
        match repr {
            Repr::ExecCmdline(ExecParams {
                connect,
                cmdline: Some(cmdline),
            })
            | Repr::JustExec(ExecParams {
                connect,
                cmdline: Some(cmdline),
            }) => {
                let just_exec = matches!(repr, Repr::JustExec(_));
                let cmdline = cmdline.to_vec();
                let agent = Arc::clone(agent);
                std::thread::spawn(move || handle_exec(&agent, connect, &cmdline, just_exec));
            }
            Repr::ServiceConnect {
                connect,
                request_id: Some(ident),
            } => handle_service_connect(agent, connect, ident),
            Repr::ServiceRefused(ident) => {
                let removed =
                    client_id_from_ident(&ident).and_then(|id| lock(&agent.clients).remove(&id));
                if removed.is_none() {
                    log_error!(
                        "Received REFUSED for unknown service request '{}'",
                        escape(ident.as_bytes())
                    );
                }
            }
            other => {
                log_error!(
                    "msg type from daemon is 0x{:x} ?",
                    u32::from(other.msg_type())
                );
                return false;
            }
        }
    }
}

/// Wait for qrexec-daemon on port 512 and do the handshake (we speak first).
fn accept_daemon(transport: &dyn Transport) -> Result<(Box<dyn Vchan>, u32), String> {
    let mut control = transport
        .server(0, VCHAN_BASE_PORT, None)
        .map_err(|e| format!("vchan server_init: {e}"))?;
    wire::send_hello(&mut *control, LOCAL_PROTOCOL_VERSION)
        .map_err(|e| format!("Failed to send HELLO to daemon: {e}"))?;
    let remote = wire::recv_hello(&mut *control, "qrexec-daemon").map_err(|e| e.to_string())?;
    let version = qrexec::negotiate(LOCAL_PROTOCOL_VERSION, remote, QREXEC_PROTOCOL_V2)
        .map_err(|e| e.to_string())?;
    Ok((control, version))
}

const SPECS: &[OptSpec] = &[
    OptSpec {
        short: Some('h'),
        long: Some("help"),
        takes_arg: false,
        id: "help",
    },
    OptSpec {
        short: Some('a'),
        long: Some("agent-socket"),
        takes_arg: true,
        id: "agent-socket",
    },
    OptSpec {
        short: Some('s'),
        long: Some("fork-server-socket"),
        takes_arg: true,
        id: "fork-server-socket",
    },
    OptSpec {
        short: Some('S'),
        long: Some("no-fork-server"),
        takes_arg: false,
        id: "no-fork-server",
    },
];

fn usage() -> i32 {
    eprintln!("usage: qrexec-agent [options]");
    eprintln!("Options:");
    eprintln!("  -h, --help - display usage");
    eprintln!("  --agent-socket=PATH - path to listen at, default: {QREXEC_AGENT_TRIGGER_PATH}");
    eprintln!(
        "  --fork-server-socket=PATH - where to find the fork server, default: {}",
        fork_server::QREXEC_FORK_SERVER_SOCKET
    );
    eprintln!("  --no-fork-server - don't try to connect to fork server");
    2
}

/// `qrexec-agent` main: returns the exit code.
pub fn main(argv: Vec<String>) -> i32 {
    if argv.get(1).map(String::as_str) == Some(CALL_PROCESS_ARG) && argv.len() == 2 {
        return stdio_socket::call_process_main();
    }
    // Our own helpers for a PAM session (see `exec::pam`).
    match argv.get(1).map(String::as_str) {
        Some(exec::pam::PAM_SESSION_ARG) => {
            crate::log::init("qrexec-agent");
            return exec::pam::session_main(argv.get(2..).unwrap_or(&[]));
        }
        Some(exec::pam::DROP_PRIVILEGES_ARG) => {
            crate::log::init("qrexec-agent");
            return exec::pam::drop_privileges_main(argv.get(2..).unwrap_or(&[]));
        }
        _ => {}
    }
    crate::log::init("qrexec-agent");
    let parsed = match args::parse(argv.get(1..).unwrap_or(&[]), SPECS, false) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("qrexec-agent: {e}");
            return usage();
        }
    };
    if parsed.has("help") {
        return usage();
    }
    let socket_path = PathBuf::from(
        parsed
            .value("agent-socket")
            .unwrap_or(QREXEC_AGENT_TRIGGER_PATH),
    );
    let transport = match vchan::from_env() {
        Ok(t) => t,
        Err(e) => {
            log_error!("{e}");
            return 1;
        }
    };
    let (control, version) = match accept_daemon(&*transport) {
        Ok(ok) => ok,
        Err(e) => {
            log_error!("{e}");
            return 1;
        }
    };
    let _ = std::fs::remove_file(&socket_path);
    let listener = match UnixListener::bind(&socket_path) {
        Ok(l) => l,
        Err(e) => {
            log_error!("cannot listen on {}: {e}", socket_path.display());
            return 1;
        }
    };
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o666));
    let Ok(reader) = control.try_clone() else {
        return 1;
    };
    let agent = Arc::new(Agent {
        transport,
        control: Mutex::new(control),
        version,
        clients: Mutex::new(HashMap::new()),
        next_client: AtomicU32::new(1),
        active_clients: Arc::new(AtomicUsize::new(0)),
        service_path: exec::service_path_from_env(),
        fork_server: if parsed.has("no-fork-server") {
            None
        } else {
            Some(
                parsed
                    .value("fork-server-socket")
                    .unwrap_or(fork_server::QREXEC_FORK_SERVER_SOCKET)
                    .to_string(),
            )
        },
    });
    {
        let agent = Arc::clone(&agent);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Some(slot) = ClientSlot::take(&agent.active_clients) else {
                    log_error!("too many qrexec-client-vm connections, closing a new one");
                    continue;
                };
                let agent = Arc::clone(&agent);
                std::thread::spawn(move || handle_trigger_client(&agent, stream, slot));
            }
        });
    }
    let mut reader = reader;
    loop {
        if !control_loop(&agent, reader) {
            return 1;
        }
        log_error!("qrexec-daemon has disconnected, waiting for it to come back");
        lock(&agent.clients).clear();
        match accept_daemon(&*agent.transport) {
            Ok((control, version)) if version == agent.version => {
                let Ok(clone) = control.try_clone() else {
                    return 1;
                };
                *lock(&agent.control) = control;
                reader = clone;
            }
            Ok((_, version)) => {
                log_error!("qrexec-daemon came back with protocol {version}, restarting");
                return 1;
            }
            Err(e) => {
                log_error!("{e}");
                return 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_slots_are_bounded_and_given_back() {
        let counter = Arc::new(AtomicUsize::new(0));
        let slots: Vec<ClientSlot> = (0..MAX_CLIENTS)
            .map(|_| ClientSlot::take(&counter).unwrap())
            .collect();
        assert!(ClientSlot::take(&counter).is_none());
        drop(slots);
        assert_eq!(counter.load(Ordering::SeqCst), 0);
        assert!(ClientSlot::take(&counter).is_some());
    }

    #[test]
    fn idents_map_back_to_clients() {
        assert_eq!(
            client_id_from_ident(&RequestId::new(b"SOCKET42").unwrap()),
            Some(42)
        );
        assert_eq!(
            client_id_from_ident(&RequestId::new(b"SOCKET").unwrap()),
            None
        );
        assert_eq!(
            client_id_from_ident(&RequestId::new(b"SOCK42").unwrap()),
            None
        );
        assert_eq!(
            client_id_from_ident(&RequestId::new(b"SOCKET99999999999").unwrap()),
            None
        );
    }
}
