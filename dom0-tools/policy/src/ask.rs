//! The confirmation program that answers `ask` rules.
//!
//! In Qubes, dom0 asks `qrexec-policy-agent` in the source's GUI qube over
//! the `policy.Ask` service, with the source, service, argument, the list of
//! allowed targets and the default target; it answers `allow:TARGET` or
//! `deny` ([`crate::agent`] does that when the source has a GUI qube). As the
//! fallback when it has none, the same question goes to a program named in
//! configuration (`--ask-program`), run as
//!
//! ```text
//! PROGRAM SOURCE SERVICE ARGUMENT DEFAULT_TARGET [TARGET ...]
//! ```
//!
//! (`DEFAULT_TARGET` is an empty argument when there is none; the targets
//! are sorted). It must print `allow:TARGET` or `deny` on its standard output
//! (a trailing newline is ignored) and exit 0. Anything else, a non-zero
//! exit, a failure to start or running longer than the timeout (the program
//! is then killed) is a deny. Its standard input is `/dev/null`; its
//! standard error goes to ours. The program's answer is untrusted text: only
//! the targets offered are accepted by the caller, and at most 4 KiB of
//! output is read.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::eval::{AskAnswer, AskQuestion, Confirm};

/// Most output bytes read from the program.
const MAX_ANSWER: u64 = 4096;

/// Runs a confirmation program.
#[derive(Debug, Clone)]
pub struct ProgramConfirm {
    program: PathBuf,
    timeout: Duration,
}

impl ProgramConfirm {
    /// Use `program`, killing it after `timeout`.
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        ProgramConfirm {
            program: program.into(),
            timeout,
        }
    }
}

impl Confirm for ProgramConfirm {
    fn confirm(&self, question: &AskQuestion) -> AskAnswer {
        let mut child = match Command::new(&self.program)
            .arg(&question.source)
            .arg(&question.service)
            .arg(&question.argument)
            .arg(question.default_target.as_deref().unwrap_or(""))
            .args(&question.targets)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                return AskAnswer::Unavailable(format!(
                    "the confirmation program {} could not be started: {e}",
                    self.program.display()
                ));
            }
        };
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return AskAnswer::Unavailable("the confirmation program has no output pipe".into());
        };
        // Read on a helper thread so the timeout also covers a program
        // that never closes its output.
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = stdout.take(MAX_ANSWER).read_to_end(&mut out);
            out
        });
        let status = wait_with_deadline(&mut child, self.timeout);
        let Some(status) = status else {
            return AskAnswer::Unavailable(format!(
                "the confirmation program {} did not answer within {} s",
                self.program.display(),
                self.timeout.as_secs_f64()
            ));
        };
        let output = reader.join().unwrap_or_default();
        if !status.success() {
            return AskAnswer::Unavailable(format!(
                "the confirmation program {} failed ({status})",
                self.program.display()
            ));
        }
        let text = String::from_utf8_lossy(&output);
        let answer = text.strip_suffix('\n').unwrap_or(&text);
        if answer == "deny" {
            AskAnswer::Deny
        } else if let Some(target) = answer.strip_prefix("allow:") {
            AskAnswer::Allow(target.to_owned())
        } else {
            AskAnswer::Invalid(answer.to_owned())
        }
    }
}

/// Waits for `child` until `timeout` has passed; then kills and reaps it and
/// gives `None`. Shared by the ask program and the policy agent's
/// qrexec-client.
pub(crate) fn wait_with_deadline(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An executable script with `body`, made by a `cp` process: a file
    /// this process had open for writing can be inherited by a child
    /// another test thread forks at that moment, and executing it then
    /// fails with ETXTBSY ("Text file busy", seen in CI). `cp`'s
    /// descriptors are never ours to pass on.
    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let source = dir.join(format!("ask{n}.txt"));
        std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.join(format!("ask{n}.sh"));
        let status = std::process::Command::new("cp")
            .arg("-p")
            .arg(&source)
            .arg(&p)
            .status()
            .unwrap();
        assert!(status.success());
        p
    }

    fn question() -> AskQuestion {
        AskQuestion {
            source: "work".into(),
            service: "qubes.Filecopy".into(),
            argument: "+".into(),
            targets: vec!["personal".into(), "vault".into()],
            default_target: Some("vault".into()),
        }
    }

    #[test]
    fn passes_arguments_and_reads_answers() {
        let t = tempfile::tempdir().unwrap();
        // echo back the default target, proving the argument order
        let p = script(
            t.path(),
            r#"[ "$1 $2 $3" = "work qubes.Filecopy +" ] || exit 3; shift 4; [ "$*" = "personal vault" ] || exit 4; echo "allow:vault""#,
        );
        let c = ProgramConfirm::new(&p, Duration::from_secs(5));
        assert_eq!(c.confirm(&question()), AskAnswer::Allow("vault".into()));
        let p = script(t.path(), "echo deny");
        assert_eq!(
            ProgramConfirm::new(&p, Duration::from_secs(5)).confirm(&question()),
            AskAnswer::Deny
        );
        let p = script(t.path(), "echo maybe");
        assert_eq!(
            ProgramConfirm::new(&p, Duration::from_secs(5)).confirm(&question()),
            AskAnswer::Invalid("maybe".into())
        );
    }

    #[test]
    fn failures_are_unavailable() {
        let t = tempfile::tempdir().unwrap();
        let p = script(t.path(), "echo allow:vault; exit 1");
        assert!(matches!(
            ProgramConfirm::new(&p, Duration::from_secs(5)).confirm(&question()),
            AskAnswer::Unavailable(_)
        ));
        let p = script(t.path(), "sleep 5; echo allow:vault");
        let started = Instant::now();
        assert!(matches!(
            ProgramConfirm::new(&p, Duration::from_millis(200)).confirm(&question()),
            AskAnswer::Unavailable(m) if m.contains("did not answer")
        ));
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(matches!(
            ProgramConfirm::new(t.path().join("missing"), Duration::from_secs(1))
                .confirm(&question()),
            AskAnswer::Unavailable(m) if m.contains("could not be started")
        ));
    }
}
