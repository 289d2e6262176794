//! The router: the seam between the program flow (`firewall.rs`) and the
//! packet path. The types land in the next commit; this is the API the
//! program flow codes against (NETWORK engineer owns it).
//!
//! ```text
//! use unikernel::router::{Router, NetworkConfig, Caps, ClientId, ClientConfig};
//! use unikernel::rules::RuleSet;
//!
//! // From QubesDB: /qubes-ip, /qubes-gateway, /qubes-primary-dns,
//! // /qubes-secondary-dns, /qubes-ip6, /qubes-gateway6; our uplink MAC from
//! // xenstore device/vif/0/mac; a seed from the platform (hash keys, NAT
//! // ports and DNS ids).
//! let config = NetworkConfig {
//!     uplink_mac: EthernetAddress,          // smoltcp::wire::EthernetAddress
//!     ip: Ipv4Addr, gateway: Ipv4Addr,
//!     primary_dns: Option<Ipv4Addr>, secondary_dns: Option<Ipv4Addr>,
//!     ip6: Option<Ipv6Addr>, gateway6: Option<Ipv6Addr>,
//!     seed: u64,
//! };
//! let mut router = Router::new(config, Caps::for_memory(platform.memory_bytes()), now);
//!
//! // A client vif appeared: backend/vif/<domid>/<device>/ip (first token),
//! // its MAC (backend/vif/<domid>/<device>/mac) if known.
//! router.add_client(ClientId { domid, device }, ClientConfig { ip, ip6: None, mac: None })?;
//! router.remove_client(ClientId { domid, device });
//!
//! // Rules: after the commit write to /qubes-firewall/<ip>, hand the entries
//! // below /qubes-firewall/<ip>/ (keys relative: "policy", "0000", …).
//! // Keyed by address, so rules may arrive before or after the vif; a
//! // client without rules is deny-all. Replacing a set flushes that
//! // client's NAT entries. The returned set's `error()` is for logging.
//! router.set_rules(client_ip /* IpAddr */, RuleSet::parse(entries));
//! router.set_wall_clock(Some(unix_seconds));   // for expire=; None = unknown
//!
//! // The main loop, per NIC (D: smoltcp::phy::Device):
//! router.pump_uplink(&mut uplink_nic, now);     // receive all, then transmit queued
//! router.pump_client(id, &mut client_nic, now);
//! router.poll_timers(now);                      // NAT expiry, ARP, DNS refresh
//! let deadline: Option<Instant> = router.poll_at();
//! // (or frame by frame: handle_uplink_frame(&[u8], now),
//! //  handle_client_frame(id, &[u8], now), pop_uplink_frame(),
//! //  pop_client_frame(id) -> Option<Vec<u8>>)
//!
//! // Status: router.counters() (per interface and per drop reason),
//! // router.nat_len(), router.rules_error(client_ip).
//! ```
#![forbid(unsafe_code)]
