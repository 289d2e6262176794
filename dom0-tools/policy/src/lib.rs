//! Qubes qrexec RPC policy: parser for both policy formats, a compiled
//! evaluator, and the `qrexec-policy-daemon` / `qrexec-policy-exec` tools.
//!
//! This crate decides whether a qrexec call `SOURCE → TARGET SERVICE+ARG` may
//! run, where, and as whom — exactly as Qubes' Python engine
//! (qubes-core-qrexec `qrexec/policy/parser.py`, `parser_compat.py`,
//! `tools/qrexec_policy_daemon.py`, `tools/qrexec_policy_exec.py`) does,
//! but from a compiled index instead of a linear scan, and without re-reading
//! files per call. It must never turn an error (broken file, unknown qube,
//! malformed request, failed confirmation) into an allow.
//!
//! Layout: [`token`] (qube tokens and where they may stand), [`rule`] (one
//! line, both formats, Qubes' error texts), [`loader`] (directories,
//! `!include*`, `!compat-4.0`, legacy files), [`index`] (the compiled
//! index), [`eval`] (actions, redirects, `ask`, replies), [`system_info`]
//! (the qube list from qubesd or a JSON file, behind a trait),
//! [`protocol`] (the daemon
//! socket request), [`ask`] (the confirmation program), [`agent`]
//! (`policy.Ask`/`policy.Notify` to the GUI qube's `qrexec-policy-agent`),
//! [`daemon`] (the server and the reload watcher), [`admin`] (the policy
//! admin API served by `qubes-policy-admin`).
//!
//! # `qrexec-policy-daemon`
//!
//! ```text
//! qrexec-policy-daemon [--socket-path PATH] [--policy-path DIR]...
//!                      [--legacy-policy-path DIR] [--system-info PATH]
//!                      [--ask-program PATH] [--ask-timeout SECONDS]
//!                      [--reload-interval-ms MS] [--max-connections N]
//!                      [--eval-socket-path PATH] [--gui-socket-path PATH]
//!                      [--qrexec-client PATH] [--qrexec-socket-dir DIR]
//!                      [--rpc-socket-dir DIR]
//! ```
//!
//! Listens on `--socket-path` (default `/run/qubes/policy.sock`, mode 0660)
//! and answers the request/reply protocol of [`protocol`]: one request per
//! connection, reply `result=deny\n` or
//! `user=U\nresult=allow\ntarget=T\nautostart=True|False\nrequested_target=R\n`
//! (`result=allow\n` alone for `just_evaluate=yes`), then end of stream.
//! `--policy-path` may be repeated; giving it replaces the defaults
//! `/run/qubes/policy.d` and `/etc/qubes/policy.d` (earlier directories win
//! on equal file names). `--legacy-policy-path` (default
//! `/etc/qubes-rpc/policy`) is what `!compat-4.0` reads; as in Qubes 4.1+
//! (`35-compat.policy`), legacy files are used only through that directive,
//! so a legacy-only setup is a policy directory holding one file with the
//! line `!compat-4.0`. The qube list
//! comes, as in Qubes, from qubesd's `internal.GetSystemInfo`, asked for
//! each request (socket `/var/run/qubesd.internal.sock`, or
//! `QUBESD_INTERNAL_SOCKET`); `--system-info PATH` (or
//! `QREXEC_SYSTEM_INFO`) reads a static JSON file instead, for tests and
//! systems without qubesd (format in [`system_info`]). A qubesd error is a
//! deny, logged with qubesd's message.
//! When the source qube has a GUI qube (`guivm`), `ask`
//! rules and notifications go to its `qrexec-policy-agent` as in Qubes (see
//! [`agent`]; `--qrexec-client`, `--qrexec-socket-dir`, `--rpc-socket-dir`).
//! Otherwise `--ask-program` answers `ask` rules (see [`ask`]); without it
//! every such `ask` is a deny, logged as such. Policy files are
//! watched (`--reload-interval-ms`, default 500) and reloaded on change; a
//! broken policy keeps the last good one and logs `FILE:LINE: REASON`.
//! Like Qubes' daemon it also serves the `policy.EvalSimple` and
//! `policy.EvalGUI` qrexec socket services ([`eval_service`]) on
//! `--eval-socket-path` (default `/etc/qubes-rpc/policy.EvalSimple`) and
//! `--gui-socket-path` (default `/etc/qubes-rpc/policy.EvalGUI`); when the
//! default path cannot be bound (not root, no such directory) that service
//! is skipped with a warning, an explicitly given path must work.
//! Logs go to standard error.
//!
//! # `qrexec-policy-exec`
//!
//! ```text
//! qrexec-policy-exec [--assume-yes-for-ask] [--just-evaluate] [--path DIR]...
//!                    [--legacy-policy-path DIR] [--system-info PATH]
//!                    [--ask-program PATH] [--ask-timeout SECONDS]
//!                    [--qrexec-client PATH] [--qrexec-socket-dir DIR]
//!                    [--rpc-socket-dir DIR] [--root DIR]
//!                    [--] SOURCE TARGET SERVICE[+ARGUMENT]
//! qrexec-policy-exec --check [--path DIR]... [--legacy-policy-path DIR]
//!                    [--root DIR]
//! ```
//!
//! The fallback qrexec-daemon runs when the policy daemon is not reachable
//! (`PROGRAM -- SRC TARGET SVC+ARG`): prints the same reply as the daemon on
//! standard output and exits 0 for allow, 1 for deny (2 for a usage error).
//! The qube list comes from qubesd or `--system-info`, as for the daemon.
//! `--path` is Qubes' name for the policy directory option (repeatable, same
//! defaults as the daemon). Qubes' deprecated five-argument form
//! `DOMID SOURCE TARGET SERVICE+ARG PROCESS_IDENT` prints nothing and runs an
//! allowed call as Qubes' does: a VM target is started with qubesd's
//! `admin.vm.Start` (a `@dispvm:` target first created with
//! `admin.vm.CreateDisposable`, and killed at once if it does not start),
//! then `QREXEC_CLIENT -Ed TARGET -c PROCESS_IDENT,SOURCE,DOMID --
//! USER:QUBESRPC SERVICE+ARG SOURCE` runs (`-EWkd` for a disposable, which
//! qrexec-client then kills when the call ends; `QREXEC_CLIENT` is
//! `--qrexec-client`, with `--qrexec-socket-dir`); the exit status is
//! qrexec-client's, 1 for a deny or a qubesd error.
//! `--check` loads the policy and exits 0 if it is valid, or prints
//! `FILE:LINE: error: REASON` (the format of Qubes' `qubes-policy-lint`) for
//! each error found and exits 1.
//! `--root DIR` (ours; Qubes' tools read only `/etc`) reads the policy
//! tree under `DIR` as if it were `/` — the policy directories, the legacy
//! directory and every include, absolute `!include /etc/qubes/policy.d/…`
//! and `$include:/etc/qubes-rpc/…` too — so a policy can be checked or
//! tried before it is installed; messages name the installed paths
//! ([`loader::load_under`]).
//!
//! # `qubes-policy-admin`
//!
//! The policy admin API (`policy.List`, `policy.Get`, `policy.Replace`,
//! `policy.Remove`, `policy.GetFiles` and the `policy.include.*` forms) as
//! one program installed under each service name in dom0's
//! `/etc/qubes-rpc`; see [`admin`] and the program's own documentation
//! (`QREXEC_POLICY_DIR` points it at another policy directory).
//!
//! # Configuration by environment
//!
//! qrexec-daemon runs its fallback program with a fixed argument list, so
//! both tools also read their paths from the environment when the flag is
//! absent (these names are ours; Qubes has no such variables; qubesd's
//! sockets are `QUBESD_SOCKET` / `QUBESD_INTERNAL_SOCKET`, see
//! `qrexec::qubesd`):
//! `QREXEC_POLICY_PATH` (directories separated by `:`),
//! `QREXEC_LEGACY_POLICY_PATH`, `QREXEC_SYSTEM_INFO`, `QREXEC_ASK_PROGRAM`,
//! `QREXEC_POLICY_AGENT_CLIENT`, `QREXEC_POLICY_AGENT_SOCKET_DIR`,
//! `QREXEC_POLICY_AGENT_RPC_DIR`.
//!
//! # Running it in a box
//!
//! ```text
//! mkdir -p /tmp/box/policy.d /tmp/box/legacy
//! echo 'qubes.Filecopy * work @anyvm ask default_target=vault' > /tmp/box/policy.d/30-user.policy
//! echo '{"domains": {"dom0": {"type": "AdminVM"}, "work": {"type": "AppVM"},
//!        "vault": {"type": "AppVM"}}}' > /tmp/box/qubes.json
//! qrexec-policy-daemon --socket-path /tmp/box/policy.sock \
//!     --policy-path /tmp/box/policy.d --legacy-policy-path /tmp/box/legacy \
//!     --system-info /tmp/box/qubes.json --ask-program /tmp/box/ask.sh &
//! # (without --system-info it asks qubesd: QUBESD_INTERNAL_SOCKET=…)
//! printf 'source=work\nintended_target=vault\nservice_and_arg=qubes.Filecopy\n\n' |
//!     socat - UNIX-CONNECT:/tmp/box/policy.sock
//! ```

//!
//! # Tests, fuzzing, benchmark
//!
//! `cargo test -p qrexec-policy` (unit tests per module; `tests/semantics.rs`
//! one test per semantic corner and the seed examples; `tests/daemon.rs` and
//! `tests/exec.rs` run the binaries; `tests/index_property.rs` checks the
//! index against a linear scan on random policies; `tests/admin.rs` the
//! admin API, also against Qubes' own `PolicyAdmin`; `tests/agent.rs`
//! `policy.Ask`/`policy.Notify` through a fake qrexec-client and Qubes' own
//! `qrexec-policy-agent`); `tests/qubesd.rs` the qubesd calls (system info,
//! the five-argument form) against a qubesd test double; `tests/qubes44.rs`
//! Qubes 4.4's decisions case by case
//! (dom0 by name, keyword and uuid in every position, `internal`,
//! `@dispvm:uuid:`, replies); `tests/differential.rs` compares every
//! decision with Qubes' own Python parser on random systems, policies and
//! requests, and lists the Qubes accidents we do not copy).
//! `cd dom0-tools/policy/fuzz && cargo +nightly fuzz run policy_request`
//! (also `policy_line`, `eval_service`).
//! `cargo bench -p qrexec-policy --bench policy` (load and decision time at
//! 10, 1 000 and 10 000 rules).

#![forbid(unsafe_code)]
// Every module here reads what a peer or a caller sent: an index or a
// slice that could panic is an error (tests opt out per module).
#![deny(clippy::indexing_slicing)]

pub mod admin;
pub mod agent;
pub mod ask;
pub mod daemon;
pub mod eval;
pub mod eval_service;
pub mod index;
pub mod loader;
pub mod logger;
pub mod protocol;
mod pyrepr;
pub mod rule;
pub mod system_info;
pub mod token;

pub use eval::{AskAnswer, AskQuestion, Confirm, Decision, NoConfirm, Notice, Policy, Query};
pub use loader::{PolicyError, PolicyPaths};
pub use system_info::{
    Domain, JsonFileSystemInfo, QubesdSystemInfo, StaticSystemInfo, SystemInfo, SystemInfoError,
    SystemInfoOrigin, SystemInfoSource,
};

/// Where a static system-info file is usually put (`--system-info`); the
/// default is to ask qubesd.
pub const SYSTEM_INFO_PATH: &str = "/etc/qubes/qubes.json";
/// Default policy daemon socket.
pub const POLICY_SOCKET: &str = "/run/qubes/policy.sock";
