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

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::net::IpAddr;
use core::ops::Bound;

use crate::config::ControlCaps;

/// The directory of the per-client firewall rules.
pub const FIREWALL_DIR: &str = "/qubes-firewall/";
/// The key the firewall writes when networking is up (empty = OK).
pub const IPTABLES_ERROR: &str = "/qubes-iptables-error";

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
        self.store(path, value)
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

#[cfg(test)]
mod tests {
    use super::*;
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
}
