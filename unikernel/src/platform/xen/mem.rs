//! The bodies of the image's `memcpy` and `memset` ([`super::runtime`]
//! exports them under the C names) and of the copies in and out of pages
//! shared with peers (`shared::RawMemory`), apart from the runtime so that
//! the host tests run them.
//!
//! Both move 64 bytes per step through general-purpose registers (eight
//! 8-byte moves), then the last 0-63 bytes with `rep movsq`/`rep stosq`
//! and `rep movsb`/`rep stosb`. Under QEMU's TCG, where `bench xen` and
//! `tests/xen/run.sh` run, a `rep` string instruction takes one emulated
//! step per element and a 16-byte SSE move costs more than two 8-byte
//! ones. Measured in the lab by our own image at boot (a scratch build),
//! 300 copies of 64 KiB each way, three rounds: 9 µs per copy this way,
//! 26-27 µs with four 16-byte SSE2 moves per step (what this did before,
//! aligned or not; the compiler's own `copy_from_slice` gave the same, as
//! it calls `memcpy`), 15-17 µs with a loop of volatile 8-byte words (what
//! `RawMemory` did). Earlier, `rep movsq` had cost 3.0-3.2 s for 10,000
//! such copies in a minimal guest. On hardware a loop of 8-byte moves
//! copies at a good part of cache speed, below what the vector and string
//! forms reach there, which a firewall moving at most a few GB/s per vCPU
//! does not miss.

/// Copies `n` bytes from `src` to `dst`, first to last.
///
/// # Safety
/// `src` valid for reading and `dst` for writing `n` bytes; the ranges do
/// not overlap, or `dst` lies below `src` (each 64-byte step reads its
/// bytes before it writes any).
pub unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller's contract. The loop moves `n / 64` blocks of 64
    // bytes (each read whole, into eight registers, before it is written),
    // the string moves the remaining `n % 64` bytes forwards (DF is clear
    // by the ABI); no byte outside the two ranges is touched.
    unsafe {
        core::arch::asm!(
            "test {blocks}, {blocks}",
            "jz 3f",
            "2:",
            "mov {a}, [rsi]",
            "mov {b}, [rsi + 8]",
            "mov {c}, [rsi + 16]",
            "mov {d}, [rsi + 24]",
            "mov {e}, [rsi + 32]",
            "mov {f}, [rsi + 40]",
            "mov {g}, [rsi + 48]",
            "mov {h}, [rsi + 56]",
            "mov [rdi], {a}",
            "mov [rdi + 8], {b}",
            "mov [rdi + 16], {c}",
            "mov [rdi + 24], {d}",
            "mov [rdi + 32], {e}",
            "mov [rdi + 40], {f}",
            "mov [rdi + 48], {g}",
            "mov [rdi + 56], {h}",
            "add rsi, 64",
            "add rdi, 64",
            "dec {blocks}",
            "jnz 2b",
            "3:",
            "mov rcx, {rest}",
            "shr rcx, 3",
            "rep movsq",
            "mov rcx, {rest}",
            "and rcx, 7",
            "rep movsb",
            blocks = inout(reg) n >> 6 => _,
            rest = in(reg) n & 63,
            a = out(reg) _,
            b = out(reg) _,
            c = out(reg) _,
            d = out(reg) _,
            e = out(reg) _,
            f = out(reg) _,
            g = out(reg) _,
            h = out(reg) _,
            out("rcx") _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack),
        );
    }
}

/// Stores `value` in `n` bytes from `dst` on.
///
/// # Safety
/// `dst` valid for writing `n` bytes.
pub unsafe fn fill(dst: *mut u8, value: u8, n: usize) {
    let pattern = u64::from(value) * 0x0101_0101_0101_0101;
    // SAFETY: the caller's contract: `n / 64` blocks of 64 bytes, then the
    // remaining `n % 64` bytes forwards (DF clear), all inside the range.
    unsafe {
        core::arch::asm!(
            "test {blocks}, {blocks}",
            "jz 3f",
            "2:",
            "mov [rdi], rax",
            "mov [rdi + 8], rax",
            "mov [rdi + 16], rax",
            "mov [rdi + 24], rax",
            "mov [rdi + 32], rax",
            "mov [rdi + 40], rax",
            "mov [rdi + 48], rax",
            "mov [rdi + 56], rax",
            "add rdi, 64",
            "dec {blocks}",
            "jnz 2b",
            "3:",
            "mov rcx, {rest}",
            "shr rcx, 3",
            "rep stosq",
            "mov rcx, {rest}",
            "and rcx, 7",
            "rep stosb",
            blocks = inout(reg) n >> 6 => _,
            rest = in(reg) n & 63,
            out("rcx") _,
            inout("rdi") dst => _,
            in("rax") pattern,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// Sizes around every step of the loop and the string moves.
    fn sizes() -> impl Iterator<Item = usize> {
        (0..=200).chain([255, 256, 257, 4095, 4096, 4097, 65_536, 65_536 + 63])
    }

    #[test]
    fn copies_every_size_at_every_alignment_and_nothing_else() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in sizes() {
            for (from, to) in [(0, 0), (1, 0), (0, 3), (5, 9), (8, 8), (15, 1)] {
                let mut dst = vec![0xa5u8; n + 32];
                // SAFETY: `src` has `from + n` bytes, `dst` has `to + n`,
                // separate vectors.
                unsafe {
                    copy_forward(
                        dst.as_mut_ptr().wrapping_add(to),
                        src.as_ptr().wrapping_add(from),
                        n,
                    )
                };
                assert_eq!(
                    dst[to..to + n],
                    src[from..from + n],
                    "n {n} from {from} to {to}"
                );
                assert!(dst[..to].iter().all(|b| *b == 0xa5), "before, n {n}");
                assert!(dst[to + n..].iter().all(|b| *b == 0xa5), "after, n {n}");
            }
        }
    }

    #[test]
    fn copies_down_over_an_overlapping_source() {
        // memmove's forward case: the destination below the source.
        for n in sizes().filter(|n| *n <= 4097) {
            for gap in [1, 8, 63, 64, 65] {
                let mut buf: Vec<u8> = (0..n + gap).map(|i| (i * 13) as u8).collect();
                let want: Vec<u8> = buf[gap..].to_vec();
                let p = buf.as_mut_ptr();
                // SAFETY: both ranges inside `buf`; the destination lies
                // below the source.
                unsafe { copy_forward(p, p.wrapping_add(gap), n) };
                assert_eq!(buf[..n], want[..], "n {n} gap {gap}");
            }
        }
    }

    #[test]
    fn fills_every_size_at_every_alignment_and_nothing_else() {
        for n in sizes() {
            for to in [0, 1, 7, 8, 13] {
                let mut dst = vec![0x5au8; n + 32];
                // SAFETY: `dst` has `to + n` bytes.
                unsafe { fill(dst.as_mut_ptr().wrapping_add(to), 0xc3, n) };
                assert!(dst[to..to + n].iter().all(|b| *b == 0xc3), "n {n} to {to}");
                assert!(dst[..to].iter().all(|b| *b == 0x5a), "before, n {n}");
                assert!(dst[to + n..].iter().all(|b| *b == 0x5a), "after, n {n}");
            }
        }
        let mut zero = vec![0xffu8; 100];
        // SAFETY: 100 bytes.
        unsafe { fill(zero.as_mut_ptr(), 0, 100) };
        assert!(zero.iter().all(|b| *b == 0));
    }
}
