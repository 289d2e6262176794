//! Policy lines in both formats, and whole files through the loader:
//! any text is either rules or a `FILE:LINE: reason` error, never a panic.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qrexec_policy::rule::{Origin, Rule};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = || Origin {
        file: Arc::from("/fuzz.policy"),
        line: 1,
    };
    let _ = Rule::from_line(text, origin());
    let _ = Rule::from_line_service("qubes.Fuzz", "+arg", &text.replace(',', " "), origin());
    // no includes resolve: the base and legacy directories do not exist
    let nowhere = std::path::Path::new("/nonexistent-qrexec-policy-fuzz");
    let _ = qrexec_policy::loader::load_text(text, "/fuzz.policy", nowhere, nowhere);
});
