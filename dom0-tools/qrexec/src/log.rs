//! Minimal logging to stderr in the shape Qubes' programs use
//! (`program[pid]: message`). Never formats peer bytes unescaped: callers pass
//! peer strings through [`escape`] first.

use std::fmt;
use std::sync::OnceLock;

static PROGRAM: OnceLock<&'static str> = OnceLock::new();

/// Set the program name used as log prefix (once, at start-up).
pub fn init(program: &'static str) {
    let _ = PROGRAM.set(program);
}

/// Write one log line to stderr. A closed or broken stderr is ignored
/// (`eprintln!` would panic, and a daemon must not die of its log).
pub fn log(args: fmt::Arguments<'_>) {
    use std::io::Write;
    let program = PROGRAM.get().copied().unwrap_or("qrexec");
    let line = format!("{program}[{}]: {args}\n", std::process::id());
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Log a formatted line.
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => { $crate::log::log(format_args!($($arg)*)) };
}

/// Bytes from a peer, printable: non-printable bytes become `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}
