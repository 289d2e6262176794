//! `qfile-unpacker`: the `qubes.Filecopy` service.
#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    qubes_filecopy::frontend::qfile_unpacker_main()
}
