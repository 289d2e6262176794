//! Memory shared with another domain, behind one small trait so that every
//! ring protocol above it (console, xenstore, vchan, netfront, netback) is
//! portable and tested on the host against [`VecMemory`], a heap block
//! reached through the same [`RawMemory`] accessors (so `cargo xtask miri`
//! checks this module's unsafe code under every ring test).
//!
//! On Xen, [`RawMemory`] touches the page only with volatile loads/stores and
//! atomic read-modify-write, never through `&`/`&mut` (the peer may change
//! any byte at any time). Offsets come from our own masked ring arithmetic;
//! an offset outside the region is a bug in this crate, so the accessors
//! check it and do nothing (reads give 0) rather than touch foreign memory.
//! Nothing here interprets a peer-written value: callers read once, copy,
//! then validate.
#![deny(clippy::indexing_slicing)]

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec;
use core::sync::atomic::{AtomicU8, AtomicU16, Ordering, fence};

/// A region of memory shared with a peer domain.
pub trait SharedMemory: Clone {
    /// Size of the region in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads a little-endian `u32` at `offset` (one load; 4-byte aligned).
    fn load_u32(&self, offset: usize) -> u32;
    /// Stores a `u32` at `offset` (one store; 4-byte aligned).
    fn store_u32(&self, offset: usize, value: u32);
    /// Reads a byte.
    fn load_u8(&self, offset: usize) -> u8;
    /// Stores a byte.
    fn store_u8(&self, offset: usize, value: u8);
    /// Reads a `u16` (2-byte aligned).
    fn load_u16(&self, offset: usize) -> u16;
    /// Stores a `u16` (2-byte aligned).
    fn store_u16(&self, offset: usize, value: u16);
    /// Atomically ORs `bits` into the byte at `offset`; returns the old value.
    fn fetch_or_u8(&self, offset: usize, bits: u8) -> u8;
    /// Atomically ANDs `bits` into the byte at `offset`; returns the old value.
    fn fetch_and_u8(&self, offset: usize, bits: u8) -> u8;
    /// Atomically replaces the `u16` at `offset` with `new` if it equals
    /// `current`; returns the value found.
    fn compare_exchange_u16(&self, offset: usize, current: u16, new: u16) -> u16;
    /// Copies `dst.len()` bytes out of the region starting at `offset`.
    fn read_bytes(&self, offset: usize, dst: &mut [u8]);
    /// Copies `src` into the region starting at `offset`.
    fn write_bytes(&self, offset: usize, src: &[u8]);
}

/// A full memory barrier (Xen's `xen_mb()`); `xen_rmb`/`xen_wmb` are
/// subsumed by it on x86 and cost nothing extra worth keeping apart here.
pub fn barrier() {
    fence(Ordering::SeqCst);
}

fn in_range(offset: usize, size: usize, len: usize) -> bool {
    offset.checked_add(size).is_some_and(|end| end <= len)
}

/// A heap region that two ends (our code and a test double playing the
/// peer) share through `Clone`: the host-test and fuzzing stand-in for a
/// granted page. Every access goes through [`RawMemory`] over the heap
/// block, so host tests (and Miri, `cargo xtask miri`) run the same
/// volatile and atomic code as the image; only where the block comes from
/// differs. An access outside the region is a bug in the caller: it fails a
/// debug assertion (and reads 0 / writes nothing, as `RawMemory` does).
#[derive(Clone, Debug)]
pub struct VecMemory(Rc<HeapBlock>);

/// The owned block behind a [`VecMemory`]: 8-byte aligned (as a page is for
/// the 2- and 4-byte fields), freed when the last clone goes.
#[derive(Debug)]
struct HeapBlock {
    words: *mut [u64],
    mem: RawMemory,
}

impl Drop for HeapBlock {
    fn drop(&mut self) {
        // SAFETY: `words` came from `Box::into_raw` in `VecMemory::new` and
        // is freed only here, once, when no `VecMemory` (and so no copy of
        // `mem`) is left.
        drop(unsafe { Box::from_raw(self.words) });
    }
}

impl VecMemory {
    /// A zeroed region of `len` bytes.
    pub fn new(len: usize) -> Self {
        let words: Box<[u64]> = vec![0u64; len.div_ceil(8)].into_boxed_slice();
        let words = Box::into_raw(words);
        // SAFETY: `words` is our own allocation of at least `len` bytes,
        // reached from now on only through this `RawMemory` (no reference to
        // it is made) and freed by `HeapBlock::drop` after the last user.
        let mem = unsafe { RawMemory::new(words.cast::<u8>(), len) };
        VecMemory(Rc::new(HeapBlock { words, mem }))
    }

    fn raw(&self, offset: usize, size: usize) -> &RawMemory {
        let mem = &self.0.mem;
        debug_assert!(
            in_range(offset, size, mem.len()),
            "access outside the shared region: {size} bytes at {offset} of {}",
            mem.len()
        );
        mem
    }
}

impl SharedMemory for VecMemory {
    fn len(&self) -> usize {
        self.0.mem.len()
    }
    fn load_u32(&self, offset: usize) -> u32 {
        self.raw(offset, 4).load_u32(offset)
    }
    fn store_u32(&self, offset: usize, value: u32) {
        self.raw(offset, 4).store_u32(offset, value);
    }
    fn load_u8(&self, offset: usize) -> u8 {
        self.raw(offset, 1).load_u8(offset)
    }
    fn store_u8(&self, offset: usize, value: u8) {
        self.raw(offset, 1).store_u8(offset, value);
    }
    fn load_u16(&self, offset: usize) -> u16 {
        self.raw(offset, 2).load_u16(offset)
    }
    fn store_u16(&self, offset: usize, value: u16) {
        self.raw(offset, 2).store_u16(offset, value);
    }
    fn fetch_or_u8(&self, offset: usize, bits: u8) -> u8 {
        self.raw(offset, 1).fetch_or_u8(offset, bits)
    }
    fn fetch_and_u8(&self, offset: usize, bits: u8) -> u8 {
        self.raw(offset, 1).fetch_and_u8(offset, bits)
    }
    fn compare_exchange_u16(&self, offset: usize, current: u16, new: u16) -> u16 {
        self.raw(offset, 2)
            .compare_exchange_u16(offset, current, new)
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        self.raw(offset, dst.len()).read_bytes(offset, dst);
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        self.raw(offset, src.len()).write_bytes(offset, src);
    }
}

/// A region of guest-physical memory shared with another domain (one of our
/// pages granted to a peer, a peer's page mapped into our space, or a page
/// Xen set up for us such as the console ring). Identity mapping: the
/// address is the guest-physical address.
#[derive(Clone, Copy, Debug)]
pub struct RawMemory {
    base: *mut u8,
    len: usize,
}

impl RawMemory {
    /// # Safety
    /// `base..base + len` must be mapped, writable memory that stays mapped
    /// and is not otherwise referenced by Rust `&`/`&mut` for as long as any
    /// copy of the returned value exists.
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        RawMemory { base, len }
    }

    /// The first byte of the region.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    fn at(&self, offset: usize, size: usize) -> Option<*mut u8> {
        // `wrapping_add` keeps this safe; the pointer is used only once the
        // range check has passed.
        in_range(offset, size, self.len).then(|| self.base.wrapping_add(offset))
    }
}

impl SharedMemory for RawMemory {
    fn len(&self) -> usize {
        self.len
    }
    fn load_u32(&self, offset: usize) -> u32 {
        match self.at(offset, 4) {
            // SAFETY: in range of a region valid per `RawMemory::new`;
            // aligned by the ring layouts (all index fields are at 4-byte
            // aligned offsets of page-aligned regions).
            Some(p) => unsafe { core::ptr::read_volatile(p.cast::<u32>()) },
            None => 0,
        }
    }
    fn store_u32(&self, offset: usize, value: u32) {
        if let Some(p) = self.at(offset, 4) {
            // SAFETY: as in `load_u32`.
            unsafe { core::ptr::write_volatile(p.cast::<u32>(), value) }
        }
    }
    fn load_u8(&self, offset: usize) -> u8 {
        match self.at(offset, 1) {
            // SAFETY: in range of a valid region.
            Some(p) => unsafe { core::ptr::read_volatile(p) },
            None => 0,
        }
    }
    fn store_u8(&self, offset: usize, value: u8) {
        if let Some(p) = self.at(offset, 1) {
            // SAFETY: in range of a valid region.
            unsafe { core::ptr::write_volatile(p, value) }
        }
    }
    fn load_u16(&self, offset: usize) -> u16 {
        match self.at(offset, 2) {
            // SAFETY: in range of a valid region; 2-byte aligned by layout.
            Some(p) => unsafe { core::ptr::read_volatile(p.cast::<u16>()) },
            None => 0,
        }
    }
    fn store_u16(&self, offset: usize, value: u16) {
        if let Some(p) = self.at(offset, 2) {
            // SAFETY: as in `load_u16`.
            unsafe { core::ptr::write_volatile(p.cast::<u16>(), value) }
        }
    }
    fn fetch_or_u8(&self, offset: usize, bits: u8) -> u8 {
        match self.at(offset, 1) {
            // SAFETY: in range of a valid region; the byte is only ever
            // accessed atomically or volatilely, as the peer does (gcc
            // `__sync_*` builtins in libxenvchan).
            Some(p) => unsafe { AtomicU8::from_ptr(p) }.fetch_or(bits, Ordering::SeqCst),
            None => 0,
        }
    }
    fn fetch_and_u8(&self, offset: usize, bits: u8) -> u8 {
        match self.at(offset, 1) {
            // SAFETY: as in `fetch_or_u8`.
            Some(p) => unsafe { AtomicU8::from_ptr(p) }.fetch_and(bits, Ordering::SeqCst),
            None => 0,
        }
    }
    fn compare_exchange_u16(&self, offset: usize, current: u16, new: u16) -> u16 {
        match self.at(offset, 2) {
            // SAFETY: in range of a valid region, 2-byte aligned by layout
            // (grant entry flags); accessed atomically as Xen does.
            Some(p) => match unsafe { AtomicU16::from_ptr(p.cast::<u16>()) }.compare_exchange(
                current,
                new,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(old) | Err(old) => old,
            },
            None => 0,
        }
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        let Some(p) = self.at(offset, dst.len()) else {
            dst.fill(0);
            return;
        };
        #[cfg(not(miri))]
        {
            // SAFETY: `p..p + dst.len()` is inside the region (checked by
            // `at`); `dst` is ours and cannot overlap it (no Rust reference
            // points into the region, `new`'s contract). The copy is
            // inline assembly, opaque to the compiler as a volatile access
            // is, so a peer writing the region meanwhile changes only the
            // bytes we get. 64 bytes per step (`mem`, where the lab's
            // figures are): under TCG about twice as fast as the word loop
            // Miri runs instead.
            unsafe { super::mem::copy_forward(dst.as_mut_ptr(), p, dst.len()) };
        }
        #[cfg(miri)]
        self.read_words(p, dst);
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        let Some(p) = self.at(offset, src.len()) else {
            return;
        };
        #[cfg(not(miri))]
        {
            // SAFETY: as in `read_bytes`, the other way.
            unsafe { super::mem::copy_forward(p, src.as_ptr(), src.len()) };
        }
        #[cfg(miri)]
        self.write_words(p, src);
    }
}

/// Miri cannot run inline assembly: under it the byte copies go through
/// volatile accesses, a word at a time.
#[cfg(miri)]
impl RawMemory {
    fn read_words(&self, p: *mut u8, dst: &mut [u8]) {
        // Bytes up to the first 8-byte boundary, then whole aligned words
        // (8 times fewer volatile accesses than byte by byte), then the rest.
        let head = (WORD - p.addr() % WORD) % WORD;
        let (first, rest) = dst.split_at_mut(head.min(dst.len()));
        let mut at = p;
        for byte in first {
            // SAFETY: `at` is inside the region (the whole span was checked);
            // volatile reads of memory the peer may be writing.
            *byte = unsafe { core::ptr::read_volatile(at) };
            at = at.wrapping_add(1);
        }
        let mut words = rest.chunks_exact_mut(WORD);
        for chunk in &mut words {
            // SAFETY: `at..at + 8` is inside the region and `at` is 8-byte
            // aligned (we stepped to the boundary above).
            let word = unsafe { core::ptr::read_volatile(at.cast::<u64>()) };
            chunk.copy_from_slice(&word.to_ne_bytes());
            at = at.wrapping_add(WORD);
        }
        for byte in words.into_remainder() {
            // SAFETY: as for the head bytes.
            *byte = unsafe { core::ptr::read_volatile(at) };
            at = at.wrapping_add(1);
        }
    }
    fn write_words(&self, p: *mut u8, src: &[u8]) {
        let head = (WORD - p.addr() % WORD) % WORD;
        let (first, rest) = src.split_at(head.min(src.len()));
        let mut at = p;
        for byte in first {
            // SAFETY: as in `read_bytes`.
            unsafe { core::ptr::write_volatile(at, *byte) };
            at = at.wrapping_add(1);
        }
        let mut words = rest.chunks_exact(WORD);
        for chunk in &mut words {
            let mut word = [0u8; WORD];
            word.copy_from_slice(chunk);
            // SAFETY: as in `read_bytes`: in range, 8-byte aligned.
            unsafe { core::ptr::write_volatile(at.cast::<u64>(), u64::from_ne_bytes(word)) };
            at = at.wrapping_add(WORD);
        }
        for byte in words.remainder() {
            // SAFETY: as in `read_bytes`.
            unsafe { core::ptr::write_volatile(at, *byte) };
            at = at.wrapping_add(1);
        }
    }
}

/// Bytes per wide access in `RawMemory::read_words`/`write_words`.
#[cfg(miri)]
const WORD: usize = 8;

#[allow(clippy::indexing_slicing)] // reason: test code; a panic there is a failed test
#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn vec_memory_round_trips_and_is_shared_between_clones() {
        let a = VecMemory::new(16);
        let b = a.clone();
        a.store_u32(4, 0xdead_beef);
        assert_eq!(b.load_u32(4), 0xdead_beef);
        assert_eq!(b.fetch_or_u8(0, 3), 0);
        assert_eq!(a.fetch_and_u8(0, !1), 3);
        assert_eq!(b.load_u8(0), 2);
        b.write_bytes(8, b"abc");
        let mut out = [0u8; 3];
        a.read_bytes(8, &mut out);
        assert_eq!(&out, b"abc");
    }

    #[test]
    fn byte_copies_are_exact_at_every_alignment_and_length() {
        let mem = VecMemory::new(64);
        let mut expected = [0u8; 64];
        let mut stamp = 0u8;
        // Every head/word/tail split; fewer of them under Miri.
        let (offsets, lens) = if cfg!(miri) { (9, 17) } else { (20, 40) };
        for offset in 0..offsets {
            for len in 0..=lens {
                let src: Vec<u8> = (0..len)
                    .map(|_| {
                        stamp = stamp.wrapping_add(37);
                        stamp
                    })
                    .collect();
                mem.write_bytes(offset, &src);
                expected[offset..offset + len].copy_from_slice(&src);
                let mut whole = [0u8; 64];
                mem.read_bytes(0, &mut whole);
                assert_eq!(whole, expected, "write of {len} at {offset}");
                let mut part = vec![0u8; len];
                mem.read_bytes(offset, &mut part);
                assert_eq!(part, src, "read of {len} at {offset}");
                let mut shifted = vec![0u8; len];
                mem.read_bytes(64 - len, &mut shifted);
                assert_eq!(shifted[..], expected[64 - len..]);
            }
        }
    }

    #[test]
    fn raw_memory_checks_every_offset() {
        let mut backing = [0u32; 2];
        // SAFETY: `backing` outlives `mem` and is not otherwise used meanwhile.
        let mem = unsafe { RawMemory::new(backing.as_mut_ptr().cast::<u8>(), 8) };
        mem.store_u32(4, 7);
        assert_eq!(mem.load_u32(4), 7);
        mem.store_u32(6, 9); // out of range: ignored
        assert_eq!(mem.load_u32(8), 0);
        assert_eq!(mem.load_u32(usize::MAX - 1), 0);
        let mut big = [1u8; 9];
        mem.read_bytes(0, &mut big);
        assert_eq!(big, [0; 9]);
        assert_eq!(backing[1], 7);
    }
}
