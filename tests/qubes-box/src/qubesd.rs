//! The box's qubesd: the few Admin and internal API calls dom0's qrexec
//! tools make, answered from the box's own state, on UNIX sockets in
//! qubesd's framing (qubes-core-admin `qubes/api/__init__.py`).
//!
//! `qubes-box qubesd --state-dir DIR --prefix P --bin-dir DIR` (started by
//! `qubes-box up` in dom0's namespace) listens on `<state>/qubesd.sock`
//! (Qubes: `/var/run/qubesd.sock`, the Admin API) and
//! `<state>/qubesd.internal.sock` (Qubes: `/var/run/qubesd.internal.sock`);
//! both answer every method below. The box gives their paths to the dom0
//! processes it starts in `QUBESD_SOCKET` and `QUBESD_INTERNAL_SOCKET`:
//! the policy daemon asks for the system info on every decision, the
//! qrexec daemons for disposables and autostart. Nothing else in the box
//! stands in for qubesd.
//!
//! A request is read to the end of the connection (the client shuts its
//! writing side down), at most 64 KiB as in qubesd:
//! `METHOD+ARG SOURCE DEST_TYPE DEST\0PAYLOAD` (Qubes 4.2+; `DEST_TYPE` is
//! `name`, or `keyword` with `adminvm` for dom0), or the older
//! `SOURCE\0METHOD\0DEST\0ARG\0PAYLOAD` (told apart by the absence of a
//! space before the first NUL). The answer is `0\0PAYLOAD` or
//! `2\0EXCEPTION-TYPE\0TRACEBACK\0MESSAGE\0` (the traceback is empty, as
//! qubesd sends it without `--debug`), then the end of the connection.
//!
//! A source or destination is a qube's name or `uuid:UUID` (as qubesd's
//! `decode_vm`). Methods:
//! - `internal.GetSystemInfo` (to dom0, no argument, no payload): the
//!   JSON qubesd returns, `{"domains": {NAME: {...}}}` with `type`, `tags`,
//!   `template_for_dispvms`, `default_dispvm`, `internal`, `icon`, `label`,
//!   `guivm`, `relayvm`, `transport_rpc`, `power_state` and `uuid` of every
//!   qube in the box's registry ([`Registry`]).
//! - `admin.vm.Start` (to a halted qube): the qube is started as a box
//!   client (`netbox::add_client`); the answer comes once its qrexec-daemon
//!   accepts connections (the agent is connected). A running qube gets
//!   `QubesVMNotHaltedError`.
//! - `admin.vm.CreateDisposable` (to a qube with `template_for_dispvms`, or
//!   to dom0 meaning the source's `default_dispvm`; argument empty, payload
//!   empty or `uuid`): registers a new halted `DispVM` named `dispNNNN`
//!   and answers its name (or `uuid:UUID`). As in Qubes, the caller starts
//!   it with `admin.vm.Start`.
//! - `admin.vm.Kill` (to a running qube): stops it (`netbox::remove_client`);
//!   a disposable is then removed from the registry, its home with it.
//!
//! Anything else gets Qubes' exception: `ProtocolError` for an unknown
//! method, an unexpected argument or payload or a malformed request,
//! `QubesVMNotFoundError` ("No such domain: 'NAME'") for an unknown source
//! or destination, `QubesVMNotHaltedError`/`QubesVMNotStartedError` for the
//! wrong power state, `QubesException` for what the box cannot do.
//! Requests are untrusted bytes: every length is bounded, names are
//! checked before they are used in a path, and one bad connection never
//! affects another. Calls that change the box run one at a time.

#![deny(clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netbox::{self, BoxConfig, ClientQube};

/// Most bytes of one request (qubesd's `buffer_size`).
pub const MAX_REQUEST: usize = 65536;
/// dom0's uuid in Qubes.
pub const DOM0_UUID: &str = "00000000-0000-0000-0000-000000000000";
/// The box's disposable template (every client's `default_dispvm`).
pub const DEFAULT_DVM: &str = "default-dvm";
/// How long `admin.vm.Start` waits for the qube's qrexec-daemon.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The admin socket of a box (`/var/run/qubesd.sock` in Qubes).
pub fn socket(config: &BoxConfig) -> PathBuf {
    config.state_dir.join("qubesd.sock")
}

/// The internal socket of a box (`/var/run/qubesd.internal.sock`).
pub fn internal_socket(config: &BoxConfig) -> PathBuf {
    config.state_dir.join("qubesd.internal.sock")
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The calling qube (`dom0` for dom0's tools).
    pub source: String,
    /// `admin.vm.Start`, …
    pub method: String,
    /// The argument (after `+`), possibly empty.
    pub arg: String,
    /// The destination qube's name (`dom0` for the admin VM keyword).
    pub dest: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A qubesd exception: its Python type name and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exception {
    /// `ProtocolError`, `QubesVMNotFoundError`, …
    pub kind: &'static str,
    /// The message (`str(exc)`).
    pub message: String,
}

fn exception(kind: &'static str, message: impl Into<String>) -> Exception {
    Exception {
        kind,
        message: message.into(),
    }
}

fn protocol_error(message: impl Into<String>) -> Exception {
    exception("ProtocolError", message)
}

fn not_found(name: &str) -> Exception {
    exception(
        "QubesVMNotFoundError",
        format!("No such domain: {}", py_repr(name)),
    )
}

/// Python's `repr` of a (checked, printable) name: `'name'`.
fn py_repr(name: &str) -> String {
    let escaped: String = name
        .chars()
        .flat_map(|c| match c {
            '\'' => vec!['\\', '\''],
            '\\' => vec!['\\', '\\'],
            c if c.is_ascii_graphic() || c == ' ' => vec![c],
            _ => vec!['?'],
        })
        .collect();
    format!("'{escaped}'")
}

/// Encodes a successful answer.
pub fn encode_ok(payload: &[u8]) -> Vec<u8> {
    let mut out = b"0\0".to_vec();
    out.extend_from_slice(payload);
    out
}

/// Encodes an exception answer (empty traceback).
pub fn encode_exception(exc: &Exception) -> Vec<u8> {
    let mut out = b"2\0".to_vec();
    out.extend_from_slice(exc.kind.as_bytes());
    out.push(0);
    out.push(0);
    out.extend_from_slice(exc.message.as_bytes());
    out.push(0);
    out
}

fn ascii_field(bytes: &[u8], what: &str) -> Result<String, Exception> {
    if bytes.len() > 256 || !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(protocol_error(format!(
            "malformed request: the {what} must be up to 256 printable ASCII characters"
        )));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Parses a request in either framing (see the module docs).
pub fn parse_request(bytes: &[u8]) -> Result<Request, Exception> {
    let Some(nul) = bytes.iter().position(|&b| b == 0) else {
        return Err(protocol_error(
            "malformed request: no NUL after the call header",
        ));
    };
    let (head, rest) = bytes.split_at(nul);
    let rest = rest.get(1..).unwrap_or(&[]);
    if head.contains(&b' ') {
        // METHOD+ARG SOURCE DEST_TYPE DEST
        let words: Vec<&[u8]> = head.split(|&b| b == b' ').collect();
        let [meth_arg, source, dest_type, dest] = words.as_slice() else {
            return Err(protocol_error(
                "malformed request: expected 'METHOD+ARG SOURCE DEST_TYPE DEST'",
            ));
        };
        let (method, arg) = match meth_arg.iter().position(|&b| b == b'+') {
            Some(plus) => (
                meth_arg.get(..plus).unwrap_or(&[]),
                meth_arg.get(plus + 1..).unwrap_or(&[]),
            ),
            None => (*meth_arg, &[][..]),
        };
        let dest = match (*dest_type, *dest) {
            (b"keyword", b"adminvm") | (b"name", _) => {
                if *dest_type == b"keyword" {
                    "dom0".to_string()
                } else {
                    ascii_field(dest, "destination")?
                }
            }
            _ => {
                return Err(protocol_error(format!(
                    "got {} destination type, while only explicit name supported",
                    String::from_utf8_lossy(dest_type)
                )));
            }
        };
        return Ok(Request {
            source: ascii_field(source, "source")?,
            method: ascii_field(method, "method")?,
            arg: if arg.is_empty() {
                String::new()
            } else {
                ascii_field(arg, "argument")?
            },
            dest,
            payload: rest.to_vec(),
        });
    }
    // SOURCE\0METHOD\0DEST\0ARG\0PAYLOAD
    let mut parts = rest.splitn(4, |&b| b == 0);
    let (Some(method), Some(dest), Some(arg), Some(payload)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(protocol_error(
            "malformed request: expected SOURCE\\0METHOD\\0DEST\\0ARG\\0PAYLOAD",
        ));
    };
    Ok(Request {
        source: ascii_field(head, "source")?,
        method: ascii_field(method, "method")?,
        arg: if arg.is_empty() {
            String::new()
        } else {
            ascii_field(arg, "argument")?
        },
        dest: ascii_field(dest, "destination")?,
        payload: payload.to_vec(),
    })
}

/// Is `name` a qube name Qubes accepts (letters first, then letters,
/// digits, `-`, `_`, `.`; at most 31 characters; not `.`/`..`)?
pub fn valid_qube_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 31
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One qube the box knows, running or halted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qube {
    /// Its name.
    pub name: String,
    /// Qubes class: `AdminVM`, `AppVM`, `DispVM`.
    pub klass: String,
    /// The domid it runs with.
    pub domid: u16,
    /// Its IPv4 address (unused for dom0).
    pub ip: Ipv4Addr,
    /// Its uuid.
    pub uuid: String,
    /// Whether disposables may be based on it.
    pub template_for_dispvms: bool,
    /// The qube its disposables are based on.
    pub default_dispvm: Option<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// For a disposable: the qube it was made from.
    pub template: Option<String>,
}

impl Qube {
    fn to_text(&self) -> String {
        format!(
            "class={}\ndomid={}\nip={}\nuuid={}\ntemplate_for_dispvms={}\ndefault_dispvm={}\ntags={}\ntemplate={}\n",
            self.klass,
            self.domid,
            self.ip,
            self.uuid,
            self.template_for_dispvms,
            self.default_dispvm.as_deref().unwrap_or(""),
            self.tags.join(" "),
            self.template.as_deref().unwrap_or(""),
        )
    }

    fn from_text(name: &str, text: &str) -> Option<Qube> {
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let optional = |key: &str| {
            fields
                .get(key)
                .filter(|v| !v.is_empty())
                .map(|v| (*v).to_string())
        };
        Some(Qube {
            name: name.to_string(),
            klass: (*fields.get("class")?).to_string(),
            domid: fields.get("domid")?.parse().ok()?,
            ip: fields.get("ip")?.parse().ok()?,
            uuid: (*fields.get("uuid")?).to_string(),
            template_for_dispvms: *fields.get("template_for_dispvms")? == "true",
            default_dispvm: optional("default_dispvm"),
            tags: fields
                .get("tags")
                .map(|t| t.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            template: optional("template"),
        })
    }

    /// The box client that runs this qube.
    pub fn client(&self) -> ClientQube {
        // Disposables and halted qubes get client1's rules (HTTP and DNS);
        // a numbered client keeps its own.
        let rules = self
            .name
            .strip_prefix("client")
            .and_then(|n| n.parse().ok())
            .and_then(netbox::client_qube)
            .filter(|c| c.domid == self.domid)
            .map(|c| c.rules)
            .or_else(|| netbox::client_qube(1).map(|c| c.rules))
            .unwrap_or_default();
        ClientQube {
            domid: self.domid,
            name: self.name.clone(),
            ip: self.ip,
            rules,
        }
    }
}

/// The box's qubes: one file per qube in `<state>/qubes.d/` (`key=value`
/// lines), written by `up`, `add-client` and qubesd itself.
#[derive(Debug)]
pub struct Registry<'a> {
    config: &'a BoxConfig,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    if let Ok(mut urandom) = fs::File::open("/dev/urandom") {
        let _ = urandom.read_exact(&mut bytes);
    }
    bytes
}

/// A fresh random (version 4) uuid.
pub fn new_uuid() -> String {
    let mut b = random_bytes::<16>();
    if let Some(v) = b.get_mut(6) {
        *v = (*v & 0x0f) | 0x40;
    }
    if let Some(v) = b.get_mut(8) {
        *v = (*v & 0x3f) | 0x80;
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8).unwrap_or(""),
        hex.get(8..12).unwrap_or(""),
        hex.get(12..16).unwrap_or(""),
        hex.get(16..20).unwrap_or(""),
        hex.get(20..32).unwrap_or("")
    )
}

impl<'a> Registry<'a> {
    /// The registry of a box.
    pub fn new(config: &'a BoxConfig) -> Self {
        Registry { config }
    }

    fn dir(&self) -> PathBuf {
        self.config.state_dir.join("qubes.d")
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        valid_qube_name(name).then(|| self.dir().join(format!("{name}.qube")))
    }

    /// The qube named `name`.
    pub fn get(&self, name: &str) -> Option<Qube> {
        let text = fs::read_to_string(self.path(name)?).ok()?;
        Qube::from_text(name, &text)
    }

    /// The qube a request names: `NAME`, or `uuid:UUID` (as qubesd's
    /// `decode_vm`).
    pub fn find(&self, dest: &str) -> Option<Qube> {
        match dest.strip_prefix("uuid:") {
            Some(uuid) => self.all().into_iter().find(|q| q.uuid == uuid),
            None => self.get(dest),
        }
    }

    /// Every qube, by name.
    pub fn all(&self) -> Vec<Qube> {
        let mut qubes: Vec<Qube> = fs::read_dir(self.dir())
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter_map(|e| {
                        let file = e.file_name().to_string_lossy().into_owned();
                        self.get(file.strip_suffix(".qube")?)
                    })
                    .collect()
            })
            .unwrap_or_default();
        qubes.sort_by(|a, b| a.name.cmp(&b.name));
        qubes
    }

    /// Writes (or replaces) a qube's entry.
    pub fn put(&self, qube: &Qube) -> io::Result<()> {
        let path = self.path(&qube.name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{:?} is not a qube name", qube.name),
            )
        })?;
        fs::create_dir_all(self.dir())?;
        let temporary = path.with_extension("new");
        fs::write(&temporary, qube.to_text())?;
        fs::rename(&temporary, &path)
    }

    /// Forgets a qube.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match self.path(name) {
            Some(path) => fs::remove_file(path),
            None => Ok(()),
        }
    }

    /// `Running` or `Halted`: dom0 always runs, any other qube while its
    /// namespace exists.
    pub fn power_state(&self, qube: &Qube) -> &'static str {
        if qube.klass == "AdminVM" || netbox::netns_exists(&self.config.netns(&qube.name)) {
            "Running"
        } else {
            "Halted"
        }
    }

    /// The JSON of `internal.GetSystemInfo`.
    pub fn system_info(&self) -> String {
        let domains: Vec<String> = self
            .all()
            .iter()
            .map(|q| {
                let tags: Vec<String> = q.tags.iter().map(|t| json_string(t)).collect();
                let (icon, label) = match q.klass.as_str() {
                    "AdminVM" => ("adminvm-black", "black"),
                    "DispVM" => ("dispvm-red", "red"),
                    _ => ("appvm-red", "red"),
                };
                format!(
                    "{}: {{\"internal\": null, \"tags\": [{}], \"type\": {}, \"template_for_dispvms\": {}, \"default_dispvm\": {}, \"icon\": {}, \"label\": {}, \"guivm\": null, \"relayvm\": null, \"transport_rpc\": null, \"power_state\": {}, \"uuid\": {}}}",
                    json_string(&q.name),
                    tags.join(", "),
                    json_string(&q.klass),
                    q.template_for_dispvms,
                    q.default_dispvm
                        .as_deref()
                        .map_or("null".to_string(), json_string),
                    json_string(icon),
                    json_string(label),
                    json_string(self.power_state(q)),
                    json_string(&q.uuid),
                )
            })
            .collect();
        format!("{{\"domains\": {{{}}}}}", domains.join(", "))
    }

    /// Registers dom0, sys-net, sys-firewall and [`DEFAULT_DVM`] (`up`).
    pub fn register_builtin(&self) -> io::Result<()> {
        let base = |name: &str, klass: &str, domid: u16, ip: Ipv4Addr| Qube {
            name: name.to_string(),
            klass: klass.to_string(),
            domid,
            ip,
            uuid: if domid == 0 {
                DOM0_UUID.to_string()
            } else {
                new_uuid()
            },
            template_for_dispvms: false,
            default_dispvm: (domid != 0).then(|| DEFAULT_DVM.to_string()),
            tags: Vec::new(),
            template: None,
        };
        self.put(&base("dom0", "AdminVM", 0, Ipv4Addr::UNSPECIFIED))?;
        self.put(&base("sys-net", "AppVM", 1, netbox::SYS_NET_IP))?;
        self.put(&base(
            netbox::FIREWALL.1,
            "AppVM",
            netbox::FIREWALL.0,
            netbox::FIREWALL_IP,
        ))?;
        let mut dvm = base(DEFAULT_DVM, "AppVM", 230, Ipv4Addr::new(10, 137, 0, 230));
        dvm.template_for_dispvms = true;
        self.put(&dvm)
    }

    /// Registers client `client` unless a qube of that name is known.
    pub fn register_client(&self, client: &ClientQube) -> io::Result<()> {
        if self.get(&client.name).is_some() {
            return Ok(());
        }
        self.put(&Qube {
            name: client.name.clone(),
            klass: "AppVM".into(),
            domid: client.domid,
            ip: client.ip,
            uuid: new_uuid(),
            template_for_dispvms: false,
            default_dispvm: Some(DEFAULT_DVM.into()),
            tags: Vec::new(),
            template: None,
        })
    }
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The server: the box it serves and a lock that runs changing calls one
/// at a time.
#[derive(Debug)]
pub struct Qubesd {
    config: BoxConfig,
    changes: Mutex<()>,
}

impl Qubesd {
    /// A server for the box `config`.
    pub fn new(config: BoxConfig) -> Self {
        Qubesd {
            config,
            changes: Mutex::new(()),
        }
    }

    /// Answers one request (already read) with the bytes to send back.
    pub fn answer(&self, bytes: &[u8]) -> Vec<u8> {
        match parse_request(bytes).and_then(|request| self.call(&request)) {
            Ok(payload) => encode_ok(payload.as_bytes()),
            Err(exc) => {
                eprintln!("qubesd: {}: {}", exc.kind, exc.message);
                encode_exception(&exc)
            }
        }
    }

    fn call(&self, request: &Request) -> Result<String, Exception> {
        eprintln!(
            "qubesd: call {}+{} ({} -> {}), payload of {} bytes",
            request.method,
            request.arg,
            request.source,
            request.dest,
            request.payload.len()
        );
        let registry = Registry::new(&self.config);
        let lookup = |name: &str| registry.find(name).ok_or_else(|| not_found(name));
        let source = lookup(&request.source)?;
        let dest = lookup(&request.dest)?;
        let no_arg = || {
            if request.arg.is_empty() {
                Ok(())
            } else {
                Err(protocol_error("unexpected argument"))
            }
        };
        let no_payload = || {
            if request.payload.is_empty() {
                Ok(())
            } else {
                Err(protocol_error("unexpected payload"))
            }
        };
        let not_adminvm = || {
            if dest.klass == "AdminVM" {
                Err(protocol_error("expected destination to not be AdminVM"))
            } else {
                Ok(())
            }
        };
        match request.method.as_str() {
            "internal.GetSystemInfo" => {
                no_arg()?;
                no_payload()?;
                if dest.klass != "AdminVM" {
                    return Err(protocol_error("expected destination to be AdminVM"));
                }
                Ok(registry.system_info())
            }
            "admin.vm.Start" => {
                no_arg()?;
                no_payload()?;
                not_adminvm()?;
                let _guard = self.changes.lock().unwrap_or_else(|p| p.into_inner());
                self.start(&registry, &dest).map(|()| String::new())
            }
            "admin.vm.Kill" => {
                no_arg()?;
                no_payload()?;
                not_adminvm()?;
                let _guard = self.changes.lock().unwrap_or_else(|p| p.into_inner());
                self.kill(&registry, &dest).map(|()| String::new())
            }
            "admin.vm.CreateDisposable" => {
                if request.arg == "preload" {
                    return Err(exception(
                        "QubesException",
                        "the box does not preload disposables",
                    ));
                }
                no_arg()?;
                let uuid = match request.payload.as_slice() {
                    b"" => false,
                    b"uuid" => true,
                    _ => {
                        return Err(protocol_error(
                            "Invalid payload, expected empty string or 'uuid'",
                        ));
                    }
                };
                let _guard = self.changes.lock().unwrap_or_else(|p| p.into_inner());
                let dispvm = self.create_disposable(&registry, &source, &dest)?;
                Ok(if uuid {
                    format!("uuid:{}", dispvm.uuid)
                } else {
                    dispvm.name
                })
            }
            other => Err(protocol_error(format!(
                "no such method: {}",
                py_repr(other)
            ))),
        }
    }

    fn start(&self, registry: &Registry<'_>, qube: &Qube) -> Result<(), Exception> {
        if registry.power_state(qube) != "Halted" {
            return Err(exception(
                "QubesVMNotHaltedError",
                format!("Domain is not powered off: {}", py_repr(&qube.name)),
            ));
        }
        if qube.domid <= netbox::FIREWALL.0 {
            return Err(exception(
                "QubesException",
                format!(
                    "Start failed: the box starts {} only with qubes-box up",
                    qube.name
                ),
            ));
        }
        let client = qube.client();
        clear_qrexec_sockets(&self.config, qube);
        let started = netbox::add_client(&self.config, &client)
            .and_then(|()| wait_qrexec(&self.config, qube, START_TIMEOUT));
        if let Err(error) = started {
            let _ = netbox::remove_client(&self.config, &client);
            clear_qrexec_sockets(&self.config, qube);
            return Err(exception(
                "QubesException",
                format!(
                    "Start failed: {error} (see the logs in {})",
                    self.config.state_dir.display()
                ),
            ));
        }
        eprintln!("qubesd: started {}", qube.name);
        Ok(())
    }

    fn kill(&self, registry: &Registry<'_>, qube: &Qube) -> Result<(), Exception> {
        if registry.power_state(qube) == "Halted" {
            return Err(exception(
                "QubesVMNotStartedError",
                format!("Domain is powered off: {}", py_repr(&qube.name)),
            ));
        }
        if qube.domid <= netbox::FIREWALL.0 {
            return Err(exception(
                "QubesException",
                format!("the box stops {} only with qubes-box down", qube.name),
            ));
        }
        let stopped = netbox::remove_client(&self.config, &qube.client());
        clear_qrexec_sockets(&self.config, qube);
        if qube.klass == "DispVM" {
            let _ = fs::remove_dir_all(crate::vmtools::home(&self.config, &qube.name));
            let _ = fs::remove_dir_all(crate::vmtools::vm_dir(&self.config, &qube.name));
            let _ = registry.remove(&qube.name);
        }
        stopped.map_err(|error| {
            exception(
                "QubesException",
                format!("Kill of {} failed: {error}", qube.name),
            )
        })?;
        eprintln!("qubesd: killed {}", qube.name);
        Ok(())
    }

    fn create_disposable(
        &self,
        registry: &Registry<'_>,
        source: &Qube,
        dest: &Qube,
    ) -> Result<Qube, Exception> {
        let template = if dest.klass == "AdminVM" {
            let name = source.default_dispvm.clone().ok_or_else(|| {
                exception(
                    "QubesException",
                    format!("{} has no default_dispvm", source.name),
                )
            })?;
            registry.get(&name).ok_or_else(|| not_found(&name))?
        } else {
            dest.clone()
        };
        if !template.template_for_dispvms {
            return Err(exception(
                "QubesException",
                "Refusing to create disposable out of app qube which has template_for_dispvms=False",
            ));
        }
        let taken: Vec<u16> = registry.all().iter().map(|q| q.domid).collect();
        for _ in 0..1000 {
            let [a, b] = random_bytes::<2>();
            let dispid = u16::from_be_bytes([a, b]) % 9999 + 1;
            let [high, low] = dispid.to_be_bytes();
            let domid = 1000 + dispid;
            let name = format!("disp{dispid}");
            if low == 0 || low == 255 || taken.contains(&domid) || registry.get(&name).is_some() {
                continue;
            }
            let dispvm = Qube {
                name,
                klass: "DispVM".into(),
                domid,
                ip: Ipv4Addr::new(10, 138, high, low),
                uuid: new_uuid(),
                template_for_dispvms: false,
                default_dispvm: template.default_dispvm.clone(),
                tags: vec![
                    format!("created-by-{}", source.name),
                    format!("disp-created-by-{}", source.name),
                ],
                template: Some(template.name.clone()),
            };
            registry.put(&dispvm).map_err(|error| {
                exception(
                    "QubesException",
                    format!("cannot register the disposable: {error}"),
                )
            })?;
            eprintln!(
                "qubesd: created {} from {} for {}",
                dispvm.name, template.name, source.name
            );
            return Ok(dispvm);
        }
        Err(exception("QubesException", "no free disposable id"))
    }

    /// Serves both sockets until the process ends.
    pub fn serve(self) -> io::Result<()> {
        let admin = bind(&socket(&self.config))?;
        let internal = bind(&internal_socket(&self.config))?;
        let server = Arc::new(self);
        let other = Arc::clone(&server);
        std::thread::spawn(move || accept_loop(&other, &internal));
        accept_loop(&server, &admin);
        Ok(())
    }
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    let _ = fs::remove_file(path);
    UnixListener::bind(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))
}

fn accept_loop(server: &Arc<Qubesd>, listener: &UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let server = Arc::clone(server);
        std::thread::spawn(move || {
            let _ = serve_connection(&server, stream);
        });
    }
}

fn serve_connection(server: &Qubesd, mut stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = Vec::new();
    (&mut stream)
        .take(MAX_REQUEST as u64 + 1)
        .read_to_end(&mut request)?;
    if request.len() > MAX_REQUEST {
        // As qubesd: a request too long is dropped without an answer.
        eprintln!("qubesd: request too long");
        return Ok(());
    }
    let answer = server.answer(&request);
    stream.write_all(&answer)?;
    stream.shutdown(std::net::Shutdown::Write)
}

fn qrexec_socket(config: &BoxConfig, qube: &Qube) -> PathBuf {
    config.qubesdb_dir().join(format!("qrexec.{}", qube.domid))
}

fn clear_qrexec_sockets(config: &BoxConfig, qube: &Qube) {
    for name in [
        format!("qrexec.{}", qube.domid),
        format!("qrexec.{}", qube.name),
        format!("qrexec.uuid:{}", qube.uuid),
        format!("qubesdb.{}.sock", qube.name),
        format!("qubesdb.{}.pid", qube.name),
    ] {
        let _ = fs::remove_file(config.qubesdb_dir().join(name));
    }
}

/// Waits until the qube's qrexec-daemon accepts connections (it listens
/// only once the agent is connected).
fn wait_qrexec(config: &BoxConfig, qube: &Qube, timeout: Duration) -> io::Result<()> {
    let path = qrexec_socket(config, qube);
    let start = Instant::now();
    loop {
        if UnixStream::connect(&path).is_ok() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the qrexec-daemon of {} did not listen on {} within {} s",
                    qube.name,
                    path.display(),
                    timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one request to a qubesd socket and returns the raw answer (a
/// client for tests and `qubes-box qubesd-call`).
pub fn call(socket: &Path, request: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", socket.display())))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(request)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = Vec::new();
    stream.take(16 << 20).read_to_end(&mut answer)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_framings_and_refuses_garbage() {
        let new = parse_request(b"admin.vm.Start+ dom0 name client3\0").unwrap();
        assert_eq!(
            (new.source.as_str(), new.method.as_str(), new.dest.as_str()),
            ("dom0", "admin.vm.Start", "client3")
        );
        assert_eq!(new.arg, "");
        let keyword = parse_request(b"internal.GetSystemInfo dom0 keyword adminvm\0").unwrap();
        assert_eq!(keyword.dest, "dom0");
        let with_payload =
            parse_request(b"admin.vm.CreateDisposable+ dom0 name default-dvm\0uuid").unwrap();
        assert_eq!(with_payload.payload, b"uuid");
        let old = parse_request(b"dom0\0admin.vm.Kill\0disp12\0\0").unwrap();
        assert_eq!(
            (old.source.as_str(), old.method.as_str(), old.dest.as_str()),
            ("dom0", "admin.vm.Kill", "disp12")
        );
        let old_arg = parse_request(b"dom0\0m\0d\0arg\0pay\0load").unwrap();
        assert_eq!(
            (old_arg.arg.as_str(), old_arg.payload.as_slice()),
            ("arg", &b"pay\0load"[..])
        );
        for bad in [
            &b""[..],
            b"no nul at all",
            b"a b c\0",
            b"m+a dom0 keyword sys-net\0",
            b"m+a dom0 uuid x\0",
            b"dom0\0only-method\0",
            b"m dom0 name bad\x01name\0",
            b"m dom\xff0 name x\0",
        ] {
            let error = parse_request(bad).unwrap_err();
            assert_eq!(error.kind, "ProtocolError", "{bad:?}");
        }
    }

    #[test]
    fn encodes_answers_as_qubesd() {
        assert_eq!(encode_ok(b"disp7"), b"0\0disp7");
        assert_eq!(
            encode_exception(&not_found("x'y")),
            b"2\0QubesVMNotFoundError\0\0No such domain: 'x\\'y'\0"
        );
        assert!(valid_qube_name("disp1234"));
        assert!(valid_qube_name("sys-firewall"));
        for bad in ["", "1abc", "../etc", "a/b", "a b", &"a".repeat(32)] {
            assert!(!valid_qube_name(bad), "{bad}");
        }
        let uuid = new_uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.as_bytes().get(14), Some(&b'4'));
        assert_ne!(uuid, new_uuid());
    }

    #[test]
    fn registry_and_calls_without_namespaces() {
        let dir = std::env::temp_dir().join(format!("qubesd-unit-{}", std::process::id()));
        let config = BoxConfig {
            state_dir: dir.clone(),
            prefix: format!("qdu{}-", std::process::id()),
            bin_dir: dir.clone(),
            firewall: false,
            firewall_bin: None,
            firewall_args: Vec::new(),
            clients: 0,
            sys_net_answers_arp: true,
        };
        let registry = Registry::new(&config);
        registry.register_builtin().unwrap();
        registry
            .register_client(&netbox::client_qube(1).unwrap())
            .unwrap();
        let client1 = registry.get("client1").unwrap();
        assert_eq!(client1.domid, 3);
        assert_eq!(client1.default_dispvm.as_deref(), Some(DEFAULT_DVM));
        let info = registry.system_info();
        assert!(
            info.contains("\"dom0\": {\"internal\": null, \"tags\": [], \"type\": \"AdminVM\""),
            "{info}"
        );
        assert!(info.contains("\"power_state\": \"Halted\""), "{info}");
        assert!(info.contains("\"template_for_dispvms\": true"), "{info}");

        let server = Qubesd::new(config.clone());
        let ask = |request: &[u8]| String::from_utf8_lossy(&server.answer(request)).into_owned();
        let got = ask(b"internal.GetSystemInfo+ dom0 name dom0\0");
        assert!(got.starts_with("0\0{\"domains\": {"), "{got}");
        assert_eq!(
            ask(b"internal.GetSystemInfo+ dom0 name client1\0"),
            "2\0ProtocolError\0\0expected destination to be AdminVM\0"
        );
        assert_eq!(
            ask(b"internal.GetSystemInfo+x dom0 name dom0\0"),
            "2\0ProtocolError\0\0unexpected argument\0"
        );
        assert_eq!(
            ask(b"admin.vm.Start+ dom0 name nosuch\0"),
            "2\0QubesVMNotFoundError\0\0No such domain: 'nosuch'\0"
        );
        assert_eq!(
            ask(b"admin.vm.List+ dom0 name dom0\0"),
            "2\0ProtocolError\0\0no such method: 'admin.vm.List'\0"
        );
        assert_eq!(
            ask(b"admin.vm.Kill+ dom0 name client1\0"),
            "2\0QubesVMNotStartedError\0\0Domain is powered off: 'client1'\0"
        );
        assert_eq!(
            ask(b"admin.vm.CreateDisposable+ dom0 name client1\0"),
            "2\0QubesException\0\0Refusing to create disposable out of app qube which has template_for_dispvms=False\0"
        );
        assert_eq!(
            ask(b"admin.vm.CreateDisposable+ dom0 name dom0\0junk"),
            "2\0ProtocolError\0\0Invalid payload, expected empty string or 'uuid'\0"
        );
        // To dom0 from client1: its default_dispvm; to default-dvm itself.
        let name = ask(b"admin.vm.CreateDisposable+ client1 name dom0\0");
        let name = name.strip_prefix("0\0").expect(&name).to_string();
        assert!(name.starts_with("disp"), "{name}");
        let dispvm = registry.get(&name).unwrap();
        assert_eq!(dispvm.klass, "DispVM");
        assert_eq!(dispvm.template.as_deref(), Some(DEFAULT_DVM));
        assert!(dispvm.tags.contains(&"created-by-client1".to_string()));
        let dvm_uuid = registry.get(DEFAULT_DVM).unwrap().uuid;
        let uuid =
            ask(format!("admin.vm.CreateDisposable+ dom0 name uuid:{dvm_uuid}\0uuid").as_bytes());
        let uuid = uuid.strip_prefix("0\0uuid:").expect(&uuid).to_string();
        assert!(registry.find(&format!("uuid:{uuid}")).is_some());
        assert_eq!(
            ask(format!("admin.vm.Kill+ dom0 name uuid:{uuid}\0").as_bytes()),
            format!(
                "2\0QubesVMNotStartedError\0\0Domain is powered off: '{}'\0",
                registry.find(&format!("uuid:{uuid}")).unwrap().name
            )
        );
        assert!(
            ask(b"admin.vm.Kill+ dom0 name uuid:0000\0").contains("No such domain: 'uuid:0000'")
        );
        assert!(registry.system_info().contains("\"type\": \"DispVM\""));

        // Over the sockets: a whole request, then one too long (dropped
        // without an answer, as qubesd does), then the other socket.
        std::thread::spawn(move || server.serve());
        let admin = socket(&config);
        let start = Instant::now();
        while UnixStream::connect(&admin).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        let answer = call(&admin, b"internal.GetSystemInfo+ dom0 keyword adminvm\0").unwrap();
        assert!(answer.starts_with(b"0\0{\"domains\": {\"client1\": "));
        let mut long = b"admin.vm.Kill+ dom0 name client1\0".to_vec();
        long.resize(MAX_REQUEST + 1, b'x');
        assert_eq!(call(&admin, &long).unwrap(), b"");
        let internal = internal_socket(&config);
        while UnixStream::connect(&internal).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            call(&internal, b"dom0\0admin.vm.Kill\0client1\0\0").unwrap(),
            b"2\0QubesVMNotStartedError\0\0Domain is powered off: 'client1'\0"
        );
        let _ = fs::remove_dir_all(dir);
    }
}
