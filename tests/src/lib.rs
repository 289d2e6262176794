//! Shared helpers for the end-to-end tests: finding the workspace's built
//! programs, and a "Qubes in a temp dir" for qrexec scenarios that uses the
//! real policy engine (`qrexec-policy-daemon`, with `qrexec-policy-exec` as
//! the daemon's fallback program) and the real qrexec programs.
//!
//! Cargo only builds the binaries of the package under test, so the
//! programs of other packages must have been built first (`cargo xtask
//! test` runs `cargo build --workspace --bins`); [`binary`] fails with a
//! message saying so. Every process started here is killed and every file
//! removed when the [`QrexecBox`] is dropped; nothing touches `/etc`,
//! `/run` or `/var`.
#![forbid(unsafe_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries for the running profile
/// (`target/debug` or `$CARGO_TARGET_DIR/debug`): two levels above this test
/// executable (`…/debug/deps/NAME-HASH`).
pub fn binary_dir() -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
    {
        return dir;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
}

/// The path of workspace binary `name`, or a panic that says how to build it.
pub fn binary(name: &str) -> PathBuf {
    let path = binary_dir().join(name);
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}: build the workspace's programs first \
         (`cargo build --workspace --bins`; `cargo xtask test` does this)",
        path.display()
    );
    path
}

/// Whether this process runs as root (then `DEFAULT` becomes `root`).
pub fn running_as_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The default user the daemons substitute for `DEFAULT` in the box.
pub fn default_user() -> &'static str {
    if running_as_root() { "root" } else { "user" }
}

/// Write an executable file (creating its directory).
pub fn write_executable(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create directory");
    }
    fs::write(path, text).expect("write file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[derive(Debug)]
struct Qube {
    domid: u32,
    name: String,
    agent: Child,
    daemon: Child,
}

/// dom0 + qubes as processes: agents, daemons, the policy daemon.
#[derive(Debug)]
pub struct QrexecBox {
    /// The box's temp dir.
    pub dir: PathBuf,
    qubes: Vec<Qube>,
    policy_daemon: Option<Child>,
}

impl QrexecBox {
    /// An empty box named after the test. Policy files go to
    /// [`QrexecBox::policy_dir`], Qubes 4.0 files to
    /// [`QrexecBox::legacy_policy_dir`].
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qrexec-box-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["vchan", "run", "log", "policy.d", "legacy", "rpc/dom0"] {
            fs::create_dir_all(dir.join(sub)).expect("create box directory");
        }
        QrexecBox {
            dir,
            qubes: Vec::new(),
            policy_daemon: None,
        }
    }

    /// `/etc/qubes/policy.d` of the box.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join("policy.d")
    }

    /// `/etc/qubes-rpc/policy` (Qubes 4.0 format) of the box.
    pub fn legacy_policy_dir(&self) -> PathBuf {
        self.dir.join("legacy")
    }

    fn policy_socket(&self) -> PathBuf {
        self.dir.join("policy.sock")
    }

    /// The service directory of `qube` (`dom0` for dom0).
    pub fn rpc_dir(&self, qube: &str) -> PathBuf {
        self.dir.join("rpc").join(qube)
    }

    /// The agent socket of `qube`.
    pub fn agent_socket(&self, qube: &str) -> PathBuf {
        self.dir.join(format!("agent.{qube}.sock"))
    }

    /// Install service `name` in `qube`.
    pub fn add_service(&self, qube: &str, name: &str, script: &str) {
        write_executable(&self.rpc_dir(qube).join(name), script);
    }

    fn system_info(&self) -> PathBuf {
        self.dir.join("qubes.json")
    }

    fn write_system_info(&self) {
        let mut domains =
            vec![r#""dom0": {"type": "AdminVM", "power_state": "Running"}"#.to_string()];
        for q in &self.qubes {
            domains.push(format!(
                r#""{}": {{"type": "AppVM", "power_state": "Running"}}"#,
                q.name
            ));
        }
        fs::write(
            self.system_info(),
            format!("{{\"domains\": {{{}}}}}", domains.join(", ")),
        )
        .expect("write qubes.json");
    }

    fn env(&self, cmd: &mut Command, domid: u32, rpc: &str) {
        cmd.env("VCHAN_SOCKET_DIR", self.dir.join("vchan"))
            .env("VCHAN_DOMAIN", domid.to_string())
            .env("QREXEC_SERVICE_PATH", self.rpc_dir(rpc))
            .env("QREXEC_POLICY_SOCKET", self.policy_socket())
            .env("QREXEC_LOG_DIR", self.dir.join("log"))
            .env("QREXEC_POLICY_PATH", self.policy_dir())
            .env("QREXEC_LEGACY_POLICY_PATH", self.legacy_policy_dir())
            .env("QREXEC_SYSTEM_INFO", self.system_info());
    }

    fn log_file(&self, what: &str) -> fs::File {
        fs::File::create(self.dir.join("log").join(format!("{what}.stderr")))
            .expect("create log file")
    }

    /// Start `qrexec-policy-daemon` on the box's socket.
    pub fn start_policy_daemon(&mut self) {
        self.write_system_info();
        let mut cmd = Command::new(binary("qrexec-policy-daemon"));
        cmd.arg("--socket-path")
            .arg(self.policy_socket())
            .arg("--policy-path")
            .arg(self.policy_dir())
            .arg("--legacy-policy-path")
            .arg(self.legacy_policy_dir())
            .arg("--system-info")
            .arg(self.system_info())
            .arg("--eval-socket-path")
            .arg(self.dir.join("policy.EvalSimple"))
            .arg("--gui-socket-path")
            .arg(self.dir.join("policy.EvalGUI"))
            .arg("--reload-interval-ms")
            .arg("50")
            .stdin(Stdio::null())
            .stderr(self.log_file("policy-daemon"));
        let child = cmd.spawn().expect("start qrexec-policy-daemon");
        self.policy_daemon = Some(child);
        self.wait_for(&self.policy_socket(), "qrexec-policy-daemon");
    }

    /// Stop the policy daemon (the qrexec daemons then use the program).
    pub fn stop_policy_daemon(&mut self) {
        if let Some(mut child) = self.policy_daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.policy_socket());
    }

    fn wait_for(&self, path: &Path, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{what} did not create {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Start qube `name` with domain id `domid`: its agent and its daemon.
    pub fn start_qube(&mut self, domid: u32, name: &str) {
        fs::create_dir_all(self.rpc_dir(name)).expect("create rpc dir");
        let mut agent = Command::new(binary("qrexec-agent"));
        agent
            .arg(format!(
                "--agent-socket={}",
                self.agent_socket(name).display()
            ))
            .stdin(Stdio::null())
            .stderr(self.log_file(&format!("agent.{name}")));
        self.env(&mut agent, domid, name);
        let agent = agent.spawn().expect("start qrexec-agent");
        let mut daemon = Command::new(binary("qrexec-daemon"));
        daemon
            .arg("--direct")
            .arg(format!("--socket-dir={}", self.dir.join("run").display()))
            .arg(format!(
                "--policy-program={}",
                binary("qrexec-policy-exec").display()
            ))
            .args([
                domid.to_string(),
                name.to_string(),
                default_user().to_string(),
            ])
            .stdin(Stdio::null())
            .stderr(self.log_file(&format!("daemon.{name}")));
        self.env(&mut daemon, 0, "dom0");
        let daemon = daemon.spawn().expect("start qrexec-daemon");
        self.qubes.push(Qube {
            domid,
            name: name.to_string(),
            agent,
            daemon,
        });
        self.wait_for(
            &self.dir.join("run").join(format!("qrexec.{domid}")),
            "qrexec-daemon",
        );
        self.wait_for(&self.agent_socket(name), "qrexec-agent");
        self.write_system_info();
    }

    /// `qrexec-client-vm` run in `qube` (working directory: the box).
    pub fn client_vm(&self, qube: &str) -> Command {
        let domid = self
            .qubes
            .iter()
            .find(|q| q.name == qube)
            .map(|q| q.domid)
            .unwrap_or_else(|| panic!("no qube {qube} in the box"));
        let mut cmd = Command::new(binary("qrexec-client-vm"));
        cmd.arg(format!(
            "--agent-socket={}",
            self.agent_socket(qube).display()
        ))
        .current_dir(&self.dir);
        self.env(&mut cmd, domid, qube);
        cmd
    }

    /// `qrexec-client` run in dom0.
    pub fn client(&self) -> Command {
        let mut cmd = Command::new(binary("qrexec-client"));
        cmd.arg(format!("--socket-dir={}", self.dir.join("run").display()));
        self.env(&mut cmd, 0, "dom0");
        cmd
    }

    /// A log file of the box (`policy-daemon`, `daemon.NAME`, `agent.NAME`).
    pub fn log(&self, what: &str) -> String {
        fs::read_to_string(self.dir.join("log").join(format!("{what}.stderr"))).unwrap_or_default()
    }
}

impl Drop for QrexecBox {
    fn drop(&mut self) {
        self.stop_policy_daemon();
        for q in &mut self.qubes {
            let _ = q.daemon.kill();
            let _ = q.agent.kill();
            let _ = q.daemon.wait();
            let _ = q.agent.wait();
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
