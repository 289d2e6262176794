//! Fuzzes the QubesDB message parser: any bytes must parse or fail with a
//! typed error, never panic; whatever parses must emit canonical bytes that
//! parse back to the same message and obey the daemon's rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::qubesdb::{
    HEADER_LEN, MAX_DATA_LEN, MESSAGE_MAX, MessageType, Packet, QDB_MAX_PATH, Repr, check_data,
    check_path,
};

fuzz_target!(|data: &[u8]| {
    let packet = Packet::new_checked(data);
    let Ok(repr) = Repr::parse_bytes(data) else {
        return;
    };
    let packet = packet.expect("Repr parsed, so the packet is valid");
    assert_eq!(packet.path(), repr.path.as_bytes());
    assert_eq!(packet.data(), repr.data);
    assert_eq!(packet.total_len(), repr.buffer_len());
    assert!(repr.path.len() < QDB_MAX_PATH);
    assert!(repr.data.len() <= MAX_DATA_LEN);
    assert!(check_path(repr.path.as_bytes()).is_ok());
    if !matches!(repr.msg_type, MessageType::Unknown(_)) {
        assert!(check_data(repr.data).is_ok());
    }
    if !repr.msg_type.carries_data() {
        assert!(repr.data.is_empty());
    }

    let mut out = [0u8; MESSAGE_MAX];
    let len = repr
        .emit(&mut out)
        .expect("a parsed message can be emitted");
    assert_eq!(len, repr.buffer_len());
    assert_eq!(Repr::parse_bytes(&out[..len]), Ok(repr));
    // Type, data length and data are copied verbatim; path and padding are
    // canonicalised (NUL-padded), so only those bytes may differ.
    assert_eq!(out[0], data[0]);
    assert_eq!(&out[68..len], &data[68..len]);
    assert!(
        out[1 + repr.path.len()..HEADER_LEN - 4]
            .iter()
            .all(|&b| b == 0)
    );
});
