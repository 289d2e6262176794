//! Qubes' own qrexec socket test suite (qubes-core-qrexec
//! `qrexec/tests/socket/`) against our four qrexec programs, through
//! `tests/interop/run.sh` (see `tests/interop/README.md`).
//!
//! Runs only as root and when Qubes' sources are in `../shared/reference`
//! (or `$QUBES_REFERENCE`); otherwise it says why and passes without
//! checking anything. The tests listed in `tests/interop/not-passing.txt`
//! (each with its reason) are not run; every other test of the suite must
//! pass, so a regression, or a listed test that would now pass but was
//! left listed, is caught by keeping that list honest in review. A test
//! listed in `tests/interop/timing-dependent.txt` (its outcome depends on
//! timing in the suite itself, against Qubes' build as against ours) that
//! fails is run once more, alone, and must pass then; both outcomes are
//! printed. Then
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
    let retried = if count("hang") == 0 && count("fail") > 0 {
        rerun_timing_dependent(&root, &reference, &bins, &stdout)
    } else {
        None
    };
    match retried {
        Some(names) => println!(
            "qrexec_interop: failed, then passed when run again alone (timing-dependent in \
             Qubes' suite, tests/interop/timing-dependent.txt): {names:?}"
        ),
        None => {
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
        }
    }

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

/// When every test that failed (`  fail: module.Class::test` lines of
/// run.sh's summary) is listed in `tests/interop/timing-dependent.txt`,
/// runs each once more, alone, and returns their names if each passed;
/// `None` (the failures stand) otherwise.
fn rerun_timing_dependent(
    root: &Path,
    reference: &Path,
    bins: &Path,
    summary: &str,
) -> Option<Vec<String>> {
    let listed = std::fs::read_to_string(root.join("tests/interop/timing-dependent.txt")).unwrap();
    let listed: Vec<&str> = listed
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let failed: Vec<&str> = summary
        .lines()
        .filter_map(|l| l.trim().strip_prefix("fail: "))
        .collect();
    let mut names = Vec::new();
    for test in &failed {
        // `qrexec.tests.socket.agent.TestAgentStreams::test_x` -> `TestAgentStreams::test_x`.
        let (path, name) = test.split_once("::")?;
        let class = path.rsplit('.').next()?;
        if !listed.contains(&format!("{class}::{name}").as_str()) {
            return None;
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return None;
    }
    for name in &names {
        let out = Command::new(root.join("tests/interop/run.sh"))
            .args(["ours", "-k", name])
            .env("QUBES_REFERENCE", reference)
            .env("OUR_BIN_DIR", bins)
            .env("INTEROP_LABEL", "cargo-test-again")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{name}, run again alone:\n{stdout}");
        let total = stdout.lines().find(|l| l.starts_with("TOTAL"))?;
        let words: Vec<&str> = total.split_whitespace().collect();
        if !out.status.success()
            || words.get(1..7) != Some(&["1", "pass", "0", "fail", "0", "hang"][..])
        {
            return None;
        }
    }
    Some(names)
}
