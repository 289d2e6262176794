//! What every hosted link and NIC shares with the platform: the epoll set
//! and the count of vchan clients still trying to connect (they retry every
//! 100 ms, so `wait` must not sleep longer than that while any is pending).
//!
//! It holds no descriptors of its own besides the epoll fd and must never
//! decide anything about a link: it only lets the links be woken.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use super::epoll::Epoll;

/// How often a vchan client retries `connect` (qubes-core-vchan-socket's
/// `CONNECT_DELAY_MS`).
pub const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// The shared wake-up machinery of one hosted platform.
#[derive(Debug)]
pub struct Reactor {
    /// The epoll set every link and NIC registers with.
    pub epoll: Epoll,
    connecting: Cell<usize>,
}

impl Reactor {
    /// Creates the reactor with a fresh epoll set.
    pub fn new() -> std::io::Result<Rc<Reactor>> {
        Ok(Rc::new(Reactor {
            epoll: Epoll::new()?,
            connecting: Cell::new(0),
        }))
    }

    /// A vchan client started retrying its connect.
    pub fn connecting_started(&self) {
        self.connecting.set(self.connecting.get().saturating_add(1));
    }

    /// A vchan client stopped retrying (connected, or gave up).
    pub fn connecting_finished(&self) {
        self.connecting.set(self.connecting.get().saturating_sub(1));
    }

    /// The longest `wait` may sleep: `CONNECT_RETRY` while a client is
    /// connecting, unbounded otherwise.
    pub fn max_sleep(&self) -> Option<Duration> {
        (self.connecting.get() > 0).then_some(CONNECT_RETRY)
    }
}
