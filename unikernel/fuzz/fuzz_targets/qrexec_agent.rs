//! Fuzzes the firewall's qrexec agent (`qrexec.rs`) as dom0 would drive it:
//! after the HELLO exchange, arbitrary bytes on the control vchan and on
//! every data vchan the agent opens. It must never panic, never run more
//! calls than its cap, and once the control link is closed it stays closed.
//!
//! Input: byte 0 is the daemon's version; then `len:u8` + control bytes,
//! the rest goes to each data vchan the agent opened.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smoltcp::time::Duration;
use unikernel::config::ControlCaps;
use unikernel::platform::Platform;
use unikernel::qrexec::{Agent, Output, ServiceHost};
use unikernel::testing::FakePlatform;

struct Host;

impl ServiceHost for Host {
    fn firewall_status(&mut self, out: &mut Output) {
        out.stdout(b"status\n");
    }
    fn set_wall_clock(&mut self, _: i64) {}
}

fuzz_target!(|data: &[u8]| {
    let [version, len, rest @ ..] = data else {
        return;
    };
    let split = usize::from(*len).min(rest.len());
    let (control_bytes, data_bytes) = rest.split_at(split);
    let (mut platform, handle) = FakePlatform::new(3, 8 << 20);
    let caps = ControlCaps::for_memory(8 << 20);
    let control = platform.vchan_server(0, 512).unwrap();
    let mut agent = Agent::new(control, caps);
    let dom0 = handle.connect_vchan(0, 512).unwrap();
    let mut hello = Vec::new();
    hello.extend_from_slice(&0x300u32.to_ne_bytes());
    hello.extend_from_slice(&4u32.to_ne_bytes());
    hello.extend_from_slice(&u32::from(*version).to_ne_bytes());
    dom0.send(&hello);
    dom0.send(control_bytes);
    let mut now = platform.now();
    for round in 0..4u32 {
        agent.poll(&mut platform, &mut Host, now);
        assert!(agent.running_calls() <= caps.qrexec_connections);
        // Whatever data vchans the agent opened get the rest of the input.
        for port in 513..513 + 8 {
            if let Some(peer) = handle.vchan(0, port) {
                if round == 0 {
                    peer.connect();
                    peer.send(data_bytes);
                }
                let _ = peer.take();
            }
        }
        let _ = dom0.take();
        now += Duration::from_secs(30);
        handle.clock().advance(Duration::from_secs(30));
    }
    let closed = agent.is_closed();
    dom0.close();
    agent.poll(&mut platform, &mut Host, now);
    assert!(agent.is_closed() || !closed);
    assert!(agent.is_closed());
});
