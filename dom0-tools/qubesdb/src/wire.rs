//! The QubesDB message as the daemon handles it: `struct qdb_hdr` and the
//! `enum qdb_msg` numbering, with the daemon's own header checks
//! (db-cmds.c `verify_hdr`).
//!
//! Layout (qubes-core-qubesdb `include/qubesdb.h`): `uint8_t type; char
//! path[64]; uint32_t data_len;` — 72 bytes on x86-64: type at 0, path at
//! 1..65, three padding bytes, `data_len` (native/little-endian) at 68 —
//! followed by `data_len` bytes of data. The path is NUL-terminated; the
//! daemon forces byte 63 to NUL before looking at it, and echoes the request's
//! path bytes in its reply.
//!
//! This is a thin adapter: it never trusts a field (the type stays a raw
//! byte next to its interpretation; the path is cut at its NUL and checked;
//! `data_len` is bounded by `verify`) and it never panics.

use protocol::qubesdb::{
    HEADER_LEN as QDB_HEADER_LEN, QDB_MAX_DATA, QDB_MAX_PATH, Repr, check_path, field,
};

pub use protocol::qubesdb::MessageType as Command;

/// `sizeof(struct qdb_hdr)`.
pub const HEADER_LEN: usize = QDB_HEADER_LEN;

/// A received header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The type interpreted.
    pub command: Command,
    /// The type byte as sent.
    pub raw_type: u8,
    /// The path field as sent, with byte 63 forced to NUL.
    pub path_raw: [u8; QDB_MAX_PATH],
    /// The declared data length (unchecked until [`Header::verify`]).
    pub data_len: u32,
}

impl Header {
    /// Reads a header from its 72 bytes.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Header {
        let mut path_raw = [0u8; QDB_MAX_PATH];
        if let Some(src) = raw.get(field::PATH) {
            path_raw.copy_from_slice(src);
        }
        // db-cmds.c verify_hdr: `path[sizeof(path)-1] = '\0'`.
        path_raw[QDB_MAX_PATH - 1] = 0;
        let mut len = [0u8; 4];
        if let Some(src) = raw.get(field::DATA_LEN) {
            len.copy_from_slice(src);
        }
        let raw_type = raw[field::TYPE];
        Header {
            command: Command::from(raw_type),
            raw_type,
            path_raw,
            data_len: u32::from_le_bytes(len),
        }
    }

    /// The path: the bytes before the first NUL.
    pub fn path(&self) -> &[u8] {
        let end = self
            .path_raw
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(QDB_MAX_PATH);
        self.path_raw.get(..end).unwrap_or(&[])
    }

    /// The path as text (after `verify` it is plain ASCII).
    pub fn path_str(&self) -> String {
        String::from_utf8_lossy(self.path()).into_owned()
    }

    /// db-cmds.c `verify_hdr`: the command is allowed on this interface
    /// (`vchan` = the VM's link, else a local client), the path has only
    /// allowed characters, and `data_len < QDB_MAX_DATA`.
    pub fn verify(&self, vchan: bool) -> bool {
        let allowed = if vchan {
            self.command.allowed_on_vchan()
        } else {
            self.command.allowed_on_local_socket()
        };
        allowed && check_path(self.path()).is_ok() && (self.data_len as usize) < QDB_MAX_DATA
    }

    /// A reply with this header's path bytes, a new type and `data`.
    pub fn reply(&self, command: Command, data: &[u8]) -> Vec<u8> {
        encode_raw(command, &self.path_raw, data)
    }
}

/// The header bytes of a reply that echoes `path_raw` (as the C daemon
/// copies the request header), followed by `data`.
fn encode_raw(command: Command, path_raw: &[u8; QDB_MAX_PATH], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    if let Some(dst) = out.get_mut(field::TYPE) {
        *dst = u8::from(command);
    }
    if let Some(dst) = out.get_mut(field::PATH) {
        dst.copy_from_slice(path_raw);
    }
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    if let Some(dst) = out.get_mut(field::DATA_LEN) {
        dst.copy_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// A message with `path` and `data`, emitted by `protocol::qubesdb`. The
/// daemon only emits paths and values it has checked; should one ever fail
/// the protocol's checks, the message goes out with an empty path and no
/// data rather than malformed.
pub fn encode(command: Command, path: &str, data: &[u8]) -> Vec<u8> {
    let repr = Repr {
        msg_type: command,
        path,
        data,
    };
    let mut out = vec![0u8; repr.buffer_len()];
    match repr.emit(&mut out) {
        Ok(len) => {
            out.truncate(len);
            out
        }
        Err(_) => encode_raw(command, &[0u8; QDB_MAX_PATH], &[]),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    fn path_field(path: &[u8]) -> [u8; QDB_MAX_PATH] {
        let mut field = [0u8; QDB_MAX_PATH];
        field[..path.len()].copy_from_slice(path);
        field
    }

    #[test]
    fn golden_write_message() {
        let bytes = encode(Command::Write, "/qubes-ip", b"10.137.0.5");
        assert_eq!(bytes.len(), 72 + 10);
        assert_eq!(bytes[0], 1);
        assert_eq!(&bytes[1..10], b"/qubes-ip");
        assert!(bytes[10..68].iter().all(|&b| b == 0));
        assert_eq!(&bytes[68..72], &10u32.to_le_bytes());
        assert_eq!(&bytes[72..], b"10.137.0.5");
        let header = Header::parse(bytes[..72].try_into().unwrap());
        assert_eq!(header.command, Command::Write);
        assert_eq!(header.path(), b"/qubes-ip");
        assert_eq!(header.data_len, 10);
        assert!(header.verify(true) && header.verify(false));
    }

    #[test]
    fn hostile_headers_are_refused_not_trusted() {
        // Path without NUL: byte 63 is forced to NUL, path is 63 bytes.
        let mut raw = [b'a'; HEADER_LEN];
        raw[0] = 1;
        raw[68..72].copy_from_slice(&5u32.to_le_bytes());
        let header = Header::parse(&raw);
        assert_eq!(header.path().len(), 63);
        assert!(header.verify(true));
        // Huge data_len.
        raw[68..72].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!Header::parse(&raw).verify(true));
        raw[68..72].copy_from_slice(&(QDB_MAX_DATA as u32).to_le_bytes());
        assert!(!Header::parse(&raw).verify(true));
        raw[68..72].copy_from_slice(&(QDB_MAX_DATA as u32 - 1).to_le_bytes());
        assert!(Header::parse(&raw).verify(true));
        // Bad characters.
        let bad = encode_raw(Command::Write, &path_field(b"/a b"), b"");
        assert!(!Header::parse(bad[..72].try_into().unwrap()).verify(true));
        // Local-only commands on vchan and vice versa.
        let read = encode(Command::Read, "/a", b"");
        let read = Header::parse(read[..72].try_into().unwrap());
        assert!(!read.verify(true) && read.verify(false));
        let ok = encode(Command::RespOk, "/a", b"");
        let ok = Header::parse(ok[..72].try_into().unwrap());
        assert!(ok.verify(true) && !ok.verify(false));
        let unknown = encode(Command::Unknown(99), "/a", b"");
        assert!(!Header::parse(unknown[..72].try_into().unwrap()).verify(true));
    }

    #[test]
    fn replies_echo_the_request_path_bytes() {
        let mut raw = [0u8; HEADER_LEN];
        raw[0] = 0;
        raw[1..3].copy_from_slice(b"/x");
        raw[4] = b'z'; // garbage after the NUL, echoed like the C daemon
        let header = Header::parse(&raw);
        let reply = header.reply(Command::RespErrorNoent, &[]);
        assert_eq!(reply[0], 8);
        assert_eq!(&reply[1..65], &raw[1..65]);
    }
}
