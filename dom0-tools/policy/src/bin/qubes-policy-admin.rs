//! `qubes-policy-admin`: the program behind dom0's `policy.*` qrexec
//! services (install it as, or link it to, `/etc/qubes-rpc/policy.List`,
//! `policy.Get`, `policy.Replace`, `policy.Remove`, `policy.GetFiles`,
//! `policy.include.List`, `policy.include.Get`, `policy.include.Replace`,
//! `policy.include.Remove`). See [`qrexec_policy::admin`] for the API.
//!
//! Like Qubes' program it reads everything from the environment qrexec sets
//! and ignores its arguments (qrexec passes the service argument as
//! `argv[1]`): `QREXEC_SERVICE_FULL_NAME` (`SERVICE[+ARG]`),
//! `QREXEC_REMOTE_DOMAIN` (the caller, for the log), the payload on standard
//! input. `QREXEC_POLICY_DIR` (default `/etc/qubes/policy.d`) is the
//! directory managed, `QREXEC_POLICY_ADMIN_LOG` (default
//! `/var/log/qubes/policy-admin.log`) the log; `QREXEC_LEGACY_POLICY_PATH`
//! (ours, default `/etc/qubes-rpc/policy`) is what `!compat-4.0` reads
//! when a change is checked.
//!
//! Output: the answer on standard output, exit 0. A refused request prints
//! `CLASS MESSAGE` (e.g. `PolicyAdminSyntaxException Policy change
//! validation failed: FILE:LINE: REASON`) on standard error and exits 1; an
//! internal error prints `Internal error. See 'LOG' in dom0 for details.`
//! and exits 2. Every request is logged as `SERVICE+ARG (SOURCE)`, with
//! `: error: MESSAGE` when refused.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use qrexec_policy::admin::{AdminError, LOG_FILE, MAX_PAYLOAD, POLICY_DIR, PolicyAdmin};
use qrexec_policy::loader::LEGACY_POLICY_PATH;

fn env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v: OsString| v.to_string_lossy().into_owned())
}

/// `YYYY-MM-DD HH:MM:SS,mmm` (UTC), Python logging's `asctime`.
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02},{:03}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_millis()
    )
}

struct Log(Option<std::fs::File>);

impl Log {
    fn open(path: &str) -> Log {
        Log(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok())
    }

    fn line(&mut self, message: &str) {
        if let Some(file) = &mut self.0 {
            let _ = writeln!(file, "{} {message}", timestamp());
        }
    }
}

fn main() -> ExitCode {
    let policy_dir = PathBuf::from(env("QREXEC_POLICY_DIR").unwrap_or_else(|| POLICY_DIR.into()));
    let legacy_dir = PathBuf::from(
        env("QREXEC_LEGACY_POLICY_PATH").unwrap_or_else(|| LEGACY_POLICY_PATH.into()),
    );
    let log_path = env("QREXEC_POLICY_ADMIN_LOG").unwrap_or_else(|| LOG_FILE.into());
    let mut log = Log::open(&log_path);
    let internal_error = |log: &mut Log, context: &str, message: &str| {
        log.line(&format!("{context}: exception: {message}"));
        let _ = std::io::stderr()
            .write_all(format!("Internal error. See '{log_path}' in dom0 for details.").as_bytes());
        ExitCode::from(2)
    };

    let Some(full_name) = env("QREXEC_SERVICE_FULL_NAME") else {
        return internal_error(
            &mut log,
            "qubes-policy-admin",
            "QREXEC_SERVICE_FULL_NAME is not set (run this program as a qrexec service)",
        );
    };
    let source = env("QREXEC_REMOTE_DOMAIN").unwrap_or_default();
    let (service, arg) = full_name.split_once('+').unwrap_or((&full_name, ""));
    let context = format!("{service}+{arg} ({source})");

    let mut payload = Vec::new();
    let limit = u64::try_from(MAX_PAYLOAD).unwrap_or(u64::MAX) + 1;
    if let Err(e) = std::io::stdin().take(limit).read_to_end(&mut payload) {
        return internal_error(&mut log, &context, &format!("reading the payload: {e}"));
    }

    let result = PolicyAdmin::new(&policy_dir, &legacy_dir)
        .and_then(|admin| admin.handle_request(service, arg, &payload));
    match result {
        Ok(answer) => {
            log.line(&context);
            if let Some(answer) = answer {
                let mut out = std::io::stdout().lock();
                if out.write_all(&answer).and_then(|()| out.flush()).is_err() {
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Err(AdminError::Internal(message)) => internal_error(&mut log, &context, &message),
        Err(e) => {
            log.line(&format!("{context}: error: {}", e.message()));
            let _ = std::io::stderr()
                .write_all(format!("{} {}", e.class_name(), e.message()).as_bytes());
            ExitCode::from(1)
        }
    }
}
