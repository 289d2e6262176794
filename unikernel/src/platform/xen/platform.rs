//! [`XenPlatform`]: the `Platform` contract on Xen. It owns `shared_info`,
//! the grant table, the foreign-mapping window, the xenstore client on the
//! xenstore ring, and the set of event channels `wait` polls. Its clock is
//! vCPU 0's pvclock, read after a sleep, or after Xen switched us out and
//! back in, from the runstate record Xen writes at each context switch
//! instead of the TSC ([`Clock`]; Xen may trap every RDTSC).
//!
//! vchan servers follow `libxenvchan_server_init` (pages granted to the
//! peer, an unbound event channel, `ring-ref` and `event-channel` written
//! under `/local/domain/<us>/data/vchan/<peer>/<port>` with permissions
//! `n<us> r<peer>` in one transaction); clients follow
//! `libxenvchan_client_init` (read those keys of the peer, bind, map).
//! The uplink is a netfront (`device/vif/0`, xenbus handshake as Mini-OS and
//! Linux `xen-netfront` do it, with scatter-gather, GSO and partial
//! checksums); each client vif is a netback
//! (`backend/vif/<domid>/<dev>`: `attach_client` writes `feature-rx-copy`,
//! the checksum-offload features it honours (`feature-no-csum-offload` 0,
//! `feature-ipv6-csum-offload` 1), `hotplug-status` and InitWait and
//! returns at once, so a slow client never stalls the firewall). From then
//! on the xenbus state machines of `xenbus` run in `wait`, only when a
//! watched `state` node or the uplink's directory changed (xenstore watches,
//! no polling): a client connects, closes (Closing, Closed, rings unmapped,
//! its backend directory removed under a detach) and may reopen; the uplink
//! closes when the net qube's backend goes and connects again to the next
//! one (a sys-net restart), behind the same NIC. Numbers read from xenstore
//! are parsed strictly; a page whose grant cannot be revoked yet (the peer
//! still maps it) is kept until it can, never reused.

use alloc::alloc::{Layout, alloc_zeroed};
use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use protocol::vchan::{EVENT_CHANNEL_KEY, RING_REF_KEY, RingOrders, RingPlacement};

use super::abi;
use super::events::{self, DeferredNotify, SharedInfo, XenNotify};
use super::frames::{self, FramePool};
use super::grant::{self, ForeignMapping, ForeignWindow, GrantError, GrantTable};
use super::hypercall;
use super::netback::{
    CopyRefused, FrontendFeatures, Gather, GrantCopy, MAX_BATCH_PACKETS, MAX_BATCH_SEGMENTS,
    MAX_SCATTER_PACKETS, MAX_SCATTER_SEGMENTS, Netback, NetbackStats, Scatter, Sent,
};
use super::netfront::{self, Buffer, Netfront, NetfrontRx};
use super::shared::{RawMemory, SharedMemory};
use super::start_info::BootInfo;
use super::time::{self, Clock, TimeInfo, WakeTimes};
use super::vchan::{CLIENT_MAX_ORDER, ClientRing, RingBuffer, VchanRing, plan_client};
use super::xenbus::{self, BackendMachine, FrontendMachine, Phase, Step, Watches, parse_decimal};
use super::xenstore_ring::XenstoreRing;
use crate::platform::{
    ByteStream, HeapUsage, Instant, LinkState, Platform, PlatformError, Shutdown, StreamError,
    Xenstore, XenstoreError,
};
use crate::xenstore::{LinkWait, XenstoreClient};

/// Ring sizes our vchan servers ask for (client→us, us→client): one granted
/// page each, as Qubes' agents use.
pub const SERVER_READ_MIN: usize = 4096;
/// See [`SERVER_READ_MIN`].
pub const SERVER_WRITE_MIN: usize = 4096;
/// Most ports one `SCHEDOP_poll` takes (Xen `do_poll`).
const MAX_POLL_PORTS: usize = 128;

/// The xenstore client on Xen, with the platform's device watches kept
/// apart from the firewall's ([`Watches`]).
pub type XenXenstore = Watches<XenstoreClient<XenstoreRing<RawMemory, XenNotify>, XenLinkWait>>;

/// Registers a record for Xen to write vCPU 0's runstate into (the time
/// of each context switch, for [`Clock`]); `None`, logged, if it cannot.
fn register_runstate() -> Option<RawMemory> {
    let layout = Layout::from_size_align(abi::RUNSTATE_SIZE, 64).ok()?;
    // SAFETY: the layout has a non-zero size.
    let area = unsafe { alloc_zeroed(layout) };
    if area.is_null() {
        log::warn!("xen: no memory for the runstate record; the clock reads the TSC each time");
        return None;
    }
    // SAFETY: the block is ours, zeroed, never freed and never referenced
    // by Rust: from here on only Xen writes it and `RawMemory` reads it.
    let rc = unsafe { hypercall::register_runstate_area(0, area as u64) };
    if rc != 0 {
        log::warn!(
            "xen: VCPUOP_register_runstate_memory_area failed (Xen error {rc}); the clock reads the TSC each time"
        );
        return None;
    }
    // SAFETY: as above: mapped (the heap is identity-mapped), kept for the
    // domain's life, no Rust reference to it exists.
    Some(unsafe { RawMemory::new(area, abi::RUNSTATE_SIZE) })
}

/// When Xen last put our vCPU on a CPU (system time, ns), read while it
/// runs (Xen writes the record only while it does not); `None` when the
/// record says otherwise.
fn woke_at(runstate: &RawMemory) -> Option<u64> {
    let state = runstate.load_u32(abi::RUNSTATE_STATE);
    let mut at = [0u8; 8];
    runstate.read_bytes(abi::RUNSTATE_ENTRY_TIME, &mut at);
    let at = u64::from_le_bytes(at);
    (state == abi::RUNSTATE_RUNNING && at & abi::XEN_RUNSTATE_UPDATE == 0).then_some(at)
}

/// Waits for xenstored: polls the store event channel for up to 10 ms.
#[derive(Debug)]
pub struct XenLinkWait {
    port: u32,
    shared_info: SharedInfo,
}

fn system_time(shared_info: &SharedInfo) -> u64 {
    TimeInfo::read(&shared_info.memory(), abi::SHARED_INFO_VCPU0_TIME).system_time_at(time::rdtsc())
}

impl LinkWait for XenLinkWait {
    fn wait(&mut self) {
        if self.shared_info.take_pending(self.port) {
            return;
        }
        let deadline = system_time(&self.shared_info).saturating_add(10_000_000);
        hypercall::sched_poll(&[self.port], deadline);
        self.shared_info.take_pending(self.port);
    }
}

struct Shared {
    grants: RefCell<GrantTable<RawMemory>>,
    window: RefCell<ForeignWindow>,
    ports: RefCell<BTreeSet<u32>>,
    /// xenstore directories of closed vchan servers with the ring-ref they
    /// published, removed by `wait` unless a newer server took the path.
    stale_paths: RefCell<Vec<(String, u32)>>,
    /// Pages of closed servers waiting for the peer to unmap them.
    retired: RefCell<Vec<Retired>>,
    /// Client vifs (their xenbus state machines run in `wait`).
    backends: RefCell<Vec<Weak<RefCell<BackConn>>>>,
    /// xenstore nodes of dropped devices the platform stops watching.
    unwatch: RefCell<Vec<String>>,
    /// Frame counters of every NIC, logged at exit: (name, (rx, tx)).
    nic_counters: RefCell<Vec<(String, FrameCounters)>>,
    /// Buffers of sent frames for the next frames received
    /// (`super::frames`), lent to the NIC being polled.
    frame_pool: RefCell<FramePool>,
    /// The NICs' notifications, sent before the platform sleeps.
    nic_notify: DeferredNotify,
}

impl core::fmt::Debug for Shared {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shared")
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

/// The Xen machine.
#[derive(Debug)]
pub struct XenPlatform {
    boot: BootInfo,
    domid: u16,
    name: String,
    shared_info: SharedInfo,
    boot_ns: u64,
    /// The main loop's clock ([`Clock`]) and our vCPU's runstate record,
    /// whose switch-in time it reads after a sleep or a switch (`None`:
    /// Xen refused it).
    clock: Clock,
    runstate: Option<RawMemory>,
    shared: Rc<Shared>,
    xenstore: XenXenstore,
    shutdown_watch: bool,
    /// The uplink's NIC state and xenbus state machine, once brought up.
    uplink: Option<(Weak<RefCell<FrontConn>>, FrontendMachine)>,
    /// Client vif directories Closed under a detach, removed at the given
    /// system time (ns): libxl must read Closed before they go.
    removals: Vec<(BackendMachine, u64)>,
}

/// How long a detached vif's Closed directory stays for libxl to read it
/// (`xl devd` takes about as long running its hotplug script; libxl then
/// waits up to 10 s for the removal).
const REMOVAL_DELAY_NS: u64 = 1_000_000_000;

fn other(what: impl Into<String>) -> PlatformError {
    PlatformError::Other(what.into())
}

impl XenPlatform {
    /// Brings the platform up: `shared_info`, the grant table, xenstore.
    pub fn start(boot: BootInfo) -> Result<Self, PlatformError> {
        // SAFETY: SHARED_INFO_GPFN is a frame of the identity-mapped hole
        // reserved for it by `grant` and used for nothing else.
        let shared_info = unsafe { SharedInfo::map(grant::SHARED_INFO_GPFN) }
            .map_err(|rc| other(format!("cannot map shared_info: Xen error {rc}")))?;
        // SAFETY: called once, at boot; the frames are reserved for it.
        let grants = unsafe { grant::setup_table() }
            .map_err(|error| other(format!("cannot set up the grant table: {error:?}")))?;
        let store_pfn = hypercall::hvm_get_param(abi::HVM_PARAM_STORE_PFN)
            .map_err(|rc| other(format!("no xenstore page (HVM_PARAM_STORE_PFN: {rc})")))?;
        let store_port = hypercall::hvm_get_param(abi::HVM_PARAM_STORE_EVTCHN)
            .map_err(|rc| other(format!("no xenstore event channel ({rc})")))?
            as u32;
        if store_pfn == 0 || store_pfn >= 0x10_0000 || store_port >= events::MAX_PORTS {
            return Err(other(format!(
                "xenstore page {store_pfn:#x} / port {store_port} unusable"
            )));
        }
        shared_info.mask(store_port);
        // SAFETY: the toolstack gives us the xenstore page at STORE_PFN for
        // the life of the domain; it is below 4 GiB (identity-mapped, checked
        // above) and touched only through `RawMemory`.
        let store_mem = unsafe { RawMemory::new((store_pfn << 12) as *mut u8, abi::PAGE_SIZE) };
        let ring = XenstoreRing::new(store_mem, store_port, XenNotify);
        let mut xenstore = Watches::new(XenstoreClient::new(
            ring,
            XenLinkWait {
                port: store_port,
                shared_info,
            },
        ));
        let domid_text = xenstore
            .read("domid")
            .map_err(PlatformError::Xenstore)?
            .unwrap_or_default();
        let domid = parse_decimal(&domid_text)
            .and_then(|d| u16::try_from(d).ok())
            .ok_or_else(|| {
                other(format!(
                    "xenstore `domid` is {domid_text:?}, not a domain id"
                ))
            })?;
        let name = xenstore
            .read("name")
            .map_err(PlatformError::Xenstore)?
            .unwrap_or_default();
        let boot_ns = system_time(&shared_info);
        let runstate = register_runstate();
        log::info!("xen: domain {domid} ({name}), xenstore on port {store_port}");
        Ok(XenPlatform {
            boot,
            domid,
            name,
            shared_info,
            boot_ns,
            clock: Clock::default(),
            runstate,
            shared: Rc::new(Shared {
                grants: RefCell::new(grants),
                window: RefCell::new(ForeignWindow::default()),
                ports: RefCell::new(BTreeSet::from([store_port])),
                stale_paths: RefCell::new(Vec::new()),
                retired: RefCell::new(Vec::new()),
                backends: RefCell::new(Vec::new()),
                unwatch: RefCell::new(Vec::new()),
                nic_counters: RefCell::new(Vec::new()),
                frame_pool: RefCell::new(FramePool::default()),
                nic_notify: DeferredNotify::default(),
            }),
            xenstore,
            shutdown_watch: false,
            uplink: None,
            removals: Vec::new(),
        })
    }

    /// Our name as the toolstack set it (`name` in xenstore).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the boot loader told us (command line, memory map).
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot
    }

    /// Heap bytes in use and claimed, when the runtime is present.
    pub fn heap_usage(&self) -> Option<(usize, usize)> {
        #[cfg(all(feature = "xen", not(test)))]
        {
            Some(super::runtime::heap_usage())
        }
        #[cfg(not(all(feature = "xen", not(test))))]
        {
            None
        }
    }

    /// Checks `control/shutdown` (watched from the first call on) and
    /// acknowledges a request the way Linux does (writes it back empty).
    pub fn shutdown_requested(&mut self) -> Option<Shutdown> {
        if !self.shutdown_watch {
            let _ = self.xenstore.write("control/feature-poweroff", "1");
            let _ = self.xenstore.write("control/feature-reboot", "1");
            if let Err(error) = self.xenstore.watch("control/shutdown", "shutdown") {
                log::warn!("xen: cannot watch control/shutdown: {error}");
                return None;
            }
            self.shutdown_watch = true;
        }
        let _ = self.xenstore.poll();
        let value = self.xenstore.read("control/shutdown").ok().flatten()?;
        let request = match value.as_str() {
            "" => return None,
            "poweroff" | "halt" => Shutdown::PowerOff,
            "reboot" => Shutdown::Reboot,
            "crash" => Shutdown::Crash,
            other => {
                log::warn!("xen: unsupported shutdown request {other:?} ignored");
                let _ = self.xenstore.write("control/shutdown", "");
                return None;
            }
        };
        let _ = self.xenstore.write("control/shutdown", "");
        Some(request)
    }

    fn remember_port(&self, port: u32) {
        self.shared_info.mask(port);
        self.shared.ports.borrow_mut().insert(port);
    }

    fn publish_server(
        &mut self,
        dir: &str,
        ring_ref: u32,
        port: u32,
        peer: u16,
    ) -> Result<(), XenstoreError> {
        let perms_owner = format!("n{}", self.domid);
        let perms_peer = format!("r{peer}");
        let ring_ref_path = format!("{dir}/{RING_REF_KEY}");
        let port_path = format!("{dir}/{EVENT_CHANNEL_KEY}");
        self.xenstore.transaction(8, |xs| {
            xs.write(&ring_ref_path, &ring_ref.to_string())?;
            xs.set_permissions(&ring_ref_path, &[&perms_owner, &perms_peer])?;
            xs.write(&port_path, &port.to_string())?;
            xs.set_permissions(&port_path, &[&perms_owner, &perms_peer])
        })
    }

    fn map_ring(
        &mut self,
        peer: u16,
        grants: &[u32],
        readonly: bool,
        mappings: &mut Vec<ForeignMapping>,
        windows: &mut Vec<(usize, usize)>,
    ) -> Result<RawMemory, PlatformError> {
        let start = self
            .shared
            .window
            .borrow_mut()
            .reserve(grants.len())
            .ok_or(PlatformError::Exhausted("foreign mapping window"))?;
        windows.push((start, grants.len()));
        for (i, gref) in grants.iter().enumerate() {
            let mapping = grant::map_grant(peer, *gref, ForeignWindow::addr(start + i), readonly)
                .map_err(|error| {
                other(format!(
                    "cannot map grant {gref} of domain {peer}: {error:?}"
                ))
            })?;
            mappings.push(mapping);
        }
        // SAFETY: the frames `start..start + len` of the window now hold the
        // peer's pages (mapped above), stay mapped until the vchan's drop
        // unmaps them, and are reached only through `RawMemory`.
        Ok(unsafe {
            RawMemory::new(
                ForeignWindow::addr(start) as *mut u8,
                grants.len() * abi::PAGE_SIZE,
            )
        })
    }
}

/// The xenstore directory of our uplink vif (the toolstack's first vif).
pub const UPLINK_NODE: &str = "device/vif/0";
/// How long the backend may take to connect when the uplink first comes up.
const NETBACK_TIMEOUT_MS: u64 = 10_000;

impl XenPlatform {
    /// Runs the xenbus state machines of every device after a watched node
    /// changed ([`xenbus`]): client vifs connect, close and reopen; the
    /// uplink closes when its backend goes and connects again to a new one.
    fn progress_devices(&mut self) {
        self.flush_unwatch(&[]);
        self.progress_backends();
        self.progress_uplink();
    }

    /// Stops the watches of dropped devices, except on paths a live device
    /// (or `keep`, about to be watched) still needs.
    fn flush_unwatch(&mut self, keep: &[String]) {
        let queued: Vec<String> = self.shared.unwatch.borrow_mut().drain(..).collect();
        if queued.is_empty() {
            return;
        }
        let mut live: BTreeSet<String> = keep.iter().cloned().collect();
        for conn in self
            .shared
            .backends
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
        {
            match &*conn.borrow() {
                BackConn::Waiting { machine, .. } | BackConn::Up { machine, .. } => {
                    live.extend(machine.watched());
                }
                BackConn::Gone => {}
            }
        }
        if let Some((_, machine)) = &self.uplink {
            live.extend(machine.watched());
        }
        for path in queued {
            if !live.contains(&path) {
                self.xenstore.unwatch_node(&path);
            }
        }
    }

    fn progress_backends(&mut self) {
        let live: Vec<Rc<RefCell<BackConn>>> = {
            let mut list = self.shared.backends.borrow_mut();
            list.retain(|weak| {
                weak.upgrade()
                    .is_some_and(|c| !matches!(*c.borrow(), BackConn::Gone))
            });
            list.iter().filter_map(Weak::upgrade).collect()
        };
        for conn in live {
            let (domid, device, mut machine) = match &*conn.borrow() {
                BackConn::Waiting {
                    domid,
                    device,
                    machine,
                }
                | BackConn::Up {
                    domid,
                    device,
                    machine,
                    ..
                } => (*domid, *device, machine.clone()),
                BackConn::Gone => continue,
            };
            let step = match machine.progress(&mut self.xenstore) {
                Ok(step) => step,
                Err(error) => {
                    log::warn!("xen: netback vif{domid}.{device}: xenstore: {error}");
                    continue;
                }
            };
            match step {
                Step::Stay => {}
                Step::Connect => match self.connect_backend(domid, &machine.frontend) {
                    Ok((back, mappings, windows)) => {
                        if let Err(error) = machine.connected(&mut self.xenstore) {
                            log::warn!("xen: netback vif{domid}.{device}: xenstore: {error}");
                        }
                        log::info!(
                            "xen: netback vif{domid}.{device} connected to {}",
                            machine.frontend
                        );
                        *conn.borrow_mut() = BackConn::Up {
                            domid,
                            device,
                            machine,
                            back,
                            mappings,
                            windows,
                        };
                        continue;
                    }
                    Err(error) => {
                        log::warn!("xen: netback vif{domid}.{device}: {error}");
                        let _ = machine.failed(&mut self.xenstore);
                    }
                },
                Step::Disconnect => {
                    log::info!(
                        "xen: netback vif{domid}.{device}: frontend {} closed, gone or reset; rings released",
                        machine.frontend
                    );
                    // Waiting again (a reset frontend): look at it once
                    // more without waiting for a watch, it may be ready.
                    if machine.phase() == Phase::Waiting {
                        self.xenstore.mark_dirty();
                    }
                }
            }
            // Closed under a detach: our directory goes a moment later.
            if machine.phase() == Phase::Down
                && machine.removable(&mut self.xenstore).unwrap_or(false)
                && !self
                    .removals
                    .iter()
                    .any(|(queued, _)| queued.backend == machine.backend)
            {
                let due = system_time(&self.shared_info).saturating_add(REMOVAL_DELAY_NS);
                self.removals.push((machine.clone(), due));
            }
            // Keep the machine's new phase; release rings unless Up.
            let old = core::mem::replace(
                &mut *conn.borrow_mut(),
                BackConn::Waiting {
                    domid,
                    device,
                    machine: machine.clone(),
                },
            );
            match old {
                BackConn::Up {
                    back,
                    mappings,
                    windows,
                    ..
                } if machine.phase() == Phase::Up => {
                    *conn.borrow_mut() = BackConn::Up {
                        domid,
                        device,
                        machine,
                        back,
                        mappings,
                        windows,
                    };
                }
                BackConn::Up {
                    back,
                    mappings,
                    windows,
                    ..
                } => release_backend(back, mappings, windows, &self.shared),
                _ => {}
            }
        }
    }

    fn progress_uplink(&mut self) {
        let Some((weak, machine)) = &mut self.uplink else {
            return;
        };
        let Some(conn) = weak.upgrade() else {
            self.uplink = None;
            return;
        };
        let mut machine = machine.clone();
        let step = match machine.progress(&mut self.xenstore) {
            Ok(step) => step,
            Err(error) => {
                log::warn!("xen: uplink {}: xenstore: {error}", machine.node);
                return;
            }
        };
        match step {
            Step::Stay => {}
            Step::Disconnect => {
                log::warn!(
                    "xen: uplink {}: the net qube's backend closed or went away; waiting for a new one",
                    machine.node
                );
                if let FrontConn::Up { front, retired } =
                    core::mem::replace(&mut *conn.borrow_mut(), FrontConn::Down)
                {
                    release_frontend(front, retired, &self.shared);
                }
            }
            Step::Connect => match self.start_netfront(&machine.node.clone()) {
                Ok((front, retired, backend)) => {
                    log::info!("xen: uplink {} connected again, to {backend}", machine.node);
                    machine.connected(backend);
                    *conn.borrow_mut() = FrontConn::Up {
                        front,
                        retired: Some(retired),
                    };
                }
                Err(error) => {
                    log::warn!("xen: uplink {}: cannot connect: {error}", machine.node);
                }
            },
        }
        for path in machine.watched() {
            if let Err(error) = self.xenstore.watch_node(&path) {
                log::warn!("xen: cannot watch {path}: {error}");
            }
        }
        self.uplink = Some((Rc::downgrade(&conn), machine));
    }

    fn connect_backend(
        &mut self,
        domid: u16,
        frontend: &str,
    ) -> Result<BackendParts, PlatformError> {
        let read_number = |xs: &mut XenXenstore, key: &str| -> Result<u32, PlatformError> {
            let text = xs
                .read(&format!("{frontend}/{key}"))
                .map_err(PlatformError::Xenstore)?
                .ok_or_else(|| other(format!("frontend did not write {key}")))?;
            parse_decimal(&text).ok_or_else(|| other(format!("{frontend}/{key} is {text:?}")))
        };
        let tx_ref = read_number(&mut self.xenstore, "tx-ring-ref")?;
        let rx_ref = read_number(&mut self.xenstore, "rx-ring-ref")?;
        let remote_port = read_number(&mut self.xenstore, "event-channel")?;
        if read_number(&mut self.xenstore, "request-rx-copy").ok() != Some(1) {
            return Err(other(
                "frontend does not use rx-copy (request-rx-copy), the only mode we serve",
            ));
        }
        // What the frontend takes on RX (absent keys: 0), as Linux netback
        // reads them in `connect_data_rings`/`read_xenbus_vif_flags`.
        let mut flag = |key: &str| read_number(&mut self.xenstore, key).ok();
        let features = FrontendFeatures {
            sg: flag("feature-sg") == Some(1),
            gso4: flag("feature-gso-tcpv4") == Some(1),
            gso6: flag("feature-gso-tcpv6") == Some(1),
            csum: flag("feature-no-csum-offload").unwrap_or(0) == 0,
            csum6: flag("feature-ipv6-csum-offload") == Some(1),
        };
        let mut mappings = Vec::new();
        let mut windows = Vec::new();
        let result = (|| {
            let tx = self.map_ring(domid, &[tx_ref], false, &mut mappings, &mut windows)?;
            let rx = self.map_ring(domid, &[rx_ref], false, &mut mappings, &mut windows)?;
            let port = events::bind_interdomain(domid, remote_port).map_err(|rc| {
                other(format!(
                    "cannot bind event channel {remote_port} of domain {domid}: {rc}"
                ))
            })?;
            Ok((tx, rx, port, XenGrantCopy))
        })();
        let (tx, rx, port, copier) = match result {
            Ok(parts) => parts,
            Err(error) => {
                let mut holdings = Holdings::Client { mappings, windows };
                release(&mut holdings, &self.shared);
                return Err(error);
            }
        };
        self.remember_port(port);
        let mut back = Netback::new(tx, rx, domid, port, copier, self.shared.nic_notify.clone());
        back.set_frontend_features(features);
        // Responses are published once per batch the router hands over
        // (`XenNic::flush`).
        back.batching = true;
        Ok((Box::new(back), mappings, windows))
    }

    /// The xenbus handshake of a netfront (Mini-OS / Linux `xen-netfront`):
    /// read `backend-id` and `backend`, grant the rings and buffers, write
    /// `tx-ring-ref`, `rx-ring-ref`, `event-channel`, `request-rx-copy`,
    /// `feature-rx-notify`, the offloads we take (`feature-sg`,
    /// `feature-gso-tcpv4/6`, `feature-no-csum-offload` 0,
    /// `feature-ipv6-csum-offload` 1; the backend's own keys say what we
    /// may send it, `netfront::BackendFeatures`) and `state` =
    /// Connected in one transaction. Returns the rings and the backend's
    /// directory; the backend connects on its own.
    fn start_netfront(&mut self, node: &str) -> Result<FrontendParts, PlatformError> {
        let read = |xs: &mut XenXenstore, key: &str| -> Result<String, PlatformError> {
            xs.read(&format!("{node}/{key}"))
                .map_err(PlatformError::Xenstore)?
                .ok_or_else(|| {
                    other(format!(
                        "no {node}/{key} in xenstore: is a vif configured for this domain?"
                    ))
                })
        };
        let backend_id_text = read(&mut self.xenstore, "backend-id")?;
        let backend_id = parse_decimal(&backend_id_text)
            .and_then(|d| u16::try_from(d).ok())
            .ok_or_else(|| other(format!("{node}/backend-id is {backend_id_text:?}")))?;
        let backend = read(&mut self.xenstore, "backend")?;
        let count = 2 + netfront::TX_BUFFERS + netfront::RX_BUFFERS;
        let layout = Layout::from_size_align(count * abi::PAGE_SIZE, abi::PAGE_SIZE)
            .map_err(|_| PlatformError::Exhausted("memory for netfront buffers"))?;
        // SAFETY: the layout has a non-zero size.
        let pages = unsafe { alloc_zeroed(layout) };
        if pages.is_null() {
            return Err(PlatformError::Exhausted("memory for netfront buffers"));
        }
        let mut retired = Retired {
            grants: Vec::new(),
            pages,
            layout,
            held: Vec::new(),
        };
        let page = |i: usize| pages.wrapping_add(i * abi::PAGE_SIZE);
        for i in 0..count {
            match self.shared.grants.borrow_mut().grant_access(
                backend_id,
                page(i) as u64 >> 12,
                false,
            ) {
                Ok(gref) => retired.grants.push(gref),
                Err(_) => {
                    if let Some(still) = retired.try_free(&self.shared) {
                        self.shared.retired.borrow_mut().push(still);
                    }
                    return Err(PlatformError::Exhausted("grant references"));
                }
            }
        }
        let port = match events::alloc_unbound(backend_id) {
            Ok(port) => port,
            Err(rc) => {
                if let Some(still) = retired.try_free(&self.shared) {
                    self.shared.retired.borrow_mut().push(still);
                }
                return Err(other(format!(
                    "cannot allocate an event channel for netback in domain {backend_id}: {rc}"
                )));
            }
        };
        // SAFETY: page `i` of our zeroed allocation, granted to the backend
        // and kept until the NIC is released (then freed only once every
        // grant is revoked); touched only through `RawMemory`.
        let mem = |i: usize| unsafe { RawMemory::new(page(i), abi::PAGE_SIZE) };
        let grefs = retired.grants.clone();
        let buffers = |range: core::ops::Range<usize>| -> Vec<Buffer<RawMemory>> {
            range
                .filter_map(|i| {
                    Some(Buffer {
                        mem: mem(i),
                        gref: *grefs.get(i)?,
                    })
                })
                .collect()
        };
        // What the backend takes on our TX (Linux netback writes its keys
        // before it waits for us; absent: 0).
        let mut flag = |key: &str| -> bool {
            matches!(self.xenstore.read(&format!("{backend}/{key}")), Ok(Some(v)) if v.trim() == "1")
        };
        let features = netfront::BackendFeatures {
            sg: flag("feature-sg"),
            gso4: flag("feature-gso-tcpv4"),
            gso6: flag("feature-gso-tcpv6"),
            csum6: flag("feature-ipv6-csum-offload"),
        };
        let tx_bufs = buffers(2..2 + netfront::TX_BUFFERS);
        let rx_bufs = buffers(2 + netfront::TX_BUFFERS..count);
        let mut front = Box::new(Netfront::new(
            mem(0),
            mem(1),
            tx_bufs,
            rx_bufs,
            port,
            self.shared.nic_notify.clone(),
        ));
        front.set_backend_features(features);
        // Requests are published once per batch the router hands over
        // (`XenNic::flush`).
        front.batching = true;
        front.set_lender(Box::new(XenLender {
            shared: self.shared.clone(),
            backend: backend_id,
        }));
        self.remember_port(port);
        let (tx_ref, rx_ref) = (
            grefs.first().copied().unwrap_or_default(),
            grefs.get(1).copied().unwrap_or_default(),
        );
        let written = self.xenstore.transaction(8, |xs| {
            xs.write(&format!("{node}/tx-ring-ref"), &tx_ref.to_string())?;
            xs.write(&format!("{node}/rx-ring-ref"), &rx_ref.to_string())?;
            xs.write(&format!("{node}/event-channel"), &port.to_string())?;
            xs.write(&format!("{node}/request-rx-copy"), "1")?;
            xs.write(&format!("{node}/feature-rx-notify"), "1")?;
            // As Linux netfront: scatter-gather, TCP GSO and partial
            // checksums both ways (the router forwards such frames whole,
            // or cuts and completes them for a peer without the feature).
            xs.write(&format!("{node}/feature-sg"), "1")?;
            xs.write(&format!("{node}/feature-gso-tcpv4"), "1")?;
            xs.write(&format!("{node}/feature-gso-tcpv6"), "1")?;
            xs.write(&format!("{node}/feature-no-csum-offload"), "0")?;
            xs.write(&format!("{node}/feature-ipv6-csum-offload"), "1")?;
            xs.write(&format!("{node}/state"), &xenbus::CONNECTED.to_string())
        });
        if let Err(error) = written {
            release_frontend(front, Some(retired), &self.shared);
            return Err(PlatformError::Xenstore(error));
        }
        log::info!(
            "xen: netfront {node} connected to {backend} (domain {backend_id}), event channel {port}"
        );
        Ok((front, retired, backend))
    }

    /// Brings the uplink up the first time: the handshake, then a wait for
    /// the backend's `state` to reach Connected; from then on its xenbus
    /// state machine runs in `wait`.
    fn connect_netfront(&mut self, node: &str) -> Result<XenNic, PlatformError> {
        let (front, retired, backend) = self.start_netfront(node)?;
        let conn = Rc::new(RefCell::new(FrontConn::Up {
            front,
            retired: Some(retired),
        }));
        let nic = XenNic::new(
            NicKind::Front(conn.clone()),
            format!("netfront {node}"),
            &self.shared,
        );
        let started = self.now();
        loop {
            let state = xenbus::read_state(&mut self.xenstore, &format!("{backend}/state"))
                .map_err(PlatformError::Xenstore)?;
            match state {
                Some(xenbus::CONNECTED) => break,
                Some(state) if state > xenbus::CONNECTED => {
                    return Err(other(format!(
                        "netback {backend} went to state {state} instead of connecting"
                    )));
                }
                _ => {}
            }
            if (self.now() - started).total_millis() > NETBACK_TIMEOUT_MS {
                return Err(other(format!(
                    "netback {backend} did not connect in {NETBACK_TIMEOUT_MS} ms"
                )));
            }
            let at = self.now() + smoltcp::time::Duration::from_millis(20);
            self.wait(Some(at));
        }
        let mut machine = FrontendMachine::new(node.to_string());
        machine.connected(backend);
        for path in machine.watched() {
            self.xenstore
                .watch_node(&path)
                .map_err(PlatformError::Xenstore)?;
        }
        self.uplink = Some((Rc::downgrade(&conn), machine));
        Ok(nic)
    }
}

/// The uplink's rings, their pages, and the backend's directory.
type FrontendParts = (Box<Netfront<RawMemory, DeferredNotify>>, Retired, String);

/// A client's netback with what it maps.
type BackendParts = (
    Box<Netback<RawMemory, XenGrantCopy, DeferredNotify>>,
    Vec<ForeignMapping>,
    Vec<(usize, usize)>,
);

/// Unbinds a client's event channel and unmaps its rings.
fn release_backend(
    back: Box<Netback<RawMemory, XenGrantCopy, DeferredNotify>>,
    mappings: Vec<ForeignMapping>,
    windows: Vec<(usize, usize)>,
    shared: &Shared,
) {
    let port = back.port();
    events::close(port);
    shared.ports.borrow_mut().remove(&port);
    drop(back);
    let mut holdings = Holdings::Client { mappings, windows };
    release(&mut holdings, shared);
}

/// Closes the uplink's event channel and ends its grants (the pages are
/// freed once the backend has unmapped them).
fn release_frontend(
    front: Box<Netfront<RawMemory, DeferredNotify>>,
    retired: Option<Retired>,
    shared: &Shared,
) {
    let port = front.port();
    events::close(port);
    shared.ports.borrow_mut().remove(&port);
    let mut front = front;
    let lent = front.take_lent();
    drop(front);
    if !lent.is_empty() {
        let mut frames = Retired {
            grants: Vec::new(),
            pages: core::ptr::null_mut(),
            layout: Layout::new::<u8>(),
            held: Vec::new(),
        };
        for (frame, grants) in lent {
            frames.grants.extend(grants);
            frames.held.push(frame);
        }
        if let Some(still) = frames.try_free(shared) {
            shared.retired.borrow_mut().push(still);
        }
    }
    if let Some(retired) = retired
        && let Some(still) = retired.try_free(shared)
    {
        shared.retired.borrow_mut().push(still);
    }
}

/// Polls the uplink's netfront with the frame pool lent to it (it takes
/// buffers for received frames from it and gives back lent frames the
/// backend is done with).
fn poll_front(front: &mut Netfront<RawMemory, DeferredNotify>, shared: &Shared) {
    frames::lend(front, &mut shared.frame_pool.borrow_mut(), Netfront::poll);
}

/// Lends the uplink's backend the pages of frames we send
/// (`netfront::PageLender`): read-only grants from our grant table. A
/// buffer is lendable when it starts on a page (the runtime starts every
/// allocation of a page or more on one) below 4 GiB, where our memory is
/// identity-mapped, so a page's frame number is its address >> 12.
#[derive(Debug)]
struct XenLender {
    shared: Rc<Shared>,
    backend: u16,
}

impl netfront::PageLender for XenLender {
    fn lendable(&self, frame: &[u8]) -> bool {
        let start = frame.as_ptr() as u64;
        start.is_multiple_of(abi::PAGE_SIZE as u64) && start + frame.len() as u64 <= 1 << 32
    }

    fn grant(&mut self, page: &[u8]) -> Option<u32> {
        let start = page.as_ptr() as u64;
        if page.len() != abi::PAGE_SIZE
            || !start.is_multiple_of(abi::PAGE_SIZE as u64)
            || start >= 1 << 32
        {
            return None;
        }
        self.shared
            .grants
            .borrow_mut()
            .grant_access(self.backend, start >> 12, true)
            .ok()
    }

    fn revoke(&mut self, gref: u32) -> bool {
        !matches!(
            self.shared.grants.borrow_mut().end_access(gref),
            Err(GrantError::StillMapped(_))
        )
    }
}

/// Frames received and sent by one NIC.
type FrameCounters = Rc<core::cell::Cell<(u64, u64)>>;

/// Grant copy straight between a peer's granted pages and our own
/// buffers (`GNTTABOP_copy`): a packet's segments go in one hypercall, an
/// op split where our buffer crosses a page. Our memory is identity-mapped
/// (boot.s maps the first 4 GiB 1:1 and the heap lies below 4 GiB), so a
/// buffer's frame number is its address >> 12.
#[derive(Debug, Default)]
pub struct XenGrantCopy;

impl XenGrantCopy {
    /// Copies between `segments` of `dom`'s pages and our `len` bytes at
    /// `local` (exposed address of a buffer the caller borrows: `&mut` for
    /// [`CopyDirection::FromPeer`]). Every op's status is checked.
    fn batch(
        dom: u16,
        segments: &[grant::Segment],
        local: usize,
        len: usize,
        direction: grant::CopyDirection,
    ) -> Result<(), CopyRefused> {
        let mut ops = [abi::GnttabCopy::default(); grant::MAX_COPY_OPS];
        let count = grant::plan_copy(dom, segments, local as u64, len, direction, &mut ops)
            .ok_or(CopyRefused)?;
        let ops = ops.get_mut(..count).ok_or(CopyRefused)?;
        // SAFETY: `plan_copy` kept every local end inside `local..local +
        // len`, the caller's borrowed buffer (identity-mapped, so the frame
        // numbers are its own): Xen reads it for `ToPeer`, writes it for
        // `FromPeer`, where the caller holds it `&mut`.
        let rc = unsafe { hypercall::grant_copy(ops) };
        if rc == 0 && ops.iter().all(|op| op.status == abi::GNTST_OKAY) {
            Ok(())
        } else {
            Err(CopyRefused)
        }
    }
}

impl GrantCopy for XenGrantCopy {
    fn copy_from(
        &mut self,
        dom: u16,
        gref: u32,
        offset: u16,
        dst: &mut [u8],
    ) -> Result<(), CopyRefused> {
        let len = u16::try_from(dst.len()).map_err(|_| CopyRefused)?;
        self.gather(dom, &[grant::Segment { gref, offset, len }], dst)
    }

    fn copy_to(&mut self, dom: u16, gref: u32, offset: u16, src: &[u8]) -> Result<(), CopyRefused> {
        let len = u16::try_from(src.len()).map_err(|_| CopyRefused)?;
        self.scatter(dom, &[grant::Segment { gref, offset, len }], src)
    }

    fn gather(
        &mut self,
        dom: u16,
        segments: &[grant::Segment],
        dst: &mut [u8],
    ) -> Result<(), CopyRefused> {
        let local = dst.as_mut_ptr().expose_provenance();
        Self::batch(
            dom,
            segments,
            local,
            dst.len(),
            grant::CopyDirection::FromPeer,
        )
    }

    fn scatter(
        &mut self,
        dom: u16,
        segments: &[grant::Segment],
        src: &[u8],
    ) -> Result<(), CopyRefused> {
        let local = src.as_ptr().expose_provenance();
        Self::batch(
            dom,
            segments,
            local,
            src.len(),
            grant::CopyDirection::ToPeer,
        )
    }

    /// Every job's ops in one hypercall; a job whose plan is refused or
    /// does not fit (past the batch bounds) goes on its own.
    fn gather_many(&mut self, dom: u16, jobs: &mut [Gather<'_>]) {
        let mut buffers = [BatchJob::default(); BATCH_JOBS];
        for (job, buffer) in jobs.iter_mut().zip(buffers.iter_mut()) {
            *buffer = (
                job.segments,
                job.dst.as_mut_ptr().expose_provenance(),
                job.dst.len(),
            );
        }
        let count = jobs.len().min(BATCH_JOBS);
        let buffers = buffers.get(..count).unwrap_or(&[]);
        // The `dst`s stay borrowed `&mut` through `jobs` for the call.
        let results = Self::batch_many(dom, buffers, grant::CopyDirection::FromPeer);
        for (index, job) in jobs.iter_mut().enumerate() {
            job.done = match results.get(index).copied().flatten() {
                Some(done) => done,
                None => self.gather(dom, job.segments, job.dst).is_ok(),
            };
        }
    }

    /// Every job's ops in one hypercall, as [`Self::gather_many`].
    fn scatter_many(&mut self, dom: u16, jobs: &mut [Scatter<'_>]) {
        let mut buffers = [BatchJob::default(); BATCH_JOBS];
        for (job, buffer) in jobs.iter().zip(buffers.iter_mut()) {
            *buffer = (
                job.segments,
                job.src.as_ptr().expose_provenance(),
                job.src.len(),
            );
        }
        let count = jobs.len().min(BATCH_JOBS);
        let buffers = buffers.get(..count).unwrap_or(&[]);
        // The `src`s stay borrowed through `jobs` for the call.
        let results = Self::batch_many(dom, buffers, grant::CopyDirection::ToPeer);
        for (index, job) in jobs.iter_mut().enumerate() {
            job.done = match results.get(index).copied().flatten() {
                Some(done) => done,
                None => self.scatter(dom, job.segments, job.src).is_ok(),
            };
        }
    }
}

/// One packet of a batched copy: its segments of the peer's pages and our
/// buffer (exposed address, length).
type BatchJob<'a> = (&'a [grant::Segment], usize, usize);

/// Most packets one batched copy takes (the larger of the two bounds).
const BATCH_JOBS: usize = if MAX_BATCH_PACKETS > MAX_SCATTER_PACKETS {
    MAX_BATCH_PACKETS
} else {
    MAX_SCATTER_PACKETS
};

/// Most ops one batched copy holds: two per segment (an op splits where
/// our buffer crosses a page), for the larger of the two segment bounds.
const BATCH_OPS: usize = 2 * if MAX_BATCH_SEGMENTS > MAX_SCATTER_SEGMENTS {
    MAX_BATCH_SEGMENTS
} else {
    MAX_SCATTER_SEGMENTS
};

impl XenGrantCopy {
    /// Runs every job's ops, in `direction`, as one `GNTTABOP_copy`; each
    /// job's result: whether all its ops succeeded, `None` for one whose
    /// plan is refused or does not fit (the caller copies it on its own).
    /// The caller borrows each job's buffer for the call (`&mut` for
    /// [`grant::CopyDirection::FromPeer`]).
    fn batch_many(
        dom: u16,
        jobs: &[BatchJob<'_>],
        direction: grant::CopyDirection,
    ) -> [Option<bool>; BATCH_JOBS] {
        let mut ops = [abi::GnttabCopy::default(); BATCH_OPS];
        // Each job's ops, `None` where it goes on its own.
        let mut ranges = [None; BATCH_JOBS];
        let mut used = 0usize;
        for (&(segments, local, len), range) in jobs.iter().zip(ranges.iter_mut()) {
            let room = ops.get_mut(used..).unwrap_or(&mut []);
            if let Some(count) = grant::plan_copy(dom, segments, local as u64, len, direction, room)
            {
                *range = Some((used, used + count));
                used += count;
            }
        }
        let batch = ops.get_mut(..used).unwrap_or(&mut []);
        // SAFETY: `plan_copy` kept every op's local end inside its job's
        // buffer, which the caller borrows for the call (`&mut` where Xen
        // writes it, `FromPeer`; identity-mapped: the frame numbers are its
        // own); on our side Xen touches nothing else.
        let rc = unsafe { hypercall::grant_copy(batch) };
        let mut results = [None; BATCH_JOBS];
        for (result, range) in results.iter_mut().zip(ranges) {
            *result = range.map(|(start, end)| {
                rc == 0
                    && ops
                        .get(start..end)
                        .is_some_and(|ops| ops.iter().all(|op| op.status == abi::GNTST_OKAY))
            });
        }
        results
    }
}

/// A client vif's backend, from `attach_client` until it is dropped.
#[derive(Debug)]
pub enum BackConn {
    /// Not connected: waiting for the frontend, or closed (see the
    /// machine's phase).
    Waiting {
        domid: u16,
        device: u32,
        machine: BackendMachine,
    },
    /// Rings mapped, event channel bound.
    Up {
        domid: u16,
        device: u32,
        machine: BackendMachine,
        back: Box<Netback<RawMemory, XenGrantCopy, DeferredNotify>>,
        mappings: Vec<ForeignMapping>,
        windows: Vec<(usize, usize)>,
    },
    /// Released.
    Gone,
}

/// The uplink's rings, while its backend is there.
#[derive(Debug)]
pub enum FrontConn {
    /// Connected (or connecting: frames wait in the ring).
    Up {
        front: Box<Netfront<RawMemory, DeferredNotify>>,
        retired: Option<Retired>,
    },
    /// The backend closed or went away; waiting for a new one.
    Down,
}

#[derive(Debug)]
enum NicKind {
    Front(Rc<RefCell<FrontConn>>),
    Back(Rc<RefCell<BackConn>>),
}

/// A virtual NIC on Xen: the uplink's netfront, or a client's netback.
#[derive(Debug)]
pub struct XenNic {
    kind: NicKind,
    counters: Rc<core::cell::Cell<(u64, u64)>>,
    shared: Rc<Shared>,
}

impl XenNic {
    fn new(kind: NicKind, name: String, shared: &Rc<Shared>) -> Self {
        let counters = Rc::new(core::cell::Cell::new((0, 0)));
        shared
            .nic_counters
            .borrow_mut()
            .push((name, counters.clone()));
        XenNic {
            kind,
            counters,
            shared: shared.clone(),
        }
    }

    /// The netfront counters (uplink only, while connected).
    pub fn netfront_stats(&self) -> Option<netfront::NetfrontStats> {
        match &self.kind {
            NicKind::Front(conn) => match &*conn.borrow() {
                FrontConn::Up { front, .. } => Some(front.stats()),
                FrontConn::Down => None,
            },
            NicKind::Back(_) => None,
        }
    }

    /// The next frame the netback or netfront received, counted.
    fn take_received(&mut self) -> Option<(Vec<u8>, crate::offload::Offload)> {
        let mut pool = self.shared.frame_pool.borrow_mut();
        let received = match &self.kind {
            NicKind::Back(conn) => match &mut *conn.borrow_mut() {
                BackConn::Up { back, .. } => {
                    frames::lend(&mut **back, &mut pool, Netback::poll);
                    back.take_frame_offloaded()?
                }
                _ => return None,
            },
            NicKind::Front(conn) => match &mut *conn.borrow_mut() {
                FrontConn::Up { front, .. } => {
                    drop(pool);
                    poll_front(front, &self.shared);
                    front.take_frame_offloaded()?
                }
                FrontConn::Down => return None,
            },
        };
        let (r, t) = self.counters.get();
        self.counters.set((r + 1, t));
        Some(received)
    }

    /// Counts a frame the netback or netfront took; `false` for
    /// [`Sent::NoRoom`] (not taken, tried again later).
    fn count_sent(&self, sent: Sent) -> bool {
        if sent == Sent::NoRoom {
            return false;
        }
        let (r, t) = self.counters.get();
        self.counters.set((r, t + 1));
        true
    }

    /// The netback counters (client vifs while connected).
    pub fn netback_stats(&self) -> Option<NetbackStats> {
        match &self.kind {
            NicKind::Back(conn) => match &*conn.borrow() {
                BackConn::Up { back, .. } => Some(back.stats()),
                _ => None,
            },
            NicKind::Front(_) => None,
        }
    }
}

/// A send slot on a [`XenNic`].
#[derive(Debug)]
pub enum XenTx {
    Front(Rc<RefCell<FrontConn>>, Rc<core::cell::Cell<(u64, u64)>>),
    Back(Rc<RefCell<BackConn>>, Rc<core::cell::Cell<(u64, u64)>>),
}

impl smoltcp::phy::TxToken for XenTx {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let counters = match &self {
            XenTx::Front(_, c) | XenTx::Back(_, c) => c.clone(),
        };
        let (r, t) = counters.get();
        counters.set((r, t + 1));
        match self {
            XenTx::Front(conn, _) => {
                if let FrontConn::Up { front, .. } = &mut *conn.borrow_mut() {
                    return front.send(len, f);
                }
                // Went down since the slot was handed out: built, dropped.
                let mut frame = vec![0u8; len];
                f(&mut frame)
            }
            XenTx::Back(conn, _) => {
                let mut frame = vec![0u8; len];
                let result = f(&mut frame);
                if let BackConn::Up { back, .. } = &mut *conn.borrow_mut() {
                    back.send(&frame);
                }
                result
            }
        }
    }
}

impl crate::offload::OffloadNic for XenNic {
    /// Both the client's netback and the uplink's netfront hand over their
    /// packets whole (GSO, checksum partial).
    fn receive_offloaded<R>(
        &mut self,
        _now: Instant,
        f: impl FnOnce(&[u8], crate::offload::Offload) -> R,
    ) -> Option<R> {
        let (frame, offload) = self.take_received()?;
        Some(f(&frame, offload))
    }

    /// The frame the netback or netfront built is handed over as it is.
    fn receive_into(
        &mut self,
        _now: Instant,
        frame: &mut Vec<u8>,
    ) -> Option<crate::offload::Offload> {
        let (received, offload) = self.take_received()?;
        let sent = core::mem::replace(frame, received);
        self.shared.frame_pool.borrow_mut().give(sent);
        Some(offload)
    }

    fn gso_counts(&self) -> Option<crate::offload::GsoCounts> {
        if let Some(stats) = self.netback_stats() {
            return Some(crate::offload::GsoCounts {
                rx: stats.gso_from_client,
                tx: stats.gso_to_client,
                tx_lent: 0,
            });
        }
        self.netfront_stats()
            .map(|stats| crate::offload::GsoCounts {
                rx: stats.rx_gso,
                tx: stats.tx_gso,
                tx_lent: stats.tx_lent,
            })
    }

    /// A netback's copies and notifications; a netfront copies nothing
    /// itself (its backend does), so only its notifications count. Both
    /// count what they refused from their peer and dropped on the way to
    /// it.
    fn ring_counts(&self) -> Option<crate::offload::RingCounts> {
        if let Some(stats) = self.netback_stats() {
            return Some(crate::offload::RingCounts {
                copy_batches: stats.copy_batches,
                notifications: stats.notifications,
                refused: stats
                    .bad_requests
                    .saturating_add(stats.bad_checksum_offload),
                dropped: stats.dropped,
                realigned: stats.realigned,
            });
        }
        self.netfront_stats()
            .map(|stats| crate::offload::RingCounts {
                copy_batches: 0,
                notifications: stats.notifications,
                refused: stats
                    .rx_errors
                    .saturating_add(stats.protocol_errors)
                    .saturating_add(stats.bad_checksum_offload),
                dropped: stats.tx_errors,
                realigned: 0,
            })
    }

    /// A client's netback takes what its frontend negotiated.
    fn tx_offloads(&self) -> crate::offload::TxOffloads {
        match &self.kind {
            NicKind::Back(conn) => match &*conn.borrow() {
                BackConn::Up { back, .. } => back.tx_offloads(),
                _ => crate::offload::TxOffloads::default(),
            },
            NicKind::Front(conn) => match &*conn.borrow() {
                FrontConn::Up { front, .. } => front.tx_offloads(),
                FrontConn::Down => crate::offload::TxOffloads::default(),
            },
        }
    }

    /// Publishes what the netfront or netback was given since the last
    /// flush (both batch: `batching` is set when they connect).
    fn flush(&mut self) {
        match &self.kind {
            NicKind::Front(conn) => {
                if let FrontConn::Up { front, .. } = &mut *conn.borrow_mut() {
                    front.flush();
                }
            }
            NicKind::Back(conn) => {
                if let BackConn::Up { back, .. } = &mut *conn.borrow_mut() {
                    // Lent the pool: the held frames' buffers go back to it.
                    frames::lend(
                        &mut **back,
                        &mut self.shared.frame_pool.borrow_mut(),
                        Netback::flush,
                    );
                }
            }
        }
    }

    /// The uplink's netfront sends a big frame from its own pages
    /// (`netfront::PageLender`), keeping the buffer until the backend is
    /// done with it; a client's netback keeps the buffer until the flush,
    /// which copies the batch's frames to the client in one hypercall.
    fn transmit_owned(
        &mut self,
        now: Instant,
        frame: &mut Vec<u8>,
        offload: crate::offload::Offload,
    ) -> bool {
        if let NicKind::Back(conn) = &self.kind {
            let sent = match &mut *conn.borrow_mut() {
                BackConn::Up { back, .. } if back.can_send() => back.send_owned(frame, offload),
                _ => return false,
            };
            return self.count_sent(sent);
        }
        let NicKind::Front(conn) = &self.kind else {
            return self.transmit_offloaded(now, frame, offload);
        };
        let sent = match &mut *conn.borrow_mut() {
            FrontConn::Up { front, .. } => {
                poll_front(front, &self.shared);
                front.send_owned(frame, offload)
            }
            FrontConn::Down => return false,
        };
        self.count_sent(sent)
    }

    fn transmit_offloaded(
        &mut self,
        now: Instant,
        frame: &[u8],
        offload: crate::offload::Offload,
    ) -> bool {
        if let NicKind::Back(conn) = &self.kind {
            let sent = match &mut *conn.borrow_mut() {
                BackConn::Up { back, .. } if back.can_send() => back.send_offloaded(frame, offload),
                _ => return false,
            };
            return self.count_sent(sent);
        }
        if let NicKind::Front(conn) = &self.kind {
            let sent = match &mut *conn.borrow_mut() {
                FrontConn::Up { front, .. } => {
                    poll_front(front, &self.shared);
                    front.send_offloaded(frame, offload)
                }
                FrontConn::Down => return false,
            };
            return self.count_sent(sent);
        }
        match smoltcp::phy::Device::transmit(self, now) {
            Some(tx) => {
                smoltcp::phy::TxToken::consume(tx, frame.len(), |buffer| {
                    buffer.copy_from_slice(frame)
                });
                true
            }
            None => false,
        }
    }
}

impl smoltcp::phy::Device for XenNic {
    type RxToken<'a>
        = NetfrontRx
    where
        Self: 'a;
    type TxToken<'a>
        = XenTx
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(NetfrontRx, XenTx)> {
        let counters = self.counters.clone();
        let (r, t) = counters.get();
        match &mut self.kind {
            NicKind::Front(conn) => {
                let frame = match &mut *conn.borrow_mut() {
                    FrontConn::Up { front, .. } => {
                        front.poll();
                        front.take_frame()?
                    }
                    FrontConn::Down => return None,
                };
                counters.set((r + 1, t));
                Some((NetfrontRx(frame), XenTx::Front(conn.clone(), counters)))
            }
            NicKind::Back(conn) => {
                let frame = match &mut *conn.borrow_mut() {
                    BackConn::Up { back, .. } => {
                        back.poll();
                        back.take_frame()?
                    }
                    _ => return None,
                };
                counters.set((r + 1, t));
                Some((NetfrontRx(frame), XenTx::Back(conn.clone(), counters)))
            }
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<XenTx> {
        let counters = self.counters.clone();
        match &mut self.kind {
            NicKind::Front(conn) => match &mut *conn.borrow_mut() {
                FrontConn::Up { front, .. } => {
                    front.poll();
                    front
                        .can_send()
                        .then(|| XenTx::Front(conn.clone(), counters))
                }
                FrontConn::Down => None,
            },
            NicKind::Back(conn) => match &*conn.borrow() {
                BackConn::Up { back, .. } if back.can_send() => {
                    Some(XenTx::Back(conn.clone(), counters))
                }
                _ => None,
            },
        }
    }

    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        let mut caps = smoltcp::phy::DeviceCapabilities::default();
        caps.medium = smoltcp::phy::Medium::Ethernet;
        caps.max_transmission_unit = netfront::MAX_FRAME;
        let mut checksum = smoltcp::phy::ChecksumCapabilities::default();
        checksum.ipv4 = smoltcp::phy::Checksum::Both;
        caps.checksum = checksum;
        caps
    }
}

impl Drop for XenNic {
    fn drop(&mut self) {
        match &mut self.kind {
            NicKind::Front(conn) => {
                if let FrontConn::Up { front, retired } =
                    core::mem::replace(&mut *conn.borrow_mut(), FrontConn::Down)
                {
                    release_frontend(front, retired, &self.shared);
                }
            }
            NicKind::Back(conn) => {
                match core::mem::replace(&mut *conn.borrow_mut(), BackConn::Gone) {
                    BackConn::Up {
                        back,
                        mappings,
                        windows,
                        machine,
                        ..
                    } => {
                        release_backend(back, mappings, windows, &self.shared);
                        self.shared.unwatch.borrow_mut().extend(machine.watched());
                    }
                    BackConn::Waiting { machine, .. } => {
                        self.shared.unwatch.borrow_mut().extend(machine.watched());
                    }
                    BackConn::Gone => {}
                }
            }
        }
    }
}

/// Resources behind one vchan, released when it is dropped.
#[derive(Debug)]
enum Holdings {
    Server {
        grants: Vec<u32>,
        pages: *mut u8,
        layout: Layout,
        path: String,
        ring_ref: u32,
    },
    Client {
        mappings: Vec<ForeignMapping>,
        windows: Vec<(usize, usize)>,
    },
}

/// A vchan end on Xen.
#[derive(Debug)]
pub struct XenVchan {
    ring: VchanRing<RawMemory, XenNotify>,
    holdings: Holdings,
    shared: Rc<Shared>,
}

impl ByteStream for XenVchan {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        self.ring.read(buf)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        self.ring.write(buf)
    }
    fn state(&self) -> LinkState {
        self.ring.state()
    }
    fn close(&mut self) {
        self.ring.close();
    }
}

impl Drop for XenVchan {
    fn drop(&mut self) {
        self.ring.close();
        let port = self.ring.port();
        events::close(port);
        self.shared.ports.borrow_mut().remove(&port);
        release(&mut self.holdings, &self.shared);
    }
}

/// Pages of a closed vchan server or netfront still granted to the peer.
#[derive(Debug)]
pub struct Retired {
    grants: Vec<u32>,
    pages: *mut u8,
    layout: Layout,
    /// Frame buffers whose pages were lent to the peer
    /// (`netfront::PageLender`): freed with the rest, not before.
    held: Vec<Vec<u8>>,
}

impl Retired {
    /// Revokes what it can; frees the pages once nothing is granted.
    /// Returns itself while some grant is still mapped by the peer.
    fn try_free(mut self, shared: &Shared) -> Option<Retired> {
        self.grants
            .retain(|gref| shared.grants.borrow_mut().end_access(*gref).is_err());
        if !self.grants.is_empty() {
            return Some(self);
        }
        self.held.clear();
        if !self.pages.is_null() {
            // SAFETY: allocated in `vchan_server` with this layout; no grant
            // to it remains, so no peer can reach it any more.
            unsafe { alloc::alloc::dealloc(self.pages, self.layout) };
        }
        None
    }
}

/// Gives back what a vchan held: revokes grants (freeing the pages only if
/// every grant could be revoked), queues the xenstore directory for
/// removal, unmaps foreign pages and frees their window slots.
fn release(holdings: &mut Holdings, shared: &Shared) {
    match holdings {
        Holdings::Server {
            grants,
            pages,
            layout,
            path,
            ring_ref,
        } => {
            let retired = Retired {
                grants: core::mem::take(grants),
                pages: *pages,
                layout: *layout,
                held: Vec::new(),
            };
            if let Some(retired) = retired.try_free(shared) {
                // The peer has not unmapped yet (it will once it sees the
                // close); `wait` tries again. Never reuse the pages before.
                shared.retired.borrow_mut().push(retired);
            }
            *pages = core::ptr::null_mut();
            if !path.is_empty() {
                shared
                    .stale_paths
                    .borrow_mut()
                    .push((core::mem::take(path), *ring_ref));
            }
        }
        Holdings::Client { mappings, windows } => {
            let failed = grant::unmap_all(
                core::mem::take(mappings),
                core::mem::take(windows),
                &mut shared.window.borrow_mut(),
                grant::unmap_grant,
            );
            for (mapping, error) in failed {
                log::warn!(
                    "xen: cannot unmap the foreign page at {:#x}: {error:?}; its window frames stay reserved",
                    mapping.addr
                );
            }
        }
    }
}

impl Platform for XenPlatform {
    type Vchan = XenVchan;
    type Xenstore = XenXenstore;
    type Nic = XenNic;

    fn domid(&self) -> u16 {
        self.domid
    }

    fn memory_bytes(&self) -> usize {
        self.boot.ram_bytes() as usize
    }

    fn heap_usage(&self) -> Option<HeapUsage> {
        XenPlatform::heap_usage(self).map(|(used, total)| HeapUsage {
            used,
            total,
            peak: 0,
        })
    }

    fn now(&self) -> Instant {
        let (ns, refused) = self.clock.read(
            || self.runstate.as_ref().and_then(woke_at),
            || system_time(&self.shared_info),
        );
        if let Some(WakeTimes::Refused(lag)) = refused {
            log::warn!(
                "xen: the TSC's reading minus the runstate's wake-up time was {lag} ns, out of ±{} ns; the clock reads the TSC each time from now on",
                time::MAX_WAKE_LAG_NS
            );
        }
        let ns = ns.saturating_sub(self.boot_ns);
        Instant::from_micros((ns / 1000) as i64)
    }

    fn clock_counts(&self) -> Option<crate::platform::ClockCounts> {
        Some(self.clock.counts())
    }

    fn random_seed(&mut self) -> u64 {
        super::entropy::seed(system_time(&self.shared_info))
    }

    fn wait(&mut self, deadline: Option<Instant>) {
        // The step's work is done: wake the NICs' peers now.
        self.shared.nic_notify.send();
        // Devices move only when a watched xenstore node changed.
        if self.xenstore.take_dirty() {
            self.progress_devices();
        }
        let retired: Vec<Retired> = self.shared.retired.borrow_mut().drain(..).collect();
        for pages in retired {
            if let Some(still) = pages.try_free(&self.shared) {
                self.shared.retired.borrow_mut().push(still);
            }
        }
        let stale: Vec<(String, u32)> = self.shared.stale_paths.borrow_mut().drain(..).collect();
        for (path, ring_ref) in stale {
            // A newer server on the same port republished the path: keep it.
            let current = self.xenstore.read(&format!("{path}/{RING_REF_KEY}"));
            if matches!(current, Ok(Some(ref text)) if parse_decimal(text) == Some(ring_ref)) {
                let _ = self.xenstore.remove(&path);
            }
        }
        // The clock is read here only when needed: with a directory removal
        // pending, or more ports than one poll takes. Where Xen finds the
        // TSC unreliable (under QEMU's TCG) it traps every RDTSC of ours,
        // and a profile of `bench xen` put 8-9 % of our samples there when
        // each pass of the main loop read the clock three times; a pass now
        // reads it once, in `Firewall::step` (`now`), and after a sleep or
        // a switch without the TSC ([`Clock`]).
        let clock = (!self.removals.is_empty()).then(|| system_time(&self.shared_info));
        if let Some(now_ns) = clock {
            // Detached vifs' directories whose time has come.
            let (due, later): (Vec<_>, Vec<_>) = core::mem::take(&mut self.removals)
                .into_iter()
                .partition(|(_, at)| *at <= now_ns);
            self.removals = later;
            for (machine, _) in due {
                if let Err(error) = machine.remove(&mut self.xenstore) {
                    log::warn!("xen: cannot remove {}: {error}", machine.backend);
                }
            }
        }
        let next_removal = self.removals.iter().map(|(_, at)| *at).min();
        // Anything that fired since the last wait: return at once so the
        // caller looks at its links again.
        let mut fired = false;
        for port in self.shared.ports.borrow().iter() {
            fired |= self.shared_info.take_pending(*port);
        }
        if fired {
            return;
        }
        let ports: Vec<u32> = self.shared.ports.borrow().iter().copied().collect();
        // About to sleep. The clock is not read for it: a deadline that
        // passed meanwhile is handed to Xen all the same, whose poll timer,
        // set in the past, fires at once and ends the poll (`vcpu_poll`'s
        // `set_timer`). Only with a reading at hand (a removal pending) is
        // such a deadline caught here, without the hypercall.
        let timeout = match deadline {
            Some(deadline) => {
                let micros = deadline.total_micros().max(0) as u64;
                let at = self
                    .boot_ns
                    .saturating_add(micros.saturating_mul(1000))
                    .max(1);
                if clock.is_some_and(|now_ns| at <= now_ns) {
                    return;
                }
                at
            }
            None => 0,
        };
        // Wake up for the next directory removal.
        let timeout = match (timeout, next_removal) {
            (0, Some(at)) => at.max(1),
            (t, Some(at)) => t.min(at.max(1)),
            (t, None) => t,
        };
        // Xen polls at most 128 ports at once (`do_poll`); past that, sleep
        // in short slices so no link is starved.
        if ports.len() > MAX_POLL_PORTS {
            let now_ns = clock.unwrap_or_else(|| system_time(&self.shared_info));
            let slice = now_ns.saturating_add(1_000_000);
            let until = if timeout == 0 {
                slice
            } else {
                timeout.min(slice)
            };
            self.clock.sleeping();
            hypercall::sched_poll(ports.get(..MAX_POLL_PORTS).unwrap_or_default(), until);
        } else {
            self.clock.sleeping();
            hypercall::sched_poll(&ports, timeout);
        }
    }

    fn vchan_server(&mut self, peer: u16, port: u32) -> Result<XenVchan, PlatformError> {
        let orders = RingOrders::for_server(SERVER_READ_MIN, SERVER_WRITE_MIN)
            .map_err(|error| other(format!("vchan ring sizes: {error}")))?;
        let ring_pages = orders.grant_count();
        let layout = Layout::from_size_align((1 + ring_pages) * abi::PAGE_SIZE, abi::PAGE_SIZE)
            .map_err(|_| PlatformError::Exhausted("memory for vchan pages"))?;
        // SAFETY: the layout has a non-zero size.
        let pages = unsafe { alloc_zeroed(layout) };
        if pages.is_null() {
            return Err(PlatformError::Exhausted("memory for vchan pages"));
        }
        let page_addr = |i: usize| pages as u64 + (i * abi::PAGE_SIZE) as u64;
        let mut grants = Vec::new();
        let fail = |grants: &mut Vec<u32>, error: PlatformError| {
            for gref in grants.drain(..) {
                let _ = self.shared.grants.borrow_mut().end_access(gref);
            }
            error
        };
        for i in 0..=ring_pages {
            match self
                .shared
                .grants
                .borrow_mut()
                .grant_access(peer, page_addr(i) >> 12, false)
            {
                Ok(gref) => grants.push(gref),
                Err(_) => {
                    return Err(fail(
                        &mut grants,
                        PlatformError::Exhausted("grant references"),
                    ));
                }
            }
        }
        let local_port = match events::alloc_unbound(peer) {
            Ok(local_port) => local_port,
            Err(rc) => {
                return Err(fail(
                    &mut grants,
                    other(format!(
                        "cannot allocate an event channel for domain {peer}: {rc}"
                    )),
                ));
            }
        };
        // SAFETY: `pages` is our own zeroed allocation of 1 + ring_pages
        // pages, kept until the vchan is dropped (or leaked if the peer still
        // maps it), shared with the peer through the grants above, and
        // touched only through `RawMemory`.
        let ctrl = unsafe { RawMemory::new(pages, abi::PAGE_SIZE) };
        let buffer = |ring: protocol::vchan::RingLayout| match ring.placement() {
            RingPlacement::InPage { offset } => RingBuffer {
                mem: ctrl,
                base: offset,
            },
            RingPlacement::Granted {
                first_grant,
                pages: count,
            } => RingBuffer {
                // SAFETY: as for `ctrl`: pages 1 + first_grant .. of the same allocation.
                mem: unsafe {
                    RawMemory::new(
                        page_addr(1 + first_grant) as *mut u8,
                        count * abi::PAGE_SIZE,
                    )
                },
                base: 0,
            },
        };
        let (read, write) = (buffer(orders.left()), buffer(orders.right()));
        let ring_grants: Vec<u32> = grants.get(1..).unwrap_or_default().to_vec();
        let ring = VchanRing::server(
            ctrl,
            &orders,
            &ring_grants,
            read,
            write,
            local_port,
            XenNotify,
        );
        let path = format!("/local/domain/{}/data/vchan/{peer}/{port}", self.domid);
        let ring_ref = grants.first().copied().unwrap_or_default();
        self.remember_port(local_port);
        let vchan = XenVchan {
            ring,
            holdings: Holdings::Server {
                grants,
                pages,
                layout,
                path: path.clone(),
                ring_ref,
            },
            shared: self.shared.clone(),
        };
        self.publish_server(&path, ring_ref, local_port, peer)
            .map_err(PlatformError::Xenstore)?;
        log::debug!(
            "xen: vchan server for domain {peer} port {port}: ring-ref {ring_ref}, event channel {local_port}"
        );
        Ok(vchan)
    }

    fn vchan_client(&mut self, peer: u16, port: u32) -> Result<XenVchan, PlatformError> {
        let dir = format!("/local/domain/{peer}/data/vchan/{}/{port}", self.domid);
        let read_number = |xs: &mut XenXenstore, key: &str| -> Result<u32, PlatformError> {
            let text = xs
                .read(&format!("{dir}/{key}"))
                .map_err(PlatformError::Xenstore)?
                .ok_or_else(|| other(format!("no vchan server at {dir} (missing {key})")))?;
            parse_decimal(&text)
                .filter(|n| *n != 0)
                .ok_or_else(|| other(format!("{dir}/{key} is {text:?}, not a number")))
        };
        let ring_ref = read_number(&mut self.xenstore, RING_REF_KEY)?;
        let remote_port = read_number(&mut self.xenstore, EVENT_CHANNEL_KEY)?;
        let local_port = events::bind_interdomain(peer, remote_port).map_err(|rc| {
            other(format!(
                "cannot bind event channel {remote_port} of domain {peer}: {rc}"
            ))
        })?;
        let mut holdings = Holdings::Client {
            mappings: Vec::new(),
            windows: Vec::new(),
        };
        let Holdings::Client { mappings, windows } = &mut holdings else {
            return Err(other("unreachable holdings"));
        };
        let result = (|| {
            let ctrl = self.map_ring(peer, &[ring_ref], false, mappings, windows)?;
            let plan = plan_client(&ctrl, ring_ref, CLIENT_MAX_ORDER)
                .map_err(|error| other(format!("vchan server of domain {peer}: {error}")))?;
            let mut buffer = |ring: &ClientRing, readonly: bool, this: &mut XenPlatform| match ring
            {
                ClientRing::InPage { offset } => Ok(RingBuffer {
                    mem: ctrl,
                    base: *offset,
                }),
                ClientRing::Granted(refs) => {
                    let mem = this.map_ring(peer, refs, readonly, mappings, windows)?;
                    Ok::<_, PlatformError>(RingBuffer { mem, base: 0 })
                }
            };
            let write = buffer(&plan.write, false, self)?;
            let read = buffer(&plan.read, true, self)?;
            let orders = plan.orders;
            Ok((ctrl, orders, read, write))
        })();
        let (ctrl, orders, read, write) = match result {
            Ok(parts) => parts,
            Err(error) => {
                events::close(local_port);
                release(&mut holdings, &self.shared);
                return Err(error);
            }
        };
        self.remember_port(local_port);
        let ring = VchanRing::client(ctrl, &orders, read, write, local_port, XenNotify);
        Ok(XenVchan {
            ring,
            holdings,
            shared: self.shared.clone(),
        })
    }

    fn xenstore(&mut self) -> &mut XenXenstore {
        &mut self.xenstore
    }

    fn uplink(&mut self) -> Result<XenNic, PlatformError> {
        self.connect_netfront(UPLINK_NODE)
    }

    fn attach_client(&mut self, domid: u16, device: u32) -> Result<Self::Nic, PlatformError> {
        let backend = format!("/local/domain/{}/backend/vif/{domid}/{device}", self.domid);
        let frontend = self
            .xenstore
            .read(&format!("{backend}/frontend"))
            .map_err(PlatformError::Xenstore)?
            .ok_or_else(|| {
                other(format!(
                    "{backend}/frontend missing: the toolstack has not set up vif{domid}.{device}"
                ))
            })?;
        if !frontend.starts_with(&format!("/local/domain/{domid}/")) || frontend.contains("..") {
            return Err(other(format!(
                "{backend}/frontend is {frontend:?}, not in domain {domid}"
            )));
        }
        self.xenstore
            .transaction(8, |xs| xenbus::offer(xs, &backend))
            .map_err(PlatformError::Xenstore)?;
        let machine = BackendMachine::new(backend, frontend);
        // A dropped vif of the same client may have queued these very paths
        // for unwatching: settle the queue first.
        self.flush_unwatch(&machine.watched());
        for path in machine.watched() {
            // xenstored fires each new watch at once: the machine runs in
            // the next `wait`.
            self.xenstore
                .watch_node(&path)
                .map_err(PlatformError::Xenstore)?;
        }
        let conn = Rc::new(RefCell::new(BackConn::Waiting {
            domid,
            device,
            machine,
        }));
        self.shared.backends.borrow_mut().push(Rc::downgrade(&conn));
        let nic = XenNic::new(
            NicKind::Back(conn),
            format!("netback vif{domid}.{device}"),
            &self.shared,
        );
        self.xenstore.mark_dirty();
        Ok(nic)
    }

    fn exit(&mut self, how: Shutdown) -> ! {
        for (name, counters) in self.shared.nic_counters.borrow().iter() {
            let (rx, tx) = counters.get();
            log::info!("xen: {name}: {rx} frames received, {tx} sent");
        }
        let reason = match how {
            Shutdown::PowerOff => abi::SHUTDOWN_POWEROFF,
            Shutdown::Reboot => abi::SHUTDOWN_REBOOT,
            Shutdown::Crash => abi::SHUTDOWN_CRASH,
        };
        match self.heap_usage() {
            Some((used, claimed)) => log::info!(
                "xen: shutting down ({how:?}); heap in use {} KiB of {} KiB",
                used >> 10,
                claimed >> 10
            ),
            None => log::info!("xen: shutting down ({how:?})"),
        }
        loop {
            hypercall::sched_shutdown(reason);
            hypercall::sched_yield();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_from_xenstore_are_parsed_strictly() {
        assert_eq!(parse_decimal("8"), Some(8));
        assert_eq!(parse_decimal("4294967295"), Some(u32::MAX));
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "4294967296",
            "99999999999",
            "1\0",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }
}
