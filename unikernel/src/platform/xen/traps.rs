//! CPU exceptions in the Xen PVH image: an IDT for vectors 0-31 whose
//! handlers print what the CPU saw (vector, error code, RIP, RSP, RFLAGS,
//! CR2, registers, a stack dump and the return addresses found on the
//! stack) to Xen's debug port and the PV console, then crash the domain
//! with `SCHEDOP_shutdown(crash)`; the boot stack's guard page and page 0
//! are unmapped so a stack overflow or a null pointer is such a report, not
//! silent corruption or a triple fault; and the boot stack's high-water mark.
//!
//! Every handler runs on its own IST stack (an overflowed boot stack cannot
//! take the CPU's exception frame, and the interrupted code's red zone is
//! left alone) and never returns: nothing here resumes the interrupted code.
//! It must never allocate or take a lock it could be interrupted holding
//! (the report goes to the PV console only if its lock is free).
//!
//! The encoders (`idt_gate`, `tss_descriptor`, `split_large_page`) and the
//! report (`write_report`) are portable and tested on the host; the machine
//! side (`machine`) exists only in the image. The addresses in a report are
//! symbolised with `tests/xen/symbolize.sh` (an unstripped build of the same
//! image: stripping does not move code).
#![deny(clippy::indexing_slicing)]

use core::fmt::{self, Write};

/// Size of the boot stack (`__boot_stack` in boot.s).
pub const BOOT_STACK_SIZE: u64 = 256 * 1024;
/// The word boot.s paints the boot stack with before `rust_start`.
pub const STACK_PAINT: u64 = 0x57ac_57ac_57ac_57ac;
/// Size of the stack the exception handlers run on.
pub const TRAP_STACK_SIZE: usize = 16 * 1024;
/// Code segment selector of boot.s's GDT (kept by ours).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the TSS descriptor in our GDT.
pub const TSS_SELECTOR: u16 = 0x18;
/// Size of a 64-bit TSS.
pub const TSS_SIZE: u64 = 104;
const PAGE: u64 = 4096;
const LARGE_PAGE: u64 = 2 * 1024 * 1024;
/// Page-table entry bit: present.
pub const PRESENT: u64 = 1;
/// Page-table entry bit: writable.
pub const WRITABLE: u64 = 2;
/// Page-directory entry bit: a 2 MiB page.
pub const LARGE: u64 = 0x80;

/// What the exception stubs push: the general registers (last pushed
/// first), the vector, the error code (0 where the CPU pushes none) and the
/// CPU's own frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Where things are in the image, for the report's interpretation.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// The boot stack's lowest byte (the guard page is the page below it).
    pub stack_bottom: u64,
    /// One past the boot stack's highest byte.
    pub stack_top: u64,
    /// The code: `[text_start, text_end)`.
    pub text_start: u64,
    pub text_end: u64,
}

impl Layout {
    fn on_stack(&self, addr: u64) -> bool {
        addr >= self.stack_bottom && addr < self.stack_top
    }
    fn in_guard_page(&self, addr: u64) -> bool {
        addr < self.stack_bottom && addr >= self.stack_bottom.saturating_sub(PAGE)
    }
    fn in_text(&self, addr: u64) -> bool {
        addr >= self.text_start && addr < self.text_end
    }
}

/// Mnemonic and name of exception vector `vector`.
pub fn vector_name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        9 => ("#09", "coprocessor segment overrun"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating point"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating point"),
        20 => ("#VE", "virtualization"),
        21 => ("#CP", "control protection"),
        28 => ("#HV", "hypervisor injection"),
        29 => ("#VC", "VMM communication"),
        30 => ("#SX", "security"),
        _ => ("#??", "reserved vector"),
    }
}

/// Whether the CPU pushes an error code for `vector`.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The 16-byte IDT gate of a 64-bit interrupt gate (present, DPL 0, IF
/// cleared on entry) to `handler` in segment `selector` on IST stack `ist`.
pub fn idt_gate(handler: u64, selector: u16, ist: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist & 7) << 32)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// The 16-byte GDT descriptor of an available 64-bit TSS at `base`.
pub fn tss_descriptor(base: u64, size: u64) -> [u64; 2] {
    let limit = size - 1;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// The 512 4 KiB entries that map the same memory as the 2 MiB page
/// directory entry `large` (its flags kept, minus the large-page bit), or
/// `None` if `large` is not a present 2 MiB mapping.
pub fn split_large_page(large: u64) -> Option<[u64; 512]> {
    if large & (PRESENT | LARGE) != PRESENT | LARGE {
        return None;
    }
    let base = large & 0x000f_ffff_ffe0_0000;
    let flags = large & 0xfff & !LARGE;
    let mut table = [0u64; 512];
    for (i, entry) in table.iter_mut().enumerate() {
        *entry = (base + i as u64 * PAGE) | flags;
    }
    Some(table)
}

/// Index of the page-directory entry of `addr` in boot.s's four PDs (one
/// entry per 2 MiB of the identity-mapped 4 GiB), and of its 4 KiB entry.
pub fn table_indices(addr: u64) -> Option<(usize, usize)> {
    if addr >= 4 * 1024 * 1024 * 1024 {
        return None;
    }
    Some((
        (addr / LARGE_PAGE) as usize,
        ((addr % LARGE_PAGE) / PAGE) as usize,
    ))
}

/// Bytes of the boot stack ever used, from the painted words still intact
/// at its bottom: `read(i)` returns the i-th word from the bottom.
pub fn stack_high_water(words: usize, read: impl Fn(usize) -> u64) -> usize {
    let untouched = (0..words).take_while(|&i| read(i) == STACK_PAINT).count();
    (words - untouched) * 8
}

/// Whether the code bytes before `addr` end with a call instruction (so a
/// stack word equal to `addr` is likely a return address): `call rel32`,
/// or `call` through a register or memory (`ff /2`, with 0-4 bytes of
/// address after the ModRM byte).
pub fn follows_call(addr: u64, byte: impl Fn(u64) -> Option<u8>) -> bool {
    let at = |back: u64| addr.checked_sub(back).and_then(&byte);
    if at(5) == Some(0xe8) {
        return true;
    }
    [2u64, 3, 4, 6, 7].iter().any(|&back| {
        at(back) == Some(0xff) && at(back - 1).is_some_and(|modrm| (modrm >> 3) & 7 == 2)
    })
}

fn page_fault_cause(error: u64) -> (&'static str, &'static str, &'static str) {
    (
        if error & 1 != 0 {
            "protection violation"
        } else {
            "page not present"
        },
        if error & 0x10 != 0 {
            "instruction fetch"
        } else if error & 2 != 0 {
            "write"
        } else {
            "read"
        },
        if error & 8 != 0 {
            ", reserved bit set"
        } else {
            ""
        },
    )
}

/// Writes the report of `frame` to `out`: every line starts with "TRAP ".
/// `word` reads a stack word (only asked for addresses on the boot stack),
/// `byte` a code byte (only asked for addresses in the text);
/// `high_water` is the boot stack's high-water mark in bytes.
pub fn write_report(
    out: &mut impl Write,
    frame: &TrapFrame,
    cr2: u64,
    layout: &Layout,
    high_water: usize,
    word: impl Fn(u64) -> u64,
    byte: impl Fn(u64) -> u8,
) -> fmt::Result {
    let (short, name) = vector_name(frame.vector);
    writeln!(
        out,
        "TRAP CPU exception {short} ({name}, vector {}) error {:#x}: the firewall stops (domain crash)",
        frame.vector, frame.error
    )?;
    writeln!(
        out,
        "TRAP rip {:#018x} rsp {:#018x} rflags {:#x} cs {:#x} ss {:#x} cr2 {:#x}",
        frame.rip, frame.rsp, frame.rflags, frame.cs, frame.ss, cr2
    )?;
    if frame.vector == 14 {
        let (kind, access, reserved) = page_fault_cause(frame.error);
        write!(
            out,
            "TRAP page fault: {access} at {cr2:#x}, {kind}{reserved}"
        )?;
        if layout.in_guard_page(cr2) {
            write!(
                out,
                ": STACK OVERFLOW (the guard page below the boot stack)"
            )?;
        } else if cr2 == 0 {
            // Seen under QEMU's emulated SVM for faults at other addresses.
            write!(out, ": a null pointer, or CR2 not reported by the CPU")?;
        } else if cr2 < PAGE {
            write!(out, ": NULL POINTER (page 0)")?;
        }
        writeln!(out)?;
    }
    if layout.in_guard_page(frame.rsp) || frame.rsp == layout.stack_bottom {
        writeln!(
            out,
            "TRAP rsp is at the bottom of the boot stack: STACK OVERFLOW"
        )?;
    }
    writeln!(
        out,
        "TRAP rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    )?;
    writeln!(
        out,
        "TRAP r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15
    )?;
    writeln!(
        out,
        "TRAP boot stack {:#x}..{:#x}, high-water {} of {} KiB",
        layout.stack_bottom,
        layout.stack_top,
        high_water.div_ceil(1024),
        (layout.stack_top - layout.stack_bottom) / 1024
    )?;
    let rsp = frame.rsp & !7;
    if !layout.on_stack(rsp) {
        return writeln!(out, "TRAP rsp is not on the boot stack: no stack dump");
    }
    let words = (layout.stack_top - rsp) / 8;
    write!(out, "TRAP stack at rsp:")?;
    for i in 0..words.min(16) {
        if i % 4 == 0 && i > 0 {
            write!(out, "\nTRAP   ")?;
        }
        write!(out, " {:016x}", word(rsp + i * 8))?;
    }
    writeln!(out)?;
    // The image has no frame pointers: list the stack words that point just
    // after a call instruction in our code, innermost first.
    write!(out, "TRAP return addresses on the stack (candidates):")?;
    let mut found = 0;
    for i in 0..words.min(4096) {
        let value = word(rsp + i * 8);
        if layout.in_text(value)
            && value >= layout.text_start + 8
            && follows_call(value, |a| layout.in_text(a).then(|| byte(a)))
        {
            write!(out, " {value:#x}")?;
            found += 1;
            if found == 32 {
                break;
            }
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "TRAP symbolise with tests/xen/symbolize.sh <serial log> (rip and the return addresses)"
    )
}

/// The image side: IDT, TSS, GDT, page tables, the stubs and the handler.
#[cfg(all(feature = "xen", not(test)))]
pub mod machine {
    use core::cell::UnsafeCell;
    use core::fmt::Write;
    use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::{
        BOOT_STACK_SIZE, CODE_SELECTOR, Layout, PAGE, TRAP_STACK_SIZE, TSS_SELECTOR, TSS_SIZE,
        TrapFrame,
    };

    core::arch::global_asm!(
        r#"
        .macro TRAP_STUB_NOERR vec
        .balign 16
__trap_stub_\vec:
        push    $0
        push    $\vec
        jmp     __trap_common
        .endm
        .macro TRAP_STUB_ERR vec
        .balign 16
__trap_stub_\vec:
        push    $\vec
        jmp     __trap_common
        .endm

        .section .text.traps, "ax", @progbits
        TRAP_STUB_NOERR 0
        TRAP_STUB_NOERR 1
        TRAP_STUB_NOERR 2
        TRAP_STUB_NOERR 3
        TRAP_STUB_NOERR 4
        TRAP_STUB_NOERR 5
        TRAP_STUB_NOERR 6
        TRAP_STUB_NOERR 7
        TRAP_STUB_ERR 8
        TRAP_STUB_NOERR 9
        TRAP_STUB_ERR 10
        TRAP_STUB_ERR 11
        TRAP_STUB_ERR 12
        TRAP_STUB_ERR 13
        TRAP_STUB_ERR 14
        TRAP_STUB_NOERR 15
        TRAP_STUB_NOERR 16
        TRAP_STUB_ERR 17
        TRAP_STUB_NOERR 18
        TRAP_STUB_NOERR 19
        TRAP_STUB_NOERR 20
        TRAP_STUB_ERR 21
        TRAP_STUB_NOERR 22
        TRAP_STUB_NOERR 23
        TRAP_STUB_NOERR 24
        TRAP_STUB_NOERR 25
        TRAP_STUB_NOERR 26
        TRAP_STUB_NOERR 27
        TRAP_STUB_NOERR 28
        TRAP_STUB_ERR 29
        TRAP_STUB_ERR 30
        TRAP_STUB_NOERR 31

__trap_common:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %rbp
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        cld
        mov     %rsp, %rdi
        call    __trap_report
__trap_stop:
        hlt
        jmp     __trap_stop

        .section .rodata.traps, "a", @progbits
        .balign 8
        .globl __trap_stubs
__trap_stubs:
        .quad __trap_stub_0, __trap_stub_1, __trap_stub_2, __trap_stub_3
        .quad __trap_stub_4, __trap_stub_5, __trap_stub_6, __trap_stub_7
        .quad __trap_stub_8, __trap_stub_9, __trap_stub_10, __trap_stub_11
        .quad __trap_stub_12, __trap_stub_13, __trap_stub_14, __trap_stub_15
        .quad __trap_stub_16, __trap_stub_17, __trap_stub_18, __trap_stub_19
        .quad __trap_stub_20, __trap_stub_21, __trap_stub_22, __trap_stub_23
        .quad __trap_stub_24, __trap_stub_25, __trap_stub_26, __trap_stub_27
        .quad __trap_stub_28, __trap_stub_29, __trap_stub_30, __trap_stub_31
        .text
"#,
        options(att_syntax)
    );

    unsafe extern "C" {
        static __trap_stubs: [u64; 32];
        static __boot_pd: u8;
        static __boot_stack: u8;
        static __image_start: u8;
        static __text_end: u8;
    }

    /// Memory only this module touches, at boot (single vCPU, interrupts
    /// off) and in the handler (which never returns).
    struct Private<T>(UnsafeCell<T>);
    // SAFETY: one vCPU; `install` runs once before anything can trap and
    // the handler only reads the trap stack it runs on.
    unsafe impl<T> Sync for Private<T> {}

    #[repr(C, align(16))]
    struct TrapStack([u8; TRAP_STACK_SIZE]);

    #[repr(C, packed(4))]
    struct Tss {
        reserved0: u32,
        rsp: [u64; 3],
        reserved1: u64,
        ist: [u64; 7],
        reserved2: u64,
        reserved3: u16,
        iomap_base: u16,
    }

    #[repr(C, align(16))]
    struct Idt([[u64; 2]; 32]);

    #[repr(C, align(16))]
    struct Gdt([u64; 5]);

    #[repr(C, align(4096))]
    struct PageTable([u64; 512]);

    #[repr(C, packed)]
    struct TablePointer {
        limit: u16,
        base: u64,
    }

    static TRAP_STACK: Private<TrapStack> =
        Private(UnsafeCell::new(TrapStack([0; TRAP_STACK_SIZE])));
    /// The TSS, 16-aligned so `check_tables` reads it as aligned words.
    #[repr(C, align(16))]
    struct AlignedTss(Tss);

    static TSS: Private<AlignedTss> = Private(UnsafeCell::new(AlignedTss(Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: TSS_SIZE as u16,
    })));
    static IDT: Private<Idt> = Private(UnsafeCell::new(Idt([[0; 2]; 32])));
    /// boot.s's code (0x08) and data (0x10) descriptors, then the TSS.
    static GDT: Private<Gdt> = Private(UnsafeCell::new(Gdt([
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0,
        0,
    ])));
    /// Two 4 KiB tables for the 2 MiB pages holding page 0 and the guard page.
    static PAGE_TABLES: Private<[PageTable; 2]> =
        Private(UnsafeCell::new([PageTable([0; 512]), PageTable([0; 512])]));
    static IN_TRAP: AtomicBool = AtomicBool::new(false);

    /// The boot stack, the code.
    pub fn layout() -> Layout {
        let bottom = &raw const __boot_stack as u64;
        Layout {
            stack_bottom: bottom,
            stack_top: bottom + BOOT_STACK_SIZE,
            text_start: &raw const __image_start as u64,
            text_end: &raw const __text_end as u64,
        }
    }

    /// Bytes of the boot stack used so far (its high-water mark).
    pub fn stack_high_water() -> usize {
        let bottom = (&raw const __boot_stack).cast::<u64>();
        super::stack_high_water((BOOT_STACK_SIZE / 8) as usize, |i| {
            // SAFETY: i < BOOT_STACK_SIZE / 8: a word of the boot stack,
            // mapped for the life of the image; volatile because compiled
            // code writes it behind Rust's back.
            unsafe { core::ptr::read_volatile(bottom.wrapping_add(i)) }
        })
    }

    /// Installs the GDT with a TSS, the IDT (every vector on IST 1), and
    /// unmaps page 0 and the boot stack's guard page. Called once, first
    /// thing in `rust_start` after the hypercall page.
    pub fn install() {
        let stack_top = TRAP_STACK.0.get() as u64 + TRAP_STACK_SIZE as u64;
        let tss = TSS.0.get().cast::<Tss>();
        // SAFETY: boot, one vCPU: nothing else references the TSS; a raw
        // field write (the struct is packed).
        unsafe { (*tss).ist[0] = stack_top };
        let gdt = GDT.0.get();
        let [low, high] = super::tss_descriptor(tss as u64, TSS_SIZE);
        // SAFETY: as above, for the GDT (not loaded yet).
        unsafe { (*gdt).0[3] = low };
        // SAFETY: as above.
        unsafe { (*gdt).0[4] = high };
        let pointer = TablePointer {
            limit: (core::mem::size_of::<Gdt>() - 1) as u16,
            base: gdt as u64,
        };
        // SAFETY: the new GDT keeps boot.s's descriptors at the selectors in
        // use (0x08 code, 0x10 data), so the loaded segments stay valid; it
        // is a static, alive for the life of the image.
        unsafe {
            core::arch::asm!("lgdt [{}]", in(reg) &raw const pointer, options(nostack, readonly))
        };
        // SAFETY: TSS_SELECTOR is the available 64-bit TSS descriptor just
        // written; `ltr` marks it busy in the GDT (writable static).
        unsafe { core::arch::asm!("ltr {:x}", in(reg) TSS_SELECTOR, options(nostack)) };
        let idt = IDT.0.get();
        // SAFETY: `__trap_stubs` is the table of 32 stub addresses in the
        // asm above, read-only.
        let stubs = unsafe { &__trap_stubs };
        for (vector, stub) in stubs.iter().enumerate() {
            let gate = super::idt_gate(*stub, CODE_SELECTOR, 1);
            // SAFETY: boot, one vCPU; the IDT is not loaded yet. `vector`
            // < 32 = the IDT's length (both are 32 long).
            unsafe { idt.cast::<[u64; 2]>().wrapping_add(vector).write(gate) };
        }
        let pointer = TablePointer {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: idt as u64,
        };
        // SAFETY: the IDT is a static of 32 present gates to the stubs,
        // which run on IST 1 (set in the loaded TSS) and never return.
        unsafe {
            core::arch::asm!("lidt [{}]", in(reg) &raw const pointer, options(nostack, readonly))
        };
        unmap_low_pages();
        record_tables();
    }

    /// Words of the paging structures and descriptor tables whose loss
    /// makes every exception a triple fault (the page-table entries of the
    /// first 2 MiB, which hold the image, are checked by rule).
    const WATCHED: usize = 6 + 5 + 13 + 64;
    /// (address, expected value) of each watched word.
    static EXPECTED: Private<[(u64, u64); WATCHED]> = Private(UnsafeCell::new([(0, 0); WATCHED]));
    /// Which slice of the watched words the next check looks at.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static CHECKING: AtomicBool = AtomicBool::new(false);
    /// Set once `record_tables` has filled EXPECTED.
    static RECORDED: AtomicBool = AtomicBool::new(false);
    /// Accessed and dirty bits, which the CPU sets in paging entries.
    const ACCESSED_DIRTY: u64 = 0x60;

    fn read_word(addr: u64) -> u64 {
        // SAFETY: only called with addresses of the static tables listed
        // in `record_tables` (8-aligned, in the image, mapped).
        unsafe { core::ptr::read_volatile(addr as *const u64) }
    }

    fn record_tables() {
        let cr3: u64;
        // SAFETY: reading CR3 has no side effect.
        unsafe {
            core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags))
        };
        let pml4 = cr3 & !0xfff;
        let pdpt = read_word(pml4) & 0x000f_ffff_ffff_f000;
        let pd = &raw const __boot_pd as u64;
        let mut words = [0u64; WATCHED];
        let mut n = 0;
        let mut add = |addr: u64| {
            if let Some(slot) = words.get_mut(n) {
                *slot = addr;
                n += 1;
            }
        };
        add(pml4);
        for i in 0..4 {
            add(pdpt + i * 8);
        }
        add(pd);
        for i in 0..5 {
            add(GDT.0.get() as u64 + i * 8);
        }
        for i in 0..13 {
            add(TSS.0.get() as u64 + i * 8);
        }
        for i in 0..64 {
            add(IDT.0.get() as u64 + i * 8);
        }
        let expected = EXPECTED.0.get();
        for (i, addr) in words.iter().enumerate() {
            let value = read_word(*addr);
            // SAFETY: boot, one vCPU; nothing else uses EXPECTED yet; i <
            // WATCHED, the array's length.
            unsafe {
                expected
                    .cast::<(u64, u64)>()
                    .wrapping_add(i)
                    .write((*addr, value))
            };
        }
        RECORDED.store(true, Ordering::SeqCst);
    }

    /// Called before each hypercall: checks the paging structures, GDT,
    /// TSS and IDT (a few words each time, all of them every 32 calls) and
    /// reports the first changed word, then crashes the domain. A triple
    /// fault (no report) at a hypercall's return then says the tables
    /// broke during that hypercall, not before.
    pub fn check_tables(op: usize) {
        if !RECORDED.load(Ordering::SeqCst) || CHECKING.swap(true, Ordering::SeqCst) {
            return;
        }
        let expected = EXPECTED.0.get();
        // SAFETY: one vCPU; written only by `record_tables` at boot.
        let words = unsafe { &*expected };
        let next = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut bad = None;
        // The top of the walk every time, then a slice of the rest.
        let start = 6 + (next % ((WATCHED - 6) / 3)) * 3;
        let slice = (0..6).chain(start..start + 3);
        for (index, (addr, value)) in slice.filter_map(|i| Some((i, words.get(i)?))) {
            // The CPU sets accessed/dirty bits in paging entries and the
            // accessed bit of a segment descriptor it loads (the GDT's
            // words follow the six paging words).
            let mask = match index {
                0..6 => !ACCESSED_DIRTY,
                6..11 => !(1 << 40),
                _ => !0,
            };
            let found = read_word(*addr);
            if *addr != 0 && found & mask != *value & mask {
                bad = Some(("table word", *addr, *value, found));
            }
        }
        // The 4 KiB entries of the first 2 MiB: 16 per call.
        let pd_entry = read_word(words[5].0);
        let table = pd_entry & 0x000f_ffff_ffff_f000;
        let guard = layout().stack_bottom - PAGE;
        let first = (next % 32) * 16;
        for i in first..first + 16 {
            let page = i as u64 * PAGE;
            let want = if page == 0 || page == guard {
                0
            } else {
                page | super::PRESENT | super::WRITABLE
            };
            let found = read_word(table + i as u64 * 8);
            if found & !ACCESSED_DIRTY != want {
                bad = Some(("4 KiB page entry", table + i as u64 * 8, want, found));
            }
        }
        if let Some((what, addr, want, found)) = bad {
            let _ = writeln!(
                super::super::console::DebugPort,
                "TRAP {what} at {addr:#x} changed (seen before hypercall {op}): expected {want:#x}, found {found:#x}; the firewall stops (domain crash)"
            );
            super::super::runtime::halt();
        }
        CHECKING.store(false, Ordering::SeqCst);
    }

    /// Replaces the 2 MiB mappings holding page 0 and the guard page below
    /// the boot stack by 4 KiB tables without those pages.
    fn unmap_low_pages() {
        let pd = (&raw const __boot_pd).cast::<u64>().cast_mut();
        let guard = layout().stack_bottom - PAGE;
        let tables = PAGE_TABLES.0.get().cast::<PageTable>();
        let mut used = 0;
        for addr in [0, guard] {
            let Some((pde, pte)) = super::table_indices(addr) else {
                continue;
            };
            // SAFETY: pde < 2048 = the entries in boot.s's four PDs.
            let entry = unsafe { pd.wrapping_add(pde).read_volatile() };
            let table = if entry & super::LARGE != 0 {
                let Some(entries) = super::split_large_page(entry) else {
                    continue;
                };
                if used == 2 {
                    continue;
                }
                // SAFETY: used < 2: one of PAGE_TABLES, not yet in use.
                let table = unsafe { tables.add(used) };
                used += 1;
                // SAFETY: the table is ours, not yet referenced by the MMU.
                unsafe { (*table).0 = entries };
                // SAFETY: the PD entry now points to a table mapping the
                // same memory with the same flags (the TLB is flushed below).
                unsafe {
                    pd.wrapping_add(pde)
                        .write_volatile(table as u64 | super::PRESENT | super::WRITABLE)
                };
                table
            } else {
                // Already split (both pages in the same 2 MiB).
                (entry & 0x000f_ffff_ffff_f000) as *mut PageTable
            };
            // SAFETY: `table` is one of PAGE_TABLES (identity-mapped) and
            // pte < 512; nothing lives in page 0 or in the guard page.
            unsafe { table.cast::<u64>().wrapping_add(pte).write_volatile(0) };
        }
        // SAFETY: reloading CR3 with its own value flushes the TLB (no
        // global pages: CR4.PGE is off); the tables it names are unchanged
        // but for the two unmapped pages.
        unsafe { core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack)) };
    }

    struct TrapWriter;

    impl Write for TrapWriter {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let _ = super::super::console::DebugPort.write_str(s);
            super::super::runtime::console_write_if_free(s.as_bytes());
            Ok(())
        }
    }

    /// Called by `__trap_common` on the trap stack with the saved frame.
    #[unsafe(no_mangle)]
    extern "C" fn __trap_report(frame: *const TrapFrame) -> ! {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effect.
        unsafe {
            core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
        };
        if IN_TRAP.swap(true, Ordering::SeqCst) {
            let _ = super::super::console::DebugPort
                .write_str("TRAP exception in the exception report\n");
            super::super::runtime::halt();
        }
        // SAFETY: `frame` points to the TrapFrame the stub just pushed on
        // the trap stack, below this function's frame.
        let frame = unsafe { frame.read() };
        let layout = layout();
        let _ = super::write_report(
            &mut TrapWriter,
            &frame,
            cr2,
            &layout,
            stack_high_water(),
            |addr| {
                // SAFETY: write_report asks only for 8-aligned words on the
                // boot stack (mapped, not the guard page).
                unsafe { core::ptr::read_volatile(addr as *const u64) }
            },
            |addr| {
                // SAFETY: write_report asks only for bytes of our text.
                unsafe { core::ptr::read_volatile(addr as *const u8) }
            },
        );
        super::super::runtime::halt()
    }

    const _: () = assert!(TRAP_STACK_SIZE.is_multiple_of(16));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)] // reason: tests index fixed tables.
    use super::*;
    use alloc::string::String;
    use alloc::vec::Vec;

    #[test]
    fn idt_gate_is_the_sdm_layout() {
        let gate = idt_gate(0x1234_5678_9abc_def0, 0x08, 1);
        assert_eq!(gate[0], 0x9abc_8e01_0008_def0);
        assert_eq!(gate[1], 0x1234_5678);
    }

    #[test]
    fn tss_descriptor_is_the_sdm_layout() {
        let d = tss_descriptor(0x0000_0001_0016_4008, 104);
        assert_eq!(d[0] & 0xffff, 103);
        assert_eq!((d[0] >> 16) & 0xff_ffff, 0x16_4008);
        assert_eq!((d[0] >> 40) & 0xff, 0x89);
        assert_eq!(d[0] >> 56, 0x00);
        assert_eq!(d[1], 1);
    }

    #[test]
    fn a_large_page_splits_into_the_same_mapping() {
        let table = split_large_page(0x0020_0000 | 0x83).unwrap();
        assert_eq!(table[0], 0x0020_0003);
        assert_eq!(table[511], 0x003f_f003);
        assert!(split_large_page(0x0020_0003).is_none());
        assert!(split_large_page(0x0020_0080).is_none());
        assert_eq!(table_indices(0x0016_9000 - 0x1000), Some((0, 0x168)));
        assert_eq!(table_indices(0xffff_f000), Some((2047, 511)));
        assert_eq!(table_indices(0x1_0000_0000), None);
    }

    #[test]
    fn error_codes_are_pushed_for_the_right_vectors() {
        let with: Vec<u8> = (0..32).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }

    #[test]
    fn high_water_counts_words_above_the_intact_paint() {
        let stack: Vec<u64> = [STACK_PAINT; 10]
            .into_iter()
            .chain([1, STACK_PAINT, 3])
            .collect();
        assert_eq!(stack_high_water(stack.len(), |i| stack[i]), 3 * 8);
        assert_eq!(stack_high_water(4, |_| STACK_PAINT), 0);
    }

    #[test]
    fn calls_are_recognised_before_return_addresses() {
        let code = [
            0x90u8, 0xe8, 1, 2, 3, 4, 0x41, 0xff, 0xd3, 0xff, 0x15, 0, 0, 0, 0, 0x90,
        ];
        let byte = |a: u64| code.get(a as usize).copied();
        assert!(follows_call(6, byte)); // call rel32
        assert!(follows_call(9, byte)); // call *%r11
        assert!(follows_call(15, byte)); // call *disp32(%rip)
        assert!(!follows_call(8, byte));
        assert!(!follows_call(2, byte));
    }

    fn layout() -> Layout {
        Layout {
            stack_bottom: 0x16_9000,
            stack_top: 0x16_9000 + BOOT_STACK_SIZE,
            text_start: 0x10_0000,
            text_end: 0x10_0100,
        }
    }

    #[test]
    fn a_stack_overflow_is_named() {
        let frame = TrapFrame {
            vector: 14,
            error: 2,
            rip: 0x10_0040,
            rsp: 0x16_8ff8,
            ..TrapFrame::default()
        };
        let mut out = String::new();
        write_report(&mut out, &frame, 0x16_8ff0, &layout(), 262144, |_| 0, |_| 0).unwrap();
        assert!(out.starts_with("TRAP CPU exception #PF (page fault, vector 14) error 0x2"));
        assert!(out.contains("write at 0x168ff0, page not present: STACK OVERFLOW"));
        assert!(out.contains("rsp is at the bottom of the boot stack"));
        assert!(out.contains("no stack dump"));
        assert!(out.contains("high-water 256 of 256 KiB"));
        assert!(out.lines().all(|l| l.starts_with("TRAP ")), "{out}");
    }

    #[test]
    fn return_addresses_are_found_on_the_stack() {
        // Code: a `call rel32` ending at 0x100010.
        let byte = |a: u64| if a == 0x10_000b { 0xe8 } else { 0x90 };
        let rsp = 0x16_9000 + BOOT_STACK_SIZE - 64;
        let word = |a: u64| match (a - rsp) / 8 {
            2 => 0x10_0010,
            3 => 0x10_0011,
            5 => 0x7777,
            _ => 0,
        };
        let frame = TrapFrame {
            vector: 13,
            rip: 0x10_0020,
            rsp,
            ..TrapFrame::default()
        };
        let mut out = String::new();
        write_report(&mut out, &frame, 0, &layout(), 64, word, byte).unwrap();
        assert!(out.contains("#GP (general protection, vector 13)"));
        assert!(
            out.contains("TRAP return addresses on the stack (candidates): 0x100010\n"),
            "{out}"
        );
        assert!(out.contains("0000000000100010 0000000000100011"));
        assert!(!out.contains("page fault"));
        assert!(out.lines().all(|l| l.starts_with("TRAP ")), "{out}");
    }
}
