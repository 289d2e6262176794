//! The Qubes firewall unikernel (being written).
#![no_std]
#![deny(unsafe_code)]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod platform;
