//! The policy.EvalSimple / policy.EvalGUI request bytes from a qube.
#![no_main]

use std::io::{Cursor, Read, Write};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qrexec_policy::eval_service::{EvalService, handle};
use qrexec_policy::{Domain, Policy, SystemInfo};

struct Duplex(Cursor<Vec<u8>>, Vec<u8>);

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let policy = Policy::default();
    let system = Arc::new(
        SystemInfo::new([("work".to_owned(), Domain::new("AppVM"))]).unwrap_or_default(),
    );
    for kind in [EvalService::Simple, EvalService::Gui] {
        let mut stream = Duplex(Cursor::new(data.to_vec()), Vec::new());
        let _ = handle(
            &mut stream,
            kind,
            |q, s, c| policy.evaluate(q, s, c),
            || Some(Arc::clone(&system)),
        );
    }
});
