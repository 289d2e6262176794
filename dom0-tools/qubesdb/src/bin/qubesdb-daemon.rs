//! `qubesdb-daemon <remote-domid> [<remote-name>]`: dom0's QubesDB daemon
//! for one VM (qubes-core-qubesdb `daemon/db-daemon.c` command line).
//!
//! As the C daemon: unless started by systemd (`NOTIFY_SOCKET` set), it
//! detaches — the parent waits until the child has its sockets up ("ready")
//! and exits 0, or prints `startup failed` and exits 1; the child logs to
//! `/var/log/qubes/qubesdb.<name>.log` and writes its pid to
//! `/var/run/qubes/qubesdb.<name>.pid`. Extensions for the box and tests:
//! `QUBESDB_FOREGROUND=1` keeps it in the foreground with logs on stderr;
//! `QUBESDB_SOCKET_DIR` replaces `/var/run/qubes`, `QUBESDB_LOG_DIR`
//! replaces `/var/log/qubes`; `VCHAN_SOCKET_DIR`/`VCHAN_DOMAIN` as for every
//! socket-vchan program. Only dom0's side is implemented: without a
//! `<remote-name>` (the VM's side) it refuses to start.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use qubesdb::daemon::{Config, Daemon};

/// Set in the detached child so that it does not detach again.
const CHILD_ENV: &str = "QUBESDB_DAEMON_DETACHED";

fn usage(argv0: &str) -> ExitCode {
    eprintln!("Usage: {argv0} <remote-domid> [<remote-name>]");
    eprintln!("       Give <remote-name> only in dom0");
    ExitCode::FAILURE
}

fn env_dir(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().map_or("qubesdb-daemon", String::as_str);
    if !(2..=4).contains(&args.len()) {
        return usage(argv0);
    }
    let domid_arg = args.get(1).map_or("", String::as_str);
    let Ok(domid) = domid_arg.trim().parse::<u16>() else {
        eprintln!("{argv0}: <remote-domid> {domid_arg:?} is not a domain id");
        return usage(argv0);
    };
    let Some(name) = args.get(2).filter(|name| !name.is_empty()).cloned() else {
        eprintln!(
            "{argv0}: this is dom0's qubesdb-daemon; the VM side (no <remote-name>) is not implemented"
        );
        return ExitCode::FAILURE;
    };
    let own_domid = match std::env::var("VCHAN_DOMAIN") {
        Ok(text) => match text.trim().parse::<u16>() {
            Ok(domid) => domid,
            Err(_) => {
                eprintln!("{argv0}: VCHAN_DOMAIN={text:?} is not a domain id");
                return ExitCode::FAILURE;
            }
        },
        Err(_) => 0,
    };
    let config = Config {
        domid,
        name: name.clone(),
        socket_dir: qubesdb::client::socket_dir(),
        vchan_socket_dir: env_dir("VCHAN_SOCKET_DIR", "/var/run/vchan"),
        own_domid,
    };

    let foreground = std::env::var_os("NOTIFY_SOCKET").is_some()
        || std::env::var_os("QUBESDB_FOREGROUND").is_some();
    let detached_child = std::env::var_os(CHILD_ENV).is_some();
    if !foreground && !detached_child {
        return detach(&args, &name);
    }

    let daemon = Daemon::new(config.clone());
    if let Err(error) = daemon.start() {
        eprintln!("FATAL: server socket initialization failed: {error}");
        return ExitCode::FAILURE;
    }
    let pidfile = config.socket_dir.join(format!("qubesdb.{name}.pid"));
    if let Err(error) = std::fs::write(&pidfile, format!("{}\n", std::process::id())) {
        eprintln!("pidfile create: {error}");
    }
    if detached_child {
        // Tell the waiting parent, then never touch stdout again.
        let mut stdout = std::io::stdout();
        let _ = stdout.write_all(b"ready");
        let _ = stdout.flush();
    }
    eprintln!(
        "qubesdb-daemon for {name} (domain {domid}): serving {}",
        config.socket_path().display()
    );
    // Everything runs in the daemon's threads; this one only waits.
    loop {
        std::thread::park();
    }
}

/// Starts a detached copy of ourselves and waits for its "ready".
fn detach(args: &[String], name: &str) -> ExitCode {
    let log_dir = env_dir("QUBESDB_LOG_DIR", "/var/log/qubes");
    let log_path = log_dir.join(format!("qubesdb.{name}.log"));
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(log) => log,
        Err(error) => {
            eprintln!("open logfile {}: {error}", log_path.display());
            return ExitCode::FAILURE;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => {
            eprintln!("startup failed: cannot find own executable: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = Command::new(exe);
    command
        .args(args.iter().skip(1))
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // A new process group, so a terminal's signals do not reach it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("startup failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut ready = [0u8; 5];
    let ok = child
        .stdout
        .take()
        .is_some_and(|mut out| out.read_exact(&mut ready).is_ok() && &ready == b"ready");
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("startup failed");
        ExitCode::FAILURE
    }
}
