//! The image's allocator rule: every allocation of a page or more starts
//! on a page, whatever alignment it asked for.
//!
//! A frame buffer (`Vec<u8>`, alignment 1) of a page or more then covers
//! whole pages of its own from its first byte, so the uplink's netfront
//! can grant those pages to the backend instead of copying the frame
//! (`netfront::PageLender`): they hold nothing but the frame's bytes.
//! The rule depends on the size alone, so `dealloc` and `realloc`, which
//! are given the layout the allocation was made with, find the same
//! alignment again; a `realloc` across the threshold moves the block.
//! `runtime` wraps talc in it; the host tests wrap the system allocator.

use core::alloc::{GlobalAlloc, Layout};

/// Allocations of at least this many bytes start on a page.
pub const PAGE_ALIGNED_FROM: usize = 4096;

/// An allocator whose allocations of [`PAGE_ALIGNED_FROM`] bytes or more
/// start on a page.
#[derive(Debug)]
pub struct PageAligned<A>(pub A);

/// The layout `PageAligned` gives the inner allocator for `layout`.
pub fn page_layout(layout: Layout) -> Layout {
    if layout.size() >= PAGE_ALIGNED_FROM && layout.align() < PAGE_ALIGNED_FROM {
        Layout::from_size_align(layout.size(), PAGE_ALIGNED_FROM).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every call goes to the inner allocator with the layout
// `page_layout` makes of the caller's; that layout depends only on the
// caller's, so a block is freed or resized with the layout it was
// allocated with, and its alignment is at least the one asked for. The
// inner allocator must keep a block's alignment when its `realloc` moves
// it (talc and the system allocator do).
unsafe impl<A: GlobalAlloc> GlobalAlloc for PageAligned<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the trait's (a non-zero size, passed on).
        unsafe { self.0.alloc(page_layout(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the trait's.
        unsafe { self.0.alloc_zeroed(page_layout(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` with this layout, so by
        // the inner allocator with `page_layout(layout)`.
        unsafe { self.0.dealloc(ptr, page_layout(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = page_layout(layout);
        // SAFETY: the trait requires `new_size`, rounded up to `layout`'s
        // alignment, not to overflow `isize`.
        let new =
            page_layout(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
        if old.align() == new.align() {
            // SAFETY: the block was allocated with `old`; the inner
            // allocator keeps its alignment when it moves it.
            return unsafe { self.0.realloc(ptr, old, new_size) };
        }
        // SAFETY: `new` has a non-zero size (the caller's `new_size`).
        let moved = unsafe { self.0.alloc(new) };
        if !moved.is_null() {
            // SAFETY: the old block is valid for `layout.size()` bytes, the
            // new one for `new_size`; they are distinct blocks.
            unsafe { core::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
            // SAFETY: the old block, freed once with the layout it has.
            unsafe { self.0.dealloc(ptr, old) };
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aligned(ptr: *mut u8) -> bool {
        (ptr as usize).is_multiple_of(PAGE_ALIGNED_FROM)
    }

    /// A block of the test allocator, read and written through safe calls.
    struct Block {
        ptr: *mut u8,
        layout: Layout,
    }

    impl Block {
        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes, all
            // written since it was allocated or moved (or zeroed).
            unsafe { core::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
        }
    }

    fn alloc(
        heap: &PageAligned<std::alloc::System>,
        size: usize,
        align: usize,
        zeroed: bool,
    ) -> Block {
        let layout = Layout::from_size_align(size, align).unwrap();
        let ptr = if zeroed {
            // SAFETY: a non-zero size.
            unsafe { heap.alloc_zeroed(layout) }
        } else {
            // SAFETY: a non-zero size.
            unsafe { heap.alloc(layout) }
        };
        assert!(!ptr.is_null());
        let mut block = Block { ptr, layout };
        if !zeroed {
            block.bytes().fill(0x5a);
        }
        block
    }

    fn realloc(heap: &PageAligned<std::alloc::System>, block: Block, size: usize) -> Block {
        // SAFETY: a live block with its layout; a non-zero new size.
        let ptr = unsafe { heap.realloc(block.ptr, block.layout, size) };
        assert!(!ptr.is_null());
        let layout = Layout::from_size_align(size, block.layout.align()).unwrap();
        let mut moved = Block { ptr, layout };
        let kept = block.layout.size().min(size);
        if size > kept {
            moved.bytes()[kept..].fill(0x5a);
        }
        moved
    }

    fn free(heap: &PageAligned<std::alloc::System>, block: Block) {
        // SAFETY: a live block, freed once with its layout.
        unsafe { heap.dealloc(block.ptr, block.layout) };
    }

    #[test]
    fn big_blocks_start_on_a_page_and_keep_their_bytes_across_the_threshold() {
        let heap = PageAligned(std::alloc::System);
        let small = Layout::from_size_align(100, 1).unwrap();
        assert_eq!(page_layout(small), small);
        assert_eq!(
            page_layout(Layout::from_size_align(4096, 1).unwrap()).align(),
            4096
        );
        assert_eq!(
            page_layout(Layout::from_size_align(8192, 8192).unwrap()).align(),
            8192
        );
        let mut block = alloc(&heap, 100, 1, false);
        for (i, byte) in block.bytes().iter_mut().enumerate() {
            *byte = i as u8;
        }
        // Grown past the threshold: moved onto a page, bytes kept.
        let mut block = realloc(&heap, block, 70_000);
        assert!(aligned(block.ptr));
        assert!(
            block.bytes()[..100]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == i as u8)
        );
        for (i, byte) in block.bytes().iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        // Grown again above it: still on a page.
        let mut block = realloc(&heap, block, 140_000);
        assert!(aligned(block.ptr));
        assert!(
            block.bytes()[..70_000]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (i % 251) as u8)
        );
        // Shrunk below it: moved, the first bytes kept.
        let mut block = realloc(&heap, block, 50);
        assert!(
            block
                .bytes()
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (i % 251) as u8)
        );
        free(&heap, block);
        // Zeroed and plain big blocks, freed with the caller's layout.
        for (size, align) in [(70_000, 1), (4096, 2)] {
            let mut block = alloc(&heap, size, align, true);
            assert!(aligned(block.ptr));
            assert!(block.bytes().iter().all(|b| *b == 0));
            free(&heap, block);
        }
    }
}
