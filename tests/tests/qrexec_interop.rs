//! Qubes' own qrexec socket test suite (qubes-core-qrexec
//! `qrexec/tests/socket/`) against our four qrexec programs, through
//! `tests/interop/run.sh` (see `tests/interop/README.md`).
//!
//! Runs only as root and when Qubes' sources are in `../shared/reference`
//! (or `$QUBES_REFERENCE`); otherwise it says why and passes without
//! checking anything. The tests listed in `tests/interop/not-passing.txt`
//! (each with its reason) are not run; every other test of the suite must
//! pass, so a regression, or a listed test that would now pass but was
//! left listed, is caught by keeping that list honest in review. Then
//! `tests/interop/pairs.sh` runs the mixed-pair matrix (ours and Qubes'
//! programs in every combination, dom0 -> qube, qube -> qube and qube ->
//! dom0, through a policy program and through a real policy file with our
//! `qrexec-policy-daemon`), which must be all green; and
//! `tests/interop/forkserver.sh` (the agent, ours or Qubes', handing calls
//! to a user's fork server, ours or Qubes', and running them itself once
//! the fork server is gone), all four pairings green.
#![allow(clippy::unwrap_used)] // reason: test code

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn qubes_socket_suite_passes_against_our_programs() {
    let root = repo_root();
    let reference = std::env::var_os("QUBES_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/reference"));
    if !is_root() {
        eprintln!("qrexec_interop: skipped: needs root (packages, a test user, a mount namespace)");
        return;
    }
    if !reference.join("qubes-core-qrexec.tar.gz").is_file() {
        eprintln!(
            "qrexec_interop: skipped: {} has no qubes-core-qrexec.tar.gz",
            reference.display()
        );
        return;
    }
    let bins = system_tests::binary_dir();
    for name in [
        "qrexec-agent",
        "qrexec-client-vm",
        "qrexec-daemon",
        "qrexec-client",
        "qrexec-policy-daemon",
    ] {
        // Fails with a clear message when the programs were not built.
        system_tests::binary(name);
    }
    let out = Command::new(root.join("tests/interop/run.sh"))
        .arg("ours")
        .env("QUBES_REFERENCE", &reference)
        .env("OUR_BIN_DIR", &bins)
        .env("INTEROP_LABEL", "cargo-test")
        .env(
            "INTEROP_SKIP_FILE",
            root.join("tests/interop/not-passing.txt"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    let total = stdout
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .unwrap_or_else(|| panic!("run.sh printed no TOTAL line:\n{stdout}\n{stderr}"));
    let count = |kind: &str| -> u32 {
        let words: Vec<&str> = total.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[1] == kind)
            .map(|w| w[0].parse().unwrap())
            .unwrap()
    };
    assert!(count("pass") > 0, "no test passed: {total}");
    assert_eq!(
        (count("fail"), count("hang")),
        (0, 0),
        "tests of Qubes' socket suite not passing against our programs \
         (see target/interop/pytest-cargo-test.log):\n{stdout}"
    );
    assert!(
        out.status.success(),
        "run.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    // The mixed pairs: ours and Qubes' programs in every combination
    // (Qubes' build is the one run.sh made).
    let out = Command::new(root.join("tests/interop/pairs.sh"))
        .env("OUR_BIN_DIR", &bins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(": ok")).count(),
        60,
        "mixed pairs not all working:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pairs.sh failed ({})", out.status);

    // The fork server, ours and Qubes', with either agent.
    system_tests::binary("qrexec-fork-server");
    let out = Command::new(root.join("tests/interop/forkserver.sh"))
        .env("OUR_BIN_DIR", &bins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(": ok")).count(),
        4,
        "fork server pairings not all working:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "forkserver.sh failed ({})",
        out.status
    );
}
