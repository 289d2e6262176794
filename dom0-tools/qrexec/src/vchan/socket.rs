//! vchan over UNIX sockets, exactly as qubes-core-vchan-socket lays it out:
//! the server listens on `$VCHAN_SOCKET_DIR/vchan.<server>.<client>.<port>.sock`
//! (default directory `/var/run/vchan`), unlinking a stale socket, binding and
//! accepting exactly once (then removing the path); the client retries
//! `connect` until the socket appears. A process learns its own domain id
//! from `VCHAN_DOMAIN` (0 when unset, as for dom0).
//!
//! Facts: qubes-core-vchan-socket `vchan/init.c`/`io.c`; the same layout as
//! the unikernel's hosted platform (`unikernel/src/platform/hosted/vchan.rs`).
//! Qubes' client retries every 0.1 ms (`CONNECT_DELAY_MS * 1000` ns) for as
//! long as it takes; ours retries every 20 µs for the first 2 ms (with the
//! thread's timer slack lowered to 1 µs, so a sleep is not stretched by the
//! default 50 µs: both ends learn the port at about the same moment, and a
//! short call's latency is a few ms in all, so a retry interval of 0.1 ms
//! plus slack is paid in full whenever the client wins the race), every
//! 0.1 ms until 50 ms, every 1 ms until 5 s, then every 100 ms, without
//! changing what either side sees on the socket (a failed `connect()` to a
//! missing path costs a few µs; waiting on inotify for the socket's
//! creation instead was measured slower). This
//! module must never accept a second connection on a server socket: a
//! vchan has exactly one peer.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

use super::{Transport, Vchan};

/// How long a client polls for its server every 20 µs.
const EAGER_POLL_PERIOD: Duration = Duration::from_millis(2);
/// How long a client polls for its server every 0.1 ms or faster.
const SHORT_POLL_PERIOD: Duration = Duration::from_millis(50);
/// How long a client polls for its server every millisecond or faster.
const FAST_POLL_PERIOD: Duration = Duration::from_secs(5);

/// Default socket directory of qubes-core-vchan-socket.
pub const DEFAULT_SOCKET_DIR: &str = protocol::vchan::DEFAULT_SOCKET_DIR;

/// The socket path where domain `server` offers `port` to domain `client`
/// (name formatted by `protocol::vchan::VchanName`). Domain ids are 16-bit
/// in Xen; a larger one is refused.
pub fn socket_path(dir: &Path, server: u32, client: u32, port: u32) -> io::Result<PathBuf> {
    let domain = |id: u32| {
        u16::try_from(id).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("domain id {id} is not a Xen domain id (0..=65535)"),
            )
        })
    };
    let name = protocol::vchan::VchanName {
        server: domain(server)?,
        client: domain(client)?,
        port,
    };
    let mut file = String::new();
    name.write_socket_name(&mut file)
        .map_err(|_| io::Error::other("formatting vchan socket name"))?;
    Ok(dir.join(file))
}

/// One end of a socket vchan.
#[derive(Debug)]
pub struct SocketVchan {
    stream: UnixStream,
}

impl SocketVchan {
    /// Wrap a connected stream (also used by tests to fake a peer).
    pub fn new(stream: UnixStream) -> Self {
        SocketVchan { stream }
    }
}

impl Read for SocketVchan {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for SocketVchan {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl Vchan for SocketVchan {
    fn try_clone(&self) -> io::Result<Box<dyn Vchan>> {
        Ok(Box::new(SocketVchan {
            stream: self.stream.try_clone()?,
        }))
    }

    fn shutdown(&self) -> io::Result<()> {
        match self.stream.shutdown(std::net::Shutdown::Both) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self.stream.shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }
}

/// The socket transport: a directory and our own domain id.
#[derive(Debug, Clone)]
pub struct SocketTransport {
    dir: PathBuf,
    own_domain: u32,
}

impl SocketTransport {
    /// A transport in `dir` for domain `own_domain`.
    pub fn new(dir: impl Into<PathBuf>, own_domain: u32) -> Self {
        SocketTransport {
            dir: dir.into(),
            own_domain,
        }
    }

    /// Configure from `VCHAN_SOCKET_DIR` and `VCHAN_DOMAIN`.
    pub fn from_env() -> io::Result<Self> {
        let dir = std::env::var_os(protocol::vchan::SOCKET_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR));
        let own_domain = match std::env::var(protocol::vchan::DOMAIN_ENV) {
            Ok(text) => text.trim().parse::<u32>().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "VCHAN_DOMAIN={text:?} is not a domain id; set it to this domain's number"
                    ),
                )
            })?,
            Err(_) => 0,
        };
        Ok(SocketTransport::new(dir, own_domain))
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn wait_readable(listener: &UnixListener, deadline: Option<Instant>) -> io::Result<bool> {
    loop {
        let timeout = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                Some(Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                })
            }
            None => None,
        };
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl Transport for SocketTransport {
    fn own_domain(&self) -> u32 {
        self.own_domain
    }

    fn server(
        &self,
        peer: u32,
        port: u32,
        timeout: Option<Duration>,
    ) -> io::Result<Box<dyn Vchan>> {
        let path = socket_path(&self.dir, self.own_domain, peer, port)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let result = match wait_readable(&listener, deadline) {
            Ok(true) => listener.accept().map(|(stream, _)| stream),
            Ok(false) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no peer connected to {}", path.display()),
            )),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&path);
        Ok(Box::new(SocketVchan::new(result?)))
    }

    fn client(
        &self,
        server: u32,
        port: u32,
        timeout: Option<Duration>,
    ) -> io::Result<Box<dyn Vchan>> {
        let path = socket_path(&self.dir, server, self.own_domain, port)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        // The server usually appears within microseconds to milliseconds
        // (both ends learn the port at about the same moment): retry every
        // 20 µs for 2 ms, then every 0.1 ms as Qubes' client does (a failed
        // connect() to a missing path costs a few microseconds), backing off
        // after 50 ms and after 5 s. The sleeps are short only if the
        // thread's timer slack is: lower it for the wait, then restore it.
        let started = Instant::now();
        let slack = TimerSlack::lower();
        let result = loop {
            match UnixStream::connect(&path) {
                Ok(stream) => break Ok(Box::new(SocketVchan::new(stream)) as Box<dyn Vchan>),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    let waited = started.elapsed();
                    let delay = if waited < EAGER_POLL_PERIOD {
                        Duration::from_micros(20)
                    } else if waited < SHORT_POLL_PERIOD {
                        Duration::from_micros(100)
                    } else if waited < FAST_POLL_PERIOD {
                        Duration::from_millis(1)
                    } else {
                        Duration::from_millis(100)
                    };
                    if deadline.is_some_and(|d| Instant::now() + delay > d) {
                        break Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("vchan server {} did not appear", path.display()),
                        ));
                    }
                    std::thread::sleep(delay);
                }
                Err(e) => {
                    break Err(io::Error::new(
                        e.kind(),
                        format!("cannot connect to {}: {e}", path.display()),
                    ));
                }
            }
        };
        drop(slack);
        result
    }
}

/// The calling thread's timer slack, lowered to 1 µs while this lives and
/// restored when dropped (nothing happens where the kernel refuses).
struct TimerSlack(Option<u64>);

impl TimerSlack {
    fn lower() -> Self {
        let old = rustix::thread::current_timer_slack().ok();
        let lowered = old.is_some()
            && rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1_000)).is_ok();
        TimerSlack(old.filter(|_| lowered))
    }
}

impl Drop for TimerSlack {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            // 0 would mean "the default slack", which is what the thread had.
            let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(old));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qrexec-vchan-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn path_layout() {
        assert_eq!(
            socket_path(Path::new("/run/v"), 5, 0, 512).unwrap(),
            PathBuf::from("/run/v/vchan.5.0.512.sock")
        );
        assert!(socket_path(Path::new("/run/v"), 70000, 0, 512).is_err());
    }

    #[test]
    fn client_waits_for_late_server_and_bytes_flow() {
        let dir = temp_dir("late");
        let server_side = SocketTransport::new(&dir, 3);
        let client_side = SocketTransport::new(&dir, 0);
        let client = std::thread::spawn(move || {
            let mut v = client_side
                .client(3, 513, Some(Duration::from_secs(5)))
                .unwrap();
            v.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            v.read_exact(&mut buf).unwrap();
            buf
        });
        std::thread::sleep(Duration::from_millis(30));
        let mut s = server_side
            .server(0, 513, Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").unwrap();
        assert_eq!(&client.join().unwrap(), b"pong");
        assert!(
            !socket_path(&dir, 3, 0, 513).unwrap().exists(),
            "server removes its socket"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn timeouts() {
        let dir = temp_dir("timeout");
        let t = SocketTransport::new(&dir, 1);
        let err = t
            .client(9, 600, Some(Duration::from_millis(50)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let err = t
            .server(9, 601, Some(Duration::from_millis(50)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
