//! `xenvchan-loopback [MiB]`: a real-Xen self-test of [`xenvchan::XenVchan`]
//! for dom0 (tests/xen): a server and a client vchan between dom0 and
//! itself, a reader and a writer thread on each end, MiB (default 16) of a
//! known pattern each way, checked byte for byte; prints the throughput.
//! It must never report success unless every byte arrived in order.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use xenvchan::XenVchan;

fn pattern(i: usize, salt: u8) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add((i >> 11) as u8) ^ salt
}

/// Writes `len` pattern bytes in uneven chunks.
fn send(chan: &XenVchan, len: usize, salt: u8) -> std::io::Result<()> {
    let mut buf = vec![0u8; 7000];
    let mut off = 0;
    while off < len {
        let n = buf.len().min(len - off);
        for (k, b) in buf.iter_mut().take(n).enumerate() {
            *b = pattern(off + k, salt);
        }
        let mut done = 0;
        while done < n {
            done += chan.write(&buf[done..n])?;
        }
        off += n;
    }
    Ok(())
}

/// Reads `len` bytes and checks the pattern.
fn receive(chan: &XenVchan, len: usize, salt: u8) -> Result<(), String> {
    let mut buf = vec![0u8; 5000];
    let mut off = 0;
    while off < len {
        let n = chan
            .read(&mut buf)
            .map_err(|e| format!("read at {off}: {e}"))?;
        if n == 0 {
            return Err(format!("end of stream at byte {off} of {len}"));
        }
        for (k, b) in buf.iter().take(n).enumerate() {
            if *b != pattern(off + k, salt) {
                return Err(format!("byte {} differs", off + k));
            }
        }
        off += n;
    }
    Ok(())
}

fn run(mib: usize) -> Result<f64, String> {
    let len = mib << 20;
    let path = xenvchan::xs_path(0, 0, 4000);
    let server = XenVchan::server(0, &path, 65536, 65536).map_err(|e| e.to_string())?;
    let client = XenVchan::client(0, &path).map_err(|e| e.to_string())?;
    if !server
        .wait_connected(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?
    {
        return Err("the client did not connect".into());
    }
    let started = Instant::now();
    let mut threads = Vec::new();
    for (from, to, salt) in [
        (server.clone(), client.clone(), 0x5a),
        (client, server, 0xa5),
    ] {
        threads.push(thread::spawn(move || {
            send(&from, len, salt).map_err(|e| format!("write: {e}"))
        }));
        threads.push(thread::spawn(move || receive(&to, len, salt)));
    }
    for t in threads {
        t.join().map_err(|_| "a thread panicked".to_string())??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((2 * len) as f64 / secs / 1e6)
}

fn main() -> ExitCode {
    let mib = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<usize>().ok())
        .unwrap_or(16);
    match run(mib) {
        Ok(rate) => {
            println!("XENVCHAN-LOOPBACK ok {mib} MiB each way, both at once: {rate:.1} MB/s");
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("XENVCHAN-LOOPBACK FAIL {error}");
            ExitCode::FAILURE
        }
    }
}
