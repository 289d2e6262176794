//! A PAM session around a command a root agent runs as another user, as
//! Qubes' agent opens one (its PAM service `qrexec`, `/etc/pam.d/qrexec`).
//!
//! The agent is multi-threaded and must stay root, so the session is held
//! by a helper process: the agent runs its own program as
//! `--qrexec-pam-session USER -- PROGRAM ARGS…` (still root, with the
//! command's stdio and environment). The helper starts PAM for `USER`
//! (`pam_rootok` lets root in without a password in Qubes' file),
//! authenticates, opens the session (credentials established first), adds
//! `HOME`, `SHELL`, `USER` and `LOGNAME` to the PAM environment and runs the
//! command with the PAM environment laid over its own, as the user: through
//! its own program again as `--qrexec-drop-privileges UID GID GROUPS HOME --
//! PROGRAM ARGS…`, which (single-threaded) sets the supplementary groups
//! (the user's from `/etc/group`, as `initgroups`), the group and user ids,
//! starts a new session (`setsid`), enters the home directory if it can, and
//! executes the command. The helper then lets go of its stdio (so the agent
//! sees end of file when the command closes its own, as Qubes' helper closes
//! fds 0-2), waits for the command, closes the PAM session, deletes the
//! credentials and exits with the command's status (128+signal if killed).
//! Any PAM failure refuses the call with 125 (`QREXEC_EXIT_PROBLEM`), as
//! Qubes.
//!
//! Built only with the crate's `pam` feature (the binding, `pam-client`,
//! needs libpam to link); without it a root agent switches uid/gid itself.
//! `QREXEC_PAM_SERVICE` names another PAM service than `qrexec` (for tests).

use std::os::unix::process::CommandExt;
use std::process::Command;

use protocol::qrexec::QREXEC_EXIT_PROBLEM;

/// First argument that makes our program the PAM session helper.
pub const PAM_SESSION_ARG: &str = "--qrexec-pam-session";
/// First argument that makes our program drop privileges and exec.
pub const DROP_PRIVILEGES_ARG: &str = "--qrexec-drop-privileges";
/// PAM service name (Qubes': `/etc/pam.d/qrexec`).
pub const PAM_SERVICE: &str = "qrexec";
/// Environment variable naming another PAM service (tests).
pub const PAM_SERVICE_ENV: &str = "QREXEC_PAM_SERVICE";

/// Whether this build opens PAM sessions.
pub const ENABLED: bool = cfg!(feature = "pam");

const PROBLEM: i32 = QREXEC_EXIT_PROBLEM as i32;

/// The command that runs `cmd` (program, arguments and environment
/// changes; stdio is set by the caller) inside a PAM session for `user`.
pub fn wrap(cmd: &Command, user: &str, mut wrapper: Command) -> Command {
    wrapper
        .arg(PAM_SESSION_ARG)
        .arg(user)
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => wrapper.env(key, v),
            None => wrapper.env_remove(key),
        };
    }
    wrapper
}

/// The supplementary groups of `user` (primary group `gid`) from a
/// group-format text, as `initgroups` gives them: `gid` first, then every
/// group listing the user as a member.
pub fn user_groups(group_text: &str, user: &str, gid: u32) -> Vec<u32> {
    let mut groups = vec![gid];
    for line in group_text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if let [_, _, id, members, ..] = fields.as_slice()
            && members.split(',').any(|m| m == user)
            && let Ok(id) = id.parse::<u32>()
            && !groups.contains(&id)
        {
            groups.push(id);
        }
    }
    groups
}

/// Split `[ARGS…, "--", PROGRAM, ARGS…]` at the `--`.
fn split_command(args: &[String]) -> Option<(&[String], &String, &[String])> {
    let dash = args.iter().position(|a| a == "--")?;
    let (head, rest) = args.split_at(dash);
    let (program, program_args) = rest.get(1..)?.split_first()?;
    Some((head, program, program_args))
}

/// `--qrexec-drop-privileges UID GID GROUPS HOME -- PROGRAM ARGS…` (argv
/// after the program name): become the user and execute PROGRAM. Returns
/// only on failure.
pub fn drop_privileges_main(args: &[String]) -> i32 {
    let Some((head, program, program_args)) = split_command(args) else {
        crate::log_error!("{DROP_PRIVILEGES_ARG} UID GID GROUPS HOME -- PROGRAM ARGS...");
        return PROBLEM;
    };
    let [uid, gid, groups, home] = head else {
        crate::log_error!("{DROP_PRIVILEGES_ARG} needs UID GID GROUPS HOME");
        return PROBLEM;
    };
    let number = |s: &str| s.parse::<u32>().ok();
    let (Some(uid), Some(gid)) = (number(uid), number(gid)) else {
        crate::log_error!("bad uid/gid {uid}/{gid}");
        return PROBLEM;
    };
    let groups: Option<Vec<rustix::process::Gid>> = groups
        .split(',')
        .filter(|g| !g.is_empty())
        .map(|g| number(g).map(rustix::process::Gid::from_raw))
        .collect();
    let Some(groups) = groups else {
        crate::log_error!("bad group list");
        return PROBLEM;
    };
    // This process has one thread: the thread's ids are the process's.
    let dropped = rustix::thread::set_thread_groups(&groups)
        .and_then(|()| rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(gid)))
        .and_then(|()| rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid)));
    if let Err(e) = dropped {
        crate::log_error!("cannot switch to uid {uid} gid {gid}: {e}");
        return PROBLEM;
    }
    let _ = rustix::process::setsid();
    if std::env::set_current_dir(home).is_err() {
        crate::log_error!("chdir({home}) failed");
    }
    let e = Command::new(program).args(program_args).exec();
    crate::log_error!("cannot execute {program}: {e}");
    PROBLEM
}

/// `--qrexec-pam-session USER -- PROGRAM ARGS…` (argv after the program
/// name): see the module docs. Returns the exit code.
#[cfg(feature = "pam")]
pub fn session_main(args: &[String]) -> i32 {
    use pam_client::{Context, Flag, conv_null::Conversation};

    let Some(([user], program, program_args)) = split_command(args) else {
        crate::log_error!("{PAM_SESSION_ARG} USER -- PROGRAM ARGS...");
        return PROBLEM;
    };
    let Some(account) = super::lookup_user(user) else {
        crate::log_error!(
            "user {} does not exist",
            crate::log::escape(user.as_bytes())
        );
        return PROBLEM;
    };
    let groups = user_groups(
        &std::fs::read_to_string("/etc/group").unwrap_or_default(),
        &account.name,
        account.gid,
    );
    let service = std::env::var(PAM_SERVICE_ENV).unwrap_or_else(|_| PAM_SERVICE.to_string());
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        crate::log_error!("PAM {what} for user {} failed: {e}", account.name);
        PROBLEM
    };
    let mut context = match Context::new(&service, Some(&account.name), Conversation::new()) {
        Ok(c) => c,
        Err(e) => return fail("start", &e),
    };
    if let Err(e) = context.authenticate(Flag::NONE) {
        return fail("authentication", &e);
    }
    let mut session = match context.open_session(Flag::NONE) {
        Ok(s) => s,
        Err(e) => return fail("session", &e),
    };
    for (key, value) in [
        ("HOME", &account.home),
        ("SHELL", &account.shell),
        ("USER", &account.name),
        ("LOGNAME", &account.name),
    ] {
        if let Err(e) = session.putenv(format!("{key}={value}")) {
            return fail("putenv", &e);
        }
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return fail("helper lookup", &e),
    };
    let group_list: Vec<String> = groups.iter().map(u32::to_string).collect();
    let mut child = Command::new(exe);
    child
        .arg(DROP_PRIVILEGES_ARG)
        .arg(account.uid.to_string())
        .arg(account.gid.to_string())
        .arg(group_list.join(","))
        .arg(&account.home)
        .arg("--")
        .arg(program)
        .args(program_args)
        .env_remove(PAM_SERVICE_ENV);
    for (key, value) in session.envlist().iter_tuples() {
        child.env(key, value);
    }
    let status = match child.spawn() {
        Ok(mut child) => {
            // Let go of the command's stdio: the agent sees their end when
            // the command closes them, not when this helper exits.
            release_stdio();
            child.wait()
        }
        Err(e) => Err(e),
    };
    let code = match status {
        Ok(status) => super::exit_code(status) as i32,
        Err(e) => {
            crate::log_error!("cannot run {program}: {e}");
            PROBLEM
        }
    };
    if let Err(e) = session.close(Flag::NONE) {
        crate::log_error!("PAM session close failed: {e}");
    }
    code
}

/// Without the `pam` feature there is no helper.
#[cfg(not(feature = "pam"))]
pub fn session_main(_args: &[String]) -> i32 {
    crate::log_error!("this qrexec-agent was built without PAM support");
    PROBLEM
}

/// Point stdin, stdout and stderr at `/dev/null`.
#[cfg(feature = "pam")]
fn release_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = rustix::stdio::dup2_stdin(&null);
        let _ = rustix::stdio::dup2_stdout(&null);
        let _ = rustix::stdio::dup2_stderr(&null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_as_initgroups() {
        let text =
            "root:x:0:\nwheel:x:10:alice,bob\nusers:x:100:bob\naudio:x:29:alice\nalice:x:1000:\n";
        assert_eq!(user_groups(text, "alice", 1000), vec![1000, 10, 29]);
        assert_eq!(user_groups(text, "bob", 100), vec![100, 10]);
        assert_eq!(user_groups(text, "carol", 5), vec![5]);
        assert_eq!(user_groups("bad line\nx:x:y:carol\n", "carol", 5), vec![5]);
    }

    #[test]
    fn wrapped_command_keeps_program_arguments_and_environment() {
        let mut cmd = Command::new("/srv/service");
        cmd.arg("arg1")
            .env("QREXEC_REMOTE_DOMAIN", "vmA")
            .env_remove("X");
        let w = wrap(&cmd, "user", Command::new("/agent"));
        let args: Vec<_> = w.get_args().collect();
        assert_eq!(
            args,
            [PAM_SESSION_ARG, "user", "--", "/srv/service", "arg1"]
        );
        let envs: Vec<_> = w.get_envs().collect();
        assert!(envs.contains(&("QREXEC_REMOTE_DOMAIN".as_ref(), Some("vmA".as_ref()))));
        assert!(envs.contains(&("X".as_ref(), None)));
    }

    #[test]
    fn command_split() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let args = v(&["u", "--", "/bin/prog", "-x"]);
        let (head, prog, rest) = split_command(&args).unwrap();
        assert_eq!(
            (head, prog.as_str(), rest),
            (&v(&["u"])[..], "/bin/prog", &v(&["-x"])[..])
        );
        assert!(split_command(&v(&["u", "--"])).is_none());
        assert!(split_command(&v(&["u"])).is_none());
    }
}
