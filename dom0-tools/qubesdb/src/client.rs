//! The local-socket client of a qubesdb-daemon, as qubes-core-qubesdb's
//! `client/qdb-client.c` (libqubesdb) speaks it: used by the `qubesdb-*`
//! tools.
//!
//! Facts: the socket is `/var/run/qubes/qubesdb.<vmname>.sock` for a VM's
//! dom0 daemon (`-d VMNAME`) and `/var/run/qubes/qubesdb.sock` otherwise
//! (`QDB_DAEMON_PATH_PATTERN`, `QDB_DAEMON_LOCAL_PATH`); each command is one
//! `qdb_hdr` (+ value for WRITE); RESP_WATCH messages may arrive before any
//! reply and are queued, not mistaken for it; MULTIREAD and LIST replies end
//! with an empty path. The client refuses paths that do not start with `/`
//! or are 64 bytes or longer before sending anything.
//!
//! Extension for the box and tests: `QUBESDB_SOCKET_DIR` replaces
//! `/var/run/qubes` (Qubes' own tools have the directory built in).
//! Anything the daemon sends that does not follow the protocol is an error,
//! never a panic.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use protocol::qubesdb::QDB_MAX_PATH;

use crate::daemon::DEFAULT_SOCKET_DIR;
use crate::wire::{self, Command, HEADER_LEN, Header};

/// The environment variable that overrides `/var/run/qubes`.
pub const SOCKET_DIR_ENV: &str = "QUBESDB_SOCKET_DIR";

/// The directory holding the daemons' sockets.
pub fn socket_dir() -> PathBuf {
    std::env::var_os(SOCKET_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR))
}

/// The socket of VM `vmname`'s dom0 daemon, or the local daemon's.
pub fn daemon_socket(vmname: Option<&str>) -> PathBuf {
    match vmname {
        Some(name) => crate::daemon::socket_path(&socket_dir(), name),
        None => socket_dir().join("qubesdb.sock"),
    }
}

/// qdb-client.c `verify_path`: starts with `/`, shorter than 64 bytes.
fn client_path_ok(path: &str) -> bool {
    path.starts_with('/') && path.len() < QDB_MAX_PATH
}

/// What a command can fail with.
#[derive(Debug)]
pub enum QdbError {
    /// The path was refused before sending (see `client_path_ok`).
    BadPath,
    /// The daemon answered `QDB_RESP_ERROR_NOENT`.
    NotFound,
    /// The daemon answered `QDB_RESP_ERROR`.
    Refused,
    /// The daemon answered something the protocol does not allow here.
    Protocol(String),
    /// The socket failed.
    Io(io::Error),
}

impl std::fmt::Display for QdbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QdbError::BadPath => f.write_str("path must start with / and be shorter than 64 bytes"),
            QdbError::NotFound => f.write_str("no such entry"),
            QdbError::Refused => f.write_str("the daemon refused the command"),
            QdbError::Protocol(what) => write!(f, "protocol error: {what}"),
            QdbError::Io(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for QdbError {}

impl From<io::Error> for QdbError {
    fn from(error: io::Error) -> QdbError {
        QdbError::Io(error)
    }
}

/// A connection to one daemon (`qdb_handle_t`).
#[derive(Debug)]
pub struct QdbClient {
    stream: UnixStream,
    watches: VecDeque<String>,
}

impl QdbClient {
    /// `qdb_open(vmname)`.
    pub fn open(vmname: Option<&str>) -> io::Result<QdbClient> {
        Self::open_path(&daemon_socket(vmname))
    }

    /// Connects to a daemon socket by path.
    pub fn open_path(path: &std::path::Path) -> io::Result<QdbClient> {
        Ok(QdbClient {
            stream: UnixStream::connect(path)?,
            watches: VecDeque::new(),
        })
    }

    fn send(&mut self, command: Command, path: &str, data: &[u8]) -> Result<(), QdbError> {
        if !client_path_ok(path) {
            return Err(QdbError::BadPath);
        }
        self.stream.write_all(&wire::encode(command, path, data))?;
        Ok(())
    }

    fn read_message(&mut self) -> Result<(Header, Vec<u8>), QdbError> {
        let mut raw = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut raw)?;
        let header = Header::parse(&raw);
        if header.data_len as usize >= protocol::qubesdb::QDB_MAX_DATA {
            return Err(QdbError::Protocol(format!(
                "daemon sent data_len {}",
                header.data_len
            )));
        }
        let mut data = vec![0u8; header.data_len as usize];
        self.stream.read_exact(&mut data)?;
        Ok((header, data))
    }

    /// The next reply, queueing watch events that come first
    /// (qdb-client.c `get_response`).
    fn response(&mut self) -> Result<(Header, Vec<u8>), QdbError> {
        loop {
            let (header, data) = self.read_message()?;
            if header.command == Command::RespWatch {
                self.watches.push_back(header.path_str());
                continue;
            }
            return Ok((header, data));
        }
    }

    fn expect_ok(&mut self) -> Result<(), QdbError> {
        let (header, _) = self.response()?;
        match header.command {
            Command::RespOk => Ok(()),
            Command::RespErrorNoent => Err(QdbError::NotFound),
            Command::RespError => Err(QdbError::Refused),
            other => Err(QdbError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// `qdb_read`: the value, or `Err(NotFound)`.
    pub fn read(&mut self, path: &str) -> Result<Vec<u8>, QdbError> {
        self.send(Command::Read, path, &[])?;
        let (header, data) = self.response()?;
        match header.command {
            Command::RespRead => Ok(data),
            Command::RespErrorNoent => Err(QdbError::NotFound),
            Command::RespError => Err(QdbError::Refused),
            other => Err(QdbError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// `qdb_write`.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), QdbError> {
        self.send(Command::Write, path, value)?;
        self.expect_ok()
    }

    /// `qdb_rm` (a path ending in `/` removes the subtree).
    pub fn rm(&mut self, path: &str) -> Result<(), QdbError> {
        self.send(Command::Rm, path, &[])?;
        self.expect_ok()
    }

    /// `qdb_multiread`: every entry whose path starts with `path`.
    pub fn multiread(&mut self, path: &str) -> Result<Vec<(String, Vec<u8>)>, QdbError> {
        self.send(Command::Multiread, path, &[])?;
        let mut entries = Vec::new();
        loop {
            let (header, data) = self.response()?;
            match header.command {
                Command::RespMultiread if header.path().is_empty() => return Ok(entries),
                Command::RespMultiread => entries.push((header.path_str(), data)),
                Command::RespError => return Err(QdbError::Refused),
                other => return Err(QdbError::Protocol(format!("unexpected reply {other:?}"))),
            }
        }
    }

    /// `qdb_list`: the paths that start with `path`.
    pub fn list(&mut self, path: &str) -> Result<Vec<String>, QdbError> {
        self.send(Command::List, path, &[])?;
        let mut paths = Vec::new();
        loop {
            let (header, _) = self.response()?;
            match header.command {
                Command::RespList if header.path().is_empty() => return Ok(paths),
                Command::RespList => paths.push(header.path_str()),
                Command::RespError => return Err(QdbError::Refused),
                other => return Err(QdbError::Protocol(format!("unexpected reply {other:?}"))),
            }
        }
    }

    /// `qdb_watch`.
    pub fn watch(&mut self, path: &str) -> Result<(), QdbError> {
        self.send(Command::Watch, path, &[])?;
        self.expect_ok()
    }

    /// `qdb_unwatch`.
    pub fn unwatch(&mut self, path: &str) -> Result<(), QdbError> {
        self.send(Command::Unwatch, path, &[])?;
        self.expect_ok()
    }

    /// `qdb_read_watch`: blocks for the next fired watch; returns the path.
    pub fn read_watch(&mut self) -> Result<String, QdbError> {
        if let Some(path) = self.watches.pop_front() {
            return Ok(path);
        }
        loop {
            let (header, _) = self.read_message()?;
            if header.command == Command::RespWatch {
                return Ok(header.path_str());
            }
            // A stray reply (e.g. to an abandoned command): skip it.
        }
    }
}
