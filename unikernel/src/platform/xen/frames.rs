//! Buffers for received frames, passed round instead of allocated and
//! zero-filled for every packet.
//!
//! A frame the router has sent (its bytes copied to a peer) comes back
//! here through [`crate::offload::OffloadNic::receive_into`] with its
//! length as it was; the netback or netfront that needs a buffer for the
//! next packet's copy takes it cut to that packet's length. Bytes left
//! from the old frame are all overwritten by the copy before the frame is
//! handed on (a packet whose copy failed is dropped with its buffer), so
//! only a buffer shorter than the packet has its new tail zero-filled.
//! Zero-filling 64 KiB per GSO packet was a pass over every byte, as
//! costly as a copy.
//!
//! One pool for the whole firewall (the platform lends it to the NIC it
//! polls), bounded in buffers and bytes, so that many clients never hold
//! more than [`MAX_BYTES`] between them.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::vec::Vec;

/// Buffers kept at most.
pub const MAX_BUFFERS: usize = 32;
/// Capacity kept at most, all buffers together.
pub const MAX_BYTES: usize = 1 << 20;

/// The pool. Empty by default (every buffer then comes zero-filled from
/// the allocator).
#[derive(Debug, Default)]
pub struct FramePool {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl FramePool {
    /// A buffer of `len` bytes whose contents are unspecified (old frame
    /// bytes or zeroes): the caller overwrites all of them or drops it.
    ///
    /// The buffer chosen is the shortest kept one at least `len` long (no
    /// byte zero-filled), else the longest (fewest). Taking whichever came
    /// last cut a 64 KiB buffer down for each 66-byte TCP ACK, and the next
    /// GSO packet then zero-filled 64 KiB again: a profile of `bench xen`
    /// found `memset` at 1 % of the firewall's samples on a download.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let lengths = self.buffers.iter().map(Vec::len).enumerate();
        let shortest_fit = lengths
            .clone()
            .filter(|&(_, have)| have >= len)
            .min_by_key(|&(_, have)| have);
        let best = shortest_fit.or_else(|| lengths.max_by_key(|&(_, have)| have));
        match best.map(|(index, _)| index) {
            Some(index) => {
                let mut buffer = self.buffers.swap_remove(index);
                self.bytes = self.bytes.saturating_sub(buffer.capacity());
                if buffer.len() >= len {
                    buffer.truncate(len);
                } else {
                    buffer.resize(len, 0);
                }
                buffer
            }
            None => alloc::vec![0u8; len],
        }
    }

    /// Keeps `buffer` for a later [`FramePool::take`] if there is room.
    pub fn give(&mut self, buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if capacity != 0 && self.buffers.len() < MAX_BUFFERS && self.bytes + capacity <= MAX_BYTES {
            self.bytes += capacity;
            self.buffers.push(buffer);
        }
    }

    /// Buffers kept.
    pub fn len(&self) -> usize {
        self.buffers.len()
    }

    /// Whether no buffer is kept.
    pub fn is_empty(&self) -> bool {
        self.buffers.is_empty()
    }
}

/// A device with a pool of its own (the netback, the netfront): it takes
/// buffers for received frames from it and gives back buffers it is done
/// with. The platform puts the firewall's one pool in its place while the
/// device works ([`lend`]).
pub trait PoolUser {
    /// The device's pool.
    fn pool(&mut self) -> &mut FramePool;
}

/// Runs `work` on `device` with `shared` in place of the device's own
/// pool, then puts both back: what the device took from the pool or gave
/// to it meanwhile is taken from or given to `shared`.
pub fn lend<D: PoolUser, T>(
    device: &mut D,
    shared: &mut FramePool,
    work: impl FnOnce(&mut D) -> T,
) -> T {
    core::mem::swap(device.pool(), shared);
    let result = work(device);
    core::mem::swap(device.pool(), shared);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Device {
        own: FramePool,
    }

    impl PoolUser for Device {
        fn pool(&mut self) -> &mut FramePool {
            &mut self.own
        }
    }

    #[test]
    fn a_lent_pool_serves_the_work_and_the_device_keeps_its_own() {
        let mut device = Device {
            own: FramePool::default(),
        };
        device.own.give(alloc::vec![1u8; 10]);
        let mut shared = FramePool::default();
        let kept = alloc::vec![2u8; 100];
        let kept_at = kept.as_ptr();
        shared.give(kept);
        // The work takes the shared pool's buffer and gives another back.
        let taken = lend(&mut device, &mut shared, |d| {
            let taken = d.pool().take(50);
            d.pool().give(alloc::vec![3u8; 20]);
            taken
        });
        assert_eq!((taken.as_ptr(), taken.len()), (kept_at, 50));
        assert_eq!(shared.take(20), [3u8; 20]);
        assert!(shared.is_empty());
        // The device's own pool was not touched.
        assert_eq!(device.own.take(10), [1u8; 10]);
    }

    #[test]
    fn buffers_come_back_cut_to_length_and_the_pool_is_bounded() {
        let mut pool = FramePool::default();
        // Nothing kept: a fresh zeroed buffer.
        assert_eq!(pool.take(10), alloc::vec![0u8; 10]);
        // A used buffer comes back with its old length and is cut.
        let old = alloc::vec![7u8; 100];
        let at = old.as_ptr();
        pool.give(old);
        assert_eq!(pool.len(), 1);
        let got = pool.take(60);
        assert_eq!((got.as_ptr(), got.len()), (at, 60));
        // A shorter one is grown with zeroes behind the old bytes.
        pool.give(alloc::vec![7u8; 4]);
        assert_eq!(pool.take(6), [7, 7, 7, 7, 0, 0]);
        // Buffers without capacity are not kept; the counts are bounded.
        pool.give(Vec::new());
        assert!(pool.is_empty());
        for _ in 0..MAX_BUFFERS + 5 {
            pool.give(alloc::vec![0u8; 16]);
        }
        assert_eq!(pool.len(), MAX_BUFFERS);
        let mut pool = FramePool::default();
        for _ in 0..MAX_BUFFERS {
            pool.give(alloc::vec![0u8; 64 * 1024]);
        }
        assert_eq!(pool.len(), MAX_BYTES / (64 * 1024));
        assert!(pool.bytes <= MAX_BYTES);
    }

    #[test]
    fn the_buffer_taken_is_the_one_that_needs_least_zero_filling() {
        let mut pool = FramePool::default();
        let long = alloc::vec![1u8; 9000];
        let long_at = long.as_ptr();
        pool.give(long);
        pool.give(alloc::vec![2u8; 66]);
        pool.give(alloc::vec![3u8; 1514]);
        // A small frame takes the shortest buffer that fits, not the last
        // given nor the longest: the long one keeps its length.
        let small = pool.take(60);
        assert_eq!((small.len(), small.first()), (60, Some(&2)));
        let mid = pool.take(1000);
        assert_eq!((mid.len(), mid.first()), (1000, Some(&3)));
        let big = pool.take(9000);
        assert_eq!((big.as_ptr(), big.len()), (long_at, 9000));
        assert!(big.iter().all(|&b| b == 1));
        // None long enough: the longest, grown with zeroes.
        pool.give(alloc::vec![4u8; 10]);
        pool.give(alloc::vec![5u8; 20]);
        let grown = pool.take(25);
        assert_eq!(grown, [[5u8; 20].as_slice(), &[0u8; 5]].concat());
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.bytes, 10);
    }
}
