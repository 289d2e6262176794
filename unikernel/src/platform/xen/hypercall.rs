//! Hypercalls: installing the hypercall page and calling through it with the
//! x86-64 ABI (number = page slot, arguments in rdi, rsi, rdx, r10, r8,
//! result in rax), plus the typed wrappers the rest of `xen/` uses.
//!
//! The page is installed by writing its guest-physical address to the MSR
//! named by CPUID leaf `base + 2`, where `base` is the leaf (0x40000000 +
//! n * 0x100) whose signature is "XenVMMXenVMM" (Xen `arch-x86/cpuid.h`).
//! This module must never be used before [`init`] succeeds, and its raw
//! `hypercall` must never be handed a pointer to memory that does not live
//! until the call returns.
#![deny(clippy::indexing_slicing)]

use core::arch::asm;
use core::cell::UnsafeCell;

use super::abi;

/// The page Xen fills with one 32-byte stub per hypercall.
#[repr(C, align(4096))]
struct HypercallPage(UnsafeCell<[u8; abi::PAGE_SIZE]>);

// SAFETY: Xen writes the page once during `init` (single-threaded boot);
// afterwards it is only executed, never written.
unsafe impl Sync for HypercallPage {}

static HYPERCALL_PAGE: HypercallPage = HypercallPage(UnsafeCell::new([0; abi::PAGE_SIZE]));

/// Why the hypercall page could not be installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallInitError {
    /// No "XenVMMXenVMM" CPUID leaf: not running on Xen.
    NotXen,
}

/// Finds Xen's CPUID leaves and installs the hypercall page.
pub fn init() -> Result<(), HypercallInitError> {
    let base = (0x4000_0000u32..0x4001_0000)
        .step_by(0x100)
        .find(|&leaf| {
            let r = core::arch::x86_64::__cpuid(leaf);
            r.ebx == 0x566e_6558 && r.ecx == 0x6558_4d4d && r.edx == 0x4d4d_566e
        })
        .ok_or(HypercallInitError::NotXen)?;
    let msr = core::arch::x86_64::__cpuid(base + 2).ebx;
    let page = HYPERCALL_PAGE.0.get() as u64;
    // SAFETY: the MSR named by Xen's CPUID leaf takes the guest-physical
    // address of a page we own for the life of the program (identity
    // mapping: virtual = physical); Xen writes the stubs into it.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") page as u32, in("edx") (page >> 32) as u32,
             options(nostack, preserves_flags));
    }
    Ok(())
}

/// Makes hypercall `op` with up to five arguments; returns Xen's rax
/// (negative errno on failure).
///
/// # Safety
/// - [`init`] must have succeeded.
/// - Every argument that Xen interprets as a guest address must point to
///   memory of the type the hypercall expects, valid (and writable where Xen
///   writes) for the duration of the call.
pub unsafe fn hypercall(op: usize, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    // A corrupted page table or IDT would make the next exception a
    // triple fault with no report: look first (traps.rs).
    #[cfg(all(feature = "xen", not(test)))]
    super::traps::machine::check_tables(op);
    let entry = HYPERCALL_PAGE.0.get() as usize + op * 32;
    let result: i64;
    // SAFETY: `entry` is the stub for `op` inside the installed page (op is
    // one of the small constants in `abi`); the caller guarantees the
    // arguments. Xen may clobber the argument registers (debug builds do on
    // purpose), rcx and r11; all are declared. No `nostack`: `call` pushes.
    unsafe {
        asm!("call {entry}",
             entry = in(reg) entry,
             inlateout("rdi") a1 => _,
             inlateout("rsi") a2 => _,
             inlateout("rdx") a3 => _,
             inlateout("r10") a4 => _,
             inlateout("r8") a5 => _,
             lateout("rax") result,
             lateout("rcx") _,
             lateout("r11") _);
    }
    result
}

/// `HYPERVISOR_sched_op(SCHEDOP_yield)`.
pub fn sched_yield() {
    // SAFETY: SCHEDOP_yield takes no argument memory.
    unsafe { hypercall(abi::HYPERVISOR_SCHED_OP, abi::SCHEDOP_YIELD, 0, 0, 0, 0) };
}

/// `HYPERVISOR_sched_op(SCHEDOP_shutdown, reason)`: does not return for
/// poweroff/reboot/crash unless Xen refuses.
pub fn sched_shutdown(reason: u32) -> i64 {
    let mut arg = abi::SchedShutdown { reason };
    // SAFETY: `arg` is a live `sched_shutdown` for the call.
    unsafe {
        hypercall(
            abi::HYPERVISOR_SCHED_OP,
            abi::SCHEDOP_SHUTDOWN,
            &raw mut arg as u64,
            0,
            0,
            0,
        )
    }
}

/// `HYPERVISOR_sched_op(SCHEDOP_poll)`: blocks until one of `ports` is
/// pending or Xen system time reaches `timeout_ns` (0: no timeout).
pub fn sched_poll(ports: &[u32], timeout_ns: u64) -> i64 {
    let mut arg = abi::SchedPoll {
        ports: ports.as_ptr() as u64,
        nr_ports: ports.len() as u32,
        timeout: timeout_ns,
    };
    // SAFETY: `arg` and the `ports` slice it points to live for the call;
    // Xen only reads them.
    unsafe {
        hypercall(
            abi::HYPERVISOR_SCHED_OP,
            abi::SCHEDOP_POLL,
            &raw mut arg as u64,
            0,
            0,
            0,
        )
    }
}

/// `HYPERVISOR_vcpu_op(VCPUOP_register_runstate_memory_area, vcpu)`: Xen
/// writes the vCPU's `vcpu_runstate_info` at `addr` (a guest virtual
/// address: ours map identically) at each of its context switches.
///
/// # Safety
/// The [`abi::RUNSTATE_SIZE`] bytes at `addr` must be ours for Xen to write
/// at any time for the rest of the domain's life, read by us only through
/// volatile accesses ([`super::shared::RawMemory`]).
pub unsafe fn register_runstate_area(vcpu: u32, addr: u64) -> i64 {
    let mut arg = addr;
    // SAFETY: `arg` (the union `vcpu_register_runstate_memory_area`, one
    // 8-byte address) lives for the call; the area it names is the
    // caller's to hand over (this function's contract).
    unsafe {
        hypercall(
            abi::HYPERVISOR_VCPU_OP,
            abi::VCPUOP_REGISTER_RUNSTATE_MEMORY_AREA,
            u64::from(vcpu),
            &raw mut arg as u64,
            0,
            0,
        )
    }
}

/// `HYPERVISOR_hvm_op(HVMOP_get_param, index)` for our own domain.
pub fn hvm_get_param(index: u32) -> Result<u64, i64> {
    let mut arg = abi::HvmParam {
        domid: abi::DOMID_SELF,
        index,
        value: 0,
    };
    // SAFETY: `arg` is a live `xen_hvm_param` that Xen fills in.
    let rc = unsafe {
        hypercall(
            abi::HYPERVISOR_HVM_OP,
            abi::HVMOP_GET_PARAM,
            &raw mut arg as u64,
            0,
            0,
            0,
        )
    };
    if rc == 0 { Ok(arg.value) } else { Err(rc) }
}

/// `HYPERVISOR_event_channel_op(cmd, arg)` with a typed argument.
pub fn event_channel_op<T>(cmd: u64, arg: &mut T) -> i64 {
    // SAFETY: callers pass the `evtchn_*` struct that matches `cmd` (each a
    // `#[repr(C)]` type from `abi`); it lives for the call.
    unsafe {
        hypercall(
            abi::HYPERVISOR_EVENT_CHANNEL_OP,
            cmd,
            arg as *mut T as u64,
            0,
            0,
            0,
        )
    }
}

/// `HYPERVISOR_grant_table_op(cmd, arg, 1)` with a typed argument.
pub fn grant_table_op<T>(cmd: u64, arg: &mut T) -> i64 {
    // SAFETY: callers pass the `gnttab_*` struct that matches `cmd`; count 1.
    unsafe {
        hypercall(
            abi::HYPERVISOR_GRANT_TABLE_OP,
            cmd,
            arg as *mut T as u64,
            1,
            0,
            0,
        )
    }
}

/// `HYPERVISOR_grant_table_op(GNTTABOP_copy, ops, ops.len())`: every op
/// in one call; Xen sets each op's `status` (and the call's result is
/// negative only when it could not read or write the array itself).
///
/// # Safety
/// The local end (`DOMID_SELF`) of every op must name bytes of ours that
/// Xen may read (a source) or write (a destination) during the call: a
/// buffer the caller borrows for it (`&[u8]` for sources, `&mut [u8]` for
/// destinations), as [`super::grant::plan_copy`] makes the ops.
pub unsafe fn grant_copy(ops: &mut [abi::GnttabCopy]) -> i64 {
    if ops.is_empty() {
        return 0;
    }
    // SAFETY: `ops` is a live, writable array of `ops.len()` `gnttab_copy`
    // structs for the call (Xen writes their statuses); the memory they
    // name is the caller's to hand over (this function's contract).
    unsafe {
        hypercall(
            abi::HYPERVISOR_GRANT_TABLE_OP,
            abi::GNTTABOP_COPY,
            ops.as_mut_ptr() as u64,
            ops.len() as u64,
            0,
            0,
        )
    }
}

/// `HYPERVISOR_memory_op(XENMEM_add_to_physmap)`: places frame `idx` of
/// `space` at guest frame `gpfn`.
pub fn add_to_physmap(space: u32, idx: u64, gpfn: u64) -> i64 {
    let mut arg = abi::AddToPhysmap {
        domid: abi::DOMID_SELF,
        size: 0,
        space,
        idx,
        gpfn,
    };
    // SAFETY: `arg` is a live `xen_add_to_physmap` for the call.
    unsafe {
        hypercall(
            abi::HYPERVISOR_MEMORY_OP,
            abi::XENMEM_ADD_TO_PHYSMAP,
            &raw mut arg as u64,
            0,
            0,
            0,
        )
    }
}
