//! vchan: the byte stream between two domains, behind a small trait so the
//! programs do not know which transport carries it.
//!
//! [`Vchan`] is one connected end; [`Transport`] creates ends as vchan
//! *server* (offers `port` to one peer domain and accepts once) or *client*
//! (connects to a server domain's `port`, retrying until it appears). The
//! UNIX-socket backend ([`socket`], feature `vchan-socket`) is the test
//! transport of qubes-core-vchan-socket; `xen` (feature `xen`) is real Xen
//! through libxenvchan. This module must never interpret the bytes it
//! carries.

use std::fmt;
use std::io::{self, Read, Write};
use std::time::Duration;

#[cfg(feature = "vchan-socket")]
pub mod socket;
#[cfg(feature = "xen")]
pub mod xen;

/// One connected end of a vchan: a reliable, ordered byte stream.
pub trait Vchan: Read + Write + Send + fmt::Debug {
    /// A second handle on the same stream (for a reader and a writer thread).
    fn try_clone(&self) -> io::Result<Box<dyn Vchan>>;
    /// Close both directions; blocked readers see end of stream.
    fn shutdown(&self) -> io::Result<()>;
    /// Close our sending direction only, so the peer sees the end of what we
    /// sent while we can still read what it sends (default: both).
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown()
    }
    /// Limit how long a read may block (`None`: forever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// How vchan ends are created in this process.
pub trait Transport: Send + Sync + fmt::Debug {
    /// This process's own domain id.
    fn own_domain(&self) -> u32;
    /// Offer `port` to domain `peer` and wait (up to `timeout`) for it.
    fn server(&self, peer: u32, port: u32, timeout: Option<Duration>)
    -> io::Result<Box<dyn Vchan>>;
    /// Connect to `port` offered by domain `server`, retrying up to `timeout`.
    fn client(
        &self,
        server: u32,
        port: u32,
        timeout: Option<Duration>,
    ) -> io::Result<Box<dyn Vchan>>;
}

/// The transport this build uses, configured from the environment
/// (`VCHAN_DOMAIN`, `VCHAN_SOCKET_DIR`). A `xen` build uses
/// `xen::from_env` instead: real Xen unless `VCHAN_SOCKET_DIR` is set.
#[cfg(feature = "xen")]
pub use xen::from_env;
#[cfg(all(feature = "vchan-socket", not(feature = "xen")))]
pub fn from_env() -> io::Result<Box<dyn Transport>> {
    Ok(Box::new(socket::SocketTransport::from_env()?))
}
