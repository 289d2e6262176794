//! Throughput of a 1 GiB file copy, our `qfile-agent | qfile-unpacker`
//! against Qubes' C pair built from `../shared/reference/`, piped directly,
//! in the same run (alternating, 3 rounds each; the median is reported).
//! Run as root: `cargo bench -p qubes-filecopy --bench copy_1gib`.
//! `FILECOPY_BENCH_MIB` changes the size (default 1024).
#![allow(clippy::unwrap_used)] // reason: bench harness; a panic is a failed run

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::qubes_c::{is_root, qubes};

fn copy(agent: &Path, unpacker: &mut Command, src: &Path) -> f64 {
    let mut receiver = unpacker
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let to_receiver = receiver.stdin.take().unwrap();
    let from_receiver = receiver.stdout.take().unwrap();
    let started = Instant::now();
    let sender = Command::new(agent)
        .current_dir(src)
        .arg("big")
        .stdin(Stdio::from(from_receiver))
        .stdout(Stdio::from(to_receiver))
        .spawn()
        .unwrap();
    let sent = sender.wait_with_output().unwrap();
    let received = receiver.wait_with_output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        sent.status.success() && received.status.success(),
        "copy failed"
    );
    seconds
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` runs this without `--bench`: no 1 GiB copy then.
        println!("copy_1gib: run with `cargo bench -p qubes-filecopy --bench copy_1gib`");
        return;
    }
    if !is_root() {
        eprintln!(
            "SKIPPED: Qubes' qfile-unpacker needs root (bind mount + chroot); run the bench as root"
        );
        return;
    }
    let mib: usize = std::env::var("FILECOPY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let q = qubes();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(src.join("big")).unwrap());
        let mut block = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..mib {
            for byte in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            file.write_all(&block).unwrap();
        }
    }
    let expected = std::fs::metadata(src.join("big")).unwrap().len();
    let ours_agent = Path::new(env!("CARGO_BIN_EXE_qfile-agent"));
    let ours_unpacker = env!("CARGO_BIN_EXE_qfile-unpacker");
    let mut results: Vec<(&str, Vec<f64>)> =
        vec![("ours (Rust)", Vec::new()), ("Qubes (C)", Vec::new())];
    for round in 0..3 {
        for (i, (label, times)) in results.iter_mut().enumerate() {
            let incoming = work.path().join(format!("in-{round}-{i}"));
            std::fs::create_dir(&incoming).unwrap();
            let seconds = if i == 0 {
                copy(
                    ours_agent,
                    Command::new(ours_unpacker).arg("0").arg(&incoming),
                    &src,
                )
            } else {
                copy(
                    &q.agent,
                    Command::new("unshare")
                        .args(["--mount", "--propagation", "private"])
                        .arg(&q.unpacker)
                        .arg("0")
                        .arg(&incoming),
                    &src,
                )
            };
            assert_eq!(
                std::fs::metadata(incoming.join("big")).unwrap().len(),
                expected
            );
            std::fs::remove_dir_all(&incoming).unwrap();
            println!(
                "round {round}: {label}: {mib} MiB in {seconds:.3} s = {:.0} MiB/s",
                mib as f64 / seconds
            );
            times.push(seconds);
        }
    }
    for (label, mut times) in results {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "median {label}: {:.0} MiB/s ({median:.3} s for {mib} MiB)",
            mib as f64 / median
        );
    }
}
