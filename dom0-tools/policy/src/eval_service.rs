//! The `policy.EvalSimple` and `policy.EvalGUI` qrexec services.
//!
//! Qubes' policy daemon also listens on two qrexec *socket services*
//! (`/etc/qubes-rpc/policy.EvalSimple`, `/etc/qubes-rpc/policy.EvalGUI`;
//! `qrexec_policy_daemon.py` `handle_qrexec_connection` and
//! `qrexec_policy_eval`), through which a qube may ask what the policy says
//! about a call, as if `just_evaluate` and `assume_yes_for_ask` were set.
//! The byte layout, all from the calling qube and so hostile:
//!
//! ```text
//! policy.EvalSimple+SERVICE[+ARG] REMOTE_DOMAIN[ …]\0   (written by qrexec)
//! SOURCE\0TARGET                                       (≤ 96 bytes, from the qube)
//! ```
//!
//! `SOURCE` must be 1–31 and `TARGET` 1–63 bytes of a sanitised qube name
//! (`[A-Za-z0-9@_.-]`); the queried service must be non-empty and must not
//! start with `+`. For `policy.EvalGUI` both qubes must exist and carry the
//! tag `guivm-REMOTE_DOMAIN` (the caller must be the GUI qube of both). Any
//! violation closes the connection without an answer (logged, as Qubes
//! does); otherwise the reply is `result=allow\n` or `result=deny\n`. This
//! module never evaluates a query it has not fully validated.

use std::io::{Read, Write};

use crate::eval::{Confirm, Decision, NoConfirm, Query, printable};
use crate::system_info::SystemInfo;

/// Longest header part accepted (Qubes' stream reader allows 64 KiB; a
/// service name is at most 255 bytes and a domain name 31).
const MAX_HEADER_PART: usize = 1024;
/// Most data bytes read from the qube.
const MAX_DATA: usize = 96;

/// Which of the two services a socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalService {
    /// `policy.EvalSimple`: any qube allowed by policy to call it.
    Simple,
    /// `policy.EvalGUI`: only the GUI qube of both source and target.
    Gui,
}

impl EvalService {
    /// The service name qrexec invokes.
    pub fn name(self) -> &'static str {
        match self {
            EvalService::Simple => "policy.EvalSimple",
            EvalService::Gui => "policy.EvalGUI",
        }
    }
}

/// Why a request was dropped unanswered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// The qrexec header was cut short or too long.
    #[error("malformed qrexec service header")]
    Header,
    /// qrexec started another service on this socket.
    #[error("{expected} invoked with incorrect name {got} by {remote}")]
    WrongService {
        /// The service this socket serves.
        expected: &'static str,
        /// What the header said.
        got: String,
        /// The calling qube.
        remote: String,
    },
    /// No service to evaluate was given.
    #[error(
        "{service} requires an argument (the service to query), but {remote} did not provide one"
    )]
    NoArgument {
        /// This service.
        service: &'static str,
        /// The calling qube.
        remote: String,
    },
    /// Source/target missing, too long, not ASCII or not a sanitised name.
    #[error("{service}: invalid data from qube {remote}")]
    BadData {
        /// This service.
        service: &'static str,
        /// The calling qube.
        remote: String,
    },
    /// `policy.EvalGUI` called by a qube that is not the GUI qube of both.
    #[error(
        "{service} can only be invoked by a domain that provides GUI to both the source and target domains, not {remote}"
    )]
    NotGuiVm {
        /// This service.
        service: &'static str,
        /// The calling qube.
        remote: String,
    },
}

fn read_until(stream: &mut impl Read, stop: u8) -> Result<Vec<u8>, EvalError> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(EvalError::Header),
            Ok(_) => {
                if byte[0] == stop {
                    return Ok(out);
                }
                if out.len() >= MAX_HEADER_PART {
                    return Err(EvalError::Header);
                }
                out.push(byte[0]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(EvalError::Header),
        }
    }
}

fn is_sanitized_name(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'@' | b'_' | b'-' | b'.'))
}

/// Read, check and answer one call. `system` is fetched only after the
/// request is valid; an error fetching it answers `result=deny`.
pub fn handle<S: Read + Write>(
    stream: &mut S,
    kind: EvalService,
    evaluate: impl FnOnce(&Query, &SystemInfo, &dyn Confirm) -> Decision,
    system: impl FnOnce() -> Option<std::sync::Arc<SystemInfo>>,
) -> Result<Decision, EvalError> {
    let service_part = read_until(stream, b' ')?;
    let (invoked, queried) = match service_part.iter().position(|&b| b == b'+') {
        Some(i) => (
            service_part.get(..i).unwrap_or_default(),
            Some(service_part.get(i + 1..).unwrap_or_default()),
        ),
        None => (&service_part[..], None),
    };
    let metadata = read_until(stream, 0)?;
    let remote_bytes = metadata.split(|&b| b == b' ').next().unwrap_or_default();
    let remote = printable(&String::from_utf8_lossy(remote_bytes)).into_owned();
    if invoked != kind.name().as_bytes() {
        return Err(EvalError::WrongService {
            expected: kind.name(),
            got: printable(&String::from_utf8_lossy(invoked)).into_owned(),
            remote,
        });
    }
    let queried = match queried {
        Some(q) if !q.is_empty() && !q.starts_with(b"+") && q.is_ascii() => q,
        _ => {
            return Err(EvalError::NoArgument {
                service: kind.name(),
                remote,
            });
        }
    };
    let bad = || EvalError::BadData {
        service: kind.name(),
        remote: remote.clone(),
    };
    let mut data = Vec::with_capacity(MAX_DATA);
    stream
        .take(MAX_DATA as u64)
        .read_to_end(&mut data)
        .map_err(|_| bad())?;
    let nul = data.iter().position(|&b| b == 0).ok_or_else(bad)?;
    let source = data.get(..nul).unwrap_or_default();
    let target = data.get(nul + 1..).unwrap_or_default();
    if !(1..=63).contains(&target.len())
        || !(1..=31).contains(&source.len())
        || !is_sanitized_name(source)
        || !is_sanitized_name(target)
    {
        return Err(bad());
    }
    // all checked ASCII above
    let source = String::from_utf8_lossy(source).into_owned();
    let target = String::from_utf8_lossy(target).into_owned();
    let Some(system) = system() else {
        return Ok(Decision::Deny {
            reason: "error getting system info".into(),
            notify: false,
        });
    };
    if kind == EvalService::Gui {
        let tag = format!("guivm-{remote}");
        if [&source, &target]
            .iter()
            .any(|q| !system.get(q).is_some_and(|d| d.has_tag(&tag)))
        {
            return Err(EvalError::NotGuiVm {
                service: kind.name(),
                remote,
            });
        }
    }
    let query = Query {
        source,
        intended_target: target,
        service_and_arg: String::from_utf8_lossy(queried).into_owned(),
        assume_yes_for_ask: true,
        just_evaluate: true,
        requested_source: None,
    };
    Ok(evaluate(&query, &system, &NoConfirm))
}

/// Answer `stream` completely: reply on success, log and close otherwise.
pub fn serve<S: Read + Write>(
    mut stream: S,
    kind: EvalService,
    evaluate: impl FnOnce(&Query, &SystemInfo, &dyn Confirm) -> Decision,
    system: impl FnOnce() -> Option<std::sync::Arc<SystemInfo>>,
) {
    match handle(&mut stream, kind, evaluate, system) {
        Ok(decision) => {
            if let Err(e) = stream.write_all(decision.reply().as_bytes()) {
                log::error!("{}: error writing reply: {e}", kind.name());
            }
        }
        Err(e @ EvalError::WrongService { .. }) => log::error!("{e}"),
        Err(e) => log::warn!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::Policy;
    use crate::system_info::Domain;
    use std::sync::Arc;

    struct Duplex {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn system() -> Arc<SystemInfo> {
        let mut work = Domain::new("AppVM");
        work.tags = vec!["guivm-sys-gui".into()];
        let mut vault = Domain::new("AppVM");
        vault.tags = vec!["guivm-sys-gui".into()];
        Arc::new(
            SystemInfo::new([
                ("work".to_owned(), work),
                ("vault".to_owned(), vault),
                ("personal".to_owned(), Domain::new("AppVM")),
            ])
            .unwrap(),
        )
    }

    fn policy() -> Policy {
        let t = tempfile::tempdir().unwrap();
        Policy::from_loaded(
            crate::loader::load_text(
                "qubes.Gpg * work vault allow\nqubes.Filecopy * work @anyvm ask\n* * @anyvm @anyvm deny\n",
                "/p.policy",
                t.path(),
                t.path(),
            )
            .unwrap(),
        )
    }

    fn run(kind: EvalService, bytes: &[u8]) -> Result<String, EvalError> {
        let p = policy();
        let mut d = Duplex {
            input: std::io::Cursor::new(bytes.to_vec()),
            output: Vec::new(),
        };
        let decision = handle(
            &mut d,
            kind,
            |q, s, c| p.evaluate(q, s, c),
            || Some(system()),
        )?;
        Ok(decision.reply())
    }

    #[test]
    fn evaluates_like_just_evaluate_with_assume_yes() {
        let s = EvalService::Simple;
        assert_eq!(
            run(s, b"policy.EvalSimple+qubes.Gpg sys-gui\0work\0vault").unwrap(),
            "result=allow\n"
        );
        assert_eq!(
            run(s, b"policy.EvalSimple+qubes.Filecopy sys-gui\0work\0vault").unwrap(),
            "result=allow\n"
        );
        assert_eq!(
            run(
                s,
                b"policy.EvalSimple+qubes.Gpg sys-gui name dom0\0personal\0vault"
            )
            .unwrap(),
            "result=deny\n"
        );
    }

    #[test]
    fn gui_variant_checks_guivm_tags() {
        let g = EvalService::Gui;
        assert_eq!(
            run(g, b"policy.EvalGUI+qubes.Gpg sys-gui\0work\0vault").unwrap(),
            "result=allow\n"
        );
        assert!(matches!(
            run(g, b"policy.EvalGUI+qubes.Gpg other-gui\0work\0vault"),
            Err(EvalError::NotGuiVm { .. })
        ));
        assert!(matches!(
            run(g, b"policy.EvalGUI+qubes.Gpg sys-gui\0personal\0vault"),
            Err(EvalError::NotGuiVm { .. })
        ));
    }

    #[test]
    fn malformed_input_is_refused() {
        let s = EvalService::Simple;
        let cases: [&[u8]; 12] = [
            b"",
            b"policy.EvalSimple+qubes.Gpg",
            b"policy.EvalSimple+qubes.Gpg sys-gui",
            b"policy.EvalGUI+qubes.Gpg sys-gui\0work\0vault",
            b"policy.EvalSimple sys-gui\0work\0vault",
            b"policy.EvalSimple+ sys-gui\0work\0vault",
            b"policy.EvalSimple++x sys-gui\0work\0vault",
            b"policy.EvalSimple+qubes.Gpg sys-gui\0workvault",
            b"policy.EvalSimple+qubes.Gpg sys-gui\0\0vault",
            b"policy.EvalSimple+qubes.Gpg sys-gui\0work\0",
            b"policy.EvalSimple+qubes.Gpg sys-gui\0wo rk\0vault",
            b"policy.EvalSimple+qubes.Gpg sys-gui\0work\0va\xffult",
        ];
        for case in cases {
            assert!(run(s, case).is_err(), "{}", String::from_utf8_lossy(case));
        }
        let long_source = [
            &b"policy.EvalSimple+qubes.Gpg sys-gui\0"[..],
            &[b'a'; 32],
            b"\0vault",
        ]
        .concat();
        assert!(run(s, &long_source).is_err());
        let long_header = vec![b'a'; MAX_HEADER_PART + 10];
        assert_eq!(run(s, &long_header), Err(EvalError::Header));
    }
}
