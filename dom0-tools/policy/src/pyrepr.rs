//! Python `repr()` of strings, lists and tuples, for error texts.
//!
//! Qubes' policy engine is written in Python and its error messages embed
//! values with `{!r}` (for example `invalid source token: '@foo'` or
//! `service 'a$b' contains invalid characters: ('$',)`). To give users and
//! tools the very same texts, this module reproduces CPython's `str.__repr__`
//! quoting rules. It must never be used to build anything but messages.

use std::fmt::Write as _;

/// `repr(s)` for a Python `str`: single quotes unless the text contains a
/// single quote and no double quote; backslash, the quote, `\n`, `\r`, `\t`
/// escaped; other control characters as `\xNN`, `\uNNNN` or `\UNNNNNNNN`.
pub fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if is_unprintable(c) => {
                let v = u32::from(c);
                // Writing into a String cannot fail.
                let _ = if v < 0x100 {
                    write!(out, "\\x{v:02x}")
                } else if v < 0x10000 {
                    write!(out, "\\u{v:04x}")
                } else {
                    write!(out, "\\U{v:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// CPython treats categories Cc, Cf, Cs, Co, Cn, Zl, Zp, Zs (except the
/// ASCII space) as unprintable. We approximate with the control characters
/// and the non-ASCII whitespace, which is what can appear in a policy line.
fn is_unprintable(c: char) -> bool {
    c.is_control() || (c != ' ' && c.is_whitespace()) || c == '\u{ad}' || c == '\u{feff}'
}

/// `repr(list_of_str)`: `['a', 'b']`.
pub fn list_repr<S: AsRef<str>>(items: &[S]) -> String {
    let inner: Vec<String> = items.iter().map(|s| str_repr(s.as_ref())).collect();
    format!("[{}]", inner.join(", "))
}

/// `repr(tuple_of_single_chars)`: `('$',)` for one, `('$', '%')` for more.
pub fn char_tuple_repr(chars: &[char]) -> String {
    let inner: Vec<String> = chars.iter().map(|c| str_repr(&c.to_string())).collect();
    if inner.len() == 1 {
        format!("({},)", inner.join(", "))
    } else {
        format!("({})", inner.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_python() {
        assert_eq!(str_repr("abc"), "'abc'");
        assert_eq!(str_repr("a'b"), "\"a'b\"");
        assert_eq!(str_repr("a'b\""), "'a\\'b\"'");
        assert_eq!(str_repr("a\\b"), "'a\\\\b'");
        assert_eq!(str_repr("\u{1}"), "'\\x01'");
        assert_eq!(str_repr("é"), "'é'");
    }

    #[test]
    fn lists_and_tuples() {
        assert_eq!(list_repr(&["a=b", "c"]), "['a=b', 'c']");
        assert_eq!(list_repr::<&str>(&[]), "[]");
        assert_eq!(char_tuple_repr(&['$']), "('$',)");
        assert_eq!(char_tuple_repr(&['$', '%']), "('$', '%')");
    }
}
