//! `qopen-in-vm`, the `qubes.OpenInVM` sender: see `qubes_filecopy::open_programs`.
#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    qubes_filecopy::open_programs::qopen_in_vm_main()
}
