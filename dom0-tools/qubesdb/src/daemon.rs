//! dom0's `qubesdb-daemon` for one VM: it holds the VM's QubesDB, serves the
//! local tools on `/var/run/qubes/qubesdb.<name>.sock`, and keeps the VM in
//! sync over vchan port 111.
//!
//! Facts (qubes-core-qubesdb `daemon/db-daemon.c`, `daemon/db-cmds.c`):
//! - dom0's daemon is the vchan **server** (`libvchan_server_init(domid,
//!   111, 4096, 4096)`); the VM's daemon (or the firewall) connects as client
//!   and first sends MULTIREAD of the empty path. dom0 answers with every
//!   entry (descending order) as RESP_MULTIREAD and an empty-path,
//!   zero-length RESP_MULTIREAD as the end. Only then is the VM "connected":
//!   from then on every WRITE/RM a local tool makes is forwarded to the VM
//!   (the header, and the value for WRITE) before the tool gets RESP_OK. A
//!   second MULTIREAD on the same connection is refused. When the VM's link
//!   drops, dom0 offers the vchan again and waits for a new MULTIREAD.
//! - On vchan the VM may send MULTIREAD, WRITE, RM, RESP_OK, RESP_ERROR and
//!   RESP_MULTIREAD only; READ/LIST/WATCH/UNWATCH are local-socket commands.
//!   A VM WRITE is answered RESP_OK (or RESP_ERROR) on vchan and fires local
//!   watches; a VM RM of a missing entry is a desynchronisation.
//! - On the local socket a bad header or an unknown command is answered
//!   RESP_ERROR after discarding its data; replies echo the request's path.
//!
//! Where the C daemon exits on a VM protocol violation, this daemon drops
//! the VM's link, logs why, and offers the vchan again: a hostile VM can
//! break only its own QubesDB link, never the daemon or a local tool. Every
//! queue towards a peer is bounded; a peer that stops reading is
//! disconnected instead of stalling the others.
//!
//! The vchan is the qrexec crate's transport (`qrexec::vchan`: the
//! UNIX-socket layout of qubes-core-vchan-socket), the same one every
//! other dom0 program uses: offered as server, one peer per offer.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use qrexec::vchan::socket::{SocketTransport, SocketVchan};
#[cfg(feature = "xen")]
use qrexec::vchan::xen::XenTransport;
use qrexec::vchan::{Transport, Vchan};

use crate::db::{ClientId, Db, verify_data};
use crate::wire::{self, Command, HEADER_LEN, Header};

/// `QUBESDB_VCHAN_PORT`.
pub const QUBESDB_VCHAN_PORT: u32 = 111;
/// Qubes' directory for the daemon's sockets and pid files.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/qubes";
/// Messages queued towards one peer before it counts as not reading.
pub const QUEUE_DEPTH: usize = 16384;
/// Largest data part a local client may make us discard before we give up
/// on it (the C daemon discards any amount).
const MAX_DISCARD: u64 = 1 << 20;
/// How long `start` waits for the vchan to be offered.
const VCHAN_OFFER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a write to a local client may block before it is given up.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How one daemon instance is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The VM's domain id (`<remote-domid>`).
    pub domid: u16,
    /// The VM's name (`<remote-name>`); names the socket.
    pub name: String,
    /// Where `qubesdb.<name>.sock` and `.pid` live.
    pub socket_dir: PathBuf,
    /// Where vchan sockets live (`VCHAN_SOCKET_DIR`).
    pub vchan_socket_dir: PathBuf,
    /// dom0's own domain id (`VCHAN_DOMAIN`, normally 0).
    pub own_domid: u16,
}

impl Config {
    /// The local socket path: `<dir>/qubesdb.<name>.sock`
    /// (`QDB_DAEMON_PATH_PATTERN`).
    pub fn socket_path(&self) -> PathBuf {
        socket_path(&self.socket_dir, &self.name)
    }

    /// The vchan socket the VM connects to.
    pub fn vchan_path(&self) -> PathBuf {
        // Both ids are 16-bit: the transport's range check cannot fail.
        qrexec::vchan::socket::socket_path(
            &self.vchan_socket_dir,
            u32::from(self.own_domid),
            u32::from(self.domid),
            QUBESDB_VCHAN_PORT,
        )
        .unwrap_or_default()
    }

    /// The vchan transport, as dom0 (`own_domid`).
    fn transport(&self) -> SocketTransport {
        SocketTransport::new(&self.vchan_socket_dir, u32::from(self.own_domid))
    }

    /// A `xen` build serves the VM over real Xen vchan (4096-byte rings,
    /// as db-daemon.c) unless `VCHAN_SOCKET_DIR` is set, the same rule as
    /// `qrexec::vchan::from_env`.
    fn uses_xen(&self) -> bool {
        cfg!(feature = "xen") && std::env::var_os("VCHAN_SOCKET_DIR").is_none()
    }
}

/// `QDB_DAEMON_PATH_PATTERN` under `dir`.
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("qubesdb.{name}.sock"))
}

/// A peer we send to: a queue drained by its writer thread, and the link
/// (to shut it down).
struct Peer {
    queue: SyncSender<Vec<u8>>,
    link: Box<dyn Vchan>,
}

impl Peer {
    /// Starts the writer of `link`. A peer that stops reading fills its
    /// queue and is shut down (which also ends a write blocked on it);
    /// local sockets carry a write timeout as well.
    fn start(link: &dyn Vchan) -> io::Result<Peer> {
        let (queue, outgoing) = mpsc::sync_channel(QUEUE_DEPTH);
        let writer = link.try_clone()?;
        thread::spawn(move || write_loop(writer, outgoing));
        Ok(Peer {
            queue,
            link: link.try_clone()?,
        })
    }

    /// Queues bytes; `false` if the peer is not keeping up (or gone).
    fn send(&self, bytes: Vec<u8>) -> bool {
        match self.queue.try_send(bytes) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    fn shut(&self) {
        let _ = self.link.shutdown();
    }
}

/// Sends everything queued, in order; when the queue's sender is dropped
/// (the peer's link is being closed) it flushes what is left, then closes
/// the socket so the peer sees the end.
fn write_loop(mut link: Box<dyn Vchan>, outgoing: Receiver<Vec<u8>>) {
    for bytes in outgoing {
        if link.write_all(&bytes).is_err() {
            break;
        }
    }
    let _ = link.shutdown();
}

#[derive(Default)]
struct State {
    db: Db,
    clients: HashMap<ClientId, Peer>,
    vm: Option<Peer>,
    /// The VM finished its MULTIREAD (C `remote_connected`).
    vm_synced: bool,
}

impl State {
    fn send_client(&mut self, client: ClientId, bytes: Vec<u8>) {
        let stuck = self
            .clients
            .get(&client)
            .is_some_and(|peer| !peer.send(bytes));
        if stuck && let Some(peer) = self.clients.remove(&client) {
            eprintln!("client {client} is not reading its replies; disconnecting it");
            peer.shut();
        }
    }

    fn send_vm(&mut self, bytes: Vec<u8>) {
        let stuck = self.vm.as_ref().is_some_and(|vm| !vm.send(bytes));
        if stuck && let Some(vm) = self.vm.take() {
            eprintln!("the VM is not reading its QubesDB link; dropping the link");
            self.vm_synced = false;
            vm.shut();
        }
    }

    /// RESP_WATCH to every matching watch (db-core.c `qubesdb_fire_watches`).
    fn fire_watches(&mut self, path: &str) {
        for client in self.db.watchers(path) {
            let event = wire::encode(Command::RespWatch, path, &[]);
            self.send_client(client, event);
        }
    }
}

/// The daemon: shared by the local-socket threads and the vchan thread.
pub struct Daemon {
    config: Config,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// A Xen vchan server was offered (xenstore written): `start`'s ready
    /// point on Xen, where no socket path appears.
    xen_offered: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why the daemon could not start.
#[derive(Debug)]
pub struct StartError {
    /// What we were doing.
    pub what: String,
    /// The OS error.
    pub error: io::Error,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.error)
    }
}

impl std::error::Error for StartError {}

/// What reading a message off a link found.
enum Incoming {
    Message(Header, Vec<u8>),
    Closed,
}

fn read_header(stream: &mut dyn Read) -> io::Result<Option<[u8; HEADER_LEN]>> {
    let mut raw = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let buffer = raw.get_mut(filled..).unwrap_or(&mut []);
        match stream.read(buffer) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a header",
                ));
            }
            Ok(count) => filled += count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(Some(raw))
}

fn read_data(stream: &mut dyn Read, len: usize) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; len];
    stream.read_exact(&mut data)?;
    Ok(data)
}

fn discard(stream: &mut dyn Read, len: u64) -> io::Result<()> {
    if len > MAX_DISCARD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("refusing to discard {len} bytes of data"),
        ));
    }
    let copied = io::copy(&mut stream.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside data",
        ));
    }
    Ok(())
}

impl Daemon {
    /// A daemon with an empty database.
    pub fn new(config: Config) -> Arc<Daemon> {
        Arc::new(Daemon {
            config,
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(1),
            xen_offered: Arc::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Number of entries (for tests and status).
    pub fn entry_count(&self) -> usize {
        self.lock().db.len()
    }

    /// Is the VM connected and synchronised?
    pub fn vm_synced(&self) -> bool {
        self.lock().vm_synced
    }

    /// Binds the local socket (unlinking a stale one) and starts serving
    /// local clients and, for a VM other than dom0, the vchan. Returns once
    /// both are listening (the C daemon's "ready" point).
    pub fn start(self: &Arc<Self>) -> Result<(), StartError> {
        let socket = self.config.socket_path();
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(|error| StartError {
            what: format!("cannot listen on {}", socket.display()),
            error,
        })?;
        if self.config.domid == 0 {
            // db-daemon.c: "the same daemon as both VM and Admin parts":
            // dom0's own database is also the local one, and no vchan.
            let local = self.config.socket_dir.join("qubesdb.sock");
            let _ = std::fs::remove_file(&local);
            std::os::unix::fs::symlink(&socket, &local).map_err(|error| StartError {
                what: format!("symlink {}", local.display()),
                error,
            })?;
        } else {
            // The transport offers the vchan inside the serving thread;
            // wait (bounded) until it is offered, or for why it is not.
            // A VM can connect the moment the socket exists, and the
            // socket transport removes the path once it accepts: the
            // serving thread's first outcome (linked or failed) counts
            // as well as the path itself.
            let (offered, outcome) = mpsc::sync_channel(1);
            let daemon = Arc::clone(self);
            thread::spawn(move || daemon.serve_vm(offered));
            let path = self.config.vchan_path();
            let start = std::time::Instant::now();
            let offered = || {
                if self.config.uses_xen() {
                    self.xen_offered.load(Ordering::SeqCst)
                } else {
                    path.exists()
                }
            };
            while !offered() {
                let what = || format!("cannot offer vchan {}", path.display());
                match outcome.try_recv() {
                    Ok(Ok(())) => break,
                    Ok(Err(error)) => {
                        return Err(StartError {
                            what: what(),
                            error,
                        });
                    }
                    Err(_) => {}
                }
                if start.elapsed() > VCHAN_OFFER_TIMEOUT {
                    return Err(StartError {
                        what: what(),
                        error: io::Error::new(io::ErrorKind::TimedOut, "not offered within 5 s"),
                    });
                }
                thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        let daemon = Arc::clone(self);
        thread::spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => daemon.start_client(stream),
                    Err(error) => eprintln!("unix accept: {error}"),
                }
            }
        });
        Ok(())
    }

    fn start_client(self: &Arc<Self>, stream: UnixStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A client that stops reading cannot hold a writer thread forever
        // (the timeout is the socket's, shared by its clones).
        if let Err(error) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
            eprintln!("ERROR: cannot set up client: {error}");
            return;
        }
        let link = SocketVchan::new(stream);
        let peer = match Peer::start(&link) {
            Ok(peer) => peer,
            Err(error) => {
                eprintln!("ERROR: cannot set up client: {error}");
                return;
            }
        };
        self.lock().clients.insert(id, peer);
        let daemon = Arc::clone(self);
        thread::spawn(move || {
            let mut link = link;
            if let Err(error) = daemon.client_loop(id, &mut link) {
                eprintln!("client {id}: {error}; disconnecting");
            }
            let mut state = daemon.lock();
            state.db.forget_client(id);
            // Dropping the queue lets the writer flush the last replies
            // (e.g. RESP_ERROR) and then close the socket.
            state.clients.remove(&id);
        });
    }

    fn next_message(stream: &mut dyn Read, vchan: bool) -> io::Result<Result<Incoming, Header>> {
        let Some(raw) = read_header(stream)? else {
            return Ok(Ok(Incoming::Closed));
        };
        let header = Header::parse(&raw);
        if !header.verify(vchan) {
            return Ok(Err(header));
        }
        // `verify` bounded data_len below QDB_MAX_DATA.
        let data = match header.command {
            Command::Write | Command::RespMultiread => read_data(stream, header.data_len as usize)?,
            _ => Vec::new(),
        };
        Ok(Ok(Incoming::Message(header, data)))
    }

    /// One local client: db-cmds.c `handle_client_data`.
    fn client_loop(&self, id: ClientId, stream: &mut dyn Read) -> io::Result<()> {
        loop {
            let (header, data) = match Self::next_message(stream, false)? {
                Ok(Incoming::Closed) => return Ok(()),
                Ok(Incoming::Message(header, data)) => (header, data),
                Err(bad) => {
                    eprintln!("invalid message received from client {id}");
                    discard(stream, u64::from(bad.data_len))?;
                    self.lock()
                        .send_client(id, bad.reply(Command::RespError, &[]));
                    continue;
                }
            };
            let path = header.path_str();
            let mut state = self.lock();
            match header.command {
                Command::Read => {
                    if header.data_len > 0 {
                        return Err(io::Error::other("CMD_READ shouldn't have data field"));
                    }
                    let reply = match state.db.read(&path) {
                        Some(value) => header.reply(Command::RespRead, value),
                        None => header.reply(Command::RespErrorNoent, &[]),
                    };
                    state.send_client(id, reply);
                }
                Command::Write => {
                    if !verify_data(&data) {
                        eprintln!("invalid data received from client {id}");
                        state.send_client(id, header.reply(Command::RespError, &[]));
                        continue;
                    }
                    if state.db.write(&path, &data).is_err() {
                        eprintln!("failed to write path {path}");
                        state.send_client(id, header.reply(Command::RespError, &[]));
                        return Err(io::Error::other("write refused"));
                    }
                    if state.vm_synced {
                        state.send_vm(wire::encode(Command::Write, &path, &data));
                    }
                    state.send_client(id, header.reply(Command::RespOk, &[]));
                    state.fire_watches(&path);
                }
                Command::Multiread | Command::List => {
                    if header.data_len > 0 {
                        drop(state);
                        discard(stream, u64::from(header.data_len))?;
                        self.lock()
                            .send_client(id, header.reply(Command::RespError, &[]));
                        continue;
                    }
                    let messages = if header.command == Command::Multiread {
                        multiread_reply(&state.db, &path)
                    } else {
                        let mut out: Vec<u8> = Vec::new();
                        for entry in state.db.list(&path) {
                            out.extend(wire::encode(Command::RespList, &entry, &[]));
                        }
                        out.extend(wire::encode(Command::RespList, "", &[]));
                        out
                    };
                    state.send_client(id, messages);
                }
                Command::Rm => {
                    if header.data_len > 0 {
                        drop(state);
                        discard(stream, u64::from(header.data_len))?;
                        self.lock()
                            .send_client(id, header.reply(Command::RespError, &[]));
                        continue;
                    }
                    if !state.db.remove(&path) {
                        state.send_client(id, header.reply(Command::RespErrorNoent, &[]));
                    } else {
                        if state.vm_synced {
                            state.send_vm(wire::encode(Command::Rm, &path, &[]));
                        }
                        state.send_client(id, header.reply(Command::RespOk, &[]));
                        state.fire_watches(&path);
                    }
                }
                Command::Watch | Command::Unwatch => {
                    if header.data_len > 0 {
                        drop(state);
                        discard(stream, u64::from(header.data_len))?;
                        state = self.lock();
                    }
                    let reply = if header.command == Command::Watch {
                        if state.db.add_watch(id, &path) {
                            Command::RespOk
                        } else {
                            Command::RespError
                        }
                    } else if state.db.remove_watch(id, &path) {
                        Command::RespOk
                    } else {
                        Command::RespErrorNoent
                    };
                    state.send_client(id, header.reply(reply, &[]));
                }
                _ => {
                    // verify() admits nothing else on the local socket.
                    state.send_client(id, header.reply(Command::RespError, &[]));
                }
            }
        }
    }

    /// The real-Xen transport, raising `xen_offered` at each offer.
    #[cfg(feature = "xen")]
    fn xen_transport(&self) -> Box<dyn Transport> {
        let offered = Arc::clone(&self.xen_offered);
        Box::new(
            XenTransport::new(self.config.own_domid)
                .with_ring_sizes(4096, 4096)
                .with_offer_hook(Arc::new(move |_, _| offered.store(true, Ordering::SeqCst))),
        )
    }

    /// Without the `xen` feature `uses_xen` is always false.
    #[cfg(not(feature = "xen"))]
    fn xen_transport(&self) -> Box<dyn Transport> {
        Box::new(self.config.transport())
    }

    /// Offers the vchan forever: one VM connection at a time. The first
    /// offer's outcome (a VM linked, or why it could not be offered) is
    /// reported on `offered` (for `start`).
    fn serve_vm(self: &Arc<Self>, offered: SyncSender<io::Result<()>>) {
        let transport: Box<dyn Transport> = if self.config.uses_xen() {
            self.xen_transport()
        } else {
            Box::new(self.config.transport())
        };
        let mut first = Some(offered);
        loop {
            let mut link =
                match transport.server(u32::from(self.config.domid), QUBESDB_VCHAN_PORT, None) {
                    Ok(link) => link,
                    Err(error) => {
                        eprintln!("vchan accept failed: {error}; giving up on the VM link");
                        if let Some(offered) = first.take() {
                            let _ = offered.try_send(Err(error));
                        }
                        return;
                    }
                };
            if let Some(offered) = first.take() {
                let _ = offered.try_send(Ok(()));
            }
            let peer = match Peer::start(link.as_ref()) {
                Ok(peer) => peer,
                Err(error) => {
                    eprintln!("vchan: cannot set up the link: {error}");
                    continue;
                }
            };
            {
                let mut state = self.lock();
                state.vm = Some(peer);
                state.vm_synced = false;
            }
            match self.vm_loop(&mut link) {
                Ok(()) => eprintln!("vchan closed"),
                Err(reason) => eprintln!("vchan: {reason}; dropping the VM link"),
            }
            {
                let mut state = self.lock();
                // The writer flushes the last reply (e.g. RESP_ERROR_NOENT),
                // then closes the link.
                state.vm = None;
                state.vm_synced = false;
            }
            drop(link);
            eprintln!("reconnecting");
        }
    }

    /// The VM's side of the link: db-cmds.c `handle_vchan_data`.
    fn vm_loop(&self, stream: &mut dyn Read) -> Result<(), String> {
        loop {
            let (header, data) = match Self::next_message(stream, true) {
                Err(error) => return Err(format!("read failed: {error}")),
                Ok(Ok(Incoming::Closed)) => return Ok(()),
                Ok(Ok(Incoming::Message(header, data))) => (header, data),
                Ok(Err(bad)) => {
                    return Err(format!(
                        "invalid message received from peer (type {}, data_len {})",
                        bad.raw_type, bad.data_len
                    ));
                }
            };
            let path = header.path_str();
            let mut state = self.lock();
            match header.command {
                Command::Write => {
                    if !verify_data(&data) {
                        eprintln!("invalid data received from peer");
                        state.send_vm(header.reply(Command::RespError, &[]));
                        continue;
                    }
                    if state.db.write(&path, &data).is_err() {
                        state.send_vm(header.reply(Command::RespError, &[]));
                        return Err(format!("failed to write path {path}"));
                    }
                    state.send_vm(header.reply(Command::RespOk, &[]));
                    state.fire_watches(&path);
                }
                Command::Multiread => {
                    if state.vm_synced {
                        state.send_vm(header.reply(Command::RespError, &[]));
                        return Err(
                            "received spurious QDB_CMD_MULTIREAD on vchan: only one after connection allowed"
                                .into(),
                        );
                    }
                    if header.data_len > 0 {
                        drop(state);
                        discard(stream, u64::from(header.data_len)).map_err(|e| e.to_string())?;
                        self.lock().send_vm(header.reply(Command::RespError, &[]));
                        continue;
                    }
                    let reply = multiread_reply(&state.db, &path);
                    state.send_vm(reply);
                    state.vm_synced = true;
                }
                Command::Rm => {
                    if header.data_len > 0 {
                        drop(state);
                        discard(stream, u64::from(header.data_len)).map_err(|e| e.to_string())?;
                        self.lock().send_vm(header.reply(Command::RespError, &[]));
                        continue;
                    }
                    if !state.db.remove(&path) {
                        state.send_vm(header.reply(Command::RespErrorNoent, &[]));
                        return Err(format!(
                            "VM removed missing entry {path}: databases out of sync"
                        ));
                    }
                    state.send_vm(header.reply(Command::RespOk, &[]));
                    state.fire_watches(&path);
                }
                Command::RespOk => {
                    if header.data_len > 0 {
                        drop(state);
                        discard(stream, u64::from(header.data_len)).map_err(|e| e.to_string())?;
                    }
                }
                Command::RespError => {
                    eprintln!("received error from peer");
                    if header.data_len > 0 {
                        return Err("FATAL: error packet contains some unexpected data".into());
                    }
                }
                Command::RespMultiread => {
                    return Err("spurious MULTIREAD response".into());
                }
                _ => {
                    return Err(format!("unexpected command from peer: {}", header.raw_type));
                }
            }
        }
    }
}

/// RESP_MULTIREAD per matching entry, then the empty-path terminator.
fn multiread_reply(db: &Db, prefix: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, value) in db.multiread(prefix) {
        out.extend(wire::encode(Command::RespMultiread, &path, &value));
    }
    out.extend(wire::encode(Command::RespMultiread, "", &[]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vchan_path_is_the_vchan_socket_convention() {
        let config = Config {
            domid: 12,
            name: "work".into(),
            socket_dir: PathBuf::from("/run/q"),
            vchan_socket_dir: PathBuf::from("/run/v"),
            own_domid: 0,
        };
        assert_eq!(
            config.vchan_path(),
            PathBuf::from("/run/v/vchan.0.12.111.sock")
        );
        assert_eq!(
            config.socket_path(),
            PathBuf::from("/run/q/qubesdb.work.sock")
        );
    }
}
