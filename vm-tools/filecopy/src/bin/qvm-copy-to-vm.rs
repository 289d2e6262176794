//! `qvm-copy-to-vm`: see `qubes_filecopy::frontend`.
#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    qubes_filecopy::frontend::qvm_copy_main(qubes_filecopy::frontend::Operation::Copy, true)
}
