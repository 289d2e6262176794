//! `cargo xtask miri`: the Xen platform's ring code under Miri.
//!
//! The ring protocols (vchan, the xenstore ring, the grant table, the
//! netfront/netback rings, the console ring) are tested on the host against
//! in-memory doubles of the peer. Those doubles are heap blocks reached
//! through the same `RawMemory` volatile/atomic accessors the image uses
//! (`unikernel/src/platform/xen/shared.rs`), so under Miri every ring test
//! also checks that unsafe code for undefined behaviour: out-of-bounds or
//! misaligned accesses, use after free, aliasing violations, leaks.
//!
//! Installs what it needs (the nightly toolchain's `miri` and `rust-src`
//! components; the toolchain itself if missing), then runs
//! `cargo +nightly miri test -p unikernel --lib` on those tests. Any UB, and
//! any failing test, fails the command.

use std::process::Command;
use std::time::Instant;

use crate::{run_command, workspace_root};

/// Test-name filters (substrings) of the ring code's host tests.
const FILTERS: &[&str] = &[
    "platform::xen::vchan::",
    "platform::xen::xenstore_ring::",
    "platform::xen::grant::",
    "platform::xen::shared::",
    "platform::xen::netfront::",
    "platform::xen::netback::",
    "platform::xen::console::",
    "platform::xen::frames::",
    "platform::xen::heap::",
];

/// Miri's checks beyond the defaults: pointers must not be made up from
/// integers in the tested code.
const MIRIFLAGS: &str = "-Zmiri-strict-provenance";

pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(extra) = args.first() {
        return Err(format!(
            "`cargo xtask miri` takes no arguments (got `{extra}`); it runs the ring tests {FILTERS:?}"
        ));
    }
    let started = Instant::now();
    ensure_miri()?;
    run_command(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["+nightly", "miri", "setup"]),
    )?;
    let mut command = Command::new("cargo");
    command
        .current_dir(workspace_root())
        .env("MIRIFLAGS", MIRIFLAGS)
        .args(["+nightly", "miri", "test", "-p", "unikernel", "--lib", "--"])
        .args(FILTERS);
    println!("xtask miri: {command:?}");
    run_command(&mut command)?;
    println!(
        "xtask miri: the ring tests ran clean under Miri in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The nightly toolchain with `miri` and `rust-src` (a fresh CI machine
/// has neither). An installed nightly is kept as it is (not updated), so a
/// run does not change the toolchain under the fuzzers.
fn ensure_miri() -> Result<(), String> {
    let have_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|output| output.status.success())
        .map_err(|error| {
            format!("cannot run rustup ({error}): install rustup from https://rustup.rs")
        })?;
    if have_nightly {
        run_command(Command::new("rustup").args([
            "component",
            "add",
            "miri",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
    } else {
        run_command(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "miri,rust-src",
        ]))
    }
}
