//! The wire formats that both sides of a Qubes inter-domain link share.
//!
//! Everything here is `no_std`, allocation-free and `forbid(unsafe_code)`, so
//! the firewall unikernel and the std dom0 tools parse and emit the very same
//! bytes. Each format follows the smoltcp pattern: a checked view over bytes
//! (`Packet<T: AsRef<[u8]>>` with `new_checked`, after which no accessor
//! panics) and a parsed `Repr` with `parse` and `emit`. Nothing in this crate
//! trusts its input: every length, index and string comes from a peer that
//! may be hostile, and malformed input is a typed error.
#![no_std]
#![forbid(unsafe_code)]
// Every module here reads what a peer or a caller sent: an index or a
// slice that could panic is an error (tests opt out per module).
#![deny(clippy::indexing_slicing)]

mod framing;
pub mod qrexec;
pub mod qubesdb;
pub mod vchan;
pub mod xenstore;
