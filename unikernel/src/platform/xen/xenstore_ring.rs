//! The xenstore ring transport: the `struct xenstore_domain_interface` page
//! (HVM params STORE_PFN / STORE_EVTCHN) as a [`ByteStream`] under the
//! portable client in `crate::xenstore`.
//!
//! We produce into `req` and consume from `rsp`. Our own indices
//! (`req_prod`, `rsp_cons`) are kept privately and only written to the page;
//! the daemon's (`req_cons`, `rsp_prod`) are read once per operation and
//! validated with `protocol::xenstore::RingIndices` (producer at most one
//! ring ahead). A bad index from xenstored closes the link for good: the
//! client then fails every request instead of reading garbage.
#![deny(clippy::indexing_slicing)]

use protocol::xenstore::{RingIndices, XENSTORE_RING_SIZE, ring};

use super::events::Notify;
use super::shared::{SharedMemory, barrier};
use crate::platform::{ByteStream, LinkState, StreamError};

/// The guest end of the xenstore ring.
#[derive(Debug)]
pub struct XenstoreRing<M, N> {
    mem: M,
    port: u32,
    notify: N,
    req_prod: u32,
    rsp_cons: u32,
    broken: Option<&'static str>,
}

impl<M: SharedMemory, N: Notify> XenstoreRing<M, N> {
    /// Attaches to the ring page; our indices start where the page has them.
    pub fn new(mem: M, port: u32, notify: N) -> Self {
        let req_prod = mem.load_u32(ring::REQ_PROD);
        let rsp_cons = mem.load_u32(ring::RSP_CONS);
        XenstoreRing {
            mem,
            port,
            notify,
            req_prod,
            rsp_cons,
            broken: None,
        }
    }

    /// The event channel xenstored signals.
    pub fn port(&self) -> u32 {
        self.port
    }

    fn fail(&mut self, what: &'static str) -> StreamError {
        self.broken = Some(what);
        StreamError::PeerProtocol(what)
    }
}

impl<M: SharedMemory, N: Notify> ByteStream for XenstoreRing<M, N> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        if let Some(what) = self.broken {
            return Err(StreamError::PeerProtocol(what));
        }
        let prod = self.mem.load_u32(ring::RSP_PROD);
        barrier(); // index before data
        let mut indices = RingIndices::new(self.rsp_cons, prod)
            .map_err(|_| self.fail("xenstored rsp_prod out of range"))?;
        let mut copied = 0;
        while copied < buf.len() {
            let chunk = indices.input_chunk();
            let n = chunk.len().min(buf.len() - copied);
            if n == 0 {
                break;
            }
            if let Some(dst) = buf.get_mut(copied..copied + n) {
                self.mem.read_bytes(ring::RSP + chunk.start, dst);
            }
            copied += n;
            indices = indices
                .consume(n as u32)
                .map_err(|_| self.fail("xenstore rsp ring arithmetic"))?;
        }
        if copied > 0 {
            barrier(); // data read before the index is released
            self.rsp_cons = indices.cons();
            self.mem.store_u32(ring::RSP_CONS, self.rsp_cons);
            self.notify.notify(self.port);
        }
        Ok(copied)
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        if let Some(what) = self.broken {
            return Err(StreamError::PeerProtocol(what));
        }
        let cons = self.mem.load_u32(ring::REQ_CONS);
        barrier();
        let mut indices = RingIndices::new(cons, self.req_prod)
            .map_err(|_| self.fail("xenstored req_cons out of range"))?;
        let mut written = 0;
        while written < buf.len() {
            let chunk = indices.output_chunk();
            let n = chunk.len().min(buf.len() - written);
            if n == 0 {
                break;
            }
            if let Some(src) = buf.get(written..written + n) {
                self.mem.write_bytes(ring::REQ + chunk.start, src);
            }
            written += n;
            indices = indices
                .produce(n as u32)
                .map_err(|_| self.fail("xenstore req ring arithmetic"))?;
        }
        if written > 0 {
            barrier(); // data before index
            self.req_prod = indices.prod();
            self.mem.store_u32(ring::REQ_PROD, self.req_prod);
            self.notify.notify(self.port);
        }
        Ok(written)
    }

    fn state(&self) -> LinkState {
        if self.broken.is_some() {
            LinkState::Closed
        } else {
            LinkState::Connected
        }
    }

    fn close(&mut self) {
        self.broken = Some("closed");
    }
}

/// Bytes in each ring (for callers sizing their buffers).
pub const RING_SIZE: usize = XENSTORE_RING_SIZE as usize;

#[allow(clippy::indexing_slicing)] // reason: test code and test doubles; a panic there is a failed test
#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::Xenstore;
    use crate::platform::xen::shared::VecMemory;
    use crate::xenstore::{NoWait, XenstoreClient};
    use alloc::rc::Rc;
    use alloc::vec::Vec;
    use core::cell::Cell;
    use protocol::xenstore::{ErrorCode, MESSAGE_MAX, Request, Response, mask_index};

    #[derive(Clone, Default)]
    struct Counter(Rc<Cell<u32>>);
    impl Notify for Counter {
        fn notify(&self, _: u32) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// Plays xenstored on the page: takes requests from `req`, answers READ
    /// of "domid" with "7" and everything else with ENOENT.
    fn daemon_step(mem: &VecMemory) {
        let cons = mem.load_u32(ring::REQ_CONS);
        let prod = mem.load_u32(ring::REQ_PROD);
        let mut bytes = Vec::new();
        let mut i = cons;
        while i != prod {
            bytes.push(mem.load_u8(ring::REQ + mask_index(i)));
            i = i.wrapping_add(1);
        }
        if bytes.len() < 16 {
            return;
        }
        mem.store_u32(ring::REQ_CONS, prod);
        let (repr, request) = Request::parse_message(&bytes).unwrap();
        let response = match request {
            Request::Read { path: "domid" } => Response::Read { value: b"7" },
            _ => Response::Error {
                code: ErrorCode::Enoent,
            },
        };
        let mut out = alloc::vec![0u8; MESSAGE_MAX];
        let n = response.emit(repr.req_id, 0, &mut out).unwrap();
        let mut p = mem.load_u32(ring::RSP_PROD);
        for b in &out[..n] {
            mem.store_u8(ring::RSP + mask_index(p), *b);
            p = p.wrapping_add(1);
        }
        mem.store_u32(ring::RSP_PROD, p);
    }

    /// A waiter that lets the daemon run.
    struct DaemonRuns(VecMemory);
    impl crate::xenstore::LinkWait for DaemonRuns {
        fn wait(&mut self) {
            daemon_step(&self.0);
        }
    }

    #[test]
    fn the_client_talks_to_a_daemon_over_the_ring_across_wraparound() {
        let mem = VecMemory::new(4096);
        // Start near the end of the index space and the ring.
        for off in [
            ring::REQ_CONS,
            ring::REQ_PROD,
            ring::RSP_CONS,
            ring::RSP_PROD,
        ] {
            mem.store_u32(off, u32::MAX - 5);
        }
        let counter = Counter::default();
        let ring = XenstoreRing::new(mem.clone(), 3, counter.clone());
        let mut xs = XenstoreClient::new(ring, DaemonRuns(mem.clone()));
        for _ in 0..50 {
            assert_eq!(xs.read("domid").unwrap().as_deref(), Some("7"));
            assert_eq!(xs.read("name").unwrap(), None);
        }
        assert!(counter.0.get() >= 200);
        let _ = NoWait;
    }

    #[test]
    fn hostile_indices_close_the_link() {
        let mem = VecMemory::new(4096);
        let mut ring = XenstoreRing::new(mem.clone(), 3, Counter::default());
        mem.store_u32(ring::RSP_PROD, 5000); // more than a ring ahead
        let mut buf = [0u8; 64];
        assert!(matches!(
            ring.read(&mut buf),
            Err(StreamError::PeerProtocol(_))
        ));
        assert_eq!(ring.state(), LinkState::Closed);
        assert!(ring.write(b"x").is_err());

        let mem = VecMemory::new(4096);
        let mut ring = XenstoreRing::new(mem.clone(), 3, Counter::default());
        mem.store_u32(ring::REQ_CONS, 10); // consumer ahead of our producer
        assert!(matches!(
            ring.write(b"x"),
            Err(StreamError::PeerProtocol(_))
        ));
    }

    #[test]
    fn a_full_request_ring_takes_only_what_fits() {
        let mem = VecMemory::new(4096);
        let mut ring = XenstoreRing::new(mem.clone(), 3, Counter::default());
        let big = [7u8; 1500];
        assert_eq!(ring.write(&big).unwrap(), 1024);
        assert_eq!(ring.write(&big).unwrap(), 0);
        mem.store_u32(ring::REQ_CONS, 1000);
        assert_eq!(ring.write(&big).unwrap(), 1000);
    }
}
