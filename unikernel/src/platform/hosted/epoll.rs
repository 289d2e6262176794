//! The hosted platform's sleep: one epoll instance that every link and NIC
//! registers its file descriptor with, so that `Platform::wait` blocks until
//! something is readable (or a blocked writer can write again) or a deadline
//! passes.
//!
//! It is level-triggered for input (a component that leaves bytes unread is
//! woken again at once) and watches for output only while a writer asked for
//! it (a full socket), so an idle process sleeps. It must never hold on to a
//! descriptor after its owner closed it: owners deregister in `Drop` (closing
//! an fd also removes it from the set, the explicit call just keeps that
//! obvious).
//!
//! A descriptor registered with [`Epoll::add_tracked`] gets a readiness
//! flag that `wait` raises when the kernel reports it readable; its owner
//! lowers it when a read finds nothing. The firewall's loop polls every
//! NIC each turn: with 100 client TAPs, reading only the ones flagged
//! saves a hundred `read` syscalls (each answering `EAGAIN`) per wake-up,
//! which under a flood of small frames was most of the firewall's time.
//! The vchan and xenstore sockets (`super::vchan::SocketLink`) are
//! tracked the same way: the loop reads every link each turn too.
//! Level-triggered, so a flag lowered too early costs nothing but one
//! more turn: the next `wait` reports the descriptor again at once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;
use std::vec::Vec;

/// Events one `epoll_wait` returns at most (more ready descriptors are
/// reported by the next call, at once: level-triggered).
const MAX_EVENTS: usize = 256;

/// An epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
    /// Readiness flags of the descriptors registered with `add_tracked`.
    tracked: RefCell<HashMap<RawFd, Rc<Cell<bool>>>>,
    /// The events array every `wait` hands the kernel, kept rather than
    /// zero-filled on the stack for each call: a busy-polling firewall
    /// calls `wait` about a million times a second.
    events: RefCell<Vec<libc::epoll_event>>,
}

/// A readiness flag: raised by [`Epoll::wait`] when the descriptor is
/// reported readable, lowered by its owner when a read finds nothing.
pub type Readiness = Rc<Cell<bool>>;

/// What to wait for on one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Wake when readable (or hung up).
    pub readable: bool,
    /// Wake when writable.
    pub writable: bool,
}

impl Interest {
    /// Input only: the normal state of every link and NIC.
    pub const READ: Interest = Interest {
        readable: true,
        writable: false,
    };
    /// Input, and output because a write found the descriptor full.
    pub const READ_WRITE: Interest = Interest {
        readable: true,
        writable: true,
    };

    fn events(self) -> u32 {
        let mut events = 0u32;
        if self.readable {
            events |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        }
        if self.writable {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }
}

impl Epoll {
    /// Creates an epoll instance (close-on-exec).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a negative return is an error.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll {
            fd,
            tracked: RefCell::new(HashMap::new()),
            events: RefCell::new(std::vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS]),
        })
    }

    fn control(&self, op: libc::c_int, fd: RawFd, interest: Interest) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: interest.events(),
            u64: fd as u64,
        };
        // SAFETY: `event` is a valid epoll_event that lives across the call;
        // the kernel copies it and keeps no pointer.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Adds `fd` to the set.
    pub fn add(&self, fd: RawFd, interest: Interest) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, interest)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, interest: Interest) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, fd, interest)
    }

    /// Removes `fd` from the set; an fd that is not registered is not an error.
    pub fn remove(&self, fd: RawFd) {
        // Errors (ENOENT, EBADF after a close) only mean it is already gone.
        let _ = self.control(libc::EPOLL_CTL_DEL, fd, Interest::READ);
        self.tracked.borrow_mut().remove(&fd);
    }

    /// Blocks until a registered descriptor is ready or `timeout` passes
    /// (`None`: no timeout). Returns how many descriptors were ready; an
    /// interrupted wait (a signal) returns 0.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<usize> {
        let mut events = self.events.borrow_mut();
        let ready = self.wait_for(timeout, &mut events)?;
        if ready > 0 {
            let tracked = self.tracked.borrow();
            if !tracked.is_empty() {
                let readable =
                    (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;
                for event in events.iter().take(ready) {
                    let (bits, data) = (event.events, event.u64);
                    if bits & readable != 0
                        && let Ok(fd) = RawFd::try_from(data)
                        && let Some(flag) = tracked.get(&fd)
                    {
                        flag.set(true);
                    }
                }
            }
        }
        Ok(ready)
    }

    /// Registers `fd` for input with a readiness flag, raised now (it may
    /// hold input already) and by every `wait` that finds it readable.
    pub fn add_tracked(&self, fd: RawFd) -> io::Result<Readiness> {
        self.add(fd, Interest::READ)?;
        let flag = Rc::new(Cell::new(true));
        self.tracked.borrow_mut().insert(fd, Rc::clone(&flag));
        Ok(flag)
    }

    fn wait_for(
        &self,
        timeout: Option<Duration>,
        events: &mut [libc::epoll_event],
    ) -> io::Result<usize> {
        let timeout_ms: libc::c_int = match timeout {
            None => -1,
            Some(duration) => {
                // Round up so that a deadline 0.3 ms away does not spin.
                let ms = duration.as_micros().div_ceil(1000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        // SAFETY: `events` is a writable slice of epoll_events and we pass
        // its true length (or less); the kernel writes at most that many.
        let rc = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX),
                timeout_ms,
            )
        };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(error);
        }
        Ok(usize::try_from(rc).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn times_out_when_nothing_is_ready() {
        let epoll = Epoll::new().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        epoll.add(a.as_raw_fd(), Interest::READ).unwrap();
        let start = Instant::now();
        assert_eq!(epoll.wait(Some(Duration::from_millis(30))).unwrap(), 0);
        assert!(start.elapsed() >= Duration::from_millis(25));
    }

    #[test]
    fn wakes_on_input_and_on_writability_only_when_asked() {
        let epoll = Epoll::new().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        epoll.add(a.as_raw_fd(), Interest::READ).unwrap();
        // Writable but not asked for: no wake.
        assert_eq!(epoll.wait(Some(Duration::from_millis(1))).unwrap(), 0);
        epoll.modify(a.as_raw_fd(), Interest::READ_WRITE).unwrap();
        assert_eq!(epoll.wait(Some(Duration::from_millis(1000))).unwrap(), 1);
        epoll.modify(a.as_raw_fd(), Interest::READ).unwrap();
        b.write_all(b"x").unwrap();
        assert_eq!(epoll.wait(Some(Duration::from_millis(1000))).unwrap(), 1);
        epoll.remove(a.as_raw_fd());
        assert_eq!(epoll.wait(Some(Duration::from_millis(1))).unwrap(), 0);
    }
}
