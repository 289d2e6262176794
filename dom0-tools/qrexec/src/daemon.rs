//! `qrexec-daemon`: dom0's end of one qube's qrexec control channel.
//!
//! One instance runs per qube. It connects to the qube's agent on vchan port
//! 512 (the agent is the server and says `MSG_HELLO` first; the lower version
//! wins, at least 2), then listens on `SOCKET_DIR/qrexec.<domid>` (with the
//! symlink `qrexec.<name>`) for qrexec-client connections. To each client it
//! sends `MSG_HELLO` (version 3) first and accepts clients of version 3 or
//! later; it relays `MSG_EXEC_CMDLINE`, `MSG_JUST_EXEC` and
//! `MSG_SERVICE_CONNECT`, allocating data ports from 513 (odd/even split for
//! VM↔VM pairs so both daemons never pick the same port), replacing
//! `DEFAULT:` by the default user, and closing the client's connection when
//! the agent reports `MSG_CONNECTION_TERMINATED` for its port. For the qube's
//! `MSG_TRIGGER_SERVICE{,3,4}` it validates and sanitises names and the
//! request ident as Qubes does, asks the policy (daemon socket, then
//! program), and either connects the call (`qrexec-client -c` semantics, see
//! `run_allowed_call`) or answers `MSG_SERVICE_REFUSED`. A call to
//! `@dispvm:TEMPLATE` creates, starts and afterwards kills a disposable
//! through qubesd, and a target allowed with `autostart=True` whose daemon
//! is not running is started through qubesd first ([`crate::qubesd`]); a
//! qubesd error refuses the call.
//!
//! Source: qubes-core-qrexec `daemon/qrexec-daemon.c`. Every byte from a
//! client or the agent is hostile: a misbehaving client is disconnected on
//! its own; a malformed message from the agent ends the daemon (as in Qubes)
//! without touching other qubes. At most 256 clients and 256 pending policy
//! requests exist at once; beyond that new work is refused, never queued.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protocol::qrexec::cmdline::{Dom0ServiceCommand, VmServiceCommand, strip_default_user};
use protocol::qrexec::names::{
    sanitize_qube_name, sanitize_service_name, target_refers_to_dom0, validate_service_name,
};
use protocol::qrexec::{
    self, ConnectParams, ExecParams, Field, HEADER_LEN, HeaderRepr, IDENT_LEN, MAX_DATA_PORTS,
    MsgType, QREXEC_PROTOCOL_V2, Repr, RequestId, VCHAN_BASE_DATA_PORT, VCHAN_BASE_PORT,
};

use crate::args::{self, OptSpec};
use crate::client::{CLIENT_PROTOCOL_VERSION, DEFAULT_SOCKET_DIR};
use crate::data::LOCAL_PROTOCOL_VERSION;
use crate::error::Error;
use crate::log::escape;
use crate::log_error;
use crate::policy::{self, Decision, PolicyConfig, PolicyRequest};
use crate::qubesd::Qubesd;
use crate::vchan::{self, Vchan};
use crate::wire::{self, MessageBuf};

/// Largest number of simultaneous clients (`MAX_CLIENTS`).
pub const MAX_CLIENTS: usize = 256;
/// Default startup timeout in seconds (`MAX_STARTUP_TIME_DEFAULT`).
pub const MAX_STARTUP_TIME_DEFAULT: u64 = 60;
/// Default log directory.
pub const DEFAULT_LOG_DIR: &str = "/var/log/qubes";

const CHILD_ENV: &str = "QREXEC_DAEMON_INTERNAL_FOREGROUND";

/// Configuration of one daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The qube's domain id.
    pub domid: u32,
    /// The qube's name.
    pub name: String,
    /// The qube's UUID (`--uuid`), if given.
    pub uuid: Option<String>,
    /// User that replaces `DEFAULT`.
    pub default_user: String,
    /// Where the client sockets live.
    pub socket_dir: PathBuf,
    /// Where to ask for policy decisions.
    pub policy: PolicyConfig,
    /// The qrexec-client to run for allowed calls.
    pub client_path: PathBuf,
    /// qubesd, for disposable targets and `autostart=True`.
    pub qubesd: Qubesd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Response {
    Pending,
    Allow,
}

#[derive(Debug)]
struct Pending {
    ident: RequestId,
    response: Response,
    /// The qrexec-client that answers this request exited successfully; its
    /// `MSG_SERVICE_CONNECT` may still be unread in its socket.
    client_done: bool,
}

#[derive(Debug)]
struct PortSlot {
    connect_domain: u32,
    notify: Option<(u64, UnixStream)>,
}

#[derive(Debug)]
struct Shared {
    cfg: DaemonConfig,
    agent: Mutex<Box<dyn Vchan>>,
    ports: Mutex<Vec<Option<PortSlot>>>,
    pending: Mutex<Vec<Option<Pending>>>,
    clients: AtomicUsize,
    next_client: AtomicU64,
    /// Every connected client, so an agent restart can disconnect them all.
    client_streams: Mutex<HashMap<u64, UnixStream>>,
    /// Bumped when the client socket is re-created; older accept loops stop.
    listener_generation: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn socket_paths(cfg: &DaemonConfig) -> (PathBuf, Vec<PathBuf>) {
    let main = cfg.socket_dir.join(format!("qrexec.{}", cfg.domid));
    let mut links = vec![cfg.socket_dir.join(format!("qrexec.{}", cfg.name))];
    if let Some(uuid) = &cfg.uuid {
        links.push(cfg.socket_dir.join(format!("qrexec.uuid:{uuid}")));
    }
    (main, links)
}

fn unlink_sockets(cfg: &DaemonConfig) {
    let (main, links) = socket_paths(cfg);
    for path in links.iter().chain(std::iter::once(&main)) {
        let _ = std::fs::remove_file(path);
    }
}

fn fatal(cfg: &DaemonConfig, what: std::fmt::Arguments<'_>) -> ! {
    log_error!("{what}");
    unlink_sockets(cfg);
    std::process::exit(1);
}

impl Shared {
    /// Send to the agent; a failed write is fatal (the control channel is
    /// gone), a message that cannot be encoded is the caller's problem.
    fn send_to_agent(&self, repr: &Repr<'_>) -> Result<(), String> {
        let mut out = vec![0u8; repr.buffer_len()];
        repr.emit(&mut out).map_err(|e| e.to_string())?;
        let mut agent = lock(&self.agent);
        if let Err(e) = std::io::Write::write_all(&mut **agent, &out) {
            // The agent is gone: make the reader see it and reconnect.
            let _ = agent.shutdown();
            return Err(format!("Error while vchan send: {e}"));
        }
        Ok(())
    }

    /// Send a message whose body is already checked, as it is.
    fn send_raw_to_agent(&self, msg_type: MsgType, body: &[u8]) -> Result<(), String> {
        let len = u32::try_from(body.len()).map_err(|e| e.to_string())?;
        let mut out = vec![0u8; HEADER_LEN];
        HeaderRepr { msg_type, len }
            .emit(&mut out)
            .map_err(|e| e.to_string())?;
        out.extend_from_slice(body);
        let mut agent = lock(&self.agent);
        if let Err(e) = std::io::Write::write_all(&mut **agent, &out) {
            let _ = agent.shutdown();
            return Err(format!("Error while vchan send: {e}"));
        }
        Ok(())
    }

    fn send_refused(&self, ident: RequestId) {
        let _ = self.send_to_agent(&Repr::ServiceRefused(ident));
    }

    /// `allocate_vchan_port`: ports unique per domain pair; for a VM↔VM
    /// pair the lower domain id takes even offsets, the higher odd ones.
    fn allocate_port(&self, connect_domain: u32) -> Option<u32> {
        let (start, step) = if connect_domain == 0 {
            (0, 1)
        } else if connect_domain > self.cfg.domid {
            (1, 2)
        } else {
            (0, 2)
        };
        let mut ports = lock(&self.ports);
        let index = (start..ports.len())
            .step_by(step)
            .find(|&i| ports.get(i).is_some_and(Option::is_none))?;
        if let Some(slot) = ports.get_mut(index) {
            *slot = Some(PortSlot {
                connect_domain,
                notify: None,
            });
        }
        Some(VCHAN_BASE_DATA_PORT + index as u32)
    }

    fn port_index(port: u32) -> Option<usize> {
        port.checked_sub(VCHAN_BASE_DATA_PORT)
            .filter(|&i| i < MAX_DATA_PORTS)
            .map(|i| i as usize)
    }

    fn set_notify(&self, port: u32, client: u64, stream: UnixStream) {
        let mut ports = lock(&self.ports);
        if let Some(Some(slot)) = Shared::port_index(port).and_then(|i| ports.get_mut(i)) {
            slot.notify = Some((client, stream));
        }
    }

    fn clear_notify(&self, client: u64) {
        let mut ports = lock(&self.ports);
        for slot in ports.iter_mut().flatten() {
            if slot.notify.as_ref().is_some_and(|(c, _)| *c == client) {
                slot.notify = None;
            }
        }
    }

    /// `release_vchan_port`: only if reserved for that domain; closes the
    /// client that asked to be told.
    fn release_port(&self, port: u32, connect_domain: u32) {
        let mut ports = lock(&self.ports);
        let Some(entry) = Shared::port_index(port).and_then(|i| ports.get_mut(i)) else {
            return;
        };
        if entry
            .as_ref()
            .is_some_and(|slot| slot.connect_domain == connect_domain)
            && let Some(PortSlot {
                notify: Some((_, stream)),
                ..
            }) = entry.take()
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// What the client asked for, already checked.
enum ClientRequest {
    Exec {
        just_exec: bool,
        connect: ConnectParams,
        cmdline: Vec<u8>,
    },
    ServiceConnect {
        connect: ConnectParams,
        ident: RequestId,
        /// The body as the client sent it, forwarded to the agent verbatim
        /// (as Qubes' daemon does, whatever the ident's length).
        body: Vec<u8>,
    },
}

fn read_client_request(stream: &mut UnixStream, client: u64) -> Result<ClientRequest, String> {
    let mut buf = MessageBuf::new();
    let repr = wire::read_message(stream, &mut buf, &format!("client {client}"))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("client {client} disconnected"))?;
    match repr {
        Repr::ExecCmdline(ExecParams {
            connect,
            cmdline: Some(cmdline),
        }) => Ok(ClientRequest::Exec {
            just_exec: false,
            connect,
            cmdline: cmdline.to_vec(),
        }),
        Repr::JustExec(ExecParams {
            connect,
            cmdline: Some(cmdline),
        }) => Ok(ClientRequest::Exec {
            just_exec: true,
            connect,
            cmdline: cmdline.to_vec(),
        }),
        Repr::ServiceConnect {
            connect,
            request_id: Some(ident),
        } => {
            let body = buf.message().map(|m| m.body().to_vec()).unwrap_or_default();
            Ok(ClientRequest::ServiceConnect {
                connect,
                ident,
                body,
            })
        }
        other => Err(format!(
            "Invalid message type {} (len {}) from client {client}",
            other.msg_type().name(),
            other.body_len()
        )),
    }
}

fn handle_client(shared: &Shared, stream: UnixStream, client: u64) {
    if let Ok(clone) = stream.try_clone() {
        lock(&shared.client_streams).insert(client, clone);
    }
    serve_client(shared, stream, client);
    lock(&shared.client_streams).remove(&client);
}

fn serve_client(shared: &Shared, mut stream: UnixStream, client: u64) {
    if let Err(e) = wire::send_hello(&mut stream, CLIENT_PROTOCOL_VERSION) {
        log_error!("Failed to send MSG_HELLO to client {client}: {e}");
        return;
    }
    match wire::recv_hello(&mut stream, "client") {
        Ok(v) if v >= CLIENT_PROTOCOL_VERSION => {}
        Ok(v) => {
            log_error!(
                "Incompatible client protocol version (remote {v}, local {CLIENT_PROTOCOL_VERSION})"
            );
            return;
        }
        Err(e) => {
            log_error!("Invalid HELLO packet received from client {client}: {e}");
            return;
        }
    }
    let request = match read_client_request(&mut stream, client) {
        Ok(r) => r,
        Err(e) => {
            log_error!("{e}");
            return;
        }
    };
    let (mut connect, forward_type) = match &request {
        ClientRequest::ServiceConnect { connect, ident, .. } => {
            let mut pending = lock(&shared.pending);
            let found = pending.iter_mut().find(|p| {
                p.as_ref().is_some_and(|p| {
                    p.response == Response::Pending && p.ident.as_bytes() == ident.as_bytes()
                })
            });
            match found {
                Some(entry) => {
                    if entry.as_ref().is_some_and(|p| p.client_done) {
                        *entry = None;
                    } else if let Some(p) = entry.as_mut() {
                        p.response = Response::Allow;
                    }
                }
                None => {
                    log_error!(
                        "Connection with ident {} not requested or already handled",
                        escape(ident.as_bytes())
                    );
                    return;
                }
            }
            (*connect, None)
        }
        ClientRequest::Exec {
            just_exec, connect, ..
        } => {
            if connect.connect_port != 0 {
                log_error!(
                    "Client provided port {} in non-MSG_SERVICE_CONNECT request",
                    connect.connect_port
                );
            }
            (*connect, Some(*just_exec))
        }
    };
    if connect.connect_port == 0 {
        let Some(port) = shared.allocate_port(connect.connect_domain) else {
            log_error!("Failed to allocate new vchan port, too many clients?");
            return;
        };
        connect.connect_port = port;
        if let Ok(clone) = stream.try_clone() {
            shared.set_notify(port, client, clone);
        }
        let reply_connect = ConnectParams {
            connect_domain: shared.cfg.domid,
            connect_port: port,
        };
        let reply = match forward_type {
            Some(true) => Repr::JustExec(ExecParams {
                connect: reply_connect,
                cmdline: None,
            }),
            Some(false) => Repr::ExecCmdline(ExecParams {
                connect: reply_connect,
                cmdline: None,
            }),
            None => Repr::ServiceConnect {
                connect: reply_connect,
                request_id: None,
            },
        };
        if wire::write_message(&mut stream, &reply).is_err() {
            shared.clear_notify(client);
            shared.release_port(port, connect.connect_domain);
            return;
        }
    } else if Shared::port_index(connect.connect_port).is_none() {
        log_error!("Invalid connect port {}", connect.connect_port);
        return;
    }
    let sent = match &request {
        ClientRequest::ServiceConnect { ident, body, .. } => {
            let params_len = protocol::qrexec::message::EXEC_PARAMS_LEN;
            if body.len() > params_len && body.len() <= params_len + IDENT_LEN {
                // The connect parameters as settled above (the client may
                // have left them to us), then the client's ident bytes.
                let params = Repr::ServiceConnect {
                    connect,
                    request_id: None,
                };
                let mut raw = vec![0u8; params.buffer_len()];
                match params.emit(&mut raw) {
                    Ok(_) => {
                        let mut out = raw.get(HEADER_LEN..).unwrap_or(&[]).to_vec();
                        out.extend_from_slice(body.get(params_len..).unwrap_or(&[]));
                        shared.send_raw_to_agent(MsgType::ServiceConnect, &out)
                    }
                    Err(e) => Err(e.to_string()),
                }
            } else {
                shared.send_to_agent(&Repr::ServiceConnect {
                    connect,
                    request_id: Some(*ident),
                })
            }
        }
        ClientRequest::Exec {
            just_exec, cmdline, ..
        } => {
            let replaced;
            let cmdline: &[u8] = match strip_default_user(cmdline) {
                Some(rest) => {
                    replaced = [shared.cfg.default_user.as_bytes(), b":", rest].concat();
                    &replaced
                }
                None => cmdline,
            };
            let exec = ExecParams {
                connect,
                cmdline: Some(cmdline),
            };
            shared.send_to_agent(&if *just_exec {
                Repr::JustExec(exec)
            } else {
                Repr::ExecCmdline(exec)
            })
        }
    };
    if let Err(e) = sent {
        log_error!("Cannot forward request of client {client}: {e}");
        shared.clear_notify(client);
        return;
    }
    // CLIENT_RUNNING: wait for EOF (or for the port's release to close us).
    let mut byte = [0u8; 1];
    if matches!(stream.read(&mut byte), Ok(n) if n > 0) {
        log_error!("Unexpected data received from client {client}");
    }
    shared.clear_notify(client);
}

struct Trigger {
    target: Vec<u8>,
    requested_source: Option<Vec<u8>>,
    service: Vec<u8>,
    ident: RequestId,
}

/// Apply Qubes' checks to a trigger; `Err(ident)` = refuse it.
fn check_trigger(mut t: Trigger) -> Result<Trigger, RequestId> {
    sanitize_qube_name(&mut t.target);
    if let Some(source) = t.requested_source.as_mut() {
        sanitize_qube_name(source);
    }
    if let Err(e) = t.ident.validate() {
        log_error!("{e}");
        return Err(t.ident);
    }
    if let Err(e) = validate_service_name(&t.service) {
        log_error!("{e}");
        return Err(t.ident);
    }
    sanitize_service_name(&mut t.service);
    Ok(t)
}

/// Connect the two ends of an allowed call. VM→VM runs the very code of
/// `qrexec-client -c` (`client::execute_vm`, which also creates, starts and
/// kills disposables and starts `autostart` targets through qubesd) in
/// this thread, as current
/// Qubes' daemon runs `qrexec_execute_vm` in a forked child (seed 000 shows
/// the older design that spawned the program; the messages are identical and
/// this saves a process start per call). VM→dom0 runs `qrexec-client -d dom0
/// -c REQID,SRC,SRCID "QUBESRPC svc+arg SRC name|keyword TARGET"` as a
/// separate process, so the dom0 service never shares the daemon's process.
fn run_allowed_call(shared: &Shared, trigger: &Trigger, allow: &policy::Allow) -> bool {
    let cfg = &shared.cfg;
    let service = String::from_utf8_lossy(&trigger.service).into_owned();
    let ident = String::from_utf8_lossy(trigger.ident.as_bytes()).into_owned();
    if target_refers_to_dom0(allow.target.as_bytes()) {
        let line = Dom0ServiceCommand {
            service: &service,
            source: &cfg.name,
            target: &allow.requested_target,
        }
        .to_string();
        let connect = format!("{ident},{},{}", cfg.name, cfg.domid);
        let status = Command::new(&cfg.client_path)
            .arg(format!("--socket-dir={}", cfg.socket_dir.display()))
            .args(["-d", "dom0", "-E", "-w", "5", "-c", &connect, &line])
            .stdin(Stdio::null())
            .status();
        return match status {
            Ok(status) => status.success(),
            Err(e) => {
                log_error!("cannot run {}: {e}", cfg.client_path.display());
                false
            }
        };
    }
    // As Qubes: the uuid form when the policy gave one (`uuid:U`, or
    // `@dispvm:uuid:U` for a disposable of template U).
    let target = allow.target_uuid.as_deref().unwrap_or(&allow.target);
    let line = VmServiceCommand {
        user: &allow.user,
        service: &service,
        source: &cfg.name,
    }
    .to_string();
    crate::client::execute_vm(
        &cfg.socket_dir,
        &cfg.qubesd,
        crate::client::VmCall {
            target,
            autostart: allow.autostart,
            just_exec: false,
            wait_connection_end: false,
        },
        &crate::client::ConnectSpec {
            request_id: ident,
            source_name: cfg.name.clone(),
            source_id: cfg.domid,
        },
        &line,
    )
}

fn finish_pending(shared: &Shared, slot: usize, allowed: bool) {
    let ident = {
        let mut pending = lock(&shared.pending);
        let Some(entry) = pending.get_mut(slot) else {
            return;
        };
        if allowed {
            // Keep a still-pending entry until its MSG_SERVICE_CONNECT is read.
            match entry.as_mut() {
                Some(p) if p.response == Response::Pending => p.client_done = true,
                _ => *entry = None,
            }
            return;
        }
        let Some(p) = entry.take() else { return };
        if p.response != Response::Pending {
            log_error!(
                "qrexec-client for connection {} failed, but the response (allow) was already sent",
                escape(p.ident.as_bytes()),
            );
            return;
        }
        p.ident
    };
    shared.send_refused(ident);
}

fn handle_trigger(shared: &Arc<Shared>, trigger: Trigger) {
    let trigger = match check_trigger(trigger) {
        Ok(t) => t,
        Err(ident) => return shared.send_refused(ident),
    };
    let slot = {
        let mut pending = lock(&shared.pending);
        match pending.iter().position(Option::is_none) {
            Some(slot) => {
                if let Some(entry) = pending.get_mut(slot) {
                    *entry = Some(Pending {
                        ident: trigger.ident,
                        response: Response::Pending,
                        client_done: false,
                    });
                }
                slot
            }
            None => {
                drop(pending);
                log_error!("Service request denied, too many pending requests");
                return shared.send_refused(trigger.ident);
            }
        }
    };
    let shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("qrexec-policy".into())
        .spawn(move || {
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let request = PolicyRequest {
                source: shared.cfg.name.clone(),
                requested_source: trigger
                    .requested_source
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .map(text),
                intended_target: text(&trigger.target),
                service_and_arg: text(&trigger.service),
            };
            let allowed = match shared.cfg.policy.evaluate(&request) {
                Decision::Allow(allow) => run_allowed_call(&shared, &trigger, &allow),
                Decision::Deny => false,
            };
            finish_pending(&shared, slot, allowed);
        });
    if spawned.is_err() {
        log_error!("cannot start policy thread");
    }
}

/// Read and dispatch the agent's messages until it disconnects.
fn agent_loop(shared: &Arc<Shared>, mut reader: Box<dyn Vchan>, version: u32) {
    let mut buf = MessageBuf::new();
    loop {
        let result = wire::read_message(&mut *reader, &mut buf, "qrexec-agent");
        let repr = match result {
            Ok(Some(repr)) => repr,
            Ok(None) | Err(Error::Io { .. } | Error::Eof(_)) => return,
            Err(Error::Protocol {
                source:
                    qrexec::Error::NotNulTerminated(Field::ServiceName)
                    | qrexec::Error::InteriorNul {
                        field: Field::ServiceName,
                        ..
                    },
                ..
            }) => {
                log_error!("Service name not NUL-terminated or contains NUL byte");
                if let Some(ident) = buf.trigger_request_id() {
                    shared.send_refused(ident);
                }
                continue;
            }
            Err(e) => fatal(&shared.cfg, format_args!("agent sent invalid message: {e}")),
        };
        if let Err(e) = repr.check_version(version) {
            fatal(&shared.cfg, format_args!("{e}"));
        }
        match repr {
            Repr::TriggerService(t) => handle_trigger(
                shared,
                Trigger {
                    target: t.target_domain.to_vec(),
                    requested_source: None,
                    service: t.service_name.to_vec(),
                    ident: t.request_id,
                },
            ),
            Repr::TriggerService3(t) => handle_trigger(
                shared,
                Trigger {
                    target: t.target_domain.to_vec(),
                    requested_source: None,
                    service: t.service_name.to_vec(),
                    ident: t.request_id,
                },
            ),
            Repr::TriggerService4(t) => handle_trigger(
                shared,
                Trigger {
                    target: t.target_domain.to_vec(),
                    requested_source: Some(t.source_domain.to_vec()),
                    service: t.service_name.to_vec(),
                    ident: t.request_id,
                },
            ),
            Repr::ConnectionTerminated(params) => {
                if Shared::port_index(params.connect_port).is_none() {
                    fatal(
                        &shared.cfg,
                        format_args!(
                            "Invalid port in MSG_CONNECTION_TERMINATED ({})",
                            params.connect_port
                        ),
                    );
                }
                shared.release_port(params.connect_port, params.connect_domain);
            }
            other => fatal(
                &shared.cfg,
                format_args!(
                    "unknown mesage type 0x{:x} from agent",
                    u32::from(other.msg_type())
                ),
            ),
        }
    }
}

/// Connect to the agent and do the handshake; returns the vchan and version.
fn connect_agent(
    cfg: &DaemonConfig,
    timeout: Option<Duration>,
) -> Result<(Box<dyn Vchan>, u32), String> {
    let transport = vchan::from_env().map_err(|e| e.to_string())?;
    let mut agent = transport
        .client(cfg.domid, VCHAN_BASE_PORT, timeout)
        .map_err(|e| format!("Cannot connect to '{}' qrexec agent: {e}", cfg.name))?;
    let remote = wire::recv_hello(&mut *agent, "qrexec-agent")
        .map_err(|e| format!("Failed to read agent HELLO: {e}"))?;
    let version = qrexec::negotiate(LOCAL_PROTOCOL_VERSION, remote, QREXEC_PROTOCOL_V2)
        .map_err(|_| {
            format!(
                "Incompatible agent protocol version (remote {remote}, local {LOCAL_PROTOCOL_VERSION})"
            )
        })?;
    // As Qubes' daemon: the answer carries the negotiated version (the
    // lower of the two), not our own.
    wire::send_hello(&mut *agent, version)
        .map_err(|e| format!("Failed to send HELLO to agent: {e}"))?;
    Ok((agent, version))
}

fn create_socket(cfg: &DaemonConfig) -> std::io::Result<UnixListener> {
    let (main, links) = socket_paths(cfg);
    let target = PathBuf::from(format!("qrexec.{}", cfg.domid));
    for link in &links {
        let _ = std::fs::remove_file(link);
        if let Err(e) = std::os::unix::fs::symlink(&target, link) {
            log_error!("symlink({},{}): {e}", target.display(), link.display());
        }
    }
    let _ = std::fs::remove_file(&main);
    let listener = UnixListener::bind(&main)?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&main, std::fs::Permissions::from_mode(0o777));
    Ok(listener)
}

fn spawn_acceptor(shared: &Arc<Shared>, listener: UnixListener) -> std::io::Result<()> {
    let generation = shared.listener_generation.fetch_add(1, Ordering::SeqCst) + 1;
    listener.set_nonblocking(true)?;
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("qrexec-accept".into())
        .spawn(move || {
            while shared.listener_generation.load(Ordering::SeqCst) == generation {
                let mut fds = [rustix::event::PollFd::new(
                    &listener,
                    rustix::event::PollFlags::IN,
                )];
                let timeout = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                };
                if !matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0) {
                    continue;
                }
                let Ok((stream, _)) = listener.accept() else {
                    continue;
                };
                if stream.set_nonblocking(false).is_err() {
                    continue;
                }
                if shared.clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
                    log_error!("too many clients, refusing a new one");
                    continue;
                }
                shared.clients.fetch_add(1, Ordering::SeqCst);
                let id = shared.next_client.fetch_add(1, Ordering::SeqCst);
                let worker = Arc::clone(&shared);
                let started = std::thread::Builder::new()
                    .name("qrexec-client-conn".into())
                    .spawn(move || {
                        handle_client(&worker, stream, id);
                        worker.clients.fetch_sub(1, Ordering::SeqCst);
                    });
                if started.is_err() {
                    shared.clients.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(())
}

/// `handle_agent_restart`: stop listening, disconnect every client, forget
/// pending requests (ports stay reserved: their calls may still run), wait
/// for the agent to come back and listen again.
fn restart_agent(shared: &Arc<Shared>) -> Option<(Box<dyn Vchan>, u32)> {
    log_error!("qrexec-agent has disconnected");
    shared.listener_generation.fetch_add(1, Ordering::SeqCst);
    unlink_sockets(&shared.cfg);
    for (_, stream) in lock(&shared.client_streams).drain() {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    for entry in lock(&shared.pending).iter_mut() {
        *entry = None;
    }
    let (agent, version) = match connect_agent(&shared.cfg, None) {
        Ok(ok) => ok,
        Err(e) => {
            log_error!("{e}");
            return None;
        }
    };
    let reader = agent.try_clone().ok()?;
    *lock(&shared.agent) = agent;
    let listener = create_socket(&shared.cfg).ok()?;
    spawn_acceptor(shared, listener).ok()?;
    log_error!("qrexec-agent has reconnected");
    Some((reader, version))
}

/// Run the daemon in the foreground after the agent connected. `ready` is
/// called once the client socket exists. When the agent disconnects the
/// daemon waits for it to come back (as Qubes' does); a malformed message
/// from the agent ends it.
pub fn serve(cfg: DaemonConfig, agent: Box<dyn Vchan>, version: u32, ready: impl FnOnce()) -> i32 {
    let listener = match create_socket(&cfg) {
        Ok(l) => l,
        Err(e) => {
            log_error!(
                "cannot create {}/qrexec.{}: {e}",
                cfg.socket_dir.display(),
                cfg.domid
            );
            return 1;
        }
    };
    let mut reader = match agent.try_clone() {
        Ok(r) => r,
        Err(e) => {
            log_error!("{e}");
            return 1;
        }
    };
    let shared = Arc::new(Shared {
        cfg,
        agent: Mutex::new(agent),
        ports: Mutex::new((0..MAX_DATA_PORTS).map(|_| None).collect()),
        pending: Mutex::new((0..MAX_CLIENTS).map(|_| None).collect()),
        clients: AtomicUsize::new(0),
        next_client: AtomicU64::new(1),
        client_streams: Mutex::new(HashMap::new()),
        listener_generation: AtomicU64::new(0),
    });
    if let Err(e) = spawn_acceptor(&shared, listener) {
        log_error!("cannot start accept thread: {e}");
        return 1;
    }
    ready();
    let mut version = version;
    loop {
        agent_loop(&shared, reader, version);
        match restart_agent(&shared) {
            Some((r, v)) => {
                reader = r;
                version = v;
            }
            None => {
                log_error!("Failed to reconnect to qrexec-agent, terminating");
                unlink_sockets(&shared.cfg);
                return 1;
            }
        }
    }
}

const SPECS: &[OptSpec] = &[
    OptSpec {
        short: Some('h'),
        long: Some("help"),
        takes_arg: false,
        id: "help",
    },
    OptSpec {
        short: Some('q'),
        long: Some("quiet"),
        takes_arg: false,
        id: "quiet",
    },
    OptSpec {
        short: None,
        long: Some("socket-dir"),
        takes_arg: true,
        id: "socket-dir",
    },
    OptSpec {
        short: Some('p'),
        long: Some("policy-program"),
        takes_arg: true,
        id: "policy-program",
    },
    OptSpec {
        short: Some('D'),
        long: Some("direct"),
        takes_arg: false,
        id: "direct",
    },
    OptSpec {
        short: Some('u'),
        long: Some("uuid"),
        takes_arg: true,
        id: "uuid",
    },
];

fn usage() -> i32 {
    eprintln!("usage: qrexec-daemon [options] domainid domain-name [default user]");
    eprintln!("Options:");
    eprintln!("  -h, --help - display usage");
    eprintln!("  -q, --quiet - quiet mode");
    eprintln!("  --socket-dir=PATH - directory for qrexec socket, default: {DEFAULT_SOCKET_DIR}");
    eprintln!(
        "  -p, --policy-program=PATH - program to execute to check policy, default: {}",
        policy::DEFAULT_POLICY_PROGRAM
    );
    eprintln!("  -D, --direct - run directly, don't daemonize, log to stderr");
    1
}

fn default_client_path() -> PathBuf {
    if let Some(path) = std::env::var_os("QREXEC_CLIENT_PATH") {
        return PathBuf::from(path);
    }
    // Next to qrexec-daemon when it is there (a build tree); otherwise
    // Qubes' place (qrexec-daemon is /usr/sbin/, qrexec-client is not).
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("qrexec-client")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/qubes/qrexec-client"))
}

fn startup_timeout() -> u64 {
    std::env::var("QREXEC_STARTUP_TIMEOUT")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .filter(|&t| t > 0)
        .unwrap_or(MAX_STARTUP_TIME_DEFAULT)
}

/// Parent side of daemonising: start ourselves in the foreground with the
/// log file as stderr and wait until the child says it is connected.
fn daemonize(argv: &[String], cfg: &DaemonConfig, quiet: bool) -> i32 {
    let log_dir = std::env::var_os("QREXEC_LOG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LOG_DIR));
    let log_path = log_dir.join(format!("qrexec.{}.log", cfg.name));
    let log = match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&log_path)
    {
        Ok(f) => f,
        Err(e) => {
            log_error!("open {}: {e}", log_path.display());
            return 1;
        }
    };
    let Ok(exe) = std::env::current_exe() else {
        log_error!("cannot find own executable");
        return 1;
    };
    let mut cmd = Command::new(exe);
    cmd.args(argv.get(1..).unwrap_or(&[]))
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log_error!("fork: {e}");
            return 1;
        }
    };
    if std::env::var_os("QREXEC_STARTUP_NOWAIT").is_some() {
        return 0;
    }
    if !quiet {
        log_error!("Waiting for VM's qrexec agent.");
    }
    let Some(mut pipe) = child.stdout.take() else {
        return 1;
    };
    let mut byte = [0u8; 1];
    match pipe.read(&mut byte) {
        Ok(1) if byte[0] == 0 => {
            if !quiet {
                log_error!("Connected to VM");
            }
            0
        }
        Ok(1) => {
            log_error!(
                "Cannot connect to '{}' qrexec agent for {} seconds, giving up",
                cfg.name,
                startup_timeout()
            );
            3
        }
        _ => {
            log_error!("Connection to the VM failed");
            1
        }
    }
}

/// `qrexec-daemon` main: returns the exit code.
pub fn main(argv: Vec<String>) -> i32 {
    crate::log::init("qrexec-daemon");
    let parsed = match args::parse(argv.get(1..).unwrap_or(&[]), SPECS, false) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("qrexec-daemon: {e}");
            return usage();
        }
    };
    if parsed.has("help") || !(2..=3).contains(&parsed.operands.len()) {
        return usage();
    }
    let (Some(domid), Some(name)) = (parsed.operands.first(), parsed.operands.get(1)) else {
        return usage();
    };
    let domid: u32 = match domid.parse() {
        Ok(d) if d > 0 => d,
        _ => {
            log_error!("domain id=0?");
            return 1;
        }
    };
    let cfg = DaemonConfig {
        domid,
        name: name.clone(),
        uuid: parsed.value("uuid").map(str::to_string),
        default_user: parsed
            .operands
            .get(2)
            .cloned()
            .unwrap_or_else(|| "user".to_string()),
        socket_dir: PathBuf::from(parsed.value("socket-dir").unwrap_or(DEFAULT_SOCKET_DIR)),
        policy: PolicyConfig {
            socket: std::env::var_os("QREXEC_POLICY_SOCKET")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(policy::DEFAULT_POLICY_SOCKET)),
            program: PathBuf::from(
                parsed
                    .value("policy-program")
                    .unwrap_or(policy::DEFAULT_POLICY_PROGRAM),
            ),
        },
        client_path: default_client_path(),
        qubesd: Qubesd::from_env(),
    };
    let direct = parsed.has("direct");
    let foreground_child = std::env::var_os(CHILD_ENV).is_some();
    if !direct && !foreground_child {
        return daemonize(&argv, &cfg, parsed.has("quiet"));
    }
    let timeout = if std::env::var_os("QREXEC_STARTUP_NOWAIT").is_some() {
        None
    } else {
        Some(Duration::from_secs(startup_timeout()))
    };
    let (agent, version) = match connect_agent(&cfg, timeout) {
        Ok(ok) => ok,
        Err(e) => {
            log_error!("{e}");
            if foreground_child {
                let _ = std::io::Write::write_all(&mut std::io::stdout(), b"\x01");
            }
            return 3;
        }
    };
    serve(cfg, agent, version, || {
        if foreground_child {
            let _ = std::io::Write::write_all(&mut std::io::stdout(), b"\x00");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            // From now on stdout goes to the log like stderr.
            let _ = rustix::stdio::dup2_stdout(std::io::stderr());
        }
    })
}

/// Whether `path` is a daemon's socket (used by tests to wait for start-up).
pub fn socket_ready(socket_dir: &Path, domid: u32) -> bool {
    socket_dir.join(format!("qrexec.{domid}")).exists()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;
    use crate::vchan::socket::SocketVchan;

    fn shared(domid: u32) -> (Shared, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let cfg = DaemonConfig {
            domid,
            name: "vm".into(),
            uuid: None,
            default_user: "user".into(),
            socket_dir: PathBuf::from("/nonexistent"),
            policy: PolicyConfig {
                socket: PathBuf::from("/nonexistent"),
                program: PathBuf::from("/nonexistent"),
            },
            client_path: PathBuf::from("/nonexistent"),
            qubesd: Qubesd::at("/nonexistent"),
        };
        let shared = Shared {
            cfg,
            agent: Mutex::new(Box::new(SocketVchan::new(ours))),
            ports: Mutex::new((0..MAX_DATA_PORTS).map(|_| None).collect()),
            pending: Mutex::new((0..MAX_CLIENTS).map(|_| None).collect()),
            clients: AtomicUsize::new(0),
            next_client: AtomicU64::new(1),
            client_streams: Mutex::new(HashMap::new()),
            listener_generation: AtomicU64::new(0),
        };
        (shared, theirs)
    }

    #[test]
    fn port_allocation_splits_vm_pairs_by_parity() {
        let (s, _peer) = shared(5);
        // dom0 calls use every port from 513 up.
        assert_eq!(s.allocate_port(0), Some(513));
        assert_eq!(s.allocate_port(0), Some(514));
        // Towards a higher domain id: odd offsets; lower: even offsets.
        assert_eq!(s.allocate_port(6), Some(516));
        assert_eq!(s.allocate_port(6), Some(518));
        assert_eq!(s.allocate_port(3), Some(515));
        assert_eq!(s.allocate_port(3), Some(517));
    }

    #[test]
    fn ports_run_out_at_256_and_release_checks_the_domain() {
        let (s, _peer) = shared(5);
        let ports: Vec<u32> = (0..256).map_while(|_| s.allocate_port(0)).collect();
        assert_eq!(ports.len(), 256);
        assert_eq!(ports.last(), Some(&(513 + 255)));
        assert_eq!(s.allocate_port(0), None);
        // Released only for the domain it was reserved for.
        s.release_port(600, 7);
        assert_eq!(s.allocate_port(0), None);
        s.release_port(600, 0);
        assert_eq!(s.allocate_port(0), Some(600));
        // Out-of-range ports are ignored, not a panic.
        s.release_port(0, 0);
        s.release_port(u32::MAX, 0);
        assert_eq!(Shared::port_index(512), None);
        assert_eq!(Shared::port_index(513 + 256), None);
    }

    #[test]
    fn release_closes_the_client_that_asked_to_be_told() {
        let (s, _peer) = shared(5);
        let port = s.allocate_port(0).unwrap();
        let (daemon_side, mut client_side) = UnixStream::pair().unwrap();
        s.set_notify(port, 1, daemon_side);
        s.release_port(port, 0);
        let mut buf = [0u8; 1];
        assert_eq!(client_side.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn trigger_checks_follow_qubes() {
        let ok = check_trigger(Trigger {
            target: b"vm;1".to_vec(),
            requested_source: Some(b"a b".to_vec()),
            service: b"test.File+a/b".to_vec(),
            ident: RequestId::new(b"SOCKET3").unwrap(),
        })
        .unwrap_or_else(|_| panic!("valid trigger refused"));
        assert_eq!(ok.target, b"vm_1");
        assert_eq!(ok.requested_source.as_deref(), Some(&b"a_b"[..]));
        assert_eq!(ok.service, b"test.File+a_b");
        for (service, ident) in [
            (&b"+x"[..], &b"SOCKET1"[..]),
            (b"", b"SOCKET1"),
            (b"ok", b"SOCKET/1"),
        ] {
            let id = RequestId::new(ident).unwrap();
            let refused = check_trigger(Trigger {
                target: b"vm".to_vec(),
                requested_source: None,
                service: service.to_vec(),
                ident: id,
            });
            assert!(matches!(refused, Err(i) if i == id));
        }
    }

    #[test]
    fn service_connect_must_match_a_pending_request() {
        let (s, mut agent) = shared(5);
        let ident = RequestId::new(b"SOCKET4").unwrap();
        lock(&s.pending)[0] = Some(Pending {
            ident,
            response: Response::Pending,
            client_done: false,
        });
        // A client answering the request: forwarded to the agent.
        let (mut client, daemon_side) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || {
            handle_client(&s, daemon_side, 1);
            s
        });
        assert_eq!(wire::recv_hello(&mut client, "daemon").unwrap(), 3);
        wire::send_hello(&mut client, 3).unwrap();
        wire::write_message(
            &mut client,
            &Repr::ServiceConnect {
                connect: ConnectParams {
                    connect_domain: 6,
                    connect_port: 520,
                },
                request_id: Some(ident),
            },
        )
        .unwrap();
        let mut buf = MessageBuf::new();
        let forwarded = wire::read_message(&mut agent, &mut buf, "daemon").unwrap();
        assert_eq!(
            forwarded,
            Some(Repr::ServiceConnect {
                connect: ConnectParams {
                    connect_domain: 6,
                    connect_port: 520
                },
                request_id: Some(ident)
            })
        );
        drop(client);
        let s = worker.join().unwrap();
        assert_eq!(
            lock(&s.pending)[0].as_ref().map(|p| p.response),
            Some(Response::Allow)
        );
        // A second answer for the same ident is refused (connection closed).
        let (mut client, daemon_side) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || handle_client(&s, daemon_side, 2));
        wire::recv_hello(&mut client, "daemon").unwrap();
        wire::send_hello(&mut client, 3).unwrap();
        wire::write_message(
            &mut client,
            &Repr::ServiceConnect {
                connect: ConnectParams {
                    connect_domain: 6,
                    connect_port: 520,
                },
                request_id: Some(ident),
            },
        )
        .unwrap();
        worker.join().unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
