//! The qubesd calls of qrexec-daemon and qrexec-client, against a test
//! double of qubesd: a UNIX-socket server in this test that records every
//! call and answers as Qubes 4.4's qubesd does (`0\0PAYLOAD`, or
//! `2\0EXC\0\0MESSAGE\0`), starting and stopping the qubes of the test box
//! for `admin.vm.Start` / `admin.vm.Kill`.
//!
//! Covered: a VM→VM call to `@dispvm:TEMPLATE` (by name and by uuid:
//! CreateDisposable, Start, the call, Kill after it), `autostart=True` of a
//! halted target, `autostart=False` (nothing started), `qrexec-client -k`,
//! and every failure: qubesd raising on CreateDisposable or Start (the new
//! disposable killed, the call refused), a hostile CreateDisposable answer,
//! no qubesd at all.
#![allow(clippy::unwrap_used)] // reason: test code

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{Qubes, default_user};

/// One call as qubesd received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    method: String,
    dest: String,
    payload: String,
}

fn call(method: &str, dest: &str, payload: &str) -> Call {
    Call {
        method: method.into(),
        dest: dest.into(),
        payload: payload.into(),
    }
}

type Handler = dyn Fn(&Call) -> Vec<u8> + Send + Sync;

struct FakeQubesd {
    calls: Arc<Mutex<Vec<Call>>>,
    handler: Arc<Mutex<Box<Handler>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const NOT_FOUND: &[u8] = b"2\0QubesVMNotFoundError\0\0No such domain: 'x'\0";

impl FakeQubesd {
    /// Listen on `path`; every connection is one call, answered by the
    /// current handler. A request that is not framed as Qubes 4.4 frames it
    /// (`METHOD+ARG dom0 name DEST\0PAYLOAD`) is recorded as `BAD-FRAMING`
    /// and closed unanswered, as qubesd does.
    fn serve(path: PathBuf) -> Self {
        let listener = UnixListener::bind(&path).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Box<Handler>>> =
            Arc::new(Mutex::new(Box::new(|_: &Call| NOT_FOUND.to_vec())));
        let (c, h) = (Arc::clone(&calls), Arc::clone(&handler));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).is_err() {
                    continue;
                }
                let Some(recorded) = parse(&request) else {
                    lock(&c).push(call("BAD-FRAMING", "", ""));
                    continue;
                };
                lock(&c).push(recorded.clone());
                let reply = (lock(&h))(&recorded);
                let _ = stream.write_all(&reply);
            }
        });
        FakeQubesd { calls, handler }
    }

    fn answer(&self, handler: impl Fn(&Call) -> Vec<u8> + Send + Sync + 'static) {
        *lock(&self.handler) = Box::new(handler);
    }

    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *lock(&self.calls))
    }

    /// Wait until `n` calls arrived (the kill after a call comes after the
    /// caller already has its answer), then take them.
    fn wait_calls(&self, n: usize) -> Vec<Call> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while lock(&self.calls).len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.take_calls()
    }
}

impl Drop for FakeQubesd {
    /// Drop the handler (and the box it holds) so the box's qubes are
    /// stopped when the test ends; the listener thread answers nothing more.
    fn drop(&mut self) {
        *lock(&self.handler) = Box::new(|_: &Call| Vec::new());
    }
}

fn parse(request: &[u8]) -> Option<Call> {
    let nul = request.iter().position(|&b| b == 0)?;
    let header = std::str::from_utf8(&request[..nul]).ok()?;
    let mut parts = header.splitn(4, ' ');
    let (meth_arg, src, dest_type, dest) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let (method, arg) = meth_arg.split_once('+')?;
    if src != "dom0" || dest_type != "name" || !arg.is_empty() {
        return None;
    }
    Some(Call {
        method: method.into(),
        dest: dest.into(),
        payload: String::from_utf8_lossy(&request[nul + 1..]).into_owned(),
    })
}

fn run(mut cmd: Command, input: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

const ADD: &str = "#!/bin/sh\nread a b\necho $(($a+$b))\n";

fn allow(target: &str, uuid: Option<&str>, autostart: bool) -> String {
    let uuid_line = uuid
        .map(|u| format!("target_uuid={u}\\n"))
        .unwrap_or_default();
    let auto = if autostart { "True" } else { "False" };
    format!(
        "printf 'user={}\\nresult=allow\\ntarget={target}\\n{uuid_line}autostart={auto}\\nrequested_target={target}\\n'; exit 0",
        default_user()
    )
}

/// A box with vmA running and a fake qubesd that can start and stop qubes
/// of the box by name (`dispN` / `vmN` get domain id N + 10).
fn qubes_with_qubesd(test: &str, rules: &str) -> (Arc<Mutex<Qubes>>, FakeQubesd) {
    let mut q = Qubes::new(test, rules);
    q.start_vm(5, "vmA");
    let qubesd = FakeQubesd::serve(q.qubesd_socket());
    (Arc::new(Mutex::new(q)), qubesd)
}

/// Start the named qube in the box (as qubesd's `admin.vm.Start` does,
/// returning once its daemon listens).
fn start(q: &Mutex<Qubes>, name: &str, domid: u32, uuid: Option<&str>) -> Vec<u8> {
    let mut q = lock(q);
    if q.running(name) {
        return format!("2\0QubesVMNotHaltedError\0\0Domain is not powered off: '{name}'\0")
            .into_bytes();
    }
    q.add_service(name, "test.Add", ADD);
    q.start_vm_with_uuid(domid, name, uuid);
    b"0\0".to_vec()
}

fn kill(q: &Mutex<Qubes>, name: &str) -> Vec<u8> {
    if lock(q).stop_vm(name) {
        b"0\0".to_vec()
    } else {
        format!("2\0QubesVMNotStartedError\0\0Domain is powered off: '{name}'\0").into_bytes()
    }
}

fn client_vm(q: &Mutex<Qubes>, target: &str, service: &str) -> Command {
    let mut cmd = lock(q).client_vm("vmA");
    cmd.args([target, service]);
    cmd
}

#[test]
fn dispvm_by_name_is_created_started_called_and_killed() {
    let rules = format!(
        "\"vmA @dispvm:dvm test.Add\"*) {};;",
        allow("@dispvm:dvm", None, true)
    );
    let (q, qubesd) = qubes_with_qubesd("qubesd-dispvm-name", &rules);
    let q2 = Arc::clone(&q);
    qubesd.answer(move |c| match (c.method.as_str(), c.dest.as_str()) {
        ("admin.vm.CreateDisposable", "dvm") if c.payload.is_empty() => b"0\0disp7".to_vec(),
        ("admin.vm.Start", "disp7") => start(&q2, "disp7", 7, None),
        ("admin.vm.Kill", "disp7") => kill(&q2, "disp7"),
        _ => NOT_FOUND.to_vec(),
    });
    let out = run(client_vm(&q, "@dispvm:dvm", "test.Add"), b"1 2\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n", "{out:?}");
    assert!(out.status.success());
    assert_eq!(
        qubesd.wait_calls(3),
        vec![
            call("admin.vm.CreateDisposable", "dvm", ""),
            call("admin.vm.Start", "disp7", ""),
            call("admin.vm.Kill", "disp7", ""),
        ]
    );
    assert!(!lock(&q).running("disp7"), "the disposable is still there");
}

#[test]
fn dispvm_by_uuid_asks_for_the_new_uuid_and_connects_by_it() {
    let template = "uuid:0b5a3c4e-1111-4000-8000-000000000001";
    let new = "8c1d2e3f-2222-4000-8000-000000000002";
    let rules = format!(
        "\"vmA @dispvm test.Add\"*) {};;",
        allow(
            "@dispvm:dvm",
            Some("@dispvm:uuid:0b5a3c4e-1111-4000-8000-000000000001"),
            true
        )
    );
    let (q, qubesd) = qubes_with_qubesd("qubesd-dispvm-uuid", &rules);
    let q2 = Arc::clone(&q);
    let new_target = format!("uuid:{new}");
    let reply = format!("0\0{new_target}");
    qubesd.answer(move |c| {
        if c.method == "admin.vm.CreateDisposable" && c.dest == template && c.payload == "uuid" {
            reply.clone().into_bytes()
        } else if c.method == "admin.vm.Start" && c.dest == new_target {
            start(&q2, "disp8", 8, Some(new))
        } else if c.method == "admin.vm.Kill" && c.dest == new_target {
            kill(&q2, "disp8")
        } else {
            NOT_FOUND.to_vec()
        }
    });
    let out = run(client_vm(&q, "@dispvm", "test.Add"), b"20 22\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{out:?}");
    let new_target = format!("uuid:{new}");
    assert_eq!(
        qubesd.wait_calls(3),
        vec![
            call("admin.vm.CreateDisposable", template, "uuid"),
            call("admin.vm.Start", &new_target, ""),
            call("admin.vm.Kill", &new_target, ""),
        ]
    );
    assert!(!lock(&q).running("disp8"));
}

#[test]
fn dispvm_failures_refuse_the_call_and_leave_nothing_behind() {
    let rules = [
        format!(
            "\"vmA @dispvm:dvm test.Add\"*) {};;",
            allow("@dispvm:dvm", None, true)
        ),
        format!(
            "\"vmA @dispvm:dvm test.NoAuto\"*) {};;",
            allow("@dispvm:dvm", None, false)
        ),
    ]
    .join("\n");
    let (q, qubesd) = qubes_with_qubesd("qubesd-dispvm-fail", &rules);
    let refused = |service: &str| {
        let out = run(client_vm(&q, "@dispvm:dvm", service), b"1 2\n");
        assert_eq!(out.status.code(), Some(126), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
    };
    let daemon_log = || lock(&q).log("daemon", "vmA");

    // qubesd refuses to create it: nothing else is tried.
    qubesd.answer(|_| b"2\0QubesException\0\0dvm is not a disposable template\0".to_vec());
    refused("test.Add");
    assert_eq!(
        qubesd.take_calls(),
        vec![call("admin.vm.CreateDisposable", "dvm", "")]
    );
    let log = daemon_log();
    assert!(
        log.contains("qubesd could not create disposable VM")
            && log.contains("QubesException: dvm is not a disposable template"),
        "{log}"
    );

    // Created, but it does not start: it is killed again.
    qubesd.answer(|c| match c.method.as_str() {
        "admin.vm.CreateDisposable" => b"0\0disp9".to_vec(),
        "admin.vm.Start" => b"2\0QubesException\0\0not enough memory\0".to_vec(),
        "admin.vm.Kill" => b"0\0".to_vec(),
        _ => NOT_FOUND.to_vec(),
    });
    refused("test.Add");
    assert_eq!(
        qubesd.wait_calls(3),
        vec![
            call("admin.vm.CreateDisposable", "dvm", ""),
            call("admin.vm.Start", "disp9", ""),
            call("admin.vm.Kill", "disp9", ""),
        ]
    );
    assert!(daemon_log().contains("qubesd could not start VM disp9"));

    // Started (qubesd says so) but no daemon appears: killed too.
    qubesd.answer(|c| match c.method.as_str() {
        "admin.vm.CreateDisposable" => b"0\0disp10".to_vec(),
        _ => b"0\0".to_vec(),
    });
    refused("test.Add");
    assert_eq!(
        qubesd.wait_calls(3),
        vec![
            call("admin.vm.CreateDisposable", "dvm", ""),
            call("admin.vm.Start", "disp10", ""),
            call("admin.vm.Kill", "disp10", ""),
        ]
    );

    // A hostile or broken answer is not a name: never used as a path.
    for answer in [
        &b"0\0../../../tmp/x"[..],
        b"0\0disp1\0x",
        b"0\0",
        b"1\0disp1",
        b"",
    ] {
        qubesd.answer(move |_| answer.to_vec());
        refused("test.Add");
        assert_eq!(
            qubesd.take_calls(),
            vec![call("admin.vm.CreateDisposable", "dvm", "")],
            "{}",
            answer.escape_ascii()
        );
    }
    assert!(daemon_log().contains("invalid qubesd response to admin.vm.CreateDisposable"));

    // autostart=False for a disposable makes no sense: no qubesd call.
    refused("test.NoAuto");
    assert!(daemon_log().contains("with autostart=False makes no sense"));

    // No qubesd at all.
    std::fs::remove_file(lock(&q).qubesd_socket()).unwrap();
    refused("test.Add");
    assert!(qubesd.take_calls().is_empty());
    assert!(daemon_log().contains("cannot connect to qubesd at"));
}

#[test]
fn autostart_starts_a_halted_target_and_only_then() {
    let rules = [
        format!("\"vmA vmB test.Add\"*) {};;", allow("vmB", None, true)),
        format!("\"vmA vmC test.Add\"*) {};;", allow("vmC", None, false)),
        format!("\"vmA vmD test.Add\"*) {};;", allow("vmD", None, true)),
    ]
    .join("\n");
    let (q, qubesd) = qubes_with_qubesd("qubesd-autostart", &rules);
    let q2 = Arc::clone(&q);
    qubesd.answer(move |c| match (c.method.as_str(), c.dest.as_str()) {
        ("admin.vm.Start", "vmB") => start(&q2, "vmB", 6, None),
        _ => NOT_FOUND.to_vec(),
    });
    // vmB is halted: started, then called.
    let out = run(client_vm(&q, "vmB", "test.Add"), b"1 2\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n", "{out:?}");
    assert_eq!(qubesd.take_calls(), vec![call("admin.vm.Start", "vmB", "")]);
    // Now it runs: no qubesd call at all.
    let out = run(client_vm(&q, "vmB", "test.Add"), b"2 2\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "4\n", "{out:?}");
    assert!(qubesd.take_calls().is_empty());
    // autostart=False: a halted target is not started, the call refused.
    let out = run(client_vm(&q, "vmC", "test.Add"), b"1 2\n");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert!(qubesd.take_calls().is_empty());
    // qubesd cannot start it: refused, with qubesd's reason in the log.
    let out = run(client_vm(&q, "vmD", "test.Add"), b"1 2\n");
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert_eq!(qubesd.take_calls(), vec![call("admin.vm.Start", "vmD", "")]);
    let log = lock(&q).log("daemon", "vmA");
    assert!(
        log.contains("qubesd could not start VM vmD")
            && log.contains("QubesVMNotFoundError: No such domain"),
        "{log}"
    );
}

#[test]
fn qrexec_client_k_kills_the_target_at_exit() {
    let (q, qubesd) = qubes_with_qubesd("qubesd-client-k", "");
    let q2 = Arc::clone(&q);
    qubesd.answer(move |c| match (c.method.as_str(), c.dest.as_str()) {
        ("admin.vm.Kill", "vmA") => kill(&q2, "vmA"),
        _ => NOT_FOUND.to_vec(),
    });
    let mut cmd = lock(&q).client();
    cmd.args(["-k", "-d", "vmA", "DEFAULT:echo hello; exit 3"]);
    let out = run(cmd, b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "{out:?}");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(qubesd.take_calls(), vec![call("admin.vm.Kill", "vmA", "")]);
    assert!(!lock(&q).running("vmA"));

    // Without -k nothing is killed; a failing kill is logged, the exit code
    // stays the call's.
    lock(&q).start_vm(5, "vmA");
    let mut cmd = lock(&q).client();
    cmd.args(["-d", "vmA", "DEFAULT:true"]);
    assert!(run(cmd, b"").status.success());
    assert!(qubesd.take_calls().is_empty());
    qubesd.answer(|_| b"2\0QubesVMNotStartedError\0\0Domain is powered off: 'vmA'\0".to_vec());
    let mut cmd = lock(&q).client();
    cmd.args(["-k", "-d", "vmA", "DEFAULT:true"]);
    let out = run(cmd, b"");
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot kill domain vmA")
            && stderr.contains("QubesVMNotStartedError: Domain is powered off"),
        "{stderr}"
    );
    assert_eq!(qubesd.take_calls(), vec![call("admin.vm.Kill", "vmA", "")]);

    // -c with a disposable target is refused without any qubesd call (no
    // autostart in qrexec-client), and never for a keyword with -k.
    let mut cmd = lock(&q).client();
    cmd.args([
        "-k",
        "-d",
        "@dispvm:dvm",
        "-c",
        "SOCKET9,vmA,5",
        "user:QUBESRPC test.Add vmA",
    ]);
    let out = run(cmd, b"");
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert!(qubesd.take_calls().is_empty());
}
