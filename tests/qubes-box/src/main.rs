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
//! - `qubes-box up|down|status|add-client|remove-client|restart-net` run
//!   the box (`netbox`), `qubes-box qubesd` is its qubesd (`qubesd`),
//!   `qubes-box run-in QUBE PROGRAM...` runs a program in a box qube
//!   (`vmtools::command`).
//!
//! It must never act on anything but the sockets it is given.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use qubes_box::client::Client;
use qubes_box::netbox::{self, BoxConfig};
use qubes_box::services;
use qubes_box::xenstored::Xenstored;

const USAGE: &str = "\
Usage: qubes-box COMMAND [ARGS]

Commands:
  up [--state-dir DIR] [--prefix P] [--bin-dir DIR] [--no-firewall]
     [--firewall-bin PATH] [--firewall-arg ARG]... [--clients N]
     [--sys-net-no-arp]
                                  build the box: namespaces <P>sys-net,
                                  <P>sys-firewall, <P>client1..N (default 2),
                                  xenstored, qubesdb-daemon, qrexec daemons,
                                  agents and policy daemon, sys-net's
                                  services, the hosted firewall;
                                  --firewall-arg: one more option for the
                                  firewall (repeat it for more);
                                  --sys-net-no-arp: sys-net's vif2.0 has
                                  Xen's backend MAC fe:ff:ff:ff:ff:ff and
                                  never answers or announces ARP (give it
                                  to restart-net too)
  down [--state-dir DIR]          stop and remove everything the box recorded
  status [--state-dir DIR]        show what is up (exit 1 if anything is down)
  add-client N [--state-dir DIR] [--prefix P]
                                  start client N in the running box
  remove-client N [--state-dir DIR] [--prefix P]
                                  shut client N down
  restart-net [--state-dir DIR] [--prefix P] [--sys-net-no-arp]
                                  restart sys-net (new namespace, new MAC)
  firewall-pid [--state-dir DIR]  print the pid of the firewall process
  qubesd [--state-dir DIR] [--prefix P] [--bin-dir DIR]
                                  the box's qubesd (foreground; used by up)
  qubesd-call [--state-dir DIR] METHOD DEST [ARG [PAYLOAD]]
                                  one call from dom0 to the box's qubesd;
                                  prints the answer's payload (exit 1 and
                                  the exception on an exception)
  run-in [--state-dir DIR] [--prefix P] QUBE PROGRAM [ARGS]...
                                  run PROGRAM in a running qube: its
                                  namespace, its home (<state>/home/QUBE),
                                  its qrexec-client-vm and the file-copy
                                  tools (qvm-copy-to-vm, qvm-open-in-dvm...)
  serve-http ADDR:PORT            sys-net's web server (used by up)
  serve-dns ADDR:PORT ANSWER-IP   sys-net's DNS server (used by up)
  serve-tcp-echo ADDR:PORT        sys-net's TCP echo server (used by up)
  serve-udp-echo ADDR:PORT        sys-net's UDP echo server (used by up)
  http-get ADDR:PORT [PATH]       fetch and print a page (probe)
  dns-query SERVER:PORT NAME      resolve NAME to an IPv4 address (probe)
  udp-echo ADDR:PORT TEXT         send TEXT, print the echo (probe)
  tcp-hold ADDR:PORT              one TCP connection to an echo server:
                                  each stdin line is sent, `echo LINE` or
                                  `cut: ERROR` printed (probe)
  http-bench ADDR:PORT BYTES      download BYTES (at most 1 GiB) from
                                  serve-http and print the throughput
  xenstored [--socket PATH] [--guest-socket DOMID=PATH]...
                                  run the in-box xenstored (foreground)
  xenstore-write [--socket PATH] PATH VALUE [PATH VALUE]...
  xenstore-read [--socket PATH] PATH...
  xenstore-rm [--socket PATH] PATH...
  xenstore-ls [--socket PATH] PATH
  xenstore-watch [--socket PATH] [-n COUNT] PATH
                                  print COUNT events (default 1) as PATH TOKEN

The box's state dir defaults to /run/qubes-box, the prefix to qb-, the
binaries to the directory of qubes-box itself. The xenstore socket defaults to $XENSTORED_PATH, else $XENSTORED_RUNDIR/socket,
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
    state_dir: PathBuf,
    prefix: String,
    bin_dir: Option<PathBuf>,
    firewall: bool,
    firewall_bin: Option<PathBuf>,
    firewall_args: Vec<String>,
    clients: u16,
    sys_net_arp: bool,
    rest: Vec<String>,
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut parsed = Parsed {
        socket: default_socket(),
        guests: Vec::new(),
        count: 1,
        state_dir: PathBuf::from("/run/qubes-box"),
        prefix: "qb-".to_string(),
        bin_dir: None,
        firewall: true,
        firewall_bin: None,
        firewall_args: Vec::new(),
        clients: 2,
        sys_net_arp: true,
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
            "--state-dir" => {
                parsed.state_dir = PathBuf::from(iter.next().ok_or("--state-dir needs a path")?);
            }
            "--prefix" => {
                let prefix = iter.next().ok_or("--prefix needs a value")?;
                if prefix.len() > 20
                    || !prefix
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(format!("--prefix {prefix:?}: up to 20 of [A-Za-z0-9_-]"));
                }
                parsed.prefix = prefix.clone();
            }
            "--bin-dir" => {
                parsed.bin_dir = Some(PathBuf::from(iter.next().ok_or("--bin-dir needs a path")?));
            }
            "--no-firewall" => parsed.firewall = false,
            "--sys-net-no-arp" => parsed.sys_net_arp = false,
            "--firewall-bin" => {
                parsed.firewall_bin = Some(PathBuf::from(
                    iter.next().ok_or("--firewall-bin needs a path")?,
                ));
            }
            "--firewall-arg" => {
                parsed.firewall_args.push(
                    iter.next()
                        .ok_or("--firewall-arg needs an argument")?
                        .clone(),
                );
            }
            "--clients" => {
                let text = iter.next().ok_or("--clients needs a count")?;
                parsed.clients = text
                    .parse()
                    .ok()
                    .filter(|n| *n <= netbox::MAX_CLIENTS)
                    .ok_or_else(|| {
                        format!("--clients {text:?}: a count up to {}", netbox::MAX_CLIENTS)
                    })?;
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

fn box_config(parsed: &Parsed) -> Result<BoxConfig, String> {
    let bin_dir = match &parsed.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(PathBuf::from))
            .ok_or("cannot find the directory of qubes-box; give --bin-dir")?,
    };
    Ok(BoxConfig {
        state_dir: parsed.state_dir.clone(),
        prefix: parsed.prefix.clone(),
        bin_dir,
        firewall: parsed.firewall,
        firewall_bin: parsed.firewall_bin.clone(),
        firewall_args: parsed.firewall_args.clone(),
        clients: parsed.clients,
        sys_net_answers_arp: parsed.sys_net_arp,
    })
}

fn socket_addr(text: Option<&String>, what: &str) -> Result<SocketAddr, String> {
    let text = text.ok_or_else(|| format!("{what} needs ADDR:PORT"))?;
    text.parse()
        .map_err(|_| format!("{text:?} is not ADDR:PORT"))
}

fn run(command: &str, parsed: Parsed) -> Result<(), String> {
    match command {
        "up" => {
            let config = box_config(&parsed)?;
            netbox::up(&config)
                .map_err(|error| format!("{error} (everything made so far was removed)"))?;
            println!("box is up (state in {})", config.state_dir.display());
            return Ok(());
        }
        "down" => {
            let config = box_config(&parsed)?;
            netbox::down(&config).map_err(|error| error.to_string())?;
            println!("box is down");
            return Ok(());
        }
        "status" => {
            let config = box_config(&parsed)?;
            let (all_up, text) = netbox::status(&config);
            print!("{text}");
            return if all_up {
                Ok(())
            } else {
                Err("not everything is up".into())
            };
        }
        "add-client" | "remove-client" => {
            let config = box_config(&parsed)?;
            let client = parsed
                .rest
                .first()
                .and_then(|n| n.parse().ok())
                .and_then(netbox::client_qube)
                .ok_or_else(|| {
                    format!(
                        "{command} needs a client number 1..={}",
                        netbox::MAX_CLIENTS
                    )
                })?;
            if command == "add-client" {
                netbox::add_client(&config, &client).map_err(|e| e.to_string())?;
                println!("{} is up ({})", client.name, client.ip);
            } else {
                netbox::remove_client(&config, &client).map_err(|e| e.to_string())?;
                println!("{} is down", client.name);
            }
            return Ok(());
        }
        "restart-net" => {
            let config = box_config(&parsed)?;
            netbox::restart_net(&config).map_err(|e| e.to_string())?;
            println!("sys-net restarted");
            return Ok(());
        }
        "firewall-pid" => {
            let config = box_config(&parsed)?;
            let pid = netbox::firewall_pid(&config).ok_or("no firewall process is running")?;
            println!("{pid}");
            return Ok(());
        }
        "qubesd" => {
            let config = box_config(&parsed)?;
            eprintln!(
                "qubes-box qubesd: serving {} and {}",
                qubes_box::qubesd::socket(&config).display(),
                qubes_box::qubesd::internal_socket(&config).display()
            );
            return qubes_box::qubesd::Qubesd::new(config)
                .serve()
                .map_err(|e| e.to_string());
        }
        "qubesd-call" => {
            let config = box_config(&parsed)?;
            let (Some(method), Some(dest)) = (parsed.rest.first(), parsed.rest.get(1)) else {
                return Err("qubesd-call needs METHOD DEST [ARG [PAYLOAD]]".into());
            };
            let arg = parsed.rest.get(2).map_or("", String::as_str);
            let mut request = format!("{method}+{arg} dom0 name {dest}\0").into_bytes();
            if let Some(payload) = parsed.rest.get(3) {
                request.extend_from_slice(payload.as_bytes());
            }
            let answer = qubes_box::qubesd::call(&qubes_box::qubesd::socket(&config), &request)
                .map_err(|e| e.to_string())?;
            if let Some(payload) = answer.strip_prefix(b"0\0") {
                println!("{}", String::from_utf8_lossy(payload));
                return Ok(());
            }
            return Err(format!(
                "qubesd answered: {}",
                String::from_utf8_lossy(&answer).replace('\0', " | ")
            ));
        }
        "run-in" => {
            let config = box_config(&parsed)?;
            let (Some(name), Some(program)) = (parsed.rest.first(), parsed.rest.get(1)) else {
                return Err("run-in needs QUBE PROGRAM [ARGS]...".into());
            };
            let qube = qubes_box::qubesd::Registry::new(&config)
                .get(name)
                .ok_or_else(|| format!("no qube {name:?} in the box"))?;
            let status = qubes_box::vmtools::command(&config, name, qube.domid, program)
                .args(parsed.rest.get(2..).unwrap_or(&[]))
                .status()
                .map_err(|e| format!("cannot run {program} in {name}: {e}"))?;
            return if status.success() {
                Ok(())
            } else {
                Err(format!("{program} in {name} failed: {status}"))
            };
        }
        "serve-tcp-echo" => {
            let address = socket_addr(parsed.rest.first(), "serve-tcp-echo")?;
            return services::serve_tcp_echo(address).map_err(|e| e.to_string());
        }
        "serve-udp-echo" => {
            let address = socket_addr(parsed.rest.first(), "serve-udp-echo")?;
            return services::serve_udp_echo(address).map_err(|e| e.to_string());
        }
        "udp-echo" => {
            let address = socket_addr(parsed.rest.first(), "udp-echo")?;
            let text = parsed.rest.get(1).ok_or("udp-echo needs a TEXT")?;
            let echo = services::udp_echo(address, text, Duration::from_secs(3))
                .map_err(|e| e.to_string())?;
            println!("{echo}");
            return Ok(());
        }
        "tcp-hold" => {
            let address = socket_addr(parsed.rest.first(), "tcp-hold")?;
            return services::tcp_hold(
                address,
                std::io::stdin().lock(),
                std::io::stdout().lock(),
                Duration::from_secs(3),
            )
            .map_err(|e| e.to_string());
        }
        "serve-http" => {
            let address = socket_addr(parsed.rest.first(), "serve-http")?;
            return services::serve_http(address).map_err(|e| e.to_string());
        }
        "serve-dns" => {
            let address = socket_addr(parsed.rest.first(), "serve-dns")?;
            let answer: Ipv4Addr = parsed
                .rest
                .get(1)
                .and_then(|a| a.parse().ok())
                .ok_or("serve-dns needs the IPv4 address to answer with")?;
            return services::serve_dns(address, answer).map_err(|e| e.to_string());
        }
        "http-get" => {
            let address = socket_addr(parsed.rest.first(), "http-get")?;
            let path = parsed.rest.get(1).map_or("/", String::as_str);
            let body = services::http_get(address, path, Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            print!("{body}");
            return Ok(());
        }
        "http-bench" => {
            let address = socket_addr(parsed.rest.first(), "http-bench")?;
            let count: u64 = parsed
                .rest
                .get(1)
                .and_then(|n| n.parse().ok())
                .filter(|n| *n <= services::MAX_BENCH_BYTES)
                .ok_or("http-bench needs a byte count of at most 1073741824")?;
            let (received, seconds) = services::http_bench(address, count, Duration::from_secs(30))
                .map_err(|e| e.to_string())?;
            println!(
                "{received} bytes in {seconds:.3} s: {:.1} MB/s",
                received as f64 / seconds.max(1e-9) / 1e6
            );
            return Ok(());
        }
        "dns-query" => {
            let address = socket_addr(parsed.rest.first(), "dns-query")?;
            let name = parsed.rest.get(1).ok_or("dns-query needs a NAME")?;
            let answer = services::dns_query(address, name, Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            println!("{answer}");
            return Ok(());
        }
        _ => {}
    }
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
    // run-in: the box's options come before QUBE; everything from QUBE on
    // is the qube's command line, untouched.
    let (options, verbatim) = if command == "run-in" {
        let mut at = 0;
        while let Some(arg) = rest.get(at) {
            match arg.as_str() {
                "--state-dir" | "--prefix" | "--bin-dir" => at += 2,
                _ => break,
            }
        }
        rest.split_at(at.min(rest.len()))
    } else {
        (rest, &[][..])
    };
    let parsed = match parse(options) {
        Ok(mut parsed) => {
            parsed.rest.extend(verbatim.iter().cloned());
            parsed
        }
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
