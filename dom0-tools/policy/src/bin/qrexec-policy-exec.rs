//! `qrexec-policy-exec`: evaluate one call from the command line (the
//! program qrexec-daemon falls back to), or lint the policy with `--check`.
//! See the crate documentation for the full command line. This file only
//! parses flags, prints, and in the five-argument form runs the allowed
//! call (qubesd and qrexec-client); it never decides anything itself.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use qrexec::qubesd::Qubesd;
use qrexec_policy::ask::ProgramConfirm;
use qrexec_policy::loader::{LEGACY_POLICY_PATH, POLICY_PATH, RUNTIME_POLICY_PATH};
use qrexec_policy::{
    Confirm, NoConfirm, Policy, PolicyError, PolicyPaths, Query, SystemInfoOrigin,
};

/// Evaluate qrexec policy for one call and print the reply (exit 0 = allow,
/// 1 = deny), or with --check lint the policy (exit 0 = valid).
///
/// usage: qrexec-policy-exec OPTIONS -- SOURCE TARGET SERVICE+ARGUMENT
#[derive(Debug, Parser)]
#[command(name = "qrexec-policy-exec", version)]
struct Args {
    /// Allow run of service without confirmation if policy say 'ask'.
    #[arg(long = "assume-yes-for-ask")]
    assume_yes_for_ask: bool,
    /// Do not run the service, only evaluate policy; retcode=0 means 'allow'.
    #[arg(long = "just-evaluate")]
    just_evaluate: bool,
    /// Use alternative policy path (repeatable). Default:
    /// /run/qubes/policy.d and /etc/qubes/policy.d.
    #[arg(
        long = "path",
        value_name = "DIR",
        env = "QREXEC_POLICY_PATH",
        value_delimiter = ':'
    )]
    path: Vec<PathBuf>,
    /// Legacy (Qubes 4.0) policy directory read by `!compat-4.0`.
    #[arg(
        long = "legacy-policy-path",
        value_name = "DIR",
        env = "QREXEC_LEGACY_POLICY_PATH",
        default_value = LEGACY_POLICY_PATH
    )]
    legacy_policy_path: PathBuf,
    /// Read the policy tree (the policy directories, the legacy directory
    /// and every include, absolute ones too) under DIR as if DIR were `/`,
    /// to check or try a policy before it is installed; messages name the
    /// paths as on the installed system. The system-info file is not
    /// affected.
    #[arg(long = "root", value_name = "DIR")]
    root: Option<PathBuf>,
    /// Read the qube list from this JSON file instead of asking qubesd
    /// (internal.GetSystemInfo, the default, as in Qubes).
    #[arg(long = "system-info", value_name = "PATH", env = "QREXEC_SYSTEM_INFO")]
    system_info: Option<PathBuf>,
    /// Program answering `ask` rules (see qrexec-policy-daemon --help).
    #[arg(long = "ask-program", value_name = "PATH", env = "QREXEC_ASK_PROGRAM")]
    ask_program: Option<PathBuf>,
    /// Seconds the ask program may take.
    #[arg(long = "ask-timeout", value_name = "SECONDS", default_value_t = 60.0)]
    ask_timeout: f64,
    /// Only check the policy: print `FILE:LINE: error: REASON` and exit 1
    /// if it does not load.
    #[arg(long = "check")]
    check: bool,
    /// How `ask` and notifications reach the source's GUI qube.
    #[command(flatten)]
    agent: qrexec_policy::agent::AgentArgs,
    /// SOURCE TARGET SERVICE+ARGUMENT
    #[arg(value_name = "ARGS")]
    args: Vec<String>,
}

fn print_error(err: &PolicyError) {
    let text = match err {
        PolicyError::Syntax(e) => format!("{}:{}: error: {}", e.file, e.line, e.message),
        other => other.to_string(),
    };
    // a policy line's control characters are shown escaped
    println!("{}", qrexec_policy::logger::escape_controls(&text));
}

fn main() -> ExitCode {
    let args = Args::parse();
    qrexec_policy::logger::init(log::LevelFilter::Info);
    let paths = PolicyPaths {
        policy_dirs: if args.path.is_empty() {
            vec![RUNTIME_POLICY_PATH.into(), POLICY_PATH.into()]
        } else {
            args.path.clone()
        },
        legacy_dir: args.legacy_policy_path.clone(),
    };
    if args.check {
        if !args.args.is_empty() {
            eprintln!("qrexec-policy-exec: --check takes no positional arguments");
            return ExitCode::from(2);
        }
        let errors = match &args.root {
            Some(root) => qrexec_policy::loader::lint_under(&paths, root),
            None => qrexec_policy::loader::lint(&paths),
        };
        for e in &errors {
            print_error(e);
        }
        return if errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    // Qubes' deprecated form DOMID SOURCE TARGET SERVICE PROCESS_IDENT
    // also runs the allowed call (see `run_call`).
    let (run, source, target, service_and_arg) = match args.args.as_slice() {
        [source, target, service_and_arg] => (None, source, target, service_and_arg),
        [domid, source, target, service_and_arg, ident] => (
            Some((domid.as_str(), ident.as_str())),
            source,
            target,
            service_and_arg,
        ),
        other => {
            eprintln!(
                "qrexec-policy-exec: error: Must have 3 or 5 positional arguments, not {}",
                other.len()
            );
            return ExitCode::from(2);
        }
    };
    // The reply is printed only when the call is not run here, as Qubes.
    let say = |text: &str| {
        if run.is_none() {
            print!("{text}");
        }
    };
    let query = Query {
        source: source.clone(),
        intended_target: target.clone(),
        service_and_arg: service_and_arg.clone(),
        assume_yes_for_ask: args.assume_yes_for_ask,
        just_evaluate: args.just_evaluate,
        requested_source: None,
    };
    let prefix = format!("qrexec: {service_and_arg}: {source} -> {target}:");
    let origin = SystemInfoOrigin::from_option(args.system_info.clone());
    let system = match origin.source().system_info() {
        Ok(s) => s,
        Err(e) => {
            log::error!("{prefix} error getting system info: {e}");
            say("result=deny\n");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match &args.root {
        Some(root) => Policy::load_under(&paths, root),
        None => Policy::load(&paths),
    };
    let policy = match loaded {
        Ok(p) => p,
        Err(e) => {
            log::error!("{prefix} error loading policy: {e}");
            say("result=deny\n");
            return ExitCode::FAILURE;
        }
    };
    let ask_timeout =
        Duration::try_from_secs_f64(args.ask_timeout).unwrap_or(Duration::from_secs(60));
    let confirm: std::sync::Arc<dyn Confirm> = match &args.ask_program {
        Some(p) => std::sync::Arc::new(ProgramConfirm::new(p, ask_timeout)),
        None => std::sync::Arc::new(NoConfirm),
    };
    let confirm = qrexec_policy::agent::with_agent(confirm, &origin, &args.agent, ask_timeout);
    let decision = policy.evaluate(&query, &system, confirm.as_ref());
    let reply = qrexec_policy::protocol::checked_reply(&decision);
    say(&reply);
    if reply == "result=deny\n" || !decision.is_allow() {
        return ExitCode::FAILURE;
    }
    // With --just-evaluate the five-argument form only evaluates, as Qubes'.
    let Some((domid, ident)) = run.filter(|_| !args.just_evaluate) else {
        return ExitCode::SUCCESS;
    };
    let call = Call {
        domid,
        ident,
        source,
        intended_target: target,
        service_and_arg,
    };
    match run_call(&call, &decision, &args.agent) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            log::error!("{prefix} {e}");
            ExitCode::FAILURE
        }
    }
}

/// The call of the five-argument form.
struct Call<'a> {
    domid: &'a str,
    ident: &'a str,
    source: &'a str,
    intended_target: &'a str,
    service_and_arg: &'a str,
}

/// Run an allowed call as Qubes' `qrexec-policy-exec` does in its
/// five-argument form: a dom0 target through `qrexec-client -d dom0 -c`;
/// otherwise the target (its `uuid:` form when known) is started with
/// qubesd's `admin.vm.Start` — after `admin.vm.CreateDisposable` on the
/// template for `@dispvm:TEMPLATE` — and connected with `qrexec-client
/// -Ed TARGET -c IDENT,SOURCE,DOMID`, with `-W -k` for a disposable so it
/// is killed when the call ends. A disposable that does not start is
/// killed at once; any qubesd error refuses the call. Returns
/// qrexec-client's exit status.
fn run_call(
    call: &Call<'_>,
    decision: &qrexec_policy::Decision,
    agent: &qrexec_policy::agent::AgentArgs,
) -> Result<u8, String> {
    let qrexec_policy::Decision::Allow {
        user,
        target,
        target_uuid,
        ..
    } = decision
    else {
        return Err("not allowed".into());
    };
    let qubesd = Qubesd::from_env();
    let mut command = format!("QUBESRPC {} {}", call.service_and_arg, call.source);
    let mut disposable = false;
    let target = if target == "dom0" || target == "@adminvm" {
        let (kind, name) = match call.intended_target.strip_prefix('@') {
            Some(keyword) => ("keyword", keyword),
            None => ("name", call.intended_target),
        };
        command.push_str(&format!(" {kind} {name}"));
        target.clone()
    } else {
        command = format!("{}:{command}", user.as_deref().unwrap_or("DEFAULT"));
        let chosen = target_uuid.as_deref().unwrap_or(target);
        let started = match chosen.strip_prefix("@dispvm:") {
            Some(template) => {
                disposable = true;
                qubesd
                    .create_disposable(template, template.starts_with("uuid:"))
                    .map_err(|e| format!("qubesd could not create disposable VM: {e}"))?
            }
            None => chosen.to_string(),
        };
        if let Err(e) = qubesd.start(&started) {
            if disposable && let Err(kill) = qubesd.kill(&started) {
                log::error!("qubesd could not kill disposable VM {started}: {kill}");
            }
            return Err(format!("qubesd could not start VM {started}: {e}"));
        }
        started
    };
    let mut client = std::process::Command::new(&agent.qrexec_client);
    if let Some(dir) = &agent.qrexec_socket_dir {
        client.arg(format!("--socket-dir={}", dir.display()));
    }
    client
        .arg(if disposable { "-EWkd" } else { "-Ed" })
        .arg(&target)
        .arg("-c")
        .arg(format!("{},{},{}", call.ident, call.source, call.domid))
        .arg("--")
        .arg(&command);
    let status = client
        .status()
        .map_err(|e| format!("cannot run {}: {e}", agent.qrexec_client.display()))?;
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1))
}
