//! `qubesdb-rm`: qubes-core-qubesdb's tool of that name (see
//! `qubesdb::cli` for flags and messages). It only talks to a daemon's
//! socket; it never changes anything else.
#![forbid(unsafe_code)]

fn main() {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_else(|| "qubesdb-rm".to_string());
    let rest: Vec<String> = args.collect();
    std::process::exit(qubesdb::cli::run(
        &argv0,
        &rest,
        Some(qubesdb::cli::Cmd::Rm),
    ));
}
