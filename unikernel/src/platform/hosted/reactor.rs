//! What every hosted link and NIC shares with the platform: the epoll set
//! and the count of vchan clients still trying to connect (they retry every
//! 100 ms, so `wait` must not sleep longer than that while any is pending).
//!
//! It holds no descriptors of its own besides the epoll fd and must never
//! decide anything about a link: it only lets the links be woken.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;
use std::vec::Vec;

use super::epoll::Epoll;

/// How often a vchan client retries `connect` (qubes-core-vchan-socket's
/// `CONNECT_DELAY_MS`).
pub const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// Something holding output back to batch it (a TAP's transmit
/// coalescer), to be written out before the platform sleeps.
pub trait Flush: std::fmt::Debug {
    /// Writes out whatever is held back.
    fn flush(&self);
}

/// The shared wake-up machinery of one hosted platform.
#[derive(Debug)]
pub struct Reactor {
    /// The epoll set every link and NIC registers with.
    pub epoll: Epoll,
    connecting: Cell<usize>,
    flushers: RefCell<Vec<Weak<dyn Flush>>>,
}

impl Reactor {
    /// Creates the reactor with a fresh epoll set.
    pub fn new() -> std::io::Result<Rc<Reactor>> {
        Ok(Rc::new(Reactor {
            epoll: Epoll::new()?,
            connecting: Cell::new(0),
            flushers: RefCell::new(Vec::new()),
        }))
    }

    /// Registers output to be flushed by [`Reactor::flush_all`] (for as
    /// long as it lives).
    pub fn add_flusher(&self, flusher: Weak<dyn Flush>) {
        self.flushers.borrow_mut().push(flusher);
    }

    /// Writes out all held-back output (the platform calls it before it
    /// sleeps); forgets flushers that are gone.
    pub fn flush_all(&self) {
        let live: Vec<Rc<dyn Flush>> = {
            let mut flushers = self.flushers.borrow_mut();
            flushers.retain(|f| f.strong_count() > 0);
            flushers.iter().filter_map(Weak::upgrade).collect()
        };
        for flusher in live {
            flusher.flush();
        }
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
