//! The libxenvchan ring protocol, both ends, as a [`ByteStream`]: the
//! server (we grant the shared page and ring pages to the peer: QubesDB on
//! port 111, the qrexec agent on 512) and the client (we map the pages a
//! dom0 server granted: qrexec data channels).
//!
//! Page layout, orders, initial flag values and which side sets/tests which
//! notify byte come from `protocol::vchan` (facts from Xen
//! `tools/libs/vchan/{init,io}.c`); this module only moves bytes. It is
//! portable over [`SharedMemory`] and is tested on the host against a double
//! that follows libxenvchan's C code. Hostile peers: our own indices are
//! private copies (written to the page, never read back); the peer's index
//! is read once per call and validated; orders and grant lists read by a
//! client are validated before anything is mapped; a bad index closes the
//! link (`PeerProtocol`), never a panic or an access outside the rings.
//!
//! Ring sizes: rings of 1 KiB and 2 KiB sit in the shared page; bigger ones
//! (up to libxenvchan's 1 MiB) are separately granted pages, the left
//! ring's first in the grant list. As a client we map what the server
//! offers up to [`CLIENT_MAX_ORDER`] (64 KiB: Qubes' qrexec data vchans
//! are 64 KiB each way, so one read or write moves up to 64 KiB, not a
//! page); [`plan_client`] reads and checks the page before anything is
//! mapped. As a server (the qrexec agent's control vchan on port 512) the
//! platform asks for what Qubes' agent asks for, 4 KiB each way.
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;

use protocol::vchan::{
    CLIENT_CONNECTED_CLI_LIVE, CLIENT_CONNECTED_SRV_NOTIFY, Endpoint, Liveness, RingIndices,
    RingOrders, RingPlacement, Role, SERVER_INITIAL_CLI_LIVE, SERVER_INITIAL_CLI_NOTIFY,
    SERVER_INITIAL_SRV_LIVE, VCHAN_NOTIFY_READ, VCHAN_NOTIFY_WRITE, field, grant_offset,
};

use super::events::Notify;
use super::shared::{SharedMemory, barrier};
use crate::platform::{ByteStream, LinkState, StreamError};

/// Where one ring's bytes live: a region and the offset of byte 0.
#[derive(Debug, Clone)]
pub struct RingBuffer<M> {
    /// The memory (the shared page itself for in-page rings).
    pub mem: M,
    /// Offset of the ring's first byte in `mem`.
    pub base: usize,
}

/// One end of a vchan.
#[derive(Debug)]
pub struct VchanRing<M, N> {
    ctrl: M,
    read: RingBuffer<M>,
    write: RingBuffer<M>,
    read_order: u16,
    write_order: u16,
    role: Role,
    ep: Endpoint,
    port: u32,
    notify: N,
    read_cons: u32,
    write_prod: u32,
    closed_by_us: bool,
    broken: Option<&'static str>,
}

/// Largest ring order we map as a client: 64 KiB rings (16 pages each),
/// the size Qubes' qrexec asks for on its data vchans (`VCHAN_BUFFER_SIZE`
/// 65536 in qrexec-client and qrexec-agent). libxenvchan allows up to order
/// 20; a bigger ring only costs foreign-mapping window frames, but nothing
/// in Qubes offers one to us, so we refuse rather than map 2 × 256 pages.
pub const CLIENT_MAX_ORDER: u16 = 16;

/// Reads the ring orders a server wrote (once) and validates them.
pub fn read_orders<M: SharedMemory>(ctrl: &M) -> Result<RingOrders, protocol::vchan::Error> {
    let left = ctrl.load_u16(field::LEFT_ORDER);
    let right = ctrl.load_u16(field::RIGHT_ORDER);
    RingOrders::new(left, right)
}

/// Reads the grant list of validated `orders` (once).
pub fn read_grants<M: SharedMemory>(ctrl: &M, orders: &RingOrders) -> Vec<u32> {
    (0..orders.grant_count())
        .map(|i| ctrl.load_u32(grant_offset(i)))
        .collect()
}

/// Where a client finds one ring of a server's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRing {
    /// Inside the shared page from `offset` (orders 10 and 11).
    InPage {
        /// Offset of the ring's first byte in the shared page.
        offset: usize,
    },
    /// In separately granted pages: map these grant references, in this
    /// order, as one contiguous region (page `i` of the ring is `refs[i]`).
    Granted(Vec<u32>),
}

/// What a client maps, worked out from a server's page read once and
/// validated ([`plan_client`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPlan {
    /// The validated orders.
    pub orders: RingOrders,
    /// The ring we write (the page's left ring, client to server).
    pub write: ClientRing,
    /// The ring we read (the page's right ring, server to client).
    pub read: ClientRing,
}

/// Why a client refuses a server's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The orders are not a layout libxenvchan can produce.
    Orders(protocol::vchan::Error),
    /// A ring bigger than [`CLIENT_MAX_ORDER`] allows.
    TooLarge {
        /// The order the server wrote.
        order: u16,
    },
    /// The same grant reference appears twice in the grant list, or the
    /// list names the shared page itself.
    DuplicateGrant {
        /// The repeated reference.
        gref: u32,
    },
}

impl core::fmt::Display for PlanError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PlanError::Orders(error) => write!(f, "{error}"),
            PlanError::TooLarge { order } => write!(
                f,
                "vchan ring of {} bytes (order {order}) offered; we map rings up to {} bytes: refuse the connection",
                1u64 << order,
                1u32 << CLIENT_MAX_ORDER
            ),
            PlanError::DuplicateGrant { gref } => write!(
                f,
                "vchan grant list names grant {gref} twice (or names the shared page): the server's shared page is corrupt, refuse the connection"
            ),
        }
    }
}

/// Reads a server's shared page as `libxenvchan_client_init` does (orders,
/// then the grant list: the left ring's pages first, then the right's),
/// once, and validates it before anything is mapped: orders a libxenvchan
/// server can write, rings of at most `2^max_order` bytes, no grant
/// reference twice and not `ctrl_ref` (the shared page's own reference).
pub fn plan_client<M: SharedMemory>(
    ctrl: &M,
    ctrl_ref: u32,
    max_order: u16,
) -> Result<ClientPlan, PlanError> {
    let orders = read_orders(ctrl).map_err(PlanError::Orders)?;
    for ring in [orders.left(), orders.right()] {
        if ring.order() > max_order {
            return Err(PlanError::TooLarge {
                order: ring.order(),
            });
        }
    }
    let refs = read_grants(ctrl, &orders);
    let mut sorted = refs.clone();
    sorted.push(ctrl_ref);
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair.first() == pair.get(1)) {
        return Err(PlanError::DuplicateGrant {
            gref: pair.first().copied().unwrap_or_default(),
        });
    }
    let ring = |layout: protocol::vchan::RingLayout| match layout.placement() {
        RingPlacement::InPage { offset } => ClientRing::InPage { offset },
        RingPlacement::Granted { first_grant, pages } => ClientRing::Granted(
            refs.get(first_grant..first_grant.saturating_add(pages))
                .unwrap_or_default()
                .to_vec(),
        ),
    };
    Ok(ClientPlan {
        write: ring(orders.left()),
        read: ring(orders.right()),
        orders,
    })
}

impl<M: SharedMemory, N: Notify> VchanRing<M, N> {
    fn new(
        ctrl: M,
        orders: &RingOrders,
        read: RingBuffer<M>,
        write: RingBuffer<M>,
        role: Role,
        port: u32,
        notify: N,
    ) -> Self {
        let ep = role.endpoint();
        let read_cons = ctrl.load_u32(ep.read_cons);
        let write_prod = ctrl.load_u32(ep.write_prod);
        VchanRing {
            ctrl,
            read,
            write,
            read_order: orders.read_ring(role).order(),
            write_order: orders.write_ring(role).order(),
            role,
            ep,
            port,
            notify,
            read_cons,
            write_prod,
            closed_by_us: false,
            broken: None,
        }
    }

    /// Initialises a fresh shared page as a server (`init_gnt_srv`): zeroes
    /// it, writes orders, live flags, the notify request and the grant list
    /// of the ring pages. The caller then publishes `ring-ref` and
    /// `event-channel` in xenstore.
    pub fn server(
        ctrl: M,
        orders: &RingOrders,
        ring_grants: &[u32],
        read: RingBuffer<M>,
        write: RingBuffer<M>,
        port: u32,
        notify: N,
    ) -> Self {
        let zero = [0u8; 64];
        let mut at = 0;
        while at < ctrl.len() {
            let n = zero.len().min(ctrl.len() - at);
            ctrl.write_bytes(at, zero.get(..n).unwrap_or_default());
            at += n;
        }
        ctrl.store_u16(field::LEFT_ORDER, orders.left().order());
        ctrl.store_u16(field::RIGHT_ORDER, orders.right().order());
        for (i, gref) in ring_grants.iter().take(orders.grant_count()).enumerate() {
            ctrl.store_u32(grant_offset(i), *gref);
        }
        ctrl.store_u8(field::CLI_LIVE, SERVER_INITIAL_CLI_LIVE);
        ctrl.store_u8(field::SRV_LIVE, SERVER_INITIAL_SRV_LIVE);
        ctrl.store_u8(field::CLI_NOTIFY, SERVER_INITIAL_CLI_NOTIFY);
        barrier();
        Self::new(ctrl, orders, read, write, Role::Server, port, notify)
    }

    /// Connects as client to a mapped server page whose `orders` were read
    /// with [`read_orders`] and whose rings are mapped (`libxenvchan_client_init`):
    /// sets `cli_live`, asks for write notifications and wakes the server.
    pub fn client(
        ctrl: M,
        orders: &RingOrders,
        read: RingBuffer<M>,
        write: RingBuffer<M>,
        port: u32,
        notify: N,
    ) -> Self {
        let ring = Self::new(ctrl, orders, read, write, Role::Client, port, notify);
        ring.ctrl
            .store_u8(field::CLI_LIVE, CLIENT_CONNECTED_CLI_LIVE);
        ring.ctrl
            .store_u8(field::SRV_NOTIFY, CLIENT_CONNECTED_SRV_NOTIFY);
        barrier();
        ring.notify.notify(ring.port);
        ring
    }

    /// Our local event channel port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The shared page.
    pub fn ctrl(&self) -> &M {
        &self.ctrl
    }

    fn fail(&mut self, what: &'static str) -> StreamError {
        self.broken = Some(what);
        StreamError::PeerProtocol(what)
    }

    fn request_notify(&self, bit: u8) {
        self.ctrl.fetch_or_u8(self.ep.request_notify, bit);
        barrier();
    }

    fn send_notify(&self, bit: u8) {
        barrier();
        if self.ctrl.fetch_and_u8(self.ep.send_notify, !bit) & bit != 0 {
            self.notify.notify(self.port);
        }
    }

    fn peer_state(&self) -> LinkState {
        match (
            self.role,
            Liveness::from(self.ctrl.load_u8(self.ep.peer_live)),
        ) {
            (Role::Server, Liveness::NotYetConnected) => LinkState::Waiting,
            (_, Liveness::Connected) => LinkState::Connected,
            _ => LinkState::Closed,
        }
    }

    fn read_indices(&mut self) -> Result<RingIndices, StreamError> {
        let prod = self.ctrl.load_u32(self.ep.read_prod);
        barrier(); // the index before the data it covers
        RingIndices::new(self.read_cons, prod, self.read_order)
            .map_err(|_| self.fail("vchan producer index out of range"))
    }

    fn write_indices(&mut self) -> Result<RingIndices, StreamError> {
        let cons = self.ctrl.load_u32(self.ep.write_cons);
        barrier();
        RingIndices::new(cons, self.write_prod, self.write_order)
            .map_err(|_| self.fail("vchan consumer index out of range"))
    }
}

impl<M: SharedMemory, N: Notify> ByteStream for VchanRing<M, N> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        if let Some(what) = self.broken {
            return Err(StreamError::PeerProtocol(what));
        }
        if self.closed_by_us {
            return Err(StreamError::Closed);
        }
        let mut indices = self.read_indices()?;
        if indices.available() == 0 {
            // Ask to be told about the next write, then look again (the
            // writer may have moved between our read and the request).
            self.request_notify(VCHAN_NOTIFY_WRITE);
            indices = self.read_indices()?;
            if indices.available() == 0 {
                return match self.peer_state() {
                    LinkState::Closed => Err(StreamError::Closed),
                    _ => Ok(0),
                };
            }
        }
        let count = indices.available().min(buf.len() as u32);
        let ranges = indices
            .read_ranges(count)
            .map_err(|_| self.fail("vchan read range"))?;
        let mut copied = 0;
        for range in ranges {
            let n = range.len();
            if let Some(dst) = buf.get_mut(copied..copied + n) {
                self.read.mem.read_bytes(self.read.base + range.start, dst);
            }
            copied += n;
        }
        barrier(); // data copied before the slots are released
        self.read_cons = indices
            .consume(count)
            .map_err(|_| self.fail("vchan consume"))?
            .cons();
        self.ctrl.store_u32(self.ep.read_cons, self.read_cons);
        self.send_notify(VCHAN_NOTIFY_READ);
        Ok(count as usize)
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        if let Some(what) = self.broken {
            return Err(StreamError::PeerProtocol(what));
        }
        if self.closed_by_us {
            return Err(StreamError::Closed);
        }
        match self.peer_state() {
            LinkState::Waiting => return Ok(0),
            LinkState::Closed => return Err(StreamError::Closed),
            LinkState::Connected => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let mut indices = self.write_indices()?;
        if (indices.free() as usize) < buf.len() {
            // Ask to be told when the reader frees space, then look again.
            self.request_notify(VCHAN_NOTIFY_READ);
            indices = self.write_indices()?;
        }
        let count = indices.free().min(buf.len() as u32);
        if count == 0 {
            return Ok(0);
        }
        let ranges = indices
            .write_ranges(count)
            .map_err(|_| self.fail("vchan write range"))?;
        let mut copied = 0;
        for range in ranges {
            let n = range.len();
            if let Some(src) = buf.get(copied..copied + n) {
                self.write
                    .mem
                    .write_bytes(self.write.base + range.start, src);
            }
            copied += n;
        }
        barrier(); // data before the index that publishes it
        self.write_prod = indices
            .produce(count)
            .map_err(|_| self.fail("vchan produce"))?
            .prod();
        self.ctrl.store_u32(self.ep.write_prod, self.write_prod);
        self.send_notify(VCHAN_NOTIFY_WRITE);
        Ok(count as usize)
    }

    fn state(&self) -> LinkState {
        if self.broken.is_some() || self.closed_by_us {
            return LinkState::Closed;
        }
        self.peer_state()
    }

    fn close(&mut self) {
        if !self.closed_by_us {
            self.closed_by_us = true;
            self.ctrl.store_u8(self.ep.own_live, 0);
            barrier();
            self.notify.notify(self.port);
        }
    }
}

#[allow(clippy::indexing_slicing)] // reason: test code and test doubles; a panic there is a failed test
#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::xen::shared::VecMemory;
    use alloc::collections::BTreeMap;
    use alloc::rc::Rc;
    use alloc::string::ToString;
    use alloc::vec;
    use core::cell::Cell;
    use protocol::vchan::PAGE_SIZE;

    #[derive(Clone, Default)]
    struct Counter(Rc<Cell<u32>>);
    impl Notify for Counter {
        fn notify(&self, _: u32) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// The other end written straight from libxenvchan's io.c (not from our
    /// engine): `rd_*`/`wr_*` on the page, `request_notify`/`send_notify`
    /// on the notify bytes, sizes from the orders on the page.
    struct CPeer<M = VecMemory> {
        ctrl: M,
        rd: RingBuffer<M>,
        wr: RingBuffer<M>,
        rd_size: u32,
        wr_size: u32,
        is_server: bool,
        notified: u32,
    }

    impl<M: SharedMemory> CPeer<M> {
        fn off(&self, server: usize, client: usize) -> usize {
            if self.is_server { server } else { client }
        }
        fn request_notify(&self, bit: u8) {
            self.ctrl
                .fetch_or_u8(self.off(field::CLI_NOTIFY, field::SRV_NOTIFY), bit);
        }
        fn send_notify(&mut self, bit: u8) {
            let prev = self
                .ctrl
                .fetch_and_u8(self.off(field::SRV_NOTIFY, field::CLI_NOTIFY), !bit);
            if prev & bit != 0 {
                self.notified += 1;
            }
        }
        /// libxenvchan_write (non-blocking).
        fn write(&mut self, data: &[u8]) -> usize {
            let prod_off = self.off(field::RIGHT_PROD, field::LEFT_PROD);
            let cons_off = self.off(field::RIGHT_CONS, field::LEFT_CONS);
            let mut avail = self.wr_size
                - (self
                    .ctrl
                    .load_u32(prod_off)
                    .wrapping_sub(self.ctrl.load_u32(cons_off)));
            if (avail as usize) < data.len() {
                self.request_notify(VCHAN_NOTIFY_READ);
                avail = self.wr_size
                    - (self
                        .ctrl
                        .load_u32(prod_off)
                        .wrapping_sub(self.ctrl.load_u32(cons_off)));
            }
            let size = data.len().min(avail as usize);
            if size == 0 {
                return 0;
            }
            let prod = self.ctrl.load_u32(prod_off);
            let real_idx = (prod & (self.wr_size - 1)) as usize;
            let contig = (self.wr_size as usize - real_idx).min(size);
            self.wr
                .mem
                .write_bytes(self.wr.base + real_idx, &data[..contig]);
            if contig < size {
                self.wr.mem.write_bytes(self.wr.base, &data[contig..size]);
            }
            self.ctrl
                .store_u32(prod_off, prod.wrapping_add(size as u32));
            self.send_notify(VCHAN_NOTIFY_WRITE);
            size
        }
        /// libxenvchan_read (non-blocking).
        fn read(&mut self, out: &mut [u8]) -> usize {
            let prod_off = self.off(field::LEFT_PROD, field::RIGHT_PROD);
            let cons_off = self.off(field::LEFT_CONS, field::RIGHT_CONS);
            let mut ready = self
                .ctrl
                .load_u32(prod_off)
                .wrapping_sub(self.ctrl.load_u32(cons_off));
            if (ready as usize) < out.len() {
                self.request_notify(VCHAN_NOTIFY_WRITE);
                ready = self
                    .ctrl
                    .load_u32(prod_off)
                    .wrapping_sub(self.ctrl.load_u32(cons_off));
            }
            let size = out.len().min(ready as usize);
            if size == 0 {
                return 0;
            }
            let cons = self.ctrl.load_u32(cons_off);
            let real_idx = (cons & (self.rd_size - 1)) as usize;
            let contig = (self.rd_size as usize - real_idx).min(size);
            self.rd
                .mem
                .read_bytes(self.rd.base + real_idx, &mut out[..contig]);
            if contig < size {
                self.rd.mem.read_bytes(self.rd.base, &mut out[contig..size]);
            }
            self.ctrl
                .store_u32(cons_off, cons.wrapping_add(size as u32));
            self.send_notify(VCHAN_NOTIFY_READ);
            size
        }
    }

    fn buffer_for(
        ctrl: &VecMemory,
        pages: &[VecMemory],
        orders: &RingOrders,
        left: bool,
    ) -> RingBuffer<VecMemory> {
        let layout = if left { orders.left() } else { orders.right() };
        match layout.placement() {
            RingPlacement::InPage { offset } => RingBuffer {
                mem: ctrl.clone(),
                base: offset,
            },
            RingPlacement::Granted { first_grant, .. } => RingBuffer {
                mem: pages[first_grant].clone(),
                base: 0,
            },
        }
    }

    /// A server (ours) and a C-style client on one page.
    fn server_pair(
        left_min: usize,
        right_min: usize,
    ) -> (VchanRing<VecMemory, Counter>, CPeer, Counter) {
        let orders = RingOrders::for_server(left_min, right_min).unwrap();
        let ctrl = VecMemory::new(4096);
        // One contiguous region per granted ring (grant index = first_grant).
        let mut pages = vec![VecMemory::new(0); orders.grant_count()];
        for layout in [orders.left(), orders.right()] {
            if let RingPlacement::Granted { first_grant, .. } = layout.placement() {
                pages[first_grant] = VecMemory::new(layout.size() as usize);
            }
        }
        let grants: Vec<u32> = (100..100 + orders.grant_count() as u32).collect();
        let counter = Counter::default();
        let ours = VchanRing::server(
            ctrl.clone(),
            &orders,
            &grants,
            buffer_for(&ctrl, &pages, &orders, true),
            buffer_for(&ctrl, &pages, &orders, false),
            9,
            counter.clone(),
        );
        // The C client: validates orders from the page, maps, connects.
        let seen = read_orders(&ctrl).unwrap();
        assert_eq!(read_grants(&ctrl, &seen), grants);
        let peer = CPeer {
            ctrl: ctrl.clone(),
            rd: buffer_for(&ctrl, &pages, &seen, false),
            wr: buffer_for(&ctrl, &pages, &seen, true),
            rd_size: seen.right().size(),
            wr_size: seen.left().size(),
            is_server: false,
            notified: 0,
        };
        (ours, peer, counter)
    }

    fn connect<M: SharedMemory>(peer: &CPeer<M>) {
        peer.ctrl.store_u8(field::CLI_LIVE, 1);
        peer.ctrl.store_u8(field::SRV_NOTIFY, VCHAN_NOTIFY_WRITE);
    }

    #[test]
    fn server_page_matches_init_gnt_srv() {
        let (ours, _, _) = server_pair(1024, 2048);
        let ctrl = ours.ctrl();
        assert_eq!(ctrl.load_u16(field::LEFT_ORDER), 10);
        assert_eq!(ctrl.load_u16(field::RIGHT_ORDER), 11);
        assert_eq!(ctrl.load_u8(field::CLI_LIVE), 2);
        assert_eq!(ctrl.load_u8(field::SRV_LIVE), 1);
        assert_eq!(ctrl.load_u8(field::CLI_NOTIFY), VCHAN_NOTIFY_WRITE);
        assert_eq!(ctrl.load_u8(field::SRV_NOTIFY), 0);
        let (ours, _, _) = server_pair(4096, 8192);
        assert_eq!(ours.ctrl().load_u16(field::LEFT_ORDER), 12);
        assert_eq!(ours.ctrl().load_u16(field::RIGHT_ORDER), 13);
        assert_eq!(ours.ctrl().load_u32(grant_offset(2)), 102);
    }

    #[test]
    fn server_waits_for_the_client_then_streams_both_ways_across_wraparound() {
        for (left, right) in [(1024, 2048), (2048, 1024), (4096, 4096), (8192, 1024)] {
            let (mut ours, mut peer, counter) = server_pair(left, right);
            assert_eq!(ours.state(), LinkState::Waiting);
            assert_eq!(ours.write(b"early").unwrap(), 0);
            let mut buf = [0u8; 100];
            assert_eq!(ours.read(&mut buf).unwrap(), 0);
            connect(&peer);
            assert_eq!(ours.state(), LinkState::Connected);
            // Pump 100 KiB each way in odd-sized pieces (10 KB under Miri,
            // still around the largest ring).
            let total: u32 = if cfg!(miri) { 10_000 } else { 100_000 };
            let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
            let (mut sent_up, mut got_up, mut sent_down, mut got_down) =
                (0, Vec::new(), 0, Vec::new());
            let mut guard = 0;
            while got_up.len() < data.len() || got_down.len() < data.len() {
                guard += 1;
                assert!(guard < 100_000);
                sent_up += peer.write(&data[sent_up..(sent_up + 777).min(data.len())]);
                let mut b = [0u8; 333];
                let n = ours.read(&mut b).unwrap();
                got_up.extend_from_slice(&b[..n]);
                sent_down += ours
                    .write(&data[sent_down..(sent_down + 555).min(data.len())])
                    .unwrap();
                let mut c = [0u8; 999];
                let n = peer.read(&mut c);
                got_down.extend_from_slice(&c[..n]);
            }
            assert_eq!(got_up, data);
            assert_eq!(got_down, data);
            assert!(counter.0.get() > 0, "we never notified the client");
            assert!(peer.notified > 0, "the client never notified us");
        }
    }

    #[test]
    fn close_is_seen_by_both_sides_and_pending_data_is_still_read() {
        let (mut ours, mut peer, counter) = server_pair(1024, 2048);
        connect(&peer);
        assert_eq!(peer.write(b"last words"), 10);
        peer.ctrl.store_u8(field::CLI_LIVE, 0); // client exits (unmap notify)
        assert_eq!(ours.state(), LinkState::Closed);
        let mut buf = [0u8; 64];
        assert_eq!(ours.read(&mut buf).unwrap(), 10);
        assert_eq!(ours.read(&mut buf), Err(StreamError::Closed));
        assert_eq!(ours.write(b"x"), Err(StreamError::Closed));
        let before = counter.0.get();
        ours.close();
        assert_eq!(peer.ctrl.load_u8(field::SRV_LIVE), 0);
        assert_eq!(counter.0.get(), before + 1);
        let _ = peer.read(&mut buf);
    }

    #[test]
    fn a_hostile_client_cannot_push_indices_out_of_range() {
        let (mut ours, peer, _) = server_pair(1024, 2048);
        connect(&peer);
        // Producer more than a ring ahead of our consumer.
        peer.ctrl.store_u32(field::LEFT_PROD, 1025);
        let mut buf = [0u8; 4096];
        assert!(matches!(
            ours.read(&mut buf),
            Err(StreamError::PeerProtocol(_))
        ));
        assert_eq!(ours.state(), LinkState::Closed);
        assert!(ours.write(b"x").is_err());

        let (mut ours, peer, _) = server_pair(1024, 2048);
        connect(&peer);
        // Consumer ahead of our producer.
        peer.ctrl.store_u32(field::RIGHT_CONS, 5);
        assert!(matches!(
            ours.write(b"x"),
            Err(StreamError::PeerProtocol(_))
        ));

        let (mut ours, peer, _) = server_pair(1024, 2048);
        connect(&peer);
        // Rewriting our own index on the page does not fool us: we keep our copy.
        peer.ctrl.store_u32(field::LEFT_CONS, 0xffff_0000);
        peer.ctrl.store_u32(field::LEFT_PROD, 3);
        assert_eq!(ours.read(&mut buf).unwrap(), 3);
        // Unknown live values read as closed.
        peer.ctrl.store_u8(field::CLI_LIVE, 77);
        assert_eq!(ours.state(), LinkState::Closed);
    }

    #[test]
    fn a_client_validates_the_server_page_before_mapping() {
        let ctrl = VecMemory::new(4096);
        for (l, r) in [(9u16, 11u16), (10, 21), (10, 10), (0, 0), (u16::MAX, 12)] {
            ctrl.store_u16(field::LEFT_ORDER, l);
            ctrl.store_u16(field::RIGHT_ORDER, r);
            assert!(read_orders(&ctrl).is_err(), "{l} {r}");
        }
        // A grant list that would run into the in-page ring.
        ctrl.store_u16(field::LEFT_ORDER, 20);
        ctrl.store_u16(field::RIGHT_ORDER, 10);
        assert!(read_orders(&ctrl).is_err());
    }

    #[test]
    fn our_client_talks_to_a_c_style_server() {
        // The C server's page (init_gnt_srv), read 2048 / write 1024.
        let ctrl = VecMemory::new(4096);
        ctrl.store_u16(field::LEFT_ORDER, 11);
        ctrl.store_u16(field::RIGHT_ORDER, 10);
        ctrl.store_u8(field::CLI_LIVE, 2);
        ctrl.store_u8(field::SRV_LIVE, 1);
        ctrl.store_u8(field::CLI_NOTIFY, VCHAN_NOTIFY_WRITE);
        let orders = read_orders(&ctrl).unwrap();
        let counter = Counter::default();
        let mut ours = VchanRing::client(
            ctrl.clone(),
            &orders,
            RingBuffer {
                mem: ctrl.clone(),
                base: 1024,
            }, // right: order 10 in page
            RingBuffer {
                mem: ctrl.clone(),
                base: 2048,
            }, // left: order 11 in page
            4,
            counter.clone(),
        );
        assert_eq!(counter.0.get(), 1, "client_init wakes the server");
        assert_eq!(ctrl.load_u8(field::CLI_LIVE), 1);
        assert_eq!(ctrl.load_u8(field::SRV_NOTIFY), VCHAN_NOTIFY_WRITE);
        let mut server = CPeer {
            ctrl: ctrl.clone(),
            rd: RingBuffer {
                mem: ctrl.clone(),
                base: 2048,
            },
            wr: RingBuffer {
                mem: ctrl.clone(),
                base: 1024,
            },
            rd_size: 2048,
            wr_size: 1024,
            is_server: true,
            notified: 0,
        };
        assert_eq!(ours.state(), LinkState::Connected);
        assert_eq!(ours.write(&[1u8; 3000]).unwrap(), 2048);
        let mut buf = [0u8; 4096];
        assert_eq!(server.read(&mut buf), 2048);
        assert_eq!(server.notified, 1);
        assert_eq!(server.write(b"hello"), 5);
        assert_eq!(ours.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        ctrl.store_u8(field::SRV_LIVE, 0);
        assert_eq!(ours.read(&mut buf), Err(StreamError::Closed));
    }

    /// Pages side by side: the double of granted pages mapped contiguously
    /// (`map_ring` on Xen maps a ring's grant list into consecutive frames
    /// of the foreign window). Byte `i` is in page `i / 4096`.
    #[derive(Clone, Debug)]
    struct Paged(Rc<Vec<VecMemory>>);

    impl Paged {
        fn new(pages: Vec<VecMemory>) -> Self {
            Paged(Rc::new(pages))
        }
        fn page(&self, offset: usize) -> Option<(&VecMemory, usize)> {
            self.0
                .get(offset / PAGE_SIZE)
                .map(|page| (page, offset % PAGE_SIZE))
        }
    }

    impl SharedMemory for Paged {
        fn len(&self) -> usize {
            self.0.len() * PAGE_SIZE
        }
        fn load_u32(&self, offset: usize) -> u32 {
            self.page(offset).map_or(0, |(p, at)| p.load_u32(at))
        }
        fn store_u32(&self, offset: usize, value: u32) {
            if let Some((p, at)) = self.page(offset) {
                p.store_u32(at, value);
            }
        }
        fn load_u8(&self, offset: usize) -> u8 {
            self.page(offset).map_or(0, |(p, at)| p.load_u8(at))
        }
        fn store_u8(&self, offset: usize, value: u8) {
            if let Some((p, at)) = self.page(offset) {
                p.store_u8(at, value);
            }
        }
        fn load_u16(&self, offset: usize) -> u16 {
            self.page(offset).map_or(0, |(p, at)| p.load_u16(at))
        }
        fn store_u16(&self, offset: usize, value: u16) {
            if let Some((p, at)) = self.page(offset) {
                p.store_u16(at, value);
            }
        }
        fn fetch_or_u8(&self, offset: usize, bits: u8) -> u8 {
            self.page(offset)
                .map_or(0, |(p, at)| p.fetch_or_u8(at, bits))
        }
        fn fetch_and_u8(&self, offset: usize, bits: u8) -> u8 {
            self.page(offset)
                .map_or(0, |(p, at)| p.fetch_and_u8(at, bits))
        }
        fn compare_exchange_u16(&self, offset: usize, current: u16, new: u16) -> u16 {
            self.page(offset)
                .map_or(0, |(p, at)| p.compare_exchange_u16(at, current, new))
        }
        fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
            let mut done = 0;
            while done < dst.len() {
                let (page, at) = self.page(offset + done).expect("read inside the pages");
                let n = (PAGE_SIZE - at).min(dst.len() - done);
                page.read_bytes(at, &mut dst[done..done + n]);
                done += n;
            }
        }
        fn write_bytes(&self, offset: usize, src: &[u8]) {
            let mut done = 0;
            while done < src.len() {
                let (page, at) = self.page(offset + done).expect("write inside the pages");
                let n = (PAGE_SIZE - at).min(src.len() - done);
                page.write_bytes(at, &src[done..done + n]);
                done += n;
            }
        }
    }

    /// The shared page's own grant reference in these tests (`gref` never
    /// yields it).
    const CTRL_REF: u32 = 3;

    /// The pages granted by one domain, by grant reference.
    type GrantTableDouble = BTreeMap<u32, VecMemory>;

    /// Grant references that are neither sequential nor sorted, so a client
    /// that maps the list in the wrong order reads scrambled data.
    fn gref(i: usize) -> u32 {
        (i as u32 * 7919) % 10_007 + 8
    }

    /// Maps a ring the way `vchan_client` on Xen does, from our plan.
    fn map(ctrl: &Paged, ring: &ClientRing, table: &GrantTableDouble) -> RingBuffer<Paged> {
        match ring {
            ClientRing::InPage { offset } => RingBuffer {
                mem: ctrl.clone(),
                base: *offset,
            },
            ClientRing::Granted(refs) => RingBuffer {
                mem: Paged::new(
                    refs.iter()
                        .map(|r| table.get(r).expect("a granted page").clone())
                        .collect(),
                ),
                base: 0,
            },
        }
    }

    /// A server written from libxenvchan's `init_gnt_srv` (not from our
    /// engine): zeroed page, orders, the left ring's pages granted first,
    /// then the right's, their references in the grant list, live flags.
    /// Returns the page, the grant table and the server end.
    fn c_server(left_order: u16, right_order: u16) -> (Paged, GrantTableDouble, CPeer<Paged>) {
        let ctrl = Paged::new(vec![VecMemory::new(PAGE_SIZE)]);
        ctrl.store_u16(field::LEFT_ORDER, left_order);
        ctrl.store_u16(field::RIGHT_ORDER, right_order);
        let mut table = GrantTableDouble::new();
        let mut next = 0;
        let mut ring = |order: u16, table: &mut GrantTableDouble| -> RingBuffer<Paged> {
            match order {
                10 => RingBuffer {
                    mem: ctrl.clone(),
                    base: 1024,
                },
                11 => RingBuffer {
                    mem: ctrl.clone(),
                    base: 2048,
                },
                _ => {
                    let pages: Vec<VecMemory> = (0..1usize << (order - 12))
                        .map(|_| VecMemory::new(PAGE_SIZE))
                        .collect();
                    for page in &pages {
                        ctrl.store_u32(grant_offset(next), gref(next));
                        table.insert(gref(next), page.clone());
                        next += 1;
                    }
                    RingBuffer {
                        mem: Paged::new(pages),
                        base: 0,
                    }
                }
            }
        };
        let left = ring(left_order, &mut table);
        let right = ring(right_order, &mut table);
        ctrl.store_u8(field::CLI_LIVE, 2);
        ctrl.store_u8(field::SRV_LIVE, 1);
        ctrl.store_u8(field::CLI_NOTIFY, VCHAN_NOTIFY_WRITE);
        let server = CPeer {
            ctrl: ctrl.clone(),
            rd: left,
            wr: right,
            rd_size: 1 << left_order,
            wr_size: 1 << right_order,
            is_server: true,
            notified: 0,
        };
        (ctrl, table, server)
    }

    /// Pumps `total` bytes each way between our end and a C-style end in
    /// odd-sized pieces; checks every byte.
    fn stream_both_ways<M: SharedMemory>(
        ours: &mut VchanRing<M, Counter>,
        peer: &mut CPeer<M>,
        total: u32,
    ) {
        let data: Vec<u8> = (0..total).map(|i| (i * 13 % 253) as u8).collect();
        let (mut sent_up, mut got_up, mut sent_down, mut got_down) = (0, Vec::new(), 0, Vec::new());
        let mut guard = 0;
        while got_up.len() < data.len() || got_down.len() < data.len() {
            guard += 1;
            assert!(guard < 10_000, "no progress");
            sent_down += peer.write(&data[sent_down..(sent_down + 20_011).min(data.len())]);
            let mut b = vec![0u8; 17_003];
            let n = ours.read(&mut b).unwrap();
            got_down.extend_from_slice(&b[..n]);
            sent_up += ours
                .write(&data[sent_up..(sent_up + 30_013).min(data.len())])
                .unwrap();
            let mut c = vec![0u8; 9_001];
            let n = peer.read(&mut c);
            got_up.extend_from_slice(&c[..n]);
        }
        assert!(got_up == data, "client to server bytes differ");
        assert!(got_down == data, "server to client bytes differ");
    }

    #[test]
    fn our_client_maps_multi_page_rings_in_grant_list_order() {
        // Under Miri (about 10 KiB/s of ring traffic) smaller rings of the
        // same kinds: granted both ways, granted + in-page.
        let (total, configs): (u32, &[(u16, u16)]) = if cfg!(miri) {
            (12_000, &[(13, 12), (12, 10)])
        } else {
            (300_000, &[(16, 16), (12, 16), (16, 10), (13, 11), (14, 12)])
        };
        for &(left, right) in configs {
            let (ctrl, table, mut server) = c_server(left, right);
            let plan = plan_client(&ctrl, CTRL_REF, CLIENT_MAX_ORDER).unwrap();
            let pages = |order: u16| if order >= 12 { 1 << (order - 12) } else { 0 };
            match &plan.write {
                ClientRing::Granted(refs) => {
                    assert_eq!(refs, &(0..pages(left)).map(gref).collect::<Vec<_>>())
                }
                ClientRing::InPage { .. } => assert!(left < 12),
            }
            match &plan.read {
                ClientRing::Granted(refs) => assert_eq!(
                    refs,
                    &(pages(left)..pages(left) + pages(right))
                        .map(gref)
                        .collect::<Vec<_>>()
                ),
                ClientRing::InPage { .. } => assert!(right < 12),
            }
            let counter = Counter::default();
            let mut ours = VchanRing::client(
                ctrl.clone(),
                &plan.orders,
                map(&ctrl, &plan.read, &table),
                map(&ctrl, &plan.write, &table),
                3,
                counter.clone(),
            );
            assert_eq!(ours.state(), LinkState::Connected);
            // One call fills the whole ring: not a page at a time.
            let big = vec![0xa5u8; 100_000];
            assert_eq!(ours.write(&big).unwrap(), 1 << left, "{left} {right}");
            let mut got = vec![0u8; 100_000];
            assert_eq!(server.read(&mut got), 1 << left);
            assert!(got[..1 << left].iter().all(|b| *b == 0xa5));
            assert_eq!(server.write(&big), 1 << right);
            assert_eq!(ours.read(&mut got).unwrap(), 1 << right);
            stream_both_ways(&mut ours, &mut server, total);
            assert!(counter.0.get() > 0 && server.notified > 0);
        }
    }

    #[test]
    fn our_server_offers_multi_page_rings_a_c_client_maps() {
        let (total, configs): (u32, &[(usize, usize)]) = if cfg!(miri) {
            (12_000, &[(8192, 4096), (4096, 1024)])
        } else {
            (300_000, &[(65536, 65536), (4096, 65536), (65536, 1024)])
        };
        for &(left_min, right_min) in configs {
            let orders = RingOrders::for_server(left_min, right_min).unwrap();
            let ctrl = Paged::new(vec![VecMemory::new(PAGE_SIZE)]);
            let mut table = GrantTableDouble::new();
            let grants: Vec<u32> = (0..orders.grant_count()).map(gref).collect();
            let mut ring = |layout: protocol::vchan::RingLayout| match layout.placement() {
                RingPlacement::InPage { offset } => RingBuffer {
                    mem: ctrl.clone(),
                    base: offset,
                },
                RingPlacement::Granted { first_grant, pages } => {
                    let pages: Vec<VecMemory> = (first_grant..first_grant + pages)
                        .map(|i| {
                            let page = VecMemory::new(PAGE_SIZE);
                            table.insert(gref(i), page.clone());
                            page
                        })
                        .collect();
                    RingBuffer {
                        mem: Paged::new(pages),
                        base: 0,
                    }
                }
            };
            let (read, write) = (ring(orders.left()), ring(orders.right()));
            let counter = Counter::default();
            let mut ours = VchanRing::server(
                ctrl.clone(),
                &orders,
                &grants,
                read,
                write,
                5,
                counter.clone(),
            );
            // The C client: libxenvchan_client_init reads the page once and
            // maps the grant list, left ring first.
            let seen = plan_client(&ctrl, CTRL_REF, protocol::vchan::MAX_RING_ORDER).unwrap();
            let mut client = CPeer {
                ctrl: ctrl.clone(),
                rd: map(&ctrl, &seen.read, &table),
                wr: map(&ctrl, &seen.write, &table),
                rd_size: seen.orders.right().size(),
                wr_size: seen.orders.left().size(),
                is_server: false,
                notified: 0,
            };
            assert_eq!(ours.state(), LinkState::Waiting);
            connect(&client);
            assert_eq!(ours.state(), LinkState::Connected);
            let big = vec![0x3cu8; 100_000];
            assert_eq!(
                ours.write(&big).unwrap(),
                orders.right().size() as usize,
                "{left_min} {right_min}"
            );
            assert_eq!(client.write(&big), orders.left().size() as usize);
            // Our stream engine is the client side of `stream_both_ways`'s
            // names; swap roles by streaming with the C client as `peer`.
            let mut sink = vec![0u8; 100_000];
            assert_eq!(client.read(&mut sink), orders.right().size() as usize);
            assert_eq!(ours.read(&mut sink).unwrap(), orders.left().size() as usize);
            stream_both_ways(&mut ours, &mut client, total);
            assert!(counter.0.get() > 0 && client.notified > 0);
        }
    }

    #[test]
    fn a_client_refuses_hostile_orders_and_grant_lists_before_mapping() {
        let ctrl = VecMemory::new(PAGE_SIZE);
        let set = |l: u16, r: u16| {
            ctrl.store_u16(field::LEFT_ORDER, l);
            ctrl.store_u16(field::RIGHT_ORDER, r);
        };
        // Orders libxenvchan allows, but bigger than we map.
        for (l, r) in [(17, 16), (16, 17), (20, 20), (18, 10)] {
            set(l, r);
            assert_eq!(
                plan_client(&ctrl, CTRL_REF, CLIENT_MAX_ORDER),
                Err(PlanError::TooLarge { order: l.max(r) }),
                "{l} {r}"
            );
        }
        // Orders no libxenvchan server writes.
        for (l, r) in [
            (21, 12),
            (12, 21),
            (9, 12),
            (0, 0),
            (u16::MAX, 16),
            (10, 10),
        ] {
            set(l, r);
            assert!(
                matches!(
                    plan_client(&ctrl, CTRL_REF, CLIENT_MAX_ORDER),
                    Err(PlanError::Orders(_))
                ),
                "{l} {r}"
            );
        }
        // The same page granted twice, within a ring or across both.
        set(13, 12);
        for (i, g) in [40u32, 41, 42].into_iter().enumerate() {
            ctrl.store_u32(grant_offset(i), g);
        }
        assert!(plan_client(&ctrl, CTRL_REF, CLIENT_MAX_ORDER).is_ok());
        ctrl.store_u32(grant_offset(2), 40);
        assert_eq!(
            plan_client(&ctrl, CTRL_REF, CLIENT_MAX_ORDER),
            Err(PlanError::DuplicateGrant { gref: 40 })
        );
        ctrl.store_u32(grant_offset(2), 42);
        ctrl.store_u32(grant_offset(1), 40);
        assert_eq!(
            plan_client(&ctrl, CTRL_REF, CLIENT_MAX_ORDER),
            Err(PlanError::DuplicateGrant { gref: 40 })
        );
        // The shared page named as a ring page.
        ctrl.store_u32(grant_offset(1), CTRL_REF);
        assert_eq!(
            plan_client(&ctrl, CTRL_REF, CLIENT_MAX_ORDER),
            Err(PlanError::DuplicateGrant { gref: CTRL_REF })
        );
        // Messages say what to do.
        assert!(
            PlanError::TooLarge { order: 17 }
                .to_string()
                .contains("refuse the connection")
        );
    }

    #[test]
    fn a_hostile_server_cannot_push_multi_page_indices_out_of_range() {
        // 64 KiB rings; 16 KiB under Miri (the same grant-list path).
        let order = if cfg!(miri) { 14 } else { 16 };
        let size = 1u32 << order;
        let (ctrl, table, _server) = c_server(order, order);
        let plan = plan_client(&ctrl, CTRL_REF, CLIENT_MAX_ORDER).unwrap();
        let mut ours = VchanRing::client(
            ctrl.clone(),
            &plan.orders,
            map(&ctrl, &plan.read, &table),
            map(&ctrl, &plan.write, &table),
            3,
            Counter::default(),
        );
        // A full ring is fine; one byte more is not.
        ctrl.store_u32(field::RIGHT_PROD, size);
        let mut buf = vec![0u8; 70_000];
        assert_eq!(ours.read(&mut buf).unwrap(), size as usize);
        ctrl.store_u32(field::RIGHT_PROD, size + size + 1);
        assert!(matches!(
            ours.read(&mut buf),
            Err(StreamError::PeerProtocol(_))
        ));
        assert_eq!(ours.state(), LinkState::Closed);
    }
}
