//! Blocking qrexec message I/O over any byte stream (a vchan or a UNIX
//! socket to a local client).
//!
//! [`read_message`] reads a header, rejects a length its type does not allow
//! *before* reading the body (so a peer cannot make us buffer more than one
//! maximal message), reads the body into a reusable buffer and hands back the
//! whole message, checked. Writing always emits a message in one `write_all`
//! so that concurrent writers holding the same lock never interleave. Nothing
//! here trusts a peer-supplied length beyond the per-type limits.

use std::io::{self, Read, Write};

use protocol::qrexec::{HEADER_LEN, HeaderRepr, Message, MsgType, Repr, RequestId};

use crate::error::{Error, Result};

/// Read exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream
/// before the first byte.
pub fn read_exact_or_eof(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let Some(rest) = buf.get_mut(filled..) else {
            break;
        };
        match r.read(rest) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A reusable buffer holding one whole message (header + body).
#[derive(Debug, Default)]
pub struct MessageBuf {
    bytes: Vec<u8>,
}

impl MessageBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        MessageBuf::default()
    }

    /// The checked view of the message last read.
    pub fn message(&self) -> Result<Message<&[u8]>> {
        Message::new_checked(&self.bytes[..]).map_err(|source| Error::Protocol {
            context: "message buffer".into(),
            source,
        })
    }

    /// The request ident of the trigger message last read, if it has one.
    pub fn trigger_request_id(&self) -> Option<RequestId> {
        Message::new_checked(&self.bytes[..])
            .ok()
            .and_then(|m| m.trigger_request_id())
    }
}

/// Read one message; `Ok(None)` when the peer closed cleanly between
/// messages. `from` names the peer in errors.
pub fn read_message<'b>(
    r: &mut dyn Read,
    buf: &'b mut MessageBuf,
    from: &str,
) -> Result<Option<Repr<'b>>> {
    let mut head = [0u8; HEADER_LEN];
    match read_exact_or_eof(r, &mut head) {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(Error::Eof(format!("reading header from {from}")));
        }
        Err(source) => {
            return Err(Error::Io {
                context: format!("reading from {from}"),
                source,
            });
        }
    }
    let header = HeaderRepr::parse_bytes(&head).map_err(|source| Error::Protocol {
        context: format!("header from {from}"),
        source,
    })?;
    let total = HEADER_LEN + header.len as usize;
    buf.bytes.clear();
    buf.bytes.resize(total, 0);
    if let Some(dst) = buf.bytes.get_mut(..HEADER_LEN) {
        dst.copy_from_slice(&head);
    }
    if let Some(body) = buf.bytes.get_mut(HEADER_LEN..) {
        match read_exact_or_eof(r, body) {
            Ok(true) => {}
            Ok(false) | Err(_) if body.is_empty() => {}
            Ok(false) => return Err(Error::Eof(format!("reading body from {from}"))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Error::Eof(format!("reading body from {from}")));
            }
            Err(source) => {
                return Err(Error::Io {
                    context: format!("reading body from {from}"),
                    source,
                });
            }
        }
    }
    let body = buf.bytes.get(HEADER_LEN..).unwrap_or(&[]);
    Repr::parse_body(header, body)
        .map(Some)
        .map_err(|source| Error::Protocol {
            context: format!("{} from {from}", header.msg_type.name()),
            source,
        })
}

/// Write one message in a single `write_all`.
pub fn write_message(w: &mut dyn Write, repr: &Repr<'_>) -> io::Result<()> {
    let mut out = vec![0u8; repr.buffer_len()];
    repr.emit(&mut out)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    w.write_all(&out)
}

/// Write a `MSG_HELLO` with `version`.
pub fn send_hello(w: &mut dyn Write, version: u32) -> io::Result<()> {
    write_message(w, &Repr::Hello(protocol::qrexec::PeerInfo { version }))
}

/// Read the peer's `MSG_HELLO` (type and length exactly as Qubes requires)
/// and return its version.
pub fn recv_hello(r: &mut dyn Read, from: &str) -> Result<u32> {
    let mut buf = MessageBuf::new();
    match read_message(r, &mut buf, from)? {
        Some(Repr::Hello(info)) => Ok(info.version),
        Some(other) => Err(Error::Unexpected {
            context: format!("handshake with {from}"),
            got: other.msg_type(),
        }),
        None => Err(Error::Eof(format!("handshake with {from}"))),
    }
}

/// A data-message header in front of `len` payload bytes already in place:
/// `buf[..8]` is filled so `buf[..8 + len]` can be written at once.
pub fn fill_data_header(buf: &mut [u8], msg_type: MsgType, len: usize) {
    let head = HeaderRepr {
        msg_type,
        len: len as u32,
    }
    .to_bytes();
    if let Some(dst) = buf.get_mut(..HEADER_LEN) {
        dst.copy_from_slice(&head);
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_it_writes() {
        let mut bytes = Vec::new();
        send_hello(&mut bytes, 3).unwrap();
        write_message(&mut bytes, &Repr::ExitCode(7)).unwrap();
        let mut r = &bytes[..];
        assert_eq!(recv_hello(&mut r, "test").unwrap(), 3);
        let mut buf = MessageBuf::new();
        assert_eq!(
            read_message(&mut r, &mut buf, "test").unwrap(),
            Some(Repr::ExitCode(7))
        );
        assert!(read_message(&mut r, &mut buf, "test").unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_refused_before_reading_body() {
        let head = HeaderRepr {
            msg_type: MsgType::ExecCmdline,
            len: 1 << 30,
        }
        .to_bytes();
        let mut r = &head[..];
        let mut buf = MessageBuf::new();
        assert!(matches!(
            read_message(&mut r, &mut buf, "evil"),
            Err(Error::Protocol { .. })
        ));
        assert!(buf.bytes.capacity() < 1 << 20);
    }

    #[test]
    fn truncated_body_and_header_are_eof_errors() {
        let mut bytes = Vec::new();
        write_message(&mut bytes, &Repr::ExitCode(7)).unwrap();
        let mut buf = MessageBuf::new();
        let mut r = &bytes[..10];
        assert!(matches!(
            read_message(&mut r, &mut buf, "t"),
            Err(Error::Eof(_))
        ));
        let mut r = &bytes[..3];
        assert!(matches!(
            read_message(&mut r, &mut buf, "t"),
            Err(Error::Eof(_))
        ));
    }

    #[test]
    fn random_streams_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let types = [
            0x190u32, 0x191, 0x192, 0x193, 0x200, 0x201, 0x202, 0x203, 0x210, 0x211, 0x212, 0x213,
            0x300, 7,
        ];
        let mut buf = MessageBuf::new();
        for _ in 0..5_000 {
            let mut bytes = Vec::new();
            for _ in 0..(next() % 4) {
                let t = types[(next() % types.len() as u64) as usize];
                let len = (next() % 200) as u32;
                bytes.extend_from_slice(&t.to_ne_bytes());
                bytes.extend_from_slice(&len.to_ne_bytes());
                for _ in 0..(next() % 220) {
                    bytes.push(next() as u8);
                }
            }
            let mut r = &bytes[..];
            while let Ok(Some(_)) = read_message(&mut r, &mut buf, "random") {}
        }
    }

    #[test]
    fn hello_must_be_hello() {
        let mut bytes = Vec::new();
        write_message(&mut bytes, &Repr::ExitCode(7)).unwrap();
        let mut r = &bytes[..];
        assert!(matches!(
            recv_hello(&mut r, "t"),
            Err(Error::Unexpected { .. })
        ));
    }
}
