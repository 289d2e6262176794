//! The slice of Xen's public ABI this guest uses, as `#[repr(C)]` structs and
//! constants, each layout checked in tests against the C headers' offsets.
//!
//! Sources (Xen 4.17 `xen/include/public/`): `xen.h` (hypercall numbers,
//! `DOMID_SELF`), `sched.h`, `event_channel.h`, `grant_table.h`, `memory.h`,
//! `hvm/params.h`, `hvm/hvm_op.h`, `arch-x86/hvm/start_info.h`,
//! `arch-x86/xen.h` (`vcpu_time_info`, `shared_info` on x86-64),
//! `io/console.h`, `io/xs_wire.h`. `xen-sys` covers some of these but lacks
//! grant tables, HVM params and the PVH start info, so they are declared
//! here, once. This module holds plain data only: it must never touch
//! memory or make a hypercall.
#![allow(dead_code)] // reason: the ABI is declared whole; not every constant is used yet.

/// Hypercall numbers (`xen.h`).
pub const HYPERVISOR_MEMORY_OP: usize = 12;
pub const HYPERVISOR_XEN_VERSION: usize = 17;
pub const HYPERVISOR_GRANT_TABLE_OP: usize = 20;
pub const HYPERVISOR_VCPU_OP: usize = 24;
pub const HYPERVISOR_SCHED_OP: usize = 29;
pub const HYPERVISOR_EVENT_CHANNEL_OP: usize = 32;
pub const HYPERVISOR_HVM_OP: usize = 34;

/// `DOMID_SELF` (`xen.h`).
pub const DOMID_SELF: u16 = 0x7ff0;

/// `sched.h`.
pub const SCHEDOP_YIELD: u64 = 0;
pub const SCHEDOP_SHUTDOWN: u64 = 2;
pub const SCHEDOP_POLL: u64 = 3;
pub const SHUTDOWN_POWEROFF: u32 = 0;
pub const SHUTDOWN_REBOOT: u32 = 1;
pub const SHUTDOWN_CRASH: u32 = 3;

/// `struct sched_shutdown`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct SchedShutdown {
    pub reason: u32,
}

/// `struct sched_poll`: `ports` is a guest handle (a pointer), `timeout` is
/// absolute Xen system time in ns (0 = none).
#[repr(C)]
#[derive(Debug)]
pub struct SchedPoll {
    pub ports: u64,
    pub nr_ports: u32,
    pub timeout: u64,
}

/// `event_channel.h`.
pub const EVTCHNOP_BIND_INTERDOMAIN: u64 = 0;
pub const EVTCHNOP_CLOSE: u64 = 3;
pub const EVTCHNOP_SEND: u64 = 4;
pub const EVTCHNOP_ALLOC_UNBOUND: u64 = 6;

/// `struct evtchn_alloc_unbound`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct EvtchnAllocUnbound {
    pub dom: u16,
    pub remote_dom: u16,
    pub port: u32,
}

/// `struct evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct EvtchnBindInterdomain {
    pub remote_dom: u16,
    pub remote_port: u32,
    pub local_port: u32,
}

/// `struct evtchn_send` / `struct evtchn_close`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct EvtchnPort {
    pub port: u32,
}

/// `hvm_op.h` / `params.h`.
pub const HVMOP_GET_PARAM: u64 = 1;
pub const HVM_PARAM_STORE_PFN: u32 = 1;
pub const HVM_PARAM_STORE_EVTCHN: u32 = 2;
pub const HVM_PARAM_CONSOLE_PFN: u32 = 17;
pub const HVM_PARAM_CONSOLE_EVTCHN: u32 = 18;

/// `struct xen_hvm_param`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct HvmParam {
    pub domid: u16,
    pub index: u32,
    pub value: u64,
}

/// `memory.h`.
pub const XENMEM_ADD_TO_PHYSMAP: u64 = 7;
pub const XENMAPSPACE_SHARED_INFO: u32 = 0;
pub const XENMAPSPACE_GRANT_TABLE: u32 = 1;

/// `struct xen_add_to_physmap`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct AddToPhysmap {
    pub domid: u16,
    pub size: u16,
    pub space: u32,
    pub idx: u64,
    pub gpfn: u64,
}

/// `grant_table.h` (version 1).
pub const GNTTABOP_MAP_GRANT_REF: u64 = 0;
pub const GNTTABOP_UNMAP_GRANT_REF: u64 = 1;
pub const GNTTABOP_QUERY_SIZE: u64 = 6;
pub const GNTMAP_HOST_MAP: u32 = 1 << 1;
pub const GNTMAP_READONLY: u32 = 1 << 2;
pub const GTF_PERMIT_ACCESS: u16 = 1;
pub const GTF_READONLY: u16 = 1 << 2;
pub const GTF_READING: u16 = 1 << 3;
pub const GTF_WRITING: u16 = 1 << 4;
/// Entries 0..8 are reserved for the toolstack (console, xenstore).
pub const GNTTAB_NR_RESERVED_ENTRIES: u32 = 8;
/// Size of one `grant_entry_v1`.
pub const GRANT_ENTRY_V1_SIZE: usize = 8;
pub const GNTST_OKAY: i16 = 0;

/// `struct gnttab_map_grant_ref`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct GnttabMapGrantRef {
    pub host_addr: u64,
    pub flags: u32,
    pub gref: u32,
    pub dom: u16,
    pub status: i16,
    pub handle: u32,
    pub dev_bus_addr: u64,
}

/// `struct gnttab_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct GnttabUnmapGrantRef {
    pub host_addr: u64,
    pub dev_bus_addr: u64,
    pub handle: u32,
    pub status: i16,
}

pub const GNTTABOP_COPY: u64 = 5;
pub const GNTCOPY_SOURCE_GREF: u16 = 1;
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

/// One end of a `struct gnttab_copy`: a grant reference (with `domid` the
/// granting domain) or our own frame number (with `DOMID_SELF`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GnttabCopyPtr {
    pub u: u64,
    pub domid: u16,
    pub offset: u16,
}

/// `struct gnttab_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GnttabCopy {
    pub source: GnttabCopyPtr,
    pub dest: GnttabCopyPtr,
    pub len: u16,
    pub flags: u16,
    pub status: i16,
}

/// `struct gnttab_query_size`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct GnttabQuerySize {
    pub dom: u16,
    pub nr_frames: u32,
    pub max_nr_frames: u32,
    pub status: i16,
}

/// `arch-x86/hvm/start_info.h`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
pub const E820_RAM: u32 = 1;

/// `struct hvm_start_info` (version 1 layout).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct HvmStartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct HvmMemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// `shared_info` on x86-64: 32 `vcpu_info` of 64 bytes, then the 2-level
/// event channel bitmaps.
pub const SHARED_INFO_VCPU0_TIME: usize = 32;
pub const SHARED_INFO_EVTCHN_PENDING: usize = 2048;
pub const SHARED_INFO_EVTCHN_MASK: usize = 2048 + 512;
/// Offsets inside `struct vcpu_time_info`.
pub const TIME_VERSION: usize = 0;
pub const TIME_TSC_TIMESTAMP: usize = 8;
pub const TIME_SYSTEM_TIME: usize = 16;
pub const TIME_TSC_TO_SYSTEM_MUL: usize = 24;
pub const TIME_TSC_SHIFT: usize = 28;

/// `vcpu.h`: `VCPUOP_register_runstate_memory_area` and the offsets in
/// `struct vcpu_runstate_info` (`int state`, `uint64_t state_entry_time`,
/// `uint64_t time[4]`: 48 bytes).
pub const VCPUOP_REGISTER_RUNSTATE_MEMORY_AREA: u64 = 5;
pub const RUNSTATE_RUNNING: u32 = 0;
pub const RUNSTATE_STATE: usize = 0;
pub const RUNSTATE_ENTRY_TIME: usize = 8;
pub const RUNSTATE_SIZE: usize = 48;
/// Set in `state_entry_time` while Xen updates the record (only with
/// `VMASST_TYPE_runstate_update_flag`, which we do not enable).
pub const XEN_RUNSTATE_UPDATE: u64 = 1 << 63;

/// `io/console.h`: `struct xencons_interface`.
pub const CONSOLE_IN: usize = 0;
pub const CONSOLE_IN_SIZE: u32 = 1024;
pub const CONSOLE_OUT: usize = 1024;
pub const CONSOLE_OUT_SIZE: u32 = 2048;
pub const CONSOLE_IN_CONS: usize = 3072;
pub const CONSOLE_IN_PROD: usize = 3076;
pub const CONSOLE_OUT_CONS: usize = 3080;
pub const CONSOLE_OUT_PROD: usize = 3084;

/// One page.
pub const PAGE_SIZE: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_c_headers() {
        assert_eq!(size_of::<SchedPoll>(), 24);
        assert_eq!(offset_of!(SchedPoll, nr_ports), 8);
        assert_eq!(offset_of!(SchedPoll, timeout), 16);
        assert_eq!(size_of::<EvtchnAllocUnbound>(), 8);
        assert_eq!(offset_of!(EvtchnAllocUnbound, port), 4);
        assert_eq!(size_of::<EvtchnBindInterdomain>(), 12);
        assert_eq!(offset_of!(EvtchnBindInterdomain, remote_port), 4);
        assert_eq!(offset_of!(EvtchnBindInterdomain, local_port), 8);
        assert_eq!(size_of::<HvmParam>(), 16);
        assert_eq!(offset_of!(HvmParam, index), 4);
        assert_eq!(offset_of!(HvmParam, value), 8);
        assert_eq!(size_of::<AddToPhysmap>(), 24);
        assert_eq!(offset_of!(AddToPhysmap, space), 4);
        assert_eq!(offset_of!(AddToPhysmap, idx), 8);
        assert_eq!(offset_of!(AddToPhysmap, gpfn), 16);
        assert_eq!(size_of::<GnttabMapGrantRef>(), 32);
        assert_eq!(offset_of!(GnttabMapGrantRef, flags), 8);
        assert_eq!(offset_of!(GnttabMapGrantRef, gref), 12);
        assert_eq!(offset_of!(GnttabMapGrantRef, dom), 16);
        assert_eq!(offset_of!(GnttabMapGrantRef, status), 18);
        assert_eq!(offset_of!(GnttabMapGrantRef, handle), 20);
        assert_eq!(offset_of!(GnttabMapGrantRef, dev_bus_addr), 24);
        assert_eq!(size_of::<GnttabUnmapGrantRef>(), 24);
        assert_eq!(offset_of!(GnttabUnmapGrantRef, handle), 16);
        assert_eq!(offset_of!(GnttabUnmapGrantRef, status), 20);
        assert_eq!(size_of::<GnttabQuerySize>(), 16);
        assert_eq!(size_of::<GnttabCopyPtr>(), 16);
        assert_eq!(offset_of!(GnttabCopyPtr, domid), 8);
        assert_eq!(offset_of!(GnttabCopyPtr, offset), 10);
        assert_eq!(size_of::<GnttabCopy>(), 40);
        assert_eq!(offset_of!(GnttabCopy, dest), 16);
        assert_eq!(offset_of!(GnttabCopy, len), 32);
        assert_eq!(offset_of!(GnttabCopy, flags), 34);
        assert_eq!(offset_of!(GnttabCopy, status), 36);
        assert_eq!(offset_of!(GnttabQuerySize, nr_frames), 4);
        assert_eq!(offset_of!(GnttabQuerySize, status), 12);
        assert_eq!(size_of::<HvmStartInfo>(), 56);
        assert_eq!(offset_of!(HvmStartInfo, cmdline_paddr), 24);
        assert_eq!(offset_of!(HvmStartInfo, memmap_paddr), 40);
        assert_eq!(offset_of!(HvmStartInfo, memmap_entries), 48);
        assert_eq!(size_of::<HvmMemmapEntry>(), 24);
        assert_eq!(offset_of!(HvmMemmapEntry, kind), 16);
    }
}
