//! The monotonic clock: Xen system time from vCPU 0's `vcpu_time_info` in
//! `shared_info`, extrapolated with the TSC (`public/xen.h`, "pvclock").
//!
//! The record is written by Xen under a version counter (odd while it is
//! being updated): we copy it whole, retry while the version is odd or
//! changed, and only then compute. The scaling is portable and tested here.
//!
//! Where Xen finds the TSC unreliable (under QEMU's TCG, on some older
//! machines, after a migration) it traps every RDTSC of a PVH guest: each
//! reading is a world switch, as dear as a hypercall. [`Clock`] saves most
//! of them: the first reading after a sleep takes the time Xen last put us
//! on a CPU (`state_entry_time` of our `vcpu_runstate_info`, which Xen
//! writes at each context switch), when that is newer than every earlier
//! reading; the time since is what the wake-up's own path took. Once
//! trusted, the same time serves any reading after Xen switched us out and
//! back in without a sleep (preempted, often inside an event-channel send
//! that woke a peer): such a reading lags by what we ran since, at most
//! the rest of one step of the main loop. It checks
//! that against the TSC on its first [`WAKE_TRIALS`] wake-ups and keeps
//! to the TSC for good if the two ever differ by more than
//! [`MAX_WAKE_LAG_NS`] either way (a different time base would differ by
//! far more; the CPUs' clocks may differ by a little either way).
#![deny(clippy::indexing_slicing)]

use core::cell::Cell;

use super::abi;
use super::shared::{SharedMemory, barrier};
pub use crate::platform::ClockCounts;

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

/// Wake-ups whose runstate time is checked against the TSC before
/// [`Clock`] trusts it.
pub const WAKE_TRIALS: u8 = 16;
/// The most a wake-up time may differ from the TSC's reading (ns) in a
/// trial: the path from Xen's context switch back to our reading, a few
/// hypercalls' worth even under emulation, or the physical CPUs' clocks'
/// skew the other way.
pub const MAX_WAKE_LAG_NS: u64 = 10_000_000;

/// Whether [`Clock`] uses wake-up times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeTimes {
    /// Checked against the TSC for this many more wake-ups.
    Trial(u8),
    /// Used.
    Trusted,
    /// Never used again: the TSC's reading minus one wake-up time was
    /// this (ns), out of [`MAX_WAKE_LAG_NS`] either way.
    Refused(i64),
}

/// The monotonic clock of the main loop (see the module's doc).
#[derive(Debug)]
pub struct Clock {
    last: Cell<u64>,
    slept: Cell<bool>,
    wake_times: Cell<WakeTimes>,
    from_tsc: Cell<u64>,
    at_wake: Cell<u64>,
    at_switch: Cell<u64>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            last: Cell::new(0),
            slept: Cell::new(false),
            wake_times: Cell::new(WakeTimes::Trial(WAKE_TRIALS)),
            from_tsc: Cell::new(0),
            at_wake: Cell::new(0),
            at_switch: Cell::new(0),
        }
    }
}

impl Clock {
    /// The loop is about to sleep (`SCHEDOP_poll`).
    pub fn sleeping(&self) {
        self.slept.set(true);
    }

    /// System time now (ns), never less than an earlier reading. `woke`:
    /// `state_entry_time` of our runstate while we run (`None` where it
    /// is not registered), asked after a sleep during the trial, and at
    /// every reading once trusted; `tsc_time`: the pvclock reading from the TSC.
    /// Returns the reading and, when this reading refused wake-up times,
    /// the new state (for the caller to log once).
    pub fn read(
        &self,
        woke: impl FnOnce() -> Option<u64>,
        tsc_time: impl FnOnce() -> u64,
    ) -> (u64, Option<WakeTimes>) {
        let last = self.last.get();
        let state = self.wake_times.get();
        // After a sleep the runstate's time is tried (or, in a trial,
        // checked); between sleeps it is used only once trusted, and only
        // when Xen switched us out and back in since the last reading.
        let slept = self.slept.replace(false);
        let candidate = match state {
            WakeTimes::Trial(_) if slept => woke().filter(|&at| at > last),
            WakeTimes::Trusted => woke().filter(|&at| at > last),
            _ => None,
        };
        let bump = |count: &Cell<u64>| count.set(count.get() + 1);
        let mut changed = None;
        let ns = match (candidate, state) {
            (Some(at), WakeTimes::Trusted) => {
                bump(if slept {
                    &self.at_wake
                } else {
                    &self.at_switch
                });
                at
            }
            (Some(at), WakeTimes::Trial(left)) => {
                bump(&self.from_tsc);
                let now = tsc_time();
                let lag = now.abs_diff(at);
                let next = if lag > MAX_WAKE_LAG_NS {
                    let lag = i64::try_from(lag).unwrap_or(i64::MAX);
                    WakeTimes::Refused(if now >= at { lag } else { -lag })
                } else if left <= 1 {
                    WakeTimes::Trusted
                } else {
                    WakeTimes::Trial(left - 1)
                };
                if matches!(next, WakeTimes::Refused(_)) {
                    changed = Some(next);
                }
                self.wake_times.set(next);
                now
            }
            _ => {
                bump(&self.from_tsc);
                tsc_time()
            }
        };
        let ns = ns.max(last);
        self.last.set(ns);
        (ns, changed)
    }

    /// Whether wake-up times are used.
    pub fn wake_times(&self) -> WakeTimes {
        self.wake_times.get()
    }

    /// Where the readings came from so far, and whether wake-up times
    /// are refused.
    pub fn counts(&self) -> ClockCounts {
        ClockCounts {
            from_tsc: self.from_tsc.get(),
            at_wake: self.at_wake.get(),
            at_switch: self.at_switch.get(),
            wake_times_refused: match self.wake_times.get() {
                WakeTimes::Refused(lag) => Some(lag),
                _ => None,
            },
        }
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

    fn never(why: &str) -> impl FnOnce() -> u64 + '_ {
        move || panic!("the TSC was read: {why}")
    }

    /// A clock whose trial is over (the first trials agreed).
    fn trusted() -> Clock {
        let clock = Clock::default();
        for i in 1..=u64::from(WAKE_TRIALS) {
            clock.sleeping();
            let (ns, changed) = clock.read(|| Some(i * 1_000_000), || i * 1_000_000 + 50_000);
            assert_eq!((ns, changed), (i * 1_000_000 + 50_000, None));
        }
        assert_eq!(clock.wake_times(), WakeTimes::Trusted);
        assert_eq!(
            clock.counts(),
            ClockCounts {
                from_tsc: u64::from(WAKE_TRIALS),
                at_wake: 0,
                at_switch: 0,
                wake_times_refused: None
            }
        );
        clock
    }

    #[test]
    fn after_a_sleep_a_trusted_clock_takes_the_wake_up_time_without_the_tsc() {
        let clock = trusted();
        clock.sleeping();
        assert_eq!(
            clock.read(|| Some(40_000_000), never("after a sleep")),
            (40_000_000, None)
        );
        assert_eq!(clock.counts().at_wake, 1);
        // The next reading without a sleep in between reads the TSC.
        assert_eq!(
            clock.read(|| Some(40_000_000), || 40_300_000),
            (40_300_000, None)
        );
        assert_eq!(clock.counts().from_tsc, u64::from(WAKE_TRIALS) + 1);
    }

    #[test]
    fn between_sleeps_a_trusted_clock_takes_the_time_of_a_switch_back_in() {
        let clock = trusted();
        // No sleep, but Xen switched us out and back in since the last
        // reading (16 ms + 50 µs): its time, without the TSC.
        assert_eq!(
            clock.read(|| Some(20_000_000), never("after a switch")),
            (20_000_000, None)
        );
        // No switch since: the TSC.
        assert_eq!(
            clock.read(|| Some(20_000_000), || 20_700_000),
            (20_700_000, None)
        );
        // A switch whose time is older than the last reading: the TSC.
        assert_eq!(
            clock.read(|| Some(20_500_000), || 20_900_000),
            (20_900_000, None)
        );
        let counts = clock.counts();
        assert_eq!(
            (counts.from_tsc, counts.at_wake, counts.at_switch),
            (u64::from(WAKE_TRIALS) + 2, 0, 1)
        );
    }

    #[test]
    fn in_a_trial_or_refused_a_reading_between_sleeps_reads_the_tsc() {
        let clock = Clock::default();
        clock.sleeping();
        clock.read(|| Some(1_000), || 2_000);
        assert_eq!(
            clock.read(|| panic!("runstate read in a trial"), || 3_000),
            (3_000, None)
        );
        let clock = Clock::default();
        clock.sleeping();
        let far = MAX_WAKE_LAG_NS + 5_000;
        clock.read(|| Some(1_000), || far);
        assert!(matches!(clock.wake_times(), WakeTimes::Refused(_)));
        assert_eq!(
            clock.read(|| panic!("runstate read when refused"), || far + 1),
            (far + 1, None)
        );
        assert_eq!(clock.counts().at_switch, 0);
    }

    #[test]
    fn a_wake_up_time_no_newer_than_the_last_reading_is_not_used() {
        // The poll returned at once (an event was pending): Xen did not
        // switch us out, the runstate still holds an older time.
        let clock = trusted();
        clock.sleeping();
        assert_eq!(
            clock.read(|| Some(16_000_000), || 17_000_000),
            (17_000_000, None)
        );
        clock.sleeping();
        assert_eq!(
            clock.read(|| Some(16_500_000), || 17_100_000),
            (17_100_000, None)
        );
        // Not registered: the TSC.
        clock.sleeping();
        assert_eq!(clock.read(|| None, || 17_200_000), (17_200_000, None));
        assert_eq!(clock.counts().at_wake, 0);
    }

    #[test]
    fn a_wake_up_time_that_disagrees_with_the_tsc_in_a_trial_is_refused_for_good() {
        let far = MAX_WAKE_LAG_NS as i64 + 1;
        for (woke, tsc, verdict) in [
            (1_000_000, 1_000_000 + far as u64, WakeTimes::Refused(far)),
            (far as u64 + 2_000, 2_000, WakeTimes::Refused(-far)),
        ] {
            let clock = Clock::default();
            clock.sleeping();
            clock.read(|| Some(500), || 1_000);
            clock.sleeping();
            assert_eq!(clock.read(|| Some(woke), || tsc), (tsc, Some(verdict)));
            assert_eq!(clock.wake_times(), verdict);
            for i in 1..=40u64 {
                clock.sleeping();
                let at = tsc + i * 1_000_000;
                assert_eq!(clock.read(|| Some(at), || at + 1), (at + 1, None));
            }
            assert_eq!(
                clock.counts(),
                ClockCounts {
                    from_tsc: 42,
                    at_wake: 0,
                    at_switch: 0,
                    wake_times_refused: Some(match verdict {
                        WakeTimes::Refused(lag) => lag,
                        _ => unreachable!(),
                    })
                }
            );
        }
    }

    #[test]
    fn a_wake_up_time_a_little_ahead_of_the_tsc_passes_its_trial() {
        // Another CPU's clock a little ahead: within the bound either way.
        let clock = Clock::default();
        for i in 1..=u64::from(WAKE_TRIALS) {
            clock.sleeping();
            let at = i * 20_000_000;
            let tsc = if i % 2 == 0 {
                at - 300_000
            } else {
                at + 300_000
            };
            assert_eq!(clock.read(|| Some(at), || tsc).1, None);
        }
        assert_eq!(clock.wake_times(), WakeTimes::Trusted);
        assert_eq!(clock.counts().wake_times_refused, None);
    }

    #[test]
    fn readings_never_go_back() {
        let clock = trusted();
        assert_eq!(clock.read(|| None, || 90_000_000).0, 90_000_000);
        // A TSC reading behind the last one (another CPU's clock) is held.
        assert_eq!(clock.read(|| None, || 89_000_000).0, 90_000_000);
        clock.sleeping();
        assert_eq!(
            clock.read(|| Some(95_000_000), never("a newer wake-up")).0,
            95_000_000
        );
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
