//! Blocking reads and writes over a non-blocking vchan end, shared by
//! several threads: the one place that decides who waits on the event
//! channel.
//!
//! A [`RawChannel`] is the non-blocking primitive (libxenvchan in
//! [`crate::XenVchan`], an in-memory double in the tests). [`Shared`] wraps
//! it in a mutex; a thread that must wait either becomes the single
//! *poller* (drops the lock, `poll`s the event fd and a wake-up pipe, takes
//! the lock again and consumes the event) or, if another thread is already
//! polling, sleeps on a condition variable until that poller finishes. Every
//! poller exit bumps an epoch and wakes all sleepers, which re-check their
//! condition. This module must never hold the lock while blocked in `poll`
//! and never let two threads consume the event channel at once (an event
//! consumed by the writer would otherwise be lost to a sleeping reader).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

/// `libxenvchan_is_open`'s three answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenState {
    /// The peer closed (or the handle is broken): no more data will come.
    Closed,
    /// Both ends are connected.
    Open,
    /// A server still waiting for its client.
    Waiting,
}

/// The non-blocking operations of one vchan end.
pub trait RawChannel: Send {
    /// Is the channel open?
    fn open_state(&mut self) -> OpenState;
    /// Bytes readable now (also asks the peer to notify us on writes).
    fn data_ready(&mut self) -> usize;
    /// Bytes writable now (also asks the peer to notify us on reads).
    fn buffer_space(&mut self) -> usize;
    /// Read at most what is ready; never blocks.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write at most what fits; never blocks.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// The fd that becomes readable when an event is pending (duplicated
    /// once by [`Shared::new`], so it can be polled without the lock).
    fn event_fd(&self) -> BorrowedFd<'_>;
    /// Consume the pending event (called only after `event_fd` polled
    /// readable, so it does not block).
    fn consume_event(&mut self) -> io::Result<()>;
}

struct State<C> {
    /// `None` once shut down (the channel is closed and freed).
    chan: Option<C>,
    /// A thread is in `poll` on the event fd.
    polling: bool,
    /// Bumped at every poller exit.
    epoch: u64,
    read_timeout: Option<Duration>,
}

/// A raw channel shared by threads, with blocking operations.
pub struct Shared<C: RawChannel> {
    state: Mutex<State<C>>,
    cond: Condvar,
    /// A duplicate of the channel's event fd (same open file), valid even
    /// after shutdown closed the channel.
    event: OwnedFd,
    /// Written once at shutdown (never drained), so any `poll` returns.
    wake_read: OwnedFd,
    wake_write: OwnedFd,
}

impl<C: RawChannel> std::fmt::Debug for Shared<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// What a wait ended with.
enum Waited {
    /// Something may have changed: check again.
    Again,
    /// The deadline passed.
    TimedOut,
}

fn timespec(left: Duration) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(left.subsec_nanos()),
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "vchan closed (by the peer or by shutdown)",
    )
}

impl<C: RawChannel> Shared<C> {
    /// Share `chan`.
    pub fn new(chan: C) -> io::Result<Self> {
        let (wake_read, wake_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let event = chan.event_fd().try_clone_to_owned()?;
        Ok(Shared {
            event,
            state: Mutex::new(State {
                chan: Some(chan),
                polling: false,
                epoch: 0,
                read_timeout: None,
            }),
            cond: Condvar::new(),
            wake_read,
            wake_write,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // A thread that panicked while holding the lock left the channel
        // as consistent as libxenvchan leaves it: keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wait (without holding the lock while blocked) until an event is
    /// consumed, shutdown happens, or `deadline` passes.
    fn wait<'a>(
        &'a self,
        mut guard: MutexGuard<'a, State<C>>,
        deadline: Option<Instant>,
    ) -> io::Result<(MutexGuard<'a, State<C>>, Waited)> {
        let left = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok((guard, Waited::TimedOut));
                }
                Some(left)
            }
            None => None,
        };
        if guard.polling {
            let epoch = guard.epoch;
            while guard.polling && guard.epoch == epoch && guard.chan.is_some() {
                guard = match left {
                    Some(_) => {
                        let now = Instant::now();
                        let Some(rest) = deadline.and_then(|d| d.checked_duration_since(now))
                        else {
                            return Ok((guard, Waited::TimedOut));
                        };
                        self.cond
                            .wait_timeout(guard, rest)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0
                    }
                    None => self
                        .cond
                        .wait(guard)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                };
            }
            return Ok((guard, Waited::Again));
        }
        if guard.chan.is_none() {
            return Ok((guard, Waited::Again));
        }
        guard.polling = true;
        drop(guard);
        // Shutdown makes `wake_read` readable, so this poll always ends.
        let result = {
            let mut fds = [
                PollFd::new(&self.event, PollFlags::IN),
                PollFd::new(&self.wake_read, PollFlags::IN),
            ];
            let timeout = left.map(timespec);
            match poll(&mut fds, timeout.as_ref()) {
                // Consume only a real event: libxenvchan_wait would block
                // (under the lock) on an fd that is merely in error.
                Ok(_)
                    if fds[0]
                        .revents()
                        .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) =>
                {
                    Err(io::Error::other(
                        "the vchan's event channel fd reports an error; the vchan is unusable",
                    ))
                }
                Ok(_) => Ok(fds[0].revents().contains(PollFlags::IN)),
                Err(rustix::io::Errno::INTR) => Ok(false),
                Err(e) => Err(io::Error::from(e)),
            }
        };
        let mut guard = self.lock();
        guard.polling = false;
        guard.epoch = guard.epoch.wrapping_add(1);
        self.cond.notify_all();
        let ready = result?;
        if ready && let Some(chan) = guard.chan.as_mut() {
            chan.consume_event()?;
        }
        Ok((guard, Waited::Again))
    }

    /// Blocking read: some bytes, 0 at end of stream (peer closed or shut
    /// down), `WouldBlock` when the read timeout passes.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut guard = self.lock();
        let deadline = guard.read_timeout.map(|t| Instant::now() + t);
        loop {
            let Some(chan) = guard.chan.as_mut() else {
                return Ok(0);
            };
            // Open state first: data written before a close is still read.
            let state = chan.open_state();
            if chan.data_ready() > 0 {
                return chan.read(buf);
            }
            if state == OpenState::Closed {
                return Ok(0);
            }
            let (g, waited) = self.wait(guard, deadline)?;
            guard = g;
            if let Waited::TimedOut = waited {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "vchan read timed out",
                ));
            }
        }
    }

    /// Blocking write: at least one byte, or `BrokenPipe` once closed.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut guard = self.lock();
        loop {
            let Some(chan) = guard.chan.as_mut() else {
                return Err(closed_error());
            };
            if chan.open_state() == OpenState::Closed {
                return Err(closed_error());
            }
            if chan.buffer_space() > 0 {
                return chan.write(buf);
            }
            guard = self.wait(guard, None)?.0;
        }
    }

    /// Wait until a server's client connects (`Ok(true)`), or `timeout`
    /// passes (`Ok(false)`). Polls the state at least every 10 ms, since
    /// a connecting client need not notify.
    pub fn wait_connected(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut guard = self.lock();
        loop {
            let Some(chan) = guard.chan.as_mut() else {
                return Err(closed_error());
            };
            match chan.open_state() {
                OpenState::Open => return Ok(true),
                OpenState::Closed => return Err(closed_error()),
                OpenState::Waiting => {}
            }
            let step = Instant::now() + Duration::from_millis(10);
            let until = deadline.map_or(step, |d| d.min(step));
            let (g, _) = self.wait(guard, Some(until))?;
            guard = g;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(guard
                    .chan
                    .as_mut()
                    .is_some_and(|c| c.open_state() == OpenState::Open));
            }
        }
    }

    /// The channel's state (`Closed` after shutdown).
    pub fn open_state(&self) -> OpenState {
        self.lock()
            .chan
            .as_mut()
            .map_or(OpenState::Closed, RawChannel::open_state)
    }

    /// Limit how long [`Shared::read`] blocks.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        self.lock().read_timeout = timeout;
    }

    /// Close the channel now (the peer sees it closed), wake every blocked
    /// thread; later reads see end of stream, writes `BrokenPipe`.
    pub fn shutdown(&self) -> io::Result<()> {
        let chan = self.lock().chan.take();
        drop(chan);
        self.cond.notify_all();
        match rustix::io::write(&self.wake_write, &[1]) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl<C: RawChannel> AsFd for Shared<C> {
    /// The wake-up pipe's read end (readable once shut down).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.wake_read.as_fd()
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;

    /// One direction of the double: bytes and the capacity.
    #[derive(Default)]
    struct Ring {
        bytes: VecDeque<u8>,
    }

    struct Link {
        rings: [Ring; 2],
        open: [bool; 2],
        capacity: usize,
    }

    /// An in-memory vchan end: side 0 or 1, notifying the other side
    /// through its pipe on every read, write and close.
    struct Fake {
        link: Arc<Mutex<Link>>,
        side: usize,
        events: OwnedFd,
        peer_events: Arc<OwnedFd>,
        own_notify: Arc<OwnedFd>,
    }

    fn pair(capacity: usize) -> (Fake, Fake) {
        let link = Arc::new(Mutex::new(Link {
            rings: [Ring::default(), Ring::default()],
            open: [true, true],
            capacity,
        }));
        let flags = rustix::pipe::PipeFlags::NONBLOCK;
        let (r0, w0) = rustix::pipe::pipe_with(flags).unwrap();
        let (r1, w1) = rustix::pipe::pipe_with(flags).unwrap();
        let (w0, w1) = (Arc::new(w0), Arc::new(w1));
        (
            Fake {
                link: Arc::clone(&link),
                side: 0,
                events: r0,
                peer_events: Arc::clone(&w1),
                own_notify: Arc::clone(&w0),
            },
            Fake {
                link,
                side: 1,
                events: r1,
                peer_events: w0,
                own_notify: w1,
            },
        )
    }

    impl Fake {
        fn notify_peer(&self) {
            let _ = rustix::io::write(&*self.peer_events, &[1]);
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.link.lock().unwrap().open[self.side] = false;
            self.notify_peer();
            let _ = &self.own_notify;
        }
    }

    impl RawChannel for Fake {
        fn open_state(&mut self) -> OpenState {
            let link = self.link.lock().unwrap();
            if link.open[0] && link.open[1] {
                OpenState::Open
            } else {
                OpenState::Closed
            }
        }
        fn data_ready(&mut self) -> usize {
            self.link.lock().unwrap().rings[self.side].bytes.len()
        }
        fn buffer_space(&mut self) -> usize {
            let link = self.link.lock().unwrap();
            link.capacity - link.rings[1 - self.side].bytes.len()
        }
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut link = self.link.lock().unwrap();
            let ring = &mut link.rings[self.side].bytes;
            let n = buf.len().min(ring.len());
            for (dst, src) in buf.iter_mut().zip(ring.drain(..n)) {
                *dst = src;
            }
            drop(link);
            self.notify_peer();
            Ok(n)
        }
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut link = self.link.lock().unwrap();
            let space = link.capacity - link.rings[1 - self.side].bytes.len();
            let n = buf.len().min(space);
            link.rings[1 - self.side].bytes.extend(&buf[..n]);
            drop(link);
            self.notify_peer();
            Ok(n)
        }
        fn event_fd(&self) -> BorrowedFd<'_> {
            self.events.as_fd()
        }
        fn consume_event(&mut self) -> io::Result<()> {
            let mut buf = [0u8; 64];
            while let Ok(n) = rustix::io::read(&self.events, &mut buf) {
                if n == 0 {
                    break;
                }
            }
            Ok(())
        }
    }

    #[test]
    fn bulk_both_ways_through_a_small_ring_with_two_threads_per_end() {
        // A 7-byte ring forces many waits on both sides; each end has a
        // reader and a writer thread sharing one handle (as qrexec does).
        let (a, b) = pair(7);
        let a = Arc::new(Shared::new(a).unwrap());
        let b = Arc::new(Shared::new(b).unwrap());
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut threads = Vec::new();
        for (from, to) in [(Arc::clone(&a), Arc::clone(&b)), (b, a)] {
            let sent = data.clone();
            threads.push(std::thread::spawn(move || {
                let mut off = 0;
                while off < sent.len() {
                    off += from.write(&sent[off..]).unwrap();
                }
            }));
            let expect = data.clone();
            threads.push(std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 5];
                while got.len() < expect.len() {
                    let n = to.read(&mut buf).unwrap();
                    assert!(n > 0, "early end of stream");
                    got.extend_from_slice(&buf[..n]);
                }
                assert_eq!(got, expect);
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn data_before_close_is_read_then_end_of_stream() {
        let (a, b) = pair(64);
        let a = Shared::new(a).unwrap();
        let b = Shared::new(b).unwrap();
        assert_eq!(a.write(b"last words").unwrap(), 10);
        a.shutdown().unwrap();
        let mut buf = [0u8; 32];
        assert_eq!(b.read(&mut buf).unwrap(), 10);
        assert_eq!(&buf[..10], b"last words");
        assert_eq!(b.read(&mut buf).unwrap(), 0);
        assert_eq!(b.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(b.open_state(), OpenState::Closed);
    }

    #[test]
    fn shutdown_wakes_a_blocked_reader_and_writer() {
        let (a, _b) = pair(4);
        let a = Arc::new(Shared::new(a).unwrap());
        assert_eq!(a.write(b"full").unwrap(), 4);
        let reader = {
            let a = Arc::clone(&a);
            std::thread::spawn(move || a.read(&mut [0u8; 8]).unwrap())
        };
        let writer = {
            let a = Arc::clone(&a);
            std::thread::spawn(move || a.write(b"more").unwrap_err().kind())
        };
        std::thread::sleep(Duration::from_millis(50));
        a.shutdown().unwrap();
        assert_eq!(reader.join().unwrap(), 0);
        assert_eq!(writer.join().unwrap(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn read_timeout_then_data_still_arrives() {
        let (a, b) = pair(16);
        let a = Shared::new(a).unwrap();
        let b = Shared::new(b).unwrap();
        b.set_read_timeout(Some(Duration::from_millis(30)));
        let started = Instant::now();
        let err = b.read(&mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() >= Duration::from_millis(30));
        a.write(b"ok").unwrap();
        b.set_read_timeout(None);
        let mut buf = [0u8; 4];
        assert_eq!(b.read(&mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"ok");
        assert!(b.wait_connected(Some(Duration::from_millis(5))).unwrap());
    }
}
