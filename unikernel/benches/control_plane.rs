//! The control plane, measured against the in-memory doubles:
//! - a full QubesDB synchronisation of 2 000 entries (the entry cap of a
//!   32 MiB firewall) through the vchan client;
//! - one rule update of 100 rules as dom0 writes it (RM, policy, 100 keys,
//!   commit) up to the parsed `RuleSet`;
//! - a whole `qubes.FirewallStatus` call (EXEC_CMDLINE, data vchan, HELLO,
//!   report, EOFs, exit code, CONNECTION_TERMINATED) on a firewall with 10
//!   clients;
//! - one idle turn of the main loop (`Firewall::step`) with 10 clients:
//!   the cost paid on every wake-up.
//!
//! Run: `cargo bench -p unikernel --bench control_plane` (short measurement
//! times; the machine is shared).
#![allow(clippy::unwrap_used)] // reason: benchmark code
#![allow(missing_docs)] // reason: criterion macros generate undocumented items

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use protocol::qrexec::{self, ConnectParams, DataStream, ExecParams, PeerInfo};
use protocol::qubesdb::{self, MessageType};
use unikernel::config::ControlCaps;
use unikernel::firewall::{self, Firewall};
use unikernel::qubesdb::{DbEvent, QubesDb};
use unikernel::rules::RuleSet;
use unikernel::testing::{FakePlatform, PlatformHandle, VchanPeer, vchan_pair};

const MEMORY: usize = 32 << 20;

fn qdb(msg_type: MessageType, path: &str, data: &str) -> Vec<u8> {
    let repr = qubesdb::Repr {
        msg_type,
        path,
        data: data.as_bytes(),
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut buf).unwrap();
    buf
}

fn qrexec_msg(repr: &qrexec::Repr<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut buf).unwrap();
    buf
}

fn dump(entries: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for i in 0..entries {
        bytes.extend(qdb(
            MessageType::RespMultiread,
            &format!("/bench/key{i:05}"),
            "some value of moderate length",
        ));
    }
    bytes.extend(qdb(MessageType::RespMultiread, "", ""));
    bytes
}

fn rule_update(rules: usize) -> Vec<u8> {
    let dir = "/qubes-firewall/10.137.0.10";
    let mut bytes = qdb(MessageType::Rm, &format!("{dir}/"), "");
    bytes.extend(qdb(MessageType::Write, &format!("{dir}/policy"), "drop"));
    for n in 0..rules {
        bytes.extend(qdb(
            MessageType::Write,
            &format!("{dir}/{n:04}"),
            &format!(
                "action=accept dst4=10.{}.{}.0/24 proto=tcp dstports={}-{}",
                n / 256,
                n % 256,
                1000 + n,
                1000 + n
            ),
        ));
    }
    bytes.extend(qdb(MessageType::Write, dir, ""));
    bytes
}

fn qubesdb_sync(c: &mut Criterion) {
    let bytes = dump(2000);
    c.bench_function("qubesdb full sync, 2000 entries", |b| {
        b.iter_batched(
            vchan_pair,
            |(vm, dom0)| {
                let mut client = QubesDb::new(vm, ControlCaps::for_memory(MEMORY));
                dom0.send(&bytes);
                client.poll();
                assert!(client.is_synchronised());
                black_box(client.database().stats().entries)
            },
            BatchSize::SmallInput,
        );
    });
}

fn rule_commit(c: &mut Criterion) {
    let update = rule_update(100);
    let (vm, dom0) = vchan_pair();
    let mut client = QubesDb::new(vm, ControlCaps::for_memory(MEMORY));
    dom0.send(&qdb(
        MessageType::Write,
        "/qubes-firewall/10.137.0.10/x",
        "1",
    ));
    dom0.send(&qdb(MessageType::RespMultiread, "", ""));
    client.poll();
    while client.next_event().is_some() {}
    c.bench_function("rule update, 100 rules, to RuleSet", |b| {
        b.iter(|| {
            dom0.send(&update);
            client.poll();
            dom0.take();
            let Some(DbEvent::RulesCommitted { entries, .. }) = client.next_event() else {
                panic!("no commit")
            };
            let set = RuleSet::parse(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            assert!(set.error().is_none());
            black_box(set.rules().len())
        });
    });
}

struct Running {
    platform: FakePlatform,
    handle: PlatformHandle,
    firewall: Firewall<FakePlatform>,
    control: VchanPeer,
    _db: VchanPeer,
}

fn running_firewall(clients: u16) -> Running {
    let (mut platform, handle) = FakePlatform::new(2, MEMORY);
    // Every call opens a data vchan; the fake's default limit would run out.
    handle.set_vchan_limit(usize::MAX);
    handle
        .xenstore()
        .set("device/vif/0/mac", "00:16:3e:5e:6c:02");
    let mut firewall = Firewall::start(&mut platform, "").unwrap();
    let db = handle.offer_vchan(0, firewall::QUBESDB_PORT);
    let control = handle.connect_vchan(0, firewall::QREXEC_PORT).unwrap();
    db.send(&qdb(MessageType::RespMultiread, "/qubes-ip", "10.137.0.2"));
    db.send(&qdb(
        MessageType::RespMultiread,
        "/qubes-gateway",
        "10.137.0.1",
    ));
    db.send(&qdb(MessageType::RespMultiread, "", ""));
    control.send(&qrexec_msg(&qrexec::Repr::Hello(PeerInfo { version: 3 })));
    for n in 0..clients {
        let ip = format!("10.137.0.{}", 10 + n);
        handle
            .xenstore()
            .set(&format!("backend/vif/{}/0/ip", 10 + n), &ip);
        db.send(&qdb(
            MessageType::Write,
            &format!("/qubes-firewall/{ip}/policy"),
            "accept",
        ));
        db.send(&qdb(
            MessageType::Write,
            &format!("/qubes-firewall/{ip}"),
            "",
        ));
    }
    for _ in 0..4 {
        assert!(firewall.step(&mut platform).is_none());
    }
    assert_eq!(firewall.clients().len(), usize::from(clients));
    db.take();
    control.take();
    Running {
        platform,
        handle,
        firewall,
        control,
        _db: db,
    }
}

fn status_call(c: &mut Criterion) {
    let mut fw = running_firewall(10);
    let cmdline = b"DEFAULT:QUBESRPC qubes.FirewallStatus dom0";
    let exec = qrexec_msg(&qrexec::Repr::ExecCmdline(ExecParams {
        connect: ConnectParams {
            connect_domain: 0,
            connect_port: 513,
        },
        cmdline: Some(cmdline),
    }));
    let hello = qrexec_msg(&qrexec::Repr::Hello(PeerInfo { version: 3 }));
    let eof = qrexec_msg(&qrexec::Repr::Data {
        stream: DataStream::Stdin,
        data: &[],
    });
    c.bench_function("qubes.FirewallStatus call, 10 clients", |b| {
        b.iter(|| {
            fw.control.send(&exec);
            fw.firewall.step(&mut fw.platform);
            let data = fw.handle.offer_vchan(0, 513);
            data.send(&hello);
            data.send(&eof);
            fw.firewall.step(&mut fw.platform);
            fw.firewall.step(&mut fw.platform);
            let output = data.take();
            assert!(output.len() > 1000);
            assert_eq!(fw.control.take().len(), 16);
            black_box(output.len())
        });
    });
}

fn idle_step(c: &mut Criterion) {
    let mut fw = running_firewall(10);
    c.bench_function("idle main-loop step, 10 clients", |b| {
        b.iter(|| black_box(fw.firewall.step(&mut fw.platform)));
    });
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! { name = benches; config = short(); targets = qubesdb_sync, rule_commit, status_call, idle_step }
criterion_main!(benches);
