//! The QubesDB wire protocol: `qdb_hdr` messages, the path rules the daemon
//! enforces, and a streaming decoder.
//!
//! The firewall's QubesDB client (unikernel) and the dom0 `qubesdb-daemon`
//! (dom0-tools) both speak this over a vchan; this module only parses and
//! emits the bytes. It must never accept a path, length or value that the
//! C daemon would refuse, and never panic on anything a peer sends.
//!
//! Facts and where they come from (qubes-core-qubesdb):
//! - `struct qdb_hdr { uint8_t type; char path[QDB_MAX_PATH]; uint32_t
//!   data_len; char data[]; }` with `QDB_MAX_PATH` = 64 and `QDB_MAX_DATA`
//!   = 3072; the C compiler pads 3 bytes after `path` so `data_len` is at
//!   offset 68 and the header is 72 bytes; integers are host order
//!   (little-endian on x86): `include/qubesdb.h`.
//! - `enum qdb_msg` numbering: `QDB_CMD_READ` 0, `WRITE` 1, `MULTIREAD` 2,
//!   `LIST` 3, `RM` 4, `WATCH` 5, `UNWATCH` 6, `QDB_RESP_OK` 7,
//!   `RESP_ERROR_NOENT` 8, `RESP_ERROR` 9, `RESP_READ` 10,
//!   `RESP_MULTIREAD` 11, `RESP_LIST` 12, `RESP_WATCH` 13:
//!   `include/qubesdb.h`. The vchan port 111 (`QUBESDB_VCHAN_PORT`):
//!   `daemon/qubesdb_internal.h`.
//! - What the daemon accepts (`verify_hdr`, `verify_path`, `verify_data` in
//!   `daemon/db-cmds.c`): `data_len` strictly below `QDB_MAX_DATA` (so at
//!   most 3071 bytes); the path is read up to its first NUL (bytes after it
//!   are ignored; the daemon forces `path[63]` to NUL, we instead refuse a
//!   path with no NUL in 64 bytes); path characters `a-z A-Z 0-9 _ - / . :
//!   @`, a trailing `/` allowed (it means "prefix" for RM, LIST, MULTIREAD and
//!   WATCH); values never contain a NUL byte; READ, LIST, WATCH and UNWATCH
//!   only on the local socket, never on the vchan; commands other than WRITE
//!   carry no data, and an ERROR with data is fatal.
//!
//! The exchange on the vchan (`handle_vchan_data`, `handle_multiread`,
//! `request_full_db_sync` in `daemon/db-cmds.c`, `mainloop` in
//! `daemon/db-daemon.c`, `init_vchan`): dom0's daemon for a VM is the vchan
//! *server* on port 111 and the VM connects as *client* (the reverse of
//! qrexec, where the VM's agent serves port 512). Once connected the VM sends one
//! `QDB_CMD_MULTIREAD` with an **empty** path (`path[0]` = 0, not `/`) and no
//! data. dom0 answers with one `QDB_RESP_MULTIREAD` per entry (path and
//! value; for the empty path the whole database in reverse order), then a
//! terminating `QDB_RESP_MULTIREAD` with an empty path and `data_len` 0
//! ([`Repr::is_end_marker`]). A second MULTIREAD on the same vchan is
//! refused. After the dump dom0 pushes `QDB_CMD_WRITE` (path + value; an
//! empty value is how dom0 signals a commit such as
//! `/qubes-firewall/<ip>`) and `QDB_CMD_RM` (a trailing `/` removes the
//! subtree); the VM answers each with `QDB_RESP_OK` (path copied, no data),
//! or `QDB_RESP_ERROR_NOENT` when an RM names nothing. The VM may itself
//! send WRITE/RM (e.g. `/qubes-iptables-error`) and gets `QDB_RESP_OK` or
//! `QDB_RESP_ERROR` back.

use core::fmt;
use core::ops::Range;

use crate::framing::{Fault, Reassembler};

/// `QDB_MAX_PATH`: size of the path field, including its NUL.
pub const QDB_MAX_PATH: usize = 64;
/// `QDB_MAX_DATA`: the daemon refuses `data_len >= QDB_MAX_DATA`.
pub const QDB_MAX_DATA: usize = 3072;
/// Largest `data_len` the daemon accepts.
pub const MAX_DATA_LEN: usize = QDB_MAX_DATA - 1;
/// Size of `struct qdb_hdr` with its padding.
pub const HEADER_LEN: usize = 72;
/// Largest complete message.
pub const MESSAGE_MAX: usize = HEADER_LEN + MAX_DATA_LEN;
/// `QUBESDB_VCHAN_PORT`.
pub const VCHAN_PORT: u32 = 111;
/// `QDB_DAEMON_LOCAL_PATH`: the VM daemon's local socket.
pub const QDB_DAEMON_LOCAL_PATH: &str = "/var/run/qubes/qubesdb.sock";
/// `QDB_DAEMON_PATH_PATTERN` is `/var/run/qubes/qubesdb.%s.sock` (the VM
/// name in the middle): this prefix …
pub const QDB_DAEMON_PATH_PREFIX: &str = "/var/run/qubes/qubesdb.";
/// … and this suffix.
pub const QDB_DAEMON_PATH_SUFFIX: &str = ".sock";

/// Byte ranges of the `qdb_hdr` fields.
pub mod field {
    use core::ops::Range;
    /// `uint8_t type`.
    pub const TYPE: usize = 0;
    /// `char path[64]`, NUL-terminated.
    pub const PATH: Range<usize> = 1..65;
    /// Compiler padding before `data_len` (ignored on input, zero on output).
    pub const PADDING: Range<usize> = 65..68;
    /// `uint32_t data_len`.
    pub const DATA_LEN: Range<usize> = 68..72;
    /// The data follows the header.
    pub const DATA: usize = 72;
}

/// Everything that can be wrong with a QubesDB message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer ends before the header or the declared data does.
    Truncated { needed: usize, available: usize },
    /// `data_len` is `QDB_MAX_DATA` or more (the daemon drops the peer).
    DataTooLong { len: usize },
    /// The path field has no NUL within its 64 bytes.
    PathNotTerminated,
    /// A path to emit is 64 bytes or longer.
    PathTooLong { len: usize },
    /// The path has a character `verify_path` refuses, at byte `at`.
    BadPathChar { at: usize, byte: u8 },
    /// A value contains a NUL byte at `at` (`verify_data` refuses it).
    NulInData { at: usize },
    /// A message type that never carries data came with `len` bytes.
    UnexpectedData { msg_type: u8, len: usize },
    /// The caller's output buffer is too small.
    BufferTooSmall { needed: usize, available: usize },
    /// A stream decoder failed earlier; the byte stream has lost its framing
    /// and the vchan must be closed.
    StreamFailed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Truncated { needed, available } => write!(
                f,
                "qubesdb message truncated: needs {needed} bytes, only {available} present; wait for more bytes or drop the peer"
            ),
            Error::DataTooLong { len } => write!(
                f,
                "qubesdb data_len {len} is not below QDB_MAX_DATA ({QDB_MAX_DATA}); the peer violates the protocol, close the vchan"
            ),
            Error::PathNotTerminated => write!(
                f,
                "qubesdb path field has no NUL within {QDB_MAX_PATH} bytes; the peer violates the protocol"
            ),
            Error::PathTooLong { len } => write!(
                f,
                "qubesdb path of {len} bytes does not fit (at most {} bytes)",
                QDB_MAX_PATH - 1
            ),
            Error::BadPathChar { at, byte } => write!(
                f,
                "qubesdb path has forbidden byte 0x{byte:02x} at {at}; allowed are a-z A-Z 0-9 _ - / . : @"
            ),
            Error::NulInData { at } => write!(
                f,
                "qubesdb value has a NUL byte at {at}; values must not contain NUL"
            ),
            Error::UnexpectedData { msg_type, len } => write!(
                f,
                "qubesdb message type {msg_type} must not carry data but has {len} bytes"
            ),
            Error::BufferTooSmall { needed, available } => write!(
                f,
                "qubesdb emit needs {needed} bytes but the buffer has {available}; pass a buffer of MESSAGE_MAX bytes"
            ),
            Error::StreamFailed => write!(
                f,
                "qubesdb stream decoder failed earlier and lost framing; close the vchan"
            ),
        }
    }
}

/// `enum qdb_msg`. Unknown values are kept as `Unknown(raw)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// `QDB_CMD_READ`, 0 (local socket only).
    Read,
    /// `QDB_CMD_WRITE`, 1.
    Write,
    /// `QDB_CMD_MULTIREAD`, 2.
    Multiread,
    /// `QDB_CMD_LIST`, 3 (local socket only).
    List,
    /// `QDB_CMD_RM`, 4.
    Rm,
    /// `QDB_CMD_WATCH`, 5 (local socket only).
    Watch,
    /// `QDB_CMD_UNWATCH`, 6 (local socket only).
    Unwatch,
    /// `QDB_RESP_OK`, 7.
    RespOk,
    /// `QDB_RESP_ERROR_NOENT`, 8.
    RespErrorNoent,
    /// `QDB_RESP_ERROR`, 9.
    RespError,
    /// `QDB_RESP_READ`, 10.
    RespRead,
    /// `QDB_RESP_MULTIREAD`, 11.
    RespMultiread,
    /// `QDB_RESP_LIST`, 12.
    RespList,
    /// `QDB_RESP_WATCH`, 13.
    RespWatch,
    /// Any other value.
    Unknown(u8),
}

impl From<u8> for MessageType {
    fn from(raw: u8) -> Self {
        match raw {
            0 => MessageType::Read,
            1 => MessageType::Write,
            2 => MessageType::Multiread,
            3 => MessageType::List,
            4 => MessageType::Rm,
            5 => MessageType::Watch,
            6 => MessageType::Unwatch,
            7 => MessageType::RespOk,
            8 => MessageType::RespErrorNoent,
            9 => MessageType::RespError,
            10 => MessageType::RespRead,
            11 => MessageType::RespMultiread,
            12 => MessageType::RespList,
            13 => MessageType::RespWatch,
            other => MessageType::Unknown(other),
        }
    }
}

impl From<MessageType> for u8 {
    fn from(value: MessageType) -> Self {
        match value {
            MessageType::Read => 0,
            MessageType::Write => 1,
            MessageType::Multiread => 2,
            MessageType::List => 3,
            MessageType::Rm => 4,
            MessageType::Watch => 5,
            MessageType::Unwatch => 6,
            MessageType::RespOk => 7,
            MessageType::RespErrorNoent => 8,
            MessageType::RespError => 9,
            MessageType::RespRead => 10,
            MessageType::RespMultiread => 11,
            MessageType::RespList => 12,
            MessageType::RespWatch => 13,
            MessageType::Unknown(raw) => raw,
        }
    }
}

impl MessageType {
    /// Whether the C daemon accepts this type from the vchan peer
    /// (`verify_hdr(…, vchan = 1)`): WRITE, MULTIREAD, RM, RESP_OK,
    /// RESP_ERROR, RESP_MULTIREAD. Anything else there is fatal.
    pub fn allowed_on_vchan(self) -> bool {
        matches!(
            self,
            MessageType::Write
                | MessageType::Multiread
                | MessageType::Rm
                | MessageType::RespOk
                | MessageType::RespError
                | MessageType::RespMultiread
        )
    }

    /// Whether the C daemon accepts this type from a local client
    /// (`verify_hdr(…, vchan = 0)`): the seven commands.
    pub fn allowed_on_local_socket(self) -> bool {
        matches!(
            self,
            MessageType::Read
                | MessageType::Write
                | MessageType::Multiread
                | MessageType::List
                | MessageType::Rm
                | MessageType::Watch
                | MessageType::Unwatch
        )
    }

    /// Whether messages of this type carry a value (WRITE and the READ /
    /// MULTIREAD replies); every other type must have `data_len` 0.
    /// Unknown types are not judged.
    pub fn carries_data(self) -> bool {
        matches!(
            self,
            MessageType::Write
                | MessageType::RespRead
                | MessageType::RespMultiread
                | MessageType::Unknown(_)
        )
    }
}

/// Checks a path as `verify_path` does: shorter than 64 bytes, only
/// `a-z A-Z 0-9 _ - / . : @`. Empty and trailing-`/` paths are allowed
/// (commands that forbid them check that themselves).
pub fn check_path(path: &[u8]) -> Result<(), Error> {
    if path.len() >= QDB_MAX_PATH {
        return Err(Error::PathTooLong { len: path.len() });
    }
    match path.iter().position(|&byte| !is_path_byte(byte)) {
        Some(at) => Err(Error::BadPathChar {
            at,
            byte: path.get(at).copied().unwrap_or(0),
        }),
        None => Ok(()),
    }
}

fn is_path_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'/' | b'.' | b':' | b'@')
}

/// Checks a value as `verify_data` does: no NUL byte.
pub fn check_data(data: &[u8]) -> Result<(), Error> {
    match data.iter().position(|&byte| byte == 0) {
        Some(at) => Err(Error::NulInData { at }),
        None => Ok(()),
    }
}

/// A checked view of one `qdb_hdr` plus its data.
///
/// After [`Packet::new_checked`] the buffer holds the whole header and the
/// declared data, `data_len` is below `QDB_MAX_DATA`, the path field has a
/// NUL, and no accessor can panic. Path characters are checked by
/// [`Repr::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn data_len_of(bytes: &[u8]) -> usize {
    bytes
        .get(field::DATA_LEN)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes) as usize
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after checking the header and that the data is
    /// present. Bytes after the data are ignored.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let bytes = buffer.as_ref();
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        }
        check_header(bytes)?;
        let needed = HEADER_LEN + data_len_of(bytes);
        if bytes.len() < needed {
            return Err(Error::Truncated {
                needed,
                available: bytes.len(),
            });
        }
        Ok(Packet { buffer })
    }

    /// The message type.
    pub fn msg_type(&self) -> MessageType {
        MessageType::from(
            self.buffer
                .as_ref()
                .get(field::TYPE)
                .copied()
                .unwrap_or(u8::MAX),
        )
    }

    /// The path bytes up to (not including) the first NUL.
    pub fn path(&self) -> &[u8] {
        let field = self.buffer.as_ref().get(field::PATH).unwrap_or(&[]);
        let end = field
            .iter()
            .position(|&byte| byte == 0)
            .unwrap_or(field.len());
        field.get(..end).unwrap_or(&[])
    }

    /// The declared data length (below `QDB_MAX_DATA`).
    pub fn data_len(&self) -> usize {
        data_len_of(self.buffer.as_ref())
    }

    /// Header plus data: the bytes this message occupies.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.data_len()
    }

    /// The data bytes.
    pub fn data(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(field::DATA..self.total_len())
            .unwrap_or(&[])
    }

    /// Gives back the wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// The header checks that need no data: `data_len` and the path's NUL.
fn check_header(header: &[u8]) -> Result<(), Error> {
    let len = data_len_of(header);
    if len >= QDB_MAX_DATA {
        return Err(Error::DataTooLong { len });
    }
    let path = header.get(field::PATH).unwrap_or(&[]);
    if !path.contains(&0) {
        return Err(Error::PathNotTerminated);
    }
    Ok(())
}

/// One QubesDB message, parsed and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr<'a> {
    pub msg_type: MessageType,
    /// The path (checked by [`check_path`]); empty in MULTIREAD of the whole
    /// database and in end markers.
    pub path: &'a str,
    /// The value (checked by [`check_data`]); empty for types that carry
    /// none.
    pub data: &'a [u8],
}

impl<'a> Repr<'a> {
    /// Parses and validates a checked packet.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Repr<'a>, Error> {
        Self::parse_bytes(packet.buffer.as_ref())
    }

    /// Parses the message at the start of `bytes` (bytes after it are
    /// ignored; [`Repr::buffer_len`] says how far it reached).
    pub fn parse_bytes(bytes: &'a [u8]) -> Result<Repr<'a>, Error> {
        let packet = Packet::new_checked(bytes)?;
        let msg_type = packet.msg_type();
        let path_field = bytes.get(field::PATH).unwrap_or(&[]);
        let path_len = packet.path().len();
        let path_bytes = path_field.get(..path_len).unwrap_or(&[]);
        check_path(path_bytes)?;
        let data = bytes.get(field::DATA..packet.total_len()).unwrap_or(&[]);
        if !msg_type.carries_data() && !data.is_empty() {
            return Err(Error::UnexpectedData {
                msg_type: msg_type.into(),
                len: data.len(),
            });
        }
        if !matches!(msg_type, MessageType::Unknown(_)) {
            check_data(data)?;
        }
        // check_path admitted ASCII only, so this cannot fail.
        let path = core::str::from_utf8(path_bytes).map_err(|_| Error::BadPathChar {
            at: 0,
            byte: path_bytes.first().copied().unwrap_or(0),
        })?;
        Ok(Repr {
            msg_type,
            path,
            data,
        })
    }

    /// The end of a MULTIREAD or LIST reply: empty path, no data.
    pub fn is_end_marker(&self) -> bool {
        matches!(
            self.msg_type,
            MessageType::RespMultiread | MessageType::RespList
        ) && self.path.is_empty()
            && self.data.is_empty()
    }

    /// The VM's first message on a new vchan: MULTIREAD of the empty path.
    pub const fn full_sync_request() -> Repr<'static> {
        Repr {
            msg_type: MessageType::Multiread,
            path: "",
            data: &[],
        }
    }

    /// The terminator dom0 sends after the last RESP_MULTIREAD entry.
    pub const fn multiread_end() -> Repr<'static> {
        Repr {
            msg_type: MessageType::RespMultiread,
            path: "",
            data: &[],
        }
    }

    /// Bytes needed to emit this message.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// Writes header (path NUL-padded, padding zeroed) and data to the start
    /// of `buffer`; returns the number of bytes written. Refuses anything
    /// [`Repr::parse`] would refuse.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<usize, Error> {
        check_path(self.path.as_bytes())?;
        if self.data.len() > MAX_DATA_LEN {
            return Err(Error::DataTooLong {
                len: self.data.len(),
            });
        }
        if !self.msg_type.carries_data() && !self.data.is_empty() {
            return Err(Error::UnexpectedData {
                msg_type: self.msg_type.into(),
                len: self.data.len(),
            });
        }
        if !matches!(self.msg_type, MessageType::Unknown(_)) {
            check_data(self.data)?;
        }
        let total = self.buffer_len();
        let available = buffer.len();
        let out = buffer.get_mut(..total).ok_or(Error::BufferTooSmall {
            needed: total,
            available,
        })?;
        out.fill(0);
        let path = self.path.as_bytes();
        let sections: [(Range<usize>, &[u8]); 4] = [
            (field::TYPE..field::TYPE + 1, &[u8::from(self.msg_type)][..]),
            (field::PATH.start..field::PATH.start + path.len(), path),
            (field::DATA_LEN, &(self.data.len() as u32).to_le_bytes()[..]),
            (field::DATA..total, self.data),
        ];
        for (range, bytes) in sections {
            if let Some(target) = out.get_mut(range) {
                target.copy_from_slice(bytes);
            }
        }
        Ok(total)
    }
}

/// What [`Decoder::feed`] returns: the bytes it consumed and, when they
/// completed one, the message (borrowed from the decoder).
pub type Fed<'d> = (usize, Option<Packet<&'d [u8]>>);

/// Reassembles whole messages from a vchan byte stream delivered in
/// arbitrary chunks.
///
/// Holds at most one message (`MESSAGE_MAX` bytes). A header with
/// `data_len >= QDB_MAX_DATA` or a path without NUL is an error, after which
/// the decoder stays failed: the stream cannot be resynchronised. Validate
/// each yielded packet with [`Repr::parse`].
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    inner: Reassembler<MESSAGE_MAX>,
}

impl Decoder {
    /// An empty decoder.
    pub const fn new() -> Self {
        Decoder {
            inner: Reassembler::new(),
        }
    }

    /// Bytes of an incomplete message held so far.
    pub fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    /// Consumes bytes from `input` up to the end of the current message.
    /// Returns how many bytes were consumed and, when that completed a
    /// message, the message (valid until the next call). Call again with
    /// the unconsumed rest.
    pub fn feed(&mut self, input: &[u8]) -> Result<Fed<'_>, Error> {
        let body_len = |header: &[u8]| check_header(header).map(|()| data_len_of(header));
        match self.inner.feed(input, HEADER_LEN, body_len) {
            Ok((consumed, None)) => Ok((consumed, None)),
            Ok((consumed, Some(message))) => Ok((consumed, Some(Packet::new_checked(message)?))),
            Err(Fault::Failed) => Err(Error::StreamFailed),
            Err(Fault::Header(error)) => Err(error),
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    /// A header as the C compiler lays out `struct qdb_hdr`: type byte,
    /// 64-byte path, 3 padding bytes, little-endian `data_len`.
    fn golden(msg_type: u8, path: &[u8], data: &[u8]) -> ([u8; MESSAGE_MAX], usize) {
        let mut out = [0u8; MESSAGE_MAX];
        out[0] = msg_type;
        out[1..1 + path.len()].copy_from_slice(path);
        out[68..72].copy_from_slice(&(data.len() as u32).to_le_bytes());
        out[72..72 + data.len()].copy_from_slice(data);
        (out, 72 + data.len())
    }

    #[test]
    fn numbering_matches_qubesdb_h() {
        let expected = [
            (MessageType::Read, 0),
            (MessageType::Write, 1),
            (MessageType::Multiread, 2),
            (MessageType::List, 3),
            (MessageType::Rm, 4),
            (MessageType::Watch, 5),
            (MessageType::Unwatch, 6),
            (MessageType::RespOk, 7),
            (MessageType::RespErrorNoent, 8),
            (MessageType::RespError, 9),
            (MessageType::RespRead, 10),
            (MessageType::RespMultiread, 11),
            (MessageType::RespList, 12),
            (MessageType::RespWatch, 13),
        ];
        for (ty, raw) in expected {
            assert_eq!(u8::from(ty), raw);
            assert_eq!(MessageType::from(raw), ty);
        }
        assert_eq!(MessageType::from(14), MessageType::Unknown(14));
        for raw in 0..=255u8 {
            assert_eq!(u8::from(MessageType::from(raw)), raw);
        }
    }

    #[test]
    fn header_layout_matches_c() {
        assert_eq!(field::TYPE, 0);
        assert_eq!(field::PATH.len(), QDB_MAX_PATH);
        // data_len is a u32, aligned to 4 after 1 + 64 bytes.
        assert_eq!(field::DATA_LEN.start, (1 + QDB_MAX_PATH).div_ceil(4) * 4);
        assert_eq!(field::PADDING, 65..68);
        assert_eq!(HEADER_LEN, field::DATA_LEN.end);
        assert_eq!(HEADER_LEN, 72);
    }

    /// `struct qdb_hdr` from `qubesdb.h`, laid out by the compiler under C
    /// rules (gcc printed the same: path at 1, data_len at 68, size 72).
    #[repr(C)]
    #[allow(dead_code)] // reason: only its layout is inspected.
    struct CQdbHdr {
        msg_type: u8,
        path: [u8; QDB_MAX_PATH],
        data_len: u32,
        data: [u8; 0],
    }

    #[test]
    fn offsets_match_repr_c_mirror() {
        use core::mem::{offset_of, size_of};
        assert_eq!(offset_of!(CQdbHdr, msg_type), field::TYPE);
        assert_eq!(offset_of!(CQdbHdr, path), field::PATH.start);
        assert_eq!(offset_of!(CQdbHdr, data_len), field::DATA_LEN.start);
        assert_eq!(offset_of!(CQdbHdr, data), field::DATA);
        assert_eq!(size_of::<CQdbHdr>(), HEADER_LEN);
    }

    #[test]
    fn every_message_type_golden_and_roundtrip() {
        let cases: &[(MessageType, &str, &[u8])] = &[
            (MessageType::Read, "/qubes-ip", b""),
            (MessageType::Write, "/qubes-iptables-error", b""),
            (
                MessageType::Write,
                "/qubes-firewall/10.137.0.5/0000",
                b"action=accept dst4=10.137.0.5/32 proto=tcp dstports=6668-6670",
            ),
            (MessageType::Multiread, "", b""),
            (MessageType::Multiread, "/qubes-firewall/", b""),
            (MessageType::List, "/qubes-firewall/", b""),
            (MessageType::Rm, "/qubes-firewall/10.137.0.5/", b""),
            (MessageType::Watch, "/qubes-firewall/", b""),
            (MessageType::Unwatch, "/qubes-firewall/", b""),
            (MessageType::RespOk, "/qubes-ip", b""),
            (MessageType::RespErrorNoent, "/missing", b""),
            (MessageType::RespError, "/qubes-ip", b""),
            (MessageType::RespRead, "/qubes-ip", b"10.137.0.2"),
            (MessageType::RespMultiread, "/qubes-gateway", b"10.137.0.1"),
            (MessageType::RespMultiread, "", b""),
            (MessageType::RespList, "/qubes-ip", b""),
            (MessageType::RespWatch, "/qubes-firewall/10.137.0.5", b""),
            (MessageType::Unknown(200), "/x", b"any\0bytes"),
        ];
        for (msg_type, path, data) in cases {
            let (bytes, len) = golden(u8::from(*msg_type), path.as_bytes(), data);
            let repr = Repr {
                msg_type: *msg_type,
                path,
                data,
            };
            let mut out = [0xAAu8; MESSAGE_MAX];
            assert_eq!(repr.emit(&mut out), Ok(len));
            assert_eq!(&out[..len], &bytes[..len], "{repr:?}");
            assert_eq!(Repr::parse_bytes(&bytes[..len]), Ok(repr));
            let packet = Packet::new_checked(&bytes[..len]).unwrap();
            assert_eq!(Repr::parse(&packet), Ok(repr));
            assert_eq!(packet.path(), path.as_bytes());
            assert_eq!(packet.data(), *data);
        }
    }

    #[test]
    fn sync_request_and_end_marker() {
        let mut out = [0u8; HEADER_LEN];
        assert_eq!(Repr::full_sync_request().emit(&mut out), Ok(72));
        let mut expected = [0u8; 72];
        expected[0] = 2;
        assert_eq!(out, expected);
        assert!(!Repr::full_sync_request().is_end_marker());
        assert!(Repr::multiread_end().is_end_marker());
        let entry = Repr {
            msg_type: MessageType::RespMultiread,
            path: "/qubes-ip",
            data: b"10.137.0.2",
        };
        assert!(!entry.is_end_marker());
    }

    #[test]
    fn bytes_after_path_nul_and_padding_are_ignored() {
        let (mut bytes, len) = golden(1, b"/qubes-ip", b"1.2.3.4");
        bytes[20..64].fill(b'Z');
        bytes[65..68].copy_from_slice(&[1, 2, 3]);
        let repr = Repr::parse_bytes(&bytes[..len]).unwrap();
        assert_eq!(repr.path, "/qubes-ip");
        assert_eq!(repr.data, b"1.2.3.4");
    }

    #[test]
    fn longest_path_and_data() {
        let path = [b'a'; 63];
        let data = [b'v'; MAX_DATA_LEN];
        let (bytes, len) = golden(1, &path, &data);
        let repr = Repr::parse_bytes(&bytes[..len]).unwrap();
        assert_eq!(repr.path.len(), 63);
        assert_eq!(repr.data.len(), 3071);
    }

    #[test]
    fn malformed_messages() {
        assert_eq!(
            Repr::parse_bytes(&[0u8; 71]),
            Err(Error::Truncated {
                needed: 72,
                available: 71
            })
        );
        let (bytes, _) = golden(1, b"/a", b"abc");
        assert_eq!(
            Repr::parse_bytes(&bytes[..74]),
            Err(Error::Truncated {
                needed: 75,
                available: 74
            })
        );
        let (mut bytes, _) = golden(1, b"/a", b"");
        bytes[68..72].copy_from_slice(&3072u32.to_le_bytes());
        assert_eq!(
            Repr::parse_bytes(&bytes),
            Err(Error::DataTooLong { len: 3072 })
        );
        bytes[68..72].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Repr::parse_bytes(&bytes),
            Err(Error::DataTooLong { .. })
        ));
        let (mut bytes, len) = golden(1, b"", b"");
        bytes[1..65].fill(b'a');
        assert_eq!(
            Repr::parse_bytes(&bytes[..len]),
            Err(Error::PathNotTerminated)
        );
        let (bytes, len) = golden(1, b"/a b", b"");
        assert_eq!(
            Repr::parse_bytes(&bytes[..len]),
            Err(Error::BadPathChar { at: 2, byte: b' ' })
        );
        let (bytes, len) = golden(1, b"/\xc3\xa9", b"");
        assert_eq!(
            Repr::parse_bytes(&bytes[..len]),
            Err(Error::BadPathChar { at: 1, byte: 0xc3 })
        );
        let (bytes, len) = golden(1, b"/a", b"x\0y");
        assert_eq!(
            Repr::parse_bytes(&bytes[..len]),
            Err(Error::NulInData { at: 1 })
        );
        let (bytes, len) = golden(4, b"/a", b"x");
        assert_eq!(
            Repr::parse_bytes(&bytes[..len]),
            Err(Error::UnexpectedData {
                msg_type: 4,
                len: 1
            })
        );
        let (bytes, len) = golden(9, b"/a", b"x");
        assert!(matches!(
            Repr::parse_bytes(&bytes[..len]),
            Err(Error::UnexpectedData { .. })
        ));
    }

    #[test]
    fn emit_refuses_what_parse_refuses() {
        let mut out = [0u8; MESSAGE_MAX + 10];
        let long = "/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut repr = Repr {
            msg_type: MessageType::Write,
            path: long,
            data: b"",
        };
        assert_eq!(repr.emit(&mut out), Err(Error::PathTooLong { len: 65 }));
        repr.path = "/a\0";
        assert_eq!(
            repr.emit(&mut out),
            Err(Error::BadPathChar { at: 2, byte: 0 })
        );
        repr.path = "/a";
        let big = [b'x'; QDB_MAX_DATA];
        repr.data = &big;
        assert_eq!(repr.emit(&mut out), Err(Error::DataTooLong { len: 3072 }));
        repr.data = b"a\0";
        assert_eq!(repr.emit(&mut out), Err(Error::NulInData { at: 1 }));
        repr.data = b"abc";
        assert_eq!(
            repr.emit(&mut out[..74]),
            Err(Error::BufferTooSmall {
                needed: 75,
                available: 74
            })
        );
        repr.msg_type = MessageType::RespOk;
        assert_eq!(
            repr.emit(&mut out),
            Err(Error::UnexpectedData {
                msg_type: 7,
                len: 3
            })
        );
    }

    #[test]
    fn path_rules_follow_verify_path() {
        assert!(check_path(b"/qubes-firewall/10.137.0.5/0000").is_ok());
        assert!(check_path(b"/qubes-firewall/").is_ok());
        assert!(check_path(b"").is_ok());
        assert!(check_path(b"/a_b-c.d:e@f").is_ok());
        assert!(check_path(b"/a+b").is_err());
        assert!(check_path(b"/a\\b").is_err());
        assert!(check_path(&[b'a'; 63]).is_ok());
        assert_eq!(check_path(&[b'a'; 64]), Err(Error::PathTooLong { len: 64 }));
    }

    #[test]
    fn vchan_and_local_types() {
        use MessageType as T;
        for ty in [
            T::Write,
            T::Multiread,
            T::Rm,
            T::RespOk,
            T::RespError,
            T::RespMultiread,
        ] {
            assert!(ty.allowed_on_vchan(), "{ty:?}");
        }
        for ty in [
            T::Read,
            T::List,
            T::Watch,
            T::Unwatch,
            T::RespErrorNoent,
            T::RespRead,
            T::RespList,
            T::RespWatch,
            T::Unknown(50),
        ] {
            assert!(!ty.allowed_on_vchan(), "{ty:?}");
        }
        assert!(T::Watch.allowed_on_local_socket());
        assert!(!T::RespOk.allowed_on_local_socket());
    }

    #[test]
    fn decoder_reassembles_any_chunking() {
        let messages = [
            Repr {
                msg_type: MessageType::RespMultiread,
                path: "/qubes-ip",
                data: b"10.137.0.2",
            },
            Repr::multiread_end(),
            Repr {
                msg_type: MessageType::Write,
                path: "/qubes-firewall/10.137.0.5",
                data: b"",
            },
        ];
        let mut stream = [0u8; 512];
        let mut len = 0;
        for message in &messages {
            len += message.emit(&mut stream[len..]).unwrap();
        }
        for chunk in 1..=len {
            let mut decoder = Decoder::new();
            let mut seen = 0;
            for piece in stream[..len].chunks(chunk) {
                let mut rest = piece;
                while !rest.is_empty() {
                    let (used, packet) = decoder.feed(rest).unwrap();
                    assert!(used > 0);
                    if let Some(packet) = packet {
                        assert_eq!(Repr::parse(&packet), Ok(messages[seen]));
                        seen += 1;
                    }
                    rest = &rest[used..];
                }
            }
            assert_eq!(seen, messages.len(), "chunk size {chunk}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn decoder_fails_on_bad_header_and_stays_failed() {
        let (mut bytes, _) = golden(1, b"/a", b"");
        bytes[68..72].copy_from_slice(&5000u32.to_le_bytes());
        let mut decoder = Decoder::new();
        assert_eq!(decoder.feed(&bytes[..40]).map(|(n, _)| n), Ok(40));
        assert_eq!(
            decoder.feed(&bytes[40..72]).map(|(n, _)| n),
            Err(Error::DataTooLong { len: 5000 })
        );
        assert_eq!(decoder.feed(b"x").map(|(n, _)| n), Err(Error::StreamFailed));
        let (mut bytes, _) = golden(1, b"", b"");
        bytes[1..65].fill(b'p');
        let mut decoder = Decoder::new();
        assert_eq!(
            decoder.feed(&bytes[..72]).map(|(n, _)| n),
            Err(Error::PathNotTerminated)
        );
    }
}
