//! Fuzzes the QubesDB stream decoder. The first byte picks a chunk size;
//! the rest is a vchan byte stream fed in chunks of that size. Every message
//! the decoder yields must be the one a sequential parse of the whole stream
//! finds, and the decoder must fail exactly where that parse finds a header
//! it cannot frame (oversized data, unterminated path).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::qubesdb::{Decoder, Error, HEADER_LEN, Packet};

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
                        let bytes = packet.into_inner();
                        let reference =
                            Packet::new_checked(expected).expect("sequential parse agrees");
                        let len = reference.total_len();
                        assert_eq!(bytes, &expected[..len]);
                        expected = &expected[len..];
                    }
                    rest = &rest[used..];
                }
                Err(error @ (Error::DataTooLong { .. } | Error::PathNotTerminated)) => {
                    assert!(expected.len() >= HEADER_LEN);
                    assert_eq!(
                        Packet::new_checked(&expected[..HEADER_LEN]).map(|_| ()),
                        Err(error)
                    );
                    assert_eq!(decoder.feed(b"x").map(|(n, _)| n), Err(Error::StreamFailed));
                    failed = true;
                    break 'feed;
                }
                Err(other) => panic!("unexpected decoder error {other:?}"),
            }
        }
    }
    if !failed {
        assert_eq!(decoder.buffered(), expected.len());
        assert!(expected.is_empty() || Packet::new_checked(expected).is_err());
    }
});
