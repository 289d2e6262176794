//! Runs the `qrexec-policy-daemon` binary on a temporary socket and speaks
//! the policy socket protocol to it, as qrexec-daemon does.
#![allow(clippy::unwrap_used)] // reason: test code

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Dom0, read_to_string};

struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(dom0: &Dom0, extra: &[&str]) -> Daemon {
        let socket = dom0.path("policy.sock");
        let log = dom0.path("daemon.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qrexec-policy-daemon"))
            .arg("--socket-path")
            .arg(&socket)
            .arg("--policy-path")
            .arg(dom0.policy_dir())
            .arg("--legacy-policy-path")
            .arg(dom0.legacy_dir())
            .arg("--system-info")
            .arg(dom0.qubes_json())
            .arg("--reload-interval-ms")
            .arg("50")
            .arg("--eval-socket-path")
            .arg(dom0.path("policy.EvalSimple"))
            .arg("--gui-socket-path")
            .arg(dom0.path("policy.EvalGUI"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, socket, log }
    }

    fn ask(&self, request: &[u8]) -> String {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    fn log(&self) -> String {
        read_to_string(&self.log)
    }

    /// Repeat `request` until the reply is `expected` (reloads are
    /// asynchronous) or 10 s pass.
    fn wait_for(&self, request: &[u8], expected: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = self.ask(request);
            if reply == expected || Instant::now() > deadline {
                return reply;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(source: &str, target: &str, service: &str) -> Vec<u8> {
    format!("source={source}\nintended_target={target}\nservice_and_arg={service}\n\n").into_bytes()
}

const ALLOW_WORK_VAULT: &str =
    "user=DEFAULT\nresult=allow\ntarget=vault\nautostart=True\nrequested_target=vault\n";

fn basic_policy(dom0: &Dom0) {
    dom0.write(
        "policy.d/30-user.policy",
        "qubes.Gpg * work vault allow\n\
         qubes.Gpg * @anyvm @anyvm deny\n\
         qubes.Filecopy * work @default ask default_target=personal\n\
         qubes.Filecopy * work @anyvm ask\n",
    );
}

#[test]
fn good_request_gets_exact_reply() {
    let dom0 = Dom0::new();
    basic_policy(&dom0);
    let d = Daemon::start(&dom0, &[]);
    assert_eq!(
        d.ask(&request("work", "vault", "qubes.Gpg")),
        ALLOW_WORK_VAULT
    );
    assert_eq!(
        d.ask(&request("personal", "vault", "qubes.Gpg+x")),
        "result=deny\n"
    );
    assert_eq!(
        d.ask(
            b"source=work\nintended_target=vault\nservice_and_arg=qubes.Gpg\njust_evaluate=yes\n\n"
        ),
        "result=allow\n"
    );
    // the request may also end at end of stream
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"source=work\nintended_target=vault\nservice_and_arg=qubes.Gpg")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, ALLOW_WORK_VAULT);
    assert!(
        d.wait_log("qrexec: qubes.Gpg: work -> vault: allowed to vault")
            .contains("allowed to vault")
    );
}

#[test]
fn unknown_duplicate_or_malformed_keys_close_without_answer() {
    let dom0 = Dom0::new();
    basic_policy(&dom0);
    let d = Daemon::start(&dom0, &[]);
    for bad in [
        &b"source=work\nintended_target=vault\nservice_and_arg=qubes.Gpg\nbogus=1\n\n"[..],
        b"source=work\nsource=work\nintended_target=vault\nservice_and_arg=qubes.Gpg\n\n",
        b"source=work\nintended_target=vault\n\n",
        b"source=work\nintended_target=vault\nservice_and_arg=qubes.Gpg\njust_evaluate=maybe\n\n",
        b"garbage\n\n",
        b"source=w\xc3\xb6rk\nintended_target=vault\nservice_and_arg=qubes.Gpg\n\n",
    ] {
        assert_eq!(d.ask(bad), "", "{}", String::from_utf8_lossy(bad));
    }
    let log = d.wait_log("duplicate argument source");
    assert!(
        log.contains("error parsing policy request: unknown argument bogus"),
        "{log}"
    );
    assert!(
        log.contains("error parsing policy request: duplicate argument source"),
        "{log}"
    );
    // still serving
    assert_eq!(
        d.ask(&request("work", "vault", "qubes.Gpg")),
        ALLOW_WORK_VAULT
    );
}

#[test]
fn reloads_after_a_file_change_and_keeps_last_good_policy_on_error() {
    let dom0 = Dom0::new();
    basic_policy(&dom0);
    let d = Daemon::start(&dom0, &[]);
    let req = request("personal", "vault", "qubes.Gpg");
    assert_eq!(d.ask(&req), "result=deny\n");

    // a new, earlier file allows personal -> vault
    dom0.write(
        "policy.d/10-new.policy",
        "qubes.Gpg * personal vault allow user=gpg\n",
    );
    let allowed = "user=gpg\nresult=allow\ntarget=vault\nautostart=True\nrequested_target=vault\n";
    assert_eq!(d.wait_for(&req, allowed), allowed);

    // breaking that file must not lose it (nor turn anything into an allow)
    dom0.write(
        "policy.d/10-new.policy",
        "qubes.Gpg * personal vault allow user=gpg\nqubes.Gpg * personal vault permit\n",
    );
    let log = d.wait_log("invalid action: permit");
    let expected = format!(
        "{}:2: invalid action: permit",
        dom0.policy_dir().join("10-new.policy").display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(log.contains("keeping the previous policy"), "{log}");
    assert_eq!(d.ask(&req), allowed);
    assert_eq!(
        d.ask(&request("work", "vault", "qubes.Gpg")),
        ALLOW_WORK_VAULT
    );

    // a bad file name is an error too, and also keeps the last good policy
    dom0.write("policy.d/Bad.policy", "qubes.Gpg * @anyvm @anyvm allow\n");
    std::fs::remove_file(dom0.policy_dir().join("10-new.policy")).unwrap();
    let log = d.wait_log("invalid filename");
    assert!(log.contains("invalid filename"), "{log}");
    assert_eq!(d.ask(&req), allowed);

    // fixing it takes effect
    std::fs::remove_file(dom0.policy_dir().join("Bad.policy")).unwrap();
    assert_eq!(d.wait_for(&req, "result=deny\n"), "result=deny\n");
}

#[test]
fn broken_policy_at_start_denies_everything() {
    let dom0 = Dom0::new();
    dom0.write(
        "policy.d/30-user.policy",
        "qubes.Gpg * work vault allow\nbroken\n",
    );
    let d = Daemon::start(&dom0, &[]);
    assert_eq!(
        d.ask(&request("work", "vault", "qubes.Gpg")),
        "result=deny\n"
    );
    let log = d.wait_log("wrong number of fields");
    assert!(
        log.contains("30-user.policy:2: wrong number of fields"),
        "{log}"
    );
    dom0.write("policy.d/30-user.policy", "qubes.Gpg * work vault allow\n");
    assert_eq!(
        d.wait_for(&request("work", "vault", "qubes.Gpg"), ALLOW_WORK_VAULT),
        ALLOW_WORK_VAULT
    );
}

#[test]
fn ask_without_program_is_a_logged_deny() {
    let dom0 = Dom0::new();
    basic_policy(&dom0);
    let d = Daemon::start(&dom0, &[]);
    assert_eq!(
        d.ask(&request("work", "personal", "qubes.Filecopy")),
        "result=deny\n"
    );
    let log = d.wait_log("no confirmation program is configured");
    assert!(
        log.contains("no confirmation program is configured"),
        "{log}"
    );
    // assume_yes_for_ask needs no program
    assert_eq!(
        d.ask(b"source=work\nintended_target=personal\nservice_and_arg=qubes.Filecopy\nassume_yes_for_ask=yes\n\n"),
        "user=DEFAULT\nresult=allow\ntarget=personal\nautostart=True\nrequested_target=personal\n"
    );
}

fn ask_program(dom0: &Dom0, answer: &str) -> PathBuf {
    // records its arguments, then answers
    let args_file = dom0.path("ask-args");
    dom0.script(
        "ask.sh",
        &format!(
            "printf '%s|' \"$@\" > '{}'\necho '{answer}'",
            args_file.display()
        ),
    )
}

fn started_with_program(dom0: &Dom0, program: &Path) -> Daemon {
    Daemon::start(dom0, &["--ask-program", program.to_str().unwrap()])
}

#[test]
fn ask_goes_to_the_confirmation_program() {
    let dom0 = Dom0::new();
    basic_policy(&dom0);
    let program = ask_program(&dom0, "allow:vault");
    let d = started_with_program(&dom0, &program);
    assert_eq!(
        d.ask(&request("work", "", "qubes.Filecopy")),
        "user=DEFAULT\nresult=allow\ntarget=vault\nautostart=True\nrequested_target=@default\n"
    );
    let args = read_to_string(&dom0.path("ask-args"));
    // SOURCE SERVICE ARGUMENT DEFAULT TARGETS... (work itself is not offered)
    assert_eq!(
        args,
        "work|qubes.Filecopy|+|personal|@dispvm:dvm|dvm|personal|sys-net|vault|"
    );

    // an answer outside the offered targets is refused
    ask_program(&dom0, "allow:dom0");
    assert_eq!(
        d.ask(&request("work", "", "qubes.Filecopy")),
        "result=deny\n"
    );
    ask_program(&dom0, "deny");
    assert_eq!(
        d.ask(&request("work", "", "qubes.Filecopy")),
        "result=deny\n"
    );
    let log = d.wait_log("denied by the user");
    assert!(log.contains("target dom0 is not a valid choice"), "{log}");
}

#[test]
fn oversized_reply_is_a_deny() {
    let dom0 = Dom0::new();
    let user = "u".repeat(5000);
    dom0.write(
        "policy.d/30-user.policy",
        &format!("qubes.Gpg * work vault allow user={user}\n"),
    );
    let d = Daemon::start(&dom0, &[]);
    assert_eq!(
        d.ask(&request("work", "vault", "qubes.Gpg")),
        "result=deny\n"
    );
    let log = d.wait_log("exceeds 4096");
    assert!(log.contains("exceeds 4096; answering result=deny"), "{log}");
}

#[test]
fn serves_many_clients_at_once_and_a_silent_one_blocks_nobody() {
    let dom0 = Dom0::new();
    basic_policy(&dom0);
    let d = Daemon::start(&dom0, &[]);
    // a client that connects and says nothing
    let _silent = UnixStream::connect(&d.socket).unwrap();
    let socket = d.socket.clone();
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let source = if i % 2 == 0 { "work" } else { "personal" };
                s.write_all(&request(source, "vault", "qubes.Gpg")).unwrap();
                let mut reply = String::new();
                s.read_to_string(&mut reply).unwrap();
                (i, reply)
            })
        })
        .collect();
    for h in handles {
        let (i, reply) = h.join().unwrap();
        let expected = if i % 2 == 0 {
            ALLOW_WORK_VAULT
        } else {
            "result=deny\n"
        };
        assert_eq!(reply, expected);
    }
}

fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    // closing with our data unread makes the kernel reset the connection
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{e}"),
    }
    String::from_utf8(reply).unwrap()
}

#[test]
fn eval_simple_and_eval_gui_services() {
    let dom0 = Dom0::new();
    basic_policy(&dom0);
    let d = Daemon::start(&dom0, &[]);
    let simple = dom0.path("policy.EvalSimple");
    let gui = dom0.path("policy.EvalGUI");
    assert_eq!(
        raw(&simple, b"policy.EvalSimple+qubes.Gpg sys-gui\0work\0vault"),
        "result=allow\n"
    );
    assert_eq!(
        raw(
            &simple,
            b"policy.EvalSimple+qubes.Gpg sys-gui\0personal\0vault"
        ),
        "result=deny\n"
    );
    // wrong service name, no argument, bad data: closed unanswered
    assert_eq!(
        raw(&simple, b"policy.EvalGUI+qubes.Gpg sys-gui\0work\0vault"),
        ""
    );
    assert_eq!(raw(&simple, b"policy.EvalSimple sys-gui\0work\0vault"), "");
    assert_eq!(
        raw(&simple, b"policy.EvalSimple+qubes.Gpg sys-gui\0work"),
        ""
    );
    // EvalGUI needs the caller to be the GUI qube of both (no guivm- tags here)
    assert_eq!(
        raw(&gui, b"policy.EvalGUI+qubes.Gpg sys-gui\0work\0vault"),
        ""
    );
    let log = d.wait_log("provides GUI");
    assert!(
        log.contains("policy.EvalGUI can only be invoked by a domain that provides GUI"),
        "{log}"
    );
    assert!(
        log.contains("policy.EvalSimple invoked with incorrect name policy.EvalGUI"),
        "{log}"
    );
}
