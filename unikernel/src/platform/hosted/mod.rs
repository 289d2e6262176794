//! The hosted platform: the firewall as an ordinary Linux process ("Qubes in
//! a box"). vchan is the UNIX-socket transport of qubes-core-vchan-socket,
//! each NIC is a TAP device, xenstore is the `xsd_sockmsg` protocol over
//! xenstored's UNIX socket, and `wait` polls epoll briefly (busy polling,
//! `--busy-poll`), then blocks in it.
//!
//! Everything above the platform line runs unchanged; only this module (and
//! `platform/xen`) may use `unsafe`, each block with a `// SAFETY:` line.
//! It must never make a decision the firewall makes (rules, NAT, QubesDB
//! handling): it only moves bytes and frames and sleeps.
#![allow(unsafe_code)] // reason: epoll, TAP ioctls and netns syscalls; each block carries a SAFETY comment.

pub mod epoll;
pub mod gso;
mod heap;
pub mod reactor;
pub mod tap;
pub mod vchan;
pub mod xenstore;

use std::path::PathBuf;
use std::rc::Rc;
use std::string::String;
use std::time::Duration;

use self::reactor::Reactor;
use self::tap::TapDevice;
use self::vchan::SocketLink;
use super::{HeapUsage, Instant, Platform, PlatformError, Shutdown, Xenstore};

/// Process exit status for each way the firewall can end, so that the box
/// (the hosted "hypervisor") can tell them apart.
pub mod exit_status {
    /// `Shutdown::PowerOff`.
    pub const POWER_OFF: i32 = 0;
    /// `Shutdown::Crash`.
    pub const CRASH: i32 = 1;
    /// `Shutdown::Reboot`: the supervisor should start us again.
    pub const REBOOT: i32 = 3;
}

/// Longest wait at bring-up for the uplink TAP's bridge port to forward.
const UPLINK_LINK_WAIT: Duration = Duration::from_secs(3);

/// How the hosted firewall is wired to the box.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostedConfig {
    /// Our own domain id (`VCHAN_DOMAIN`).
    pub domid: u16,
    /// The memory the table caps derive from, in bytes.
    pub memory_bytes: usize,
    /// Where vchan sockets live (`VCHAN_SOCKET_DIR`).
    pub vchan_socket_dir: PathBuf,
    /// The TAP device that plays the uplink vif to the net qube.
    pub uplink_tap: String,
    /// The TAP name of a client's vif, with `{domid}` and `{device}`
    /// replaced; default `vif{domid}.{device}`, the name Xen gives the
    /// backend interface.
    pub client_tap_format: String,
    /// IP MTU of every TAP.
    pub mtu: usize,
    /// The kernel's queue of frames towards us on every TAP.
    pub tap_queue_len: u32,
    /// How long `wait` polls for input before it sleeps (0: never).
    pub busy_poll: Duration,
}

/// `HostedConfig::busy_poll`'s default. A frame that arrives while we poll
/// is handled at once instead of after a wakeup; `cargo xtask bench box`
/// measured 64-76 % of the kernel path's TCP throughput without it and
/// 74-95 % with 50 µs, in the same runs (see PERFORMANCE.md, with a sweep
/// from 20 to 200 µs).
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

impl Default for HostedConfig {
    fn default() -> HostedConfig {
        HostedConfig {
            domid: 0,
            memory_bytes: 32 << 20,
            vchan_socket_dir: PathBuf::from(vchan::DEFAULT_SOCKET_DIR),
            uplink_tap: String::from("eth0"),
            client_tap_format: String::from("vif{domid}.{device}"),
            mtu: tap::DEFAULT_MTU,
            tap_queue_len: tap::DEFAULT_QUEUE_LEN,
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

impl HostedConfig {
    /// Defaults, with `VCHAN_DOMAIN` and `VCHAN_SOCKET_DIR` taken from the
    /// environment as qubes-core-vchan-socket does (an unparsable
    /// `VCHAN_DOMAIN` is an error here, where libvchan's `atoi` would
    /// silently read 0).
    pub fn from_env() -> Result<HostedConfig, String> {
        let mut config = HostedConfig::default();
        if let Some(value) = std::env::var_os("VCHAN_DOMAIN") {
            let text = value.to_string_lossy();
            config.domid = text
                .trim()
                .parse()
                .map_err(|_| std::format!("VCHAN_DOMAIN={text:?} is not a domain id (0..65535)"))?;
        }
        if let Some(dir) = std::env::var_os("VCHAN_SOCKET_DIR") {
            config.vchan_socket_dir = PathBuf::from(dir);
        }
        Ok(config)
    }

    /// The TAP name for `backend/vif/<domid>/<device>`.
    pub fn client_tap_name(&self, domid: u16, device: u32) -> String {
        self.client_tap_format
            .replace("{domid}", &std::format!("{domid}"))
            .replace("{device}", &std::format!("{device}"))
    }
}

/// The firewall's machine when it runs as a Linux process. `X` is the
/// xenstore client (the portable `xsd_sockmsg` client over
/// [`xenstore::connect`]'s link).
#[derive(Debug)]
pub struct HostedPlatform<X> {
    config: HostedConfig,
    reactor: Rc<Reactor>,
    start: std::time::Instant,
    xenstore: X,
}

fn other(what: &str, error: std::io::Error) -> PlatformError {
    PlatformError::Other(std::format!("{what}: {error}"))
}

impl<X: Xenstore> HostedPlatform<X> {
    /// Builds the platform around a reactor and a xenstore client (whose link
    /// should have been made with [`xenstore::connect`] on the same reactor,
    /// so that `wait` wakes for watch events).
    pub fn new(config: HostedConfig, reactor: Rc<Reactor>, xenstore: X) -> HostedPlatform<X> {
        HostedPlatform {
            config,
            reactor,
            start: std::time::Instant::now(),
            xenstore,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &HostedConfig {
        &self.config
    }

    /// The shared reactor (for links made outside the platform).
    pub fn reactor(&self) -> &Rc<Reactor> {
        &self.reactor
    }

    fn open_tap(&self, name: &str) -> Result<TapDevice, PlatformError> {
        let device = TapDevice::open(self.reactor.clone(), name, self.config.mtu)
            .map_err(|error| other(&std::format!("cannot open TAP device {name}"), error))?;
        if let Err(error) = device.set_up() {
            // The box may have moved the device's kernel side elsewhere and
            // brought it up there; frames still flow.
            log::warn!("TAP {name}: cannot set link up here: {error}");
        }
        if let Err(error) = device.set_queue_len(self.config.tap_queue_len) {
            log::warn!("TAP {name}: cannot set its queue length: {error}");
        }
        Ok(device)
    }

    /// Polls epoll without sleeping for up to `busy_poll` (never past
    /// `timeout`).
    fn busy_poll(&self, timeout: Option<Duration>) -> Polled {
        let spin = match timeout {
            Some(timeout) => self.config.busy_poll.min(timeout),
            None => self.config.busy_poll,
        };
        if spin.is_zero() {
            return Polled::Nothing(timeout);
        }
        let start = std::time::Instant::now();
        loop {
            match self.reactor.epoll.wait(Some(Duration::ZERO)) {
                Ok(0) => {}
                Ok(_) => return Polled::Ready,
                // The blocking wait below reports it.
                Err(_) => break,
            }
            if start.elapsed() >= spin {
                break;
            }
            std::hint::spin_loop();
        }
        Polled::Nothing(timeout.map(|t| t.saturating_sub(start.elapsed())))
    }
}

/// What [`HostedPlatform::busy_poll`] found.
enum Polled {
    /// Input is ready (epoll flagged it).
    Ready,
    /// None came; what is left of the timeout for the sleep.
    Nothing(Option<Duration>),
}

impl<X: Xenstore> Platform for HostedPlatform<X> {
    type Vchan = SocketLink;
    type Xenstore = X;
    type Nic = TapDevice;

    fn domid(&self) -> u16 {
        self.config.domid
    }

    fn memory_bytes(&self) -> usize {
        self.config.memory_bytes
    }

    /// Counted by the global allocator of `heap.rs` (no fixed size).
    fn heap_usage(&self) -> Option<HeapUsage> {
        let (used, peak) = heap::usage();
        Some(HeapUsage {
            used,
            total: 0,
            peak,
        })
    }

    fn now(&self) -> Instant {
        let micros = i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX);
        Instant::from_micros(micros)
    }

    fn random_seed(&mut self) -> u64 {
        use std::io::Read as _;
        let mut bytes = [0u8; 8];
        match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
            Ok(()) => u64::from_ne_bytes(bytes),
            Err(error) => {
                // Without the kernel's pool, the clock is the best we have.
                log::warn!("hosted platform: /dev/urandom: {error}; seeding from the clock");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                now ^ u64::from(std::process::id()).rotate_left(40)
            }
        }
    }

    fn wait(&mut self, deadline: Option<Instant>) {
        // Frames held back to be merged go out before we sleep.
        self.reactor.flush_all();
        // smoltcp's `Instant - Instant` is an absolute difference: a deadline
        // already passed must not turn into a sleep as long as it is overdue.
        let now = self.now();
        let until_deadline = deadline.map(|deadline| {
            if deadline <= now {
                Duration::ZERO
            } else {
                Duration::from_micros((deadline - now).total_micros())
            }
        });
        let timeout = match (until_deadline, self.reactor.max_sleep()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Busy polling, as Linux's `net.core.busy_poll`: look for input
        // without sleeping for a short while first. Under a stream of
        // frames the next one usually comes within microseconds, and
        // catching it here saves the sleep and wakeup between them; an
        // idle firewall spends at most `busy_poll` per wakeup this way.
        let timeout = match self.busy_poll(timeout) {
            Polled::Ready => return,
            Polled::Nothing(timeout) => timeout,
        };
        if let Err(error) = self.reactor.epoll.wait(timeout) {
            log::error!("epoll_wait failed: {error}");
            // Do not spin at full speed on a broken epoll set.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn vchan_server(&mut self, peer: u16, port: u32) -> Result<SocketLink, PlatformError> {
        let path = vchan::socket_path(&self.config.vchan_socket_dir, self.config.domid, peer, port);
        SocketLink::listen(self.reactor.clone(), path.clone())
            .map_err(|error| other(&std::format!("vchan server {}", path.display()), error))
    }

    fn vchan_client(&mut self, peer: u16, port: u32) -> Result<SocketLink, PlatformError> {
        let path = vchan::socket_path(&self.config.vchan_socket_dir, peer, self.config.domid, port);
        Ok(SocketLink::connect(self.reactor.clone(), path))
    }

    fn xenstore(&mut self) -> &mut X {
        &mut self.xenstore
    }

    fn uplink(&mut self) -> Result<TapDevice, PlatformError> {
        let name = self.config.uplink_tap.clone();
        let device = self.open_tap(&name)?;
        // Like netfront waiting for its backend to connect: the uplink is
        // usable once the bridge behind the TAP (the box's) forwards, so
        // the first ARP for the gateway is not lost. Bounded; only at
        // bring-up (clients attach at run time and never wait here).
        if !tap::wait_until_bridge_forwards(&name, UPLINK_LINK_WAIT) {
            log::warn!(
                "TAP {name}: its bridge port does not forward after {} ms; continuing",
                UPLINK_LINK_WAIT.as_millis()
            );
        }
        Ok(device)
    }

    fn attach_client(&mut self, domid: u16, device: u32) -> Result<TapDevice, PlatformError> {
        let name = self.config.client_tap_name(domid, device);
        self.open_tap(&name)
    }

    fn exit(&mut self, how: Shutdown) -> ! {
        let code = match how {
            Shutdown::PowerOff => exit_status::POWER_OFF,
            Shutdown::Reboot => exit_status::REBOOT,
            Shutdown::Crash => exit_status::CRASH,
        };
        log::info!("hosted platform: exiting ({how:?}, status {code})");
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::{ByteStream, LinkState, WatchEvent, XenstoreError};
    use std::vec::Vec;

    /// The platform needs some xenstore client; these tests do not use it.
    #[derive(Debug)]
    struct NoXenstore;

    impl Xenstore for NoXenstore {
        fn read(&mut self, _: &str) -> Result<Option<String>, XenstoreError> {
            Ok(None)
        }
        fn write(&mut self, _: &str, _: &str) -> Result<(), XenstoreError> {
            Ok(())
        }
        fn remove(&mut self, _: &str) -> Result<(), XenstoreError> {
            Ok(())
        }
        fn directory(&mut self, _: &str) -> Result<Vec<String>, XenstoreError> {
            Ok(Vec::new())
        }
        fn watch(&mut self, _: &str, _: &str) -> Result<(), XenstoreError> {
            Ok(())
        }
        fn unwatch(&mut self, _: &str, _: &str) -> Result<(), XenstoreError> {
            Ok(())
        }
        fn poll_watch(&mut self) -> Option<WatchEvent> {
            None
        }
    }

    fn platform(domid: u16, dir: &std::path::Path) -> HostedPlatform<NoXenstore> {
        let config = HostedConfig {
            domid,
            vchan_socket_dir: dir.to_path_buf(),
            ..HostedConfig::default()
        };
        HostedPlatform::new(config, Reactor::new().unwrap(), NoXenstore)
    }

    #[test]
    fn client_tap_names_follow_xen_vif_naming() {
        let config = HostedConfig::default();
        assert_eq!(config.client_tap_name(12, 0), "vif12.0");
    }

    /// Busy polling returns as soon as input comes, and otherwise hands the
    /// sleep what is left of the timeout; off (0) it does not poll at all.
    #[test]
    fn busy_poll_catches_input_and_keeps_the_rest_of_the_timeout() {
        use std::io::Write as _;
        use std::os::fd::AsRawFd as _;
        let dir = std::env::temp_dir();
        let mut p = platform(2, &dir);
        p.config.busy_poll = Duration::from_secs(5);
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        p.reactor
            .epoll
            .add(ours.as_raw_fd(), epoll::Interest::READ)
            .unwrap();
        // Input that comes while we poll ends the poll.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            theirs.write_all(b"x").unwrap();
            theirs
        });
        let start = std::time::Instant::now();
        assert!(matches!(
            p.busy_poll(Some(Duration::from_secs(10))),
            Polled::Ready
        ));
        assert!(start.elapsed() < Duration::from_secs(5));
        let theirs = writer.join().unwrap();
        // Nothing comes: the poll stops at the timeout, leaving (almost)
        // nothing of it for the sleep.
        let mut byte = [0u8; 1];
        std::io::Read::read_exact(&mut &ours, &mut byte).unwrap();
        match p.busy_poll(Some(Duration::from_millis(20))) {
            Polled::Nothing(Some(left)) => assert!(left < Duration::from_millis(20), "{left:?}"),
            _ => panic!("nothing was written"),
        }
        // Off: the timeout goes to the sleep untouched.
        p.config.busy_poll = Duration::ZERO;
        let timeout = Some(Duration::from_millis(20));
        assert!(matches!(p.busy_poll(timeout), Polled::Nothing(t) if t == timeout));
        assert!(matches!(p.busy_poll(None), Polled::Nothing(None)));
        drop(theirs);
    }

    #[test]
    fn wait_honours_the_deadline_and_the_clock_moves() {
        let dir = std::env::temp_dir();
        let mut p = platform(2, &dir);
        let t0 = p.now();
        p.wait(Some(t0 + smoltcp::time::Duration::from_millis(40)));
        let waited = p.now() - t0;
        assert!(
            waited >= smoltcp::time::Duration::from_millis(35),
            "{waited}"
        );
        assert!(
            waited < smoltcp::time::Duration::from_millis(2000),
            "{waited}"
        );
        // A deadline long past returns at once (not after as long as it is
        // overdue).
        std::thread::sleep(Duration::from_millis(300));
        let t1 = p.now();
        p.wait(Some(t0));
        assert!(p.now() - t1 < smoltcp::time::Duration::from_millis(100));
    }

    /// Two hosted "domains" in one process: the VM's server and dom0's
    /// client meet on `vchan.<vm>.0.<port>.sock`, and `wait` wakes for data.
    #[test]
    fn two_domains_meet_on_the_vchan_socket_path() {
        let dir = std::env::temp_dir().join(std::format!("hosted-pf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut vm = platform(5, &dir);
        let mut dom0 = platform(0, &dir);
        let mut server = vm.vchan_server(0, 512).unwrap();
        assert!(dir.join("vchan.5.0.512.sock").exists());
        let mut client = dom0.vchan_client(5, 512).unwrap();
        let start = std::time::Instant::now();
        while server.state() != LinkState::Connected || client.state() != LinkState::Connected {
            assert!(start.elapsed() < Duration::from_secs(5));
            let _ = server.read(&mut []);
            let _ = client.read(&mut []);
            vm.wait(Some(vm.now() + smoltcp::time::Duration::from_millis(20)));
        }
        assert_eq!(server.write(b"HELLO").unwrap(), 5);
        dom0.wait(Some(dom0.now() + smoltcp::time::Duration::from_secs(2)));
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"HELLO");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
