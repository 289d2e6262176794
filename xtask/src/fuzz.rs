//! `cargo xtask fuzz`: bounded runs of every cargo-fuzz target.
//!
//! Fuzz crates live in `<crate>/fuzz/` (their own workspaces, built with the
//! nightly toolchain that exists on this machine for cargo-fuzz only).
//!
//! For each target, first every input of its checked-in regression corpus
//! (`<crate>/fuzz/regressions/<target>/`: the minimised corpus of a
//! 10-minute run, the inputs with new coverage that later longer runs
//! found (merged in with libFuzzer's `-merge=1`), and any crash that was
//! once found) is replayed
//! (`-runs=0`: run the inputs, nothing else), so an input that once
//! exercised a path keeps exercising it; then the target fuzzes for a fixed
//! number of seconds, seeded from that corpus. New inputs go to the
//! ignored `corpus/<target>/` only (libFuzzer writes to the first corpus
//! directory it is given), so a run never changes the checkout.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_command, workspace_root};

/// Crates that carry a `fuzz/` directory.
const FUZZ_CRATES: &[&str] = &[
    "protocol",
    "unikernel",
    "dom0-tools/policy",
    "vm-tools/filecopy",
];

pub fn run(args: &[String]) -> Result<(), String> {
    let (seconds, wanted) = match args.first().map(|arg| arg.parse::<u64>()) {
        Some(Ok(seconds)) => (seconds, &args[1..]),
        Some(Err(_)) | None => (20, args),
    };
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    let mut ran = 0;
    for krate in FUZZ_CRATES {
        let dir = root.join(krate).join("fuzz");
        for target in targets(&dir)? {
            if !wanted.is_empty() && !wanted.contains(&target) {
                continue;
            }
            println!("xtask fuzz: {krate}/{target} for {seconds} s");
            let corpus = dir.join("corpus").join(&target);
            std::fs::create_dir_all(&corpus)
                .map_err(|error| format!("cannot create {}: {error}", corpus.display()))?;
            let regressions = dir.join("regressions").join(&target);
            let mut seeds = Vec::new();
            if regressions.is_dir() {
                println!(
                    "xtask fuzz: {krate}/{target}: replaying {}",
                    regressions.display()
                );
                run_command(
                    Command::new("cargo")
                        .current_dir(&dir)
                        .args(["+nightly", "fuzz", "run", &target])
                        .arg(&regressions)
                        .args(["--", "-runs=0"]),
                )?;
                seeds.push(regressions);
            }
            run_command(
                Command::new("cargo")
                    .current_dir(&dir)
                    .args(["+nightly", "fuzz", "run", &target])
                    .arg(&corpus)
                    .args(&seeds)
                    .arg("--")
                    .arg(format!("-max_total_time={seconds}"))
                    .arg("-print_final_stats=1"),
            )?;
            ran += 1;
        }
    }
    if ran == 0 {
        return Err("no fuzz target matched".to_string());
    }
    println!("xtask fuzz: {ran} targets ran clean for {seconds} s each");
    Ok(())
}

/// The fuzz targets of one fuzz crate: the file stems in `fuzz_targets/`.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>, String> {
    let dir: PathBuf = fuzz_dir.join("fuzz_targets");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    let entries = std::fs::read_dir(&dir)
        .map_err(|error| format!("cannot read {}: {error}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|error| format!("cannot read {}: {error}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Installs cargo-fuzz from the registry when this machine does not have it.
fn ensure_cargo_fuzz() -> Result<(), String> {
    let present = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        return Ok(());
    }
    println!("xtask fuzz: installing cargo-fuzz");
    run_command(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
}
