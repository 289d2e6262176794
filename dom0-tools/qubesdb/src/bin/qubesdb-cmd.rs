//! `qubesdb-cmd`: the multi-call tool of qubes-core-qubesdb; the command
//! comes from `-c CMD` or from the program name (`qubesdb-read` → read), as
//! in `client/qubesdb-cmd.c`. It only talks to a daemon's socket.
#![forbid(unsafe_code)]

fn main() {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_else(|| "qubesdb-cmd".to_string());
    let rest: Vec<String> = args.collect();
    let cmd = qubesdb::cli::cmd_from_program(&argv0);
    std::process::exit(qubesdb::cli::run(&argv0, &rest, cmd));
}
