//! Asking the qrexec policy whether a VM's service call is allowed.
//!
//! First the policy daemon socket (`/run/qubes/policy.sock`, or
//! `QREXEC_POLICY_SOCKET`): request `source=S\n[requested_source=R\n]
//! intended_target=T\nservice_and_arg=SVC+ARG\n\n`, reply read to EOF (at
//! most 4096 bytes). If the socket cannot be reached or answers nonsense, the
//! policy program (`--policy-program`, default `/usr/bin/qrexec-policy-exec`)
//! runs as `PROGRAM -- SRC TARGET SVC+ARG` and writes the same reply on
//! stdout; a non-zero exit is a refusal. Reply parsing follows
//! `parse_policy_response` in `daemon/qrexec-daemon.c` exactly: no NUL, one
//! trailing newline stripped, `key=value` lines, `result` / `user` /
//! `target` / `target_uuid` / `autostart` / `requested_target` at most once,
//! unknown keys ignored, a line without `=` is malformed; `allow` needs
//! user, target, requested_target and autostart, `deny` none of them. This
//! module must never treat a malformed or truncated reply as `allow`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Default policy daemon socket.
pub const DEFAULT_POLICY_SOCKET: &str = "/run/qubes/policy.sock";
/// Default policy program.
pub const DEFAULT_POLICY_PROGRAM: &str = "/usr/bin/qrexec-policy-exec";
/// Largest reply read from the daemon or the program.
pub const MAX_REPLY: usize = 4096;

/// What the daemon asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    /// Calling qube.
    pub source: String,
    /// Source the caller claims to act for (protocol 4), if any.
    pub requested_source: Option<String>,
    /// Target the caller asked for.
    pub intended_target: String,
    /// `service+argument`.
    pub service_and_arg: String,
}

impl PolicyRequest {
    /// The request as the policy daemon expects it.
    pub fn to_wire(&self) -> String {
        let mut out = format!("source={}\n", self.source);
        if let Some(requested) = &self.requested_source {
            out.push_str(&format!("requested_source={requested}\n"));
        }
        out.push_str(&format!(
            "intended_target={}\nservice_and_arg={}\n\n",
            self.intended_target, self.service_and_arg
        ));
        out
    }
}

/// An allowed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// User to run the service as.
    pub user: String,
    /// Actual target.
    pub target: String,
    /// Target UUID, when the policy gave one.
    pub target_uuid: Option<String>,
    /// Target as the policy normalised the request.
    pub requested_target: String,
    /// Whether the target may be started.
    pub autostart: bool,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow(Allow),
    /// Denied.
    Deny,
}

/// Why a reply is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Nothing came back.
    #[error("policy didn't return any data")]
    Empty,
    /// A NUL byte in the reply.
    #[error("policy wrote a NUL byte")]
    Nul,
    /// Anything else malformed.
    #[error("policy sent invalid response: {0}")]
    Invalid(String),
}

/// Parse a reply as qrexec-daemon does.
pub fn parse_reply(reply: &[u8]) -> Result<Decision, ReplyError> {
    if reply.is_empty() {
        return Err(ReplyError::Empty);
    }
    if reply.contains(&0) {
        return Err(ReplyError::Nul);
    }
    let text = std::str::from_utf8(reply).map_err(|_| ReplyError::Invalid("not UTF-8".into()))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let mut result = None;
    let mut user = None;
    let mut target = None;
    let mut target_uuid = None;
    let mut autostart = None;
    let mut requested_target = None;
    let bad = |why: &str| ReplyError::Invalid(why.to_string());
    fn set<T>(slot: &mut Option<T>, value: T, key: &str) -> Result<(), ReplyError> {
        if slot.is_some() {
            return Err(ReplyError::Invalid(format!("duplicate {key}")));
        }
        *slot = Some(value);
        Ok(())
    }
    for line in text.split('\n') {
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad("line without '='"));
        };
        match key {
            "result" => match value {
                "allow" => set(&mut result, true, key)?,
                "deny" => set(&mut result, false, key)?,
                _ => return Err(bad("result is neither allow nor deny")),
            },
            "user" => set(&mut user, value.to_string(), key)?,
            "target" => set(&mut target, value.to_string(), key)?,
            "target_uuid" => set(&mut target_uuid, value.to_string(), key)?,
            "requested_target" => set(&mut requested_target, value.to_string(), key)?,
            "autostart" => match value {
                "True" => set(&mut autostart, true, key)?,
                "False" => set(&mut autostart, false, key)?,
                _ => return Err(bad("autostart is neither True nor False")),
            },
            _ => {}
        }
    }
    match (result, user, target, requested_target, autostart) {
        (Some(true), Some(user), Some(target), Some(requested_target), Some(autostart)) => {
            Ok(Decision::Allow(Allow {
                user,
                target,
                target_uuid,
                requested_target,
                autostart,
            }))
        }
        (Some(false), None, None, None, None) => Ok(Decision::Deny),
        _ => Err(bad("missing or extra keys for the result")),
    }
}

fn read_bounded(r: &mut dyn Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(MAX_REPLY as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// Ask the policy daemon at `socket`.
pub fn ask_daemon(socket: &Path, request: &PolicyRequest) -> Result<Decision, String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
    stream
        .write_all(request.to_wire().as_bytes())
        .map_err(|e| format!("send to socket failed: {e}"))?;
    let reply = read_bounded(&mut stream).map_err(|e| format!("error reading from socket: {e}"))?;
    parse_reply(&reply).map_err(|e| format!("qrexec-policy-daemon: {e}"))
}

/// Run the policy program.
pub fn ask_program(program: &Path, request: &PolicyRequest) -> Result<Decision, String> {
    let mut child = Command::new(program)
        .arg0("qrexec-policy-exec")
        .arg("--")
        .arg(&request.source)
        .arg(&request.intended_target)
        .arg(&request.service_and_arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let reply = match child.stdout.as_mut() {
        Some(out) => read_bounded(out).map_err(|e| format!("reading policy program: {e}"))?,
        None => Vec::new(),
    };
    drop(child.stdout.take());
    let status = child
        .wait()
        .map_err(|e| format!("waiting for policy program: {e}"))?;
    if !status.success() {
        return Err("qrexec-policy-exec failed".into());
    }
    parse_reply(&reply).map_err(|e| format!("qrexec-policy-exec: {e}"))
}

/// Where to ask.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Policy daemon socket.
    pub socket: PathBuf,
    /// Fallback policy program.
    pub program: PathBuf,
}

impl PolicyConfig {
    /// Evaluate: daemon first, program as fallback; any failure is `Deny`.
    pub fn evaluate(&self, request: &PolicyRequest) -> Decision {
        match ask_daemon(&self.socket, request) {
            Ok(decision) => return decision,
            Err(e) => crate::log_error!(
                "{e}; couldn't invoke qrexec-policy-daemon, using qrexec-policy-exec"
            ),
        }
        match ask_program(&self.program, request) {
            Ok(decision) => decision,
            Err(e) => {
                crate::log_error!("{e}");
                Decision::Deny
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    #[test]
    fn request_format() {
        let r = PolicyRequest {
            source: "vm1".into(),
            requested_source: None,
            intended_target: "vm2".into(),
            service_and_arg: "test.Add+".into(),
        };
        assert_eq!(
            r.to_wire(),
            "source=vm1\nintended_target=vm2\nservice_and_arg=test.Add+\n\n"
        );
        let r = PolicyRequest {
            requested_source: Some("vm3".into()),
            ..r
        };
        assert!(
            r.to_wire()
                .starts_with("source=vm1\nrequested_source=vm3\nintended_target=")
        );
    }

    #[test]
    fn allow_and_deny() {
        assert_eq!(parse_reply(b"result=deny\n"), Ok(Decision::Deny));
        assert_eq!(parse_reply(b"result=deny"), Ok(Decision::Deny));
        let allow = parse_reply(
            b"user=user\nresult=allow\ntarget=vm2\nautostart=True\nrequested_target=vm2\npolicy_source=x\n",
        )
        .unwrap();
        assert_eq!(
            allow,
            Decision::Allow(Allow {
                user: "user".into(),
                target: "vm2".into(),
                target_uuid: None,
                requested_target: "vm2".into(),
                autostart: true
            })
        );
    }

    #[test]
    fn random_replies_never_panic_and_never_allow_by_accident() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pieces: [&[u8]; 12] = [
            b"result=",
            b"allow",
            b"deny",
            b"user=",
            b"target=",
            b"\n",
            b"=",
            b"\0",
            b"autostart=",
            b"True",
            b"requested_target=",
            b"x",
        ];
        for _ in 0..20_000 {
            let mut reply = Vec::new();
            for _ in 0..(next() % 12) {
                reply.extend_from_slice(pieces[(next() % 12) as usize]);
            }
            if let Ok(Decision::Allow(a)) = parse_reply(&reply) {
                // Only a complete allow reply is an allow.
                let text = String::from_utf8_lossy(&reply);
                assert!(text.contains("result=allow"));
                assert!(!a.user.contains('\n') && !a.target.contains('\n'));
            }
        }
    }

    #[test]
    fn malformed_replies() {
        for bad in [
            &b""[..],
            b"result=allow\n",
            b"result=deny\nuser=x\n",
            b"result=maybe\n",
            b"result=deny\nresult=deny\n",
            b"result=deny\n\n",
            b"garbage\n",
            b"result=deny\0\n",
            b"user=u\nresult=allow\ntarget=t\nautostart=yes\nrequested_target=t\n",
        ] {
            assert!(parse_reply(bad).is_err(), "{bad:?}");
        }
    }
}
