//! qrexec wire format: the messages that qrexec-daemon, qrexec-client,
//! qrexec-agent and qrexec-client-vm exchange over vchan and UNIX sockets.
//!
//! This module is the one place where a qrexec message layout is declared; the
//! firewall unikernel's agent and the dom0/VM tools both use it. It parses
//! bytes written by peers that may be hostile, so every length, string and
//! enum value is checked before use and every failure is a typed [`Error`];
//! nothing here panics, allocates or touches `unsafe`. It must never decide
//! policy or perform I/O: it only says what bytes mean and how to write them.
//!
//! Facts come from Qubes OS `qubes-core-qrexec` (`libqrexec/qrexec.h` for
//! numbering, struct layouts and limits; `daemon/qrexec-daemon.c` for the
//! sanitisation of names, request idents and the per-message length checks;
//! `daemon/qrexec-daemon-common.c` for the client/daemon handshake and
//! `MSG_SERVICE_CONNECT` layout; `libqrexec/exec.c` for the service
//! descriptor limits) and from the Qubes "qrexec3" documentation. The v4
//! message `MSG_TRIGGER_SERVICE4` (0x213: source[64], target[64], ident[32],
//! NUL-terminated service name) is the Qubes R4.3 addition. All integers are
//! native-endian (little-endian on x86-64), as the C structs are.
//!
//! Layout of this module:
//! - [`header`]: `struct msg_header`, message type numbering ([`MsgType`]).
//! - [`message`]: the whole message (`Message` view + [`Repr`]) with the
//!   parameter structs (`exec_params`, `service_params`, trigger params,
//!   `peer_info`).
//! - [`version`]: protocol version negotiation and data-chunk limits.
//! - [`names`]: the validation and sanitisation rules for qube names, service
//!   names and request idents, exactly as qrexec-daemon applies them.
//! - [`cmdline`]: the command-line forms (`user:command`, `DEFAULT:`,
//!   `QUBESRPC service+arg source [name|keyword target]`).

pub mod cmdline;
pub mod header;
pub mod message;
pub mod names;
pub mod version;

pub use header::{HEADER_LEN, Header, HeaderRepr, MsgType};
pub use message::{
    ConnectParams, DataStream, ExecParams, Message, PeerInfo, Repr, RequestId, TriggerService,
    TriggerService3, TriggerService4,
};
pub use version::{
    QREXEC_PROTOCOL_V2, QREXEC_PROTOCOL_V3, QREXEC_PROTOCOL_V4, max_data_chunk, negotiate,
};

use core::fmt;

/// vchan port of the control channel between qrexec-daemon and qrexec-agent
/// (`VCHAN_BASE_PORT`).
pub const VCHAN_BASE_PORT: u32 = 512;
/// First vchan port used for data channels (`VCHAN_BASE_DATA_PORT`).
pub const VCHAN_BASE_DATA_PORT: u32 = VCHAN_BASE_PORT + 1;
/// Number of data ports (and of clients) one qrexec-daemon manages
/// (`MAX_CLIENTS` = `MAX_FDS` = 256).
pub const MAX_DATA_PORTS: u32 = 256;
/// Largest data chunk in protocol version 2 (`MAX_DATA_CHUNK_V2`).
pub const MAX_DATA_CHUNK_V2: usize = 4096;
/// Largest data chunk in protocol version 3 and later (`MAX_DATA_CHUNK_V3`).
pub const MAX_DATA_CHUNK_V3: usize = 65536;
/// Largest service name (with argument and NUL) in a trigger message
/// (`MAX_SERVICE_NAME_LEN`).
pub const MAX_SERVICE_NAME_LEN: usize = 65000;
/// Largest body of a command message from a client (`MAX_QREXEC_CMD_LEN`).
pub const MAX_QREXEC_CMD_LEN: usize = 65535;
/// Size of `struct service_params` (the request ident).
pub const IDENT_LEN: usize = 32;
/// The command word that marks an RPC service call (`RPC_REQUEST_COMMAND`).
pub const RPC_REQUEST_COMMAND: &[u8] = b"QUBESRPC";
/// Prefix of a command that must not wait for a GUI session (`NOGUI_CMD_PREFIX`).
pub const NOGUI_CMD_PREFIX: &[u8] = b"nogui:";
/// Exit code for a qrexec problem (`QREXEC_EXIT_PROBLEM`).
pub const QREXEC_EXIT_PROBLEM: u32 = 125;
/// Exit code for a refused request (`QREXEC_EXIT_REQUEST_REFUSED`).
pub const QREXEC_EXIT_REQUEST_REFUSED: u32 = 126;
/// Exit code for a service that does not exist (`QREXEC_EXIT_SERVICE_NOT_FOUND`).
pub const QREXEC_EXIT_SERVICE_NOT_FOUND: u32 = 127;

/// Which string field of a message an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `exec_params.cmdline`.
    Cmdline,
    /// The service name (with `+argument`) of a trigger message.
    ServiceName,
    /// `target_domain` of a trigger message.
    TargetDomain,
    /// `source_domain` of `MSG_TRIGGER_SERVICE4`.
    SourceDomain,
    /// `service_params.ident`.
    RequestId,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Cmdline => "command line",
            Field::ServiceName => "service name",
            Field::TargetDomain => "target domain",
            Field::SourceDomain => "source domain",
            Field::RequestId => "request ident",
        })
    }
}

/// Why bytes are not a valid qrexec message, or why a message cannot be
/// written. The peer that sent malformed bytes is at fault unless the variant
/// says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer ends before the header or the declared body does.
    Truncated {
        /// Bytes the message needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The header's `len` is not allowed for its message type.
    BadLength {
        /// Raw message type.
        msg_type: u32,
        /// Declared body length.
        len: u32,
        /// Smallest allowed body length.
        min: u32,
        /// Largest allowed body length.
        max: u32,
    },
    /// A string field has no NUL terminator.
    NotNulTerminated(Field),
    /// A variable-length string field has a NUL before its end.
    InteriorNul {
        /// The field.
        field: Field,
        /// Offset of the NUL inside the field.
        offset: usize,
    },
    /// A string field is too long to be written (caller's fault on emit).
    FieldTooLong {
        /// The field.
        field: Field,
        /// Its length.
        len: usize,
        /// The largest length that fits.
        max: usize,
    },
    /// The output buffer is too small (caller's fault on emit).
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The message is not allowed in the negotiated protocol version.
    WrongVersion {
        /// Raw message type.
        msg_type: u32,
        /// Negotiated version.
        version: u32,
    },
    /// The peer's protocol version is below what this side accepts.
    IncompatibleVersion {
        /// Version the peer announced.
        remote: u32,
        /// Lowest version accepted here.
        minimum: u32,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Truncated { needed, available } => write!(
                f,
                "qrexec message truncated: needs {needed} bytes, only {available} available (peer closed early or sent a short message)"
            ),
            Error::BadLength {
                msg_type,
                len,
                min,
                max,
            } => write!(
                f,
                "qrexec message type 0x{msg_type:x} declares body length {len}, allowed {min}..={max} (peer sent a malformed header)"
            ),
            Error::NotNulTerminated(field) => {
                write!(
                    f,
                    "qrexec {field} is not NUL-terminated (malformed message from peer)"
                )
            }
            Error::InteriorNul { field, offset } => write!(
                f,
                "qrexec {field} contains a NUL byte at offset {offset} (malformed message from peer)"
            ),
            Error::FieldTooLong { field, len, max } => write!(
                f,
                "qrexec {field} is {len} bytes, at most {max} fit (shorten it before sending)"
            ),
            Error::BufferTooSmall { needed, available } => write!(
                f,
                "output buffer of {available} bytes is too small for a {needed}-byte qrexec message"
            ),
            Error::WrongVersion { msg_type, version } => write!(
                f,
                "qrexec message type 0x{msg_type:x} (or its size) is not allowed in protocol version {version} (peer misbehaves)"
            ),
            Error::IncompatibleVersion { remote, minimum } => write!(
                f,
                "incompatible qrexec protocol version {remote} (need at least {minimum}); update the older side's qrexec packages"
            ),
        }
    }
}

impl core::error::Error for Error {}
