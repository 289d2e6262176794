//! `cargo xtask <command>`: the project's automation, in Rust so it runs
//! wherever cargo does.
//!
//! Commands:
//! - `test [ARGS…]` — build every binary, then `cargo test --workspace`.
//! - `image [--check-reproducible]` — build the Xen PVH image of the firewall
//!   (`target/xen/qubes-firewall.elf`), check its ELF, print its size.
//! - `dist` — the release directory for Qubes (`target/dist/…`): image as
//!   `vmlinuz`, `initramfs`, install script, tarball, RPMs, .deb, SHA256SUMS.
//! - `fuzz [SECONDS] [TARGET…]` — run every cargo-fuzz target (or the named
//!   ones) for SECONDS each (default 20); installs `cargo-fuzz` if missing.
//! - `demo` — Qubes in a box in one command: install, build, bring the box
//!   up, show allowed/denied traffic, a live rule change and qrexec (root).
//! - `bench box` — iperf3 through the hosted firewall vs the Linux kernel
//!   path, and the firewall's memory with 10 clients (root).
//! - `bench qrexec` — our qrexec programs against Qubes' C build: latency
//!   and throughput, interleaved, with ratios (root).
//! - `bench xen` — iperf3 through our image vs a Linux sys-firewall on Xen
//!   under QEMU (tests/xen/bench.sh), with ratios, CPU and memory (root).
//! - `soak [SECONDS] [--pin] [--control] [--phases a,b]` — 100 client qubes, well-behaved
//!   load while others attack in turn; one table of figures; fails on a
//!   crash, a hang, a leaked denied packet or memory growth (root);
//!   `--control` adds a same-run baseline through the Linux kernel path.
//! - `miri` — the Xen platform's ring tests under Miri (installs the
//!   nightly `miri` and `rust-src` components); fails on any UB.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod bench;
mod bench_qrexec;
mod bench_xen;
mod demo;
mod dist;
mod fuzz;
mod image;
mod miri;
mod soak;
mod test;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("image") => image::run(&args[1..]),
        Some("miri") => miri::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("test") => test::run(&args[1..]),
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>
  test [CARGO TEST ARGS...]    build every binary, then run the whole test suite
  fuzz [SECONDS] [TARGET...]   run the cargo-fuzz targets for SECONDS each (default 20)
  image [--check-reproducible] build the Xen PVH image target/xen/qubes-firewall.elf
  dist                         the release directory for Qubes (target/dist/qubes-firewall-rs-VERSION)
  demo                         Qubes in a box: the whole system and what it does (root)
  bench box                    iperf3 through the hosted firewall vs the Linux kernel path (root)
  bench qrexec                 our qrexec vs Qubes' C build: call latency and 1 GiB throughput, with ratios (root)
  bench xen                    iperf3 through our image vs a Linux sys-firewall on Xen under QEMU, with ratios (root)
  soak [SECONDS] [--pin] [--control] [--phases a,b]
                               100 clients under load and attack, one table; fails on crash/hang/leak/growth (root);
                               --control: a same-run baseline download through the Linux kernel path;
                               --phases: only the named attack phases
  miri                         the Xen platform's ring tests under Miri; fails on any undefined behaviour";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Runs a command, inheriting stdio; an error names the command.
pub fn run_command(command: &mut Command) -> Result<(), String> {
    let status = command
        .status()
        .map_err(|error| format!("cannot start {command:?}: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed with {status}"))
    }
}
