/*
 * PVH entry of the firewall image (included by runtime.rs with global_asm!).
 *
 * Xen starts a PVH guest in 32-bit protected mode, paging off, at the address
 * in the XEN_ELFNOTE_PHYS32_ENTRY (type 18) note, with %ebx = guest-physical
 * address of struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
 * We identity-map the first 4 GiB with 2 MiB pages (RAM, the special pages
 * just below 4 GiB, and the windows where grant frames and foreign grants are
 * mapped), enable PAE + long mode + SSE (the precompiled `core` uses xmm
 * registers), load a flat 64-bit GDT, and call rust_start(start_info_paddr)
 * on a 16-byte aligned stack, painted with STACK_PAINT (traps.rs measures
 * its high-water mark from it). No interrupts are ever enabled; traps.rs
 * installs exception handlers and unmaps the guard page below the stack and
 * page 0 (both are mapped until then).
 * Local labels avoid digits 0/1 only (they would read as binary).
 */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                         /* namesz: "Xen\0" */
        .long 4                         /* descsz */
        .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .long _start
        .balign 4

        .section .text.boot, "ax", @progbits
        .code32
        .globl _start
_start:
        cli
        cld
        mov     $__boot_stack_top, %esp
        movl    $(__boot_pdpt + 3), __boot_pml4
        movl    $(__boot_pd + 0x0003), __boot_pdpt
        movl    $(__boot_pd + 0x1003), __boot_pdpt + 8
        movl    $(__boot_pd + 0x2003), __boot_pdpt + 16
        movl    $(__boot_pd + 0x3003), __boot_pdpt + 24
        xor     %ecx, %ecx
3:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x83, %eax             /* present | writable | 2 MiB page */
        mov     %eax, __boot_pd(,%ecx,8)
        mov     %ecx, %eax
        shr     $11, %eax               /* address bits 32.. */
        mov     %eax, __boot_pd + 4(,%ecx,8)
        inc     %ecx
        cmp     $2048, %ecx
        jb      3b
        mov     %cr4, %eax
        or      $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
        mov     %eax, %cr4
        mov     $__boot_pml4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx       /* EFER */
        rdmsr
        or      $0x100, %eax            /* LME */
        wrmsr
        mov     %cr0, %eax
        and     $0xfffffff3, %eax       /* clear EM, TS */
        or      $0x80000003, %eax       /* PG | MP | PE */
        mov     %eax, %cr0
        lgdt    __boot_gdt_ptr
        ljmp    $0x08, $__boot_long

        .code64
__boot_long:
        mov     $0x10, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        lea     __boot_stack(%rip), %rdi
        mov     $(262144 / 8), %ecx
        movabs  $0x57ac57ac57ac57ac, %rax   /* traps::STACK_PAINT */
        rep stosq
        lea     __boot_stack_top(%rip), %rsp
        xor     %ebp, %ebp
        mov     %ebx, %edi              /* hvm_start_info paddr, zero-extended */
        call    rust_start
4:      hlt
        jmp     4b

        .section .rodata.boot, "a", @progbits
        .balign 8
__boot_gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf92000000ffff      /* 0x10: data */
__boot_gdt_ptr:
        .word   __boot_gdt_ptr - __boot_gdt - 1
        .long   __boot_gdt

        .section .bss.boot, "aw", @nobits
        .balign 4096
__boot_pml4:    .skip 4096
__boot_pdpt:    .skip 4096
        .globl __boot_pd
__boot_pd:      .skip 4096 * 4
        .globl __boot_stack_guard
__boot_stack_guard: .skip 4096          /* unmapped by traps.rs: an overflow is a #PF */
        .globl __boot_stack
__boot_stack:   .skip 262144            /* traps::BOOT_STACK_SIZE */
        .globl __boot_stack_top
__boot_stack_top:
