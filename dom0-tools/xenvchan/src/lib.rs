//! xenvchan: a safe, blocking, thread-shareable handle on Xen's
//! `libxenvchan` (the shared-ring byte stream between two domains), for the
//! dom0 tools' real-Xen vchan transport.
//!
//! With the cargo feature `xen` the crate links `libxenvchan` (Debian:
//! `libxen-dev` to build, `libxenvchan4.17` to run) and exports
//! [`XenVchan`]. Without it the crate builds anywhere, links nothing, and
//! [`AVAILABLE`] is `false`: the blocking machinery ([`blocking`]) is still
//! built and tested against an in-memory double.
//!
//! Facts (Xen 4.17 `tools/include/libxenvchan.h`, `tools/libs/vchan/io.c`,
//! `init.c`): a handle starts non-blocking (`blocking = 0`), so
//! `libxenvchan_read`/`write` move what fits and return at once;
//! `libxenvchan_data_ready`/`buffer_space` also ask the peer for a
//! notification, so checking them before waiting never loses a wake-up;
//! `libxenvchan_is_open` is 0 (closed), 1 (open) or 2 (server waiting for
//! its client), read straight from the peer's live byte in the shared page
//! (any other value counts as closed here); `libxenvchan_fd_for_select` is
//! the event channel's fd and `libxenvchan_wait` consumes its pending event
//! (blocking only if none is pending).
//!
//! Hostile peers (`tools/libs/vchan/io.c`): libxenvchan reads each shared
//! index once, reports 0 bytes ready or free when the peer's index is out
//! of range ("locking up the ring"), and masks ring offsets, so a peer can
//! stall its own link but not make us copy outside the ring; counts from
//! libxenvchan are never used here beyond the buffer we passed.
//!
//! This crate must never hold the handle's lock while blocked in `poll`,
//! and never lets two threads consume the same event channel at once (one
//! polls, the others wait on a condition variable for it).

// Only `ffi` (the libxenvchan calls) may use unsafe; see its SAFETY comments.
#![deny(unsafe_code)]
// Every module here reads what a peer or a caller sent: an index or a
// slice that could panic is an error (tests opt out per module).
#![deny(clippy::indexing_slicing)]

pub mod blocking;

#[cfg(feature = "xen")]
#[allow(unsafe_code)] // reason: the FFI layer; every unsafe block carries a SAFETY comment.
mod ffi;

#[cfg(feature = "xen")]
pub use ffi::XenVchan;

/// Was this build linked against `libxenvchan` (feature `xen`)?
pub const AVAILABLE: bool = cfg!(feature = "xen");

/// The xenstore directory where domain `server` offers vchan `port` to
/// domain `client`: `/local/domain/<server>/data/vchan/<client>/<port>`
/// (qubes-core-vchan-xen `vchan/init.c`: the server writes `ring-ref` and
/// `event-channel` there; the client reads them).
pub fn xs_path(server: u16, client: u16, port: u32) -> String {
    format!("/local/domain/{server}/data/vchan/{client}/{port}")
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    #[test]
    fn xenstore_layout() {
        assert_eq!(xs_path(0, 5, 111), "/local/domain/0/data/vchan/5/111");
        assert_eq!(xs_path(7, 0, 512), "/local/domain/7/data/vchan/0/512");
    }
}
