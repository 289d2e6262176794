//! `qvm-open-in-dvm FILE`: see `qubes_filecopy::open_programs`.
#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    qubes_filecopy::open_programs::qvm_open_main(true)
}
