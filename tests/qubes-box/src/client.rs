//! A small blocking XenStore client over a UNIX socket, for the box's own
//! command line (`qubes-box xenstore-write …`) and tests. It is not the
//! firewall's client (that is `unikernel::xenstore`, over any byte stream).
//!
//! Watch events that arrive while waiting for a reply are queued, never
//! mistaken for the reply. Replies are parsed with `protocol::xenstore`;
//! anything the daemon sends that does not parse is an error, not a panic.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use protocol::xenstore::{Decoder, MESSAGE_MAX, MessageType, Repr, Request, Response};

/// What went wrong talking to xenstored.
#[derive(Debug)]
pub enum ClientError {
    /// The socket failed.
    Io(io::Error),
    /// xenstored answered with an `xsd_errors` name.
    Daemon(String),
    /// xenstored's reply did not follow the protocol.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(error) => write!(f, "xenstored socket: {error}"),
            ClientError::Daemon(code) => write!(f, "xenstored refused: {code}"),
            ClientError::Protocol(what) => write!(f, "bad reply from xenstored: {what}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(error: io::Error) -> ClientError {
        ClientError::Io(error)
    }
}

/// A watch event: the changed path and the token.
pub type WatchEvent = (String, String);

/// One connection to xenstored.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    decoder: Decoder,
    pending: Vec<u8>,
    next_req_id: u32,
    events: VecDeque<WatchEvent>,
}

/// A parsed message owned by the caller: (type, req_id, payload).
type Owned = (MessageType, u32, Vec<u8>);

impl Client {
    /// Connects to xenstored at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|error| {
            ClientError::Io(io::Error::new(
                error.kind(),
                format!("cannot connect to {}: {error}", path.display()),
            ))
        })?;
        Ok(Client {
            stream,
            decoder: Decoder::new(),
            pending: Vec::new(),
            next_req_id: 1,
            events: VecDeque::new(),
        })
    }

    /// Gives up on a reply or event after `timeout` (`None`: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(timeout)?;
        Ok(())
    }

    /// Sends raw bytes (tests use it to send malformed messages).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads the next whole message from the daemon.
    pub fn next_message(&mut self) -> Result<Owned, ClientError> {
        loop {
            if !self.pending.is_empty() {
                let (consumed, message) = self
                    .decoder
                    .feed(&self.pending)
                    .map_err(|error| ClientError::Protocol(error.to_string()))?;
                let owned = message.map(|packet| {
                    let repr = Repr::parse(&packet);
                    (repr.msg_type, repr.req_id, repr.payload.to_vec())
                });
                self.pending.drain(..consumed.min(self.pending.len()));
                if let Some(owned) = owned {
                    return Ok(owned);
                }
            }
            let mut buffer = [0u8; 4096];
            let count = self.stream.read(&mut buffer)?;
            if count == 0 {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "xenstored closed the connection",
                )));
            }
            self.pending
                .extend_from_slice(buffer.get(..count).unwrap_or(&[]));
        }
    }

    fn request(&mut self, request: &Request<'_>) -> Result<(MessageType, Vec<u8>), ClientError> {
        let req_id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1);
        let mut buffer = vec![0u8; MESSAGE_MAX];
        let len = request
            .emit(req_id, 0, &mut buffer)
            .map_err(|error| ClientError::Protocol(format!("cannot encode request: {error}")))?;
        self.stream.write_all(buffer.get(..len).unwrap_or(&[]))?;
        loop {
            let (msg_type, got_id, payload) = self.next_message()?;
            if msg_type == MessageType::WatchEvent {
                self.queue_event(&payload)?;
                continue;
            }
            if got_id != req_id {
                return Err(ClientError::Protocol(format!(
                    "reply to request {got_id}, expected {req_id}"
                )));
            }
            if msg_type == MessageType::Error {
                let name = match Response::parse(msg_type, &payload) {
                    Ok(Response::Error { code }) => code.name().to_string(),
                    _ => String::from_utf8_lossy(&payload).into_owned(),
                };
                return Err(ClientError::Daemon(name));
            }
            return Ok((msg_type, payload));
        }
    }

    fn queue_event(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        match Response::parse(MessageType::WatchEvent, payload) {
            Ok(Response::WatchEvent { path, token }) => {
                self.events.push_back((path.to_string(), token.to_string()));
                Ok(())
            }
            _ => Err(ClientError::Protocol("malformed WATCH_EVENT".into())),
        }
    }

    /// Reads a value; `None` if the node does not exist.
    pub fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, ClientError> {
        match self.request(&Request::Read { path }) {
            Ok((_, value)) => Ok(Some(value)),
            Err(ClientError::Daemon(code)) if code == "ENOENT" => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Writes a value.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), ClientError> {
        self.request(&Request::Write { path, value }).map(|_| ())
    }

    /// Removes a node and its subtree.
    pub fn remove(&mut self, path: &str) -> Result<(), ClientError> {
        self.request(&Request::Rm { path }).map(|_| ())
    }

    /// Lists the children of a node.
    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, ClientError> {
        let (msg_type, payload) = self.request(&Request::Directory { path })?;
        match Response::parse(msg_type, &payload) {
            Ok(Response::Directory { names }) => Ok(names.iter().map(str::to_string).collect()),
            _ => Err(ClientError::Protocol("malformed DIRECTORY reply".into())),
        }
    }

    /// Sets a watch (its initial event is queued like any other).
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), ClientError> {
        self.request(&Request::Watch { path, token }).map(|_| ())
    }

    /// Removes a watch.
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), ClientError> {
        self.request(&Request::Unwatch { path, token }).map(|_| ())
    }

    /// Waits for the next watch event.
    pub fn next_event(&mut self) -> Result<WatchEvent, ClientError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let (msg_type, _, payload) = self.next_message()?;
            if msg_type == MessageType::WatchEvent {
                self.queue_event(&payload)?;
            } else {
                return Err(ClientError::Protocol(format!(
                    "unexpected {msg_type:?} while waiting for a watch event"
                )));
            }
        }
    }
}
