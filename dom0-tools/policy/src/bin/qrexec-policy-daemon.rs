//! `qrexec-policy-daemon`: the policy daemon (see the crate documentation
//! for the full command line). This file only parses flags and wires the
//! library together; it must never decide anything itself.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use qrexec_policy::ask::ProgramConfirm;
use qrexec_policy::daemon::{self, DaemonConfig};
use qrexec_policy::loader::{LEGACY_POLICY_PATH, POLICY_PATH, RUNTIME_POLICY_PATH};
use qrexec_policy::{Confirm, NoConfirm, POLICY_SOCKET, PolicyPaths, SystemInfoOrigin};

/// Evaluate qrexec policy daemon: answers policy requests on a UNIX socket.
///
/// Request: `source=S`, `intended_target=T`, `service_and_arg=SVC+ARG`
/// (and optionally `requested_source=`, `assume_yes_for_ask=yes|no`,
/// `just_evaluate=yes|no`), one per line, then an empty line. Reply:
/// `result=deny` or `user=U`, `result=allow`, `target=T`,
/// `autostart=True|False`, `requested_target=R`, then end of stream.
#[derive(Debug, Parser)]
#[command(name = "qrexec-policy-daemon", version)]
struct Args {
    /// Policy directory; repeat for several (earlier wins on equal names).
    /// Default: /run/qubes/policy.d and /etc/qubes/policy.d.
    #[arg(
        long = "policy-path",
        value_name = "DIR",
        env = "QREXEC_POLICY_PATH",
        value_delimiter = ':'
    )]
    policy_path: Vec<PathBuf>,
    /// Socket to listen on.
    #[arg(long = "socket-path", value_name = "PATH", default_value = POLICY_SOCKET)]
    socket_path: PathBuf,
    /// Legacy (Qubes 4.0) policy directory read by `!compat-4.0`.
    #[arg(
        long = "legacy-policy-path",
        value_name = "DIR",
        env = "QREXEC_LEGACY_POLICY_PATH",
        default_value = LEGACY_POLICY_PATH
    )]
    legacy_policy_path: PathBuf,
    /// Read the qube list from this JSON file (format: see the crate
    /// documentation) instead of asking qubesd (internal.GetSystemInfo,
    /// the default, as in Qubes).
    #[arg(long = "system-info", value_name = "PATH", env = "QREXEC_SYSTEM_INFO")]
    system_info: Option<PathBuf>,
    /// Program answering `ask` rules: run as `PROGRAM SOURCE SERVICE
    /// ARGUMENT DEFAULT_TARGET [TARGET...]`, prints `allow:TARGET` or
    /// `deny`. Without it, `ask` is a deny.
    #[arg(long = "ask-program", value_name = "PATH", env = "QREXEC_ASK_PROGRAM")]
    ask_program: Option<PathBuf>,
    /// Seconds the ask program may take.
    #[arg(long = "ask-timeout", value_name = "SECONDS", default_value_t = 60.0)]
    ask_timeout: f64,
    /// How often to look for policy changes, in milliseconds.
    #[arg(long = "reload-interval-ms", value_name = "MS", default_value_t = 500)]
    reload_interval_ms: u64,
    /// Most requests served at once.
    #[arg(long = "max-connections", value_name = "N", default_value_t = 256)]
    max_connections: usize,
    /// Socket of the policy.EvalSimple qrexec service (default
    /// /etc/qubes-rpc/policy.EvalSimple, skipped if it cannot be bound).
    #[arg(long = "eval-socket-path", value_name = "PATH")]
    eval_socket_path: Option<PathBuf>,
    /// Socket of the policy.EvalGUI qrexec service (default
    /// /etc/qubes-rpc/policy.EvalGUI, skipped if it cannot be bound).
    #[arg(long = "gui-socket-path", value_name = "PATH")]
    gui_socket_path: Option<PathBuf>,
    /// How `ask` and notifications reach the source's GUI qube.
    #[command(flatten)]
    agent: qrexec_policy::agent::AgentArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qrexec_policy::logger::init(log::LevelFilter::Info);
    let policy_dirs = if args.policy_path.is_empty() {
        vec![RUNTIME_POLICY_PATH.into(), POLICY_PATH.into()]
    } else {
        args.policy_path
    };
    let ask_timeout =
        Duration::try_from_secs_f64(args.ask_timeout).unwrap_or(Duration::from_secs(60));
    let confirm: Arc<dyn Confirm> = match args.ask_program {
        Some(p) => Arc::new(ProgramConfirm::new(p, ask_timeout)),
        None => {
            log::warn!(
                "no --ask-program given: every 'ask' from a qube without a GUI qube will be denied"
            );
            Arc::new(NoConfirm)
        }
    };
    let origin = SystemInfoOrigin::from_option(args.system_info);
    let confirm = qrexec_policy::agent::with_agent(confirm, &origin, &args.agent, ask_timeout);
    let config = DaemonConfig {
        socket_path: args.socket_path,
        policy_paths: PolicyPaths {
            policy_dirs,
            legacy_dir: args.legacy_policy_path,
        },
        system_info: origin.source(),
        confirm,
        reload_interval: Duration::from_millis(args.reload_interval_ms.max(10)),
        max_connections: args.max_connections.max(1),
        read_timeout: Duration::from_secs(10),
        eval_socket: Some(match args.eval_socket_path {
            Some(p) => (p, true),
            None => ("/etc/qubes-rpc/policy.EvalSimple".into(), false),
        }),
        gui_socket: Some(match args.gui_socket_path {
            Some(p) => (p, true),
            None => ("/etc/qubes-rpc/policy.EvalGUI".into(), false),
        }),
    };
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("qrexec-policy-daemon: {e}");
            ExitCode::FAILURE
        }
    }
}
