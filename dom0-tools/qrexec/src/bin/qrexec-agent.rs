//! `qrexec-agent`: thin entry point; everything lives in `qrexec::agent`.
#![forbid(unsafe_code)]

fn main() {
    let code = qrexec::agent::main(std::env::args().collect());
    std::process::exit(code);
}
