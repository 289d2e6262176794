//! A simulated run of the whole program flow against the doubles: dom0's
//! qubesdb-daemon and qrexec-daemon are played by the test over in-memory
//! vchans, the toolstack over the fake xenstore, the net qube and a client
//! qube over fake NICs.
//!
//! QubesDB delivers the configuration and a client's rules; the client is
//! added through the `backend/vif` watch; its traffic is NATed out and the
//! replies come back; the rules change and take effect; dom0 asks for
//! `qubes.FirewallStatus`; the client is removed; shutdown is requested and
//! the flow ends.
#![allow(clippy::unwrap_used)] // reason: test code

use std::net::Ipv4Addr;

use protocol::qrexec::{self, ConnectParams, DataStream, ExecParams, MsgType, PeerInfo};
use protocol::qubesdb::{self, MessageType};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Duration;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};
use unikernel::firewall::{self, Firewall};
use unikernel::platform::{LinkState, Shutdown};
use unikernel::testing::{FakePlatform, NicHandle, PlatformHandle, VchanPeer};

const DOMID: u16 = 2;
const MEMORY: usize = 32 << 20;
const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 1);
const OUR_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x02]);
const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0x00, 0x00, 0x01]);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 10);
const CLIENT_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x0a]);
/// The MAC the firewall answers with towards clients (Qubes' convention).
const FIREWALL_CLIENT_MAC: EthernetAddress = EthernetAddress([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);
const REMOTE: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);

// --- dom0's side of QubesDB -------------------------------------------------

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

fn qdb_messages(mut bytes: &[u8]) -> Vec<(MessageType, String, String)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let repr = qubesdb::Repr::parse_bytes(bytes).unwrap();
        out.push((
            repr.msg_type,
            repr.path.to_string(),
            String::from_utf8(repr.data.to_vec()).unwrap(),
        ));
        bytes = &bytes[repr.buffer_len()..];
    }
    out
}

/// dom0 rewrites a client's rules the way qubes-core-admin does: remove the
/// directory, write `policy` and the numbered rules, then commit.
fn write_rules(db: &VchanPeer, ip: Ipv4Addr, policy: &str, rules: &[&str]) {
    db.send(&qdb(MessageType::Rm, &format!("/qubes-firewall/{ip}/"), ""));
    db.send(&qdb(
        MessageType::Write,
        &format!("/qubes-firewall/{ip}/policy"),
        policy,
    ));
    for (number, rule) in rules.iter().enumerate() {
        db.send(&qdb(
            MessageType::Write,
            &format!("/qubes-firewall/{ip}/{number:04}"),
            rule,
        ));
    }
    db.send(&qdb(
        MessageType::Write,
        &format!("/qubes-firewall/{ip}"),
        "",
    ));
}

// --- dom0's side of qrexec ---------------------------------------------------

fn qrexec_msg(repr: &qrexec::Repr<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut buf).unwrap();
    buf
}

fn qrexec_messages(mut bytes: &[u8]) -> Vec<(MsgType, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (repr, used) = qrexec::Repr::parse_bytes(bytes).unwrap();
        out.push((repr.msg_type(), bytes[qrexec::HEADER_LEN..used].to_vec()));
        bytes = &bytes[used..];
    }
    out
}

// --- frames --------------------------------------------------------------------

fn eth(
    dst: EthernetAddress,
    src: EthernetAddress,
    ethertype: EthernetProtocol,
    payload: &[u8],
) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype,
    };
    let mut frame = vec![0u8; repr.buffer_len() + payload.len()];
    let mut view = EthernetFrame::new_unchecked(&mut frame);
    repr.emit(&mut view);
    view.payload_mut().copy_from_slice(payload);
    frame
}

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    let mut datagram = vec![0u8; udp.header_len() + payload.len()];
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut datagram),
        &IpAddress::from(src),
        &IpAddress::from(dst),
        payload.len(),
        |buffer| buffer.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: datagram.len(),
        hop_limit: 64,
    };
    let mut packet = vec![0u8; ip.buffer_len() + datagram.len()];
    let mut view = Ipv4Packet::new_unchecked(&mut packet);
    ip.emit(&mut view, &ChecksumCapabilities::default());
    view.payload_mut().copy_from_slice(&datagram);
    packet
}

/// (eth dst, ip src, ip dst, udp sport, udp dport, payload) of a UDP frame.
fn parse_udp(frame: &[u8]) -> (EthernetAddress, Ipv4Addr, Ipv4Addr, u16, u16, Vec<u8>) {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum(), "IPv4 checksum");
    assert_eq!(ip.next_header(), IpProtocol::Udp);
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert!(
        udp.verify_checksum(
            &IpAddress::from(ip.src_addr()),
            &IpAddress::from(ip.dst_addr())
        ),
        "UDP checksum"
    );
    (
        eth.dst_addr(),
        ip.src_addr(),
        ip.dst_addr(),
        udp.src_port(),
        udp.dst_port(),
        udp.payload().to_vec(),
    )
}

fn gateway_arp_reply() -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: GATEWAY_MAC,
        source_protocol_addr: GATEWAY,
        target_hardware_addr: OUR_MAC,
        target_protocol_addr: OUR_IP,
    };
    let mut payload = vec![0u8; arp.buffer_len()];
    arp.emit(&mut ArpPacket::new_unchecked(&mut payload));
    eth(OUR_MAC, GATEWAY_MAC, EthernetProtocol::Arp, &payload)
}

fn udp_frames(frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    frames
        .into_iter()
        .filter(|f| {
            // IPv4 carrying UDP (the router also sends ICMP errors, e.g. a
            // REJECT for a denied flow, which are not what is counted here).
            EthernetFrame::new_checked(&f[..]).unwrap().ethertype() == EthernetProtocol::Ipv4
                && f.get(23) == Some(&17)
        })
        .collect()
}

// --- the rig -----------------------------------------------------------------------

struct Rig {
    platform: FakePlatform,
    handle: PlatformHandle,
    firewall: Firewall<FakePlatform>,
}

impl Rig {
    fn start(cmdline: &str) -> Rig {
        let (mut platform, handle) = FakePlatform::new(DOMID, MEMORY);
        handle
            .xenstore()
            .set("device/vif/0/mac", "00:16:3e:5e:6c:02");
        let firewall = Firewall::start(&mut platform, cmdline).unwrap();
        Rig {
            platform,
            handle,
            firewall,
        }
    }

    /// Runs the main loop until it has nothing left to do now.
    fn settle(&mut self) -> Option<Shutdown> {
        for _ in 0..8 {
            if let Some(how) = self.firewall.step(&mut self.platform) {
                return Some(how);
            }
        }
        None
    }

    fn advance(&mut self, by: Duration) {
        self.handle.clock().advance(by);
    }

    /// dom0's qubesdb-daemon attaches and dumps the database.
    fn qubesdb(&mut self, entries: &[(&str, &str)]) -> VchanPeer {
        let db = self.handle.offer_vchan(0, firewall::QUBESDB_PORT);
        self.settle();
        assert_eq!(
            qdb_messages(&db.take()),
            vec![(MessageType::Multiread, String::new(), String::new())],
            "the VM's first QubesDB message is MULTIREAD of the empty path"
        );
        for (path, value) in entries {
            db.send(&qdb(MessageType::RespMultiread, path, value));
        }
        db.send(&qdb(MessageType::RespMultiread, "", ""));
        db
    }

    /// dom0's qrexec-daemon connects and says HELLO (version 3).
    fn qrexec(&mut self) -> VchanPeer {
        let control = self.handle.connect_vchan(0, firewall::QREXEC_PORT).unwrap();
        self.settle();
        assert_eq!(
            qrexec_messages(&control.take()),
            vec![(MsgType::Hello, 4u32.to_ne_bytes().to_vec())]
        );
        control.send(&qrexec_msg(&qrexec::Repr::Hello(PeerInfo { version: 3 })));
        control
    }

    /// Runs `DEFAULT:QUBESRPC <service> dom0` and returns (stdout, stderr,
    /// exit code, control messages after it).
    fn call(
        &mut self,
        control: &VchanPeer,
        service: &str,
        port: u32,
        stdin: &[u8],
    ) -> (String, String, u32) {
        let cmdline = format!("DEFAULT:QUBESRPC {service} dom0");
        control.send(&qrexec_msg(&qrexec::Repr::ExecCmdline(ExecParams {
            connect: ConnectParams {
                connect_domain: 0,
                connect_port: port,
            },
            cmdline: Some(cmdline.as_bytes()),
        })));
        self.settle();
        let data = self.handle.offer_vchan(0, port);
        self.settle();
        assert_eq!(qrexec_messages(&data.take())[0].0, MsgType::Hello);
        data.send(&qrexec_msg(&qrexec::Repr::Hello(PeerInfo { version: 3 })));
        if !stdin.is_empty() {
            data.send(&qrexec_msg(&qrexec::Repr::Data {
                stream: DataStream::Stdin,
                data: stdin,
            }));
        }
        data.send(&qrexec_msg(&qrexec::Repr::Data {
            stream: DataStream::Stdin,
            data: &[],
        }));
        self.settle();
        let (mut stdout, mut stderr, mut code) = (Vec::new(), Vec::new(), None);
        for (kind, body) in qrexec_messages(&data.take()) {
            match kind {
                MsgType::DataStdout => stdout.extend(body),
                MsgType::DataStderr => stderr.extend(body),
                MsgType::DataExitCode => code = Some(u32::from_ne_bytes(body.try_into().unwrap())),
                other => panic!("unexpected {other:?} on the data vchan"),
            }
        }
        assert_eq!(data.state(), LinkState::Closed);
        let terminated = qrexec_messages(&control.take());
        assert_eq!(terminated.len(), 1);
        assert_eq!(terminated[0].0, MsgType::ConnectionTerminated);
        assert_eq!(terminated[0].1[4..8], port.to_ne_bytes());
        (
            String::from_utf8(stdout).unwrap(),
            String::from_utf8(stderr).unwrap(),
            code.unwrap(),
        )
    }

    fn uplink(&self) -> NicHandle {
        self.handle.uplink()
    }
}

#[test]
fn whole_program_flow() {
    let mut rig = Rig::start("");
    assert!(!rig.firewall.network_up());

    // dom0 attaches both links; QubesDB holds the config and the rules of
    // the client to come (accept UDP to port 7 only).
    let db = rig.qubesdb(&[
        ("/qubes-ip", "10.137.0.2"),
        ("/qubes-gateway", "10.137.0.1"),
        ("/qubes-primary-dns", "10.139.1.1"),
        ("/qubes-secondary-dns", "10.139.1.2"),
        ("/qubes-firewall/10.137.0.10/policy", "drop"),
        (
            "/qubes-firewall/10.137.0.10/0000",
            "action=accept proto=udp dstports=7-7",
        ),
        ("/qubes-firewall/10.137.0.10", ""),
    ]);
    let control = rig.qrexec();
    rig.settle();

    // Networking is up and dom0 was told so.
    assert!(rig.firewall.network_up());
    assert!(rig.handle.uplink_attached());
    assert_eq!(
        qdb_messages(&db.take()),
        vec![(
            MessageType::Write,
            "/qubes-iptables-error".to_string(),
            String::new()
        )]
    );
    db.send(&qdb(MessageType::RespOk, "/qubes-iptables-error", ""));

    // The net qube announces itself.
    rig.uplink().inject(&gateway_arp_reply());
    rig.settle();
    rig.uplink().take_sent();

    // The toolstack adds a client vif.
    rig.handle
        .xenstore()
        .set("backend/vif/5/0/ip", "10.137.0.10");
    rig.handle
        .xenstore()
        .set("backend/vif/5/0/mac", "00:16:3e:5e:6c:0a");
    rig.settle();
    assert_eq!(rig.firewall.clients(), vec![(5, 0, CLIENT_IP)]);
    let client = rig.handle.client(5, 0).unwrap();

    // Its UDP to port 7 is NATed out to the net qube…
    client.inject(&eth(
        FIREWALL_CLIENT_MAC,
        CLIENT_MAC,
        EthernetProtocol::Ipv4,
        &udp4(CLIENT_IP, REMOTE, 4000, 7, b"ping"),
    ));
    // In the same step as it came (the uplink, pumped before the client,
    // is offered it at the end of the step), and nothing is left queued
    // for the loop to spin on.
    assert!(rig.firewall.step(&mut rig.platform).is_none());
    let now = rig.handle.clock().now();
    assert_ne!(rig.firewall.next_deadline(now), Some(now), "no busy loop");
    let out = udp_frames(rig.uplink().take_sent());
    assert_eq!(out.len(), 1, "one datagram leaves on the uplink");
    let (dst_mac, src, dst, nat_port, dport, payload) = parse_udp(&out[0]);
    assert_eq!(dst_mac, GATEWAY_MAC);
    assert_eq!(src, OUR_IP, "source translated to the firewall's address");
    assert_eq!((dst, dport, payload.as_slice()), (REMOTE, 7, &b"ping"[..]));

    // …and the reply comes back to the client, translated back.
    rig.uplink().inject(&eth(
        OUR_MAC,
        GATEWAY_MAC,
        EthernetProtocol::Ipv4,
        &udp4(REMOTE, OUR_IP, 7, nat_port, b"pong"),
    ));
    rig.settle();
    let back = udp_frames(client.take_sent());
    assert_eq!(back.len(), 1, "the reply reaches the client");
    let (dst_mac, src, dst, sport, dport, payload) = parse_udp(&back[0]);
    assert_eq!(dst_mac, CLIENT_MAC);
    assert_eq!((src, sport), (REMOTE, 7));
    assert_eq!((dst, dport), (CLIENT_IP, 4000));
    assert_eq!(payload, b"pong");

    // dom0 rewrites the very same rules (as it does on every firewall
    // change of any qube): nothing changes, the flow survives.
    write_rules(
        &db,
        CLIENT_IP,
        "drop",
        &["action=accept proto=udp dstports=7-7"],
    );
    rig.settle();
    db.take();
    rig.uplink().inject(&eth(
        OUR_MAC,
        GATEWAY_MAC,
        EthernetProtocol::Ipv4,
        &udp4(REMOTE, OUR_IP, 7, nat_port, b"pong again"),
    ));
    rig.settle();
    assert_eq!(udp_frames(client.take_sent()).len(), 1, "flow kept");

    // Port 9 is not allowed yet.
    client.inject(&eth(
        FIREWALL_CLIENT_MAC,
        CLIENT_MAC,
        EthernetProtocol::Ipv4,
        &udp4(CLIENT_IP, REMOTE, 4001, 9, b"discard"),
    ));
    rig.settle();
    assert!(udp_frames(rig.uplink().take_sent()).is_empty());

    // dom0 changes the rules: now only port 9. The change takes effect at
    // the commit and flushes the client's flows.
    write_rules(
        &db,
        CLIENT_IP,
        "drop",
        &["action=accept proto=udp dstports=9-9"],
    );
    rig.settle();
    let acks = qdb_messages(&db.take());
    assert_eq!(acks.len(), 4);
    assert!(acks.iter().all(|(t, _, _)| *t == MessageType::RespOk));
    client.inject(&eth(
        FIREWALL_CLIENT_MAC,
        CLIENT_MAC,
        EthernetProtocol::Ipv4,
        &udp4(CLIENT_IP, REMOTE, 4001, 9, b"discard"),
    ));
    client.inject(&eth(
        FIREWALL_CLIENT_MAC,
        CLIENT_MAC,
        EthernetProtocol::Ipv4,
        &udp4(CLIENT_IP, REMOTE, 4002, 7, b"ping"),
    ));
    rig.settle();
    let out = udp_frames(rig.uplink().take_sent());
    assert_eq!(out.len(), 1, "port 9 passes, port 7 no longer does");
    assert_eq!(parse_udp(&out[0]).4, 9);
    // The old flow was flushed with the old rules: its reply is dropped.
    rig.uplink().inject(&eth(
        OUR_MAC,
        GATEWAY_MAC,
        EthernetProtocol::Ipv4,
        &udp4(REMOTE, OUR_IP, 7, nat_port, b"late"),
    ));
    rig.settle();
    assert!(udp_frames(client.take_sent()).is_empty());

    // dom0 asks for the status; the platform's heap figures are in it.
    rig.handle
        .set_heap_usage(Some(unikernel::platform::HeapUsage {
            used: 5 << 20,
            total: 14 << 20,
            peak: 0,
        }));
    let (stdout, stderr, code) = rig.call(&control, "qubes.FirewallStatus", 513, b"");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("heap: used 5120 KiB free 9216 KiB of 14336 KiB\n"),
        "{stdout}"
    );
    assert!(stdout.contains("ip: 10.137.0.2\n"), "{stdout}");
    assert!(
        // One NAT entry: the port-9 flow under the new rules.
        stdout.contains("client vif5.0 10.137.0.10 1 drop 1\n"),
        "{stdout}"
    );
    assert!(stdout.contains("interface uplink "), "{stdout}");
    assert!(stdout.contains("interface vif5.0 "), "{stdout}");
    assert!(stdout.contains("denied by the client's rules"), "{stdout}");

    // dom0 sets the clock (qvm-sync-clock); the status shows it.
    let (_, stderr, code) = rig.call(
        &control,
        "qubes.SetDateTime",
        514,
        b"2026-11-27T10:00:00+0000\n",
    );
    assert_eq!(code, 0, "{stderr}");
    let report = rig.firewall.status(rig.handle.clock().now()).to_string();
    assert!(report.contains("wall_clock_unix: 1795773600\n"), "{report}");

    // An unknown service: a clear stderr line and 127.
    let (_, stderr, code) = rig.call(&control, "qubes.VMShell", 515, b"");
    assert_eq!(code, 127);
    assert!(stderr.contains("qubes.VMShell"), "{stderr}");

    // dom0 removes the client's rules altogether: it is blocked.
    db.send(&qdb(MessageType::Rm, "/qubes-firewall/10.137.0.10/", ""));
    db.send(&qdb(MessageType::Rm, "/qubes-firewall/10.137.0.10", ""));
    rig.settle();
    assert!(
        qdb_messages(&db.take())
            .iter()
            .all(|(t, _, _)| *t == MessageType::RespOk)
    );
    client.inject(&eth(
        FIREWALL_CLIENT_MAC,
        CLIENT_MAC,
        EthernetProtocol::Ipv4,
        &udp4(CLIENT_IP, REMOTE, 4003, 9, b"discard"),
    ));
    rig.settle();
    assert!(udp_frames(rig.uplink().take_sent()).is_empty());

    // The client goes away.
    rig.handle.xenstore().unset("backend/vif/5");
    rig.settle();
    assert!(rig.firewall.clients().is_empty());

    // The toolstack asks for poweroff; the request is acknowledged.
    rig.advance(Duration::from_secs(1));
    rig.handle.xenstore().set("control/shutdown", "poweroff");
    assert_eq!(rig.settle(), Some(Shutdown::PowerOff));
    assert!(
        rig.handle
            .xenstore()
            .writes_by_vm()
            .contains(&("control/shutdown".to_string(), String::new()))
    );
}

#[test]
fn run_loop_ends_on_reboot_and_sleeps_between_events() {
    let (mut platform, handle) = FakePlatform::new(DOMID, MEMORY);
    handle.set_max_waits(50);
    handle.on_wait(Box::new(|h, n| match n {
        0 => {
            let db = h.offer_vchan(0, firewall::QUBESDB_PORT);
            db.send(&qdb(MessageType::RespMultiread, "/qubes-ip", "10.137.0.2"));
            db.send(&qdb(
                MessageType::RespMultiread,
                "/qubes-gateway",
                "10.137.0.1",
            ));
            db.send(&qdb(MessageType::RespMultiread, "", ""));
        }
        1 => {
            h.connect_vchan(0, firewall::QREXEC_PORT).unwrap();
        }
        5 => h.xenstore().set("control/shutdown", "reboot"),
        _ => h.clock().advance(Duration::from_millis(100)),
    }));
    assert_eq!(firewall::run(&mut platform, ""), Shutdown::Reboot);
    assert!(handle.uplink_attached());
    assert!(handle.waits() >= 6);
}

#[test]
fn boot_options_configure_the_network_without_qubesdb_keys() {
    let mut rig = Rig::start("--ipv4=10.137.0.2 --ipv4-gw=10.137.0.1 --nat-table-size=2000");
    let db = rig.qubesdb(&[]);
    rig.settle();
    assert!(rig.firewall.network_up());
    let report = rig.firewall.status(rig.handle.clock().now()).to_string();
    assert!(
        report.contains("network_source: kernel command line"),
        "{report}"
    );
    assert!(report.contains("nat_entries: 0 of 2000"), "{report}");
    assert_eq!(qdb_messages(&db.take())[0].1, "/qubes-iptables-error");
}

#[test]
fn bad_boot_options_end_with_a_crash_not_a_panic() {
    let (mut platform, _handle) = FakePlatform::new(DOMID, MEMORY);
    assert_eq!(
        firewall::run(&mut platform, "--ipv4=10.137.0.2"),
        Shutdown::Crash
    );
}

#[test]
fn waits_for_missing_network_keys_then_comes_up() {
    let mut rig = Rig::start("");
    let db = rig.qubesdb(&[("/qubes-ip", "10.137.0.2")]);
    rig.settle();
    assert!(!rig.firewall.network_up(), "no /qubes-gateway yet");
    db.send(&qdb(MessageType::Write, "/qubes-gateway", "10.137.0.1"));
    rig.settle();
    assert!(rig.firewall.network_up());
}

#[test]
fn qubesdb_not_offered_yet_at_start_is_tried_again_until_it_is() {
    // dom0's qubesdb-daemon is late (on Xen: its vchan keys are not
    // written yet, and xenstored answers EACCES for them): the firewall
    // starts all the same and keeps trying, as Qubes' libvchan_client_init
    // waits for its server.
    let (mut platform, handle) = FakePlatform::new(DOMID, MEMORY);
    handle
        .xenstore()
        .set("device/vif/0/mac", "00:16:3e:5e:6c:02");
    handle.refuse_vchan_clients(0, firewall::QUBESDB_PORT, 3);
    let firewall = Firewall::start(&mut platform, "").unwrap();
    let mut rig = Rig {
        platform,
        handle,
        firewall,
    };
    assert_eq!(rig.settle(), None);
    assert_eq!(
        rig.handle
            .vchan_clients_to_refuse(0, firewall::QUBESDB_PORT),
        2
    );
    // Not before a second has passed, then once a second.
    rig.advance(Duration::from_millis(500));
    assert_eq!(rig.settle(), None);
    assert_eq!(
        rig.handle
            .vchan_clients_to_refuse(0, firewall::QUBESDB_PORT),
        2
    );
    for left in [1, 0] {
        rig.advance(firewall::RELINK_DELAY);
        assert_eq!(rig.settle(), None);
        assert_eq!(
            rig.handle
                .vchan_clients_to_refuse(0, firewall::QUBESDB_PORT),
            left
        );
        assert!(rig.handle.vchan(0, firewall::QUBESDB_PORT).is_none());
    }
    // The next attempt opens the link; dom0 offers and syncs.
    rig.advance(firewall::RELINK_DELAY);
    let _db = rig.qubesdb(&[
        ("/qubes-ip", "10.137.0.2"),
        ("/qubes-gateway", "10.137.0.1"),
    ]);
    rig.settle();
    assert!(rig.firewall.network_up());
}

#[test]
fn broken_links_are_offered_again() {
    let mut rig = Rig::start("");
    let db = rig.qubesdb(&[
        ("/qubes-ip", "10.137.0.2"),
        ("/qubes-gateway", "10.137.0.1"),
    ]);
    let control = rig.qrexec();
    rig.settle();
    assert!(rig.firewall.network_up());

    // dom0's qrexec-daemon sends garbage: the agent drops the link and,
    // after a second, offers a new one.
    control.send(&[0xff; 16]);
    rig.settle();
    assert!(control.closed_by_vm());
    rig.advance(firewall::RELINK_DELAY);
    rig.settle();
    let again = rig.handle.connect_vchan(0, firewall::QREXEC_PORT).unwrap();
    rig.settle();
    assert_eq!(qrexec_messages(&again.take())[0].0, MsgType::Hello);

    // qubesdb-daemon restarts: the VM connects again and resynchronises.
    db.close();
    rig.settle();
    rig.advance(firewall::RELINK_DELAY);
    rig.settle();
    let db2 = rig.handle.offer_vchan(0, firewall::QUBESDB_PORT);
    rig.settle();
    assert_eq!(qdb_messages(&db2.take())[0].0, MessageType::Multiread);
    // Networking stays up all along.
    assert!(rig.firewall.network_up());
}

#[test]
fn vifs_that_cannot_attach_or_parse_are_skipped() {
    let mut rig = Rig::start("");
    rig.qubesdb(&[
        ("/qubes-ip", "10.137.0.2"),
        ("/qubes-gateway", "10.137.0.1"),
    ]);
    rig.settle();
    rig.handle.break_vif(7, 0);
    rig.handle
        .xenstore()
        .set("backend/vif/7/0/ip", "10.137.0.12");
    rig.handle
        .xenstore()
        .set("backend/vif/8/0/ip", "not an address");
    rig.handle
        .xenstore()
        .set("backend/vif/x/0/ip", "10.137.0.13");
    rig.settle();
    assert!(rig.firewall.clients().is_empty());
    rig.handle
        .xenstore()
        .set("backend/vif/9/1/ip", "10.137.0.14 fd09:24ef:4179::a89:e");
    rig.settle();
    assert_eq!(
        rig.firewall.clients(),
        vec![(9, 1, Ipv4Addr::new(10, 137, 0, 14))]
    );
}

#[test]
fn connected_ips_are_read_at_sync_and_followed() {
    let mut rig = Rig::start("");
    let db = rig.qubesdb(&[
        ("/qubes-ip", "10.137.0.2"),
        ("/qubes-gateway", "10.137.0.1"),
        ("/connected-ips", "10.137.0.11 10.137.0.10"),
        ("/connected-ips6", "fd09:24ef:4179::a89:a"),
    ]);
    rig.settle();
    assert!(rig.firewall.network_up());
    let report = rig.firewall.status(rig.handle.clock().now()).to_string();
    assert!(
        report.contains("connected_ips: 10.137.0.10 10.137.0.11 fd09:24ef:4179::a89:a\n"),
        "{report}"
    );
    // The router has them: the net qube cannot send as 10.137.0.11, whose
    // qube is connected but not running (no vif).
    let spoofed = |rig: &Rig| -> u64 {
        let report = rig.firewall.status(rig.handle.clock().now()).to_string();
        report
            .lines()
            .find_map(|l| {
                l.strip_prefix("drop ")?
                    .strip_suffix(" source address not allowed on this interface")?
                    .parse()
                    .ok()
            })
            .unwrap()
    };
    rig.uplink().inject(&eth(
        OUR_MAC,
        GATEWAY_MAC,
        EthernetProtocol::Ipv4,
        &udp4(Ipv4Addr::new(10, 137, 0, 11), OUR_IP, 7, 7, b"as a client"),
    ));
    rig.settle();
    assert_eq!(spoofed(&rig), 1);
    // dom0 rewrites the keys when a qube's netvm changes.
    db.send(&qdb(MessageType::Write, "/connected-ips", "10.137.0.12 x"));
    db.send(&qdb(MessageType::Write, "/connected-ips6", ""));
    rig.settle();
    let report = rig.firewall.status(rig.handle.clock().now()).to_string();
    assert!(report.contains("connected_ips: 10.137.0.12\n"), "{report}");
    // 10.137.0.11 is no longer listed: not a spoofed source any more.
    rig.uplink().inject(&eth(
        OUR_MAC,
        GATEWAY_MAC,
        EthernetProtocol::Ipv4,
        &udp4(Ipv4Addr::new(10, 137, 0, 11), OUR_IP, 7, 7, b"as a client"),
    ));
    rig.settle();
    assert_eq!(spoofed(&rig), 1);
    assert!(
        report.contains("connected_ips_ignored: \"/connected-ips: \\\"x\\\"\"\n"),
        "{report}"
    );
}

#[test]
fn status_names_the_rule_error_of_either_family() {
    let mut rig = Rig::start("");
    let db = rig.qubesdb(&[
        ("/qubes-ip", "10.137.0.2"),
        ("/qubes-gateway", "10.137.0.1"),
        ("/qubes-firewall/10.137.0.10/policy", "accept"),
        ("/qubes-firewall/10.137.0.10", ""),
        ("/qubes-firewall/fd09::a/policy", "accept"),
        ("/qubes-firewall/fd09::a/0000", "action=accept comment=x"),
        ("/qubes-firewall/fd09::a", ""),
    ]);
    rig.handle
        .xenstore()
        .set("backend/vif/5/0/ip", "10.137.0.10 fd09::a");
    rig.settle();
    assert_eq!(rig.firewall.clients().len(), 1);
    let status = |rig: &Rig| {
        rig.firewall
            .status(rig.handle.clock().now())
            .to_string()
            .lines()
            .find(|l| l.starts_with("client vif5.0 "))
            .unwrap()
            .to_string()
    };
    let line = status(&rig);
    assert!(
        line.contains("IPv6 rules (fd09::a)") && line.contains("unsupported rule option 'comment'"),
        "{line}"
    );
    // The IPv4 set's own error comes first: expire= there.
    db.send(&qdb(MessageType::Rm, "/qubes-firewall/10.137.0.10/", ""));
    db.send(&qdb(
        MessageType::Write,
        "/qubes-firewall/10.137.0.10/policy",
        "accept",
    ));
    db.send(&qdb(
        MessageType::Write,
        "/qubes-firewall/10.137.0.10/0000",
        "action=accept expire=1700000000",
    ));
    db.send(&qdb(MessageType::Write, "/qubes-firewall/10.137.0.10", ""));
    rig.settle();
    let line = status(&rig);
    assert!(
        line.contains("unsupported rule option 'expire'") && !line.contains("IPv6"),
        "{line}"
    );
}

#[test]
fn a_vif_change_rescans_its_own_domain_and_leaves_the_others_attached() {
    let mut rig = Rig::start("");
    rig.qubesdb(&[
        ("/qubes-ip", "10.137.0.2"),
        ("/qubes-gateway", "10.137.0.1"),
    ]);
    rig.settle();
    let xs = |rig: &mut Rig, path: &str, value: Option<&str>| match value {
        Some(value) => rig.handle.xenstore().set(path, value),
        None => rig.handle.xenstore().unset(path),
    };
    xs(&mut rig, "backend/vif/10/0/ip", Some("10.137.0.20"));
    rig.settle();
    xs(&mut rig, "backend/vif/11/0/ip", Some("10.137.0.21"));
    rig.settle();
    let ip = |last| Ipv4Addr::new(10, 137, 0, last);
    assert_eq!(
        rig.firewall.clients(),
        vec![(10, 0, ip(20)), (11, 0, ip(21))]
    );
    // Domain 11 goes and 12 comes in one settle: 10 stays attached.
    xs(&mut rig, "backend/vif/11", None);
    xs(&mut rig, "backend/vif/12/0/ip", Some("10.137.0.22"));
    rig.settle();
    assert_eq!(
        rig.firewall.clients(),
        vec![(10, 0, ip(20)), (12, 0, ip(22))]
    );
    // A vif whose attach fails is skipped (and listed again with the
    // next change); the other domains' changes still apply.
    rig.handle.break_vif(13, 0);
    xs(&mut rig, "backend/vif/13/0/ip", Some("10.137.0.23"));
    rig.settle();
    assert_eq!(rig.firewall.clients().len(), 2);
    xs(&mut rig, "backend/vif/10", None);
    rig.settle();
    assert_eq!(rig.firewall.clients(), vec![(12, 0, ip(22))]);
}
