//! Neighbour resolution: ARP (IPv4) and NDP (IPv6) on both sides.
//!
//! Towards clients the firewall is a fixed responder, like
//! qubes-mirage-firewall's `Fixed_arp`: it answers every ARP request (and
//! every NDP neighbour solicitation) with its client-side MAC, except for
//! the client's own address, so all of a client's traffic comes to us and
//! we never learn anything from a client. On the uplink it answers for its
//! own address and learns the gateway's MAC (`/qubes-gateway`,
//! `/qubes-gateway6`) from ARP/NDP, asking until it knows it.
//!
//! Packets are built and parsed by hand from RFC 826 / RFC 4861 layouts
//! (with smoltcp's `wire` types for the Ethernet header). Nothing here may
//! panic on a frame a peer sent, and nothing a client sends changes state;
//! `clippy::indexing_slicing` is denied so the compiler checks the former.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use core::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::wire::EthernetAddress;

use crate::wire::{PROTO_ICMPV6, checksum};

/// The MAC the firewall uses towards its clients: Qubes' vif backends use
/// `fe:ff:ff:ff:ff:ff` (so does mirage-firewall).
pub const CLIENT_SIDE_MAC: EthernetAddress = EthernetAddress([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);

pub use crate::wire::{ETH_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6};

/// An ARP frame: Ethernet header + 28 bytes of ARP.
pub const ARP_FRAME_LEN: usize = ETH_LEN + 28;

/// ARP request.
pub const ARP_REQUEST: u16 = 1;
/// ARP reply.
pub const ARP_REPLY: u16 = 2;

/// ICMPv6 neighbour solicitation.
pub const NDP_SOLICIT: u8 = 135;
/// ICMPv6 neighbour advertisement.
pub const NDP_ADVERT: u8 = 136;

/// A parsed Ethernet/IPv4 ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply (others are kept raw).
    pub operation: u16,
    /// Sender hardware address.
    pub sender_mac: EthernetAddress,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: EthernetAddress,
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

fn mac_at(bytes: &[u8], at: usize) -> Option<EthernetAddress> {
    let raw: [u8; 6] = bytes.get(at..at + 6)?.try_into().ok()?;
    Some(EthernetAddress(raw))
}

fn ipv4_at(bytes: &[u8], at: usize) -> Option<Ipv4Addr> {
    let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(raw))
}

fn ipv6_at(bytes: &[u8], at: usize) -> Option<Ipv6Addr> {
    let raw: [u8; 16] = bytes.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(raw))
}

impl Arp {
    /// Parses the ARP payload of an Ethernet frame. `None` unless it is
    /// Ethernet (1) / IPv4 (0x0800) with lengths 6 and 4.
    pub fn parse(payload: &[u8]) -> Option<Arp> {
        if payload.get(0..6)? != [0, 1, 0x08, 0x00, 6, 4] {
            return None;
        }
        Some(Arp {
            operation: u16::from_be_bytes([*payload.get(6)?, *payload.get(7)?]),
            sender_mac: mac_at(payload, 8)?,
            sender_ip: ipv4_at(payload, 14)?,
            target_mac: mac_at(payload, 18)?,
            target_ip: ipv4_at(payload, 24)?,
        })
    }

    /// Writes a whole Ethernet frame carrying this ARP packet, from
    /// `sender_mac` to `eth_dst`.
    pub fn frame(&self, eth_dst: EthernetAddress) -> [u8; ARP_FRAME_LEN] {
        let mut frame = [0u8; ARP_FRAME_LEN];
        frame[0..6].copy_from_slice(&eth_dst.0);
        frame[6..12].copy_from_slice(&self.sender_mac.0);
        frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        frame[14..20].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
        frame[20..22].copy_from_slice(&self.operation.to_be_bytes());
        frame[22..28].copy_from_slice(&self.sender_mac.0);
        frame[28..32].copy_from_slice(&self.sender_ip.octets());
        frame[32..38].copy_from_slice(&self.target_mac.0);
        frame[38..42].copy_from_slice(&self.target_ip.octets());
        frame
    }
}

/// The fixed responder towards a client: the reply frame for an ARP
/// request, or `None` (not a request, or it asks for the client's own
/// address — a duplicate-address probe we must not answer).
pub fn answer_client_arp(arp: &Arp, client_ip: Ipv4Addr) -> Option<[u8; ARP_FRAME_LEN]> {
    if arp.operation != ARP_REQUEST || arp.target_ip == client_ip {
        return None;
    }
    let reply = Arp {
        operation: ARP_REPLY,
        sender_mac: CLIENT_SIDE_MAC,
        sender_ip: arp.target_ip,
        target_mac: arp.sender_mac,
        target_ip: arp.sender_ip,
    };
    Some(reply.frame(arp.sender_mac))
}

/// What the uplink learned or must answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkArp {
    /// Nothing to do.
    Ignore,
    /// The gateway told us its MAC.
    GatewayIs(EthernetAddress),
    /// Someone asked for our address: send this reply (and, if the asker
    /// is the gateway, it also told us its MAC).
    Answer([u8; ARP_FRAME_LEN], Option<EthernetAddress>),
}

/// Handles an ARP packet on the uplink.
pub fn handle_uplink_arp(
    arp: &Arp,
    our_ip: Ipv4Addr,
    our_mac: EthernetAddress,
    gateway: Ipv4Addr,
) -> UplinkArp {
    let from_gateway = arp.sender_ip == gateway
        && !arp.sender_mac.is_broadcast()
        && !arp.sender_mac.is_multicast()
        && arp.sender_mac.0 != [0; 6];
    let learned = from_gateway.then_some(arp.sender_mac);
    if arp.operation == ARP_REQUEST && arp.target_ip == our_ip {
        let reply = Arp {
            operation: ARP_REPLY,
            sender_mac: our_mac,
            sender_ip: our_ip,
            target_mac: arp.sender_mac,
            target_ip: arp.sender_ip,
        };
        return UplinkArp::Answer(reply.frame(arp.sender_mac), learned);
    }
    match learned {
        Some(mac) if arp.operation == ARP_REPLY || arp.operation == ARP_REQUEST => {
            UplinkArp::GatewayIs(mac)
        }
        _ => UplinkArp::Ignore,
    }
}

/// The ARP request we broadcast for the gateway.
pub fn gateway_request(
    our_ip: Ipv4Addr,
    our_mac: EthernetAddress,
    gateway: Ipv4Addr,
) -> [u8; ARP_FRAME_LEN] {
    Arp {
        operation: ARP_REQUEST,
        sender_mac: our_mac,
        sender_ip: our_ip,
        target_mac: EthernetAddress([0; 6]),
        target_ip: gateway,
    }
    .frame(EthernetAddress::BROADCAST)
}

/// A parsed neighbour solicitation or advertisement (ICMPv6 message only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ndp {
    /// [`NDP_SOLICIT`] or [`NDP_ADVERT`].
    pub kind: u8,
    /// The target address.
    pub target: Ipv6Addr,
    /// The source (solicit) or target (advert) link-layer address option.
    pub lladdr: Option<EthernetAddress>,
}

impl Ndp {
    /// Parses an ICMPv6 message (after the IPv6 header). `None` when it is
    /// not a well-formed NS/NA (code 0, at least 24 bytes, options whose
    /// lengths stay inside the message).
    pub fn parse(icmp: &[u8]) -> Option<Ndp> {
        let kind = *icmp.first()?;
        if (kind != NDP_SOLICIT && kind != NDP_ADVERT) || *icmp.get(1)? != 0 {
            return None;
        }
        let target = ipv6_at(icmp, 8)?;
        let mut lladdr = None;
        let mut at = 24;
        while at < icmp.len() {
            let option = *icmp.get(at)?;
            let units = usize::from(*icmp.get(at + 1)?);
            if units == 0 || at + units * 8 > icmp.len() {
                return None;
            }
            let wanted = if kind == NDP_SOLICIT { 1 } else { 2 };
            if option == wanted && units == 1 {
                lladdr = Some(mac_at(icmp, at + 2)?);
            }
            at += units * 8;
        }
        Some(Ndp {
            kind,
            target,
            lladdr,
        })
    }
}

/// Length of the NDP frames we send: Ethernet + IPv6 + 24-byte NS/NA +
/// one 8-byte link-layer option.
pub const NDP_FRAME_LEN: usize = ETH_LEN + 40 + 32;

/// Builds an NS or NA frame. `router` sets the R flag of an advert.
#[allow(clippy::too_many_arguments)] // reason: one call site per kind; a struct would only rename the fields.
pub fn ndp_frame(
    kind: u8,
    eth_src: EthernetAddress,
    eth_dst: EthernetAddress,
    ip_src: Ipv6Addr,
    ip_dst: Ipv6Addr,
    target: Ipv6Addr,
    solicited: bool,
    router: bool,
) -> [u8; NDP_FRAME_LEN] {
    // Built in fixed-size arrays with constant offsets, so every index is
    // checked at compile time (no slice indexing: the module denies it).
    let mut icmp = [0u8; 32];
    icmp[0] = kind;
    if kind == NDP_ADVERT {
        // Flags: R(outer), S(olicited), O(verride).
        icmp[4] = (u8::from(router) << 7) | (u8::from(solicited) << 6) | 0x20;
    }
    icmp[8..24].copy_from_slice(&target.octets());
    icmp[24] = if kind == NDP_SOLICIT { 1 } else { 2 };
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&eth_src.0);
    let sum = checksum::pseudo_v6(&ip_src, &ip_dst, PROTO_ICMPV6, 32);
    let sum = checksum::finish(checksum::add(sum, &icmp));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut frame = [0u8; NDP_FRAME_LEN];
    frame[0..6].copy_from_slice(&eth_dst.0);
    frame[6..12].copy_from_slice(&eth_src.0);
    frame[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    // IPv6 header at ETH_LEN (14): version, payload length, next header,
    // hop limit 255 (RFC 4861 §7.1), source, destination.
    frame[14] = 0x60;
    frame[18..20].copy_from_slice(&32u16.to_be_bytes());
    frame[20] = PROTO_ICMPV6;
    frame[21] = 255;
    frame[22..38].copy_from_slice(&ip_src.octets());
    frame[38..54].copy_from_slice(&ip_dst.octets());
    frame[54..86].copy_from_slice(&icmp);
    frame
}

/// The solicited-node multicast address of `addr` (RFC 4291 §2.7.1).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The Ethernet multicast address of an IPv6 multicast address.
pub fn multicast_mac(addr: Ipv6Addr) -> EthernetAddress {
    let o = addr.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes frames it built itself.
mod tests {
    use super::*;

    const CLIENT_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x0a]);

    fn request(sender: Ipv4Addr, target: Ipv4Addr) -> Arp {
        Arp {
            operation: ARP_REQUEST,
            sender_mac: CLIENT_MAC,
            sender_ip: sender,
            target_mac: EthernetAddress([0; 6]),
            target_ip: target,
        }
    }

    #[test]
    fn client_gets_our_mac_for_any_address_but_its_own() {
        let client = Ipv4Addr::new(10, 137, 0, 10);
        let frame =
            answer_client_arp(&request(client, Ipv4Addr::new(10, 137, 0, 2)), client).unwrap();
        let reply = Arp::parse(&frame[ETH_LEN..]).unwrap();
        assert_eq!(reply.operation, ARP_REPLY);
        assert_eq!(reply.sender_mac, CLIENT_SIDE_MAC);
        assert_eq!(reply.sender_ip, Ipv4Addr::new(10, 137, 0, 2));
        assert_eq!(reply.target_ip, client);
        assert_eq!(&frame[0..6], &CLIENT_MAC.0);
        assert!(answer_client_arp(&request(client, Ipv4Addr::new(8, 8, 8, 8)), client).is_some());
        assert!(answer_client_arp(&request(client, client), client).is_none());
        let mut not_request = request(client, Ipv4Addr::new(8, 8, 8, 8));
        not_request.operation = ARP_REPLY;
        assert!(answer_client_arp(&not_request, client).is_none());
    }

    #[test]
    fn uplink_learns_gateway_and_answers_for_us() {
        let us = Ipv4Addr::new(10, 137, 0, 2);
        let gw = Ipv4Addr::new(10, 137, 0, 1);
        let our_mac = EthernetAddress([0, 0x16, 0x3e, 0, 0, 2]);
        let gw_mac = EthernetAddress([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut reply = request(gw, us);
        reply.sender_mac = gw_mac;
        match handle_uplink_arp(&reply, us, our_mac, gw) {
            UplinkArp::Answer(frame, learned) => {
                assert_eq!(learned, Some(gw_mac));
                assert_eq!(Arp::parse(&frame[ETH_LEN..]).unwrap().sender_mac, our_mac);
            }
            other => panic!("{other:?}"),
        }
        reply.operation = ARP_REPLY;
        assert_eq!(
            handle_uplink_arp(&reply, us, our_mac, gw),
            UplinkArp::GatewayIs(gw_mac)
        );
        let mut stranger = reply;
        stranger.sender_ip = Ipv4Addr::new(10, 137, 0, 99);
        assert_eq!(
            handle_uplink_arp(&stranger, us, our_mac, gw),
            UplinkArp::Ignore
        );
        let req = gateway_request(us, our_mac, gw);
        assert_eq!(Arp::parse(&req[ETH_LEN..]).unwrap().target_ip, gw);
    }

    #[test]
    fn malformed_arp_and_ndp_are_refused() {
        assert!(Arp::parse(&[]).is_none());
        assert!(Arp::parse(&[0, 1, 8, 0, 6, 4, 0, 1]).is_none());
        assert!(
            Arp::parse(&[
                0, 6, 8, 0, 6, 4, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ])
            .is_none()
        );
        assert!(Ndp::parse(&[]).is_none());
        assert!(Ndp::parse(&[135, 0, 0, 0]).is_none());
        let mut ns = [0u8; 32];
        ns[0] = 135;
        ns[24] = 1;
        ns[25] = 0; // zero-length option: refused, no endless loop
        assert!(Ndp::parse(&ns).is_none());
        ns[25] = 4; // option runs past the end
        assert!(Ndp::parse(&ns).is_none());
    }

    #[test]
    fn ndp_frames_round_trip_with_valid_checksum() {
        let src: Ipv6Addr = "fd09:24ef:4179::a89:2".parse().unwrap();
        let dst: Ipv6Addr = "fd09:24ef:4179::a89:a".parse().unwrap();
        let frame = ndp_frame(
            NDP_ADVERT,
            CLIENT_SIDE_MAC,
            CLIENT_MAC,
            src,
            dst,
            src,
            true,
            true,
        );
        let ndp = Ndp::parse(&frame[ETH_LEN + 40..]).unwrap();
        assert_eq!(ndp.kind, NDP_ADVERT);
        assert_eq!(ndp.target, src);
        assert_eq!(ndp.lladdr, Some(CLIENT_SIDE_MAC));
        let sum = checksum::pseudo_v6(&src, &dst, PROTO_ICMPV6, 32);
        assert_eq!(
            checksum::finish(checksum::add(sum, &frame[ETH_LEN + 40..])),
            0
        );
        assert_eq!(
            solicited_node(dst),
            "ff02::1:ff89:a".parse::<Ipv6Addr>().unwrap()
        );
    }
}
