//! The program flow of the firewall (qubes-mirage-firewall's
//! `unikernel.ml`, seed `004_…`), generic over the [`Platform`]:
//!
//! 1. record the start time; parse the boot options ([`BootOptions`]);
//! 2. connect QubesDB (vchan client to dom0 port 111; while dom0 does not
//!    offer it yet, try again every second, as Qubes' `libvchan_client_init`
//!    waits for its server) and offer the qrexec
//!    agent (vchan server on port 512); log the time until both are
//!    connected ("QubesDB and qrexec agents connected in … s", as mirage);
//! 3. read the network configuration (boot options override QubesDB; wait
//!    for the keys while they are absent, logging once);
//! 4. create the router (its NAT table) and bring up the uplink;
//! 5. signal success to dom0 with an empty write to `/qubes-iptables-error`;
//! 6. watch `backend/vif` in xenstore for clients (IP from
//!    `backend/vif/<domid>/<dev>/ip`, first space-separated token; an IPv6
//!    second token if present) and `control/shutdown` for `poweroff` /
//!    `reboot` (acknowledged by writing "" as Xen guests do);
//! 7. main loop: QubesDB updates (rule commits go to the router), qrexec,
//!    uplink and client NICs, timers; sleep with `platform.wait` until the
//!    earliest deadline. It ends on a shutdown request.
//!
//! Differences from mirage on purpose: a broken QubesDB or qrexec link is
//! offered again instead of ending the program; a boot-option error or a
//! platform that cannot bring up the uplink ends it with
//! [`Shutdown::Crash`] after a clear console line, never a panic.
//!
//! # The QubesDB keys dom0 writes for a firewall qube
//!
//! qubesd writes these for a qube with `provides_network` and a `netvm`
//! (qubes-core-admin `QubesVM.create_qdb_entries`, `mix/net.py`); this is
//! what a Linux sys-firewall does with each, and what we do:
//!
//! | key | Linux sys-firewall | here |
//! |---|---|---|
//! | `/qubes-ip`, `/qubes-gateway`, `/qubes-primary-dns`, `/qubes-secondary-dns`, `/qubes-ip6`, `/qubes-gateway6` | uplink address, default route, resolvers (`setup-ip`) | the same ([`NetworkSettings`]); the DNS pair is also what `specialtarget=dns` means, as Linux's `dns-addr` set (its `resolv.conf`) |
//! | `/qubes-netmask` | uplink netmask, always `255.255.255.255` | implied: only the gateway is on the uplink's link |
//! | `/qubes-mac` | picks the uplink interface by MAC | not needed: the uplink is always vif 0, MAC from xenstore `device/vif/0/mac` (the same value) |
//! | `/qubes-netvm-gateway`, `/qubes-netvm-gateway6` | the address it answers as on every client vif (`vif-route-qubes`) | `/qubes-ip` / `/qubes-ip6`: qubesd writes the same value to both (`gateway` is `visible_ip`) |
//! | `/qubes-netvm-netmask` | `255.255.255.255`, host routes per vif | implied: one host per vif, our ARP/NDP responder answers for the gateway |
//! | `/qubes-netvm-network` | non-empty: it serves clients, so set up the DNS redirection (`setup-ip`) | always: a firewall always serves clients |
//! | `/qubes-netvm-primary-dns`, `/qubes-netvm-secondary-dns` | the DNS addresses its clients use, DNAT-ed to its own resolvers (`qubes-setup-dnat-to-ns`) | forwarded unchanged: qubesd writes the same `10.139.1.1`/`10.139.1.2` as our own `/qubes-*-dns`, so Linux's DNAT maps each to itself |
//! | `/connected-ips`, `/connected-ips6` | anti-spoofing for every connected qube, running or not (`update_connected_ips`) | the same: read at sync and on every change, given to the router, shown in `qubes.FirewallStatus` |
//! | `/mapped-ip/<ip>/visible-ip`, `…/visible-gateway` (`net.fake-ip`, `net.fake-gateway` of a client) | NAT between the client's visible and real address (`vif-qubes-nat.sh`) | **not supported**: a warning is logged; such a client sends from an address its vif does not carry, so its traffic is dropped as spoofed (fail closed) |
//! | `/qubes-firewall/<ip>/…` | the client's rules | the same ([`RuleSet`]) |
//! | `/qubes-random-seed` | fed to the kernel's RNG | not used: the platform's entropy seeds us |
//! | `/name`, `/type`, `/qubes-vm-type`, `/qubes-vm-updateable`, `/qubes-vm-persistence`, `/qubes-debug-mode`, `/qubes-base-template`, `/default-user`, `/qubes-timezone`, `/qubes-block-devices`, `/qubes-usb-devices`, `/qubes-service/…` | not about the network | not used |
//!
//! We write `/qubes-iptables-error` (empty once networking is up), as Linux
//! and mirage-firewall do.
//!
//! The flow is split into [`Firewall::start`] and [`Firewall::step`] so a
//! test can drive it step by step; [`run`] is the loop the Xen image and the
//! hosted binary call. Nothing here touches a packet byte itself (that is the
//! router's job) and nothing here may panic on anything a peer sends.
#![forbid(unsafe_code)]

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::{self, Write as _};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use log::{error, info, warn};
use smoltcp::time::Duration;
use smoltcp::wire::EthernetAddress;

use crate::config::{BootOptionError, BootOptions, ControlCaps, NetworkSettings};
use crate::platform::{Instant, Platform, PlatformError, Shutdown, Xenstore, XenstoreError};
use crate::qrexec::{Agent, Output, ServiceHost};
use crate::qubesdb::{
    CONNECTED_IPS, CONNECTED_IPS6, ConnectedIps, Database, DbEvent, IPTABLES_ERROR, QubesDb,
};
use crate::router::{Caps, ClientConfig, ClientId, DropReason, NetworkConfig, Router};
use crate::rules::{Action, RuleSet};
use crate::status::{ClientStatus, InterfaceStatus, PendingStatus, StatusReport};

/// QubesDB's vchan port (`QUBESDB_VCHAN_PORT`).
pub const QUBESDB_PORT: u32 = 111;
/// qrexec's control vchan port (`VCHAN_BASE_PORT`).
pub const QREXEC_PORT: u32 = protocol::qrexec::VCHAN_BASE_PORT;
/// Where the toolstack publishes client vifs (relative to our domain).
pub const BACKEND_VIF: &str = "backend/vif";
/// Where the toolstack asks us to stop (relative to our domain).
pub const CONTROL_SHUTDOWN: &str = "control/shutdown";
/// Our uplink's MAC (relative to our domain).
pub const UPLINK_MAC: &str = "device/vif/0/mac";
/// How long to wait before offering a broken link again.
pub const RELINK_DELAY: Duration = Duration::from_secs(1);

const TOKEN_VIF: &str = "qubes-firewall:vif";
const TOKEN_SHUTDOWN: &str = "qubes-firewall:shutdown";

/// Why the program flow could not start or had to stop.
#[derive(Debug)]
pub enum FlowError {
    /// The kernel command line is wrong.
    BootOptions(BootOptionError),
    /// The platform refused a resource we cannot run without.
    Platform {
        /// What we were doing.
        doing: &'static str,
        /// The platform's reason.
        error: PlatformError,
    },
    /// xenstore refused a request we cannot run without.
    Xenstore {
        /// What we were doing.
        doing: &'static str,
        /// xenstore's reason.
        error: XenstoreError,
    },
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowError::BootOptions(error) => write!(f, "{error}"),
            FlowError::Platform { doing, error } => write!(f, "{doing}: {error}"),
            FlowError::Xenstore { doing, error } => write!(f, "{doing}: {error}"),
        }
    }
}

/// The wall clock, as set by `qubes.SetDateTime`.
#[derive(Clone, Copy, Debug, Default)]
struct WallClock {
    /// (unix seconds, monotonic instant) at the last setting.
    base: Option<(i64, Instant)>,
}

impl WallClock {
    fn now(&self, now: Instant) -> Option<i64> {
        let (unix, at) = self.base?;
        Some(unix.saturating_add((now - at).secs() as i64))
    }
}

/// A client vif the router serves.
#[derive(Debug)]
struct ClientVif<N> {
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    nic: N,
}

/// What the status report shows of a client's rules (the router keeps the
/// set itself).
#[derive(Clone, Debug)]
struct RuleSummary {
    rules: usize,
    policy: Action,
    error: Option<String>,
}

impl RuleSummary {
    fn of(rules: &RuleSet) -> RuleSummary {
        RuleSummary {
            rules: rules.rules().len(),
            policy: rules.policy(),
            error: rules.error().map(ToString::to_string),
        }
    }
}

/// The network side, once configured.
struct Network<P: Platform> {
    settings: NetworkSettings,
    nat_capacity: usize,
    router: Router,
    uplink: P::Nic,
    clients: BTreeMap<ClientId, ClientVif<P::Nic>>,
}

/// The firewall program: links to dom0, the router and its NICs.
pub struct Firewall<P: Platform> {
    options: BootOptions,
    caps: ControlCaps,
    started: Instant,
    qubesdb: QubesDb<P::Vchan>,
    qubesdb_retry: Option<Instant>,
    /// The last error of a failed attempt to open QubesDB's link, logged
    /// once until another error or a success.
    qubesdb_error: Option<String>,
    agent: Agent<P::Vchan>,
    agent_retry: Option<Instant>,
    connected_logged: bool,
    waiting_logged: Option<String>,
    network: Option<Network<P>>,
    /// Rule sets committed before the router existed, by client address.
    pending_rules: BTreeMap<IpAddr, RuleSet>,
    /// What each client's rules look like, for the status report.
    rule_summary: BTreeMap<IpAddr, RuleSummary>,
    /// The committed entries last applied per client (refused-at-cap flag,
    /// entries), to skip commits that change nothing.
    applied_entries: BTreeMap<IpAddr, (bool, Vec<(String, String)>)>,
    wall_clock: WallClock,
    /// Every vif is to be listed again (start, a watch event naming no
    /// domain, too many domains at once).
    vifs_dirty: bool,
    /// The domains whose `backend/vif/<domid>` a watch event named since
    /// the last rescan: only these are listed again, so a client coming or
    /// going costs a few xenstore requests, not a few per client.
    vif_domains: BTreeSet<u16>,
    /// Domains with a vif that could not be attached or was refused: listed
    /// again at the next rescan, whichever domain it is for.
    vif_retry: BTreeSet<u16>,
    /// A NIC stopped at its per-round budget in the last `step`: the next
    /// one must come without waiting for an event.
    nics_busy: bool,
    /// The clock as the last `step` read it: the main loop computes its
    /// next deadline from it rather than reading the clock again (under
    /// Xen on an unreliable TSC each read is a trap into the hypervisor).
    step_time: Instant,
    /// `/connected-ips` and `/connected-ips6` as last read.
    connected: ConnectedIps,
}

impl<P: Platform> fmt::Debug for Firewall<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Firewall")
            .field("options", &self.options)
            .field("network", &self.network.as_ref().map(|n| &n.settings))
            .field(
                "clients",
                &self
                    .network
                    .as_ref()
                    .map(|n| n.clients.keys().collect::<Vec<_>>()),
            )
            .finish_non_exhaustive()
    }
}

impl<P: Platform> Firewall<P> {
    /// Steps 1 and 2: parse the boot options, connect QubesDB, offer the
    /// qrexec agent, watch xenstore.
    pub fn start(platform: &mut P, cmdline: &str) -> Result<Firewall<P>, FlowError> {
        let started = platform.now();
        let options = BootOptions::parse(cmdline).map_err(FlowError::BootOptions)?;
        let caps = ControlCaps::for_memory(platform.memory_bytes());
        info!(
            "Qubes firewall starting: domain {}, {} MiB, boot options {:?}",
            platform.domid(),
            platform.memory_bytes() >> 20,
            cmdline
        );
        // QubesDB's link is opened by the first step (`poll_qubesdb`),
        // which keeps trying every second while dom0 does not offer it
        // yet (a race at boot, the daemon restarting), as Qubes'
        // libvchan_client_init waits for its server: networking waits for
        // QubesDB anyway.
        let control =
            platform
                .vchan_server(0, QREXEC_PORT)
                .map_err(|error| FlowError::Platform {
                    doing: "offering the qrexec agent (vchan port 512)",
                    error,
                })?;
        let xenstore = platform.xenstore();
        xenstore
            .watch(CONTROL_SHUTDOWN, TOKEN_SHUTDOWN)
            .map_err(|error| FlowError::Xenstore {
                doing: "watching control/shutdown",
                error,
            })?;
        xenstore
            .watch(BACKEND_VIF, TOKEN_VIF)
            .map_err(|error| FlowError::Xenstore {
                doing: "watching backend/vif",
                error,
            })?;
        Ok(Firewall {
            options,
            caps,
            started,
            qubesdb: QubesDb::unconnected(caps),
            qubesdb_retry: Some(started),
            qubesdb_error: None,
            agent: Agent::new(control, caps),
            agent_retry: None,
            connected_logged: false,
            waiting_logged: None,
            network: None,
            pending_rules: BTreeMap::new(),
            rule_summary: BTreeMap::new(),
            applied_entries: BTreeMap::new(),
            wall_clock: WallClock::default(),
            vifs_dirty: true,
            vif_domains: BTreeSet::new(),
            vif_retry: BTreeSet::new(),
            nics_busy: false,
            step_time: started,
            connected: ConnectedIps::default(),
        })
    }

    /// True once the router runs (networking is up).
    pub fn network_up(&self) -> bool {
        self.network.is_some()
    }

    /// The client vifs served now: (domid, device, ip).
    pub fn clients(&self) -> Vec<(u16, u32, Ipv4Addr)> {
        self.network.as_ref().map_or_else(Vec::new, |network| {
            network
                .clients
                .iter()
                .map(|(id, vif)| (id.domid, id.device, vif.ip))
                .collect()
        })
    }

    /// The status report, as `qubes.FirewallStatus` prints it, but without
    /// the heap's and the clock's figures (they come from the platform, not at hand here;
    /// the qrexec service asks the platform).
    pub fn status(&self, now: Instant) -> StatusReport {
        build_report(&ReportInputs {
            network: self.network.as_ref(),
            qubesdb: &self.qubesdb,
            agent: self.agent.stats(),
            rule_summary: &self.rule_summary,
            connected: &self.connected,
            wall_clock: self.wall_clock,
            heap: None,
            clock: None,
            started: self.started,
            now,
        })
    }

    /// One turn of the main loop: does all the work possible now. Returns
    /// `Some` when the program must end.
    pub fn step(&mut self, platform: &mut P) -> Option<Shutdown> {
        let now = platform.now();
        self.step_time = now;

        // QubesDB: sync, updates, rule commits; reconnect if it broke.
        self.poll_qubesdb(platform, now);

        // qrexec: handshake, commands, calls; offer again if it broke.
        self.poll_agent(platform, now);

        if !self.connected_logged && self.agent.is_connected() && self.qubesdb.is_synchronised() {
            self.connected_logged = true;
            let elapsed = now - self.started;
            info!(
                "QubesDB and qrexec agents connected in {}.{:03} s",
                elapsed.secs(),
                elapsed.millis()
            );
        }

        // xenstore: shutdown requests and client vifs.
        while let Some(event) = platform.xenstore().poll_watch() {
            if event.token == TOKEN_SHUTDOWN {
                if let Some(how) = shutdown_requested(platform) {
                    return Some(how);
                }
            } else if event.token == TOKEN_VIF {
                match vif_event_domain(&event.path) {
                    Some(domid) if self.vif_domains.len() < MAX_VIF_DOMAINS => {
                        self.vif_domains.insert(domid);
                    }
                    _ => self.vifs_dirty = true,
                }
            }
        }

        if self.network.is_none()
            && self.qubesdb.is_synchronised()
            && let Err(error) = self.bring_up_network(platform, now)
        {
            error!("{error}");
            return Some(Shutdown::Crash);
        }

        if self.network.is_some() {
            if self.vifs_dirty {
                self.vifs_dirty = false;
                self.vif_domains.clear();
                self.rescan_vifs(platform, None);
            } else if !self.vif_domains.is_empty() {
                let mut domains = core::mem::take(&mut self.vif_domains);
                domains.append(&mut self.vif_retry);
                self.rescan_vifs(platform, Some(&domains));
            }
        }

        if let Some(network) = &mut self.network {
            let unix = self.wall_clock.now(now).and_then(|s| u64::try_from(s).ok());
            network.router.set_wall_clock(unix, now);
            // A NIC left at its budget for this round (a flood) is taken
            // up again at once, after every other NIC had its turn.
            let mut more = network.router.pump_uplink(&mut network.uplink, now);
            for (id, vif) in &mut network.clients {
                more |= network.router.pump_client(*id, &mut vif.nic, now);
            }
            self.nics_busy = more;
            network.router.poll_timers(now);
            // What the clients queued for the uplink, and the timers for
            // anyone, leaves now: a frame still queued afterwards waits
            // for its NIC's room (an event), not in a busy loop
            // (`Router::poll_at`).
            network.router.transmit_uplink(&mut network.uplink, now);
            for id in network.router.clients_with_output() {
                if let Some(vif) = network.clients.get_mut(&id) {
                    network.router.transmit_client(id, &mut vif.nic, now);
                }
            }
        }
        None
    }

    /// The earliest time `step` has work to do without an event.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        [
            self.nics_busy.then_some(now),
            self.network.as_ref().and_then(|n| n.router.poll_at(now)),
            self.agent.poll_at(),
            self.agent_retry,
            self.qubesdb_retry,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn poll_qubesdb(&mut self, platform: &mut P, now: Instant) {
        if self.qubesdb.is_closed() {
            match self.qubesdb_retry {
                None => self.qubesdb_retry = Some(now + RELINK_DELAY),
                Some(at) if now >= at => {
                    self.qubesdb_retry = None;
                    match platform.vchan_client(0, QUBESDB_PORT) {
                        Ok(link) => {
                            info!("QubesDB: connecting to dom0");
                            self.qubesdb_error = None;
                            self.qubesdb = QubesDb::new(link, self.caps);
                        }
                        Err(error) => {
                            let error = error.to_string();
                            if self.qubesdb_error.as_ref() != Some(&error) {
                                warn!(
                                    "QubesDB: dom0's QubesDB (vchan port 111) not offered yet: {error}; trying again every {} s",
                                    RELINK_DELAY.secs()
                                );
                                self.qubesdb_error = Some(error);
                            }
                            self.qubesdb_retry = Some(now + RELINK_DELAY);
                        }
                    }
                }
                Some(_) => {}
            }
            // A link opened just now is polled at once: it sends the
            // MULTIREAD that dom0 waits for before it says anything.
            if self.qubesdb.is_closed() {
                return;
            }
        }
        self.qubesdb.poll();
        while let Some(event) = self.qubesdb.next_event() {
            match event {
                DbEvent::Synchronised => {
                    info!(
                        "QubesDB: synchronised, {} entries",
                        self.qubesdb.database().stats().entries
                    );
                    self.refresh_connected();
                    warn_mapped_ip(self.qubesdb.database(), None);
                }
                DbEvent::Changed(path) if path == CONNECTED_IPS || path == CONNECTED_IPS6 => {
                    self.refresh_connected();
                }
                DbEvent::Changed(path) if path.starts_with(MAPPED_IP) => {
                    warn_mapped_ip(self.qubesdb.database(), Some(&path));
                }
                DbEvent::Changed(path) => {
                    // The network configuration is read once networking is
                    // up; a later change needs a restart, as on Linux.
                    if self.network.is_some() && path.starts_with("/qubes-") {
                        info!("QubesDB: {path} changed (takes effect at the next start)");
                    }
                }
                DbEvent::RulesCommitted {
                    client,
                    entries,
                    incomplete,
                } => {
                    // A commit that changes nothing (dom0 rewrote the same
                    // rules, or QubesDB resynchronised after a reconnect)
                    // must not flush the client's connections.
                    let key = (incomplete, entries);
                    if self.applied_entries.get(&client) == Some(&key) {
                        continue;
                    }
                    let rules = if key.0 {
                        warn!(
                            "QubesDB: rules of {client} incomplete (a key was refused at the cap); \
                             blocking all its traffic"
                        );
                        RuleSet::deny_all()
                    } else {
                        RuleSet::parse(key.1.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    };
                    match rules.error() {
                        Some(error) => warn!("firewall rules of {client}: {error}"),
                        None => info!(
                            "firewall rules of {client}: {} rules, policy {:?}",
                            rules.rules().len(),
                            rules.policy()
                        ),
                    }
                    self.applied_entries.insert(client, key);
                    self.apply_rules(client, rules);
                }
                DbEvent::RulesRemoved(client) => {
                    info!("firewall rules of {client} removed; its traffic is blocked");
                    self.applied_entries.remove(&client);
                    self.rule_summary.remove(&client);
                    self.pending_rules.remove(&client);
                    if let Some(network) = &mut self.network {
                        network.router.remove_rules(client);
                    }
                }
            }
        }
    }

    /// Re-reads `/connected-ips` and `/connected-ips6` (dom0 rewrites both
    /// whenever a qube's netvm changes) and hands them to the router.
    fn refresh_connected(&mut self) {
        let connected = ConnectedIps::read(|key| self.qubesdb.database().get(key));
        if connected == self.connected {
            return;
        }
        for word in &connected.ignored {
            warn!("QubesDB {word} is not an address of that family; ignored");
        }
        info!(
            "connected qubes (from {CONNECTED_IPS} and {CONNECTED_IPS6}): {}",
            AddressList(&connected.addresses)
        );
        self.connected = connected;
        if let Some(network) = &mut self.network {
            apply_connected(&mut network.router, &self.connected);
        }
    }

    fn apply_rules(&mut self, client: IpAddr, rules: RuleSet) {
        self.rule_summary.insert(client, RuleSummary::of(&rules));
        match &mut self.network {
            Some(network) => network.router.set_rules(client, rules),
            None => {
                self.pending_rules.insert(client, rules);
            }
        }
    }

    fn poll_agent(&mut self, platform: &mut P, now: Instant) {
        if self.agent.is_closed() {
            match self.agent_retry {
                None => self.agent_retry = Some(now + RELINK_DELAY),
                Some(at) if now >= at => {
                    self.agent_retry = None;
                    match platform.vchan_server(0, QREXEC_PORT) {
                        Ok(control) => {
                            info!("qrexec: offering the agent again");
                            self.agent = Agent::new(control, self.caps);
                        }
                        Err(error) => {
                            warn!("qrexec: cannot offer the agent again: {error}");
                            self.agent_retry = Some(now + RELINK_DELAY);
                        }
                    }
                }
                Some(_) => {}
            }
            return;
        }
        let heap = platform.heap_usage();
        let clock = platform.clock_counts();
        let mut host = Host {
            heap,
            clock,
            network: self.network.as_ref(),
            qubesdb: &self.qubesdb,
            agent: self.agent.stats(),
            rule_summary: &self.rule_summary,
            connected: &self.connected,
            wall_clock: &mut self.wall_clock,
            started: self.started,
            now,
        };
        self.agent.poll(platform, &mut host, now);
    }

    fn bring_up_network(&mut self, platform: &mut P, now: Instant) -> Result<(), FlowError> {
        let settings = match self.options.network() {
            Some(settings) => settings,
            None => match NetworkSettings::from_qubesdb(|key| self.qubesdb.database().get(key)) {
                Ok(settings) => settings,
                Err(error) => {
                    let text = error.to_string();
                    if self.waiting_logged.as_deref() != Some(text.as_str()) {
                        warn!("{text}");
                        self.waiting_logged = Some(text);
                    }
                    return Ok(());
                }
            },
        };
        info!("{settings}");
        let uplink_mac = read_mac(platform.xenstore(), UPLINK_MAC).unwrap_or_else(|| {
            let domid = platform.domid().to_be_bytes();
            let mac = EthernetAddress([0x02, 0, 0, 0, domid[0], domid[1]]);
            warn!("{UPLINK_MAC} missing or invalid; using the local MAC {mac}");
            mac
        });
        let mut caps = Caps::for_memory(platform.memory_bytes());
        if let Some(size) = self.options.nat_table_size {
            // --nat-table-size as in mirage, but never past what the
            // memory holds (an allocation failure is not an option).
            let size = if size > caps.nat_entries {
                warn!(
                    "--nat-table-size={size} is more than {} MiB hold; using {}",
                    platform.memory_bytes() >> 20,
                    caps.nat_entries
                );
                caps.nat_entries
            } else {
                size
            };
            caps.nat_entries = size;
            caps.nat_entries_per_client = caps.nat_entries_per_client.min(size);
        }
        let config = NetworkConfig {
            uplink_mac,
            ip: settings.ip,
            gateway: settings.gateway,
            primary_dns: Some(settings.primary_dns),
            secondary_dns: Some(settings.secondary_dns),
            ip6: settings.ip6,
            gateway6: settings.gateway6,
            seed: platform.random_seed(),
        };
        let uplink = platform.uplink().map_err(|error| FlowError::Platform {
            doing: "bringing up the uplink to the net qube",
            error,
        })?;
        let mut router = Router::new(config, caps, now);
        for (client, rules) in core::mem::take(&mut self.pending_rules) {
            router.set_rules(client, rules);
        }
        apply_connected(&mut router, &self.connected);
        self.network = Some(Network {
            settings,
            nat_capacity: caps.nat_entries,
            router,
            uplink,
            clients: BTreeMap::new(),
        });
        // Report success to dom0, as mirage's Dao.set_iptables_error "".
        if let Err(error) = self.qubesdb.write(IPTABLES_ERROR, "") {
            warn!("QubesDB: cannot write {IPTABLES_ERROR}: {error}");
        }
        self.vifs_dirty = true;
        info!("networking up");
        Ok(())
    }

    /// Lists the vifs again, of every domain (`only` is `None`) or of the
    /// domains in `only`, and attaches and detaches clients to match.
    fn rescan_vifs(&mut self, platform: &mut P, only: Option<&BTreeSet<u16>>) {
        let Some(network) = &mut self.network else {
            return;
        };
        let listed = match only {
            None => list_vifs(platform.xenstore()),
            Some(domains) => {
                let mut found = BTreeMap::new();
                for domid in domains {
                    list_domain_vifs(platform.xenstore(), *domid, &mut found);
                }
                Ok(found)
            }
        };
        let present = match listed {
            Ok(present) => present,
            Err(error) => {
                warn!("xenstore: cannot list {BACKEND_VIF}: {error}; keeping the current clients");
                return;
            }
        };
        self.vif_retry.clear();
        let gone: Vec<ClientId> = network
            .clients
            .iter()
            .filter(|(id, _)| only.is_none_or(|domains| domains.contains(&id.domid)))
            .filter(|(id, vif)| present.get(id).map(|c| c.ip) != Some(vif.ip))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            info!("client vif{}.{} removed", id.domid, id.device);
            network.router.remove_client(id);
            network.clients.remove(&id);
        }
        for (id, config) in present {
            if network.clients.contains_key(&id) {
                continue;
            }
            let (ip, ip6) = (config.ip, config.ip6);
            let nic = match platform.attach_client(id.domid, id.device) {
                Ok(nic) => nic,
                Err(error) => {
                    warn!(
                        "client vif{}.{} ({ip}): cannot attach: {error}; will retry on the next change",
                        id.domid, id.device
                    );
                    self.vif_retry.insert(id.domid);
                    continue;
                }
            };
            match network.router.add_client(id, config) {
                Ok(()) => {
                    info!("client vif{}.{} added with IP {ip}", id.domid, id.device);
                    network.clients.insert(id, ClientVif { ip, ip6, nic });
                }
                Err(error) => {
                    warn!(
                        "client vif{}.{} ({ip}): refused by the router: {error}",
                        id.domid, id.device
                    );
                    self.vif_retry.insert(id.domid);
                }
            }
        }
    }
}

/// Where dom0 describes a client's `net.fake-ip` / `net.fake-gateway`.
const MAPPED_IP: &str = "/mapped-ip/";

/// Warns about each client with a visible address other than its real one
/// (all of them, or only the key `only` that changed): not supported here.
fn warn_mapped_ip(database: &Database, only: Option<&str>) {
    for warning in mapped_ip_warnings(database.iter(), only) {
        warn!("{warning}");
    }
}

/// The warnings [`warn_mapped_ip`] logs, one per `/mapped-ip/<ip>/…` key
/// whose value is an address other than `<ip>`.
fn mapped_ip_warnings<'a>(
    entries: impl Iterator<Item = (&'a str, &'a str)>,
    only: Option<&str>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for (path, value) in entries {
        let Some(rest) = path.strip_prefix(MAPPED_IP) else {
            continue;
        };
        if only.is_some_and(|only| only != path) {
            continue;
        }
        let Some((ip, what)) = rest.split_once('/') else {
            continue;
        };
        let feature = match what {
            "visible-ip" => "net.fake-ip",
            "visible-gateway" => "net.fake-gateway",
            _ => continue,
        };
        if value.is_empty() || value == ip {
            continue;
        }
        warnings.push(format!(
            "QubesDB {path} = {value:?}: client {ip:?} has {feature} set, which this \
             firewall does not support; its traffic is dropped as spoofed (remove the \
             feature in dom0 to give it network)"
        ));
    }
    warnings
}

/// Space-separated addresses, or `none`.
struct AddressList<'a>(&'a [IpAddr]);

impl fmt::Display for AddressList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, address) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{address}")?;
        }
        Ok(())
    }
}

/// Gives the router the addresses of every connected qube, running or not,
/// for its anti-spoofing (Linux's `update_connected_ips`).
fn apply_connected(router: &mut Router, connected: &ConnectedIps) {
    router.set_connected_ips(&connected.addresses);
}

/// Reads `control/shutdown`; acknowledges and returns a request we honour.
fn shutdown_requested<P: Platform>(platform: &mut P) -> Option<Shutdown> {
    let xenstore = platform.xenstore();
    let request = match xenstore.read(CONTROL_SHUTDOWN) {
        Ok(Some(request)) => request,
        Ok(None) => return None,
        Err(error) => {
            warn!("xenstore: cannot read {CONTROL_SHUTDOWN}: {error}");
            return None;
        }
    };
    let how = match request.as_str() {
        "" => return None,
        "poweroff" | "halt" => Shutdown::PowerOff,
        "reboot" => Shutdown::Reboot,
        other => {
            warn!("{CONTROL_SHUTDOWN}: {other:?} is not supported (only poweroff and reboot)");
            return None;
        }
    };
    // Acknowledge, as Linux and Mini-OS guests do, so the toolstack knows
    // the request was seen.
    if let Err(error) = xenstore.write(CONTROL_SHUTDOWN, "") {
        warn!("xenstore: cannot acknowledge {CONTROL_SHUTDOWN}: {error}");
    }
    info!("shutdown requested by the toolstack: {request}");
    Some(how)
}

fn read_mac<X: Xenstore>(xenstore: &mut X, path: &str) -> Option<EthernetAddress> {
    let text = xenstore.read(path).ok()??;
    let mut bytes = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut bytes {
        let part = parts.next()?;
        // from_str_radix alone would take "+0".
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(EthernetAddress(bytes))
}

/// Watch events naming a domain that are remembered one by one before a
/// rescan of every vif is cheaper.
const MAX_VIF_DOMAINS: usize = 16;

/// The domain a `backend/vif` watch event is about: `<domid>` of
/// `[…/]backend/vif/<domid>[/…]`; `None` for the directory itself (the
/// watch's first firing) or anything else (then every vif is listed).
fn vif_event_domain(path: &str) -> Option<u16> {
    let (_, rest) = path.split_once("backend/vif/")?;
    rest.split('/').next()?.parse().ok()
}

/// Lists `backend/vif/<domid>/<device>/ip` (and `mac`).
fn list_vifs<X: Xenstore>(
    xenstore: &mut X,
) -> Result<BTreeMap<ClientId, ClientConfig>, XenstoreError> {
    let mut found = BTreeMap::new();
    for domid_text in xenstore.directory(BACKEND_VIF)? {
        let Ok(domid) = domid_text.parse::<u16>() else {
            warn!("{BACKEND_VIF}/{domid_text}: not a domain id; ignored");
            continue;
        };
        list_domain_vifs(xenstore, domid, &mut found);
    }
    Ok(found)
}

/// Adds the vifs of domain `domid` (`backend/vif/<domid>/<device>/ip`, and
/// `mac`) to `found`; none when the domain has no `backend/vif` entry.
fn list_domain_vifs<X: Xenstore>(
    xenstore: &mut X,
    domid: u16,
    found: &mut BTreeMap<ClientId, ClientConfig>,
) {
    let devices = match xenstore.directory(&format!("{BACKEND_VIF}/{domid}")) {
        Ok(devices) => devices,
        Err(error) => {
            warn!("{BACKEND_VIF}/{domid}: {error}; ignored");
            return;
        }
    };
    for device_text in devices {
        let Ok(device) = device_text.parse::<u32>() else {
            warn!("{BACKEND_VIF}/{domid}/{device_text}: not a device number; ignored");
            continue;
        };
        let base = format!("{BACKEND_VIF}/{domid}/{device}");
        let ip_text = match xenstore.read(&format!("{base}/ip")) {
            Ok(Some(text)) => text,
            // No IP (yet): not a client we can serve; the watch fires
            // again when the toolstack writes it.
            Ok(None) => continue,
            Err(error) => {
                warn!("{base}/ip: {error}; ignored");
                continue;
            }
        };
        let mut words = ip_text.split_ascii_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<Ipv4Addr>) else {
            warn!("{base}/ip = {ip_text:?}: not an IPv4 address; ignored");
            continue;
        };
        let ip6 = words.find_map(|word| word.parse::<Ipv6Addr>().ok());
        let mac = read_mac(xenstore, &format!("{base}/mac"));
        found.insert(ClientId { domid, device }, ClientConfig { ip, ip6, mac });
    }
}

/// What the qrexec services see of the firewall.
struct Host<'a, P: Platform> {
    network: Option<&'a Network<P>>,
    qubesdb: &'a QubesDb<P::Vchan>,
    agent: crate::qrexec::AgentStats,
    rule_summary: &'a BTreeMap<IpAddr, RuleSummary>,
    connected: &'a ConnectedIps,
    wall_clock: &'a mut WallClock,
    heap: Option<crate::platform::HeapUsage>,
    clock: Option<crate::platform::ClockCounts>,
    started: Instant,
    now: Instant,
}

impl<P: Platform> ServiceHost for Host<'_, P> {
    fn firewall_status(&mut self, out: &mut Output) {
        let report = build_report(&ReportInputs {
            network: self.network,
            qubesdb: self.qubesdb,
            agent: self.agent,
            rule_summary: self.rule_summary,
            connected: self.connected,
            wall_clock: *self.wall_clock,
            heap: self.heap,
            clock: self.clock,
            started: self.started,
            now: self.now,
        });
        let _ = write!(out, "{report}");
    }

    fn set_wall_clock(&mut self, unix_seconds: i64) {
        info!("wall clock set by dom0 to {unix_seconds} (unix seconds)");
        self.wall_clock.base = Some((unix_seconds, self.now));
    }
}

struct ReportInputs<'a, P: Platform> {
    network: Option<&'a Network<P>>,
    qubesdb: &'a QubesDb<P::Vchan>,
    agent: crate::qrexec::AgentStats,
    rule_summary: &'a BTreeMap<IpAddr, RuleSummary>,
    connected: &'a ConnectedIps,
    wall_clock: WallClock,
    heap: Option<crate::platform::HeapUsage>,
    clock: Option<crate::platform::ClockCounts>,
    started: Instant,
    now: Instant,
}

fn build_report<P: Platform>(inputs: &ReportInputs<'_, P>) -> StatusReport {
    let mut report = StatusReport {
        uptime_seconds: (inputs.now - inputs.started).secs(),
        wall_clock: inputs.wall_clock.now(inputs.now),
        heap: inputs.heap,
        clock: inputs.clock,
        qubesdb: inputs.qubesdb.database().stats(),
        qrexec: inputs.agent,
        connected_ips: inputs.connected.addresses.clone(),
        connected_ips_ignored: inputs.connected.ignored.clone(),
        ..StatusReport::default()
    };
    let Some(network) = inputs.network else {
        return report;
    };
    let router = &network.router;
    let counters = router.counters();
    report.network = Some(network.settings.clone());
    let interface = |name: String,
                     c: &crate::router::InterfaceCounters,
                     (gso, ring): (
        Option<crate::offload::GsoCounts>,
        Option<crate::offload::RingCounts>,
    )| InterfaceStatus {
        name,
        rx_frames: c.rx_frames,
        rx_bytes: c.rx_bytes,
        tx_frames: c.tx_frames,
        tx_bytes: c.tx_bytes,
        tx_queue_full: c.tx_queue_full,
        gso,
        ring,
    };
    let counts = |nic: &P::Nic| {
        (
            crate::offload::OffloadNic::gso_counts(nic),
            crate::offload::OffloadNic::ring_counts(nic),
        )
    };
    report.interfaces.push(interface(
        "uplink".to_string(),
        router.uplink_counters(),
        counts(&network.uplink),
    ));
    for (id, vif) in &network.clients {
        if let Some(c) = router.client_counters(*id) {
            report.interfaces.push(interface(
                format!("vif{}.{}", id.domid, id.device),
                c,
                counts(&vif.nic),
            ));
        }
        let summary = inputs.rule_summary.get(&IpAddr::V4(vif.ip));
        report.clients.push(ClientStatus {
            domid: id.domid,
            device: id.device,
            ip: IpAddr::V4(vif.ip),
            rules: summary.map_or(0, |s| s.rules),
            policy: match summary.map(|s| s.policy) {
                Some(Action::Accept) => "accept",
                _ => "drop",
            },
            nat_entries: router.client_nat_len(*id).unwrap_or(0),
            // The IPv4 set's error, else the IPv6 set's (its own rules,
            // under /qubes-firewall/<ip6>/), said as such.
            rules_error: match summary {
                None => Some("no rules committed yet (all traffic dropped)".to_string()),
                Some(s) => s.error.clone().or_else(|| {
                    let ip6 = vif.ip6?;
                    let error = inputs.rule_summary.get(&IpAddr::V6(ip6))?.error.as_ref()?;
                    Some(format!("IPv6 rules ({ip6}): {error}"))
                }),
            },
        });
    }
    report.drops = DropReason::ALL
        .iter()
        .map(|reason| (reason.name(), counters.dropped(*reason)))
        .collect();
    report.flows_created = counters.flows_created;
    report.icmp_errors_sent = counters.icmp_errors_sent;
    report.nat_entries = router.nat_len();
    report.nat_capacity = network.nat_capacity;
    report.pending = PendingStatus {
        waiting: router.pending_len(),
        queued: counters.pending_queued,
        sent: counters.pending_sent,
        expired: counters.dropped(DropReason::PendingExpired),
        dropped_full: counters.dropped(DropReason::PendingFull),
    };
    report.gateway_mac = router.gateway_mac().map(|mac| mac.0);
    report.gateway_fallback = router.gateway_uses_fallback_mac();
    report
}

/// Runs the program until a shutdown request; returns how to stop. The
/// caller (the Xen image's `main`, the hosted binary) then calls
/// `platform.exit(how)`.
pub fn run<P: Platform>(platform: &mut P, cmdline: &str) -> Shutdown {
    let mut firewall = match Firewall::start(platform, cmdline) {
        Ok(firewall) => firewall,
        Err(error) => {
            error!("cannot start the firewall: {error}");
            return Shutdown::Crash;
        }
    };
    loop {
        if let Some(how) = firewall.step(platform) {
            return how;
        }
        // The step's own clock reading: a deadline computed from it is at
        // most one step early, and an early wake-up only costs a step.
        platform.wait(firewall.next_deadline(firewall.step_time));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakePlatform, FakeXenstore};

    #[test]
    fn mac_parsing_refuses_malformed_values() {
        let mut xs = FakeXenstore::new();
        for (text, expected) in [
            (
                "00:16:3e:5e:6c:02",
                Some(EthernetAddress([0, 0x16, 0x3e, 0x5e, 0x6c, 2])),
            ),
            (
                " 00:16:3E:5E:6C:02\n",
                Some(EthernetAddress([0, 0x16, 0x3e, 0x5e, 0x6c, 2])),
            ),
            ("00:16:3e:5e:6c", None),
            ("00:16:3e:5e:6c:02:03", None),
            ("0:16:3e:5e:6c:02", None),
            ("zz:16:3e:5e:6c:02", None),
            ("+0:16:3e:5e:6c:02", None),
            ("", None),
        ] {
            xs.set("mac", text);
            assert_eq!(read_mac(&mut xs, "mac"), expected, "{text:?}");
        }
        assert_eq!(read_mac(&mut xs, "absent"), None);
    }

    #[test]
    fn only_poweroff_halt_and_reboot_are_honoured_and_acknowledged() {
        let (mut platform, handle) = FakePlatform::new(2, 32 << 20);
        for (request, expected) in [
            ("poweroff", Some(Shutdown::PowerOff)),
            ("halt", Some(Shutdown::PowerOff)),
            ("reboot", Some(Shutdown::Reboot)),
            ("suspend", None),
            ("", None),
        ] {
            handle.xenstore().set(CONTROL_SHUTDOWN, request);
            let before = handle.xenstore().writes_by_vm().len();
            assert_eq!(shutdown_requested(&mut platform), expected, "{request}");
            let acked = handle.xenstore().writes_by_vm().len() > before;
            assert_eq!(acked, expected.is_some(), "{request}");
        }
        handle.xenstore().fail_below("control", "EACCES");
        assert_eq!(shutdown_requested(&mut platform), None);
    }

    #[test]
    fn vif_listing_takes_the_first_token_and_skips_junk() {
        let mut xs = FakeXenstore::new();
        xs.set("backend/vif/5/0/ip", "10.137.0.10 fd09:24ef:4179::a89:a");
        xs.set("backend/vif/5/0/mac", "00:16:3e:5e:6c:0a");
        xs.set("backend/vif/6/0/ip", "fd09::1");
        xs.set("backend/vif/7/x/ip", "10.137.0.12");
        xs.set("backend/vif/70000/0/ip", "10.137.0.13");
        xs.set("backend/vif/8/0/state", "4");
        let vifs = list_vifs(&mut xs).unwrap();
        assert_eq!(vifs.len(), 1);
        let mut one = BTreeMap::new();
        list_domain_vifs(&mut xs, 5, &mut one);
        assert_eq!(one, vifs);
        list_domain_vifs(&mut xs, 9, &mut one);
        assert_eq!(one, vifs, "a domain without vifs adds none");
        let (id, config) = vifs.iter().next().unwrap();
        assert_eq!((id.domid, id.device), (5, 0));
        assert_eq!(config.ip, Ipv4Addr::new(10, 137, 0, 10));
        assert_eq!(config.ip6, Some("fd09:24ef:4179::a89:a".parse().unwrap()));
        assert!(config.mac.is_some());
    }

    #[test]
    fn vif_watch_events_name_their_domain() {
        assert_eq!(vif_event_domain("backend/vif/101/0/ip"), Some(101));
        assert_eq!(vif_event_domain("backend/vif/7"), Some(7));
        assert_eq!(vif_event_domain("/local/domain/2/backend/vif/9/0"), Some(9));
        assert_eq!(vif_event_domain("backend/vif"), None);
        assert_eq!(vif_event_domain("backend/vif/"), None);
        assert_eq!(vif_event_domain("backend/vif/x/0"), None);
        assert_eq!(vif_event_domain("backend/vif/70000/0"), None);
    }

    #[test]
    fn fake_ip_clients_are_warned_about() {
        let entries = [
            ("/mapped-ip/10.137.0.9/visible-ip", "10.1.1.1"),
            ("/mapped-ip/10.137.0.9/visible-gateway", "10.1.1.254"),
            ("/mapped-ip/10.137.0.10/visible-ip", "10.137.0.10"),
            ("/mapped-ip/10.137.0.11/other", "1.2.3.4"),
            ("/mapped-ip/junk", "1.2.3.4"),
            ("/qubes-ip", "10.137.0.2"),
        ];
        let all = mapped_ip_warnings(entries.iter().copied(), None);
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].contains("net.fake-ip") && all[0].contains("\"10.137.0.9\""));
        assert!(all[1].contains("net.fake-gateway"));
        let one = mapped_ip_warnings(
            entries.iter().copied(),
            Some("/mapped-ip/10.137.0.9/visible-gateway"),
        );
        assert_eq!(one.len(), 1);
        assert!(one[0].contains("net.fake-gateway"));
    }

    #[test]
    fn wall_clock_advances_with_the_monotonic_clock() {
        let clock = WallClock {
            base: Some((1_000, Instant::from_secs(5))),
        };
        assert_eq!(clock.now(Instant::from_secs(65)), Some(1_060));
        assert_eq!(WallClock::default().now(Instant::from_secs(1)), None);
    }
}
