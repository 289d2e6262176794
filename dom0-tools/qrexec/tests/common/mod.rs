//! "Qubes in a temp dir" for the qrexec tests and benchmark: dom0 and any
//! number of Linux qubes as processes on this machine, connected by the
//! UNIX-socket vchan. Each qube gets a qrexec-agent with its own
//! `VCHAN_DOMAIN`, agent socket and `/etc/qubes-rpc` directory, and a
//! `qrexec-daemon --direct` in dom0. The policy is a small shell program in
//! the temp dir (rules given by the test). Everything is killed and removed
//! on drop.
#![allow(dead_code)] // reason: each test binary uses a different subset.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DAEMON: &str = env!("CARGO_BIN_EXE_qrexec-daemon");
pub const CLIENT: &str = env!("CARGO_BIN_EXE_qrexec-client");
pub const AGENT: &str = env!("CARGO_BIN_EXE_qrexec-agent");
pub const CLIENT_VM: &str = env!("CARGO_BIN_EXE_qrexec-client-vm");

#[derive(Debug)]
pub struct Vm {
    pub domid: u32,
    pub name: String,
    agent: Child,
    daemon: Child,
}

#[derive(Debug)]
pub struct Qubes {
    pub dir: PathBuf,
    pub vms: Vec<Vm>,
}

/// The user name qrexec-daemon substitutes for `DEFAULT` in tests: the agent
/// runs as root here (container) or as an unprivileged user who then runs
/// everything as itself.
pub fn default_user() -> &'static str {
    if rustix::process::geteuid().is_root() {
        "root"
    } else {
        "user"
    }
}

pub fn write_executable(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

impl Qubes {
    /// A fresh temp dir with a policy program that runs `policy_body` (a
    /// `case` on "$SRC $TARGET $SERVICE") and dom0's service dir.
    pub fn new(test: &str, policy_rules: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qrexec-it-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["vchan", "run", "log", "rpc/dom0"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let policy = format!(
            "#!/bin/sh\n# qrexec-policy-exec stand-in: PROGRAM -- SRC TARGET SERVICE\n\
             [ \"$1\" = -- ] || exit 2\nSRC=$2 TARGET=$3 SERVICE=$4\n\
             echo \"$SRC $TARGET $SERVICE\" >> {calls}\n\
             allow() {{ printf 'user=%s\\nresult=allow\\ntarget=%s\\nautostart=False\\nrequested_target=%s\\n' \"$1\" \"$2\" \"$3\"; exit 0; }}\n\
             case \"$SRC $TARGET $SERVICE\" in\n{policy_rules}\nesac\necho result=deny\n",
            calls = dir.join("policy.calls").display()
        );
        write_executable(&dir.join("policy"), &policy);
        Qubes {
            dir,
            vms: Vec::new(),
        }
    }

    pub fn rpc_dir(&self, vm: &str) -> PathBuf {
        self.dir.join("rpc").join(vm)
    }

    pub fn agent_socket(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("agent.{vm}.sock"))
    }

    fn env(&self, cmd: &mut Command, domid: u32, rpc: &str) {
        cmd.env("VCHAN_SOCKET_DIR", self.dir.join("vchan"))
            .env("VCHAN_DOMAIN", domid.to_string())
            .env("QREXEC_SERVICE_PATH", self.rpc_dir(rpc))
            .env("QREXEC_POLICY_SOCKET", self.dir.join("policy.sock"))
            .env("QREXEC_LOG_DIR", self.dir.join("log"))
            // Never the host's qubesd: a test that needs one serves it here.
            .env("QUBESD_SOCKET", self.qubesd_socket())
            .env("QUBESD_INTERNAL_SOCKET", self.qubesd_socket());
    }

    /// Where the tools look for qubesd (nothing listens unless a test does).
    pub fn qubesd_socket(&self) -> PathBuf {
        self.dir.join("qubesd.sock")
    }

    pub fn add_service(&self, vm: &str, service: &str, script: &str) {
        write_executable(&self.rpc_dir(vm).join(service), script);
    }

    /// Start a qube: its agent, then its daemon; wait until both are up.
    pub fn start_vm(&mut self, domid: u32, name: &str) {
        self.start_vm_with_uuid(domid, name, None);
    }

    /// Stop a qube started here (daemon and agent killed, sockets removed).
    pub fn stop_vm(&mut self, name: &str) -> bool {
        let Some(index) = self.vms.iter().position(|v| v.name == name) else {
            return false;
        };
        let mut vm = self.vms.remove(index);
        let _ = vm.daemon.kill();
        let _ = vm.agent.kill();
        let _ = vm.daemon.wait();
        let _ = vm.agent.wait();
        let run = self.dir.join("run");
        for entry in fs::read_dir(&run).into_iter().flatten().flatten() {
            let path = entry.path();
            let target = fs::read_link(&path).ok();
            let own = format!("qrexec.{}", vm.domid);
            if entry.file_name().to_str() == Some(own.as_str())
                || target.is_some_and(|t| t.as_os_str() == own.as_str())
            {
                let _ = fs::remove_file(path);
            }
        }
        true
    }

    /// Whether a qube of that name runs here.
    pub fn running(&self, name: &str) -> bool {
        self.vms.iter().any(|v| v.name == name)
    }

    /// [`Qubes::start_vm`], the daemon started with `--uuid` when given.
    pub fn start_vm_with_uuid(&mut self, domid: u32, name: &str, uuid: Option<&str>) {
        fs::create_dir_all(self.rpc_dir(name)).unwrap();
        let log = |what: &str| {
            fs::File::create(self.dir.join("log").join(format!("{what}.{name}.stderr"))).unwrap()
        };
        let agent = self.spawn_agent(domid, name);
        let mut daemon = Command::new(DAEMON);
        daemon
            .arg("--direct")
            .args(uuid.map(|u| format!("--uuid={u}")))
            .arg(format!("--socket-dir={}", self.dir.join("run").display()))
            .arg(format!(
                "--policy-program={}",
                self.dir.join("policy").display()
            ))
            .args([
                domid.to_string(),
                name.to_string(),
                default_user().to_string(),
            ])
            .stdin(Stdio::null())
            .stderr(log("daemon"));
        self.env(&mut daemon, 0, "dom0");
        let daemon = daemon.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(self
            .dir
            .join("run")
            .join(format!("qrexec.{domid}"))
            .exists()
            && self.agent_socket(name).exists())
        {
            assert!(Instant::now() < deadline, "{name} did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.vms.push(Vm {
            domid,
            name: name.to_string(),
            agent,
            daemon,
        });
    }

    fn spawn_agent(&self, domid: u32, name: &str) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log").join(format!("agent.{name}.stderr")))
            .unwrap();
        let mut agent = Command::new(AGENT);
        agent
            .arg(format!(
                "--agent-socket={}",
                self.agent_socket(name).display()
            ))
            .stdin(Stdio::null())
            .stderr(log);
        self.env(&mut agent, domid, name);
        agent.spawn().unwrap()
    }

    /// Start a new agent for `vm` after the old one died, and wait until its
    /// daemon has reconnected and listens again.
    pub fn restart_agent(&mut self, vm: &str) {
        let socket = |q: &Self, domid: u32| q.dir.join("run").join(format!("qrexec.{domid}"));
        let domid = self.vms.iter().find(|v| v.name == vm).unwrap().domid;
        let deadline = Instant::now() + Duration::from_secs(20);
        while socket(self, domid).exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not notice the agent died"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let index = self.vms.iter().position(|v| v.name == vm).unwrap();
        self.vms[index].agent = self.spawn_agent(domid, vm);
        while !socket(self, domid).exists() {
            assert!(Instant::now() < deadline, "daemon did not reconnect");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `qrexec-client` in dom0.
    pub fn client(&self) -> Command {
        let mut cmd = Command::new(CLIENT);
        cmd.arg(format!("--socket-dir={}", self.dir.join("run").display()));
        self.env(&mut cmd, 0, "dom0");
        cmd
    }

    /// `qrexec-client-vm` in qube `vm`.
    pub fn client_vm(&self, vm: &str) -> Command {
        let domid = self
            .vms
            .iter()
            .find(|v| v.name == vm)
            .map(|v| v.domid)
            .expect("unknown vm");
        let mut cmd = Command::new(CLIENT_VM);
        cmd.arg(format!(
            "--agent-socket={}",
            self.agent_socket(vm).display()
        ));
        self.env(&mut cmd, domid, vm);
        cmd.current_dir(&self.dir);
        cmd
    }

    pub fn kill_agent(&mut self, vm: &str) {
        if let Some(v) = self.vms.iter_mut().find(|v| v.name == vm) {
            let _ = v.agent.kill();
            let _ = v.agent.wait();
        }
    }

    pub fn daemon_exited(&mut self, vm: &str) -> bool {
        self.vms
            .iter_mut()
            .find(|v| v.name == vm)
            .is_some_and(|v| matches!(v.daemon.try_wait(), Ok(Some(_))))
    }

    pub fn log(&self, what: &str, vm: &str) -> String {
        fs::read_to_string(self.dir.join("log").join(format!("{what}.{vm}.stderr")))
            .unwrap_or_default()
    }

    pub fn policy_calls(&self) -> String {
        fs::read_to_string(self.dir.join("policy.calls")).unwrap_or_default()
    }
}

impl Drop for Qubes {
    fn drop(&mut self) {
        for vm in &mut self.vms {
            let _ = vm.daemon.kill();
            let _ = vm.agent.kill();
            let _ = vm.daemon.wait();
            let _ = vm.agent.wait();
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
