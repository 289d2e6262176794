//! Isolation between clients and anti-spoofing by address, as Linux
//! sys-firewall does it:
//! - client → client is never forwarded (the `qubes` table's forward chain:
//!   `oifgroup 2 counter drop` for every new flow whose output is a client
//!   vif). The sender's `qubes-firewall` chain has the same priority and is
//!   registered later, so netfilter runs it first: a flow the sender's
//!   rules deny is rejected, one they accept is then dropped silently;
//! - `/connected-ips`, `/connected-ips6` (every qube whose netvm is this
//!   firewall, running or not; `qubesagent/firewall.py`
//!   `update_connected_ips`): packets from a non-vif interface (the uplink)
//!   with such a source are dropped (`iifname != "vif*" saddr @connected
//!   drop`), and packets that would leave on one with such a destination
//!   too (`oifname != "vif*" daddr @connected drop`): a flow to a connected
//!   qube that is not running is not sent to the net qube.
//!
//! Running clients' own addresses are covered too (Linux's `downstream` set
//! and per-vif `allowed` set from `vif-route-qubes`): a client may only use
//! its own source address (checked where its frames come in).
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use core::net::IpAddr;

use super::{DropReason, Router};

impl Router {
    /// Sets the addresses of every qube connected to this firewall, running
    /// or not, IPv4 and IPv6 together (`/connected-ips` and
    /// `/connected-ips6`, replacing the last call's). Packets from the
    /// uplink with one of them as source are dropped (counted
    /// `SpoofedSource`); clients' packets to one that is not a running
    /// client are not sent out (counted `ClientToClient`), and flows already
    /// going to a newly listed address are ended.
    pub fn set_connected_ips(&mut self, addresses: &[IpAddr]) {
        let old = self.connected.clone();
        self.connected.clear();
        self.connected.extend(addresses.iter().copied());
        if self.connected.iter().any(|a| !old.contains(a)) {
            let connected = &self.connected;
            self.nat
                .flush_destinations(|dst| connected.contains(dst) && !old.contains(dst));
        }
        self.rebuild_client_addresses();
    }

    /// How many addresses [`Router::set_connected_ips`] last listed (each
    /// once).
    pub fn connected_len(&self) -> usize {
        self.connected.len()
    }

    /// Whether `address` belongs to a client: a running one, or one dom0
    /// lists as connected.
    pub(super) fn is_client_address(&self, address: IpAddr) -> bool {
        self.client_addresses.contains(&address)
    }

    /// Rebuilds the one set [`Router::is_client_address`] looks in.
    pub(super) fn rebuild_client_addresses(&mut self) {
        self.client_addresses.clear();
        self.client_addresses
            .extend(self.by_address.keys().chain(&self.connected).copied());
    }

    /// For a new flow the sender's rules accepted: `true` (dropped,
    /// counted) when its destination is a client, running or only
    /// connected. Flows between clients are never forwarded.
    pub(super) fn isolated(&mut self, dst: IpAddr) -> bool {
        if self.is_client_address(dst) {
            self.drop(DropReason::ClientToClient);
            return true;
        }
        false
    }
}
