//! The firewall's qrexec agent: it answers dom0's qrexec-daemon on vchan
//! port 512 and runs the few services a firewall VM offers.
//!
//! Protocol (facts from qubes-core-qrexec `agent/qrexec-agent.c`,
//! `agent/qrexec-agent-data.c`, `libqrexec/exec.c`; wire layouts from
//! [`protocol::qrexec`], never re-declared here):
//! - The VM's agent is the vchan *server* on port 512; qrexec-daemon
//!   connects. Both sides send `MSG_HELLO` with their version and the lower
//!   one wins; below 2 the link is refused. We announce version 4: the only
//!   v4 addition (`MSG_TRIGGER_SERVICE4`) is agent→daemon and never sent by
//!   us, so nothing dom0 may send us changes.
//! - `MSG_EXEC_CMDLINE` / `MSG_JUST_EXEC` carry `exec_params` (the data
//!   vchan's domain and port) and `user:command`. The agent connects to that
//!   data vchan as *client*, exchanges `MSG_HELLO` again (this sets the data
//!   chunk limit: 4096 bytes in v2, 65536 from v3), reads `MSG_DATA_STDIN`
//!   and writes `MSG_DATA_STDOUT`, `MSG_DATA_STDERR` (an empty one is EOF:
//!   stdout EOF, then stderr EOF), then `MSG_DATA_EXIT_CODE`, closes the data
//!   vchan and sends `MSG_CONNECTION_TERMINATED` (the 8-byte `exec_params`
//!   without command line) to the daemon so it frees the port. A
//!   `MSG_JUST_EXEC` data channel carries only `MSG_DATA_EXIT_CODE` 0.
//! - `MSG_SERVICE_CONNECT` / `MSG_SERVICE_REFUSED` answer calls the agent
//!   triggered; this agent never triggers one, so they are logged and ignored
//!   (as the Linux agent ignores an unknown ident). Any other message type on
//!   the control channel makes the Linux agent exit; here the link is closed
//!   with a logged reason and the program flow offers a fresh one.
//! - The command is `user:QUBESRPC service+arg source` (optionally with
//!   `nogui:`), split by [`protocol::qrexec::cmdline`] as the Linux agent
//!   does; the user is ignored (there are no users here), like
//!   qubes-mirage-firewall's `command.ml`.
//!
//! Services: `qubes.WaitForSession` (always ready), `qubes.SetDateTime`
//! (one line on stdin in `date -u -Iseconds` form, e.g.
//! `2015-07-31T16:10:43+0000`, as dom0's `qvm-sync-clock` sends it; sets the
//! wall clock the status report shows), and `qubes.FirewallStatus`
//! (counters, formatted by [`crate::status`]). Anything else gets one clear
//! stderr line and exit code 127 (`QREXEC_EXIT_SERVICE_NOT_FOUND`); a shell
//! command gets the same, since there is no shell.
//!
//! Every byte here comes from dom0 (or whatever holds the other end of a
//! data vchan), so nothing a peer sends may panic, allocate without bound or
//! block: message bodies are bounded by the protocol's per-type limits,
//! stdin and output by [`ControlCaps`], running calls by a count cap (at the
//! cap a call is refused and counted), and every wait has a deadline. This
//! module must never trust a length it did not check, and never block.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use log::{info, warn};
use protocol::qrexec::{
    self as wire, ConnectParams, DataStream, ExecParams, HEADER_LEN, HeaderRepr, MsgType, PeerInfo,
    QREXEC_EXIT_PROBLEM, QREXEC_EXIT_SERVICE_NOT_FOUND, QREXEC_PROTOCOL_V2, QREXEC_PROTOCOL_V4,
    Repr, cmdline, max_data_chunk, names,
};
use smoltcp::time::Duration;

use crate::config::ControlCaps;
use crate::platform::{ByteStream, Instant, LinkState, Platform, StreamError};

/// The version this agent announces in `MSG_HELLO`.
pub const LOCAL_VERSION: u32 = QREXEC_PROTOCOL_V4;
/// The lowest version accepted from the daemon or a data peer.
pub const MIN_VERSION: u32 = QREXEC_PROTOCOL_V2;
/// How long a data vchan may take to connect and say HELLO.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often opening a data vchan is retried while its server is not there
/// yet: dom0's qrexec-client offers it only after qrexec-daemon has sent us
/// the command (qrexec-client.c: negotiate, then `libvchan_server_init`),
/// and Qubes' agent waits for it (qubes-core-vchan-xen
/// `libvchan_client_init`: "no xenstore entry (yet), wait more"), up to
/// [`CONNECT_TIMEOUT`].
pub const CONNECT_RETRY: Duration = Duration::from_millis(10);
/// How long a service waits for its stdin line before running with what it has.
pub const STDIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a finished call may take to hand its output to the peer.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Most bytes of control-channel output queued when dom0 stops reading
/// (each `MSG_CONNECTION_TERMINATED` is 16 bytes).
const CONTROL_OUTBOX_BYTES: usize = 64 * 1024;

/// Why a link was closed. Says who broke what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// The transport failed or the peer went away.
    Stream(StreamError),
    /// The peer sent bytes that are not a valid qrexec message.
    Malformed(wire::Error),
    /// The peer's protocol version is too old.
    Version(wire::Error),
    /// A valid message that is not allowed at this point.
    Unexpected {
        /// The raw message type.
        msg_type: u32,
        /// Where we were.
        expected: &'static str,
    },
    /// The peer did not connect or answer in time.
    Timeout(&'static str),
    /// Our outgoing queue is full because the peer stopped reading.
    Stalled,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Stream(error) => write!(f, "{error}"),
            LinkError::Malformed(error) => write!(f, "{error}"),
            LinkError::Version(error) => write!(f, "{error}"),
            LinkError::Unexpected { msg_type, expected } => write!(
                f,
                "unexpected qrexec message {} (0x{msg_type:x}) while {expected} (peer broke the protocol)",
                MsgType::from(*msg_type).name()
            ),
            LinkError::Timeout(what) => write!(f, "timed out {what}"),
            LinkError::Stalled => f.write_str("peer stopped reading; output queue full"),
        }
    }
}

impl From<StreamError> for LinkError {
    fn from(error: StreamError) -> LinkError {
        LinkError::Stream(error)
    }
}

// ---------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------

/// Reads whole messages from a byte stream: the header first (checked
/// against the per-type length limits), then exactly the body it declares.
#[derive(Debug, Default)]
struct Framer {
    buf: Vec<u8>,
    header: Option<HeaderRepr>,
}

impl Framer {
    /// Reads until one whole message is buffered (`Ok(true)`) or nothing
    /// more is available now (`Ok(false)`).
    fn fill<V: ByteStream>(&mut self, link: &mut V) -> Result<bool, LinkError> {
        loop {
            let total = match self.header {
                None => HEADER_LEN,
                Some(header) => HEADER_LEN + header.len as usize,
            };
            let have = self.buf.len();
            if have >= total {
                if self.header.is_some() {
                    return Ok(true);
                }
                let header = HeaderRepr::parse_bytes(&self.buf).map_err(LinkError::Malformed)?;
                self.header = Some(header);
                continue;
            }
            self.buf.resize(total, 0);
            let read = match self.buf.get_mut(have..total) {
                Some(room) => link.read(room),
                None => Ok(0),
            };
            match read {
                Ok(n) => {
                    self.buf.truncate(have + n);
                    if n == 0 {
                        return Ok(false);
                    }
                }
                Err(error) => {
                    self.buf.truncate(have);
                    return Err(LinkError::Stream(error));
                }
            }
        }
    }

    /// The buffered message (after `fill` returned `Ok(true)`).
    fn message(&self) -> Result<Repr<'_>, LinkError> {
        let header = self
            .header
            .ok_or(LinkError::Malformed(wire::Error::Truncated {
                needed: HEADER_LEN,
                available: self.buf.len(),
            }))?;
        let body = self.buf.get(HEADER_LEN..).unwrap_or(&[]);
        Repr::parse_body(header, body).map_err(LinkError::Malformed)
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.header = None;
    }
}

/// Bytes waiting for a link to accept them, bounded.
#[derive(Debug)]
struct Outbox {
    bytes: VecDeque<u8>,
    cap: usize,
}

impl Outbox {
    fn new(cap: usize) -> Outbox {
        Outbox {
            bytes: VecDeque::new(),
            cap,
        }
    }

    /// Queues one message; refuses (and queues nothing) past the cap.
    fn push(&mut self, message: &Repr<'_>) -> Result<(), LinkError> {
        let len = message.buffer_len();
        if self.bytes.len().saturating_add(len) > self.cap {
            return Err(LinkError::Stalled);
        }
        let mut buf = vec![0u8; len];
        message.emit(&mut buf).map_err(LinkError::Malformed)?;
        self.bytes.extend(buf);
        Ok(())
    }

    /// Writes as much as the link takes now.
    fn flush<V: ByteStream>(&mut self, link: &mut V) -> Result<(), LinkError> {
        while !self.bytes.is_empty() {
            let (front, _) = self.bytes.as_slices();
            let n = link.write(front)?;
            if n == 0 {
                break;
            }
            self.bytes.drain(..n.min(front.len()));
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------

/// A parsed command from dom0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceCall {
    /// `QUBESRPC service+arg source`.
    Rpc {
        /// The service name (before `+`).
        name: String,
        /// The argument (after `+`; empty when none).
        argument: String,
        /// The calling qube.
        source: String,
    },
    /// A plain command for a shell (this VM has none).
    Shell(String),
    /// A command line that does not parse; the reason goes to stderr.
    Invalid(String),
}

impl ServiceCall {
    /// Parses `user:command` as the Linux agent does. Never fails: a bad
    /// line is [`ServiceCall::Invalid`] with the reason.
    pub fn parse(cmdline_bytes: &[u8]) -> ServiceCall {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let user_command = match cmdline::split_user(cmdline_bytes) {
            Ok(split) => split,
            Err(error) => return ServiceCall::Invalid(alloc::format!("{error}")),
        };
        match cmdline::parse_command(user_command.command) {
            Err(error) => ServiceCall::Invalid(alloc::format!("{error}")),
            Ok(cmdline::Command::Shell { command, .. }) => ServiceCall::Shell(text(command)),
            Ok(cmdline::Command::Rpc(rpc)) => match names::split_service_descriptor(rpc.service) {
                Err(error) => ServiceCall::Invalid(alloc::format!("{error}")),
                Ok(descriptor) => ServiceCall::Rpc {
                    name: text(descriptor.name),
                    argument: text(descriptor.argument.unwrap_or(&[])),
                    source: text(rpc.source),
                },
            },
        }
    }

    /// True for the services that read a line of stdin before running.
    pub fn needs_stdin(&self) -> bool {
        matches!(self, ServiceCall::Rpc { name, .. } if name == SET_DATE_TIME)
    }
}

impl fmt::Display for ServiceCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceCall::Rpc {
                name,
                argument,
                source,
            } => write!(f, "{name}+{argument} from {source}"),
            ServiceCall::Shell(command) => write!(f, "shell command {command:?}"),
            ServiceCall::Invalid(reason) => write!(f, "invalid command ({reason})"),
        }
    }
}

/// `qubes.WaitForSession`.
pub const WAIT_FOR_SESSION: &str = "qubes.WaitForSession";
/// `qubes.SetDateTime`.
pub const SET_DATE_TIME: &str = "qubes.SetDateTime";
/// `qubes.FirewallStatus`: this firewall's counters.
pub const FIREWALL_STATUS: &str = "qubes.FirewallStatus";

/// What the services need from the rest of the firewall.
pub trait ServiceHost {
    /// Writes the status report (`qubes.FirewallStatus`).
    fn firewall_status(&mut self, out: &mut Output);
    /// Sets the wall clock (`qubes.SetDateTime`), in seconds since the epoch.
    fn set_wall_clock(&mut self, unix_seconds: i64);
}

/// A service's stdout and stderr, bounded: past the cap the output is
/// truncated and a note goes to stderr.
#[derive(Debug)]
pub struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Output {
    /// Empty output holding at most `cap` bytes.
    pub fn new(cap: usize) -> Output {
        Output {
            stdout: Vec::new(),
            stderr: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn room(&self) -> usize {
        self.cap
            .saturating_sub(self.stdout.len() + self.stderr.len())
    }

    /// Appends to stdout.
    pub fn stdout(&mut self, bytes: &[u8]) {
        let n = self.room().min(bytes.len());
        self.stdout.extend_from_slice(bytes.get(..n).unwrap_or(&[]));
        self.truncated |= n < bytes.len();
    }

    /// Appends to stderr.
    pub fn stderr(&mut self, bytes: &[u8]) {
        let n = self.room().min(bytes.len());
        self.stderr.extend_from_slice(bytes.get(..n).unwrap_or(&[]));
        self.truncated |= n < bytes.len();
    }

    /// What went to stdout.
    pub fn stdout_bytes(&self) -> &[u8] {
        &self.stdout
    }

    /// What went to stderr.
    pub fn stderr_bytes(&self) -> &[u8] {
        &self.stderr
    }

    /// True when something was cut at the cap.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

impl fmt::Write for Output {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.stdout(s.as_bytes());
        Ok(())
    }
}

/// Runs one call: writes its output, returns its exit code.
pub fn run_service<H: ServiceHost + ?Sized>(
    host: &mut H,
    call: &ServiceCall,
    stdin: &[u8],
    out: &mut Output,
) -> u32 {
    const OFFERED: &str = "qubes.FirewallStatus, qubes.SetDateTime, qubes.WaitForSession";
    match call {
        ServiceCall::Rpc { name, .. } if name == WAIT_FOR_SESSION => 0,
        ServiceCall::Rpc { name, .. } if name == FIREWALL_STATUS => {
            host.firewall_status(out);
            0
        }
        ServiceCall::Rpc { name, .. } if name == SET_DATE_TIME => {
            let line = stdin.split(|&b| b == b'\n').next().unwrap_or(&[]);
            match parse_date_time(line) {
                Ok(unix) => {
                    host.set_wall_clock(unix);
                    0
                }
                Err(error) => {
                    let text = alloc::format!(
                        "qubes.SetDateTime: {error} in {:?}; expected one line like \
                         2015-07-31T16:10:43+0000 (date -u -Iseconds)\n",
                        String::from_utf8_lossy(line)
                    );
                    out.stderr(text.as_bytes());
                    1
                }
            }
        }
        ServiceCall::Rpc { name, .. } => {
            let text = alloc::format!(
                "qrexec-agent (Qubes firewall unikernel): service '{name}' not found; \
                 this VM offers {OFFERED}\n"
            );
            out.stderr(text.as_bytes());
            QREXEC_EXIT_SERVICE_NOT_FOUND
        }
        ServiceCall::Shell(command) => {
            let text = alloc::format!(
                "qrexec-agent (Qubes firewall unikernel): cannot run {command:?}: this VM has \
                 no shell; it offers only the services {OFFERED}\n"
            );
            out.stderr(text.as_bytes());
            QREXEC_EXIT_SERVICE_NOT_FOUND
        }
        ServiceCall::Invalid(reason) => {
            let text = alloc::format!("qrexec-agent: bad command from dom0: {reason}\n");
            out.stderr(text.as_bytes());
            QREXEC_EXIT_PROBLEM
        }
    }
}

/// Why a `qubes.SetDateTime` line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DateTimeError {
    /// Not `YYYY-MM-DDTHH:MM:SS` followed by `Z`, `+HHMM` or `+HH:MM`.
    Format,
    /// A field out of range (month 13, hour 24, …).
    Range,
}

impl fmt::Display for DateTimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DateTimeError::Format => "not an ISO 8601 date and time",
            DateTimeError::Range => "a date or time field is out of range",
        })
    }
}

/// Parses `date -u -Iseconds` output (`2015-07-31T16:10:43+0000`, also
/// `+00:00`, `Z` and non-zero offsets) into seconds since the Unix epoch.
pub fn parse_date_time(line: &[u8]) -> Result<i64, DateTimeError> {
    let line = line.trim_ascii();
    let number = |range: core::ops::Range<usize>| -> Result<i64, DateTimeError> {
        let digits = line.get(range).ok_or(DateTimeError::Format)?;
        let mut value = 0i64;
        for &digit in digits {
            if !digit.is_ascii_digit() {
                return Err(DateTimeError::Format);
            }
            value = value * 10 + i64::from(digit - b'0');
        }
        Ok(value)
    };
    let separator = |at: usize, expected: u8| -> Result<(), DateTimeError> {
        match line.get(at) {
            Some(&byte) if byte == expected => Ok(()),
            _ => Err(DateTimeError::Format),
        }
    };
    separator(4, b'-')?;
    separator(7, b'-')?;
    separator(10, b'T')?;
    separator(13, b':')?;
    separator(16, b':')?;
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let offset = match line.get(19..) {
        Some(b"Z") => 0,
        Some([sign @ (b'+' | b'-'), rest @ ..]) => {
            let (hours, minutes) = match rest {
                [h1, h2, b':', m1, m2] | [h1, h2, m1, m2] => {
                    let digits = [*h1, *h2, *m1, *m2];
                    if !digits.iter().all(u8::is_ascii_digit) {
                        return Err(DateTimeError::Format);
                    }
                    (
                        i64::from(h1 - b'0') * 10 + i64::from(h2 - b'0'),
                        i64::from(m1 - b'0') * 10 + i64::from(m2 - b'0'),
                    )
                }
                _ => return Err(DateTimeError::Format),
            };
            if hours > 23 || minutes > 59 {
                return Err(DateTimeError::Range);
            }
            let seconds = hours * 3600 + minutes * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return Err(DateTimeError::Format),
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(DateTimeError::Range),
    };
    if year < 1970 || day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(DateTimeError::Range);
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Ok(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

// ---------------------------------------------------------------------------
// Calls (data channels)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallKind {
    ExecCmdline,
    JustExec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallPhase {
    /// Waiting for the data vchan to connect and the peer's HELLO.
    Handshake { hello_sent: bool },
    /// Collecting stdin (for services that read it).
    Stdin,
    /// Output queued; waiting for the peer to take it.
    Draining,
}

/// A call whose data vchan could not be opened yet (its server is not
/// offered yet): retried every [`CONNECT_RETRY`] until `deadline`.
#[derive(Debug)]
struct PendingCall {
    connect: ConnectParams,
    kind: CallKind,
    service: ServiceCall,
    next_attempt: Instant,
    deadline: Instant,
}

#[derive(Debug)]
struct Call<V> {
    connect: ConnectParams,
    kind: CallKind,
    service: ServiceCall,
    data: V,
    phase: CallPhase,
    version: u32,
    deadline: Instant,
    reader: Framer,
    outbox: Outbox,
    stdin: Vec<u8>,
    stdin_done: bool,
}

/// What happened to a call in one poll.
enum CallStep {
    Continue,
    /// The call is over (successfully or not); send CONNECTION_TERMINATED.
    Finished(Result<(), LinkError>),
}

impl<V: ByteStream> Call<V> {
    fn poll<H: ServiceHost + ?Sized>(
        &mut self,
        host: &mut H,
        caps: &ControlCaps,
        now: Instant,
    ) -> CallStep {
        match self.step(host, caps, now) {
            Ok(true) => CallStep::Finished(Ok(())),
            Ok(false) if now >= self.deadline => {
                CallStep::Finished(Err(LinkError::Timeout(match self.phase {
                    CallPhase::Handshake { .. } => "waiting for the data vchan and its HELLO",
                    CallPhase::Stdin => "waiting for stdin",
                    CallPhase::Draining => "waiting for the peer to read the output",
                })))
            }
            Ok(false) => CallStep::Continue,
            Err(error) => CallStep::Finished(Err(error)),
        }
    }

    /// Advances the call; `Ok(true)` when it is complete.
    fn step<H: ServiceHost + ?Sized>(
        &mut self,
        host: &mut H,
        caps: &ControlCaps,
        now: Instant,
    ) -> Result<bool, LinkError> {
        if let CallPhase::Handshake { hello_sent } = self.phase {
            match self.data.state() {
                LinkState::Waiting => return Ok(false),
                LinkState::Closed => return Err(LinkError::Stream(StreamError::Closed)),
                LinkState::Connected => {}
            }
            if !hello_sent {
                self.outbox.push(&Repr::Hello(PeerInfo {
                    version: LOCAL_VERSION,
                }))?;
                self.phase = CallPhase::Handshake { hello_sent: true };
            }
            self.outbox.flush(&mut self.data)?;
            if !self.reader.fill(&mut self.data)? {
                return Ok(false);
            }
            let version = match self.reader.message()? {
                Repr::Hello(info) => wire::negotiate(LOCAL_VERSION, info.version, MIN_VERSION)
                    .map_err(LinkError::Version)?,
                other => {
                    return Err(LinkError::Unexpected {
                        msg_type: other.msg_type().into(),
                        expected: "waiting for HELLO on the data vchan",
                    });
                }
            };
            self.reader.reset();
            self.version = version;
            self.phase = CallPhase::Stdin;
            self.deadline = now + STDIN_TIMEOUT;
            if self.kind == CallKind::JustExec || !self.service.needs_stdin() {
                self.stdin_done = true;
            }
        }
        // Read whatever the peer sends: stdin while we want it, discarded
        // afterwards (a peer may keep writing until it sees our exit code).
        while self.reader.fill(&mut self.data)? {
            match self.reader.message()? {
                Repr::Data {
                    stream: DataStream::Stdin,
                    data,
                } => {
                    if data.is_empty() {
                        self.stdin_done = true;
                    } else if self.phase == CallPhase::Stdin && !self.stdin_done {
                        let room = caps.qrexec_stdin_bytes.saturating_sub(self.stdin.len());
                        self.stdin
                            .extend_from_slice(data.get(..room.min(data.len())).unwrap_or(&[]));
                        if self.stdin.contains(&b'\n')
                            || self.stdin.len() >= caps.qrexec_stdin_bytes
                        {
                            self.stdin_done = true;
                        }
                    }
                }
                other => {
                    return Err(LinkError::Unexpected {
                        msg_type: other.msg_type().into(),
                        expected: "reading stdin on the data vchan",
                    });
                }
            }
            self.reader.reset();
        }
        if self.phase == CallPhase::Stdin && (self.stdin_done || now >= self.deadline) {
            self.run(host, caps)?;
            self.phase = CallPhase::Draining;
            self.deadline = now + DRAIN_TIMEOUT;
        }
        self.outbox.flush(&mut self.data)?;
        Ok(self.phase == CallPhase::Draining && self.outbox.is_empty())
    }

    fn run<H: ServiceHost + ?Sized>(
        &mut self,
        host: &mut H,
        caps: &ControlCaps,
    ) -> Result<(), LinkError> {
        let mut output = Output::new(caps.qrexec_output_bytes);
        let code = run_service(host, &self.service, &self.stdin, &mut output);
        info!("qrexec: {} exited with {code}", self.service);
        if self.kind == CallKind::JustExec {
            // As qrexec-agent-data.c: the data channel carries only the exit
            // code, 0 once the command was handed over.
            return self.outbox.push(&Repr::ExitCode(0));
        }
        if output.truncated() {
            warn!(
                "qrexec: output of {} truncated at {} bytes",
                self.service, caps.qrexec_output_bytes
            );
        }
        let chunk = max_data_chunk(self.version);
        for (stream, bytes) in [
            (DataStream::Stdout, output.stdout_bytes()),
            (DataStream::Stderr, output.stderr_bytes()),
        ] {
            for piece in bytes.chunks(chunk) {
                self.outbox.push(&Repr::Data {
                    stream,
                    data: piece,
                })?;
            }
            self.outbox.push(&Repr::Data { stream, data: &[] })?;
        }
        self.outbox.push(&Repr::ExitCode(code))
    }
}

// ---------------------------------------------------------------------------
// The agent (control channel)
// ---------------------------------------------------------------------------

/// Counters of the agent, for the status report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Calls whose data channel was opened.
    pub calls_started: u64,
    /// Calls that completed (exit code delivered).
    pub calls_completed: u64,
    /// Calls that failed (data vchan broken, timed out, malformed).
    pub calls_failed: u64,
    /// Calls refused because as many as the cap were running.
    pub calls_refused_busy: u64,
    /// Calls whose data vchan could not be opened.
    pub calls_refused_platform: u64,
    /// Control links closed because dom0 broke the protocol.
    pub control_errors: u64,
    /// SERVICE_CONNECT / SERVICE_REFUSED for calls we never made.
    pub ignored_messages: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ControlPhase {
    /// Waiting for qrexec-daemon to connect.
    Waiting,
    /// HELLO sent, waiting for the daemon's.
    Hello,
    /// Handshake done.
    Ready { version: u32 },
    /// Closed; the program flow offers a new link.
    Closed,
}

/// The qrexec agent: one control link to qrexec-daemon and the calls
/// running on their data links.
#[derive(Debug)]
pub struct Agent<V> {
    control: V,
    phase: ControlPhase,
    reader: Framer,
    outbox: Outbox,
    calls: Vec<Call<V>>,
    /// Calls waiting for their data vchan's server.
    pending: Vec<PendingCall>,
    caps: ControlCaps,
    stats: AgentStats,
    close_reason: Option<LinkError>,
}

impl<V: ByteStream> Agent<V> {
    /// An agent on `control`, the vchan server offered to dom0 on port 512.
    pub fn new(control: V, caps: ControlCaps) -> Agent<V> {
        Agent {
            control,
            phase: ControlPhase::Waiting,
            reader: Framer::default(),
            outbox: Outbox::new(CONTROL_OUTBOX_BYTES),
            calls: Vec::new(),
            pending: Vec::new(),
            caps,
            stats: AgentStats::default(),
            close_reason: None,
        }
    }

    /// The negotiated version once the handshake is done.
    pub fn version(&self) -> Option<u32> {
        match self.phase {
            ControlPhase::Ready { version } => Some(version),
            _ => None,
        }
    }

    /// True once qrexec-daemon connected and the handshake is done.
    pub fn is_connected(&self) -> bool {
        self.version().is_some()
    }

    /// True when the control link is closed (the flow should offer a new one).
    pub fn is_closed(&self) -> bool {
        self.phase == ControlPhase::Closed
    }

    /// Why the control link was closed, if it was.
    pub fn close_reason(&self) -> Option<&LinkError> {
        self.close_reason.as_ref()
    }

    /// The counters.
    pub fn stats(&self) -> AgentStats {
        self.stats
    }

    /// Calls running now.
    pub fn running_calls(&self) -> usize {
        self.calls.len()
    }

    /// The earliest deadline of a running call or retry of a pending one.
    pub fn poll_at(&self) -> Option<Instant> {
        let running = self.calls.iter().map(|call| call.deadline);
        let pending = self.pending.iter().map(|p| p.next_attempt.min(p.deadline));
        running.chain(pending).min()
    }

    /// Does all the work possible now: handshake, control messages, calls.
    pub fn poll<P, H>(&mut self, platform: &mut P, host: &mut H, now: Instant)
    where
        P: Platform<Vchan = V>,
        H: ServiceHost + ?Sized,
    {
        if self.phase == ControlPhase::Closed {
            return;
        }
        if let Err(error) = self.poll_control(platform, now) {
            self.close(error);
            return;
        }
        if let Err(error) = self.retry_pending(platform, now) {
            self.close(error);
            return;
        }
        let caps = self.caps;
        let mut index = 0;
        while let Some(call) = self.calls.get_mut(index) {
            match call.poll(host, &caps, now) {
                CallStep::Continue => index += 1,
                CallStep::Finished(result) => {
                    let mut call = self.calls.swap_remove(index);
                    match result {
                        Ok(()) => self.stats.calls_completed += 1,
                        Err(error) => {
                            self.stats.calls_failed += 1;
                            warn!(
                                "qrexec: call {} on vchan {}:{} failed: {error}",
                                call.service,
                                call.connect.connect_domain,
                                call.connect.connect_port
                            );
                        }
                    }
                    call.data.close();
                    if let Err(error) = self.terminate(call.connect) {
                        self.close(error);
                        return;
                    }
                }
            }
        }
        if let Err(error) = self.outbox.flush(&mut self.control) {
            self.close(error);
        }
    }

    fn close(&mut self, error: LinkError) {
        if !matches!(error, LinkError::Stream(StreamError::Closed)) {
            self.stats.control_errors += 1;
        }
        warn!("qrexec: control link to qrexec-daemon closed: {error}");
        self.control.close();
        for call in &mut self.calls {
            call.data.close();
        }
        self.calls.clear();
        self.pending.clear();
        self.phase = ControlPhase::Closed;
        self.close_reason = Some(error);
    }

    fn terminate(&mut self, connect: ConnectParams) -> Result<(), LinkError> {
        self.outbox.push(&Repr::ConnectionTerminated(connect))
    }

    fn poll_control<P>(&mut self, platform: &mut P, now: Instant) -> Result<(), LinkError>
    where
        P: Platform<Vchan = V>,
    {
        match self.control.state() {
            LinkState::Waiting => return Ok(()),
            LinkState::Closed => return Err(LinkError::Stream(StreamError::Closed)),
            LinkState::Connected => {}
        }
        if self.phase == ControlPhase::Waiting {
            // The agent speaks first (qrexec-agent.c: handle_handshake).
            self.outbox.push(&Repr::Hello(PeerInfo {
                version: LOCAL_VERSION,
            }))?;
            self.phase = ControlPhase::Hello;
        }
        self.outbox.flush(&mut self.control)?;
        while self.reader.fill(&mut self.control)? {
            let result = self.handle_control_message(platform, now);
            self.reader.reset();
            result?;
        }
        Ok(())
    }

    fn handle_control_message<P>(&mut self, platform: &mut P, now: Instant) -> Result<(), LinkError>
    where
        P: Platform<Vchan = V>,
    {
        let message = self.reader.message()?;
        let version = match (self.phase, message) {
            (ControlPhase::Hello, Repr::Hello(info)) => {
                let version = wire::negotiate(LOCAL_VERSION, info.version, MIN_VERSION)
                    .map_err(LinkError::Version)?;
                info!("qrexec: qrexec-daemon connected, protocol version {version}");
                self.phase = ControlPhase::Ready { version };
                return Ok(());
            }
            (ControlPhase::Ready { version }, _) => version,
            (_, other) => {
                return Err(LinkError::Unexpected {
                    msg_type: other.msg_type().into(),
                    expected: "waiting for HELLO from qrexec-daemon",
                });
            }
        };
        message
            .check_version(version)
            .map_err(LinkError::Malformed)?;
        match message {
            Repr::ExecCmdline(exec) => {
                let call = (CallKind::ExecCmdline, ServiceCall::parse(cmdline_of(&exec)));
                self.start_call(platform, exec.connect, call, now)
            }
            Repr::JustExec(exec) => {
                let call = (CallKind::JustExec, ServiceCall::parse(cmdline_of(&exec)));
                self.start_call(platform, exec.connect, call, now)
            }
            Repr::ServiceConnect { request_id, .. } => {
                self.stats.ignored_messages += 1;
                warn!(
                    "qrexec: MSG_SERVICE_CONNECT for request {:?}, which this agent never made; ignoring",
                    request_id.map(|id| String::from_utf8_lossy(id.as_bytes()).into_owned())
                );
                Ok(())
            }
            Repr::ServiceRefused(id) => {
                self.stats.ignored_messages += 1;
                warn!(
                    "qrexec: MSG_SERVICE_REFUSED for unknown request {:?}; ignoring",
                    String::from_utf8_lossy(id.as_bytes())
                );
                Ok(())
            }
            other => Err(LinkError::Unexpected {
                msg_type: other.msg_type().into(),
                expected: "waiting for commands from qrexec-daemon",
            }),
        }
    }

    fn start_call<P>(
        &mut self,
        platform: &mut P,
        connect: ConnectParams,
        (kind, service): (CallKind, ServiceCall),
        now: Instant,
    ) -> Result<(), LinkError>
    where
        P: Platform<Vchan = V>,
    {
        let (domain, port) = (connect.connect_domain, connect.connect_port);
        if self.calls.len() + self.pending.len() >= self.caps.qrexec_connections {
            self.stats.calls_refused_busy += 1;
            warn!(
                "qrexec: refusing {service}: {} calls already running (cap from VM memory)",
                self.calls.len()
            );
            return self.terminate(connect);
        }
        let data = match u16::try_from(domain) {
            Ok(domid) => platform.vchan_client(domid, port),
            Err(_) => Err(crate::platform::PlatformError::Other(alloc::format!(
                "domain id {domain} out of range"
            ))),
        };
        let data = match data {
            Ok(data) => data,
            Err(error) if u16::try_from(domain).is_ok() => {
                info!(
                    "qrexec: data vchan {domain}:{port} for {service} not open yet ({error}); retrying"
                );
                self.pending.push(PendingCall {
                    connect,
                    kind,
                    service,
                    next_attempt: now + CONNECT_RETRY,
                    deadline: now + CONNECT_TIMEOUT,
                });
                return Ok(());
            }
            Err(error) => {
                self.stats.calls_refused_platform += 1;
                warn!("qrexec: cannot open data vchan {domain}:{port} for {service}: {error}");
                return self.terminate(connect);
            }
        };
        self.push_call(connect, (kind, service), data, now);
        Ok(())
    }

    /// Tries again to open the data vchans of pending calls; a call whose
    /// server did not appear within [`CONNECT_TIMEOUT`] is terminated.
    fn retry_pending<P>(&mut self, platform: &mut P, now: Instant) -> Result<(), LinkError>
    where
        P: Platform<Vchan = V>,
    {
        let mut index = 0;
        while let Some(pending) = self.pending.get_mut(index) {
            if now < pending.next_attempt {
                index += 1;
                continue;
            }
            let (domain, port) = (pending.connect.connect_domain, pending.connect.connect_port);
            // start_call queued only 16-bit domains.
            let domid = u16::try_from(domain).unwrap_or(u16::MAX);
            match platform.vchan_client(domid, port) {
                Ok(data) => {
                    let pending = self.pending.swap_remove(index);
                    self.push_call(pending.connect, (pending.kind, pending.service), data, now);
                }
                Err(error) if now >= pending.deadline => {
                    let pending = self.pending.swap_remove(index);
                    self.stats.calls_refused_platform += 1;
                    warn!(
                        "qrexec: cannot open data vchan {domain}:{port} for {}: {error}",
                        pending.service
                    );
                    self.terminate(pending.connect)?;
                }
                Err(_) => {
                    pending.next_attempt = now + CONNECT_RETRY;
                    index += 1;
                }
            }
        }
        Ok(())
    }

    fn push_call(
        &mut self,
        connect: ConnectParams,
        (kind, service): (CallKind, ServiceCall),
        data: V,
        now: Instant,
    ) {
        let (domain, port) = (connect.connect_domain, connect.connect_port);
        self.stats.calls_started += 1;
        info!("qrexec: running {service} (data vchan {domain}:{port})");
        self.calls.push(Call {
            connect,
            kind,
            service,
            data,
            phase: CallPhase::Handshake { hello_sent: false },
            version: MIN_VERSION,
            deadline: now + CONNECT_TIMEOUT,
            reader: Framer::default(),
            outbox: Outbox::new(
                self.caps
                    .qrexec_output_bytes
                    .saturating_add(64 * HEADER_LEN + 64),
            ),
            stdin: Vec::new(),
            stdin_done: false,
        });
    }
}

fn cmdline_of<'a>(exec: &ExecParams<'a>) -> &'a [u8] {
    exec.cmdline.unwrap_or(&[])
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes buffers it built itself.
mod tests {
    use super::*;
    use crate::testing::{FakePlatform, PlatformHandle, VchanPeer};
    use alloc::string::ToString;
    use core::fmt::Write as _;

    const MEMORY: usize = 32 << 20;

    #[derive(Default)]
    struct Host {
        clock: Option<i64>,
        status_calls: usize,
    }

    impl ServiceHost for Host {
        fn firewall_status(&mut self, out: &mut Output) {
            self.status_calls += 1;
            let _ = writeln!(out, "uplink rx 3 tx 4");
        }
        fn set_wall_clock(&mut self, unix_seconds: i64) {
            self.clock = Some(unix_seconds);
        }
    }

    fn encode(message: &Repr<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; message.buffer_len()];
        message.emit(&mut buf).unwrap();
        buf
    }

    type Messages = Vec<(MsgType, Vec<u8>)>;

    /// Splits bytes into (type, body) pairs; panics on garbage (test code).
    fn decode(mut bytes: &[u8]) -> Messages {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (repr, used) = Repr::parse_bytes(bytes).unwrap();
            out.push((repr.msg_type(), bytes[HEADER_LEN..used].to_vec()));
            bytes = &bytes[used..];
        }
        out
    }

    fn hello(version: u32) -> Vec<u8> {
        encode(&Repr::Hello(PeerInfo { version }))
    }

    fn exec(kind: MsgType, port: u32, cmdline: &str) -> Vec<u8> {
        let exec = ExecParams {
            connect: ConnectParams {
                connect_domain: 0,
                connect_port: port,
            },
            cmdline: Some(cmdline.as_bytes()),
        };
        encode(&match kind {
            MsgType::JustExec => Repr::JustExec(exec),
            _ => Repr::ExecCmdline(exec),
        })
    }

    struct Rig {
        platform: FakePlatform,
        handle: PlatformHandle,
        agent: Agent<crate::testing::FakeVchan>,
        dom0: VchanPeer,
        host: Host,
    }

    impl Rig {
        /// An agent whose control link dom0 connected, with the HELLO
        /// exchange done at `daemon_version`.
        fn connected(daemon_version: u32) -> Rig {
            let (mut platform, handle) = FakePlatform::new(7, MEMORY);
            let control = platform.vchan_server(0, 512).unwrap();
            let agent = Agent::new(control, ControlCaps::for_memory(MEMORY));
            let dom0 = handle.connect_vchan(0, 512).unwrap();
            let mut rig = Rig {
                platform,
                handle,
                agent,
                dom0,
                host: Host::default(),
            };
            rig.poll();
            assert_eq!(rig.dom0.take(), hello(LOCAL_VERSION), "agent speaks first");
            rig.dom0.send(&hello(daemon_version));
            rig.poll();
            rig
        }

        fn poll(&mut self) {
            let now = self.handle.clock().now();
            self.agent.poll(&mut self.platform, &mut self.host, now);
        }

        /// Runs one call on data port `port` with the data peer at version
        /// `version`; returns (data-channel messages, control messages).
        fn call(
            &mut self,
            kind: MsgType,
            port: u32,
            cmdline: &str,
            version: u32,
            stdin: &[u8],
        ) -> (Messages, Messages) {
            self.dom0.send(&exec(kind, port, cmdline));
            self.poll();
            // qrexec-client offers the data vchan after the agent asks.
            let data = self.handle.offer_vchan(0, port);
            self.poll();
            let mut from_agent = data.take();
            assert_eq!(decode(&from_agent)[0].0, MsgType::Hello);
            from_agent.clear();
            data.send(&hello(version));
            if !stdin.is_empty() {
                data.send(&encode(&Repr::Data {
                    stream: DataStream::Stdin,
                    data: stdin,
                }));
            }
            data.send(&encode(&Repr::Data {
                stream: DataStream::Stdin,
                data: &[],
            }));
            for _ in 0..4 {
                self.poll();
            }
            assert!(data.closed_by_vm(), "the agent closes the data vchan");
            (decode(&data.take()), decode(&self.dom0.take()))
        }
    }

    #[test]
    fn hello_then_firewall_status_golden_sequence() {
        let mut rig = Rig::connected(3);
        assert_eq!(rig.agent.version(), Some(3));
        let (data, control) = rig.call(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
            3,
            b"",
        );
        assert_eq!(
            data,
            vec![
                (MsgType::DataStdout, b"uplink rx 3 tx 4\n".to_vec()),
                (MsgType::DataStdout, vec![]),
                (MsgType::DataStderr, vec![]),
                (MsgType::DataExitCode, 0u32.to_ne_bytes().to_vec()),
            ]
        );
        let mut terminated = Vec::new();
        terminated.extend_from_slice(&0u32.to_ne_bytes());
        terminated.extend_from_slice(&513u32.to_ne_bytes());
        assert_eq!(control, vec![(MsgType::ConnectionTerminated, terminated)]);
        assert_eq!(rig.host.status_calls, 1);
        assert_eq!(rig.agent.stats().calls_completed, 1);
        assert_eq!(rig.agent.running_calls(), 0);
    }

    #[test]
    fn service_with_trailing_plus_and_v4_daemon() {
        let mut rig = Rig::connected(4);
        assert_eq!(rig.agent.version(), Some(4));
        let (data, _) = rig.call(
            MsgType::ExecCmdline,
            514,
            "root:QUBESRPC qubes.WaitForSession+ dom0",
            4,
            b"",
        );
        assert_eq!(data.last().unwrap().1, 0u32.to_ne_bytes().to_vec());
    }

    #[test]
    fn unknown_service_gets_stderr_line_and_127() {
        let mut rig = Rig::connected(3);
        let (data, control) = rig.call(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.Filecopy+ work",
            3,
            b"",
        );
        assert_eq!(data[0], (MsgType::DataStdout, vec![]));
        let (kind, stderr) = &data[1];
        assert_eq!(*kind, MsgType::DataStderr);
        let stderr = String::from_utf8(stderr.clone()).unwrap();
        assert!(stderr.contains("'qubes.Filecopy' not found"), "{stderr}");
        assert!(stderr.ends_with('\n'));
        assert_eq!(data[2], (MsgType::DataStderr, vec![]));
        assert_eq!(data[3].1, 127u32.to_ne_bytes().to_vec());
        assert_eq!(control[0].0, MsgType::ConnectionTerminated);
    }

    #[test]
    fn shell_command_and_bad_command_line() {
        let mut rig = Rig::connected(3);
        let (data, _) = rig.call(MsgType::ExecCmdline, 513, "user:ls -l", 3, b"");
        assert!(String::from_utf8_lossy(&data[1].1).contains("no shell"));
        assert_eq!(data.last().unwrap().1, 127u32.to_ne_bytes().to_vec());
        let (data, _) = rig.call(MsgType::ExecCmdline, 514, "no colon here", 3, b"");
        assert!(String::from_utf8_lossy(&data[1].1).contains("no colon"));
        assert_eq!(data.last().unwrap().1, 125u32.to_ne_bytes().to_vec());
    }

    #[test]
    fn set_date_time_reads_its_line_from_stdin() {
        let mut rig = Rig::connected(3);
        let (data, _) = rig.call(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.SetDateTime+ dom0",
            3,
            b"2015-07-31T16:10:43+0000\n",
        );
        assert_eq!(data.last().unwrap().1, 0u32.to_ne_bytes().to_vec());
        assert_eq!(rig.host.clock, Some(1_438_359_043));
        let (data, _) = rig.call(
            MsgType::ExecCmdline,
            514,
            "DEFAULT:QUBESRPC qubes.SetDateTime+ dom0",
            3,
            b"yesterday\n",
        );
        assert!(String::from_utf8_lossy(&data[1].1).contains("SetDateTime"));
        assert_eq!(data.last().unwrap().1, 1u32.to_ne_bytes().to_vec());
    }

    #[test]
    fn just_exec_carries_only_exit_code_zero() {
        let mut rig = Rig::connected(3);
        let (data, control) = rig.call(
            MsgType::JustExec,
            515,
            "DEFAULT:QUBESRPC qubes.WaitForSession+ dom0",
            3,
            b"",
        );
        assert_eq!(
            data,
            vec![(MsgType::DataExitCode, 0u32.to_ne_bytes().to_vec())]
        );
        assert_eq!(control[0].0, MsgType::ConnectionTerminated);
    }

    #[test]
    fn v2_data_channel_chunks_output_at_4096() {
        struct Big;
        impl ServiceHost for Big {
            fn firewall_status(&mut self, out: &mut Output) {
                out.stdout(&[b'x'; 10_000]);
            }
            fn set_wall_clock(&mut self, _: i64) {}
        }
        let mut rig = Rig::connected(2);
        rig.dom0.send(&exec(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
        ));
        let now = rig.handle.clock().now();
        rig.agent.poll(&mut rig.platform, &mut Big, now);
        let data = rig.handle.offer_vchan(0, 513);
        rig.agent.poll(&mut rig.platform, &mut Big, now);
        data.take();
        data.send(&hello(2));
        rig.agent.poll(&mut rig.platform, &mut Big, now);
        let messages = decode(&data.take());
        let sizes: Vec<usize> = messages.iter().map(|(_, body)| body.len()).collect();
        assert_eq!(sizes, vec![4096, 4096, 1808, 0, 0, 4]);
    }

    #[test]
    fn output_waits_for_a_slow_reader() {
        let mut rig = Rig::connected(3);
        rig.dom0.send(&exec(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
        ));
        rig.poll();
        let data = rig.handle.offer_vchan(0, 513);
        data.set_capacity(5);
        rig.poll();
        let mut received = data.take();
        data.send(&hello(3));
        for _ in 0..40 {
            rig.poll();
            received.extend(data.take());
        }
        let messages = decode(&received);
        assert_eq!(messages[0].0, MsgType::Hello);
        assert_eq!(messages.last().unwrap().0, MsgType::DataExitCode);
        assert_eq!(rig.agent.stats().calls_completed, 1);
    }

    #[test]
    fn malformed_control_message_closes_the_link_without_panic() {
        let mut rig = Rig::connected(3);
        // A header claiming an 8-byte EXIT_CODE body (it must be 4).
        let mut bad = Vec::new();
        bad.extend_from_slice(&MsgType::MSG_DATA_EXIT_CODE.to_ne_bytes());
        bad.extend_from_slice(&8u32.to_ne_bytes());
        rig.dom0.send(&bad);
        rig.poll();
        assert!(rig.agent.is_closed());
        assert!(rig.dom0.closed_by_vm());
        assert!(matches!(
            rig.agent.close_reason(),
            Some(LinkError::Malformed(wire::Error::BadLength { .. }))
        ));
        assert_eq!(rig.agent.stats().control_errors, 1);
        // Polling a closed agent does nothing.
        rig.poll();
    }

    #[test]
    fn unexpected_messages_close_the_link() {
        // A data message on the control channel.
        let mut rig = Rig::connected(3);
        rig.dom0.send(&encode(&Repr::Data {
            stream: DataStream::Stdout,
            data: b"x",
        }));
        rig.poll();
        assert!(matches!(
            rig.agent.close_reason(),
            Some(LinkError::Unexpected { .. })
        ));
        // A command before HELLO.
        let (mut platform, handle) = FakePlatform::new(7, MEMORY);
        let control = platform.vchan_server(0, 512).unwrap();
        let mut agent = Agent::new(control, ControlCaps::for_memory(MEMORY));
        let dom0 = handle.connect_vchan(0, 512).unwrap();
        dom0.send(&exec(MsgType::ExecCmdline, 513, "a:b"));
        agent.poll(&mut platform, &mut Host::default(), Instant::ZERO);
        assert!(agent.is_closed());
        // A daemon that is too old.
        let (mut platform, handle) = FakePlatform::new(7, MEMORY);
        let control = platform.vchan_server(0, 512).unwrap();
        let mut agent = Agent::new(control, ControlCaps::for_memory(MEMORY));
        let dom0 = handle.connect_vchan(0, 512).unwrap();
        dom0.send(&hello(1));
        agent.poll(&mut platform, &mut Host::default(), Instant::ZERO);
        assert!(matches!(agent.close_reason(), Some(LinkError::Version(_))));
    }

    #[test]
    fn garbage_on_the_control_link_never_panics() {
        // Deterministic pseudo-random garbage after a valid handshake.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..300 {
            let mut rig = Rig::connected(3);
            let mut bytes = Vec::new();
            let len = (seed % 64) as usize;
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            // Sometimes a plausible header with a random length.
            if seed.is_multiple_of(3) {
                let mut header = MsgType::MSG_EXEC_CMDLINE.to_ne_bytes().to_vec();
                header.extend_from_slice(&((seed >> 8) as u32).to_ne_bytes());
                bytes.splice(0..0, header);
            }
            rig.dom0.send(&bytes);
            for _ in 0..3 {
                rig.poll();
            }
            rig.dom0.close();
            rig.poll();
            assert!(rig.agent.is_closed());
        }
    }

    #[test]
    fn malformed_data_channel_fails_only_that_call() {
        let mut rig = Rig::connected(3);
        rig.dom0.send(&exec(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.SetDateTime dom0",
        ));
        rig.poll();
        let data = rig.handle.offer_vchan(0, 513);
        rig.poll();
        data.send(&hello(3));
        data.send(&encode(&Repr::ExitCode(3)));
        rig.poll();
        assert!(data.closed_by_vm());
        assert!(!rig.agent.is_closed());
        assert_eq!(rig.agent.stats().calls_failed, 1);
        assert_eq!(decode(&rig.dom0.take())[0].0, MsgType::ConnectionTerminated);
    }

    #[test]
    fn data_vchan_that_never_connects_times_out() {
        let mut rig = Rig::connected(3);
        rig.dom0.send(&exec(
            MsgType::ExecCmdline,
            600,
            "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
        ));
        rig.poll();
        assert_eq!(rig.agent.running_calls(), 1);
        assert_eq!(rig.agent.poll_at(), Some(Instant::ZERO + CONNECT_TIMEOUT));
        rig.handle.clock().advance(CONNECT_TIMEOUT);
        rig.poll();
        assert_eq!(rig.agent.running_calls(), 0);
        assert_eq!(rig.agent.stats().calls_failed, 1);
        assert_eq!(decode(&rig.dom0.take())[0].0, MsgType::ConnectionTerminated);
    }

    #[test]
    fn calls_past_the_cap_are_refused_and_counted() {
        let mut rig = Rig::connected(3);
        let cap = ControlCaps::for_memory(MEMORY).qrexec_connections;
        for port in 0..=cap as u32 {
            rig.dom0.send(&exec(
                MsgType::ExecCmdline,
                513 + port,
                "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
            ));
        }
        rig.poll();
        assert_eq!(rig.agent.running_calls(), cap);
        assert_eq!(rig.agent.stats().calls_refused_busy, 1);
        let control = decode(&rig.dom0.take());
        assert_eq!(control.len(), 1);
        assert_eq!(control[0].1[4..8], (513 + cap as u32).to_ne_bytes());
    }

    #[test]
    fn platform_refusal_and_bad_domain_terminate_the_call() {
        let mut rig = Rig::connected(3);
        rig.handle.set_vchan_limit(1);
        rig.dom0.send(&exec(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
        ));
        let mut huge_domain = exec(MsgType::ExecCmdline, 514, "a:b");
        huge_domain[8..12].copy_from_slice(&70_000u32.to_ne_bytes());
        rig.dom0.send(&huge_domain);
        rig.poll();
        // The bad domain is refused at once; the refused vchan is retried
        // (its server may not be offered yet) until CONNECT_TIMEOUT.
        assert_eq!(rig.agent.stats().calls_refused_platform, 1);
        assert_eq!(decode(&rig.dom0.take()).len(), 1);
        let now = rig.handle.clock().now();
        assert_eq!(rig.agent.poll_at(), Some(now + CONNECT_RETRY));
        rig.handle.clock().advance(CONNECT_TIMEOUT);
        rig.poll();
        assert_eq!(rig.agent.stats().calls_refused_platform, 2);
        assert_eq!(decode(&rig.dom0.take()).len(), 1);
        assert_eq!(rig.agent.poll_at(), None);
    }

    #[test]
    fn data_vchan_not_there_yet_is_retried_and_the_call_runs() {
        // dom0's qrexec-client offers the data vchan only after the daemon
        // sent us the command: the first attempt fails, a retry succeeds.
        let mut rig = Rig::connected(3);
        rig.handle.set_vchan_limit(1);
        rig.dom0.send(&exec(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
        ));
        rig.poll();
        assert_eq!(rig.agent.running_calls(), 0);
        assert!(rig.dom0.take().is_empty(), "not terminated while retrying");
        rig.handle.set_vchan_limit(usize::MAX);
        rig.handle.clock().advance(CONNECT_RETRY);
        rig.poll();
        assert_eq!(rig.agent.running_calls(), 1);
        assert_eq!(rig.agent.stats().calls_refused_platform, 0);
        assert_eq!(rig.agent.stats().calls_started, 1);
    }

    #[test]
    fn service_connect_and_refused_are_ignored() {
        let mut rig = Rig::connected(3);
        rig.dom0.send(&encode(&Repr::ServiceRefused(
            wire::RequestId::new(b"SOCKET5").unwrap(),
        )));
        rig.dom0.send(&encode(&Repr::ServiceConnect {
            connect: ConnectParams::default(),
            request_id: Some(wire::RequestId::new(b"SOCKET6").unwrap()),
        }));
        rig.poll();
        assert!(!rig.agent.is_closed());
        assert_eq!(rig.agent.stats().ignored_messages, 2);
    }

    #[test]
    fn dom0_closing_ends_calls_quietly() {
        let mut rig = Rig::connected(3);
        rig.dom0.send(&exec(
            MsgType::ExecCmdline,
            513,
            "DEFAULT:QUBESRPC qubes.FirewallStatus dom0",
        ));
        rig.poll();
        let data = rig.handle.offer_vchan(0, 513);
        rig.dom0.close();
        rig.poll();
        assert!(rig.agent.is_closed());
        assert!(data.closed_by_vm());
        assert_eq!(rig.agent.stats().control_errors, 0);
    }

    #[test]
    fn date_time_parsing() {
        assert_eq!(parse_date_time(b"1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_date_time(b"2015-07-31T16:10:43+0000"),
            Ok(1_438_359_043)
        );
        assert_eq!(
            parse_date_time(b"2015-07-31T16:10:43+00:00\n"),
            Ok(1_438_359_043)
        );
        assert_eq!(
            parse_date_time(b"2015-07-31T18:10:43+02:00"),
            Ok(1_438_359_043)
        );
        assert_eq!(
            parse_date_time(b"2000-02-29T00:00:00-0100"),
            Ok(951_782_400 + 3600)
        );
        for bad in [
            &b""[..],
            b"2015-07-31",
            b"2015-07-31 16:10:43+0000",
            b"2015-13-01T00:00:00Z",
            b"2015-02-29T00:00:00Z",
            b"2015-07-31T24:00:00Z",
            b"2015-07-31T16:10:43+2400",
            b"2015-07-31T16:10:43+0a00",
            b"2015-07-31T16:10:43",
            b"\xff\xfe",
            b"1969-12-31T23:59:59Z",
        ] {
            assert!(parse_date_time(bad).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn service_call_parsing() {
        assert_eq!(
            ServiceCall::parse(b"DEFAULT:QUBESRPC qubes.FirewallStatus dom0"),
            ServiceCall::Rpc {
                name: FIREWALL_STATUS.to_string(),
                argument: String::new(),
                source: "dom0".to_string()
            }
        );
        assert_eq!(
            ServiceCall::parse(b"user:nogui:QUBESRPC a.B+arg work"),
            ServiceCall::Rpc {
                name: "a.B".to_string(),
                argument: "arg".to_string(),
                source: "work".to_string()
            }
        );
        assert!(matches!(
            ServiceCall::parse(b"u:QUBESRPC "),
            ServiceCall::Invalid(_)
        ));
        assert!(matches!(
            ServiceCall::parse(b"u:QUBESRPC +x dom0"),
            ServiceCall::Invalid(_)
        ));
        assert!(matches!(ServiceCall::parse(b""), ServiceCall::Invalid(_)));
        assert!(matches!(
            ServiceCall::parse(b"u:\xff"),
            ServiceCall::Shell(_)
        ));
    }

    #[test]
    fn output_is_bounded() {
        let mut out = Output::new(4);
        out.stdout(b"abc");
        out.stderr(b"def");
        assert_eq!(out.stdout_bytes(), b"abc");
        assert_eq!(out.stderr_bytes(), b"d");
        assert!(out.truncated());
    }
}
