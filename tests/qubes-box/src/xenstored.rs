//! The in-box xenstored: serves the `xsd_sockmsg` protocol
//! (`protocol::xenstore`) over UNIX sockets so that the hosted firewall and
//! the box's tools share one XenStore, as domains do on Xen.
//!
//! Supported: READ, WRITE, MKDIR, RM, DIRECTORY, WATCH/UNWATCH (with the
//! initial WATCH_EVENT and events for every later change at or below the
//! watched path), RESET_WATCHES, GET_DOMAIN_PATH, GET_PERMS/SET_PERMS
//! (permissions are not enforced: everything is `b0`), TRANSACTION_START/END
//! (accepted; requests inside apply at once). Anything else is answered with
//! an ERROR reply carrying an `xsd_errors` name, as xenstored does. Each
//! listening socket has a domain id: relative paths from its connections are
//! resolved under `/local/domain/<domid>` (the dom0 socket uses 0).
//!
//! Every connection has a reader thread and a writer thread fed through a
//! bounded queue; a client that stops reading while events pile up is
//! disconnected rather than allowed to stall the store. A malformed message
//! (payload over 4096 bytes) closes that connection, like xenstored. Nothing
//! a client sends can make the server panic.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use protocol::xenstore::{
    Decoder, ErrorCode, MESSAGE_MAX, MessageType, Repr, Request, Response, StringList,
};

use crate::store::{ConnectionId, Event, Store, absolute, domain_path};

/// Messages queued for one client before it counts as stuck.
pub const QUEUE_DEPTH: usize = 4096;

struct Client {
    queue: SyncSender<Vec<u8>>,
    stream: UnixStream,
}

/// The shared state of every listener and connection.
#[derive(Default)]
pub struct Xenstored {
    store: Mutex<Store>,
    clients: Mutex<HashMap<ConnectionId, Client>>,
    next_connection: AtomicU64,
    next_transaction: AtomicU32,
}

impl std::fmt::Debug for Xenstored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xenstored").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking thread cannot leave the store half-changed in a way that
    // matters to a test box; keep serving.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn encode(response: &Response<'_>, req_id: u32, tx_id: u32) -> Vec<u8> {
    let mut buffer = vec![0u8; MESSAGE_MAX];
    match response.emit(req_id, tx_id, &mut buffer) {
        Ok(len) => {
            buffer.truncate(len);
            buffer
        }
        Err(_) => {
            // Only a reply too big for one message can fail here.
            let error = Response::Error {
                code: ErrorCode::E2big,
            };
            let len = error.emit(req_id, tx_id, &mut buffer).unwrap_or(0);
            buffer.truncate(len);
            buffer
        }
    }
}

fn error_reply(code: ErrorCode<'_>, req_id: u32, tx_id: u32) -> Vec<u8> {
    encode(&Response::Error { code }, req_id, tx_id)
}

impl Xenstored {
    /// A server with an empty store (`/`, `/local`, `/local/domain`).
    pub fn new() -> Arc<Xenstored> {
        Arc::new(Xenstored::default())
    }

    /// Binds `path` (removing a stale socket first) and serves it in a
    /// background thread; connections on it belong to domain `domid`.
    pub fn listen(self: &Arc<Self>, path: &Path, domid: u16) -> io::Result<thread::JoinHandle<()>> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(path)?;
        let server = Arc::clone(self);
        let path: PathBuf = path.to_path_buf();
        Ok(thread::spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => server.start_connection(stream, domid),
                    Err(error) => {
                        eprintln!("xenstored {}: accept failed: {error}", path.display());
                    }
                }
            }
        }))
    }

    fn start_connection(self: &Arc<Self>, stream: UnixStream, domid: u16) {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed) + 1;
        let (queue, outgoing) = mpsc::sync_channel::<Vec<u8>>(QUEUE_DEPTH);
        let (Ok(reader), Ok(writer), Ok(control)) =
            (stream.try_clone(), stream.try_clone(), stream.try_clone())
        else {
            eprintln!("xenstored: cannot clone a connection socket; dropping it");
            return;
        };
        lock(&self.clients).insert(
            id,
            Client {
                queue,
                stream: control,
            },
        );
        thread::spawn(move || write_loop(writer, outgoing));
        let server = Arc::clone(self);
        thread::spawn(move || {
            server.read_loop(id, domid, reader);
            server.disconnect(id);
        });
    }

    fn disconnect(&self, id: ConnectionId) {
        lock(&self.store).forget(id);
        if let Some(client) = lock(&self.clients).remove(&id) {
            let _ = client.stream.shutdown(Shutdown::Both);
        }
    }

    fn read_loop(&self, id: ConnectionId, domid: u16, mut stream: UnixStream) {
        let mut decoder = Decoder::new();
        let mut buffer = [0u8; 4096];
        loop {
            let count = match stream.read(&mut buffer) {
                Ok(0) => return,
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let mut input = buffer.get(..count).unwrap_or(&[]);
            while !input.is_empty() {
                let (consumed, message) = match decoder.feed(input) {
                    Ok(fed) => fed,
                    Err(error) => {
                        eprintln!("xenstored: connection {id}: {error}; closing it");
                        return;
                    }
                };
                if let Some(packet) = message {
                    let repr = Repr::parse(&packet);
                    self.handle(id, domid, &repr);
                }
                input = input.get(consumed..).unwrap_or(&[]);
                if consumed == 0 {
                    break;
                }
            }
        }
    }

    /// Queues `bytes` for connection `id`; a full queue disconnects it.
    fn send(&self, clients: &mut HashMap<ConnectionId, Client>, id: ConnectionId, bytes: Vec<u8>) {
        let stuck = match clients.get(&id) {
            Some(client) => match client.queue.try_send(bytes) {
                Ok(()) => false,
                Err(TrySendError::Full(_)) => true,
                Err(TrySendError::Disconnected(_)) => true,
            },
            None => false,
        };
        if stuck && let Some(client) = clients.remove(&id) {
            eprintln!("xenstored: connection {id} is not reading its replies; closing it");
            let _ = client.stream.shutdown(Shutdown::Both);
        }
    }

    fn deliver(&self, clients: &mut HashMap<ConnectionId, Client>, events: Vec<Event>) {
        for event in events {
            let bytes = encode(
                &Response::WatchEvent {
                    path: &event.path,
                    token: &event.token,
                },
                0,
                0,
            );
            self.send(clients, event.connection, bytes);
        }
    }

    /// Answers one request (and fires the watches it triggers).
    fn handle(&self, id: ConnectionId, domid: u16, repr: &Repr<'_>) {
        let (req_id, tx_id) = (repr.req_id, repr.tx_id);
        let mut store = lock(&self.store);
        let mut clients = lock(&self.clients);
        let request = match Request::parse(repr.msg_type, repr.payload) {
            Ok(request) => request,
            Err(_) => {
                let reply = error_reply(ErrorCode::Einval, req_id, tx_id);
                self.send(&mut clients, id, reply);
                return;
            }
        };
        let ok = |msg_type: MessageType| encode(&Response::Ok { msg_type }, req_id, tx_id);
        let mut events = Vec::new();
        let reply = match request {
            Request::Read { path } => {
                match absolute(path, domid).and_then(|p| store.read(&p).map(<[u8]>::to_vec)) {
                    Ok(value) => encode(&Response::Read { value: &value }, req_id, tx_id),
                    Err(code) => error_reply(code, req_id, tx_id),
                }
            }
            Request::Write { path, value } => {
                match absolute(path, domid).and_then(|p| store.write(&p, value)) {
                    Ok(fired) => {
                        events = fired;
                        ok(MessageType::Write)
                    }
                    Err(code) => error_reply(code, req_id, tx_id),
                }
            }
            Request::Mkdir { path } => match absolute(path, domid).and_then(|p| store.mkdir(&p)) {
                Ok(fired) => {
                    events = fired;
                    ok(MessageType::Mkdir)
                }
                Err(code) => error_reply(code, req_id, tx_id),
            },
            Request::Rm { path } => match absolute(path, domid).and_then(|p| store.remove(&p)) {
                Ok(fired) => {
                    events = fired;
                    ok(MessageType::Rm)
                }
                Err(code) => error_reply(code, req_id, tx_id),
            },
            Request::Directory { path } => {
                match absolute(path, domid).and_then(|p| store.directory(&p)) {
                    Ok(names) => {
                        let mut bytes = Vec::new();
                        for name in &names {
                            bytes.extend_from_slice(name.as_bytes());
                            bytes.push(0);
                        }
                        match StringList::parse(&bytes, "directory entries") {
                            Ok(names) => encode(&Response::Directory { names }, req_id, tx_id),
                            Err(_) => error_reply(ErrorCode::Eio, req_id, tx_id),
                        }
                    }
                    Err(code) => error_reply(code, req_id, tx_id),
                }
            }
            Request::Watch { path, token } => match store.watch(id, domid, path, token) {
                Ok(initial) => {
                    events.push(initial);
                    ok(MessageType::Watch)
                }
                Err(code) => error_reply(code, req_id, tx_id),
            },
            Request::Unwatch { path, token } => match store.unwatch(id, path, token) {
                Ok(()) => ok(MessageType::Unwatch),
                Err(code) => error_reply(code, req_id, tx_id),
            },
            Request::ResetWatches => {
                store.forget(id);
                ok(MessageType::ResetWatches)
            }
            Request::TransactionStart => {
                let tx = self.next_transaction.fetch_add(1, Ordering::Relaxed) + 1;
                encode(&Response::TransactionStart { tx_id: tx }, req_id, tx_id)
            }
            Request::TransactionEnd { .. } => ok(MessageType::TransactionEnd),
            Request::GetDomainPath { domid } => {
                let path = domain_path(domid);
                encode(&Response::GetDomainPath { path: &path }, req_id, tx_id)
            }
            Request::GetPerms { path } => {
                match absolute(path, domid).and_then(|p| store.read(&p).map(|_| ())) {
                    Ok(()) => match StringList::parse(b"b0\0", "permissions") {
                        Ok(perms) => encode(&Response::GetPerms { perms }, req_id, tx_id),
                        Err(_) => error_reply(ErrorCode::Eio, req_id, tx_id),
                    },
                    Err(code) => error_reply(code, req_id, tx_id),
                }
            }
            Request::SetPerms { path, .. } => {
                match absolute(path, domid).and_then(|p| store.read(&p).map(|_| ())) {
                    Ok(()) => ok(MessageType::SetPerms),
                    Err(code) => error_reply(code, req_id, tx_id),
                }
            }
            Request::IsDomainIntroduced { .. } => encode(
                &Response::IsDomainIntroduced { introduced: true },
                req_id,
                tx_id,
            ),
            Request::Control { .. }
            | Request::DirectoryPart { .. }
            | Request::Introduce { .. }
            | Request::Release { .. }
            | Request::Resume { .. }
            | Request::SetTarget { .. } => error_reply(ErrorCode::Enosys, req_id, tx_id),
            Request::Unknown { .. } => error_reply(ErrorCode::Einval, req_id, tx_id),
        };
        drop(store);
        // The reply first, then the events (the requester's initial watch
        // event included), all in the store's order.
        self.send(&mut clients, id, reply);
        self.deliver(&mut clients, events);
    }
}

fn write_loop(mut stream: UnixStream, outgoing: Receiver<Vec<u8>>) {
    for bytes in outgoing {
        if stream.write_all(&bytes).is_err() {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}
