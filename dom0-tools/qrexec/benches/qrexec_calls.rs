//! Benchmark of the real qrexec programs (release build): median call
//! latency dom0→VM (`qrexec-client -d vmA DEFAULT:true`) and VM→VM
//! (`qrexec-client-vm vmB test.Noop`, policy answered by a policy-daemon
//! socket stand-in), and bulk throughput in MB/s in both directions of a
//! call and VM→VM. Run: `cargo bench -p qrexec` (env `QREXEC_BENCH_MIB`
//! sets the bulk size, default 512; `QREXEC_BENCH_CALLS` the number of
//! latency samples, default 100).
#![allow(clippy::unwrap_used)] // reason: benchmark code

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Qubes, default_user};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Answer every policy request with allow, as qrexec-policy-daemon would.
fn serve_policy(listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut target = String::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\n" {
                if let Some(t) = line.strip_prefix("intended_target=") {
                    target = t.trim_end().to_string();
                }
                line.clear();
            }
            let mut stream = stream;
            let _ = write!(
                stream,
                "user={}\nresult=allow\ntarget={target}\nautostart=False\nrequested_target={target}\n",
                default_user()
            );
        });
    }
}

fn median(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p90 = samples[samples.len() * 9 / 10];
    (p50, p90)
}

fn latency(label: &str, calls: u64, mut make: impl FnMut() -> Command) {
    let mut samples = Vec::new();
    for _ in 0..calls {
        let mut cmd = make();
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let start = Instant::now();
        let status = cmd.status().unwrap();
        samples.push(start.elapsed());
        assert!(status.success(), "{label} failed: {status:?}");
    }
    let (p50, p90) = median(samples);
    println!(
        "{label:<32} median {:>8.2?}  p90 {:>8.2?}  ({calls} calls)",
        p50, p90
    );
}

fn throughput_in(label: &str, mib: u64, mut cmd: Command) {
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for _ in 0..mib {
        stdin.write_all(&chunk).unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    report(label, mib, start.elapsed());
}

fn throughput_out(label: &str, mib: u64, mut cmd: Command) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(total, mib << 20);
    report(label, mib, start.elapsed());
}

fn report(label: &str, mib: u64, elapsed: Duration) {
    let mb = (mib << 20) as f64 / 1e6;
    println!(
        "{label:<32} {:>8.0} MB/s  ({mib} MiB in {elapsed:.2?})",
        mb / elapsed.as_secs_f64()
    );
}

fn main() {
    // `cargo test --benches` runs this binary too; only measure on `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("qrexec_calls: run with `cargo bench -p qrexec` to measure");
        return;
    }
    let calls = env_number("QREXEC_BENCH_CALLS", 100);
    let mib = env_number("QREXEC_BENCH_MIB", 512);
    let mut q = Qubes::new("bench", "");
    let listener = UnixListener::bind(q.dir.join("policy.sock")).unwrap();
    std::thread::spawn(move || serve_policy(listener));
    q.start_vm(5, "vmA");
    q.start_vm(6, "vmB");
    q.add_service("vmB", "test.Noop", "#!/bin/sh\nexit 0\n");
    q.add_service("vmB", "test.Sink", "#!/bin/sh\nexec cat >/dev/null\n");
    q.add_service(
        "vmB",
        "test.Source",
        &format!("#!/bin/sh\nexec head -c {} /dev/zero\n", mib << 20),
    );

    // What one process start costs on this machine right now: a call
    // starts two (client and service) or three (VM->VM adds nothing in
    // dom0, but client-vm and the service) processes.
    latency("baseline: sh -c true (no qrexec)", calls, || {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", "true"]);
        c
    });
    latency("latency dom0->VM", calls, || {
        let mut c = q.client();
        c.args(["-d", "vmA", "DEFAULT:true"]);
        c
    });
    latency("latency VM->VM", calls, || {
        let mut c = q.client_vm("vmA");
        c.args(["vmB", "test.Noop"]);
        c
    });
    let mut c = q.client();
    c.args(["-d", "vmA", "DEFAULT:cat >/dev/null"]);
    throughput_in("throughput dom0->VM (stdin)", mib, c);
    let mut c = q.client();
    c.args([
        "-d",
        "vmA",
        &format!("DEFAULT:head -c {} /dev/zero", mib << 20),
    ]);
    throughput_out("throughput VM->dom0 (stdout)", mib, c);
    let mut c = q.client_vm("vmA");
    c.args(["vmB", "test.Sink"]);
    throughput_in("throughput VM->VM (stdin)", mib, c);
    let mut c = q.client_vm("vmA");
    c.args(["vmB", "test.Source"]);
    throughput_out("throughput VM->VM (stdout)", mib, c);
}
