//! `cargo xtask test`: the project's whole test suite, as CI runs it.
//!
//! Builds every binary first (the end-to-end tests in `tests/` start the
//! real programs of several packages, which cargo does not build for a
//! test of another package), then runs `cargo test --workspace`, whose
//! summary lines are the suite's result.

use std::process::Command;

use crate::{run_command, workspace_root};

pub fn run(args: &[String]) -> Result<(), String> {
    let root = workspace_root();
    run_command(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--workspace", "--bins"]),
    )?;
    // The hosted firewall needs its feature; the box tests start it.
    run_command(Command::new("cargo").current_dir(&root).args([
        "build",
        "--package",
        "unikernel",
        "--features",
        "hosted",
        "--bin",
        "qubes-firewall-hosted",
    ]))?;
    run_command(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--workspace"])
            .args(args),
    )
}
