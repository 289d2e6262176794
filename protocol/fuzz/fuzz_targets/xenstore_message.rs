//! Fuzzes the XenStore message parsers: any bytes must parse or fail with a
//! typed error, never panic; whatever parses must emit and parse back to the
//! same value, both as raw framing (`Repr`) and as a typed request or reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::xenstore::{MESSAGE_MAX, Packet, Repr, Request, Response};

fuzz_target!(|data: &[u8]| {
    let Ok(repr) = Repr::parse_bytes(data) else {
        return;
    };
    let packet = Packet::new_checked(data).expect("Repr parsed, so the packet is valid");
    assert_eq!(packet.payload(), repr.payload);
    assert_eq!(packet.total_len(), repr.buffer_len());

    let mut out = [0u8; MESSAGE_MAX];
    let len = repr
        .emit(&mut out)
        .expect("a parsed message fits MESSAGE_MAX");
    assert_eq!(&out[..len], &data[..len]);
    assert_eq!(Repr::parse_bytes(&out[..len]), Ok(repr));

    if let Ok(request) = Request::parse(repr.msg_type, repr.payload) {
        assert_eq!(request.msg_type(), repr.msg_type);
        let len = request
            .emit(repr.req_id, repr.tx_id, &mut out)
            .expect("a parsed request can be emitted");
        assert_eq!(request.payload_len(), Ok(len - 16));
        let (again, parsed) = Request::parse_message(&out[..len]).expect("emitted request parses");
        assert_eq!(parsed, request);
        assert_eq!((again.req_id, again.tx_id), (repr.req_id, repr.tx_id));
    }
    if let Ok(response) = Response::parse(repr.msg_type, repr.payload) {
        assert_eq!(response.msg_type(), repr.msg_type);
        let len = response
            .emit(repr.req_id, repr.tx_id, &mut out)
            .expect("a parsed response can be emitted");
        assert_eq!(response.payload_len(), Ok(len - 16));
        let (_, parsed) = Response::parse_message(&out[..len]).expect("emitted response parses");
        assert_eq!(parsed, response);
    }
});
