//! The policy admin API: the `policy.*` qrexec services dom0 offers to
//! manage `/etc/qubes/policy.d` (Qubes' `qrexec/policy/admin.py`, run by
//! `qubes-policy-admin`).
//!
//! | service | argument | payload | answer |
//! |---|---|---|---|
//! | `policy.List` | none | none | `NAME\n` per `NAME.policy` file, sorted |
//! | `policy.include.List` | none | none | `NAME\n` per file in `include/`, sorted |
//! | `policy.Get` | `NAME` | none | `TOKEN\n` + the content of `NAME.policy` |
//! | `policy.include.Get` | `NAME` | none | `TOKEN\n` + the content of `include/NAME` |
//! | `policy.Replace` | `NAME` | `TOKEN\n` + new content | nothing |
//! | `policy.include.Replace` | `NAME` | `TOKEN\n` + new content | nothing |
//! | `policy.Remove` | `NAME` | `TOKEN` | nothing |
//! | `policy.include.Remove` | `NAME` | `TOKEN` | nothing |
//! | `policy.GetFiles` | `SERVICE` | none | `FILE\n` per file with a rule for `SERVICE` |
//!
//! A token is `sha256:` and the lowercase hex SHA-256 of the file's bytes;
//! `Replace`/`Remove` also take `new` (the file must not exist) and `any`
//! (no check). `NAME` is `[A-Za-z0-9_-]+` and must stay inside its directory
//! after symlinks are resolved.
//!
//! Every change is checked before it is made: the whole policy directory is
//! loaded as it would be afterwards ([`crate::loader::load_with_overrides`],
//! Qubes' `ValidateParser`: includes resolved, a file still included cannot
//! be removed, an include file is parsed in the context — full or
//! `!include-service` — it is included from), and any error refuses the
//! change with `Policy change validation failed: FILE:LINE: REASON`. A new
//! content is written to a temporary file in the same directory and renamed
//! over the old one, so a reader sees either the old or the new file. The
//! directory is locked (`flock`) for the duration of each request, as in
//! Qubes.
//!
//! Errors carry Qubes' exception class names, which `qubes-policy-admin`
//! prints (`CLASS MESSAGE` on standard error, exit 1; exit 2 for an internal
//! error) and Qubes' `admin_client.py` parses back.
//!
//! Where we differ from Qubes, on the safe side:
//! * a `policy.Replace` name with an upper-case letter is refused
//!   (`PolicyAdminInvalidFileNameException`): Qubes accepts it, and the
//!   resulting file then makes every later policy load fail with `invalid
//!   filename`;
//! * a new content that is not UTF-8 is a `PolicyAdminProtocolException`
//!   (Qubes fails with an internal error, exit 2);
//! * the temporary file is named `.!NAME` (Qubes: `!NAME`), so a policy
//!   daemon listing the directory in the meantime ignores it instead of
//!   failing on its name;
//! * payloads over [`MAX_PAYLOAD`] bytes are refused;
//! * a change that creates an include cycle is refused as a
//!   `PolicyAdminSyntaxException` naming the line (`includes nested deeper
//!   than 32`); Qubes' parser recurses until Python's `RecursionError`, an
//!   internal error (exit 2) — refused either way.
//!
//! `tests/admin.rs` runs the same requests through Qubes' own `PolicyAdmin`
//! (hand-written cases and seeded random sequences) and compares every
//! answer and the files left behind.

#![deny(clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::loader::{self, PolicyError, PolicyPaths};

/// Largest payload accepted (a policy file is a few KiB).
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Default directory managed by the API (Qubes' `POLICYPATH`).
pub const POLICY_DIR: &str = "/etc/qubes/policy.d";

/// Default log file of `qubes-policy-admin`.
pub const LOG_FILE: &str = "/var/log/qubes/policy-admin.log";

/// Why a request failed, by Qubes' exception class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// `PolicyAdminTokenException`: the file is not in the expected state.
    Token(String),
    /// `PolicyAdminFileNotFoundException`.
    FileNotFound(String),
    /// `PolicyAdminProtocolException`: a request the client should not send.
    Protocol(String),
    /// `PolicyAdminSyntaxException`: the change would break the policy.
    Syntax(String),
    /// `PolicyAdminInvalidFileNameException`.
    InvalidFileName(String),
    /// `PolicyAdminInvalidFilePathException`.
    InvalidFilePath(String),
    /// Anything else (I/O, an already broken policy directory): logged in
    /// dom0, the caller only learns that it failed.
    Internal(String),
}

impl AdminError {
    /// Qubes' exception class name (empty for an internal error).
    pub fn class_name(&self) -> &'static str {
        match self {
            AdminError::Token(_) => "PolicyAdminTokenException",
            AdminError::FileNotFound(_) => "PolicyAdminFileNotFoundException",
            AdminError::Protocol(_) => "PolicyAdminProtocolException",
            AdminError::Syntax(_) => "PolicyAdminSyntaxException",
            AdminError::InvalidFileName(_) => "PolicyAdminInvalidFileNameException",
            AdminError::InvalidFilePath(_) => "PolicyAdminInvalidFilePathException",
            AdminError::Internal(_) => "",
        }
    }

    /// The message (without the class name).
    pub fn message(&self) -> &str {
        match self {
            AdminError::Token(m)
            | AdminError::FileNotFound(m)
            | AdminError::Protocol(m)
            | AdminError::Syntax(m)
            | AdminError::InvalidFileName(m)
            | AdminError::InvalidFilePath(m)
            | AdminError::Internal(m) => m,
        }
    }

    /// Whether this is an internal error (exit 2) rather than the client's.
    pub fn is_internal(&self) -> bool {
        matches!(self, AdminError::Internal(_))
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for AdminError {}

fn protocol(message: impl Into<String>) -> AdminError {
    AdminError::Protocol(message.into())
}

fn internal(what: &str, path: &Path, err: &std::io::Error) -> AdminError {
    AdminError::Internal(format!("{what} {}: {err}", path.display()))
}

/// `sha256:HEX` of `data`.
pub fn compute_token(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut token = String::with_capacity(7 + 64);
    token.push_str("sha256:");
    for byte in digest {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

/// Qubes' `RPCNAME_ALLOWED_CHARSET`.
fn is_rpcname_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    List,
    IncludeList,
    Get,
    IncludeGet,
    Replace,
    IncludeReplace,
    Remove,
    IncludeRemove,
    GetFiles,
}

impl Method {
    fn from_name(name: &str) -> Option<Method> {
        Some(match name {
            "policy.List" => Method::List,
            "policy.include.List" => Method::IncludeList,
            "policy.Get" => Method::Get,
            "policy.include.Get" => Method::IncludeGet,
            "policy.Replace" => Method::Replace,
            "policy.include.Replace" => Method::IncludeReplace,
            "policy.Remove" => Method::Remove,
            "policy.include.Remove" => Method::IncludeRemove,
            "policy.GetFiles" => Method::GetFiles,
            _ => return None,
        })
    }

    fn takes_arg(self) -> bool {
        !matches!(self, Method::List | Method::IncludeList)
    }

    fn takes_payload(self) -> bool {
        matches!(
            self,
            Method::Replace | Method::IncludeReplace | Method::Remove | Method::IncludeRemove
        )
    }
}

/// Every service name of the API, as installed in `/etc/qubes-rpc`.
pub const SERVICES: [&str; 9] = [
    "policy.List",
    "policy.Get",
    "policy.Replace",
    "policy.Remove",
    "policy.include.List",
    "policy.include.Get",
    "policy.include.Replace",
    "policy.include.Remove",
    "policy.GetFiles",
];

/// The API over one policy directory.
#[derive(Debug, Clone)]
pub struct PolicyAdmin {
    policy_dir: PathBuf,
    include_dir: PathBuf,
    legacy_dir: PathBuf,
}

impl PolicyAdmin {
    /// Manage `policy_dir` (its `include/` subdirectory for the `include`
    /// services); `!compat-4.0` lines read `legacy_dir`. The directory is
    /// made canonical (symlinks resolved) so names can be checked against it.
    pub fn new(policy_dir: &Path, legacy_dir: &Path) -> Result<Self, AdminError> {
        let policy_dir = fs::canonicalize(policy_dir)
            .map_err(|e| internal("cannot open the policy directory", policy_dir, &e))?;
        Ok(PolicyAdmin {
            include_dir: policy_dir.join("include"),
            policy_dir,
            legacy_dir: legacy_dir.to_owned(),
        })
    }

    /// The managed directory (canonical).
    pub fn policy_dir(&self) -> &Path {
        &self.policy_dir
    }

    fn paths(&self) -> PolicyPaths {
        PolicyPaths {
            policy_dirs: vec![self.policy_dir.clone()],
            legacy_dir: self.legacy_dir.clone(),
        }
    }

    /// Handle one call: `service` without its argument, `arg` (empty when
    /// there is none), the caller's whole standard input. `Ok(None)` means
    /// success with nothing to print.
    pub fn handle_request(
        &self,
        service: &str,
        arg: &str,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, AdminError> {
        if !arg.bytes().all(is_rpcname_byte) {
            return Err(protocol(format!(
                "Invalid argument: \"{arg}\"\nValid characters are letters, numbers, dot, plus, hyphen and underline"
            )));
        }
        let method = Method::from_name(service)
            .ok_or_else(|| protocol(format!("unrecognized method: {service}")))?;
        if !method.takes_arg() && !arg.is_empty() {
            return Err(protocol("Unexpected argument"));
        }
        if !method.takes_payload() && !payload.is_empty() {
            return Err(protocol("Unexpected payload"));
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(protocol(format!(
                "Payload too large: {} bytes, at most {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        let lock = fs::File::open(&self.policy_dir)
            .map_err(|e| internal("cannot open", &self.policy_dir, &e))?;
        lock.lock()
            .map_err(|e| internal("cannot lock", &self.policy_dir, &e))?;
        let result = self.dispatch(method, arg, payload);
        drop(lock);
        result
    }

    fn dispatch(
        &self,
        method: Method,
        arg: &str,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, AdminError> {
        let policy = |a: &str| self.get_path(a, &self.policy_dir, ".policy");
        let include = |a: &str| self.get_path(a, &self.include_dir, "");
        match method {
            Method::List => list(&self.policy_dir, ".policy").map(Some),
            Method::IncludeList => list(&self.include_dir, "").map(Some),
            Method::Get => get(&policy(arg)?).map(Some),
            Method::IncludeGet => get(&include(arg)?).map(Some),
            Method::Replace => {
                if arg.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(AdminError::InvalidFileName(format!(
                        "Invalid policy file name: {arg}\nPolicy file names must not contain upper-case letters (the policy loader refuses them)."
                    )));
                }
                self.replace(&policy(arg)?, payload).map(|()| None)
            }
            Method::IncludeReplace => self.replace(&include(arg)?, payload).map(|()| None),
            Method::Remove => self.remove(&policy(arg)?, payload).map(|()| None),
            Method::IncludeRemove => self.remove(&include(arg)?, payload).map(|()| None),
            Method::GetFiles => self.get_files(arg).map(Some),
        }
    }

    /// `_get_path`: `DIR/NAME+SUFFIX`, resolved, which must stay in `DIR`.
    fn get_path(&self, arg: &str, dir: &Path, suffix: &str) -> Result<PathBuf, AdminError> {
        if arg.is_empty()
            || !arg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(AdminError::InvalidFileName(format!(
                "Invalid policy file name: {arg}\nNames must contain only alphanumeric characters, underscore and hyphen."
            )));
        }
        let outside =
            || AdminError::InvalidFilePath(format!("Expecting a path inside {}", dir.display()));
        // Python's `resolve()` follows a symlinked directory too.
        if fs::canonicalize(dir).is_ok_and(|real| real != dir) {
            return Err(outside());
        }
        let path = dir.join(format!("{arg}{suffix}"));
        let resolved = match fs::symlink_metadata(&path) {
            // A dangling link is refused too (Python would follow it).
            Ok(m) if m.file_type().is_symlink() => fs::canonicalize(&path).ok(),
            _ => Some(path),
        };
        match resolved {
            Some(p) if p.parent() == Some(dir) => Ok(p),
            _ => Err(outside()),
        }
    }

    fn replace(&self, path: &Path, payload: &[u8]) -> Result<(), AdminError> {
        let Some(newline) = payload.iter().position(|&b| b == b'\n') else {
            return Err(protocol("Payload needs to include first line with token"));
        };
        let (token, rest) = payload.split_at(newline);
        let data = rest.get(1..).unwrap_or_default();
        check_token(token, path)?;
        let text = std::str::from_utf8(data).map_err(|e| {
            protocol(format!(
                "Policy is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            ))
        })?;
        self.validate(path, Some(text))?;
        write_atomically(path, data)
    }

    fn remove(&self, path: &Path, token: &[u8]) -> Result<(), AdminError> {
        check_token(token, path)?;
        if !path.is_file() {
            return Err(AdminError::FileNotFound(format!(
                "Not found: {}",
                path.display()
            )));
        }
        self.validate(path, None)?;
        fs::remove_file(path).map_err(|e| internal("cannot remove", path, &e))
    }

    /// `ValidateParser`: load the directory as it would be after the change.
    fn validate(&self, path: &Path, content: Option<&str>) -> Result<(), AdminError> {
        let mut overrides = BTreeMap::new();
        overrides.insert(path.to_owned(), content.map(str::to_owned));
        match loader::load_with_overrides(&self.paths(), &overrides) {
            Ok(_) => Ok(()),
            Err(PolicyError::Syntax(e)) => Err(AdminError::Syntax(format!(
                "Policy change validation failed: {e}"
            ))),
            Err(e) => Err(AdminError::Internal(format!(
                "cannot load the policy directory {}: {e}",
                self.policy_dir.display()
            ))),
        }
    }

    fn get_files(&self, service: &str) -> Result<Vec<u8>, AdminError> {
        if service.is_empty() {
            return Err(protocol("Service cannot be empty."));
        }
        if service.contains('+') {
            // handle_request let only the rpcname characters through, so
            // `+` is the only one left to refuse.
            return Err(protocol(format!(
                "Service '{service}' contains invalid characters: ('+',)"
            )));
        }
        let loaded = loader::load(&self.paths()).map_err(|e| {
            AdminError::Internal(format!(
                "cannot load the policy directory {}: {e}",
                self.policy_dir.display()
            ))
        })?;
        let mut files: Vec<String> = Vec::new();
        for rule in &loaded.rules {
            if rule.service.as_deref().is_some_and(|s| s != service) {
                continue;
            }
            let path = Path::new(&*rule.origin.file);
            let name = if path.starts_with(&self.policy_dir) {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                rule.origin.file.to_string()
            };
            if !files.contains(&name) {
                files.push(name);
            }
        }
        Ok(files
            .iter()
            .flat_map(|f| [f.as_str(), "\n"])
            .collect::<String>()
            .into_bytes())
    }
}

/// `_common_list`: regular files (symlinks followed), `SUFFIX` stripped,
/// sorted.
fn list(dir: &Path, suffix: &str) -> Result<Vec<u8>, AdminError> {
    let entries = fs::read_dir(dir).map_err(|e| internal("cannot list", dir, &e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| internal("cannot list", dir, &e))?;
        if !entry.path().is_file() {
            continue;
        }
        let raw = entry.file_name();
        let lossy = raw.to_string_lossy();
        let Some(name) = lossy.strip_suffix(suffix) else {
            continue;
        };
        // Qubes encodes the answer as ASCII: any other listed name fails.
        if raw.to_str().is_none() || !name.is_ascii() {
            return Err(AdminError::Internal(format!(
                "file name not ASCII in {}: {raw:?}",
                dir.display()
            )));
        }
        names.push(name.to_owned());
    }
    names.sort();
    Ok(names
        .iter()
        .flat_map(|n| [n.as_str(), "\n"])
        .collect::<String>()
        .into_bytes())
}

/// `_common_get`: the token line, then the bytes.
fn get(path: &Path) -> Result<Vec<u8>, AdminError> {
    if !path.is_file() {
        return Err(AdminError::FileNotFound(format!(
            "Not found: {}",
            path.display()
        )));
    }
    let data = fs::read(path).map_err(|e| internal("cannot read", path, &e))?;
    let mut out = compute_token(&data).into_bytes();
    out.push(b'\n');
    out.extend_from_slice(&data);
    Ok(out)
}

/// `_check_token`.
fn check_token(token: &[u8], path: &Path) -> Result<(), AdminError> {
    match token {
        b"any" => Ok(()),
        b"new" if path.exists() => Err(AdminError::Token("File exists but token is 'new'".into())),
        b"new" => Ok(()),
        _ if !token.starts_with(b"sha256:") => Err(protocol("Unrecognized token")),
        _ if !path.exists() => Err(AdminError::Token(
            "File doesn't exist, but token isn't 'new'".into(),
        )),
        _ => {
            let data = fs::read(path).map_err(|e| internal("cannot read", path, &e))?;
            if compute_token(&data).as_bytes() == token {
                Ok(())
            } else {
                Err(AdminError::Token("Token mismatch".into()))
            }
        }
    }
}

/// Write `data` next to `path`, mode 0664 (group `qubes` when it exists and
/// we may), then rename it over `path`.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), AdminError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".!{name}"));
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&temp)?;
        file.write_all(data)?;
        file.set_permissions(fs::Permissions::from_mode(0o664))?;
        if let Some(gid) = group_id("qubes") {
            // As Qubes: root:qubes when allowed, else leave it.
            let _ = std::os::unix::fs::fchown(&file, Some(0), Some(gid));
        }
        file.sync_all()?;
        fs::rename(&temp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        internal("cannot write", path, &e)
    })
}

/// The id of group `name` from `/etc/group`.
fn group_id(name: &str) -> Option<u32> {
    let text = fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_sha256_hex() {
        assert_eq!(
            compute_token(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            compute_token(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn method_table() {
        for name in SERVICES {
            assert!(Method::from_name(name).is_some(), "{name}");
        }
        assert!(Method::from_name("policy.Other").is_none());
        assert!(!Method::List.takes_arg());
        assert!(Method::Get.takes_arg() && !Method::Get.takes_payload());
        assert!(Method::Remove.takes_payload());
    }

    #[test]
    fn group_lookup_reads_etc_group() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-here"), None);
    }
}
