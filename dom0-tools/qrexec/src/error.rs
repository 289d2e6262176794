//! Error type of the qrexec programs: says what failed, with whom, and wraps
//! the underlying I/O or protocol error. Programs turn it into a log line and
//! an exit code at their edge; library code never panics instead.

use std::io;

use protocol::qrexec::{self, MsgType};

/// What went wrong in a qrexec program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The peer sent bytes that are not a valid qrexec message.
    #[error("{context}: {source}")]
    Protocol {
        /// Who sent it / what we were reading.
        context: String,
        /// The parse error.
        source: qrexec::Error,
    },
    /// The peer closed the connection in the middle of something.
    #[error("{0}: connection closed by peer")]
    Eof(String),
    /// The peer sent a message that is valid but not allowed here.
    #[error("{context}: unexpected message {} (0x{:x})", .got.name(), u32::from(*.got))]
    Unexpected {
        /// Where.
        context: String,
        /// What arrived.
        got: MsgType,
    },
    /// Something the user or configuration got wrong.
    #[error("{0}")]
    Usage(String),
    /// A request was refused by policy.
    #[error("Request refused")]
    Refused,
    /// Timed out waiting for a peer.
    #[error("{0}: timeout")]
    Timeout(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Attach a description of what we were doing to an `io::Result`.
pub trait IoContext<T> {
    /// Wrap the error with `context`.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
