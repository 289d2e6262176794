//! `qrexec-policy-daemon`: answers policy questions on a UNIX socket.
//!
//! One thread per connection (at most [`DaemonConfig::max_connections`] at
//! once; more are closed unanswered, which qrexec-daemon treats as a deny),
//! each reading one request ([`crate::protocol`]), deciding it against the
//! current compiled policy and writing the reply before closing.
//!
//! A watcher thread stats the policy directories, the legacy directory and
//! every file the last load read, every [`DaemonConfig::reload_interval`];
//! on a change it reloads. A load that fails (syntax error, bad file name,
//! unreadable file) **keeps the last good policy** and logs `FILE:LINE:
//! REASON` — a broken file never turns into an allow, and never into a
//! policy missing the broken file's rules either. If the very first load
//! fails, the daemon answers `result=deny` to everything until the policy is
//! fixed. A change is only read once two looks 50 ms apart agree (so a file
//! being rewritten in place is not read half-way), and because file
//! timestamps on Linux are coarse (a jiffy), a load that saw a file modified
//! in the last two seconds is repeated on the next poll so a second quick
//! edit of the same size is not missed.
//!
//! This module never answers without a complete, valid request, and never
//! writes more than [`crate::protocol::MAX_REPLY`] bytes.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::eval::{Confirm, Decision, Policy};
use crate::eval_service::{self, EvalService};
use crate::loader::PolicyPaths;
use crate::protocol::{MAX_REQUEST, checked_reply, parse_request, request_end};
use crate::system_info::{FileStamp, SystemInfoSource, file_stamp};

/// Everything the daemon needs.
#[derive(Clone)]
pub struct DaemonConfig {
    /// Where to listen.
    pub socket_path: PathBuf,
    /// Where the policy is.
    pub policy_paths: PolicyPaths,
    /// Where the qube list comes from.
    pub system_info: Arc<dyn SystemInfoSource>,
    /// Who answers `ask`.
    pub confirm: Arc<dyn Confirm>,
    /// How often to look for policy changes.
    pub reload_interval: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
    /// How long a client may take to send its request.
    pub read_timeout: Duration,
    /// `policy.EvalSimple` socket: path, and whether failing to bind it is
    /// fatal (an explicit flag) or only logged (the default path).
    pub eval_socket: Option<(PathBuf, bool)>,
    /// `policy.EvalGUI` socket, likewise.
    pub gui_socket: Option<(PathBuf, bool)>,
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("socket_path", &self.socket_path)
            .field("policy_paths", &self.policy_paths)
            .field("reload_interval", &self.reload_interval)
            .field("max_connections", &self.max_connections)
            .field("read_timeout", &self.read_timeout)
            .field("eval_socket", &self.eval_socket)
            .field("gui_socket", &self.gui_socket)
            .finish_non_exhaustive()
    }
}

type Fingerprint = Vec<(PathBuf, FileStamp)>;

/// Pause between the two looks that must agree before a changed policy is
/// read.
const SETTLE: Duration = Duration::from_millis(50);

/// The current policy, replaced atomically on reload.
#[derive(Debug)]
pub struct PolicyStore {
    paths: PolicyPaths,
    current: RwLock<Arc<Policy>>,
    state: std::sync::Mutex<WatchState>,
}

#[derive(Debug, Default)]
struct WatchState {
    fingerprint: Option<Fingerprint>,
    racy: bool,
    last_error: Option<String>,
}

/// What a reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Nothing changed on disk.
    Unchanged,
    /// A new policy is in force, with this many rules.
    Loaded(usize),
    /// The files are broken; the previous policy stays (the error text).
    KeptPrevious(String),
}

fn fingerprint(paths: &PolicyPaths, inputs: &[PathBuf]) -> Fingerprint {
    let mut fp: Fingerprint = Vec::with_capacity(inputs.len() + paths.policy_dirs.len() + 1);
    for p in paths
        .policy_dirs
        .iter()
        .chain(std::iter::once(&paths.legacy_dir))
        .chain(inputs)
    {
        fp.push((p.clone(), file_stamp(p)));
    }
    fp
}

fn is_racy(fp: &Fingerprint, loaded_at: SystemTime) -> bool {
    fp.iter().any(|(_, stamp)| {
        stamp.is_some_and(|(_, _, mtime)| mtime + Duration::from_secs(2) > loaded_at)
    })
}

impl PolicyStore {
    /// An empty (deny-all) store; call [`PolicyStore::reload`] to load.
    pub fn new(paths: PolicyPaths) -> Self {
        PolicyStore {
            paths,
            current: RwLock::new(Arc::new(Policy::default())),
            state: std::sync::Mutex::new(WatchState::default()),
        }
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        let guard = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&guard)
    }

    /// Reload if anything changed (or always, with `force`).
    pub fn reload(&self, force: bool) -> ReloadOutcome {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let policy = self.current();
        let mut now_fp = fingerprint(&self.paths, policy.inputs());
        let changed = state.fingerprint.as_ref() != Some(&now_fp);
        if !(force || changed || state.racy || state.last_error.is_some()) {
            return ReloadOutcome::Unchanged;
        }
        if changed && !force {
            // Let a writer finish: wait until two looks 50 ms apart agree
            // (at most 1 s), so a file being rewritten in place is not read
            // half-way (an emptied file would silently drop its denies).
            for _ in 0..20 {
                std::thread::sleep(SETTLE);
                let again = fingerprint(&self.paths, policy.inputs());
                if again == now_fp {
                    break;
                }
                now_fp = again;
            }
        }
        let started = SystemTime::now();
        match Policy::load(&self.paths) {
            Ok(new) => {
                let fp = fingerprint(&self.paths, new.inputs());
                let count = new.rules().len();
                let same = !force
                    && state.last_error.is_none()
                    && state.fingerprint.as_ref() == Some(&fp)
                    && new.rules() == policy.rules();
                state.racy = is_racy(&fp, started);
                state.fingerprint = Some(fp);
                if state.last_error.take().is_some() {
                    log::info!("policy is valid again");
                }
                let mut guard = self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *guard = Arc::new(new);
                if same {
                    ReloadOutcome::Unchanged
                } else {
                    log::info!("loaded policy: {count} rules");
                    ReloadOutcome::Loaded(count)
                }
            }
            Err(err) => {
                let text = err.to_string();
                if state.last_error.as_deref() != Some(&text) {
                    log::error!(
                        "error loading policy: {text}; keeping the previous policy ({} rules)",
                        policy.rules().len()
                    );
                }
                state.last_error = Some(text.clone());
                state.fingerprint = Some(now_fp);
                ReloadOutcome::KeptPrevious(text)
            }
        }
    }
}

/// Answer one connection.
pub fn handle_connection(
    mut stream: UnixStream,
    store: &PolicyStore,
    system_info: &dyn SystemInfoSource,
    confirm: &dyn Confirm,
    read_timeout: Duration,
) {
    let _ = stream.set_read_timeout(Some(read_timeout));
    let _ = stream.set_write_timeout(Some(read_timeout));
    let mut buffer: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(end) = request_end(&buffer) {
            break end;
        }
        if buffer.len() > MAX_REQUEST {
            log::error!("error parsing policy request: longer than {MAX_REQUEST} bytes");
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break buffer.len(),
            Ok(n) => buffer.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::error!("error reading policy request: {e}");
                return;
            }
        }
    };
    let query = match parse_request(buffer.get(..end).unwrap_or_default()) {
        Ok(q) => q,
        Err(e) => {
            log::error!("{}", crate::eval::printable(&e.to_string()));
            return;
        }
    };
    let decision = match system_info.system_info() {
        Ok(system) => store.current().evaluate(&query, &system, confirm),
        Err(e) => {
            log::error!(
                "qrexec: {}: {} -> {}: error getting system info: {e}",
                crate::eval::printable(&query.service_and_arg),
                crate::eval::printable(&query.source),
                crate::eval::printable(&query.intended_target)
            );
            Decision::Deny {
                reason: e.to_string(),
                notify: true,
            }
        }
    };
    let reply = checked_reply(&decision);
    if let Err(e) = stream.write_all(reply.as_bytes()) {
        log::error!("error writing policy reply: {e}");
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Bind the socket (replacing a stale one) with mode 0660.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// What a listening socket serves.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Policy,
    Eval(EvalService),
}

fn serve_one(stream: UnixStream, endpoint: Endpoint, store: &PolicyStore, config: &DaemonConfig) {
    match endpoint {
        Endpoint::Policy => handle_connection(
            stream,
            store,
            config.system_info.as_ref(),
            config.confirm.as_ref(),
            config.read_timeout,
        ),
        Endpoint::Eval(kind) => {
            let _ = stream.set_read_timeout(Some(config.read_timeout));
            let _ = stream.set_write_timeout(Some(config.read_timeout));
            eval_service::serve(
                stream,
                kind,
                |query, system, confirm| store.current().evaluate(query, system, confirm),
                || match config.system_info.system_info() {
                    Ok(s) => Some(s),
                    Err(e) => {
                        log::error!("{}: error getting system info: {e}", kind.name());
                        None
                    }
                },
            );
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    endpoint: Endpoint,
    store: Arc<PolicyStore>,
    config: DaemonConfig,
    active: Arc<AtomicUsize>,
) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::error!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= config.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            log::error!(
                "more than {} policy requests at once; closing one unanswered",
                config.max_connections
            );
            continue;
        }
        let store = Arc::clone(&store);
        let config_here = config.clone();
        let active_here = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("policy-request".into())
            .spawn(move || {
                serve_one(stream, endpoint, &store, &config_here);
                active_here.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start a request thread: {e}");
        }
    }
}

/// Load the policy, start the watcher and serve forever.
pub fn run(config: DaemonConfig) -> std::io::Result<()> {
    let store = Arc::new(PolicyStore::new(config.policy_paths.clone()));
    store.reload(true);
    let listener = bind(&config.socket_path)?;
    log::info!("listening on {}", config.socket_path.display());
    let mut extra = Vec::new();
    for (socket, kind) in [
        (&config.eval_socket, EvalService::Simple),
        (&config.gui_socket, EvalService::Gui),
    ] {
        let Some((path, required)) = socket else {
            continue;
        };
        match bind(path) {
            Ok(l) => {
                log::info!("listening for {} on {}", kind.name(), path.display());
                extra.push((l, kind));
            }
            Err(e) if !required => {
                log::warn!("not serving {} on {}: {e}", kind.name(), path.display());
            }
            Err(e) => return Err(e),
        }
    }
    {
        let store = Arc::clone(&store);
        let interval = config.reload_interval;
        std::thread::Builder::new()
            .name("policy-watch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    store.reload(false);
                }
            })?;
    }
    let active = Arc::new(AtomicUsize::new(0));
    for (listener, kind) in extra {
        let store = Arc::clone(&store);
        let config = config.clone();
        let active = Arc::clone(&active);
        std::thread::Builder::new()
            .name(kind.name().into())
            .spawn(move || accept_loop(listener, Endpoint::Eval(kind), store, config, active))?;
    }
    accept_loop(listener, Endpoint::Policy, store, config, active);
    Ok(())
}
