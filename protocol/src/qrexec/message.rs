//! Whole qrexec messages: a checked [`Message`] view (header + body) and the
//! parsed [`Repr`] for every message type, with the parameter structs
//! (`exec_params`, `service_params`, `trigger_service_params{,3,4}`,
//! `peer_info`) laid out as in `libqrexec/qrexec.h`.
//!
//! Parsing checks lengths and NUL termination only; the *content* rules
//! (which bytes a name may hold, what a request ident may contain) live in
//! [`super::names`] so that a daemon can still echo a bad request ident back
//! in `MSG_SERVICE_REFUSED`, as Qubes does. This module must never trust a
//! length or string from the peer and never panic on any input.

use super::{
    Error, Field, IDENT_LEN, MAX_SERVICE_NAME_LEN, QREXEC_PROTOCOL_V2, QREXEC_PROTOCOL_V3,
    QREXEC_PROTOCOL_V4,
    header::{HEADER_LEN, Header, HeaderRepr, MsgType, read_u32, write_u32},
    max_data_chunk,
};

/// Size of `struct exec_params` without the command line.
pub const EXEC_PARAMS_LEN: usize = 8;
/// Size of `struct peer_info`.
pub const PEER_INFO_LEN: usize = 4;
/// Size of `struct trigger_service_params` (protocol 2).
pub const TRIGGER_SERVICE_LEN: usize = 64 + 32 + IDENT_LEN;
/// Size of the fixed part of `struct trigger_service_params3`.
pub const TRIGGER_SERVICE3_FIXED_LEN: usize = 64 + IDENT_LEN;
/// Size of the fixed part of `struct trigger_service_params4`.
pub const TRIGGER_SERVICE4_FIXED_LEN: usize = 64 + 64 + IDENT_LEN;
/// `service_name[64]` of the v2 trigger.
pub const TRIGGER_SERVICE_NAME_LEN: usize = 64;
/// `target_domain[32]` of the v2 trigger.
pub const TRIGGER_SERVICE_TARGET_LEN: usize = 32;
/// `target_domain[64]` / `source_domain[64]` of the v3/v4 triggers.
pub const DOMAIN_FIELD_LEN: usize = 64;

/// The bytes of a fixed-size C string field: everything before the first
/// NUL, and never the field's last byte (Qubes forces it to NUL with
/// `ENSURE_NULL_TERMINATED` before reading the field).
fn fixed_c_string(field: &[u8]) -> &[u8] {
    let usable = field.len().saturating_sub(1);
    let usable = field.get(..usable).unwrap_or(&[]);
    match usable.iter().position(|&b| b == 0) {
        Some(end) => usable.get(..end).unwrap_or(&[]),
        None => usable,
    }
}

/// Write `value` into a fixed-size C string field, NUL-padded.
fn put_fixed_c_string(out: &mut [u8], value: &[u8], field: Field) -> Result<(), Error> {
    let max = out.len().saturating_sub(1);
    if value.len() > max {
        return Err(Error::FieldTooLong {
            field,
            len: value.len(),
            max,
        });
    }
    if let Some(offset) = value.iter().position(|&b| b == 0) {
        return Err(Error::InteriorNul { field, offset });
    }
    out.fill(0);
    if let Some(dst) = out.get_mut(..value.len()) {
        dst.copy_from_slice(value);
    }
    Ok(())
}

/// A variable-length NUL-terminated string at the end of a body: returns it
/// without its terminator.
fn tail_c_string(tail: &[u8], field: Field) -> Result<&[u8], Error> {
    match tail.split_last() {
        Some((0, text)) => match text.iter().position(|&b| b == 0) {
            Some(offset) => Err(Error::InteriorNul { field, offset }),
            None => Ok(text),
        },
        _ => Err(Error::NotNulTerminated(field)),
    }
}

fn check_tail_string(value: &[u8], field: Field, max_with_nul: usize) -> Result<(), Error> {
    if value.len() >= max_with_nul {
        return Err(Error::FieldTooLong {
            field,
            len: value.len(),
            max: max_with_nul - 1,
        });
    }
    if let Some(offset) = value.iter().position(|&b| b == 0) {
        return Err(Error::InteriorNul { field, offset });
    }
    Ok(())
}

/// `struct service_params { char ident[32]; }`, kept as the raw 32 bytes so
/// that a refusal can echo exactly what the peer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub [u8; IDENT_LEN]);

impl RequestId {
    /// A request ident holding `ident` (at most 31 bytes, no NUL), NUL-padded.
    pub fn new(ident: &[u8]) -> Result<Self, Error> {
        let mut raw = [0u8; IDENT_LEN];
        put_fixed_c_string(&mut raw, ident, Field::RequestId)?;
        Ok(RequestId(raw))
    }

    /// Copy the ident out of the first 32 bytes of `bytes` (zero-filled if
    /// shorter).
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut raw = [0u8; IDENT_LEN];
        let n = bytes.len().min(IDENT_LEN);
        if let (Some(dst), Some(src)) = (raw.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        RequestId(raw)
    }

    /// The ident as a C string (bytes before the first NUL, at most 31).
    pub fn as_bytes(&self) -> &[u8] {
        fixed_c_string(&self.0)
    }

    /// The ident, checked against Qubes' rule (see
    /// [`super::names::validate_request_id`]).
    pub fn validate(&self) -> Result<&[u8], super::names::NameError> {
        super::names::validate_request_id(&self.0)
    }
}

/// `struct exec_params` without its command line: where the data channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectParams {
    /// Domain id of the other end of the data vchan.
    pub connect_domain: u32,
    /// vchan port of the data channel (0 = "allocate one for me").
    pub connect_port: u32,
}

impl ConnectParams {
    fn parse(body: &[u8]) -> Self {
        ConnectParams {
            connect_domain: read_u32(body, 0),
            connect_port: read_u32(body, 4),
        }
    }

    fn emit(&self, out: &mut [u8]) {
        write_u32(out, 0, self.connect_domain);
        write_u32(out, 4, self.connect_port);
    }
}

/// `struct exec_params` of `MSG_EXEC_CMDLINE` / `MSG_JUST_EXEC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecParams<'a> {
    /// Data channel parameters.
    pub connect: ConnectParams,
    /// The command line without its NUL terminator, or `None` for the
    /// daemon's reply to a client, which carries no command line at all.
    pub cmdline: Option<&'a [u8]>,
}

/// Which stream a data message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStream {
    /// `MSG_DATA_STDIN`.
    Stdin,
    /// `MSG_DATA_STDOUT`.
    Stdout,
    /// `MSG_DATA_STDERR`.
    Stderr,
}

impl DataStream {
    /// The message type that carries this stream.
    pub fn msg_type(self) -> MsgType {
        match self {
            DataStream::Stdin => MsgType::DataStdin,
            DataStream::Stdout => MsgType::DataStdout,
            DataStream::Stderr => MsgType::DataStderr,
        }
    }
}

/// `struct trigger_service_params` (protocol 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerService<'a> {
    /// `service_name[64]` as a C string.
    pub service_name: &'a [u8],
    /// `target_domain[32]` as a C string.
    pub target_domain: &'a [u8],
    /// `request_id`.
    pub request_id: RequestId,
}

/// `struct trigger_service_params3` + NUL-terminated service name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerService3<'a> {
    /// `target_domain[64]` as a C string.
    pub target_domain: &'a [u8],
    /// `request_id`.
    pub request_id: RequestId,
    /// The service name (`name+argument`) without its NUL.
    pub service_name: &'a [u8],
}

/// `struct trigger_service_params4` + NUL-terminated service name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerService4<'a> {
    /// `source_domain[64]` as a C string (empty = no requested source).
    pub source_domain: &'a [u8],
    /// `target_domain[64]` as a C string.
    pub target_domain: &'a [u8],
    /// `request_id`.
    pub request_id: RequestId,
    /// The service name (`name+argument`) without its NUL.
    pub service_name: &'a [u8],
}

/// `struct peer_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// The sender's protocol version.
    pub version: u32,
}

/// A parsed qrexec message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr<'a> {
    /// `MSG_DATA_STDIN/STDOUT/STDERR`; empty `data` is EOF.
    Data {
        /// Which stream.
        stream: DataStream,
        /// The bytes.
        data: &'a [u8],
    },
    /// `MSG_DATA_EXIT_CODE`.
    ExitCode(u32),
    /// `MSG_EXEC_CMDLINE`.
    ExecCmdline(ExecParams<'a>),
    /// `MSG_JUST_EXEC`.
    JustExec(ExecParams<'a>),
    /// `MSG_SERVICE_CONNECT`: `exec_params` + `service_params`, or only
    /// `exec_params` in the daemon's reply to a client.
    ServiceConnect {
        /// Data channel parameters.
        connect: ConnectParams,
        /// The request being answered (absent in the daemon's reply).
        request_id: Option<RequestId>,
    },
    /// `MSG_SERVICE_REFUSED`.
    ServiceRefused(RequestId),
    /// `MSG_TRIGGER_SERVICE` (protocol 2).
    TriggerService(TriggerService<'a>),
    /// `MSG_CONNECTION_TERMINATED`.
    ConnectionTerminated(ConnectParams),
    /// `MSG_TRIGGER_SERVICE3`.
    TriggerService3(TriggerService3<'a>),
    /// `MSG_TRIGGER_SERVICE4`.
    TriggerService4(TriggerService4<'a>),
    /// `MSG_HELLO`.
    Hello(PeerInfo),
    /// A type this implementation does not know, kept as received.
    Unknown {
        /// Raw type.
        msg_type: u32,
        /// Raw body.
        body: &'a [u8],
    },
}

impl<'a> Repr<'a> {
    /// The message type of this message.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Repr::Data { stream, .. } => stream.msg_type(),
            Repr::ExitCode(_) => MsgType::DataExitCode,
            Repr::ExecCmdline(_) => MsgType::ExecCmdline,
            Repr::JustExec(_) => MsgType::JustExec,
            Repr::ServiceConnect { .. } => MsgType::ServiceConnect,
            Repr::ServiceRefused(_) => MsgType::ServiceRefused,
            Repr::TriggerService(_) => MsgType::TriggerService,
            Repr::ConnectionTerminated(_) => MsgType::ConnectionTerminated,
            Repr::TriggerService3(_) => MsgType::TriggerService3,
            Repr::TriggerService4(_) => MsgType::TriggerService4,
            Repr::Hello(_) => MsgType::Hello,
            Repr::Unknown { msg_type, .. } => MsgType::from(*msg_type),
        }
    }

    /// Parse one message from the start of `bytes`; returns it and the number
    /// of bytes it occupies.
    pub fn parse_bytes(bytes: &'a [u8]) -> Result<(Self, usize), Error> {
        let message = Message::new_checked(bytes)?;
        let total = message.total_len();
        Ok((Repr::parse(&message)?, total))
    }

    /// Parse a checked message.
    pub fn parse(message: &Message<&'a [u8]>) -> Result<Self, Error> {
        let header = HeaderRepr::parse(&Header::new_unchecked(message.buffer))?;
        let body = message
            .buffer
            .get(HEADER_LEN..HEADER_LEN + header.len as usize)
            .ok_or(Error::Truncated {
                needed: HEADER_LEN + header.len as usize,
                available: message.buffer.len(),
            })?;
        Repr::parse_body(header, body)
    }

    /// Parse a body read separately from its (already parsed) header, as a
    /// stream reader does.
    pub fn parse_body(header: HeaderRepr, body: &'a [u8]) -> Result<Self, Error> {
        let raw_type = u32::from(header.msg_type);
        let (min, max) = header.msg_type.body_len_limits();
        let len = body.len();
        if len != header.len as usize || len < min as usize || len > max as usize {
            return Err(Error::BadLength {
                msg_type: raw_type,
                len: len as u32,
                min,
                max,
            });
        }
        let bad_len = Error::BadLength {
            msg_type: raw_type,
            len: len as u32,
            min,
            max,
        };
        let params = body.get(..EXEC_PARAMS_LEN).unwrap_or(&[]);
        let rest = body.get(EXEC_PARAMS_LEN..).unwrap_or(&[]);
        Ok(match header.msg_type {
            MsgType::DataStdin => Repr::Data {
                stream: DataStream::Stdin,
                data: body,
            },
            MsgType::DataStdout => Repr::Data {
                stream: DataStream::Stdout,
                data: body,
            },
            MsgType::DataStderr => Repr::Data {
                stream: DataStream::Stderr,
                data: body,
            },
            MsgType::DataExitCode => Repr::ExitCode(read_u32(body, 0)),
            MsgType::ExecCmdline | MsgType::JustExec => {
                let cmdline = if rest.is_empty() {
                    None
                } else {
                    Some(tail_c_string(rest, Field::Cmdline)?)
                };
                let exec = ExecParams {
                    connect: ConnectParams::parse(params),
                    cmdline,
                };
                if header.msg_type == MsgType::ExecCmdline {
                    Repr::ExecCmdline(exec)
                } else {
                    Repr::JustExec(exec)
                }
            }
            MsgType::ServiceConnect => {
                // Qubes' programs send the whole 32-byte ident, but Qubes'
                // daemon and agent also take a shorter one (read as a C
                // string), which is zero-padded here.
                let request_id = match rest.len() {
                    0 => None,
                    1..=IDENT_LEN => Some(RequestId::from_slice(rest)),
                    _ => return Err(bad_len),
                };
                Repr::ServiceConnect {
                    connect: ConnectParams::parse(params),
                    request_id,
                }
            }
            MsgType::ServiceRefused => Repr::ServiceRefused(RequestId::from_slice(body)),
            MsgType::TriggerService => {
                let name = body.get(..TRIGGER_SERVICE_NAME_LEN).unwrap_or(&[]);
                let target = body
                    .get(TRIGGER_SERVICE_NAME_LEN..TRIGGER_SERVICE_NAME_LEN + 32)
                    .unwrap_or(&[]);
                let ident = body
                    .get(TRIGGER_SERVICE_NAME_LEN + TRIGGER_SERVICE_TARGET_LEN..)
                    .unwrap_or(&[]);
                Repr::TriggerService(TriggerService {
                    service_name: fixed_c_string(name),
                    target_domain: fixed_c_string(target),
                    request_id: RequestId::from_slice(ident),
                })
            }
            MsgType::ConnectionTerminated => Repr::ConnectionTerminated(ConnectParams::parse(body)),
            MsgType::TriggerService3 => {
                let target = body.get(..DOMAIN_FIELD_LEN).unwrap_or(&[]);
                let ident = body
                    .get(DOMAIN_FIELD_LEN..TRIGGER_SERVICE3_FIXED_LEN)
                    .unwrap_or(&[]);
                let name = body.get(TRIGGER_SERVICE3_FIXED_LEN..).unwrap_or(&[]);
                Repr::TriggerService3(TriggerService3 {
                    target_domain: fixed_c_string(target),
                    request_id: RequestId::from_slice(ident),
                    service_name: tail_c_string(name, Field::ServiceName)?,
                })
            }
            MsgType::TriggerService4 => {
                let source = body.get(..DOMAIN_FIELD_LEN).unwrap_or(&[]);
                let target = body
                    .get(DOMAIN_FIELD_LEN..2 * DOMAIN_FIELD_LEN)
                    .unwrap_or(&[]);
                let ident = body
                    .get(2 * DOMAIN_FIELD_LEN..TRIGGER_SERVICE4_FIXED_LEN)
                    .unwrap_or(&[]);
                let name = body.get(TRIGGER_SERVICE4_FIXED_LEN..).unwrap_or(&[]);
                Repr::TriggerService4(TriggerService4 {
                    source_domain: fixed_c_string(source),
                    target_domain: fixed_c_string(target),
                    request_id: RequestId::from_slice(ident),
                    service_name: tail_c_string(name, Field::ServiceName)?,
                })
            }
            MsgType::Hello => Repr::Hello(PeerInfo {
                version: read_u32(body, 0),
            }),
            MsgType::Unknown(msg_type) => Repr::Unknown { msg_type, body },
        })
    }

    /// Check the rules that depend on the negotiated protocol version: data
    /// chunk size, and which trigger message is allowed.
    pub fn check_version(&self, version: u32) -> Result<(), Error> {
        let allowed = match self {
            Repr::Data { data, .. } => data.len() <= max_data_chunk(version),
            Repr::TriggerService(_) => (QREXEC_PROTOCOL_V2..QREXEC_PROTOCOL_V3).contains(&version),
            Repr::TriggerService3(_) => version >= QREXEC_PROTOCOL_V3,
            Repr::TriggerService4(_) => version >= QREXEC_PROTOCOL_V4,
            _ => true,
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::WrongVersion {
                msg_type: self.msg_type().into(),
                version,
            })
        }
    }

    /// Body length of this message.
    pub fn body_len(&self) -> usize {
        match self {
            Repr::Data { data, .. } => data.len(),
            Repr::ExitCode(_) => 4,
            Repr::ExecCmdline(exec) | Repr::JustExec(exec) => {
                EXEC_PARAMS_LEN + exec.cmdline.map_or(0, |c| c.len() + 1)
            }
            Repr::ServiceConnect { request_id, .. } => {
                EXEC_PARAMS_LEN + request_id.map_or(0, |_| IDENT_LEN)
            }
            Repr::ServiceRefused(_) => IDENT_LEN,
            Repr::TriggerService(_) => TRIGGER_SERVICE_LEN,
            Repr::ConnectionTerminated(_) => EXEC_PARAMS_LEN,
            Repr::TriggerService3(t) => TRIGGER_SERVICE3_FIXED_LEN + t.service_name.len() + 1,
            Repr::TriggerService4(t) => TRIGGER_SERVICE4_FIXED_LEN + t.service_name.len() + 1,
            Repr::Hello(_) => PEER_INFO_LEN,
            Repr::Unknown { body, .. } => body.len(),
        }
    }

    /// Total length (header + body) of this message.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// The header of this message.
    pub fn header(&self) -> HeaderRepr {
        HeaderRepr {
            msg_type: self.msg_type(),
            len: self.body_len() as u32,
        }
    }

    /// Write header and body into `buf`; returns the bytes written. Refuses to
    /// write anything a conforming peer would reject (over-long fields, NULs
    /// inside strings, a body longer than the type allows).
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, Error> {
        let total = self.buffer_len();
        let body_len = total - HEADER_LEN;
        let msg_type = self.msg_type();
        let (min, max) = msg_type.body_len_limits();
        if body_len < min as usize || body_len > max as usize {
            return Err(Error::BadLength {
                msg_type: msg_type.into(),
                len: u32::try_from(body_len).unwrap_or(u32::MAX),
                min,
                max,
            });
        }
        let available = buf.len();
        let out = buf.get_mut(..total).ok_or(Error::BufferTooSmall {
            needed: total,
            available,
        })?;
        let (head, body) = out.split_at_mut(HEADER_LEN);
        self.header().emit(head)?;
        match self {
            Repr::Data { data, .. } => body.copy_from_slice(data),
            Repr::ExitCode(code) => write_u32(body, 0, *code),
            Repr::ExecCmdline(exec) | Repr::JustExec(exec) => {
                let (params, tail) = body.split_at_mut(EXEC_PARAMS_LEN);
                exec.connect.emit(params);
                if let Some(cmdline) = exec.cmdline {
                    if let Some(offset) = cmdline.iter().position(|&b| b == 0) {
                        return Err(Error::InteriorNul {
                            field: Field::Cmdline,
                            offset,
                        });
                    }
                    let (text, nul) = tail.split_at_mut(cmdline.len());
                    text.copy_from_slice(cmdline);
                    nul.fill(0);
                }
            }
            Repr::ServiceConnect {
                connect,
                request_id,
            } => {
                let (params, tail) = body.split_at_mut(EXEC_PARAMS_LEN);
                connect.emit(params);
                if let Some(id) = request_id {
                    tail.copy_from_slice(&id.0);
                }
            }
            Repr::ServiceRefused(id) => body.copy_from_slice(&id.0),
            Repr::TriggerService(t) => {
                let (name, rest) = body.split_at_mut(TRIGGER_SERVICE_NAME_LEN);
                let (target, ident) = rest.split_at_mut(TRIGGER_SERVICE_TARGET_LEN);
                put_fixed_c_string(name, t.service_name, Field::ServiceName)?;
                put_fixed_c_string(target, t.target_domain, Field::TargetDomain)?;
                ident.copy_from_slice(&t.request_id.0);
            }
            Repr::ConnectionTerminated(connect) => connect.emit(body),
            Repr::TriggerService3(t) => {
                check_tail_string(t.service_name, Field::ServiceName, MAX_SERVICE_NAME_LEN)?;
                let (target, rest) = body.split_at_mut(DOMAIN_FIELD_LEN);
                let (ident, name) = rest.split_at_mut(IDENT_LEN);
                put_fixed_c_string(target, t.target_domain, Field::TargetDomain)?;
                ident.copy_from_slice(&t.request_id.0);
                let (text, nul) = name.split_at_mut(t.service_name.len());
                text.copy_from_slice(t.service_name);
                nul.fill(0);
            }
            Repr::TriggerService4(t) => {
                check_tail_string(t.service_name, Field::ServiceName, MAX_SERVICE_NAME_LEN)?;
                let (source, rest) = body.split_at_mut(DOMAIN_FIELD_LEN);
                let (target, rest) = rest.split_at_mut(DOMAIN_FIELD_LEN);
                let (ident, name) = rest.split_at_mut(IDENT_LEN);
                put_fixed_c_string(source, t.source_domain, Field::SourceDomain)?;
                put_fixed_c_string(target, t.target_domain, Field::TargetDomain)?;
                ident.copy_from_slice(&t.request_id.0);
                let (text, nul) = name.split_at_mut(t.service_name.len());
                text.copy_from_slice(t.service_name);
                nul.fill(0);
            }
            Repr::Hello(info) => write_u32(body, 0, info.version),
            Repr::Unknown { body: raw, .. } => body.copy_from_slice(raw),
        }
        Ok(total)
    }
}

/// A checked view of one whole message (header and the body it declares) at
/// the start of a buffer. After [`Message::new_checked`] no accessor panics.
#[derive(Debug, Clone)]
pub struct Message<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Message<T> {
    /// Wrap a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        Message { buffer }
    }

    /// Wrap a buffer that holds a header with a length allowed for its type
    /// and the whole body it declares.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let header = HeaderRepr::parse(&Header::new_checked(buffer.as_ref())?)?;
        let needed = HEADER_LEN + header.len as usize;
        let available = buffer.as_ref().len();
        if available < needed {
            return Err(Error::Truncated { needed, available });
        }
        Ok(Message { buffer })
    }

    /// The header view.
    pub fn header(&self) -> Header<&[u8]> {
        Header::new_unchecked(self.buffer.as_ref())
    }

    /// The message type.
    pub fn msg_type(&self) -> MsgType {
        self.header().msg_type()
    }

    /// Header plus declared body length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.header().len() as usize
    }

    /// The body (empty if the buffer is shorter than declared, which a
    /// checked view rules out).
    pub fn body(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(HEADER_LEN..self.total_len())
            .unwrap_or(&[])
    }

    /// The raw request ident of a trigger message, even when the rest of the
    /// message is malformed, so a refusal can echo it as Qubes does.
    pub fn trigger_request_id(&self) -> Option<RequestId> {
        let body = self.body();
        let start = match self.msg_type() {
            MsgType::TriggerService => TRIGGER_SERVICE_NAME_LEN + TRIGGER_SERVICE_TARGET_LEN,
            MsgType::TriggerService3 => DOMAIN_FIELD_LEN,
            MsgType::TriggerService4 => 2 * DOMAIN_FIELD_LEN,
            _ => return None,
        };
        body.get(start..start + IDENT_LEN)
            .map(RequestId::from_slice)
    }

    /// Give the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    fn roundtrip(repr: Repr<'_>) {
        let mut buf = [0u8; 70_000];
        let n = repr.emit(&mut buf).unwrap();
        assert_eq!(n, repr.buffer_len());
        let (parsed, used) = Repr::parse_bytes(&buf[..n]).unwrap();
        assert_eq!(used, n);
        assert_eq!(parsed, repr);
    }

    fn id(s: &[u8]) -> RequestId {
        RequestId::new(s).unwrap()
    }

    #[test]
    fn every_message_type_roundtrips() {
        let big = [0x5au8; 65536];
        let connect = ConnectParams {
            connect_domain: 7,
            connect_port: 513,
        };
        let cases = [
            Repr::Data {
                stream: DataStream::Stdin,
                data: b"hello",
            },
            Repr::Data {
                stream: DataStream::Stdout,
                data: &big,
            },
            Repr::Data {
                stream: DataStream::Stderr,
                data: b"",
            },
            Repr::ExitCode(0),
            Repr::ExitCode(u32::MAX),
            Repr::ExecCmdline(ExecParams {
                connect,
                cmdline: Some(b"user:QUBESRPC test.Add vm1"),
            }),
            Repr::ExecCmdline(ExecParams {
                connect,
                cmdline: None,
            }),
            Repr::JustExec(ExecParams {
                connect,
                cmdline: Some(b""),
            }),
            Repr::ServiceConnect {
                connect,
                request_id: Some(id(b"SOCKET11")),
            },
            Repr::ServiceConnect {
                connect,
                request_id: None,
            },
            Repr::ServiceRefused(id(b"SOCKET3")),
            Repr::TriggerService(TriggerService {
                service_name: b"qubes.Filecopy",
                target_domain: b"work",
                request_id: id(b"13"),
            }),
            Repr::ConnectionTerminated(connect),
            Repr::TriggerService3(TriggerService3 {
                target_domain: b"@dispvm:work-dvm",
                request_id: id(b"SOCKET"),
                service_name: b"test.File+testfile1",
            }),
            Repr::TriggerService4(TriggerService4 {
                source_domain: b"",
                target_domain: b"vmB",
                request_id: id(b"SOCKET"),
                service_name: b"test.Add",
            }),
            Repr::Hello(PeerInfo { version: 3 }),
            Repr::Unknown {
                msg_type: 0x1234,
                body: b"\x01\x02",
            },
        ];
        for repr in cases {
            roundtrip(repr);
        }
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn golden_hello_v3() {
        let mut buf = [0u8; 12];
        Repr::Hello(PeerInfo { version: 3 }).emit(&mut buf).unwrap();
        assert_eq!(buf, [0x00, 0x03, 0, 0, 0x04, 0, 0, 0, 0x03, 0, 0, 0]);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn golden_exec_cmdline() {
        let mut buf = [0u8; 64];
        let repr = Repr::ExecCmdline(ExecParams {
            connect: ConnectParams {
                connect_domain: 0,
                connect_port: 513,
            },
            cmdline: Some(b"user:ls"),
        });
        let n = repr.emit(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"\x00\x02\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x01\x02\x00\x00user:ls\x00"
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn golden_data_exit_and_refused() {
        let mut buf = [0u8; 64];
        let n = Repr::ExitCode(126).emit(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"\x93\x01\x00\x00\x04\x00\x00\x00\x7e\x00\x00\x00"
        );
        let n = Repr::Data {
            stream: DataStream::Stdout,
            data: b"",
        }
        .emit(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], b"\x91\x01\x00\x00\x00\x00\x00\x00");
        let n = Repr::ServiceRefused(id(b"SOCKET7")).emit(&mut buf).unwrap();
        let mut expected = [0u8; 40];
        expected[..8].copy_from_slice(b"\x03\x02\x00\x00\x20\x00\x00\x00");
        expected[8..15].copy_from_slice(b"SOCKET7");
        assert_eq!(&buf[..n], &expected);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn golden_trigger_service3() {
        let mut buf = [0u8; 200];
        let n = Repr::TriggerService3(TriggerService3 {
            target_domain: b"vmB",
            request_id: id(b"SOCKET"),
            service_name: b"test.Add",
        })
        .emit(&mut buf)
        .unwrap();
        assert_eq!(n, 8 + 96 + 9);
        assert_eq!(&buf[..8], b"\x12\x02\x00\x00\x69\x00\x00\x00");
        assert_eq!(&buf[8..11], b"vmB");
        assert!(buf[11..72].iter().all(|&b| b == 0));
        assert_eq!(&buf[72..78], b"SOCKET");
        assert!(buf[78..104].iter().all(|&b| b == 0));
        assert_eq!(&buf[104..113], b"test.Add\0");
    }

    #[test]
    fn short_and_oversized_messages_are_rejected() {
        assert!(matches!(
            Repr::parse_bytes(&[0x00, 0x03, 0, 0]),
            Err(Error::Truncated { .. })
        ));
        // HELLO declaring 4 bytes but carrying 2.
        let hello = Repr::Hello(PeerInfo { version: 3 }).header().to_bytes();
        let mut buf = [0u8; 10];
        buf[..8].copy_from_slice(&hello);
        assert_eq!(
            Repr::parse_bytes(&buf),
            Err(Error::Truncated {
                needed: 12,
                available: 10
            })
        );
        // Data chunk of 65537 bytes.
        let head = HeaderRepr {
            msg_type: MsgType::DataStdout,
            len: 65537,
        }
        .to_bytes();
        assert!(matches!(
            Repr::parse_bytes(&head),
            Err(Error::BadLength { .. })
        ));
        // SERVICE_CONNECT with a 20-byte ident: taken (as Qubes takes it),
        // zero-padded; one longer than 32 bytes is refused by the header.
        let mut buf = [0u8; 8 + 28];
        HeaderRepr {
            msg_type: MsgType::ServiceConnect,
            len: 28,
        }
        .emit(&mut buf)
        .unwrap();
        buf[16] = b'S';
        match Repr::parse_bytes(&buf) {
            Ok((
                Repr::ServiceConnect {
                    request_id: Some(id),
                    ..
                },
                36,
            )) => assert_eq!(id.as_bytes(), b"S"),
            other => panic!("{other:?}"),
        }
        let mut buf = [0u8; 8 + 41];
        HeaderRepr {
            msg_type: MsgType::ServiceConnect,
            len: 41,
        }
        .emit(&mut buf)
        .unwrap();
        assert!(Repr::parse_bytes(&buf).is_err());
        // parse_body with a body that disagrees with the header.
        let header = HeaderRepr {
            msg_type: MsgType::DataExitCode,
            len: 4,
        };
        assert!(Repr::parse_body(header, &[0, 0]).is_err());
    }

    #[test]
    fn bad_nuls_are_rejected() {
        let mut buf = [0u8; 64];
        // cmdline without NUL terminator
        HeaderRepr {
            msg_type: MsgType::ExecCmdline,
            len: 10,
        }
        .emit(&mut buf)
        .unwrap();
        buf[16] = b'a';
        buf[17] = b'b';
        assert_eq!(
            Repr::parse_bytes(&buf[..18]),
            Err(Error::NotNulTerminated(Field::Cmdline))
        );
        // cmdline with an interior NUL
        buf[17] = 0;
        HeaderRepr {
            msg_type: MsgType::ExecCmdline,
            len: 11,
        }
        .emit(&mut buf)
        .unwrap();
        buf[18] = 0;
        assert_eq!(
            Repr::parse_bytes(&buf[..19]),
            Err(Error::InteriorNul {
                field: Field::Cmdline,
                offset: 1
            })
        );
        // TRIGGER_SERVICE3 whose service name lacks its NUL
        let mut buf = [0u8; 8 + 96 + 3];
        HeaderRepr {
            msg_type: MsgType::TriggerService3,
            len: 99,
        }
        .emit(&mut buf)
        .unwrap();
        buf[8 + 64..8 + 64 + 6].copy_from_slice(b"SOCKET");
        buf[104..107].copy_from_slice(b"abc");
        let message = Message::new_checked(&buf[..]).unwrap();
        assert_eq!(
            Repr::parse(&message),
            Err(Error::NotNulTerminated(Field::ServiceName))
        );
        // ... but the ident is still available for the refusal.
        assert_eq!(message.trigger_request_id().unwrap().as_bytes(), b"SOCKET");
    }

    #[test]
    fn unterminated_fixed_fields_are_cut_like_ensure_null_terminated() {
        let mut buf = [b'x'; 8 + TRIGGER_SERVICE_LEN];
        HeaderRepr {
            msg_type: MsgType::TriggerService,
            len: TRIGGER_SERVICE_LEN as u32,
        }
        .emit(&mut buf)
        .unwrap();
        let (repr, _) = Repr::parse_bytes(&buf).unwrap();
        match repr {
            Repr::TriggerService(t) => {
                assert_eq!(t.service_name.len(), 63);
                assert_eq!(t.target_domain.len(), 31);
                assert!(t.request_id.validate().is_err());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn emit_refuses_bad_fields() {
        let mut buf = [0u8; 300];
        let long = [b'a'; 64];
        let r = Repr::TriggerService3(TriggerService3 {
            target_domain: &long,
            request_id: id(b"x"),
            service_name: b"s",
        });
        assert!(matches!(
            r.emit(&mut buf),
            Err(Error::FieldTooLong {
                field: Field::TargetDomain,
                ..
            })
        ));
        let r = Repr::ExecCmdline(ExecParams {
            connect: ConnectParams::default(),
            cmdline: Some(b"a\0b"),
        });
        assert!(matches!(r.emit(&mut buf), Err(Error::InteriorNul { .. })));
        assert!(RequestId::new(&[b'a'; 32]).is_err());
        let r = Repr::Hello(PeerInfo { version: 3 });
        assert_eq!(
            r.emit(&mut buf[..11]),
            Err(Error::BufferTooSmall {
                needed: 12,
                available: 11
            })
        );
        let huge = [b'a'; 70_000];
        let r = Repr::Data {
            stream: DataStream::Stdout,
            data: &huge,
        };
        let mut big = [0u8; 70_100];
        assert!(matches!(r.emit(&mut big), Err(Error::BadLength { .. })));
    }

    #[test]
    fn version_rules() {
        let chunk = [0u8; 5000];
        let data = Repr::Data {
            stream: DataStream::Stdout,
            data: &chunk,
        };
        assert!(data.check_version(QREXEC_PROTOCOL_V2).is_err());
        assert!(data.check_version(QREXEC_PROTOCOL_V3).is_ok());
        let t2 = Repr::TriggerService(TriggerService {
            service_name: b"a",
            target_domain: b"b",
            request_id: id(b"c"),
        });
        assert!(t2.check_version(2).is_ok());
        assert!(t2.check_version(3).is_err());
        let t3 = Repr::TriggerService3(TriggerService3 {
            target_domain: b"b",
            request_id: id(b"c"),
            service_name: b"a",
        });
        assert!(t3.check_version(2).is_err());
        assert!(t3.check_version(3).is_ok());
        let t4 = Repr::TriggerService4(TriggerService4 {
            source_domain: b"",
            target_domain: b"b",
            request_id: id(b"c"),
            service_name: b"a",
        });
        assert!(t4.check_version(3).is_err());
        assert!(t4.check_version(4).is_ok());
    }

    #[test]
    fn parse_never_panics_on_prefixes_of_valid_messages() {
        let mut buf = [0u8; 300];
        let n = Repr::TriggerService4(TriggerService4 {
            source_domain: b"src",
            target_domain: b"dst",
            request_id: id(b"SOCKET1"),
            service_name: b"a.b+c",
        })
        .emit(&mut buf)
        .unwrap();
        for cut in 0..n {
            assert!(Repr::parse_bytes(&buf[..cut]).is_err());
        }
        assert!(Repr::parse_bytes(&buf[..n]).is_ok());
    }
}
