//! A minimal `log` backend that writes one line per record to standard
//! error, as Qubes' policy tools do (`logging.basicConfig(format="%(message)s")`).
//!
//! It must never block on anything but stderr, and never panic. Every
//! record is written as exactly one line: control characters in it (from a
//! policy line, a qube name, a request) are shown escaped (`\n`, `\u{1b}`),
//! so text from a policy file or a caller can neither forge log lines nor
//! send terminal escapes.

use std::io::Write;

#[derive(Debug)]
struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let text = record.args().to_string();
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{}", escape_controls(&text));
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// `text` with every control character escaped (Rust's `escape_default`
/// form); other characters, non-ASCII included, are kept.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        let mut out = String::with_capacity(text.len() + 8);
        for c in text.chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        std::borrow::Cow::Owned(out)
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Install the logger (once; later calls do nothing).
pub fn init(level: log::LevelFilter) {
    let logger = Box::leak(Box::new(StderrLogger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("work ü"), "work ü");
        assert_eq!(
            escape_controls("a\nqrexec: forged\r\u{1b}[2J\u{85}\t"),
            "a\\nqrexec: forged\\r\\u{1b}[2J\\u{85}\\t"
        );
    }
}
