//! `qrexec-fork-server`: thin entry point; everything lives in
//! `qrexec::agent::fork_server`.
#![forbid(unsafe_code)]

fn main() {
    let code = qrexec::agent::fork_server::main(std::env::args().collect());
    std::process::exit(code);
}
