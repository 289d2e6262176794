//! Shared helpers for the end-to-end tests (being written).
#![forbid(unsafe_code)]
