//! xenbus device state machines of our vifs, and the xenstore watches that
//! drive them.
//!
//! Facts (Xen `public/io/xenbus.h`; libxl device add/remove; Linux
//! `xen-netback` `frontend_changed` and `xen-netfront` `netback_changed`):
//! each end of a device writes its `state` node (1 Initialising, 2
//! InitWait, 3 Initialised, 4 Connected, 5 Closing, 6 Closed) and watches
//! the other end's. `xl network-detach` (and qubesd changing a qube's
//! netvm) writes the backend's `online` = 0 and `state` = 5, then waits up
//! to 10 s for the backend's `state` to reach 6 before it removes both
//! directories; a frontend that sees its backend Closing closes (Linux
//! netfront writes Closed at once). When the backend lives in a driver
//! domain (us), libxl in dom0 does not remove the backend directory
//! itself: it waits for the driver domain to remove it (`xl devd` does
//! that on Linux driver domains, after its hotplug script), so once we are
//! Closed with `online` = 0 we remove our own `backend/vif/<domid>/<dev>`,
//! a moment later (the platform waits a second): libxl must first read
//! Closed, and a state node gone before it did fails the detach. A
//! frontend that reset or reconnected with new rings between two looks at
//! its `state` (watches coalesce) gets its old rings released. A backend tears down when its frontend
//! goes Closing and reports Closed once the frontend is Closed (or gone:
//! the domain died). A new attach (another vif, or the same qube again
//! under a new domid) creates fresh directories: frontend and backend
//! Initialising, the backend then InitWait.
//!
//! [`BackendMachine`] is our side of a client's vif (we are the backend),
//! [`FrontendMachine`] our side of the uplink (we are the frontend). They
//! read both `state` nodes, write ours, and tell the platform when to map
//! or release rings. They never write into a directory that is gone (that
//! would recreate what the toolstack removed). [`Watches`] wraps the
//! xenstore client: events of the watches the platform sets on those nodes
//! (tokens starting with [`PLATFORM_TOKEN`]) only mark the devices for a
//! look in the next `wait`, every other event goes to the firewall as
//! before. Nothing polls on a timer. Portable; tested on the host against
//! the xenstore double with a toolstack and Linux peers acted out in the
//! tests.
#![deny(clippy::indexing_slicing)]

use alloc::collections::{BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::platform::{WatchEvent, Xenstore, XenstoreError};

/// `XenbusStateInitialising`.
pub const INITIALISING: u32 = 1;
/// `XenbusStateInitWait`.
pub const INIT_WAIT: u32 = 2;
/// `XenbusStateInitialised`.
pub const INITIALISED: u32 = 3;
/// `XenbusStateConnected`.
pub const CONNECTED: u32 = 4;
/// `XenbusStateClosing`.
pub const CLOSING: u32 = 5;
/// `XenbusStateClosed`.
pub const CLOSED: u32 = 6;

/// Token prefix of the platform's own watches.
pub const PLATFORM_TOKEN: &str = "qfw-xenbus:";

/// Parses a decimal written in xenstore by a peer (no sign, no spaces, no
/// overflow).
pub fn parse_decimal(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Reads a `state` node: `None` when it is missing, `Some(0)` (Unknown)
/// when it holds junk.
pub fn read_state<X: Xenstore>(xs: &mut X, path: &str) -> Result<Option<u32>, XenstoreError> {
    Ok(xs
        .read(path)?
        .map(|text| parse_decimal(&text).filter(|s| *s <= 8).unwrap_or(0)))
}

/// Reads the other end's `state`: a node we may no longer read (xenstored
/// answers EACCES once the peer's domain is being torn down) counts as gone.
fn read_peer_state<X: Xenstore>(xs: &mut X, path: &str) -> Option<u32> {
    read_state(xs, path).unwrap_or(None)
}

/// What the platform must do for a device after a look at its states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing.
    Stay,
    /// Map the peer's rings / grant ours (then call `connected`).
    Connect,
    /// Release the rings: the peer is closing or gone.
    Disconnect,
}

/// Where a device of ours stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the peer (backend: InitWait written).
    Waiting,
    /// Rings in use.
    Up,
    /// Released; Closing or Closed written.
    Down,
}

/// Offers a client's vif (our `backend` directory): what we serve
/// (`feature-rx-copy`; blank IPv4/IPv6 TCP/UDP checksums, multi-slot
/// packets and TCP GSO from the frontend, see `netback`), `hotplug-status` (what `xl devd` writes after its hotplug
/// script; libxl waits for it) and InitWait.
pub fn offer<X: Xenstore>(xs: &mut X, backend: &str) -> Result<(), XenstoreError> {
    xs.write(&format!("{backend}/feature-rx-copy"), "1")?;
    xs.write(&format!("{backend}/feature-rx-flip"), "0")?;
    xs.write(&format!("{backend}/feature-no-csum-offload"), "0")?;
    xs.write(&format!("{backend}/feature-ipv6-csum-offload"), "1")?;
    // Multi-slot TX packets and TCP GSO from the frontend (`netback.rs`).
    xs.write(&format!("{backend}/feature-sg"), "1")?;
    xs.write(&format!("{backend}/feature-gso-tcpv4"), "1")?;
    xs.write(&format!("{backend}/feature-gso-tcpv6"), "1")?;
    xs.write(&format!("{backend}/hotplug-status"), "connected")?;
    xs.write(&format!("{backend}/state"), &INIT_WAIT.to_string())
}

/// Our side of a client's vif: `backend/vif/<domid>/<dev>`.
#[derive(Debug, Clone)]
pub struct BackendMachine {
    /// Our directory (absolute).
    pub backend: String,
    /// The client's directory (absolute), from our `frontend` node.
    pub frontend: String,
    phase: Phase,
    /// The frontend's ring references and event channel we connected to.
    rings: Option<[Option<String>; 3]>,
}

impl BackendMachine {
    /// A backend that has just written InitWait.
    pub fn new(backend: String, frontend: String) -> Self {
        BackendMachine {
            backend,
            frontend,
            phase: Phase::Waiting,
            rings: None,
        }
    }

    /// The frontend's `tx-ring-ref`, `rx-ring-ref` and `event-channel` as
    /// written now (unreadable counts as absent).
    fn read_rings<X: Xenstore>(&self, xs: &mut X) -> [Option<String>; 3] {
        ["tx-ring-ref", "rx-ring-ref", "event-channel"]
            .map(|key| xs.read(&format!("{}/{key}", self.frontend)).ok().flatten())
    }

    /// Where it stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The nodes to watch.
    pub fn watched(&self) -> [String; 2] {
        [
            format!("{}/state", self.frontend),
            format!("{}/state", self.backend),
        ]
    }

    fn write_ours<X: Xenstore>(&self, xs: &mut X, state: u32) -> Result<(), XenstoreError> {
        let path = format!("{}/state", self.backend);
        // Never recreate a directory the toolstack removed.
        match read_state(xs, &path)? {
            Some(now) if now != state => xs.write(&path, &state.to_string())?,
            _ => {}
        }
        Ok(())
    }

    /// Looks at both states, writes ours, says what to do with the rings.
    pub fn progress<X: Xenstore>(&mut self, xs: &mut X) -> Result<Step, XenstoreError> {
        let ours = read_state(xs, &format!("{}/state", self.backend))?;
        let frontend = read_peer_state(xs, &format!("{}/state", self.frontend));
        let step = match (self.phase, frontend) {
            // The frontend went away (domain destroyed) or closed.
            (Phase::Up, None | Some(0 | CLOSED)) => {
                self.phase = Phase::Down;
                self.write_ours(xs, CLOSED)?;
                Step::Disconnect
            }
            (Phase::Up, Some(CLOSING)) => {
                self.phase = Phase::Down;
                self.write_ours(xs, CLOSING)?;
                Step::Disconnect
            }
            // The frontend reset while we were connected: its Closing and
            // Closed went by between two looks (a watch says the node
            // changed; we read only its latest value). Release the old
            // rings (Linux frees them once we unmap) and offer the device
            // again, unless the toolstack is taking it away.
            (Phase::Up, Some(INITIALISING | INIT_WAIT)) => {
                if ours.is_some() && ours != Some(CLOSING) {
                    self.phase = Phase::Waiting;
                    offer(xs, &self.backend)?;
                } else {
                    self.phase = Phase::Down;
                }
                Step::Disconnect
            }
            // Connected again with new rings before we saw it reset (its
            // whole Closing..Connected went by between two looks): release
            // the old ones; the caller connects to the new ones.
            (Phase::Up, Some(INITIALISED | CONNECTED))
                if self.rings.as_ref() != Some(&self.read_rings(xs)) =>
            {
                self.phase = Phase::Waiting;
                Step::Disconnect
            }
            (Phase::Waiting | Phase::Down, None | Some(0 | CLOSED)) => {
                // Frontend closed before connecting, or after we released:
                // report Closed so that a detach completes. A backend still
                // waiting for a frontend that has not appeared yet stays.
                if self.phase == Phase::Down || ours == Some(CLOSING) {
                    self.phase = Phase::Down;
                    self.write_ours(xs, CLOSED)?;
                }
                Step::Stay
            }
            (Phase::Waiting, Some(CLOSING)) => {
                self.phase = Phase::Down;
                self.write_ours(xs, CLOSING)?;
                Step::Stay
            }
            (Phase::Waiting, Some(INITIALISED | CONNECTED)) if ours != Some(CLOSING) => {
                Step::Connect
            }
            // A frontend reset (driver reloaded in the same domain), or
            // our directory recreated by a new attach before we looked:
            // offer the device again, as Linux netback does.
            (Phase::Down, Some(INITIALISING | INIT_WAIT)) if ours.is_some() => {
                if ours != Some(CLOSING) {
                    self.phase = Phase::Waiting;
                    offer(xs, &self.backend)?;
                }
                Step::Stay
            }
            _ => Step::Stay,
        };
        Ok(step)
    }

    /// True when our directory is ours to remove: Closed under a detach
    /// (`online` 0), as `xl devd` removes it after its hotplug script;
    /// libxl waits for that. The caller removes it with [`Self::remove`]
    /// a moment later, not at once: libxl first waits to read Closed in
    /// our `state`, and a state node removed before it read it fails the
    /// detach ("unable to remove device").
    pub fn removable<X: Xenstore>(&self, xs: &mut X) -> Result<bool, XenstoreError> {
        Ok(
            read_state(xs, &format!("{}/state", self.backend))? == Some(CLOSED)
                && xs.read(&format!("{}/online", self.backend))?.as_deref() == Some("0"),
        )
    }

    /// Removes our directory if it is still [`Self::removable`] (never one
    /// the toolstack recreated meanwhile).
    pub fn remove<X: Xenstore>(&self, xs: &mut X) -> Result<(), XenstoreError> {
        if self.removable(xs)? {
            xs.remove(&self.backend)?;
        }
        Ok(())
    }

    /// The rings are mapped: report Connected (and remember which rings,
    /// to see a frontend that reconnects with new ones).
    pub fn connected<X: Xenstore>(&mut self, xs: &mut X) -> Result<(), XenstoreError> {
        self.rings = Some(self.read_rings(xs));
        self.phase = Phase::Up;
        self.write_ours(xs, CONNECTED)
    }

    /// Connecting failed for good: report Closed.
    pub fn failed<X: Xenstore>(&mut self, xs: &mut X) -> Result<(), XenstoreError> {
        self.phase = Phase::Down;
        self.write_ours(xs, CLOSED)
    }
}

/// Our side of the uplink: `device/vif/<n>` (relative to our domain).
#[derive(Debug, Clone)]
pub struct FrontendMachine {
    /// Our directory.
    pub node: String,
    /// The backend's directory while connected (absolute).
    pub backend: Option<String>,
    /// The backend a fresh device of ours names, while we wait for it.
    offered: Option<String>,
    phase: Phase,
}

impl FrontendMachine {
    /// A frontend not connected yet.
    pub fn new(node: String) -> Self {
        FrontendMachine {
            node,
            backend: None,
            offered: None,
            phase: Phase::Waiting,
        }
    }

    /// Where it stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The nodes to watch: our directory (it is removed and recreated by a
    /// detach and attach) and the backend's state (while connected, or
    /// while a fresh device of ours waits for it).
    pub fn watched(&self) -> Vec<String> {
        let mut paths = alloc::vec![self.node.clone()];
        if let Some(backend) = self.backend.as_ref().or(self.offered.as_ref()) {
            paths.push(format!("{backend}/state"));
        }
        paths
    }

    /// The handshake wrote Connected against `backend`.
    pub fn connected(&mut self, backend: String) {
        self.backend = Some(backend);
        self.offered = None;
        self.phase = Phase::Up;
    }

    /// Looks at both states, writes ours, says what to do with the rings.
    pub fn progress<X: Xenstore>(&mut self, xs: &mut X) -> Result<Step, XenstoreError> {
        let ours_path = format!("{}/state", self.node);
        let ours = read_state(xs, &ours_path)?;
        match self.phase {
            Phase::Up => {
                let backend = match &self.backend {
                    Some(path) => read_peer_state(xs, &format!("{path}/state")),
                    None => None,
                };
                // Our directory replaced (state reset by a new attach), or
                // the backend closing, closed or gone (net qube died).
                let reset = matches!(ours, None | Some(INITIALISING));
                if reset || matches!(backend, None | Some(0 | CLOSING | CLOSED)) {
                    if matches!(ours, Some(s) if s != CLOSED && s != INITIALISING) {
                        xs.write(&ours_path, &CLOSED.to_string())?;
                    }
                    self.phase = Phase::Down;
                    self.backend = None;
                    return Ok(Step::Disconnect);
                }
                Ok(Step::Stay)
            }
            Phase::Waiting | Phase::Down => {
                // A fresh device from the toolstack: we are Initialising and
                // its backend waits for us.
                if ours != Some(INITIALISING) {
                    return Ok(Step::Stay);
                }
                let Some(backend) = xs.read(&format!("{}/backend", self.node))? else {
                    return Ok(Step::Stay);
                };
                self.offered = Some(backend.clone());
                match read_peer_state(xs, &format!("{backend}/state")) {
                    Some(INIT_WAIT | INITIALISED | CONNECTED) => Ok(Step::Connect),
                    _ => Ok(Step::Stay),
                }
            }
        }
    }
}

/// The xenstore client with the platform's watches taken out of the
/// firewall's event stream.
#[derive(Debug)]
pub struct Watches<X> {
    inner: X,
    dirty: bool,
    held: VecDeque<WatchEvent>,
    watched: BTreeSet<String>,
}

impl<X: Xenstore> Watches<X> {
    /// Wraps a client.
    pub fn new(inner: X) -> Self {
        Watches {
            inner,
            dirty: false,
            held: VecDeque::new(),
            watched: BTreeSet::new(),
        }
    }

    /// Moves every queued event: the platform's mark the devices dirty,
    /// the others wait for the firewall's `poll_watch`.
    pub fn collect(&mut self) {
        while let Some(event) = self.inner.poll_watch() {
            if event.token.starts_with(PLATFORM_TOKEN) {
                self.dirty = true;
            } else {
                self.held.push_back(event);
            }
        }
    }

    /// Whether a watched device node changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        self.collect();
        core::mem::take(&mut self.dirty)
    }

    /// Marks the devices for a look (after the platform changed them).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Watches `path` for the platform (once; xenstored fires it at once).
    pub fn watch_node(&mut self, path: &str) -> Result<(), XenstoreError> {
        if self.watched.contains(path) {
            return Ok(());
        }
        self.inner.watch(path, &format!("{PLATFORM_TOKEN}{path}"))?;
        self.watched.insert(path.to_string());
        Ok(())
    }

    /// Stops watching `path`.
    pub fn unwatch_node(&mut self, path: &str) {
        if self.watched.remove(path) {
            let _ = self.inner.unwatch(path, &format!("{PLATFORM_TOKEN}{path}"));
        }
    }

    /// Paths the platform watches now.
    pub fn watched_nodes(&self) -> impl Iterator<Item = &String> {
        self.watched.iter()
    }

    /// The wrapped client.
    pub fn inner_mut(&mut self) -> &mut X {
        &mut self.inner
    }
}

impl<X> core::ops::Deref for Watches<X> {
    type Target = X;
    fn deref(&self) -> &X {
        &self.inner
    }
}

impl<X> core::ops::DerefMut for Watches<X> {
    fn deref_mut(&mut self) -> &mut X {
        &mut self.inner
    }
}

impl<X: Xenstore> Xenstore for Watches<X> {
    fn read(&mut self, path: &str) -> Result<Option<String>, XenstoreError> {
        self.inner.read(path)
    }
    fn write(&mut self, path: &str, value: &str) -> Result<(), XenstoreError> {
        self.inner.write(path, value)
    }
    fn remove(&mut self, path: &str) -> Result<(), XenstoreError> {
        self.inner.remove(path)
    }
    fn directory(&mut self, path: &str) -> Result<Vec<String>, XenstoreError> {
        self.inner.directory(path)
    }
    fn watch(&mut self, path: &str, token: &str) -> Result<(), XenstoreError> {
        self.inner.watch(path, token)
    }
    fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XenstoreError> {
        self.inner.unwatch(path, token)
    }
    fn poll_watch(&mut self) -> Option<WatchEvent> {
        if self.held.is_empty() {
            self.collect();
        }
        self.held.pop_front()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;
    use crate::testing::FakeXenstore;

    const BACK: &str = "/local/domain/2/backend/vif/7/0";
    const FRONT: &str = "/local/domain/7/device/vif/0";

    /// libxl adding a vif: both directories, Initialising; our backend
    /// writes InitWait (as `attach_client` does).
    fn attach(xs: &FakeXenstore, domid: u16) -> BackendMachine {
        let back = format!("/local/domain/2/backend/vif/{domid}/0");
        let front = format!("/local/domain/{domid}/device/vif/0");
        xs.set(&format!("{front}/state"), "1");
        xs.set(&format!("{front}/backend"), &back);
        xs.set(&format!("{back}/frontend"), &front);
        xs.set(&format!("{back}/online"), "1");
        xs.set(&format!("{back}/state"), "2");
        BackendMachine::new(back, front)
    }

    fn state(xs: &mut FakeXenstore, path: &str) -> Option<String> {
        xs.read(&format!("{path}/state")).unwrap()
    }

    #[test]
    fn a_linux_client_connects_detaches_and_comes_back_under_a_new_domid() {
        let mut xs = FakeXenstore::new();
        let mut back = attach(&xs, 7);
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        // Linux netfront: rings written, Connected.
        xs.set(&format!("{FRONT}/state"), "4");
        assert_eq!(back.progress(&mut xs), Ok(Step::Connect));
        back.connected(&mut xs).unwrap();
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("4"));
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        // xl network-detach: online 0, backend Closing.
        xs.set(&format!("{BACK}/online"), "0");
        xs.set(&format!("{BACK}/state"), "5");
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        // Linux netfront sees Closing and writes Closed (older ones go
        // through Closing first).
        xs.set(&format!("{FRONT}/state"), "5");
        assert_eq!(back.progress(&mut xs), Ok(Step::Disconnect));
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("5"));
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        xs.set(&format!("{FRONT}/state"), "6");
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        // Closed, and our directory kept (libxl must read Closed first);
        // removable, and removed when the caller says so.
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("6"));
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("6"));
        assert_eq!(back.removable(&mut xs), Ok(true));
        back.remove(&mut xs).unwrap();
        // Gone (libxl waits for that when the backend is a driver
        // domain); libxl removes the frontend's. We never recreate either.
        assert_eq!(state(&mut xs, BACK), None);
        assert_eq!(back.removable(&mut xs), Ok(false));
        xs.remove(FRONT).unwrap();
        assert_eq!(xs.read(&format!("{BACK}/frontend")).unwrap(), None);
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        assert_eq!(state(&mut xs, BACK), None);
        // The same qube started again: a new domid, a new device.
        let mut again = attach(&xs, 9);
        xs.set("/local/domain/9/device/vif/0/state", "4");
        assert_eq!(again.progress(&mut xs), Ok(Step::Connect));
        again.connected(&mut xs).unwrap();
        assert_eq!(
            state(&mut xs, "/local/domain/2/backend/vif/9/0").as_deref(),
            Some("4")
        );
    }

    #[test]
    fn a_client_that_dies_or_closes_at_once_is_released_and_closed() {
        let mut xs = FakeXenstore::new();
        let mut back = attach(&xs, 7);
        xs.set(&format!("{FRONT}/state"), "3");
        assert_eq!(back.progress(&mut xs), Ok(Step::Connect));
        back.connected(&mut xs).unwrap();
        // xl destroy: the frontend's directory goes first.
        xs.remove("/local/domain/7").unwrap();
        assert_eq!(back.progress(&mut xs), Ok(Step::Disconnect));
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("6"));
        assert_eq!(back.phase(), Phase::Down);
        // xenstored refusing the frontend's node (domain being torn down)
        // counts as gone.
        let mut refused = attach(&xs, 12);
        xs.set("/local/domain/12/device/vif/0/state", "4");
        assert_eq!(refused.progress(&mut xs), Ok(Step::Connect));
        refused.connected(&mut xs).unwrap();
        xs.fail_below("/local/domain/12", "EACCES");
        assert_eq!(refused.progress(&mut xs), Ok(Step::Disconnect));
        assert_eq!(
            state(&mut xs, "/local/domain/2/backend/vif/12/0").as_deref(),
            Some("6")
        );
        // A frontend that closes before ever connecting, under a detach:
        // Closed, and (online 0) our directory removed.
        let mut early = attach(&xs, 8);
        xs.set("/local/domain/2/backend/vif/8/0/state", "5");
        xs.set("/local/domain/8/device/vif/0/state", "6");
        assert_eq!(early.progress(&mut xs), Ok(Step::Stay));
        assert_eq!(
            state(&mut xs, "/local/domain/2/backend/vif/8/0").as_deref(),
            Some("6")
        );
        assert_eq!(early.removable(&mut xs), Ok(false), "online is 1");
        xs.set("/local/domain/2/backend/vif/8/0/online", "0");
        assert_eq!(early.progress(&mut xs), Ok(Step::Stay));
        assert_eq!(
            state(&mut xs, "/local/domain/2/backend/vif/8/0").as_deref(),
            Some("6")
        );
        early.remove(&mut xs).unwrap();
        assert_eq!(state(&mut xs, "/local/domain/2/backend/vif/8/0"), None);
        // A frontend that is not there yet is waited for, not closed.
        let mut slow = attach(&xs, 10);
        xs.remove("/local/domain/10").unwrap();
        assert_eq!(slow.progress(&mut xs), Ok(Step::Stay));
        assert_eq!(
            state(&mut xs, "/local/domain/2/backend/vif/10/0").as_deref(),
            Some("2")
        );
    }

    #[test]
    fn a_frontend_reset_seen_only_as_initialising_releases_the_old_rings() {
        let mut xs = FakeXenstore::new();
        let mut back = attach(&xs, 7);
        xs.set(&format!("{FRONT}/state"), "4");
        assert_eq!(back.progress(&mut xs), Ok(Step::Connect));
        back.connected(&mut xs).unwrap();
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("4"));
        // Closing, Closed and Initialising happened before we looked.
        xs.remove(&format!("{BACK}/hotplug-status")).unwrap();
        xs.set(&format!("{FRONT}/state"), "1");
        assert_eq!(back.progress(&mut xs), Ok(Step::Disconnect));
        assert_eq!(back.phase(), Phase::Waiting);
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("2"));
        assert_eq!(
            xs.read(&format!("{BACK}/hotplug-status"))
                .unwrap()
                .as_deref(),
            Some("connected")
        );
        // Nothing more to release while it initialises; it connects anew.
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        xs.set(&format!("{FRONT}/state"), "4");
        assert_eq!(back.progress(&mut xs), Ok(Step::Connect));
        back.connected(&mut xs).unwrap();
        // The same seen while the toolstack takes the device away (ours
        // Closing): released, not offered again.
        xs.set(&format!("{BACK}/state"), "5");
        xs.set(&format!("{FRONT}/state"), "2");
        assert_eq!(back.progress(&mut xs), Ok(Step::Disconnect));
        assert_eq!(back.phase(), Phase::Down);
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("5"));
    }

    #[test]
    fn a_frontend_back_at_connected_with_new_rings_is_reconnected() {
        let mut xs = FakeXenstore::new();
        let mut back = attach(&xs, 7);
        xs.set(&format!("{FRONT}/tx-ring-ref"), "8");
        xs.set(&format!("{FRONT}/rx-ring-ref"), "9");
        xs.set(&format!("{FRONT}/event-channel"), "3");
        xs.set(&format!("{FRONT}/state"), "4");
        assert_eq!(back.progress(&mut xs), Ok(Step::Connect));
        back.connected(&mut xs).unwrap();
        // Nothing changed: stay.
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        // The frontend reset and connected again between two looks.
        xs.set(&format!("{FRONT}/tx-ring-ref"), "12");
        assert_eq!(back.progress(&mut xs), Ok(Step::Disconnect));
        assert_eq!(back.phase(), Phase::Waiting);
        assert_eq!(back.progress(&mut xs), Ok(Step::Connect));
        back.connected(&mut xs).unwrap();
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        // A new event channel alone counts too.
        xs.set(&format!("{FRONT}/event-channel"), "5");
        assert_eq!(back.progress(&mut xs), Ok(Step::Disconnect));
    }

    #[test]
    fn a_frontend_reset_is_offered_the_device_again_and_junk_states_are_unknown() {
        let mut xs = FakeXenstore::new();
        let mut back = attach(&xs, 7);
        xs.set(&format!("{FRONT}/state"), "4");
        assert_eq!(back.progress(&mut xs), Ok(Step::Connect));
        back.connected(&mut xs).unwrap();
        // Junk in the frontend's state is Unknown: treated as gone.
        xs.set(&format!("{FRONT}/state"), "-1; rm -rf");
        assert_eq!(back.progress(&mut xs), Ok(Step::Disconnect));
        xs.set(&format!("{FRONT}/state"), "1");
        assert_eq!(back.progress(&mut xs), Ok(Step::Stay));
        assert_eq!(state(&mut xs, BACK).as_deref(), Some("2"));
        // Offered again in full (a recreated directory has none of it).
        for key in [
            "feature-rx-copy",
            "hotplug-status",
            "feature-ipv6-csum-offload",
            "feature-sg",
            "feature-gso-tcpv4",
            "feature-gso-tcpv6",
        ] {
            assert!(
                xs.read(&format!("{BACK}/{key}")).unwrap().is_some(),
                "{key}"
            );
        }
        xs.set(&format!("{FRONT}/state"), "4");
        assert_eq!(back.progress(&mut xs), Ok(Step::Connect));
    }

    /// libxl attaching our uplink against a backend in `backend_dom`.
    fn uplink(xs: &FakeXenstore, backend_dom: u16) -> String {
        let back = format!("/local/domain/{backend_dom}/backend/vif/2/0");
        xs.set("device/vif/0/state", "1");
        xs.set("device/vif/0/backend", &back);
        xs.set("device/vif/0/backend-id", &backend_dom.to_string());
        xs.set(&format!("{back}/state"), "2");
        back
    }

    #[test]
    fn the_uplink_closes_when_the_net_qube_goes_and_reconnects_when_it_is_back() {
        let mut xs = FakeXenstore::new();
        let back = uplink(&xs, 1);
        let mut front = FrontendMachine::new("device/vif/0".to_string());
        assert_eq!(front.progress(&mut xs), Ok(Step::Connect));
        // The handshake (platform): our state Connected; the backend too.
        xs.write("device/vif/0/state", "4").unwrap();
        front.connected(back.clone());
        xs.set(&format!("{back}/state"), "4");
        assert_eq!(front.progress(&mut xs), Ok(Step::Stay));
        assert!(front.watched().contains(&format!("{back}/state")));
        // sys-net shuts down: its backend closes.
        xs.set(&format!("{back}/state"), "5");
        assert_eq!(front.progress(&mut xs), Ok(Step::Disconnect));
        assert_eq!(xs.read("device/vif/0/state").unwrap().as_deref(), Some("6"));
        assert_eq!(front.progress(&mut xs), Ok(Step::Stay));
        // qubesd detaches (directories removed), sys-net comes back as
        // domain 11, qubesd attaches a new vif: we connect again.
        xs.remove("device/vif/0").unwrap();
        xs.remove(&back).unwrap();
        assert_eq!(front.progress(&mut xs), Ok(Step::Stay));
        let back2 = uplink(&xs, 11);
        xs.set(&format!("{back2}/state"), "1");
        assert_eq!(front.progress(&mut xs), Ok(Step::Stay)); // hotplug not done
        // The new backend's state is watched while we wait for it.
        assert!(front.watched().contains(&format!("{back2}/state")));
        xs.set(&format!("{back2}/state"), "2");
        assert_eq!(front.progress(&mut xs), Ok(Step::Connect));
        front.connected(back2.clone());
        // The net qube killed outright: its backend directory vanishes.
        xs.write("device/vif/0/state", "4").unwrap();
        xs.remove("/local/domain/11").unwrap();
        assert_eq!(front.progress(&mut xs), Ok(Step::Disconnect));
    }

    #[test]
    fn an_uplink_directory_replaced_under_a_live_connection_disconnects() {
        let mut xs = FakeXenstore::new();
        let back = uplink(&xs, 1);
        let mut front = FrontendMachine::new("device/vif/0".to_string());
        assert_eq!(front.progress(&mut xs), Ok(Step::Connect));
        xs.write("device/vif/0/state", "4").unwrap();
        front.connected(back.clone());
        xs.set(&format!("{back}/state"), "4");
        // Detach and attach done quickly (between two looks): our state
        // reads Initialising again.
        uplink(&xs, 1);
        assert_eq!(front.progress(&mut xs), Ok(Step::Disconnect));
        assert_eq!(xs.read("device/vif/0/state").unwrap().as_deref(), Some("1"));
        assert_eq!(front.progress(&mut xs), Ok(Step::Connect));
    }

    #[test]
    fn platform_watch_events_are_kept_from_the_firewall() {
        let xs = FakeXenstore::new();
        let mut watches = Watches::new(xs.clone());
        watches.watch("backend/vif", "vif").unwrap();
        watches.watch_node(&format!("{FRONT}/state")).unwrap();
        watches.watch_node(&format!("{FRONT}/state")).unwrap(); // once
        assert!(watches.take_dirty()); // xenstored fires a new watch at once
        assert!(!watches.take_dirty());
        xs.set(&format!("{FRONT}/state"), "4");
        xs.set("backend/vif/7/0/ip", "10.137.0.10");
        let event = watches.poll_watch().unwrap(); // the firewall's first one
        assert_eq!(event.token, "vif");
        assert!(watches.take_dirty());
        let mut rest = Vec::new();
        while let Some(event) = watches.poll_watch() {
            rest.push(event.token);
        }
        assert_eq!(rest, ["vif"]);
        watches.unwatch_node(&format!("{FRONT}/state"));
        xs.set(&format!("{FRONT}/state"), "6");
        assert!(!watches.take_dirty());
        assert_eq!(watches.watched_nodes().count(), 0);
    }
}
