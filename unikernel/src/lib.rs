//! The Qubes firewall unikernel: the portable core above the platform line.
//!
//! This crate is `no_std` + `alloc`. Everything outside `platform/` is
//! `#![forbid(unsafe_code)]` (each module says so itself) and runs under
//! `cargo test` on the host against in-memory doubles; `platform/xen` (the
//! PVH guest) and the hosted Linux platform plug in the real transports.
//! See ARCHITECTURE.md at the repository root for the map.
#![no_std]
#![deny(unsafe_code)]

extern crate alloc;
#[cfg(any(test, feature = "hosted"))]
extern crate std;

// Networking: rules, NAT and routing.
pub mod arp;
pub mod client_net;
pub mod dns;
pub mod fragments;
pub mod nat;
pub mod offload;
pub mod router;
pub mod rules;
pub mod uplink;
pub mod wire;

// Control plane: QubesDB, qrexec, xenstore and the program flow.
pub mod config;
pub mod firewall;
pub mod qrexec;
pub mod qubesdb;
pub mod status;
pub mod testing;
pub mod xenstore;

pub mod platform;
