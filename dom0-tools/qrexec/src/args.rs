//! Command-line parsing that behaves like glibc `getopt_long`, so the
//! programs accept exactly the flags Qubes' C programs accept: short options
//! may be clustered (`-tT`) and take their argument attached or separate
//! (`-w5`, `-w 5`), long options take `--name=value` or `--name value`, `--`
//! ends options, and options may follow operands unless the option string
//! starts with `+` (POSIX mode, as `qrexec-client-vm` uses so the local
//! program's own flags are left alone). Errors read like getopt's.

/// One option a program accepts.
#[derive(Debug, Clone, Copy)]
pub struct OptSpec {
    /// Short form (`'d'` for `-d`).
    pub short: Option<char>,
    /// Long form (`"socket-dir"` for `--socket-dir`).
    pub long: Option<&'static str>,
    /// Whether it takes an argument.
    pub takes_arg: bool,
    /// Name the program matches on.
    pub id: &'static str,
}

/// Parsed command line: options in order, then operands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// `(id, argument)` pairs in the order given.
    pub options: Vec<(&'static str, Option<String>)>,
    /// Operands.
    pub operands: Vec<String>,
}

impl Parsed {
    /// Whether option `id` was given.
    pub fn has(&self, id: &str) -> bool {
        self.options.iter().any(|(i, _)| *i == id)
    }

    /// The last argument given to option `id`.
    pub fn value(&self, id: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Parse `args` (without the program name). `posix` stops at the first
/// operand.
pub fn parse(args: &[String], specs: &[OptSpec], posix: bool) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            parsed.operands.extend(iter.by_ref().cloned());
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let spec = specs
                .iter()
                .find(|s| s.long == Some(name))
                .ok_or_else(|| format!("unrecognized option '--{name}'"))?;
            let value = if spec.takes_arg {
                match inline {
                    Some(v) => Some(v),
                    None => Some(
                        iter.next()
                            .cloned()
                            .ok_or_else(|| format!("option '--{name}' requires an argument"))?,
                    ),
                }
            } else if inline.is_some() {
                return Err(format!("option '--{name}' doesn't allow an argument"));
            } else {
                None
            };
            parsed.options.push((spec.id, value));
            continue;
        }
        if let Some(shorts) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
            for (at, c) in shorts.char_indices() {
                let spec = specs
                    .iter()
                    .find(|s| s.short == Some(c))
                    .ok_or_else(|| format!("invalid option -- '{c}'"))?;
                if spec.takes_arg {
                    let rest = shorts.get(at + c.len_utf8()..).unwrap_or("");
                    let value = if rest.is_empty() {
                        iter.next()
                            .cloned()
                            .ok_or_else(|| format!("option requires an argument -- '{c}'"))?
                    } else {
                        rest.to_string()
                    };
                    parsed.options.push((spec.id, Some(value)));
                    break;
                }
                parsed.options.push((spec.id, None));
            }
            continue;
        }
        parsed.operands.push(arg.clone());
        if posix {
            parsed.operands.extend(iter.by_ref().cloned());
            break;
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptSpec] = &[
        OptSpec {
            short: Some('d'),
            long: None,
            takes_arg: true,
            id: "d",
        },
        OptSpec {
            short: Some('t'),
            long: None,
            takes_arg: false,
            id: "t",
        },
        OptSpec {
            short: Some('T'),
            long: None,
            takes_arg: false,
            id: "T",
        },
        OptSpec {
            short: Some('w'),
            long: None,
            takes_arg: true,
            id: "w",
        },
        OptSpec {
            short: None,
            long: Some("socket-dir"),
            takes_arg: true,
            id: "socket-dir",
        },
        OptSpec {
            short: Some('E'),
            long: Some("no-exit-code"),
            takes_arg: false,
            id: "E",
        },
    ];

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn getopt_forms() {
        let p = parse(
            &v(&[
                "-tTw5",
                "-d",
                "vm",
                "--socket-dir=/x",
                "user:ls -l",
                "--no-exit-code",
            ]),
            SPECS,
            false,
        )
        .unwrap();
        assert!(p.has("t") && p.has("T") && p.has("E"));
        assert_eq!(p.value("w"), Some("5"));
        assert_eq!(p.value("d"), Some("vm"));
        assert_eq!(p.value("socket-dir"), Some("/x"));
        assert_eq!(p.operands, v(&["user:ls -l"]));
        let p = parse(&v(&["--socket-dir", "/y", "--", "-t"]), SPECS, false).unwrap();
        assert_eq!(p.value("socket-dir"), Some("/y"));
        assert_eq!(p.operands, v(&["-t"]));
    }

    #[test]
    fn posix_mode_stops_at_operand() {
        let p = parse(&v(&["-t", "vm", "svc", "prog", "-t"]), SPECS, true).unwrap();
        assert_eq!(p.operands, v(&["vm", "svc", "prog", "-t"]));
        assert_eq!(p.options.len(), 1);
    }

    #[test]
    fn errors() {
        assert!(parse(&v(&["-x"]), SPECS, false).is_err());
        assert!(parse(&v(&["-d"]), SPECS, false).is_err());
        assert!(parse(&v(&["--nope"]), SPECS, false).is_err());
        assert!(parse(&v(&["--no-exit-code=1"]), SPECS, false).is_err());
        assert!(parse(&v(&["--socket-dir"]), SPECS, false).is_err());
    }
}
