//! Fuzzes the firewall's QubesDB client (`qubesdb.rs`) as dom0 would drive
//! it: arbitrary bytes on the vchan, delivered in arbitrary chunks, before
//! and after a valid full sync. It must never panic, never hold more than
//! its caps, and once the link is closed it stays closed and refuses writes.
//!
//! Input: byte 0 chooses whether a valid MULTIREAD dump comes first and the
//! chunk size; the rest is what dom0 sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::qubesdb::{MessageType, Repr};
use unikernel::config::ControlCaps;
use unikernel::qubesdb::{DbEvent, QubesDb};
use unikernel::testing::vchan_pair;

fn encode(msg_type: MessageType, path: &str, data: &[u8]) -> Vec<u8> {
    let repr = Repr { msg_type, path, data };
    let mut buf = vec![0u8; repr.buffer_len()];
    let _ = repr.emit(&mut buf);
    buf
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let mut caps = ControlCaps::for_memory(0);
    caps.qubesdb_entries = 16;
    caps.qubesdb_bytes = 4096;
    let (vm, dom0) = vchan_pair();
    let mut client = QubesDb::new(vm, caps);
    if control & 1 == 1 {
        dom0.send(&encode(MessageType::RespMultiread, "/qubes-ip", b"10.137.0.2"));
        dom0.send(&encode(MessageType::RespMultiread, "", b""));
        client.poll();
        assert!(client.is_synchronised());
    }
    let chunk = usize::from(control >> 1).max(1);
    for piece in rest.chunks(chunk) {
        dom0.send(piece);
        client.poll();
        let stats = client.database().stats();
        assert!(stats.entries <= caps.qubesdb_entries);
        assert!(stats.bytes <= caps.qubesdb_bytes);
        while let Some(event) = client.next_event() {
            if let DbEvent::RulesCommitted { entries, .. } = event {
                assert!(entries.len() <= caps.qubesdb_entries);
            }
        }
        let _ = dom0.take();
    }
    dom0.close();
    client.poll();
    assert!(client.is_closed());
    assert!(client.write("/qubes-iptables-error", "").is_err());
});
