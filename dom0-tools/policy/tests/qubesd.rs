//! The policy tools ask qubesd for the qube list (`internal.GetSystemInfo`)
//! when no `--system-info` file is given, as Qubes' do: checked against a
//! test double of qubesd (a UNIX-socket server in this test that records
//! each call and answers as Qubes 4.4's qubesd: `0\0JSON`, or
//! `2\0EXC\0\0MESSAGE\0`).
#![allow(clippy::unwrap_used)] // reason: test code

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Dom0, read_to_string};

/// What the fake qubesd answers, given the request.
type Answer = Arc<Mutex<Box<dyn Fn(&[u8]) -> Vec<u8> + Send>>>;

struct FakeQubesd {
    socket: PathBuf,
    answer: Answer,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeQubesd {
    fn serve(socket: PathBuf, json: &str) -> Self {
        let listener = UnixListener::bind(&socket).unwrap();
        let reply = format!("0\0{json}").into_bytes();
        let answer: Answer = Arc::new(Mutex::new(Box::new(move |_: &[u8]| reply.clone())));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (a, r) = (Arc::clone(&answer), Arc::clone(&requests));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).is_err() {
                    continue;
                }
                let reply = (a.lock().unwrap())(&request);
                r.lock().unwrap().push(request);
                let _ = stream.write_all(&reply);
            }
        });
        FakeQubesd {
            socket,
            answer,
            requests,
        }
    }

    fn answer(&self, reply: &[u8]) {
        let reply = reply.to_vec();
        self.answer_with(move |_| reply.clone());
    }

    fn answer_with(&self, f: impl Fn(&[u8]) -> Vec<u8> + Send + 'static) {
        *self.answer.lock().unwrap() = Box::new(f);
    }

    fn take_requests(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

const GET_SYSTEM_INFO: &[u8] = b"internal.GetSystemInfo+ dom0 name dom0\0";

/// qubesd's own shape: every field Qubes sends, `internal` as the feature
/// value (`null` or a string).
fn system_info(vault_power: &str) -> String {
    format!(
        r#"{{"domains": {{
        "dom0": {{"internal": null, "tags": [], "type": "AdminVM", "template_for_dispvms": false,
                  "default_dispvm": "dvm", "icon": "adminvm-black", "label": "black",
                  "guivm": null, "relayvm": null, "transport_rpc": null,
                  "power_state": "Running", "uuid": "00000000-0000-0000-0000-000000000000"}},
        "work": {{"internal": null, "tags": ["work"], "type": "AppVM", "template_for_dispvms": false,
                  "default_dispvm": "dvm", "icon": "appvm-blue", "label": "blue", "guivm": null,
                  "relayvm": null, "transport_rpc": null, "power_state": "Running",
                  "uuid": "5f2c0ad1-0000-4000-8000-000000000001"}},
        "vault": {{"internal": "", "tags": [], "type": "AppVM", "template_for_dispvms": false,
                   "default_dispvm": null, "icon": "appvm-black", "label": "black", "guivm": null,
                   "relayvm": null, "transport_rpc": null, "power_state": "{vault_power}",
                   "uuid": "5f2c0ad1-0000-4000-8000-000000000002"}},
        "sys-usb": {{"internal": "1", "tags": [], "type": "AppVM", "template_for_dispvms": false,
                   "default_dispvm": null, "icon": "appvm-red", "label": "red", "guivm": null,
                   "relayvm": null, "transport_rpc": null, "power_state": "Running",
                   "uuid": "5f2c0ad1-0000-4000-8000-000000000003"}},
        "dvm": {{"internal": null, "tags": [], "type": "AppVM", "template_for_dispvms": true,
                 "default_dispvm": "dvm", "icon": "appvm-red", "label": "red", "guivm": null,
                 "relayvm": null, "transport_rpc": null, "power_state": "Halted",
                 "uuid": "5f2c0ad1-0000-4000-8000-000000000004"}}
    }}}}"#
    )
}

fn setup() -> (Dom0, FakeQubesd) {
    let dom0 = Dom0::new();
    dom0.write(
        "policy.d/30-test.policy",
        "test.Auto * work vault allow\n\
         test.NoAuto * work vault allow autostart=no\n\
         test.Disp * work @dispvm allow\n",
    );
    let qubesd = FakeQubesd::serve(dom0.path("qubesd.sock"), &system_info("Halted"));
    (dom0, qubesd)
}

/// The environment of a tool that must use qubesd: no static file, our
/// qubesd's socket.
fn qubesd_env(cmd: &mut Command, socket: &Path) {
    cmd.env_remove("QREXEC_SYSTEM_INFO")
        .env("QUBESD_INTERNAL_SOCKET", socket)
        .env("QUBESD_SOCKET", socket);
}

fn request(service: &str, target: &str) -> Vec<u8> {
    format!("source=work\nintended_target={target}\nservice_and_arg={service}+\n\n").into_bytes()
}

fn ask(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn policy_daemon_asks_qubesd_for_every_request() {
    let (dom0, qubesd) = setup();
    let socket = dom0.path("policy.sock");
    let log = dom0.path("daemon.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qrexec-policy-daemon"));
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--policy-path")
        .arg(dom0.policy_dir())
        .arg("--legacy-policy-path")
        .arg(dom0.legacy_dir())
        .arg("--eval-socket-path")
        .arg(dom0.path("policy.EvalSimple"))
        .arg("--gui-socket-path")
        .arg(dom0.path("policy.EvalGUI"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    qubesd_env(&mut cmd, &qubesd.socket);
    let _daemon = Daemon(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Allowed with autostart: the uuid comes from qubesd's answer.
    assert_eq!(
        ask(&socket, &request("test.Auto", "vault")),
        "user=DEFAULT\nresult=allow\ntarget=vault\n\
         target_uuid=uuid:5f2c0ad1-0000-4000-8000-000000000002\n\
         autostart=True\nrequested_target=vault\n"
    );
    // autostart=no and vault halted (qubesd says so): denied.
    assert_eq!(
        ask(&socket, &request("test.NoAuto", "vault")),
        "result=deny\n"
    );
    // qubesd now says vault runs: the next request sees it (no cache).
    qubesd.answer(format!("0\0{}", system_info("Running")).as_bytes());
    assert!(
        ask(&socket, &request("test.NoAuto", "vault")).contains("result=allow\n"),
        "{}",
        read_to_string(&log)
    );
    // A disposable of work's default_dispvm, by uuid.
    let reply = ask(&socket, &request("test.Disp", "@dispvm"));
    assert!(
        reply.contains("target=@dispvm:dvm\n")
            && reply.contains("target_uuid=@dispvm:uuid:5f2c0ad1-0000-4000-8000-000000000004\n"),
        "{reply}"
    );
    let requests = qubesd.take_requests();
    assert_eq!(requests.len(), 4, "one GetSystemInfo per request");
    assert!(requests.iter().all(|r| r == GET_SYSTEM_INFO));

    // qubesd raising an exception, answering garbage or not listening:
    // deny, and the log says why.
    qubesd.answer(b"2\0QubesException\0\0qubesd is shutting down\0");
    assert_eq!(
        ask(&socket, &request("test.Auto", "vault")),
        "result=deny\n"
    );
    qubesd.answer(b"0\0{\"domains\": 5}");
    assert_eq!(
        ask(&socket, &request("test.Auto", "vault")),
        "result=deny\n"
    );
    std::fs::remove_file(&qubesd.socket).unwrap();
    assert_eq!(
        ask(&socket, &request("test.Auto", "vault")),
        "result=deny\n"
    );
    let log = read_to_string(&log);
    for expected in [
        "error getting system info: cannot get system info from qubesd: qubesd refused internal.GetSystemInfo on dom0: QubesException: qubesd is shutting down",
        "invalid system info from qubesd (internal.GetSystemInfo)",
        "cannot connect to qubesd at",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
}

fn policy_exec(dom0: &Dom0, qubesd: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qrexec-policy-exec"));
    cmd.arg("--path")
        .arg(dom0.policy_dir())
        .arg("--legacy-policy-path")
        .arg(dom0.legacy_dir())
        .args(args)
        .stdin(Stdio::null());
    qubesd_env(&mut cmd, qubesd);
    cmd.output().unwrap()
}

#[test]
fn policy_exec_asks_qubesd_unless_given_a_file() {
    let (dom0, qubesd) = setup();
    let out = policy_exec(&dom0, &qubesd.socket, &["--", "work", "vault", "test.Auto"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("result=allow\n"));
    assert_eq!(qubesd.take_requests(), vec![GET_SYSTEM_INFO.to_vec()]);

    // The static file, when given, is used instead: qubesd is not asked.
    let out = policy_exec(
        &dom0,
        &qubesd.socket,
        &[
            "--system-info",
            dom0.qubes_json().to_str().unwrap(),
            "--",
            "work",
            "vault",
            "test.Auto",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(qubesd.take_requests().is_empty());

    qubesd.answer(b"2\0QubesVMNotFoundError\0\0No such domain: 'dom0'\0");
    let out = policy_exec(&dom0, &qubesd.socket, &["--", "work", "vault", "test.Auto"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "result=deny\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error getting system info")
            && stderr.contains("QubesVMNotFoundError: No such domain: 'dom0'"),
        "{stderr}"
    );
}

#[test]
fn policy_exec_five_arguments_starts_and_connects_the_call() {
    let (dom0, qubesd) = setup();
    let client_args = dom0.path("client.args");
    let client = dom0.script(
        "qrexec-client",
        &format!("printf '%s\\n' \"$@\" > {}\nexit 7", client_args.display()),
    );
    let json = system_info("Halted");
    let new = "uuid:8c1d2e3f-2222-4000-8000-00000000000a";
    let start_fails = Arc::new(Mutex::new(false));
    let fails = Arc::clone(&start_fails);
    qubesd.answer_with(move |request| {
        let header = String::from_utf8_lossy(request);
        if header.starts_with("internal.GetSystemInfo+ ") {
            format!("0\0{json}").into_bytes()
        } else if header.starts_with("admin.vm.CreateDisposable+ ") {
            format!("0\0{new}").into_bytes()
        } else if header.starts_with("admin.vm.Start+ ") && *fails.lock().unwrap() {
            b"2\0QubesException\0\0out of memory\0".to_vec()
        } else {
            b"0\0".to_vec()
        }
    });
    let run = |target: &str, service: &str| {
        let _ = std::fs::remove_file(&client_args);
        policy_exec(
            &dom0,
            &qubesd.socket,
            &[
                "--qrexec-client",
                client.to_str().unwrap(),
                "--qrexec-socket-dir",
                "/run/test-qrexec",
                "--",
                "12",
                "work",
                target,
                service,
                "SOCKET5",
            ],
        )
    };
    let lines = |v: &[&str]| v.iter().map(|l| format!("{l}\n")).collect::<String>();
    let requests = |q: &FakeQubesd| {
        q.take_requests()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect::<Vec<_>>()
    };

    // A qube: started (by uuid), then connected; qrexec-client's status.
    let out = run("vault", "test.Auto");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(out.stdout.is_empty());
    assert_eq!(
        read_to_string(&client_args),
        lines(&[
            "--socket-dir=/run/test-qrexec",
            "-Ed",
            "uuid:5f2c0ad1-0000-4000-8000-000000000002",
            "-c",
            "SOCKET5,work,12",
            "--",
            "DEFAULT:QUBESRPC test.Auto work",
        ])
    );
    assert_eq!(
        requests(&qubesd),
        [
            "internal.GetSystemInfo+ dom0 name dom0\0",
            "admin.vm.Start+ dom0 name uuid:5f2c0ad1-0000-4000-8000-000000000002\0",
        ]
    );

    // A disposable: created from the template's uuid, started, and
    // qrexec-client told to wait and kill it.
    let out = run("@dispvm", "test.Disp");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(
        read_to_string(&client_args),
        lines(&[
            "--socket-dir=/run/test-qrexec",
            "-EWkd",
            new,
            "-c",
            "SOCKET5,work,12",
            "--",
            "DEFAULT:QUBESRPC test.Disp work",
        ])
    );
    assert_eq!(
        requests(&qubesd),
        [
            "internal.GetSystemInfo+ dom0 name dom0\0".to_string(),
            "admin.vm.CreateDisposable+ dom0 name uuid:5f2c0ad1-0000-4000-8000-000000000004\0uuid"
                .to_string(),
            format!("admin.vm.Start+ dom0 name {new}\0"),
        ]
    );

    // It does not start: killed, the call refused, qrexec-client not run.
    *start_fails.lock().unwrap() = true;
    let out = run("@dispvm", "test.Disp");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!client_args.exists());
    assert_eq!(
        requests(&qubesd)[1..],
        [
            "admin.vm.CreateDisposable+ dom0 name uuid:5f2c0ad1-0000-4000-8000-000000000004\0uuid"
                .to_string(),
            format!("admin.vm.Start+ dom0 name {new}\0"),
            format!("admin.vm.Kill+ dom0 name {new}\0"),
        ]
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("QubesException: out of memory"),
        "{out:?}"
    );

    // Denied: nothing started, nothing run, nothing printed.
    let out = run("vault", "test.Denied");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(!client_args.exists());
    // (the second look is the notification's, for the GUI qube)
    assert!(
        requests(&qubesd)
            .iter()
            .all(|r| r == "internal.GetSystemInfo+ dom0 name dom0\0")
    );
}
