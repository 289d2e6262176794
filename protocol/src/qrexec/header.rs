//! `struct msg_header { u32 type; u32 len; }` and the message type numbering.
//!
//! A header is read from a peer before anything else, so [`HeaderRepr::parse`]
//! already rejects a body length that the message type does not allow: a
//! reader never has to buffer more than a type's maximum before deciding the
//! peer is broken. Unknown types are kept as [`MsgType::Unknown`] (never
//! converted to a Rust enum blindly). Numbering: `libqrexec/qrexec.h`.

use super::{
    Error, IDENT_LEN, MAX_DATA_CHUNK_V3, MAX_QREXEC_CMD_LEN, MAX_SERVICE_NAME_LEN,
    message::{
        EXEC_PARAMS_LEN, PEER_INFO_LEN, TRIGGER_SERVICE_LEN, TRIGGER_SERVICE3_FIXED_LEN,
        TRIGGER_SERVICE4_FIXED_LEN,
    },
};

/// Size of `struct msg_header`.
pub const HEADER_LEN: usize = 8;

mod field {
    use core::ops::Range;
    pub const TYPE: Range<usize> = 0..4;
    pub const LEN: Range<usize> = 4..8;
}

/// A qrexec message type. Values from `libqrexec/qrexec.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// `MSG_DATA_STDIN` (0x190): stdin bytes; empty = EOF.
    DataStdin,
    /// `MSG_DATA_STDOUT` (0x191): stdout bytes; empty = EOF.
    DataStdout,
    /// `MSG_DATA_STDERR` (0x192): stderr bytes; empty = EOF.
    DataStderr,
    /// `MSG_DATA_EXIT_CODE` (0x193): `u32` exit code.
    DataExitCode,
    /// `MSG_EXEC_CMDLINE` (0x200).
    ExecCmdline,
    /// `MSG_JUST_EXEC` (0x201).
    JustExec,
    /// `MSG_SERVICE_CONNECT` (0x202).
    ServiceConnect,
    /// `MSG_SERVICE_REFUSED` (0x203).
    ServiceRefused,
    /// `MSG_TRIGGER_SERVICE` (0x210), protocol 2 only.
    TriggerService,
    /// `MSG_CONNECTION_TERMINATED` (0x211).
    ConnectionTerminated,
    /// `MSG_TRIGGER_SERVICE3` (0x212), protocol 3+.
    TriggerService3,
    /// `MSG_TRIGGER_SERVICE4` (0x213), protocol 4+.
    TriggerService4,
    /// `MSG_HELLO` (0x300).
    Hello,
    /// Any other value, kept as received.
    Unknown(u32),
}

impl MsgType {
    /// Raw value of `MSG_DATA_STDIN`.
    pub const MSG_DATA_STDIN: u32 = 0x190;
    /// Raw value of `MSG_DATA_STDOUT`.
    pub const MSG_DATA_STDOUT: u32 = 0x191;
    /// Raw value of `MSG_DATA_STDERR`.
    pub const MSG_DATA_STDERR: u32 = 0x192;
    /// Raw value of `MSG_DATA_EXIT_CODE`.
    pub const MSG_DATA_EXIT_CODE: u32 = 0x193;
    /// Raw value of `MSG_EXEC_CMDLINE`.
    pub const MSG_EXEC_CMDLINE: u32 = 0x200;
    /// Raw value of `MSG_JUST_EXEC`.
    pub const MSG_JUST_EXEC: u32 = 0x201;
    /// Raw value of `MSG_SERVICE_CONNECT`.
    pub const MSG_SERVICE_CONNECT: u32 = 0x202;
    /// Raw value of `MSG_SERVICE_REFUSED`.
    pub const MSG_SERVICE_REFUSED: u32 = 0x203;
    /// Raw value of `MSG_TRIGGER_SERVICE`.
    pub const MSG_TRIGGER_SERVICE: u32 = 0x210;
    /// Raw value of `MSG_CONNECTION_TERMINATED`.
    pub const MSG_CONNECTION_TERMINATED: u32 = 0x211;
    /// Raw value of `MSG_TRIGGER_SERVICE3`.
    pub const MSG_TRIGGER_SERVICE3: u32 = 0x212;
    /// Raw value of `MSG_TRIGGER_SERVICE4`.
    pub const MSG_TRIGGER_SERVICE4: u32 = 0x213;
    /// Raw value of `MSG_HELLO`.
    pub const MSG_HELLO: u32 = 0x300;

    /// Qubes' name for this type (`"MSG_HELLO"`), or `"unknown"`.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::DataStdin => "MSG_DATA_STDIN",
            MsgType::DataStdout => "MSG_DATA_STDOUT",
            MsgType::DataStderr => "MSG_DATA_STDERR",
            MsgType::DataExitCode => "MSG_DATA_EXIT_CODE",
            MsgType::ExecCmdline => "MSG_EXEC_CMDLINE",
            MsgType::JustExec => "MSG_JUST_EXEC",
            MsgType::ServiceConnect => "MSG_SERVICE_CONNECT",
            MsgType::ServiceRefused => "MSG_SERVICE_REFUSED",
            MsgType::TriggerService => "MSG_TRIGGER_SERVICE",
            MsgType::ConnectionTerminated => "MSG_CONNECTION_TERMINATED",
            MsgType::TriggerService3 => "MSG_TRIGGER_SERVICE3",
            MsgType::TriggerService4 => "MSG_TRIGGER_SERVICE4",
            MsgType::Hello => "MSG_HELLO",
            MsgType::Unknown(_) => "unknown",
        }
    }

    /// The smallest and largest body length a message of this type may
    /// declare. Unknown types may carry up to one v3 data chunk so that a
    /// tolerant reader can skip them.
    pub fn body_len_limits(self) -> (u32, u32) {
        let (min, max) = match self {
            MsgType::DataStdin | MsgType::DataStdout | MsgType::DataStderr => {
                (0, MAX_DATA_CHUNK_V3)
            }
            MsgType::DataExitCode => (4, 4),
            MsgType::ExecCmdline | MsgType::JustExec => (EXEC_PARAMS_LEN, MAX_QREXEC_CMD_LEN),
            MsgType::ServiceConnect => (EXEC_PARAMS_LEN, EXEC_PARAMS_LEN + IDENT_LEN),
            MsgType::ServiceRefused => (IDENT_LEN, IDENT_LEN),
            MsgType::TriggerService => (TRIGGER_SERVICE_LEN, TRIGGER_SERVICE_LEN),
            MsgType::ConnectionTerminated => (EXEC_PARAMS_LEN, EXEC_PARAMS_LEN),
            MsgType::TriggerService3 => (
                TRIGGER_SERVICE3_FIXED_LEN + 1,
                TRIGGER_SERVICE3_FIXED_LEN + MAX_SERVICE_NAME_LEN,
            ),
            MsgType::TriggerService4 => (
                TRIGGER_SERVICE4_FIXED_LEN + 1,
                TRIGGER_SERVICE4_FIXED_LEN + MAX_SERVICE_NAME_LEN,
            ),
            MsgType::Hello => (PEER_INFO_LEN, PEER_INFO_LEN),
            MsgType::Unknown(_) => (0, MAX_DATA_CHUNK_V3),
        };
        (min as u32, max as u32)
    }
}

impl From<u32> for MsgType {
    fn from(value: u32) -> Self {
        match value {
            MsgType::MSG_DATA_STDIN => MsgType::DataStdin,
            MsgType::MSG_DATA_STDOUT => MsgType::DataStdout,
            MsgType::MSG_DATA_STDERR => MsgType::DataStderr,
            MsgType::MSG_DATA_EXIT_CODE => MsgType::DataExitCode,
            MsgType::MSG_EXEC_CMDLINE => MsgType::ExecCmdline,
            MsgType::MSG_JUST_EXEC => MsgType::JustExec,
            MsgType::MSG_SERVICE_CONNECT => MsgType::ServiceConnect,
            MsgType::MSG_SERVICE_REFUSED => MsgType::ServiceRefused,
            MsgType::MSG_TRIGGER_SERVICE => MsgType::TriggerService,
            MsgType::MSG_CONNECTION_TERMINATED => MsgType::ConnectionTerminated,
            MsgType::MSG_TRIGGER_SERVICE3 => MsgType::TriggerService3,
            MsgType::MSG_TRIGGER_SERVICE4 => MsgType::TriggerService4,
            MsgType::MSG_HELLO => MsgType::Hello,
            other => MsgType::Unknown(other),
        }
    }
}

impl From<MsgType> for u32 {
    fn from(value: MsgType) -> Self {
        match value {
            MsgType::DataStdin => MsgType::MSG_DATA_STDIN,
            MsgType::DataStdout => MsgType::MSG_DATA_STDOUT,
            MsgType::DataStderr => MsgType::MSG_DATA_STDERR,
            MsgType::DataExitCode => MsgType::MSG_DATA_EXIT_CODE,
            MsgType::ExecCmdline => MsgType::MSG_EXEC_CMDLINE,
            MsgType::JustExec => MsgType::MSG_JUST_EXEC,
            MsgType::ServiceConnect => MsgType::MSG_SERVICE_CONNECT,
            MsgType::ServiceRefused => MsgType::MSG_SERVICE_REFUSED,
            MsgType::TriggerService => MsgType::MSG_TRIGGER_SERVICE,
            MsgType::ConnectionTerminated => MsgType::MSG_CONNECTION_TERMINATED,
            MsgType::TriggerService3 => MsgType::MSG_TRIGGER_SERVICE3,
            MsgType::TriggerService4 => MsgType::MSG_TRIGGER_SERVICE4,
            MsgType::Hello => MsgType::MSG_HELLO,
            MsgType::Unknown(raw) => raw,
        }
    }
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        word.copy_from_slice(src);
    }
    u32::from_ne_bytes(word)
}

pub(crate) fn write_u32(bytes: &mut [u8], at: usize, value: u32) {
    if let Some(dst) = bytes.get_mut(at..at + 4) {
        dst.copy_from_slice(&value.to_ne_bytes());
    }
}

/// A checked view of a `struct msg_header` at the start of a buffer.
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wrap a buffer without checking it; accessors then read zeros from a
    /// short buffer instead of panicking.
    pub const fn new_unchecked(buffer: T) -> Self {
        Header { buffer }
    }

    /// Wrap a buffer that holds at least [`HEADER_LEN`] bytes.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let available = buffer.as_ref().len();
        if available < HEADER_LEN {
            return Err(Error::Truncated {
                needed: HEADER_LEN,
                available,
            });
        }
        Ok(Header { buffer })
    }

    /// The raw `type` field.
    pub fn raw_type(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::TYPE.start)
    }

    /// The message type.
    pub fn msg_type(&self) -> MsgType {
        MsgType::from(self.raw_type())
    }

    /// The declared body length.
    pub fn len(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::LEN.start)
    }

    /// Whether the declared body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Give the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Set the `type` field.
    pub fn set_msg_type(&mut self, value: MsgType) {
        write_u32(self.buffer.as_mut(), field::TYPE.start, value.into());
    }

    /// Set the `len` field.
    pub fn set_len(&mut self, value: u32) {
        write_u32(self.buffer.as_mut(), field::LEN.start, value);
    }
}

/// A parsed `msg_header` whose length is allowed for its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRepr {
    /// Message type.
    pub msg_type: MsgType,
    /// Body length.
    pub len: u32,
}

impl HeaderRepr {
    /// Parse a header, rejecting a length its type does not allow.
    pub fn parse<T: AsRef<[u8]>>(header: &Header<T>) -> Result<Self, Error> {
        let msg_type = header.msg_type();
        let len = header.len();
        let (min, max) = msg_type.body_len_limits();
        if len < min || len > max {
            return Err(Error::BadLength {
                msg_type: msg_type.into(),
                len,
                min,
                max,
            });
        }
        Ok(HeaderRepr { msg_type, len })
    }

    /// Parse the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, Error> {
        HeaderRepr::parse(&Header::new_checked(bytes)?)
    }

    /// Write the header into the first [`HEADER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), Error> {
        let available = buf.len();
        let mut header = Header::new_checked(buf).map_err(|_| Error::BufferTooSmall {
            needed: HEADER_LEN,
            available,
        })?;
        header.set_msg_type(self.msg_type);
        header.set_len(self.len);
        Ok(())
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        write_u32(&mut out, field::TYPE.start, self.msg_type.into());
        write_u32(&mut out, field::LEN.start, self.len);
        out
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    #[test]
    fn every_known_type_roundtrips_through_u32() {
        for raw in [
            0x190, 0x191, 0x192, 0x193, 0x200, 0x201, 0x202, 0x203, 0x210, 0x211, 0x212, 0x213,
            0x300,
        ] {
            let t = MsgType::from(raw);
            assert!(!matches!(t, MsgType::Unknown(_)), "0x{raw:x}");
            assert_eq!(u32::from(t), raw);
        }
        assert_eq!(MsgType::from(0x204), MsgType::Unknown(0x204));
        assert_eq!(u32::from(MsgType::Unknown(7)), 7);
        assert_eq!(MsgType::TriggerService4.name(), "MSG_TRIGGER_SERVICE4");
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn golden_header_bytes() {
        let repr = HeaderRepr {
            msg_type: MsgType::Hello,
            len: 4,
        };
        assert_eq!(repr.to_bytes(), [0x00, 0x03, 0, 0, 0x04, 0, 0, 0]);
        let parsed = HeaderRepr::parse_bytes(&[0x91, 0x01, 0, 0, 0x10, 0, 0, 0]).unwrap();
        assert_eq!(parsed.msg_type, MsgType::DataStdout);
        assert_eq!(parsed.len, 16);
    }

    #[test]
    fn short_header_is_truncated() {
        for n in 0..HEADER_LEN {
            let buf = [0u8; HEADER_LEN];
            assert_eq!(
                HeaderRepr::parse_bytes(&buf[..n]),
                Err(Error::Truncated {
                    needed: HEADER_LEN,
                    available: n
                })
            );
        }
    }

    #[test]
    fn lengths_outside_type_limits_are_rejected() {
        let cases: [(MsgType, u32); 8] = [
            (MsgType::Hello, 3),
            (MsgType::Hello, 5),
            (MsgType::DataExitCode, 0),
            (MsgType::DataStdout, 65537),
            (MsgType::ExecCmdline, 7),
            (MsgType::ServiceRefused, 31),
            (MsgType::TriggerService3, 96),
            (MsgType::Unknown(0xdead), u32::MAX),
        ];
        for (t, len) in cases {
            let bytes = HeaderRepr { msg_type: t, len }.to_bytes();
            assert!(
                matches!(
                    HeaderRepr::parse_bytes(&bytes),
                    Err(Error::BadLength { .. })
                ),
                "{t:?} {len}"
            );
        }
    }

    #[test]
    fn unchecked_view_of_short_buffer_reads_zero() {
        let h = Header::new_unchecked(&[1u8, 2][..]);
        assert_eq!(h.raw_type(), 0);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn emit_into_short_buffer_fails() {
        let mut buf = [0u8; 4];
        assert!(
            HeaderRepr {
                msg_type: MsgType::Hello,
                len: 4
            }
            .emit(&mut buf)
            .is_err()
        );
    }
}
