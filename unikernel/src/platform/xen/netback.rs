//! netback: our end of a client qube's virtual NIC, where the firewall is
//! the backend (`backend/vif/<domid>/<device>`): the client's netfront
//! grants two rings; we consume its TX requests (frames it sends) and fill
//! the RX buffers it posts (frames we send), moving bytes with grant copy.
//!
//! Facts (Xen `public/io/netif.h`, `public/io/ring.h`, Linux
//! `xen-netback`): ring layout as in `netfront` (64-byte header, TX entries
//! of 12 bytes, RX entries of 8, 256 each); we are the consumer of
//! requests and producer of responses; we offer `feature-rx-copy` and no
//! scatter-gather or GSO, so a TX request flagged `NETTXF_more_data` or
//! `NETTXF_extra_info` is answered with `NETIF_RSP_ERROR` (and an extra-info
//! slot with `NETIF_RSP_NULL`). Checksum offload as Linux netback does it:
//! we accept blank (partial) IPv4 and IPv6 TCP/UDP checksums
//! (`feature-no-csum-offload` 0, `feature-ipv6-csum-offload` 1) and
//! complete a frame flagged `NETTXF_csum_blank` before the router sees it
//! ([`super::csum`]); one that cannot be completed is dropped and counted.
//! `NETTXF_data_validated` changes nothing (the router verifies no TCP/UDP
//! checksum). Towards the client every checksum is complete and we did
//! not verify it, so RX responses carry no `NETRXF_*` checksum flag. The frontend is hostile: its `req_prod` is
//! read once per poll and may not exceed one ring of unanswered requests;
//! offsets and sizes must stay inside one page; ids are echoed, never used
//! as indices; grant copies Xen refuses become errors, never a panic. The
//! ring logic is portable over [`SharedMemory`] and a [`GrantCopy`] seam
//! and is tested on the host against a netfront double.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use super::csum::complete_partial_checksum;
use super::events::Notify;
use super::netfront::{MAX_FRAME, NETIF_RSP_NULL, RING_HEADER, RING_SIZE, RX_ENTRY, TX_ENTRY};
use super::shared::{SharedMemory, barrier};

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
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
const PAGE: usize = 4096;

/// A grant copy Xen (or the range check before it) refused: the peer named
/// a grant it did not give us, or a range outside its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRefused;

/// Copies bytes between our memory and a peer's granted page.
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
    /// Frames dropped: no RX buffer posted by the client, or queue full.
    pub dropped: u64,
    /// Frames flagged `NETTXF_csum_blank` whose checksum could not be
    /// completed (not TCP/UDP over IP, a fragment, too short): dropped.
    pub bad_checksum_offload: u64,
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
    received: VecDeque<Vec<u8>>,
    stats: NetbackStats,
    broken: Option<&'static str>,
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
            received: VecDeque::new(),
            stats: NetbackStats::default(),
            broken: None,
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

    /// Takes the client's TX requests (its outgoing frames) into the queue.
    pub fn poll(&mut self) {
        if self.broken.is_some() {
            return;
        }
        let prod = self.tx.load_u32(REQ_PROD);
        barrier();
        // At most one ring of requests may be unanswered.
        if prod.wrapping_sub(self.tx_rsp_prod) > RING_SIZE {
            self.broken = Some("client TX req_prod more than a ring ahead");
            return;
        }
        let mut answered = false;
        let mut skip_extra = false;
        while self.tx_req_cons != prod {
            let at = RING_HEADER + (self.tx_req_cons % RING_SIZE) as usize * TX_ENTRY;
            let gref = self.tx.load_u32(at);
            let offset = self.tx.load_u16(at + 4);
            let flags = self.tx.load_u16(at + 6);
            let id = self.tx.load_u16(at + 8);
            let size = usize::from(self.tx.load_u16(at + 10));
            self.tx_req_cons = self.tx_req_cons.wrapping_add(1);
            answered = true;
            if skip_extra {
                // The slot after an extra-info request holds the extra info.
                skip_extra = false;
                self.respond_tx(id, NETIF_RSP_NULL);
                continue;
            }
            let fits = (14..=MAX_FRAME).contains(&size) && usize::from(offset) + size <= PAGE;
            if flags & (NETTXF_MORE_DATA | NETTXF_EXTRA_INFO) != 0 || !fits {
                skip_extra = flags & NETTXF_EXTRA_INFO != 0;
                self.stats.bad_requests += 1;
                self.respond_tx(id, RSP_ERROR);
                continue;
            }
            let mut frame = vec![0u8; size];
            if self
                .copier
                .copy_from(self.dom, gref, offset, &mut frame)
                .is_err()
            {
                self.stats.bad_requests += 1;
                self.respond_tx(id, RSP_ERROR);
                continue;
            }
            if flags & NETTXF_CSUM_BLANK != 0 && complete_partial_checksum(&mut frame).is_err() {
                // As Linux netback: the request was served, the frame dropped.
                self.stats.bad_checksum_offload += 1;
                self.respond_tx(id, RSP_OKAY);
                continue;
            }
            if self.received.len() < RX_QUEUE {
                self.received.push_back(frame);
                self.stats.from_client += 1;
            } else {
                self.stats.dropped += 1;
            }
            self.respond_tx(id, RSP_OKAY);
        }
        // Ask to be notified of the next request.
        self.tx
            .store_u32(REQ_EVENT, self.tx_req_cons.wrapping_add(1));
        if answered {
            barrier(); // responses before the index
            self.tx.store_u32(RSP_PROD, self.tx_rsp_prod);
            self.notify.notify(self.port);
        }
    }

    /// The next frame the client sent.
    pub fn take_frame(&mut self) -> Option<Vec<u8>> {
        self.received.pop_front()
    }

    /// Delivers a frame into the client's next posted RX buffer; dropped
    /// (and counted) when the client posted none.
    pub fn send(&mut self, frame: &[u8]) {
        if self.broken.is_some() || frame.is_empty() || frame.len() > MAX_FRAME {
            self.stats.dropped += 1;
            return;
        }
        let prod = self.rx.load_u32(REQ_PROD);
        barrier();
        if prod.wrapping_sub(self.rx_rsp_prod) > RING_SIZE {
            self.broken = Some("client RX req_prod more than a ring ahead");
            return;
        }
        if self.rx_req_cons == prod {
            self.rx
                .store_u32(REQ_EVENT, self.rx_req_cons.wrapping_add(1));
            self.stats.dropped += 1;
            return;
        }
        let at = RING_HEADER + (self.rx_req_cons % RING_SIZE) as usize * RX_ENTRY;
        let id = self.rx.load_u16(at);
        let gref = self.rx.load_u32(at + 4);
        self.rx_req_cons = self.rx_req_cons.wrapping_add(1);
        let status = if self.copier.copy_to(self.dom, gref, 0, frame).is_ok() {
            self.stats.to_client += 1;
            frame.len() as i16
        } else {
            self.stats.bad_requests += 1;
            RSP_ERROR
        };
        let rsp = RING_HEADER + (self.rx_rsp_prod % RING_SIZE) as usize * RX_ENTRY;
        self.rx.store_u16(rsp, id);
        self.rx.store_u16(rsp + 2, 0); // offset
        self.rx.store_u16(rsp + 4, 0); // no NETRXF_*: complete, not verified by us
        self.rx.store_u16(rsp + 6, status as u16);
        self.rx_rsp_prod = self.rx_rsp_prod.wrapping_add(1);
        barrier();
        self.rx.store_u32(RSP_PROD, self.rx_rsp_prod);
        self.notify.notify(self.port);
    }

    /// Whether frames can be handed to [`Self::send`] (they may still be
    /// dropped if the client posted no buffer).
    pub fn can_send(&self) -> bool {
        self.broken.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::xen::netfront::{Buffer, Netfront};
    use crate::platform::xen::shared::VecMemory;
    use alloc::collections::BTreeMap;
    use alloc::rc::Rc;
    use core::cell::RefCell;
    use smoltcp::phy::{Device, RxToken, TxToken};
    use smoltcp::time::Instant;

    #[derive(Clone, Copy)]
    struct NoNotify;
    impl Notify for NoNotify {
        fn notify(&self, _: u32) {}
    }

    /// Grant copy against the client's pages, by grant reference.
    #[derive(Clone, Default)]
    struct Pages(Rc<RefCell<BTreeMap<u32, VecMemory>>>);
    impl GrantCopy for Pages {
        fn copy_from(
            &mut self,
            dom: u16,
            gref: u32,
            offset: u16,
            dst: &mut [u8],
        ) -> Result<(), CopyRefused> {
            let pages = self.0.borrow();
            let page = pages.get(&gref).filter(|_| dom == 7).ok_or(CopyRefused)?;
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
            let pages = self.0.borrow();
            let page = pages.get(&gref).filter(|_| dom == 7).ok_or(CopyRefused)?;
            if usize::from(offset) + src.len() > PAGE {
                return Err(CopyRefused);
            }
            page.write_bytes(usize::from(offset), src);
            Ok(())
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
        for round in 0..700u32 {
            let frame: Vec<u8> = (0..60 + round % 1400).map(|i| (i ^ round) as u8).collect();
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
        assert_eq!(back.stats().from_client, 700);
        assert_eq!(back.stats().to_client, 700);
        assert_eq!(front.stats().protocol_errors, 0);
    }

    #[test]
    fn a_hostile_frontend_gets_errors_not_a_crash() {
        let (_front, mut back, _, tx) = pair();
        // Hand-written requests: bad size, offset past the page, fragment,
        // extra info (+ its slot), unknown grant, then a good one.
        let reqs: [(u32, u16, u16, u16, u16); 7] = [
            (100, 0, 0, 1, 5),
            (100, 4000, 0, 2, 200),
            (100, 0, NETTXF_MORE_DATA, 3, 60),
            (100, 0, NETTXF_EXTRA_INFO, 4, 60),
            (0, 0, 0, 5, 0),
            (999, 0, 0, 6, 60),
            (101, 0, 0, 7, 60),
        ];
        let start = tx.load_u32(REQ_PROD);
        for (i, (gref, offset, flags, id, size)) in reqs.iter().enumerate() {
            let at = RING_HEADER + ((start + i as u32) % RING_SIZE) as usize * TX_ENTRY;
            tx.store_u32(at, *gref);
            tx.store_u16(at + 4, *offset);
            tx.store_u16(at + 6, *flags);
            tx.store_u16(at + 8, *id);
            tx.store_u16(at + 10, *size);
        }
        tx.store_u32(REQ_PROD, start + reqs.len() as u32);
        back.poll();
        assert_eq!(back.stats().bad_requests, 5);
        assert_eq!(back.stats().from_client, 1);
        let status = |i: u32| {
            tx.load_u16(RING_HEADER + ((start + i) % RING_SIZE) as usize * TX_ENTRY + 2) as i16
        };
        assert_eq!(
            (0..7).map(status).collect::<Vec<_>>(),
            [-1, -1, -1, -1, NETIF_RSP_NULL, -1, 0]
        );
        // A req_prod far ahead stops the device.
        tx.store_u32(REQ_PROD, start + 10_000);
        back.poll();
        assert!(back.broken().is_some());
        back.send(&[0; 60]);
        assert_eq!(back.stats().to_client, 0);
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
}
