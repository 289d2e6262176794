//! `policy.Ask` and `policy.Notify`: asking and telling the user through
//! `qrexec-policy-agent` in the calling qube's GUI qube, as Qubes'
//! `qrexec-policy-exec` does (`AgentAskResolution`, `notify()` and
//! `call_socket_service` in qubes-core-qrexec).
//!
//! The GUI qube is the `guivm` property of the **source** qube in the system
//! info (`"guivm": "sys-gui"` in `qubes.json`; absent, `null` or empty: no GUI
//! qube). When there is one:
//!
//! * `ask` sends `policy.Ask` with the JSON object (Python's `json.dumps`
//!   layout: `", "` and `": "` separators, non-ASCII as `\uXXXX`)
//!   `{"source": S, "service": SVC, "argument": "+ARG", "targets": [...],
//!   "default_target": T or "", "icons": {QUBE: ICON, "@dispvm:DVM":
//!   ICON-with-app→disp, ...}}` and reads the whole answer: exactly `deny`,
//!   or `allow:TARGET` (no newline; the engine then accepts only an offered
//!   target); anything else is an invalid response (deny);
//! * a notifying decision sends `policy.Notify` with `{"resolution":
//!   "allow"|"deny", "service": SVC, "argument": "+ARG", "source": S,
//!   "target": T}`; its answer is ignored and a failure only logged.
//!
//! The call goes from dom0 as `qrexec-client -d GUIVM "DEFAULT:QUBESRPC
//! policy.Ask dom0"` with the JSON on standard input; when the GUI qube is
//! dom0 itself, Qubes' local socket-service form is used instead: connect
//! to `RPC_DIR/policy.Ask`, send `policy.Ask dom0 name dom0\0` then the
//! JSON, close the sending side, read the answer.
//!
//! When the source has no GUI qube, the fallback [`Confirm`] answers (the
//! confirmation program of [`crate::ask`], or [`crate::NoConfirm`], which
//! denies as Qubes does: "source domain has no GuiVM") and nothing is
//! notified. A failing agent call (cannot start, non-zero exit, no answer
//! within the timeout, answer over 4 KiB) is a deny — it never falls back.
//! The system info comes from where the policy's does
//! ([`SystemInfoOrigin`]): qubesd's `internal.GetSystemInfo`, asked at each
//! ask or notification, or the static file, read again whenever it changed
//! (inode, size or mtime); an unreadable one is a deny.

#![deny(clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::eval::{AskAnswer, AskQuestion, Confirm, Notice};
use crate::system_info::{FileStamp, SystemInfoOrigin, file_stamp};

type Domains = serde_json::Map<String, Value>;

/// Most answer bytes read from the agent.
const MAX_ANSWER: u64 = 4096;

/// Qubes' `QREXEC_CLIENT_DOM0`.
pub const QREXEC_CLIENT: &str = "/usr/bin/qrexec-client";

/// Qubes' `RPC_PATH`: where dom0's socket services live.
pub const RPC_DIR: &str = "/etc/qubes-rpc";

/// Options shared by `qrexec-policy-daemon` and `qrexec-policy-exec`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// qrexec-client used to reach the GUI qube's qrexec-policy-agent.
    #[arg(
        long = "qrexec-client",
        value_name = "PATH",
        env = "QREXEC_POLICY_AGENT_CLIENT",
        default_value = QREXEC_CLIENT
    )]
    pub qrexec_client: PathBuf,
    /// `--socket-dir` passed to qrexec-client (its default when absent).
    #[arg(
        long = "qrexec-socket-dir",
        value_name = "DIR",
        env = "QREXEC_POLICY_AGENT_SOCKET_DIR"
    )]
    pub qrexec_socket_dir: Option<PathBuf>,
    /// Directory of dom0's socket services, used when the GUI qube is dom0.
    #[arg(
        long = "rpc-socket-dir",
        value_name = "DIR",
        env = "QREXEC_POLICY_AGENT_RPC_DIR",
        default_value = RPC_DIR
    )]
    pub rpc_dir: PathBuf,
}

/// Asks through the GUI qube's policy agent, or `fallback` without one.
pub struct AgentConfirm {
    system_info: SystemInfoOrigin,
    args: AgentArgs,
    timeout: Duration,
    fallback: Arc<dyn Confirm>,
    cache: Mutex<Option<(FileStamp, Arc<Domains>)>>,
}

impl std::fmt::Debug for AgentConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfirm")
            .field("system_info", &self.system_info)
            .field("args", &self.args)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AgentConfirm {
    /// `system_info` is where to read `guivm` and icons from;
    /// `timeout` bounds each agent call (the user's answer included).
    pub fn new(
        system_info: SystemInfoOrigin,
        args: AgentArgs,
        timeout: Duration,
        fallback: Arc<dyn Confirm>,
    ) -> Self {
        AgentConfirm {
            system_info,
            args,
            timeout,
            fallback,
            cache: Mutex::new(None),
        }
    }

    /// The `domains` object. From a file it is parsed again only when the
    /// file changed (inode, size or mtime), so a flood of notifying denials
    /// does not re-parse it each time; from qubesd it is asked afresh.
    fn domains(&self) -> Result<Arc<Domains>, String> {
        let Some(path) = self.system_info.file() else {
            return self.read_domains().map(Arc::new);
        };
        let stamp = file_stamp(path);
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached, domains)) = cache.as_ref()
            && stamp.is_some()
            && *cached == stamp
        {
            return Ok(Arc::clone(domains));
        }
        let domains = Arc::new(self.read_domains()?);
        *cache = Some((stamp, Arc::clone(&domains)));
        Ok(domains)
    }

    fn read_domains(&self) -> Result<Domains, String> {
        let (text, origin) = self.system_info.fetch_text()?;
        let mut value: Value = serde_json::from_str(&text)
            .map_err(|e| format!("cannot parse system info {origin}: {e}"))?;
        match value.get_mut("domains").map(Value::take) {
            Some(Value::Object(map)) => Ok(map),
            _ => Err(format!("system info {origin} has no \"domains\" object")),
        }
    }

    /// Call `service` in `guivm` with `params`; the whole answer.
    fn call(&self, guivm: &str, service: &str, params: &str) -> Result<Vec<u8>, String> {
        if guivm == "dom0" {
            self.call_local(service, params)
        } else {
            self.call_remote(guivm, service, params)
        }
    }

    fn call_local(&self, service: &str, params: &str) -> Result<Vec<u8>, String> {
        let path = self.args.rpc_dir.join(service);
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut stream = UnixStream::connect(&path).map_err(fail)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(fail)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(fail)?;
        stream
            .write_all(format!("{service} dom0 name dom0\0").as_bytes())
            .and_then(|()| stream.write_all(params.as_bytes()))
            .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
            .map_err(fail)?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER + 1)
            .read_to_end(&mut answer)
            .map_err(fail)?;
        if answer.len() as u64 > MAX_ANSWER {
            return Err(format!(
                "{}: answer longer than {MAX_ANSWER} bytes",
                path.display()
            ));
        }
        Ok(answer)
    }

    fn call_remote(&self, guivm: &str, service: &str, params: &str) -> Result<Vec<u8>, String> {
        let client = &self.args.qrexec_client;
        let mut cmd = Command::new(client);
        if let Some(dir) = &self.args.qrexec_socket_dir {
            cmd.arg(format!("--socket-dir={}", dir.display()));
        }
        cmd.args(["-d", guivm, &format!("DEFAULT:QUBESRPC {service} dom0")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let what = format!("{} -d {guivm} {service}", client.display());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{what} could not be started: {e}"))?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what}: no pipes"));
        };
        let input = params.to_owned();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = stdout.take(MAX_ANSWER + 1).read_to_end(&mut out);
            out
        });
        let status = crate::ask::wait_with_deadline(&mut child, self.timeout);
        let _ = writer.join();
        let Some(status) = status else {
            return Err(format!(
                "{what} did not answer within {} s",
                self.timeout.as_secs_f64()
            ));
        };
        let answer = reader.join().unwrap_or_default();
        if !status.success() {
            return Err(format!("{what} failed ({status})"));
        }
        if answer.len() as u64 > MAX_ANSWER {
            return Err(format!("{what}: answer longer than {MAX_ANSWER} bytes"));
        }
        Ok(answer)
    }
}

/// The `guivm` of `source` (a name, or `uuid:…` matched against `uuid`).
fn guivm_of(domains: &Domains, source: &str) -> Option<String> {
    let domain = domains.get(source).or_else(|| {
        let uuid = source.strip_prefix("uuid:")?;
        domains
            .values()
            .find(|d| d.get("uuid").and_then(Value::as_str) == Some(uuid))
    })?;
    domain
        .get("guivm")
        .and_then(Value::as_str)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
}

/// The `icons` object of a `policy.Ask` request.
fn icons(domains: &Domains) -> Vec<(String, String)> {
    let icon = |d: &Value| d.get("icon").and_then(Value::as_str).map(str::to_owned);
    let mut out: Vec<(String, String)> = domains
        .iter()
        .filter(|(name, _)| !name.starts_with("uuid:"))
        .filter_map(|(name, d)| Some((name.clone(), icon(d)?)))
        .collect();
    for (name, d) in domains {
        if name.starts_with("uuid:")
            || !d
                .get("template_for_dispvms")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        {
            continue;
        }
        if let Some(icon) = icon(d) {
            out.push((format!("@dispvm:{name}"), icon.replace("app", "disp")));
        }
    }
    out
}

/// A JSON string as Python's `json.dumps` writes it (`ensure_ascii`).
pub fn py_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

fn py_json_object<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let body: Vec<String> = pairs
        .into_iter()
        .map(|(k, v)| format!("{}: {v}", py_json_string(k)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// The `policy.Ask` parameters.
pub fn ask_params(question: &AskQuestion, icons: &[(String, String)]) -> String {
    let targets: Vec<String> = question.targets.iter().map(|t| py_json_string(t)).collect();
    let icons = py_json_object(icons.iter().map(|(k, v)| (k.as_str(), py_json_string(v))));
    py_json_object([
        ("source", py_json_string(&question.source)),
        ("service", py_json_string(&question.service)),
        ("argument", py_json_string(&question.argument)),
        ("targets", format!("[{}]", targets.join(", "))),
        (
            "default_target",
            py_json_string(question.default_target.as_deref().unwrap_or("")),
        ),
        ("icons", icons),
    ])
}

/// The `policy.Notify` parameters.
pub fn notify_params(notice: &Notice<'_>) -> String {
    py_json_object([
        (
            "resolution",
            py_json_string(if notice.allowed { "allow" } else { "deny" }),
        ),
        ("service", py_json_string(notice.service)),
        ("argument", py_json_string(notice.argument)),
        ("source", py_json_string(notice.source)),
        ("target", py_json_string(notice.target)),
    ])
}

/// Qubes' reading of a `policy.Ask` answer.
pub fn parse_ask_answer(answer: &[u8]) -> AskAnswer {
    let Some(text) = std::str::from_utf8(answer).ok().filter(|t| t.is_ascii()) else {
        return AskAnswer::Invalid(String::from_utf8_lossy(answer).into_owned());
    };
    if text == "deny" {
        AskAnswer::Deny
    } else if let Some(target) = text.strip_prefix("allow:") {
        AskAnswer::Allow(target.to_owned())
    } else {
        AskAnswer::Invalid(text.to_owned())
    }
}

impl Confirm for AgentConfirm {
    fn confirm(&self, question: &AskQuestion) -> AskAnswer {
        let domains = match self.domains() {
            Ok(d) => d,
            Err(e) => return AskAnswer::Unavailable(format!("the system info is unusable: {e}")),
        };
        let Some(guivm) = guivm_of(&domains, &question.source) else {
            return self.fallback.confirm(question);
        };
        let params = ask_params(question, &icons(&domains));
        match self.call(&guivm, "policy.Ask", &params) {
            Ok(answer) => parse_ask_answer(&answer),
            Err(e) => {
                AskAnswer::Unavailable(format!("asking qrexec-policy-agent in {guivm} failed: {e}"))
            }
        }
    }

    fn notify(&self, notice: &Notice<'_>) {
        let guivm = match self.domains() {
            Ok(domains) => guivm_of(&domains, notice.source),
            Err(e) => {
                log::error!("cannot notify: {e}");
                return;
            }
        };
        let Some(guivm) = guivm else { return };
        if let Err(e) = self.call(&guivm, "policy.Notify", &notify_params(notice)) {
            log::error!("error calling qrexec-policy-agent in {guivm}: {e}");
        }
    }
}

/// Wrap `fallback` so that qubes with a GUI qube are asked through it.
pub fn with_agent(
    fallback: Arc<dyn Confirm>,
    system_info: &SystemInfoOrigin,
    args: &AgentArgs,
    timeout: Duration,
) -> Arc<dyn Confirm> {
    Arc::new(AgentConfirm::new(
        system_info.clone(),
        args.clone(),
        timeout,
        fallback,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_like_python() {
        assert_eq!(
            py_json_string("a\"b\\c\n\u{1}é😀"),
            r#""a\"b\\c\n\u0001\u00e9\ud83d\ude00""#
        );
        let q = AskQuestion {
            source: "work".into(),
            service: "qubes.Filecopy".into(),
            argument: "+".into(),
            targets: vec!["personal".into(), "vault".into()],
            default_target: None,
        };
        assert_eq!(
            ask_params(&q, &[("work".into(), "appvm-red".into())]),
            r#"{"source": "work", "service": "qubes.Filecopy", "argument": "+", "targets": ["personal", "vault"], "default_target": "", "icons": {"work": "appvm-red"}}"#
        );
        assert_eq!(
            ask_params(
                &AskQuestion {
                    targets: vec![],
                    ..q
                },
                &[]
            ),
            r#"{"source": "work", "service": "qubes.Filecopy", "argument": "+", "targets": [], "default_target": "", "icons": {}}"#
        );
    }

    #[test]
    fn answers_read_exactly() {
        assert_eq!(parse_ask_answer(b"deny"), AskAnswer::Deny);
        assert_eq!(
            parse_ask_answer(b"allow:vault"),
            AskAnswer::Allow("vault".into())
        );
        // Qubes does not strip a newline: the target then is not a choice.
        assert_eq!(
            parse_ask_answer(b"allow:vault\n"),
            AskAnswer::Allow("vault\n".into())
        );
        assert_eq!(
            parse_ask_answer(b"deny\n"),
            AskAnswer::Invalid("deny\n".into())
        );
        assert_eq!(parse_ask_answer(b""), AskAnswer::Invalid(String::new()));
        assert!(matches!(
            parse_ask_answer(b"allow:\xff"),
            AskAnswer::Invalid(_)
        ));
    }

    #[test]
    fn guivm_and_icons_from_system_info() {
        let v: Value = serde_json::from_str(
            r#"{"dom0": {"type": "AdminVM", "icon": "adminvm-black"},
                "work": {"guivm": "sys-gui", "icon": "appvm-blue", "uuid": "u1"},
                "nogui": {"guivm": null, "icon": "appvm-red"},
                "empty": {"guivm": ""},
                "dvm": {"template_for_dispvms": true, "icon": "appvm-green"},
                "uuid:u1": {"guivm": "other", "icon": "x"}}"#,
        )
        .unwrap();
        let Value::Object(domains) = v else { panic!() };
        assert_eq!(guivm_of(&domains, "work").as_deref(), Some("sys-gui"));
        assert_eq!(guivm_of(&domains, "uuid:u1").as_deref(), Some("other"));
        assert_eq!(guivm_of(&domains, "nogui"), None);
        assert_eq!(guivm_of(&domains, "empty"), None);
        assert_eq!(guivm_of(&domains, "missing"), None);
        let icons = icons(&domains);
        assert!(icons.contains(&("@dispvm:dvm".into(), "dispvm-green".into())));
        assert!(icons.contains(&("work".into(), "appvm-blue".into())));
        assert!(!icons.iter().any(|(k, _)| k.starts_with("uuid:")));
        assert!(!icons.iter().any(|(k, _)| k == "empty"));
    }
}
