//! The vchan server end qubesdb-daemon needs, over the UNIX-socket transport
//! of qubes-core-vchan-socket: `$VCHAN_SOCKET_DIR/vchan.<server>.<client>.<port>.sock`
//! (name from `protocol::vchan::VchanName`); the server unlinks a stale
//! socket, binds, and accepts exactly one client; to serve the next
//! connection of the same VM (its daemon restarted) it binds afresh.
//!
//! This duplicates a few lines of the qrexec crate's socket transport
//! (`dom0-tools/qrexec/src/vchan/socket.rs`), which was not yet in the tree
//! when this crate was written; the two should be merged. It must never
//! accept a second client on one binding, and never interpret bytes.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use protocol::vchan::VchanName;

/// The socket path where domain `server` offers `port` to domain `client`.
pub fn socket_path(dir: &Path, server: u16, client: u16, port: u32) -> PathBuf {
    let mut name = String::new();
    let vchan = VchanName {
        server,
        client,
        port,
    };
    // Writing into a String cannot fail.
    let _ = vchan.write_socket_name(&mut name);
    dir.join(name)
}

/// A vchan server socket.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    listener: Option<UnixListener>,
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    UnixListener::bind(path)
}

impl Server {
    /// Offers the vchan on `path`.
    pub fn bind(path: &Path) -> io::Result<Server> {
        Ok(Server {
            path: path.to_path_buf(),
            listener: Some(bind(path)?),
        })
    }

    /// Waits for the one client; the binding is then closed and removed.
    pub fn accept(&mut self) -> io::Result<UnixStream> {
        let listener = match self.listener.take() {
            Some(listener) => listener,
            None => bind(&self.path)?,
        };
        let (stream, _) = listener.accept()?;
        drop(listener);
        let _ = std::fs::remove_file(&self.path);
        Ok(stream)
    }

    /// Offers the vchan again (after the client went away).
    pub fn rebind(&mut self) -> io::Result<()> {
        self.listener = Some(bind(&self.path)?);
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_is_vchan_socket_convention() {
        assert_eq!(
            socket_path(Path::new("/run/v"), 0, 12, 111),
            PathBuf::from("/run/v/vchan.0.12.111.sock")
        );
    }
}
