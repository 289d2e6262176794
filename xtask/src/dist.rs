//! `cargo xtask dist`: the release directory a Qubes user installs from,
//! `target/dist/qubes-firewall-rs-VERSION/`:
//!
//! - `vmlinuz` — the firewall image (as `cargo xtask image` builds it);
//! - `initramfs` — an empty gzip stream (Qubes passes the file as the
//!   domain's ramdisk when it exists; the firewall reads none);
//! - `install-qubes.sh` — the dom0 install script (`xen-config/`);
//! - `qubes-rs-VERSION.tar.gz` — the release tarball: the dom0 and
//!   Linux-qube programs (built `--release` with `--features xen`), their
//!   systemd units and scripts (`packaging/`) and the RPM spec, so that
//!   `rpmbuild -tb --nodeps` builds the RPMs from it;
//! - `qubes-rs-{qubesdb,dom0,vm}-VERSION-1.x86_64.rpm` — built so;
//! - `qubes-rs-vm_VERSION_amd64.deb` — the Linux-qube programs for Debian
//!   templates (`dpkg-deb`);
//! - `SHA256SUMS` — of every other file.
//!
//! Every byte is reproducible: time stamps are the commit's
//! (`SOURCE_DATE_EPOCH`, or the last commit's date), owners root, archive
//! members sorted; rpmbuild takes its dates from the spec's changelog
//! entry, which carries the same time. Run as root it installs what it
//! needs (`libxen-dev`, `rpm`) with apt-get.
//!
//! The package layout is [`LAYOUT`]; the RPM spec
//! (`packaging/rpm/qubes-rs.spec.in`) is written by hand and the test
//! `packages_build_and_pass_the_checks` compares what rpmbuild produced with
//! [`LAYOUT`], runs lintian on the .deb and `systemd-analyze verify` on the
//! units (as root; built from the debug programs, so it stays quick).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bench::{ensure_tools, require_root};
use crate::{run_command, workspace_root};

/// The release's version (the workspace's crates share it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Which package a file belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Package {
    /// qubes-rs-qubesdb: QubesDB daemon and tools (dom0 and qubes).
    Qubesdb,
    /// qubes-rs-dom0.
    Dom0,
    /// qubes-rs-vm (and, with the QubesDB files, the .deb).
    Vm,
}

/// What is installed at a path.
#[derive(Clone, Copy, Debug)]
pub enum Item {
    /// A file of the release tarball (path inside it), with its mode.
    File(&'static str, u32),
    /// A symbolic link to this target.
    Link(&'static str),
    /// A directory.
    Dir,
}

/// Every installed path of the packages: Qubes' own places.
pub const LAYOUT: &[(Package, &str, Item)] = &[
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-daemon",
        Item::File("bin/qubesdb-daemon", 0o755),
    ),
    (
        Package::Qubesdb,
        "/usr/sbin/qubesdb-daemon",
        Item::Link("../bin/qubesdb-daemon"),
    ),
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-read",
        Item::File("bin/qubesdb-read", 0o755),
    ),
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-write",
        Item::File("bin/qubesdb-write", 0o755),
    ),
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-rm",
        Item::File("bin/qubesdb-rm", 0o755),
    ),
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-list",
        Item::File("bin/qubesdb-list", 0o755),
    ),
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-multiread",
        Item::File("bin/qubesdb-multiread", 0o755),
    ),
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-watch",
        Item::File("bin/qubesdb-watch", 0o755),
    ),
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-cmd",
        Item::File("bin/qubesdb-cmd", 0o755),
    ),
    (
        Package::Qubesdb,
        "/usr/bin/qubesdb-read-bool",
        Item::File("scripts/qubesdb-read-bool", 0o755),
    ),
    (
        Package::Dom0,
        "/usr/sbin/qrexec-daemon",
        Item::File("bin/qrexec-daemon", 0o755),
    ),
    (
        Package::Dom0,
        "/usr/bin/qrexec-client",
        Item::File("bin/qrexec-client", 0o755),
    ),
    (
        Package::Dom0,
        "/usr/lib/qubes/qrexec-client",
        Item::Link("../../bin/qrexec-client"),
    ),
    (Package::Dom0, "/usr/lib/qubes-rs", Item::Dir),
    (
        Package::Dom0,
        "/usr/lib/qubes-rs/qrexec-policy-daemon",
        Item::File("bin/qrexec-policy-daemon", 0o755),
    ),
    (
        Package::Dom0,
        "/usr/lib/qubes-rs/qrexec-policy-exec",
        Item::File("bin/qrexec-policy-exec", 0o755),
    ),
    (
        Package::Dom0,
        "/usr/lib/systemd/system/qubes-qrexec-policy-daemon.service",
        Item::File("systemd/dom0/qubes-qrexec-policy-daemon.service", 0o644),
    ),
    (
        Package::Dom0,
        "/usr/lib/systemd/system/qubes-db-dom0.service",
        Item::File("systemd/dom0/qubes-db-dom0.service", 0o644),
    ),
    (
        Package::Dom0,
        "/usr/lib/tmpfiles.d/qrexec.conf",
        Item::File("scripts/qrexec.tmpfiles", 0o644),
    ),
    (
        Package::Dom0,
        "/usr/lib/qubes-rs/qubes-policy-admin",
        Item::File("bin/qubes-policy-admin", 0o755),
    ),
    (Package::Dom0, "/etc/qubes/policy.d", Item::Dir),
    (Package::Dom0, "/etc/qubes/policy.d/include", Item::Dir),
    (
        Package::Dom0,
        "/etc/qubes/policy.d/90-admin-policy-default.policy",
        Item::File("policy/90-admin-policy-default.policy", 0o644),
    ),
    (
        Package::Dom0,
        "/etc/qubes/policy.d/include/admin-policy-ro",
        Item::File("policy/include/admin-policy-ro", 0o644),
    ),
    (
        Package::Dom0,
        "/etc/qubes/policy.d/include/admin-policy-rwx",
        Item::File("policy/include/admin-policy-rwx", 0o644),
    ),
    (Package::Dom0, "/etc/qubes-rpc", Item::Dir),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.List",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.Get",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.Replace",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.Remove",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.GetFiles",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.include.List",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.include.Get",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.include.Replace",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Dom0,
        "/etc/qubes-rpc/policy.include.Remove",
        Item::Link("../../usr/lib/qubes-rs/qubes-policy-admin"),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes/qrexec-agent",
        Item::File("bin/qrexec-agent", 0o755),
    ),
    (
        Package::Vm,
        "/usr/bin/qrexec-client-vm",
        Item::File("bin/qrexec-client-vm", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes/qrexec-client-vm",
        Item::Link("../../bin/qrexec-client-vm"),
    ),
    (
        Package::Vm,
        "/usr/bin/qrexec-fork-server",
        Item::File("bin/qrexec-fork-server", 0o755),
    ),
    (Package::Vm, "/usr/lib/qubes-rs", Item::Dir),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/with-domid",
        Item::File("scripts/with-domid", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/qfile-agent",
        Item::File("bin/qfile-agent", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/qfile-unpacker",
        Item::File("bin/qfile-unpacker", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/qopen-in-vm",
        Item::File("bin/qopen-in-vm", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/vm-file-editor",
        Item::File("bin/vm-file-editor", 0o755),
    ),
    (Package::Vm, "/usr/lib/qubes-rs/bin", Item::Dir),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/bin/qvm-copy",
        Item::File("bin/qvm-copy", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/bin/qvm-copy-to-vm",
        Item::File("bin/qvm-copy-to-vm", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/bin/qvm-move",
        Item::File("bin/qvm-move", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/bin/qvm-move-to-vm",
        Item::File("bin/qvm-move-to-vm", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/bin/qvm-open-in-vm",
        Item::File("bin/qvm-open-in-vm", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/bin/qvm-open-in-dvm",
        Item::File("bin/qvm-open-in-dvm", 0o755),
    ),
    (Package::Vm, "/usr/lib/qubes-rs/qubes-rpc", Item::Dir),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/qubes-rpc/qubes.Filecopy",
        Item::File("qubes-rpc/qubes.Filecopy", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/qubes-rs/qubes-rpc/qubes.OpenInVM",
        Item::File("qubes-rpc/qubes.OpenInVM", 0o755),
    ),
    (
        Package::Vm,
        "/usr/lib/systemd/system/qubes-qrexec-agent.service",
        Item::File("systemd/vm/qubes-qrexec-agent.service", 0o644),
    ),
    (
        Package::Vm,
        "/usr/lib/systemd/system/qubes-db.service",
        Item::File("systemd/vm/qubes-db.service", 0o644),
    ),
];

/// The programs the packages carry (`bin/` of the tarball).
pub const PROGRAMS: &[&str] = &[
    "qfile-agent",
    "qfile-unpacker",
    "qopen-in-vm",
    "qrexec-agent",
    "qrexec-client",
    "qrexec-client-vm",
    "qrexec-daemon",
    "qrexec-fork-server",
    "qrexec-policy-daemon",
    "qrexec-policy-exec",
    "qubes-policy-admin",
    "qubesdb-cmd",
    "qubesdb-daemon",
    "qubesdb-list",
    "qubesdb-multiread",
    "qubesdb-read",
    "qubesdb-rm",
    "qubesdb-watch",
    "qubesdb-write",
    "qvm-copy",
    "qvm-copy-to-vm",
    "qvm-move",
    "qvm-move-to-vm",
    "qvm-open-in-dvm",
    "qvm-open-in-vm",
    "vm-file-editor",
];

/// `gzip -n` of nothing: the empty initramfs.
const EMPTY_GZIP: [u8; 20] = [
    0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The Debian package: the Linux-qube programs, standing in for Qubes'
/// qubes-core-qrexec, qubesdb and qubesdb-vm.
const DEB_NAME: &str = "qubes-rs-vm";
const DEB_STANDS_FOR: &[(&str, &str)] = &[
    ("qubes-core-qrexec", "4.4.99"),
    ("qubesdb", "4.3.99"),
    ("qubesdb-vm", "4.3.99"),
];
const DEB_UNITS: &[&str] = &["qubes-db.service", "qubes-qrexec-agent.service"];

const PROFILE_CONFIG: [&str; 4] = [
    "profile.dist.inherits=\"release\"",
    "profile.dist.debug=false",
    "profile.dist.strip=true",
    "profile.dist.lto=true",
];

pub fn run(args: &[String]) -> Result<(), String> {
    if !args.is_empty() {
        return Err("usage: cargo xtask dist".to_string());
    }
    let root = workspace_root();
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let epoch = source_date_epoch(&root)?;
    let as_root = require_root().is_ok();
    if !Path::new("/usr/include/libxenvchan.h").exists() {
        if !as_root {
            return Err("the dom0 programs link Xen's libxenvchan: apt-get install libxen-dev (or run as root)".into());
        }
        ensure_package("libxen-dev")?;
    }
    if as_root {
        ensure_tools(&[
            ("rpmbuild", "rpm"),
            ("dpkg-deb", "dpkg"),
            ("strip", "binutils"),
        ])?;
    }

    let image = crate::image::build(&root, &target_dir.join("dist-image"))?;
    let image_bytes =
        std::fs::read(&image).map_err(|e| format!("cannot read {}: {e}", image.display()))?;
    crate::image::check_elf(&image_bytes).map_err(|e| format!("{}: {e}", image.display()))?;

    let build_dir = target_dir.join("dist-build");
    let mut command = Command::new("cargo");
    command.current_dir(&root).arg("build");
    for config in PROFILE_CONFIG {
        command.args(["--config", config]);
    }
    command
        .args([
            "--profile",
            "dist",
            "-p",
            "qrexec",
            "-p",
            "qubesdb",
            "-p",
            "qrexec-policy",
            "-p",
            "qubes-filecopy",
        ])
        .args(["--features", "qrexec/xen,qubesdb/xen", "--bins", "--locked"])
        .arg("--target-dir")
        .arg(&build_dir);
    run_command(&mut command)?;

    let out = target_dir
        .join("dist")
        .join(format!("qubes-firewall-rs-{VERSION}"));
    if out.exists() {
        std::fs::remove_dir_all(&out)
            .map_err(|e| format!("cannot empty {}: {e}", out.display()))?;
    }
    mkdir(&out)?;
    write(&out.join("vmlinuz"), &image_bytes, 0o644)?;
    write(&out.join("initramfs"), &EMPTY_GZIP, 0o644)?;
    copy(
        &root.join("xen-config/install-qubes.sh"),
        &out.join("install-qubes.sh"),
        0o755,
    )?;

    let work = target_dir.join("dist-work");
    let packages = build_packages(&root, &build_dir.join("dist"), &work, &out, epoch, false)?;
    for package in [&packages.tarball, &packages.deb]
        .into_iter()
        .chain(&packages.rpms)
    {
        println!("xtask dist: built {}", package.display());
    }
    println!("xtask dist: package trees in {}", packages.work.display());

    let mut names: Vec<String> = std::fs::read_dir(&out)
        .map_err(|e| format!("cannot list {}: {e}", out.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let sums = Command::new("sha256sum")
        .current_dir(&out)
        .args(&names)
        .output()
        .map_err(|e| format!("cannot run sha256sum: {e}"))?;
    if !sums.status.success() {
        return Err(format!(
            "sha256sum failed: {}",
            String::from_utf8_lossy(&sums.stderr)
        ));
    }
    write(&out.join("SHA256SUMS"), &sums.stdout, 0o644)?;
    println!("xtask dist: {} (SOURCE_DATE_EPOCH={epoch})", out.display());
    for line in String::from_utf8_lossy(&sums.stdout).lines() {
        let (hash, name) = line.split_once("  ").unwrap_or((line, ""));
        let size = std::fs::metadata(out.join(name))
            .map(|m| m.len())
            .unwrap_or(0);
        println!("  {size:>10}  {hash}  {name}");
    }
    Ok(())
}

/// What [`build_packages`] made.
#[derive(Debug)]
pub struct Packages {
    /// The release tarball.
    pub tarball: PathBuf,
    /// The .deb.
    pub deb: PathBuf,
    /// The RPMs.
    pub rpms: Vec<PathBuf>,
    /// Scratch space: `installed/` holds every [`LAYOUT`] path installed
    /// (for `systemd-analyze`), `deb/` the .deb's tree.
    pub work: PathBuf,
}

/// Builds the release tarball, the .deb and the RPMs into `out` from the
/// programs in `bin_dir` (stripped copies when `strip`), using `work` as
/// scratch space.
pub fn build_packages(
    root: &Path,
    bin_dir: &Path,
    work: &Path,
    out: &Path,
    epoch: u64,
    strip: bool,
) -> Result<Packages, String> {
    if work.exists() {
        std::fs::remove_dir_all(work)
            .map_err(|e| format!("cannot empty {}: {e}", work.display()))?;
    }
    let name = format!("qubes-rs-{VERSION}");
    let tree = work.join("tarball").join(&name);
    mkdir(&tree.join("bin"))?;
    for program in PROGRAMS {
        let from = bin_dir.join(program);
        let to = tree.join("bin").join(program);
        copy(&from, &to, 0o755)?;
        if strip {
            run_command(Command::new("strip").arg("--strip-unneeded").arg(&to))?;
        }
    }
    let packaging = root.join("packaging");
    for dir in [
        "systemd/dom0",
        "systemd/vm",
        "scripts",
        "policy",
        "policy/include",
        "qubes-rpc",
    ] {
        mkdir(&tree.join(dir))?;
        for entry in read_dir_sorted(&packaging.join(dir))? {
            if packaging.join(dir).join(&entry).is_dir() {
                continue;
            }
            let executable = match dir {
                "scripts" => !entry.ends_with(".tmpfiles"),
                "qubes-rpc" => true,
                _ => false,
            };
            let mode = if executable { 0o755 } else { 0o644 };
            copy(
                &packaging.join(dir).join(&entry),
                &tree.join(dir).join(&entry),
                mode,
            )?;
        }
    }
    let spec = std::fs::read_to_string(packaging.join("rpm/qubes-rs.spec.in"))
        .map_err(|e| format!("cannot read the RPM spec: {e}"))?
        .replace("@VERSION@", VERSION)
        .replace("@CHANGELOG@", &rpm_changelog(epoch));
    write(&tree.join("qubes-rs.spec"), spec.as_bytes(), 0o644)?;
    copy(&packaging.join("README.md"), &tree.join("README.md"), 0o644)?;

    let tarball = out.join(format!("{name}.tar.gz"));
    tar_gz(&work.join("tarball"), &name, &tarball, epoch)?;

    // Every path of LAYOUT installed, for systemd-analyze and the .deb.
    let installed = work.join("installed");
    install_layout(&tree, &installed, |_| true)?;

    let deb_tree = work.join("deb");
    install_layout(&tree, &deb_tree, |package| package != Package::Dom0)?;
    let deb = build_deb(root, &deb_tree, out, epoch)?;

    let rpms = build_rpms(&tarball, &work.join("rpmbuild"), out, epoch)?;
    Ok(Packages {
        tarball,
        deb,
        rpms,
        work: work.to_path_buf(),
    })
}

fn install_layout(
    tree: &Path,
    dest: &Path,
    wanted: impl Fn(Package) -> bool,
) -> Result<(), String> {
    for (package, path, item) in LAYOUT {
        if !wanted(*package) {
            continue;
        }
        let target = dest.join(path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            mkdir(parent)?;
        }
        match item {
            Item::File(source, mode) => copy(&tree.join(source), &target, *mode)?,
            Item::Link(to) => {
                if target.symlink_metadata().is_err() {
                    std::os::unix::fs::symlink(to, &target)
                        .map_err(|e| format!("cannot link {}: {e}", target.display()))?;
                }
            }
            Item::Dir => mkdir(&target)?,
        }
    }
    Ok(())
}

fn build_deb(root: &Path, tree: &Path, out: &Path, epoch: u64) -> Result<PathBuf, String> {
    let maintainer = maintainer(root)?;
    let doc = tree.join("usr/share/doc").join(DEB_NAME);
    mkdir(&doc)?;
    let copyright = std::fs::read(root.join("packaging/debian/copyright"))
        .map_err(|e| format!("cannot read packaging/debian/copyright: {e}"))?;
    write(&doc.join("copyright"), &copyright, 0o644)?;
    let changelog = format!(
        "{DEB_NAME} ({VERSION}) unstable; urgency=medium\n\n  * Release {VERSION} of qubes-firewall-rs.\n\n -- {maintainer}  {}\n",
        rfc2822(epoch)
    );
    let gz = tree
        .join("usr/share/doc")
        .join(DEB_NAME)
        .join("changelog.gz");
    gzip_to(changelog.as_bytes(), &gz)?;

    let debian = tree.join("DEBIAN");
    mkdir(&debian)?;
    let installed_kib = du_kib(tree)?;
    let depends = shlib_depends(tree)?;
    let stands_for = |with_version: bool| {
        DEB_STANDS_FOR
            .iter()
            .map(|(name, version)| {
                if with_version {
                    format!("{name} (= {version})")
                } else {
                    (*name).to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let control = format!(
        "Package: {DEB_NAME}\n\
         Version: {VERSION}\n\
         Architecture: amd64\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Provides: {}\n\
         Conflicts: {}\n\
         Replaces: {}\n\
         Section: admin\n\
         Priority: optional\n\
         Description: Rust qrexec agent and QubesDB daemon for Qubes OS qubes\n \
         qubes-firewall-rs's drop-in replacements for the programs a Linux qube\n \
         runs to talk to dom0: qrexec-agent (qubes-qrexec-agent.service),\n \
         qrexec-client-vm, the QubesDB daemon (qubes-db.service) and its tools,\n \
         at the paths Qubes' own packages use. It stands in for\n \
         qubes-core-qrexec, qubesdb and qubesdb-vm; reinstall those to go back.\n \
         .\n \
         It also carries file copy and open-in-qube programs (qfile-agent,\n \
         qfile-unpacker, qvm-copy, qvm-open-in-dvm, ...) in /usr/lib/qubes-rs,\n \
         beside qubes-core-agent's own: its qubes.Filecopy and qubes.OpenInVM\n \
         services are used only once linked into /usr/local/etc/qubes-rpc.\n",
        stands_for(true),
        stands_for(false),
        stands_for(false),
    );
    write(&debian.join("control"), control.as_bytes(), 0o644)?;
    for script in ["postinst", "postrm"] {
        let text = std::fs::read_to_string(root.join("packaging/debian").join(script))
            .map_err(|e| format!("cannot read packaging/debian/{script}: {e}"))?
            .replace("@UNITS@", &DEB_UNITS.join(" "));
        write(&debian.join(script), text.as_bytes(), 0o755)?;
    }
    let deb = out.join(format!("{DEB_NAME}_{VERSION}_amd64.deb"));
    run_command(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(tree)
            .arg(&deb)
            .env("SOURCE_DATE_EPOCH", epoch.to_string()),
    )?;
    Ok(deb)
}

/// `Depends:` from the programs' ELF `NEEDED` libraries, through `dpkg -S`.
fn shlib_depends(tree: &Path) -> Result<String, String> {
    let mut libraries = Vec::new();
    for (package, path, item) in LAYOUT {
        let (Package::Vm | Package::Qubesdb, Item::File(source, _)) = (package, item) else {
            continue;
        };
        if !source.starts_with("bin/") {
            continue;
        }
        let output = Command::new("objdump")
            .arg("-p")
            .arg(tree.join(path.trim_start_matches('/')))
            .output()
            .map_err(|e| format!("cannot run objdump: {e}"))?;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(library) = line.trim().strip_prefix("NEEDED") {
                let library = library.trim().to_string();
                if !libraries.contains(&library) {
                    libraries.push(library);
                }
            }
        }
    }
    // deb-systemd-helper (init-system-helpers) is Essential: not listed.
    let mut packages = vec!["xenstore-utils".to_string()];
    for library in &libraries {
        let output = Command::new("dpkg")
            .args(["-S", &format!("*/{library}")])
            .output()
            .map_err(|e| format!("cannot run dpkg -S: {e}"))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let Some(package) = text.lines().next().and_then(|l| l.split(':').next()) else {
            return Err(format!("no Debian package holds {library} (dpkg -S)"));
        };
        let package = package.to_string();
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    packages.sort();
    Ok(packages.join(", "))
}

fn build_rpms(
    tarball: &Path,
    topdir: &Path,
    out: &Path,
    epoch: u64,
) -> Result<Vec<PathBuf>, String> {
    mkdir(topdir)?;
    run_command(
        Command::new("rpmbuild")
            .args(["-tb", "--nodeps", "--quiet"])
            .arg("--define")
            .arg(format!("_topdir {}", topdir.display()))
            .arg(tarball)
            .env("SOURCE_DATE_EPOCH", epoch.to_string()),
    )?;
    let rpm_dir = topdir.join("RPMS/x86_64");
    let mut rpms = Vec::new();
    for name in read_dir_sorted(&rpm_dir)? {
        let to = out.join(&name);
        std::fs::copy(rpm_dir.join(&name), &to).map_err(|e| format!("cannot copy {name}: {e}"))?;
        rpms.push(to);
    }
    if rpms.len() != 3 {
        return Err(format!(
            "rpmbuild made {} packages, not 3: {rpms:?}",
            rpms.len()
        ));
    }
    Ok(rpms)
}

/// A reproducible .tar.gz of `dir/name`.
fn tar_gz(dir: &Path, name: &str, to: &Path, epoch: u64) -> Result<(), String> {
    let tar = Command::new("tar")
        .current_dir(dir)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=gnu",
        ])
        .arg(format!("--mtime=@{epoch}"))
        .args(["-cf", "-", name])
        .output()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if !tar.status.success() {
        return Err(format!(
            "tar failed: {}",
            String::from_utf8_lossy(&tar.stderr)
        ));
    }
    gzip_to(&tar.stdout, to)
}

fn gzip_to(bytes: &[u8], to: &Path) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run gzip: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("gzip: no stdin")?;
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().map_err(|e| format!("gzip: {e}"))?;
    writer
        .join()
        .map_err(|_| "gzip writer panicked".to_string())?
        .map_err(|e| format!("writing to gzip: {e}"))?;
    if !output.status.success() {
        return Err("gzip failed".into());
    }
    write(to, &output.stdout, 0o644)
}

/// The release's time: `SOURCE_DATE_EPOCH` or the last commit's date.
fn source_date_epoch(root: &Path) -> Result<u64, String> {
    if let Ok(value) = std::env::var("SOURCE_DATE_EPOCH") {
        return value
            .trim()
            .parse()
            .map_err(|_| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds"));
    }
    let output = Command::new("git")
        .current_dir(root)
        .args(["log", "-1", "--format=%ct"])
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            "cannot read the last commit's date (git log); set SOURCE_DATE_EPOCH".to_string()
        })
}

/// The .deb's maintainer: the author of the release's commit, as git has
/// it (the same in every checkout of that commit).
fn maintainer(root: &Path) -> Result<String, String> {
    let output = Command::new("git")
        .current_dir(root)
        .args(["log", "-1", "--format=%an <%ae>"])
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() || !text.contains('@') {
        return Err(
            "cannot read the last commit's author (git log) for the .deb's Maintainer".into(),
        );
    }
    Ok(text)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn date_parts(epoch: u64) -> (&'static str, u32, &'static str, i64, u64) {
    let days = (epoch / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let weekday = WEEKDAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    (weekday, day, month_name, year, epoch % 86_400)
}

/// `Sat, 05 Dec 2026 21:58:00 +0000` (Debian changelog).
fn rfc2822(epoch: u64) -> String {
    let (weekday, day, month, year, secs) = date_parts(epoch);
    format!(
        "{weekday}, {day:02} {month} {year} {:02}:{:02}:{:02} +0000",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The spec's changelog entry. rpm reads only the day from the header
/// line, so the exact time goes in as `SOURCE_DATE_EPOCH` too.
fn rpm_changelog(epoch: u64) -> String {
    let (weekday, day, month, year, _) = date_parts(epoch);
    format!(
        "* {weekday} {month} {day:02} {year} qubes-firewall-rs <qubes-firewall-rs@localhost> - {VERSION}-1\n- Release {VERSION}."
    )
}

fn du_kib(dir: &Path) -> Result<u64, String> {
    fn walk(dir: &Path, total: &mut u64) -> Result<(), String> {
        for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| e.to_string())?;
            let meta = entry.path().symlink_metadata().map_err(|e| e.to_string())?;
            if meta.is_dir() {
                walk(&entry.path(), total)?;
            } else {
                *total += meta.len().div_ceil(1024);
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(dir, &mut total)?;
    Ok(total)
}

fn ensure_package(package: &str) -> Result<(), String> {
    run_command(Command::new("apt-get").args(["update", "-q"]))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

fn mkdir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<(), String> {
    let bytes = std::fs::read(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    write(to, &bytes, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_spelled_as_debian_and_rpm_want() {
        // 2026-12-05 21:58:00 UTC was a Saturday.
        let epoch = 1_796_507_880;
        assert_eq!(rfc2822(epoch), "Sat, 05 Dec 2026 21:58:00 +0000");
        assert!(rpm_changelog(epoch).starts_with("* Sat Dec 05 2026 "));
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn the_empty_initramfs_is_a_valid_empty_gzip() {
        let dir = std::env::temp_dir().join(format!("xtask-dist-gz-{}", std::process::id()));
        mkdir(&dir).unwrap();
        let file = dir.join("initramfs");
        write(&file, &EMPTY_GZIP, 0o644).unwrap();
        let output = Command::new("gzip").arg("-dc").arg(&file).output().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(output.status.success());
        assert!(output.stdout.is_empty());
    }

    #[test]
    fn every_program_and_packaging_file_is_in_the_layout() {
        let root = workspace_root();
        for program in PROGRAMS {
            let source = format!("bin/{program}");
            assert!(
                LAYOUT
                    .iter()
                    .any(|(_, _, item)| matches!(item, Item::File(s, _) if *s == source)),
                "{program} is built but not installed"
            );
        }
        for (_, path, item) in LAYOUT {
            if let Item::File(source, _) = item
                && !source.starts_with("bin/")
            {
                assert!(
                    root.join("packaging").join(source).is_file(),
                    "{path}: {source}"
                );
            }
        }
        // The packaged services run programs the package installs.
        for service in read_dir_sorted(&root.join("packaging/qubes-rpc")).unwrap() {
            let text =
                std::fs::read_to_string(root.join("packaging/qubes-rpc").join(&service)).unwrap();
            let runs: Vec<&str> = text
                .split_whitespace()
                .filter(|word| word.starts_with("/usr/lib/") && !word.ends_with('/'))
                .filter(|word| !text.contains(&format!("# {word}")))
                .filter(|word| {
                    text.lines()
                        .any(|l| l.contains("exec ") && l.contains(word))
                })
                .collect();
            assert!(!runs.is_empty(), "{service} runs nothing");
            for program in runs {
                assert!(
                    LAYOUT
                        .iter()
                        .any(|(package, path, _)| *path == program && *package == Package::Vm),
                    "{service} runs {program}, which qubes-rs-vm does not install"
                );
            }
        }
        let spec = std::fs::read_to_string(root.join("packaging/rpm/qubes-rs.spec.in")).unwrap();
        for (_, path, _) in LAYOUT {
            let spelled = path
                .replace("/usr/lib/systemd/system", "%{unitdir}")
                .replace("/usr/sbin", "%{_sbindir}")
                .replace("/usr/bin", "%{_bindir}")
                .replace("/etc", "%{_sysconfdir}");
            assert!(spec.contains(&spelled), "the spec does not list {path}");
        }
    }

    /// The packages as CI checks them: rpmbuild from the release tarball,
    /// `rpm -qlp` against [`LAYOUT`], lintian on the .deb (no errors),
    /// `systemd-analyze verify` on every unit. Built from the debug
    /// programs `cargo xtask test` builds first. Needs root (it installs
    /// rpm and lintian with apt-get when missing).
    #[test]
    fn packages_build_and_pass_the_checks() {
        if require_root().is_err() {
            println!("skipped: packages_build_and_pass_the_checks needs root (apt-get, rpmbuild)");
            return;
        }
        let root = workspace_root();
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        let bins = target.join("debug");
        if let Some(missing) = PROGRAMS.iter().find(|p| !bins.join(p).is_file()) {
            println!(
                "skipped: packages_build_and_pass_the_checks: {} missing: run `cargo build --workspace --bins` first (cargo xtask test does)",
                bins.join(missing).display()
            );
            return;
        }
        ensure_tools(&[
            ("rpmbuild", "rpm"),
            ("lintian", "lintian"),
            ("strip", "binutils"),
            ("systemd-analyze", "systemd"),
        ])
        .unwrap();
        let work = target.join("dist-test");
        let out = work.join("out");
        let _ = std::fs::remove_dir_all(&out);
        mkdir(&out).unwrap();
        let packages =
            build_packages(&root, &bins, &work.join("work"), &out, 1_796_507_880, true).unwrap();

        // rpm -qlp: each package holds exactly its LAYOUT paths.
        for (package, suffix) in [
            (Package::Qubesdb, "qubesdb"),
            (Package::Dom0, "dom0"),
            (Package::Vm, "vm"),
        ] {
            let rpm = packages
                .rpms
                .iter()
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("qubes-rs-{suffix}-")))
                })
                .unwrap_or_else(|| panic!("no qubes-rs-{suffix} in {:?}", packages.rpms));
            let listed = Command::new("rpm").arg("-qlp").arg(rpm).output().unwrap();
            assert!(listed.status.success());
            let mut listed: Vec<String> = String::from_utf8_lossy(&listed.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            listed.sort();
            let mut expected: Vec<String> = LAYOUT
                .iter()
                .filter(|(p, _, _)| *p == package)
                .map(|(_, path, _)| path.to_string())
                .collect();
            expected.sort();
            assert_eq!(listed, expected, "rpm -qlp {}", rpm.display());
            let deps = Command::new("rpm")
                .args(["-qp", "--provides", "--conflicts"])
                .arg(rpm)
                .output()
                .unwrap();
            let deps = String::from_utf8_lossy(&deps.stdout).to_string();
            let stands_for: &[&str] = match package {
                Package::Qubesdb => &["qubes-db"],
                Package::Dom0 => &["qubes-core-qrexec-dom0", "qubes-db-dom0"],
                Package::Vm => &["qubes-core-qrexec-vm", "qubes-db-vm"],
            };
            for name in stands_for {
                let provides = deps
                    .lines()
                    .filter(|l| l.starts_with(&format!("{name} = ")))
                    .count();
                let conflicts = deps.lines().filter(|l| l.trim() == *name).count();
                assert_eq!((provides, conflicts), (1, 1), "{name} in {deps}");
            }
        }

        // The .deb: its contents, then lintian.
        let contents = Command::new("dpkg-deb")
            .arg("-c")
            .arg(&packages.deb)
            .output()
            .unwrap();
        let in_deb: Vec<String> = String::from_utf8_lossy(&contents.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .map(|path| {
                path.trim_start_matches('.')
                    .trim_end_matches('/')
                    .to_string()
            })
            .collect();
        for (_, path, _) in LAYOUT {
            let wanted = LAYOUT
                .iter()
                .any(|(package, p, _)| p == path && *package != Package::Dom0);
            assert_eq!(
                in_deb.iter().any(|p| p == path),
                wanted,
                "{path} in the .deb: {in_deb:?}"
            );
        }
        let lintian = Command::new("lintian")
            .args(["--no-tag-display-limit"])
            .arg(&packages.deb)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&lintian.stdout).to_string();
        println!("lintian:\n{report}");
        let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
        assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));

        // systemd-analyze verify, each unit inside the tree that holds the
        // programs it starts, next to the host's own units (the targets
        // they are ordered against).
        let installed = packages.work.join("installed");
        let units = Path::new("/usr/lib/systemd/system");
        for name in read_dir_sorted(units).unwrap() {
            let host = units.join(&name);
            let ours = installed.join("usr/lib/systemd/system").join(&name);
            let plain = host.symlink_metadata().is_ok_and(|m| m.is_file());
            if plain && !ours.exists() {
                std::fs::copy(&host, &ours).unwrap();
            }
        }
        for (_, path, _) in LAYOUT {
            if !path.ends_with(".service") {
                continue;
            }
            let verify = Command::new("systemd-analyze")
                .arg("verify")
                .arg(format!(
                    "--root={}",
                    packages.work.join("installed").display()
                ))
                .arg(path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&verify.stderr);
            assert!(
                verify.status.success() && stderr.trim().is_empty(),
                "{path}: {stderr}"
            );
        }
        assert!(packages.work.join("deb/DEBIAN/control").is_file());
        assert!(packages.tarball.is_file());
    }
}
