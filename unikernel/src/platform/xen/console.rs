//! Guest output: the PV console ring (what `xl console` and Qubes' guest log
//! show, read by xenconsoled) and I/O port 0xe9 for early boot (Xen prints it
//! as `(dN) …` with `guest_loglvl=all`), with a `log` logger on top.
//!
//! `HYPERVISOR_console_io` is refused (-EPERM) to a domU on a release Xen,
//! so it is not used. The ring is `struct xencons_interface`
//! (`io/console.h`): we produce into `out` and only read the peer's
//! `out_cons`, once per pass, checking that it never runs ahead of our
//! producer or more than a ring behind it. Console output must never block
//! the firewall for long: when xenconsoled stops consuming, output is
//! dropped (and counted) after a bounded wait.
#![deny(clippy::indexing_slicing)]

use core::fmt::{self, Write};

use super::abi;
use super::shared::{SharedMemory, barrier};

/// Why console output was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleError {
    /// The peer's `out_cons` is not within one ring of our producer.
    BadConsumerIndex,
    /// The ring stayed full for the whole bounded wait.
    Full,
}

/// The producer side of a PV console `out` ring.
#[derive(Debug)]
pub struct ConsoleRing<M> {
    mem: M,
    /// Our producer index (the shared copy is written, never trusted).
    prod: u32,
    /// Bytes dropped because the consumer stalled or misbehaved.
    pub dropped: u64,
}

impl<M: SharedMemory> ConsoleRing<M> {
    /// Attaches to a console page; our producer starts where the page says
    /// (the toolstack zeroes it; a boot loader may have written before us).
    pub fn new(mem: M) -> Self {
        let prod = mem.load_u32(abi::CONSOLE_OUT_PROD);
        ConsoleRing {
            mem,
            prod,
            dropped: 0,
        }
    }

    /// Free space in `out`, or an error when the consumer index is bogus.
    pub fn space(&self) -> Result<u32, ConsoleError> {
        let cons = self.mem.load_u32(abi::CONSOLE_OUT_CONS);
        barrier();
        let used = self.prod.wrapping_sub(cons);
        if used > abi::CONSOLE_OUT_SIZE {
            return Err(ConsoleError::BadConsumerIndex);
        }
        Ok(abi::CONSOLE_OUT_SIZE - used)
    }

    /// Copies as much of `bytes` as fits now; returns how many were taken.
    /// The caller notifies the console event channel when this is non-zero.
    pub fn write_some(&mut self, bytes: &[u8]) -> Result<usize, ConsoleError> {
        let space = self.space()? as usize;
        let n = space.min(bytes.len());
        for (i, &byte) in bytes.iter().take(n).enumerate() {
            let index = self.prod.wrapping_add(i as u32) & (abi::CONSOLE_OUT_SIZE - 1);
            self.mem.store_u8(abi::CONSOLE_OUT + index as usize, byte);
        }
        barrier(); // data before index
        self.prod = self.prod.wrapping_add(n as u32);
        self.mem.store_u32(abi::CONSOLE_OUT_PROD, self.prod);
        Ok(n)
    }

    /// Writes all of `bytes`, calling `kick` after each chunk (notify the
    /// peer) and `wait` while the ring is full, at most `max_waits` times.
    pub fn write_all(
        &mut self,
        mut bytes: &[u8],
        mut kick: impl FnMut(),
        mut wait: impl FnMut(),
        max_waits: u32,
    ) -> Result<(), ConsoleError> {
        let mut waits = 0;
        while !bytes.is_empty() {
            let result = self.write_some(bytes);
            let n = match result {
                Ok(n) => n,
                Err(error) => {
                    self.dropped += bytes.len() as u64;
                    return Err(error);
                }
            };
            if n > 0 {
                kick();
                bytes = bytes.get(n..).unwrap_or_default();
                continue;
            }
            if waits >= max_waits {
                self.dropped += bytes.len() as u64;
                return Err(ConsoleError::Full);
            }
            waits += 1;
            wait();
        }
        Ok(())
    }
}

/// Writes bytes to I/O port 0xe9 (Xen's debug port for HVM/PVH guests).
#[derive(Debug, Clone, Copy)]
pub struct DebugPort;

impl Write for DebugPort {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            // SAFETY: port 0xe9 is Xen's guest debug port; writing it has no
            // effect on memory and is harmless when nothing listens.
            unsafe {
                core::arch::asm!("out dx, al", in("dx") 0xe9u16, in("al") byte, options(nomem, nostack, preserves_flags))
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::xen::shared::VecMemory;

    fn drain(mem: &VecMemory) -> alloc::vec::Vec<u8> {
        let cons = mem.load_u32(abi::CONSOLE_OUT_CONS);
        let prod = mem.load_u32(abi::CONSOLE_OUT_PROD);
        let mut out = alloc::vec::Vec::new();
        let mut i = cons;
        while i != prod {
            out.push(mem.load_u8(abi::CONSOLE_OUT + (i & 2047) as usize));
            i = i.wrapping_add(1);
        }
        mem.store_u32(abi::CONSOLE_OUT_CONS, prod);
        out
    }

    #[test]
    fn writes_wrap_around_the_ring_and_kick_the_peer() {
        let mem = VecMemory::new(4096);
        mem.store_u32(abi::CONSOLE_OUT_CONS, u32::MAX - 10);
        mem.store_u32(abi::CONSOLE_OUT_PROD, u32::MAX - 10);
        let mut ring = ConsoleRing::new(mem.clone());
        let mut kicks = 0;
        ring.write_all(b"hello, world", || kicks += 1, || {}, 0)
            .unwrap();
        assert_eq!(kicks, 1);
        assert_eq!(drain(&mem), b"hello, world");
    }

    #[test]
    fn a_full_ring_waits_then_drops_and_counts() {
        let mem = VecMemory::new(4096);
        let mut ring = ConsoleRing::new(mem.clone());
        let big = [b'x'; 3000];
        let mut waits = 0;
        let result = ring.write_all(&big, || {}, || waits += 1, 3);
        assert_eq!(result, Err(ConsoleError::Full));
        assert_eq!(waits, 3);
        assert_eq!(ring.dropped, 3000 - 2048);
        assert_eq!(drain(&mem).len(), 2048);
    }

    #[test]
    fn a_consumer_index_beyond_the_producer_is_refused() {
        let mem = VecMemory::new(4096);
        let mut ring = ConsoleRing::new(mem.clone());
        mem.store_u32(abi::CONSOLE_OUT_CONS, 5); // ahead of prod 0
        assert_eq!(ring.write_some(b"x"), Err(ConsoleError::BadConsumerIndex));
        mem.store_u32(abi::CONSOLE_OUT_CONS, 0u32.wrapping_sub(4000)); // too far behind
        assert_eq!(ring.write_some(b"x"), Err(ConsoleError::BadConsumerIndex));
    }
}
