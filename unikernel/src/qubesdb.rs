//! The VM side of QubesDB: a bounded copy of the keys dom0 publishes for
//! this VM, kept in sync over vchan port 111, with commit detection for the
//! per-client firewall rules.
//!
//! Facts (qubes-core-qubesdb `daemon/db-daemon.c`, `daemon/db-cmds.c`,
//! `include/qubesdb.h`; mirage-qubes `lib/dB.ml`):
//! - dom0's qubesdb-daemon is the vchan **server** on port 111
//!   (`libvchan_server_init(remote_domid, QUBESDB_VCHAN_PORT, …)`); the VM
//!   connects as **client** (`libvchan_client_init(0, QUBESDB_VCHAN_PORT)`),
//!   as mirage-qubes does (`QV.client ~domid ~port:111`). (PROTOCOLS.md
//!   said the VM is the server; the C source is the authority.)
//! - Right after connecting the VM sends `QDB_CMD_MULTIREAD` with an empty
//!   path; dom0 answers with one `QDB_RESP_MULTIREAD` per entry and ends
//!   with one whose path is empty and `data_len` 0.
//! - Afterwards dom0 pushes `QDB_CMD_WRITE` (path + value) and `QDB_CMD_RM`
//!   (a path ending in `/` removes everything below it); the VM answers each
//!   with `QDB_RESP_OK` (same path, no data), or `QDB_RESP_ERROR_NOENT` when
//!   an `RM` names nothing (a de-synchronisation: the C daemon drops the
//!   link, and so do we), or `QDB_RESP_ERROR` when it refuses a write.
//! - The VM's own writes (`/qubes-iptables-error`) go to dom0 as
//!   `QDB_CMD_WRITE`; dom0 answers `QDB_RESP_OK`, which is ignored.
//! - Values never contain NUL; paths are at most 63 bytes of
//!   `[A-Za-z0-9_-/.:@]`; data is below `QDB_MAX_DATA` (3072) bytes.
//! - A *commit* is an empty write to `/qubes-firewall/<ip>` after dom0
//!   rewrote the keys below it (`policy`, `0000`, `0001`, …). At a commit
//!   the entries below that directory are copied out as one consistent
//!   snapshot and handed to the router; entries that are there without a
//!   commit are never used.
//!
//! Bounded: at most `ControlCaps::qubesdb_entries` entries and
//! `qubesdb_bytes` bytes. At a cap the write is refused (answered with
//! `QDB_RESP_ERROR`) and counted; if the refused key is a firewall rule, the
//! client's next commit is deny-all (a missing `drop` rule must never turn
//! into an accept). This module must never trust a path or length from dom0
//! and never panic on anything dom0 sends.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::net::IpAddr;
use core::ops::Bound;

use log::{info, warn};
use protocol::qubesdb::{Decoder, MessageType, Repr};

use crate::config::ControlCaps;
use crate::platform::{ByteStream, LinkState, StreamError};

/// The directory of the per-client firewall rules.
pub const FIREWALL_DIR: &str = "/qubes-firewall/";
/// The key the firewall writes when networking is up (empty = OK).
pub const IPTABLES_ERROR: &str = "/qubes-iptables-error";

/// Where dom0 lists the IPv4 addresses of every qube whose netvm is this
/// one, running or not (qubes-core-admin `reload_connected_ips`; the
/// address each client sees itself as, so its `net.fake-ip` if it has one),
/// space-separated. Linux's `qubesagent/firewall.py` turns them into its
/// anti-spoofing rules (`update_connected_ips`).
pub const CONNECTED_IPS: &str = "/connected-ips";
/// The same for IPv6 (`/connected-ips6`).
pub const CONNECTED_IPS6: &str = "/connected-ips6";

/// The addresses of [`CONNECTED_IPS`] and [`CONNECTED_IPS6`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectedIps {
    /// Every address that parsed in its key's family, sorted, once each.
    pub addresses: Vec<IpAddr>,
    /// Words that are not an address of the key's family, with the key
    /// (`/connected-ips: "x"`), for the log and the status report.
    pub ignored: Vec<String>,
}

impl ConnectedIps {
    /// Reads both keys (`lookup(key)` gives a key's value). An absent or
    /// empty key lists nothing, as Linux's `get_connected_ips`. A word that
    /// is not an address of the key's family cannot be protected and is
    /// kept in [`ConnectedIps::ignored`]; the others still are.
    pub fn read<'a>(lookup: impl Fn(&str) -> Option<&'a str>) -> ConnectedIps {
        let mut found = ConnectedIps::default();
        for (key, ipv6) in [(CONNECTED_IPS, false), (CONNECTED_IPS6, true)] {
            for word in lookup(key).unwrap_or("").split_ascii_whitespace() {
                match word.parse::<IpAddr>() {
                    Ok(address) if address.is_ipv6() == ipv6 => found.addresses.push(address),
                    _ => found.ignored.push(alloc::format!("{key}: {word:?}")),
                }
            }
        }
        found.addresses.sort_unstable();
        found.addresses.dedup();
        found
    }
}

/// Why the database refused a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbError {
    /// At the entry or byte cap.
    Full,
    /// `RM` of a path that does not exist (dom0 and VM are out of sync).
    NoEntry(String),
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Full => f.write_str(
                "QubesDB copy is full (cap from VM memory); give the firewall VM more memory",
            ),
            DbError::NoEntry(path) => write!(
                f,
                "dom0 removed {path:?}, which this VM does not have (database out of sync)"
            ),
        }
    }
}

/// Something the program flow must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbEvent {
    /// The initial MULTIREAD finished: the whole database is here.
    Synchronised,
    /// A key outside `/qubes-firewall/` changed (written or removed).
    Changed(String),
    /// dom0 committed the rules of a client: the entries below
    /// `/qubes-firewall/<ip>/`, keys relative (`policy`, `0000`, …).
    RulesCommitted {
        /// The client's address.
        client: IpAddr,
        /// The snapshot at the commit (sorted by key).
        entries: Vec<(String, String)>,
        /// Some rule write was refused at the cap: apply deny-all.
        incomplete: bool,
    },
    /// dom0 removed a client's commit key: it has no rules any more.
    RulesRemoved(IpAddr),
}

/// Counters for the status report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbStats {
    /// Entries held now.
    pub entries: usize,
    /// Bytes of paths and values held now.
    pub bytes: usize,
    /// Writes refused at a cap.
    pub refused_full: u64,
    /// Rule commits delivered.
    pub commits: u64,
    /// Writes applied.
    pub writes: u64,
    /// Removals applied.
    pub removals: u64,
}

/// The bounded key-value copy, with commit detection.
#[derive(Debug)]
pub struct Database {
    entries: BTreeMap<String, String>,
    bytes: usize,
    caps: ControlCaps,
    /// Clients (the `<ip>` text) with a refused rule write since their
    /// directory was last cleared.
    tainted: BTreeSet<String>,
    events: VecDeque<DbEvent>,
    stats: DbStats,
}

fn cost(path: &str, value: &str) -> usize {
    path.len() + value.len() + 32
}

/// `/qubes-firewall/<ip>` → `<ip>` (exactly one component below the dir).
fn commit_key(path: &str) -> Option<&str> {
    let ip = path.strip_prefix(FIREWALL_DIR)?;
    (!ip.is_empty() && !ip.contains('/')).then_some(ip)
}

/// `/qubes-firewall/<ip>/<key>` → `<ip>`.
fn rule_owner(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(FIREWALL_DIR)?;
    let (ip, _) = rest.split_once('/')?;
    (!ip.is_empty()).then_some(ip)
}

impl Database {
    /// An empty database with these caps.
    pub fn new(caps: ControlCaps) -> Database {
        Database {
            entries: BTreeMap::new(),
            bytes: 0,
            caps,
            tainted: BTreeSet::new(),
            events: VecDeque::new(),
            stats: DbStats::default(),
        }
    }

    /// Reads a key.
    pub fn get(&self, path: &str) -> Option<&str> {
        self.entries.get(path).map(String::as_str)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The counters.
    pub fn stats(&self) -> DbStats {
        DbStats {
            entries: self.entries.len(),
            bytes: self.bytes,
            ..self.stats
        }
    }

    /// Takes the next event.
    pub fn next_event(&mut self) -> Option<DbEvent> {
        self.events.pop_front()
    }

    /// Stores an entry without firing events (initial MULTIREAD).
    pub fn load(&mut self, path: &str, value: &str) -> Result<(), DbError> {
        let result = self.store(path, value);
        if result.is_err()
            && let Some(ip) = rule_owner(path)
        {
            self.tainted.insert(ip.to_string());
        }
        result
    }

    /// Ends the initial MULTIREAD: every client with a commit key present
    /// gets its rules delivered, as mirage-qubes' `full_db_sync` does.
    pub fn finish_load(&mut self) {
        let committed: Vec<String> = self
            .entries
            .keys()
            .filter_map(|path| commit_key(path).map(ToString::to_string))
            .collect();
        for ip in committed {
            self.commit(&ip);
        }
        self.events.push_back(DbEvent::Synchronised);
    }

    /// Applies a `QDB_CMD_WRITE` from dom0.
    pub fn write(&mut self, path: &str, value: &str) -> Result<(), DbError> {
        if let Err(error) = self.store(path, value) {
            if let Some(ip) = rule_owner(path) {
                self.tainted.insert(ip.to_string());
            }
            return Err(error);
        }
        self.stats.writes += 1;
        match commit_key(path) {
            Some(ip) if value.is_empty() => {
                let ip = ip.to_string();
                self.commit(&ip);
            }
            Some(_) => {}
            None if path.starts_with(FIREWALL_DIR) => {}
            None => self.events.push_back(DbEvent::Changed(path.to_string())),
        }
        Ok(())
    }

    /// Applies a `QDB_CMD_RM` from dom0 (a trailing `/` removes the subtree).
    pub fn remove(&mut self, path: &str) -> Result<(), DbError> {
        let removed: Vec<String> = if path.ends_with('/') {
            self.entries
                .range::<str, _>((Bound::Included(path), Bound::Unbounded))
                .take_while(|(key, _)| key.starts_with(path))
                .map(|(key, _)| key.clone())
                .collect()
        } else if self.entries.contains_key(path) {
            alloc::vec![path.to_string()]
        } else {
            Vec::new()
        };
        if removed.is_empty() {
            return Err(DbError::NoEntry(path.to_string()));
        }
        for key in &removed {
            if let Some(value) = self.entries.remove(key) {
                self.bytes = self.bytes.saturating_sub(cost(key, &value));
            }
        }
        self.stats.removals += 1;
        // dom0 clears a client's directory before rewriting it: a refused
        // write from before no longer matters.
        if let Some(ip) = path.strip_prefix(FIREWALL_DIR) {
            let ip = ip.trim_end_matches('/');
            if ip.is_empty() {
                self.tainted.clear();
            } else if path.ends_with('/') {
                self.tainted.remove(ip);
            }
        }
        for key in removed {
            if let Some(ip) = commit_key(&key) {
                match ip.parse::<IpAddr>() {
                    Ok(client) => self.events.push_back(DbEvent::RulesRemoved(client)),
                    Err(_) => log::warn!("QubesDB: ignoring removal of {key:?}: not an IP"),
                }
            } else if !key.starts_with(FIREWALL_DIR) {
                self.events.push_back(DbEvent::Changed(key));
            }
        }
        Ok(())
    }

    fn store(&mut self, path: &str, value: &str) -> Result<(), DbError> {
        let old = self.entries.get(path).map_or(0, |old| cost(path, old));
        let new_bytes = self
            .bytes
            .saturating_sub(old)
            .saturating_add(cost(path, value));
        let new_count = self.entries.len() + usize::from(old == 0);
        if new_bytes > self.caps.qubesdb_bytes || new_count > self.caps.qubesdb_entries {
            self.stats.refused_full += 1;
            return Err(DbError::Full);
        }
        self.entries.insert(path.to_string(), value.to_string());
        self.bytes = new_bytes;
        Ok(())
    }

    fn commit(&mut self, ip: &str) {
        let Ok(client) = ip.parse::<IpAddr>() else {
            log::warn!("QubesDB: ignoring commit of {FIREWALL_DIR}{ip}: not an IP address");
            return;
        };
        let prefix = alloc::format!("{FIREWALL_DIR}{ip}/");
        let entries: Vec<(String, String)> = self
            .entries
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(&prefix))
            .map(|(key, value)| {
                (
                    key.get(prefix.len()..).unwrap_or("").to_string(),
                    value.clone(),
                )
            })
            .collect();
        self.stats.commits += 1;
        self.events.push_back(DbEvent::RulesCommitted {
            client,
            entries,
            incomplete: self.tainted.contains(ip),
        });
    }
}

// ---------------------------------------------------------------------------
// The vchan link to dom0's qubesdb-daemon
// ---------------------------------------------------------------------------

/// Most bytes of replies and writes queued for dom0 before the link is
/// considered stalled.
const OUTBOX_BYTES: usize = 64 * 1024;

/// Why the QubesDB link was closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// The transport failed or dom0 went away.
    Stream(StreamError),
    /// dom0 sent bytes that are not a valid `qdb_hdr` message.
    Malformed(protocol::qubesdb::Error),
    /// A valid message that is not allowed at this point.
    Unexpected {
        /// The raw message type.
        msg_type: u8,
        /// Where we were.
        expected: &'static str,
    },
    /// dom0 removed an entry we do not have: the copies differ.
    OutOfSync(String),
    /// dom0 stopped reading our replies.
    Stalled,
    /// A write of ours could not be sent.
    NotConnected,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Stream(error) => write!(f, "{error}"),
            LinkError::Malformed(error) => {
                write!(f, "malformed QubesDB message from dom0: {error}")
            }
            LinkError::Unexpected { msg_type, expected } => write!(
                f,
                "unexpected QubesDB message type {msg_type} while {expected} (dom0 broke the protocol)"
            ),
            LinkError::OutOfSync(path) => write!(
                f,
                "dom0 removed {path:?}, which this VM does not have; resynchronising"
            ),
            LinkError::Stalled => f.write_str("dom0 stopped reading QubesDB replies"),
            LinkError::NotConnected => f.write_str("the QubesDB link is closed"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkPhase {
    /// MULTIREAD queued; waiting for the dump to end.
    Syncing,
    /// Synchronised: dom0 pushes updates.
    Ready,
    /// Closed; the program flow connects again.
    Closed,
}

/// The QubesDB client: the link to dom0 and the database copy.
#[derive(Debug)]
pub struct QubesDb<V> {
    /// `None` until a link was opened ([`QubesDb::unconnected`]).
    link: Option<V>,
    db: Database,
    phase: LinkPhase,
    decoder: alloc::boxed::Box<Decoder>,
    outbox: VecDeque<u8>,
    close_reason: Option<LinkError>,
}

impl<V: ByteStream> QubesDb<V> {
    /// A client on `link` (the vchan to dom0 port 111, connected or still
    /// connecting). The full-sync request is queued at once, so it is the
    /// first message dom0 sees.
    pub fn new(link: V, caps: ControlCaps) -> QubesDb<V> {
        let mut client = QubesDb {
            link: Some(link),
            db: Database::new(caps),
            phase: LinkPhase::Syncing,
            decoder: alloc::boxed::Box::new(Decoder::new()),
            outbox: VecDeque::new(),
            close_reason: None,
        };
        if let Err(error) = client.send(&Repr::full_sync_request()) {
            client.close(error);
        }
        client
    }

    /// A client without a link yet (at boot, and while dom0 does not offer
    /// QubesDB: its `qubesdb-daemon` not started yet). Closed with [`LinkError::NotConnected`], with an empty copy; the
    /// caller opens a link later and makes a client with [`QubesDb::new`].
    pub fn unconnected(caps: ControlCaps) -> QubesDb<V> {
        QubesDb {
            link: None,
            db: Database::new(caps),
            phase: LinkPhase::Closed,
            decoder: alloc::boxed::Box::new(Decoder::new()),
            outbox: VecDeque::new(),
            close_reason: Some(LinkError::NotConnected),
        }
    }

    /// The database copy.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Takes the next event (commits, changes, end of sync).
    pub fn next_event(&mut self) -> Option<DbEvent> {
        self.db.next_event()
    }

    /// True once the initial MULTIREAD finished.
    pub fn is_synchronised(&self) -> bool {
        self.phase == LinkPhase::Ready
    }

    /// True when the link is closed (the flow should connect again).
    pub fn is_closed(&self) -> bool {
        self.phase == LinkPhase::Closed
    }

    /// Why the link was closed.
    pub fn close_reason(&self) -> Option<&LinkError> {
        self.close_reason.as_ref()
    }

    /// Writes a key as this VM (e.g. `/qubes-iptables-error`): stored in
    /// the copy and sent to dom0 as `QDB_CMD_WRITE`.
    pub fn write(&mut self, path: &str, value: &str) -> Result<(), LinkError> {
        if self.phase == LinkPhase::Closed {
            return Err(LinkError::NotConnected);
        }
        let message = Repr {
            msg_type: MessageType::Write,
            path,
            data: value.as_bytes(),
        };
        self.send(&message)?;
        if let Err(error) = self.db.store(path, value) {
            warn!("QubesDB: own write of {path} not kept locally: {error}");
        }
        if let Err(error) = self.flush() {
            self.close(error);
        }
        Ok(())
    }

    /// Does all the work possible now: sends what is queued, reads and
    /// applies what dom0 sent.
    pub fn poll(&mut self) {
        if self.phase == LinkPhase::Closed {
            return;
        }
        if let Err(error) = self.poll_link() {
            self.close(error);
        }
    }

    fn close(&mut self, error: LinkError) {
        warn!("QubesDB: link to dom0 closed: {error}");
        if let Some(link) = &mut self.link {
            link.close();
        }
        self.phase = LinkPhase::Closed;
        self.close_reason = Some(error);
    }

    fn send(&mut self, message: &Repr<'_>) -> Result<(), LinkError> {
        push_message(&mut self.outbox, message)
    }

    fn flush(&mut self) -> Result<(), LinkError> {
        let link = self.link.as_mut().ok_or(LinkError::NotConnected)?;
        flush_outbox(link, &mut self.outbox)
    }

    fn poll_link(&mut self) -> Result<(), LinkError> {
        let link = self.link.as_mut().ok_or(LinkError::NotConnected)?;
        if link.state() == LinkState::Waiting {
            return Ok(());
        }
        let mut buf = [0u8; 1024];
        loop {
            self.flush()?;
            let link = self.link.as_mut().ok_or(LinkError::NotConnected)?;
            let n = link.read(&mut buf).map_err(LinkError::Stream)?;
            if n == 0 {
                return Ok(());
            }
            let mut input = buf.get(..n).unwrap_or(&[]);
            while !input.is_empty() {
                let (used, packet) = self.decoder.feed(input).map_err(LinkError::Malformed)?;
                input = input.get(used..).unwrap_or(&[]);
                let Some(packet) = packet else {
                    continue;
                };
                let message = Repr::parse(&packet).map_err(LinkError::Malformed)?;
                let reply = match apply(&mut self.db, &mut self.phase, &message) {
                    Ok(reply) => reply,
                    Err(LinkError::OutOfSync(path)) => {
                        // As db-cmds.c: answer NOENT, then drop the link.
                        let noent = Repr {
                            msg_type: MessageType::RespErrorNoent,
                            path: message.path,
                            data: &[],
                        };
                        if push_message(&mut self.outbox, &noent).is_ok() {
                            let _ = self.flush();
                        }
                        return Err(LinkError::OutOfSync(path));
                    }
                    Err(error) => return Err(error),
                };
                if let Some(reply) = reply {
                    push_message(
                        &mut self.outbox,
                        &Repr {
                            msg_type: reply,
                            path: message.path,
                            data: &[],
                        },
                    )?;
                }
            }
        }
    }
}

fn push_message(outbox: &mut VecDeque<u8>, message: &Repr<'_>) -> Result<(), LinkError> {
    let len = message.buffer_len();
    if outbox.len().saturating_add(len) > OUTBOX_BYTES {
        return Err(LinkError::Stalled);
    }
    let mut buf = alloc::vec![0u8; len];
    message.emit(&mut buf).map_err(LinkError::Malformed)?;
    outbox.extend(buf);
    Ok(())
}

fn flush_outbox<V: ByteStream>(link: &mut V, outbox: &mut VecDeque<u8>) -> Result<(), LinkError> {
    while !outbox.is_empty() {
        let (front, _) = outbox.as_slices();
        let n = link.write(front).map_err(LinkError::Stream)?;
        if n == 0 {
            break;
        }
        outbox.drain(..n.min(front.len()));
    }
    Ok(())
}

/// Applies one message from dom0; returns the reply type to send (with the
/// message's path), or an error that closes the link.
fn apply(
    db: &mut Database,
    phase: &mut LinkPhase,
    message: &Repr<'_>,
) -> Result<Option<MessageType>, LinkError> {
    let unexpected = |expected| LinkError::Unexpected {
        msg_type: message.msg_type.into(),
        expected,
    };
    let value = || String::from_utf8_lossy(message.data);
    match message.msg_type {
        MessageType::RespMultiread if *phase == LinkPhase::Syncing => {
            if message.is_end_marker() {
                db.finish_load();
                *phase = LinkPhase::Ready;
            } else if message.path.is_empty() {
                return Err(unexpected(
                    "reading the MULTIREAD dump (entry without path)",
                ));
            } else if let Err(error) = db.load(message.path, &value()) {
                warn!("QubesDB: {}: {error}", message.path);
            }
            Ok(None)
        }
        MessageType::RespMultiread => Err(unexpected("synchronised (spurious MULTIREAD reply)")),
        MessageType::Write => {
            if message.path.is_empty() || message.path.ends_with('/') {
                warn!(
                    "QubesDB: dom0 wrote to {:?}, which is not a key",
                    message.path
                );
                return Ok(Some(MessageType::RespError));
            }
            match db.write(message.path, &value()) {
                Ok(()) => Ok(Some(MessageType::RespOk)),
                Err(error) => {
                    warn!("QubesDB: refusing write of {}: {error}", message.path);
                    Ok(Some(MessageType::RespError))
                }
            }
        }
        MessageType::Rm => match db.remove(message.path) {
            Ok(()) => Ok(Some(MessageType::RespOk)),
            Err(_) => Err(LinkError::OutOfSync(message.path.to_string())),
        },
        // Answers to our own writes.
        MessageType::RespOk => Ok(None),
        MessageType::RespError => {
            info!("QubesDB: dom0 refused our write of {}", message.path);
            Ok(None)
        }
        _ => Err(unexpected(if *phase == LinkPhase::Syncing {
            "reading the MULTIREAD dump"
        } else {
            "waiting for updates from dom0"
        })),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes buffers it built itself.
mod tests {
    use super::*;

    #[test]
    fn connected_ips_are_read_per_family_and_junk_is_set_aside() {
        let values: BTreeMap<&str, &str> = [
            (
                CONNECTED_IPS,
                "10.137.0.21 10.137.0.20  fd09::1 10.137.0.20 10.137.0.300",
            ),
            (CONNECTED_IPS6, "fd09:24ef:4179::a89:15 10.137.0.9\n"),
        ]
        .into_iter()
        .collect();
        let got = ConnectedIps::read(|key| values.get(key).copied());
        let addresses: Vec<IpAddr> = ["10.137.0.20", "10.137.0.21", "fd09:24ef:4179::a89:15"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(got.addresses, addresses);
        assert_eq!(got.ignored.len(), 3, "{:?}", got.ignored);
        assert!(got.ignored.iter().any(|w| w.contains("10.137.0.300")));
        assert!(
            got.ignored
                .iter()
                .any(|w| w.starts_with("/connected-ips6:") && w.contains("10.137.0.9"))
        );
        // Absent and empty keys (a firewall without clients) list nothing.
        assert_eq!(ConnectedIps::read(|_| None), ConnectedIps::default());
        assert_eq!(ConnectedIps::read(|_| Some(" ")), ConnectedIps::default());
    }
    use alloc::vec;

    fn db() -> Database {
        Database::new(ControlCaps::for_memory(32 << 20))
    }

    fn events(db: &mut Database) -> Vec<DbEvent> {
        core::iter::from_fn(|| db.next_event()).collect()
    }

    #[test]
    fn commit_hands_over_a_snapshot_of_the_client_directory() {
        let mut db = db();
        db.write("/qubes-firewall/10.137.0.5/policy", "drop")
            .unwrap();
        db.write("/qubes-firewall/10.137.0.5/0000", "action=accept proto=tcp")
            .unwrap();
        db.write("/qubes-firewall/10.137.0.50/0000", "action=drop")
            .unwrap();
        assert!(events(&mut db).is_empty(), "no commit yet");
        db.write("/qubes-firewall/10.137.0.5", "").unwrap();
        assert_eq!(
            events(&mut db),
            vec![DbEvent::RulesCommitted {
                client: "10.137.0.5".parse().unwrap(),
                entries: vec![
                    ("0000".into(), "action=accept proto=tcp".into()),
                    ("policy".into(), "drop".into()),
                ],
                incomplete: false,
            }]
        );
        // A later change without a commit is not delivered.
        db.write("/qubes-firewall/10.137.0.5/0001", "action=drop")
            .unwrap();
        assert!(events(&mut db).is_empty());
    }

    #[test]
    fn multiread_delivers_existing_commits_then_synchronised() {
        let mut db = db();
        db.load("/qubes-ip", "10.137.0.2").unwrap();
        db.load("/qubes-firewall/fd09::5/policy", "accept").unwrap();
        db.load("/qubes-firewall/fd09::5", "").unwrap();
        db.finish_load();
        let got = events(&mut db);
        assert!(matches!(got[0], DbEvent::RulesCommitted { .. }));
        assert_eq!(got[1], DbEvent::Synchronised);
        assert_eq!(db.get("/qubes-ip"), Some("10.137.0.2"));
    }

    #[test]
    fn other_keys_fire_changed_and_removal_of_commit_key_removes_rules() {
        let mut db = db();
        db.write("/qubes-gateway", "10.137.0.1").unwrap();
        db.write("/qubes-firewall/10.137.0.5", "").unwrap();
        db.remove("/qubes-firewall/").unwrap();
        let got = events(&mut db);
        assert_eq!(got[0], DbEvent::Changed("/qubes-gateway".into()));
        assert!(matches!(got[1], DbEvent::RulesCommitted { .. }));
        assert_eq!(got[2], DbEvent::RulesRemoved("10.137.0.5".parse().unwrap()));
        assert_eq!(db.stats().entries, 1);
    }

    #[test]
    fn remove_of_missing_path_is_a_typed_error() {
        let mut db = db();
        assert_eq!(db.remove("/nope"), Err(DbError::NoEntry("/nope".into())));
        assert_eq!(db.remove("/nope/"), Err(DbError::NoEntry("/nope/".into())));
    }

    #[test]
    fn at_the_cap_writes_are_refused_and_rules_become_deny_all() {
        let mut caps = ControlCaps::for_memory(32 << 20);
        caps.qubesdb_entries = 3;
        let mut db = Database::new(caps);
        db.write("/qubes-firewall/10.137.0.5/policy", "accept")
            .unwrap();
        db.write(
            "/qubes-firewall/10.137.0.5/0000",
            "action=drop dst4=1.1.1.1/32",
        )
        .unwrap();
        db.write("/qubes-firewall/10.137.0.5", "").unwrap();
        events(&mut db);
        assert_eq!(
            db.write("/qubes-firewall/10.137.0.5/0001", "action=drop"),
            Err(DbError::Full)
        );
        assert_eq!(db.stats().refused_full, 1);
        // Overwriting an existing key is still possible at the entry cap.
        db.write("/qubes-firewall/10.137.0.5", "").unwrap();
        match events(&mut db).pop() {
            Some(DbEvent::RulesCommitted { incomplete, .. }) => assert!(incomplete),
            other => panic!("{other:?}"),
        }
        // dom0 clears the directory and rewrites: the taint is gone.
        db.remove("/qubes-firewall/10.137.0.5/").unwrap();
        db.write("/qubes-firewall/10.137.0.5", "").unwrap();
        match events(&mut db).pop() {
            Some(DbEvent::RulesCommitted {
                incomplete,
                entries,
                ..
            }) => {
                assert!(!incomplete);
                assert!(entries.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn byte_cap_counts_replacements() {
        let mut caps = ControlCaps::for_memory(0);
        caps.qubesdb_bytes = 100;
        let mut db = Database::new(caps);
        db.write("/a", &"x".repeat(60)).unwrap();
        db.write("/a", &"y".repeat(60)).unwrap();
        assert_eq!(db.write("/b", &"z".repeat(60)), Err(DbError::Full));
        db.remove("/a").unwrap();
        assert_eq!(db.stats().bytes, 0);
        db.write("/b", &"z".repeat(60)).unwrap();
    }

    #[test]
    fn commits_of_non_addresses_are_ignored() {
        let mut db = db();
        db.write("/qubes-firewall/not-an-ip", "").unwrap();
        db.write("/qubes-firewall/", "").unwrap();
        assert!(events(&mut db).is_empty());
    }

    // --- the link, against a scripted dom0 -------------------------------

    use crate::testing::{VchanPeer, vchan_pair};

    fn encode(msg_type: MessageType, path: &str, data: &[u8]) -> Vec<u8> {
        let repr = Repr {
            msg_type,
            path,
            data,
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    fn decode_all(mut bytes: &[u8]) -> Vec<(MessageType, String, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let repr = Repr::parse_bytes(bytes).unwrap();
            out.push((repr.msg_type, repr.path.to_string(), repr.data.to_vec()));
            bytes = &bytes[repr.buffer_len()..];
        }
        out
    }

    fn synced() -> (QubesDb<crate::testing::FakeVchan>, VchanPeer) {
        let (vm, dom0) = vchan_pair();
        let mut client = QubesDb::new(vm, ControlCaps::for_memory(32 << 20));
        client.poll();
        // Golden: the first bytes are a 72-byte MULTIREAD of the empty path.
        let mut multiread = vec![0u8; 72];
        multiread[0] = 2;
        assert_eq!(dom0.take(), multiread);
        dom0.send(&encode(
            MessageType::RespMultiread,
            "/qubes-ip",
            b"10.137.0.2",
        ));
        dom0.send(&encode(
            MessageType::RespMultiread,
            "/qubes-gateway",
            b"10.137.0.1",
        ));
        assert!(!client.is_synchronised());
        dom0.send(&encode(MessageType::RespMultiread, "", b""));
        client.poll();
        assert!(client.is_synchronised());
        assert_eq!(client.next_event(), Some(DbEvent::Synchronised));
        (client, dom0)
    }

    #[test]
    fn a_client_without_a_link_is_closed_and_refuses_writes() {
        let mut client: QubesDb<crate::testing::FakeVchan> =
            QubesDb::unconnected(ControlCaps::for_memory(32 << 20));
        assert!(client.is_closed());
        assert!(!client.is_synchronised());
        assert!(matches!(
            client.close_reason(),
            Some(LinkError::NotConnected)
        ));
        client.poll();
        assert!(client.is_closed());
        assert!(matches!(
            client.write("/qubes-iptables-error", ""),
            Err(LinkError::NotConnected)
        ));
        assert_eq!(client.database().stats().entries, 0);
        assert_eq!(client.next_event(), None);
    }

    #[test]
    fn link_multiread_then_pushed_rules_and_commit() {
        let (mut client, dom0) = synced();
        assert_eq!(client.database().get("/qubes-gateway"), Some("10.137.0.1"));
        dom0.send(&encode(MessageType::Rm, "/qubes-firewall/10.137.0.5/", b""));
        dom0.send(&encode(
            MessageType::Write,
            "/qubes-firewall/10.137.0.5/policy",
            b"drop",
        ));
        dom0.send(&encode(
            MessageType::Write,
            "/qubes-firewall/10.137.0.5/0000",
            b"action=accept specialtarget=dns",
        ));
        dom0.send(&encode(
            MessageType::Write,
            "/qubes-firewall/10.137.0.5",
            b"",
        ));
        client.poll();
        // The RM named nothing: NOENT and the link drops (database out of
        // sync), exactly as the C daemon does.
        let replies = decode_all(&dom0.take());
        assert_eq!(replies[0].0, MessageType::RespErrorNoent);
        assert!(client.is_closed());
        assert!(matches!(
            client.close_reason(),
            Some(LinkError::OutOfSync(_))
        ));

        // Without the bogus RM: every write is acknowledged with its path.
        let (mut client, dom0) = synced();
        dom0.send(&encode(
            MessageType::Write,
            "/qubes-firewall/10.137.0.5/policy",
            b"drop",
        ));
        dom0.send(&encode(
            MessageType::Write,
            "/qubes-firewall/10.137.0.5/0000",
            b"action=accept specialtarget=dns",
        ));
        dom0.send(&encode(
            MessageType::Write,
            "/qubes-firewall/10.137.0.5",
            b"",
        ));
        client.poll();
        let replies = decode_all(&dom0.take());
        assert_eq!(
            replies,
            vec![
                (
                    MessageType::RespOk,
                    "/qubes-firewall/10.137.0.5/policy".into(),
                    vec![]
                ),
                (
                    MessageType::RespOk,
                    "/qubes-firewall/10.137.0.5/0000".into(),
                    vec![]
                ),
                (
                    MessageType::RespOk,
                    "/qubes-firewall/10.137.0.5".into(),
                    vec![]
                ),
            ]
        );
        match client.next_event() {
            Some(DbEvent::RulesCommitted { entries, .. }) => assert_eq!(entries.len(), 2),
            other => panic!("{other:?}"),
        }
        dom0.send(&encode(MessageType::Rm, "/qubes-firewall/10.137.0.5/", b""));
        client.poll();
        assert_eq!(decode_all(&dom0.take())[0].0, MessageType::RespOk);
        assert!(!client.is_closed());
    }

    #[test]
    fn link_own_write_goes_to_dom0() {
        let (mut client, dom0) = synced();
        client.write(IPTABLES_ERROR, "").unwrap();
        assert_eq!(
            decode_all(&dom0.take()),
            vec![(MessageType::Write, IPTABLES_ERROR.into(), vec![])]
        );
        assert_eq!(client.database().get(IPTABLES_ERROR), Some(""));
        dom0.send(&encode(MessageType::RespOk, IPTABLES_ERROR, b""));
        dom0.send(&encode(MessageType::RespError, IPTABLES_ERROR, b""));
        client.poll();
        assert!(!client.is_closed());
    }

    #[test]
    fn link_split_messages_are_reassembled() {
        let (vm, dom0) = vchan_pair();
        let mut client = QubesDb::new(vm, ControlCaps::for_memory(32 << 20));
        let mut dump = encode(MessageType::RespMultiread, "/qubes-ip", b"10.137.0.2");
        dump.extend(encode(MessageType::RespMultiread, "", b""));
        for byte in dump {
            dom0.send(&[byte]);
            client.poll();
        }
        assert!(client.is_synchronised());
    }

    #[test]
    fn link_protocol_violations_close_with_a_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            // A local-socket command on the vchan.
            (encode(MessageType::Read, "/qubes-ip", b""), "unexpected"),
            // A MULTIREAD reply after the sync.
            (encode(MessageType::RespMultiread, "/x", b"1"), "unexpected"),
            // A second MULTIREAD request from dom0.
            (encode(MessageType::Multiread, "", b""), "unexpected"),
            // data_len of 3072 (must be below QDB_MAX_DATA).
            (
                {
                    let mut bad = vec![0u8; 72];
                    bad[0] = 1;
                    bad[1] = b'/';
                    bad[68..72].copy_from_slice(&3072u32.to_le_bytes());
                    bad
                },
                "malformed",
            ),
            // A path without NUL in its 64 bytes.
            (
                {
                    let mut bad = vec![b'a'; 72];
                    bad[0] = 1;
                    bad[68..72].copy_from_slice(&0u32.to_le_bytes());
                    bad
                },
                "malformed",
            ),
            // A value with a NUL byte.
            (
                {
                    let mut bad = encode(MessageType::Write, "/k", b"ab");
                    let last = bad.len() - 1;
                    bad[last] = 0;
                    bad
                },
                "malformed",
            ),
            // An unknown type.
            (encode(MessageType::Unknown(99), "/k", b""), "unexpected"),
        ];
        for (bytes, kind) in cases {
            let (mut client, dom0) = synced();
            dom0.send(&bytes);
            client.poll();
            assert!(client.is_closed(), "{kind}: {bytes:?}");
            let reason = client.close_reason().unwrap();
            match kind {
                "malformed" => assert!(matches!(reason, LinkError::Malformed(_)), "{reason}"),
                _ => assert!(matches!(reason, LinkError::Unexpected { .. }), "{reason}"),
            }
            assert!(dom0.closed_by_vm());
            client.poll();
            assert!(client.write("/x", "y").is_err());
        }
    }

    #[test]
    fn link_garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..300 {
            let (mut client, dom0) = synced();
            let mut bytes = Vec::new();
            if round % 2 == 0 {
                bytes.extend(encode(
                    MessageType::Write,
                    "/qubes-firewall/1.2.3.4/0000",
                    b"x",
                ));
            }
            for _ in 0..(seed % 200) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            dom0.send(&bytes);
            client.poll();
            dom0.close();
            client.poll();
            assert!(client.is_closed());
        }
    }

    #[test]
    fn link_refused_write_is_answered_with_error() {
        let (vm, dom0) = vchan_pair();
        let mut caps = ControlCaps::for_memory(32 << 20);
        caps.qubesdb_entries = 1;
        let mut client = QubesDb::new(vm, caps);
        dom0.send(&encode(MessageType::RespMultiread, "", b""));
        client.poll();
        dom0.take();
        dom0.send(&encode(MessageType::Write, "/a", b"1"));
        dom0.send(&encode(MessageType::Write, "/b", b"2"));
        dom0.send(&encode(MessageType::Write, "/dir/", b"2"));
        client.poll();
        let replies: Vec<MessageType> = decode_all(&dom0.take())
            .into_iter()
            .map(|(t, _, _)| t)
            .collect();
        assert_eq!(
            replies,
            vec![
                MessageType::RespOk,
                MessageType::RespError,
                MessageType::RespError
            ]
        );
        assert_eq!(client.database().stats().refused_full, 1);
        assert!(!client.is_closed());
    }

    #[test]
    fn link_waits_while_dom0_is_not_there() {
        let (mut platform, handle) = crate::testing::FakePlatform::new(3, 32 << 20);
        use crate::platform::Platform as _;
        let vm = platform.vchan_client(0, 111).unwrap();
        let mut client = QubesDb::new(vm, ControlCaps::for_memory(32 << 20));
        client.poll();
        assert!(!client.is_closed());
        let dom0 = handle.offer_vchan(0, 111);
        client.poll();
        assert_eq!(dom0.take().len(), 72);
    }
}
