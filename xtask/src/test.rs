//! `cargo xtask test`: the project's whole test suite, as CI runs it.
//!
//! 1. Installs the Debian tools the end-to-end tests drive (as root only:
//!    without root the namespace tests skip themselves with a message).
//! 2. Builds every binary, the hosted firewall included: the end-to-end
//!    tests start the real programs of several packages, which cargo does
//!    not build for a test of another package.
//! 3. As root, boots the firewall image on Xen under QEMU
//!    (`tests/xen/run.sh`); `QUBES_TEST_SKIP_XEN=1` skips it for a quick run.
//! 4. Runs `cargo test --workspace` last, so that its summary lines close
//!    the output.

use std::process::Command;

use crate::bench::{ensure_tools, require_root};
use crate::{run_command, workspace_root};

/// Commands the end-to-end tests run, and their Debian packages.
const TEST_TOOLS: &[(&str, &str)] = &[("ip", "iproute2"), ("ethtool", "ethtool")];

pub fn run(args: &[String]) -> Result<(), String> {
    let root = workspace_root();
    let as_root = require_root().is_ok();
    if as_root {
        ensure_tools(TEST_TOOLS)?;
    } else {
        println!("xtask test: not root: the namespace and Xen tests will be skipped");
    }
    run_command(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--workspace", "--bins"]),
    )?;
    run_command(Command::new("cargo").current_dir(&root).args([
        "build",
        "--package",
        "unikernel",
        "--features",
        "hosted",
        "--bin",
        "qubes-firewall-hosted",
    ]))?;
    let skip_xen = std::env::var_os("QUBES_TEST_SKIP_XEN").is_some_and(|v| v == "1");
    if as_root && !skip_xen {
        println!("xtask test: the firewall on Xen 4.17 under QEMU (tests/xen/run.sh)");
        run_command(
            Command::new("bash")
                .current_dir(&root)
                .arg(root.join("tests/xen/run.sh")),
        )?;
    } else if skip_xen {
        println!("xtask test: skipped: tests/xen/run.sh (QUBES_TEST_SKIP_XEN=1)");
    } else {
        println!("xtask test: skipped: tests/xen/run.sh (needs root)");
    }
    run_command(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--workspace"])
            .args(args),
    )
}
