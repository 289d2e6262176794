//! Fuzzes everything in the Xen platform layer that reads what another
//! domain (or the toolstack) wrote: the xenstore client fed arbitrary
//! xenstored bytes, a vchan server and client whose shared page a hostile
//! peer rewrites between our calls, a netfront whose rings a hostile
//! netback rewrites, a netback whose TX ring and granted pages a hostile
//! netfront writes (multi-slot packets, GSO extra info; what it accepts
//! is cut again by the software segmenter) and whose RX ring it rewrites
//! while we deliver GSO frames, a netfront taking multi-slot/GSO
//! responses and sending GSO frames to a hostile backend (features from
//! the input), and the PVH start info. Nothing may panic; the
//! `Vec`-backed shared memory also asserts (debug builds) that our own code
//! never reaches outside a shared region, whatever the peer wrote.
//!
//! Input: byte 0 picks the target; the rest is the peer's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::vchan::RingOrders;
use smoltcp::phy::{Device, RxToken, TxToken};
use smoltcp::time::Instant;
use unikernel::platform::xen::events::Notify;
use unikernel::offload::{GsoKind, NicOffload, Offload};
use unikernel::platform::xen::netback::{
    CopyRefused, FrontendFeatures, GrantCopy, MAX_SCATTER_PACKETS, MAX_SCATTER_SEGMENTS, Netback,
    Scatter, Sent,
};
use unikernel::platform::xen::netfront::{BackendFeatures, Buffer, Netfront, PageLender};
use unikernel::platform::xen::shared::{SharedMemory, VecMemory};
use unikernel::platform::xen::start_info::BootInfo;
use unikernel::platform::xen::vchan::{RingBuffer, VchanRing, read_grants, read_orders};
use unikernel::platform::{ByteStream, LinkState, StreamError, Xenstore};
use unikernel::xenstore::{NoWait, XenstoreClient};

#[derive(Clone, Copy)]
struct NoNotify;
impl Notify for NoNotify {
    fn notify(&self, _: u32) {}
}

/// A xenstored that answers with the fuzz bytes, in chunks.
struct Replay<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl ByteStream for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        Ok(buf.len())
    }
    fn state(&self) -> LinkState {
        LinkState::Connected
    }
    fn close(&mut self) {}
}

/// Writes peer bytes over a region, 8 bytes at a time at offsets chosen by
/// the input.
fn scribble(mem: &VecMemory, input: &[u8]) {
    for piece in input.chunks(10) {
        if piece.len() < 10 {
            break;
        }
        let offset = usize::from(u16::from_le_bytes([piece[0], piece[1]])) % mem.len().max(1);
        let end = (offset + 8).min(mem.len());
        mem.write_bytes(offset, &piece[2..2 + (end - offset)]);
    }
}

fn xenstore(data: &[u8]) {
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut xs = XenstoreClient::new(Replay { data, chunk }, NoWait);
    xs.set_max_waits(1);
    let _ = xs.read("domid");
    let _ = xs.directory("backend/vif");
    let _ = xs.write("data/x", "1");
    let _ = xs.transaction_start();
    let _ = xs.transaction_end(true);
    while xs.poll_watch().is_some() {}
}

fn vchan(data: &[u8], server: bool) {
    let ctrl = VecMemory::new(4096);
    let pages = [VecMemory::new(4096), VecMemory::new(4096)];
    let orders = RingOrders::for_server(4096, 4096).unwrap();
    let buffer = |i: usize| RingBuffer { mem: pages[i].clone(), base: 0 };
    let mut ring = if server {
        VchanRing::server(ctrl.clone(), &orders, &[8, 9], buffer(0), buffer(1), 1, NoNotify)
    } else {
        scribble(&ctrl, data.get(..40).unwrap_or_default());
        let Ok(seen) = read_orders(&ctrl) else { return };
        let _ = read_grants(&ctrl, &seen);
        // Map every ring in our one page, as a client would after checks.
        let place = |layout: protocol::vchan::RingLayout| match layout.placement() {
            protocol::vchan::RingPlacement::InPage { offset } => RingBuffer { mem: ctrl.clone(), base: offset },
            protocol::vchan::RingPlacement::Granted { pages: n, .. } => {
                RingBuffer { mem: VecMemory::new(n * 4096), base: 0 }
            }
        };
        VchanRing::client(ctrl.clone(), &seen, place(seen.right()), place(seen.left()), 1, NoNotify)
    };
    let mut buf = [0u8; 5000];
    for piece in data.chunks(60) {
        scribble(&ctrl, piece);
        scribble(&pages[usize::from(piece.first().copied().unwrap_or(0) & 1)], piece);
        let _ = ring.read(&mut buf);
        let _ = ring.write(&buf[..usize::from(piece.len() as u8) * 20]);
        let _ = ring.state();
    }
    ring.close();
}

/// A valid TCP/IPv4 GSO frame (checksum partial) of `payload` bytes.
fn gso_frame(payload: usize) -> (Vec<u8>, Offload) {
    let mut f = vec![0u8; 54 + payload];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[46] = 0x50;
    let nic = NicOffload { csum_partial: true, gso: GsoKind::TcpV4, gso_size: 1448, ..NicOffload::default() };
    let offload = unikernel::offload::accept(&mut f, nic).unwrap_or(Offload::NONE);
    (f, offload)
}

fn check_offloaded(frame: &[u8], offload: Offload) {
    assert!(frame.len() <= unikernel::offload::MAX_OFFLOAD_FRAME);
    assert!(offload.is_gso() || frame.len() <= 1514);
    let mut scratch = Vec::new();
    let mut pieces = 0usize;
    let _ = unikernel::offload::finish(frame, offload, &mut scratch, &mut |p| {
        assert!(p.len() <= frame.len().max(1514));
        pieces += 1;
    });
    assert!(pieces <= unikernel::offload::MAX_SEGMENTS);
}

/// Lends pages by number; a page the input marks stays "mapped" (its
/// revocation refused) until the next round. Every grant must be ended
/// exactly once, and never while mapped.
#[derive(Debug, Default)]
struct Lender {
    granted: std::collections::BTreeSet<u32>,
    next: u32,
    /// Set by the input each round: bit 7 holds grants `n % 7 == low bits`.
    held: std::rc::Rc<std::cell::Cell<u8>>,
}

impl PageLender for Lender {
    fn lendable(&self, _: &[u8]) -> bool {
        true
    }
    fn grant(&mut self, page: &[u8]) -> Option<u32> {
        assert_eq!(page.len(), 4096);
        if self.granted.len() >= 64 {
            return None;
        }
        self.next += 1;
        self.granted.insert(self.next);
        Some(self.next)
    }
    fn revoke(&mut self, gref: u32) -> bool {
        let held = self.held.get();
        if held & 0x80 != 0 && gref % 7 == u32::from(held % 7) {
            return false;
        }
        assert!(self.granted.remove(&gref), "grant {gref} ended twice or never made");
        true
    }
}

fn netfront(data: &[u8]) {
    let tx = VecMemory::new(4096);
    let rx = VecMemory::new(4096);
    let bufs = |n: usize, base: u32| -> Vec<Buffer<VecMemory>> {
        (0..n).map(|i| Buffer { mem: VecMemory::new(4096), gref: base + i as u32 }).collect()
    };
    let mut front = Netfront::new(tx.clone(), rx.clone(), bufs(24, 100), bufs(24, 200), 3, NoNotify);
    let f = data.first().copied().unwrap_or(0);
    // Half the inputs lend frames' pages and publish in batches.
    let held = std::rc::Rc::new(std::cell::Cell::new(0u8));
    if f & 0x10 != 0 {
        front.set_lender(Box::new(Lender { held: held.clone(), ..Lender::default() }));
        front.batching = f & 0x20 != 0;
    }
    front.set_backend_features(BackendFeatures {
        sg: f & 1 != 0,
        gso4: f & 2 != 0,
        gso6: f & 4 != 0,
        csum6: f & 8 != 0,
    });
    let (gso, offload) = gso_frame(usize::from(f) * 97 % 30_000 + 1);
    for piece in data.chunks(40) {
        scribble(if piece.first().copied().unwrap_or(0) & 1 == 0 { &tx } else { &rx }, piece);
        let which = piece.get(1).copied().unwrap_or(0);
        held.set(piece.get(2).copied().unwrap_or(0));
        if which & 1 == 0 {
            while let Some((rx_token, _)) = front.receive(Instant::from_millis(0)) {
                rx_token.consume(|frame| assert!(frame.len() <= 1514));
            }
        } else {
            front.poll();
            while let Some((frame, offload)) = front.take_frame_offloaded() {
                check_offloaded(&frame, offload);
            }
        }
        if which & 2 == 0 {
            if let Some(token) = front.transmit(Instant::from_millis(0)) {
                token.consume(usize::from(piece.len() as u8) * 40, |b| b.fill(0xaa));
            }
        } else if which & 4 == 0 {
            let _ = front.send_offloaded(&gso, offload);
        } else {
            let mut owned = gso.clone();
            let _ = front.send_owned(&mut owned, offload);
            assert!(owned.is_empty() || owned == gso);
        }
        front.flush();
    }
    // Released: whatever is still lent comes back with its grants.
    let lent = front.take_lent();
    assert!(lent.len() <= unikernel::platform::xen::netfront::LENT_FRAMES);
}

/// Grant copies against four pages the hostile frontend wrote.
struct Pages(Vec<VecMemory>);

impl GrantCopy for Pages {
    fn copy_from(&mut self, _: u16, gref: u32, offset: u16, dst: &mut [u8]) -> Result<(), CopyRefused> {
        let page = self.0.get(gref as usize).ok_or(CopyRefused)?;
        if usize::from(offset) + dst.len() > 4096 {
            return Err(CopyRefused);
        }
        page.read_bytes(usize::from(offset), dst);
        Ok(())
    }
    fn copy_to(&mut self, _: u16, gref: u32, offset: u16, src: &[u8]) -> Result<(), CopyRefused> {
        let page = self.0.get(gref as usize).ok_or(CopyRefused)?;
        if usize::from(offset) + src.len() > 4096 {
            return Err(CopyRefused);
        }
        page.write_bytes(usize::from(offset), src);
        Ok(())
    }
    /// The batch bounds the netback promises, then the default.
    fn scatter_many(&mut self, dom: u16, jobs: &mut [Scatter<'_>]) {
        assert!(jobs.len() <= MAX_SCATTER_PACKETS);
        assert!(jobs.iter().map(|j| j.segments.len()).sum::<usize>() <= MAX_SCATTER_SEGMENTS);
        for job in jobs {
            job.done = self.scatter(dom, job.segments, job.src).is_ok();
        }
    }
}

fn netback(data: &[u8]) {
    let tx = VecMemory::new(4096);
    let rx = VecMemory::new(4096);
    let pages: Vec<VecMemory> = (0..4).map(|_| VecMemory::new(4096)).collect();
    let mut back = Netback::new(tx.clone(), rx.clone(), 7, 3, Pages(pages.clone()), NoNotify);
    let f = data.first().copied().unwrap_or(0);
    back.batching = f & 0x20 != 0;
    back.set_frontend_features(FrontendFeatures {
        sg: f & 1 != 0,
        gso4: f & 2 != 0,
        gso6: f & 4 != 0,
        csum: f & 8 != 0,
        csum6: f & 16 != 0,
    });
    let (gso, offload) = gso_frame(usize::from(f) * 131 % 20_000 + 1);
    for piece in data.chunks(40) {
        let which = usize::from(piece.first().copied().unwrap_or(0));
        match which % 4 {
            0 | 1 => scribble(&tx, piece),
            2 => scribble(&rx, piece),
            _ => scribble(&pages[which / 4 % 4], piece),
        }
        back.poll();
        while let Some((frame, offload)) = back.take_frame_offloaded() {
            check_offloaded(&frame, offload);
        }
        if which & 16 == 0 {
            back.send(&[0x55; 60]);
        } else if which & 32 == 0 {
            let _ = back.send_offloaded(&gso, offload);
        } else {
            // Held until a flush (batching) or copied at once; the frame
            // is taken only when held.
            let mut frame = gso.clone();
            let sent = back.send_owned(&mut frame, offload);
            assert!(frame.is_empty() == (back.batching && sent == Sent::Sent));
        }
        if which & 64 != 0 {
            back.flush();
        }
    }
    back.flush();
    assert!(back.pool.len() <= unikernel::platform::xen::frames::MAX_BUFFERS);
}

fn start_info(data: &[u8]) {
    let _ = BootInfo::parse(0, |addr, buf| {
        let Ok(start) = usize::try_from(addr) else { return false };
        match data.get(start..start.saturating_add(buf.len())) {
            Some(src) if src.len() == buf.len() => {
                buf.copy_from_slice(src);
                true
            }
            _ => false,
        }
    })
    .map(|boot| {
        let _ = boot.program_cmdline();
        let _ = boot.log_level();
        let _ = boot.ram_bytes();
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => xenstore(rest),
        1 => vchan(rest, true),
        2 => vchan(rest, false),
        3 => netfront(rest),
        4 => start_info(rest),
        _ => netback(rest),
    }
});
