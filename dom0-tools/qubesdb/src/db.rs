//! One VM's QubesDB as dom0's `qubesdb-daemon` holds it: the entries, sorted
//! as C `strcmp` sorts them, and the local clients' watches.
//!
//! The semantics are qubes-core-qubesdb's `daemon/db-core.c` and
//! `daemon/db-cmds.c`, kept exactly because the VM and Qubes' tools depend on
//! them:
//! - an entry path starts with `/`, does not end with `/`, and is shorter
//!   than `QDB_MAX_PATH` (64) bytes; a value holds no NUL byte;
//! - RM of a path ending in `/` removes every entry with that prefix, RM of
//!   any other path removes exactly that entry; removing nothing is
//!   `RESP_ERROR_NOENT`;
//! - MULTIREAD and LIST of a prefix return the entries whose path starts with
//!   it (a byte prefix, not a directory), in ascending order; a MULTIREAD of
//!   the empty path returns the whole database in *descending* order ("so
//!   insertion-sort on the other side will be more efficient");
//! - a watch on a path ending in `/` fires for every path with that prefix,
//!   any other watch only for exactly its path; the event carries the path
//!   the WRITE or RM named.
//!
//! The number of entries is capped ([`MAX_ENTRIES`]); a write past the cap
//! is refused (the daemon answers `RESP_ERROR`). Nothing here panics on any
//! path or value.

use std::collections::BTreeMap;

pub use protocol::qubesdb::{QDB_MAX_DATA, QDB_MAX_PATH};
/// Most entries one VM's database holds (the C daemon has no cap; a VM's
/// write can add entries, so we bound them).
pub const MAX_ENTRIES: usize = 65536;
/// Most watches over all local clients.
pub const MAX_WATCHES: usize = 4096;

/// The daemon's `verify_path`: allowed characters only (`[a-zA-Z0-9_-/.:@]`),
/// shorter than 64 bytes. The empty path passes (MULTIREAD/LIST of
/// everything); a trailing `/` passes (each command decides).
pub fn verify_path(path: &[u8]) -> bool {
    protocol::qubesdb::check_path(path).is_ok()
}

/// The daemon's `verify_data`: no NUL byte.
pub fn verify_data(data: &[u8]) -> bool {
    protocol::qubesdb::check_data(data).is_ok()
}

/// Can `path` be an entry (db-core.c `qubesdb_insert`)?
pub fn is_entry_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.ends_with('/')
        && path.len() < QDB_MAX_PATH
        && verify_path(path.as_bytes())
}

/// Who owns a watch.
pub type ClientId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Watch {
    client: ClientId,
    path: String,
}

impl Watch {
    /// db-core.c `qubesdb_fire_watches`: `strncmp(watch, path, cmp_len)`
    /// with `cmp_len = strlen(watch) + 1`, minus one if it ends in `/`.
    fn matches(&self, modified: &str) -> bool {
        if self.path.ends_with('/') {
            modified.starts_with(self.path.as_str())
        } else {
            modified == self.path
        }
    }
}

/// Why a write was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteError {
    /// Not an entry path (see [`is_entry_path`]).
    BadPath,
    /// The value holds a NUL byte or is too long.
    BadData,
    /// The database is full.
    Full,
}

/// The entries and watches.
#[derive(Debug, Default)]
pub struct Db {
    entries: BTreeMap<String, Vec<u8>>,
    watches: Vec<Watch>,
}

impl Db {
    /// An empty database.
    pub fn new() -> Db {
        Db::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of one entry.
    pub fn read(&self, path: &str) -> Option<&[u8]> {
        self.entries.get(path).map(Vec::as_slice)
    }

    /// Writes (creates or replaces) one entry.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), WriteError> {
        if !is_entry_path(path) {
            return Err(WriteError::BadPath);
        }
        if !verify_data(value) || value.len() >= QDB_MAX_DATA {
            return Err(WriteError::BadData);
        }
        if !self.entries.contains_key(path) && self.entries.len() >= MAX_ENTRIES {
            return Err(WriteError::Full);
        }
        self.entries.insert(path.to_string(), value.to_vec());
        Ok(())
    }

    /// Removes an entry, or every entry under a path ending in `/`; returns
    /// whether anything was removed.
    pub fn remove(&mut self, path: &str) -> bool {
        if path.is_empty() {
            return false;
        }
        if path.ends_with('/') {
            let doomed: Vec<String> = self.prefixed(path).map(|(k, _)| k.clone()).collect();
            for key in &doomed {
                self.entries.remove(key);
            }
            !doomed.is_empty()
        } else {
            self.entries.remove(path).is_some()
        }
    }

    fn prefixed<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Vec<u8>)> + 'a {
        self.entries
            .range(prefix.to_string()..)
            .take_while(move |(key, _)| key.starts_with(prefix))
    }

    /// The entries a MULTIREAD of `prefix` returns, in the order the daemon
    /// sends them (descending for the empty prefix, ascending otherwise).
    pub fn multiread(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        if prefix.is_empty() {
            self.entries
                .iter()
                .rev()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            self.prefixed(prefix)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }
    }

    /// The paths a LIST of `prefix` returns, ascending.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        self.prefixed(prefix).map(|(k, _)| k.clone()).collect()
    }

    /// Registers a watch (the same path may be watched several times; each
    /// registration fires). `false` when the cap is reached.
    pub fn add_watch(&mut self, client: ClientId, path: &str) -> bool {
        if self.watches.len() >= MAX_WATCHES {
            return false;
        }
        self.watches.push(Watch {
            client,
            path: path.to_string(),
        });
        true
    }

    /// Removes one watch of `client` on exactly `path`; `false` if none.
    pub fn remove_watch(&mut self, client: ClientId, path: &str) -> bool {
        match self
            .watches
            .iter()
            .position(|w| w.client == client && w.path == path)
        {
            Some(index) => {
                self.watches.remove(index);
                true
            }
            None => false,
        }
    }

    /// Removes every watch of a client (it disconnected).
    pub fn forget_client(&mut self, client: ClientId) {
        self.watches.retain(|w| w.client != client);
    }

    /// The clients to notify (once per matching watch, newest first as the
    /// C daemon's list order has it) for a change to `path`.
    pub fn watchers(&self, path: &str) -> Vec<ClientId> {
        self.watches
            .iter()
            .rev()
            .filter(|w| w.matches(path))
            .map(|w| w.client)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(entries: &[(&str, &str)]) -> Db {
        let mut db = Db::new();
        for (path, value) in entries {
            db.write(path, value.as_bytes()).unwrap();
        }
        db
    }

    #[test]
    fn paths_and_values_follow_the_daemon_checks() {
        assert!(verify_path(b""));
        assert!(verify_path(b"/qubes-firewall/10.137.0.5/0000"));
        assert!(verify_path(b"/a/"));
        assert!(!verify_path(b"/a b"));
        assert!(!verify_path(b"/a\0"));
        assert!(!verify_path(&[b'/'; 64]));
        assert!(verify_path(&[b'/'; 63]));
        let mut db = Db::new();
        assert_eq!(db.write("relative", b""), Err(WriteError::BadPath));
        assert_eq!(db.write("/dir/", b""), Err(WriteError::BadPath));
        assert_eq!(db.write("/a", b"x\0y"), Err(WriteError::BadData));
        assert_eq!(
            db.write("/a", &[b'x'; QDB_MAX_DATA]),
            Err(WriteError::BadData)
        );
        assert_eq!(db.write("/a", &[b'x'; QDB_MAX_DATA - 1]), Ok(()));
        assert!(!db.is_empty());
    }

    #[test]
    fn multiread_of_everything_is_descending_and_of_a_prefix_ascending() {
        let db = db(&[
            ("/b", "2"),
            ("/a", "1"),
            ("/qubes-ip", "10.137.0.1"),
            ("/a/x", "3"),
        ]);
        let all: Vec<String> = db.multiread("").into_iter().map(|(k, _)| k).collect();
        assert_eq!(all, vec!["/qubes-ip", "/b", "/a/x", "/a"]);
        let some: Vec<String> = db.multiread("/a").into_iter().map(|(k, _)| k).collect();
        assert_eq!(some, vec!["/a", "/a/x"]);
        assert_eq!(db.list("/q"), vec!["/qubes-ip"]);
        assert!(db.list("/z").is_empty());
    }

    #[test]
    fn rm_of_a_directory_removes_its_prefix_and_exact_rm_one_entry() {
        let mut db = db(&[
            ("/qubes-firewall/10.137.0.5", ""),
            ("/qubes-firewall/10.137.0.5/policy", "drop"),
            ("/qubes-firewall/10.137.0.5/0000", "action=accept"),
            ("/qubes-firewall/10.137.0.50/policy", "drop"),
        ]);
        assert!(db.remove("/qubes-firewall/10.137.0.5/"));
        assert_eq!(
            db.list("/"),
            vec![
                "/qubes-firewall/10.137.0.5",
                "/qubes-firewall/10.137.0.50/policy"
            ]
        );
        assert!(!db.remove("/qubes-firewall/10.137.0.5/"));
        assert!(db.remove("/qubes-firewall/10.137.0.5"));
        assert!(!db.remove("/qubes-firewall/10.137.0.5"));
        assert!(!db.remove(""));
    }

    #[test]
    fn watches_match_exactly_or_by_directory_prefix() {
        let mut db = Db::new();
        assert!(db.add_watch(1, "/qubes-firewall/"));
        assert!(db.add_watch(2, "/qubes-ip"));
        assert!(db.add_watch(2, "/qubes-ip"));
        assert_eq!(db.watchers("/qubes-firewall/10.137.0.5/0000"), vec![1]);
        assert_eq!(db.watchers("/qubes-firewall"), Vec::<ClientId>::new());
        assert_eq!(db.watchers("/qubes-ip"), vec![2, 2]);
        assert!(db.watchers("/qubes-ip6").is_empty());
        assert!(db.remove_watch(2, "/qubes-ip"));
        assert_eq!(db.watchers("/qubes-ip"), vec![2]);
        db.forget_client(2);
        assert!(db.watchers("/qubes-ip").is_empty());
        assert!(!db.remove_watch(2, "/qubes-ip"));
    }
}
