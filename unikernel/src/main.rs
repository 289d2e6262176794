//! The Xen PVH image of the firewall (`cargo xtask image`): the entry that
//! `platform::xen::runtime` calls once the machine is set up.
//!
//! Until the program flow (`unikernel::firewall::run`) lands, this runs the
//! platform bring-up: it connects to dom0's QubesDB (vchan client, port 111)
//! and performs the full-sync MULTIREAD, offers the qrexec agent's control
//! vchan (server, port 512) and exchanges MSG_HELLO, logs "QubesDB and
//! qrexec connected" with the time and heap use, then serves
//! `control/shutdown`. Everything here is portable code over the platform;
//! the boot code, allocator and panic handler live in
//! `platform::xen::runtime`. This file must never contain `unsafe` code.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use protocol::qrexec::{HEADER_LEN, HeaderRepr, MsgType};
use protocol::qubesdb::{Decoder, Repr};
use smoltcp::time::Duration;
use unikernel::platform::xen::XenPlatform;
use unikernel::platform::{ByteStream, LinkState, Platform, Shutdown, StreamError};

unikernel::xen_main!(main);

/// The qrexec protocol version this bring-up announces.
const QREXEC_VERSION: u32 = 3;

fn write_all(
    link: &mut impl ByteStream,
    platform: &mut XenPlatform,
    mut bytes: &[u8],
) -> Result<(), StreamError> {
    while !bytes.is_empty() {
        let n = link.write(bytes)?;
        bytes = bytes.get(n..).unwrap_or_default();
        if n == 0 {
            platform.wait(Some(platform.now() + Duration::from_millis(100)));
        }
    }
    Ok(())
}

fn main(mut platform: XenPlatform) -> ! {
    let started = platform.now();
    log::info!(
        "unikernel: {} is domain {}, cmdline {:?}",
        platform.name(),
        platform.domid(),
        platform.boot_info().cmdline()
    );
    let mut qubesdb = loop {
        match platform.vchan_client(0, protocol::qubesdb::VCHAN_PORT) {
            Ok(link) => break link,
            Err(error) if platform.now() - started < Duration::from_secs(60) => {
                log::debug!("unikernel: QubesDB not there yet: {error}");
                platform.wait(Some(platform.now() + Duration::from_millis(100)));
            }
            Err(error) => {
                log::error!("unikernel: cannot connect to QubesDB: {error}");
                platform.exit(Shutdown::Crash);
            }
        }
    };
    let mut control = match platform.vchan_server(0, protocol::qrexec::VCHAN_BASE_PORT) {
        Ok(link) => link,
        Err(error) => {
            log::error!("unikernel: cannot offer the qrexec agent: {error}");
            platform.exit(Shutdown::Crash);
        }
    };
    log::info!("unikernel: QubesDB vchan connected, qrexec vchan offered");
    let mut request = [0u8; protocol::qubesdb::HEADER_LEN];
    let sent = Repr::full_sync_request().emit(&mut request).map(|_| ());
    if sent.is_err() || write_all(&mut qubesdb, &mut platform, &request).is_err() {
        log::error!("unikernel: cannot send the QubesDB MULTIREAD");
        platform.exit(Shutdown::Crash);
    }
    let mut decoder = Decoder::new();
    let (mut entries, mut synced, mut hello_sent, mut peer_version) = (0usize, false, false, None);
    let mut hello = [0u8; HEADER_LEN + 4];
    let mut hello_len = 0;
    let mut reported = false;
    loop {
        if let Some(request) = platform.shutdown_requested() {
            qubesdb.close();
            control.close();
            platform.exit(request);
        }
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = qubesdb.read(&mut buf) {
            let mut input = buf.get(..n).unwrap_or_default();
            while !input.is_empty() {
                match decoder.feed(input) {
                    Ok((used, packet)) => {
                        input = input.get(used..).unwrap_or_default();
                        if let Some(packet) = packet {
                            match Repr::parse(&packet) {
                                Ok(repr) if repr.is_end_marker() => synced = true,
                                Ok(repr) => {
                                    entries += 1;
                                    log::debug!(
                                        "unikernel: QubesDB {} = {:?}",
                                        repr.path,
                                        core::str::from_utf8(repr.data)
                                    );
                                }
                                Err(error) => log::warn!("unikernel: bad QubesDB message: {error}"),
                            }
                        }
                    }
                    Err(error) => {
                        log::error!("unikernel: QubesDB stream broken: {error}");
                        platform.exit(Shutdown::Crash);
                    }
                }
            }
        }
        if control.state() == LinkState::Connected && !hello_sent {
            let mut out = [0u8; HEADER_LEN + 4];
            let header = HeaderRepr {
                msg_type: MsgType::Hello,
                len: 4,
            };
            if header.emit(&mut out).is_ok() {
                if let Some(body) = out.get_mut(HEADER_LEN..) {
                    body.copy_from_slice(&QREXEC_VERSION.to_le_bytes());
                }
                hello_sent = write_all(&mut control, &mut platform, &out).is_ok();
            }
        }
        if hello_sent && peer_version.is_none() {
            if let Ok(n) = control.read(hello.get_mut(hello_len..).unwrap_or_default()) {
                hello_len += n;
            }
            if hello_len == hello.len() {
                let header = HeaderRepr::parse_bytes(&hello);
                let version = hello
                    .get(HEADER_LEN..)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_le_bytes);
                match (header, version) {
                    (
                        Ok(HeaderRepr {
                            msg_type: MsgType::Hello,
                            ..
                        }),
                        Some(version),
                    ) => peer_version = Some(version),
                    _ => {
                        log::error!("unikernel: qrexec peer did not answer MSG_HELLO");
                        platform.exit(Shutdown::Crash);
                    }
                }
            }
        }
        if synced
            && !reported
            && let Some(version) = peer_version
        {
            reported = true;
            let elapsed = platform.now() - started;
            let heap = platform.heap_usage().unwrap_or_default();
            log::info!(
                "QubesDB and qrexec connected in {}.{:03} s ({entries} QubesDB entries, qrexec version {}); heap in use {} KiB of {} KiB",
                elapsed.secs(),
                elapsed.millis() % 1000,
                version.min(QREXEC_VERSION),
                heap.0 >> 10,
                heap.1 >> 10
            );
        }
        platform.wait(Some(platform.now() + Duration::from_secs(1)));
    }
}
