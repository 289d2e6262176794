//! The platform line: the only things the firewall needs from below.
//!
//! Above this module there is one code path. The firewall, its qrexec agent
//! and its QubesDB client do not know whether they run as a Xen PVH guest
//! (`xen/`) or as a Linux process (`hosted/`, a later step); they are written
//! against the traits here, and the host tests drive them through in-memory
//! doubles that implement the same traits.
//!
//! The platform gives:
//! - a non-blocking byte stream per vchan ([`ByteStream`]): a ring on granted
//!   pages on Xen, a UNIX socket hosted — the bytes above are identical;
//! - a [`Xenstore`] client (the portable `xsd_sockmsg` client runs over the
//!   xenstore ring on Xen and over a UNIX socket hosted);
//! - a `smoltcp::phy::Device` per NIC (netfront/netback on Xen, TAP hosted);
//! - a monotonic clock and a way to sleep until something is ready.
//!
//! This module itself holds only trait and type definitions; `unsafe` code is
//! allowed in the platform implementations below it and nowhere else.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub use smoltcp::time::Instant;

/// The state of a link to another domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// A server waiting for its client to connect (or a client still
    /// connecting). Reads return `Ok(0)`, writes are refused with `Ok(0)`.
    Waiting,
    /// Both ends are attached.
    Connected,
    /// The peer closed the link or broke its protocol; nothing more will come.
    Closed,
}

/// Why a stream operation failed. Small and `Copy`: it says who is at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The peer closed the link; no more bytes will come or go.
    Closed,
    /// The peer broke the transport's protocol (e.g. a ring index out of
    /// range); the link has been shut down.
    PeerProtocol(&'static str),
    /// A local resource limit or platform failure.
    Platform(&'static str),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Closed => f.write_str("link closed by peer"),
            StreamError::PeerProtocol(what) => write!(f, "peer broke the link protocol: {what}"),
            StreamError::Platform(what) => write!(f, "platform error: {what}"),
        }
    }
}

/// A non-blocking, ordered byte stream to another domain: one vchan, or the
/// link to xenstored.
pub trait ByteStream {
    /// Copies the bytes available now into `buf`. `Ok(0)` means nothing is
    /// available yet (not end of stream: that is `Err(Closed)` once every
    /// byte the peer sent has been read).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError>;
    /// Queues as much of `buf` as fits now and returns how much; `Ok(0)`
    /// means the link is full (or not yet connected).
    fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError>;
    /// The state of the link.
    fn state(&self) -> LinkState;
    /// Closes our end; the peer sees the link closed.
    fn close(&mut self);
}

/// Why a xenstore request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XenstoreError {
    /// xenstored answered with an error string such as `ENOENT` or `EACCES`.
    Daemon(String),
    /// The transport failed.
    Stream(StreamError),
    /// xenstored's reply did not follow `xsd_sockmsg` rules.
    BadReply(&'static str),
}

impl fmt::Display for XenstoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XenstoreError::Daemon(code) => write!(f, "xenstored refused: {code}"),
            XenstoreError::Stream(error) => write!(f, "xenstore link: {error}"),
            XenstoreError::BadReply(what) => write!(f, "bad reply from xenstored: {what}"),
        }
    }
}

/// A watch that fired: the path that changed and the token given to `watch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (at or below the watched path).
    pub path: String,
    /// The token passed to [`Xenstore::watch`].
    pub token: String,
}

/// A xenstore client. Requests complete before they return (the platform
/// polls its transport while waiting); watch events are queued and taken with
/// [`Xenstore::poll_watch`] from the main loop.
pub trait Xenstore {
    /// Reads a value; `Ok(None)` when the path does not exist.
    fn read(&mut self, path: &str) -> Result<Option<String>, XenstoreError>;
    /// Writes a value, creating the path.
    fn write(&mut self, path: &str, value: &str) -> Result<(), XenstoreError>;
    /// Removes a path and everything below it.
    fn remove(&mut self, path: &str) -> Result<(), XenstoreError>;
    /// Lists the children of a path; empty when it does not exist.
    fn directory(&mut self, path: &str) -> Result<Vec<String>, XenstoreError>;
    /// Starts watching a path (and everything below it). xenstored fires the
    /// watch once right away.
    fn watch(&mut self, path: &str, token: &str) -> Result<(), XenstoreError>;
    /// Stops a watch.
    fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XenstoreError>;
    /// Takes the next queued watch event, if any.
    fn poll_watch(&mut self) -> Option<WatchEvent>;
}

/// Why the platform is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Power off (`xl shutdown`, `control/shutdown` = `poweroff`).
    PowerOff,
    /// Reboot (`control/shutdown` = `reboot`).
    Reboot,
    /// A fatal error: the domain crashes so that dom0 sees it.
    Crash,
}

/// Why a platform resource could not be had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformError {
    /// Out of a bounded resource (grant references, event channels, fds).
    Exhausted(&'static str),
    /// xenstore failed while setting the resource up.
    Xenstore(XenstoreError),
    /// Anything else, with a short reason.
    Other(String),
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformError::Exhausted(what) => write!(f, "out of {what}"),
            PlatformError::Xenstore(error) => write!(f, "{error}"),
            PlatformError::Other(reason) => f.write_str(reason),
        }
    }
}

/// The heap of the firewall: what is allocated and what is left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapUsage {
    /// Bytes allocated now.
    pub used: usize,
    /// Bytes the heap holds in all (allocated and free); 0 where it has
    /// no fixed size (a hosted process's heap grows from the C library).
    pub total: usize,
    /// The most bytes ever allocated at once (high-water mark); 0 where
    /// the platform does not keep it.
    pub peak: usize,
}

impl HeapUsage {
    /// Bytes still free.
    pub fn free(&self) -> usize {
        self.total.saturating_sub(self.used)
    }
}

/// Where the clock's readings came from, where the platform counts them
/// (the Xen image: `platform::xen::time::Clock`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCounts {
    /// Read from the TSC (a trapped instruction where Xen emulates it).
    pub from_tsc: u64,
    /// The time Xen last put us on a CPU, taken after a sleep instead.
    pub at_wake: u64,
    /// The same, taken between sleeps after Xen switched us out and back
    /// in since the reading before.
    pub at_switch: u64,
    /// Set when those times are not used: the TSC's reading minus a
    /// wake-up time (ns) on a wake-up that checked one against the other.
    pub wake_times_refused: Option<i64>,
}

/// Everything the portable firewall needs from the machine it runs on.
pub trait Platform {
    /// A vchan end (server or client).
    type Vchan: ByteStream;
    /// The xenstore client.
    type Xenstore: Xenstore;
    /// A network interface: the uplink to the net qube, or one client's vif.
    type Nic: crate::offload::OffloadNic;

    /// Our own domain id.
    fn domid(&self) -> u16;
    /// Total memory of this VM in bytes; the caps of every table derive
    /// from it.
    fn memory_bytes(&self) -> usize;
    /// The heap's use, where the platform owns its heap (the Xen image);
    /// `None` where it does not (a Linux process: the C library's heap).
    fn heap_usage(&self) -> Option<HeapUsage>;
    /// Where the clock's readings came from, where the platform counts
    /// them.
    fn clock_counts(&self) -> Option<ClockCounts> {
        None
    }
    /// Monotonic time since boot.
    fn now(&self) -> Instant;
    /// Sleeps until an event arrives on any link or NIC, or `deadline`
    /// passes (`None`: no deadline).
    fn wait(&mut self, deadline: Option<Instant>);
    /// 64 bits from the platform's entropy source (RDRAND on Xen, the
    /// kernel's random pool hosted). They key the router's hash tables and
    /// randomise NAT ports and DNS query ids, so that a peer cannot predict
    /// them; they are not for cryptography.
    fn random_seed(&mut self) -> u64;

    /// Offers a vchan as server to `peer` on `port` (the qrexec control
    /// channel: 512). The stream stays `Waiting` until the peer connects.
    fn vchan_server(&mut self, peer: u16, port: u32) -> Result<Self::Vchan, PlatformError>;
    /// Connects as client to the vchan server of `peer` on `port` (QubesDB:
    /// dom0's `qubesdb-daemon` serves port 111; qrexec data channels are
    /// offered by dom0's `qrexec-client`).
    fn vchan_client(&mut self, peer: u16, port: u32) -> Result<Self::Vchan, PlatformError>;
    /// The xenstore client.
    fn xenstore(&mut self) -> &mut Self::Xenstore;

    /// The uplink NIC to the net qube.
    fn uplink(&mut self) -> Result<Self::Nic, PlatformError>;
    /// Attaches the vif `backend/vif/<domid>/<device>` of a client qube.
    fn attach_client(&mut self, domid: u16, device: u32) -> Result<Self::Nic, PlatformError>;

    /// Ends the program (powers the domain off, reboots it, or crashes it).
    fn exit(&mut self, how: Shutdown) -> !;
}

#[cfg(feature = "hosted")]
pub mod hosted;

#[cfg(target_arch = "x86_64")]
pub mod xen;
