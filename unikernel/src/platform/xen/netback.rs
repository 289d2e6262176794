//! netback: our end of a client qube's virtual NIC, where the firewall is
//! the backend (`backend/vif/<domid>/<device>`): the client's netfront
//! grants two rings; we consume its TX requests (frames it sends) and fill
//! the RX buffers it posts (frames we send), moving bytes with grant copy.
//!
//! Facts (Xen `public/io/netif.h`, `public/io/ring.h`, Linux
//! `xen-netback`): ring layout as in `netfront` (64-byte header, TX entries
//! of 12 bytes, RX entries of 8, 256 each); we are the consumer of
//! requests and producer of responses; we offer `feature-rx-copy`,
//! `feature-sg`, `feature-gso-tcpv4` and `feature-gso-tcpv6` (written by
//! `xenbus::offer`). A TX packet is one or more slots: the first request
//! (its `size` the whole packet's), `NETTXF_extra_info` segments right
//! behind it (`XEN_NETIF_EXTRA_TYPE_GSO`: `gso.size`, `gso.type`; chained
//! by `XEN_NETIF_EXTRA_FLAG_MORE`), and data slots while
//! `NETTXF_more_data` is set; every slot is answered (extra-info segments
//! with `NETIF_RSP_NULL`). The packet goes to the router whole, with its
//! offload metadata checked by [`crate::offload::accept`] (checksum
//! partial for `NETTXF_csum_blank`, `feature-no-csum-offload` 0 and
//! `feature-ipv6-csum-offload` 1 as Linux netback; GSO TCPv4/TCPv6):
//! nothing is cut or completed here. Bounds as Linux netback's: at most
//! [`MAX_SLOTS`] data slots (more: errors), [`FATAL_SLOTS`] or a packet or
//! extra-info chain running past `req_prod`, or more than [`MAX_EXTRAS`]
//! extra segments, stop the vif (`xenvif_fatal_tx_err`); the whole packet
//! is at least 14 bytes and at most [`MAX_FRAME`] (GSO: 64 KiB), every
//! slot's offset and size inside one page, the first size no smaller than
//! the others' sum; an unknown extra type or a second GSO segment is an
//! error; `gso_size` 0, a GSO type that does not match the frame and a
//! blank checksum that is not TCP/UDP are served and dropped (counted).
//! `NETTXF_data_validated` changes nothing (the router verifies no TCP/UDP
//! checksum). Towards the client (RX), as Linux netback: a frame takes
//! one posted buffer per 4 KiB (offset 0, `NETRXF_more_data` on all but
//! the last), a GSO frame's first response carries `NETRXF_extra_info`
//! and the next slot is the `XEN_NETIF_EXTRA_TYPE_GSO` segment (its
//! request's place, `gso.size`, `gso.type`); a partial checksum is flagged
//! `NETRXF_csum_blank | NETRXF_data_validated`, a complete frame carries
//! no flag (we did not verify it). What we send whole follows the
//! frontend's keys ([`FrontendFeatures`]: GSO needs `feature-sg`,
//! `feature-gso-tcpv4/6` and partial checksums for both IP versions);
//! anything else the router cuts and completes in software first. A frame
//! waits in the router's queue until the client has posted enough buffers
//! for all its slots ([`Sent::NoRoom`], `req_event` set to wake us).
//! From the client, a packet our queue ([`RX_QUEUE`] frames,
//! [`RX_QUEUE_BYTES`]) has no room for stays on its TX ring, unanswered,
//! until the firewall read frames, as Linux netback takes requests only
//! while it has room: the client's ring fills and its own queue holds the
//! rest (backpressure; nothing it handed over is dropped here).
//! Copies are batched: the TX packets of one poll round in one grant copy;
//! a TX packet of headers and whole pages (what Linux netfront sends for a
//! large TCP segment) goes to the offset of its buffer where those pages
//! land on ours, one op each instead of two, and is moved to the front
//! after the copy ([`REALIGN_BYTES_PER_OP`]);
//! towards the client, while the platform batches (`batching`), the frames
//! handed over with [`Netback::send_owned`] are held, their responses
//! written but not published, and [`Netback::flush`] copies them in one
//! batch ([`MAX_SCATTER_PACKETS`] frames of [`MAX_SCATTER_SEGMENTS`]
//! pages at most; a frame past that starts the next) before it publishes
//! the responses, so the client never sees a slot before its bytes; a
//! copy Xen refuses turns that frame's first response into an error.
//! Notifications as Linux's ring macros: TX responses are published once
//! per poll, RX responses once per frame or, batching, once per flush,
//! and the client is notified only
//! when the new `rsp_prod` passed its `rsp_event`
//! (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`); having taken every request, a
//! poll sets `req_event` to the next one and reads `req_prod` again
//! (`RING_FINAL_CHECK_FOR_REQUESTS`), so a request published meanwhile is
//! taken then (at most [`POLL_ROUNDS`] rounds a poll; the rest the next
//! poll takes) and no wake-up is lost. The frontend is hostile: its
//! `req_prod` is read at the start of each round and may not exceed one
//! ring of unanswered requests; its event indices only decide whether it
//! is notified (wrapping arithmetic);
//! offsets and sizes must stay inside one page; ids are echoed, never used
//! as indices; grant copies Xen refuses become errors, never a panic. The
//! ring logic is portable over [`SharedMemory`] and a [`GrantCopy`] seam
//! and is tested on the host against a netfront double.

#![deny(clippy::indexing_slicing)]

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::events::Notify;
use super::frames::{self, FramePool};
use super::grant;
pub use super::grant::{MAX_COPY_SEGMENTS, Segment};
use super::netfront::{
    MAX_FRAME, NETIF_RSP_NULL, NETRXF_CSUM_BLANK, NETRXF_DATA_VALIDATED, NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA, POLL_ROUNDS, RING_HEADER, RING_SIZE, RX_ENTRY, TX_ENTRY, final_check,
    push_and_check_notify,
};
use super::shared::{SharedMemory, barrier};
use crate::offload::{self, GsoKind, NicOffload, Offload, TxOffloads};

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;
/// `NETTXF_csum_blank`: the TCP/UDP checksum holds only the pseudo-header sum.
pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
/// `NETTXF_data_validated`: the sender checked the checksum.
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
/// `NETTXF_more_data`.
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
/// `NETTXF_extra_info`.
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;
/// `NETIF_RSP_OKAY`.
const RSP_OKAY: i16 = 0;
/// `NETIF_RSP_ERROR`.
const RSP_ERROR: i16 = -1;
/// Frames held for the firewall before it reads them.
pub const RX_QUEUE: usize = 64;
/// Bytes held for the firewall before it reads them (a GSO packet is up
/// to 64 KiB).
pub const RX_QUEUE_BYTES: usize = 256 * 1024;
/// Data slots one packet may take: Linux netback's
/// `XEN_NETBK_LEGACY_SLOTS_MAX` (`MAX_SKB_FRAGS` + 1); a packet of more is
/// refused with errors.
pub const MAX_SLOTS: usize = 18;
/// Data slots past which a packet stops the vif, as Linux netback's
/// `fatal_skb_slots` default.
pub const FATAL_SLOTS: usize = 20;
/// Extra-info segments one packet may carry (one of each type there is).
pub const MAX_EXTRAS: usize = 4;
/// `XEN_NETIF_EXTRA_TYPE_GSO`.
pub const EXTRA_TYPE_GSO: u8 = 1;
/// `XEN_NETIF_EXTRA_TYPE_MCAST_ADD`.
pub const EXTRA_TYPE_MCAST_ADD: u8 = 2;
/// `XEN_NETIF_EXTRA_TYPE_MCAST_DEL`.
pub const EXTRA_TYPE_MCAST_DEL: u8 = 3;
/// `XEN_NETIF_EXTRA_TYPE_HASH`.
pub const EXTRA_TYPE_HASH: u8 = 4;
/// `XEN_NETIF_EXTRA_FLAG_MORE`: another extra-info segment follows.
pub const EXTRA_FLAG_MORE: u8 = 1;
/// `XEN_NETIF_GSO_TYPE_TCPV4`.
pub const GSO_TYPE_TCPV4: u8 = 1;
/// `XEN_NETIF_GSO_TYPE_TCPV6`.
pub const GSO_TYPE_TCPV6: u8 = 2;
const PAGE: usize = 4096;

/// A grant copy Xen (or the range check before it) refused: the peer named
/// a grant it did not give us, or a range outside its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRefused;

/// Copies bytes between our memory and a peer's granted pages.
///
/// The batched forms move a whole packet at once (on Xen: every op in one
/// `GNTTABOP_copy` hypercall, straight between the peer's pages and our
/// buffer); their defaults go segment by segment through the single
/// forms, so a double needs only those.
pub trait GrantCopy {
    /// Copies `dst.len()` bytes from `(dom, gref)` at `offset`.
    fn copy_from(
        &mut self,
        dom: u16,
        gref: u32,
        offset: u16,
        dst: &mut [u8],
    ) -> Result<(), CopyRefused>;
    /// Copies `src` into `(dom, gref)` at `offset`.
    fn copy_to(&mut self, dom: u16, gref: u32, offset: u16, src: &[u8]) -> Result<(), CopyRefused>;
    /// Copies `segments` of `dom`'s pages, in order, into consecutive
    /// bytes of `dst` (their lengths add up to `dst.len()`; at most
    /// [`MAX_COPY_SEGMENTS`]). `Err` when any segment is refused (what
    /// `dst` then holds is unspecified).
    fn gather(
        &mut self,
        dom: u16,
        segments: &[Segment],
        dst: &mut [u8],
    ) -> Result<(), CopyRefused> {
        check_batch(segments, dst.len())?;
        let mut at = 0usize;
        for segment in segments {
            let len = usize::from(segment.len);
            let part = dst.get_mut(at..at + len).ok_or(CopyRefused)?;
            self.copy_from(dom, segment.gref, segment.offset, part)?;
            at += len;
        }
        Ok(())
    }
    /// Runs several gathers (packets of one poll round) as one batch (on
    /// Xen: one hypercall), at most [`MAX_BATCH_PACKETS`] of at most
    /// [`MAX_BATCH_SEGMENTS`] segments in all; sets each job's `done`.
    fn gather_many(&mut self, dom: u16, jobs: &mut [Gather<'_>]) {
        for job in jobs {
            job.done = self.gather(dom, job.segments, job.dst).is_ok();
        }
    }
    /// Copies consecutive bytes of `src` into `segments` of `dom`'s pages
    /// (bounds as [`Self::gather`]). `Err` when any segment is refused;
    /// the others may have been written.
    fn scatter(&mut self, dom: u16, segments: &[Segment], src: &[u8]) -> Result<(), CopyRefused> {
        check_batch(segments, src.len())?;
        let mut at = 0usize;
        let mut result = Ok(());
        for segment in segments {
            let len = usize::from(segment.len);
            let part = src.get(at..at + len).ok_or(CopyRefused)?;
            if self
                .copy_to(dom, segment.gref, segment.offset, part)
                .is_err()
            {
                result = Err(CopyRefused);
            }
            at += len;
        }
        result
    }
    /// Runs several scatters (frames handed over between two flushes) as
    /// one batch (on Xen: one hypercall), at most [`MAX_SCATTER_PACKETS`]
    /// of at most [`MAX_SCATTER_SEGMENTS`] segments in all; sets each
    /// job's `done`.
    fn scatter_many(&mut self, dom: u16, jobs: &mut [Scatter<'_>]) {
        for job in jobs {
            job.done = self.scatter(dom, job.segments, job.src).is_ok();
        }
    }
}

/// One frame of a [`GrantCopy::scatter_many`] batch.
#[derive(Debug)]
pub struct Scatter<'a> {
    /// Its segments, in order (bounds as [`GrantCopy::gather`]).
    pub segments: &'a [Segment],
    /// What goes there: their lengths add up to its length.
    pub src: &'a [u8],
    /// Set by the copy: whether every segment was written.
    pub done: bool,
}

/// Most frames one scatter batch holds.
pub const MAX_SCATTER_PACKETS: usize = 16;
/// Most segments (client pages) one scatter batch holds: seven 64 KiB
/// GSO frames; a frame that would pass this starts the next batch.
pub const MAX_SCATTER_SEGMENTS: usize = 128;

/// One packet of a [`GrantCopy::gather_many`] batch.
#[derive(Debug)]
pub struct Gather<'a> {
    /// Its segments, in order (bounds as [`GrantCopy::gather`]).
    pub segments: &'a [Segment],
    /// Where they go: their lengths add up to its length.
    pub dst: &'a mut [u8],
    /// Set by the copy: whether every segment arrived.
    pub done: bool,
}

/// Most packets one poll round copies in one batch.
pub const MAX_BATCH_PACKETS: usize = 16;
/// Most segments one such batch holds (a packet has at most
/// [`MAX_COPY_SEGMENTS`]; a packet that would pass this starts the next
/// batch).
pub const MAX_BATCH_SEGMENTS: usize = 64;

/// The bounds every batched copy keeps: at most [`MAX_COPY_SEGMENTS`]
/// segments, each inside its page, their lengths adding up to `len`.
pub fn check_batch(segments: &[Segment], len: usize) -> Result<(), CopyRefused> {
    let inside = segments
        .iter()
        .all(|s| usize::from(s.offset) + usize::from(s.len) <= PAGE);
    let sum: usize = segments.iter().map(|s| usize::from(s.len)).sum();
    if segments.len() <= MAX_COPY_SEGMENTS && inside && sum == len {
        Ok(())
    } else {
        Err(CopyRefused)
    }
}

/// Counters of one netback.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetbackStats {
    /// Frames the client sent us.
    pub from_client: u64,
    /// Frames we delivered to the client.
    pub to_client: u64,
    /// Client requests refused (bad size, fragments, failed copy).
    pub bad_requests: u64,
    /// Frames for the client dropped: no RX buffer posted ([`Netback::send`]),
    /// the vif stopped, too long, or offloads it did not negotiate. (What
    /// the client sends is never dropped for lack of room: it waits on
    /// its ring.)
    pub dropped: u64,
    /// Frames flagged `NETTXF_csum_blank` whose checksum could not be
    /// completed (not TCP/UDP over IP, a fragment, too short), or whose
    /// GSO extra info did not match the frame (`gso_size` 0, not TCP, a
    /// type we did not offer): dropped.
    pub bad_checksum_offload: u64,
    /// GSO packets the client sent (each counted in `from_client` too).
    pub gso_from_client: u64,
    /// GSO packets we delivered to the client whole (each counted in
    /// `to_client` too).
    pub gso_to_client: u64,
    /// Event channel notifications we sent the client (only when its
    /// event index asked for one).
    pub notifications: u64,
    /// Grant-copy batches (one `GNTTABOP_copy` hypercall each on Xen):
    /// one per poll round from the client, one per frame or held batch
    /// to it.
    pub copy_batches: u64,
    /// Packets from the client copied at an offset where their whole pages
    /// land on ours, then moved to the front ([`REALIGN_BYTES_PER_OP`]).
    pub realigned: u64,
}

/// What a client's frontend wrote it takes on RX (its xenstore keys).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrontendFeatures {
    /// `feature-sg` 1: packets of several slots.
    pub sg: bool,
    /// `feature-gso-tcpv4` 1.
    pub gso4: bool,
    /// `feature-gso-tcpv6` 1.
    pub gso6: bool,
    /// `feature-no-csum-offload` absent or 0: IPv4 partial checksums.
    pub csum: bool,
    /// `feature-ipv6-csum-offload` 1: IPv6 partial checksums.
    pub csum6: bool,
}

/// What [`Netback::send_offloaded`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Delivered (or answered with an error the client sees).
    Sent,
    /// Not taken: the client has not posted enough RX buffers yet.
    NoRoom,
    /// Dropped and counted (device stopped, too long, not negotiated).
    Dropped,
}

/// One TX request slot (`struct netif_tx_request`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TxRequest {
    gref: u32,
    offset: u16,
    flags: u16,
    id: u16,
    size: u16,
}

/// A packet taken off the TX ring, waiting for its round's grant copy
/// (its slots are answered once that is done, in ring order).
#[derive(Debug, Clone)]
struct Pending {
    first: TxRequest,
    extras: usize,
    rest: [TxRequest; FATAL_SLOTS],
    count: usize,
    gso: Option<(u16, u8)>,
    segments: [Segment; MAX_COPY_SEGMENTS],
    segment_count: usize,
    /// Where the frame begins in its buffer ([`Fate::Copy`]): 0, or where
    /// its copy takes fewer ops ([`grant::best_copy_start`]); the frame
    /// is moved to the buffer's front after the copy.
    start: usize,
    /// What happens to it.
    fate: Fate,
}

/// Bytes of moving a frame within its buffer that one grant-copy op
/// saved is worth: a packet is copied at the offset where its whole pages
/// land on ours ([`grant::best_copy_start`]) and moved to the front when
/// that saves an op per this many bytes. Xen handles each op of a batch
/// on its own (reads it from our memory, takes both pages, writes its
/// status back): in the Xen-under-QEMU lab an op cost about 12 µs on top
/// of its bytes, and moving 64 KiB with our `memcpy` 9 µs; on
/// hardware the two are of the same order (a fraction of a µs).
pub const REALIGN_BYTES_PER_OP: usize = 8192;

/// What becomes of a [`Pending`] packet.
#[derive(Debug, Clone)]
enum Fate {
    /// Its slots are copied into the frame.
    Copy(Vec<u8>),
    /// Refused before any copy (bad sizes, offsets, extra info): errors.
    Refused,
}

/// A frame's place in the client's RX ring ([`Netback::place`]): the
/// pages its bytes go to and its first response.
#[derive(Debug, Clone, Copy)]
struct Placed {
    segments: [Segment; MAX_COPY_SEGMENTS],
    count: usize,
    /// Ring index of its first response (where an error status goes).
    first: u32,
    gso: bool,
}

impl Placed {
    fn segments(&self) -> &[Segment] {
        self.segments.get(..self.count).unwrap_or(&[])
    }
}

/// The backend rings of one client vif.
#[derive(Debug)]
pub struct Netback<M, C, N> {
    tx: M,
    rx: M,
    dom: u16,
    port: u32,
    copier: C,
    notify: N,
    tx_req_cons: u32,
    tx_rsp_prod: u32,
    rx_req_cons: u32,
    rx_rsp_prod: u32,
    /// RX responses published to the client up to here (`rsp_prod`).
    rx_published: u32,
    /// Whether RX responses wait for [`Self::flush`] (set by the
    /// platform, which flushes after each batch of frames the router
    /// hands over); otherwise each frame is published at once.
    pub batching: bool,
    received: VecDeque<(Vec<u8>, Offload)>,
    received_bytes: usize,
    /// Frames cut in software for [`Self::take_frame`].
    finished: VecDeque<Vec<u8>>,
    stats: NetbackStats,
    broken: Option<&'static str>,
    frontend: FrontendFeatures,
    /// Packets of this poll round waiting for their batch's copy (at most
    /// [`MAX_BATCH_PACKETS`]; the frames' bytes count against the queue's
    /// room, so they never hold more than it takes).
    pending: Vec<Pending>,
    pending_bytes: usize,
    /// Frames taken by [`Self::send_owned`], their responses written,
    /// waiting for one batched copy (at most [`MAX_SCATTER_PACKETS`] of
    /// [`MAX_SCATTER_SEGMENTS`] pages in all, `held_segments`).
    held: Vec<(Vec<u8>, Placed)>,
    held_segments: usize,
    /// Buffers for the frames copied in (`super::frames`), and where the
    /// held frames' buffers go once copied: the platform's pool, lent
    /// while it polls or flushes this vif; empty otherwise.
    pub pool: FramePool,
}

impl<M, C, N> frames::PoolUser for Netback<M, C, N> {
    fn pool(&mut self) -> &mut FramePool {
        &mut self.pool
    }
}

impl<M: SharedMemory, C: GrantCopy, N: Notify> Netback<M, C, N> {
    /// Attaches to the client's mapped rings (their indices start where the
    /// frontend initialised them).
    pub fn new(tx: M, rx: M, dom: u16, port: u32, copier: C, notify: N) -> Self {
        let tx_start = tx.load_u32(RSP_PROD);
        let rx_start = rx.load_u32(RSP_PROD);
        Netback {
            tx,
            rx,
            dom,
            port,
            copier,
            notify,
            tx_req_cons: tx_start,
            tx_rsp_prod: tx_start,
            rx_req_cons: rx_start,
            rx_rsp_prod: rx_start,
            rx_published: rx_start,
            batching: false,
            received: VecDeque::new(),
            received_bytes: 0,
            finished: VecDeque::new(),
            stats: NetbackStats::default(),
            broken: None,
            frontend: FrontendFeatures::default(),
            pending: Vec::new(),
            pending_bytes: 0,
            held: Vec::new(),
            held_segments: 0,
            pool: FramePool::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> NetbackStats {
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

    fn respond_tx(&mut self, id: u16, status: i16) {
        let at = RING_HEADER + (self.tx_rsp_prod % RING_SIZE) as usize * TX_ENTRY;
        self.tx.store_u16(at, id);
        self.tx.store_u16(at + 2, status as u16);
        self.tx_rsp_prod = self.tx_rsp_prod.wrapping_add(1);
    }

    /// One TX ring slot as a request.
    fn tx_slot(&self, index: u32) -> TxRequest {
        let at = RING_HEADER + (index % RING_SIZE) as usize * TX_ENTRY;
        TxRequest {
            gref: self.tx.load_u32(at),
            offset: self.tx.load_u16(at + 4),
            flags: self.tx.load_u16(at + 6),
            id: self.tx.load_u16(at + 8),
            size: self.tx.load_u16(at + 10),
        }
    }

    /// One TX ring slot as an extra-info segment: its type, flags and, for
    /// GSO, (`gso.size`, `gso.type`).
    fn extra_slot(&self, index: u32) -> (u8, u8, u16, u8) {
        let at = RING_HEADER + (index % RING_SIZE) as usize * TX_ENTRY;
        let first = self.tx.load_u16(at).to_le_bytes();
        let size = self.tx.load_u16(at + 2);
        let kind = self.tx.load_u16(at + 4).to_le_bytes();
        (first[0], first[1], size, kind[0])
    }

    /// Takes the client's TX requests (its outgoing packets, each one or
    /// more slots) into the queue.
    pub fn poll(&mut self) {
        if self.broken.is_some() {
            return;
        }
        let old = self.tx_rsp_prod;
        for _ in 0..POLL_ROUNDS {
            if !self.poll_round() {
                break;
            }
        }
        // Responses published once per poll; the client is told only if
        // its `rsp_event` asks.
        if self.tx_rsp_prod != old
            && push_and_check_notify(&self.tx, RSP_PROD, RSP_EVENT, old, self.tx_rsp_prod)
        {
            self.notify.notify(self.port);
            self.stats.notifications += 1;
        }
    }

    /// One pass over the client's TX requests; whether it produced more
    /// meanwhile (after we asked to be notified of the next one).
    fn poll_round(&mut self) -> bool {
        let prod = self.tx.load_u32(REQ_PROD);
        barrier();
        // At most one ring of requests may be unanswered.
        if prod.wrapping_sub(self.tx_rsp_prod) > RING_SIZE {
            self.broken = Some("client TX req_prod more than a ring ahead");
            return false;
        }
        while self.tx_req_cons != prod {
            // Backpressure, as Linux netback (which takes requests only
            // while its queue has room): a packet our queue has no room
            // for stays on the ring, unanswered, until the router took
            // frames (each take polls again). The client's ring fills and
            // its own queue holds or drops the excess; a packet it already
            // handed over is never lost here. The first request's size is
            // the whole packet's (`netif.h`); it is read once, and the
            // packet is planned with this very size.
            let first = self.tx_slot(self.tx_req_cons);
            if !self.has_room(usize::from(first.size)) {
                self.flush_pending();
                return false;
            }
            match self.take_packet(prod, first) {
                Ok(packet) => {
                    let segments: usize = self.pending.iter().map(|p| p.segment_count).sum();
                    if self.pending.len() == MAX_BATCH_PACKETS
                        || segments + packet.segment_count > MAX_BATCH_SEGMENTS
                    {
                        self.flush_pending();
                    }
                    if let Fate::Copy(frame) = &packet.fate {
                        self.pending_bytes += frame.len();
                    }
                    self.pending.push(packet);
                }
                Err(reason) => {
                    // As Linux's `xenvif_fatal_tx_err`: the frontend broke
                    // the protocol; the vif stops (the packets before are
                    // served first).
                    self.flush_pending();
                    self.broken = Some(reason);
                    return false;
                }
            }
        }
        self.flush_pending();
        final_check(&self.tx, REQ_PROD, REQ_EVENT, prod)
    }

    /// Whether our queue (frames received and pending copy) takes one more
    /// frame of `bytes`.
    fn has_room(&self, bytes: usize) -> bool {
        self.received.len() + self.pending.len() < RX_QUEUE
            && self.received_bytes + self.pending_bytes + bytes <= RX_QUEUE_BYTES
    }

    /// Consumes one packet's slots (`first`, the request at `tx_req_cons`
    /// as the caller read it, then extra-info segments and further data
    /// slots) and plans its copy. `Err` for a protocol
    /// violation that stops the vif: a packet running past `req_prod`,
    /// more than [`FATAL_SLOTS`] data slots or [`MAX_EXTRAS`] extra-info
    /// segments.
    fn take_packet(&mut self, prod: u32, first: TxRequest) -> Result<Pending, &'static str> {
        self.tx_req_cons = self.tx_req_cons.wrapping_add(1);
        let mut bad = false;
        let mut gso: Option<(u16, u8)> = None;
        let mut extras = 0usize;
        if first.flags & NETTXF_EXTRA_INFO != 0 {
            loop {
                if self.tx_req_cons == prod {
                    return Err("client TX extra info runs past req_prod");
                }
                if extras == MAX_EXTRAS {
                    return Err("client TX extra-info chain too long");
                }
                let (kind, flags, size, gso_type) = self.extra_slot(self.tx_req_cons);
                self.tx_req_cons = self.tx_req_cons.wrapping_add(1);
                extras += 1;
                match kind {
                    EXTRA_TYPE_GSO if gso.is_none() => gso = Some((size, gso_type)),
                    // Multicast filter and hash: nothing for us to do.
                    EXTRA_TYPE_MCAST_ADD | EXTRA_TYPE_MCAST_DEL | EXTRA_TYPE_HASH => {}
                    // None, unknown, or a second GSO segment.
                    _ => bad = true,
                }
                if flags & EXTRA_FLAG_MORE == 0 {
                    break;
                }
            }
        }
        let mut packet = Pending {
            first,
            extras,
            rest: [TxRequest::default(); FATAL_SLOTS],
            count: 0,
            gso,
            segments: [Segment::default(); MAX_COPY_SEGMENTS],
            segment_count: 0,
            start: 0,
            fate: Fate::Refused,
        };
        let mut more = first.flags & NETTXF_MORE_DATA != 0;
        while more {
            if self.tx_req_cons == prod {
                return Err("client TX packet runs past req_prod");
            }
            let slot = self.tx_slot(self.tx_req_cons);
            let Some(place) = packet.rest.get_mut(packet.count) else {
                return Err("client TX packet of too many slots");
            };
            *place = slot;
            packet.count += 1;
            self.tx_req_cons = self.tx_req_cons.wrapping_add(1);
            more = slot.flags & NETTXF_MORE_DATA != 0;
        }
        if !bad && packet.count < MAX_SLOTS {
            self.plan_packet(&mut packet);
        }
        Ok(packet)
    }

    /// Plans the copy of a packet's slots into one frame: its segments and
    /// the frame, or [`Fate::Refused`] if any size or offset is wrong. The
    /// first request's size is the whole packet's (`netif.h`), its own
    /// data what the other slots leave; `poll_round` took the packet only
    /// with room in our queue for that size.
    fn plan_packet(&mut self, packet: &mut Pending) {
        let total = usize::from(packet.first.size);
        let rest = packet.rest.get(..packet.count).unwrap_or(&[]);
        let others: usize = rest.iter().map(|slot| usize::from(slot.size)).sum();
        let Some(own) = total.checked_sub(others) else {
            return;
        };
        let limit = if packet.gso.is_some() {
            offload::MAX_OFFLOAD_FRAME
        } else {
            MAX_FRAME
        };
        if total < 14 || total > limit {
            return;
        }
        let mut count = 0usize;
        for (slot, len) in core::iter::once((&packet.first, own))
            .chain(rest.iter().map(|s| (s, usize::from(s.size))))
        {
            if usize::from(slot.offset) + len > PAGE {
                return;
            }
            let Some(place) = packet.segments.get_mut(count) else {
                return;
            };
            *place = Segment {
                gref: slot.gref,
                offset: slot.offset,
                len: len as u16, // at most a page (checked above)
            };
            count += 1;
        }
        packet.segment_count = count;
        // Where the payload's whole pages of the client's land on whole
        // pages of ours, each takes one op instead of two; the frame is
        // then moved to the front of its buffer, which pays while each op
        // saved spares a copy of REALIGN_BYTES_PER_OP.
        let segments = packet.segments.get(..count).unwrap_or(&[]);
        // One op a segment is the least any start gives (every small
        // packet, and most others): no search then.
        let plain = grant::copy_ops(segments, 0);
        let (best, fewest) = if plain > count {
            grant::best_copy_start(segments)
        } else {
            (0, plain)
        };
        if best != 0 && plain.saturating_sub(fewest) * REALIGN_BYTES_PER_OP >= total {
            // Buffers of a page or more start on a page (`heap`), so
            // this one's own offset is normally 0.
            let mut frame = self.pool.take(total + PAGE);
            let start = (best + PAGE - frame.as_ptr().addr() % PAGE) % PAGE;
            frame.truncate(total + start);
            packet.start = start;
            packet.fate = Fate::Copy(frame);
            self.stats.realigned += 1;
        } else {
            packet.fate = Fate::Copy(self.pool.take(total));
        }
    }

    /// Copies the pending packets' slots in one batch, then answers and
    /// queues them in ring order.
    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = core::mem::take(&mut self.pending);
        let mut copied = [false; MAX_BATCH_PACKETS];
        {
            let mut jobs: Vec<Gather<'_>> = Vec::with_capacity(pending.len());
            let mut owners: Vec<usize> = Vec::with_capacity(pending.len());
            for (index, packet) in pending.iter_mut().enumerate() {
                let Pending {
                    segments,
                    segment_count,
                    start,
                    fate,
                    ..
                } = packet;
                if let Fate::Copy(frame) = fate {
                    jobs.push(Gather {
                        segments: segments.get(..*segment_count).unwrap_or(&[]),
                        dst: frame.get_mut(*start..).unwrap_or_default(),
                        done: false,
                    });
                    owners.push(index);
                }
            }
            if !jobs.is_empty() {
                self.copier.gather_many(self.dom, &mut jobs);
                self.stats.copy_batches += 1;
            }
            for (job, index) in jobs.iter().zip(owners) {
                if let Some(flag) = copied.get_mut(index) {
                    *flag = job.done;
                }
            }
        }
        for (index, packet) in pending.drain(..).enumerate() {
            let done = copied.get(index).copied().unwrap_or(false);
            self.finish_packet(packet, done);
        }
        self.pending = pending;
        self.pending_bytes = 0;
    }

    /// Answers a packet's slots and queues its frame (`copied`: its copy
    /// went through).
    fn finish_packet(&mut self, packet: Pending, copied: bool) {
        let rest = packet.rest.get(..packet.count).unwrap_or(&[]);
        let mut frame = match packet.fate {
            Fate::Copy(mut frame) if copied => {
                if packet.start != 0 {
                    frame.copy_within(packet.start.., 0);
                    frame.truncate(frame.len().saturating_sub(packet.start));
                }
                frame
            }
            Fate::Copy(_) | Fate::Refused => {
                self.stats.bad_requests += 1;
                self.respond_packet(&packet.first, packet.extras, rest, RSP_ERROR);
                return;
            }
        };
        let gso = packet.gso;
        let nic = NicOffload {
            csum_partial: packet.first.flags & NETTXF_CSUM_BLANK != 0,
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
        match offload::accept(&mut frame, nic) {
            Ok(offload) => {
                if offload.is_gso() {
                    self.stats.gso_from_client += 1;
                }
                self.received_bytes += frame.len();
                self.received.push_back((frame, offload));
                self.stats.from_client += 1;
            }
            // As Linux netback: the request was served, the frame dropped.
            Err(_) => self.stats.bad_checksum_offload += 1,
        }
        self.respond_packet(&packet.first, packet.extras, rest, RSP_OKAY);
    }

    /// Answers a packet's slots: `status` for each data slot, NULL for
    /// each extra-info segment (with the first request's id).
    fn respond_packet(
        &mut self,
        first: &TxRequest,
        extras: usize,
        rest: &[TxRequest],
        status: i16,
    ) {
        self.respond_tx(first.id, status);
        for _ in 0..extras {
            self.respond_tx(first.id, NETIF_RSP_NULL);
        }
        for slot in rest {
            self.respond_tx(slot.id, status);
        }
    }

    /// The next frame the client sent, complete (an offloaded one is cut
    /// and completed in software; see [`Self::take_frame_offloaded`]).
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

    /// The next frame the client sent, with its offload metadata.
    pub fn take_frame_offloaded(&mut self) -> Option<(Vec<u8>, Offload)> {
        let (frame, offload) = self.received.pop_front()?;
        self.received_bytes = self.received_bytes.saturating_sub(frame.len());
        Some((frame, offload))
    }

    /// Delivers a complete frame into the client's next posted RX buffer;
    /// dropped (and counted) when the client posted none.
    pub fn send(&mut self, frame: &[u8]) {
        if self.send_offloaded(frame, Offload::NONE) == Sent::NoRoom {
            self.stats.dropped += 1;
        }
        self.flush();
    }

    /// What the client's frontend takes on RX whole (its xenstore
    /// features, [`Self::set_frontend_features`]).
    pub fn tx_offloads(&self) -> TxOffloads {
        let f = self.frontend;
        // Checksum partial only when the frontend takes it for both IP
        // versions (one flag for the router); GSO needs SG and partial
        // checksums, as Linux netback's `xenvif_fix_features`.
        let csum = f.csum && f.csum6;
        TxOffloads {
            csum,
            tso4: csum && f.sg && f.gso4,
            tso6: csum && f.sg && f.gso6,
        }
    }

    /// Records what the client's frontend wrote in xenstore.
    pub fn set_frontend_features(&mut self, features: FrontendFeatures) {
        self.frontend = features;
    }

    /// Delivers a frame with `offload` (one [`Self::tx_offloads`] allows)
    /// into the client's posted RX buffers: one slot per page of the frame,
    /// the GSO extra-info segment behind the first (as Linux netback).
    /// [`Sent::NoRoom`] when the client has not posted enough buffers yet
    /// (nothing was taken; we asked to be notified); a frame the client
    /// did not negotiate, or too long, is dropped and counted.
    pub fn send_offloaded(&mut self, frame: &[u8], offload: Offload) -> Sent {
        let placed = match self.place(frame, offload) {
            Ok(placed) => placed,
            Err(sent) => return sent,
        };
        let failed = self
            .copier
            .scatter(self.dom, placed.segments(), frame)
            .is_err();
        self.stats.copy_batches += 1;
        self.settle(&placed, !failed);
        // Published now or, batching, with the frames after it; the client
        // is told only if its `rsp_event` asks.
        if !self.batching {
            self.flush();
        }
        Sent::Sent
    }

    /// As [`Self::send_offloaded`], but while batching the frame's buffer
    /// is taken (leaving `frame` empty) and its copy waits for the batch's:
    /// the frames handed over until [`Self::flush`] (at most
    /// [`MAX_SCATTER_PACKETS`] of [`MAX_SCATTER_SEGMENTS`] pages in all)
    /// cross in one grant copy (on Xen: one hypercall instead of one per
    /// frame), and their buffers go to [`Self::pool`]. Not batching, or
    /// when the frame is not sent, `frame` stays with the caller.
    pub fn send_owned(&mut self, frame: &mut Vec<u8>, offload: Offload) -> Sent {
        if !self.batching {
            return self.send_offloaded(frame, offload);
        }
        let pages = frame.len().div_ceil(PAGE);
        if self.held.len() == MAX_SCATTER_PACKETS
            || self.held_segments + pages > MAX_SCATTER_SEGMENTS
        {
            self.copy_held();
        }
        let placed = match self.place(frame, offload) {
            Ok(placed) => placed,
            Err(sent) => return sent,
        };
        self.held_segments += placed.count;
        self.held.push((core::mem::take(frame), placed));
        Sent::Sent
    }

    /// Checks a frame and takes the client's RX requests for it, writing
    /// its responses (not yet published: [`Self::flush`] does, after the
    /// copy). `Err` as [`Self::send_offloaded`] returns it.
    fn place(&mut self, frame: &[u8], offload: Offload) -> Result<Placed, Sent> {
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
            self.stats.dropped += 1;
            return Err(Sent::Dropped);
        }
        let data_slots = frame.len().div_ceil(PAGE);
        let needed = data_slots + usize::from(offload.is_gso());
        let prod = self.rx.load_u32(REQ_PROD);
        barrier();
        if prod.wrapping_sub(self.rx_rsp_prod) > RING_SIZE {
            self.broken = Some("client RX req_prod more than a ring ahead");
            self.stats.dropped += 1;
            return Err(Sent::Dropped);
        }
        let mut prod = prod;
        if (prod.wrapping_sub(self.rx_req_cons) as usize) < needed {
            // Ask to be told when enough buffers are there, then look once
            // more (they may have come in between).
            self.rx
                .store_u32(REQ_EVENT, self.rx_req_cons.wrapping_add(needed as u32));
            barrier();
            prod = self.rx.load_u32(REQ_PROD);
            barrier();
            if prod.wrapping_sub(self.rx_rsp_prod) > RING_SIZE {
                self.broken = Some("client RX req_prod more than a ring ahead");
                self.stats.dropped += 1;
                return Err(Sent::Dropped);
            }
            if (prod.wrapping_sub(self.rx_req_cons) as usize) < needed {
                return Err(Sent::NoRoom);
            }
        }
        // As Linux netback: partial checksums are flagged blank and
        // validated; complete frames carry no flag (we did not verify them).
        let csum_flags = if offload.csum_partial {
            NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED
        } else {
            0
        };
        let mut placed = Placed {
            segments: [Segment::default(); MAX_COPY_SEGMENTS],
            count: 0,
            first: self.rx_rsp_prod,
            gso: offload.is_gso(),
        };
        let mut chunks = frame.chunks(PAGE).peekable();
        while let Some(chunk) = chunks.next() {
            let (id, gref) = self.rx_request(self.rx_req_cons);
            self.rx_req_cons = self.rx_req_cons.wrapping_add(1);
            // `data_slots` is at most 17 (the frame is at most
            // `MAX_OFFLOAD_FRAME`), so every chunk has its segment.
            if let Some(segment) = placed.segments.get_mut(placed.count) {
                *segment = Segment {
                    gref,
                    offset: 0,
                    len: chunk.len() as u16, // at most a page
                };
            }
            let first = placed.count == 0;
            let mut flags = if chunks.peek().is_some() {
                NETRXF_MORE_DATA
            } else {
                0
            };
            if first {
                flags |= csum_flags;
                if offload.is_gso() {
                    flags |= NETRXF_EXTRA_INFO;
                }
            }
            self.respond_rx(id, flags, chunk.len() as i16);
            if first && offload.is_gso() {
                // The GSO segment takes the next request's place.
                self.rx_req_cons = self.rx_req_cons.wrapping_add(1);
                let kind = if v6 { GSO_TYPE_TCPV6 } else { GSO_TYPE_TCPV4 };
                let at = RING_HEADER + (self.rx_rsp_prod % RING_SIZE) as usize * RX_ENTRY;
                self.rx
                    .store_u16(at, u16::from_le_bytes([EXTRA_TYPE_GSO, 0]));
                self.rx.store_u16(at + 2, offload.gso_size);
                self.rx.store_u16(at + 4, u16::from(kind));
                self.rx.store_u16(at + 6, 0); // gso.features
                self.rx_rsp_prod = self.rx_rsp_prod.wrapping_add(1);
            }
            placed.count = (placed.count + 1).min(MAX_COPY_SEGMENTS);
        }
        Ok(placed)
    }

    /// Counts a placed frame once its copy is done; a refused copy turns
    /// its first response into an error (the client gets the slots back
    /// and drops the packet, as from Linux netback).
    fn settle(&mut self, placed: &Placed, copied: bool) {
        if copied {
            self.stats.to_client += 1;
            if placed.gso {
                self.stats.gso_to_client += 1;
            }
        } else {
            self.stats.bad_requests += 1;
            let at = RING_HEADER + (placed.first % RING_SIZE) as usize * RX_ENTRY;
            self.rx.store_u16(at + 6, RSP_ERROR as u16);
        }
    }

    /// Copies the held frames ([`Self::send_owned`]) in one batch, settles
    /// them and gives their buffers to the pool. A stopped vif copies
    /// nothing (its responses are never published): they are dropped.
    fn copy_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut held = core::mem::take(&mut self.held);
        self.held_segments = 0;
        if self.broken.is_some() {
            self.stats.dropped += held.len() as u64;
        } else {
            let mut done = [false; MAX_SCATTER_PACKETS];
            {
                let mut jobs: Vec<Scatter<'_>> = held
                    .iter()
                    .map(|(frame, placed)| Scatter {
                        segments: placed.segments(),
                        src: frame,
                        done: false,
                    })
                    .collect();
                self.copier.scatter_many(self.dom, &mut jobs);
                self.stats.copy_batches += 1;
                for (flag, job) in done.iter_mut().zip(&jobs) {
                    *flag = job.done;
                }
            }
            for ((_, placed), copied) in held.iter().zip(done) {
                self.settle(placed, copied);
            }
        }
        for (frame, _) in held.drain(..) {
            self.pool.give(frame);
        }
        self.held = held;
    }

    /// Copies the frames held back ([`Self::send_owned`]), then publishes
    /// the RX responses written since the last time, telling the client if
    /// its `rsp_event` asks: one index update and at most one notification
    /// for a batch of frames.
    pub fn flush(&mut self) {
        self.copy_held();
        if self.rx_published == self.rx_rsp_prod || self.broken.is_some() {
            return;
        }
        let old = core::mem::replace(&mut self.rx_published, self.rx_rsp_prod);
        if push_and_check_notify(&self.rx, RSP_PROD, RSP_EVENT, old, self.rx_rsp_prod) {
            self.notify.notify(self.port);
            self.stats.notifications += 1;
        }
    }

    /// The client's RX request at `index`: its id and grant.
    fn rx_request(&self, index: u32) -> (u16, u32) {
        let at = RING_HEADER + (index % RING_SIZE) as usize * RX_ENTRY;
        (self.rx.load_u16(at), self.rx.load_u32(at + 4))
    }

    fn respond_rx(&mut self, id: u16, flags: u16, status: i16) {
        let at = RING_HEADER + (self.rx_rsp_prod % RING_SIZE) as usize * RX_ENTRY;
        self.rx.store_u16(at, id);
        self.rx.store_u16(at + 2, 0); // offset
        self.rx.store_u16(at + 4, flags);
        self.rx.store_u16(at + 6, status as u16);
        self.rx_rsp_prod = self.rx_rsp_prod.wrapping_add(1);
    }

    /// Whether frames can be handed to [`Self::send`] (they may still be
    /// dropped if the client posted no buffer).
    pub fn can_send(&self) -> bool {
        self.broken.is_none()
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes buffers it built itself.
mod tests {
    use super::*;
    use crate::platform::xen::netfront::{Buffer, Netfront};
    use crate::platform::xen::shared::VecMemory;
    use alloc::collections::BTreeMap;
    use alloc::rc::Rc;
    use alloc::vec;
    use core::cell::{Cell, RefCell};
    use smoltcp::phy::{Device, RxToken, TxToken};
    use smoltcp::time::Instant;

    #[derive(Clone, Copy)]
    struct NoNotify;
    impl Notify for NoNotify {
        fn notify(&self, _: u32) {}
    }

    /// Grant copy against the client's pages, by grant reference; counts
    /// the batches (one per packet: one hypercall on Xen). With a ring in
    /// its third field, each `scatter_many` logs the ring's `rsp_prod` as
    /// it found it.
    #[derive(Clone, Default)]
    struct Pages(
        Rc<RefCell<BTreeMap<u32, VecMemory>>>,
        Rc<Cell<u32>>,
        Rc<RefCell<Option<RingWatch>>>,
    );
    /// A ring and the `rsp_prod` values each `scatter_many` found there.
    type RingWatch = (VecMemory, Vec<u32>);
    impl Pages {
        /// The client's page `gref`, if domain 7 granted it.
        fn page(&self, dom: u16, gref: u32) -> Option<VecMemory> {
            self.0.borrow().get(&gref).filter(|_| dom == 7).cloned()
        }
        fn batches(&self) -> u32 {
            self.1.get()
        }
        fn gather_one(
            &self,
            dom: u16,
            segments: &[Segment],
            dst: &mut [u8],
        ) -> Result<(), CopyRefused> {
            check_batch(segments, dst.len())?;
            let mut result = Ok(());
            let mut at = 0;
            for s in segments {
                let part = &mut dst[at..at + usize::from(s.len)];
                match self.page(dom, s.gref) {
                    Some(page) => page.read_bytes(usize::from(s.offset), part),
                    None => result = Err(CopyRefused),
                }
                at += part.len();
            }
            result
        }
    }

    impl GrantCopy for Pages {
        fn copy_from(
            &mut self,
            dom: u16,
            gref: u32,
            offset: u16,
            dst: &mut [u8],
        ) -> Result<(), CopyRefused> {
            let page = self.page(dom, gref).ok_or(CopyRefused)?;
            if usize::from(offset) + dst.len() > PAGE {
                return Err(CopyRefused);
            }
            page.read_bytes(usize::from(offset), dst);
            Ok(())
        }
        fn copy_to(
            &mut self,
            dom: u16,
            gref: u32,
            offset: u16,
            src: &[u8],
        ) -> Result<(), CopyRefused> {
            let page = self.page(dom, gref).ok_or(CopyRefused)?;
            if usize::from(offset) + src.len() > PAGE {
                return Err(CopyRefused);
            }
            page.write_bytes(usize::from(offset), src);
            Ok(())
        }
        /// As Xen's batch: the bounds first, then every op on its own (a
        /// refused one does not stop the others).
        fn gather(
            &mut self,
            dom: u16,
            segments: &[Segment],
            dst: &mut [u8],
        ) -> Result<(), CopyRefused> {
            self.1.set(self.1.get() + 1);
            self.gather_one(dom, segments, dst)
        }
        fn gather_many(&mut self, dom: u16, jobs: &mut [Gather<'_>]) {
            assert!(jobs.len() <= MAX_BATCH_PACKETS);
            let segments: usize = jobs.iter().map(|j| j.segments.len()).sum();
            assert!(segments <= MAX_BATCH_SEGMENTS);
            self.1.set(self.1.get() + 1);
            for job in jobs {
                job.done = self.gather_one(dom, job.segments, job.dst).is_ok();
            }
        }
        fn scatter_many(&mut self, dom: u16, jobs: &mut [Scatter<'_>]) {
            assert!(jobs.len() <= MAX_SCATTER_PACKETS);
            let segments: usize = jobs.iter().map(|j| j.segments.len()).sum();
            assert!(segments <= MAX_SCATTER_SEGMENTS);
            self.1.set(self.1.get() + 1);
            if let Some((ring, seen)) = &mut *self.2.borrow_mut() {
                seen.push(ring.load_u32(RSP_PROD));
            }
            for job in jobs {
                job.done = self.scatter_one(dom, job.segments, job.src).is_ok();
            }
        }
        fn scatter(
            &mut self,
            dom: u16,
            segments: &[Segment],
            src: &[u8],
        ) -> Result<(), CopyRefused> {
            self.1.set(self.1.get() + 1);
            self.scatter_one(dom, segments, src)
        }
    }

    impl Pages {
        /// As Xen's batch: the bounds first, then every op on its own.
        fn scatter_one(
            &mut self,
            dom: u16,
            segments: &[Segment],
            src: &[u8],
        ) -> Result<(), CopyRefused> {
            check_batch(segments, src.len())?;
            let mut result = Ok(());
            let mut at = 0;
            for s in segments {
                let part = &src[at..at + usize::from(s.len)];
                match self.page(dom, s.gref) {
                    Some(page) => page.write_bytes(usize::from(s.offset), part),
                    None => result = Err(CopyRefused),
                }
                at += part.len();
            }
            result
        }
    }

    /// Our own netfront as the client (domain 7), our netback as its backend.
    fn pair() -> (
        Netfront<VecMemory, NoNotify>,
        Netback<VecMemory, Pages, NoNotify>,
        Pages,
        VecMemory,
    ) {
        let tx = VecMemory::new(PAGE);
        let rx = VecMemory::new(PAGE);
        let pages = Pages::default();
        let make = |base: u32, n: usize| -> Vec<Buffer<VecMemory>> {
            (0..n)
                .map(|i| {
                    let mem = VecMemory::new(PAGE);
                    pages.0.borrow_mut().insert(base + i as u32, mem.clone());
                    Buffer {
                        mem,
                        gref: base + i as u32,
                    }
                })
                .collect()
        };
        let (tx_bufs, rx_bufs) = (make(100, 16), make(200, 16));
        let front = Netfront::new(tx.clone(), rx.clone(), tx_bufs, rx_bufs, 1, NoNotify);
        let back = Netback::new(tx.clone(), rx, 7, 2, pages.clone(), NoNotify);
        (front, back, pages, tx)
    }

    #[test]
    fn frames_flow_between_our_netfront_and_our_netback_across_wraparound() {
        let (mut front, mut back, _, _) = pair();
        // Under Miri, fewer and shorter frames: still more rounds than the
        // 256-slot rings hold, so both rings wrap.
        let (rounds, spread) = if cfg!(miri) {
            (300u32, 200)
        } else {
            (700, 1400)
        };
        for round in 0..rounds {
            let frame: Vec<u8> = (0..60 + round % spread)
                .map(|i| (i ^ round) as u8)
                .collect();
            front
                .transmit(Instant::from_millis(0))
                .unwrap()
                .consume(frame.len(), |b| b.copy_from_slice(&frame));
            back.poll();
            assert_eq!(back.take_frame().unwrap(), frame);
            back.send(&frame);
            let (rx, _) = front.receive(Instant::from_millis(0)).unwrap();
            rx.consume(|got| assert_eq!(got, &frame[..]));
        }
        assert_eq!(back.stats().from_client, u64::from(rounds));
        assert_eq!(back.stats().to_client, u64::from(rounds));
        assert_eq!(front.stats().protocol_errors, 0);
    }

    /// Buffers from the frame pool still hold an old frame's bytes: both
    /// NICs overwrite every one of them (longer, shorter and empty old
    /// frames), and a long enough buffer is used as it is.
    #[test]
    fn pool_buffers_with_old_bytes_are_overwritten_whole_both_ways() {
        let (mut front, mut back, _, _) = pair();
        for (round, stale_len) in [(0u32, 3000usize), (1, 10), (2, 1500), (3, 0)] {
            let frame: Vec<u8> = (0..1000 + round as usize * 150)
                .map(|i| (i as u32 ^ round) as u8)
                .collect();
            let mut stale = Vec::with_capacity(stale_len.max(64));
            stale.resize(stale_len, 0xee);
            let (to_back, to_front) = (stale.clone(), stale);
            let at = (to_back.as_ptr(), to_front.as_ptr());
            back.pool.give(to_back);
            front.pool.give(to_front);
            front
                .transmit(Instant::from_millis(0))
                .unwrap()
                .consume(frame.len(), |b| b.copy_from_slice(&frame));
            back.poll();
            let got = back.take_frame().unwrap();
            assert_eq!(got, frame);
            assert!(back.pool.is_empty(), "the pool's buffer was taken");
            if stale_len >= frame.len() {
                assert_eq!(got.as_ptr(), at.0, "used as it is");
            }
            back.send(&frame);
            front.poll();
            let (got, _) = front.take_frame_offloaded().unwrap();
            assert_eq!(got, frame);
            assert!(front.pool.is_empty());
            if stale_len >= frame.len() {
                assert_eq!(got.as_ptr(), at.1);
            }
        }
    }

    #[test]
    fn a_hostile_frontend_gets_errors_not_a_crash() {
        let (_front, mut back, _, tx) = pair();
        // Hand-written requests: bad size, offset past the page, unknown
        // grant, then a good one.
        let reqs: [(u32, u16, u16, u16, u16); 5] = [
            (100, 0, 0, 1, 5),
            (100, 4000, 0, 2, 200),
            (0, 0, 0, 5, 0),
            (999, 0, 0, 6, 60),
            (101, 0, 0, 7, 60),
        ];
        let start = tx.load_u32(REQ_PROD);
        for (i, (gref, offset, flags, id, size)) in reqs.iter().enumerate() {
            write_request(&tx, start + i as u32, *gref, *offset, *flags, *id, *size);
        }
        tx.store_u32(REQ_PROD, start + reqs.len() as u32);
        back.poll();
        assert_eq!(back.stats().bad_requests, 4);
        assert_eq!(back.stats().from_client, 1);
        assert_eq!(statuses(&tx, start, 5), [-1, -1, -1, -1, 0]);
        // A req_prod far ahead stops the device.
        tx.store_u32(REQ_PROD, start + 10_000);
        back.poll();
        assert!(back.broken().is_some());
        back.send(&[0; 60]);
        assert_eq!(back.stats().to_client, 0);
    }

    fn write_request(
        tx: &VecMemory,
        index: u32,
        gref: u32,
        offset: u16,
        flags: u16,
        id: u16,
        size: u16,
    ) {
        let at = RING_HEADER + (index % RING_SIZE) as usize * TX_ENTRY;
        tx.store_u32(at, gref);
        tx.store_u16(at + 4, offset);
        tx.store_u16(at + 6, flags);
        tx.store_u16(at + 8, id);
        tx.store_u16(at + 10, size);
    }

    fn write_extra(tx: &VecMemory, index: u32, kind: u8, flags: u8, gso_size: u16, gso_type: u8) {
        let at = RING_HEADER + (index % RING_SIZE) as usize * TX_ENTRY;
        tx.store_u16(at, u16::from_le_bytes([kind, flags]));
        tx.store_u16(at + 2, gso_size);
        tx.store_u16(at + 4, u16::from(gso_type));
        tx.store_u16(at + 6, 0);
        tx.store_u32(at + 8, 0);
    }

    fn statuses(tx: &VecMemory, start: u32, n: u32) -> Vec<i16> {
        (0..n)
            .map(|i| {
                tx.load_u16(RING_HEADER + ((start + i) % RING_SIZE) as usize * TX_ENTRY + 2) as i16
            })
            .collect()
    }

    /// A TCP/IPv4 frame of `payload` bytes, checksum complete.
    fn tcp4_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 54 + payload];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        f[20] = 0x40;
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 137, 0, 10]);
        f[30..34].copy_from_slice(&[93, 184, 216, 34]);
        let sum = crate::wire::checksum::finish(crate::wire::checksum::add(0, &f[14..34]));
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        f[36..38].copy_from_slice(&443u16.to_be_bytes());
        f[46] = 0x50;
        f[47] = 0x10;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = (i * 13 + i / 256) as u8;
        }
        f
    }

    /// A TCPv4 GSO frame of `payload` bytes (MSS 1448, checksum partial)
    /// and its offload, as a Linux frontend hands one over.
    fn gso_frame(payload: usize) -> (Vec<u8>, Offload) {
        let mut frame = tcp4_frame(payload);
        let offload = offload::accept_linux_tcp4_gso(&mut frame);
        (frame, offload)
    }

    /// Posts `frame` as one packet: slots of `sizes` bytes (the last takes
    /// the rest) on pages 100.., with a GSO extra-info segment when
    /// `gso` is given; returns the ring index it started at and the
    /// number of slots.
    fn post_packet(
        pages: &Pages,
        tx: &VecMemory,
        frame: &[u8],
        sizes: &[usize],
        flags: u16,
        gso: Option<(u16, u8)>,
    ) -> (u32, u32) {
        let start = tx.load_u32(REQ_PROD);
        let mut parts = Vec::new();
        let mut at = 0;
        for &size in sizes {
            let end = (at + size).min(frame.len());
            parts.push(&frame[at..end]);
            at = end;
        }
        if at < frame.len() {
            parts.push(&frame[at..]);
        }
        let mut index = start;
        for (i, part) in parts.iter().enumerate() {
            // 16 pages: a packet of more slots reuses them.
            let gref = 100 + (i % 16) as u32;
            pages.0.borrow()[&gref].write_bytes(0, part);
            let more = if i + 1 < parts.len() {
                NETTXF_MORE_DATA
            } else {
                0
            };
            if i == 0 {
                let extra = if gso.is_some() { NETTXF_EXTRA_INFO } else { 0 };
                write_request(
                    tx,
                    index,
                    gref,
                    0,
                    flags | more | extra,
                    0,
                    frame.len() as u16,
                );
                index += 1;
                if let Some((size, kind)) = gso {
                    write_extra(tx, index, EXTRA_TYPE_GSO, 0, size, kind);
                    index += 1;
                }
            } else {
                write_request(tx, index, gref, 0, more, i as u16, part.len() as u16);
                index += 1;
            }
        }
        tx.store_u32(REQ_PROD, index);
        (start, index - start)
    }

    #[test]
    fn a_multi_slot_gso_packet_from_a_linux_style_frontend_arrives_whole() {
        let (_front, mut back, pages, tx) = pair();
        let frame = tcp4_frame(3 * 1448 + 100);
        let (start, n) = post_packet(
            &pages,
            &tx,
            &frame,
            &[66, 4096, 200],
            NETTXF_CSUM_BLANK,
            Some((1448, GSO_TYPE_TCPV4)),
        );
        back.poll();
        assert_eq!(n, 5);
        assert_eq!(statuses(&tx, start, n), [0, NETIF_RSP_NULL, 0, 0, 0]);
        assert_eq!(pages.batches(), 1, "four data slots, one grant copy batch");
        let (got, offload) = back.take_frame_offloaded().expect("a packet");
        assert_eq!(
            offload,
            Offload {
                csum_partial: true,
                gso_size: 1448
            }
        );
        assert_eq!(got.len(), frame.len());
        // The same bytes but for the checksum field (now the pseudo sum).
        assert_eq!(got[..50], frame[..50]);
        assert_eq!(got[52..], frame[52..]);
        assert_eq!(back.stats().gso_from_client, 1);
        // Without GSO a multi-slot packet of at most MAX_FRAME arrives too.
        let small = tcp4_frame(1000);
        let (start, n) = post_packet(&pages, &tx, &small, &[54, 500], 0, None);
        back.poll();
        assert_eq!(statuses(&tx, start, n), [0, 0, 0]);
        assert_eq!(back.take_frame(), Some(small));
    }

    #[test]
    fn a_packet_whose_pages_straddle_ours_is_copied_realigned_and_arrives_whole() {
        // As Linux netfront sends a large TCP packet: the headers, the
        // rest of a payload page, then whole pages. Copied from the front
        // of a buffer every whole page would take two ops.
        let (_front, mut back, pages, tx) = pair();
        let frame = tcp4_frame(66 + 1096 + 13 * 4096 + 700 - 54);
        let mut sizes = alloc::vec![66, 1096];
        sizes.extend([4096; 13]);
        for round in 1..=2 {
            let (start, n) = post_packet(
                &pages,
                &tx,
                &frame,
                &sizes,
                NETTXF_CSUM_BLANK,
                Some((1448, GSO_TYPE_TCPV4)),
            );
            back.poll();
            assert_eq!(n, 17, "16 data slots and the extra info");
            let answered = statuses(&tx, start, n);
            assert!(answered.iter().all(|&s| s == 0 || s == NETIF_RSP_NULL));
            let (got, _) = back.take_frame_offloaded().expect("a packet");
            assert_eq!(got.len(), frame.len());
            assert_eq!(got[..50], frame[..50]);
            assert_eq!(got[52..], frame[52..]);
            assert_eq!(back.stats().realigned, round);
            // Its buffer goes back to the pool and serves the next one.
            back.pool.give(got);
        }
        // Whole pages from the first byte, a single slot, or a gain that
        // does not pay for the move: copied to the front as they are.
        for sizes in [&[4096, 4096, 4096][..], &[1500][..], &[66, 4030, 100][..]] {
            let total: usize = sizes.iter().sum();
            let frame = tcp4_frame(total - 54);
            let gso = Some((1448, GSO_TYPE_TCPV4));
            post_packet(&pages, &tx, &frame, sizes, NETTXF_CSUM_BLANK, gso);
            back.poll();
            let (got, _) = back.take_frame_offloaded().expect("a packet");
            assert!(
                got.len() == frame.len() && got[52..] == frame[52..],
                "{sizes:?}"
            );
        }
        assert_eq!(back.stats().realigned, 2);
    }

    #[test]
    fn a_poll_round_copies_its_packets_in_one_batch_and_answers_in_order() {
        let (_front, mut back, pages, tx) = pair();
        // Five single-slot packets, the third naming a grant it did not
        // give: one batch; that one errors, the others arrive in order.
        let start = tx.load_u32(REQ_PROD);
        for i in 0..5u32 {
            let gref = if i == 2 { 999 } else { 100 + i };
            if let Some(page) = pages.0.borrow().get(&gref) {
                page.write_bytes(0, &[i as u8 + 1; 60]);
            }
            write_request(&tx, start + i, gref, 0, 0, i as u16, 60);
        }
        tx.store_u32(REQ_PROD, start + 5);
        back.poll();
        assert_eq!(pages.batches(), 1);
        assert_eq!(statuses(&tx, start, 5), [0, 0, -1, 0, 0]);
        let ids: Vec<u16> = (0..5)
            .map(|i| tx.load_u16(RING_HEADER + ((start + i) % RING_SIZE) as usize * TX_ENTRY))
            .collect();
        assert_eq!(ids, [0, 1, 2, 3, 4]);
        for byte in [1u8, 2, 4, 5] {
            assert_eq!(back.take_frame().unwrap(), [byte; 60]);
        }
        assert_eq!(back.take_frame(), None);
        assert_eq!(back.stats().bad_requests, 1);
        // More packets than one batch holds, and than our queue takes:
        // batches of at most MAX_BATCH_PACKETS; the packets past the queue
        // stay on the ring, unanswered (backpressure, as Linux netback),
        // and are taken once the firewall read frames. Nothing is lost.
        let (_front, mut back, pages, tx) = pair();
        let n = RX_QUEUE as u32 + 6;
        let start = tx.load_u32(REQ_PROD);
        let rsp_start = tx.load_u32(RSP_PROD);
        for i in 0..n {
            write_request(&tx, start + i, 100 + i % 16, 0, 0, i as u16, 60);
        }
        tx.store_u32(REQ_PROD, start + n);
        back.poll();
        assert_eq!(back.stats().from_client, RX_QUEUE as u64);
        assert_eq!(back.stats().dropped, 0);
        assert_eq!(
            tx.load_u32(RSP_PROD).wrapping_sub(rsp_start),
            RX_QUEUE as u32,
            "the six past the queue are not answered yet"
        );
        assert_eq!(
            pages.batches() as usize,
            RX_QUEUE.div_ceil(MAX_BATCH_PACKETS)
        );
        back.poll();
        assert_eq!(back.stats().from_client, RX_QUEUE as u64, "still full");
        for _ in 0..3 {
            assert!(back.take_frame().is_some());
        }
        back.poll();
        assert_eq!(back.stats().from_client, RX_QUEUE as u64 + 3);
        let mut got = 3;
        while back.take_frame().is_some() {
            got += 1;
            back.poll();
        }
        assert_eq!(got, n, "every packet the client sent reached us");
        assert!(statuses(&tx, start, n).iter().all(|&s| s == 0));
        assert_eq!(tx.load_u32(RSP_PROD).wrapping_sub(rsp_start), n);
        assert_eq!(back.stats().dropped, 0);
        // GSO packets of 16 segments: four to a batch (64 segments).
        let (_front, mut back, pages, tx) = pair();
        let frame = tcp4_frame(16 * 60);
        let mut sizes = [60; 16];
        sizes[0] = 114;
        for _ in 0..5 {
            post_packet(
                &pages,
                &tx,
                &frame,
                &sizes,
                NETTXF_CSUM_BLANK,
                Some((60, GSO_TYPE_TCPV4)),
            );
        }
        back.poll();
        assert_eq!(back.stats().gso_from_client, 5);
        assert_eq!(pages.batches(), 2);
        assert_eq!(back.stats().copy_batches, 2);
    }

    #[test]
    fn gso_packets_past_the_queue_bytes_wait_on_the_ring_and_none_is_lost() {
        // Six GSO packets of 60 KB: our queue's bytes (256 KiB) take four;
        // the other two stay on the ring, unanswered, until frames are read.
        let (_front, mut back, pages, tx) = pair();
        let frame = tcp4_frame(60_000);
        let sizes = [4000; 15];
        let rsp_start = tx.load_u32(RSP_PROD);
        let mut slots = 0;
        for _ in 0..6 {
            let (_, n) = post_packet(
                &pages,
                &tx,
                &frame,
                &sizes,
                NETTXF_CSUM_BLANK,
                Some((1448, GSO_TYPE_TCPV4)),
            );
            slots += n;
        }
        let per_packet = slots / 6;
        back.poll();
        let fits = RX_QUEUE_BYTES / frame.len();
        assert_eq!(fits, 4);
        assert_eq!(back.stats().gso_from_client, fits as u64);
        assert_eq!(
            tx.load_u32(RSP_PROD).wrapping_sub(rsp_start),
            fits as u32 * per_packet,
            "only the packets taken are answered"
        );
        let mut got = 0;
        while let Some((received, offload)) = back.take_frame_offloaded() {
            // Headers as the client sent them but the checksum field (the
            // pseudo-header sum of a partial checksum); the payload whole.
            assert_eq!(received.len(), frame.len());
            assert_eq!(received[..50], frame[..50]);
            assert_eq!(received[54..], frame[54..]);
            assert!(offload.is_gso());
            got += 1;
            back.poll();
        }
        assert_eq!(got, 6);
        assert_eq!(tx.load_u32(RSP_PROD).wrapping_sub(rsp_start), slots);
        assert_eq!(back.stats().dropped, 0);
        assert_eq!(back.stats().bad_requests, 0);
    }

    #[test]
    fn hostile_multi_slot_and_gso_requests_are_refused_or_stop_the_vif() {
        let frame = tcp4_frame(3 * 1448);
        // gso_size 0: served, dropped.
        let (_f, mut back, pages, tx) = pair();
        let (start, n) = post_packet(
            &pages,
            &tx,
            &frame,
            &[1000, 1000],
            0,
            Some((0, GSO_TYPE_TCPV4)),
        );
        back.poll();
        assert_eq!(statuses(&tx, start, n), [0, NETIF_RSP_NULL, 0, 0]);
        assert_eq!(back.stats().bad_checksum_offload, 1);
        assert!(back.take_frame_offloaded().is_none());
        // A GSO type that does not match the frame, and an unknown one.
        for kind in [GSO_TYPE_TCPV6, 9] {
            let (_f, mut back, pages, tx) = pair();
            post_packet(&pages, &tx, &frame, &[1000, 1000], 0, Some((1448, kind)));
            back.poll();
            assert!(back.take_frame_offloaded().is_none(), "type {kind}");
            assert!(back.broken().is_none());
        }
        // Over MAX_FRAME without GSO: errors for every slot.
        let (_f, mut back, pages, tx) = pair();
        let (start, n) = post_packet(&pages, &tx, &frame, &[2000, 2000], 0, None);
        back.poll();
        assert_eq!(statuses(&tx, start, n), [-1, -1, -1]);
        // The first request's size below the other slots' sum.
        let (_f, mut back, pages, tx) = pair();
        let (start, _) = post_packet(
            &pages,
            &tx,
            &frame,
            &[1000, 1000],
            0,
            Some((1448, GSO_TYPE_TCPV4)),
        );
        write_request(
            &tx,
            start,
            100,
            0,
            NETTXF_MORE_DATA | NETTXF_EXTRA_INFO,
            0,
            100,
        );
        back.poll();
        assert_eq!(back.stats().bad_requests, 1);
        // An unknown extra type: errors.
        let (_f, mut back, pages, tx) = pair();
        let (start, _) = post_packet(
            &pages,
            &tx,
            &frame,
            &[1000, 1000],
            0,
            Some((1448, GSO_TYPE_TCPV4)),
        );
        write_extra(&tx, start + 1, 9, 0, 1448, GSO_TYPE_TCPV4);
        back.poll();
        assert_eq!(back.stats().bad_requests, 1);
        assert!(back.broken().is_none());
        // A grant it did not give in the middle of a packet, and a slot
        // running past its page: errors for every slot, the copy batch
        // refused or never made, the next packet whole.
        for (slot, gref, offset) in [(2u32, 999u32, 0u16), (3, 102, 4000)] {
            let (_f, mut back, pages, tx) = pair();
            let (start, n) = post_packet(
                &pages,
                &tx,
                &frame,
                &[1000, 1000],
                0,
                Some((1448, GSO_TYPE_TCPV4)),
            );
            let at = RING_HEADER + ((start + slot) % RING_SIZE) as usize * TX_ENTRY;
            tx.store_u32(at, gref);
            tx.store_u16(at + 4, offset);
            back.poll();
            assert_eq!(statuses(&tx, start, n), [-1, NETIF_RSP_NULL, -1, -1]);
            assert_eq!(back.stats().bad_requests, 1);
            assert!(back.take_frame_offloaded().is_none());
            assert!(pages.batches() <= 1);
            let (start, n) = post_packet(
                &pages,
                &tx,
                &frame,
                &[1000, 1000],
                NETTXF_CSUM_BLANK,
                Some((1448, GSO_TYPE_TCPV4)),
            );
            back.poll();
            assert_eq!(statuses(&tx, start, n), [0, NETIF_RSP_NULL, 0, 0]);
            let (got, _) = back.take_frame_offloaded().expect("the next packet");
            assert_eq!(got.len(), frame.len());
            assert!(back.broken().is_none());
        }
        // 19 data slots (more than Linux's 18): errors, the vif goes on.
        let (_f, mut back, pages, tx) = pair();
        let (start, n) = post_packet(
            &pages,
            &tx,
            &frame,
            &[60; 18],
            0,
            Some((1448, GSO_TYPE_TCPV4)),
        );
        assert_eq!(n, 20);
        back.poll();
        assert!(
            statuses(&tx, start, n)
                .iter()
                .all(|&s| s == -1 || s == NETIF_RSP_NULL)
        );
        assert!(back.broken().is_none());
    }

    #[test]
    fn protocol_violations_stop_the_vif() {
        // A packet that runs past req_prod.
        let (_f, mut back, _pages, tx) = pair();
        let start = tx.load_u32(REQ_PROD);
        write_request(&tx, start, 100, 0, NETTXF_MORE_DATA, 0, 200);
        tx.store_u32(REQ_PROD, start + 1);
        back.poll();
        assert_eq!(back.broken(), Some("client TX packet runs past req_prod"));
        // Extra info past req_prod.
        let (_f, mut back, _pages, tx) = pair();
        write_request(&tx, start, 100, 0, NETTXF_EXTRA_INFO, 0, 200);
        tx.store_u32(REQ_PROD, start + 1);
        back.poll();
        assert_eq!(
            back.broken(),
            Some("client TX extra info runs past req_prod")
        );
        // An endless extra-info chain.
        let (_f, mut back, _pages, tx) = pair();
        write_request(&tx, start, 100, 0, NETTXF_EXTRA_INFO, 0, 200);
        for i in 1..=8 {
            write_extra(&tx, start + i, EXTRA_TYPE_HASH, EXTRA_FLAG_MORE, 0, 0);
        }
        tx.store_u32(REQ_PROD, start + 9);
        back.poll();
        assert_eq!(back.broken(), Some("client TX extra-info chain too long"));
        // More than FATAL_SLOTS data slots.
        let (_f, mut back, _pages, tx) = pair();
        for i in 0..30 {
            write_request(&tx, start + i, 100, 0, NETTXF_MORE_DATA, i as u16, 10);
        }
        tx.store_u32(REQ_PROD, start + 30);
        back.poll();
        assert_eq!(back.broken(), Some("client TX packet of too many slots"));
    }

    /// Writes TX requests by hand (as a Linux netfront would) and returns
    /// the statuses of their responses.
    fn send_raw(
        back: &mut Netback<VecMemory, Pages, NoNotify>,
        pages: &Pages,
        tx: &VecMemory,
        requests: &[(u16, &[u8])],
    ) -> Vec<i16> {
        let start = tx.load_u32(REQ_PROD);
        for (i, (flags, frame)) in requests.iter().enumerate() {
            let gref = 100 + i as u32;
            pages.0.borrow()[&gref].write_bytes(0, frame);
            let at = RING_HEADER + ((start + i as u32) % RING_SIZE) as usize * TX_ENTRY;
            tx.store_u32(at, gref);
            tx.store_u16(at + 4, 0);
            tx.store_u16(at + 6, *flags);
            tx.store_u16(at + 8, i as u16);
            tx.store_u16(at + 10, frame.len() as u16);
        }
        tx.store_u32(REQ_PROD, start + requests.len() as u32);
        back.poll();
        (0..requests.len() as u32)
            .map(|i| {
                tx.load_u16(RING_HEADER + ((start + i) % RING_SIZE) as usize * TX_ENTRY + 2) as i16
            })
            .collect()
    }

    #[test]
    fn every_checksum_flag_combination_from_a_linux_style_frontend() {
        use crate::platform::xen::csum::tests::{blank_frame, l4_checksum_ok};
        const FLAGS: [u16; 4] = [
            0,
            NETTXF_CSUM_BLANK,
            NETTXF_DATA_VALIDATED,
            NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED,
        ];
        for v6 in [false, true] {
            for protocol in [6u8, 17] {
                let blank = blank_frame(v6, protocol, b"GET / HTTP/1.0\r\n\r\n");
                let mut complete = blank.clone();
                crate::platform::xen::csum::complete_partial_checksum(&mut complete).unwrap();
                for flags in FLAGS {
                    for (frame, already) in [(&blank, false), (&complete, true)] {
                        let (_front, mut back, pages, tx) = pair();
                        let status = send_raw(&mut back, &pages, &tx, &[(flags, frame)]);
                        assert_eq!(status, [0]);
                        let got = back.take_frame().unwrap();
                        if flags & NETTXF_CSUM_BLANK != 0 && !already {
                            // Completed: valid, equal to the complete frame.
                            assert_eq!(got, complete, "v6={v6} proto={protocol} flags={flags}");
                            assert!(l4_checksum_ok(&got));
                        } else if flags & NETTXF_CSUM_BLANK != 0 {
                            // A lie (the checksum was complete): garbage in,
                            // garbage out, but only the checksum bytes moved.
                            assert_eq!(got.len(), frame.len());
                            let moved = (0..got.len()).filter(|&i| got[i] != frame[i]).count();
                            assert!(moved <= 2);
                        } else {
                            // Without csum_blank the frame is passed as is.
                            assert_eq!(&got, frame);
                            assert_eq!(l4_checksum_ok(&got), already);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lying_checksum_flags_drop_the_frame_never_change_it_or_panic() {
        use crate::platform::xen::csum::tests::blank_frame;
        let tcp = blank_frame(false, 6, b"data");
        let mut short = tcp.clone(); // IP total length too short for TCP
        short[16..18].copy_from_slice(&30u16.to_be_bytes());
        let mut fragment = tcp.clone();
        fragment[20] = 0x20; // more fragments
        let mut icmp = tcp.clone();
        icmp[23] = 1;
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let lies: [&[u8]; 5] = [&short, &fragment, &icmp, &arp, &tcp[..30]];
        for flags in [NETTXF_CSUM_BLANK, NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED] {
            let (_front, mut back, pages, tx) = pair();
            let requests: Vec<(u16, &[u8])> = lies.iter().map(|f| (flags, *f)).collect();
            let status = send_raw(&mut back, &pages, &tx, &requests);
            // Served (as Linux netback does), but nothing reaches the router.
            assert_eq!(status, [0; 5]);
            assert!(back.take_frame().is_none());
            assert_eq!(back.stats().bad_checksum_offload, 5);
            assert_eq!(back.stats().from_client, 0);
        }
        // The same frames without the flag pass unchanged: the router
        // decides about them as about any other frame.
        for flags in [0, NETTXF_DATA_VALIDATED] {
            let (_front, mut back, pages, tx) = pair();
            let requests: Vec<(u16, &[u8])> = lies.iter().map(|f| (flags, *f)).collect();
            send_raw(&mut back, &pages, &tx, &requests);
            for lie in lies {
                assert_eq!(back.take_frame().unwrap(), lie);
            }
        }
    }

    /// A router with client 7.0 (10.137.0.10, the address of the test
    /// frames) whose gateway 10.137.0.1 has announced its MAC.
    fn router(rules: &[(&str, &str)]) -> (crate::router::Router, crate::router::ClientId) {
        use crate::router::{Caps, ClientConfig, ClientId, NetworkConfig, Router};
        use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress};
        let ours = EthernetAddress([0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x02]);
        let gateway_mac = EthernetAddress([0x00, 0x16, 0x3e, 0, 0, 1]);
        let (us, gateway) = (
            core::net::Ipv4Addr::new(10, 137, 0, 2),
            core::net::Ipv4Addr::new(10, 137, 0, 1),
        );
        let config = NetworkConfig {
            uplink_mac: ours,
            ip: us,
            gateway,
            primary_dns: None,
            secondary_dns: None,
            ip6: None,
            gateway6: None,
            seed: 1,
        };
        let now = Instant::from_millis(0);
        let mut router = Router::new(config, Caps::for_memory(16 << 20), now);
        let id = ClientId {
            domid: 7,
            device: 0,
        };
        let client = ClientConfig {
            ip: core::net::Ipv4Addr::new(10, 137, 0, 10),
            ip6: None,
            mac: Some(EthernetAddress([0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x11])),
        };
        router.add_client(id, client).unwrap();
        router.set_rules(
            client.ip.into(),
            crate::rules::RuleSet::parse(rules.iter().copied()),
        );
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: gateway_mac,
            source_protocol_addr: gateway,
            target_hardware_addr: ours,
            target_protocol_addr: us,
        };
        let mut frame = vec![0u8; 14 + arp.buffer_len()];
        frame[0..6].copy_from_slice(&ours.0);
        frame[6..12].copy_from_slice(&gateway_mac.0);
        frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        arp.emit(&mut ArpPacket::new_unchecked(&mut frame[14..]));
        router.handle_uplink_frame(&frame, now);
        while router.pop_uplink_frame().is_some() {}
        assert!(router.gateway_mac().is_some());
        (router, id)
    }

    #[test]
    fn a_blank_udp_checksum_leaves_the_uplink_valid_after_nat() {
        use crate::platform::xen::csum::tests::{blank_frame, l4_checksum_ok};
        for protocol in [17u8, 6] {
            let (mut router, id) = router(&[("policy", "accept")]);
            let (_front, mut back, pages, tx) = pair();
            let mut frame = blank_frame(false, protocol, b"query");
            frame[0..6].copy_from_slice(&crate::arp::CLIENT_SIDE_MAC.0);
            send_raw(&mut back, &pages, &tx, &[(NETTXF_CSUM_BLANK, &frame)]);
            let got = back.take_frame().unwrap();
            router.handle_client_frame(id, &got, Instant::from_millis(1));
            let out = router.pop_uplink_frame().expect("forwarded");
            assert_eq!(out[26..30], [10, 137, 0, 2], "source NATed");
            assert!(l4_checksum_ok(&out), "protocol {protocol}");
        }
    }

    #[test]
    fn checksum_flags_never_make_a_denied_frame_pass() {
        use crate::platform::xen::csum::tests::blank_frame;
        for flags in [
            0,
            NETTXF_CSUM_BLANK,
            NETTXF_DATA_VALIDATED,
            NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED,
        ] {
            // Only UDP is allowed: TCP must be dropped whatever the flags.
            let (mut router, id) =
                router(&[("0000", "action=accept proto=udp"), ("policy", "drop")]);
            let (_front, mut back, pages, tx) = pair();
            let mut tcp = blank_frame(false, 6, b"GET");
            tcp[0..6].copy_from_slice(&crate::arp::CLIENT_SIDE_MAC.0);
            let mut udp = blank_frame(false, 17, b"ok");
            udp[0..6].copy_from_slice(&crate::arp::CLIENT_SIDE_MAC.0);
            send_raw(&mut back, &pages, &tx, &[(flags, &tcp), (flags, &udp)]);
            let mut forwarded = Vec::new();
            while let Some(frame) = back.take_frame() {
                router.handle_client_frame(id, &frame, Instant::from_millis(1));
                while let Some(out) = router.pop_uplink_frame() {
                    forwarded.push(out[23]);
                }
            }
            assert_eq!(forwarded, [17], "flags {flags}");
        }
    }

    /// A netback whose client (a Linux-style frontend written by hand)
    /// posts RX buffers on pages 300.. and took every feature it names.
    fn rx_back(
        features: FrontendFeatures,
    ) -> (Netback<VecMemory, Pages, NoNotify>, Pages, VecMemory) {
        let tx = VecMemory::new(PAGE);
        let rx = VecMemory::new(PAGE);
        let pages = Pages::default();
        for i in 0..40u32 {
            pages.0.borrow_mut().insert(300 + i, VecMemory::new(PAGE));
        }
        let mut back = Netback::new(tx, rx.clone(), 7, 2, pages.clone(), NoNotify);
        back.set_frontend_features(features);
        (back, pages, rx)
    }

    const ALL: FrontendFeatures = FrontendFeatures {
        sg: true,
        gso4: true,
        gso6: true,
        csum: true,
        csum6: true,
    };

    /// Posts `n` RX requests (ids 1000 + ring index, grants 300 + i).
    fn post_rx(rx: &VecMemory, n: u32) {
        let start = rx.load_u32(REQ_PROD);
        for i in 0..n {
            let index = start + i;
            let at = RING_HEADER + (index % RING_SIZE) as usize * RX_ENTRY;
            rx.store_u16(at, 1000 + (index % RING_SIZE) as u16);
            rx.store_u32(at + 4, 300 + index % 40);
        }
        rx.store_u32(REQ_PROD, start + n);
    }

    /// The responses from ring index `from` to `rsp_prod`: (id, offset,
    /// flags, status) as 4 u16s.
    fn rx_responses(rx: &VecMemory, from: u32) -> Vec<[u16; 4]> {
        let prod = rx.load_u32(RSP_PROD);
        (from..prod)
            .map(|index| {
                let at = RING_HEADER + (index % RING_SIZE) as usize * RX_ENTRY;
                [
                    rx.load_u16(at),
                    rx.load_u16(at + 2),
                    rx.load_u16(at + 4),
                    rx.load_u16(at + 6),
                ]
            })
            .collect()
    }

    #[test]
    fn a_gso_packet_reaches_a_linux_style_frontend_whole_with_its_extra_info() {
        let (frame, offload) = gso_frame(44 * 1448);
        assert_eq!(frame.len(), 63766);
        let (mut back, pages, rx) = rx_back(ALL);
        assert_eq!(
            back.tx_offloads(),
            TxOffloads {
                csum: true,
                tso4: true,
                tso6: true
            }
        );
        post_rx(&rx, 40);
        assert_eq!(back.send_offloaded(&frame, offload), Sent::Sent);
        assert_eq!(pages.batches(), 1, "16 data slots, one grant copy batch");
        let rsp = rx_responses(&rx, 0);
        // 16 data slots and the GSO segment.
        assert_eq!(rsp.len(), 17);
        assert_eq!(
            rsp[0],
            [
                1000,
                0,
                NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED | NETRXF_MORE_DATA | NETRXF_EXTRA_INFO,
                4096
            ]
        );
        // XEN_NETIF_EXTRA_TYPE_GSO, no more extras, size 1448, TCPv4.
        assert_eq!(
            rsp[1],
            [
                u16::from_le_bytes([EXTRA_TYPE_GSO, 0]),
                1448,
                u16::from(GSO_TYPE_TCPV4),
                0
            ]
        );
        let mut got = Vec::new();
        for (i, r) in rsp.iter().enumerate().skip(2) {
            assert_eq!(r[0], 1000 + i as u16, "ids echoed");
            let last = i + 1 == rsp.len();
            assert_eq!(r[2], if last { 0 } else { NETRXF_MORE_DATA });
        }
        for (i, r) in rsp.iter().enumerate().filter(|(i, _)| *i != 1) {
            let mut part = vec![0u8; r[3] as usize];
            pages.0.borrow()[&(300 + i as u32)].read_bytes(0, &mut part);
            got.extend_from_slice(&part);
        }
        assert_eq!(got, frame);
        assert_eq!(back.stats().gso_to_client, 1);
        assert_eq!(back.stats().to_client, 1);
        // A complete frame after it: one slot, no flags.
        let small = tcp4_frame(100);
        assert_eq!(back.send_offloaded(&small, Offload::NONE), Sent::Sent);
        let rsp = rx_responses(&rx, 17);
        assert_eq!(rsp, [[1017, 0, 0, small.len() as u16]]);
        // A partial checksum alone: blank and validated, one slot.
        let mut partial = tcp4_frame(100);
        let p = offload::accept(
            &mut partial,
            NicOffload {
                csum_partial: true,
                ..NicOffload::default()
            },
        )
        .unwrap();
        assert_eq!(back.send_offloaded(&partial, p), Sent::Sent);
        assert_eq!(
            rx_responses(&rx, 18),
            [[
                1018,
                0,
                NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED,
                partial.len() as u16
            ]]
        );
    }

    #[test]
    fn a_gso_packet_waits_for_enough_rx_buffers() {
        let (frame, offload) = gso_frame(10 * 1448);
        let (mut back, _pages, rx) = rx_back(ALL);
        // 4 data slots and the extra: 5 needed, 4 posted.
        post_rx(&rx, 4);
        assert_eq!(back.send_offloaded(&frame, offload), Sent::NoRoom);
        assert_eq!(rx.load_u32(RSP_PROD), 0);
        assert_eq!(rx.load_u32(REQ_EVENT), 5, "notify when 5 are there");
        post_rx(&rx, 1);
        assert_eq!(back.send_offloaded(&frame, offload), Sent::Sent);
        assert_eq!(rx.load_u32(RSP_PROD), 5);
        // Plain `send` drops when there is no room.
        back.send(&tcp4_frame(10));
        assert_eq!(back.stats().dropped, 1);
    }

    #[test]
    fn offloads_the_frontend_did_not_take_are_never_sent_to_it() {
        let (frame, offload) = gso_frame(10 * 1448);
        for features in [
            FrontendFeatures::default(),
            FrontendFeatures { sg: false, ..ALL },
            FrontendFeatures { gso4: false, ..ALL },
            FrontendFeatures { csum: false, ..ALL },
            FrontendFeatures {
                csum6: false,
                ..ALL
            },
        ] {
            let (mut back, _pages, rx) = rx_back(features);
            assert!(!back.tx_offloads().tso4, "{features:?}");
            post_rx(&rx, 40);
            assert_eq!(back.send_offloaded(&frame, offload), Sent::Dropped);
            assert_eq!(rx.load_u32(RSP_PROD), 0);
            // A complete frame over a page is refused too.
            assert_eq!(back.send_offloaded(&frame, Offload::NONE), Sent::Dropped);
            assert_eq!(back.stats().dropped, 2);
        }
        let (back, _, _) = rx_back(FrontendFeatures { gso6: false, ..ALL });
        assert_eq!(
            back.tx_offloads(),
            TxOffloads {
                csum: true,
                tso4: true,
                tso6: false
            }
        );
    }

    #[test]
    fn a_hostile_rx_frontend_gets_errors_not_a_crash() {
        let (frame, offload) = gso_frame(10 * 1448);
        // A grant it did not give: the packet's first status is an error,
        // its slots are used up, nothing panics.
        let (mut back, _pages, rx) = rx_back(ALL);
        post_rx(&rx, 10);
        let at = RING_HEADER + 3 * RX_ENTRY;
        rx.store_u32(at + 4, 9999);
        assert_eq!(back.send_offloaded(&frame, offload), Sent::Sent);
        let rsp = rx_responses(&rx, 0);
        assert_eq!(rsp.len(), 5);
        assert_eq!(rsp[0][3] as i16, RSP_ERROR);
        assert_eq!(back.stats().bad_requests, 1);
        assert_eq!(back.stats().gso_to_client, 0);
        // Then a good one goes on.
        assert_eq!(back.send_offloaded(&frame, offload), Sent::Sent);
        assert_eq!(back.stats().gso_to_client, 1);
        // A req_prod more than a ring ahead stops the vif.
        let (mut back, _pages, rx) = rx_back(ALL);
        rx.store_u32(REQ_PROD, 10_000);
        assert_eq!(back.send_offloaded(&frame, offload), Sent::Dropped);
        assert!(back.broken().is_some());
        // Over 64 KiB: dropped.
        let (mut back, _pages, rx) = rx_back(ALL);
        post_rx(&rx, 40);
        let huge = vec![0u8; offload::MAX_OFFLOAD_FRAME + 1];
        assert_eq!(back.send_offloaded(&huge, offload), Sent::Dropped);
        assert_eq!(rx.load_u32(RSP_PROD), 0);
    }

    #[test]
    fn gso_frames_cross_whole_both_ways_between_our_netfront_and_our_netback() {
        use crate::platform::xen::netfront::BackendFeatures;
        let (mut front, mut back, pages, _) = pair();
        front.set_backend_features(BackendFeatures {
            sg: true,
            gso4: true,
            gso6: true,
            csum6: true,
        });
        back.set_frontend_features(ALL);
        let (frame, offload) = gso_frame(12 * 1448 + 7);
        // Enough rounds to wrap both 256-slot rings several times (one
        // and a little more under Miri, where each round takes seconds).
        let rounds: u64 = if cfg!(miri) { 50 } else { 300 };
        for round in 0..rounds {
            assert_eq!(front.send_offloaded(&frame, offload), Sent::Sent, "{round}");
            back.poll();
            assert_eq!(back.take_frame_offloaded(), Some((frame.clone(), offload)));
            assert_eq!(back.send_offloaded(&frame, offload), Sent::Sent, "{round}");
            front.poll();
            assert_eq!(front.take_frame_offloaded(), Some((frame.clone(), offload)));
        }
        assert_eq!(back.stats().gso_from_client, rounds);
        assert_eq!(back.stats().gso_to_client, rounds);
        // 6 slots each way per frame, one grant copy batch each.
        assert_eq!(u64::from(pages.batches()), 2 * rounds);
        assert_eq!(back.stats().copy_batches, 2 * rounds);
        assert_eq!(front.stats().rx_gso, rounds);
        assert_eq!(front.stats().tx_gso, rounds);
        assert_eq!(front.stats().protocol_errors, 0);
        assert_eq!(back.stats().bad_requests, 0);
    }

    /// `rx_back` with 256 client pages (grants 300..556) and a ring of
    /// requests each naming its own page, so a batch's frames never share
    /// one.
    fn rx_back_wide() -> (Netback<VecMemory, Pages, NoNotify>, Pages, VecMemory) {
        let (mut back, pages, rx) = rx_back(ALL);
        for i in 40..RING_SIZE {
            pages.0.borrow_mut().insert(300 + i, VecMemory::new(PAGE));
        }
        for index in 0..RING_SIZE {
            let at = RING_HEADER + index as usize * RX_ENTRY;
            rx.store_u16(at, 1000 + index as u16);
            rx.store_u32(at + 4, 300 + index);
        }
        rx.store_u32(REQ_PROD, RING_SIZE);
        back.batching = true;
        (back, pages, rx)
    }

    /// The frames the published responses from ring index 0 deliver,
    /// read back from the client's pages, with each first status.
    fn delivered(rx: &VecMemory, pages: &Pages) -> Vec<(i16, Vec<u8>)> {
        let rsp = rx_responses(rx, 0);
        let mut frames = Vec::new();
        let mut current: Option<(i16, Vec<u8>)> = None;
        let mut index = 0;
        while index < rsp.len() {
            let [id, _, flags, status] = rsp[index];
            let gref = 300 + u32::from(id - 1000);
            let (_, bytes) = current.get_or_insert_with(|| (status as i16, Vec::new()));
            if status as i16 > 0 {
                let mut part = vec![0u8; usize::from(status)];
                pages.0.borrow()[&gref].read_bytes(0, &mut part);
                bytes.extend_from_slice(&part);
            }
            // The GSO extra-info segment follows a first slot flagged so.
            index += if flags & NETRXF_EXTRA_INFO != 0 { 2 } else { 1 };
            if flags & NETRXF_MORE_DATA == 0 {
                frames.extend(current.take());
            }
        }
        frames
    }

    #[test]
    fn held_frames_cross_in_one_copy_per_batch_published_only_after_it() {
        let (mut back, pages, rx) = rx_back_wide();
        *pages.2.borrow_mut() = Some((rx.clone(), Vec::new()));
        let mut sent = Vec::new();
        let mut buffers = Vec::new();
        for i in 0..20u8 {
            let (mut frame, offload) = if i % 2 == 0 {
                gso_frame(44 * 1448) // 16 pages
            } else {
                (tcp4_frame(100 + usize::from(i)), Offload::NONE)
            };
            frame[60] = i; // tell them apart
            sent.push(frame.clone());
            buffers.push(frame.as_ptr());
            assert_eq!(back.send_owned(&mut frame, offload), Sent::Sent);
            assert!(frame.is_empty(), "the buffer is taken");
        }
        // 7 GSO frames and 7 small ones (119 pages) filled a batch: the
        // 8th GSO frame's 16 pages would pass MAX_SCATTER_SEGMENTS.
        assert_eq!(pages.batches(), 1);
        assert_eq!(
            rx.load_u32(RSP_PROD),
            0,
            "nothing published before the flush"
        );
        assert_eq!(back.stats().to_client, 14);
        back.flush();
        assert_eq!(pages.batches(), 2, "the other 6 frames in one more copy");
        let seen = pages.2.borrow().as_ref().map(|(_, seen)| seen.clone());
        assert_eq!(seen, Some(vec![0, 0]), "both copies before any publication");
        let got = delivered(&rx, &pages);
        assert_eq!(got.len(), 20);
        for ((status, bytes), frame) in got.iter().zip(&sent) {
            assert!(*status > 0);
            assert_eq!(bytes, frame);
        }
        let stats = back.stats();
        assert_eq!((stats.to_client, stats.gso_to_client), (20, 10));
        assert_eq!(stats.copy_batches, 2);
        assert_eq!((stats.bad_requests, stats.dropped), (0, 0));
        // Every buffer went to the pool, none copied or lost.
        assert_eq!(back.pool.len(), 20);
        let mut pooled = Vec::new();
        while !back.pool.is_empty() {
            pooled.push(back.pool.take(1).as_ptr());
        }
        buffers.sort();
        pooled.sort();
        assert_eq!(pooled, buffers);
        // Nothing held: a second flush copies and publishes nothing.
        let prod = rx.load_u32(RSP_PROD);
        back.flush();
        assert_eq!((pages.batches(), rx.load_u32(RSP_PROD)), (2, prod));
    }

    #[test]
    fn a_refused_copy_fails_only_its_held_frame_and_a_stopped_vif_drops_the_held() {
        let (mut back, pages, rx) = rx_back_wide();
        // The client names a grant it never gave in its second request.
        rx.store_u32(RING_HEADER + RX_ENTRY + 4, 9999);
        let frames: Vec<Vec<u8>> = (0..3).map(|i| tcp4_frame(200 + i)).collect();
        for frame in &frames {
            assert_eq!(
                back.send_owned(&mut frame.clone(), Offload::NONE),
                Sent::Sent
            );
        }
        back.flush();
        let got = delivered(&rx, &pages);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (frames[0].len() as i16, frames[0].clone()));
        assert_eq!(got[1].0, RSP_ERROR, "its slot back, as an error");
        assert_eq!(got[2], (frames[2].len() as i16, frames[2].clone()));
        assert_eq!((back.stats().to_client, back.stats().bad_requests), (2, 1));
        assert_eq!(back.pool.len(), 3);

        // Held frames of a vif that stops before the flush: never copied
        // nor published, counted as dropped, their buffers kept.
        let (mut back, pages, rx) = rx_back_wide();
        for frame in &frames[..2] {
            assert_eq!(
                back.send_owned(&mut frame.clone(), Offload::NONE),
                Sent::Sent
            );
        }
        rx.store_u32(REQ_PROD, 10_000);
        let mut third = frames[2].clone();
        assert_eq!(back.send_owned(&mut third, Offload::NONE), Sent::Dropped);
        assert_eq!(third, frames[2], "a frame not sent stays with the caller");
        assert!(back.broken().is_some());
        back.flush();
        assert_eq!(rx.load_u32(RSP_PROD), 0);
        assert_eq!(pages.batches(), 0);
        assert_eq!((back.stats().to_client, back.stats().dropped), (0, 3));
        assert_eq!(back.pool.len(), 2);
    }

    #[test]
    fn send_owned_keeps_the_frame_when_it_cannot_hold_it() {
        // No buffers posted: not taken, the frame stays whole.
        let (mut back, pages, rx) = rx_back(ALL);
        back.batching = true;
        let frame = tcp4_frame(100);
        let mut mine = frame.clone();
        assert_eq!(back.send_owned(&mut mine, Offload::NONE), Sent::NoRoom);
        assert_eq!(mine, frame);
        // Not batching: copied and published at once, the frame kept.
        back.batching = false;
        post_rx(&rx, 1);
        assert_eq!(back.send_owned(&mut mine, Offload::NONE), Sent::Sent);
        assert_eq!(mine, frame);
        assert_eq!(pages.batches(), 1);
        assert_eq!(rx_responses(&rx, 0), [[1000, 0, 0, frame.len() as u16]]);
        assert!(back.pool.is_empty());
    }

    #[test]
    fn frames_without_a_posted_buffer_are_dropped_and_counted() {
        let (mut front, mut back, _, _) = pair();
        for _ in 0..20 {
            back.send(&[1; 64]);
        }
        assert_eq!(back.stats().to_client, 16);
        assert_eq!(back.stats().dropped, 4);
        front.poll();
        while front.take_frame().is_some() {}
        back.send(&[2; 64]); // buffers reposted by the frontend
        assert_eq!(back.stats().to_client, 17);
    }

    /// Counts notifications.
    #[derive(Clone, Default)]
    struct Count(Rc<core::cell::Cell<u32>>);
    impl Notify for Count {
        fn notify(&self, _: u32) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// What [`counted_pair`] makes: the two ends, their counters, the rings.
    type CountedPair<M> = (
        Netfront<VecMemory, Count>,
        Netback<M, Pages, Count>,
        Count,
        Count,
        VecMemory,
        VecMemory,
    );

    /// A hook run once, from inside a store.
    type Hook = Rc<RefCell<Option<alloc::boxed::Box<dyn FnOnce()>>>>;

    /// Our netfront and netback, each counting the notifications it sends,
    /// over ring memory `M` made from the plain pages.
    fn counted_pair<M: SharedMemory>(wrap: impl Fn(VecMemory) -> M) -> CountedPair<M> {
        let tx = VecMemory::new(PAGE);
        let rx = VecMemory::new(PAGE);
        let pages = Pages::default();
        let make = |base: u32, n: usize| -> Vec<Buffer<VecMemory>> {
            (0..n)
                .map(|i| {
                    let mem = VecMemory::new(PAGE);
                    pages.0.borrow_mut().insert(base + i as u32, mem.clone());
                    Buffer {
                        mem,
                        gref: base + i as u32,
                    }
                })
                .collect()
        };
        let (front_count, back_count) = (Count::default(), Count::default());
        let (tx_bufs, rx_bufs) = (make(100, 16), make(200, 16));
        let front = Netfront::new(
            tx.clone(),
            rx.clone(),
            tx_bufs,
            rx_bufs,
            1,
            front_count.clone(),
        );
        let back = Netback::new(
            wrap(tx.clone()),
            wrap(rx.clone()),
            7,
            2,
            pages,
            back_count.clone(),
        );
        (front, back, front_count, back_count, tx, rx)
    }

    fn send_from(front: &mut Netfront<VecMemory, Count>, byte: u8) {
        // Without a poll of the TX responses (smoltcp's transmit polls).
        front.send(60, |b| b.fill(byte));
    }

    #[test]
    fn notifications_go_only_where_the_peers_event_index_asks() {
        let (mut front, mut back, front_count, back_count, tx, _rx) = counted_pair(|m| m);
        // The client's first request passes req_event 1 (SHARED_RING_INIT):
        // one notification; the next two, before we looked, none.
        for byte in 1..=3 {
            send_from(&mut front, byte);
        }
        assert_eq!(front_count.0.get(), 1);
        // One poll answers all three and publishes them once: one
        // notification for the batch (rsp_event 1), and asks for the next.
        back.poll();
        assert_eq!(back_count.0.get(), 1);
        assert_eq!(tx.load_u32(REQ_EVENT), 4);
        for byte in 1..=3 {
            assert_eq!(back.take_frame().unwrap(), [byte; 60]);
        }
        // Nothing new: no notification.
        back.poll();
        assert_eq!(back_count.0.get(), 1);
        // The next request passes req_event 4: notified.
        send_from(&mut front, 4);
        assert_eq!(front_count.0.get(), 2);
        // The client has not looked at its TX responses (rsp_event still
        // 1): publishing response 4 wakes nobody.
        back.poll();
        assert_eq!(back.take_frame().unwrap(), [4; 60]);
        assert_eq!(back_count.0.get(), 1);
        // Once it looked (rsp_event 5), the next response notifies.
        front.poll();
        assert_eq!(tx.load_u32(RSP_EVENT), 5);
        send_from(&mut front, 5);
        back.poll();
        assert_eq!(back_count.0.get(), 2);
        // Towards the client: the first frame passes its RX rsp_event (1),
        // the second does not until the client has looked.
        back.send(&[6; 60]);
        back.send(&[7; 60]);
        assert_eq!(back_count.0.get(), 3);
        front.poll();
        while front.take_frame().is_some() {}
        back.send(&[8; 60]);
        assert_eq!(back_count.0.get(), 4);
        assert_eq!(back.stats().notifications, 4);
        assert_eq!(u64::from(front_count.0.get()), front.stats().notifications);
    }

    #[test]
    fn batching_publishes_a_batch_of_frames_with_one_index_update_and_one_notification() {
        let (mut front, mut back, front_count, back_count, tx, rx) = counted_pair(|m| m);
        front.batching = true;
        back.batching = true;
        // Towards the client: nothing is visible before the flush, then
        // all four frames with one notification.
        for byte in 1..=4 {
            assert_eq!(back.send_offloaded(&[byte; 60], Offload::NONE), Sent::Sent);
        }
        assert_eq!(rx.load_u32(RSP_PROD), 0);
        front.poll();
        assert!(front.take_frame().is_none());
        assert_eq!(back_count.0.get(), 0);
        back.flush();
        assert_eq!(rx.load_u32(RSP_PROD), 4);
        assert_eq!(back_count.0.get(), 1);
        front.poll();
        for byte in 1..=4 {
            assert_eq!(front.take_frame().unwrap(), [byte; 60]);
        }
        back.flush(); // nothing new: no notification
        assert_eq!(back_count.0.get(), 1);
        // From the client: the same for its TX requests.
        for byte in 5..=8 {
            assert_eq!(front.send_offloaded(&[byte; 60], Offload::NONE), Sent::Sent);
        }
        assert_eq!(tx.load_u32(REQ_PROD), 0);
        back.poll();
        assert!(back.take_frame().is_none());
        front.flush();
        assert_eq!(tx.load_u32(REQ_PROD), 4);
        assert_eq!(front_count.0.get(), 1);
        back.poll();
        for byte in 5..=8 {
            assert_eq!(back.take_frame().unwrap(), [byte; 60]);
        }
        // The smoltcp paths publish at once, batching or not.
        send_from(&mut front, 9);
        assert_eq!(tx.load_u32(REQ_PROD), 5);
        back.send(&[10; 60]);
        assert_eq!(rx.load_u32(RSP_PROD), 5);
    }

    /// Ring memory whose next store of `req_event` first runs a hook: the
    /// client publishing a request just before our final check's event
    /// index is visible (so it saw the old one and does not notify).
    #[derive(Clone)]
    struct Racing {
        mem: VecMemory,
        hook: Hook,
    }
    impl SharedMemory for Racing {
        fn len(&self) -> usize {
            self.mem.len()
        }
        fn load_u32(&self, offset: usize) -> u32 {
            self.mem.load_u32(offset)
        }
        fn store_u32(&self, offset: usize, value: u32) {
            if offset == REQ_EVENT {
                let hook = self.hook.borrow_mut().take();
                if let Some(hook) = hook {
                    hook();
                }
            }
            self.mem.store_u32(offset, value);
        }
        fn load_u8(&self, offset: usize) -> u8 {
            self.mem.load_u8(offset)
        }
        fn store_u8(&self, offset: usize, value: u8) {
            self.mem.store_u8(offset, value);
        }
        fn load_u16(&self, offset: usize) -> u16 {
            self.mem.load_u16(offset)
        }
        fn store_u16(&self, offset: usize, value: u16) {
            self.mem.store_u16(offset, value);
        }
        fn fetch_or_u8(&self, offset: usize, bits: u8) -> u8 {
            self.mem.fetch_or_u8(offset, bits)
        }
        fn fetch_and_u8(&self, offset: usize, bits: u8) -> u8 {
            self.mem.fetch_and_u8(offset, bits)
        }
        fn compare_exchange_u16(&self, offset: usize, current: u16, new: u16) -> u16 {
            self.mem.compare_exchange_u16(offset, current, new)
        }
        fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
            self.mem.read_bytes(offset, dst);
        }
        fn write_bytes(&self, offset: usize, src: &[u8]) {
            self.mem.write_bytes(offset, src);
        }
    }

    #[test]
    fn a_request_published_during_the_final_check_is_not_lost() {
        let hook = Rc::new(RefCell::new(None));
        let (front, mut back, front_count, _, tx, _) = counted_pair(|mem| Racing {
            mem,
            hook: hook.clone(),
        });
        let front = Rc::new(RefCell::new(front));
        send_from(&mut front.borrow_mut(), 1);
        back.poll();
        assert_eq!(back.take_frame().unwrap(), [1; 60]);
        // Request 2 goes in while we consume request 3 and set req_event:
        // the client reads req_event 2 (from the last poll), passes it and
        // notifies; request 3 goes in just before our req_event 4 is
        // stored, so the client sees req_event 2 and stays silent.
        send_from(&mut front.borrow_mut(), 2);
        assert_eq!(front_count.0.get(), 2);
        let racer = front.clone();
        *hook.borrow_mut() = Some(alloc::boxed::Box::new(move || {
            send_from(&mut racer.borrow_mut(), 3);
        }) as alloc::boxed::Box<dyn FnOnce()>);
        back.poll();
        assert_eq!(front_count.0.get(), 2, "the racing request notified nobody");
        assert_eq!(tx.load_u32(REQ_PROD), 3);
        // The final check saw it: both taken in that one poll.
        assert_eq!(back.take_frame().unwrap(), [2; 60]);
        assert_eq!(back.take_frame().unwrap(), [3; 60]);
        assert_eq!(tx.load_u32(REQ_EVENT), 4);
        // A request after the final check passes req_event 4: notified.
        send_from(&mut front.borrow_mut(), 4);
        assert_eq!(front_count.0.get(), 3);
    }

    #[test]
    fn hostile_event_indices_change_only_whom_we_notify() {
        let (mut front, mut back, _, back_count, tx, rx) = counted_pair(|m| m);
        let mut expected = 0u64;
        for (round, event) in [0u32, u32::MAX, 0x8000_0000, 7, 0x7fff_ffff, 1]
            .into_iter()
            .enumerate()
        {
            send_from(&mut front, round as u8);
            tx.store_u32(RSP_EVENT, event);
            rx.store_u32(RSP_EVENT, event);
            back.poll();
            assert_eq!(back.take_frame().unwrap(), [round as u8; 60]);
            back.send(&[round as u8; 60]);
            front.poll();
            while front.take_frame().is_some() {}
            // The client's poll wrote its own indices: the hostile ones go
            // back in before our next push.
            tx.store_u32(RSP_EVENT, event);
            rx.store_u32(RSP_EVENT, event);
            expected = back.stats().notifications;
        }
        assert_eq!(back.broken(), None);
        assert_eq!(back.stats().from_client, 6);
        assert_eq!(back.stats().to_client, 6);
        assert_eq!(u64::from(back_count.0.get()), expected);
        assert!(expected <= 12);
    }
}
