//! `vm-file-editor`, the `qubes.OpenInVM` handler: see `qubes_filecopy::open_programs`.
#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    qubes_filecopy::open_programs::vm_file_editor_main()
}
