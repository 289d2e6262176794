//! `xen-config/install-qubes.sh` against the project's fake dom0 tools
//! (`packaging/fake-qubes/fake-qvm`, linked as `qvm-prefs`, `qvm-create`,
//! …), which record every call and refuse what qubesd refuses.
//!
//! Each test builds a small Qubes system in a temporary directory (sys-net,
//! a Linux sys-firewall, two clients, one following `default_netvm`), a
//! release directory with `vmlinuz`, `initramfs` and `SHA256SUMS`, and runs
//! the script with the fakes first on `PATH`. A fresh install, a second run,
//! an upgrade and a roll-back must each make exactly the expected calls; a
//! wrong hash or a missing file must stop before any call or file change.
//! Needs only bash and coreutils (no root).

#![allow(clippy::unwrap_used)] // reason: test code

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOOLS: [&str; 8] = [
    "qvm-check",
    "qvm-create",
    "qvm-prefs",
    "qvm-features",
    "qvm-ls",
    "qvm-start",
    "qvm-shutdown",
    "qubes-prefs",
];

fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap().to_path_buf()
}

/// A fake dom0: tool links, state, kernels directory and release directory.
struct Dom0 {
    dir: PathBuf,
}

impl Dom0 {
    fn new(test: &str) -> Dom0 {
        let dir =
            std::env::temp_dir().join(format!("qubes-install-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["bin", "kernels", "release", "state/global"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let fake = root().join("packaging/fake-qubes/fake-qvm");
        for tool in TOOLS {
            std::os::unix::fs::symlink(&fake, dir.join("bin").join(tool)).unwrap();
        }
        let dom0 = Dom0 { dir };
        dom0.vm("sys-net", &[("provides_network", "True"), ("netvm", "")]);
        dom0.vm(
            "sys-firewall",
            &[("provides_network", "True"), ("netvm", "sys-net")],
        );
        dom0.vm("personal", &[("netvm", "sys-firewall")]);
        dom0.vm("work", &[]); // follows default_netvm
        dom0.vm("vault", &[("netvm", "")]);
        for (key, value) in [
            ("default_netvm", "sys-firewall"),
            ("updatevm", "sys-firewall"),
            ("clockvm", "sys-net"),
            ("default_dispvm", "default-dvm"),
            ("default_audiovm", "dom0"),
        ] {
            std::fs::write(
                dom0.dir.join("state/global").join(key),
                format!("{value}\n"),
            )
            .unwrap();
        }
        dom0.release(b"\x7fELF first image");
        dom0
    }

    fn vm(&self, name: &str, prefs: &[(&str, &str)]) {
        let vm = self.dir.join("state/vms").join(name);
        std::fs::create_dir_all(vm.join("prefs")).unwrap();
        std::fs::create_dir_all(vm.join("features")).unwrap();
        for (key, value) in prefs {
            std::fs::write(vm.join("prefs").join(key), format!("{value}\n")).unwrap();
        }
    }

    /// Writes a release directory holding `image` as vmlinuz.
    fn release(&self, image: &[u8]) {
        let release = self.dir.join("release");
        std::fs::write(release.join("vmlinuz"), image).unwrap();
        std::fs::write(release.join("initramfs"), b"").unwrap();
        let sums = Command::new("sha256sum")
            .current_dir(&release)
            .args(["vmlinuz", "initramfs"])
            .output()
            .unwrap();
        assert!(sums.status.success());
        std::fs::write(release.join("SHA256SUMS"), sums.stdout).unwrap();
    }

    /// Runs the install script; returns its output and the calls it made
    /// (and forgets them, so the next run starts a new list).
    fn run(&self, args: &[&str]) -> (Output, Vec<String>) {
        let mut command = Command::new("bash");
        command
            .arg(root().join("xen-config/install-qubes.sh"))
            .args(args);
        self.run_command(command)
    }

    fn run_command(&self, mut command: Command) -> (Output, Vec<String>) {
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = command
            .env("PATH", path)
            .env("FAKE_QUBES", self.dir.join("state"))
            .env("FAKE_QUBES_KERNELS", self.dir.join("kernels"))
            .env("QUBES_KERNELS_DIR", self.dir.join("kernels"))
            .output()
            .unwrap();
        let calls_file = self.dir.join("state/calls");
        let calls = std::fs::read_to_string(&calls_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        let _ = std::fs::remove_file(calls_file);
        (output, calls)
    }

    fn release_arg(&self) -> String {
        self.dir.join("release").display().to_string()
    }

    /// Every file of the fake system (qube state and kernels directory).
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    out.insert(path.clone(), Vec::new());
                    walk(&path, out);
                } else {
                    out.insert(path.clone(), std::fs::read(&path).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.dir.join("state"), &mut out);
        walk(&self.dir.join("kernels"), &mut out);
        out
    }

    fn pref(&self, vm: &str, key: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join("state/vms").join(vm).join("prefs").join(key))
            .ok()
            .map(|value| value.trim_end().to_string())
    }

    fn global(&self, key: &str) -> String {
        std::fs::read_to_string(self.dir.join("state/global").join(key))
            .unwrap()
            .trim_end()
            .to_string()
    }

    fn kernel_file(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join("kernels/qubes-firewall").join(name)).ok()
    }
}

impl Drop for Dom0 {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "install-qubes.sh failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect()
}

/// The checks every install run makes when the qube exists already, then
/// the reads of each property and feature.
const SECOND_RUN: &str = "
    qvm-check --quiet sys-firewall-rs
    qvm-prefs sys-firewall-rs kernel
    qubes-prefs updatevm
    qubes-prefs clockvm
    qvm-check --quiet sys-net
    qvm-prefs sys-firewall-rs virt_mode
    qvm-prefs sys-firewall-rs kernel
    qvm-prefs sys-firewall-rs kernelopts
    qvm-prefs sys-firewall-rs memory
    qvm-prefs sys-firewall-rs maxmem
    qvm-prefs sys-firewall-rs vcpus
    qvm-prefs sys-firewall-rs provides_network
    qvm-prefs sys-firewall-rs netvm
    qvm-prefs sys-firewall-rs audiovm
    qvm-prefs sys-firewall-rs default_dispvm
    qvm-features sys-firewall-rs qubes-firewall
    qvm-features sys-firewall-rs no-default-kernelopts
    qvm-features sys-firewall-rs skip-update
";

const FRESH_INSTALL: &str = "
    qvm-check --quiet sys-firewall-rs
    qubes-prefs updatevm
    qubes-prefs clockvm
    qvm-check --quiet sys-net
    qvm-check --quiet sys-firewall
    qvm-create --class StandaloneVM --label green --property virt_mode=pvh --property kernel=qubes-firewall --property kernelopts= --property memory=32 --property maxmem=32 --property vcpus=1 --property provides_network=True --property netvm=sys-net sys-firewall-rs
    qvm-prefs sys-firewall-rs virt_mode
    qvm-prefs sys-firewall-rs kernel
    qvm-prefs sys-firewall-rs kernelopts
    qvm-prefs sys-firewall-rs memory
    qvm-prefs sys-firewall-rs maxmem
    qvm-prefs sys-firewall-rs vcpus
    qvm-prefs sys-firewall-rs provides_network
    qvm-prefs sys-firewall-rs netvm
    qvm-prefs sys-firewall-rs audiovm
    qvm-prefs sys-firewall-rs audiovm ''
    qvm-prefs sys-firewall-rs default_dispvm
    qvm-prefs sys-firewall-rs default_dispvm ''
    qvm-features sys-firewall-rs qubes-firewall
    qvm-features sys-firewall-rs qubes-firewall 1
    qvm-features sys-firewall-rs no-default-kernelopts
    qvm-features sys-firewall-rs no-default-kernelopts 1
    qvm-features sys-firewall-rs skip-update
    qvm-features sys-firewall-rs skip-update 1
    qvm-start --skip-if-running sys-firewall-rs
    qvm-start sys-net
    qubes-prefs default_netvm
    qubes-prefs default_netvm sys-firewall-rs
    qvm-ls --raw-data --fields NAME\\,NETVM
    qvm-prefs personal netvm sys-firewall-rs
";

fn fresh_install(dom0: &Dom0) {
    let release = dom0.release_arg();
    let (output, calls) = dom0.run(&["--switch-clients", "sys-firewall", &release]);
    ok(&output);
    assert_eq!(calls, lines(FRESH_INSTALL));
}

#[test]
fn fresh_install_makes_the_qube_with_every_property_and_switches_clients() {
    let dom0 = Dom0::new("fresh");
    fresh_install(&dom0);
    for (key, value) in [
        ("virt_mode", "pvh"),
        ("kernel", "qubes-firewall"),
        ("kernelopts", ""),
        ("memory", "32"),
        ("maxmem", "32"),
        ("vcpus", "1"),
        ("provides_network", "True"),
        ("netvm", "sys-net"),
        ("audiovm", ""),
        ("default_dispvm", ""),
        ("label", "green"),
    ] {
        assert_eq!(
            dom0.pref("sys-firewall-rs", key).as_deref(),
            Some(value),
            "{key}"
        );
    }
    for feature in ["qubes-firewall", "no-default-kernelopts", "skip-update"] {
        let value = std::fs::read_to_string(
            dom0.dir
                .join("state/vms/sys-firewall-rs/features")
                .join(feature),
        )
        .unwrap();
        assert_eq!(value.trim_end(), "1", "{feature}");
    }
    assert_eq!(
        dom0.kernel_file("vmlinuz").as_deref(),
        Some(b"\x7fELF first image".as_slice())
    );
    assert_eq!(
        dom0.kernel_file("initramfs").as_deref(),
        Some(b"".as_slice())
    );
    // personal was moved explicitly, work follows default_netvm, vault has
    // no network; the UpdateVM stays the Linux sys-firewall.
    assert_eq!(
        dom0.pref("personal", "netvm").as_deref(),
        Some("sys-firewall-rs")
    );
    assert_eq!(dom0.pref("work", "netvm"), None);
    assert_eq!(dom0.pref("vault", "netvm").as_deref(), Some(""));
    assert_eq!(dom0.global("default_netvm"), "sys-firewall-rs");
    assert_eq!(dom0.global("updatevm"), "sys-firewall");
}

#[test]
fn a_second_run_changes_nothing() {
    let dom0 = Dom0::new("second");
    fresh_install(&dom0);
    let before = dom0.snapshot();
    let (output, calls) = dom0.run(&[&dom0.release_arg()]);
    ok(&output);
    assert_eq!(calls, lines(SECOND_RUN));
    assert_eq!(dom0.snapshot(), before);
}

#[test]
fn an_upgrade_replaces_the_kernel_only() {
    let dom0 = Dom0::new("upgrade");
    fresh_install(&dom0);
    let mut before = dom0.snapshot();
    dom0.release(b"\x7fELF second image");
    let (output, calls) = dom0.run(&[&dom0.release_arg()]);
    ok(&output);
    assert_eq!(calls, lines(SECOND_RUN));
    assert_eq!(
        dom0.kernel_file("vmlinuz").as_deref(),
        Some(b"\x7fELF second image".as_slice())
    );
    assert_eq!(
        dom0.kernel_file("vmlinuz.previous").as_deref(),
        Some(b"\x7fELF first image".as_slice())
    );
    // Nothing else changed: the same files, the kernel aside.
    let kernels = dom0.dir.join("kernels/qubes-firewall");
    before.insert(kernels.join("vmlinuz"), b"\x7fELF second image".to_vec());
    before.insert(
        kernels.join("vmlinuz.previous"),
        b"\x7fELF first image".to_vec(),
    );
    assert_eq!(dom0.snapshot(), before);
}

#[test]
fn a_rollback_moves_the_clients_back_and_stops_the_firewall() {
    let dom0 = Dom0::new("rollback");
    fresh_install(&dom0);
    let (output, calls) = dom0.run(&["--rollback", "sys-firewall"]);
    ok(&output);
    assert_eq!(
        calls,
        lines(
            "
            qvm-check --quiet sys-firewall-rs
            qvm-check --quiet sys-firewall
            qvm-prefs sys-firewall provides_network
            qvm-start --skip-if-running sys-firewall
            qubes-prefs default_netvm
            qubes-prefs default_netvm sys-firewall
            qvm-ls --raw-data --fields NAME\\,NETVM
            qvm-prefs personal netvm sys-firewall
            qvm-shutdown --wait sys-firewall-rs
            "
        )
    );
    assert_eq!(
        dom0.pref("personal", "netvm").as_deref(),
        Some("sys-firewall")
    );
    assert_eq!(dom0.pref("work", "netvm"), None);
    assert_eq!(dom0.global("default_netvm"), "sys-firewall");
    assert!(!dom0.dir.join("state/vms/sys-firewall-rs/running").exists());
    assert!(dom0.dir.join("state/vms/sys-firewall/running").exists());
}

/// Runs the script on a broken release: it must fail, name the problem,
/// and have made no call and changed no file.
fn refused_before_any_change(dom0: &Dom0, expected: &str) {
    let before = dom0.snapshot();
    let (output, calls) = dom0.run(&[&dom0.release_arg()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted a broken release");
    assert!(stderr.contains(expected), "{stderr}");
    assert_eq!(calls, Vec::<String>::new());
    assert_eq!(dom0.snapshot(), before);
}

#[test]
fn a_wrong_hash_stops_before_any_change() {
    let dom0 = Dom0::new("hash");
    std::fs::write(dom0.dir.join("release/vmlinuz"), b"\x7fELF tampered").unwrap();
    refused_before_any_change(&dom0, "vmlinuz: SHA-256");
    // Also on an installed system: the old kernel stays.
    dom0.release(b"\x7fELF first image");
    fresh_install(&dom0);
    std::fs::write(dom0.dir.join("release/initramfs"), b"x").unwrap();
    refused_before_any_change(&dom0, "initramfs: SHA-256");
}

#[test]
fn a_missing_file_stops_before_any_change() {
    for missing in ["vmlinuz", "initramfs", "SHA256SUMS"] {
        let dom0 = Dom0::new(&format!("missing-{missing}"));
        std::fs::remove_file(dom0.dir.join("release").join(missing)).unwrap();
        refused_before_any_change(&dom0, &format!("{missing} is missing"));
    }
    // Present but not listed in SHA256SUMS.
    let dom0 = Dom0::new("unlisted");
    std::fs::write(
        dom0.dir.join("release/SHA256SUMS"),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  initramfs\n",
    )
    .unwrap();
    refused_before_any_change(&dom0, "vmlinuz is not listed");
}

#[test]
fn refuses_to_take_over_a_qube_it_did_not_make() {
    let dom0 = Dom0::new("takeover");
    dom0.vm("sys-firewall-rs", &[("kernel", "6.6.63-1.fc37")]);
    let before = dom0.snapshot();
    let (output, calls) = dom0.run(&[&dom0.release_arg()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not made by this script"));
    assert_eq!(
        calls,
        lines("qvm-check --quiet sys-firewall-rs\nqvm-prefs sys-firewall-rs kernel")
    );
    assert_eq!(dom0.snapshot(), before);
    // Nor may the firewall be the UpdateVM (or the ClockVM).
    std::fs::write(dom0.dir.join("state/global/updatevm"), "sys-fw-new\n").unwrap();
    let before = dom0.snapshot();
    let (output, _) = dom0.run(&["--name", "sys-fw-new", &dom0.release_arg()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is the updatevm"));
    assert_eq!(dom0.snapshot(), before);
}

/// The fakes must refuse what qubesd refuses, or the tests above would
/// pass a script Qubes rejects.
#[test]
fn the_fakes_refuse_what_qubes_refuses() {
    let dom0 = Dom0::new("fakes");
    let run = |args: &[&str]| {
        Command::new(dom0.dir.join("bin").join(args[0]))
            .args(&args[1..])
            .env("FAKE_QUBES", dom0.dir.join("state"))
            .env("FAKE_QUBES_KERNELS", dom0.dir.join("kernels"))
            .output()
            .unwrap()
    };
    for bad in [
        &["qvm-prefs", "work", "no_such_property"][..],
        &["qvm-prefs", "work", "no_such_property", "1"],
        &["qvm-prefs", "work", "virt_mode", "pvhx"],
        &["qvm-prefs", "work", "memory", "0"],
        &["qvm-prefs", "work", "vcpus", "one"],
        &["qvm-prefs", "work", "provides_network", "maybe"],
        &["qvm-prefs", "work", "netvm", "no-such-qube"],
        &["qvm-prefs", "work", "netvm", "vault"], // provides no network
        &["qvm-prefs", "work", "kernel", "../x"],
        &["qvm-prefs", "no-such-qube", "memory"],
        &["qvm-features", "no-such-qube", "skip-update", "1"],
        &[
            "qvm-create",
            "--class",
            "StandaloneVM",
            "--label",
            "green",
            "work",
        ],
        &[
            "qvm-create",
            "--class",
            "StandaloneVM",
            "--label",
            "green",
            "--property",
            "memroy=32",
            "new",
        ],
        &[
            "qvm-create",
            "--class",
            "StandaloneVM",
            "--label",
            "pink",
            "new",
        ],
        &["qubes-prefs", "default_netvm", "vault"],
        &["qvm-start", "no-such-qube"],
    ] {
        let output = run(bad);
        assert_eq!(output.status.code(), Some(1), "{bad:?} was accepted");
        assert!(!output.stderr.is_empty(), "{bad:?}: no message");
    }
    assert!(!dom0.dir.join("state/vms/new").exists());
    let output = run(&["qvm-prefs", "work", "memory", "64"]);
    assert!(output.status.success());
    assert_eq!(dom0.pref("work", "memory").as_deref(), Some("64"));
    // A running client cannot move to a stopped netvm; a netvm with running
    // clients cannot shut down.
    assert!(run(&["qvm-start", "personal"]).status.success());
    assert!(
        run(&["qvm-shutdown", "--wait", "sys-firewall"])
            .status
            .code()
            == Some(1)
    );
    dom0.vm("fw2", &[("provides_network", "True")]);
    assert_eq!(
        run(&["qvm-prefs", "personal", "netvm", "fw2"])
            .status
            .code(),
        Some(1)
    );
}

/// The install, switch and roll-back commands of `xen-config/README.md`,
/// run in the order the README gives them, from the release directory as
/// the README says (the script found next to `vmlinuz`).
#[test]
fn the_readme_commands_work_in_order() {
    let readme = std::fs::read_to_string(root().join("xen-config/README.md")).unwrap();
    let commands: Vec<&str> = readme
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("bash install-qubes.sh"))
        .collect();
    assert!(
        commands.iter().any(|c| c.contains("--switch-clients"))
            && commands.iter().any(|c| c.contains("--rollback")),
        "{commands:?}"
    );
    let dom0 = Dom0::new("readme");
    let release = dom0.dir.join("release");
    std::fs::copy(
        root().join("xen-config/install-qubes.sh"),
        release.join("install-qubes.sh"),
    )
    .unwrap();
    for line in &commands {
        let mut words = line.split_whitespace();
        let mut command = Command::new(words.next().unwrap());
        command.args(words).current_dir(&release);
        let (output, calls) = dom0.run_command(command);
        ok(&output);
        assert!(!calls.is_empty(), "{line}");
    }
    // Installed, switched, rolled back: the clients are where they began.
    assert_eq!(
        dom0.pref("sys-firewall-rs", "kernel").as_deref(),
        Some("qubes-firewall")
    );
    assert_eq!(
        dom0.pref("personal", "netvm").as_deref(),
        Some("sys-firewall")
    );
    assert_eq!(dom0.global("default_netvm"), "sys-firewall");
    assert!(!dom0.dir.join("state/vms/sys-firewall-rs/running").exists());
}
