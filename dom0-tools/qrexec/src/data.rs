//! The qrexec data channel: one vchan per call carrying stdin, stdout,
//! stderr and the exit code between the side that requested the call and the
//! side that executes it.
//!
//! Rules (qubes-core-qrexec `libqrexec/process_io.c`, `remote.c`,
//! `daemon/qrexec-daemon-common.c`): both ends exchange `MSG_HELLO` (see
//! [`handshake`] for who speaks first) and the lower version wins (at least 2); chunks are at most 4096
//! bytes (v2) or 65536 (v3+); an empty data message is EOF. The executing
//! side sends stdout, then its stdout EOF, stderr EOF and finally
//! `MSG_DATA_EXIT_CODE`; a command that could not be started sends stderr
//! EOF, stdout EOF and the exit code (127 for a missing service). The
//! requesting side sends its stdin as `MSG_DATA_STDIN` and ends at the exit
//! code. Data is moved in chunks as large as the protocol allows with the
//! header written in front of the payload, never per byte. A peer that sends
//! anything else, or too much, ends the call with an error; nothing it sends
//! can make us panic or buffer without bound.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use protocol::qrexec::{
    DataStream, HEADER_LEN, MsgType, QREXEC_PROTOCOL_V2, QREXEC_PROTOCOL_V4, Repr, max_data_chunk,
    negotiate,
};

use crate::error::{Error, IoContext, Result};
use crate::vchan::Vchan;
use crate::wire::{self, MessageBuf};

/// The protocol version these programs announce.
pub const LOCAL_PROTOCOL_VERSION: u32 = QREXEC_PROTOCOL_V4;

/// Exit code reported when the peer disconnects without sending one
/// (Qubes' `remote_status` stays -1, i.e. 255).
pub const EXIT_CODE_DISCONNECTED: u32 = 255;

/// How long the data vchan peer may take to send its `MSG_HELLO`.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A vchan writer shared by the threads of one call.
pub type SharedWriter = Arc<Mutex<Box<dyn Vchan>>>;

/// Write a whole message under the writer lock.
pub fn send(writer: &SharedWriter, repr: &Repr<'_>) -> io::Result<()> {
    let mut guard = writer
        .lock()
        .map_err(|_| io::Error::other("vchan writer lock poisoned"))?;
    wire::write_message(&mut **guard, repr)
}

/// Exchange `MSG_HELLO` on a fresh data vchan. Who speaks first is Qubes'
/// order, not a vchan role: a qube's agent and qrexec-client-vm always send
/// first (`handle_handshake` in `qrexec-agent-data.c`), dom0's qrexec-client
/// sends first when calling a qube and listens first when a qube calls dom0
/// (`remote_send_first`). Sending first is never a deadlock: the hello fits
/// in any buffer.
pub fn handshake(vchan: &mut dyn Vchan, send_first: bool) -> Result<u32> {
    let send_hello = |v: &mut dyn Vchan| {
        wire::send_hello(v, LOCAL_PROTOCOL_VERSION).context(|| "sending MSG_HELLO".into())
    };
    if send_first {
        send_hello(vchan)?;
    }
    // A peer that connects and never says hello must not hold the call.
    vchan
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .context(|| "setting handshake timeout".into())?;
    let remote = wire::recv_hello(vchan, "data vchan peer")?;
    vchan
        .set_read_timeout(None)
        .context(|| "clearing handshake timeout".into())?;
    if !send_first {
        send_hello(vchan)?;
    }
    negotiate(LOCAL_PROTOCOL_VERSION, remote, QREXEC_PROTOCOL_V2).map_err(|source| {
        Error::Protocol {
            context: "data vchan handshake".into(),
            source,
        }
    })
}

/// Qubes' `do_replace_chars`: everything but printable ASCII, tab, newline,
/// carriage return, backspace and bell becomes `_`.
pub fn replace_chars(buf: &mut [u8]) {
    for byte in buf {
        let c = *byte;
        if !(b' '..=b'~').contains(&c) && !matches!(c, b'\t' | b'\n' | b'\r' | 0x08 | 0x07) {
            *byte = b'_';
        }
    }
}

/// Coordinates the requester's stdin thread with the end of the call: once
/// the exit code arrived the main thread sends the stdin EOF (if the stdin
/// thread has not) and nothing more may follow it.
#[derive(Debug, Default)]
struct StdinGate {
    stopped: AtomicBool,
    eof_sent: AtomicBool,
}

/// Stream `input` to the vchan as `stream` messages, ending with EOF
/// (unless `send_eof` is false). Returns when `input` ends, the vchan fails
/// or `gate` is closed.
fn pump(
    mut input: Box<dyn Read + Send>,
    writer: &SharedWriter,
    msg_type: MsgType,
    chunk: usize,
    send_eof: bool,
    gate: Option<&StdinGate>,
) -> io::Result<()> {
    let mut buf = vec![0u8; HEADER_LEN + chunk];
    loop {
        let n = match buf.get_mut(HEADER_LEN..).map(|b| input.read(b)) {
            Some(Ok(n)) => n,
            Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A local read error ends this stream like EOF does.
            Some(Err(_)) | None => 0,
        };
        if n == 0 && !send_eof {
            return Ok(());
        }
        wire::fill_data_header(&mut buf, msg_type, n);
        {
            let mut guard = writer
                .lock()
                .map_err(|_| io::Error::other("vchan writer lock poisoned"))?;
            if gate.is_some_and(|g| g.stopped.load(Ordering::SeqCst)) {
                return Ok(());
            }
            guard.write_all(buf.get(..HEADER_LEN + n).unwrap_or(&[]))?;
            if n == 0
                && let Some(g) = gate
            {
                g.eof_sent.store(true, Ordering::SeqCst);
            }
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// The local ends of the requesting side of a call.
pub struct Requester {
    /// What to send as the remote's stdin (`None`: send EOF at once).
    pub input: Option<Box<dyn Read + Send>>,
    /// Where the remote's stdout goes.
    pub output: Box<dyn Write + Send>,
    /// Where the remote's stderr goes.
    pub errors: Box<dyn Write + Send>,
    /// Replace unprintable bytes in stdout (`-t`).
    pub replace_stdout: bool,
    /// Replace unprintable bytes in stderr (`-T`).
    pub replace_stderr: bool,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("replace_stdout", &self.replace_stdout)
            .field("replace_stderr", &self.replace_stderr)
            .finish_non_exhaustive()
    }
}

/// Run the requesting side until the remote's exit code arrives; returns it.
pub fn run_requester(vchan: Box<dyn Vchan>, version: u32, local: Requester) -> Result<u32> {
    let mut reader = vchan.try_clone().context(|| "cloning data vchan".into())?;
    let writer: SharedWriter = Arc::new(Mutex::new(vchan));
    let chunk = max_data_chunk(version);
    let gate = Arc::new(StdinGate::default());
    {
        let writer = Arc::clone(&writer);
        let gate = Arc::clone(&gate);
        let input = local.input.unwrap_or_else(|| Box::new(io::empty()));
        thread::Builder::new()
            .name("qrexec-stdin".into())
            .spawn(move || {
                // The remote may be gone already; the exit code decides.
                drop(pump(
                    input,
                    &writer,
                    MsgType::DataStdin,
                    chunk,
                    true,
                    Some(&gate),
                ));
            })
            .context(|| "starting stdin thread".into())?;
    }
    let mut output = Some(local.output);
    let mut errors = local.errors;
    let mut buf = MessageBuf::new();
    let mut scratch = Vec::new();
    loop {
        let repr = wire::read_message(&mut *reader, &mut buf, "data vchan peer")?;
        let Some(repr) = repr else {
            return Err(Error::Eof("data vchan before exit code".into()));
        };
        repr.check_version(version)
            .map_err(|source| Error::Protocol {
                context: "data vchan".into(),
                source,
            })?;
        match repr {
            Repr::Data {
                stream: DataStream::Stdout | DataStream::Stdin,
                data,
            } => {
                if data.is_empty() {
                    output = None;
                } else if let Some(out) = output.as_mut() {
                    let bytes = if local.replace_stdout {
                        scratch.clear();
                        scratch.extend_from_slice(data);
                        replace_chars(&mut scratch);
                        &scratch[..]
                    } else {
                        data
                    };
                    if out.write_all(bytes).and_then(|()| out.flush()).is_err() {
                        // Local reader went away (EPIPE): drop further stdout.
                        output = None;
                    }
                }
            }
            Repr::Data {
                stream: DataStream::Stderr,
                data,
            } => {
                if !data.is_empty() {
                    let bytes = if local.replace_stderr {
                        scratch.clear();
                        scratch.extend_from_slice(data);
                        replace_chars(&mut scratch);
                        &scratch[..]
                    } else {
                        data
                    };
                    let _ = errors.write_all(bytes).and_then(|()| errors.flush());
                }
            }
            Repr::ExitCode(code) => {
                drop(output);
                if let Ok(mut guard) = writer.lock() {
                    // As Qubes' process_io: once the remote exited, send our
                    // stdin EOF if we have not yet, then nothing more.
                    gate.stopped.store(true, Ordering::SeqCst);
                    if !gate.eof_sent.load(Ordering::SeqCst) {
                        let _ = wire::write_message(
                            &mut **guard,
                            &Repr::Data {
                                stream: DataStream::Stdin,
                                data: &[],
                            },
                        );
                    }
                    let _ = guard.shutdown();
                }
                return Ok(code);
            }
            other => {
                return Err(Error::Unexpected {
                    context: "data vchan".into(),
                    got: other.msg_type(),
                });
            }
        }
    }
}

/// The local ends of the executing side of a call.
pub struct Executor {
    /// The process's stdin.
    pub stdin: Option<Box<dyn Write + Send>>,
    /// The process's stdout.
    pub stdout: Option<Box<dyn Read + Send>>,
    /// The process's stderr.
    pub stderr: Option<Box<dyn Read + Send>>,
    /// Waits for the process and returns its exit code (128+signal when
    /// killed by a signal).
    pub wait: Box<dyn FnOnce() -> u32 + Send>,
    /// A process (not a socket service): `wait` runs from the start, and
    /// when the process exits its stdin is closed at once, as Qubes does,
    /// even while children of it still hold its stdout.
    pub close_stdin_on_exit: bool,
}

/// What the stdin writer thread is told.
enum StdinEvent {
    /// Data from the remote, in order.
    Data(Vec<u8>),
    /// Close the process's stdin (remote EOF, or the process exited).
    Close,
}

/// Feed the process's stdin from `events`. Data is queued without limit
/// (Qubes' `WRITE_STDIN_BUFFERED`): a process that does not read its stdin
/// yet never stops us reading the data vchan, so the remote never blocks.
fn stdin_writer(mut stdin: Option<Box<dyn Write + Send>>, events: mpsc::Receiver<StdinEvent>) {
    while let Ok(event) = events.recv() {
        match event {
            StdinEvent::Data(data) => {
                if let Some(w) = stdin.as_mut()
                    && w.write_all(&data).and_then(|()| w.flush()).is_err()
                {
                    stdin = None;
                }
            }
            StdinEvent::Close => stdin = None,
        }
    }
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").finish_non_exhaustive()
    }
}

/// Run the executing side: stream the process's output, feed it the
/// remote's stdin, then send stdout EOF, stderr EOF and the exit code.
/// Returns the exit code sent.
pub fn run_executor(vchan: Box<dyn Vchan>, version: u32, local: Executor) -> Result<u32> {
    let mut reader = vchan.try_clone().context(|| "cloning data vchan".into())?;
    let writer: SharedWriter = Arc::new(Mutex::new(vchan));
    let chunk = max_data_chunk(version);

    let (events, queue) = mpsc::channel();
    let stdin = local.stdin;
    thread::Builder::new()
        .name("qrexec-stdin-writer".into())
        .spawn(move || stdin_writer(stdin, queue))
        .context(|| "starting stdin writer thread".into())?;
    let remote_events = events.clone();
    thread::Builder::new()
        .name("qrexec-remote-stdin".into())
        .spawn(move || {
            let mut buf = MessageBuf::new();
            while let Ok(Some(repr)) = wire::read_message(&mut *reader, &mut buf, "data vchan peer")
            {
                if repr.check_version(version).is_err() {
                    break;
                }
                match repr {
                    Repr::Data {
                        stream: DataStream::Stdin | DataStream::Stdout,
                        data,
                    } => {
                        let event = if data.is_empty() {
                            StdinEvent::Close
                        } else {
                            StdinEvent::Data(data.to_vec())
                        };
                        if remote_events.send(event).is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            let _ = remote_events.send(StdinEvent::Close);
        })
        .context(|| "starting remote stdin thread".into())?;
    let wait = local.wait;
    let (waiter, wait) = if local.close_stdin_on_exit {
        let waiter = thread::Builder::new()
            .name("qrexec-wait".into())
            .spawn(move || {
                let code = wait();
                let _ = events.send(StdinEvent::Close);
                code
            })
            .context(|| "starting wait thread".into())?;
        (Some(waiter), None)
    } else {
        drop(events);
        (None, Some(wait))
    };

    let mut send_failed = false;
    let stderr_eof = Repr::Data {
        stream: DataStream::Stderr,
        data: &[],
    };
    if local.stderr.is_none() {
        // As Qubes' process_io: no stderr to forward, say so first.
        send_failed |= send(&writer, &stderr_eof).is_err();
    }
    let err_thread = local.stderr.map(|stderr| {
        let writer = Arc::clone(&writer);
        thread::spawn(move || pump(stderr, &writer, MsgType::DataStderr, chunk, false, None))
    });
    // stdout is pumped on this thread: one thread start less per call.
    send_failed |= match local.stdout {
        Some(stdout) => pump(stdout, &writer, MsgType::DataStdout, chunk, true, None).is_err(),
        None => send(
            &writer,
            &Repr::Data {
                stream: DataStream::Stdout,
                data: &[],
            },
        )
        .is_err(),
    };
    let eof = match err_thread {
        Some(t) => {
            send_failed |= !matches!(t.join(), Ok(Ok(())));
            send(&writer, &stderr_eof)
        }
        None => Ok(()),
    };
    let code = match (waiter, wait) {
        (Some(waiter), _) => waiter.join().unwrap_or(EXIT_CODE_DISCONNECTED),
        (None, Some(wait)) => wait(),
        (None, None) => EXIT_CODE_DISCONNECTED,
    };
    let sent = eof.and_then(|()| send(&writer, &Repr::ExitCode(code)));
    if let Ok(guard) = writer.lock() {
        let _ = guard.shutdown();
    }
    match sent {
        Ok(()) if !send_failed => Ok(code),
        Ok(()) => Err(Error::Eof("data vchan while sending output".into())),
        Err(source) => Err(Error::Io {
            context: "sending exit code".into(),
            source,
        }),
    }
}

/// Report a command that could not be started, as Qubes does: stdout EOF,
/// stderr EOF, exit code from a qube's agent (`stdout_first`); stderr EOF
/// first from dom0's qrexec-client, whose service side announces the end of
/// stderr before anything else.
pub fn send_failed_exec(vchan: &mut dyn Vchan, code: u32, stdout_first: bool) -> io::Result<()> {
    let (first, second) = if stdout_first {
        (DataStream::Stdout, DataStream::Stderr)
    } else {
        (DataStream::Stderr, DataStream::Stdout)
    };
    for repr in [
        Repr::Data {
            stream: first,
            data: &[],
        },
        Repr::Data {
            stream: second,
            data: &[],
        },
        Repr::ExitCode(code),
    ] {
        wire::write_message(vchan, &repr)?;
    }
    vchan.shutdown_write()
}

/// After [`send_failed_exec`]: keep reading (and discarding) what the peer
/// still sends until it closes, in the background, so that its writes
/// never fail because we went away first (qubes-core-vchan-socket reads in a
/// background thread the same way).
pub fn drain_in_background(mut vchan: Box<dyn Vchan>) {
    let _ = thread::Builder::new()
        .name("qrexec-drain".into())
        .spawn(move || {
            // Bounded: a peer that neither sends nor closes is left after a
            // minute.
            let _ = vchan.set_read_timeout(Some(std::time::Duration::from_secs(60)));
            let mut buf = [0u8; 4096];
            while matches!(vchan.read(&mut buf), Ok(n) if n > 0) {}
        });
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;
    use crate::vchan::socket::SocketVchan;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Box<dyn Vchan>, Box<dyn Vchan>) {
        let (a, b) = UnixStream::pair().unwrap();
        (Box::new(SocketVchan::new(a)), Box::new(SocketVchan::new(b)))
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn replace_chars_keeps_printables() {
        let mut b = *b"ok\t\n\x1b[31m\xff\x07";
        replace_chars(&mut b);
        assert_eq!(&b, b"ok\t\n_[31m_\x07");
    }

    #[test]
    fn handshake_picks_lower_version() {
        let (mut a, mut b) = pair();
        let peer = thread::spawn(move || {
            wire::send_hello(&mut *b, 3).unwrap();
            wire::recv_hello(&mut *b, "t").unwrap()
        });
        assert_eq!(handshake(&mut *a, false).unwrap(), 3);
        assert_eq!(peer.join().unwrap(), LOCAL_PROTOCOL_VERSION);
    }

    #[test]
    fn silent_peer_fails_the_handshake() {
        let (mut a, b) = pair();
        a.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        // handshake() installs its own (longer) timeout; call the reader
        // directly with the short one to keep the test fast.
        assert!(wire::recv_hello(&mut *a, "t").is_err());
        drop(b);
    }

    #[test]
    fn requester_and_executor_talk() {
        let (a, b) = pair();
        let out = Sink::default();
        let err = Sink::default();
        let req = Requester {
            input: Some(Box::new(&b"stdin data"[..])),
            output: Box::new(out.clone()),
            errors: Box::new(err.clone()),
            replace_stdout: false,
            replace_stderr: false,
        };
        let got_stdin = Sink::default();
        let exec = Executor {
            stdin: Some(Box::new(got_stdin.clone())),
            stdout: Some(Box::new(&b"hello out"[..])),
            stderr: Some(Box::new(&b"hello err"[..])),
            wait: Box::new(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                42
            }),
            close_stdin_on_exit: false,
        };
        let e = thread::spawn(move || run_executor(b, 3, exec).unwrap());
        assert_eq!(run_requester(a, 3, req).unwrap(), 42);
        assert_eq!(e.join().unwrap(), 42);
        assert_eq!(&*out.0.lock().unwrap(), b"hello out");
        assert_eq!(&*err.0.lock().unwrap(), b"hello err");
        assert_eq!(&*got_stdin.0.lock().unwrap(), b"stdin data");
    }

    #[test]
    fn executor_sends_eofs_then_exit_code_in_order() {
        let (a, mut b) = pair();
        let exec = Executor {
            stdin: None,
            stdout: Some(Box::new(&b"x"[..])),
            stderr: None,
            wait: Box::new(|| 3),
            close_stdin_on_exit: false,
        };
        let e = thread::spawn(move || run_executor(a, 3, exec));
        let mut buf = MessageBuf::new();
        let mut seen = Vec::new();
        while let Ok(Some(repr)) = wire::read_message(&mut *b, &mut buf, "t") {
            seen.push(match repr {
                Repr::Data { stream, data } => format!("{stream:?}:{}", data.len()),
                Repr::ExitCode(c) => format!("exit:{c}"),
                other => format!("{other:?}"),
            });
        }
        drop(b);
        let _ = e.join();
        assert_eq!(seen, ["Stderr:0", "Stdout:1", "Stdout:0", "exit:3"]);
    }

    #[test]
    fn executor_with_stderr_sends_stdout_eof_stderr_eof_exit() {
        let (a, mut b) = pair();
        let exec = Executor {
            stdin: None,
            stdout: Some(Box::new(&b""[..])),
            stderr: Some(Box::new(&b"e"[..])),
            wait: Box::new(|| 0),
            close_stdin_on_exit: false,
        };
        let e = thread::spawn(move || run_executor(a, 3, exec));
        let mut buf = MessageBuf::new();
        let mut seen = Vec::new();
        while let Ok(Some(repr)) = wire::read_message(&mut *b, &mut buf, "t") {
            seen.push(format!("{:?}", repr.msg_type()));
        }
        drop(b);
        let _ = e.join();
        let stdout_eof = seen.iter().position(|m| m == "DataStdout").unwrap();
        let stderr_positions: Vec<usize> = seen
            .iter()
            .enumerate()
            .filter(|(_, m)| *m == "DataStderr")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(stderr_positions.len(), 2, "{seen:?}");
        assert!(stdout_eof < stderr_positions[1], "{seen:?}");
        assert_eq!(seen.last().map(String::as_str), Some("DataExitCode"));
    }

    #[test]
    fn requester_sends_stdin_eof_once_remote_exited() {
        let (a, mut b) = pair();
        // Local stdin that never ends during the call.
        let (idle, _keep_open) = UnixStream::pair().unwrap();
        let req = Requester {
            input: Some(Box::new(idle)),
            output: Box::new(io::sink()),
            errors: Box::new(io::sink()),
            replace_stdout: false,
            replace_stderr: false,
        };
        let r = thread::spawn(move || run_requester(a, 3, req));
        wire::write_message(&mut *b, &Repr::ExitCode(5)).unwrap();
        assert_eq!(r.join().unwrap().unwrap(), 5);
        let mut buf = MessageBuf::new();
        assert_eq!(
            wire::read_message(&mut *b, &mut buf, "t").unwrap(),
            Some(Repr::Data {
                stream: DataStream::Stdin,
                data: &[]
            })
        );
        assert_eq!(wire::read_message(&mut *b, &mut buf, "t").unwrap(), None);
    }

    #[test]
    fn requester_rejects_oversized_chunk_for_v2() {
        let (a, mut b) = pair();
        let t = thread::spawn(move || {
            let data = vec![0u8; 5000];
            wire::write_message(
                &mut *b,
                &Repr::Data {
                    stream: DataStream::Stdout,
                    data: &data,
                },
            )
            .unwrap();
            b
        });
        let req = Requester {
            input: None,
            output: Box::new(io::sink()),
            errors: Box::new(io::sink()),
            replace_stdout: false,
            replace_stderr: false,
        };
        assert!(matches!(
            run_requester(a, 2, req),
            Err(Error::Protocol { .. })
        ));
        drop(t.join());
    }

    #[test]
    fn requester_reports_disconnect_without_exit_code() {
        let (a, b) = pair();
        drop(b);
        let req = Requester {
            input: None,
            output: Box::new(io::sink()),
            errors: Box::new(io::sink()),
            replace_stdout: false,
            replace_stderr: false,
        };
        assert!(run_requester(a, 3, req).is_err());
    }
}
