//! What the policy needs to know about the qubes: the system-info source.
//!
//! As in Qubes, the tools ask qubesd (`internal.GetSystemInfo`, see
//! qubes-core-qrexec `qrexec/utils.py:get_system_info` and qubes-core-admin
//! `qubes/api/internal.py`) for every qube's name, type, tags,
//! `default_dispvm`, `template_for_dispvms`, power state, uuid and the
//! `internal` feature, once per decision ([`QubesdSystemInfo`], through
//! [`qrexec::qubesd`]). A static JSON file of the same shape
//! ([`JsonFileSystemInfo`]) stays available as an explicit option for tests
//! and systems without qubesd ([`SystemInfoOrigin`]); both sit behind the
//! [`SystemInfoSource`] trait.
//!
//! The JSON (qubesd's answer, or the file) has the structure Qubes'
//! `get_system_info()` returns:
//!
//! ```json
//! {
//!   "domains": {
//!     "dom0":  { "type": "AdminVM", "power_state": "Running" },
//!     "work":  { "type": "AppVM", "tags": ["work"], "default_dispvm": "dvm",
//!                "uuid": "6f1e…", "power_state": "Running" },
//!     "dvm":   { "type": "AppVM", "template_for_dispvms": true }
//!   }
//! }
//! ```
//!
//! Every field except `type` is optional: `tags` defaults to `[]`,
//! `default_dispvm` to `null`, `template_for_dispvms` to `false`,
//! `power_state` to `"Halted"` (so `autostart=no` fails closed), `uuid` to
//! none and `internal` to `false` (qubesd sends the feature's value, `null`
//! or a string: any true value in Python's sense counts). The admin VM is `dom0`, whose uuid in
//! Qubes is always `00000000-0000-0000-0000-000000000000`; `uuid:` of that
//! value names the admin VM in policies and requests whether or not the
//! file gives dom0 a uuid. Unknown fields (`icon`, `label`, `guivm`, …) are ignored. A qube
//! name must be non-empty, must not start with `@` (that is the keyword
//! namespace) and must not contain whitespace; a broken file is an error,
//! never an empty system (which would silently change `@anyvm` results).
//!
//! This module never decides anything: it only describes the system.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use qrexec::qubesd::{Qubesd, QubesdError};
use serde::Deserialize;

/// One qube as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Domain {
    /// Qubes class name: `AdminVM`, `AppVM`, `TemplateVM`, `DispVM`, …
    #[serde(rename = "type")]
    pub vm_type: String,
    /// Tags, as set with `qvm-tags`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Name of the qube new disposables of this qube are based on.
    #[serde(default)]
    pub default_dispvm: Option<String>,
    /// Whether disposables may be based on this qube.
    #[serde(default)]
    pub template_for_dispvms: bool,
    /// `Running`, `Halted`, … (only `Running` counts as running).
    #[serde(default = "default_power_state")]
    pub power_state: String,
    /// The qube's uuid (without the `uuid:` prefix).
    #[serde(default)]
    pub uuid: Option<String>,
    /// An internal qube (Qubes' `internal` feature): never offered as an
    /// `ask` choice collected from the rules. qubesd gives the feature's
    /// value (`null`, or a string); as in Qubes' policy, any true value in
    /// Python's sense counts (`true`, a non-empty string, a non-zero number).
    #[serde(default, deserialize_with = "python_truth")]
    pub internal: bool,
}

fn python_truth<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    use serde_json::Value;
    Ok(match Value::deserialize(d)? {
        Value::Null => false,
        Value::Bool(b) => b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    })
}

fn default_power_state() -> String {
    "Halted".to_owned()
}

impl Domain {
    /// A running qube of the given type with no tags (handy for tests).
    pub fn new(vm_type: &str) -> Self {
        Domain {
            vm_type: vm_type.to_owned(),
            tags: Vec::new(),
            default_dispvm: None,
            template_for_dispvms: false,
            power_state: "Running".to_owned(),
            uuid: None,
            internal: false,
        }
    }

    /// Whether the qube carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// Whether the qube is running.
    pub fn is_running(&self) -> bool {
        self.power_state == "Running"
    }
}

#[derive(Deserialize)]
struct SystemInfoFile {
    domains: BTreeMap<String, Domain>,
}

/// The set of qubes, by name (sorted, so every expansion is deterministic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemInfo {
    domains: BTreeMap<String, Domain>,
    by_uuid: HashMap<String, String>,
    any_internal: bool,
}

/// Why the system info could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SystemInfoError {
    /// The file could not be read.
    #[error("cannot read system info {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// qubesd could not be asked (`internal.GetSystemInfo`).
    #[error("cannot get system info from qubesd: {0}")]
    Qubesd(#[from] qrexec::qubesd::QubesdError),
    /// The file is not valid JSON of the documented shape.
    #[error(
        "invalid system info {path}: {source} (expected {{\"domains\": {{NAME: {{\"type\": …}}}}}})"
    )]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error (with line and column).
        source: serde_json::Error,
    },
    /// A qube name that cannot be a qube name.
    #[error(
        "invalid qube name {name:?} in system info: a name must be non-empty, must not start with '@' and must not contain whitespace"
    )]
    BadName {
        /// The offending name.
        name: String,
    },
    /// A qube other than dom0 claims the admin VM's uuid.
    #[error(
        "qube {name:?} in system info has the uuid 00000000-0000-0000-0000-000000000000, which is the admin VM's (dom0)"
    )]
    AdminUuid {
        /// The offending qube.
        name: String,
    },
    /// Two qubes claim the same uuid.
    #[error("uuid {uuid} is given to both {first} and {second} in system info")]
    DuplicateUuid {
        /// The uuid.
        uuid: String,
        /// One qube.
        first: String,
        /// The other qube.
        second: String,
    },
}

impl SystemInfo {
    /// Build from `(name, domain)` pairs, checking names and uuids.
    pub fn new(
        domains: impl IntoIterator<Item = (String, Domain)>,
    ) -> Result<Self, SystemInfoError> {
        let domains: BTreeMap<String, Domain> = domains.into_iter().collect();
        let mut by_uuid = HashMap::new();
        for (name, domain) in &domains {
            if name.is_empty() || name.starts_with('@') || name.chars().any(char::is_whitespace) {
                return Err(SystemInfoError::BadName { name: name.clone() });
            }
            if let Some(uuid) = &domain.uuid
                && uuid == crate::token::ADMIN_UUID
                && name != "dom0"
            {
                return Err(SystemInfoError::AdminUuid { name: name.clone() });
            }
            if let Some(uuid) = &domain.uuid
                && let Some(first) = by_uuid.insert(uuid.clone(), name.clone())
            {
                return Err(SystemInfoError::DuplicateUuid {
                    uuid: uuid.clone(),
                    first,
                    second: name.clone(),
                });
            }
        }
        let any_internal = domains.values().any(|d| d.internal);
        Ok(SystemInfo {
            domains,
            by_uuid,
            any_internal,
        })
    }

    /// Parse the JSON format documented at the top of this module.
    pub fn from_json(path: &Path, text: &str) -> Result<Self, SystemInfoError> {
        let file: SystemInfoFile =
            serde_json::from_str(text).map_err(|source| SystemInfoError::Json {
                path: path.to_owned(),
                source,
            })?;
        SystemInfo::new(file.domains)
    }

    /// The qube called `name`.
    pub fn get(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name)
    }

    /// The qube called `name`, with its name as stored.
    pub fn get_key_value(&self, name: &str) -> Option<(&str, &Domain)> {
        self.domains
            .get_key_value(name)
            .map(|(n, d)| (n.as_str(), d))
    }

    /// Whether a qube called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.domains.contains_key(name)
    }

    /// Whether any qube is `internal` (lets `ask` skip that filter).
    pub fn any_internal(&self) -> bool {
        self.any_internal
    }

    /// The name of the qube with this uuid.
    pub fn name_by_uuid(&self, uuid: &str) -> Option<&str> {
        self.by_uuid.get(uuid).map(String::as_str)
    }

    /// All qubes, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Domain)> {
        self.domains.iter().map(|(n, d)| (n.as_str(), d))
    }

    /// Number of qubes.
    pub fn len(&self) -> usize {
        self.domains.len()
    }

    /// Whether there are no qubes at all.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

/// Where the policy gets the current [`SystemInfo`] from.
pub trait SystemInfoSource: Send + Sync {
    /// The current system info; an error makes every decision a deny.
    fn system_info(&self) -> Result<Arc<SystemInfo>, SystemInfoError>;
}

/// A fixed system info (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct StaticSystemInfo(pub Arc<SystemInfo>);

impl SystemInfoSource for StaticSystemInfo {
    fn system_info(&self) -> Result<Arc<SystemInfo>, SystemInfoError> {
        Ok(Arc::clone(&self.0))
    }
}

/// What identifies one version of a file on disk.
pub(crate) type FileStamp = Option<(u64, u64, SystemTime)>;

pub(crate) fn file_stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()?))
}

/// The JSON file, re-read whenever its inode, size or mtime changes.
///
/// Each call costs one `stat`; a file that became invalid is an error
/// (deny), it never falls back to an older copy of the qube list.
#[derive(Debug)]
pub struct JsonFileSystemInfo {
    path: PathBuf,
    cache: Mutex<Option<(FileStamp, Arc<SystemInfo>)>>,
}

impl JsonFileSystemInfo {
    /// Read qubes from `path` (not read until first used).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JsonFileSystemInfo {
            path: path.into(),
            cache: Mutex::new(None),
        }
    }

    /// The file this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl SystemInfoSource for JsonFileSystemInfo {
    fn system_info(&self) -> Result<Arc<SystemInfo>, SystemInfoError> {
        let stamp = file_stamp(&self.path);
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached_stamp, info)) = cache.as_ref()
            && stamp.is_some()
            && *cached_stamp == stamp
        {
            return Ok(Arc::clone(info));
        }
        let text = std::fs::read_to_string(&self.path).map_err(|source| SystemInfoError::Read {
            path: self.path.clone(),
            source,
        })?;
        let info = Arc::new(SystemInfo::from_json(&self.path, &text)?);
        *cache = Some((stamp, Arc::clone(&info)));
        Ok(info)
    }
}

/// What [`SystemInfoError::Json`] names when the JSON came from qubesd.
pub const QUBESD_LABEL: &str = "from qubesd (internal.GetSystemInfo)";

/// Qubes' own source: qubesd's `internal.GetSystemInfo`, asked afresh for
/// every decision (as Qubes' policy daemon does), so power states and new
/// disposables are always current. Any qubesd error is an error (deny).
#[derive(Debug, Clone)]
pub struct QubesdSystemInfo {
    qubesd: Qubesd,
}

impl QubesdSystemInfo {
    /// Ask the qubesd at these sockets.
    pub fn new(qubesd: Qubesd) -> Self {
        QubesdSystemInfo { qubesd }
    }

    /// The JSON text qubesd answered.
    pub fn fetch_text(&self) -> Result<String, SystemInfoError> {
        let reply = self.qubesd.get_system_info()?;
        String::from_utf8(reply).map_err(|_| {
            SystemInfoError::Qubesd(QubesdError::Protocol {
                method: qrexec::qubesd::GET_SYSTEM_INFO.to_string(),
                dest: "dom0".to_string(),
                what: "the system info is not UTF-8".to_string(),
            })
        })
    }
}

impl SystemInfoSource for QubesdSystemInfo {
    fn system_info(&self) -> Result<Arc<SystemInfo>, SystemInfoError> {
        let text = self.fetch_text()?;
        Ok(Arc::new(SystemInfo::from_json(
            Path::new(QUBESD_LABEL),
            &text,
        )?))
    }
}

/// Where the tools take the qube list from: qubesd (Qubes' way, the
/// default), or a static JSON file given with `--system-info` /
/// `QREXEC_SYSTEM_INFO` (tests, systems without qubesd).
#[derive(Debug, Clone)]
pub enum SystemInfoOrigin {
    /// `internal.GetSystemInfo`.
    Qubesd(Qubesd),
    /// A JSON file in the format above.
    File(PathBuf),
}

impl SystemInfoOrigin {
    /// The file if one is given, else qubesd at its sockets from the
    /// environment ([`Qubesd::from_env`]).
    pub fn from_option(file: Option<PathBuf>) -> Self {
        match file {
            Some(path) => SystemInfoOrigin::File(path),
            None => SystemInfoOrigin::Qubesd(Qubesd::from_env()),
        }
    }

    /// The policy's view of it.
    pub fn source(&self) -> Arc<dyn SystemInfoSource> {
        match self {
            SystemInfoOrigin::Qubesd(q) => Arc::new(QubesdSystemInfo::new(q.clone())),
            SystemInfoOrigin::File(path) => Arc::new(JsonFileSystemInfo::new(path)),
        }
    }

    /// The file, if the qube list comes from one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            SystemInfoOrigin::File(path) => Some(path),
            SystemInfoOrigin::Qubesd(_) => None,
        }
    }

    /// The raw JSON text (for the fields the policy itself does not use:
    /// `guivm`, `icon`, `label`), and what to call it in messages.
    pub fn fetch_text(&self) -> Result<(String, String), String> {
        match self {
            SystemInfoOrigin::Qubesd(q) => QubesdSystemInfo::new(q.clone())
                .fetch_text()
                .map(|t| (t, QUBESD_LABEL.to_string()))
                .map_err(|e| e.to_string()),
            SystemInfoOrigin::File(path) => std::fs::read_to_string(path)
                .map(|t| (t, path.display().to_string()))
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_format_with_defaults() {
        let text = r#"{"domains": {
            "dom0": {"type": "AdminVM", "power_state": "Running"},
            "work": {"type": "AppVM", "tags": ["t"], "default_dispvm": "dvm",
                     "uuid": "u-1", "icon": "ignored"},
            "dvm": {"type": "AppVM", "template_for_dispvms": true}
        }}"#;
        let info = SystemInfo::from_json(Path::new("x.json"), text).unwrap();
        assert_eq!(info.len(), 3);
        let work = info.get("work").unwrap();
        assert!(work.has_tag("t"));
        assert!(!work.is_running());
        assert_eq!(work.default_dispvm.as_deref(), Some("dvm"));
        assert_eq!(info.name_by_uuid("u-1"), Some("work"));
        assert!(info.get("dvm").unwrap().template_for_dispvms);
        assert!(info.get("dom0").unwrap().is_running());
    }

    #[test]
    fn rejects_bad_names_and_shapes() {
        let p = Path::new("x.json");
        assert!(matches!(
            SystemInfo::from_json(p, r#"{"domains": {"@anyvm": {"type": "AppVM"}}}"#),
            Err(SystemInfoError::BadName { .. })
        ));
        assert!(matches!(
            SystemInfo::from_json(p, r#"{"domains": {"": {"type": "AppVM"}}}"#),
            Err(SystemInfoError::BadName { .. })
        ));
        assert!(matches!(
            SystemInfo::from_json(p, r#"{"domains": {"a b": {"type": "AppVM"}}}"#),
            Err(SystemInfoError::BadName { .. })
        ));
        assert!(matches!(
            SystemInfo::from_json(p, r#"{"domains": {"a": {}}}"#),
            Err(SystemInfoError::Json { .. })
        ));
        assert!(matches!(
            SystemInfo::from_json(p, "[1,2"),
            Err(SystemInfoError::Json { .. })
        ));
        assert!(matches!(
            SystemInfo::from_json(
                p,
                r#"{"domains": {"a": {"type": "AppVM", "uuid": "x"}, "b": {"type": "AppVM", "uuid": "x"}}}"#
            ),
            Err(SystemInfoError::DuplicateUuid { .. })
        ));
        // only dom0 may carry the admin VM's uuid
        assert!(matches!(
            SystemInfo::from_json(
                p,
                r#"{"domains": {"work": {"type": "AppVM", "uuid": "00000000-0000-0000-0000-000000000000"}}}"#
            ),
            Err(SystemInfoError::AdminUuid { .. })
        ));
        let ok = SystemInfo::from_json(
            p,
            r#"{"domains": {"dom0": {"type": "AdminVM", "uuid": "00000000-0000-0000-0000-000000000000", "internal": false},
                "sys-usb": {"type": "AppVM", "internal": true}}}"#,
        )
        .unwrap();
        assert!(ok.get("sys-usb").unwrap().internal);
        assert!(!ok.get("dom0").unwrap().internal);
    }

    #[test]
    fn internal_is_true_as_in_python() {
        let p = Path::new("x.json");
        let internal = |v: &str| {
            SystemInfo::from_json(
                p,
                &format!(r#"{{"domains": {{"a": {{"type": "AppVM", "internal": {v}}}}}}}"#),
            )
            .unwrap()
            .get("a")
            .unwrap()
            .internal
        };
        for (value, expected) in [
            ("null", false),
            ("false", false),
            ("true", true),
            (r#""""#, false),
            (r#""1""#, true),
            (r#""0""#, true),
            ("0", false),
            ("1", true),
        ] {
            assert_eq!(internal(value), expected, "{value}");
        }
    }

    #[test]
    fn json_file_source_rereads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qubes.json");
        std::fs::write(&path, r#"{"domains": {"a": {"type": "AppVM"}}}"#).unwrap();
        let source = JsonFileSystemInfo::new(&path);
        assert!(source.system_info().unwrap().contains("a"));
        std::fs::write(
            &path,
            r#"{"domains": {"a": {"type": "AppVM"}, "bb": {"type": "AppVM"}}}"#,
        )
        .unwrap();
        assert!(source.system_info().unwrap().contains("bb"));
        std::fs::write(&path, "garbage").unwrap();
        assert!(source.system_info().is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            source.system_info(),
            Err(SystemInfoError::Read { .. })
        ));
    }
}
