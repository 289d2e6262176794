//! `qrexec-client-vm`: thin entry point; everything lives in `qrexec::client_vm`.
#![forbid(unsafe_code)]

fn main() {
    let code = qrexec::client_vm::main(std::env::args().collect());
    std::process::exit(code);
}
