//! `qrexec-daemon`: thin entry point; everything lives in `qrexec::daemon`.
#![forbid(unsafe_code)]

fn main() {
    let code = qrexec::daemon::main(std::env::args().collect());
    std::process::exit(code);
}
