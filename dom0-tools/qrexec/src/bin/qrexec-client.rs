//! `qrexec-client`: thin entry point; everything lives in `qrexec::client`.
#![forbid(unsafe_code)]

fn main() {
    let code = qrexec::client::main(std::env::args().collect());
    std::process::exit(code);
}
