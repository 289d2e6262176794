//! qrexec protocol versions: negotiation and the per-version data chunk size.
//!
//! Each side sends `MSG_HELLO` with its own version; the lower version wins
//! and the connection is refused when it falls below what the side requires
//! (qrexec-daemon: agent >= 2, client >= 3). Versions: 2 (Qubes R3.0–4.0,
//! 4 KiB chunks, `MSG_TRIGGER_SERVICE`), 3 (R4.1–4.2, 64 KiB chunks,
//! `MSG_TRIGGER_SERVICE3`), 4 (R4.3, `MSG_TRIGGER_SERVICE4`). Source:
//! `libqrexec/qrexec.h`, `daemon/qrexec-daemon.c` (`handle_agent_hello`).
//! This module must never accept a version below the caller's minimum.

use super::{Error, MAX_DATA_CHUNK_V2, MAX_DATA_CHUNK_V3};

/// Protocol version 2 (separate control and data channels).
pub const QREXEC_PROTOCOL_V2: u32 = 2;
/// Protocol version 3 (64 KiB data chunks, `MSG_TRIGGER_SERVICE3`).
pub const QREXEC_PROTOCOL_V3: u32 = 3;
/// Protocol version 4 (`MSG_TRIGGER_SERVICE4` with a requested source).
pub const QREXEC_PROTOCOL_V4: u32 = 4;

/// The version both sides use: the lower of the two, provided it is at least
/// `minimum`.
pub fn negotiate(local: u32, remote: u32, minimum: u32) -> Result<u32, Error> {
    let version = local.min(remote);
    if version < minimum {
        return Err(Error::IncompatibleVersion { remote, minimum });
    }
    Ok(version)
}

/// The largest data chunk allowed in `version`.
pub fn max_data_chunk(version: u32) -> usize {
    if version >= QREXEC_PROTOCOL_V3 {
        MAX_DATA_CHUNK_V3
    } else {
        MAX_DATA_CHUNK_V2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_version_wins() {
        assert_eq!(negotiate(4, 3, 2), Ok(3));
        assert_eq!(negotiate(3, 4, 2), Ok(3));
        assert_eq!(negotiate(3, 2, 2), Ok(2));
        assert_eq!(negotiate(4, 99, 3), Ok(4));
    }

    #[test]
    fn below_minimum_is_refused() {
        assert_eq!(
            negotiate(3, 1, 2),
            Err(Error::IncompatibleVersion {
                remote: 1,
                minimum: 2
            })
        );
        assert_eq!(
            negotiate(3, 2, 3),
            Err(Error::IncompatibleVersion {
                remote: 2,
                minimum: 3
            })
        );
        assert!(negotiate(3, 0, 2).is_err());
    }

    #[test]
    fn chunk_limits() {
        assert_eq!(max_data_chunk(2), 4096);
        assert_eq!(max_data_chunk(3), 65536);
        assert_eq!(max_data_chunk(4), 65536);
    }
}
