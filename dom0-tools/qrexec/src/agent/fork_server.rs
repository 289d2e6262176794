//! `qrexec-fork-server`: runs calls for one user from inside that user's
//! session, so the agent need not open a PAM session per call; and the
//! agent's side of handing a call to it. Compatible with Qubes' both ways
//! (qubes-core-qrexec `agent/qrexec-fork-server.c`, `try_fork_server` in
//! `agent/qrexec-agent.c`).
//!
//! The fork server listens on `/var/run/qubes/qrexec-server.USER.sock` (or
//! the path given as its only argument). For each call the agent connects
//! and writes, in native byte order, `type`, `connect_domain`,
//! `connect_port` (`i32` each: `MSG_EXEC_CMDLINE` or `MSG_JUST_EXEC` and
//! the data vchan's peer and port) and `cmdline_len` (`u32`), then the
//! command — the daemon's command line after `USER:` — with a closing NUL
//! counted in `cmdline_len`. The fork server connects the data vchan and
//! runs the call as itself, keeping the connection open until the call is
//! over; the agent reports `MSG_CONNECTION_TERMINATED` when it closes.
//! Nothing comes back on the connection.
//!
//! A command line that is empty, longer than `MAX_QREXEC_CMD_LEN`, not
//! NUL-terminated or with a NUL inside is refused (the connection is
//! closed). The agent hands over, as Qubes' does, only calls without
//! `nogui:` whose service (if any) sends its descriptor and does not ask
//! for `exit-on-*-eof`; ours also keeps `wait-for-session` and `force-user`
//! services for itself. When the socket is missing or refuses, the agent
//! runs the call itself. Unlike Qubes' it does not fork into the
//! background: start it with `&` or from a unit.

#![deny(clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use protocol::qrexec::cmdline::{self, split_user};
use protocol::qrexec::{ConnectParams, MAX_QREXEC_CMD_LEN, MsgType};

use crate::log::escape;
use crate::log_error;

/// Qubes' default fork server socket (`QREXEC_FORK_SERVER_SOCKET`): `%s` is
/// the user.
pub const QREXEC_FORK_SERVER_SOCKET: &str = "/var/run/qubes/qrexec-server.%s.sock";

/// Size of `struct qrexec_cmd_info` without the command.
pub const CMD_INFO_LEN: usize = 16;

/// How long the agent may take to send a call.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Encode the header the agent sends.
pub fn encode_info(connect: ConnectParams, just_exec: bool, cmdline_len: u32) -> [u8; 16] {
    let kind = if just_exec {
        MsgType::MSG_JUST_EXEC
    } else {
        MsgType::MSG_EXEC_CMDLINE
    };
    let words = [
        kind,
        connect.connect_domain,
        connect.connect_port,
        cmdline_len,
    ];
    let mut out = [0u8; CMD_INFO_LEN];
    for (chunk, word) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// A call as the fork server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// `MSG_JUST_EXEC` (else `MSG_EXEC_CMDLINE`).
    pub just_exec: bool,
    /// The data vchan.
    pub connect: ConnectParams,
    /// The command length including its NUL.
    pub cmdline_len: u32,
}

/// Decode the header; `None` for an unknown type or a length the fork
/// server refuses (0 or over `MAX_QREXEC_CMD_LEN`).
pub fn decode_info(bytes: &[u8; CMD_INFO_LEN]) -> Option<Call> {
    let word = |i: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(bytes.get(i..i + 4)?);
        Some(u32::from_ne_bytes(w))
    };
    let just_exec = match word(0)? {
        MsgType::MSG_JUST_EXEC => true,
        MsgType::MSG_EXEC_CMDLINE => false,
        _ => return None,
    };
    let cmdline_len = word(12)?;
    if cmdline_len == 0 || cmdline_len as usize > MAX_QREXEC_CMD_LEN {
        return None;
    }
    Some(Call {
        just_exec,
        connect: ConnectParams {
            connect_domain: word(4)?,
            connect_port: word(8)?,
        },
        cmdline_len,
    })
}

/// Whether the agent may hand `command` (after `USER:`) to a fork server.
pub fn may_hand_over(command: &[u8]) -> bool {
    match cmdline::parse_command(command) {
        Ok(cmdline::Command::Shell { nogui, .. }) => !nogui,
        Ok(cmdline::Command::Rpc(rpc)) => {
            if rpc.nogui {
                return false;
            }
            let Ok(full) = std::str::from_utf8(rpc.service) else {
                return false;
            };
            let Ok(descriptor) = protocol::qrexec::names::split_service_descriptor(rpc.service)
            else {
                return false;
            };
            let name = std::str::from_utf8(descriptor.name).unwrap_or("");
            let lookup = if full.contains('+') {
                full.to_string()
            } else {
                format!("{full}+")
            };
            match crate::service::load_config(
                &crate::service::config_path_from_env(),
                &lookup,
                name,
            ) {
                Ok(c) => {
                    c.send_descriptor
                        && !c.exit_on_client_eof
                        && !c.exit_on_service_eof
                        && !c.wait_for_session
                        && c.force_user.is_none()
                }
                Err(_) => false,
            }
        }
        Err(_) => false,
    }
}

/// The agent's side: hand the call (`USER:command`) to `USER`'s fork server
/// (socket `pattern` with `%s` replaced by the user). `None` when the call
/// is not one to hand over or no fork server takes it: run it yourself.
pub fn try_hand_over(
    pattern: &str,
    connect: ConnectParams,
    cmdline: &[u8],
    just_exec: bool,
) -> Option<UnixStream> {
    let uc = split_user(cmdline).ok()?;
    let user = std::str::from_utf8(uc.user).ok()?;
    if user.is_empty() || user.contains('/') || !may_hand_over(uc.command) {
        return None;
    }
    let path = pattern.replacen("%s", user, 1);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            if !matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) {
                log_error!("connect to fork server {path}: {e}");
            }
            return None;
        }
    };
    let mut message = Vec::with_capacity(CMD_INFO_LEN + uc.command.len() + 1);
    let len = u32::try_from(uc.command.len() + 1).ok()?;
    message.extend_from_slice(&encode_info(connect, just_exec, len));
    message.extend_from_slice(uc.command);
    message.push(0);
    match stream.write_all(&message) {
        Ok(()) => Some(stream),
        Err(e) => {
            log_error!("write to fork server {path}: {e}");
            None
        }
    }
}

/// Read one call from the agent: its header and command (without the NUL).
fn read_call(stream: &mut UnixStream) -> Result<(Call, Vec<u8>), String> {
    let mut info = [0u8; CMD_INFO_LEN];
    stream
        .read_exact(&mut info)
        .map_err(|e| format!("reading the call header: {e}"))?;
    let call = decode_info(&info).ok_or("bad call header (type or command length)")?;
    let mut command = vec![0u8; call.cmdline_len as usize];
    stream
        .read_exact(&mut command)
        .map_err(|e| format!("reading the command: {e}"))?;
    if command.pop() != Some(0) {
        return Err("Command line not NUL terminated, refusing!".into());
    }
    if command.contains(&0) {
        return Err("Command line has a NUL byte, refusing!".into());
    }
    if command.is_empty() {
        return Err("Command line is empty, refusing!".into());
    }
    Ok((call, command))
}

fn serve_one(
    mut stream: UnixStream,
    transport: &dyn crate::vchan::Transport,
    service_path: &[std::path::PathBuf],
    user: &str,
) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let (call, command) = match read_call(&mut stream) {
        Ok(c) => c,
        Err(e) => {
            log_error!("{e}");
            return;
        }
    };
    // Run as ourselves: the user field is only for the log tag.
    let mut cmdline = user.as_bytes().to_vec();
    cmdline.push(b':');
    cmdline.extend_from_slice(&command);
    super::run_call(
        transport,
        service_path,
        call.connect,
        &cmdline,
        None,
        call.just_exec,
    );
    // Closing the connection tells the agent the call is over.
    drop(stream);
}

/// `qrexec-fork-server [SOCKET_PATH]` main: returns the exit code.
pub fn main(argv: Vec<String>) -> i32 {
    crate::log::init("qrexec-fork-server");
    let user = std::env::var("USER").unwrap_or_default();
    let path = match argv.get(1..).unwrap_or(&[]) {
        [] => {
            if user.is_empty() || user.contains('/') {
                log_error!("USER is not set: give the socket path");
                return 1;
            }
            QREXEC_FORK_SERVER_SOCKET.replacen("%s", &user, 1)
        }
        [path] => path.clone(),
        _ => {
            eprintln!("Usage: qrexec-fork-server [socket path]");
            return 1;
        }
    };
    let transport: std::sync::Arc<dyn crate::vchan::Transport> = match crate::vchan::from_env() {
        Ok(t) => std::sync::Arc::from(t),
        Err(e) => {
            log_error!("{e}");
            return 1;
        }
    };
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            log_error!("cannot listen on {}: {e}", escape(path.as_bytes()));
            return 1;
        }
    };
    let service_path = std::sync::Arc::new(crate::exec::service_path_from_env());
    let user = std::sync::Arc::new(user);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let transport = std::sync::Arc::clone(&transport);
        let service_path = std::sync::Arc::clone(&service_path);
        let user = std::sync::Arc::clone(&user);
        std::thread::spawn(move || serve_one(stream, &*transport, &service_path, &user));
    }
    let _ = std::fs::remove_file(&path);
    0
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_refusals() {
        let connect = ConnectParams {
            connect_domain: 5,
            connect_port: 513,
        };
        let bytes = encode_info(connect, false, 12);
        assert_eq!(
            decode_info(&bytes),
            Some(Call {
                just_exec: false,
                connect,
                cmdline_len: 12
            })
        );
        assert!(
            decode_info(&encode_info(connect, true, 1))
                .unwrap()
                .just_exec
        );
        assert_eq!(decode_info(&encode_info(connect, false, 0)), None);
        assert_eq!(decode_info(&encode_info(connect, false, 65536)), None);
        let mut bad = bytes;
        bad[0] = 0x77;
        assert_eq!(decode_info(&bad), None);
    }

    #[test]
    fn commands_checked() {
        let send = |payload: &[u8], len: u32| {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let connect = ConnectParams {
                connect_domain: 0,
                connect_port: 600,
            };
            a.write_all(&encode_info(connect, false, len)).unwrap();
            a.write_all(payload).unwrap();
            drop(a);
            read_call(&mut b).map(|(_, c)| c)
        };
        assert_eq!(send(b"echo hi\0", 8).unwrap(), b"echo hi");
        assert!(send(b"echo hi!", 8).is_err());
        assert!(send(b"ec\0o hi\0", 8).is_err());
        assert!(send(b"\0", 1).is_err());
        assert!(send(b"echo", 8).is_err());
    }

    #[test]
    fn hand_over_rules() {
        assert!(may_hand_over(b"echo hi"));
        assert!(!may_hand_over(b"nogui:echo hi"));
        assert!(!may_hand_over(b"nogui:QUBESRPC test.Add dom0"));
    }
}
