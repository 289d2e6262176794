//! `cargo xtask bench qrexec`: our qrexec programs against Qubes' C build in
//! one interleaved run (root).
//!
//! Builds ours with `--release` (`qrexec` and `qrexec-policy` binaries),
//! makes sure Qubes' C qrexec (`BACKEND_VMM=socket`, vchan-socket) is built
//! in `target/interop/` by `tests/interop/run.sh` (which, when the build is
//! missing, also runs Qubes' socket suite against Qubes' own build once),
//! then runs `tests/interop/bench.sh`: call latency (median, p90) dom0→VM
//! and VM→VM through our policy daemon, throughput of 1 GiB dom0→VM, VM→dom0
//! and VM→VM, ours and Qubes' alternately, the floor of a call (an exec of
//! `/bin/true` and the service script run directly) and CPU time per call of
//! each implementation, and a table with the ratio ours/Qubes' (goals:
//! latency ≤ 0.5×, throughput ≥ 2×). Environment `BENCH_CALLS`,
//! `BENCH_ROUNDS`, `BENCH_BYTES`, `BENCH_CPU_CALLS` are passed on to the
//! script.
//! A measurement only: nothing here is a timed assertion.

use std::process::Command;

use crate::bench::require_root;
use crate::{run_command, workspace_root};

pub fn bench_qrexec() -> Result<(), String> {
    require_root().map_err(|_| {
        "bench qrexec must run as root (a private mount namespace for /run/qubes, runs the programs as the interop test user)".to_string()
    })?;
    let root = workspace_root();
    run_command(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "qrexec",
        "-p",
        "qrexec-policy",
        "--bins",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let interop = root.join("tests/interop");
    let qubes_daemon = target.join("interop/src/qubes-core-qrexec/daemon/qrexec-daemon");
    if !qubes_daemon.is_file() {
        // run.sh builds Qubes' programs, then runs the suite against them;
        // the suite's result does not matter here, the build does.
        println!("building Qubes' qrexec with tests/interop/run.sh qubes");
        let _ = Command::new(interop.join("run.sh"))
            .current_dir(&root)
            .arg("qubes")
            .status();
        if !qubes_daemon.is_file() {
            return Err(format!(
                "Qubes' build not found at {} after tests/interop/run.sh qubes; see target/interop/build.log",
                qubes_daemon.display()
            ));
        }
    }
    run_command(
        Command::new(interop.join("bench.sh"))
            .current_dir(&root)
            .env("OUR_BIN_DIR", target.join("release"))
            .env("INTEROP_DIR", target.join("interop")),
    )
}
