//! Which received names and symlink targets are acceptable, with the same
//! outcomes as qubes-linux-utils' `qubes_pure_validate_file_name_v2` and
//! `qubes_pure_validate_symbolic_link_v2` (our own implementation):
//!
//! * a name is a relative, canonical path (no leading `/`, no empty, `.` or
//!   `..` component, no trailing `/`) of printable ASCII or UTF-8 characters
//!   from [`crate::unicode_table`]; otherwise `EILSEQ`;
//! * a symlink must sit at depth >= 2 (`a/link`, never a top-level entry) and
//!   its target may climb with leading `..` at most `depth - 2` levels, so it
//!   can never point outside the top-level directory that contains it; an
//!   absolute or climbing-too-far target is `ENOLINK`.
//!
//! Pure functions over byte slices; never panics (fuzzed through the
//! unpacker).
#![deny(clippy::indexing_slicing)]

use crate::errno::{EILSEQ, ENOLINK};

/// Validation switches (the receiver's command-line options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NameFlags {
    /// `--allow-all-names`: skip the character checks.
    pub allow_unsafe_characters: bool,
    /// Symlink targets may contain `.`/empty components (Qubes' default for
    /// qfile-unpacker).
    pub allow_non_canonical_symlinks: bool,
    /// `--allow-unsafe-symlinks`: do not check symlink targets.
    pub allow_unsafe_symlinks: bool,
}

#[derive(Debug, Clone, Copy)]
struct PathRules {
    unsafe_characters: bool,
    non_canonical: bool,
    trailing_slash: bool,
}

/// Is `code_point` one a name may contain (beyond printable ASCII)?
pub fn code_point_allowed(code_point: u32) -> bool {
    if (0x20..=0x7E).contains(&code_point) {
        return true;
    }
    let table = crate::unicode_table::ALLOWED;
    let idx = table.partition_point(|&(_, hi)| hi < code_point);
    table
        .get(idx)
        .is_some_and(|&(lo, hi)| lo <= code_point && code_point <= hi)
}

/// Decode one UTF-8 character at the start of `bytes` (the first byte is not
/// printable ASCII). `Some(len)` if it is well-formed and allowed.
fn allowed_char_len(bytes: &[u8]) -> Option<usize> {
    let lead = *bytes.first()?;
    let (len, mut code_point) = match lead {
        0xC2..=0xDF => (2, u32::from(lead & 0x1F)),
        0xE0..=0xEF => (3, u32::from(lead & 0x0F)),
        0xF0..=0xF4 => (4, u32::from(lead & 0x07)),
        _ => return None, // controls, DEL, stray continuation bytes, 0xC0/0xC1, 0xF5..
    };
    let tail = bytes.get(1..len)?;
    for (i, &byte) in tail.iter().enumerate() {
        let ok = match (lead, i) {
            (0xE0, 0) => (0xA0..=0xBF).contains(&byte), // no overlong 3-byte forms
            (0xF0, 0) => (0x90..=0xBF).contains(&byte), // no overlong 4-byte forms
            _ => (0x80..=0xBF).contains(&byte),
        };
        if !ok {
            return None;
        }
        code_point = (code_point << 6) | u32::from(byte & 0x3F);
    }
    // Surrogates and values above U+10FFFF are absent from the table.
    code_point_allowed(code_point).then_some(len)
}

/// Walk a path. `Ok(n)`: `n` components other than `..`. Leading `..`
/// components are allowed up to `allowed_dotdot`.
fn validate_path(path: &[u8], mut allowed_dotdot: usize, rules: PathRules) -> Result<usize, u32> {
    if path.is_empty() {
        return if rules.non_canonical {
            Ok(0)
        } else {
            Err(ENOLINK)
        };
    }
    if path.first() == Some(&b'/') {
        return Err(ENOLINK);
    }
    let mut normal = 0usize;
    let mut i = 0usize;
    while let Some(&byte) = path.get(i) {
        let at_component_start = i == 0 || path.get(i - 1) == Some(&b'/');
        if at_component_start {
            let next = path.get(i + 1).copied();
            let after = path.get(i + 2).copied();
            if byte == b'/' {
                if rules.non_canonical {
                    i += 1;
                    continue;
                }
                return Err(EILSEQ);
            }
            if byte == b'.' && matches!(next, None | Some(b'/')) {
                if rules.non_canonical {
                    i += 1;
                    continue;
                }
                return Err(EILSEQ);
            }
            if byte == b'.' && next == Some(b'.') && matches!(after, None | Some(b'/')) {
                if allowed_dotdot == 0 {
                    return Err(ENOLINK);
                }
                allowed_dotdot -= 1;
                i += 2;
                continue;
            }
            allowed_dotdot = 0;
            normal += 1;
        }
        if (0x20..=0x7E).contains(&byte) || rules.unsafe_characters {
            i += 1;
        } else {
            match path.get(i..).and_then(allowed_char_len) {
                Some(len) => i += len,
                None => return Err(EILSEQ),
            }
        }
    }
    if !rules.trailing_slash && path.last() == Some(&b'/') {
        return Err(EILSEQ);
    }
    Ok(normal)
}

/// Is every character printable ASCII or an allowed UTF-8 character (no
/// path rules)? Qubes' `qubes_pure_string_safe_for_display`.
pub fn safe_for_display(text: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&byte) = text.get(i) {
        if (0x20..=0x7E).contains(&byte) {
            i += 1;
        } else {
            match text.get(i..).and_then(allowed_char_len) {
                Some(len) => i += len,
                None => return false,
            }
        }
    }
    true
}

/// Check a received file or directory name. `Err(EILSEQ)` if refused.
pub fn validate_file_name(name: &[u8], flags: NameFlags) -> Result<(), u32> {
    let rules = PathRules {
        unsafe_characters: flags.allow_unsafe_characters,
        non_canonical: false,
        trailing_slash: false,
    };
    match validate_path(name, 0, rules) {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(EILSEQ),
    }
}

/// Check a received symlink (its name and its target). `Err(EILSEQ)` for a
/// bad name or bad characters, `Err(ENOLINK)` for a target that could leave
/// the tree.
pub fn validate_symlink(name: &[u8], target: &[u8], flags: NameFlags) -> Result<(), u32> {
    let name_rules = PathRules {
        unsafe_characters: flags.allow_unsafe_characters,
        non_canonical: false,
        trailing_slash: false,
    };
    let depth = validate_path(name, 0, name_rules).map_err(|_| EILSEQ)?;
    if flags.allow_unsafe_symlinks {
        return if depth > 0 { Ok(()) } else { Err(ENOLINK) };
    }
    if depth < 2 {
        return Err(ENOLINK);
    }
    let target_rules = PathRules {
        unsafe_characters: flags.allow_unsafe_characters,
        non_canonical: flags.allow_non_canonical_symlinks,
        trailing_slash: true,
    };
    validate_path(target, depth - 2, target_rules).map(|_| ())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: a panic is a test failure here
mod tests {
    use super::*;

    const DEFAULT: NameFlags = NameFlags {
        allow_unsafe_characters: false,
        allow_non_canonical_symlinks: true,
        allow_unsafe_symlinks: false,
    };

    #[test]
    fn good_names() {
        for name in [
            &b"a"[..],
            b"a/b",
            b"dir/sub/file.txt",
            b"...",
            b".hidden",
            b"a/..b",
            "caf\u{e9}/\u{65e5}\u{672c}".as_bytes(),
        ] {
            assert_eq!(
                validate_file_name(name, DEFAULT),
                Ok(()),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn refused_names() {
        let cases: &[&[u8]] = &[
            b"",                     // empty
            b"/etc/passwd",          // absolute
            b"..",                   // parent
            b"../x",                 // climbing
            b"a/../b",               // climbing in the middle
            b"a/..",                 // trailing parent
            b".",                    // dot
            b"a/./b",                // dot component
            b"a//b",                 // repeated slash
            b"a/",                   // trailing slash
            b"a\nb",                 // control character
            b"a\x7fb",               // DEL
            b"a\x1b[31m",            // escape sequence
            b"\xff",                 // invalid UTF-8
            b"\xc0\xaf",             // overlong '/'
            b"\xe0\x80\xaf",         // overlong 3-byte
            b"\xed\xa0\x80",         // surrogate
            b"\xc3",                 // truncated sequence
            "a\u{202e}b".as_bytes(), // right-to-left override (format char)
            "a\u{00a0}b".as_bytes(), // no-break space
            "\u{05d0}".as_bytes(),   // Hebrew letter (right-to-left)
            "a\u{0301}".as_bytes(),  // combining mark
            "\u{1f600}".as_bytes(),  // emoji (other symbol)
            "\u{e000}".as_bytes(),   // private use
        ];
        for name in cases {
            assert_eq!(
                validate_file_name(name, DEFAULT),
                Err(EILSEQ),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn allow_all_names_skips_only_character_checks() {
        let all = NameFlags {
            allow_unsafe_characters: true,
            ..DEFAULT
        };
        assert_eq!(validate_file_name(b"a\nb\xff", all), Ok(()));
        assert_eq!(validate_file_name(b"../a", all), Err(EILSEQ));
        assert_eq!(validate_file_name(b"/a", all), Err(EILSEQ));
    }

    #[test]
    fn symlinks() {
        assert_eq!(validate_symlink(b"a/l", b"b", DEFAULT), Ok(()));
        assert_eq!(validate_symlink(b"a/b/l", b"../c", DEFAULT), Ok(()));
        assert_eq!(validate_symlink(b"a/b/l", b"./c/", DEFAULT), Ok(()));
        assert_eq!(
            validate_symlink(b"a/b/l", b"x/../c", DEFAULT),
            Err(ENOLINK),
            "`..` after a normal component"
        );
        // refusals
        assert_eq!(
            validate_symlink(b"l", b"a", DEFAULT),
            Err(ENOLINK),
            "top-level symlink"
        );
        assert_eq!(
            validate_symlink(b"a/l", b"/etc", DEFAULT),
            Err(ENOLINK),
            "absolute target"
        );
        assert_eq!(
            validate_symlink(b"a/l", b"../x", DEFAULT),
            Err(ENOLINK),
            "climbs out of a/"
        );
        assert_eq!(
            validate_symlink(b"a/b/l", b"../../x", DEFAULT),
            Err(ENOLINK)
        );
        assert_eq!(
            validate_symlink(
                b"a/l",
                b"",
                NameFlags {
                    allow_non_canonical_symlinks: false,
                    ..DEFAULT
                }
            ),
            Err(ENOLINK)
        );
        assert_eq!(
            validate_symlink(b"a/l", b"b\nc", DEFAULT),
            Err(EILSEQ),
            "control character in target"
        );
        assert_eq!(
            validate_symlink(
                b"a/l",
                b"b//c",
                NameFlags {
                    allow_non_canonical_symlinks: false,
                    ..DEFAULT
                }
            ),
            Err(EILSEQ)
        );
        assert_eq!(
            validate_symlink(b"../l", b"b", DEFAULT),
            Err(EILSEQ),
            "bad link name"
        );
        // --allow-unsafe-symlinks
        let unsafe_links = NameFlags {
            allow_unsafe_symlinks: true,
            ..DEFAULT
        };
        assert_eq!(validate_symlink(b"l", b"/etc", unsafe_links), Ok(()));
    }

    #[test]
    fn display_safety() {
        assert!(safe_for_display("../caf\u{e9}/x".as_bytes()));
        assert!(!safe_for_display(b"a\tb"));
        assert!(!safe_for_display(b"\xc3"));
    }

    #[test]
    fn table_is_sorted_and_disjoint() {
        let table = crate::unicode_table::ALLOWED;
        for pair in table.windows(2) {
            assert!(
                pair[0].0 <= pair[0].1 && pair[0].1 + 1 < pair[1].0,
                "{pair:?}"
            );
        }
        assert!(code_point_allowed(0xE9));
        assert!(!code_point_allowed(0x7F));
        assert!(!code_point_allowed(0x10FFFF));
    }
}
