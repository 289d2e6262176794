//! vchan over real Xen (feature `xen`): the [`Vchan`]/[`Transport`] traits
//! on Xen's `libxenvchan`, through the `xenvchan` crate.
//!
//! Layout as qubes-core-vchan-xen (`vchan/init.c`): the server offers port
//! `P` to domain `C` under `/local/domain/<server>/data/vchan/<C>/<P>`
//! (`ring-ref`, `event-channel`); the client reads them there. Our own
//! domain id comes from `VCHAN_DOMAIN` (0, dom0, when unset), as for the
//! socket transport: right for the dom0 tools; a VM-side program
//! (qrexec-agent, qrexec-client-vm) built with `xen` must have it set, since
//! this module does not read xenstore's `domid` as Qubes' libvchan does. Qubes' clients wait for the server with a xenstore
//! watch; ours retries `libxenvchan_client_init` every 10 ms for the first
//! 5 s, then every 100 ms (what either side sees is the same). Rings are
//! 64 KiB each way by default (`VCHAN_BUFFER_SIZE` of qubes-core-qrexec);
//! QubesDB asks for 4096 as its C daemon does.
//!
//! Selection ([`from_env`], the `vchan::from_env` of a `xen` build): the
//! socket transport when `VCHAN_SOCKET_DIR` is set (and the `vchan-socket`
//! feature is on), otherwise Xen. This module must never interpret the
//! bytes it carries.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenvchan::XenVchan;
use xenvchan::blocking::OpenState;

use super::{Transport, Vchan};

/// Default ring size each way (qubes-core-qrexec `VCHAN_BUFFER_SIZE`).
pub const DEFAULT_RING_SIZE: usize = 65536;
/// How long a client retries every 10 ms before backing off to 100 ms.
const FAST_RETRY_PERIOD: Duration = Duration::from_secs(5);

/// The transport of this build, from the environment: socket vchan when
/// `VCHAN_SOCKET_DIR` is set (builds with `vchan-socket`), else real Xen.
pub fn from_env() -> io::Result<Box<dyn Transport>> {
    #[cfg(feature = "vchan-socket")]
    if std::env::var_os(protocol::vchan::SOCKET_DIR_ENV).is_some() {
        return Ok(Box::new(super::socket::SocketTransport::from_env()?));
    }
    Ok(Box::new(XenTransport::from_env()?))
}

fn domain(id: u32) -> io::Result<u16> {
    u16::try_from(id).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("domain id {id} is not a Xen domain id (0..=65535)"),
        )
    })
}

/// One end of a real Xen vchan.
#[derive(Debug, Clone)]
pub struct XenEnd {
    chan: XenVchan,
}

impl XenEnd {
    /// Wrap a connected `XenVchan`.
    pub fn new(chan: XenVchan) -> Self {
        XenEnd { chan }
    }
}

impl Read for XenEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.chan.read(buf)
    }
}

impl Write for XenEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.chan.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        // Writes go straight into the shared ring.
        Ok(())
    }
}

impl Vchan for XenEnd {
    fn try_clone(&self) -> io::Result<Box<dyn Vchan>> {
        Ok(Box::new(self.clone()))
    }

    fn shutdown(&self) -> io::Result<()> {
        self.chan.shutdown()
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.chan.set_read_timeout(timeout);
        Ok(())
    }
}

/// Called with (peer, port) once a server's vchan is offered in xenstore,
/// before it waits for the client.
pub type OfferHook = Arc<dyn Fn(u32, u32) + Send + Sync>;

/// The Xen transport: our domain id and the ring sizes a server asks for.
#[derive(Clone)]
pub struct XenTransport {
    own_domain: u16,
    read_min: usize,
    write_min: usize,
    on_offer: Option<OfferHook>,
}

impl std::fmt::Debug for XenTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenTransport")
            .field("own_domain", &self.own_domain)
            .field("read_min", &self.read_min)
            .field("write_min", &self.write_min)
            .finish_non_exhaustive()
    }
}

impl XenTransport {
    /// A transport for domain `own_domain`, 64 KiB rings.
    pub fn new(own_domain: u16) -> Self {
        XenTransport {
            own_domain,
            read_min: DEFAULT_RING_SIZE,
            write_min: DEFAULT_RING_SIZE,
            on_offer: None,
        }
    }

    /// Tell `hook` each time a server is offered (e.g. a daemon's
    /// readiness: the peer may start connecting from then on).
    pub fn with_offer_hook(mut self, hook: OfferHook) -> Self {
        self.on_offer = Some(hook);
        self
    }

    /// The ring sizes (bytes) this transport's servers ask for.
    pub fn with_ring_sizes(mut self, read_min: usize, write_min: usize) -> Self {
        self.read_min = read_min;
        self.write_min = write_min;
        self
    }

    /// Our domain from `VCHAN_DOMAIN` (0 when unset).
    pub fn from_env() -> io::Result<Self> {
        let own = match std::env::var(protocol::vchan::DOMAIN_ENV) {
            Ok(text) => text.trim().parse::<u16>().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "VCHAN_DOMAIN={text:?} is not a domain id; set it to this domain's number"
                    ),
                )
            })?,
            Err(_) => 0,
        };
        Ok(XenTransport::new(own))
    }
}

impl Transport for XenTransport {
    fn own_domain(&self) -> u32 {
        u32::from(self.own_domain)
    }

    fn server(
        &self,
        peer: u32,
        port: u32,
        timeout: Option<Duration>,
    ) -> io::Result<Box<dyn Vchan>> {
        let peer = domain(peer)?;
        let path = xenvchan::xs_path(self.own_domain, peer, port);
        let chan = XenVchan::server(peer, &path, self.read_min, self.write_min)?;
        if let Some(hook) = &self.on_offer {
            hook(u32::from(peer), port);
        }
        if !chan.wait_connected(timeout)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("domain {peer} did not connect to vchan {path}"),
            ));
        }
        Ok(Box::new(XenEnd::new(chan)))
    }

    fn client(
        &self,
        server: u32,
        port: u32,
        timeout: Option<Duration>,
    ) -> io::Result<Box<dyn Vchan>> {
        let server = domain(server)?;
        let path = xenvchan::xs_path(server, self.own_domain, port);
        let started = Instant::now();
        let deadline = timeout.map(|t| started + t);
        loop {
            let error = match XenVchan::client(server, &path) {
                Ok(chan) if chan.open_state() != OpenState::Closed => {
                    return Ok(Box::new(XenEnd::new(chan)));
                }
                Ok(_) => io::Error::new(io::ErrorKind::ConnectionReset, "closed at once"),
                Err(error) => error,
            };
            let delay = if started.elapsed() < FAST_RETRY_PERIOD {
                Duration::from_millis(10)
            } else {
                Duration::from_millis(100)
            };
            if deadline.is_some_and(|d| Instant::now() + delay > d) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("vchan server {path} did not appear ({error})"),
                ));
            }
            std::thread::sleep(delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_ids_are_16_bit() {
        assert_eq!(domain(65535).unwrap(), 65535);
        assert_eq!(
            domain(65536).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let t = XenTransport::new(0);
        assert_eq!(
            t.client(70000, 512, Some(Duration::ZERO))
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn client_without_a_server_times_out() {
        // Outside dom0 (no xenstore/evtchn) client_init fails every time;
        // in dom0 nobody offers domain 32000's port 9: either way the
        // bounded retry must end with TimedOut, not hang or panic.
        let t = XenTransport::new(0);
        let started = Instant::now();
        let err = t
            .client(32000, 9, Some(Duration::from_millis(60)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
