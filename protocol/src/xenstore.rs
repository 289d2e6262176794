//! The XenStore wire protocol: `xsd_sockmsg` messages, their NUL-separated
//! payloads, the shared ring page and a streaming decoder.
//!
//! Used by the unikernel's xenstore client (over the shared ring page) and by
//! the hosted xenstore double (over a UNIX socket); both see the same byte
//! stream of messages. This module only parses and emits bytes: it never
//! touches shared memory (the platform layer copies bytes in and out of the
//! ring, using the pure index arithmetic in [`RingIndices`]) and it never
//! trusts a length, index or string that came from the other side.
//!
//! Facts and where they come from:
//! - Header `struct xsd_sockmsg { u32 type, req_id, tx_id, len; }`, 16 bytes,
//!   little-endian on x86 (Xen writes host order; every Xen/Qubes platform we
//!   target is little-endian), message type numbering (`enum
//!   xsd_sockmsg_type`, `XS_CONTROL` = 0 … `XS_SET_TARGET` = 19, 20 was
//!   `XS_RESTRICT` and is removed, `XS_RESET_WATCHES` = 21,
//!   `XS_DIRECTORY_PART` = 22), the `xsd_errors` names, the ring page
//!   `struct xenstore_domain_interface`, `XENSTORE_RING_SIZE` (1024),
//!   `MASK_XENSTORE_IDX`, `XENSTORE_PAYLOAD_MAX` (4096), the path limits and
//!   the `server_features`/`connection`/`error` values: Xen
//!   `xen/include/public/io/xs_wire.h`. `EPERM` joined `xsd_errors` and the
//!   `evtchn_port` field joined the ring page in later Xen releases (both
//!   listed here; `evtchn_port` is only meaningful when the server sets it).
//! - Payload syntax of every request and reply (`path|value|` for WRITE,
//!   `wpath|token|` for WATCH, `epath|token|` for WATCH_EVENT, `OK|` as the
//!   plain success reply, `E<name>|` for ERROR, `gencnt|child|*` plus an
//!   empty-string end marker for DIRECTORY_PART, `T|`/`F|` for
//!   TRANSACTION_END), allowed path characters and limits: Xen
//!   `docs/misc/xenstore.txt`; the DIRECTORY_PART end marker as xenstored's
//!   `send_directory_part()` writes it.
//! - Ring index rules (`prod - cons` never exceeds the ring size; contiguous
//!   input/output chunks): Xen's `check_indexes`, `get_input_chunk`,
//!   `get_output_chunk` in `tools/xenstored/domain.c` and Linux's
//!   `xenbus/xenbus_comms.c`.

use core::fmt;
use core::ops::Range;

use crate::framing::{Fault, Reassembler};

/// Length of `struct xsd_sockmsg`.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: the largest payload either side may send.
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Largest complete message: header plus the largest payload.
pub const MESSAGE_MAX: usize = HEADER_LEN + XENSTORE_PAYLOAD_MAX;
/// `XENSTORE_ABS_PATH_MAX`.
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`.
pub const XENSTORE_REL_PATH_MAX: usize = 2048;

/// Special watch path fired when a domain is introduced (`docs/misc/xenstore.txt`).
pub const WATCH_INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// Special watch path fired when a domain crashes, shuts down, is released or
/// destroyed.
pub const WATCH_RELEASE_DOMAIN: &str = "@releaseDomain";

/// Byte ranges of the `xsd_sockmsg` header fields.
pub mod field {
    use core::ops::Range;
    /// `uint32_t type`.
    pub const TYPE: Range<usize> = 0..4;
    /// `uint32_t req_id`, echoed in the daemon's response.
    pub const REQ_ID: Range<usize> = 4..8;
    /// `uint32_t tx_id`, 0 outside a transaction.
    pub const TX_ID: Range<usize> = 8..12;
    /// `uint32_t len`, the payload length.
    pub const LEN: Range<usize> = 12..16;
    /// The payload starts right after the header.
    pub const PAYLOAD: usize = 16;
}

/// Everything that can be wrong with a XenStore message or ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer ends before the header or the declared payload does.
    Truncated { needed: usize, available: usize },
    /// The header declares (or an emit would need) a payload above
    /// `XENSTORE_PAYLOAD_MAX`; xenstored kills such a connection.
    PayloadTooLong { len: usize },
    /// The caller's output buffer is too small for the message.
    BufferTooSmall { needed: usize, available: usize },
    /// A string field of the payload is not terminated by a NUL.
    MissingNul { field: &'static str },
    /// A string field of the payload is not valid UTF-8 (paths, tokens and
    /// the other strings of the protocol are ASCII).
    NotUtf8 { field: &'static str },
    /// A field to be emitted contains a NUL, which would shift every field
    /// after it.
    EmbeddedNul { field: &'static str },
    /// A decimal field is empty, has a non-digit or overflows.
    BadNumber { field: &'static str },
    /// Bytes follow the last field where the syntax allows none.
    TrailingBytes { field: &'static str },
    /// A fixed reply (`OK`, `T`/`F`) has other content.
    UnexpectedContent { field: &'static str },
    /// A message type that only the daemon sends (WATCH_EVENT, ERROR) was
    /// offered as a request.
    NotARequest { msg_type: u32 },
    /// A peer-written ring index pair is inconsistent: the producer is more
    /// than a ring size ahead of the consumer.
    RingIndex { cons: u32, prod: u32 },
    /// A stream decoder failed earlier; the byte stream has lost its framing
    /// and the connection must be dropped.
    StreamFailed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Truncated { needed, available } => write!(
                f,
                "xenstore message truncated: needs {needed} bytes, only {available} present; wait for more bytes or drop the peer"
            ),
            Error::PayloadTooLong { len } => write!(
                f,
                "xenstore payload of {len} bytes exceeds XENSTORE_PAYLOAD_MAX ({XENSTORE_PAYLOAD_MAX}); the peer violates the protocol, drop the connection"
            ),
            Error::BufferTooSmall { needed, available } => write!(
                f,
                "xenstore emit needs {needed} bytes but the buffer has {available}; pass a buffer of MESSAGE_MAX bytes"
            ),
            Error::MissingNul { field } => {
                write!(f, "xenstore payload field `{field}` is not NUL-terminated")
            }
            Error::NotUtf8 { field } => {
                write!(f, "xenstore payload field `{field}` is not valid UTF-8")
            }
            Error::EmbeddedNul { field } => write!(
                f,
                "xenstore field `{field}` contains a NUL byte and cannot be sent"
            ),
            Error::BadNumber { field } => write!(
                f,
                "xenstore payload field `{field}` is not a decimal number in range"
            ),
            Error::TrailingBytes { field } => {
                write!(f, "xenstore payload has unexpected bytes after `{field}`")
            }
            Error::UnexpectedContent { field } => {
                write!(
                    f,
                    "xenstore payload field `{field}` has an unexpected value"
                )
            }
            Error::NotARequest { msg_type } => write!(
                f,
                "xenstore message type {msg_type} is only sent by the daemon, not as a request"
            ),
            Error::RingIndex { cons, prod } => write!(
                f,
                "xenstore ring indices inconsistent (cons {cons}, prod {prod}): the peer corrupted the ring page, stop using it"
            ),
            Error::StreamFailed => write!(
                f,
                "xenstore stream decoder failed earlier and lost framing; reconnect"
            ),
        }
    }
}

/// `enum xsd_sockmsg_type`. Unknown values are kept as `Unknown(raw)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// `XS_CONTROL` (formerly `XS_DEBUG`), 0.
    Control,
    /// `XS_DIRECTORY`, 1.
    Directory,
    /// `XS_READ`, 2.
    Read,
    /// `XS_GET_PERMS`, 3.
    GetPerms,
    /// `XS_WATCH`, 4.
    Watch,
    /// `XS_UNWATCH`, 5.
    Unwatch,
    /// `XS_TRANSACTION_START`, 6.
    TransactionStart,
    /// `XS_TRANSACTION_END`, 7.
    TransactionEnd,
    /// `XS_INTRODUCE`, 8.
    Introduce,
    /// `XS_RELEASE`, 9.
    Release,
    /// `XS_GET_DOMAIN_PATH`, 10.
    GetDomainPath,
    /// `XS_WRITE`, 11.
    Write,
    /// `XS_MKDIR`, 12.
    Mkdir,
    /// `XS_RM`, 13.
    Rm,
    /// `XS_SET_PERMS`, 14.
    SetPerms,
    /// `XS_WATCH_EVENT`, 15.
    WatchEvent,
    /// `XS_ERROR`, 16.
    Error,
    /// `XS_IS_DOMAIN_INTRODUCED`, 17.
    IsDomainIntroduced,
    /// `XS_RESUME`, 18.
    Resume,
    /// `XS_SET_TARGET`, 19.
    SetTarget,
    /// `XS_RESET_WATCHES`, 21 (`XS_SET_TARGET + 2`; 20 was `XS_RESTRICT`).
    ResetWatches,
    /// `XS_DIRECTORY_PART`, 22.
    DirectoryPart,
    /// Any other value, including the removed `XS_RESTRICT` (20) and
    /// `XS_INVALID` (0xffff).
    Unknown(u32),
}

impl From<u32> for MessageType {
    fn from(raw: u32) -> Self {
        match raw {
            0 => MessageType::Control,
            1 => MessageType::Directory,
            2 => MessageType::Read,
            3 => MessageType::GetPerms,
            4 => MessageType::Watch,
            5 => MessageType::Unwatch,
            6 => MessageType::TransactionStart,
            7 => MessageType::TransactionEnd,
            8 => MessageType::Introduce,
            9 => MessageType::Release,
            10 => MessageType::GetDomainPath,
            11 => MessageType::Write,
            12 => MessageType::Mkdir,
            13 => MessageType::Rm,
            14 => MessageType::SetPerms,
            15 => MessageType::WatchEvent,
            16 => MessageType::Error,
            17 => MessageType::IsDomainIntroduced,
            18 => MessageType::Resume,
            19 => MessageType::SetTarget,
            21 => MessageType::ResetWatches,
            22 => MessageType::DirectoryPart,
            other => MessageType::Unknown(other),
        }
    }
}

impl From<MessageType> for u32 {
    fn from(value: MessageType) -> Self {
        match value {
            MessageType::Control => 0,
            MessageType::Directory => 1,
            MessageType::Read => 2,
            MessageType::GetPerms => 3,
            MessageType::Watch => 4,
            MessageType::Unwatch => 5,
            MessageType::TransactionStart => 6,
            MessageType::TransactionEnd => 7,
            MessageType::Introduce => 8,
            MessageType::Release => 9,
            MessageType::GetDomainPath => 10,
            MessageType::Write => 11,
            MessageType::Mkdir => 12,
            MessageType::Rm => 13,
            MessageType::SetPerms => 14,
            MessageType::WatchEvent => 15,
            MessageType::Error => 16,
            MessageType::IsDomainIntroduced => 17,
            MessageType::Resume => 18,
            MessageType::SetTarget => 19,
            MessageType::ResetWatches => 21,
            MessageType::DirectoryPart => 22,
            MessageType::Unknown(raw) => raw,
        }
    }
}

/// Reads a little-endian `u32` at `range`; 0 if the range is out of bounds
/// (callers only use ranges that a checked constructor validated).
fn le_u32(bytes: &[u8], range: Range<usize>) -> u32 {
    bytes
        .get(range)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes)
}

/// A checked view of one `xsd_sockmsg` header plus payload.
///
/// After [`Packet::new_checked`] the buffer holds the whole header and the
/// whole declared payload, the payload is at most `XENSTORE_PAYLOAD_MAX`,
/// and no accessor can panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` after checking the header, the payload limit and that
    /// the payload is present. Bytes after the payload are ignored (see
    /// [`Packet::total_len`]).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let bytes = buffer.as_ref();
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        }
        let len = le_u32(bytes, field::LEN) as usize;
        if len > XENSTORE_PAYLOAD_MAX {
            return Err(Error::PayloadTooLong { len });
        }
        if bytes.len() < HEADER_LEN + len {
            return Err(Error::Truncated {
                needed: HEADER_LEN + len,
                available: bytes.len(),
            });
        }
        Ok(Packet { buffer })
    }

    /// The message type.
    pub fn msg_type(&self) -> MessageType {
        MessageType::from(le_u32(self.buffer.as_ref(), field::TYPE))
    }

    /// The request id.
    pub fn req_id(&self) -> u32 {
        le_u32(self.buffer.as_ref(), field::REQ_ID)
    }

    /// The transaction id.
    pub fn tx_id(&self) -> u32 {
        le_u32(self.buffer.as_ref(), field::TX_ID)
    }

    /// The declared payload length (at most `XENSTORE_PAYLOAD_MAX`).
    pub fn payload_len(&self) -> usize {
        le_u32(self.buffer.as_ref(), field::LEN) as usize
    }

    /// Header plus payload: the number of bytes this message occupies.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(field::PAYLOAD..self.total_len())
            .unwrap_or(&[])
    }

    /// Gives back the wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// One message with its payload still raw: the framing layer.
///
/// Interpret the payload with [`Request::parse`] (daemon side) or
/// [`Response::parse`] (client side); the direction decides the syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr<'a> {
    pub msg_type: MessageType,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: &'a [u8],
}

impl<'a> Repr<'a> {
    /// Parses a checked packet.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &'a Packet<&'a T>) -> Repr<'a> {
        let bytes: &'a [u8] = packet.buffer.as_ref();
        let payload = bytes.get(field::PAYLOAD..packet.total_len()).unwrap_or(&[]);
        Repr {
            msg_type: packet.msg_type(),
            req_id: packet.req_id(),
            tx_id: packet.tx_id(),
            payload,
        }
    }

    /// Parses the message at the start of `bytes` (bytes after it are
    /// ignored; see [`Repr::buffer_len`] to step over it).
    pub fn parse_bytes(bytes: &'a [u8]) -> Result<Repr<'a>, Error> {
        let packet = Packet::new_checked(bytes)?;
        let payload = bytes.get(field::PAYLOAD..packet.total_len()).unwrap_or(&[]);
        Ok(Repr {
            msg_type: packet.msg_type(),
            req_id: packet.req_id(),
            tx_id: packet.tx_id(),
            payload,
        })
    }

    /// Bytes needed to emit this message.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Writes header and payload to the start of `buffer`; returns the
    /// number of bytes written.
    pub fn emit(&self, buffer: &mut [u8]) -> Result<usize, Error> {
        if self.payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(Error::PayloadTooLong {
                len: self.payload.len(),
            });
        }
        if buffer.len() < self.buffer_len() {
            return Err(Error::BufferTooSmall {
                needed: self.buffer_len(),
                available: buffer.len(),
            });
        }
        let mut writer = Writer::new(buffer, 0, MESSAGE_MAX);
        write_header(
            &mut writer,
            self.msg_type,
            self.req_id,
            self.tx_id,
            self.payload.len(),
        )?;
        writer.put(self.payload)?;
        Ok(writer.pos)
    }
}

fn write_header(
    writer: &mut Writer<'_>,
    msg_type: MessageType,
    req_id: u32,
    tx_id: u32,
    len: usize,
) -> Result<(), Error> {
    let len = u32::try_from(len).map_err(|_| Error::PayloadTooLong { len })?;
    writer.put(&u32::from(msg_type).to_le_bytes())?;
    writer.put(&req_id.to_le_bytes())?;
    writer.put(&tx_id.to_le_bytes())?;
    writer.put(&len.to_le_bytes())
}

/// Bounded writer into an optional caller buffer; with no buffer it only
/// counts, so lengths are computed by the very code that emits.
struct Writer<'b> {
    buffer: Option<&'b mut [u8]>,
    pos: usize,
    /// Position the writer must not pass (payload limit).
    limit: usize,
    /// Position where the limited region starts (for error reports).
    start: usize,
}

impl<'b> Writer<'b> {
    fn new(buffer: &'b mut [u8], start: usize, limit: usize) -> Self {
        Writer {
            buffer: Some(buffer),
            pos: start,
            limit,
            start,
        }
    }

    fn counting(limit: usize) -> Self {
        Writer {
            buffer: None,
            pos: 0,
            limit,
            start: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let end = self.pos.saturating_add(bytes.len());
        if end > self.limit {
            return Err(Error::PayloadTooLong {
                len: end - self.start,
            });
        }
        if let Some(buffer) = self.buffer.as_deref_mut() {
            let available = buffer.len();
            buffer
                .get_mut(self.pos..end)
                .ok_or(Error::BufferTooSmall {
                    needed: end,
                    available,
                })?
                .copy_from_slice(bytes);
        }
        self.pos = end;
        Ok(())
    }

    /// A string field followed by its NUL terminator.
    fn put_str0(&mut self, text: &str, field: &'static str) -> Result<(), Error> {
        if text.as_bytes().contains(&0) {
            return Err(Error::EmbeddedNul { field });
        }
        self.put(text.as_bytes())?;
        self.put(&[0])
    }

    /// A decimal number followed by a NUL.
    fn put_decimal0(&mut self, value: u64) -> Result<(), Error> {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = value;
        loop {
            at -= 1;
            if let Some(slot) = digits.get_mut(at) {
                *slot = b'0' + (rest % 10) as u8;
            }
            rest /= 10;
            if rest == 0 || at == 0 {
                break;
            }
        }
        self.put(digits.get(at..).unwrap_or(&[]))?;
        self.put(&[0])
    }
}

/// A payload being read field by field.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(payload: &'a [u8]) -> Self {
        Fields { rest: payload }
    }

    /// The next NUL-terminated string.
    fn str0(&mut self, field: &'static str) -> Result<&'a str, Error> {
        let nul = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(Error::MissingNul { field })?;
        let (text, rest) = self.rest.split_at(nul);
        self.rest = rest.get(1..).unwrap_or(&[]);
        core::str::from_utf8(text).map_err(|_| Error::NotUtf8 { field })
    }

    /// The next NUL-terminated decimal number of at most `max`.
    fn decimal0(&mut self, field: &'static str, max: u64) -> Result<u64, Error> {
        let text = self.str0(field)?;
        parse_decimal(text, max).ok_or(Error::BadNumber { field })
    }

    /// Everything left.
    fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.rest)
    }

    fn finish(&self, field: &'static str) -> Result<(), Error> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::TrailingBytes { field })
        }
    }
}

/// Strict unsigned decimal: 1–20 ASCII digits, value at most `max`.
fn parse_decimal(text: &str, max: u64) -> Option<u64> {
    if text.is_empty() || text.len() > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for byte in text.bytes() {
        let digit = byte.checked_sub(b'0').filter(|d| *d <= 9)?;
        value = value.checked_mul(10)?.checked_add(u64::from(digit))?;
    }
    (value <= max).then_some(value)
}

/// Zero or more NUL-terminated UTF-8 strings, as in DIRECTORY replies
/// (`<child-leaf-name>|*`), GET_PERMS replies and CONTROL arguments.
///
/// Holds the raw text including every terminator; iterate to get the items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StringList<'a> {
    text: &'a str,
}

impl<'a> StringList<'a> {
    /// Validates `bytes`: empty, or UTF-8 ending in a NUL.
    pub fn parse(bytes: &'a [u8], field: &'static str) -> Result<Self, Error> {
        if !bytes.is_empty() && bytes.last() != Some(&0) {
            return Err(Error::MissingNul { field });
        }
        let text = core::str::from_utf8(bytes).map_err(|_| Error::NotUtf8 { field })?;
        Ok(StringList { text })
    }

    /// The items, without their terminators.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.text.split_terminator('\0')
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// True when there is no item.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The raw bytes, every item with its NUL.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }
}

/// The `xsd_errors` names, as carried in an ERROR reply (`E<name>|`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode<'a> {
    Einval,
    Eacces,
    Eexist,
    Eisdir,
    Enoent,
    Enomem,
    Enospc,
    Eio,
    Enotempty,
    Enosys,
    Erofs,
    Ebusy,
    Eagain,
    Eisconn,
    E2big,
    Eperm,
    /// A name not in `xsd_errors` (kept verbatim).
    Other(&'a str),
}

const ERROR_NAMES: [(ErrorCode<'static>, &str); 16] = [
    (ErrorCode::Einval, "EINVAL"),
    (ErrorCode::Eacces, "EACCES"),
    (ErrorCode::Eexist, "EEXIST"),
    (ErrorCode::Eisdir, "EISDIR"),
    (ErrorCode::Enoent, "ENOENT"),
    (ErrorCode::Enomem, "ENOMEM"),
    (ErrorCode::Enospc, "ENOSPC"),
    (ErrorCode::Eio, "EIO"),
    (ErrorCode::Enotempty, "ENOTEMPTY"),
    (ErrorCode::Enosys, "ENOSYS"),
    (ErrorCode::Erofs, "EROFS"),
    (ErrorCode::Ebusy, "EBUSY"),
    (ErrorCode::Eagain, "EAGAIN"),
    (ErrorCode::Eisconn, "EISCONN"),
    (ErrorCode::E2big, "E2BIG"),
    (ErrorCode::Eperm, "EPERM"),
];

impl<'a> ErrorCode<'a> {
    /// The code for a name as sent on the wire.
    pub fn from_name(name: &'a str) -> Self {
        ERROR_NAMES
            .iter()
            .find(|(_, known)| *known == name)
            .map_or(ErrorCode::Other(name), |(code, _)| *code)
    }

    /// The name sent on the wire, e.g. `"ENOENT"`.
    pub fn name(&self) -> &'a str {
        match *self {
            ErrorCode::Other(name) => name,
            known => ERROR_NAMES
                .iter()
                .find(|(code, _)| *code == known)
                .map_or("EINVAL", |(_, name)| *name),
        }
    }
}

/// Access letter of a `<perm-as-string>` (`w`, `r`, `b`, `n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `w<domid>`: write only.
    Write,
    /// `r<domid>`: read only.
    Read,
    /// `b<domid>`: read and write.
    Both,
    /// `n<domid>`: no access.
    None,
}

/// One `<perm-as-string>` of GET_PERMS/SET_PERMS, e.g. `b0` or `r5`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    pub access: Access,
    pub domid: u16,
}

impl Permission {
    /// Parses one permission string (without its NUL).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let field = "permission";
        let (letter, domid) = text.split_at_checked(1).ok_or(Error::BadNumber { field })?;
        let access = match letter {
            "w" => Access::Write,
            "r" => Access::Read,
            "b" => Access::Both,
            "n" => Access::None,
            _ => return Err(Error::UnexpectedContent { field }),
        };
        let domid = parse_decimal(domid, u64::from(u16::MAX)).ok_or(Error::BadNumber { field })?;
        Ok(Permission {
            access,
            domid: domid as u16,
        })
    }
}

/// Checks a path against `docs/misc/xenstore.txt`: ASCII alphanumerics and
/// `-/_@`, no doubled or trailing slash (except the root `/`), not empty,
/// at most `XENSTORE_ABS_PATH_MAX` bytes absolute or
/// `XENSTORE_REL_PATH_MAX` relative. A daemon answers `EINVAL` otherwise.
pub fn is_valid_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    let limit = if path.starts_with('/') {
        XENSTORE_ABS_PATH_MAX
    } else {
        XENSTORE_REL_PATH_MAX
    };
    if bytes.is_empty() || bytes.len() > limit {
        return false;
    }
    if path == "/" {
        return true;
    }
    let chars_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@'));
    chars_ok && !path.contains("//") && !path.ends_with('/')
}

/// A request from a client to the daemon, with its payload interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// `CONTROL <command>|[<parameters>|]`.
    Control { args: StringList<'a> },
    /// `DIRECTORY <path>|`.
    Directory { path: &'a str },
    /// `DIRECTORY_PART <path>|<offset>|`.
    DirectoryPart { path: &'a str, offset: u32 },
    /// `READ <path>|`.
    Read { path: &'a str },
    /// `GET_PERMS <path>|`.
    GetPerms { path: &'a str },
    /// `WATCH <wpath>|<token>|`.
    Watch { path: &'a str, token: &'a str },
    /// `UNWATCH <wpath>|<token>|`.
    Unwatch { path: &'a str, token: &'a str },
    /// `TRANSACTION_START |`.
    TransactionStart,
    /// `TRANSACTION_END T|` (commit) or `F|` (abort).
    TransactionEnd { commit: bool },
    /// `INTRODUCE <domid>|<mfn>|<evtchn>|`.
    Introduce { domid: u16, mfn: u64, evtchn: u32 },
    /// `RELEASE <domid>|`.
    Release { domid: u16 },
    /// `GET_DOMAIN_PATH <domid>|`.
    GetDomainPath { domid: u16 },
    /// `WRITE <path>|<value|>` (the value is raw bytes, no terminator).
    Write { path: &'a str, value: &'a [u8] },
    /// `MKDIR <path>|`.
    Mkdir { path: &'a str },
    /// `RM <path>|`.
    Rm { path: &'a str },
    /// `SET_PERMS <path>|<perm-as-string>|+`.
    SetPerms {
        path: &'a str,
        perms: StringList<'a>,
    },
    /// `IS_DOMAIN_INTRODUCED <domid>|`.
    IsDomainIntroduced { domid: u16 },
    /// `RESUME <domid>|`.
    Resume { domid: u16 },
    /// `SET_TARGET <domid>|<tdomid>|`.
    SetTarget { domid: u16, target: u16 },
    /// `RESET_WATCHES |`.
    ResetWatches,
    /// A type this module does not know; the payload is kept raw.
    Unknown { msg_type: u32, payload: &'a [u8] },
}

/// An empty-string payload: `""` or `"\0"` (Linux and libxenstore send the
/// latter); anything else is an error.
fn parse_empty(payload: &[u8], field: &'static str) -> Result<(), Error> {
    match payload {
        [] | [0] => Ok(()),
        _ => Err(Error::UnexpectedContent { field }),
    }
}

fn single_path(payload: &[u8]) -> Result<&str, Error> {
    let mut fields = Fields::new(payload);
    let path = fields.str0("path")?;
    fields.finish("path")?;
    Ok(path)
}

fn single_domid(payload: &[u8]) -> Result<u16, Error> {
    let mut fields = Fields::new(payload);
    let domid = fields.decimal0("domid", u64::from(u16::MAX))? as u16;
    fields.finish("domid")?;
    Ok(domid)
}

fn path_and_token(payload: &[u8]) -> Result<(&str, &str), Error> {
    let mut fields = Fields::new(payload);
    let path = fields.str0("path")?;
    let token = fields.str0("token")?;
    // `<wpath>|<token>|?`: a reserved trailing value is ignored.
    Ok((path, token))
}

impl<'a> Request<'a> {
    /// Interprets the payload of a message of type `msg_type` sent by a
    /// client.
    pub fn parse(msg_type: MessageType, payload: &'a [u8]) -> Result<Self, Error> {
        if payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(Error::PayloadTooLong { len: payload.len() });
        }
        Ok(match msg_type {
            MessageType::Control => Request::Control {
                args: StringList::parse(payload, "control arguments")?,
            },
            MessageType::Directory => Request::Directory {
                path: single_path(payload)?,
            },
            MessageType::DirectoryPart => {
                let mut fields = Fields::new(payload);
                let path = fields.str0("path")?;
                let offset = fields.decimal0("offset", u64::from(u32::MAX))? as u32;
                fields.finish("offset")?;
                Request::DirectoryPart { path, offset }
            }
            MessageType::Read => Request::Read {
                path: single_path(payload)?,
            },
            MessageType::GetPerms => Request::GetPerms {
                path: single_path(payload)?,
            },
            MessageType::Watch => {
                let (path, token) = path_and_token(payload)?;
                Request::Watch { path, token }
            }
            MessageType::Unwatch => {
                let (path, token) = path_and_token(payload)?;
                Request::Unwatch { path, token }
            }
            MessageType::TransactionStart => {
                parse_empty(payload, "transaction start")?;
                Request::TransactionStart
            }
            MessageType::TransactionEnd => {
                let mut fields = Fields::new(payload);
                let commit = match fields.str0("commit flag")? {
                    "T" => true,
                    "F" => false,
                    _ => {
                        return Err(Error::UnexpectedContent {
                            field: "commit flag",
                        });
                    }
                };
                fields.finish("commit flag")?;
                Request::TransactionEnd { commit }
            }
            MessageType::Introduce => {
                let mut fields = Fields::new(payload);
                let domid = fields.decimal0("domid", u64::from(u16::MAX))? as u16;
                let mfn = fields.decimal0("mfn", u64::MAX)?;
                let evtchn = fields.decimal0("evtchn", u64::from(u32::MAX))? as u32;
                // `<domid>|<mfn>|<evtchn>|?`: a reserved trailing value is ignored.
                Request::Introduce { domid, mfn, evtchn }
            }
            MessageType::Release => Request::Release {
                domid: single_domid(payload)?,
            },
            MessageType::GetDomainPath => Request::GetDomainPath {
                domid: single_domid(payload)?,
            },
            MessageType::Write => {
                let mut fields = Fields::new(payload);
                let path = fields.str0("path")?;
                Request::Write {
                    path,
                    value: fields.rest(),
                }
            }
            MessageType::Mkdir => Request::Mkdir {
                path: single_path(payload)?,
            },
            MessageType::Rm => Request::Rm {
                path: single_path(payload)?,
            },
            MessageType::SetPerms => {
                let mut fields = Fields::new(payload);
                let path = fields.str0("path")?;
                let perms = StringList::parse(fields.rest(), "permissions")?;
                if perms.is_empty() {
                    return Err(Error::Truncated {
                        needed: payload.len() + 1,
                        available: payload.len(),
                    });
                }
                Request::SetPerms { path, perms }
            }
            MessageType::IsDomainIntroduced => Request::IsDomainIntroduced {
                domid: single_domid(payload)?,
            },
            MessageType::Resume => Request::Resume {
                domid: single_domid(payload)?,
            },
            MessageType::SetTarget => {
                let mut fields = Fields::new(payload);
                let domid = fields.decimal0("domid", u64::from(u16::MAX))? as u16;
                let target = fields.decimal0("target domid", u64::from(u16::MAX))? as u16;
                fields.finish("target domid")?;
                Request::SetTarget { domid, target }
            }
            MessageType::ResetWatches => {
                parse_empty(payload, "reset watches")?;
                Request::ResetWatches
            }
            MessageType::WatchEvent | MessageType::Error => {
                return Err(Error::NotARequest {
                    msg_type: msg_type.into(),
                });
            }
            MessageType::Unknown(raw) => Request::Unknown {
                msg_type: raw,
                payload,
            },
        })
    }

    /// Parses a whole message (header and payload) sent by a client.
    pub fn parse_message(bytes: &'a [u8]) -> Result<(Repr<'a>, Self), Error> {
        let repr = Repr::parse_bytes(bytes)?;
        let request = Request::parse(repr.msg_type, repr.payload)?;
        Ok((repr, request))
    }

    /// The message type this request is sent with.
    pub fn msg_type(&self) -> MessageType {
        match *self {
            Request::Control { .. } => MessageType::Control,
            Request::Directory { .. } => MessageType::Directory,
            Request::DirectoryPart { .. } => MessageType::DirectoryPart,
            Request::Read { .. } => MessageType::Read,
            Request::GetPerms { .. } => MessageType::GetPerms,
            Request::Watch { .. } => MessageType::Watch,
            Request::Unwatch { .. } => MessageType::Unwatch,
            Request::TransactionStart => MessageType::TransactionStart,
            Request::TransactionEnd { .. } => MessageType::TransactionEnd,
            Request::Introduce { .. } => MessageType::Introduce,
            Request::Release { .. } => MessageType::Release,
            Request::GetDomainPath { .. } => MessageType::GetDomainPath,
            Request::Write { .. } => MessageType::Write,
            Request::Mkdir { .. } => MessageType::Mkdir,
            Request::Rm { .. } => MessageType::Rm,
            Request::SetPerms { .. } => MessageType::SetPerms,
            Request::IsDomainIntroduced { .. } => MessageType::IsDomainIntroduced,
            Request::Resume { .. } => MessageType::Resume,
            Request::SetTarget { .. } => MessageType::SetTarget,
            Request::ResetWatches => MessageType::ResetWatches,
            Request::Unknown { msg_type, .. } => MessageType::from(msg_type),
        }
    }

    fn write_payload(&self, writer: &mut Writer<'_>) -> Result<(), Error> {
        match *self {
            Request::Control { args } => writer.put(args.as_bytes()),
            Request::Directory { path }
            | Request::Read { path }
            | Request::GetPerms { path }
            | Request::Mkdir { path }
            | Request::Rm { path } => writer.put_str0(path, "path"),
            Request::DirectoryPart { path, offset } => {
                writer.put_str0(path, "path")?;
                writer.put_decimal0(u64::from(offset))
            }
            Request::Watch { path, token } | Request::Unwatch { path, token } => {
                writer.put_str0(path, "path")?;
                writer.put_str0(token, "token")
            }
            Request::TransactionStart | Request::ResetWatches => writer.put(&[0]),
            Request::TransactionEnd { commit } => writer.put(if commit { b"T\0" } else { b"F\0" }),
            Request::Introduce { domid, mfn, evtchn } => {
                writer.put_decimal0(u64::from(domid))?;
                writer.put_decimal0(mfn)?;
                writer.put_decimal0(u64::from(evtchn))
            }
            Request::Release { domid }
            | Request::GetDomainPath { domid }
            | Request::IsDomainIntroduced { domid }
            | Request::Resume { domid } => writer.put_decimal0(u64::from(domid)),
            Request::Write { path, value } => {
                writer.put_str0(path, "path")?;
                writer.put(value)
            }
            Request::SetPerms { path, perms } => {
                writer.put_str0(path, "path")?;
                writer.put(perms.as_bytes())
            }
            Request::SetTarget { domid, target } => {
                writer.put_decimal0(u64::from(domid))?;
                writer.put_decimal0(u64::from(target))
            }
            Request::Unknown { payload, .. } => writer.put(payload),
        }
    }

    /// Length of the payload this request emits.
    pub fn payload_len(&self) -> Result<usize, Error> {
        let mut writer = Writer::counting(XENSTORE_PAYLOAD_MAX);
        self.write_payload(&mut writer)?;
        Ok(writer.pos)
    }

    /// Emits the whole message (header and payload) into `buffer`; returns
    /// the number of bytes written.
    pub fn emit(&self, req_id: u32, tx_id: u32, buffer: &mut [u8]) -> Result<usize, Error> {
        emit_message(buffer, self.msg_type(), req_id, tx_id, |writer| {
            self.write_payload(writer)
        })
    }
}

/// Computes the payload length, checks the buffer, then writes the header
/// and the payload.
fn emit_message(
    buffer: &mut [u8],
    msg_type: MessageType,
    req_id: u32,
    tx_id: u32,
    payload: impl Fn(&mut Writer<'_>) -> Result<(), Error>,
) -> Result<usize, Error> {
    let mut counter = Writer::counting(XENSTORE_PAYLOAD_MAX);
    payload(&mut counter)?;
    let total = HEADER_LEN + counter.pos;
    if buffer.len() < total {
        return Err(Error::BufferTooSmall {
            needed: total,
            available: buffer.len(),
        });
    }
    let mut writer = Writer::new(buffer, 0, MESSAGE_MAX);
    write_header(&mut writer, msg_type, req_id, tx_id, counter.pos)?;
    payload(&mut writer)?;
    Ok(writer.pos)
}

/// A reply (or watch event) from the daemon to a client, with its payload
/// interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response<'a> {
    /// The plain success reply `OK|` to a request of type `msg_type`
    /// (WRITE, MKDIR, RM, SET_PERMS, WATCH, UNWATCH, TRANSACTION_END,
    /// INTRODUCE, RELEASE, RESUME, SET_TARGET, RESET_WATCHES).
    Ok { msg_type: MessageType },
    /// CONTROL reply: implementation-specific bytes.
    Control { output: &'a [u8] },
    /// READ reply: the value, raw bytes without a terminator.
    Read { value: &'a [u8] },
    /// DIRECTORY reply: `<child-leaf-name>|*`.
    Directory { names: StringList<'a> },
    /// DIRECTORY_PART reply: `<gencnt>|<child-leaf-name>|*`, with an extra
    /// empty string when this part reaches the end of the list.
    DirectoryPart {
        generation: u64,
        names: StringList<'a>,
        complete: bool,
    },
    /// GET_PERMS reply: `<perm-as-string>|+`.
    GetPerms { perms: StringList<'a> },
    /// TRANSACTION_START reply: `<transid>|`.
    TransactionStart { tx_id: u32 },
    /// GET_DOMAIN_PATH reply: `<path>|`.
    GetDomainPath { path: &'a str },
    /// IS_DOMAIN_INTRODUCED reply: `T|` or `F|`.
    IsDomainIntroduced { introduced: bool },
    /// WATCH_EVENT: `<epath>|<token>|` (req_id and tx_id are 0).
    WatchEvent { path: &'a str, token: &'a str },
    /// ERROR: `E<name>|`.
    Error { code: ErrorCode<'a> },
    /// A type this module does not know; the payload is kept raw.
    Unknown { msg_type: u32, payload: &'a [u8] },
}

fn parse_ok(payload: &[u8]) -> Result<(), Error> {
    if payload == b"OK\0" {
        Ok(())
    } else {
        Err(Error::UnexpectedContent { field: "OK reply" })
    }
}

impl<'a> Response<'a> {
    /// Interprets the payload of a message of type `msg_type` sent by the
    /// daemon.
    pub fn parse(msg_type: MessageType, payload: &'a [u8]) -> Result<Self, Error> {
        if payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(Error::PayloadTooLong { len: payload.len() });
        }
        Ok(match msg_type {
            MessageType::Write
            | MessageType::Mkdir
            | MessageType::Rm
            | MessageType::SetPerms
            | MessageType::Watch
            | MessageType::Unwatch
            | MessageType::TransactionEnd
            | MessageType::Introduce
            | MessageType::Release
            | MessageType::Resume
            | MessageType::SetTarget
            | MessageType::ResetWatches => {
                parse_ok(payload)?;
                Response::Ok { msg_type }
            }
            MessageType::Control => Response::Control { output: payload },
            MessageType::Read => Response::Read { value: payload },
            MessageType::Directory => Response::Directory {
                names: StringList::parse(payload, "directory entries")?,
            },
            MessageType::DirectoryPart => {
                let mut fields = Fields::new(payload);
                let generation = fields.decimal0("generation", u64::MAX)?;
                let rest = fields.rest();
                // The end of the list is marked by one extra empty string.
                let complete = rest == [0] || rest.ends_with(&[0, 0]);
                let names = if complete {
                    rest.get(..rest.len() - 1).unwrap_or(&[])
                } else {
                    rest
                };
                Response::DirectoryPart {
                    generation,
                    names: StringList::parse(names, "directory entries")?,
                    complete,
                }
            }
            MessageType::GetPerms => {
                let perms = StringList::parse(payload, "permissions")?;
                if perms.is_empty() {
                    return Err(Error::Truncated {
                        needed: 1,
                        available: 0,
                    });
                }
                Response::GetPerms { perms }
            }
            MessageType::TransactionStart => {
                let mut fields = Fields::new(payload);
                let tx_id = fields.decimal0("transaction id", u64::from(u32::MAX))? as u32;
                fields.finish("transaction id")?;
                Response::TransactionStart { tx_id }
            }
            MessageType::GetDomainPath => Response::GetDomainPath {
                path: single_path(payload)?,
            },
            MessageType::IsDomainIntroduced => {
                let introduced = match payload {
                    b"T\0" => true,
                    b"F\0" => false,
                    _ => {
                        return Err(Error::UnexpectedContent {
                            field: "introduced flag",
                        });
                    }
                };
                Response::IsDomainIntroduced { introduced }
            }
            MessageType::WatchEvent => {
                let mut fields = Fields::new(payload);
                let path = fields.str0("path")?;
                let token = fields.str0("token")?;
                fields.finish("token")?;
                Response::WatchEvent { path, token }
            }
            MessageType::Error => {
                let mut fields = Fields::new(payload);
                let name = fields.str0("error name")?;
                fields.finish("error name")?;
                Response::Error {
                    code: ErrorCode::from_name(name),
                }
            }
            MessageType::Unknown(raw) => Response::Unknown {
                msg_type: raw,
                payload,
            },
        })
    }

    /// Parses a whole message (header and payload) sent by the daemon.
    pub fn parse_message(bytes: &'a [u8]) -> Result<(Repr<'a>, Self), Error> {
        let repr = Repr::parse_bytes(bytes)?;
        let response = Response::parse(repr.msg_type, repr.payload)?;
        Ok((repr, response))
    }

    /// The message type this response is sent with.
    pub fn msg_type(&self) -> MessageType {
        match *self {
            Response::Ok { msg_type } => msg_type,
            Response::Control { .. } => MessageType::Control,
            Response::Read { .. } => MessageType::Read,
            Response::Directory { .. } => MessageType::Directory,
            Response::DirectoryPart { .. } => MessageType::DirectoryPart,
            Response::GetPerms { .. } => MessageType::GetPerms,
            Response::TransactionStart { .. } => MessageType::TransactionStart,
            Response::GetDomainPath { .. } => MessageType::GetDomainPath,
            Response::IsDomainIntroduced { .. } => MessageType::IsDomainIntroduced,
            Response::WatchEvent { .. } => MessageType::WatchEvent,
            Response::Error { .. } => MessageType::Error,
            Response::Unknown { msg_type, .. } => MessageType::from(msg_type),
        }
    }

    fn write_payload(&self, writer: &mut Writer<'_>) -> Result<(), Error> {
        match *self {
            Response::Ok { .. } => writer.put(b"OK\0"),
            Response::Control { output: bytes }
            | Response::Read { value: bytes }
            | Response::Unknown { payload: bytes, .. } => writer.put(bytes),
            Response::Directory { names } => writer.put(names.as_bytes()),
            Response::DirectoryPart {
                generation,
                names,
                complete,
            } => {
                writer.put_decimal0(generation)?;
                writer.put(names.as_bytes())?;
                if complete { writer.put(&[0]) } else { Ok(()) }
            }
            Response::GetPerms { perms } => writer.put(perms.as_bytes()),
            Response::TransactionStart { tx_id } => writer.put_decimal0(u64::from(tx_id)),
            Response::GetDomainPath { path } => writer.put_str0(path, "path"),
            Response::IsDomainIntroduced { introduced } => {
                writer.put(if introduced { b"T\0" } else { b"F\0" })
            }
            Response::WatchEvent { path, token } => {
                writer.put_str0(path, "path")?;
                writer.put_str0(token, "token")
            }
            Response::Error { code } => writer.put_str0(code.name(), "error name"),
        }
    }

    /// Length of the payload this response emits.
    pub fn payload_len(&self) -> Result<usize, Error> {
        let mut writer = Writer::counting(XENSTORE_PAYLOAD_MAX);
        self.write_payload(&mut writer)?;
        Ok(writer.pos)
    }

    /// Emits the whole message (header and payload) into `buffer`; returns
    /// the number of bytes written. Watch events use req_id = tx_id = 0.
    pub fn emit(&self, req_id: u32, tx_id: u32, buffer: &mut [u8]) -> Result<usize, Error> {
        emit_message(buffer, self.msg_type(), req_id, tx_id, |writer| {
            self.write_payload(writer)
        })
    }
}

/// What [`Decoder::feed`] returns: the bytes it consumed and, when they
/// completed one, the message (borrowed from the decoder).
pub type Fed<'d> = (usize, Option<Packet<&'d [u8]>>);

/// Reassembles whole messages from a byte stream delivered in arbitrary
/// chunks (ring reads, socket reads).
///
/// Holds at most one message (`MESSAGE_MAX` bytes). A header declaring more
/// than `XENSTORE_PAYLOAD_MAX` is an error, after which the decoder stays
/// failed: the stream has lost its framing.
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
    /// message, the message (valid until the next call). Call again with the
    /// unconsumed rest.
    pub fn feed(&mut self, input: &[u8]) -> Result<Fed<'_>, Error> {
        let body_len = |header: &[u8]| match le_u32(header, field::LEN) as usize {
            len if len > XENSTORE_PAYLOAD_MAX => Err(Error::PayloadTooLong { len }),
            len => Ok(len),
        };
        match self.inner.feed(input, HEADER_LEN, body_len) {
            Ok((consumed, None)) => Ok((consumed, None)),
            Ok((consumed, Some(message))) => Ok((consumed, Some(Packet::new_checked(message)?))),
            Err(Fault::Failed) => Err(Error::StreamFailed),
            Err(Fault::Header(error)) => Err(error),
        }
    }
}

/// `XENSTORE_RING_SIZE`: bytes in each of the two rings.
pub const XENSTORE_RING_SIZE: u32 = 1024;

/// `MASK_XENSTORE_IDX`: the position in the ring of a free-running index.
pub const fn mask_index(index: u32) -> usize {
    (index & (XENSTORE_RING_SIZE - 1)) as usize
}

/// Byte offsets of `struct xenstore_domain_interface` in the shared page.
pub mod ring {
    /// `char req[XENSTORE_RING_SIZE]`: requests to the daemon.
    pub const REQ: usize = 0;
    /// `char rsp[XENSTORE_RING_SIZE]`: replies and watch events.
    pub const RSP: usize = 1024;
    /// `XENSTORE_RING_IDX req_cons` (written by the daemon).
    pub const REQ_CONS: usize = 2048;
    /// `XENSTORE_RING_IDX req_prod` (written by the guest).
    pub const REQ_PROD: usize = 2052;
    /// `XENSTORE_RING_IDX rsp_cons` (written by the guest).
    pub const RSP_CONS: usize = 2056;
    /// `XENSTORE_RING_IDX rsp_prod` (written by the daemon).
    pub const RSP_PROD: usize = 2060;
    /// `uint32_t server_features`: bitmap of `XENSTORE_SERVER_FEATURE_*`.
    pub const SERVER_FEATURES: usize = 2064;
    /// `uint32_t connection`: `XENSTORE_CONNECTED` or `XENSTORE_RECONNECT`.
    pub const CONNECTION: usize = 2068;
    /// `uint32_t error`: `XENSTORE_ERROR_*` (if the server has
    /// `XENSTORE_SERVER_FEATURE_ERROR`).
    pub const ERROR: usize = 2072;
    /// `uint32_t evtchn_port` (newer Xen; only meaningful when non-zero).
    pub const EVTCHN_PORT: usize = 2076;
    /// Size of the structure up to and including `error`.
    pub const INTERFACE_LEN: usize = 2076;

    /// `XENSTORE_SERVER_FEATURE_RECONNECTION`.
    pub const XENSTORE_SERVER_FEATURE_RECONNECTION: u32 = 1;
    /// `XENSTORE_SERVER_FEATURE_ERROR`.
    pub const XENSTORE_SERVER_FEATURE_ERROR: u32 = 2;
    /// `XENSTORE_CONNECTED`: the steady state.
    pub const XENSTORE_CONNECTED: u32 = 0;
    /// `XENSTORE_RECONNECT`: the guest has initiated a reconnect.
    pub const XENSTORE_RECONNECT: u32 = 1;
    /// `XENSTORE_ERROR_NONE`.
    pub const XENSTORE_ERROR_NONE: u32 = 0;
    /// `XENSTORE_ERROR_COMM`: communication problem.
    pub const XENSTORE_ERROR_COMM: u32 = 1;
    /// `XENSTORE_ERROR_RINGIDX`: invalid ring index.
    pub const XENSTORE_ERROR_RINGIDX: u32 = 2;
    /// `XENSTORE_ERROR_PROTO`: protocol violation (payload too long).
    pub const XENSTORE_ERROR_PROTO: u32 = 3;
}

/// A validated (consumer, producer) pair of one xenstore ring, read once
/// from the shared page.
///
/// Indices run freely (wrapping at 2^32) and are masked to find a position;
/// the producer may be at most `XENSTORE_RING_SIZE` ahead of the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIndices {
    cons: u32,
    prod: u32,
}

impl RingIndices {
    /// Checks a copied pair of indices (`check_indexes` in Xen).
    pub fn new(cons: u32, prod: u32) -> Result<Self, Error> {
        if prod.wrapping_sub(cons) > XENSTORE_RING_SIZE {
            return Err(Error::RingIndex { cons, prod });
        }
        Ok(RingIndices { cons, prod })
    }

    /// The consumer index.
    pub fn cons(&self) -> u32 {
        self.cons
    }

    /// The producer index.
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Bytes written and not yet consumed.
    pub fn available(&self) -> u32 {
        self.prod.wrapping_sub(self.cons)
    }

    /// Bytes the producer may still write.
    pub fn free(&self) -> u32 {
        XENSTORE_RING_SIZE - self.available()
    }

    /// The contiguous range of the ring array the consumer can read now
    /// (`get_input_chunk`); empty when nothing is available.
    pub fn input_chunk(&self) -> Range<usize> {
        let start = mask_index(self.cons);
        let len = (XENSTORE_RING_SIZE as usize - start).min(self.available() as usize);
        start..start + len
    }

    /// The contiguous range of the ring array the producer can write now
    /// (`get_output_chunk`); empty when the ring is full.
    pub fn output_chunk(&self) -> Range<usize> {
        let start = mask_index(self.prod);
        let len = (XENSTORE_RING_SIZE as usize - start).min(self.free() as usize);
        start..start + len
    }

    /// The indices after the consumer read `count` bytes.
    pub fn consume(&self, count: u32) -> Result<Self, Error> {
        if count > self.available() {
            return Err(Error::RingIndex {
                cons: self.cons.wrapping_add(count),
                prod: self.prod,
            });
        }
        Ok(RingIndices {
            cons: self.cons.wrapping_add(count),
            prod: self.prod,
        })
    }

    /// The indices after the producer wrote `count` bytes.
    pub fn produce(&self, count: u32) -> Result<Self, Error> {
        if count > self.free() {
            return Err(Error::RingIndex {
                cons: self.cons,
                prod: self.prod.wrapping_add(count),
            });
        }
        Ok(RingIndices {
            cons: self.cons,
            prod: self.prod.wrapping_add(count),
        })
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    /// Golden header bytes: type, req_id, tx_id, len as little-endian u32.
    fn header(msg_type: u32, req_id: u32, tx_id: u32, len: u32) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&msg_type.to_le_bytes());
        out[4..8].copy_from_slice(&req_id.to_le_bytes());
        out[8..12].copy_from_slice(&tx_id.to_le_bytes());
        out[12..16].copy_from_slice(&len.to_le_bytes());
        out
    }

    fn message(
        msg_type: u32,
        req_id: u32,
        tx_id: u32,
        payload: &[u8],
    ) -> ([u8; MESSAGE_MAX], usize) {
        let mut out = [0u8; MESSAGE_MAX];
        out[..16].copy_from_slice(&header(msg_type, req_id, tx_id, payload.len() as u32));
        out[16..16 + payload.len()].copy_from_slice(payload);
        (out, 16 + payload.len())
    }

    #[test]
    fn type_numbering_matches_xs_wire_h() {
        let expected = [
            (MessageType::Control, 0),
            (MessageType::Directory, 1),
            (MessageType::Read, 2),
            (MessageType::GetPerms, 3),
            (MessageType::Watch, 4),
            (MessageType::Unwatch, 5),
            (MessageType::TransactionStart, 6),
            (MessageType::TransactionEnd, 7),
            (MessageType::Introduce, 8),
            (MessageType::Release, 9),
            (MessageType::GetDomainPath, 10),
            (MessageType::Write, 11),
            (MessageType::Mkdir, 12),
            (MessageType::Rm, 13),
            (MessageType::SetPerms, 14),
            (MessageType::WatchEvent, 15),
            (MessageType::Error, 16),
            (MessageType::IsDomainIntroduced, 17),
            (MessageType::Resume, 18),
            (MessageType::SetTarget, 19),
            (MessageType::ResetWatches, 21),
            (MessageType::DirectoryPart, 22),
        ];
        for (ty, raw) in expected {
            assert_eq!(u32::from(ty), raw);
            assert_eq!(MessageType::from(raw), ty);
        }
        assert_eq!(MessageType::from(20), MessageType::Unknown(20));
        assert_eq!(MessageType::from(0xffff), MessageType::Unknown(0xffff));
        assert_eq!(u32::from(MessageType::Unknown(77)), 77);
    }

    #[test]
    fn header_golden_bytes() {
        let bytes = [
            2, 0, 0, 0, // XS_READ
            0x78, 0x56, 0x34, 0x12, // req_id
            5, 0, 0, 0, // tx_id
            4, 0, 0, 0, // len
            b'/', b'a', b'b', 0,
        ];
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.msg_type(), MessageType::Read);
        assert_eq!(packet.req_id(), 0x1234_5678);
        assert_eq!(packet.tx_id(), 5);
        assert_eq!(packet.payload_len(), 4);
        assert_eq!(packet.payload(), b"/ab\0");
        let mut out = [0u8; 64];
        let n = Request::Read { path: "/ab" }
            .emit(0x1234_5678, 5, &mut out)
            .unwrap();
        assert_eq!(&out[..n], &bytes[..]);
    }

    /// Every request: emit gives the golden bytes, parse gives the request.
    #[test]
    fn requests_golden_and_roundtrip() {
        let cases: &[(Request<'_>, u32, &[u8])] = &[
            (
                Request::Control {
                    args: StringList::parse(b"log\0on\0", "t").unwrap(),
                },
                0,
                b"log\0on\0",
            ),
            (
                Request::Directory {
                    path: "/local/domain/0",
                },
                1,
                b"/local/domain/0\0",
            ),
            (
                Request::DirectoryPart {
                    path: "device",
                    offset: 4096,
                },
                22,
                b"device\x004096\0",
            ),
            (Request::Read { path: "name" }, 2, b"name\0"),
            (Request::GetPerms { path: "/vm" }, 3, b"/vm\0"),
            (
                Request::Watch {
                    path: "backend/vif",
                    token: "tok1",
                },
                4,
                b"backend/vif\0tok1\0",
            ),
            (
                Request::Unwatch {
                    path: "@releaseDomain",
                    token: "t",
                },
                5,
                b"@releaseDomain\0t\0",
            ),
            (Request::TransactionStart, 6, b"\0"),
            (Request::TransactionEnd { commit: true }, 7, b"T\0"),
            (Request::TransactionEnd { commit: false }, 7, b"F\0"),
            (
                Request::Introduce {
                    domid: 5,
                    mfn: 1_048_575,
                    evtchn: 3,
                },
                8,
                b"5\x001048575\x003\0",
            ),
            (Request::Release { domid: 7 }, 9, b"7\0"),
            (Request::GetDomainPath { domid: 0 }, 10, b"0\0"),
            (
                Request::Write {
                    path: "device/vif/0/state",
                    value: b"4",
                },
                11,
                b"device/vif/0/state\x004",
            ),
            (
                Request::Write {
                    path: "data/empty",
                    value: b"",
                },
                11,
                b"data/empty\0",
            ),
            (Request::Mkdir { path: "a/b" }, 12, b"a/b\0"),
            (Request::Rm { path: "a" }, 13, b"a\0"),
            (
                Request::SetPerms {
                    path: "data/vchan",
                    perms: StringList::parse(b"n5\0r0\0", "t").unwrap(),
                },
                14,
                b"data/vchan\0n5\0r0\0",
            ),
            (Request::IsDomainIntroduced { domid: 65535 }, 17, b"65535\0"),
            (Request::Resume { domid: 3 }, 18, b"3\0"),
            (
                Request::SetTarget {
                    domid: 4,
                    target: 3,
                },
                19,
                b"4\x003\0",
            ),
            (Request::ResetWatches, 21, b"\0"),
            (
                Request::Unknown {
                    msg_type: 23,
                    payload: b"feature\0",
                },
                23,
                b"feature\0",
            ),
        ];
        for (request, raw_type, payload) in cases {
            let (golden, len) = message(*raw_type, 9, 1, payload);
            let mut out = [0u8; MESSAGE_MAX];
            let n = request.emit(9, 1, &mut out).unwrap();
            assert_eq!(&out[..n], &golden[..len], "{request:?}");
            assert_eq!(request.payload_len().unwrap(), payload.len());
            let (repr, parsed) = Request::parse_message(&golden[..len]).unwrap();
            assert_eq!(parsed, *request);
            assert_eq!(repr.req_id, 9);
            assert_eq!(repr.tx_id, 1);
            assert_eq!(u32::from(repr.msg_type), *raw_type);
        }
    }

    /// Every reply: emit gives the golden bytes, parse gives the reply.
    #[test]
    fn responses_golden_and_roundtrip() {
        let cases: &[(Response<'_>, u32, &[u8])] = &[
            (
                Response::Ok {
                    msg_type: MessageType::Write,
                },
                11,
                b"OK\0",
            ),
            (
                Response::Ok {
                    msg_type: MessageType::Watch,
                },
                4,
                b"OK\0",
            ),
            (
                Response::Ok {
                    msg_type: MessageType::ResetWatches,
                },
                21,
                b"OK\0",
            ),
            (Response::Control { output: b"check\0" }, 0, b"check\0"),
            (
                Response::Read {
                    value: b"10.137.0.5",
                },
                2,
                b"10.137.0.5",
            ),
            (Response::Read { value: b"" }, 2, b""),
            (
                Response::Directory {
                    names: StringList::parse(b"0\x001\x0012\0", "t").unwrap(),
                },
                1,
                b"0\x001\x0012\0",
            ),
            (
                Response::Directory {
                    names: StringList::default(),
                },
                1,
                b"",
            ),
            (
                Response::DirectoryPart {
                    generation: 42,
                    names: StringList::parse(b"a\0b\0", "t").unwrap(),
                    complete: false,
                },
                22,
                b"42\0a\0b\0",
            ),
            (
                Response::DirectoryPart {
                    generation: 42,
                    names: StringList::parse(b"c\0", "t").unwrap(),
                    complete: true,
                },
                22,
                b"42\0c\0\0",
            ),
            (
                Response::DirectoryPart {
                    generation: 7,
                    names: StringList::default(),
                    complete: true,
                },
                22,
                b"7\0\0",
            ),
            (
                Response::GetPerms {
                    perms: StringList::parse(b"b0\0r5\0", "t").unwrap(),
                },
                3,
                b"b0\0r5\0",
            ),
            (Response::TransactionStart { tx_id: 17 }, 6, b"17\0"),
            (
                Response::GetDomainPath {
                    path: "/local/domain/5",
                },
                10,
                b"/local/domain/5\0",
            ),
            (
                Response::IsDomainIntroduced { introduced: true },
                17,
                b"T\0",
            ),
            (
                Response::IsDomainIntroduced { introduced: false },
                17,
                b"F\0",
            ),
            (
                Response::WatchEvent {
                    path: "backend/vif/5/0",
                    token: "vif",
                },
                15,
                b"backend/vif/5/0\0vif\0",
            ),
            (
                Response::Error {
                    code: ErrorCode::Enoent,
                },
                16,
                b"ENOENT\0",
            ),
            (
                Response::Error {
                    code: ErrorCode::Eagain,
                },
                16,
                b"EAGAIN\0",
            ),
            (
                Response::Error {
                    code: ErrorCode::Other("EWHAT"),
                },
                16,
                b"EWHAT\0",
            ),
            (
                Response::Unknown {
                    msg_type: 0xffff,
                    payload: b"x",
                },
                0xffff,
                b"x",
            ),
        ];
        for (response, raw_type, payload) in cases {
            let (golden, len) = message(*raw_type, 3, 0, payload);
            let mut out = [0u8; MESSAGE_MAX];
            let n = response.emit(3, 0, &mut out).unwrap();
            assert_eq!(&out[..n], &golden[..len], "{response:?}");
            let (_, parsed) = Response::parse_message(&golden[..len]).unwrap();
            assert_eq!(parsed, *response);
        }
    }

    #[test]
    fn every_error_name_roundtrips() {
        for (code, name) in ERROR_NAMES {
            assert_eq!(ErrorCode::from_name(name), code);
            assert_eq!(code.name(), name);
        }
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(
            Packet::new_checked(&[0u8; 15][..]),
            Err(Error::Truncated {
                needed: 16,
                available: 15
            })
        );
        let too_long = header(2, 0, 0, 4097);
        assert_eq!(
            Packet::new_checked(&too_long[..]),
            Err(Error::PayloadTooLong { len: 4097 })
        );
        let huge = header(2, 0, 0, u32::MAX);
        assert!(matches!(
            Packet::new_checked(&huge[..]),
            Err(Error::PayloadTooLong { .. })
        ));
        let short_payload = header(2, 0, 0, 4);
        assert_eq!(
            Packet::new_checked(&short_payload[..]),
            Err(Error::Truncated {
                needed: 20,
                available: 16
            })
        );
        // Exactly the limit is fine.
        let (max, len) = message(2, 0, 0, &[b'a'; XENSTORE_PAYLOAD_MAX]);
        assert_eq!(
            Packet::new_checked(&max[..len]).unwrap().payload_len(),
            4096
        );
    }

    #[test]
    fn malformed_payloads() {
        use MessageType as T;
        assert_eq!(
            Request::parse(T::Read, b"/a"),
            Err(Error::MissingNul { field: "path" })
        );
        assert_eq!(
            Request::parse(T::Read, b"/a\0junk"),
            Err(Error::TrailingBytes { field: "path" })
        );
        assert_eq!(
            Request::parse(T::Read, b"\xff\0"),
            Err(Error::NotUtf8 { field: "path" })
        );
        assert_eq!(
            Request::parse(T::Watch, b"path\0token"),
            Err(Error::MissingNul { field: "token" })
        );
        assert_eq!(
            Request::parse(T::Write, b"no-nul"),
            Err(Error::MissingNul { field: "path" })
        );
        assert_eq!(
            Request::parse(T::TransactionEnd, b"X\0"),
            Err(Error::UnexpectedContent {
                field: "commit flag"
            })
        );
        assert_eq!(
            Request::parse(T::Release, b"65536\0"),
            Err(Error::BadNumber { field: "domid" })
        );
        assert_eq!(
            Request::parse(T::Release, b"-1\0"),
            Err(Error::BadNumber { field: "domid" })
        );
        assert_eq!(
            Request::parse(T::Release, b"\0"),
            Err(Error::BadNumber { field: "domid" })
        );
        assert_eq!(
            Request::parse(T::DirectoryPart, b"p\x0099999999999999999999\0"),
            Err(Error::BadNumber { field: "offset" })
        );
        assert_eq!(
            Request::parse(T::TransactionStart, b"x\0"),
            Err(Error::UnexpectedContent {
                field: "transaction start"
            })
        );
        assert!(Request::parse(T::SetPerms, b"p\0").is_err());
        assert_eq!(
            Request::parse(T::WatchEvent, b"a\0b\0"),
            Err(Error::NotARequest { msg_type: 15 })
        );
        assert_eq!(
            Request::parse(T::Error, b"EINVAL\0"),
            Err(Error::NotARequest { msg_type: 16 })
        );
        assert_eq!(
            Response::parse(T::Write, b"OK"),
            Err(Error::UnexpectedContent { field: "OK reply" })
        );
        assert_eq!(
            Response::parse(T::Directory, b"a\0b"),
            Err(Error::MissingNul {
                field: "directory entries"
            })
        );
        assert_eq!(
            Response::parse(T::WatchEvent, b"a\0"),
            Err(Error::MissingNul { field: "token" })
        );
        assert_eq!(
            Response::parse(T::WatchEvent, b"a\0b\0c"),
            Err(Error::TrailingBytes { field: "token" })
        );
        assert_eq!(
            Response::parse(T::TransactionStart, b"12a\0"),
            Err(Error::BadNumber {
                field: "transaction id"
            })
        );
        assert_eq!(
            Response::parse(T::Error, b"ENOENT"),
            Err(Error::MissingNul {
                field: "error name"
            })
        );
        assert!(Response::parse(T::GetPerms, b"").is_err());
        assert!(Response::parse(T::IsDomainIntroduced, b"Y\0").is_err());
        assert!(Response::parse(T::DirectoryPart, b"x\0").is_err());
        let big = [0u8; XENSTORE_PAYLOAD_MAX + 1];
        assert!(matches!(
            Response::parse(T::Read, &big),
            Err(Error::PayloadTooLong { .. })
        ));
    }

    #[test]
    fn reserved_trailing_value_of_watch_is_ignored() {
        assert_eq!(
            Request::parse(MessageType::Watch, b"p\0t\0\0"),
            Ok(Request::Watch {
                path: "p",
                token: "t"
            })
        );
    }

    #[test]
    fn emit_refuses_bad_input() {
        let mut small = [0u8; 20];
        assert_eq!(
            Request::Read { path: "/long/path" }.emit(0, 0, &mut small),
            Err(Error::BufferTooSmall {
                needed: 27,
                available: 20
            })
        );
        assert_eq!(
            Request::Read { path: "/a" }.emit(0, 0, &mut small[..10]),
            Err(Error::BufferTooSmall {
                needed: 19,
                available: 10
            })
        );
        let mut out = [0u8; 2 * MESSAGE_MAX];
        assert_eq!(
            Request::Read { path: "a\0b" }.emit(0, 0, &mut out),
            Err(Error::EmbeddedNul { field: "path" })
        );
        let value = [b'v'; XENSTORE_PAYLOAD_MAX];
        assert_eq!(
            Request::Write {
                path: "p",
                value: &value
            }
            .emit(0, 0, &mut out),
            Err(Error::PayloadTooLong { len: 4098 })
        );
        let fits = [b'v'; XENSTORE_PAYLOAD_MAX - 2];
        assert_eq!(
            Request::Write {
                path: "p",
                value: &fits
            }
            .emit(0, 0, &mut out),
            Ok(MESSAGE_MAX)
        );
        let raw = Repr {
            msg_type: MessageType::Read,
            req_id: 0,
            tx_id: 0,
            payload: &out[..XENSTORE_PAYLOAD_MAX + 1],
        };
        let mut target = [0u8; 2 * MESSAGE_MAX];
        assert_eq!(
            raw.emit(&mut target),
            Err(Error::PayloadTooLong { len: 4097 })
        );
    }

    #[test]
    fn repr_roundtrip() {
        let repr = Repr {
            msg_type: MessageType::Unknown(99),
            req_id: 1,
            tx_id: 2,
            payload: b"abc",
        };
        let mut out = [0u8; 32];
        let n = repr.emit(&mut out).unwrap();
        assert_eq!(n, repr.buffer_len());
        assert_eq!(Repr::parse_bytes(&out[..n]).unwrap(), repr);
        let packet = Packet::new_checked(&out[..n]).unwrap();
        assert_eq!(Repr::parse(&packet), repr);
    }

    #[test]
    fn path_rules() {
        assert!(is_valid_path("/local/domain/0/backend/vif"));
        assert!(is_valid_path("device/vif/0"));
        assert!(is_valid_path("/"));
        assert!(is_valid_path(WATCH_RELEASE_DOMAIN));
        assert!(is_valid_path(WATCH_INTRODUCE_DOMAIN));
        assert!(!is_valid_path(""));
        assert!(!is_valid_path("/a//b"));
        assert!(!is_valid_path("/a/"));
        assert!(!is_valid_path("/a b"));
        assert!(!is_valid_path("/a.b"));
        let long = [b'a'; XENSTORE_REL_PATH_MAX + 1];
        assert!(!is_valid_path(core::str::from_utf8(&long).unwrap()));
    }

    #[test]
    fn permissions() {
        assert_eq!(
            Permission::parse("b0"),
            Ok(Permission {
                access: Access::Both,
                domid: 0
            })
        );
        assert_eq!(
            Permission::parse("n65535"),
            Ok(Permission {
                access: Access::None,
                domid: 65535
            })
        );
        assert!(Permission::parse("x1").is_err());
        assert!(Permission::parse("r").is_err());
        assert!(Permission::parse("").is_err());
        assert!(Permission::parse("w70000").is_err());
    }

    #[test]
    fn decoder_reassembles_any_chunking() {
        let mut stream = [0u8; 256];
        let mut len = 0;
        let first = Request::Write {
            path: "data/x",
            value: b"hello",
        };
        let second = Request::Watch {
            path: "backend",
            token: "t",
        };
        len += first.emit(1, 0, &mut stream[len..]).unwrap();
        len += second.emit(2, 0, &mut stream[len..]).unwrap();
        for chunk in 1..=len {
            let mut decoder = Decoder::new();
            let mut seen = 0;
            for piece in stream[..len].chunks(chunk) {
                let mut rest = piece;
                while !rest.is_empty() {
                    let (used, message) = decoder.feed(rest).unwrap();
                    if let Some(packet) = message {
                        let request = Request::parse(packet.msg_type(), packet.payload()).unwrap();
                        let expected = if seen == 0 { first } else { second };
                        assert_eq!(request, expected);
                        assert_eq!(packet.req_id(), seen + 1);
                        seen += 1;
                    }
                    assert!(used > 0);
                    rest = &rest[used..];
                }
            }
            assert_eq!(seen, 2, "chunk size {chunk}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn decoder_rejects_oversized_and_stays_failed() {
        let mut decoder = Decoder::new();
        let bad = header(2, 0, 0, 5000);
        assert_eq!(
            decoder.feed(&bad).map(|(n, m)| (n, m.is_some())),
            Err(Error::PayloadTooLong { len: 5000 })
        );
        assert_eq!(
            decoder.feed(b"more").map(|(n, _)| n),
            Err(Error::StreamFailed)
        );
    }

    #[test]
    fn decoder_empty_payload_and_partial_header() {
        let mut decoder = Decoder::new();
        let msg = header(6, 1, 0, 0);
        assert_eq!(decoder.feed(&msg[..10]).unwrap().0, 10);
        assert_eq!(decoder.buffered(), 10);
        let (used, packet) = decoder.feed(&msg[10..]).unwrap();
        assert_eq!(used, 6);
        let packet = packet.unwrap();
        assert_eq!(packet.msg_type(), MessageType::TransactionStart);
        assert_eq!(packet.payload(), b"");
    }

    /// `struct xsd_sockmsg` and `struct xenstore_domain_interface` as in
    /// `xs_wire.h` (with the newer trailing `evtchn_port`), laid out by the
    /// compiler under C rules. The same offsets were printed by gcc from the
    /// header's definitions.
    #[repr(C)]
    #[allow(dead_code)] // reason: only its layout is inspected.
    struct CSockMsg {
        msg_type: u32,
        req_id: u32,
        tx_id: u32,
        len: u32,
    }

    #[repr(C)]
    #[allow(dead_code)] // reason: only its layout is inspected.
    struct CDomainInterface {
        req: [u8; 1024],
        rsp: [u8; 1024],
        req_cons: u32,
        req_prod: u32,
        rsp_cons: u32,
        rsp_prod: u32,
        server_features: u32,
        connection: u32,
        error: u32,
        evtchn_port: u32,
    }

    #[test]
    fn offsets_match_repr_c_mirror() {
        use core::mem::{offset_of, size_of};
        assert_eq!(size_of::<CSockMsg>(), HEADER_LEN);
        assert_eq!(offset_of!(CSockMsg, msg_type), field::TYPE.start);
        assert_eq!(offset_of!(CSockMsg, req_id), field::REQ_ID.start);
        assert_eq!(offset_of!(CSockMsg, tx_id), field::TX_ID.start);
        assert_eq!(offset_of!(CSockMsg, len), field::LEN.start);
        assert_eq!(offset_of!(CDomainInterface, req), ring::REQ);
        assert_eq!(offset_of!(CDomainInterface, rsp), ring::RSP);
        assert_eq!(offset_of!(CDomainInterface, req_cons), ring::REQ_CONS);
        assert_eq!(offset_of!(CDomainInterface, req_prod), ring::REQ_PROD);
        assert_eq!(offset_of!(CDomainInterface, rsp_cons), ring::RSP_CONS);
        assert_eq!(offset_of!(CDomainInterface, rsp_prod), ring::RSP_PROD);
        assert_eq!(
            offset_of!(CDomainInterface, server_features),
            ring::SERVER_FEATURES
        );
        assert_eq!(offset_of!(CDomainInterface, connection), ring::CONNECTION);
        assert_eq!(offset_of!(CDomainInterface, error), ring::ERROR);
        assert_eq!(offset_of!(CDomainInterface, evtchn_port), ring::EVTCHN_PORT);
        // Values gcc printed for the C header.
        assert_eq!(
            (ring::REQ_CONS, ring::ERROR, ring::EVTCHN_PORT),
            (2048, 2072, 2076)
        );
    }

    #[test]
    fn interface_offsets_match_c_layout() {
        // struct xenstore_domain_interface: two 1024-byte rings, then u32s.
        assert_eq!(ring::REQ, 0);
        assert_eq!(ring::RSP, ring::REQ + XENSTORE_RING_SIZE as usize);
        assert_eq!(ring::REQ_CONS, ring::RSP + XENSTORE_RING_SIZE as usize);
        assert_eq!(ring::REQ_PROD, ring::REQ_CONS + 4);
        assert_eq!(ring::RSP_CONS, ring::REQ_PROD + 4);
        assert_eq!(ring::RSP_PROD, ring::RSP_CONS + 4);
        assert_eq!(ring::SERVER_FEATURES, ring::RSP_PROD + 4);
        assert_eq!(ring::CONNECTION, ring::SERVER_FEATURES + 4);
        assert_eq!(ring::ERROR, ring::CONNECTION + 4);
        assert_eq!(ring::INTERFACE_LEN, ring::ERROR + 4);
        assert_eq!(ring::EVTCHN_PORT, ring::ERROR + 4);
    }

    #[test]
    fn ring_arithmetic() {
        assert_eq!(mask_index(1025), 1);
        let empty = RingIndices::new(5, 5).unwrap();
        assert_eq!(empty.available(), 0);
        assert_eq!(empty.free(), 1024);
        assert_eq!(empty.input_chunk(), 5..5);
        assert_eq!(empty.output_chunk(), 5..1024);
        let full = RingIndices::new(10, 1034).unwrap();
        assert_eq!(full.free(), 0);
        assert_eq!(full.output_chunk(), 10..10);
        assert_eq!(full.input_chunk(), 10..1024);
        // Wrapping around 2^32.
        let wrapped = RingIndices::new(u32::MAX - 1, 3).unwrap();
        assert_eq!(wrapped.available(), 5);
        assert_eq!(wrapped.input_chunk(), 1022..1024);
        let after = wrapped.consume(2).unwrap();
        assert_eq!(after.input_chunk(), 0..3);
        assert_eq!(after.produce(1021).unwrap().free(), 0);
        assert!(after.produce(1022).is_err());
        assert!(after.consume(4).is_err());
        // Hostile indices.
        assert_eq!(
            RingIndices::new(0, 1025),
            Err(Error::RingIndex {
                cons: 0,
                prod: 1025
            })
        );
        assert!(RingIndices::new(10, 9).is_err());
    }
}
