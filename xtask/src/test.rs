//! `cargo xtask test`: the project's whole test suite, as CI runs it.
//!
//! 1. Installs the Debian tools the end-to-end tests drive (as root only:
//!    without root the namespace tests skip themselves with a message).
//! 2. Builds every binary, the hosted firewall included: the end-to-end
//!    tests start the real programs of several packages, which cargo does
//!    not build for a test of another package.
//! 3. As root, boots the firewall image on Xen under QEMU
//!    (`tests/xen/run.sh`); `QUBES_TEST_SKIP_XEN=1` skips it for a quick run.
//! 4. Runs `cargo test --workspace --features unikernel/hosted` last and closes with one line that adds
//!    up every test binary's result: `tests: N passed, N failed, N skipped`
//!    (skipped: cargo's ignored).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::bench::{ensure_tools, require_root};
use crate::{run_command, workspace_root};

/// Commands the end-to-end tests run, and their Debian packages.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    // the differential test builds Qubes' Linux sys-firewall tables beside ours
    ("nft", "nftables"),
];

/// Debian packages the qrexec crate's `pam` feature builds against (the
/// `pam-client` binding generates its bindings with libclang), checked by
/// their files rather than by a command.
const PAM_BUILD_PACKAGES: &[(&str, &str)] = &[
    ("/usr/include/security/pam_appl.h", "libpam0g-dev"),
    ("/usr/lib/llvm-14/lib/libclang.so", "libclang-dev"),
];

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
    if as_root {
        // The agent's PAM session (root only: it creates a throwaway user
        // and a PAM service file). The `pam` feature is not in the
        // workspace build, so it runs on its own, before the workspace
        // tests whose summary closes the output.
        ensure_files(PAM_BUILD_PACKAGES)?;
        run_command(Command::new("cargo").current_dir(&root).args([
            "test",
            "--package",
            "qrexec",
            "--features",
            "pam",
            "--test",
            "pam_session",
        ]))?;
    }
    run_tests(
        Command::new("cargo")
            .current_dir(&root)
            // `hosted`: the hosted platform's own tests (TAP, epoll, socket
            // vchans) are compiled only with it.
            .args(["test", "--workspace", "--features", "unikernel/hosted"])
            .args(args)
            // The differential tests against Qubes' own code must run, not
            // skip, when Python or ../shared/reference is missing.
            .env("POLICY_DIFF_REQUIRED", "1"),
    )
}

/// Installs the Debian package of every missing file (one `apt-get update`).
fn ensure_files(files: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> = files
        .iter()
        .filter(|(file, _)| !std::path::Path::new(file).exists())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run_command(Command::new("apt-get").args(["update", "-q"]))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing),
    )
}

/// Runs cargo test, passing its output through, and closes with one line
/// that adds up every test binary's `test result:` line.
fn run_tests(command: &mut Command) -> Result<(), String> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {command:?}: {error}"))?;
    let mut totals = Totals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(|error| format!("reading cargo test's output: {error}"))?;
            println!("{line}");
            totals.add(&line);
        }
    }
    let status = child
        .wait()
        .map_err(|error| format!("waiting for {command:?}: {error}"))?;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed with {status}"))
    }
}

/// Sums of cargo's `test result: ok. N passed; N failed; N ignored; …` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn adds_up_cargo_result_lines() {
        let mut totals = Totals::default();
        totals.add("test result: ok. 75 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.09s");
        totals.add("test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s");
        totals.add("test something ... ok");
        totals.add("running 5 tests");
        assert_eq!(
            totals,
            Totals {
                passed: 78,
                failed: 1,
                ignored: 2
            }
        );
    }
}
