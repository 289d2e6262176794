//! The freestanding runtime of the Xen PVH image: the boot code, the symbols
//! `core`/`alloc` expect from a C library, the heap, the logger, the panic
//! handler, and `rust_start`, which sets the machine up and hands a
//! [`XenPlatform`] to the program's `xen_main!` function.
//!
//! Built only with the `xen` feature and never in host tests (it defines
//! `_start`, `memcpy` and a `#[panic_handler]`). It must never take an
//! interrupt: the precompiled `core` uses the red zone, so interrupts stay
//! disabled for the life of the guest and events are polled. CPU
//! exceptions go to `traps` (installed first thing), which reports them on
//! its own stack and crashes the domain; the logger adds a line whenever
//! the boot stack's high-water mark has grown by 8 KiB.
#![deny(clippy::indexing_slicing)]

use core::fmt::Write;
use core::panic::PanicInfo;

use talc::{ErrOnOom, Span, Talc, Talck};

use super::XenPlatform;
use super::abi;
use super::console::{ConsoleRing, DebugPort};
use super::heap::PageAligned;
use super::hypercall;
use super::shared::RawMemory;
use super::start_info::BootInfo;
use super::traps;

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

#[global_allocator]
static ALLOCATOR: PageAligned<Talck<spin::Mutex<()>, ErrOnOom>> =
    PageAligned(Talc::new(ErrOnOom).lock());

unsafe extern "C" {
    static __image_end: u8;
}

unsafe extern "Rust" {
    /// The program's entry, defined by `xen_main!` in `main.rs`.
    fn __unikernel_xen_main(platform: XenPlatform) -> !;
}

/// Heap statistics: (bytes allocated now, bytes claimed for the heap).
pub fn heap_usage() -> (usize, usize) {
    let talc = ALLOCATOR.0.lock();
    let counters = talc.get_counters();
    (counters.allocated_bytes, counters.claimed_bytes)
}

/// The first byte after the loaded image (page aligned by linker.ld).
pub fn image_end() -> u64 {
    &raw const __image_end as u64
}

// ---- the console and the logger -------------------------------------------

struct Console {
    ring: ConsoleRing<RawMemory>,
    port: u32,
}

// SAFETY: the image runs on one vCPU with interrupts disabled; the console
// page is reached only through this mutex.
unsafe impl Send for Console {}

static CONSOLE: spin::Mutex<Option<Console>> = spin::Mutex::new(None);

/// Writes to the PV console unless its lock is held (by the code an
/// exception interrupted): for the exception report, which must not wait.
pub(super) fn console_write_if_free(bytes: &[u8]) {
    if let Some(mut guard) = CONSOLE.try_lock()
        && let Some(console) = guard.as_mut()
    {
        let port = console.port;
        let _ = console.ring.write_all(
            bytes,
            || super::events::notify(port),
            hypercall::sched_yield,
            10_000,
        );
    }
}

fn console_write(bytes: &[u8]) {
    let mut guard = CONSOLE.lock();
    match guard.as_mut() {
        Some(console) => {
            let port = console.port;
            // Output is best effort: a stalled xenconsoled loses lines (counted in `dropped`).
            let _ = console.ring.write_all(
                bytes,
                || super::events::notify(port),
                hypercall::sched_yield,
                10_000,
            );
        }
        None => {
            let _ = DebugPort.write_str(core::str::from_utf8(bytes).unwrap_or("?"));
        }
    }
}

struct ConsoleWriter;

impl Write for ConsoleWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        console_write(s.as_bytes());
        Ok(())
    }
}

struct Logger;

/// The boot stack's high-water mark last logged, in bytes.
static STACK_LOGGED: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Logs the boot stack's high-water mark when it has grown by 8 KiB since
/// it was last logged (checked at each log line: never per packet).
fn log_stack_growth() {
    use core::sync::atomic::Ordering;
    let used = traps::machine::stack_high_water();
    if used >= STACK_LOGGED.load(Ordering::Relaxed) + 8 * 1024 {
        STACK_LOGGED.store(used, Ordering::Relaxed);
        let _ = writeln!(
            ConsoleWriter,
            "INFO  xen: stack high-water {} KiB of {} KiB\r",
            used.div_ceil(1024),
            traps::BOOT_STACK_SIZE / 1024
        );
    }
}

/// The boot stack's high-water mark and size, in bytes.
pub fn stack_usage() -> (usize, usize) {
    (
        traps::machine::stack_high_water(),
        traps::BOOT_STACK_SIZE as usize,
    )
}

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            log_stack_growth();
            let _ = writeln!(
                ConsoleWriter,
                "{:<5} {}: {}\r",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

fn console_init() -> Result<(), i64> {
    let pfn = hypercall::hvm_get_param(abi::HVM_PARAM_CONSOLE_PFN)?;
    let port = hypercall::hvm_get_param(abi::HVM_PARAM_CONSOLE_EVTCHN)? as u32;
    // SAFETY: Xen gives us the console page at `pfn` for the life of the
    // domain; it is identity-mapped (below 4 GiB) and used only through
    // `RawMemory`'s volatile accessors.
    let mem = unsafe { RawMemory::new((pfn << 12) as *mut u8, abi::PAGE_SIZE) };
    *CONSOLE.lock() = Some(Console {
        ring: ConsoleRing::new(mem),
        port,
    });
    Ok(())
}

// ---- entry ----------------------------------------------------------------

/// Crashes the domain (`SCHEDOP_shutdown(crash)`); halts if Xen refuses.
pub(super) fn halt() -> ! {
    let _ = hypercall::sched_shutdown(abi::SHUTDOWN_CRASH);
    loop {
        // SAFETY: `hlt` with interrupts disabled stops this vCPU; nothing
        // else runs in this domain.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    }
}

fn read_physical(addr: u64, buf: &mut [u8]) -> bool {
    // Identity map of the first 4 GiB; never touch page 0.
    let end = addr.checked_add(buf.len() as u64);
    if addr < 0x1000 || end.is_none_or(|end| end > 0x1_0000_0000) {
        return false;
    }
    for (i, byte) in buf.iter_mut().enumerate() {
        // SAFETY: the range is inside the identity-mapped 4 GiB and is the
        // start info / command line / memory map Xen placed in our RAM.
        *byte = unsafe { core::ptr::read_volatile((addr as *const u8).wrapping_add(i)) };
    }
    true
}

fn heap_init(boot: &BootInfo) -> usize {
    let floor = image_end();
    let mut claimed = 0;
    for range in boot.ram() {
        let start = range.start.max(floor);
        let end = range.start.saturating_add(range.len).min(0x1_0000_0000);
        if end <= start {
            continue;
        }
        let span = Span::from_base_size(start as *mut u8, (end - start) as usize);
        // SAFETY: the span is RAM from Xen's memory map, above our image and
        // below 4 GiB (identity-mapped), and nothing else uses it: the start
        // info was copied into `boot` before this call.
        if unsafe { ALLOCATOR.0.lock().claim(span) }.is_ok() {
            claimed += (end - start) as usize;
        }
    }
    claimed
}

/// Called from boot.s in long mode with the `hvm_start_info` address.
#[unsafe(no_mangle)]
extern "C" fn rust_start(start_info: u64) -> ! {
    let _ = DebugPort.write_str("unikernel: PVH entry\n");
    if hypercall::init().is_err() {
        let _ = DebugPort.write_str("unikernel: not running on Xen\n");
        halt();
    }
    traps::machine::install();
    let boot = match BootInfo::parse(start_info, read_physical) {
        Ok(boot) => boot,
        Err(error) => {
            let _ = writeln!(DebugPort, "unikernel: bad hvm_start_info: {error:?}");
            halt();
        }
    };
    let heap = heap_init(&boot);
    if let Err(rc) = console_init() {
        let _ = writeln!(
            DebugPort,
            "unikernel: no PV console ({rc}), logging to port 0xe9"
        );
    }
    let level = boot.log_level().unwrap_or(log::LevelFilter::Info);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
    log::info!(
        "booted: {} MiB RAM, heap {} KiB, cmdline {:?}",
        boot.ram_bytes() >> 20,
        heap >> 10,
        boot.cmdline()
    );
    let platform = match XenPlatform::start(boot) {
        Ok(platform) => platform,
        Err(error) => {
            log::error!("platform start failed: {error}");
            halt();
        }
    };
    // SAFETY: `xen_main!` in main.rs defines this symbol with exactly this
    // signature (the macro is the only way to define it).
    unsafe { __unikernel_xen_main(platform) }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let _ = writeln!(DebugPort, "unikernel: PANIC: {info}");
    let _ = writeln!(ConsoleWriter, "PANIC: {info}\r");
    let (used, size) = stack_usage();
    let _ = writeln!(
        DebugPort,
        "unikernel: stack high-water {} of {} KiB",
        used.div_ceil(1024),
        size / 1024
    );
    halt();
}

// ---- what core/alloc expect from libc and libunwind -------------------------

/// # Safety
/// `dst` and `src` valid for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // 64 bytes per step in eight 8-byte moves, then the rest (see `mem`
    // for why: what the lab's TCG runs fastest).
    // SAFETY: the caller's contract, which is `copy_forward`'s.
    unsafe { super::mem::copy_forward(dst, src, n) };
    dst
}

/// # Safety
/// `dst` and `src` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: dst is below src or the ranges are disjoint: a forward copy
        // never overwrites bytes still to be read.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: dst overlaps src from above: copy backwards from the last
        // byte with DF set, then clear DF again as the ABI requires.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld",
                             inout("rcx") n => _, inout("rdi") dst.wrapping_add(n - 1) => _,
                             inout("rsi") src.wrapping_add(n - 1) => _, options(nostack));
        }
        dst
    }
}

/// # Safety
/// `dst` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // As `memcpy`; C's memset stores `value` converted to a byte.
    // SAFETY: the caller's contract, which is `fill`'s.
    unsafe { super::mem::fill(dst, value as u8, n) };
    dst
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, inside the caller's range; volatile keeps LLVM
        // from turning the loop into a call to memcmp itself.
        let x = unsafe { core::ptr::read_volatile(a.wrapping_add(i)) };
        // SAFETY: as for `x`.
        let y = unsafe { core::ptr::read_volatile(b.wrapping_add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's contract, passed on.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// `s` points to a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the caller guarantees a terminator; volatile as in `memcmp`.
    while unsafe { core::ptr::read_volatile(s.wrapping_add(n)) } != 0 {
        n += 1;
    }
    n
}

/// Never called: `panic = "abort"`, but the precompiled `alloc` has landing pads.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    halt()
}

/// Never called (see `_Unwind_Resume`).
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// Defines the image's entry: `xen_main!(path::to::main)` where `main` takes
/// the [`XenPlatform`] and never returns.
#[macro_export]
macro_rules! xen_main {
    ($main:path) => {
        #[unsafe(no_mangle)]
        extern "Rust" fn __unikernel_xen_main(platform: $crate::platform::xen::XenPlatform) -> ! {
            $main(platform)
        }
    };
}
