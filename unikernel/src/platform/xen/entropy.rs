//! Entropy for the firewall's hash keys and NAT ports: RDRAND when the CPU
//! offers it (CPUID.1:ECX bit 30), otherwise the TSC mixed with Xen system
//! time, with a warning on the console. It must never be used for
//! cryptography, and never blocks: RDRAND is retried a bounded number of
//! times, as Intel's guidance recommends (10).
#![deny(clippy::indexing_slicing)]

use core::arch::x86_64::{__cpuid, _rdrand64_step};

/// CPUID leaf 1, ECX bit 30: RDRAND is available.
const CPUID_RDRAND: u32 = 1 << 30;
/// RDRAND may transiently fail; Intel recommends ten retries.
const RDRAND_RETRIES: usize = 10;

/// 64 random bits from RDRAND, or `None` when the CPU has none or it keeps
/// failing.
pub fn rdrand64() -> Option<u64> {
    let leaf1 = __cpuid(1);
    if leaf1.ecx & CPUID_RDRAND == 0 {
        return None;
    }
    for _ in 0..RDRAND_RETRIES {
        let mut value = 0u64;
        // SAFETY: CPUID said RDRAND is present; the intrinsic only writes `value`.
        if unsafe { rdrand_step(&mut value) } == 1 {
            return Some(value);
        }
    }
    None
}

/// One RDRAND attempt; callable only where the CPU has RDRAND
/// (CPUID.1:ECX bit 30), hence `unsafe` at the call site.
#[target_feature(enable = "rdrand")]
fn rdrand_step(value: &mut u64) -> i32 {
    _rdrand64_step(value)
}

/// A seed: RDRAND, or (with a warning) the TSC and system time mixed.
pub fn seed(system_time_ns: u64) -> u64 {
    match rdrand64() {
        Some(value) => value,
        None => {
            log::warn!("xen: no RDRAND; hash keys and NAT ports are seeded from the TSC");
            mix(super::time::rdtsc() ^ system_time_ns.rotate_left(32))
        }
    }
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_not_constant() {
        // On the host this is RDRAND (or the TSC fallback): two draws differ.
        assert_ne!(seed(1), seed(1));
    }

    #[test]
    fn mix_spreads_small_differences() {
        assert_ne!(mix(1), mix(2));
        assert!((mix(1) ^ mix(2)).count_ones() > 16);
    }
}
