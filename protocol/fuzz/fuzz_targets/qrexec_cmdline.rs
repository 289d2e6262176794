//! Fuzzes the qrexec command-line parsers (`user:command`, `DEFAULT:`,
//! `QUBESRPC service+arg source [name|keyword target]`): never panic, and a
//! parsed RPC command rebuilt with the builders parses back to the same parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::qrexec::cmdline::{
    Command, Dom0ServiceCommand, TargetKind, VmServiceCommand, parse_command, split_user,
    strip_default_user,
};

fuzz_target!(|data: &[u8]| {
    let _ = strip_default_user(data);
    let command = match split_user(data) {
        Ok(uc) => uc.command,
        Err(_) => data,
    };
    let Ok(Command::Rpc(rpc)) = parse_command(command) else {
        return;
    };
    let (Ok(service), Ok(source)) = (
        core::str::from_utf8(rpc.service),
        core::str::from_utf8(rpc.source),
    ) else {
        return;
    };
    if service.is_empty() || service.contains(' ') || source.contains(' ') {
        return;
    }
    match rpc.requested_target {
        None => {
            let text = VmServiceCommand {
                user: "user",
                service,
                source,
            }
            .to_string();
            let uc = split_user(text.as_bytes()).expect("builder writes a colon");
            match parse_command(uc.command) {
                Ok(Command::Rpc(again)) => {
                    assert!(again.service.starts_with(rpc.service));
                    assert_eq!(again.source, rpc.source);
                }
                other => panic!("rebuilt command does not parse: {other:?}"),
            }
        }
        Some(target) => {
            let Ok(name) = core::str::from_utf8(target.target) else {
                return;
            };
            if name.starts_with('@') {
                return;
            }
            let full = match target.kind {
                TargetKind::Keyword => format!("@{name}"),
                TargetKind::Name => name.to_string(),
            };
            let text = Dom0ServiceCommand {
                service,
                source,
                target: &full,
            }
            .to_string();
            match parse_command(text.as_bytes()) {
                Ok(Command::Rpc(again)) => {
                    assert_eq!(again.requested_target, Some(target));
                    assert_eq!(again.source, rpc.source);
                }
                other => panic!("rebuilt dom0 command does not parse: {other:?}"),
            }
        }
    }
});
