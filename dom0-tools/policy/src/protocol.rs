//! The policy daemon socket request (`/run/qubes/policy.sock`).
//!
//! Request, from qrexec-daemon (Qubes' `qrexec_policy_daemon.py`
//! `handle_client_connection`): lines `KEY=VALUE\n`, ended by an empty line
//! (or end of stream):
//!
//! ```text
//! source=S
//! [requested_source=R]
//! intended_target=T
//! service_and_arg=SVC+ARG
//! [assume_yes_for_ask=yes|no]
//! [just_evaluate=yes|no]
//! (empty line)
//! ```
//!
//! Any unknown key, duplicate key, line without `=`, non-ASCII byte, a
//! boolean other than `yes`/`no`, or a missing required key makes the daemon
//! close the connection without an answer — exactly as Qubes does. We also
//! cap the request at [`MAX_REQUEST`] bytes (Python's stream reader limit is
//! 64 KiB per line). The reply is text to end of stream, at most
//! [`MAX_REPLY`] bytes. This parser never panics on any input.

use crate::eval::{Decision, Query};

/// Largest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest reply qrexec-daemon reads, in bytes.
pub const MAX_REPLY: usize = 4096;

/// Why a request was dropped (logged; no answer is sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A key not in the protocol.
    #[error("error parsing policy request: unknown argument {0}")]
    UnknownKey(String),
    /// A key given twice.
    #[error("error parsing policy request: duplicate argument {0}")]
    DuplicateKey(String),
    /// A line without `=`.
    #[error("error parsing policy request: line {0} has no '='")]
    NoEquals(usize),
    /// A byte outside ASCII.
    #[error("error parsing policy request: non-ASCII byte at offset {0}")]
    NotAscii(usize),
    /// `yes`/`no` expected.
    #[error("error parsing policy request: invalid bool value {value} for argument {key}")]
    BadBool {
        /// The key.
        key: String,
        /// What was sent.
        value: String,
    },
    /// `source`, `intended_target` or `service_and_arg` missing.
    #[error("error parsing policy request: required argument missing")]
    Missing,
    /// More than [`MAX_REQUEST`] bytes before the end.
    #[error("error parsing policy request: longer than {MAX_REQUEST} bytes")]
    TooLong,
}

/// The reply for `decision` as it may go on the wire: at most
/// [`MAX_REPLY`] bytes of printable ASCII lines. Anything else (a huge or
/// non-ASCII `user=` from a policy file, a NUL byte qrexec-daemon would
/// reject) is logged and answered `result=deny` instead — Python's daemon
/// fails to encode such a reply and closes the connection unanswered.
pub fn checked_reply(decision: &Decision) -> String {
    let reply = decision.reply();
    let problem = if reply.len() > MAX_REPLY {
        Some(format!(
            "reply of {} bytes exceeds {MAX_REPLY}",
            reply.len()
        ))
    } else if reply
        .bytes()
        .any(|b| b != b'\n' && !(0x20..0x7f).contains(&b))
    {
        Some("reply has bytes that are not printable ASCII".to_owned())
    } else {
        None
    };
    match problem {
        None => reply,
        Some(why) => {
            log::error!("{why}; answering result=deny");
            Decision::Deny {
                reason: why,
                notify: false,
            }
            .reply()
        }
    }
}

/// Whether `buffer` already holds a complete request (an empty line), and
/// where it ends.
pub fn request_end(buffer: &[u8]) -> Option<usize> {
    if buffer.first() == Some(&b'\n') {
        return Some(1);
    }
    buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

/// Parse a complete request (up to and including the empty line, or
/// everything received before end of stream).
pub fn parse_request(bytes: &[u8]) -> Result<Query, RequestError> {
    if bytes.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    if let Some(pos) = bytes.iter().position(|b| !b.is_ascii()) {
        return Err(RequestError::NotAscii(pos));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| RequestError::NotAscii(e.valid_up_to()))?;
    let mut query = Query::default();
    let mut seen: Vec<&str> = Vec::new();
    let (mut source, mut target, mut service) = (None, None, None);
    for (number, line) in text.split('\n').enumerate() {
        if line.is_empty() {
            break;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or(RequestError::NoEquals(number + 1))?;
        if seen.contains(&key) {
            return Err(RequestError::DuplicateKey(key.to_owned()));
        }
        let parse_bool = |value: &str| match value {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => Err(RequestError::BadBool {
                key: key.to_owned(),
                value: value.to_owned(),
            }),
        };
        match key {
            "source" => source = Some(value.to_owned()),
            "intended_target" => target = Some(value.to_owned()),
            "service_and_arg" => service = Some(value.to_owned()),
            "requested_source" => query.requested_source = Some(value.to_owned()),
            "assume_yes_for_ask" => query.assume_yes_for_ask = parse_bool(value)?,
            "just_evaluate" => query.just_evaluate = parse_bool(value)?,
            // Qubes 4.1's qrexec-daemon also sends these (the 4.1 Python
            // daemon requires them); they do not take part in the decision.
            "domain_id" | "process_ident" => {}
            _ => return Err(RequestError::UnknownKey(key.to_owned())),
        }
        seen.push(key);
    }
    match (source, target, service) {
        (Some(s), Some(t), Some(v)) => {
            query.source = s;
            query.intended_target = t;
            query.service_and_arg = v;
            Ok(query)
        }
        _ => Err(RequestError::Missing),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    #[test]
    fn accepts_the_qubes_4_1_daemon_request() {
        // Byte for byte what qrexec-daemon 4.1 (`connect_daemon_socket`) sends.
        let q = parse_request(
            b"domain_id=5\nsource=work\nintended_target=vault\nservice_and_arg=qubes.Gpg\nprocess_ident=SOCKET11\n\n",
        )
        .unwrap();
        assert_eq!(q.source, "work");
        assert_eq!(q.intended_target, "vault");
        assert_eq!(q.service_and_arg, "qubes.Gpg");
        assert_eq!(
            parse_request(
                b"domain_id=5\ndomain_id=5\nsource=a\nintended_target=b\nservice_and_arg=c\n\n"
            )
            .unwrap_err(),
            RequestError::DuplicateKey("domain_id".into())
        );
    }

    #[test]
    fn parses_full_request() {
        let q = parse_request(
            b"source=work\nrequested_source=work\nintended_target=vault\nservice_and_arg=qubes.Gpg+x\nassume_yes_for_ask=yes\njust_evaluate=no\n\n",
        )
        .unwrap();
        assert_eq!(q.source, "work");
        assert_eq!(q.intended_target, "vault");
        assert_eq!(q.service_and_arg, "qubes.Gpg+x");
        assert!(q.assume_yes_for_ask);
        assert!(!q.just_evaluate);
        assert_eq!(q.requested_source.as_deref(), Some("work"));
    }

    #[test]
    fn end_of_stream_ends_request_and_empty_value_is_kept() {
        let q = parse_request(b"source=a\nintended_target=\nservice_and_arg=s").unwrap();
        assert_eq!(q.intended_target, "");
        assert_eq!(q.service_and_arg, "s");
    }

    #[test]
    fn malformed_requests_are_refused() {
        use RequestError::*;
        let e = |b: &[u8]| parse_request(b).unwrap_err();
        assert_eq!(e(b"source=a\nbogus=1\n\n"), UnknownKey("bogus".into()));
        assert_eq!(e(b"source=a\nsource=b\n\n"), DuplicateKey("source".into()));
        assert_eq!(e(b"source\n\n"), NoEquals(1));
        assert_eq!(e(b"source=\xff\n\n"), NotAscii(7));
        assert_eq!(
            e(b"source=a\nintended_target=b\nservice_and_arg=c\njust_evaluate=1\n\n"),
            BadBool {
                key: "just_evaluate".into(),
                value: "1".into()
            }
        );
        assert_eq!(e(b"source=a\nintended_target=b\n\n"), Missing);
        assert_eq!(e(b""), Missing);
        assert_eq!(e(b"\n"), Missing);
        assert_eq!(e(&vec![b'a'; MAX_REQUEST + 1]), TooLong);
        assert_eq!(e(b"=x\n\n"), UnknownKey(String::new()));
    }

    #[test]
    fn replies_are_bounded_printable_ascii() {
        let allow = |user: &str| Decision::Allow {
            user: Some(user.to_owned()),
            target: "vault".into(),
            target_uuid: None,
            autostart: true,
            requested_target: "vault".into(),
        };
        assert_eq!(
            checked_reply(&allow("u")),
            "user=u\nresult=allow\ntarget=vault\nautostart=True\nrequested_target=vault\n"
        );
        assert_eq!(checked_reply(&allow("ü")), "result=deny\n");
        assert_eq!(checked_reply(&allow("a\0b")), "result=deny\n");
        assert_eq!(
            checked_reply(&allow(&"u".repeat(MAX_REPLY))),
            "result=deny\n"
        );
    }

    #[test]
    fn request_end_finds_blank_line() {
        assert_eq!(request_end(b"a=b\n\nrest"), Some(5));
        assert_eq!(request_end(b"\n"), Some(1));
        assert_eq!(request_end(b"a=b\n"), None);
        assert_eq!(request_end(b""), None);
    }

    #[test]
    fn never_panics_on_noise() {
        // deterministic pseudo-random bytes, including NUL, '=' and '\n'
        let mut x: u32 = 0x1234_5678;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    [b'a', b'=', b'\n', 0, 0x80, b's', b'o', b'_'][(x % 8) as usize]
                })
                .collect();
            let _ = parse_request(&bytes);
            let _ = request_end(&bytes);
        }
    }
}
