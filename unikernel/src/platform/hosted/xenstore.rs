//! The hosted link to xenstored: the `xsd_sockmsg` protocol over xenstored's
//! UNIX socket, as a [`ByteStream`] that the portable xenstore client
//! (`crate::xenstore`) runs on, exactly as it runs on the xenstore ring on
//! Xen.
//!
//! Facts: libxenstore finds the socket in `XENSTORED_PATH`, else
//! `$XENSTORED_RUNDIR/socket`, else `/var/run/xenstored/socket`; on the socket
//! every request is a 16-byte `xsd_sockmsg` header plus payload, the same
//! bytes as on the ring (Xen `xen/include/public/io/xs_wire.h`).
//!
//! This module only opens the link; it never interprets a reply (the client
//! does, with `protocol::xenstore`).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::epoll::Readiness;
use super::reactor::Reactor;
use super::vchan::SocketLink;
use crate::xenstore::{LinkWait, XenstoreClient};

/// The portable xenstore client on the hosted link.
pub type HostedXenstore = XenstoreClient<SocketLink, SocketWait>;

/// How long one [`LinkWait::wait`] sleeps at most; the client gives up on a
/// reply after `DEFAULT_MAX_WAITS` (2000) of them, i.e. 20 s.
pub const WAIT_SLICE_MS: libc::c_int = 10;

/// Waits for xenstored's socket to become readable (or 10 ms to pass), so
/// the portable client sleeps instead of spinning while a reply is on its way.
/// It polls the descriptor itself, outside the epoll set, so it raises the
/// link's readiness flag afterwards: the link reads only while the flag is
/// up, and only the epoll set's wait would raise it otherwise.
#[derive(Debug)]
pub struct SocketWait {
    fd: Option<std::os::fd::RawFd>,
    readable: Option<Readiness>,
}

impl LinkWait for SocketWait {
    fn wait(&mut self) {
        let Some(fd) = self.fd else {
            std::thread::sleep(std::time::Duration::from_millis(WAIT_SLICE_MS as u64));
            return;
        };
        let mut poll_fd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `poll_fd` is one valid pollfd for the duration of the
        // call, and we pass a count of 1. The fd belongs to the link the
        // same client owns; if it were closed, poll reports POLLNVAL.
        let _ = unsafe { libc::poll(&mut poll_fd, 1, WAIT_SLICE_MS) };
        // Raised whatever poll said: at worst one read finds nothing.
        if let Some(flag) = &self.readable {
            flag.set(true);
        }
    }
}

/// Connects to xenstored at `path` and wraps the link in the portable
/// xenstore client.
pub fn connect_client(reactor: Rc<Reactor>, path: &Path) -> io::Result<HostedXenstore> {
    let link = connect(reactor, path)?;
    let waiter = SocketWait {
        fd: link.raw_fd(),
        readable: link.readiness(),
    };
    Ok(XenstoreClient::new(link, waiter))
}

/// libxenstore's default socket path.
pub const DEFAULT_XENSTORED_SOCKET: &str = "/var/run/xenstored/socket";

/// The xenstored socket path as libxenstore chooses it from the environment.
pub fn socket_path_from_env() -> PathBuf {
    if let Some(path) = std::env::var_os("XENSTORED_PATH") {
        return PathBuf::from(path);
    }
    if let Some(rundir) = std::env::var_os("XENSTORED_RUNDIR") {
        return PathBuf::from(rundir).join("socket");
    }
    PathBuf::from(DEFAULT_XENSTORED_SOCKET)
}

/// Connects to xenstored at `path` and returns the non-blocking link.
pub fn connect(reactor: Rc<Reactor>, path: &Path) -> io::Result<SocketLink> {
    let stream = UnixStream::connect(path).map_err(|error| {
        io::Error::new(
            error.kind(),
            std::format!(
                "cannot connect to xenstored at {}: {error} (is the box's xenstored running? set --xenstore-socket or XENSTORED_PATH)",
                path.display()
            ),
        )
    })?;
    SocketLink::from_stream(reactor, stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::{ByteStream, LinkState};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::time::Duration;
    use std::vec::Vec;

    fn header(kind: u32, req_id: u32, tx_id: u32, len: u32) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[4..8].copy_from_slice(&req_id.to_le_bytes());
        h[8..12].copy_from_slice(&tx_id.to_le_bytes());
        h[12..16].copy_from_slice(&len.to_le_bytes());
        h
    }

    /// A raw `XS_READ` exchange with a scripted xenstored on a real socket:
    /// the link carries the request bytes unchanged and the reply back.
    #[test]
    fn raw_read_exchange_over_the_socket() {
        let dir = std::env::temp_dir().join(std::format!("hosted-xs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("socket");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 16 + 5];
            conn.read_exact(&mut request).unwrap();
            // XS_READ = 2, req_id 7, path "name\0".
            assert_eq!(&request[..16], &header(2, 7, 0, 5));
            assert_eq!(&request[16..], b"name\0");
            let mut reply = header(2, 7, 0, 8).to_vec();
            reply.extend_from_slice(b"firewall");
            conn.write_all(&reply).unwrap();
        });

        let reactor = Reactor::new().unwrap();
        let mut link = connect(reactor.clone(), &path).unwrap();
        assert_eq!(link.state(), LinkState::Connected);
        let mut request = header(2, 7, 0, 5).to_vec();
        request.extend_from_slice(b"name\0");
        let mut sent = 0;
        while sent < request.len() {
            sent += link.write(&request[sent..]).unwrap();
        }
        let mut reply = Vec::new();
        while reply.len() < 24 {
            reactor.epoll.wait(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 64];
            let n = link.read(&mut buf).unwrap();
            reply.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&reply[..16], &header(2, 7, 0, 8));
        assert_eq!(&reply[16..], b"firewall");
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The portable client on the hosted link, against a scripted
    /// xenstored thread: a READ, and a watch event that arrives before the
    /// reply to the next request and is queued.
    #[test]
    fn portable_client_runs_on_the_hosted_link() {
        use crate::platform::Xenstore;
        let dir = std::env::temp_dir().join(std::format!("hosted-xsc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("socket");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 16 + 5];
            conn.read_exact(&mut request).unwrap();
            let req_id = u32::from_le_bytes(request[4..8].try_into().unwrap());
            assert_eq!(&request[16..], b"name\0");
            // Answer slowly, so the client has to wait on the socket.
            std::thread::sleep(Duration::from_millis(50));
            let mut reply = header(2, req_id, 0, 8).to_vec();
            reply.extend_from_slice(b"firewall");
            conn.write_all(&reply).unwrap();
            // WATCH "backend/vif" "t": an event first, then OK.
            let mut watch = [0u8; 16 + 14];
            conn.read_exact(&mut watch).unwrap();
            let req_id = u32::from_le_bytes(watch[4..8].try_into().unwrap());
            let mut event = header(15, 0, 0, 14).to_vec();
            event.extend_from_slice(b"backend/vif\0t\0");
            let mut ok = header(4, req_id, 0, 3).to_vec();
            ok.extend_from_slice(b"OK\0");
            conn.write_all(&event).unwrap();
            conn.write_all(&ok).unwrap();
        });
        let reactor = Reactor::new().unwrap();
        let mut client = connect_client(reactor, &path).unwrap();
        assert_eq!(client.read("name").unwrap().as_deref(), Some("firewall"));
        client.watch("backend/vif", "t").unwrap();
        let event = client.poll_watch().unwrap();
        assert_eq!(
            (event.path.as_str(), event.token.as_str()),
            ("backend/vif", "t")
        );
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_xenstored_is_a_clear_error() {
        let reactor = Reactor::new().unwrap();
        let error = connect(reactor, Path::new("/nonexistent/xenstored/socket")).unwrap_err();
        assert!(std::format!("{error}").contains("XENSTORED_PATH"));
    }
}
