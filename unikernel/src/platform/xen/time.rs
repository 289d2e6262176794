//! The monotonic clock: Xen system time from vCPU 0's `vcpu_time_info` in
//! `shared_info`, extrapolated with the TSC (`public/xen.h`, "pvclock").
//!
//! The record is written by Xen under a version counter (odd while it is
//! being updated): we copy it whole, retry while the version is odd or
//! changed, and only then compute. The scaling is portable and tested here.
#![deny(clippy::indexing_slicing)]

use super::abi;
use super::shared::{SharedMemory, barrier};

/// Scales a TSC delta to nanoseconds: `(delta << shift) * mul >> 32`
/// (a negative shift shifts right).
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let shifted = if shift >= 0 {
        delta
            .checked_shl(u32::from(shift.unsigned_abs()))
            .unwrap_or(0)
    } else {
        delta
            .checked_shr(u32::from(shift.unsigned_abs()))
            .unwrap_or(0)
    };
    ((u128::from(shifted) * u128::from(mul)) >> 32) as u64
}

/// One consistent copy of a `vcpu_time_info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeInfo {
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub mul: u32,
    pub shift: i8,
}

impl TimeInfo {
    /// Copies the record at `base` of `mem` (retrying while Xen updates it).
    pub fn read<M: SharedMemory>(mem: &M, base: usize) -> Self {
        loop {
            let version = mem.load_u32(base + abi::TIME_VERSION);
            barrier();
            let mut tsc = [0u8; 8];
            let mut sys = [0u8; 8];
            mem.read_bytes(base + abi::TIME_TSC_TIMESTAMP, &mut tsc);
            mem.read_bytes(base + abi::TIME_SYSTEM_TIME, &mut sys);
            let info = TimeInfo {
                tsc_timestamp: u64::from_le_bytes(tsc),
                system_time: u64::from_le_bytes(sys),
                mul: mem.load_u32(base + abi::TIME_TSC_TO_SYSTEM_MUL),
                shift: mem.load_u8(base + abi::TIME_TSC_SHIFT) as i8,
            };
            barrier();
            if version & 1 == 0 && mem.load_u32(base + abi::TIME_VERSION) == version {
                return info;
            }
            core::hint::spin_loop();
        }
    }

    /// System time (ns) at TSC value `tsc`.
    pub fn system_time_at(&self, tsc: u64) -> u64 {
        self.system_time.wrapping_add(scale_delta(
            tsc.wrapping_sub(self.tsc_timestamp),
            self.mul,
            self.shift,
        ))
    }
}

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects and is allowed to PVH guests.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::xen::shared::VecMemory;

    #[test]
    fn scaling_matches_the_pvclock_formula() {
        // 2 GHz TSC: mul = 2^32 / 2 with shift 0 gives 0.5 ns per tick.
        assert_eq!(scale_delta(2_000, 1 << 31, 0), 1_000);
        assert_eq!(scale_delta(2_000, 1 << 31, 1), 2_000);
        assert_eq!(scale_delta(2_000, 1 << 31, -1), 500);
        assert_eq!(
            scale_delta(u64::MAX, u32::MAX, 0),
            ((u128::from(u64::MAX) * u128::from(u32::MAX)) >> 32) as u64
        );
        assert_eq!(scale_delta(5, 1, 100), 0);
    }

    #[test]
    fn reads_a_consistent_record() {
        let mem = VecMemory::new(4096);
        let base = abi::SHARED_INFO_VCPU0_TIME;
        mem.store_u32(base + abi::TIME_VERSION, 2);
        mem.write_bytes(base + abi::TIME_TSC_TIMESTAMP, &1000u64.to_le_bytes());
        mem.write_bytes(base + abi::TIME_SYSTEM_TIME, &5_000_000u64.to_le_bytes());
        mem.store_u32(base + abi::TIME_TSC_TO_SYSTEM_MUL, 1 << 31);
        mem.store_u8(base + abi::TIME_TSC_SHIFT, 0xff); // -1
        let info = TimeInfo::read(&mem, base);
        assert_eq!(info.shift, -1);
        assert_eq!(info.system_time_at(1000 + 4000), 5_000_000 + 1000);
    }
}
