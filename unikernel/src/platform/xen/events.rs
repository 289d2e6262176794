//! Event channels: allocate, bind, send, close, and the 2-level pending
//! bitmap in `shared_info` that we poll (no upcall, no interrupt is ever
//! taken). Also the [`Notify`] seam the ring protocols use, so that host
//! tests count notifications instead of making hypercalls.
//!
//! Xen `public/event_channel.h`; `SCHEDOP_poll` (`public/sched.h`) wakes us
//! when any polled port becomes pending. Ports are numbers chosen by Xen;
//! a port outside the 2-level range is refused, never used as an index.
#![deny(clippy::indexing_slicing)]

use super::abi;
use super::hypercall;
use super::shared::{RawMemory, SharedMemory};

/// The 2-level ABI has 64 * 64 ports on x86-64.
pub const MAX_PORTS: u32 = 4096;

/// Sends an event to the peer bound to a local port.
pub trait Notify {
    /// Signals `port`.
    fn notify(&self, port: u32);
}

/// The real thing: `EVTCHNOP_send`.
#[derive(Clone, Copy, Debug, Default)]
pub struct XenNotify;

impl Notify for XenNotify {
    fn notify(&self, port: u32) {
        notify(port);
    }
}

/// Notifications held back until [`DeferredNotify::send`]: the NICs'
/// (netfront, netback), sent when the firewall is about to sleep. Sent at
/// once, each one let the peer's vCPU preempt ours in the middle of a
/// step (under Xen's scheduler a woken vCPU runs first); held back, a
/// step's work is done before anyone is woken, and each port is signalled
/// once however many frames it got.
#[derive(Clone, Debug, Default)]
pub struct DeferredNotify(alloc::rc::Rc<core::cell::RefCell<alloc::vec::Vec<u32>>>);

impl DeferredNotify {
    /// Sends the notifications held back (`EVTCHNOP_send` once per port).
    pub fn send(&self) {
        let ports = core::mem::take(&mut *self.0.borrow_mut());
        for port in ports {
            notify(port);
        }
    }

    /// Ports waiting for [`Self::send`].
    pub fn held(&self) -> usize {
        self.0.borrow().len()
    }
}

impl Notify for DeferredNotify {
    fn notify(&self, port: u32) {
        let mut ports = self.0.borrow_mut();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
}

/// `EVTCHNOP_send` on `port` (ignores failure: a closed port has no peer).
pub fn notify(port: u32) {
    let mut arg = abi::EvtchnPort { port };
    let _ = hypercall::event_channel_op(abi::EVTCHNOP_SEND, &mut arg);
}

/// `EVTCHNOP_alloc_unbound`: a fresh port that `remote` may bind to.
pub fn alloc_unbound(remote: u16) -> Result<u32, i64> {
    let mut arg = abi::EvtchnAllocUnbound {
        dom: abi::DOMID_SELF,
        remote_dom: remote,
        port: 0,
    };
    match hypercall::event_channel_op(abi::EVTCHNOP_ALLOC_UNBOUND, &mut arg) {
        0 if arg.port < MAX_PORTS => Ok(arg.port),
        0 => Err(-22),
        rc => Err(rc),
    }
}

/// `EVTCHNOP_bind_interdomain`: binds to `remote_port` of `remote`.
pub fn bind_interdomain(remote: u16, remote_port: u32) -> Result<u32, i64> {
    let mut arg = abi::EvtchnBindInterdomain {
        remote_dom: remote,
        remote_port,
        local_port: 0,
    };
    match hypercall::event_channel_op(abi::EVTCHNOP_BIND_INTERDOMAIN, &mut arg) {
        0 if arg.local_port < MAX_PORTS => Ok(arg.local_port),
        0 => Err(-22),
        rc => Err(rc),
    }
}

/// `EVTCHNOP_close`.
pub fn close(port: u32) {
    let mut arg = abi::EvtchnPort { port };
    let _ = hypercall::event_channel_op(abi::EVTCHNOP_CLOSE, &mut arg);
}

/// The `shared_info` page: pending/mask bitmaps and vCPU 0's time info.
#[derive(Clone, Copy, Debug)]
pub struct SharedInfo {
    mem: RawMemory,
}

impl SharedInfo {
    /// Maps `shared_info` at guest frame `gpfn` (`XENMEM_add_to_physmap`).
    ///
    /// # Safety
    /// `gpfn` must be a frame inside the identity map that nothing else
    /// uses, now or later.
    pub unsafe fn map(gpfn: u64) -> Result<Self, i64> {
        match hypercall::add_to_physmap(abi::XENMAPSPACE_SHARED_INFO, 0, gpfn) {
            0 => Ok(SharedInfo {
                // SAFETY: Xen now backs `gpfn` with shared_info for the life
                // of the domain; the caller reserved the frame for it.
                mem: unsafe { RawMemory::new((gpfn << 12) as *mut u8, abi::PAGE_SIZE) },
            }),
            rc => Err(rc),
        }
    }

    /// The page, for the clock.
    pub fn memory(&self) -> RawMemory {
        self.mem
    }

    /// Masks `port` (no upcall is wanted; `SCHEDOP_poll` still sees it).
    pub fn mask(&self, port: u32) {
        if port < MAX_PORTS {
            let byte = abi::SHARED_INFO_EVTCHN_MASK + (port / 8) as usize;
            self.mem.fetch_or_u8(byte, 1 << (port % 8));
        }
    }

    /// Clears `port`'s pending bit; returns whether it was set.
    pub fn take_pending(&self, port: u32) -> bool {
        if port >= MAX_PORTS {
            return false;
        }
        let byte = abi::SHARED_INFO_EVTCHN_PENDING + (port / 8) as usize;
        let bit = 1u8 << (port % 8);
        // Byte-wise atomics on the little-endian u64 words Xen sets with
        // locked bit operations: the same memory, the same bit.
        self.mem.fetch_and_u8(byte, !bit) & bit != 0
    }

    /// Whether `port` is pending (without clearing it).
    pub fn is_pending(&self, port: u32) -> bool {
        port < MAX_PORTS
            && self
                .mem
                .load_u8(abi::SHARED_INFO_EVTCHN_PENDING + (port / 8) as usize)
                & (1 << (port % 8))
                != 0
    }
}
