//! The portable xenstore client: `xsd_sockmsg` requests over any
//! [`ByteStream`] (the xenstore ring on Xen, xenstored's UNIX socket hosted),
//! implementing the [`Xenstore`] trait: read, write, rm, directory,
//! set-permissions, watch/unwatch with queued WATCH_EVENTs, and transactions.
//!
//! Messages are built and parsed only with `protocol::xenstore` (one wire
//! format, one place). Requests complete before they return: while waiting
//! for the reply the client calls its [`LinkWait`] (on Xen: poll the store
//! event channel), a bounded number of times. Watch events that arrive in
//! between are queued (bounded; excess is counted and dropped, the caller
//! re-reads state anyway). A reply that breaks the protocol (wrong request
//! id, wrong type, bad payload, oversized header) poisons the client: the
//! byte stream has lost its framing, and every later request fails with
//! `BadReply` rather than misreading a stray reply. This module must never
//! panic on anything xenstored sends and never uses `unsafe`.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use protocol::xenstore::{
    Decoder, ErrorCode, MESSAGE_MAX, MessageType, Request, Response, StringList,
};

use crate::platform::{ByteStream, StreamError, WatchEvent, Xenstore, XenstoreError};

/// How the client waits for more bytes from xenstored.
pub trait LinkWait {
    /// Blocks until the link may have new bytes, or a short while passes.
    fn wait(&mut self);
}

/// For links that never need waiting (in-memory doubles answer at once).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoWait;

impl LinkWait for NoWait {
    fn wait(&mut self) {}
}

/// Most watch events held between two `poll_watch` calls.
pub const MAX_QUEUED_EVENTS: usize = 256;
/// Default number of waits before a request is given up.
pub const DEFAULT_MAX_WAITS: u32 = 2000;

/// A xenstore client over a byte stream.
#[derive(Debug)]
pub struct XenstoreClient<S, W> {
    stream: S,
    waiter: W,
    decoder: Decoder,
    next_req_id: u32,
    tx_id: u32,
    events: VecDeque<WatchEvent>,
    dropped_events: u64,
    max_waits: u32,
    broken: Option<&'static str>,
}

/// A successful reply: its type and payload.
struct Reply {
    msg_type: MessageType,
    payload: Vec<u8>,
}

fn daemon_error(code: ErrorCode<'_>) -> XenstoreError {
    XenstoreError::Daemon(code.name().to_string())
}

impl<S: ByteStream, W: LinkWait> XenstoreClient<S, W> {
    /// A client on `stream`, waiting with `waiter`.
    pub fn new(stream: S, waiter: W) -> Self {
        XenstoreClient {
            stream,
            waiter,
            decoder: Decoder::new(),
            next_req_id: 1,
            tx_id: 0,
            events: VecDeque::new(),
            dropped_events: 0,
            max_waits: DEFAULT_MAX_WAITS,
            broken: None,
        }
    }

    /// Sets how many times a request may wait before it fails.
    pub fn set_max_waits(&mut self, max_waits: u32) {
        self.max_waits = max_waits;
    }

    /// Watch events dropped because the queue was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// The underlying stream.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The waiter.
    pub fn waiter_mut(&mut self) -> &mut W {
        &mut self.waiter
    }

    fn poison(&mut self, what: &'static str) -> XenstoreError {
        self.broken = Some(what);
        XenstoreError::BadReply(what)
    }

    /// Sends `request` (in the current transaction) and returns the reply.
    fn call(&mut self, request: Request<'_>) -> Result<Reply, XenstoreError> {
        if let Some(what) = self.broken {
            return Err(XenstoreError::BadReply(what));
        }
        let req_id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1).max(1);
        let mut message = vec![0u8; MESSAGE_MAX];
        let len = request
            .emit(req_id, self.tx_id, &mut message)
            .map_err(|_| {
                XenstoreError::Stream(StreamError::Platform("request too long for xenstore"))
            })?;
        self.send_all(message.get(..len).unwrap_or_default())?;
        self.receive(req_id, request.msg_type())
    }

    fn send_all(&mut self, mut bytes: &[u8]) -> Result<(), XenstoreError> {
        let mut waits = 0;
        while !bytes.is_empty() {
            let n = self.stream.write(bytes).map_err(XenstoreError::Stream)?;
            if n == 0 {
                if waits >= self.max_waits {
                    return Err(XenstoreError::Stream(StreamError::Platform(
                        "xenstored does not take requests",
                    )));
                }
                waits += 1;
                self.waiter.wait();
                continue;
            }
            bytes = bytes.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    /// Reads messages until the reply to `req_id` arrives, queueing watch
    /// events on the way.
    fn receive(&mut self, req_id: u32, msg_type: MessageType) -> Result<Reply, XenstoreError> {
        let mut waits = 0;
        loop {
            if let Some(reply) = self.pump(Some((req_id, msg_type)))? {
                return Ok(reply);
            }
            if waits >= self.max_waits {
                // The reply may still come: the framing is unknown from here.
                return Err(self.poison("no reply from xenstored in time"));
            }
            waits += 1;
            self.waiter.wait();
        }
    }

    /// Reads what the stream has now. Queues watch events; returns the reply
    /// to `expect` once it is complete.
    fn pump(&mut self, expect: Option<(u32, MessageType)>) -> Result<Option<Reply>, XenstoreError> {
        let mut buf = [0u8; 512];
        loop {
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(error) => return Err(XenstoreError::Stream(error)),
            };
            let mut input = buf.get(..n).unwrap_or_default();
            let mut reply = None;
            while !input.is_empty() {
                let (used, packet) = match self.decoder.feed(input) {
                    Ok(fed) => fed,
                    Err(_) => return Err(self.poison("malformed xsd_sockmsg header")),
                };
                input = input.get(used..).unwrap_or_default();
                let Some(packet) = packet else { continue };
                let msg_type = packet.msg_type();
                let packet_req_id = packet.req_id();
                let payload = packet.payload().to_vec();
                match Response::parse(msg_type, &payload) {
                    Ok(Response::WatchEvent { path, token }) => {
                        if self.events.len() >= MAX_QUEUED_EVENTS {
                            self.dropped_events += 1;
                        } else {
                            self.events.push_back(WatchEvent {
                                path: path.to_string(),
                                token: token.to_string(),
                            });
                        }
                    }
                    Ok(_) if reply.is_some() => {
                        return Err(self.poison("two replies to one request"));
                    }
                    Ok(parsed) => {
                        let Some((req_id, want)) = expect else {
                            return Err(self.poison("reply without a request"));
                        };
                        if packet_req_id != req_id {
                            return Err(self.poison("reply to another request id"));
                        }
                        if !matches!(parsed, Response::Error { .. }) && msg_type != want {
                            return Err(self.poison("reply of another type than the request"));
                        }
                        reply = Some(Reply { msg_type, payload });
                    }
                    Err(_) => return Err(self.poison("reply payload does not parse")),
                }
            }
            if reply.is_some() {
                return Ok(reply);
            }
        }
    }

    /// Reads new bytes without blocking and queues any watch events.
    pub fn poll(&mut self) -> Result<(), XenstoreError> {
        if let Some(what) = self.broken {
            return Err(XenstoreError::BadReply(what));
        }
        self.pump(None).map(|_| ())
    }

    fn expect_ok(&mut self, request: Request<'_>) -> Result<(), XenstoreError> {
        let reply = self.call(request)?;
        match Response::parse(reply.msg_type, &reply.payload) {
            Ok(Response::Error { code }) => Err(daemon_error(code)),
            Ok(_) => Ok(()),
            Err(_) => Err(self.poison("reply payload does not parse")),
        }
    }

    /// Sets a node's permissions, e.g. `["n5", "r0"]` (owner 5, nobody else,
    /// dom0 may read): the first entry names the owner and the default.
    pub fn set_permissions(&mut self, path: &str, perms: &[&str]) -> Result<(), XenstoreError> {
        let mut text = Vec::new();
        for perm in perms {
            text.extend_from_slice(perm.as_bytes());
            text.push(0);
        }
        let perms = StringList::parse(&text, "permissions")
            .map_err(|_| XenstoreError::Stream(StreamError::Platform("bad permission string")))?;
        self.expect_ok(Request::SetPerms { path, perms })
    }

    /// Starts a transaction: every request until [`Self::transaction_end`]
    /// runs in it.
    pub fn transaction_start(&mut self) -> Result<(), XenstoreError> {
        if self.tx_id != 0 {
            return Err(XenstoreError::Stream(StreamError::Platform(
                "a transaction is already open",
            )));
        }
        let reply = self.call(Request::TransactionStart)?;
        match Response::parse(reply.msg_type, &reply.payload) {
            Ok(Response::TransactionStart { tx_id }) if tx_id != 0 => {
                self.tx_id = tx_id;
                Ok(())
            }
            Ok(Response::Error { code }) => Err(daemon_error(code)),
            _ => Err(self.poison("bad TRANSACTION_START reply")),
        }
    }

    /// Ends the open transaction. `Ok(false)` means xenstored answered
    /// `EAGAIN` on commit: nothing was written, run it again.
    pub fn transaction_end(&mut self, commit: bool) -> Result<bool, XenstoreError> {
        let result = self.expect_ok(Request::TransactionEnd { commit });
        self.tx_id = 0;
        match result {
            Ok(()) => Ok(true),
            Err(XenstoreError::Daemon(code)) if code == "EAGAIN" => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Runs `body` in a transaction, retrying (at most `attempts` times)
    /// when the commit meets a conflict.
    pub fn transaction<T>(
        &mut self,
        attempts: u32,
        mut body: impl FnMut(&mut Self) -> Result<T, XenstoreError>,
    ) -> Result<T, XenstoreError> {
        for _ in 0..attempts {
            self.transaction_start()?;
            let value = match body(self) {
                Ok(value) => value,
                Err(error) => {
                    let _ = self.transaction_end(false);
                    return Err(error);
                }
            };
            if self.transaction_end(true)? {
                return Ok(value);
            }
        }
        Err(XenstoreError::Daemon("EAGAIN".to_string()))
    }
}

impl<S: ByteStream, W: LinkWait> Xenstore for XenstoreClient<S, W> {
    fn read(&mut self, path: &str) -> Result<Option<String>, XenstoreError> {
        let reply = self.call(Request::Read { path })?;
        match Response::parse(reply.msg_type, &reply.payload) {
            Ok(Response::Read { value }) => match core::str::from_utf8(value) {
                Ok(text) => Ok(Some(text.to_string())),
                Err(_) => Err(XenstoreError::BadReply("value is not UTF-8")),
            },
            Ok(Response::Error {
                code: ErrorCode::Enoent,
            }) => Ok(None),
            Ok(Response::Error { code }) => Err(daemon_error(code)),
            _ => Err(self.poison("bad READ reply")),
        }
    }

    fn write(&mut self, path: &str, value: &str) -> Result<(), XenstoreError> {
        self.expect_ok(Request::Write {
            path,
            value: value.as_bytes(),
        })
    }

    fn remove(&mut self, path: &str) -> Result<(), XenstoreError> {
        match self.expect_ok(Request::Rm { path }) {
            Err(XenstoreError::Daemon(code)) if code == "ENOENT" => Ok(()),
            other => other,
        }
    }

    fn directory(&mut self, path: &str) -> Result<Vec<String>, XenstoreError> {
        let reply = self.call(Request::Directory { path })?;
        match Response::parse(reply.msg_type, &reply.payload) {
            Ok(Response::Directory { names }) => {
                Ok(names.iter().map(ToString::to_string).collect())
            }
            Ok(Response::Error {
                code: ErrorCode::Enoent,
            }) => Ok(Vec::new()),
            Ok(Response::Error { code }) => Err(daemon_error(code)),
            _ => Err(self.poison("bad DIRECTORY reply")),
        }
    }

    fn watch(&mut self, path: &str, token: &str) -> Result<(), XenstoreError> {
        self.expect_ok(Request::Watch { path, token })
    }

    fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XenstoreError> {
        self.expect_ok(Request::Unwatch { path, token })
    }

    fn poll_watch(&mut self) -> Option<WatchEvent> {
        if self.events.is_empty() {
            // Errors surface on the next request; here there is nothing to say.
            let _ = self.poll();
        }
        self.events.pop_front()
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes buffers it built itself.
mod tests {
    use super::*;
    use crate::platform::LinkState;
    use alloc::collections::BTreeMap;
    use alloc::format;
    use protocol::xenstore::Repr;

    /// An in-memory xenstored on a byte stream: it parses each complete
    /// request with `protocol::xenstore`, applies it to a tree, and queues
    /// the reply bytes (and watch events). `chunk` limits each read to
    /// exercise reassembly; `tamper` rewrites replies to play a hostile
    /// daemon.
    #[derive(Default)]
    struct FakeXenstored {
        nodes: BTreeMap<String, String>,
        perms: BTreeMap<String, Vec<String>>,
        watches: Vec<(String, String)>,
        inbox: Vec<u8>,
        outbox: VecDeque<u8>,
        chunk: usize,
        tamper: Option<fn(&mut Vec<u8>)>,
        tx_open: bool,
        fail_commit_times: u32,
        requests: u32,
    }

    impl FakeXenstored {
        fn new() -> Self {
            FakeXenstored {
                chunk: usize::MAX,
                ..Default::default()
            }
        }

        fn emit(&mut self, response: Response<'_>, req_id: u32, tx_id: u32) {
            let mut buf = vec![0u8; MESSAGE_MAX];
            let n = response.emit(req_id, tx_id, &mut buf).unwrap();
            buf.truncate(n);
            if let Some(tamper) = self.tamper
                && !matches!(response, Response::WatchEvent { .. })
            {
                tamper(&mut buf);
            }
            self.outbox.extend(buf);
        }

        fn fire(&mut self, changed: &str) {
            let hits: Vec<(String, String)> = self
                .watches
                .iter()
                .filter(|(path, _)| changed == path || changed.starts_with(&format!("{path}/")))
                .cloned()
                .collect();
            for (_, token) in hits {
                self.emit(
                    Response::WatchEvent {
                        path: changed,
                        token: &token,
                    },
                    0,
                    0,
                );
            }
        }

        fn handle(&mut self, bytes: &[u8]) {
            self.requests += 1;
            let (repr, request) = Request::parse_message(bytes).unwrap();
            let Repr { req_id, tx_id, .. } = repr;
            let t = request.msg_type();
            match request {
                Request::Read { path } => match self.nodes.get(path).cloned() {
                    Some(v) => self.emit(
                        Response::Read {
                            value: v.as_bytes(),
                        },
                        req_id,
                        tx_id,
                    ),
                    None => self.emit(
                        Response::Error {
                            code: ErrorCode::Enoent,
                        },
                        req_id,
                        tx_id,
                    ),
                },
                Request::Write { path, value } => {
                    self.nodes
                        .insert(path.to_string(), String::from_utf8(value.to_vec()).unwrap());
                    self.emit(Response::Ok { msg_type: t }, req_id, tx_id);
                    self.fire(path);
                }
                Request::Rm { path } => {
                    let prefix = format!("{path}/");
                    let before = self.nodes.len();
                    self.nodes
                        .retain(|k, _| k != path && !k.starts_with(&prefix));
                    if before == self.nodes.len() {
                        self.emit(
                            Response::Error {
                                code: ErrorCode::Enoent,
                            },
                            req_id,
                            tx_id,
                        );
                    } else {
                        self.emit(Response::Ok { msg_type: t }, req_id, tx_id);
                        self.fire(path);
                    }
                }
                Request::Directory { path } => {
                    let prefix = format!("{path}/");
                    let mut names: Vec<String> = self
                        .nodes
                        .keys()
                        .filter_map(|k| k.strip_prefix(&prefix))
                        .map(|rest| rest.split('/').next().unwrap().to_string())
                        .collect();
                    names.dedup();
                    if names.is_empty() {
                        self.emit(
                            Response::Error {
                                code: ErrorCode::Enoent,
                            },
                            req_id,
                            tx_id,
                        );
                    } else {
                        let mut text = Vec::new();
                        for n in &names {
                            text.extend_from_slice(n.as_bytes());
                            text.push(0);
                        }
                        let list = StringList::parse(&text, "names").unwrap();
                        self.emit(Response::Directory { names: list }, req_id, tx_id);
                    }
                }
                Request::SetPerms { path, perms } => {
                    self.perms.insert(
                        path.to_string(),
                        perms.iter().map(ToString::to_string).collect(),
                    );
                    self.emit(Response::Ok { msg_type: t }, req_id, tx_id);
                }
                Request::Watch { path, token } => {
                    self.watches.push((path.to_string(), token.to_string()));
                    self.emit(Response::Ok { msg_type: t }, req_id, tx_id);
                    let (p, tk) = (path.to_string(), token.to_string());
                    self.emit(
                        Response::WatchEvent {
                            path: &p,
                            token: &tk,
                        },
                        0,
                        0,
                    );
                }
                Request::Unwatch { path, token } => {
                    self.watches.retain(|(p, tk)| !(p == path && tk == token));
                    self.emit(Response::Ok { msg_type: t }, req_id, tx_id);
                }
                Request::TransactionStart => {
                    self.tx_open = true;
                    self.emit(Response::TransactionStart { tx_id: 42 }, req_id, 0);
                }
                Request::TransactionEnd { commit } => {
                    assert_eq!(tx_id, 42);
                    self.tx_open = false;
                    if commit && self.fail_commit_times > 0 {
                        self.fail_commit_times -= 1;
                        self.emit(
                            Response::Error {
                                code: ErrorCode::Eagain,
                            },
                            req_id,
                            tx_id,
                        );
                    } else {
                        self.emit(Response::Ok { msg_type: t }, req_id, tx_id);
                    }
                }
                other => panic!("unexpected request {other:?}"),
            }
        }
    }

    impl ByteStream for FakeXenstored {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
            let n = buf.len().min(self.outbox.len()).min(self.chunk);
            for slot in buf.iter_mut().take(n) {
                *slot = self.outbox.pop_front().unwrap();
            }
            Ok(n)
        }
        fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
            self.inbox.extend_from_slice(buf);
            while self.inbox.len() >= 16 {
                let len = u32::from_le_bytes(self.inbox[12..16].try_into().unwrap()) as usize;
                if self.inbox.len() < 16 + len {
                    break;
                }
                let message: Vec<u8> = self.inbox.drain(..16 + len).collect();
                self.handle(&message);
            }
            Ok(buf.len())
        }
        fn state(&self) -> LinkState {
            LinkState::Connected
        }
        fn close(&mut self) {}
    }

    fn client() -> XenstoreClient<FakeXenstored, NoWait> {
        let mut c = XenstoreClient::new(FakeXenstored::new(), NoWait);
        c.set_max_waits(3);
        c
    }

    #[test]
    fn read_write_remove_directory() {
        let mut xs = client();
        assert_eq!(xs.read("domid").unwrap(), None);
        xs.write("/local/domain/3/name", "sys-firewall").unwrap();
        xs.write("/local/domain/3/data/x", "1").unwrap();
        assert_eq!(
            xs.read("/local/domain/3/name").unwrap().as_deref(),
            Some("sys-firewall")
        );
        assert_eq!(xs.directory("/local/domain/3").unwrap(), ["data", "name"]);
        assert_eq!(xs.directory("/nowhere").unwrap(), Vec::<String>::new());
        xs.remove("/local/domain/3/data").unwrap();
        xs.remove("/local/domain/3/data").unwrap(); // ENOENT is fine for rm
        assert_eq!(xs.directory("/local/domain/3").unwrap(), ["name"]);
    }

    #[test]
    fn watches_fire_at_once_and_on_change_and_stop_after_unwatch() {
        let mut xs = client();
        xs.watch("control/shutdown", "shutdown").unwrap();
        let first = xs.poll_watch().unwrap();
        assert_eq!(
            (first.path.as_str(), first.token.as_str()),
            ("control/shutdown", "shutdown")
        );
        assert_eq!(xs.poll_watch(), None);
        // An event queued in the middle of another request's reply stream.
        xs.write("control/shutdown", "poweroff").unwrap();
        assert_eq!(xs.poll_watch().unwrap().path, "control/shutdown");
        xs.unwatch("control/shutdown", "shutdown").unwrap();
        xs.write("control/shutdown", "").unwrap();
        assert_eq!(xs.poll_watch(), None);
    }

    #[test]
    fn replies_reassemble_from_one_byte_reads() {
        let mut xs = client();
        xs.stream_mut().chunk = 1;
        xs.set_max_waits(0);
        xs.write("a", "value").unwrap();
        assert_eq!(xs.read("a").unwrap().as_deref(), Some("value"));
    }

    #[test]
    fn transactions_carry_the_id_and_retry_on_eagain() {
        let mut xs = client();
        xs.stream_mut().fail_commit_times = 1;
        let mut runs = 0;
        xs.transaction(3, |xs| {
            runs += 1;
            xs.write("data/vchan/0/111/ring-ref", "8")?;
            xs.set_permissions("data/vchan/0/111/ring-ref", &["n3", "r0"])
        })
        .unwrap();
        assert_eq!(runs, 2);
        assert!(!xs.stream_mut().tx_open);
        assert_eq!(
            xs.stream_mut().perms["data/vchan/0/111/ring-ref"],
            ["n3", "r0"]
        );
        xs.stream_mut().fail_commit_times = 5;
        assert_eq!(
            xs.transaction(2, |_| Ok(())),
            Err(XenstoreError::Daemon("EAGAIN".into()))
        );
    }

    #[test]
    fn daemon_errors_are_reported_with_their_name() {
        let mut xs = client();
        xs.stream_mut().tamper = Some(|buf| {
            // Turn every reply into ERROR "EACCES".
            let req_id: [u8; 4] = buf[4..8].try_into().unwrap();
            buf.clear();
            buf.extend_from_slice(&16u32.to_le_bytes());
            buf.extend_from_slice(&req_id);
            buf.extend_from_slice(&0u32.to_le_bytes());
            buf.extend_from_slice(&7u32.to_le_bytes());
            buf.extend_from_slice(b"EACCES\0");
        });
        assert_eq!(xs.read("x"), Err(XenstoreError::Daemon("EACCES".into())));
        assert_eq!(
            xs.write("x", "1"),
            Err(XenstoreError::Daemon("EACCES".into()))
        );
    }

    fn hostile(tamper: fn(&mut Vec<u8>)) -> XenstoreError {
        let mut xs = client();
        xs.stream_mut().tamper = Some(tamper);
        let error = xs.read("x").unwrap_err();
        // Poisoned: later requests fail without touching the stream.
        let sent = xs.stream_mut().requests;
        assert!(matches!(
            xs.write("y", "1"),
            Err(XenstoreError::BadReply(_))
        ));
        assert_eq!(xs.stream_mut().requests, sent);
        error
    }

    #[test]
    fn a_hostile_daemon_poisons_the_client_without_panicking() {
        // Wrong request id.
        assert_eq!(
            hostile(|b| b[4] ^= 0xff),
            XenstoreError::BadReply("reply to another request id")
        );
        // Wrong reply type (WRITE instead of READ).
        assert!(matches!(hostile(|b| b[0] = 11), XenstoreError::BadReply(_)));
        // Length far over XENSTORE_PAYLOAD_MAX.
        assert_eq!(
            hostile(|b| b[12..16].copy_from_slice(&u32::MAX.to_le_bytes())),
            XenstoreError::BadReply("malformed xsd_sockmsg header")
        );
        // Garbage that never completes a message: the request times out.
        assert_eq!(
            hostile(|b| b.truncate(10)),
            XenstoreError::BadReply("no reply from xenstored in time")
        );
        // An ERROR reply whose payload is not NUL-terminated.
        assert!(matches!(
            hostile(|b| {
                b[0] = 16;
                b.truncate(16);
                b.extend_from_slice(b"ENOENT");
                b[12..16].copy_from_slice(&6u32.to_le_bytes());
            }),
            XenstoreError::BadReply(_)
        ));
        // A READ value that is not UTF-8.
        let mut xs = client();
        xs.write("bin", "x").unwrap();
        xs.stream_mut().tamper = Some(|b| b[16] = 0xff);
        assert_eq!(
            xs.read("bin"),
            Err(XenstoreError::BadReply("value is not UTF-8"))
        );
    }

    #[test]
    fn the_event_queue_is_bounded() {
        let mut xs = client();
        xs.watch("w", "t").unwrap();
        for i in 0..MAX_QUEUED_EVENTS + 10 {
            xs.write(&format!("w/{i}"), "v").unwrap();
        }
        assert_eq!(xs.dropped_events(), 11);
        let mut n = 0;
        while xs.poll_watch().is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_QUEUED_EVENTS);
    }
}
