//! Fuzzes everything in `protocol::vchan` that reads peer-controlled
//! values: ring orders and indices as a hostile peer could write them on the
//! shared page, and socket names. Nothing may panic; every accepted layout
//! must keep rings and grants inside their bounds, and every accepted index
//! pair must yield ranges inside the ring that add up to the request.
#![no_main]

use core::fmt::Write;
use libfuzzer_sys::fuzz_target;
use protocol::vchan::{
    BufWriter, MAX_RING_ORDER, MIN_RING_ORDER, PAGE_SIZE, RingOrders, RingPlacement, VchanName,
    grant_offset,
};

fn u16_at(data: &[u8], at: usize) -> u16 {
    let mut bytes = [0u8; 2];
    for (i, slot) in bytes.iter_mut().enumerate() {
        *slot = data.get(at + i).copied().unwrap_or(0);
    }
    u16::from_le_bytes(bytes)
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, slot) in bytes.iter_mut().enumerate() {
        *slot = data.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(bytes)
}

fn check_ranges(ranges: &[core::ops::Range<usize>; 2], size: u32, count: u32) {
    let [first, second] = ranges;
    assert!(first.start <= first.end && first.end <= size as usize);
    assert!(second.start == 0 && second.end <= size as usize);
    assert_eq!(first.len() + second.len(), count as usize);
    if !second.is_empty() {
        assert_eq!(first.end, size as usize);
    }
}

fuzz_target!(|data: &[u8]| {
    // The page as a peer wrote it: indices at 0..16, orders at 16..20.
    let (left_order, right_order) = (u16_at(data, 16), u16_at(data, 18));
    if let Ok(orders) = RingOrders::new(left_order, right_order) {
        assert!(grant_offset(orders.grant_count()) <= PAGE_SIZE);
        for ring in [orders.left(), orders.right()] {
            assert!((MIN_RING_ORDER..=MAX_RING_ORDER).contains(&ring.order()));
            match ring.placement() {
                RingPlacement::InPage { offset } => {
                    assert!(offset + ring.size() as usize <= PAGE_SIZE);
                    assert!(grant_offset(orders.grant_count()) <= offset);
                }
                RingPlacement::Granted { first_grant, pages } => {
                    assert!(first_grant + pages <= orders.grant_count());
                    assert_eq!(pages * PAGE_SIZE, ring.size() as usize);
                }
            }
        }
        if let (RingPlacement::InPage { offset: a }, RingPlacement::InPage { offset: b }) =
            (orders.left().placement(), orders.right().placement())
        {
            assert_ne!(a, b);
        }
        for (ring, cons_at, prod_at) in [(orders.left(), 0, 4), (orders.right(), 8, 12)] {
            let (cons, prod) = (u32_at(data, cons_at), u32_at(data, prod_at));
            let count = u32_at(data, 20) & 0x1f_ffff;
            match ring.indices(cons, prod) {
                Ok(indices) => {
                    assert_eq!(indices.available() + indices.free(), ring.size());
                    if let Ok(ranges) = indices.read_ranges(count) {
                        check_ranges(&ranges, ring.size(), count);
                        assert_eq!(
                            indices.consume(count).map(|after| after.available()),
                            Ok(indices.available() - count)
                        );
                    } else {
                        assert!(count > indices.available());
                        assert!(indices.consume(count).is_err());
                    }
                    if let Ok(ranges) = indices.write_ranges(count) {
                        check_ranges(&ranges, ring.size(), count);
                        assert_eq!(
                            indices.produce(count).map(|after| after.free()),
                            Ok(indices.free() - count)
                        );
                    } else {
                        assert!(count > indices.free());
                        assert!(indices.produce(count).is_err());
                    }
                }
                Err(_) => assert!(prod.wrapping_sub(cons) > ring.size()),
            }
        }
    }
    if let Some(requested) = data.get(24..32) {
        let left = u32_at(requested, 0) as usize & 0x3f_ffff;
        let right = u32_at(requested, 4) as usize & 0x3f_ffff;
        if let Ok(orders) = RingOrders::for_server(left, right) {
            assert!(orders.left().size() as usize >= left);
            assert!(orders.right().size() as usize >= right);
        }
    }

    // Socket names: whatever parses prints back to the same name.
    if let Ok(text) = core::str::from_utf8(data) {
        if let Ok(name) = VchanName::parse_socket_path(text) {
            let mut buffer = [0u8; 64];
            let mut out = BufWriter::new(&mut buffer);
            write!(out, "{name}").expect("a socket name fits 64 bytes");
            assert!(text.ends_with(out.as_str()));
            assert_eq!(VchanName::parse_socket_name(out.as_str()), Ok(name));
        }
    }
});
