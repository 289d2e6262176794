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
//! posted) and offer, as Linux netfront, `feature-sg`,
//! `feature-gso-tcpv4/6` and partial checksums (`feature-no-csum-offload`
//! 0, `feature-ipv6-csum-offload` 1). Received: a packet is its first
//! response, `XEN_NETIF_EXTRA_TYPE_GSO` (or other extra-info) segments in
//! the places of the next requests when `NETRXF_extra_info` is set, and
//! data slots while `NETRXF_more_data` is; the frame goes to the router
//! whole with its offloads checked by [`crate::offload::accept`]
//! (`NETRXF_csum_blank`: checksum partial; `NETRXF_data_validated`
//! changes nothing). Sent: a frame the router hands over with offloads the
//! backend announced (`feature-sg`, `feature-gso-tcpv4/6`,
//! `feature-ipv6-csum-offload` in its directory, [`BackendFeatures`]) goes
//! out as Linux netfront sends it — one slot per page, the first
//! request's size the whole frame's, the GSO segment behind it,
//! `NETTXF_csum_blank | NETTXF_data_validated` for a partial checksum;
//! the router cuts and completes anything else in software first. Bounds
//! on what the backend sends: at most [`MAX_RX_SLOTS`] data slots (Linux
//! netfront's) and [`MAX_RX_EXTRAS`] extra segments, one GSO segment, a
//! frame of at most 64 KiB with GSO and [`MAX_FRAME`] without; a packet
//! not yet fully answered waits for the rest, unless every buffer we
//! posted is answered (then it is dropped). A packet our queue
//! ([`RX_QUEUE_BYTES`], counting a page per slot) has no room for stays on
//! the ring, its buffers not posted again, until the firewall read frames:
//! the backend runs out of buffers and holds the rest (backpressure;
//! nothing it copied to us is dropped here). Buffers are known by ring
//! position (the backend cannot name one we did not post there).
//!
//! Notifications as Linux netfront's ring macros: requests are published
//! per frame (TX) or once per poll (RX buffers posted again), and the
//! backend is notified only when the new `req_prod` passed its `req_event`
//! ([`push_and_check_notify`]); having taken every response, a poll sets
//! `rsp_event` to the next one and reads `rsp_prod` again
//! ([`final_check`]), so no wake-up is lost.
//!
//! The ring logic is portable over [`SharedMemory`] and tested on the host
//! against a netback double. Hostile backend: our producer/consumer indices
//! are private copies; its event indices only decide whether it is
//! notified (wrapping arithmetic); its `rsp_prod` is read once per round and
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

use super::events::Notify;
use super::frames::{self, FramePool};
use super::netback::{
    EXTRA_FLAG_MORE, EXTRA_TYPE_GSO, EXTRA_TYPE_HASH, EXTRA_TYPE_MCAST_ADD, EXTRA_TYPE_MCAST_DEL,
    GSO_TYPE_TCPV4, GSO_TYPE_TCPV6, NETTXF_CSUM_BLANK, NETTXF_DATA_VALIDATED, NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA, Sent,
};
use super::shared::{SharedMemory, barrier};
use crate::offload::{self, GsoKind, NicOffload, Offload, TxOffloads};

/// `struct netif_*_sring` header fields.
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// Most rounds one poll makes when the peer keeps producing while we look
/// (the final check of [`final_check`] finding more); what is left is
/// taken by the next poll (the caller polls again while frames come).
pub const POLL_ROUNDS: usize = 4;

/// The test of `RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY`: whether
/// moving our producer index from `old` to `new` passed the peer's event
/// index `event` (it asked to be told once the index reaches `event`).
/// Wrapping arithmetic; a hostile `event` only decides whether that peer
/// gets an interrupt.
pub fn push_notifies(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// Publishes our producer index `new` (at `prod_at`; `old` the one
/// published before) and says whether the peer's event index (at
/// `event_at`) asks for a notification.
pub fn push_and_check_notify<M: SharedMemory>(
    ring: &M,
    prod_at: usize,
    event_at: usize,
    old: u32,
    new: u32,
) -> bool {
    barrier(); // entries before the index
    ring.store_u32(prod_at, new);
    barrier(); // the index before the peer's event index is read
    push_notifies(old, new, ring.load_u32(event_at))
}

/// `RING_FINAL_CHECK_FOR_{REQUESTS,RESPONSES}`: having consumed up to the
/// peer's producer index `seen`, asks to be notified of the next one
/// (event index `seen + 1` at `event_at`), then reads the producer index
/// (at `prod_at`) once more: whether it moved meanwhile (then the peer may
/// not have notified us, and we look again).
pub fn final_check<M: SharedMemory>(ring: &M, prod_at: usize, event_at: usize, seen: u32) -> bool {
    ring.store_u32(event_at, seen.wrapping_add(1));
    barrier(); // the event index before the producer index is read again
    ring.load_u32(prod_at) != seen
}
/// Entries start after the 64-byte header.
pub const RING_HEADER: usize = 64;
/// Bytes per TX ring entry (the request is the larger member).
pub const TX_ENTRY: usize = 12;
/// Bytes per RX ring entry.
pub const RX_ENTRY: usize = 8;
/// Entries per ring (both: 4032/12 and 4032/8 rounded down to 2^n).
pub const RING_SIZE: u32 = 256;
/// TX buffers (pages) we keep granted (a 64 KiB GSO frame takes 17).
pub const TX_BUFFERS: usize = 128;
/// RX buffers (pages) we keep posted (a 64 KiB GSO frame takes 17 and
/// one for its extra-info segment).
pub const RX_BUFFERS: usize = 128;
/// Data slots one received packet may take: Linux netfront's limit
/// (`XEN_NETIF_NR_SLOTS_MIN`); a packet of more is dropped.
pub const MAX_RX_SLOTS: usize = 18;
/// Extra-info segments one received packet may carry.
pub const MAX_RX_EXTRAS: usize = 4;
/// Bytes of received frames held for the firewall before it reads them.
pub const RX_QUEUE_BYTES: usize = 512 * 1024;
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
/// Frames whose pages may be lent to the backend at once
/// ([`PageLender`]); more wait in copies.
pub const LENT_FRAMES: usize = 16;
/// Whole pages of one lent frame at most (a 64 KiB GSO frame has 16).
pub const LENT_PAGES: usize = offload::MAX_OFFLOAD_FRAME / PAGE;
/// Frames shorter than this are copied, never lent: a grant and its
/// revocation cost about what copying a page does.
pub const LEND_FROM: usize = 2 * PAGE;

/// Grants the backend read-only access to the pages of a frame we send,
/// so that it reads the frame where it is instead of from a copy in our
/// TX buffers (Linux netfront grants its packets' own pages the same
/// way). Only a frame's whole pages are lent, and only of a buffer that
/// starts on a page: those pages then hold nothing but the frame's bytes
/// (the Xen runtime starts every allocation of a page or more on a page).
/// The bytes after the last whole page go through a TX buffer as before.
/// A lent frame stays with the netfront until the backend has answered
/// every request naming it and each grant is revoked; a grant the backend
/// still maps keeps its frame from reuse until it lets go.
pub trait PageLender: core::fmt::Debug {
    /// Whether `frame`'s whole pages may be lent (its buffer starts on a
    /// page the backend can be granted).
    fn lendable(&self, frame: &[u8]) -> bool;
    /// Grants one whole page of a lendable frame read-only; its
    /// reference, or `None` when none can be had.
    fn grant(&mut self, page: &[u8]) -> Option<u32>;
    /// Ends a grant; `false` while the backend still maps the page.
    fn revoke(&mut self, gref: u32) -> bool;
}

/// A frame whose pages the backend was granted.
#[derive(Debug, Default)]
struct Lent {
    frame: Vec<u8>,
    grefs: [u32; LENT_PAGES],
    /// Whole pages lent (requests `0..pages` of this frame).
    pages: usize,
    /// Bit `k`: the backend answered the request for page `k`.
    answered: u32,
    /// Bit `k`: page `k`'s grant is ended.
    revoked: u32,
    /// Counted in `tx_still_mapped` (once per frame).
    still_mapped: bool,
}

impl Lent {
    fn all(&self) -> u32 {
        if self.pages >= 32 {
            u32::MAX
        } else {
            (1u32 << self.pages) - 1
        }
    }

    /// Ends the grants of its pages not ended yet; whether all of them
    /// are ended now (a page the backend still maps keeps its grant).
    fn revoke(&mut self, lender: &mut dyn PageLender) -> bool {
        let mut all = true;
        for (page, gref) in self.grefs.iter().enumerate().take(self.pages) {
            if self.revoked & (1 << page) == 0 {
                if lender.revoke(*gref) {
                    self.revoked |= 1 << page;
                } else {
                    all = false;
                }
            }
        }
        all
    }
}

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
    /// fragments we did not ask for, a packet that never ends). A full
    /// queue refuses nothing: the packet waits on the ring.
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Responses naming buffers we did not post.
    pub protocol_errors: u64,
    /// Frames flagged `NETRXF_csum_blank` whose checksum could not be
    /// completed, or whose GSO extra info did not match them: dropped.
    pub bad_checksum_offload: u64,
    /// GSO packets the backend sent us whole (each in `rx_frames` too).
    pub rx_gso: u64,
    /// Event channel notifications we sent the backend (only when its
    /// event index asked for one).
    pub notifications: u64,
    /// GSO packets we sent the backend whole (each in `tx_frames` too).
    pub tx_gso: u64,
    /// Frames sent from their own pages, lent to the backend (each in
    /// `tx_frames` too).
    pub tx_lent: u64,
    /// Lent frames the backend answered while still mapping a page: kept
    /// from reuse until it unmaps.
    pub tx_still_mapped: u64,
}

/// What the backend wrote it takes on our TX (its xenstore keys).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendFeatures {
    /// `feature-sg` 1.
    pub sg: bool,
    /// `feature-gso-tcpv4` 1.
    pub gso4: bool,
    /// `feature-gso-tcpv6` 1.
    pub gso6: bool,
    /// `feature-ipv6-csum-offload` 1 (IPv4 partial checksums every
    /// netback takes).
    pub csum6: bool,
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
    /// TX requests published to the backend up to here (`req_prod`).
    tx_published: u32,
    /// Whether [`Self::send_offloaded`] and [`Self::send_owned`] leave
    /// their requests for [`Self::flush`] (set by the platform, which
    /// flushes after each batch the router hands over); otherwise each
    /// frame is published at once.
    pub batching: bool,
    tx_cons: u32,
    rx_prod: u32,
    rx_cons: u32,
    /// The buffer id posted at each RX ring position.
    rx_ring: Vec<u16>,
    received: VecDeque<(Vec<u8>, Offload)>,
    received_bytes: usize,
    /// Frames cut in software for [`Self::take_frame`].
    finished: VecDeque<Vec<u8>>,
    stats: NetfrontStats,
    broken: Option<&'static str>,
    backend: BackendFeatures,
    /// Buffers for the frames received (`super::frames`): the platform's
    /// pool, lent while it polls; empty otherwise. Lent frames the
    /// backend is done with go here too.
    pub pool: FramePool,
    lender: Option<alloc::boxed::Box<dyn PageLender>>,
    /// Frames whose pages are lent, by the index in their request ids.
    lent: Vec<Option<Lent>>,
    /// Lent frames answered whole whose grants are not all ended yet.
    unrevoked: usize,
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
            tx_published: 0,
            batching: false,
            tx_cons: 0,
            rx_prod: 0,
            rx_cons: 0,
            rx_ring: vec![0; RING_SIZE as usize],
            received: VecDeque::new(),
            received_bytes: 0,
            finished: VecDeque::new(),
            stats: NetfrontStats::default(),
            broken: None,
            backend: BackendFeatures::default(),
            pool: FramePool::default(),
            lender: None,
            lent: (0..LENT_FRAMES).map(|_| None).collect(),
            unrevoked: 0,
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
        if let Some(place) = self.rx_ring.get_mut((self.rx_prod % RING_SIZE) as usize) {
            *place = id;
        }
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
        for _ in 0..POLL_ROUNDS {
            if !self.poll_tx_round() {
                break;
            }
        }
    }

    /// One pass over the TX responses; whether the backend produced more
    /// meanwhile.
    fn poll_tx_round(&mut self) -> bool {
        let prod = self.tx.load_u32(RSP_PROD);
        barrier(); // the index before the responses it covers
        let outstanding = self.tx_prod.wrapping_sub(self.tx_cons);
        if prod.wrapping_sub(self.tx_cons) > outstanding {
            self.broken = Some("netback TX rsp_prod past our requests");
            return false;
        }
        while self.tx_cons != prod {
            let at = RING_HEADER + (self.tx_cons % RING_SIZE) as usize * TX_ENTRY;
            let id = self.tx.load_u16(at);
            let status = self.tx.load_u16(at + 2) as i16;
            self.tx_cons = self.tx_cons.wrapping_add(1);
            if status == NETIF_RSP_NULL {
                continue;
            }
            if status < 0 {
                self.stats.tx_errors += 1;
            }
            if usize::from(id) >= self.tx_busy.len() {
                self.lent_answered(usize::from(id) - self.tx_busy.len());
                continue;
            }
            match self.tx_busy.get_mut(id as usize) {
                Some(busy) if *busy => {
                    *busy = false;
                    self.tx_free.push(id);
                }
                _ => self.stats.protocol_errors += 1,
            }
        }
        if self.unrevoked > 0 {
            for index in 0..self.lent.len() {
                self.try_return(index);
            }
        }
        final_check(&self.tx, RSP_PROD, RSP_EVENT, prod)
    }

    /// The backend answered the request with id `TX buffers + slot`: page
    /// `slot % LENT_PAGES` of lent frame `slot / LENT_PAGES`. An id for a
    /// page not lent, or answered twice, is a protocol error.
    fn lent_answered(&mut self, slot: usize) {
        let (index, page) = (slot / LENT_PAGES, slot % LENT_PAGES);
        let done = match self.lent.get_mut(index) {
            Some(Some(lent)) if page < lent.pages && lent.answered & (1 << page) == 0 => {
                lent.answered |= 1 << page;
                lent.answered == lent.all()
            }
            _ => {
                self.stats.protocol_errors += 1;
                return;
            }
        };
        if done {
            self.unrevoked += 1;
            self.try_return(index);
        }
    }

    /// Ends the grants of lent frame `index` if the backend answered all
    /// its requests; once every one is ended the frame's buffer goes to
    /// the pool. A grant still mapped keeps it (tried again each poll).
    fn try_return(&mut self, index: usize) {
        let Some(slot) = self.lent.get_mut(index) else {
            return;
        };
        let Some(lent) = slot.as_mut() else {
            return;
        };
        if lent.answered != lent.all() {
            return;
        }
        let Some(lender) = self.lender.as_mut() else {
            return;
        };
        if !lent.revoke(lender.as_mut()) {
            if !lent.still_mapped {
                lent.still_mapped = true;
                self.stats.tx_still_mapped += 1;
            }
            return;
        }
        if let Some(lent) = slot.take() {
            self.unrevoked = self.unrevoked.saturating_sub(1);
            self.pool.give(lent.frame);
        }
    }

    /// Lets the netfront lend frames' pages to the backend through
    /// `lender` ([`Self::send_owned`]).
    pub fn set_lender(&mut self, lender: alloc::boxed::Box<dyn PageLender>) {
        self.lender = Some(lender);
    }

    /// Frames whose pages are still lent, answered or not, with the
    /// grants not yet ended, taken out (the device is being released:
    /// the caller keeps each buffer until its grants can be ended).
    pub fn take_lent(&mut self) -> Vec<(Vec<u8>, Vec<u32>)> {
        let mut out = Vec::new();
        for slot in &mut self.lent {
            if let Some(lent) = slot.take() {
                let grefs = (0..lent.pages)
                    .filter(|page| lent.revoked & (1 << page) == 0)
                    .filter_map(|page| lent.grefs.get(page).copied())
                    .collect();
                out.push((lent.frame, grefs));
            }
        }
        self.unrevoked = 0;
        out
    }

    /// Frames whose pages are lent now.
    pub fn lent_frames(&self) -> usize {
        self.lent.iter().filter(|slot| slot.is_some()).count()
    }

    fn poll_rx(&mut self) {
        let old = self.rx_prod;
        for _ in 0..POLL_ROUNDS {
            if !self.poll_rx_round() {
                break;
            }
        }
        if self.broken.is_none()
            && self.rx_prod != old
            && push_and_check_notify(&self.rx, REQ_PROD, REQ_EVENT, old, self.rx_prod)
        {
            self.notify.notify(self.port);
            self.stats.notifications += 1;
        }
    }

    /// One pass over the RX responses (buffers posted again, not yet
    /// published); whether the backend produced more meanwhile.
    fn poll_rx_round(&mut self) -> bool {
        let prod = self.rx.load_u32(RSP_PROD);
        barrier();
        let outstanding = self.rx_prod.wrapping_sub(self.rx_cons);
        if prod.wrapping_sub(self.rx_cons) > outstanding {
            self.broken = Some("netback RX rsp_prod past our requests");
            return false;
        }
        while self.rx_cons != prod {
            let slots = match self.rx_packet_slots(prod) {
                Some(slots) => slots,
                // Not all of it answered yet: wait for the rest, unless
                // every buffer we posted is answered (it never ends).
                None if prod.wrapping_sub(self.rx_cons) < outstanding => break,
                None => {
                    let slots = prod.wrapping_sub(self.rx_cons);
                    self.take_rx_packet(slots, true);
                    continue;
                }
            };
            // Backpressure, as Linux netfront (which takes no more than its
            // NAPI budget): a packet our queue has no room for stays on
            // the ring, its buffers not posted again, until the router
            // took frames (each take polls again). The backend then runs
            // out of buffers and holds the rest; a packet it already
            // copied to us is never dropped here.
            if !self.rx_has_room(slots) {
                return false;
            }
            self.take_rx_packet(slots, false);
        }
        // Event index `prod + 1`: with a packet not yet fully answered
        // (`rx_cons` behind `prod`) the backend's next push still wakes us.
        final_check(&self.rx, RSP_PROD, RSP_EVENT, prod)
    }

    /// Publishes the TX requests written since the last time, notifying
    /// the backend if its `req_event` asks: one index update and at most
    /// one notification for a batch of frames.
    pub fn flush(&mut self) {
        if self.tx_published == self.tx_prod || self.broken.is_some() {
            return;
        }
        let old = core::mem::replace(&mut self.tx_published, self.tx_prod);
        if push_and_check_notify(&self.tx, REQ_PROD, REQ_EVENT, old, self.tx_prod) {
            self.notify.notify(self.port);
            self.stats.notifications += 1;
        }
    }

    /// Whether the received queue takes one more packet of `slots` ring
    /// slots (at most a page of data each).
    fn rx_has_room(&self, slots: u32) -> bool {
        self.received.len() < RX_BUFFERS
            && self.received_bytes + slots as usize * PAGE <= RX_QUEUE_BYTES
    }

    /// One RX response: (id, offset, flags, status).
    fn rx_response(&self, index: u32) -> (u16, u16, u16, i16) {
        let at = RING_HEADER + (index % RING_SIZE) as usize * RX_ENTRY;
        (
            self.rx.load_u16(at),
            self.rx.load_u16(at + 2),
            self.rx.load_u16(at + 4),
            self.rx.load_u16(at + 6) as i16,
        )
    }

    /// How many ring slots the packet at `rx_cons` takes (first response,
    /// extra-info segments, further data slots); `None` when it runs past
    /// `prod`. Bounded by `prod`, so by the buffers we posted.
    fn rx_packet_slots(&self, prod: u32) -> Option<u32> {
        let mut index = self.rx_cons;
        let (_, _, flags, _) = self.rx_response(index);
        index = index.wrapping_add(1);
        if flags & NETRXF_EXTRA_INFO != 0 {
            loop {
                if index == prod {
                    return None;
                }
                let (first, _, _, _) = self.rx_response(index);
                index = index.wrapping_add(1);
                if first.to_le_bytes()[1] & EXTRA_FLAG_MORE == 0 {
                    break;
                }
            }
        }
        let mut more = flags & NETRXF_MORE_DATA != 0;
        while more {
            if index == prod {
                return None;
            }
            let (_, _, flags, _) = self.rx_response(index);
            index = index.wrapping_add(1);
            more = flags & NETRXF_MORE_DATA != 0;
        }
        Some(index.wrapping_sub(self.rx_cons))
    }

    /// Consumes one packet of `slots` ring slots, reposts its buffers and
    /// queues its frame if it holds together: every buffer one we posted
    /// at that position, offsets and lengths inside the page, at most
    /// [`MAX_RX_SLOTS`] data slots and [`MAX_RX_EXTRAS`] extra segments,
    /// one GSO segment at most, and its offloads through
    /// [`offload::accept`]. `truncated`: the packet's chain never ends
    /// (dropped).
    fn take_rx_packet(&mut self, slots: u32, truncated: bool) {
        let mut bad = truncated;
        let mut parts: [(u16, u16, u16); MAX_RX_SLOTS] = [(0, 0, 0); MAX_RX_SLOTS];
        let mut count = 0usize;
        let mut recorded = 0usize;
        let mut extras = 0usize;
        let mut gso: Option<(u16, u8)> = None;
        let mut first_flags = 0u16;
        let mut total = 0usize;
        let mut extra_left = false;
        for n in 0..slots {
            let index = self.rx_cons;
            self.rx_cons = self.rx_cons.wrapping_add(1);
            let posted_id = self
                .rx_ring
                .get((index % RING_SIZE) as usize)
                .copied()
                .unwrap_or(u16::MAX);
            match self.rx_posted.get_mut(posted_id as usize) {
                Some(posted) if *posted => *posted = false,
                _ => {
                    self.stats.protocol_errors += 1;
                    bad = true;
                    continue;
                }
            }
            let (id, offset, flags, status) = self.rx_response(index);
            if n == 0 {
                first_flags = flags;
                extra_left = flags & NETRXF_EXTRA_INFO != 0;
            } else if extra_left {
                // An extra-info segment in this request's place.
                let [kind, extra_flags] = id.to_le_bytes();
                extra_left = extra_flags & EXTRA_FLAG_MORE != 0;
                extras += 1;
                match kind {
                    EXTRA_TYPE_GSO if gso.is_none() => {
                        gso = Some((offset, flags.to_le_bytes()[0]));
                    }
                    EXTRA_TYPE_MCAST_ADD | EXTRA_TYPE_MCAST_DEL | EXTRA_TYPE_HASH => {}
                    _ => bad = true,
                }
                self.post_rx(posted_id);
                continue;
            }
            if id != posted_id {
                self.stats.protocol_errors += 1;
                bad = true;
            }
            let len = usize::try_from(status).unwrap_or(0);
            if status < 0 || usize::from(offset) + len > PAGE {
                bad = true;
            }
            count += 1;
            total += len;
            match parts.get_mut(recorded) {
                Some(part) if !bad => {
                    // Reposted after the copy below.
                    *part = (posted_id, offset, len as u16);
                    recorded += 1;
                }
                _ => {
                    bad = true;
                    self.post_rx(posted_id);
                }
            }
        }
        let limit = if gso.is_some() {
            offload::MAX_OFFLOAD_FRAME
        } else {
            MAX_FRAME
        };
        if extras > MAX_RX_EXTRAS || count > MAX_RX_SLOTS || total == 0 || total > limit {
            bad = true;
        }
        let parts = parts.get(..recorded).unwrap_or(&[]);
        let mut frame = Vec::new();
        if !bad {
            // A pool buffer may hold an old frame's bytes: every one of
            // them must be overwritten, or the frame is not handed on.
            frame = self.pool.take(total);
            let mut at = 0usize;
            for &(id, offset, len) in parts {
                let len = usize::from(len);
                match (self.rx_bufs.get(id as usize), frame.get_mut(at..at + len)) {
                    (Some(buffer), Some(dst)) => buffer.mem.read_bytes(usize::from(offset), dst),
                    _ => bad = true,
                }
                at += len;
            }
            bad |= at != total;
        }
        for &(id, _, _) in parts {
            self.post_rx(id);
        }
        if bad {
            self.stats.rx_errors += 1;
            return;
        }
        let nic = NicOffload {
            csum_partial: first_flags & NETRXF_CSUM_BLANK != 0,
            csum_start: 0,
            csum_offset: 0,
            gso: match gso {
                None => GsoKind::None,
                Some((_, GSO_TYPE_TCPV4)) => GsoKind::TcpV4,
                Some((_, GSO_TYPE_TCPV6)) => GsoKind::TcpV6,
                Some(_) => GsoKind::Other,
            },
            gso_size: gso.map_or(0, |(size, _)| size),
        };
        // `poll_rx_round` took the packet only with room for it: a page per
        // slot, and each slot's length was checked against its page above.
        match offload::accept(&mut frame, nic) {
            Ok(offload) => {
                if offload.is_gso() {
                    self.stats.rx_gso += 1;
                }
                self.received_bytes += frame.len();
                self.received.push_back((frame, offload));
                self.stats.rx_frames += 1;
            }
            Err(_) => self.stats.bad_checksum_offload += 1,
        }
    }

    /// The next received frame, complete (an offloaded one is cut and
    /// completed in software; see [`Self::take_frame_offloaded`]).
    pub fn take_frame(&mut self) -> Option<Vec<u8>> {
        if let Some(frame) = self.finished.pop_front() {
            return Some(frame);
        }
        let (frame, offload) = self.take_frame_offloaded()?;
        if offload.is_none() {
            return Some(frame);
        }
        let mut scratch = Vec::new();
        let finished = &mut self.finished;
        let result = offload::finish(&frame, offload, &mut scratch, &mut |piece| {
            finished.push_back(piece.to_vec())
        });
        if result.is_err() {
            self.stats.bad_checksum_offload += 1;
        }
        self.finished.pop_front()
    }

    /// The next received frame with its offload metadata.
    pub fn take_frame_offloaded(&mut self) -> Option<(Vec<u8>, Offload)> {
        let (frame, offload) = self.received.pop_front()?;
        self.received_bytes = self.received_bytes.saturating_sub(frame.len());
        Some((frame, offload))
    }

    /// Records what the backend wrote in xenstore.
    pub fn set_backend_features(&mut self, features: BackendFeatures) {
        self.backend = features;
    }

    /// What [`Self::send_offloaded`] takes whole: partial checksums when
    /// the backend takes them for IPv6 too (IPv4 ones every netback
    /// does), GSO with scatter-gather and the type's key.
    pub fn tx_offloads(&self) -> TxOffloads {
        let b = self.backend;
        TxOffloads {
            csum: b.csum6,
            tso4: b.csum6 && b.sg && b.gso4,
            tso6: b.csum6 && b.sg && b.gso6,
        }
    }

    /// Sends a frame with `offload` (one [`Self::tx_offloads`] allows) as
    /// Linux netfront does: one slot per page (the first request's size
    /// the whole frame's), the GSO extra-info segment behind the first,
    /// `NETTXF_csum_blank | NETTXF_data_validated` for a partial checksum.
    /// [`Sent::NoRoom`] when too few TX buffers are free (nothing sent).
    pub fn send_offloaded(&mut self, frame: &[u8], offload: Offload) -> Sent {
        match self.check_tx(frame, offload) {
            Some(sent) => sent,
            None => self.send_parts(frame, offload, None),
        }
    }

    /// As [`Self::send_offloaded`], but a frame of [`LEND_FROM`] bytes or
    /// more whose buffer the [`PageLender`] can lend goes out from its own
    /// pages (only the bytes after its last whole page are copied): the
    /// buffer is then taken out of `frame` (left empty) and kept until the
    /// backend is done with it. Otherwise `frame` is copied and left as it
    /// is (with [`Sent::NoRoom`] always).
    pub fn send_owned(&mut self, frame: &mut Vec<u8>, offload: Offload) -> Sent {
        if let Some(sent) = self.check_tx(frame, offload) {
            return sent;
        }
        let lendable =
            frame.len() >= LEND_FROM && self.lender.as_ref().is_some_and(|l| l.lendable(frame));
        let index = lendable
            .then(|| self.lent.iter().position(Option::is_none))
            .flatten();
        let Some(index) = index else {
            return self.send_parts(frame, offload, None);
        };
        let pages = (frame.len() / PAGE).min(LENT_PAGES);
        if !self.has_room(frame.len() - pages * PAGE, pages, offload) {
            return Sent::NoRoom;
        }
        let mut lent = Lent::default();
        if let Some(lender) = self.lender.as_mut() {
            for (page, gref) in frame.chunks_exact(PAGE).zip(lent.grefs.iter_mut()) {
                match lender.grant(page) {
                    Some(granted) => *gref = granted,
                    None => break,
                }
                lent.pages += 1;
            }
        }
        if lent.pages < pages {
            // Out of grant references: end those made and copy instead.
            let held = self
                .lender
                .as_mut()
                .is_some_and(|lender| !lent.revoke(lender.as_mut()));
            if !held {
                return self.send_parts(frame, offload, None);
            }
            // The backend mapped a page before it was named to it: its
            // buffer is kept from reuse until it lets go; the frame is
            // dropped.
            lent.answered = lent.all();
            lent.still_mapped = true;
            lent.frame = core::mem::take(frame);
            if let Some(slot) = self.lent.get_mut(index) {
                *slot = Some(lent);
                self.unrevoked += 1;
            }
            self.stats.tx_still_mapped += 1;
            self.stats.tx_errors += 1;
            return Sent::Dropped;
        }
        // Room was checked above: the requests are written.
        let sent = self.send_parts(frame, offload, Some((index, &lent.grefs, pages)));
        lent.frame = core::mem::take(frame);
        if let Some(slot) = self.lent.get_mut(index) {
            *slot = Some(lent);
        }
        self.stats.tx_lent += 1;
        sent
    }

    /// Why `frame` with `offload` cannot be sent at all (counted), if so.
    fn check_tx(&mut self, frame: &[u8], offload: Offload) -> Option<Sent> {
        let v6 = frame.get(12..14) == Some(&crate::wire::ETHERTYPE_IPV6.to_be_bytes()[..]);
        let limit = if offload.is_gso() {
            offload::MAX_OFFLOAD_FRAME
        } else {
            MAX_FRAME
        };
        if self.broken.is_some()
            || frame.is_empty()
            || frame.len() > limit
            || !(offload.is_none() || self.tx_offloads().take(offload, v6))
        {
            self.stats.tx_errors += 1;
            return Some(Sent::Dropped);
        }
        None
    }

    /// Whether the ring and the TX buffers have room for a frame of
    /// `lent` pages sent from its own buffer and `copied` bytes copied.
    fn has_room(&self, copied: usize, lent: usize, offload: Offload) -> bool {
        let copy_slots = copied.div_ceil(PAGE);
        let ring_slots = lent + copy_slots + usize::from(offload.is_gso());
        let in_ring = self.tx_prod.wrapping_sub(self.tx_cons) as usize;
        self.tx_free.len() >= copy_slots && in_ring + ring_slots <= RING_SIZE as usize
    }

    /// Writes the requests of a checked frame: one slot per page (the
    /// first request's size the whole frame's, the GSO extra-info segment
    /// behind it). With `lent` = (index, grants, pages) its first `pages`
    /// pages are named by those grants, the rest copied into TX buffers.
    fn send_parts(
        &mut self,
        frame: &[u8],
        offload: Offload,
        lent: Option<(usize, &[u32; LENT_PAGES], usize)>,
    ) -> Sent {
        let pages = lent.map_or(0, |(_, _, pages)| pages);
        let copied = frame.get(pages * PAGE..).unwrap_or(&[]);
        if !self.has_room(copied.len(), pages, offload) {
            return Sent::NoRoom;
        }
        let v6 = frame.get(12..14) == Some(&crate::wire::ETHERTYPE_IPV6.to_be_bytes()[..]);
        let csum = if offload.csum_partial {
            NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED
        } else {
            0
        };
        let slots = pages + copied.len().div_ceil(PAGE);
        let lent_ids = self.tx_busy.len();
        let mut chunks = copied.chunks(PAGE);
        for slot in 0..slots {
            let (gref, id, len) = match lent {
                Some((index, grefs, _)) if slot < pages => (
                    grefs.get(slot).copied().unwrap_or(0),
                    (lent_ids + index * LENT_PAGES + slot) as u16,
                    PAGE,
                ),
                _ => {
                    let (Some(chunk), Some(id)) = (chunks.next(), self.tx_free.pop()) else {
                        break; // counted in `has_room`: cannot happen
                    };
                    if let Some(buffer) = self.tx_bufs.get(id as usize) {
                        buffer.mem.write_bytes(0, chunk);
                    }
                    if let Some(busy) = self.tx_busy.get_mut(id as usize) {
                        *busy = true;
                    }
                    let gref = self.tx_bufs.get(id as usize).map_or(0, |b| b.gref);
                    (gref, id, chunk.len())
                }
            };
            let mut flags = if slot + 1 < slots {
                NETTXF_MORE_DATA
            } else {
                0
            };
            let size = if slot == 0 {
                flags |= csum;
                if offload.is_gso() {
                    flags |= NETTXF_EXTRA_INFO;
                }
                frame.len() as u16
            } else {
                len as u16
            };
            let at = RING_HEADER + (self.tx_prod % RING_SIZE) as usize * TX_ENTRY;
            self.tx.store_u32(at, gref);
            self.tx.store_u16(at + 4, 0);
            self.tx.store_u16(at + 6, flags);
            self.tx.store_u16(at + 8, id);
            self.tx.store_u16(at + 10, size);
            self.tx_prod = self.tx_prod.wrapping_add(1);
            if slot == 0 && offload.is_gso() {
                let kind = if v6 { GSO_TYPE_TCPV6 } else { GSO_TYPE_TCPV4 };
                let at = RING_HEADER + (self.tx_prod % RING_SIZE) as usize * TX_ENTRY;
                self.tx
                    .store_u16(at, u16::from_le_bytes([EXTRA_TYPE_GSO, 0]));
                self.tx.store_u16(at + 2, offload.gso_size);
                self.tx.store_u16(at + 4, u16::from(kind));
                self.tx.store_u16(at + 6, 0); // gso.features
                self.tx.store_u32(at + 8, 0);
                self.tx_prod = self.tx_prod.wrapping_add(1);
            }
        }
        // Published now or, batching, with the frames after it.
        if !self.batching {
            self.flush();
        }
        self.stats.tx_frames += 1;
        if offload.is_gso() {
            self.stats.tx_gso += 1;
        }
        Sent::Sent
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
        self.flush(); // the frame and its request before the index
        self.stats.tx_frames += 1;
        result
    }
}

impl<M, N> frames::PoolUser for Netfront<M, N> {
    fn pool(&mut self) -> &mut FramePool {
        &mut self.pool
    }
}

impl<M, N> Drop for Netfront<M, N> {
    /// A frame whose pages are still lent (the device was dropped without
    /// [`Netfront::take_lent`]) is freed only if every grant to it can be
    /// ended; otherwise its buffer is leaked, never reused.
    fn drop(&mut self) {
        let Some(lender) = self.lender.as_mut() else {
            return;
        };
        for mut lent in self.lent.iter_mut().filter_map(Option::take) {
            if !lent.revoke(lender.as_mut()) {
                core::mem::forget(lent.frame);
            }
        }
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
    use core::cell::{Cell, RefCell};
    use smoltcp::phy::{Device, RxToken, TxToken};

    #[derive(Clone, Default)]
    struct Counter(Rc<Cell<u32>>);
    impl Notify for Counter {
        fn notify(&self, _: u32) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// A packet the backend double took: first flags, GSO extra, bytes.
    type TxPacket = (u16, Option<(u16, u8)>, Vec<u8>);

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
        /// Pages granted through a [`TestLender`] sharing this state.
        lent: Rc<RefCell<LendState>>,
    }

    /// What a [`TestLender`] granted: page bytes by reference (as granted,
    /// read-only), the references the backend "maps" (revoking refused).
    #[derive(Debug, Default)]
    struct LendState {
        granted: BTreeMap<u32, Vec<u8>>,
        mapped: alloc::collections::BTreeSet<u32>,
        next: u32,
        /// Grants it makes at most at once.
        limit: usize,
        lendable: bool,
    }

    #[derive(Debug, Clone)]
    struct TestLender(Rc<RefCell<LendState>>);

    impl PageLender for TestLender {
        fn lendable(&self, _: &[u8]) -> bool {
            self.0.borrow().lendable
        }
        fn grant(&mut self, page: &[u8]) -> Option<u32> {
            let mut state = self.0.borrow_mut();
            assert_eq!(page.len(), PAGE);
            if state.granted.len() >= state.limit {
                return None;
            }
            let gref = 50_000 + state.next;
            state.next += 1;
            state.granted.insert(gref, page.to_vec());
            Some(gref)
        }
        fn revoke(&mut self, gref: u32) -> bool {
            let mut state = self.0.borrow_mut();
            if state.mapped.contains(&gref) {
                return false;
            }
            assert!(
                state.granted.remove(&gref).is_some(),
                "{gref} revoked twice"
            );
            true
        }
    }

    impl Backend {
        /// The page a grant reference names: one of the netfront's
        /// buffers, or a page it lent.
        fn page(&self, gref: u32) -> VecMemory {
            if let Some(page) = self.pages.get(&gref) {
                return page.clone();
            }
            let state = self.lent.borrow();
            let bytes = state.granted.get(&gref).expect("a granted page");
            let page = VecMemory::new(PAGE);
            page.write_bytes(0, bytes);
            page
        }

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
            // As Linux netback's final check: told of the next request.
            self.tx
                .store_u32(REQ_EVENT, self.tx_req_cons.wrapping_add(1));
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

        /// Writes an extra-info segment in the next posted buffer's place.
        fn deliver_extra(&mut self, kind: u8, flags: u8, gso_size: u16, gso_type: u8) {
            self.rx_req_cons += 1;
            let rsp = RING_HEADER + (self.rx_rsp_prod % RING_SIZE) as usize * RX_ENTRY;
            self.rx.store_u16(rsp, u16::from_le_bytes([kind, flags]));
            self.rx.store_u16(rsp + 2, gso_size);
            self.rx.store_u16(rsp + 4, u16::from(gso_type));
            self.rx.store_u16(rsp + 6, 0);
            self.rx_rsp_prod += 1;
        }

        /// Delivers `frame` as Linux netback does: one slot per page, the
        /// GSO segment after the first; `publish_at` stops publishing
        /// `rsp_prod` after that many slots (the rest written, unseen).
        fn deliver_packet(
            &mut self,
            frame: &[u8],
            gso: Option<(u16, u8)>,
            publish_at: Option<u32>,
        ) {
            let start = self.rx_rsp_prod;
            let chunks: Vec<&[u8]> = frame.chunks(PAGE).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                let mut flags = if i + 1 < chunks.len() {
                    NETRXF_MORE_DATA
                } else {
                    0
                };
                if i == 0 {
                    flags |= NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED;
                    if gso.is_some() {
                        flags |= NETRXF_EXTRA_INFO;
                    }
                }
                assert!(self.deliver_raw(None, 0, flags, chunk.len() as i16, chunk));
                if i == 0
                    && let Some((size, kind)) = gso
                {
                    self.deliver_extra(EXTRA_TYPE_GSO, 0, size, kind);
                }
            }
            let end = self.rx_rsp_prod;
            let seen = publish_at.map_or(end, |n| start + n);
            self.rx.store_u32(RSP_PROD, seen);
        }

        /// Answers every TX request and returns the packets as (flags of
        /// the first, GSO extra, bytes); checks the sizes as netback does.
        fn take_tx_packets(&mut self) -> Vec<TxPacket> {
            let prod = self.tx.load_u32(REQ_PROD);
            let mut packets = Vec::new();
            let slot = |tx: &VecMemory, i: u32| {
                let at = RING_HEADER + (i % RING_SIZE) as usize * TX_ENTRY;
                (
                    tx.load_u32(at),
                    tx.load_u16(at + 4),
                    tx.load_u16(at + 6),
                    tx.load_u16(at + 8),
                    tx.load_u16(at + 10),
                )
            };
            while self.tx_req_cons != prod {
                let (gref, offset, flags, id, size) = slot(&self.tx, self.tx_req_cons);
                let mut ids = vec![(id, 0i16)];
                self.tx_req_cons += 1;
                let mut gso = None;
                if flags & NETTXF_EXTRA_INFO != 0 {
                    let at = RING_HEADER + (self.tx_req_cons % RING_SIZE) as usize * TX_ENTRY;
                    let [kind, _] = self.tx.load_u16(at).to_le_bytes();
                    assert_eq!(kind, EXTRA_TYPE_GSO);
                    gso = Some((self.tx.load_u16(at + 2), self.tx.load_u16(at + 4) as u8));
                    ids.push((id, NETIF_RSP_NULL));
                    self.tx_req_cons += 1;
                }
                let mut rest = Vec::new();
                let mut more = flags & NETTXF_MORE_DATA != 0;
                while more {
                    let s = slot(&self.tx, self.tx_req_cons);
                    self.tx_req_cons += 1;
                    ids.push((s.3, 0));
                    more = s.2 & NETTXF_MORE_DATA != 0;
                    rest.push(s);
                }
                let others: usize = rest.iter().map(|s| s.4 as usize).sum();
                let own = size as usize - others;
                let mut bytes = vec![0u8; own];
                self.page(gref).read_bytes(offset as usize, &mut bytes);
                for (gref, offset, _, _, size) in rest {
                    assert!(offset as usize + size as usize <= PAGE);
                    let mut part = vec![0u8; size as usize];
                    self.page(gref).read_bytes(offset as usize, &mut part);
                    bytes.extend_from_slice(&part);
                }
                for (id, status) in ids {
                    let rsp = RING_HEADER + (self.tx_rsp_prod % RING_SIZE) as usize * TX_ENTRY;
                    self.tx.store_u16(rsp, id);
                    self.tx.store_u16(rsp + 2, status as u16);
                    self.tx_rsp_prod += 1;
                }
                packets.push((flags, gso, bytes));
            }
            self.tx.store_u32(RSP_PROD, self.tx_rsp_prod);
            packets
        }

        /// Answers the TX requests and checks they were one GSO packet
        /// (IPv4, gso_size 1448, checksum partial) holding `frame`.
        fn expect_one_gso_packet(&mut self, frame: &[u8]) {
            let packets = self.take_tx_packets();
            assert_eq!(packets.len(), 1);
            let (flags, gso, bytes) = &packets[0];
            assert_eq!(
                *flags,
                NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED | NETTXF_MORE_DATA | NETTXF_EXTRA_INFO
            );
            assert_eq!(*gso, Some((1448, GSO_TYPE_TCPV4)));
            assert_eq!(bytes, frame);
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
            lent: Rc::default(),
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
        // The double asks for every next TX request (its req_event), so
        // every frame out notifies; reposted RX buffers do not (its RX
        // req_event stays behind, it never ran short).
        assert!(counter.0.get() >= rounds);
        assert_eq!(u64::from(counter.0.get()), stats.notifications);
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
        // An id that is not the buffer posted there, bad length/offset.
        assert!(backend.deliver_raw(Some(999), 0, 0, 60, &[0; 60]));
        assert!(backend.deliver_raw(None, 4090, 0, 60, &[0; 6]));
        assert!(backend.deliver_raw(None, 0, 0, 5000, &[]));
        assert!(backend.deliver_raw(None, 0, 0, -1, &[]));
        front.poll();
        assert!(front.take_frame().is_none());
        let stats = front.stats();
        assert_eq!(stats.protocol_errors, 1);
        assert_eq!(stats.rx_errors, 4);
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

    /// A TCP/IPv4 frame of `payload` bytes with a partial checksum, as a
    /// GSO frame of 1448-byte segments (`offload::accept` checked).
    fn gso_frame(payload: usize) -> (Vec<u8>, Offload) {
        let mut f = vec![0u8; 54 + payload];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        f[20] = 0x40;
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[93, 184, 216, 34]);
        f[30..34].copy_from_slice(&[10, 137, 0, 10]);
        let sum = crate::wire::checksum::finish(crate::wire::checksum::add(0, &f[14..34]));
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        f[34..36].copy_from_slice(&443u16.to_be_bytes());
        f[36..38].copy_from_slice(&40000u16.to_be_bytes());
        f[46] = 0x50;
        f[47] = 0x18;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = (i * 7 + i / 300) as u8;
        }
        let offload = offload::accept_linux_tcp4_gso(&mut f);
        (f, offload)
    }

    #[test]
    fn a_gso_packet_from_a_linux_style_backend_arrives_whole() {
        let (mut front, mut backend, _) = setup();
        let (frame, offload) = gso_frame(65_495);
        assert!(frame.len() > 16 * PAGE); // 17 data slots
        backend.deliver_packet(&frame, Some((1448, GSO_TYPE_TCPV4)), None);
        front.poll();
        assert_eq!(front.take_frame_offloaded(), Some((frame.clone(), offload)));
        assert_eq!(front.stats().rx_gso, 1);
        // Published in two steps: nothing until the whole packet is there.
        backend.deliver_packet(&frame, Some((1448, GSO_TYPE_TCPV4)), Some(5));
        front.poll();
        assert!(front.take_frame_offloaded().is_none());
        backend.rx.store_u32(RSP_PROD, backend.rx_rsp_prod);
        front.poll();
        let (got, _) = front.take_frame_offloaded().unwrap();
        assert_eq!(got, frame);
        // Through the smoltcp device: cut into 46 complete segments.
        backend.deliver_packet(&frame, Some((1448, GSO_TYPE_TCPV4)), None);
        let mut segments = 0;
        while let Some((rx, _)) = front.receive(Instant::from_millis(0)) {
            rx.consume(|f| assert!(f.len() <= MAX_FRAME));
            segments += 1;
        }
        assert_eq!(segments, 46);
        // The buffers all came back: many more rounds go through.
        for _ in 0..40 {
            backend.deliver_packet(&frame, Some((1448, GSO_TYPE_TCPV4)), None);
            front.poll();
            assert!(front.take_frame_offloaded().is_some());
        }
        assert_eq!(front.stats().protocol_errors, 0);
        assert_eq!(front.stats().rx_errors, 0);
    }

    #[test]
    fn packets_past_the_queue_wait_on_the_ring_and_none_is_lost() {
        // A backend delivering 64 KiB GSO packets while the router reads
        // nothing: our queue fills to its bytes, the packets past it stay
        // on the ring with their buffers, and the backend runs out of
        // buffers. Nothing it delivered is dropped; reading frames takes
        // the rest.
        let (mut front, mut backend, _) = setup();
        let (frame, _) = gso_frame(44 * 1448);
        let slots = frame.len().div_ceil(PAGE) as u32 + 1;
        let mut delivered = 0;
        // Bounded: without backpressure the buffers would come back forever.
        for _ in 0..100 {
            let free = backend
                .rx
                .load_u32(REQ_PROD)
                .wrapping_sub(backend.rx_req_cons);
            if free < slots {
                break;
            }
            backend.deliver_packet(&frame, Some((1448, GSO_TYPE_TCPV4)), None);
            delivered += 1;
            front.poll();
        }
        let queued = front.received.len();
        assert!(
            delivered > queued,
            "the backend delivered past our queue ({delivered} > {queued})"
        );
        // Full: the next packet (a page per slot) would not fit.
        assert!(front.received_bytes <= RX_QUEUE_BYTES);
        assert!(front.received_bytes + slots as usize * PAGE > RX_QUEUE_BYTES);
        assert_eq!(front.stats().rx_errors, 0);
        let mut got = 0;
        while let Some((received, offload)) = front.take_frame_offloaded() {
            assert_eq!(received, frame);
            assert!(offload.is_gso());
            got += 1;
            front.poll();
        }
        assert_eq!(got, delivered);
        assert_eq!(front.stats().rx_errors, 0);
        assert_eq!(front.stats().rx_gso, delivered as u64);
        // Every buffer is posted again.
        assert_eq!(
            backend
                .rx
                .load_u32(REQ_PROD)
                .wrapping_sub(backend.rx_req_cons),
            RX_BUFFERS as u32
        );
    }

    #[test]
    fn a_hostile_backend_multi_slot_and_gso_responses_are_dropped_and_contained() {
        let (frame, _) = gso_frame(10 * 1448);
        // gso_size 0, and a GSO type that does not match: dropped, counted.
        for gso in [(0, GSO_TYPE_TCPV4), (1448, GSO_TYPE_TCPV6), (1448, 7)] {
            let (mut front, mut backend, _) = setup();
            backend.deliver_packet(&frame, Some(gso), None);
            front.poll();
            assert!(front.take_frame_offloaded().is_none(), "{gso:?}");
            assert_eq!(front.stats().bad_checksum_offload, 1);
        }
        // More than 64 KiB, or over a page in one slot, or more than
        // 18 data slots, or GSO segment missing for more than 1514 bytes.
        let (mut front, mut backend, _) = setup();
        let big = vec![0u8; 19 * PAGE];
        backend.deliver_packet(&big, Some((1448, GSO_TYPE_TCPV4)), None);
        backend.deliver_packet(&frame, None, None);
        front.poll();
        assert!(front.take_frame_offloaded().is_none());
        assert_eq!(front.stats().rx_errors, 2);
        // An unknown extra type, and two GSO segments.
        let (mut front, mut backend, _) = setup();
        assert!(backend.deliver_raw(
            None,
            0,
            NETRXF_EXTRA_INFO | NETRXF_MORE_DATA,
            4096,
            &frame[..4096]
        ));
        backend.deliver_extra(9, 0, 1448, GSO_TYPE_TCPV4);
        assert!(backend.deliver_raw(None, 0, 0, 100, &frame[4096..4196]));
        assert!(backend.deliver_raw(None, 0, NETRXF_EXTRA_INFO, 60, &frame[..60]));
        backend.deliver_extra(EXTRA_TYPE_GSO, EXTRA_FLAG_MORE, 1448, GSO_TYPE_TCPV4);
        backend.deliver_extra(EXTRA_TYPE_GSO, 0, 1448, GSO_TYPE_TCPV4);
        backend.rx.store_u32(RSP_PROD, backend.rx_rsp_prod);
        front.poll();
        assert!(front.take_frame_offloaded().is_none());
        assert_eq!(front.stats().rx_errors, 2);
        // An endless chain (extra info or more data) over every buffer we
        // posted: dropped once all are answered, the device goes on.
        for endless in [NETRXF_MORE_DATA, NETRXF_EXTRA_INFO] {
            let (mut front, mut backend, _) = setup();
            assert!(backend.deliver_raw(None, 0, endless, 60, &[0; 60]));
            for _ in 1..RX_BUFFERS {
                if endless == NETRXF_EXTRA_INFO {
                    backend.deliver_extra(EXTRA_TYPE_HASH, EXTRA_FLAG_MORE, 0, 0);
                    backend.rx.store_u32(RSP_PROD, backend.rx_rsp_prod);
                } else {
                    assert!(backend.deliver_raw(None, 0, endless, 60, &[0; 60]));
                }
                front.poll();
            }
            assert!(front.take_frame_offloaded().is_none());
            assert_eq!(front.stats().rx_errors, 1);
            assert!(front.broken().is_none());
            assert!(backend.deliver(&[7; 60]));
            front.poll();
            assert_eq!(front.take_frame().unwrap(), vec![7; 60]);
        }
    }

    /// A netfront with GSO features and a lender granting up to `limit`
    /// pages at once.
    fn lending_setup(
        limit: usize,
    ) -> (
        Netfront<VecMemory, Counter>,
        Backend,
        Rc<RefCell<LendState>>,
    ) {
        let (mut front, backend, _) = setup();
        front.set_backend_features(BackendFeatures {
            sg: true,
            gso4: true,
            gso6: true,
            csum6: true,
        });
        backend.lent.replace(LendState {
            limit,
            lendable: true,
            ..LendState::default()
        });
        front.set_lender(alloc::boxed::Box::new(TestLender(backend.lent.clone())));
        let state = backend.lent.clone();
        (front, backend, state)
    }

    #[test]
    fn big_frames_go_out_from_their_own_pages_and_return_to_the_pool_once_answered() {
        let (mut front, mut backend, state) = lending_setup(1024);
        let (frame, offload) = gso_frame(44 * 1448); // 15 whole pages + 3,826 bytes
        assert_eq!(frame.len() / PAGE, 15);
        for round in 0..3 {
            let mut owned = frame.clone();
            let at = owned.as_ptr();
            assert_eq!(front.send_owned(&mut owned, offload), Sent::Sent);
            // Taken: the backend reads it where it is.
            assert!(owned.is_empty() && owned.capacity() == 0);
            assert_eq!(front.lent_frames(), 1);
            assert_eq!(state.borrow().granted.len(), 15);
            for (gref, page) in &state.borrow().granted {
                assert!(frame.chunks(PAGE).any(|c| c == &page[..]), "{gref}");
            }
            // One TX buffer for the tail, 15 lent pages and the GSO slot.
            assert_eq!(front.tx_prod - front.tx_cons, 17);
            backend.expect_one_gso_packet(&frame);
            // Answered: every grant ended, the buffer back in the pool.
            front.poll();
            assert_eq!(front.lent_frames(), 0, "round {round}");
            assert!(state.borrow().granted.is_empty());
            assert_eq!(front.pool.len(), 1);
            let back = front.pool.take(10);
            assert_eq!(back.as_ptr(), at);
            assert_eq!(front.tx_free.len(), TX_BUFFERS);
        }
        let stats = front.stats();
        assert_eq!((stats.tx_lent, stats.tx_frames, stats.tx_gso), (3, 3, 3));
        assert_eq!((stats.protocol_errors, stats.tx_errors), (0, 0));
    }

    #[test]
    fn small_or_unlendable_frames_are_copied_and_left_with_the_caller() {
        let (mut front, mut backend, state) = lending_setup(1024);
        // Shorter than LEND_FROM.
        let (small, offload) = gso_frame(2 * 1448);
        let mut owned = small.clone();
        assert_eq!(front.send_owned(&mut owned, offload), Sent::Sent);
        assert_eq!(owned, small);
        // A buffer the lender cannot lend (not on a page).
        state.borrow_mut().lendable = false;
        let (big, offload) = gso_frame(20 * 1448);
        let mut owned = big.clone();
        assert_eq!(front.send_owned(&mut owned, offload), Sent::Sent);
        assert_eq!(owned, big);
        // Grants run out in the middle: those made are ended, it is copied.
        state.borrow_mut().lendable = true;
        state.borrow_mut().limit = 3;
        let mut owned = big.clone();
        assert_eq!(front.send_owned(&mut owned, offload), Sent::Sent);
        assert_eq!(owned, big);
        assert!(state.borrow().granted.is_empty());
        let packets = backend.take_tx_packets();
        let bytes: Vec<&Vec<u8>> = packets.iter().map(|p| &p.2).collect();
        assert_eq!(bytes, [&small, &big, &big]);
        assert_eq!(front.stats().tx_lent, 0);
        assert_eq!(front.lent_frames(), 0);
    }

    #[test]
    fn a_page_the_backend_still_maps_keeps_its_frame_until_it_lets_go() {
        let (mut front, mut backend, state) = lending_setup(1024);
        let (frame, offload) = gso_frame(30 * 1448);
        let mut owned = frame.clone();
        assert_eq!(front.send_owned(&mut owned, offload), Sent::Sent);
        let held = *state.borrow().granted.keys().nth(3).unwrap();
        state.borrow_mut().mapped.insert(held);
        backend.take_tx_packets();
        for _ in 0..3 {
            front.poll();
            assert_eq!(front.lent_frames(), 1);
            assert!(front.pool.is_empty());
            // Only the mapped page's grant is left.
            assert_eq!(
                state.borrow().granted.keys().copied().collect::<Vec<_>>(),
                [held]
            );
        }
        assert_eq!(front.stats().tx_still_mapped, 1);
        // Lets go: the next poll ends the grant and returns the buffer.
        state.borrow_mut().mapped.clear();
        front.poll();
        assert_eq!(front.lent_frames(), 0);
        assert_eq!(front.pool.len(), 1);
        assert!(state.borrow().granted.is_empty());
        assert_eq!(front.stats().tx_still_mapped, 1);
    }

    #[test]
    fn hostile_answers_for_lent_pages_never_free_a_frame_early() {
        let (mut front, mut backend, state) = lending_setup(1024);
        let (frame, offload) = gso_frame(30 * 1448); // 10 whole pages
        let mut owned = frame.clone();
        assert_eq!(front.send_owned(&mut owned, offload), Sent::Sent);
        backend.take_tx_packets();
        // Responses: page 0, the GSO slot (null), page 1, ...: page 1's is
        // rewritten to name page 0 again, the last to name no lent page.
        let rsp = |i: usize| RING_HEADER + i * TX_ENTRY;
        let first = backend.tx.load_u16(rsp(0));
        backend.tx.store_u16(rsp(2), first);
        backend
            .tx
            .store_u16(rsp(11), (TX_BUFFERS + LENT_FRAMES * LENT_PAGES + 3) as u16);
        front.poll();
        assert_eq!(front.stats().protocol_errors, 2);
        assert_eq!(front.lent_frames(), 1);
        assert!(front.pool.is_empty());
        assert_eq!(state.borrow().granted.len(), 10);
        // Released with the device: the frame and all its grants handed
        // over, for the caller to keep until each grant can be ended.
        let lent = front.take_lent();
        assert_eq!(lent.len(), 1);
        assert_eq!(lent[0].0, frame);
        assert_eq!(lent[0].1.len(), 10);
        assert_eq!(front.lent_frames(), 0);
        assert!(front.broken().is_none());
    }

    #[test]
    fn lending_is_bounded_and_frames_wait_in_copies_then_for_room() {
        let (mut front, _backend, state) = lending_setup(1024);
        let (frame, offload) = gso_frame(6 * 1448); // 2 whole pages + tail
        let mut lent = 0;
        let mut copied = 0;
        loop {
            let mut owned = frame.clone();
            match front.send_owned(&mut owned, offload) {
                Sent::Sent if owned.is_empty() => lent += 1,
                Sent::Sent => copied += 1,
                Sent::NoRoom => {
                    assert_eq!(owned, frame);
                    break;
                }
                Sent::Dropped => panic!("dropped"),
            }
        }
        assert_eq!(lent, LENT_FRAMES);
        assert_eq!(front.lent_frames(), LENT_FRAMES);
        assert_eq!(state.borrow().granted.len(), 2 * LENT_FRAMES);
        // The lent frames took one TX buffer each, the copies three.
        assert_eq!(copied, (TX_BUFFERS - LENT_FRAMES) / 3);
        // Dropped with frames lent: their grants are ended first.
        drop(front);
        assert!(state.borrow().granted.is_empty());
    }

    #[test]
    fn gso_frames_go_to_a_linux_style_backend_whole_when_it_offers_the_features() {
        let (mut front, mut backend, _) = setup();
        let (frame, offload) = gso_frame(44 * 1448);
        // No features from the backend: nothing offloaded is taken.
        assert_eq!(front.tx_offloads(), TxOffloads::default());
        assert_eq!(front.send_offloaded(&frame, offload), Sent::Dropped);
        front.set_backend_features(BackendFeatures {
            sg: true,
            gso4: true,
            gso6: false,
            csum6: true,
        });
        assert_eq!(
            front.tx_offloads(),
            TxOffloads {
                csum: true,
                tso4: true,
                tso6: false
            }
        );
        for _ in 0..20 {
            assert_eq!(front.send_offloaded(&frame, offload), Sent::Sent);
            backend.expect_one_gso_packet(&frame);
            front.poll();
        }
        assert_eq!(front.stats().tx_gso, 20);
        assert_eq!(front.stats().protocol_errors, 0);
        // Buffers run out: NoRoom until the backend answers.
        let mut sent = 0;
        while front.send_offloaded(&frame, offload) == Sent::Sent {
            sent += 1;
        }
        assert_eq!(sent, TX_BUFFERS / 16);
        assert_eq!(front.send_offloaded(&frame, offload), Sent::NoRoom);
        assert_eq!(backend.take_tx_packets().len(), sent);
        front.poll();
        assert_eq!(front.send_offloaded(&frame, offload), Sent::Sent);
        // A partial checksum alone, one slot.
        let mut small = frame[..54 + 100].to_vec();
        small[16..18].copy_from_slice(&140u16.to_be_bytes());
        let partial = Offload {
            csum_partial: true,
            gso_size: 0,
        };
        backend.take_tx_packets();
        assert_eq!(front.send_offloaded(&small, partial), Sent::Sent);
        let packets = backend.take_tx_packets();
        assert_eq!(packets[0].0, NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED);
        assert_eq!(packets[0].2, small);
    }

    #[test]
    fn a_push_notifies_only_when_it_passes_the_event_index() {
        // Asked: the event index lies in (old, new].
        assert!(push_notifies(0, 1, 1));
        assert!(push_notifies(3, 8, 5));
        assert!(push_notifies(3, 8, 8));
        // Not asked: at or before old, or past new.
        assert!(!push_notifies(3, 8, 3));
        assert!(!push_notifies(3, 8, 9));
        assert!(!push_notifies(3, 3, 3)); // nothing pushed
        // Across the wrap of the 32-bit indices.
        assert!(push_notifies(u32::MAX - 1, 2, u32::MAX));
        assert!(push_notifies(u32::MAX - 1, 2, 0));
        assert!(!push_notifies(u32::MAX - 1, 2, 3));
        // Hostile event indices: a plain answer, never a panic.
        for event in [0, 1, u32::MAX, 0x8000_0000, 0x7fff_ffff] {
            for (old, new) in [(0u32, 0u32), (0, 256), (u32::MAX, 0), (5, 4)] {
                let _ = push_notifies(old, new, event);
            }
        }
        // The final check: a producer index that moved means look again,
        // and the event index asked for is the next one.
        let ring = VecMemory::new(4096);
        ring.store_u32(RSP_PROD, 9);
        assert!(final_check(&ring, RSP_PROD, RSP_EVENT, 8));
        assert_eq!(ring.load_u32(RSP_EVENT), 9);
        assert!(!final_check(&ring, RSP_PROD, RSP_EVENT, 9));
        assert_eq!(ring.load_u32(RSP_EVENT), 10);
        // A producer publishing after it sees that event index notifies.
        assert!(push_notifies(9, 10, 10));
    }

    #[test]
    fn the_backend_is_notified_only_where_its_event_index_asks() {
        let (mut front, mut backend, counter) = setup();
        // A backend that does not ask (req_event behind): frames go out,
        // no notification after the first (req_event 1 from SHARED_RING_INIT).
        for _ in 0..5 {
            let token = front.transmit(Instant::from_millis(0)).unwrap();
            token.consume(60, |buf| buf.fill(1));
        }
        assert_eq!(counter.0.get(), 1);
        backend.take_tx(); // asks for the next (req_event = cons + 1)
        let token = front.transmit(Instant::from_millis(0)).unwrap();
        token.consume(60, |buf| buf.fill(2));
        assert_eq!(counter.0.get(), 2);
        // Hostile event indices: served, counted, no panic.
        for event in [0, u32::MAX, 0x8000_0000, 7] {
            backend.take_tx();
            backend.tx.store_u32(REQ_EVENT, event);
            backend.rx.store_u32(REQ_EVENT, event);
            let token = front.transmit(Instant::from_millis(0)).unwrap();
            token.consume(60, |buf| buf.fill(3));
            assert!(backend.deliver(&[4; 60]));
            let (rx, _) = front.receive(Instant::from_millis(0)).unwrap();
            rx.consume(|frame| assert_eq!(frame, &[4; 60][..]));
        }
        assert_eq!(front.broken(), None);
        assert_eq!(u64::from(counter.0.get()), front.stats().notifications);
        // The RX ring: a backend that ran short of buffers asks for the
        // next post; the repost after the next frame notifies it.
        let before = counter.0.get();
        backend
            .rx
            .store_u32(REQ_EVENT, backend.rx.load_u32(REQ_PROD).wrapping_add(1));
        assert!(backend.deliver(&[5; 60]));
        let (rx, _) = front.receive(Instant::from_millis(0)).unwrap();
        rx.consume(|_| ());
        assert_eq!(counter.0.get(), before + 1);
    }
}
