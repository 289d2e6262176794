//! A client of qubesd, dom0's management daemon, for the calls the qrexec
//! tools and the policy make: `internal.GetSystemInfo` (the qube list the
//! policy needs), `admin.vm.CreateDisposable`, `admin.vm.Start` and
//! `admin.vm.Kill` (disposable targets, `autostart=True`, `qrexec-client
//! -k`).
//!
//! Wire format, as Qubes 4.4's qubesd parses it (qubes-core-admin
//! `qubes/api/__init__.py`) and as qubes-core-qrexec's C `qubesd_call2` and
//! Python `qubesd_call` write it: one connection per call; the request is
//! `METHOD+ARG SOURCE DEST_TYPE DEST\0PAYLOAD` with source `dom0` and
//! dest type `name` (or `keyword` for a `@KEYWORD` destination, the `@`
//! dropped), then the writing side is shut down. The reply, read to the end,
//! is `0\0PAYLOAD` on success or `2\0EXC_TYPE\0TRACEBACK\0MESSAGE\0` when
//! qubesd raised an exception (the traceback is empty unless qubesd runs in
//! debug mode). Anything else is a protocol error.
//!
//! Sockets: `admin.*` calls go to `/var/run/qubesd.sock`, `internal.*` calls
//! to `/var/run/qubesd.internal.sock` (Qubes' Python `qubesd_call` does the
//! same; qubesd serves both). For tests and the box, the environment
//! variables `QUBESD_SOCKET` and `QUBESD_INTERNAL_SOCKET` (ours: Qubes has
//! none) replace them.
//!
//! Every reply byte is treated as untrusted: bounded in size, parsed with
//! checked slicing, never a panic; a name qubesd returns is checked before it
//! becomes part of a socket path.
#![deny(clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// qubesd's admin socket.
pub const DEFAULT_SOCKET: &str = "/var/run/qubesd.sock";
/// qubesd's internal socket (for `internal.*` methods).
pub const DEFAULT_INTERNAL_SOCKET: &str = "/var/run/qubesd.internal.sock";
/// Environment variable naming the admin socket (ours, for tests and boxes).
pub const SOCKET_ENV: &str = "QUBESD_SOCKET";
/// Environment variable naming the internal socket (ours).
pub const INTERNAL_SOCKET_ENV: &str = "QUBESD_INTERNAL_SOCKET";
/// Largest reply accepted (a system info of thousands of qubes fits).
pub const MAX_REPLY: usize = 16 << 20;

/// `admin.vm.CreateDisposable`.
pub const CREATE_DISPOSABLE: &str = "admin.vm.CreateDisposable";
/// `admin.vm.Start`.
pub const START: &str = "admin.vm.Start";
/// `admin.vm.Kill`.
pub const KILL: &str = "admin.vm.Kill";
/// `internal.GetSystemInfo`.
pub const GET_SYSTEM_INFO: &str = "internal.GetSystemInfo";
/// The exception `admin.vm.Start` raises for a qube that already runs.
pub const NOT_HALTED: &str = "QubesVMNotHaltedError";

/// Why a qubesd call failed.
#[derive(Debug, thiserror::Error)]
pub enum QubesdError {
    /// The request itself cannot be framed (a space or NUL in a field).
    #[error("cannot call {method} on {dest:?}: {why}")]
    BadRequest {
        /// The method.
        method: String,
        /// The destination.
        dest: String,
        /// What is wrong.
        why: &'static str,
    },
    /// qubesd's socket could not be reached.
    #[error(
        "cannot connect to qubesd at {} for {method}: {source} (is qubesd running? {env} names another socket)",
        .socket.display()
    )]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The method.
        method: String,
        /// The environment variable that overrides the socket.
        env: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Sending the request or reading the reply failed.
    #[error("qubesd call {method} on {dest}: {what}: {source}")]
    Io {
        /// The method.
        method: String,
        /// The destination.
        dest: String,
        /// What we were doing.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// qubesd raised an exception.
    #[error("qubesd refused {method} on {dest}: {exc_type}: {message}")]
    Exception {
        /// The method.
        method: String,
        /// The destination.
        dest: String,
        /// Exception class name (`QubesVMNotFoundError`, …).
        exc_type: String,
        /// The exception's message.
        message: String,
    },
    /// The reply is not a qubesd reply.
    #[error("invalid qubesd response to {method} on {dest}: {what}")]
    Protocol {
        /// The method.
        method: String,
        /// The destination.
        dest: String,
        /// What is wrong with it.
        what: String,
    },
}

impl QubesdError {
    /// The exception class, if qubesd raised one.
    pub fn exception_type(&self) -> Option<&str> {
        match self {
            QubesdError::Exception { exc_type, .. } => Some(exc_type),
            _ => None,
        }
    }
}

/// Where qubesd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qubesd {
    /// Socket for `admin.*` (and every non-`internal.` method).
    pub socket: PathBuf,
    /// Socket for `internal.*`.
    pub internal_socket: PathBuf,
    /// Read/write timeout per call (`None`: wait as long as qubesd takes,
    /// as Qubes' tools do; starting a qube can take a while).
    pub timeout: Option<Duration>,
}

impl Default for Qubesd {
    fn default() -> Self {
        Qubesd {
            socket: PathBuf::from(DEFAULT_SOCKET),
            internal_socket: PathBuf::from(DEFAULT_INTERNAL_SOCKET),
            timeout: None,
        }
    }
}

/// Whether `s` can stand in the request header (no framing bytes, not
/// empty, bounded).
fn frameable(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s
            .bytes()
            .any(|b| b == 0 || b == b' ' || b.is_ascii_control())
}

/// The request bytes for one call (source `dom0`).
pub fn encode_request(
    dest: &str,
    method: &str,
    arg: &str,
    payload: &[u8],
) -> Result<Vec<u8>, QubesdError> {
    let bad = |why| QubesdError::BadRequest {
        method: method.to_string(),
        dest: dest.to_string(),
        why,
    };
    if !frameable(method) || method.contains('+') {
        return Err(bad("invalid method name"));
    }
    if !arg.is_empty() && !frameable(arg) {
        return Err(bad("invalid argument"));
    }
    let (dest_type, dest_value) = match dest.strip_prefix('@') {
        Some(keyword) => ("keyword", keyword),
        None => ("name", dest),
    };
    if !frameable(dest_value) {
        return Err(bad("invalid destination"));
    }
    let mut out = format!("{method}+{arg} dom0 {dest_type} {dest_value}\0").into_bytes();
    out.extend_from_slice(payload);
    Ok(out)
}

/// Parse a complete reply: the payload on success.
pub fn parse_reply(method: &str, dest: &str, reply: &[u8]) -> Result<Vec<u8>, QubesdError> {
    let protocol = |what: String| QubesdError::Protocol {
        method: method.to_string(),
        dest: dest.to_string(),
        what,
    };
    if let Some(payload) = reply.strip_prefix(b"0\0") {
        return Ok(payload.to_vec());
    }
    if let Some(rest) = reply.strip_prefix(b"2\0") {
        // EXC_TYPE \0 TRACEBACK \0 MESSAGE \0
        let mut parts = rest.splitn(4, |&b| b == 0);
        let exc_type = parts.next().unwrap_or_default();
        let _traceback = parts.next();
        let message = parts.next();
        let tail = parts.next();
        let (Some(message), Some(tail)) = (message, tail) else {
            return Err(protocol(format!(
                "truncated exception ({} bytes)",
                reply.len()
            )));
        };
        if !tail.is_empty() {
            return Err(protocol("data after the exception".into()));
        }
        let exc_type = String::from_utf8_lossy(exc_type);
        if exc_type.is_empty()
            || !exc_type
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(protocol("invalid exception type".into()));
        }
        return Err(QubesdError::Exception {
            method: method.to_string(),
            dest: dest.to_string(),
            exc_type: exc_type.into_owned(),
            message: printable(&String::from_utf8_lossy(message)),
        });
    }
    if reply.is_empty() {
        return Err(protocol(
            "empty reply (qubesd closed the connection: unknown method or framing error?)".into(),
        ));
    }
    let start = reply.get(..16).unwrap_or(reply);
    Err(protocol(format!(
        "reply starts with {:?}, expected \"0\\0\" or \"2\\0\"",
        start.escape_ascii().to_string()
    )))
}

/// `s` with control characters escaped (qubesd's text goes to logs).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Whether `s` is a qube name as Qubes allows them (`[A-Za-z][A-Za-z0-9_.-]*`,
/// at most 31 bytes) — safe as part of a socket path.
pub fn is_qube_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    s.len() <= 31
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `s` is `uuid:` and a canonical lower- or upper-case UUID.
pub fn is_uuid_target(s: &str) -> bool {
    let Some(uuid) = s.strip_prefix("uuid:") else {
        return false;
    };
    uuid.len() == 36
        && uuid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

impl Qubesd {
    /// Sockets from `QUBESD_SOCKET` / `QUBESD_INTERNAL_SOCKET`, else Qubes'
    /// paths.
    pub fn from_env() -> Self {
        let env = |name: &str, default: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Qubesd {
            socket: env(SOCKET_ENV, DEFAULT_SOCKET),
            internal_socket: env(INTERNAL_SOCKET_ENV, DEFAULT_INTERNAL_SOCKET),
            timeout: None,
        }
    }

    /// One socket for every method (tests).
    pub fn at(socket: impl Into<PathBuf>) -> Self {
        let socket = socket.into();
        Qubesd {
            internal_socket: socket.clone(),
            socket,
            timeout: None,
        }
    }

    /// The socket `method` goes to, and the variable that overrides it.
    pub fn socket_for(&self, method: &str) -> (&Path, &'static str) {
        if method.starts_with("internal.") {
            (&self.internal_socket, INTERNAL_SOCKET_ENV)
        } else {
            (&self.socket, SOCKET_ENV)
        }
    }

    /// Make one call; the reply payload on success.
    pub fn call(
        &self,
        dest: &str,
        method: &str,
        arg: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, QubesdError> {
        let request = encode_request(dest, method, arg, payload)?;
        let (socket, env) = self.socket_for(method);
        let mut stream = UnixStream::connect(socket).map_err(|source| QubesdError::Connect {
            socket: socket.to_owned(),
            method: method.to_string(),
            env,
            source,
        })?;
        let io = |what: &'static str| {
            move |source| QubesdError::Io {
                method: method.to_string(),
                dest: dest.to_string(),
                what,
                source,
            }
        };
        stream
            .set_read_timeout(self.timeout)
            .and_then(|()| stream.set_write_timeout(self.timeout))
            .map_err(io("setting the timeout"))?;
        stream
            .write_all(&request)
            .map_err(io("sending the request"))?;
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(io("ending the request"))?;
        let mut reply = Vec::new();
        (&mut stream)
            .take(MAX_REPLY as u64 + 1)
            .read_to_end(&mut reply)
            .map_err(io("reading the reply"))?;
        if reply.len() > MAX_REPLY {
            return Err(QubesdError::Protocol {
                method: method.to_string(),
                dest: dest.to_string(),
                what: format!("reply longer than {MAX_REPLY} bytes"),
            });
        }
        parse_reply(method, dest, &reply)
    }

    /// `internal.GetSystemInfo`: the JSON text of the qube list.
    pub fn get_system_info(&self) -> Result<Vec<u8>, QubesdError> {
        self.call("dom0", GET_SYSTEM_INFO, "", b"")
    }

    /// `admin.vm.CreateDisposable` on `template` (a name or `uuid:U`); with
    /// `want_uuid` qubesd answers `uuid:U` of the new disposable, else its
    /// name. The answer is checked to be one of those forms.
    pub fn create_disposable(
        &self,
        template: &str,
        want_uuid: bool,
    ) -> Result<String, QubesdError> {
        let payload: &[u8] = if want_uuid { b"uuid" } else { b"" };
        let reply = self.call(template, CREATE_DISPOSABLE, "", payload)?;
        let protocol = |what: String| QubesdError::Protocol {
            method: CREATE_DISPOSABLE.to_string(),
            dest: template.to_string(),
            what,
        };
        let text = std::str::from_utf8(&reply)
            .map_err(|_| protocol("the new disposable's name is not UTF-8".into()))?;
        let ok = if want_uuid {
            is_uuid_target(text)
        } else {
            is_qube_name(text)
        };
        if !ok {
            return Err(protocol(format!(
                "{:?} is not a {}",
                printable(text),
                if want_uuid {
                    "uuid:UUID target"
                } else {
                    "qube name"
                }
            )));
        }
        Ok(text.to_string())
    }

    /// `admin.vm.Start`; a qube that already runs (`QubesVMNotHaltedError`)
    /// is success, as in Qubes.
    pub fn start(&self, dest: &str) -> Result<(), QubesdError> {
        match self.call(dest, START, "", b"") {
            Ok(_) => Ok(()),
            Err(e) if e.exception_type() == Some(NOT_HALTED) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `admin.vm.Kill`.
    pub fn kill(&self, dest: &str) -> Result<(), QubesdError> {
        self.call(dest, KILL, "", b"").map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn request_framing_is_qubes_4_4() {
        assert_eq!(
            encode_request("dom0", GET_SYSTEM_INFO, "", b"").unwrap(),
            b"internal.GetSystemInfo+ dom0 name dom0\0"
        );
        assert_eq!(
            encode_request("uuid:x", CREATE_DISPOSABLE, "", b"uuid").unwrap(),
            b"admin.vm.CreateDisposable+ dom0 name uuid:x\0uuid"
        );
        assert_eq!(
            encode_request("@adminvm", "admin.vm.List", "a", b"").unwrap(),
            b"admin.vm.List+a dom0 keyword adminvm\0"
        );
        for (dest, method, arg) in [
            ("a b", START, ""),
            ("", START, ""),
            ("a\0", START, ""),
            ("@", START, ""),
            ("vm", "admin.vm+Start", ""),
            ("vm", START, "x y"),
            ("vm\n", START, ""),
        ] {
            assert!(
                encode_request(dest, method, arg, b"").is_err(),
                "{dest:?} {method:?} {arg:?}"
            );
        }
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply("m", "d", b"0\0").unwrap(), b"");
        assert_eq!(parse_reply("m", "d", b"0\0disp12").unwrap(), b"disp12");
        let e = parse_reply(
            "m",
            "d",
            b"2\0QubesVMNotFoundError\0\0No such domain: 'x'\0",
        )
        .unwrap_err();
        assert_eq!(e.exception_type(), Some("QubesVMNotFoundError"));
        assert!(e.to_string().contains("No such domain: 'x'"), "{e}");
        let e = parse_reply("m", "d", b"2\0QubesException\0Traceback...\nline\0msg\0").unwrap_err();
        assert_eq!(e.exception_type(), Some("QubesException"));
        for bad in [
            &b""[..],
            b"0",
            b"1\0x",
            b"2\0",
            b"2\0Exc\0\0msg",
            b"2\0Exc\0\0msg\0more",
            b"2\0\0\0msg\0",
            b"2\0Bad Type\0\0msg\0",
            b"garbage",
        ] {
            let e = parse_reply("m", "d", bad).unwrap_err();
            assert!(
                matches!(e, QubesdError::Protocol { .. }),
                "{:?}: {e}",
                bad.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn names_and_uuids() {
        assert!(is_qube_name("disp1234"));
        assert!(is_qube_name("a-b_c.d"));
        for bad in ["", "1abc", "../x", "a/b", "a b", "@dispvm", &"a".repeat(32)] {
            assert!(!is_qube_name(bad), "{bad:?}");
        }
        assert!(is_uuid_target("uuid:f5086f02-e322-4876-a670-14973aed21b5"));
        for bad in [
            "f5086f02-e322-4876-a670-14973aed21b5",
            "uuid:f5086f02-e322-4876-a670-14973aed21b",
            "uuid:f5086f02/e322-4876-a670-14973aed21b5",
            "uuid:../../../../../../../../../../../..",
        ] {
            assert!(!is_uuid_target(bad), "{bad:?}");
        }
    }

    /// A one-shot qubesd answering `reply`; returns what it received.
    fn serve_once(reply: &'static [u8]) -> (tempfile_dir::Dir, std::thread::JoinHandle<Vec<u8>>) {
        let dir = tempfile_dir::Dir::new();
        let listener = UnixListener::bind(dir.path().join("qubesd.sock")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            s.read_to_end(&mut request).unwrap();
            s.write_all(reply).unwrap();
            request
        });
        (dir, t)
    }

    mod tempfile_dir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "qubesd-unit-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn calls_over_a_socket() {
        let (dir, t) = serve_once(b"0\0uuid:f5086f02-e322-4876-a670-14973aed21b5");
        let q = Qubesd::at(dir.path().join("qubesd.sock"));
        assert_eq!(
            q.create_disposable("uuid:0b5a3c4e-0000-4000-8000-000000000001", true)
                .unwrap(),
            "uuid:f5086f02-e322-4876-a670-14973aed21b5"
        );
        assert_eq!(
            t.join().unwrap(),
            b"admin.vm.CreateDisposable+ dom0 name uuid:0b5a3c4e-0000-4000-8000-000000000001\0uuid"
        );

        // A hostile name in the answer is refused.
        let (dir, t) = serve_once(b"0\0../../etc");
        let q = Qubesd::at(dir.path().join("qubesd.sock"));
        assert!(matches!(
            q.create_disposable("dvm", false),
            Err(QubesdError::Protocol { .. })
        ));
        assert_eq!(
            t.join().unwrap(),
            b"admin.vm.CreateDisposable+ dom0 name dvm\0"
        );

        // Start of a running qube is fine; other exceptions are not.
        let (dir, t) = serve_once(b"2\0QubesVMNotHaltedError\0\0Domain is not powered off: 'vm'\0");
        let q = Qubesd::at(dir.path().join("qubesd.sock"));
        q.start("vm").unwrap();
        t.join().unwrap();
        let (dir, t) = serve_once(b"2\0QubesVMNotFoundError\0\0No such domain: 'vm'\0");
        let q = Qubesd::at(dir.path().join("qubesd.sock"));
        assert_eq!(
            q.start("vm").unwrap_err().exception_type(),
            Some("QubesVMNotFoundError")
        );
        t.join().unwrap();

        // internal.* goes to the internal socket.
        let (dir, t) = serve_once(b"0\0{\"domains\": {}}");
        let q = Qubesd {
            socket: PathBuf::from("/nonexistent/qubesd.sock"),
            internal_socket: dir.path().join("qubesd.sock"),
            timeout: None,
        };
        assert_eq!(q.get_system_info().unwrap(), b"{\"domains\": {}}");
        assert_eq!(
            t.join().unwrap(),
            b"internal.GetSystemInfo+ dom0 name dom0\0"
        );
        let e = q.kill("vm").unwrap_err();
        assert!(matches!(e, QubesdError::Connect { .. }));
        assert!(e.to_string().contains("QUBESD_SOCKET"), "{e}");
    }
}
