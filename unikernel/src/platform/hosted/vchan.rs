//! vchan as a Linux process sees it: the UNIX-socket transport of
//! qubes-core-vchan-socket, as a non-blocking [`ByteStream`].
//!
//! Facts (qubes-core-vchan-socket `vchan/init.c`, `vchan/socket.c`): the
//! socket is `$VCHAN_SOCKET_DIR/vchan.<server-domid>.<client-domid>.<port>.sock`
//! (default dir `/var/run/vchan`); a process's own domain id is `VCHAN_DOMAIN`
//! (default 0); the server unlinks the path, binds, listens with a backlog of
//! 1 and accepts exactly one connection; the client retries `connect` every
//! 100 ms while it fails with `ECONNREFUSED` or `ENOENT`; after that the link
//! is a plain byte stream in both directions with no framing of its own, so
//! the bytes above are the same as on a Xen vchan ring.
//!
//! A link never blocks and never panics on what the peer does: a hang-up or
//! reset is `StreamError::Closed`; anything the peer sends is only bytes.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use super::epoll::{Interest, Readiness};
use super::reactor::{CONNECT_RETRY, Reactor};
use crate::platform::{ByteStream, LinkState, StreamError};

/// Qubes' default socket directory when `VCHAN_SOCKET_DIR` is unset.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/vchan";

/// The socket path of the vchan `server` offers to `client` on `port`.
pub fn socket_path(dir: &Path, server: u16, client: u16, port: u32) -> PathBuf {
    dir.join(std::format!("vchan.{server}.{client}.{port}.sock"))
}

#[derive(Debug)]
enum Inner {
    /// Server side, waiting for the one client. `ready` is the
    /// listener's epoll readiness flag: `accept` is tried only while it is
    /// raised.
    Listening {
        listener: UnixListener,
        ready: Readiness,
    },
    /// Client side, retrying every 100 ms.
    Connecting {
        next_attempt: Instant,
    },
    /// Both ends attached. `want_write` is set while a write found the
    /// socket full, so epoll also wakes us when it drains. `readable` is
    /// the socket's epoll readiness flag: a read with the flag lowered
    /// finds nothing without a syscall (the firewall's loop reads every
    /// link on every turn; under a stream of frames that was tens of
    /// thousands of `recv`s a second answering `EAGAIN`).
    Connected {
        stream: UnixStream,
        want_write: bool,
        readable: Readiness,
    },
    Closed,
}

/// One end of a vchan over a UNIX socket (or any connected UNIX stream, such
/// as the link to xenstored).
#[derive(Debug)]
pub struct SocketLink {
    reactor: Rc<Reactor>,
    path: PathBuf,
    /// True when we bound `path` and so must unlink it.
    owns_path: bool,
    /// In a `RefCell` so that `state(&self)` can accept or connect: the
    /// program flow asks for the state before it reads (as a Xen vchan's
    /// state is live on the shared page).
    inner: RefCell<Inner>,
}

impl SocketLink {
    /// Offers the link as server on `path`: unlinks a stale socket, binds,
    /// listens with a backlog of 1. The link stays `Waiting` until the client
    /// connects (noticed by the next `read`/`write`).
    pub fn listen(reactor: Rc<Reactor>, path: PathBuf) -> io::Result<SocketLink> {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        let ready = reactor.epoll.add_tracked(listener.as_raw_fd())?;
        Ok(SocketLink {
            reactor,
            path,
            owns_path: true,
            inner: RefCell::new(Inner::Listening { listener, ready }),
        })
    }

    /// Connects as client to the server on `path`, retrying every 100 ms
    /// while the server is not there yet. Tries once right away.
    pub fn connect(reactor: Rc<Reactor>, path: PathBuf) -> SocketLink {
        reactor.connecting_started();
        let link = SocketLink {
            reactor,
            path,
            owns_path: false,
            inner: RefCell::new(Inner::Connecting {
                next_attempt: Instant::now(),
            }),
        };
        link.progress();
        link
    }

    /// Wraps an already connected stream (the xenstored link).
    pub fn from_stream(reactor: Rc<Reactor>, stream: UnixStream) -> io::Result<SocketLink> {
        stream.set_nonblocking(true)?;
        let readable = reactor.epoll.add_tracked(stream.as_raw_fd())?;
        Ok(SocketLink {
            reactor,
            path: PathBuf::new(),
            owns_path: false,
            inner: RefCell::new(Inner::Connected {
                stream,
                want_write: false,
                readable,
            }),
        })
    }

    /// The socket path of this link (empty for a wrapped stream).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor to wait on: the connected socket, or the listener
    /// while waiting for the client; `None` while connecting or closed.
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        match &*self.inner.borrow() {
            Inner::Listening { listener, .. } => Some(listener.as_raw_fd()),
            Inner::Connected { stream, .. } => Some(stream.as_raw_fd()),
            Inner::Connecting { .. } | Inner::Closed => None,
        }
    }

    /// The connected socket's readiness flag, for a waiter that polls the
    /// descriptor itself (outside the epoll set) and must raise it when it
    /// finds input; `None` unless connected.
    pub fn readiness(&self) -> Option<Readiness> {
        match &*self.inner.borrow() {
            Inner::Connected { readable, .. } => Some(readable.clone()),
            _ => None,
        }
    }

    /// Accepts the pending client or retries the connect when it is due.
    fn progress(&self) {
        let mut inner = self.inner.borrow_mut();
        progress(&self.reactor, &self.path, &mut inner);
    }

    fn set_want_write(&mut self, want: bool) {
        if let Inner::Connected {
            stream, want_write, ..
        } = self.inner.get_mut()
            && *want_write != want
        {
            let interest = if want {
                Interest::READ_WRITE
            } else {
                Interest::READ
            };
            if self
                .reactor
                .epoll
                .modify(stream.as_raw_fd(), interest)
                .is_ok()
            {
                *want_write = want;
            }
        }
    }

    fn shut(&mut self) {
        match std::mem::replace(self.inner.get_mut(), Inner::Closed) {
            Inner::Listening { listener, .. } => self.reactor.epoll.remove(listener.as_raw_fd()),
            Inner::Connecting { .. } => self.reactor.connecting_finished(),
            Inner::Connected { stream, .. } => {
                self.reactor.epoll.remove(stream.as_raw_fd());
                let _ = stream.shutdown(Shutdown::Both);
            }
            Inner::Closed => {}
        }
    }
}

fn attach(reactor: &Reactor, inner: &mut Inner, stream: UnixStream) {
    let readable = match stream.set_nonblocking(true) {
        Ok(()) => reactor.epoll.add_tracked(stream.as_raw_fd()).ok(),
        Err(_) => None,
    };
    let Some(readable) = readable else {
        log::warn!("vchan: cannot register the connected socket with epoll; closing it");
        *inner = Inner::Closed;
        return;
    };
    *inner = Inner::Connected {
        stream,
        want_write: false,
        readable,
    };
}

/// Accepts the pending client or retries the connect when it is due.
fn progress(reactor: &Reactor, path: &Path, inner: &mut Inner) {
    match inner {
        Inner::Listening { listener, ready } => {
            if !ready.get() {
                return;
            }
            let listener_fd = listener.as_raw_fd();
            match listener.accept() {
                Ok((stream, _)) => {
                    reactor.epoll.remove(listener_fd);
                    // Only one client per vchan: stop listening.
                    attach(reactor, inner, stream);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.set(false),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    log::warn!("vchan {}: accept failed: {error}", path.display());
                    reactor.epoll.remove(listener_fd);
                    *inner = Inner::Closed;
                }
            }
        }
        Inner::Connecting { next_attempt } => {
            let now = Instant::now();
            if now < *next_attempt {
                return;
            }
            match UnixStream::connect(path) {
                Ok(stream) => {
                    reactor.connecting_finished();
                    attach(reactor, inner, stream);
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    *next_attempt = now + CONNECT_RETRY;
                }
                Err(error) => {
                    log::warn!("vchan {}: connect failed: {error}", path.display());
                    reactor.connecting_finished();
                    *inner = Inner::Closed;
                }
            }
        }
        Inner::Connected { .. } | Inner::Closed => {}
    }
}

impl ByteStream for SocketLink {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        self.progress();
        let Inner::Connected {
            stream, readable, ..
        } = self.inner.get_mut()
        else {
            return match *self.inner.get_mut() {
                Inner::Closed => Err(StreamError::Closed),
                _ => Ok(0),
            };
        };
        if buf.is_empty() || !readable.get() {
            return Ok(0);
        }
        match stream.read(buf) {
            Ok(0) => {
                self.shut();
                Err(StreamError::Closed)
            }
            Ok(count) => Ok(count),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                readable.set(false);
                Ok(0)
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {
                self.shut();
                Err(StreamError::Closed)
            }
            Err(_) => {
                self.shut();
                Err(StreamError::Platform("vchan socket read failed"))
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        self.progress();
        let Inner::Connected { stream, .. } = self.inner.get_mut() else {
            return match *self.inner.get_mut() {
                Inner::Closed => Err(StreamError::Closed),
                _ => Ok(0),
            };
        };
        if buf.is_empty() {
            return Ok(0);
        }
        // Rust's runtime ignores SIGPIPE, so a vanished peer is EPIPE here.
        match stream.write(buf) {
            Ok(count) => {
                self.set_want_write(count < buf.len());
                Ok(count)
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                self.set_want_write(true);
                Ok(0)
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                self.shut();
                Err(StreamError::Closed)
            }
            Err(_) => {
                self.shut();
                Err(StreamError::Platform("vchan socket write failed"))
            }
        }
    }

    fn state(&self) -> LinkState {
        self.progress();
        match *self.inner.borrow() {
            Inner::Listening { .. } | Inner::Connecting { .. } => LinkState::Waiting,
            Inner::Connected { .. } => LinkState::Connected,
            Inner::Closed => LinkState::Closed,
        }
    }

    fn close(&mut self) {
        self.shut();
    }
}

impl Drop for SocketLink {
    fn drop(&mut self) {
        self.shut();
        if self.owns_path {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(std::format!("hosted-vchan-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn pump<F: FnMut() -> bool>(reactor: &Reactor, mut done: F) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            reactor
                .epoll
                .wait(Some(
                    reactor.max_sleep().unwrap_or(Duration::from_millis(50)),
                ))
                .unwrap();
        }
    }

    #[test]
    fn path_follows_vchan_socket_convention() {
        assert_eq!(
            socket_path(Path::new("/run/x"), 3, 0, 111),
            PathBuf::from("/run/x/vchan.3.0.111.sock")
        );
    }

    #[test]
    fn server_and_client_exchange_bytes_and_see_close() {
        let dir = temp_dir("pair");
        let reactor = Reactor::new().unwrap();
        let path = socket_path(&dir, 5, 0, 512);
        // Client first: it must retry until the server exists.
        let mut client = SocketLink::connect(reactor.clone(), path.clone());
        assert_eq!(client.state(), LinkState::Waiting);
        assert_eq!(reactor.max_sleep(), Some(CONNECT_RETRY));
        assert_eq!(client.write(b"early").unwrap(), 0);
        let mut server = SocketLink::listen(reactor.clone(), path.clone()).unwrap();
        assert_eq!(server.state(), LinkState::Waiting);
        pump(&reactor, || {
            let _ = client.read(&mut []);
            let _ = server.read(&mut []);
            client.state() == LinkState::Connected && server.state() == LinkState::Connected
        });
        assert_eq!(reactor.max_sleep(), None);

        assert_eq!(client.write(b"hello").unwrap(), 5);
        let mut got = std::vec::Vec::new();
        pump(&reactor, || {
            let mut buf = [0u8; 16];
            let n = server.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            got.len() == 5
        });
        assert_eq!(got, b"hello");

        client.close();
        assert_eq!(client.state(), LinkState::Closed);
        pump(&reactor, || {
            let mut buf = [0u8; 4];
            server.read(&mut buf) == Err(StreamError::Closed)
        });
        assert_eq!(server.state(), LinkState::Closed);
        assert_eq!(server.write(b"x"), Err(StreamError::Closed));
        drop(server);
        assert!(!path.exists(), "server unlinks its socket");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A listening link at `path` and a peer it has accepted.
    fn accepted(reactor: &Rc<Reactor>, path: &Path) -> (SocketLink, UnixStream) {
        let mut server = SocketLink::listen(reactor.clone(), path.to_path_buf()).unwrap();
        let peer = UnixStream::connect(path).unwrap();
        pump(reactor, || {
            let _ = server.read(&mut []);
            server.state() == LinkState::Connected
        });
        (server, peer)
    }

    #[test]
    fn a_drained_link_reads_again_once_epoll_flags_it() {
        let dir = temp_dir("flag");
        let reactor = Reactor::new().unwrap();
        let (mut server, mut peer) = accepted(&reactor, &socket_path(&dir, 0, 9, 111));
        let mut buf = [0u8; 16];
        // Nothing there: the read finds the socket empty and lowers the
        // readiness flag.
        assert_eq!(server.read(&mut buf), Ok(0));
        peer.write_all(b"ping").unwrap();
        // Until epoll reports the socket, the link does not look at it.
        assert_eq!(server.read(&mut buf), Ok(0));
        assert_eq!(server.readiness().map(|flag| flag.get()), Some(false));
        reactor.epoll.wait(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(server.read(&mut buf), Ok(4));
        assert_eq!(&buf[..4], b"ping");
        // A peer that goes away is seen the same way: once drained and
        // lowered, the flag hides the hang-up until the next wait.
        assert_eq!(server.read(&mut buf), Ok(0));
        drop(peer);
        assert_eq!(server.read(&mut buf), Ok(0));
        reactor.epoll.wait(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(server.read(&mut buf), Err(StreamError::Closed));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn full_socket_reports_zero_and_wakes_when_drained() {
        let dir = temp_dir("full");
        let reactor = Reactor::new().unwrap();
        let (mut server, mut peer) = accepted(&reactor, &socket_path(&dir, 0, 7, 111));
        let chunk = [0xa5u8; 65536];
        let mut written = 0usize;
        loop {
            let n = server.write(&chunk).unwrap();
            if n == 0 {
                break;
            }
            written += n;
            assert!(written < 64 << 20, "socket never filled");
        }
        // Drain a bit on the peer; epoll must then report writability.
        let mut sink = [0u8; 65536];
        peer.set_nonblocking(true).unwrap();
        let mut drained = 0usize;
        while drained < written {
            match peer.read(&mut sink) {
                Ok(n) => drained += n,
                Err(_) => break,
            }
        }
        assert!(reactor.epoll.wait(Some(Duration::from_secs(2))).unwrap() >= 1);
        assert!(server.write(&chunk).unwrap() > 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The program flow asks `state()` before it ever reads: asking must be
    /// enough to accept the client (server) or to connect (client).
    #[test]
    fn state_alone_makes_the_link_progress() {
        let dir = temp_dir("state");
        let reactor = Reactor::new().unwrap();
        let path = socket_path(&dir, 2, 0, 512);
        let server = SocketLink::listen(reactor.clone(), path.clone()).unwrap();
        let _peer = UnixStream::connect(&path).unwrap();
        pump(&reactor, || server.state() == LinkState::Connected);
        let path = socket_path(&dir, 0, 2, 111);
        let client = SocketLink::connect(reactor.clone(), path.clone());
        assert_eq!(client.state(), LinkState::Waiting);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        pump(&reactor, || client.state() == LinkState::Connected);
        assert!(listener.accept().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn peer_reset_is_closed_not_a_panic() {
        let reactor = Reactor::new().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut link = SocketLink::from_stream(reactor, ours).unwrap();
        drop(theirs);
        let mut buf = [0u8; 8];
        assert_eq!(link.read(&mut buf), Err(StreamError::Closed));
        assert_eq!(link.state(), LinkState::Closed);
    }
}
