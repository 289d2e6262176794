//! Shared fixtures for the integration tests: a temporary "dom0" with a
//! policy directory, a legacy directory and a qubes.json.

#![allow(dead_code)] // reason: each test binary uses a different subset.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const QUBES_JSON: &str = r#"{"domains": {
    "dom0": {"type": "AdminVM", "power_state": "Running"},
    "work": {"type": "AppVM", "tags": ["work"], "default_dispvm": "dvm",
             "power_state": "Running", "uuid": "5f2c0ad1-0000-4000-8000-000000000001"},
    "personal": {"type": "AppVM", "power_state": "Running"},
    "vault": {"type": "AppVM", "tags": ["work"], "power_state": "Halted"},
    "dvm": {"type": "AppVM", "template_for_dispvms": true, "power_state": "Halted"},
    "sys-net": {"type": "AppVM", "power_state": "Running"}
}}"#;

pub struct Dom0 {
    pub dir: tempfile::TempDir,
}

impl Dom0 {
    pub fn new() -> Dom0 {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("policy.d")).unwrap();
        fs::create_dir_all(dir.path().join("legacy")).unwrap();
        fs::write(dir.path().join("qubes.json"), QUBES_JSON).unwrap();
        Dom0 { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.path("policy.d")
    }

    pub fn legacy_dir(&self) -> PathBuf {
        self.path("legacy")
    }

    pub fn qubes_json(&self) -> PathBuf {
        self.path("qubes.json")
    }

    /// Write a file atomically (write + rename), as editors and
    /// qubes-policy-admin do, so a watcher never sees half a file.
    pub fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        let tmp = path.with_extension("tmp-write");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &path).unwrap();
    }

    /// An executable shell script.
    pub fn script(&self, rel: &str, body: &str) -> PathBuf {
        let path = self.path(rel);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

pub fn read_to_string(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}
