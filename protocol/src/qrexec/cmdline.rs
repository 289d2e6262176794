//! The command-line forms carried in `exec_params.cmdline`.
//!
//! - To a VM: `user:command`, where `user` may be the keyword `DEFAULT`
//!   (qrexec-daemon replaces `DEFAULT:` by the VM's default user before the
//!   agent sees it), and `command` is either a shell command or
//!   `QUBESRPC service+arg source` (optionally prefixed `nogui:`).
//! - To dom0: `QUBESRPC service+arg source name|keyword target` (no user).
//!
//! qrexec-daemon appends a `+` to a service name without argument when it
//! builds these strings (`daemon/qrexec-daemon.c`,
//! `handle_execute_service_child`); the agent splits at the first `:`
//! (`libqrexec/exec.c`, "Bad command from dom0: no colon") and at spaces
//! (`exec_qubes_rpc_if_requested`). Parsing never allocates or panics and
//! never interprets the shell command itself.

use core::fmt;

use super::{NOGUI_CMD_PREFIX, RPC_REQUEST_COMMAND};

/// The user keyword qrexec-daemon replaces by the VM's default user.
pub const DEFAULT_USER_KEYWORD: &[u8] = b"DEFAULT:";

/// Why a command line cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineError {
    /// No `:` separating user and command.
    NoColon,
    /// `QUBESRPC` without a service name.
    NoService,
    /// `QUBESRPC service` without the source domain.
    NoRemoteDomain,
    /// A dom0 request whose target type is neither `name` nor `keyword`.
    BadTargetType,
    /// Wrong number of words after `QUBESRPC`.
    BadWordCount {
        /// Words found after `QUBESRPC`.
        words: usize,
    },
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CmdlineError::NoColon => f.write_str("Bad command from dom0: no colon"),
            CmdlineError::NoService => f.write_str("Bad command: QUBESRPC without service name"),
            CmdlineError::NoRemoteDomain => f.write_str("Bad command from dom0: no remote domain"),
            CmdlineError::BadTargetType => {
                f.write_str("Bad command: target type must be 'name' or 'keyword'")
            }
            CmdlineError::BadWordCount { words } => write!(
                f,
                "Bad command: QUBESRPC takes 2 or 4 words (service source [type target]), got {words}"
            ),
        }
    }
}

impl core::error::Error for CmdlineError {}

/// `user:command` split at the first `:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserCommand<'a> {
    /// The user (may be `DEFAULT`).
    pub user: &'a [u8],
    /// Everything after the first `:`.
    pub command: &'a [u8],
}

/// Split `user:command`.
pub fn split_user(cmdline: &[u8]) -> Result<UserCommand<'_>, CmdlineError> {
    let colon = cmdline
        .iter()
        .position(|&b| b == b':')
        .ok_or(CmdlineError::NoColon)?;
    Ok(UserCommand {
        user: cmdline.get(..colon).unwrap_or(&[]),
        command: cmdline.get(colon + 1..).unwrap_or(&[]),
    })
}

/// If `cmdline` starts with `DEFAULT:`, the part after it.
pub fn strip_default_user(cmdline: &[u8]) -> Option<&[u8]> {
    cmdline.strip_prefix(DEFAULT_USER_KEYWORD)
}

/// How a dom0 request names its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// `name`: a qube name such as `dom0`.
    Name,
    /// `keyword`: a policy keyword without its `@` (e.g. `adminvm`).
    Keyword,
}

impl TargetKind {
    /// The word used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Name => "name",
            TargetKind::Keyword => "keyword",
        }
    }
}

/// The target part of a dom0 request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedTarget<'a> {
    /// `name` or `keyword`.
    pub kind: TargetKind,
    /// The target (without `@` for keywords).
    pub target: &'a [u8],
}

/// `QUBESRPC service+arg source [name|keyword target]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcCommand<'a> {
    /// The `nogui:` prefix was present.
    pub nogui: bool,
    /// The service descriptor (`name+argument`).
    pub service: &'a [u8],
    /// The calling qube.
    pub source: &'a [u8],
    /// The requested target, in the dom0 form only.
    pub requested_target: Option<RequestedTarget<'a>>,
}

/// A command after the `user:` part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// A plain command for the shell.
    Shell {
        /// The `nogui:` prefix was present.
        nogui: bool,
        /// The command.
        command: &'a [u8],
    },
    /// An RPC service call.
    Rpc(RpcCommand<'a>),
}

/// Parse the command part (after `user:`, or the whole dom0 command line).
pub fn parse_command(command: &[u8]) -> Result<Command<'_>, CmdlineError> {
    let (nogui, rest) = match command.strip_prefix(NOGUI_CMD_PREFIX) {
        Some(rest) => (true, rest),
        None => (false, command),
    };
    let Some(rpc) = rest
        .strip_prefix(RPC_REQUEST_COMMAND)
        .and_then(|r| r.strip_prefix(b" "))
    else {
        return Ok(Command::Shell {
            nogui,
            command: rest,
        });
    };
    let mut words = rpc.split(|&b| b == b' ');
    let service = words
        .next()
        .filter(|s| !s.is_empty())
        .ok_or(CmdlineError::NoService)?;
    let source = words.next().ok_or(CmdlineError::NoRemoteDomain)?;
    let kind = words.next();
    let target = words.next();
    let extra = words.count();
    let requested_target = match (kind, target, extra) {
        (None, None, 0) => None,
        (Some(kind), Some(target), 0) => Some(RequestedTarget {
            kind: match kind {
                b"name" => TargetKind::Name,
                b"keyword" => TargetKind::Keyword,
                _ => return Err(CmdlineError::BadTargetType),
            },
            target,
        }),
        _ => {
            return Err(CmdlineError::BadWordCount {
                words: 2 + usize::from(kind.is_some()) + usize::from(target.is_some()) + extra,
            });
        }
    };
    Ok(Command::Rpc(RpcCommand {
        nogui,
        service,
        source,
        requested_target,
    }))
}

fn write_service(f: &mut fmt::Formatter<'_>, service: &str) -> fmt::Result {
    f.write_str(service)?;
    if !service.contains('+') {
        f.write_str("+")?;
    }
    Ok(())
}

/// Displays the command qrexec-daemon sends to a target VM for a service
/// call: `user:QUBESRPC service+arg source` (a `+` is appended to a service
/// without argument, as Qubes does).
#[derive(Debug, Clone, Copy)]
pub struct VmServiceCommand<'a> {
    /// User to run as (or `DEFAULT`).
    pub user: &'a str,
    /// Service descriptor.
    pub service: &'a str,
    /// Calling qube.
    pub source: &'a str,
}

impl fmt::Display for VmServiceCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:QUBESRPC ", self.user)?;
        write_service(f, self.service)?;
        write!(f, " {}", self.source)
    }
}

/// Displays the command for a service call to dom0:
/// `QUBESRPC service+arg source name|keyword target`. A target starting with
/// `@` is written as a keyword without its `@`.
#[derive(Debug, Clone, Copy)]
pub struct Dom0ServiceCommand<'a> {
    /// Service descriptor.
    pub service: &'a str,
    /// Calling qube.
    pub source: &'a str,
    /// Requested target as the policy normalised it (`dom0`, `@adminvm`).
    pub target: &'a str,
}

impl fmt::Display for Dom0ServiceCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("QUBESRPC ")?;
        write_service(f, self.service)?;
        let (kind, target) = match self.target.strip_prefix('@') {
            Some(keyword) => (TargetKind::Keyword, keyword),
            None => (TargetKind::Name, self.target),
        };
        write!(f, " {} {} {}", self.source, kind.as_str(), target)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    struct Buf {
        data: [u8; 256],
        len: usize,
    }

    impl fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let end = self.len + s.len();
            self.data
                .get_mut(self.len..end)
                .ok_or(fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }

    fn render(value: impl fmt::Display) -> Buf {
        use fmt::Write;
        let mut buf = Buf {
            data: [0; 256],
            len: 0,
        };
        write!(buf, "{value}").unwrap();
        buf
    }

    #[test]
    fn user_split() {
        let uc = split_user(b"user:QUBESRPC a b").unwrap();
        assert_eq!(uc.user, b"user");
        assert_eq!(uc.command, b"QUBESRPC a b");
        let uc = split_user(b"root:echo a:b").unwrap();
        assert_eq!(uc.command, b"echo a:b");
        assert_eq!(split_user(b"nocolon"), Err(CmdlineError::NoColon));
        assert_eq!(strip_default_user(b"DEFAULT:ls"), Some(&b"ls"[..]));
        assert_eq!(strip_default_user(b"DEFAULTX:ls"), None);
    }

    #[test]
    fn vm_rpc_command() {
        let cmd = parse_command(b"QUBESRPC test.Add+ vm1").unwrap();
        assert_eq!(
            cmd,
            Command::Rpc(RpcCommand {
                nogui: false,
                service: b"test.Add+",
                source: b"vm1",
                requested_target: None
            })
        );
        let cmd = parse_command(b"nogui:QUBESRPC a+b src").unwrap();
        assert!(matches!(cmd, Command::Rpc(RpcCommand { nogui: true, .. })));
    }

    #[test]
    fn dom0_rpc_command() {
        let cmd = parse_command(b"QUBESRPC test.Ping+ vmA keyword adminvm").unwrap();
        match cmd {
            Command::Rpc(rpc) => {
                assert_eq!(
                    rpc.requested_target,
                    Some(RequestedTarget {
                        kind: TargetKind::Keyword,
                        target: b"adminvm"
                    })
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_command(b"QUBESRPC a b other dom0"),
            Err(CmdlineError::BadTargetType)
        );
    }

    #[test]
    fn malformed_rpc_commands() {
        assert_eq!(parse_command(b"QUBESRPC "), Err(CmdlineError::NoService));
        assert_eq!(
            parse_command(b"QUBESRPC svc"),
            Err(CmdlineError::NoRemoteDomain)
        );
        assert_eq!(
            parse_command(b"QUBESRPC a b c"),
            Err(CmdlineError::BadWordCount { words: 3 })
        );
        assert_eq!(
            parse_command(b"QUBESRPC a b name c d"),
            Err(CmdlineError::BadWordCount { words: 5 })
        );
    }

    #[test]
    fn shell_commands_are_left_alone() {
        assert_eq!(
            parse_command(b"echo QUBESRPC"),
            Ok(Command::Shell {
                nogui: false,
                command: b"echo QUBESRPC"
            })
        );
        assert_eq!(
            parse_command(b"QUBESRPCX a b"),
            Ok(Command::Shell {
                nogui: false,
                command: b"QUBESRPCX a b"
            })
        );
    }

    #[test]
    fn builders_match_qubes_forms() {
        let b = render(VmServiceCommand {
            user: "user",
            service: "test.Add",
            source: "vmA",
        });
        assert_eq!(&b.data[..b.len], b"user:QUBESRPC test.Add+ vmA");
        let b = render(VmServiceCommand {
            user: "DEFAULT",
            service: "test.File+testfile1",
            source: "source_vm1",
        });
        assert_eq!(
            &b.data[..b.len],
            b"DEFAULT:QUBESRPC test.File+testfile1 source_vm1"
        );
        let b = render(Dom0ServiceCommand {
            service: "test.Ping",
            source: "vmA",
            target: "@adminvm",
        });
        assert_eq!(&b.data[..b.len], b"QUBESRPC test.Ping+ vmA keyword adminvm");
        let b = render(Dom0ServiceCommand {
            service: "test.Ping+x",
            source: "vmA",
            target: "dom0",
        });
        assert_eq!(&b.data[..b.len], b"QUBESRPC test.Ping+x vmA name dom0");
        // What the builders write parses back.
        let b = render(Dom0ServiceCommand {
            service: "s",
            source: "v",
            target: "dom0",
        });
        assert!(matches!(
            parse_command(&b.data[..b.len]),
            Ok(Command::Rpc(RpcCommand {
                requested_target: Some(RequestedTarget {
                    kind: TargetKind::Name,
                    ..
                }),
                ..
            }))
        ));
    }
}
