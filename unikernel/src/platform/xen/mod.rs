//! The Xen PVH platform: the firewall as a Xen guest. Boot, hypercalls, the
//! PV console, the clock, event channels, grant tables, the xenstore ring,
//! libxenvchan-compatible vchans and the uplink netfront, tied together in
//! [`XenPlatform`].
//!
//! Layout: `abi` declares the C ABI; `hypercall` is the only place that
//! traps to Xen; `shared` is the only place that touches shared memory
//! (volatile/atomic, behind the `SharedMemory` trait); the ring protocols
//! (`console`, `xenstore_ring`, `vchan`, `netfront`, `netback`), checksum
//! completion for offloading peers (`csum`) and the bookkeeping (`grant`,
//! `frames`, `time`, `start_info`) are portable and tested on the host with a
//! `Vec`-backed memory; `heap` (allocations of a page or more start on one)
//! is tested over the system allocator; `runtime` (boot code, allocator, panic handler,
//! libc symbols) exists only in the image (feature `xen`), and so does the
//! machine side of `traps` (IDT, guard page, exception reports; its
//! encoders and report are tested on the host). Every value a
//! peer or the toolstack wrote is read once, copied and validated before
//! use; nothing here may panic on peer input.
#![allow(unsafe_code)] // reason: hypercalls, shared pages, boot; each block carries a SAFETY comment.

pub mod abi;
pub mod console;
pub mod csum;
pub mod entropy;
pub mod events;
pub mod frames;
pub mod grant;
pub mod heap;
pub mod hypercall;
pub mod mem;
pub mod netback;
pub mod netfront;
mod platform;
#[cfg(all(feature = "xen", not(test)))]
pub mod runtime;
pub mod shared;
pub mod start_info;
pub mod time;
pub mod traps;
pub mod vchan;
pub mod xenbus;
pub mod xenstore_ring;

pub use platform::{XenLinkWait, XenNic, XenPlatform, XenVchan, XenXenstore};
