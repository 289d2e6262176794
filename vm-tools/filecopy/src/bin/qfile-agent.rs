//! `qfile-agent`: the sending side of `qubes.Filecopy`.
#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    qubes_filecopy::frontend::qfile_agent_main()
}
