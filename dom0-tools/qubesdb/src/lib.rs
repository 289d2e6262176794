//! dom0's QubesDB: the per-VM `qubesdb-daemon` and the `qubesdb-*` tools,
//! drop-in replacements for qubes-core-qubesdb's (same program names, command
//! lines, socket paths, messages and exit codes).
//!
//! - [`daemon`]: one daemon per VM, vchan server on port 111 to the VM, local
//!   socket `/var/run/qubes/qubesdb.<name>.sock` for the tools;
//! - [`db`]: the entries and watches with the C daemon's semantics;
//! - [`wire`]: the `qdb_hdr` handling on top of `protocol::qubesdb`;
//! - [`client`], [`cli`]: the tools' side;
//! - the vchan is the qrexec crate's transport (`qrexec::vchan`).
//!
//! Nothing here trusts the VM: every byte from the vchan is checked, and a
//! VM that breaks the protocol loses its link, never the daemon.
#![forbid(unsafe_code)]
// Every module here reads what a peer or a caller sent: an index or a
// slice that could panic is an error (tests opt out per module).
#![deny(clippy::indexing_slicing)]

pub mod cli;
pub mod client;
pub mod daemon;
pub mod db;
pub mod wire;
