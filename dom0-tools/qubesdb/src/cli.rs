//! The `qubesdb-read`, `qubesdb-write`, `qubesdb-rm`, `qubesdb-list`,
//! `qubesdb-multiread`, `qubesdb-watch` (and `qubesdb-cmd -c CMD`) tools,
//! with the flags, messages and exit codes of qubes-core-qubesdb's
//! `client/qubesdb-cmd.c`:
//! `[-frqw] [-c <command>] [-d <destination domain>] [-n N] [args]`;
//! `-f` full paths, `-r` raw values (else bytes outside 0x20..0x7f print as
//! `\xNN`), `-q` quiet, `-w` wait for a value (read), `-n N` events to wait
//! for (watch; negative: forever), `-d VMNAME` talks to that VM's dom0
//! daemon. Options may follow operands (GNU getopt permutes), `--` ends
//! them. Failures print `Failed to … <path>` on stderr and exit 1.
//!
//! It must never print a value byte a terminal would interpret unless `-r`
//! was given.

use std::io::Write;

use crate::client::QdbClient;

/// The command a tool runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// `read path [path...]`.
    Read,
    /// `write path value [path value...]`.
    Write,
    /// `rm path [path...]`.
    Rm,
    /// `multiread path [path...]`.
    Multiread,
    /// `list path`.
    List,
    /// `watch [-n N] path [path...]`.
    Watch,
}

impl Cmd {
    /// qubesdb-cmd.c `parse_cmd`.
    pub fn parse(name: &str) -> Option<Cmd> {
        match name {
            "read" => Some(Cmd::Read),
            "write" => Some(Cmd::Write),
            "rm" => Some(Cmd::Rm),
            "multiread" => Some(Cmd::Multiread),
            "list" => Some(Cmd::List),
            "watch" => Some(Cmd::Watch),
            _ => None,
        }
    }
}

/// The command named by a program name such as `qubesdb-read` (the part
/// after the first `-`), as qubesdb-cmd.c derives it from `argv[0]`.
pub fn cmd_from_program(argv0: &str) -> Option<Cmd> {
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    base.split_once('-').and_then(|(_, cmd)| Cmd::parse(cmd))
}

fn usage(argv0: &str) -> String {
    format!(
        "Usage: {argv0} [-frq] [-c <command>] [-d <destination domain>] \n\
         \x20      [command arguments]\n\
         \x20 -f - print full path (affects reading commands)\n\
         \x20 -r - print raw value (affects reading commands)\n\
         \x20 -q - quiet - do not print error\n\
         \x20 -c <command> - specify command\n\
         \x20 -d <domain> - specify destination domain, available only in dom0\n\
         \x20 -w - wait for any value (possibly empty)\n\
         \n\
         Available commands:\n\
         \x20 read path [path...] - read value(s)\n\
         \x20 write path value [path value...] - write value(s)\n\
         \x20 rm path [path...] - remove value(s)\n\
         \x20 multiread path [path...] - read all entries matching given path\n\
         \x20 list path - list paths mathing given argument\n\
         \x20 watch [-n N] path [path...] - watch given path(s) for modifications\n\
         \x20   if -n given you can specify how many events should be received before terminating (default: 1, negative: infinite)\n"
    )
}

struct Options {
    fullpath: bool,
    raw: bool,
    quiet: bool,
    wait: bool,
    watch_count: i64,
    dest: Option<String>,
    cmd: Option<Cmd>,
    /// `-c` named something unknown: reported as "Unknown command" later.
    bad_cmd: bool,
    operands: Vec<String>,
}

/// What parsing decided.
enum Parsed {
    Run(Options),
    Exit(i32, String),
}

fn parse(argv0: &str, args: &[String], default_cmd: Option<Cmd>) -> Parsed {
    let mut options = Options {
        fullpath: false,
        raw: false,
        quiet: false,
        wait: false,
        watch_count: 1,
        dest: None,
        cmd: default_cmd,
        bad_cmd: false,
        operands: Vec::new(),
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            options.operands.extend(iter.by_ref().cloned());
            break;
        }
        let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            options.operands.push(arg.clone());
            continue;
        };
        for (index, flag) in flags.char_indices() {
            let take_value = |iter: &mut std::slice::Iter<'_, String>| -> Option<String> {
                let rest = flags.get(index + flag.len_utf8()..).unwrap_or("");
                if rest.is_empty() {
                    iter.next().cloned()
                } else {
                    Some(rest.to_string())
                }
            };
            match flag {
                'f' => options.fullpath = true,
                'r' => options.raw = true,
                'q' => options.quiet = true,
                'w' => options.wait = true,
                'h' => return Parsed::Exit(0, usage(argv0)),
                'c' | 'd' | 'n' => {
                    let Some(value) = take_value(&mut iter) else {
                        return Parsed::Exit(
                            1,
                            format!(
                                "{argv0}: option requires an argument -- '{flag}'\n{}",
                                usage(argv0)
                            ),
                        );
                    };
                    match flag {
                        'c' => {
                            options.cmd = Cmd::parse(&value);
                            options.bad_cmd = options.cmd.is_none();
                        }
                        'd' => options.dest = Some(value),
                        _ => {
                            // atoi: leading number, else 0.
                            let digits: String = value
                                .trim_start()
                                .chars()
                                .enumerate()
                                .take_while(|(i, c)| {
                                    c.is_ascii_digit() || (*i == 0 && (*c == '-' || *c == '+'))
                                })
                                .map(|(_, c)| c)
                                .collect();
                            options.watch_count = digits.parse().unwrap_or(0);
                            if options.cmd != Some(Cmd::Watch) {
                                return Parsed::Exit(1, "-n valid only for watch command\n".into());
                            }
                        }
                    }
                    break;
                }
                other => {
                    return Parsed::Exit(
                        1,
                        format!("{argv0}: invalid option -- '{other}'\n{}", usage(argv0)),
                    );
                }
            }
        }
    }
    if args.is_empty() || (options.cmd.is_none() && !options.bad_cmd) {
        return Parsed::Exit(0, usage(argv0));
    }
    Parsed::Run(options)
}

/// qubesdb-cmd.c `encode_and_print_value`.
pub fn encode_value(value: &[u8], raw: bool) -> Vec<u8> {
    // The C tool prints with %s: the value ends at its first NUL.
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    let value = value.get(..end).unwrap_or(&[]);
    if raw {
        return value.to_vec();
    }
    let mut out = Vec::with_capacity(value.len());
    for &byte in value {
        if (0x20..0x80).contains(&byte) {
            out.push(byte);
        } else {
            out.extend_from_slice(format!("\\x{byte:02x}").as_bytes());
        }
    }
    out
}

/// Runs a tool; returns its exit status. `default_cmd` is the command the
/// program name implies (`None` for `qubesdb-cmd`).
pub fn run(argv0: &str, args: &[String], default_cmd: Option<Cmd>) -> i32 {
    let options = match parse(argv0, args, default_cmd) {
        Parsed::Run(options) => options,
        Parsed::Exit(code, text) => {
            eprint!("{text}");
            return code;
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut client = match QdbClient::open(options.dest.as_deref()) {
        Ok(client) => client,
        Err(_) => {
            if !options.quiet {
                eprintln!(
                    "Failed connect to {} daemon",
                    options.dest.as_deref().unwrap_or("local")
                );
            }
            return 1;
        }
    };
    let Some(cmd) = options.cmd else {
        if !options.quiet {
            eprintln!("Unknown command");
        }
        return 1;
    };
    let args = &options.operands;
    let fail = |what: &str, path: &str| {
        if !options.quiet {
            eprintln!("Failed to {what} {path}");
        }
    };
    let mut status = 0;
    match cmd {
        Cmd::Read => {
            for path in args {
                let mut value = client.read(path).ok();
                if options.wait {
                    let _ = client.watch(path);
                    while value.is_none() {
                        if client.read_watch().is_err() {
                            break;
                        }
                        value = client.read(path).ok();
                    }
                }
                match value {
                    Some(value) => {
                        if options.fullpath {
                            let _ = write!(out, "{path} = ");
                        }
                        let _ = out.write_all(&encode_value(&value, options.raw));
                        let _ = out.write_all(b"\n");
                    }
                    None => {
                        fail("read", path);
                        status = 1;
                    }
                }
            }
        }
        Cmd::Multiread => {
            for path in args {
                let base = if options.fullpath { 0 } else { path.len() };
                match client.multiread(path) {
                    Ok(entries) => {
                        for (entry, value) in entries {
                            let shown = entry.get(base..).unwrap_or("");
                            let _ = write!(out, "{shown} = ");
                            let _ = out.write_all(&encode_value(&value, options.raw));
                            let _ = out.write_all(b"\n");
                        }
                    }
                    Err(_) => {
                        fail("read", path);
                        status = 1;
                    }
                }
            }
        }
        Cmd::Write => {
            if !args.len().is_multiple_of(2) {
                eprintln!("Invalid number of parameters");
                return 1;
            }
            for pair in args.chunks(2) {
                if let [path, value] = pair
                    && client.write(path, value.as_bytes()).is_err()
                {
                    fail("write", path);
                    status = 1;
                }
            }
        }
        Cmd::Rm => {
            for path in args {
                if client.rm(path).is_err() {
                    fail("remove", path);
                    status = 1;
                }
            }
        }
        Cmd::List => {
            let [path] = args.as_slice() else {
                eprintln!("LIST command accept only one path");
                return 1;
            };
            let base = if options.fullpath { 0 } else { path.len() };
            match client.list(path) {
                Ok(paths) => {
                    for entry in paths {
                        let _ = writeln!(out, "{}", entry.get(base..).unwrap_or(""));
                    }
                }
                Err(_) => {
                    if !options.quiet {
                        eprintln!("Failed to get entries list");
                    }
                    return 1;
                }
            }
        }
        Cmd::Watch => {
            if args.is_empty() {
                return 0;
            }
            for path in args {
                if client.watch(path).is_err() {
                    fail("setup watch on", path);
                    return 1;
                }
            }
            let mut remaining = options.watch_count;
            while remaining != 0 {
                remaining = remaining.saturating_sub(1);
                match client.read_watch() {
                    Ok(path) => {
                        let _ = writeln!(out, "{path}");
                        let _ = out.flush();
                    }
                    Err(_) => {
                        if !options.quiet {
                            eprintln!("Failed to read watch");
                        }
                        return 1;
                    }
                }
            }
        }
    }
    let _ = out.flush();
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn program_names_select_the_command() {
        assert_eq!(cmd_from_program("/usr/bin/qubesdb-read"), Some(Cmd::Read));
        assert_eq!(cmd_from_program("qubesdb-multiread"), Some(Cmd::Multiread));
        assert_eq!(cmd_from_program("qubesdb-cmd"), None);
    }

    #[test]
    fn values_are_escaped_unless_raw() {
        assert_eq!(encode_value(b"a\x1bb\xff", false), b"a\\x1bb\\xff");
        assert_eq!(encode_value(b"a\x1bb", true), b"a\x1bb");
        assert_eq!(encode_value(b"ab\0cd", false), b"ab");
    }

    #[test]
    fn options_may_follow_operands_and_combine() {
        let Parsed::Run(o) = parse(
            "qubesdb-read",
            &strings(&["/a", "-fd", "vm1", "/b"]),
            Some(Cmd::Read),
        ) else {
            panic!("should run");
        };
        assert!(o.fullpath);
        assert_eq!(o.dest.as_deref(), Some("vm1"));
        assert_eq!(o.operands, strings(&["/a", "/b"]));
        let Parsed::Run(o) = parse(
            "qubesdb-watch",
            &strings(&["-n", "-1", "/a"]),
            Some(Cmd::Watch),
        ) else {
            panic!("should run");
        };
        assert_eq!(o.watch_count, -1);
    }

    #[test]
    fn bad_invocations_exit_like_qubesdb_cmd() {
        assert!(matches!(
            parse("qubesdb-read", &[], Some(Cmd::Read)),
            Parsed::Exit(0, _)
        ));
        assert!(matches!(
            parse(
                "qubesdb-read",
                &strings(&["-n", "3", "/a"]),
                Some(Cmd::Read)
            ),
            Parsed::Exit(1, _)
        ));
        assert!(matches!(
            parse("qubesdb-read", &strings(&["-x"]), Some(Cmd::Read)),
            Parsed::Exit(1, _)
        ));
        assert!(matches!(
            parse("qubesdb-read", &strings(&["-d"]), Some(Cmd::Read)),
            Parsed::Exit(1, _)
        ));
        assert!(matches!(
            parse("qubesdb-read", &strings(&["-h"]), Some(Cmd::Read)),
            Parsed::Exit(0, _)
        ));
        assert!(matches!(
            parse("qubesdb-cmd", &strings(&["/a"]), None),
            Parsed::Exit(0, _)
        ));
    }
}
