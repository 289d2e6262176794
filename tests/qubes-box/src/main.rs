//! `qubes-box`: the command line of Qubes in a box.
//!
//! - `qubes-box xenstored [--socket PATH] [--guest-socket DOMID=PATH]...`
//!   runs the in-box xenstored in the foreground (dom0's socket, plus one
//!   socket per guest domain whose relative paths resolve under
//!   `/local/domain/<domid>`).
//! - `qubes-box xenstore-write PATH VALUE [PATH VALUE]...`,
//!   `xenstore-read PATH...`, `xenstore-rm PATH...`, `xenstore-ls PATH`,
//!   `xenstore-watch [-n N] PATH` talk to it over its socket
//!   (`--socket PATH`, else `XENSTORED_PATH`, else
//!   `/var/run/xenstored/socket`, as libxenstore chooses).
//!
//! It must never act on anything but the sockets it is given.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use qubes_box::client::Client;
use qubes_box::xenstored::Xenstored;

const USAGE: &str = "\
Usage: qubes-box COMMAND [ARGS]

Commands:
  xenstored [--socket PATH] [--guest-socket DOMID=PATH]...
                                  run the in-box xenstored (foreground)
  xenstore-write [--socket PATH] PATH VALUE [PATH VALUE]...
  xenstore-read [--socket PATH] PATH...
  xenstore-rm [--socket PATH] PATH...
  xenstore-ls [--socket PATH] PATH
  xenstore-watch [--socket PATH] [-n COUNT] PATH
                                  print COUNT events (default 1) as PATH TOKEN

The socket defaults to $XENSTORED_PATH, else $XENSTORED_RUNDIR/socket,
else /var/run/xenstored/socket.
";

fn default_socket() -> PathBuf {
    if let Some(path) = std::env::var_os("XENSTORED_PATH") {
        return PathBuf::from(path);
    }
    if let Some(rundir) = std::env::var_os("XENSTORED_RUNDIR") {
        return PathBuf::from(rundir).join("socket");
    }
    PathBuf::from("/var/run/xenstored/socket")
}

struct Parsed {
    socket: PathBuf,
    guests: Vec<(u16, PathBuf)>,
    count: u64,
    rest: Vec<String>,
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut parsed = Parsed {
        socket: default_socket(),
        guests: Vec::new(),
        count: 1,
        rest: Vec::new(),
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--socket" => {
                parsed.socket = PathBuf::from(iter.next().ok_or("--socket needs a path")?);
            }
            "--guest-socket" => {
                let spec = iter.next().ok_or("--guest-socket needs DOMID=PATH")?;
                let (domid, path) = spec
                    .split_once('=')
                    .ok_or_else(|| format!("--guest-socket {spec:?}: expected DOMID=PATH"))?;
                let domid: u16 = domid
                    .parse()
                    .map_err(|_| format!("--guest-socket {spec:?}: {domid:?} is not a domid"))?;
                parsed.guests.push((domid, PathBuf::from(path)));
            }
            "-n" => {
                let text = iter.next().ok_or("-n needs a count")?;
                parsed.count = text
                    .parse()
                    .map_err(|_| format!("-n {text:?}: not a count"))?;
            }
            _ => parsed.rest.push(arg.clone()),
        }
    }
    Ok(parsed)
}

fn run(command: &str, parsed: Parsed) -> Result<(), String> {
    if command == "xenstored" {
        let server = Xenstored::new();
        let main = server
            .listen(&parsed.socket, 0)
            .map_err(|error| format!("cannot listen on {}: {error}", parsed.socket.display()))?;
        for (domid, path) in &parsed.guests {
            server
                .listen(path, *domid)
                .map_err(|error| format!("cannot listen on {}: {error}", path.display()))?;
        }
        eprintln!("qubes-box xenstored: serving {}", parsed.socket.display());
        let _ = main.join();
        return Ok(());
    }
    let mut client = Client::connect(&parsed.socket).map_err(|error| error.to_string())?;
    let fail = |path: &str, error: qubes_box::client::ClientError| format!("{path}: {error}");
    match command {
        "xenstore-write" => {
            if parsed.rest.is_empty() || !parsed.rest.len().is_multiple_of(2) {
                return Err("xenstore-write needs PATH VALUE pairs".into());
            }
            for pair in parsed.rest.chunks(2) {
                if let [path, value] = pair {
                    client
                        .write(path, value.as_bytes())
                        .map_err(|e| fail(path, e))?;
                }
            }
        }
        "xenstore-read" => {
            for path in &parsed.rest {
                match client.read(path).map_err(|e| fail(path, e))? {
                    Some(value) => println!("{}", String::from_utf8_lossy(&value)),
                    None => return Err(format!("{path}: no such node (ENOENT)")),
                }
            }
        }
        "xenstore-rm" => {
            for path in &parsed.rest {
                client.remove(path).map_err(|e| fail(path, e))?;
            }
        }
        "xenstore-ls" => {
            let [path] = parsed.rest.as_slice() else {
                return Err("xenstore-ls needs exactly one PATH".into());
            };
            for name in client.directory(path).map_err(|e| fail(path, e))? {
                println!("{name}");
            }
        }
        "xenstore-watch" => {
            let [path] = parsed.rest.as_slice() else {
                return Err("xenstore-watch needs exactly one PATH".into());
            };
            client.watch(path, "qubes-box").map_err(|e| fail(path, e))?;
            for _ in 0..parsed.count {
                let (changed, token) = client.next_event().map_err(|e| fail(path, e))?;
                println!("{changed} {token}");
            }
        }
        other => return Err(format!("unknown command {other:?}\n\n{USAGE}")),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    if command == "-h" || command == "--help" {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let parsed = match parse(rest) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("qubes-box {command}: {message}");
            return ExitCode::from(2);
        }
    };
    match run(command, parsed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("qubes-box {command}: {message}");
            ExitCode::FAILURE
        }
    }
}
