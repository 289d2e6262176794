//! Qubes qrexec policy (being written).
#![forbid(unsafe_code)]
