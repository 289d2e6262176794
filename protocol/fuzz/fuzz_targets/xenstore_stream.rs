//! Fuzzes the XenStore stream decoder and ring index arithmetic.
//!
//! The first byte picks a chunk size; the rest is a byte stream fed to the
//! decoder in chunks of that size. Every message the decoder yields must be
//! exactly the message that parsing the whole stream front to back yields,
//! and the decoder must stop (with an error) exactly where the sequential
//! parse finds an oversized header. The same bytes also drive the ring
//! index checks, which must never panic or accept an inconsistent pair.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::xenstore::{Decoder, Error, HEADER_LEN, Repr, RingIndices, XENSTORE_RING_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);

    let mut decoder = Decoder::new();
    let mut expected = stream;
    let mut failed = false;
    'feed: for piece in stream.chunks(chunk) {
        let mut rest = piece;
        while !rest.is_empty() {
            match decoder.feed(rest) {
                Ok((used, message)) => {
                    assert!(used > 0 && used <= rest.len());
                    if let Some(packet) = message {
                        let repr = Repr::parse_bytes(expected).expect("sequential parse agrees");
                        assert_eq!(Repr::parse_bytes(&packet.into_inner()[..]), Ok(repr));
                        expected = &expected[repr.buffer_len()..];
                    }
                    rest = &rest[used..];
                }
                Err(Error::PayloadTooLong { .. }) => {
                    // Only a complete, oversized header stops the decoder.
                    assert!(expected.len() >= HEADER_LEN);
                    assert!(matches!(
                        Repr::parse_bytes(expected),
                        Err(Error::PayloadTooLong { .. })
                    ));
                    assert_eq!(decoder.feed(b"x").map(|(n, _)| n), Err(Error::StreamFailed));
                    failed = true;
                    break 'feed;
                }
                Err(other) => panic!("unexpected decoder error {other:?}"),
            }
        }
    }
    if !failed {
        // What is left is an incomplete message the decoder is holding.
        assert_eq!(decoder.buffered(), expected.len());
        assert!(Repr::parse_bytes(expected).is_err() || expected.is_empty());
    }

    // Ring indices from the first eight bytes of the stream.
    if let (Some(cons), Some(prod)) = (stream.get(0..4), stream.get(4..8)) {
        let cons = u32::from_le_bytes([cons[0], cons[1], cons[2], cons[3]]);
        let prod = u32::from_le_bytes([prod[0], prod[1], prod[2], prod[3]]);
        match RingIndices::new(cons, prod) {
            Ok(ring) => {
                assert!(ring.available() <= XENSTORE_RING_SIZE);
                assert_eq!(ring.available() + ring.free(), XENSTORE_RING_SIZE);
                let input = ring.input_chunk();
                let output = ring.output_chunk();
                assert!(input.end <= XENSTORE_RING_SIZE as usize && input.start <= input.end);
                assert!(output.end <= XENSTORE_RING_SIZE as usize && output.start <= output.end);
                let step = u32::from(data[0]) * 5;
                if let Ok(after) = ring.consume(step) {
                    assert_eq!(after.available(), ring.available() - step);
                }
                if let Ok(after) = ring.produce(step) {
                    assert_eq!(after.free(), ring.free() - step);
                }
            }
            Err(_) => assert!(prod.wrapping_sub(cons) > XENSTORE_RING_SIZE),
        }
    }
});
