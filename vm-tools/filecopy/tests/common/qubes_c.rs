//! Builds Qubes' own C `qfile-agent`, `qfile-unpacker`, `qopen-in-vm` and
//! `vm-file-editor` from
//! `../shared/reference/` (qubes-linux-utils' `qrexec-lib` with `make
//! NO_REBUILD_TABLE=1`, then qubes-core-agent-linux's `qubes-rpc/` pieces)
//! into the target directory, once per process; installs gcc/make with
//! apt-get when missing. Shared by the interop test and the benchmark.
#![allow(clippy::unwrap_used)] // reason: test code; a panic is a test failure
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Qubes {
    pub agent: PathBuf,
    pub unpacker: PathBuf,
    /// qubes.OpenInVM's sender and handler.
    pub qopen: PathBuf,
    pub editor: PathBuf,
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn run_ok(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Build Qubes' C tools once per test run.
pub fn qubes() -> &'static Qubes {
    static BUILT: OnceLock<Qubes> = OnceLock::new();
    BUILT.get_or_init(|| {
        let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference");
        let utils = reference.join("qubes-linux-utils.tar.gz");
        let agent_src = reference.join("qubes-core-agent-linux.tar.gz");
        assert!(
            utils.exists() && agent_src.exists(),
            "Qubes' sources are missing: expected {} and {} (see /work/shared/reference/README.md)",
            utils.display(),
            agent_src.display()
        );
        if !have("gcc") || !have("make") {
            run_ok(Command::new("apt-get").args([
                "install",
                "-y",
                "--no-install-recommends",
                "gcc",
                "make",
                "libc6-dev",
            ]));
        }
        let tmpdir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Builds of earlier runs whose process is gone.
        for old in std::fs::read_dir(&tmpdir).into_iter().flatten().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("qubes-filecopy-c-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        let build = tmpdir.join(format!("qubes-filecopy-c-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&build);
        std::fs::create_dir_all(&build).unwrap();
        for tarball in [&utils, &agent_src] {
            run_ok(
                Command::new("tar")
                    .arg("xzf")
                    .arg(tarball)
                    .arg("-C")
                    .arg(&build),
            );
        }
        let lib = build.join("qubes-linux-utils/qrexec-lib");
        run_ok(
            Command::new("make")
                .arg("-C")
                .arg(&lib)
                .arg("NO_REBUILD_TABLE=1"),
        );
        let rpc = build.join("qubes-core-agent-linux/qubes-rpc");
        for program in [
            "qfile-agent",
            "qfile-unpacker",
            "qopen-in-vm",
            "vm-file-editor",
        ] {
            run_ok(
                Command::new("gcc")
                    .current_dir(&rpc)
                    .args(["-O2", "-I"])
                    .arg(&lib)
                    .args(["-I.", "-o"])
                    .arg(build.join(program))
                    .arg(format!("{program}.c"))
                    .arg("gui-fatal.c")
                    .arg("-L")
                    .arg(&lib)
                    .args(["-l:libqubes-rpc-filecopy.so.2", "-l:libqubes-pure.so.0"])
                    // RPATH, not RUNPATH: the library's own libqubes-pure dependency
                    // must be found there too.
                    .arg(format!("-Wl,--disable-new-dtags,-rpath,{}", lib.display())),
            );
        }
        Qubes {
            agent: build.join("qfile-agent"),
            unpacker: build.join("qfile-unpacker"),
            qopen: build.join("qopen-in-vm"),
            editor: build.join("vm-file-editor"),
        }
    })
}
