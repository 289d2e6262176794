//! Test doubles: a [`Platform`] made of in-memory fakes that a test drives
//! as if it were dom0, the net qube and the client qubes.
//!
//! - [`FakeClock`]: a monotonic clock that moves only when the test (or
//!   [`FakePlatform::wait`] with a deadline) advances it.
//! - [`FakeVchan`] / [`VchanPeer`]: an in-memory byte stream; the firewall
//!   holds the `FakeVchan` end, the test holds the `VchanPeer` end and plays
//!   dom0 (qubesdb-daemon, qrexec-daemon, qrexec-client). The VM-to-peer
//!   direction can be given a capacity to exercise back-pressure.
//! - [`FakeXenstore`]: a path → value map with watches that queue events
//!   the way xenstored does (one event right away, then one per change at or
//!   below the watched path).
//! - [`FakeNic`] / [`NicHandle`]: a `smoltcp::phy::Device` with inspectable
//!   receive and transmit queues.
//! - [`FakePlatform`] / [`PlatformHandle`]: the platform the firewall gets,
//!   and the test's view of the same shared state. An optional script hook
//!   runs inside every `wait`, so a whole program run can be played.
//!
//! Everything here is `alloc`-only and single-threaded (`Rc<RefCell<_>>`),
//! so it compiles into the no_std crate and is usable from unit tests and
//! from `unikernel/tests/`. It must never be used by the real platforms: a
//! fake may panic when a *test* misuses it (e.g. a run that never ends), a
//! real platform may not.
#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Duration;

use crate::platform::{
    ByteStream, HeapUsage, Instant, LinkState, Platform, PlatformError, Shutdown, StreamError,
    WatchEvent, Xenstore, XenstoreError,
};

// ---------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------

/// A monotonic clock under the test's control. Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct FakeClock {
    micros: Rc<Cell<i64>>,
}

impl FakeClock {
    /// A clock at time zero.
    pub fn new() -> FakeClock {
        FakeClock::default()
    }
    /// The current time.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.micros.get())
    }
    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.total_micros()).unwrap_or(i64::MAX);
        self.micros.set(self.micros.get().saturating_add(by));
    }
    /// Moves time forward to `to` (never backwards: the clock is monotonic).
    pub fn advance_to(&self, to: Instant) {
        if to.total_micros() > self.micros.get() {
            self.micros.set(to.total_micros());
        }
    }
}

// ---------------------------------------------------------------------------
// Vchan
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Pipe {
    to_vm: VecDeque<u8>,
    to_peer: VecDeque<u8>,
    state: LinkState,
    /// How many bytes the VM-to-peer direction holds before writes are
    /// refused (`usize::MAX`: unbounded).
    capacity: usize,
    /// Set when the VM closed its end (as opposed to the peer).
    closed_by_vm: bool,
}

impl Pipe {
    fn new(state: LinkState) -> Pipe {
        Pipe {
            to_vm: VecDeque::new(),
            to_peer: VecDeque::new(),
            state,
            capacity: usize::MAX,
            closed_by_vm: false,
        }
    }
}

/// The firewall's end of an in-memory vchan.
#[derive(Debug)]
pub struct FakeVchan {
    pipe: Rc<RefCell<Pipe>>,
}

impl ByteStream for FakeVchan {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        let mut pipe = self.pipe.borrow_mut();
        if pipe.to_vm.is_empty() {
            return match pipe.state {
                LinkState::Closed => Err(StreamError::Closed),
                LinkState::Waiting | LinkState::Connected => Ok(0),
            };
        }
        let mut n = 0;
        for slot in buf.iter_mut() {
            match pipe.to_vm.pop_front() {
                Some(byte) => {
                    *slot = byte;
                    n += 1;
                }
                None => break,
            }
        }
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        let mut pipe = self.pipe.borrow_mut();
        match pipe.state {
            LinkState::Closed => Err(StreamError::Closed),
            LinkState::Waiting => Ok(0),
            LinkState::Connected => {
                let room = pipe.capacity.saturating_sub(pipe.to_peer.len());
                let n = room.min(buf.len());
                pipe.to_peer.extend(buf.iter().take(n));
                Ok(n)
            }
        }
    }

    fn state(&self) -> LinkState {
        self.pipe.borrow().state
    }

    fn close(&mut self) {
        let mut pipe = self.pipe.borrow_mut();
        if pipe.state != LinkState::Closed {
            pipe.closed_by_vm = true;
        }
        pipe.state = LinkState::Closed;
    }
}

/// The test's (dom0's) end of an in-memory vchan.
#[derive(Clone, Debug)]
pub struct VchanPeer {
    pipe: Rc<RefCell<Pipe>>,
}

impl VchanPeer {
    /// Attaches the peer: the link becomes `Connected` (unless closed).
    pub fn connect(&self) {
        let mut pipe = self.pipe.borrow_mut();
        if pipe.state == LinkState::Waiting {
            pipe.state = LinkState::Connected;
        }
    }
    /// Queues bytes for the firewall to read.
    pub fn send(&self, bytes: &[u8]) {
        self.pipe.borrow_mut().to_vm.extend(bytes.iter().copied());
    }
    /// Takes every byte the firewall has written so far.
    pub fn take(&self) -> Vec<u8> {
        self.pipe.borrow_mut().to_peer.drain(..).collect()
    }
    /// How many bytes the firewall has written and the peer not yet taken.
    pub fn pending(&self) -> usize {
        self.pipe.borrow().to_peer.len()
    }
    /// How many bytes the peer sent that the firewall has not read yet.
    pub fn unread(&self) -> usize {
        self.pipe.borrow().to_vm.len()
    }
    /// Limits how many unread bytes the VM-to-peer direction holds.
    pub fn set_capacity(&self, capacity: usize) {
        self.pipe.borrow_mut().capacity = capacity;
    }
    /// Closes the link from the peer's side.
    pub fn close(&self) {
        self.pipe.borrow_mut().state = LinkState::Closed;
    }
    /// The state of the link.
    pub fn state(&self) -> LinkState {
        self.pipe.borrow().state
    }
    /// True when the firewall closed its end.
    pub fn closed_by_vm(&self) -> bool {
        self.pipe.borrow().closed_by_vm
    }
}

/// Makes a connected pair: the firewall's end and the test's end.
pub fn vchan_pair() -> (FakeVchan, VchanPeer) {
    let pipe = Rc::new(RefCell::new(Pipe::new(LinkState::Connected)));
    (FakeVchan { pipe: pipe.clone() }, VchanPeer { pipe })
}

// ---------------------------------------------------------------------------
// Xenstore
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Store {
    values: BTreeMap<String, String>,
    watches: Vec<(String, String)>,
    events: VecDeque<WatchEvent>,
    /// Every write the firewall made, in order (path, value).
    writes_by_vm: Vec<(String, String)>,
    /// Paths for which the fake answers every request with this error.
    failing: BTreeMap<String, String>,
}

impl Store {
    fn fire(&mut self, path: &str) {
        let mut fired = Vec::new();
        for (watched, token) in &self.watches {
            if is_at_or_below(path, watched) {
                fired.push(WatchEvent {
                    path: path.to_string(),
                    token: token.clone(),
                });
            }
        }
        self.events.extend(fired);
    }

    fn check(&self, path: &str) -> Result<(), XenstoreError> {
        for (prefix, error) in &self.failing {
            if is_at_or_below(path, prefix) {
                return Err(XenstoreError::Daemon(error.clone()));
            }
        }
        Ok(())
    }
}

fn is_at_or_below(path: &str, watched: &str) -> bool {
    path == watched
        || (path.starts_with(watched) && path.as_bytes().get(watched.len()) == Some(&b'/'))
}

/// An in-memory xenstore. Clones share the same store, so the test keeps a
/// clone (via [`PlatformHandle::xenstore`]) to play the toolstack.
#[derive(Clone, Debug, Default)]
pub struct FakeXenstore {
    store: Rc<RefCell<Store>>,
}

impl FakeXenstore {
    /// An empty store.
    pub fn new() -> FakeXenstore {
        FakeXenstore::default()
    }
    /// Writes as the toolstack would (fires watches; not logged as a VM write).
    pub fn set(&self, path: &str, value: &str) {
        let mut store = self.store.borrow_mut();
        store.values.insert(path.to_string(), value.to_string());
        store.fire(path);
    }
    /// Removes a path and everything below it, as the toolstack would.
    pub fn unset(&self, path: &str) {
        let mut store = self.store.borrow_mut();
        store.values.retain(|key, _| !is_at_or_below(key, path));
        store.fire(path);
    }
    /// Reads a value.
    pub fn get(&self, path: &str) -> Option<String> {
        self.store.borrow().values.get(path).cloned()
    }
    /// Every write the firewall made, in order.
    pub fn writes_by_vm(&self) -> Vec<(String, String)> {
        self.store.borrow().writes_by_vm.clone()
    }
    /// The watches currently registered (path, token).
    pub fn watches(&self) -> Vec<(String, String)> {
        self.store.borrow().watches.clone()
    }
    /// Makes every request at or below `path` fail with `error` (e.g.
    /// `EACCES`), to test error handling.
    pub fn fail_below(&self, path: &str, error: &str) {
        self.store
            .borrow_mut()
            .failing
            .insert(path.to_string(), error.to_string());
    }
}

impl Xenstore for FakeXenstore {
    fn read(&mut self, path: &str) -> Result<Option<String>, XenstoreError> {
        let store = self.store.borrow();
        store.check(path)?;
        Ok(store.values.get(path).cloned())
    }

    fn write(&mut self, path: &str, value: &str) -> Result<(), XenstoreError> {
        let mut store = self.store.borrow_mut();
        store.check(path)?;
        store.values.insert(path.to_string(), value.to_string());
        store
            .writes_by_vm
            .push((path.to_string(), value.to_string()));
        store.fire(path);
        Ok(())
    }

    fn remove(&mut self, path: &str) -> Result<(), XenstoreError> {
        let mut store = self.store.borrow_mut();
        store.check(path)?;
        store.values.retain(|key, _| !is_at_or_below(key, path));
        store.fire(path);
        Ok(())
    }

    fn directory(&mut self, path: &str) -> Result<Vec<String>, XenstoreError> {
        let store = self.store.borrow();
        store.check(path)?;
        let mut children: Vec<String> = Vec::new();
        for key in store.values.keys() {
            let Some(rest) = key.strip_prefix(path) else {
                continue;
            };
            let Some(rest) = rest.strip_prefix('/') else {
                continue;
            };
            let child = rest.split('/').next().unwrap_or(rest);
            if !child.is_empty() && children.last().map(String::as_str) != Some(child) {
                children.push(child.to_string());
            }
        }
        children.sort();
        children.dedup();
        Ok(children)
    }

    fn watch(&mut self, path: &str, token: &str) -> Result<(), XenstoreError> {
        let mut store = self.store.borrow_mut();
        store.check(path)?;
        store.watches.push((path.to_string(), token.to_string()));
        store.events.push_back(WatchEvent {
            path: path.to_string(),
            token: token.to_string(),
        });
        Ok(())
    }

    fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XenstoreError> {
        let mut store = self.store.borrow_mut();
        let before = store.watches.len();
        store.watches.retain(|(p, t)| !(p == path && t == token));
        if store.watches.len() == before {
            return Err(XenstoreError::Daemon("ENOENT".to_string()));
        }
        Ok(())
    }

    fn poll_watch(&mut self) -> Option<WatchEvent> {
        self.store.borrow_mut().events.pop_front()
    }
}

// ---------------------------------------------------------------------------
// NIC
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct NicQueues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
    /// Frames the transmit queue holds before `transmit` says "full".
    tx_capacity: usize,
}

/// A NIC whose frames the test injects and inspects. Implements
/// `smoltcp::phy::Device` (Ethernet medium, MTU 1514 by default).
#[derive(Debug)]
pub struct FakeNic {
    queues: Rc<RefCell<NicQueues>>,
}

/// The test's view of a [`FakeNic`]: the wire on the other side.
#[derive(Clone, Debug)]
pub struct NicHandle {
    queues: Rc<RefCell<NicQueues>>,
}

/// Makes a NIC and the test's handle to it.
pub fn nic_pair() -> (FakeNic, NicHandle) {
    let queues = Rc::new(RefCell::new(NicQueues {
        rx: VecDeque::new(),
        tx: VecDeque::new(),
        mtu: 1514,
        tx_capacity: usize::MAX,
    }));
    (
        FakeNic {
            queues: queues.clone(),
        },
        NicHandle { queues },
    )
}

impl NicHandle {
    /// Delivers a frame to the firewall (as if it arrived on the wire).
    pub fn inject(&self, frame: &[u8]) {
        self.queues.borrow_mut().rx.push_back(frame.to_vec());
    }
    /// Takes every frame the firewall transmitted so far.
    pub fn take_sent(&self) -> Vec<Vec<u8>> {
        self.queues.borrow_mut().tx.drain(..).collect()
    }
    /// Frames injected but not yet received by the firewall.
    pub fn pending_rx(&self) -> usize {
        self.queues.borrow().rx.len()
    }
    /// Limits the transmit queue (frames), to test a full ring.
    pub fn set_tx_capacity(&self, frames: usize) {
        self.queues.borrow_mut().tx_capacity = frames;
    }
}

/// A received frame.
#[derive(Debug)]
pub struct FakeRxToken {
    frame: Vec<u8>,
}

impl phy::RxToken for FakeRxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.frame)
    }
}

/// A transmit slot on a [`FakeNic`].
#[derive(Debug)]
pub struct FakeTxToken {
    queues: Rc<RefCell<NicQueues>>,
}

impl phy::TxToken for FakeTxToken {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        self.queues.borrow_mut().tx.push_back(frame);
        result
    }
}

impl crate::offload::OffloadNic for FakeNic {}

impl phy::Device for FakeNic {
    type RxToken<'a> = FakeRxToken;
    type TxToken<'a> = FakeTxToken;

    fn receive(&mut self, _timestamp: Instant) -> Option<(FakeRxToken, FakeTxToken)> {
        let frame = self.queues.borrow_mut().rx.pop_front()?;
        Some((
            FakeRxToken { frame },
            FakeTxToken {
                queues: self.queues.clone(),
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<FakeTxToken> {
        let queues = self.queues.borrow();
        if queues.tx.len() >= queues.tx_capacity {
            return None;
        }
        Some(FakeTxToken {
            queues: self.queues.clone(),
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.queues.borrow().mtu;
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}

// ---------------------------------------------------------------------------
// Platform
// ---------------------------------------------------------------------------

/// A script step run inside [`FakePlatform::wait`]: it gets the test's
/// handle and the number of the wait call (from 0).
pub type WaitHook = Box<dyn FnMut(&PlatformHandle, usize)>;

#[derive(Default)]
struct Shared {
    /// Servers the test offered (dom0 as vchan server) and the firewall has
    /// not connected to yet.
    offers: BTreeMap<(u16, u32), Rc<RefCell<Pipe>>>,
    /// The latest vchan for each (peer, port), either end.
    latest: BTreeMap<(u16, u32), Rc<RefCell<Pipe>>>,
    /// Every vchan the firewall opened, in order: (peer, port, as server).
    opened: Vec<(u16, u32, bool)>,
    uplink: Option<NicHandle>,
    uplink_taken: bool,
    clients: BTreeMap<(u16, u32), NicHandle>,
    /// Vifs whose attach fails (to test a broken backend).
    broken_vifs: Vec<(u16, u32)>,
    waits: usize,
    /// How many seeds the firewall drew.
    seeds_drawn: u64,
    max_waits: usize,
    hook: Option<WaitHook>,
    vchan_limit: usize,
    /// Client opens still to refuse on (peer, port), as the Xen platform
    /// refuses one whose server has not written its xenstore keys yet.
    refused_clients: BTreeMap<(u16, u32), usize>,
    /// What `heap_usage` answers (set by the test).
    heap: Option<HeapUsage>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("opened", &self.opened)
            .field("clients", &self.clients.keys().collect::<Vec<_>>())
            .field("waits", &self.waits)
            .finish_non_exhaustive()
    }
}

/// The platform the firewall runs on in host tests.
#[derive(Debug)]
pub struct FakePlatform {
    domid: u16,
    memory_bytes: usize,
    clock: FakeClock,
    xenstore: FakeXenstore,
    shared: Rc<RefCell<Shared>>,
}

/// The test's view of a [`FakePlatform`]: clock, xenstore, vchans, NICs.
#[derive(Clone, Debug)]
pub struct PlatformHandle {
    clock: FakeClock,
    xenstore: FakeXenstore,
    shared: Rc<RefCell<Shared>>,
}

impl FakePlatform {
    /// A platform for domain `domid` with `memory_bytes` of RAM, and the
    /// test's handle to it.
    pub fn new(domid: u16, memory_bytes: usize) -> (FakePlatform, PlatformHandle) {
        let clock = FakeClock::new();
        let xenstore = FakeXenstore::new();
        let shared = Rc::new(RefCell::new(Shared {
            max_waits: 100_000,
            vchan_limit: 64,
            ..Shared::default()
        }));
        (
            FakePlatform {
                domid,
                memory_bytes,
                clock: clock.clone(),
                xenstore: xenstore.clone(),
                shared: shared.clone(),
            },
            PlatformHandle {
                clock,
                xenstore,
                shared,
            },
        )
    }
}

impl PlatformHandle {
    /// Sets what the platform reports as its heap's use (`None`: not
    /// measured, as hosted).
    pub fn set_heap_usage(&self, heap: Option<HeapUsage>) {
        self.shared.borrow_mut().heap = heap;
    }
    /// The clock.
    pub fn clock(&self) -> &FakeClock {
        &self.clock
    }
    /// The xenstore (the toolstack's view).
    pub fn xenstore(&self) -> &FakeXenstore {
        &self.xenstore
    }
    /// Makes the firewall's next `times` client opens of (`peer`, `port`)
    /// fail as on Xen before the server wrote its keys (`EACCES`: the
    /// directory above is not ours to read).
    pub fn refuse_vchan_clients(&self, peer: u16, port: u32, times: usize) {
        self.shared
            .borrow_mut()
            .refused_clients
            .insert((peer, port), times);
    }
    /// Client opens of (`peer`, `port`) still to be refused.
    pub fn vchan_clients_to_refuse(&self, peer: u16, port: u32) -> usize {
        self.shared
            .borrow()
            .refused_clients
            .get(&(peer, port))
            .copied()
            .unwrap_or(0)
    }
    /// Offers a vchan server as `peer` on `port` (dom0's qubesdb-daemon, or
    /// a qrexec data channel). If the firewall is already waiting as client
    /// on it, the link connects now.
    pub fn offer_vchan(&self, peer: u16, port: u32) -> VchanPeer {
        let mut shared = self.shared.borrow_mut();
        if let Some(pipe) = shared.latest.get(&(peer, port)) {
            let mut p = pipe.borrow_mut();
            if p.state == LinkState::Waiting {
                p.state = LinkState::Connected;
                drop(p);
                return VchanPeer { pipe: pipe.clone() };
            }
        }
        let pipe = Rc::new(RefCell::new(Pipe::new(LinkState::Connected)));
        shared.offers.insert((peer, port), pipe.clone());
        VchanPeer { pipe }
    }
    /// Connects as `peer` to the vchan the firewall offered (or is
    /// connecting to) on `port`; `None` when there is none.
    pub fn connect_vchan(&self, peer: u16, port: u32) -> Option<VchanPeer> {
        let shared = self.shared.borrow();
        let pipe = shared.latest.get(&(peer, port))?;
        let handle = VchanPeer { pipe: pipe.clone() };
        handle.connect();
        Some(handle)
    }
    /// The latest vchan on (peer, port), whatever its state.
    pub fn vchan(&self, peer: u16, port: u32) -> Option<VchanPeer> {
        let shared = self.shared.borrow();
        shared
            .latest
            .get(&(peer, port))
            .map(|pipe| VchanPeer { pipe: pipe.clone() })
    }
    /// Every vchan the firewall opened: (peer, port, as server).
    pub fn opened_vchans(&self) -> Vec<(u16, u32, bool)> {
        self.shared.borrow().opened.clone()
    }
    /// Limits how many vchans the platform will open (grant/event-channel
    /// exhaustion).
    pub fn set_vchan_limit(&self, limit: usize) {
        self.shared.borrow_mut().vchan_limit = limit;
    }
    /// The wire of the uplink NIC (created on first use).
    pub fn uplink(&self) -> NicHandle {
        let mut shared = self.shared.borrow_mut();
        if let Some(handle) = &shared.uplink {
            return handle.clone();
        }
        let (nic, handle) = nic_pair();
        drop(nic);
        shared.uplink = Some(handle.clone());
        handle
    }
    /// True once the firewall brought the uplink up.
    pub fn uplink_attached(&self) -> bool {
        self.shared.borrow().uplink_taken
    }
    /// The wire of a client's vif, once the firewall attached it.
    pub fn client(&self, domid: u16, device: u32) -> Option<NicHandle> {
        self.shared.borrow().clients.get(&(domid, device)).cloned()
    }
    /// Makes attaching this vif fail.
    pub fn break_vif(&self, domid: u16, device: u32) {
        self.shared.borrow_mut().broken_vifs.push((domid, device));
    }
    /// How many times the firewall waited.
    pub fn waits(&self) -> usize {
        self.shared.borrow().waits
    }
    /// Installs a script step run inside every `wait`.
    pub fn on_wait(&self, hook: WaitHook) {
        self.shared.borrow_mut().hook = Some(hook);
    }
    /// Limits the number of waits; past it the fake panics (a test whose
    /// program run never ends fails instead of hanging).
    pub fn set_max_waits(&self, max: usize) {
        self.shared.borrow_mut().max_waits = max;
    }
}

impl Platform for FakePlatform {
    type Vchan = FakeVchan;
    type Xenstore = FakeXenstore;
    type Nic = FakeNic;

    fn domid(&self) -> u16 {
        self.domid
    }

    fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    fn heap_usage(&self) -> Option<HeapUsage> {
        self.shared.borrow().heap
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Deterministic, so that test runs repeat: derived from the domain id
    /// and memory size, different on each call.
    fn random_seed(&mut self) -> u64 {
        let mut shared = self.shared.borrow_mut();
        shared.seeds_drawn += 1;
        let mut x = (u64::from(self.domid) << 48)
            ^ (self.memory_bytes as u64)
            ^ shared.seeds_drawn.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn wait(&mut self, deadline: Option<Instant>) {
        let (count, hook) = {
            let mut shared = self.shared.borrow_mut();
            let count = shared.waits;
            shared.waits += 1;
            assert!(
                count < shared.max_waits,
                "FakePlatform: the program waited {count} times without finishing"
            );
            (count, shared.hook.take())
        };
        match hook {
            Some(mut hook) => {
                let handle = PlatformHandle {
                    clock: self.clock.clone(),
                    xenstore: self.xenstore.clone(),
                    shared: self.shared.clone(),
                };
                hook(&handle, count);
                let mut shared = self.shared.borrow_mut();
                if shared.hook.is_none() {
                    shared.hook = Some(hook);
                }
            }
            None => {
                if let Some(deadline) = deadline {
                    self.clock.advance_to(deadline);
                }
            }
        }
    }

    fn vchan_server(&mut self, peer: u16, port: u32) -> Result<FakeVchan, PlatformError> {
        let mut shared = self.shared.borrow_mut();
        if shared.opened.len() >= shared.vchan_limit {
            return Err(PlatformError::Exhausted("vchans (test limit)"));
        }
        let pipe = Rc::new(RefCell::new(Pipe::new(LinkState::Waiting)));
        shared.latest.insert((peer, port), pipe.clone());
        shared.opened.push((peer, port, true));
        Ok(FakeVchan { pipe })
    }

    fn vchan_client(&mut self, peer: u16, port: u32) -> Result<FakeVchan, PlatformError> {
        let mut shared = self.shared.borrow_mut();
        if let Some(left) = shared.refused_clients.get_mut(&(peer, port))
            && *left > 0
        {
            *left -= 1;
            return Err(PlatformError::Xenstore(XenstoreError::Daemon(
                "EACCES".to_string(),
            )));
        }
        if shared.opened.len() >= shared.vchan_limit {
            return Err(PlatformError::Exhausted("vchans (test limit)"));
        }
        let pipe = match shared.offers.remove(&(peer, port)) {
            Some(offered) => offered,
            None => Rc::new(RefCell::new(Pipe::new(LinkState::Waiting))),
        };
        shared.latest.insert((peer, port), pipe.clone());
        shared.opened.push((peer, port, false));
        Ok(FakeVchan { pipe })
    }

    fn xenstore(&mut self) -> &mut FakeXenstore {
        &mut self.xenstore
    }

    fn uplink(&mut self) -> Result<FakeNic, PlatformError> {
        let mut shared = self.shared.borrow_mut();
        if shared.uplink_taken {
            return Err(PlatformError::Other("uplink already attached".to_string()));
        }
        shared.uplink_taken = true;
        let queues = match &shared.uplink {
            Some(handle) => handle.queues.clone(),
            None => {
                let (_, handle) = nic_pair();
                let queues = handle.queues.clone();
                shared.uplink = Some(handle);
                queues
            }
        };
        Ok(FakeNic { queues })
    }

    fn attach_client(&mut self, domid: u16, device: u32) -> Result<FakeNic, PlatformError> {
        let mut shared = self.shared.borrow_mut();
        if shared.broken_vifs.contains(&(domid, device)) {
            return Err(PlatformError::Other(format!(
                "backend/vif/{domid}/{device}: backend refused (test)"
            )));
        }
        let (nic, handle) = nic_pair();
        shared.clients.insert((domid, device), handle);
        Ok(nic)
    }

    fn exit(&mut self, how: Shutdown) -> ! {
        panic!("FakePlatform::exit({how:?}): the program flow should return instead")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Device, RxToken, TxToken};

    #[test]
    fn vchan_pair_carries_bytes_both_ways_and_closes() {
        let (mut vm, peer) = vchan_pair();
        peer.send(b"hello");
        let mut buf = [0u8; 3];
        assert_eq!(vm.read(&mut buf), Ok(3));
        assert_eq!(&buf, b"hel");
        assert_eq!(vm.write(b"abc"), Ok(3));
        assert_eq!(peer.take(), b"abc");
        peer.close();
        // Unread bytes are still delivered before Closed.
        assert_eq!(vm.read(&mut buf), Ok(2));
        assert_eq!(vm.read(&mut buf), Err(StreamError::Closed));
        assert_eq!(vm.write(b"x"), Err(StreamError::Closed));
    }

    #[test]
    fn vchan_capacity_applies_back_pressure() {
        let (mut vm, peer) = vchan_pair();
        peer.set_capacity(4);
        assert_eq!(vm.write(b"abcdef"), Ok(4));
        assert_eq!(vm.write(b"ef"), Ok(0));
        assert_eq!(peer.take(), b"abcd");
        assert_eq!(vm.write(b"ef"), Ok(2));
    }

    #[test]
    fn server_vchan_waits_until_peer_connects() {
        let (mut platform, handle) = FakePlatform::new(5, 1 << 25);
        let mut vm = platform.vchan_server(0, 512).unwrap();
        assert_eq!(vm.state(), LinkState::Waiting);
        assert_eq!(vm.write(b"x"), Ok(0));
        let peer = handle.connect_vchan(0, 512).unwrap();
        assert_eq!(vm.state(), LinkState::Connected);
        assert_eq!(vm.write(b"x"), Ok(1));
        assert_eq!(peer.take(), b"x");
        vm.close();
        assert!(peer.closed_by_vm());
    }

    #[test]
    fn client_vchan_connects_to_offer_before_or_after() {
        let (mut platform, handle) = FakePlatform::new(5, 1 << 25);
        let early = handle.offer_vchan(0, 111);
        let vm = platform.vchan_client(0, 111).unwrap();
        assert_eq!(vm.state(), LinkState::Connected);
        assert_eq!(early.state(), LinkState::Connected);

        let late_vm = platform.vchan_client(0, 513).unwrap();
        assert_eq!(late_vm.state(), LinkState::Waiting);
        let _late = handle.offer_vchan(0, 513);
        assert_eq!(late_vm.state(), LinkState::Connected);
        assert_eq!(
            handle.opened_vchans(),
            vec![(0, 111, false), (0, 513, false)]
        );
    }

    #[test]
    fn vchan_limit_is_an_error_not_a_panic() {
        let (mut platform, handle) = FakePlatform::new(5, 1 << 25);
        handle.set_vchan_limit(1);
        assert!(platform.vchan_server(0, 512).is_ok());
        assert_eq!(
            platform.vchan_client(0, 513).unwrap_err(),
            PlatformError::Exhausted("vchans (test limit)")
        );
    }

    #[test]
    fn xenstore_watch_fires_once_then_on_changes_below() {
        let mut xs = FakeXenstore::new();
        xs.watch("backend/vif", "vif").unwrap();
        assert_eq!(xs.poll_watch().unwrap().path, "backend/vif");
        assert_eq!(xs.poll_watch(), None);
        xs.set("backend/vif/3/0/ip", "10.137.0.5");
        xs.set("backend/vifx", "not below");
        let event = xs.poll_watch().unwrap();
        assert_eq!(event.path, "backend/vif/3/0/ip");
        assert_eq!(event.token, "vif");
        assert_eq!(xs.poll_watch(), None);
        assert_eq!(xs.directory("backend/vif").unwrap(), vec!["3"]);
        assert_eq!(xs.directory("backend/vif/3").unwrap(), vec!["0"]);
        xs.unset("backend/vif/3");
        assert_eq!(xs.poll_watch().unwrap().path, "backend/vif/3");
        assert!(xs.directory("backend/vif").unwrap().is_empty());
        assert_eq!(xs.read("backend/vif/3/0/ip").unwrap(), None);
    }

    #[test]
    fn xenstore_records_vm_writes_and_injected_failures() {
        let mut xs = FakeXenstore::new();
        xs.write("control/shutdown", "").unwrap();
        assert_eq!(
            xs.writes_by_vm(),
            vec![("control/shutdown".to_string(), String::new())]
        );
        xs.fail_below("backend", "EACCES");
        assert_eq!(
            xs.read("backend/vif"),
            Err(XenstoreError::Daemon("EACCES".to_string()))
        );
        assert!(xs.unwatch("nope", "t").is_err());
    }

    #[test]
    fn nic_moves_frames_and_reports_full() {
        let (mut nic, wire) = nic_pair();
        wire.inject(&[1, 2, 3]);
        let (rx, _tx) = nic.receive(Instant::ZERO).unwrap();
        assert_eq!(rx.consume(|frame| frame.to_vec()), vec![1, 2, 3]);
        assert!(nic.receive(Instant::ZERO).is_none());
        let tx = nic.transmit(Instant::ZERO).unwrap();
        tx.consume(2, |buf| buf.copy_from_slice(&[9, 8]));
        assert_eq!(wire.take_sent(), vec![vec![9, 8]]);
        wire.set_tx_capacity(0);
        assert!(nic.transmit(Instant::ZERO).is_none());
        assert_eq!(nic.capabilities().medium, Medium::Ethernet);
    }

    #[test]
    fn wait_advances_to_deadline_or_runs_the_script() {
        let (mut platform, handle) = FakePlatform::new(5, 1 << 25);
        platform.wait(Some(Instant::from_millis(250)));
        assert_eq!(platform.now(), Instant::from_millis(250));
        handle.on_wait(Box::new(|h, n| {
            h.xenstore().set("step", &format!("{n}"));
        }));
        platform.wait(None);
        assert_eq!(handle.xenstore().get("step").as_deref(), Some("1"));
        assert_eq!(handle.waits(), 2);
    }

    #[test]
    fn uplink_and_client_nics_are_reachable_from_the_handle() {
        let (mut platform, handle) = FakePlatform::new(5, 1 << 25);
        let wire = handle.uplink();
        let mut nic = platform.uplink().unwrap();
        assert!(handle.uplink_attached());
        wire.inject(&[7]);
        assert!(nic.receive(Instant::ZERO).is_some());
        assert!(platform.uplink().is_err());
        handle.break_vif(9, 0);
        assert!(platform.attach_client(9, 0).is_err());
        let _client = platform.attach_client(7, 0).unwrap();
        assert!(handle.client(7, 0).is_some());
    }
}
