//! `policy.Ask` / `policy.Notify` through `qrexec-policy-exec`: a fake
//! `qrexec-client` records what dom0 sends to the GUI qube and plays the
//! agent's answers; the dom0-local socket form is checked against a socket
//! server of our own and against Qubes' own `qrexec-policy-agent`
//! (`PolicyAgent` of `qrexec/tools/qrexec_policy_agent.py`, GTK stubbed, the
//! dialog replaced by a recorder; unpacked from `../shared/reference/`, run
//! with `python3`; skipped with a message when either is missing).
#![allow(clippy::unwrap_used)] // reason: test code

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Dom0 {
    dir: tempfile::TempDir,
}

const SYSTEM: &str = r#"{"domains": {
  "dom0": {"type": "AdminVM", "power_state": "Running", "icon": "adminvm-black"},
  "work": {"type": "AppVM", "power_state": "Running", "guivm": "sys-gui", "icon": "appvm-blue"},
  "local": {"type": "AppVM", "power_state": "Running", "guivm": "dom0", "icon": "appvm-red"},
  "vault": {"type": "AppVM", "power_state": "Running", "icon": "appvm-black"},
  "dvm": {"type": "AppVM", "power_state": "Halted", "template_for_dispvms": true, "icon": "appvm-green"},
  "sys-gui": {"type": "AppVM", "power_state": "Running", "icon": "servicevm-red"}
}}"#;

impl Dom0 {
    fn new(policy: &str) -> Dom0 {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("policy.d")).unwrap();
        fs::create_dir_all(dir.path().join("legacy")).unwrap();
        fs::create_dir_all(dir.path().join("rpc")).unwrap();
        fs::write(dir.path().join("policy.d/30-test.policy"), policy).unwrap();
        fs::write(dir.path().join("qubes.json"), SYSTEM).unwrap();
        let d = Dom0 { dir };
        d.set_answer("allow:vault", 0);
        d.script(
            "qrexec-client",
            &format!(
                "#!/bin/sh\nd='{}'\nn=$(ls \"$d\"/call.*.args 2>/dev/null | wc -l)\necho \"$@\" > \"$d/call.$n.args\"\ncat > \"$d/call.$n.json\"\ncase \"$*\" in *policy.Ask*) cat \"$d/answer\";; esac\nexit $(cat \"$d/exit\")\n",
                d.path("").display()
            ),
        );
        d.script("ask-program", "#!/bin/sh\necho allow:work\n");
        d
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn script(&self, name: &str, text: &str) {
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn set_answer(&self, answer: &str, exit: u8) {
        fs::write(self.path("answer"), answer).unwrap();
        fs::write(self.path("exit"), exit.to_string()).unwrap();
    }

    fn exec(&self, extra: &[&str], source: &str, target: &str, service: &str) -> Output {
        Command::new(env!("CARGO_BIN_EXE_qrexec-policy-exec"))
            .env_clear()
            .arg("--path")
            .arg(self.path("policy.d"))
            .arg("--legacy-policy-path")
            .arg(self.path("legacy"))
            .arg("--system-info")
            .arg(self.path("qubes.json"))
            .arg("--ask-program")
            .arg(self.path("ask-program"))
            .arg("--qrexec-client")
            .arg(self.path("qrexec-client"))
            .arg("--rpc-socket-dir")
            .arg(self.path("rpc"))
            .arg("--ask-timeout")
            .arg("20")
            .args(extra)
            .args(["--", source, target, service])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The calls the fake qrexec-client saw: (arguments, standard input).
    fn calls(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for n in 0.. {
            let Ok(args) = fs::read_to_string(self.path(&format!("call.{n}.args"))) else {
                break;
            };
            let json = fs::read_to_string(self.path(&format!("call.{n}.json"))).unwrap();
            out.push((args.trim_end().to_owned(), json));
        }
        out
    }
}

fn reply(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const ASK_JSON: &str = r#"{"source": "work", "service": "test.Svc", "argument": "+arg", "targets": ["@dispvm:dvm", "dvm", "local", "sys-gui", "vault"], "default_target": "vault", "icons": {"dom0": "adminvm-black", "dvm": "appvm-green", "local": "appvm-red", "sys-gui": "servicevm-red", "vault": "appvm-black", "work": "appvm-blue", "@dispvm:dvm": "dispvm-green"}}"#;

#[test]
fn ask_goes_to_the_gui_qube_with_qubes_payload() {
    let d = Dom0::new("test.Svc * work @anyvm ask default_target=vault\n");
    let out = d.exec(&[], "work", "vault", "test.Svc+arg");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        reply(&out).contains("result=allow\ntarget=vault\n"),
        "{}",
        reply(&out)
    );
    assert_eq!(
        d.calls(),
        [(
            "-d sys-gui DEFAULT:QUBESRPC policy.Ask dom0".to_owned(),
            ASK_JSON.to_owned()
        )]
    );
}

#[test]
fn agent_answers_are_read_exactly_and_failures_deny() {
    let d = Dom0::new("test.Svc * work @anyvm ask default_target=vault\n");
    for (answer, exit, allowed) in [
        ("allow:sys-gui", 0, true),
        ("deny", 0, false),
        ("allow:dom0", 0, false),    // not offered
        ("allow:vault\n", 0, false), // Qubes does not strip the newline
        ("deny\n", 0, false),        // invalid response
        ("", 0, false),
        ("allow:vault", 1, false), // the call failed
        ("allow:vault", 126, false),
    ] {
        d.set_answer(answer, exit);
        let out = d.exec(&[], "work", "vault", "test.Svc+arg");
        assert_eq!(
            out.status.success(),
            allowed,
            "{answer:?} exit {exit}: {out:?}"
        );
        assert_eq!(reply(&out) == "result=deny\n", !allowed, "{answer:?}");
    }
    // A missing qrexec-client is a deny too, never the program's allow.
    fs::remove_file(d.path("qrexec-client")).unwrap();
    let out = d.exec(&[], "work", "vault", "test.Svc+arg");
    assert_eq!(reply(&out), "result=deny\n");
}

#[test]
fn without_a_gui_qube_the_program_answers() {
    let d = Dom0::new("test.Svc * vault @anyvm ask\n");
    let out = d.exec(&[], "vault", "work", "test.Svc");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(reply(&out).contains("target=work\n"));
    assert!(d.calls().is_empty());
}

#[test]
fn notify_on_allow_with_notify_yes_and_on_notifying_denials() {
    let d = Dom0::new(
        "test.Quiet * work vault allow\n\
         test.Loud * work vault allow notify=yes\n\
         test.Hush * work vault deny notify=no\n\
         test.Ask * work vault ask notify=yes\n",
    );
    let notify = |resolution: &str, service: &str, target: &str| {
        (
            "-d sys-gui DEFAULT:QUBESRPC policy.Notify dom0".to_owned(),
            format!(
                r#"{{"resolution": "{resolution}", "service": "{service}", "argument": "+", "source": "work", "target": "{target}"}}"#
            ),
        )
    };
    assert!(d.exec(&[], "work", "vault", "test.Quiet").status.success());
    assert!(d.calls().is_empty(), "{:?}", d.calls());
    assert!(d.exec(&[], "work", "vault", "test.Loud").status.success());
    assert_eq!(d.calls(), [notify("allow", "test.Loud", "vault")]);
    assert!(!d.exec(&[], "work", "vault", "test.Hush").status.success());
    assert_eq!(d.calls().len(), 1, "notify=no stays quiet");
    // No rule at all: Qubes' deny notifies.
    assert!(
        !d.exec(&[], "work", "@default", "test.None")
            .status
            .success()
    );
    assert_eq!(
        d.calls().get(1),
        Some(&notify("deny", "test.None", "@default"))
    );
    // just-evaluate never notifies.
    assert!(
        !d.exec(&["--just-evaluate"], "work", "vault", "test.None")
            .status
            .success()
    );
    assert!(
        d.exec(&["--just-evaluate"], "work", "vault", "test.Loud")
            .status
            .success()
    );
    assert_eq!(d.calls().len(), 2);
    // An ask allowed by the user with notify=yes: ask, then notify.
    assert!(d.exec(&[], "work", "vault", "test.Ask").status.success());
    let calls = d.calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(calls[2].0.ends_with("policy.Ask dom0"));
    assert_eq!(calls[3], notify("allow", "test.Ask", "vault"));
    // A failing notification does not change the decision.
    d.set_answer("", 1);
    assert!(d.exec(&[], "work", "vault", "test.Loud").status.success());
}

/// A dom0-local `policy.Ask` socket service: returns what it received.
fn serve_once(path: &Path, answer: &'static [u8]) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        stream.write_all(answer).unwrap();
        got
    })
}

#[test]
fn gui_qube_dom0_uses_the_local_socket_service() {
    let d = Dom0::new("test.Svc * local @anyvm ask default_target=vault\n");
    let server = serve_once(&d.path("rpc/policy.Ask"), b"allow:vault");
    let out = d.exec(&[], "local", "vault", "test.Svc");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let got = server.join().unwrap();
    let (header, json) = got.split_at(got.iter().position(|&b| b == 0).unwrap() + 1);
    assert_eq!(header, b"policy.Ask dom0 name dom0\0");
    assert!(
        json.starts_with(
            br#"{"source": "local", "service": "test.Svc", "argument": "+", "targets": ["#
        ),
        "{}",
        String::from_utf8_lossy(json)
    );
    assert!(d.calls().is_empty());
}

/// Qubes' own `PolicyAgent` (its `handle_request`, `handle_ask`,
/// `handle_notify` and `SocketService` framing), with GTK stubbed out and
/// the dialog and the notification replaced by recorders: the dialog
/// "chooses" the default target.
const QUBES_AGENT: &str = r#"
import asyncio, json, sys
from unittest import mock
sys.path.insert(0, sys.argv[1])
for name in ["gi", "gi.repository", "gi.events"]:
    sys.modules[name] = mock.MagicMock()
from qrexec.tools import qrexec_policy_agent as qpa

def record(value):
    with open(sys.argv[3], "w") as f:
        json.dump(value, f, sort_keys=True)

async def dialog(entries_info, source, service, argument, targets_list, target=None):
    record({"entries_info": entries_info, "source": source, "service": service,
            "argument": argument, "targets": targets_list, "default": target})
    return target
qpa.confirm_rpc = dialog
qpa.PolicyAgent.notify = lambda self, *args: record({"notify": list(args)})

async def main():
    server = await qpa.PolicyAgent(sys.argv[2]).start()
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"#;

#[test]
fn qubes_policy_agent_understands_our_requests() {
    let tarball = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/qubes-core-qrexec.tar.gz");
    if !tarball.is_file() || Command::new("python3").arg("--version").output().is_err() {
        println!("skipped: needs {} and python3", tarball.display());
        return;
    }
    let d = Dom0::new(
        "test.Svc * local @anyvm ask default_target=vault\ntest.Loud * local vault allow notify=yes\n",
    );
    let reference = d.path("reference");
    fs::create_dir_all(&reference).unwrap();
    assert!(
        Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&reference)
            .arg("qubes-core-qrexec/qrexec")
            .status()
            .unwrap()
            .success()
    );
    fs::write(d.path("server.py"), QUBES_AGENT).unwrap();
    let icons = r#"{"@dispvm:dvm": {"icon": "dispvm-green"}, "dom0": {"icon": "adminvm-black"}, "dvm": {"icon": "appvm-green"}, "local": {"icon": "appvm-red"}, "sys-gui": {"icon": "servicevm-red"}, "vault": {"icon": "appvm-black"}, "work": {"icon": "appvm-blue"}}"#;
    for (service, query, expected) in [
        (
            "policy.Ask",
            "test.Svc",
            format!(
                r#"{{"argument": "+", "default": "vault", "entries_info": {icons}, "service": "test.Svc", "source": "local", "targets": ["@dispvm:dvm", "dvm", "sys-gui", "vault", "work"]}}"#
            ),
        ),
        (
            "policy.Notify",
            "test.Loud",
            r#"{"notify": ["allow", "test.Loud", "+", "local", "vault"]}"#.to_owned(),
        ),
    ] {
        let record = d.path(&format!("{service}.seen"));
        let mut server = Command::new("python3")
            .arg(d.path("server.py"))
            .arg(reference.join("qubes-core-qrexec"))
            .arg(d.path(&format!("rpc/{service}")))
            .arg(&record)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = [0u8; 6];
        let started = server.stdout.take().unwrap().read_exact(&mut ready);
        if started.is_err() {
            let _ = server.kill();
            let _ = server.wait();
            panic!("Qubes' PolicyAgent did not start (see its error above)");
        }
        let out = d.exec(&[], "local", "vault", query);
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(out.status.code(), Some(0), "{service}: {out:?}");
        assert!(reply(&out).contains("target=vault\n"), "{}", reply(&out));
        assert_eq!(fs::read_to_string(&record).unwrap(), expected, "{service}");
    }
}
