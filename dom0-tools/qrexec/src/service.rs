//! Service lookup as Qubes 4.4's agent does it, beyond plain executables:
//! UNIX-socket services, `/dev/tcp` forwarding links, and the per-service
//! configuration in `/etc/qubes/rpc-config/` (`QUBES_RPC_CONFIG_PATH`).
//!
//! Lookup (for both services and configs): every directory of the path is
//! tried for the descriptor `NAME+ARG` (`NAME+` when there is no argument)
//! before any directory is tried for the bare `NAME`. A name that is absent
//! (`ENOENT`) moves on; any other failure — a link into a non-directory, a
//! permission error — is an error that refuses the call (exit 125), never a
//! silent fall-back to the general service. A symbolic link whose target is
//! `/dev/tcp` or starts with `/dev/tcp/` is not followed: it names a TCP
//! destination, `/dev/tcp/HOST/PORT`, `/dev/tcp/HOST` (port from the
//! argument) or `/dev/tcp` (host and port from the argument, `HOST+PORT`,
//! with `+` for `:` in IPv6 addresses).
//!
//! The config format is the small TOML subset Qubes accepts: one
//! `key = value` per line, `#` comments, booleans, small integers (for
//! `wait-for-session`) and quoted strings; keys `wait-for-session`,
//! `skip-service-descriptor`, `exit-on-client-eof`, `exit-on-service-eof`,
//! `force-user`. Anything else malformed (a section header, a duplicate key,
//! a bad value) makes the config invalid and the call is refused with 125;
//! unknown keys are logged and ignored. `force-user` cannot be combined with
//! the other three options.
#![deny(clippy::indexing_slicing)]

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Default config directory (`QUBES_RPC_CONFIG_PATH`).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/qubes/rpc-config";

/// What a name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A UNIX socket to connect to.
    Socket(PathBuf),
    /// A `/dev/tcp…` link: its target.
    Tcp(String),
    /// Anything else (a file to run).
    File(PathBuf),
}

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// Absent everywhere.
    NotFound,
    /// Present but unusable (exit 125).
    Broken(String),
}

fn usable_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255
}

/// Look `name` up in `dirs` (one name; see [`find`] for the order).
pub fn find_file(dirs: &[PathBuf], name: &str) -> Result<Found, LookupError> {
    if !usable_name(name) {
        return Err(LookupError::NotFound);
    }
    for dir in dirs {
        let path = dir.join(name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(LookupError::Broken(format!("{}: {e}", path.display()))),
        };
        let meta = if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)
                .map_err(|e| LookupError::Broken(format!("readlink {}: {e}", path.display())))?;
            let text = target.to_string_lossy();
            if text == "/dev/tcp" || text.starts_with("/dev/tcp/") {
                if text == "/dev/tcp/" {
                    return Err(LookupError::Broken(format!(
                        "{}: /dev/tcp/ not followed by host",
                        path.display()
                    )));
                }
                return Ok(Found::Tcp(text.into_owned()));
            }
            match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(LookupError::Broken(format!("{}: {e}", path.display()))),
            }
        } else {
            meta
        };
        return Ok(if meta.file_type().is_socket() {
            Found::Socket(path)
        } else {
            Found::File(path)
        });
    }
    Err(LookupError::NotFound)
}

/// Look up `descriptor` (`NAME+ARG`, or `NAME+`), then `name`.
pub fn find(dirs: &[PathBuf], descriptor: &str, name: &str) -> Result<Found, LookupError> {
    match find_file(dirs, descriptor) {
        Err(LookupError::NotFound) => find_file(dirs, name),
        other => other,
    }
}

/// A service's `rpc-config` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `wait-for-session`.
    pub wait_for_session: bool,
    /// `force-user`.
    pub force_user: Option<String>,
    /// Not `skip-service-descriptor`.
    pub send_descriptor: bool,
    /// `exit-on-service-eof`.
    pub exit_on_service_eof: bool,
    /// `exit-on-client-eof`.
    pub exit_on_client_eof: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            wait_for_session: false,
            force_user: None,
            send_descriptor: true,
            exit_on_service_eof: false,
            exit_on_client_eof: false,
        }
    }
}

/// The config directories (`QUBES_RPC_CONFIG_PATH`, `:`-separated).
pub fn config_path_from_env() -> Vec<PathBuf> {
    let text =
        std::env::var("QUBES_RPC_CONFIG_PATH").unwrap_or_else(|_| DEFAULT_CONFIG_PATH.to_string());
    text.split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Load the config of `descriptor`/`name`: the default when there is none,
/// an error message when it is invalid (the call is then refused).
pub fn load_config(dirs: &[PathBuf], descriptor: &str, name: &str) -> Result<Config, String> {
    let path = match find(dirs, descriptor, name) {
        Ok(Found::File(p) | Found::Socket(p)) => p,
        Ok(Found::Tcp(t)) => return Err(format!("config for {descriptor} is a link to {t}")),
        Err(LookupError::NotFound) => return Ok(Config::default()),
        Err(LookupError::Broken(e)) => return Err(format!("cannot load service config: {e}")),
    };
    let text =
        std::fs::read(&path).map_err(|e| format!("Failed to load {}: {e}", path.display()))?;
    let config = parse_config(&text).map_err(|e| format!("{}:{e}", path.display()))?;
    if config.force_user.is_some()
        && (!config.send_descriptor || config.exit_on_client_eof || config.exit_on_service_eof)
    {
        return Err(format!(
            "service {descriptor}: force-user cannot be combined with \
             skip-service-descriptor, exit-on-client-eof or exit-on-service-eof"
        ));
    }
    Ok(config)
}

enum Value {
    Bool(bool),
    Int(u64),
    Str(String),
}

fn parse_value(text: &str) -> Result<Value, String> {
    let (value, rest) = if let Some(body) = text.strip_prefix('\'') {
        let end = body.find('\'').ok_or("unterminated string")?;
        (
            Value::Str(body.get(..end).unwrap_or("").to_string()),
            body.get(end + 1..).unwrap_or(""),
        )
    } else if let Some(body) = text.strip_prefix('"') {
        let end = body.find('"').ok_or("unterminated string")?;
        let s = body.get(..end).unwrap_or("");
        if s.contains('\\') {
            return Err("escapes in strings are not supported".into());
        }
        (Value::Str(s.to_string()), body.get(end + 1..).unwrap_or(""))
    } else {
        let end = text.find(['#', ' ', '\t']).unwrap_or(text.len());
        let word = text.get(..end).unwrap_or("");
        let rest = text.get(end..).unwrap_or("");
        let value = match word {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            "0" => Value::Int(0),
            w if !w.is_empty() && !w.starts_with('0') && w.bytes().all(|b| b.is_ascii_digit()) => {
                Value::Int(w.parse().map_err(|_| format!("integer {w} too large"))?)
            }
            w => return Err(format!("invalid value '{w}'")),
        };
        (value, rest)
    };
    let rest = rest.trim_start_matches([' ', '\t']);
    if !rest.is_empty() && !rest.starts_with('#') {
        return Err(format!("junk after value: '{rest}'"));
    }
    Ok(value)
}

/// Parse an rpc-config file.
pub fn parse_config(text: &[u8]) -> Result<Config, String> {
    if text.contains(&0) {
        return Err("NUL byte in config".into());
    }
    let text = std::str::from_utf8(text).map_err(|_| "config is not UTF-8".to_string())?;
    let mut config = Config::default();
    let mut seen: Vec<String> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let lineno = index + 1;
        let line = line.trim_end_matches(['\r', ' ', '\t']);
        match line.bytes().next() {
            None | Some(b'#') => continue,
            Some(b) if b.is_ascii_alphabetic() => {}
            Some(b'[') => return Err(format!("{lineno}: TOML section headers not supported")),
            Some(b' ' | b'\t') => {
                return Err(format!("{lineno}: Unexpected whitespace at start of line"));
            }
            Some(b) => return Err(format!("{lineno}: Invalid byte 0x{b:x} at start of key")),
        }
        let key_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(line.len());
        let key = line.get(..key_end).unwrap_or("");
        let rest = line
            .get(key_end..)
            .unwrap_or("")
            .trim_start_matches([' ', '\t']);
        let Some(rest) = rest.strip_prefix('=') else {
            return Err(format!("{lineno}: Missing '=' after key"));
        };
        let value = parse_value(rest.trim_start_matches([' ', '\t']))
            .map_err(|e| format!("{lineno}: {e}"))?;
        let known = matches!(
            key,
            "wait-for-session"
                | "exit-on-client-eof"
                | "exit-on-service-eof"
                | "skip-service-descriptor"
                | "force-user"
        );
        if known {
            if seen.iter().any(|k| k == key) {
                return Err(format!("{lineno}: Key {key} already seen"));
            }
            seen.push(key.to_string());
        }
        let boolean = |v: &Value| match v {
            Value::Bool(b) => Ok(*b),
            _ => Err(format!("{lineno}: {key} must be a boolean")),
        };
        match key {
            "wait-for-session" => {
                config.wait_for_session = match value {
                    Value::Int(0) => false,
                    Value::Int(1) => true,
                    Value::Int(n) => {
                        return Err(format!(
                            "{lineno}: Unsupported integer value {n} for boolean"
                        ));
                    }
                    v => boolean(&v)?,
                }
            }
            "exit-on-client-eof" => config.exit_on_client_eof = boolean(&value)?,
            "exit-on-service-eof" => config.exit_on_service_eof = boolean(&value)?,
            "skip-service-descriptor" => config.send_descriptor = !boolean(&value)?,
            "force-user" => match value {
                Value::Str(s) => config.force_user = Some(s),
                _ => return Err(format!("{lineno}: force-user must be a string")),
            },
            other => crate::log_error!("{lineno}: Unsupported key {other}"),
        }
    }
    Ok(config)
}

fn valid_port(port: &str) -> bool {
    port.bytes()
        .next()
        .is_some_and(|b| (b'1'..=b'9').contains(&b))
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok()
}

/// Host and port of a `/dev/tcp…` service called with `argument`.
pub fn tcp_destination(target: &str, argument: Option<&str>) -> Result<(String, String), String> {
    let address = target.strip_prefix("/dev/tcp").unwrap_or("");
    let (host, port) = match address.strip_prefix('/') {
        Some(rest) => match rest.split_once('/') {
            Some((h, p)) => (Some(h.to_string()), Some(p.to_string())),
            None => (Some(rest.to_string()), None),
        },
        None => (None, None),
    };
    let argument = argument.filter(|a| !a.is_empty());
    match (host, port) {
        (Some(h), Some(p)) => match argument {
            Some(a) => Err(format!("Unexpected argument {a} to service {target}")),
            None => Ok((h, p)),
        },
        (Some(h), None) => match argument {
            Some(a) => Ok((h, a.to_string())),
            None => Err(format!(
                "No or empty argument provided, cannot connect to {target}"
            )),
        },
        (None, _) => {
            let a = argument.ok_or_else(|| {
                format!("No or empty argument provided, cannot connect to {target}")
            })?;
            let (h, p) = a
                .rsplit_once('+')
                .ok_or_else(|| format!("No port provided, cannot connect to {a}"))?;
            if h.contains('_') {
                return Err(format!("Underscore not allowed in hostname {h}"));
            }
            Ok((h.replace('+', ":"), p.to_string()))
        }
    }
}

/// Connect to a numeric host and port as Qubes' agent does (no name
/// resolution).
pub fn tcp_connect(host: &str, port: &str) -> Result<TcpStream, String> {
    if !valid_port(port) {
        return Err(format!("Invalid port number {port}"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("Invalid port number {port}"))?;
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("invalid numeric host address {host}"))?;
    TcpStream::connect(SocketAddr::new(ip, port))
        .map_err(|e| format!("connect to {host}:{port}: {e}"))
}

/// `path` for messages.
pub fn show(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs() {
        let c = parse_config(b"# c\nforce-user = 'u'\nwait-for-session = 1 # x\n").unwrap();
        assert!(c.wait_for_session);
        assert_eq!(c.force_user.as_deref(), Some("u"));
        let c =
            parse_config(b"skip-service-descriptor = true\nexit-on-client-eof = true\n").unwrap();
        assert!(!c.send_descriptor && c.exit_on_client_eof && !c.exit_on_service_eof);
        for bad in [
            &b"wait-for-session = 00\n"[..],
            b"wait-for-session = 01\n",
            b"wait-for-session = \n",
            b"wait-for-session = \"a\"\n",
            b"wait-for-session\n",
            b"[section]\n",
            b" a = 1\n",
            b"wait-for-session = 2\n",
            b"exit-on-client-eof = true\nexit-on-client-eof = true\n",
        ] {
            assert!(
                parse_config(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse_config(b"other-key = 3\n").unwrap(), Config::default());
    }

    #[test]
    fn tcp_destinations() {
        let d = |t: &str, a: Option<&str>| tcp_destination(t, a);
        assert_eq!(
            d("/dev/tcp/1.2.3.4/80", None).unwrap(),
            ("1.2.3.4".into(), "80".into())
        );
        assert!(d("/dev/tcp/1.2.3.4/80", Some("x")).is_err());
        assert_eq!(
            d("/dev/tcp/1.2.3.4", Some("81")).unwrap(),
            ("1.2.3.4".into(), "81".into())
        );
        assert!(d("/dev/tcp/1.2.3.4", None).is_err());
        assert_eq!(
            d("/dev/tcp", Some("++1+22")).unwrap(),
            ("::1".into(), "22".into())
        );
        assert_eq!(
            d("/dev/tcp", Some("127.0.0.1+22")).unwrap(),
            ("127.0.0.1".into(), "22".into())
        );
        assert!(d("/dev/tcp", Some("127.0.0.1")).is_err());
        assert!(d("/dev/tcp", Some("a_b+1")).is_err());
        assert!(
            !valid_port("0") && !valid_port("65536") && !valid_port("08") && valid_port("65535")
        );
    }

    #[test]
    fn lookup_prefers_the_specific_name_and_refuses_broken_links() {
        let dir = std::env::temp_dir().join(format!("qrexec-service-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("svc"), "x").unwrap();
        std::fs::write(b.join("svc+arg"), "x").unwrap();
        let dirs = vec![a.clone(), b.clone()];
        assert_eq!(
            find(&dirs, "svc+arg", "svc"),
            Ok(Found::File(b.join("svc+arg")))
        );
        assert_eq!(find(&dirs, "svc+", "svc"), Ok(Found::File(a.join("svc"))));
        std::os::unix::fs::symlink("/dev/null/invalid", a.join("svc+arg")).unwrap();
        assert!(matches!(
            find(&dirs, "svc+arg", "svc"),
            Err(LookupError::Broken(_))
        ));
        std::os::unix::fs::symlink("/dev/tcp/127.0.0.1", a.join("t")).unwrap();
        assert_eq!(
            find(&dirs, "t+1", "t"),
            Ok(Found::Tcp("/dev/tcp/127.0.0.1".into()))
        );
        assert_eq!(find(&dirs, "none+", "none"), Err(LookupError::NotFound));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
