//! The Xen PVH image of the firewall (`cargo xtask image`): the entry that
//! `platform::xen::runtime` calls once the machine is set up.
//!
//! It runs the firewall's program flow (`unikernel::firewall::run`) on the
//! Xen platform with the kernel command line minus the platform's own
//! options, then shuts the domain down the way the flow asks (poweroff,
//! reboot, or crash so that dom0 sees the failure). The boot code,
//! allocator and panic handler live in `platform::xen::runtime`; this file
//! must never contain `unsafe` code.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use unikernel::platform::Platform;
use unikernel::platform::xen::XenPlatform;

unikernel::xen_main!(main);

fn main(mut platform: XenPlatform) -> ! {
    let cmdline = platform.boot_info().program_cmdline();
    let how = unikernel::firewall::run(&mut platform, &cmdline);
    platform.exit(how)
}
