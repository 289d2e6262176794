//! Fuzzes the qrexec message parser: any bytes must parse or fail with a
//! typed error, never panic; whatever parses must emit and parse back to the
//! same value, and the name/ident validators must never panic on it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::qrexec::{HeaderRepr, Message, Repr, names};

fuzz_target!(|data: &[u8]| {
    let _ = HeaderRepr::parse_bytes(data);
    let Ok(message) = Message::new_checked(data) else {
        return;
    };
    let _ = message.trigger_request_id();
    let Ok(repr) = Repr::parse(&message) else {
        return;
    };
    for version in 0..6 {
        let _ = repr.check_version(version);
    }
    let mut out = vec![0u8; repr.buffer_len()];
    let len = repr.emit(&mut out).expect("a parsed message can be emitted");
    match repr {
        // A MSG_SERVICE_CONNECT with an ident shorter than 32 bytes (taken
        // as Qubes' daemon takes it) is emitted in the full, zero-padded
        // form Qubes' programs send.
        Repr::ServiceConnect {
            request_id: Some(_),
            ..
        } => assert!(len >= message.total_len()),
        _ => assert_eq!(len, message.total_len()),
    }
    let (again, used) = Repr::parse_bytes(&out).expect("emitted message parses");
    assert_eq!(used, len);
    assert_eq!(again, repr);
    match repr {
        Repr::TriggerService3(t) => {
            let _ = t.request_id.validate();
            let _ = names::validate_service_name(t.service_name);
            let _ = names::split_service_descriptor(t.service_name);
            let mut name = t.service_name.to_vec();
            names::sanitize_service_name(&mut name);
            assert!(name.iter().all(|&b| names::is_allowed_name_byte(b, b"+")));
            let mut target = t.target_domain.to_vec();
            names::sanitize_qube_name(&mut target);
            assert!(target.iter().all(|&b| names::is_allowed_name_byte(b, b"@:")));
        }
        Repr::TriggerService4(t) => {
            let _ = t.request_id.validate();
            let _ = names::split_service_descriptor(t.service_name);
        }
        Repr::ServiceRefused(id) => {
            let _ = id.validate();
        }
        _ => {}
    }
});
