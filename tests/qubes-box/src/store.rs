//! The in-box xenstored's tree and watches, with no I/O: what a request does
//! to the store and which watch events it fires.
//!
//! Semantics follow Xen's `docs/misc/xenstore.txt` and C xenstored where the
//! box relies on them: WRITE creates missing ancestors with empty values;
//! READ/DIRECTORY of a missing node is `ENOENT`; RM removes the whole
//! subtree, succeeds on a missing node whose parent exists and is `ENOENT`
//! otherwise; a watch on P fires for changes to P and anything below it,
//! and once right after it is set (with the watched path itself); watch
//! events carry the changed path in the form the watcher used (relative
//! paths are relative to the connection's `/local/domain/<domid>`).
//!
//! It is test/box tooling, not a general xenstored: no permissions, no
//! quotas per domain beyond fixed caps, transactions are accepted and their
//! requests applied at once. It must never panic on a request: every bad
//! path or over-cap request is an `xsd_errors` name.

use std::collections::BTreeMap;

use protocol::xenstore::{ErrorCode, is_valid_path};

/// Most nodes the store holds; a write past it is `ENOSPC`.
pub const MAX_NODES: usize = 100_000;
/// Most watches over all connections; a watch past it is `E2BIG`.
pub const MAX_WATCHES: usize = 10_000;

/// A connection's identity as the store sees it.
pub type ConnectionId = u64;

/// One watch event to deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The connection that set the watch.
    pub connection: ConnectionId,
    /// The changed path, in the watcher's form (absolute or relative).
    pub path: String,
    /// The watch's token.
    pub token: String,
}

#[derive(Clone, Debug)]
struct Watch {
    connection: ConnectionId,
    /// The path as the client gave it.
    given: String,
    /// Its absolute form.
    absolute: String,
    /// The prefix stripped from event paths for a relative watch.
    relative_base: Option<String>,
    token: String,
}

/// The tree of nodes and the watches on it.
#[derive(Debug)]
pub struct Store {
    nodes: BTreeMap<String, Vec<u8>>,
    watches: Vec<Watch>,
}

impl Default for Store {
    fn default() -> Store {
        Store::new()
    }
}

/// Is `path` at or below `base` (both absolute)?
fn at_or_below(path: &str, base: &str) -> bool {
    if base == "/" {
        return path.starts_with('/');
    }
    path == base
        || path
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn parent_of(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(index) => path.get(..index),
        None => None,
    }
}

/// The home of domain `domid`: `/local/domain/<domid>`.
pub fn domain_path(domid: u16) -> String {
    format!("/local/domain/{domid}")
}

/// Resolves a client path to an absolute one (relative paths are relative to
/// the connection's domain home). Invalid paths are `EINVAL`.
pub fn absolute(path: &str, domid: u16) -> Result<String, ErrorCode<'static>> {
    if !is_valid_path(path) {
        return Err(ErrorCode::Einval);
    }
    if path.starts_with('/') {
        Ok(path.to_string())
    } else {
        Ok(format!("{}/{path}", domain_path(domid)))
    }
}

impl Store {
    /// A store holding only the root and `/local/domain`.
    pub fn new() -> Store {
        let mut nodes = BTreeMap::new();
        for path in ["/", "/local", "/local/domain"] {
            nodes.insert(path.to_string(), Vec::new());
        }
        Store {
            nodes,
            watches: Vec::new(),
        }
    }

    /// Number of nodes (the root included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never empty: the root always exists.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The value of an absolute path.
    pub fn read(&self, path: &str) -> Result<&[u8], ErrorCode<'static>> {
        self.nodes
            .get(path)
            .map(Vec::as_slice)
            .ok_or(ErrorCode::Enoent)
    }

    /// The names of the children of an absolute path, sorted.
    pub fn directory(&self, path: &str) -> Result<Vec<String>, ErrorCode<'static>> {
        if !self.nodes.contains_key(path) {
            return Err(ErrorCode::Enoent);
        }
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        Ok(self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .filter_map(|(key, _)| key.get(prefix.len()..))
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .map(str::to_string)
            .collect())
    }

    fn create_ancestors(&mut self, path: &str) -> Result<(), ErrorCode<'static>> {
        let mut missing = Vec::new();
        let mut cursor = parent_of(path);
        while let Some(parent) = cursor {
            if self.nodes.contains_key(parent) {
                break;
            }
            missing.push(parent.to_string());
            cursor = parent_of(parent);
        }
        if self.nodes.len() + missing.len() + 1 > MAX_NODES {
            return Err(ErrorCode::Enospc);
        }
        for parent in missing {
            self.nodes.insert(parent, Vec::new());
        }
        Ok(())
    }

    /// Writes an absolute path (creating its ancestors) and returns the
    /// events it fires.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<Vec<Event>, ErrorCode<'static>> {
        if path == "/" {
            return Err(ErrorCode::Einval);
        }
        if !self.nodes.contains_key(path) {
            self.create_ancestors(path)?;
        }
        self.nodes.insert(path.to_string(), value.to_vec());
        Ok(self.events_for(path))
    }

    /// Creates an absolute path with an empty value if it does not exist.
    pub fn mkdir(&mut self, path: &str) -> Result<Vec<Event>, ErrorCode<'static>> {
        if self.nodes.contains_key(path) {
            return Ok(Vec::new());
        }
        self.write(path, b"")
    }

    /// Removes an absolute path and its subtree; returns the events.
    pub fn remove(&mut self, path: &str) -> Result<Vec<Event>, ErrorCode<'static>> {
        if path == "/" {
            return Err(ErrorCode::Einval);
        }
        if !self.nodes.contains_key(path) {
            // C xenstored: removing a missing node is fine if its parent exists.
            return match parent_of(path) {
                Some(parent) if self.nodes.contains_key(parent) => Ok(Vec::new()),
                _ => Err(ErrorCode::Enoent),
            };
        }
        let doomed: Vec<String> = self
            .nodes
            .range(path.to_string()..)
            .take_while(|(key, _)| key.starts_with(path))
            .map(|(key, _)| key.clone())
            .filter(|key| at_or_below(key, path))
            .collect();
        for key in &doomed {
            self.nodes.remove(key);
        }
        let mut events = self.events_for(path);
        // Watches strictly below the removed node fire with their own path.
        for watch in &self.watches {
            if watch.absolute != path && at_or_below(&watch.absolute, path) {
                events.push(Event {
                    connection: watch.connection,
                    path: watch.given.clone(),
                    token: watch.token.clone(),
                });
            }
        }
        Ok(events)
    }

    fn events_for(&self, changed: &str) -> Vec<Event> {
        self.watches
            .iter()
            .filter(|watch| at_or_below(changed, &watch.absolute))
            .map(|watch| Event {
                connection: watch.connection,
                path: match &watch.relative_base {
                    Some(base) => changed
                        .strip_prefix(base.as_str())
                        .and_then(|rest| rest.strip_prefix('/'))
                        .unwrap_or(changed)
                        .to_string(),
                    None => changed.to_string(),
                },
                token: watch.token.clone(),
            })
            .collect()
    }

    /// Sets a watch for `connection` (whose domain is `domid`) and returns
    /// the initial event. Special paths (`@introduceDomain`,
    /// `@releaseDomain`) are accepted; they fire only initially here.
    pub fn watch(
        &mut self,
        connection: ConnectionId,
        domid: u16,
        path: &str,
        token: &str,
    ) -> Result<Event, ErrorCode<'static>> {
        if self.watches.len() >= MAX_WATCHES {
            return Err(ErrorCode::E2big);
        }
        let (absolute_path, relative_base) = if path.starts_with('@') {
            if !matches!(path, "@introduceDomain" | "@releaseDomain") {
                return Err(ErrorCode::Einval);
            }
            (path.to_string(), None)
        } else {
            let absolute_path = absolute(path, domid)?;
            let base = (!path.starts_with('/')).then(|| domain_path(domid));
            (absolute_path, base)
        };
        if self
            .watches
            .iter()
            .any(|w| w.connection == connection && w.given == path && w.token == token)
        {
            return Err(ErrorCode::Eexist);
        }
        self.watches.push(Watch {
            connection,
            given: path.to_string(),
            absolute: absolute_path,
            relative_base,
            token: token.to_string(),
        });
        Ok(Event {
            connection,
            path: path.to_string(),
            token: token.to_string(),
        })
    }

    /// Removes one watch; `ENOENT` if there is none.
    pub fn unwatch(
        &mut self,
        connection: ConnectionId,
        path: &str,
        token: &str,
    ) -> Result<(), ErrorCode<'static>> {
        let before = self.watches.len();
        self.watches
            .retain(|w| !(w.connection == connection && w.given == path && w.token == token));
        if self.watches.len() == before {
            Err(ErrorCode::Enoent)
        } else {
            Ok(())
        }
    }

    /// Drops every watch of a connection (it closed, or RESET_WATCHES).
    pub fn forget(&mut self, connection: ConnectionId) {
        self.watches.retain(|w| w.connection != connection);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_creates_ancestors_and_directory_lists_children() {
        let mut store = Store::new();
        store.write("/backend/vif/5/0/ip", b"10.137.0.5").unwrap();
        assert_eq!(store.read("/backend/vif/5/0/ip").unwrap(), b"10.137.0.5");
        assert_eq!(store.read("/backend/vif").unwrap(), b"");
        assert_eq!(store.directory("/backend/vif").unwrap(), vec!["5"]);
        assert_eq!(store.directory("/backend/vif/5/0").unwrap(), vec!["ip"]);
        assert_eq!(store.directory("/").unwrap(), vec!["backend", "local"]);
        assert_eq!(store.read("/nope"), Err(ErrorCode::Enoent));
        assert_eq!(store.directory("/nope"), Err(ErrorCode::Enoent));
    }

    #[test]
    fn directory_does_not_confuse_siblings_with_common_prefixes() {
        let mut store = Store::new();
        store.write("/a/b", b"1").unwrap();
        store.write("/ab/c", b"2").unwrap();
        store.write("/a/b/c", b"3").unwrap();
        assert_eq!(store.directory("/a").unwrap(), vec!["b"]);
        store.remove("/a").unwrap();
        assert_eq!(store.read("/ab/c").unwrap(), b"2");
        assert_eq!(store.read("/a/b/c"), Err(ErrorCode::Enoent));
    }

    #[test]
    fn rm_of_missing_node_follows_xenstored() {
        let mut store = Store::new();
        store.write("/a/b", b"").unwrap();
        assert_eq!(store.remove("/a/zzz"), Ok(vec![]));
        assert_eq!(store.remove("/x/y"), Err(ErrorCode::Enoent));
        assert_eq!(store.remove("/"), Err(ErrorCode::Einval));
    }

    #[test]
    fn watches_fire_initially_on_changes_below_and_on_removal() {
        let mut store = Store::new();
        let initial = store.watch(1, 0, "/backend/vif", "vif").unwrap();
        assert_eq!(initial.path, "/backend/vif");
        let events = store.write("/backend/vif/5/0/ip", b"10.137.0.5").unwrap();
        assert_eq!(
            events,
            vec![Event {
                connection: 1,
                path: "/backend/vif/5/0/ip".into(),
                token: "vif".into()
            }]
        );
        assert!(store.write("/backend/vifx", b"").unwrap().is_empty());
        // A watch below a removed subtree fires with its own path.
        store.watch(2, 0, "/backend/vif/5/0/ip", "ip").unwrap();
        let events = store.remove("/backend/vif/5").unwrap();
        assert_eq!(events.len(), 2);
        assert!(
            events
                .iter()
                .any(|e| e.connection == 2 && e.path == "/backend/vif/5/0/ip")
        );
        store.unwatch(1, "/backend/vif", "vif").unwrap();
        assert_eq!(
            store.unwatch(1, "/backend/vif", "vif"),
            Err(ErrorCode::Enoent)
        );
        store.forget(2);
        assert!(store.write("/backend/vif/5/0/ip", b"x").unwrap().is_empty());
    }

    #[test]
    fn relative_watch_reports_relative_paths() {
        let mut store = Store::new();
        let initial = store.watch(7, 3, "control/shutdown", "ctl").unwrap();
        assert_eq!(initial.path, "control/shutdown");
        let events = store
            .write("/local/domain/3/control/shutdown", b"poweroff")
            .unwrap();
        assert_eq!(events[0].path, "control/shutdown");
        assert_eq!(
            absolute("control/shutdown", 3).unwrap(),
            "/local/domain/3/control/shutdown"
        );
    }

    #[test]
    fn bad_paths_and_special_watches() {
        let mut store = Store::new();
        assert_eq!(absolute("/a//b", 0), Err(ErrorCode::Einval));
        assert_eq!(absolute("/a/", 0), Err(ErrorCode::Einval));
        assert_eq!(absolute("/a b", 0), Err(ErrorCode::Einval));
        assert_eq!(absolute("", 0), Err(ErrorCode::Einval));
        assert!(store.watch(1, 0, "@releaseDomain", "r").is_ok());
        assert_eq!(store.watch(1, 0, "@bogus", "r"), Err(ErrorCode::Einval));
        assert_eq!(
            store.watch(1, 0, "@releaseDomain", "r"),
            Err(ErrorCode::Eexist)
        );
    }
}
