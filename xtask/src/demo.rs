//! `cargo xtask demo`: Qubes in a box in one command (root, Debian).
//!
//! Installs what the box needs (apt-get), builds the binaries, brings the
//! box up (`qubes-box up`: sys-net, the hosted firewall, two client qubes,
//! dom0's services), then shows, printing what it does and what happened:
//! a client reaching an allowed site, a denied connection dropped by the
//! firewall, a rule change (written the way qubesd writes it) taking effect
//! live, and dom0 asking the firewall for its status over qrexec. The box
//! is taken down at the end, also when a step fails; on Ctrl-C a guardian
//! process (its own process group, so the terminal's SIGINT does not reach
//! it) takes it down once this process is gone. Exit status 0 only if
//! every step behaved as expected. It must never touch anything but the
//! box it made (state dir `/run/qubes-box-demo`, namespaces `qbd-*`).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bench::{BOX_TOOLS, BoxUp, build_box, ensure_tools, require_root};

const STATE: &str = "/run/qubes-box-demo";
const PREFIX: &str = "qbd-";

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text.trim().to_string()
}

/// Retries `check` until it returns `Ok` or `limit` passes.
fn within<T>(limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(error) if start.elapsed() >= limit => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Takes the box down when this process ends, however it ends (after a
/// `qubes-box up` still running has finished or died).
fn guardian(qubes_box: &str) -> Result<Child, String> {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.3; done; \
         while pgrep -f 'qubes-box up --state-dir {STATE}' >/dev/null; do sleep 0.3; done; \
         exec {qubes_box} down --state-dir {STATE}",
        pid = std::process::id()
    );
    let mut command = Command::new("sh");
    command
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .spawn()
        .map_err(|e| format!("cannot start the cleanup guardian: {e}"))
}

fn http_get(bx: &BoxUp, client: &str, address: &str) -> Output {
    bx.in_machine(client, &bx.qubes_box(), &["http-get", address, "/"])
        .output()
        .unwrap_or_else(|error| Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
            stdout: Vec::new(),
            stderr: error.to_string().into_bytes(),
        })
}

fn demo_steps(bx: &BoxUp) -> Result<(), String> {
    step("waiting for the firewall to report its networking up (/qubes-iptables-error in QubesDB)");
    within(Duration::from_secs(30), || {
        match bx.qubesdb("qubesdb-read", &["/qubes-iptables-error"]) {
            Ok(text) if text == "\n" => Ok(()),
            Ok(text) => Err(format!("/qubes-iptables-error is {text:?}")),
            Err(error) => Err(error),
        }
    })?;
    println!("ok: the hosted firewall is up");

    step("client1 (10.137.0.20, rules: TCP 80 and DNS) fetches http://192.0.2.80/ in sys-net");
    let body = within(Duration::from_secs(20), || {
        let out = http_get(bx, "client1", "192.0.2.80:80");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(show(&out))
        }
    })
    .map_err(|e| format!("client1 could not reach the allowed site: {e}"))?;
    println!("ok: client1 got {:?}", body.trim());

    step("client2 (10.137.0.21, rules: DNS only) tries http://192.0.2.80/");
    let out = http_get(bx, "client2", "192.0.2.80:80");
    if out.status.success() {
        return Err("client2's HTTP got through; the firewall should have denied it".into());
    }
    println!("ok: denied by the firewall ({})", show(&out));

    step(
        "dom0 changes client2's rules live: qubesdb-rm /qubes-firewall/10.137.0.21/, qubesdb-write policy=drop, 0000='action=accept proto=tcp dstports=80-80', then the empty commit write",
    );
    bx.set_rules(
        "10.137.0.21",
        "drop",
        &["action=accept proto=tcp dstports=80-80"],
    )?;
    let body = within(Duration::from_secs(10), || {
        let out = http_get(bx, "client2", "192.0.2.80:80");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(show(&out))
        }
    })
    .map_err(|e| format!("client2 still denied after the rule change: {e}"))?;
    println!("ok: client2 now gets {:?}", body.trim());

    step("dom0: qrexec-client -d sys-firewall 'DEFAULT:QUBESRPC qubes.FirewallStatus dom0'");
    let status = within(Duration::from_secs(20), || {
        let out = Command::new(bx.bin.join("qrexec-client"))
            .arg(format!(
                "--socket-dir={}",
                Path::new(&bx.state).join("qubes").display()
            ))
            .args([
                "-d",
                "sys-firewall",
                "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
            ])
            .env("VCHAN_SOCKET_DIR", Path::new(&bx.state).join("vchan"))
            .output()
            .map_err(|e| format!("cannot run qrexec-client: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.starts_with("qubes-firewall status") {
            Ok(text)
        } else {
            Err(show(&out))
        }
    })
    .map_err(|e| format!("qubes.FirewallStatus over qrexec failed: {e}"))?;
    for line in status
        .lines()
        .filter(|l| !l.starts_with("drop 0 ") && !l.is_empty())
    {
        println!("    {line}");
    }
    println!("ok: the firewall answered over qrexec");
    Ok(())
}

pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(extra) = args.first() {
        return Err(format!("demo takes no arguments (got {extra:?})"));
    }
    require_root()?;
    step("installing what the box needs (apt-get, only if missing)");
    ensure_tools(BOX_TOOLS)?;
    step("building the binaries");
    let bin = build_box(false)?;
    let qubes_box = bin.join("qubes-box").to_string_lossy().into_owned();
    let mut guard = guardian(&qubes_box)?;
    step(&format!(
        "bringing the box up (qubes-box up --state-dir {STATE} --prefix {PREFIX})"
    ));
    let result = match BoxUp::up(&bin, STATE, PREFIX, &[]) {
        Ok(bx) => {
            println!(
                "ok: sys-net, sys-firewall (hosted), client1, client2 and dom0's services are up"
            );
            let result = demo_steps(&bx);
            if result.is_err() {
                println!("\nfirewall log:\n{}", bx.log("firewall"));
            }
            step("taking the box down (qubes-box down)");
            let down = bx.down();
            match &down {
                Ok(()) => println!("ok: everything the box made is gone"),
                Err(error) => println!("FAILED: {error}"),
            }
            result.and(down)
        }
        Err(error) => Err(format!("qubes-box up failed: {error}")),
    };
    let _ = guard.kill();
    let _ = guard.wait();
    match &result {
        Ok(()) => println!("\ndemo: every step behaved as expected"),
        Err(error) => println!("\ndemo FAILED: {error}"),
    }
    result
}
