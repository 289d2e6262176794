//! The hosted firewall's heap, counted: a global allocator that hands every
//! request to the C library's (`std::alloc::System`) and keeps the bytes
//! allocated now and their high-water mark, so that `qubes.FirewallStatus`
//! reports the heap of a Linux process as it does the Xen image's (there,
//! talc's counters). The soak (`cargo xtask soak`) prints both beside the
//! process's RSS: the RSS also holds the C library's free lists, stacks and
//! code, the high-water mark only what the firewall asked for.
//!
//! Two relaxed atomic counters per allocation; nothing else is changed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The C library's allocator, counted.
struct Counting;

/// Bytes allocated now.
static USED: AtomicUsize = AtomicUsize::new(0);
/// The most bytes ever allocated at once.
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = USED
        .fetch_add(bytes, Ordering::Relaxed)
        .saturating_add(bytes);
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    USED.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is passed to `System` with the caller's layout and
// pointer unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is `System`'s.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (that is, `System`) with
        // `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // The old block is gone and the new one holds `new_size`.
            shrank(layout.size());
            grew(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated now, and the most ever allocated at once.
pub fn usage() -> (usize, usize) {
    (USED.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn a_block_is_counted_while_it_lives_and_raises_the_peak() {
        // Other tests allocate in parallel: compare with what a 64 MiB
        // block must add at least, not with exact figures.
        const SIZE: usize = 64 << 20;
        let block: Vec<u8> = Vec::with_capacity(SIZE);
        let (used, peak) = usage();
        assert!(used >= SIZE, "used {used} below the live block's {SIZE}");
        assert!(peak >= used, "peak {peak} below used {used}");
        core::mem::drop(block);
        let (_, after) = usage();
        assert!(after >= SIZE, "the peak {after} forgot the block");
    }
}
