//! The policy daemon socket request (from qrexec-daemon): parsing must
//! never panic, and a parsed request always has its three required keys.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qrexec_policy::protocol::request_end(data);
    if let Ok(query) = qrexec_policy::protocol::parse_request(data) {
        // every line of an accepted request was ASCII
        assert!(query.source.is_ascii() && query.service_and_arg.is_ascii());
    }
});
