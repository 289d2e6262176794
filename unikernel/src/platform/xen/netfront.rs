//! netfront: our end of a Xen virtual NIC whose backend (netback) runs in
//! another domain — the firewall's uplink to the net qube — as a
//! `smoltcp::phy::Device`.
//!
//! Facts (Xen `public/io/netif.h`, `public/io/ring.h`; Mini-OS and Linux
//! `xen-netfront.c`): two shared rings on pages we grant to the backend, a
//! 64-byte header (`req_prod`, `req_event`, `rsp_prod`, `rsp_event`, pad)
//! then entries of `max(request, response)` bytes: TX 12 (`netif_tx_request
//! { gref u32, offset u16, flags u16, id u16, size u16 }`, response `{ id
//! u16, status i16 }`), RX 8 (`netif_rx_request { id u16, pad u16, gref u32
//! }`, response `{ id u16, offset u16, flags u16, status i16 }`, status > 0
//! is the length); 256 entries each (`__RING_SIZE` of a 4 KiB page). We ask
//! for `request-rx-copy` (the backend copies each frame into a page we
//! posted) and offer no scatter-gather or GSO, so every frame is one slot
//! each way. Checksums: we send complete ones (TX flags 0) and ask for
//! complete ones (`feature-no-csum-offload` 1, no
//! `feature-ipv6-csum-offload`); a backend that still flags a frame
//! `NETRXF_csum_blank` gets it completed ([`super::csum`]) or, when that is
//! impossible, dropped and counted. `NETRXF_data_validated` changes nothing
//! (the router verifies no TCP/UDP checksum).
//!
//! The ring logic is portable over [`SharedMemory`] and tested on the host
//! against a netback double. Hostile backend: our producer/consumer indices
//! are private copies; the backend's `rsp_prod` is read once per poll and
//! may not run past the requests we made; a response id must name a buffer
//! we posted and not yet got back; offsets and lengths are checked against
//! the page. Anything else is counted and dropped, never a panic; an index
//! out of range stops the device for good.

#![deny(clippy::indexing_slicing)]

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::csum::complete_partial_checksum;
use super::events::Notify;
use super::shared::{SharedMemory, barrier};

/// `struct netif_*_sring` header fields.
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;
/// Entries start after the 64-byte header.
pub const RING_HEADER: usize = 64;
/// Bytes per TX ring entry (the request is the larger member).
pub const TX_ENTRY: usize = 12;
/// Bytes per RX ring entry.
pub const RX_ENTRY: usize = 8;
/// Entries per ring (both: 4032/12 and 4032/8 rounded down to 2^n).
pub const RING_SIZE: u32 = 256;
/// TX buffers (pages) we keep granted.
pub const TX_BUFFERS: usize = 64;
/// RX buffers (pages) we keep posted.
pub const RX_BUFFERS: usize = 64;
/// Largest Ethernet frame we send or accept (1500-byte MTU + header).
pub const MAX_FRAME: usize = 1514;
/// `NETRXF_data_validated`: the backend checked the checksum.
pub const NETRXF_DATA_VALIDATED: u16 = 1 << 0;
/// `NETRXF_csum_blank`: the TCP/UDP checksum holds only the pseudo-header sum.
pub const NETRXF_CSUM_BLANK: u16 = 1 << 1;
/// `NETRXF_more_data`.
pub const NETRXF_MORE_DATA: u16 = 1 << 2;
/// `NETRXF_extra_info`.
pub const NETRXF_EXTRA_INFO: u16 = 1 << 3;
/// `NETIF_RSP_NULL`: a padding response (no request behind it).
pub const NETIF_RSP_NULL: i16 = 1;
/// Page size.
const PAGE: usize = 4096;

/// A page shared with the backend and the grant reference naming it.
#[derive(Debug, Clone)]
pub struct Buffer<M> {
    /// The page.
    pub mem: M,
    /// Its grant reference (given to the backend in requests).
    pub gref: u32,
}

/// Counters of one netfront.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetfrontStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames the backend flagged as failed, or that we refused (too long,
    /// fragments we did not ask for, queue full).
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Responses naming buffers we did not post.
    pub protocol_errors: u64,
    /// Frames flagged `NETRXF_csum_blank` whose checksum could not be
    /// completed: dropped.
    pub bad_checksum_offload: u64,
}

/// The frontend rings of one vif.
#[derive(Debug)]
pub struct Netfront<M, N> {
    tx: M,
    rx: M,
    port: u32,
    notify: N,
    tx_bufs: Vec<Buffer<M>>,
    tx_free: Vec<u16>,
    tx_busy: Vec<bool>,
    rx_bufs: Vec<Buffer<M>>,
    rx_posted: Vec<bool>,
    tx_prod: u32,
    tx_cons: u32,
    rx_prod: u32,
    rx_cons: u32,
    received: VecDeque<Vec<u8>>,
    stats: NetfrontStats,
    broken: Option<&'static str>,
}

impl<M: SharedMemory, N: Notify> Netfront<M, N> {
    /// Initialises both shared rings (`SHARED_RING_INIT`) and posts every RX
    /// buffer. The caller then writes `tx-ring-ref`, `rx-ring-ref`,
    /// `event-channel` to xenstore and connects.
    pub fn new(
        tx: M,
        rx: M,
        tx_bufs: Vec<Buffer<M>>,
        rx_bufs: Vec<Buffer<M>>,
        port: u32,
        notify: N,
    ) -> Self {
        for ring in [&tx, &rx] {
            ring.write_bytes(0, &[0u8; RING_HEADER]);
            ring.store_u32(REQ_EVENT, 1);
            ring.store_u32(RSP_EVENT, 1);
        }
        let tx_count = tx_bufs.len().min(TX_BUFFERS);
        let rx_count = rx_bufs.len().min(RX_BUFFERS);
        let mut front = Netfront {
            tx,
            rx,
            port,
            notify,
            tx_free: (0..tx_count as u16).rev().collect(),
            tx_busy: vec![false; tx_count],
            tx_bufs,
            rx_posted: vec![false; rx_count],
            rx_bufs,
            tx_prod: 0,
            tx_cons: 0,
            rx_prod: 0,
            rx_cons: 0,
            received: VecDeque::new(),
            stats: NetfrontStats::default(),
            broken: None,
        };
        for id in 0..rx_count as u16 {
            front.post_rx(id);
        }
        barrier();
        front.rx.store_u32(REQ_PROD, front.rx_prod);
        front
    }

    /// The counters.
    pub fn stats(&self) -> NetfrontStats {
        self.stats
    }

    /// Why the device stopped, if it did.
    pub fn broken(&self) -> Option<&'static str> {
        self.broken
    }

    /// Our event channel port.
    pub fn port(&self) -> u32 {
        self.port
    }

    fn post_rx(&mut self, id: u16) {
        let Some(buffer) = self.rx_bufs.get(id as usize) else {
            return;
        };
        let at = RING_HEADER + (self.rx_prod % RING_SIZE) as usize * RX_ENTRY;
        self.rx.store_u16(at, id);
        self.rx.store_u16(at + 2, 0);
        self.rx.store_u32(at + 4, buffer.gref);
        self.rx_prod = self.rx_prod.wrapping_add(1);
        if let Some(posted) = self.rx_posted.get_mut(id as usize) {
            *posted = true;
        }
    }

    /// Takes the backend's responses: frees sent buffers, queues received
    /// frames and posts their buffers again.
    pub fn poll(&mut self) {
        if self.broken.is_some() {
            return;
        }
        self.poll_tx();
        self.poll_rx();
    }

    fn poll_tx(&mut self) {
        let prod = self.tx.load_u32(RSP_PROD);
        barrier(); // the index before the responses it covers
        let outstanding = self.tx_prod.wrapping_sub(self.tx_cons);
        if prod.wrapping_sub(self.tx_cons) > outstanding {
            self.broken = Some("netback TX rsp_prod past our requests");
            return;
        }
        while self.tx_cons != prod {
            let at = RING_HEADER + (self.tx_cons % RING_SIZE) as usize * TX_ENTRY;
            let id = self.tx.load_u16(at);
            let status = self.tx.load_u16(at + 2) as i16;
            self.tx_cons = self.tx_cons.wrapping_add(1);
            if status == NETIF_RSP_NULL {
                continue;
            }
            match self.tx_busy.get_mut(id as usize) {
                Some(busy) if *busy => {
                    *busy = false;
                    self.tx_free.push(id);
                    if status < 0 {
                        self.stats.tx_errors += 1;
                    }
                }
                _ => self.stats.protocol_errors += 1,
            }
        }
        self.tx.store_u32(RSP_EVENT, self.tx_cons.wrapping_add(1));
        barrier();
    }

    fn poll_rx(&mut self) {
        let prod = self.rx.load_u32(RSP_PROD);
        barrier();
        let outstanding = self.rx_prod.wrapping_sub(self.rx_cons);
        if prod.wrapping_sub(self.rx_cons) > outstanding {
            self.broken = Some("netback RX rsp_prod past our requests");
            return;
        }
        let mut reposted = false;
        while self.rx_cons != prod {
            let at = RING_HEADER + (self.rx_cons % RING_SIZE) as usize * RX_ENTRY;
            let id = self.rx.load_u16(at);
            let offset = self.rx.load_u16(at + 2) as usize;
            let flags = self.rx.load_u16(at + 4);
            let status = self.rx.load_u16(at + 6) as i16;
            self.rx_cons = self.rx_cons.wrapping_add(1);
            match self.rx_posted.get_mut(id as usize) {
                Some(posted) if *posted => *posted = false,
                _ => {
                    self.stats.protocol_errors += 1;
                    continue;
                }
            }
            let len = usize::try_from(status).unwrap_or(0);
            let fits = len > 0
                && len <= MAX_FRAME
                && offset.checked_add(len).is_some_and(|end| end <= PAGE);
            if fits
                && flags & (NETRXF_MORE_DATA | NETRXF_EXTRA_INFO) == 0
                && self.received.len() < RX_BUFFERS
            {
                let mut frame = vec![0u8; len];
                if let Some(buffer) = self.rx_bufs.get(id as usize) {
                    buffer.mem.read_bytes(offset, &mut frame);
                }
                if flags & NETRXF_CSUM_BLANK != 0 && complete_partial_checksum(&mut frame).is_err()
                {
                    self.stats.bad_checksum_offload += 1;
                } else {
                    self.received.push_back(frame);
                    self.stats.rx_frames += 1;
                }
            } else {
                self.stats.rx_errors += 1;
            }
            self.post_rx(id);
            reposted = true;
        }
        self.rx.store_u32(RSP_EVENT, self.rx_cons.wrapping_add(1));
        barrier(); // requests written before they are published
        if reposted {
            self.rx.store_u32(REQ_PROD, self.rx_prod);
            self.notify.notify(self.port);
        }
    }

    /// The next received frame.
    pub fn take_frame(&mut self) -> Option<Vec<u8>> {
        self.received.pop_front()
    }

    /// Whether a TX buffer is free.
    pub fn can_send(&self) -> bool {
        self.broken.is_none() && !self.tx_free.is_empty()
    }

    /// Sends a frame of `len` bytes filled by `fill`. A frame that cannot be
    /// sent (too long, no buffer, device stopped) is built and dropped.
    pub fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut frame = vec![0u8; len];
        let result = fill(&mut frame);
        let id = match (self.broken, len <= MAX_FRAME && len > 0, self.tx_free.pop()) {
            (None, true, Some(id)) => id,
            (_, _, id) => {
                if let Some(id) = id {
                    self.tx_free.push(id);
                }
                self.stats.tx_errors += 1;
                return result;
            }
        };
        let Some(buffer) = self.tx_bufs.get(id as usize) else {
            self.stats.tx_errors += 1;
            return result;
        };
        buffer.mem.write_bytes(0, &frame);
        let at = RING_HEADER + (self.tx_prod % RING_SIZE) as usize * TX_ENTRY;
        self.tx.store_u32(at, buffer.gref);
        self.tx.store_u16(at + 4, 0); // offset
        self.tx.store_u16(at + 6, 0); // flags: checksums are complete
        self.tx.store_u16(at + 8, id);
        self.tx.store_u16(at + 10, len as u16);
        if let Some(busy) = self.tx_busy.get_mut(id as usize) {
            *busy = true;
        }
        self.tx_prod = self.tx_prod.wrapping_add(1);
        barrier(); // frame and request before the index
        self.tx.store_u32(REQ_PROD, self.tx_prod);
        self.notify.notify(self.port);
        self.stats.tx_frames += 1;
        result
    }
}

/// A received frame.
#[derive(Debug)]
pub struct NetfrontRx(pub Vec<u8>);

impl phy::RxToken for NetfrontRx {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

/// A send slot.
#[derive(Debug)]
pub struct NetfrontTx<'a, M, N>(&'a mut Netfront<M, N>);

impl<M: SharedMemory, N: Notify> phy::TxToken for NetfrontTx<'_, M, N> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.0.send(len, f)
    }
}

impl<M: SharedMemory, N: Notify> phy::Device for Netfront<M, N> {
    type RxToken<'a>
        = NetfrontRx
    where
        Self: 'a;
    type TxToken<'a>
        = NetfrontTx<'a, M, N>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(NetfrontRx, NetfrontTx<'_, M, N>)> {
        self.poll();
        let frame = self.take_frame()?;
        Some((NetfrontRx(frame), NetfrontTx(self)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<NetfrontTx<'_, M, N>> {
        self.poll();
        if self.can_send() {
            Some(NetfrontTx(self))
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // We negotiate no offload: every checksum is computed and checked.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Both;
        caps.checksum = checksum;
        caps
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes buffers it built itself.
mod tests {
    use super::*;
    use crate::platform::xen::shared::VecMemory;
    use alloc::collections::BTreeMap;
    use alloc::rc::Rc;
    use core::cell::Cell;
    use smoltcp::phy::{Device, RxToken, TxToken};

    #[derive(Clone, Default)]
    struct Counter(Rc<Cell<u32>>);
    impl Notify for Counter {
        fn notify(&self, _: u32) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// netback, from netif.h: consumes TX requests (reads the granted
    /// page), answers them; fills posted RX buffers with frames.
    struct Backend {
        tx: VecMemory,
        rx: VecMemory,
        pages: BTreeMap<u32, VecMemory>,
        tx_req_cons: u32,
        tx_rsp_prod: u32,
        rx_req_cons: u32,
        rx_rsp_prod: u32,
        sent: Vec<Vec<u8>>,
    }

    impl Backend {
        fn take_tx(&mut self) {
            let prod = self.tx.load_u32(REQ_PROD);
            while self.tx_req_cons != prod {
                let at = RING_HEADER + (self.tx_req_cons % RING_SIZE) as usize * TX_ENTRY;
                let gref = self.tx.load_u32(at);
                let offset = self.tx.load_u16(at + 4) as usize;
                let id = self.tx.load_u16(at + 8);
                let size = self.tx.load_u16(at + 10) as usize;
                let mut frame = vec![0u8; size];
                self.pages[&gref].read_bytes(offset, &mut frame);
                self.sent.push(frame);
                self.tx_req_cons += 1;
                let rsp = RING_HEADER + (self.tx_rsp_prod % RING_SIZE) as usize * TX_ENTRY;
                self.tx.store_u16(rsp, id);
                self.tx.store_u16(rsp + 2, 0);
                self.tx_rsp_prod += 1;
            }
            self.tx.store_u32(RSP_PROD, self.tx_rsp_prod);
        }

        /// Delivers a frame into the next posted buffer (raw response fields).
        fn deliver_raw(
            &mut self,
            id_override: Option<u16>,
            offset: u16,
            flags: u16,
            status: i16,
            frame: &[u8],
        ) -> bool {
            if self.rx_req_cons == self.rx.load_u32(REQ_PROD) {
                return false;
            }
            let at = RING_HEADER + (self.rx_req_cons % RING_SIZE) as usize * RX_ENTRY;
            let id = self.rx.load_u16(at);
            let gref = self.rx.load_u32(at + 4);
            self.rx_req_cons += 1;
            if let Some(page) = self.pages.get(&gref)
                && offset as usize + frame.len() <= PAGE
            {
                page.write_bytes(offset as usize, frame);
            }
            let rsp = RING_HEADER + (self.rx_rsp_prod % RING_SIZE) as usize * RX_ENTRY;
            self.rx.store_u16(rsp, id_override.unwrap_or(id));
            self.rx.store_u16(rsp + 2, offset);
            self.rx.store_u16(rsp + 4, flags);
            self.rx.store_u16(rsp + 6, status as u16);
            self.rx_rsp_prod += 1;
            self.rx.store_u32(RSP_PROD, self.rx_rsp_prod);
            true
        }

        fn deliver(&mut self, frame: &[u8]) -> bool {
            self.deliver_raw(None, 16, 0, frame.len() as i16, frame)
        }
    }

    fn setup() -> (Netfront<VecMemory, Counter>, Backend, Counter) {
        let tx = VecMemory::new(PAGE);
        let rx = VecMemory::new(PAGE);
        let mut pages = BTreeMap::new();
        let mut make = |base: u32, n: usize| -> Vec<Buffer<VecMemory>> {
            (0..n)
                .map(|i| {
                    let mem = VecMemory::new(PAGE);
                    pages.insert(base + i as u32, mem.clone());
                    Buffer {
                        mem,
                        gref: base + i as u32,
                    }
                })
                .collect()
        };
        let tx_bufs = make(1000, TX_BUFFERS);
        let rx_bufs = make(2000, RX_BUFFERS);
        let counter = Counter::default();
        let front = Netfront::new(tx.clone(), rx.clone(), tx_bufs, rx_bufs, 5, counter.clone());
        let backend = Backend {
            tx,
            rx,
            pages,
            tx_req_cons: 0,
            tx_rsp_prod: 0,
            rx_req_cons: 0,
            rx_rsp_prod: 0,
            sent: Vec::new(),
        };
        (front, backend, counter)
    }

    #[test]
    fn rings_start_as_shared_ring_init_with_every_rx_buffer_posted() {
        let (_front, backend, _) = setup();
        assert_eq!(backend.tx.load_u32(REQ_EVENT), 1);
        assert_eq!(backend.tx.load_u32(RSP_EVENT), 1);
        assert_eq!(backend.rx.load_u32(REQ_PROD), RX_BUFFERS as u32);
        assert_eq!(backend.rx.load_u32(RING_HEADER + 4), 2000); // gref of id 0
        assert_eq!(backend.rx.load_u16(RING_HEADER + 8), 1); // id of slot 1
    }

    #[test]
    fn frames_flow_both_ways_through_the_smoltcp_device_across_ring_wraparound() {
        let (mut front, mut backend, counter) = setup();
        // Under Miri, fewer and shorter frames: still more rounds than the
        // 256-slot rings hold, so both rings wrap.
        let (rounds, spread) = if cfg!(miri) {
            (300u32, 200)
        } else {
            (600, 1400)
        };
        for round in 0..rounds {
            let payload: Vec<u8> = (0..60 + round % spread)
                .map(|i| (i + round) as u8)
                .collect();
            // Out: smoltcp asks for a token and fills it.
            let token = front.transmit(Instant::from_millis(0)).unwrap();
            token.consume(payload.len(), |buf| buf.copy_from_slice(&payload));
            backend.take_tx();
            assert_eq!(backend.sent.pop().unwrap(), payload);
            // In.
            assert!(backend.deliver(&payload));
            let (rx, _tx) = front.receive(Instant::from_millis(0)).unwrap();
            rx.consume(|frame| assert_eq!(frame, &payload[..]));
        }
        let stats = front.stats();
        assert_eq!(
            (stats.tx_frames, stats.rx_frames, stats.protocol_errors),
            (u64::from(rounds), u64::from(rounds), 0)
        );
        assert!(counter.0.get() >= 2 * rounds);
        assert!(front.can_send());
    }

    #[test]
    fn tx_buffers_run_out_until_the_backend_answers() {
        let (mut front, mut backend, _) = setup();
        for _ in 0..TX_BUFFERS {
            front
                .transmit(Instant::from_millis(0))
                .unwrap()
                .consume(64, |b| b.fill(1));
        }
        assert!(front.transmit(Instant::from_millis(0)).is_none());
        backend.take_tx();
        assert!(front.transmit(Instant::from_millis(0)).is_some());
        // Too long a frame is dropped and counted, not sent.
        front.send(MAX_FRAME + 1, |b| b.fill(0));
        assert_eq!(front.stats().tx_errors, 1);
    }

    #[test]
    fn blank_checksums_from_the_backend_are_completed_or_dropped() {
        use crate::platform::xen::csum::tests::{blank_frame, l4_checksum_ok};
        let (mut front, mut backend, _) = setup();
        let udp = blank_frame(false, 17, b"dns answer");
        let tcp6 = blank_frame(true, 6, b"payload");
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        for flags in [NETRXF_CSUM_BLANK, NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED] {
            for frame in [&udp, &tcp6] {
                assert!(backend.deliver_raw(None, 0, flags, frame.len() as i16, frame));
                front.poll();
                let got = front.take_frame().unwrap();
                assert!(l4_checksum_ok(&got));
                assert_eq!(got.len(), frame.len());
            }
            // A lie: ARP flagged blank is dropped.
            assert!(backend.deliver_raw(None, 0, flags, 60, &arp));
            front.poll();
            assert!(front.take_frame().is_none());
        }
        assert_eq!(front.stats().bad_checksum_offload, 2);
        // data_validated alone, or nothing: the frame as it came.
        for flags in [0, NETRXF_DATA_VALIDATED] {
            assert!(backend.deliver_raw(None, 0, flags, udp.len() as i16, &udp));
            front.poll();
            assert_eq!(front.take_frame().unwrap(), udp);
        }
    }

    #[test]
    fn a_hostile_backend_is_counted_and_contained() {
        let (mut front, mut backend, _) = setup();
        // Unknown id, twice the same id, bad length/offset, fragments.
        assert!(backend.deliver_raw(Some(999), 0, 0, 60, &[0; 60]));
        assert!(backend.deliver_raw(None, 4090, 0, 60, &[0; 6]));
        assert!(backend.deliver_raw(None, 0, 0, 5000, &[]));
        assert!(backend.deliver_raw(None, 0, 0, -1, &[]));
        assert!(backend.deliver_raw(None, 0, NETRXF_MORE_DATA, 60, &[0; 60]));
        assert!(backend.deliver_raw(None, 0, NETRXF_EXTRA_INFO, 60, &[0; 60]));
        front.poll();
        assert!(front.take_frame().is_none());
        let stats = front.stats();
        assert_eq!(stats.protocol_errors, 1);
        assert_eq!(stats.rx_errors, 5);
        // Good frames still come through afterwards.
        assert!(backend.deliver(&[7; 60]));
        front.poll();
        assert_eq!(front.take_frame().unwrap(), vec![7; 60]);
        // A TX response for a buffer never sent.
        let rsp = RING_HEADER;
        backend.tx.store_u16(rsp, 3);
        front.send(60, |b| b.fill(0)); // one real request outstanding
        backend.tx.store_u32(RSP_PROD, 1);
        front.poll();
        assert_eq!(front.stats().protocol_errors, 2);
        // rsp_prod past our requests stops the device for good.
        backend.rx.store_u32(RSP_PROD, 100_000);
        front.poll();
        assert!(front.broken().is_some());
        assert!(!front.can_send());
        assert!(front.transmit(Instant::from_millis(0)).is_none());
    }
}
