//! `qubes-firewall-hosted`: the firewall unikernel built as a Linux process
//! for "Qubes in a box". It builds the hosted platform from flags and the
//! environment (vchan socket dir, xenstored socket, TAP names, domid,
//! memory) and runs the firewall's program flow on it.
//!
//! It must never contain firewall logic of its own: everything past the
//! platform bring-up belongs to `unikernel::firewall::run`, whose answer
//! (power off, reboot, crash) becomes the exit status
//! (`hosted::exit_status`).

use std::path::PathBuf;
use std::process::ExitCode;

use unikernel::platform::Platform;
use unikernel::platform::hosted::{self, HostedConfig, HostedPlatform, reactor::Reactor};

const USAGE: &str = "\
Usage: qubes-firewall-hosted [OPTIONS] [-- KERNEL-COMMAND-LINE...]

The Qubes firewall unikernel as a Linux process (Qubes in a box).

Options:
  --domid N                 our domain id (default: $VCHAN_DOMAIN, else 0)
  --vchan-socket-dir DIR    vchan sockets (default: $VCHAN_SOCKET_DIR, else /var/run/vchan)
  --xenstore-socket PATH    xenstored socket (default: $XENSTORED_PATH,
                            $XENSTORED_RUNDIR/socket, else /var/run/xenstored/socket)
  --uplink-tap NAME         TAP device of the uplink to the net qube (default: eth0)
  --client-tap-format FMT   TAP name of a client vif, {domid} and {device}
                            replaced (default: vif{domid}.{device})
  --memory MIB              memory the table caps derive from (default: 32)
  --mtu BYTES               IP MTU of every TAP (default: 1500)
  --tap-queue-len FRAMES    kernel queue towards us on every TAP (default: 10000)
  --busy-poll MICROSECONDS  poll for input this long before sleeping, as
                            Linux's net.core.busy_poll (default: 50; 0: off)
  -h, --help                this text

Arguments after `--` are passed to the firewall as its boot command line
(e.g. --ipv4=10.137.0.5), as Xen passes the kernel command line.
";

struct Options {
    config: HostedConfig,
    xenstore_socket: PathBuf,
    cmdline: String,
}

fn value<'a>(
    flag: &str,
    args: &mut impl Iterator<Item = &'a String>,
) -> Result<&'a String, String> {
    args.next()
        .ok_or_else(|| format!("{flag} needs a value (see --help)"))
}

fn parse_number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag}: {text:?} is not a valid number (see --help)"))
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut config = HostedConfig::from_env()?;
    let mut xenstore_socket = hosted::xenstore::socket_path_from_env();
    let mut cmdline = String::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, inline)) if flag.starts_with("--") => (flag, Some(inline.to_string())),
            _ => (arg.as_str(), None),
        };
        let take = |iter: &mut std::slice::Iter<'_, String>| -> Result<String, String> {
            match &inline {
                Some(text) => Ok(text.clone()),
                None => value(flag, iter).cloned(),
            }
        };
        match flag {
            "-h" | "--help" => return Ok(None),
            "--domid" => config.domid = parse_number(flag, &take(&mut iter)?)?,
            "--vchan-socket-dir" => config.vchan_socket_dir = PathBuf::from(take(&mut iter)?),
            "--xenstore-socket" => xenstore_socket = PathBuf::from(take(&mut iter)?),
            "--uplink-tap" => config.uplink_tap = take(&mut iter)?,
            "--client-tap-format" => config.client_tap_format = take(&mut iter)?,
            "--memory" => {
                let mib: usize = parse_number(flag, &take(&mut iter)?)?;
                config.memory_bytes = mib
                    .checked_mul(1 << 20)
                    .ok_or_else(|| format!("--memory {mib}: too large"))?;
            }
            "--mtu" => config.mtu = parse_number(flag, &take(&mut iter)?)?,
            "--tap-queue-len" => config.tap_queue_len = parse_number(flag, &take(&mut iter)?)?,
            "--busy-poll" => {
                config.busy_poll =
                    std::time::Duration::from_micros(parse_number(flag, &take(&mut iter)?)?);
            }
            "--" => {
                let rest: Vec<&str> = iter.map(String::as_str).collect();
                cmdline = rest.join(" ");
                break;
            }
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    Ok(Some(Options {
        config,
        xenstore_socket,
        cmdline,
    }))
}

/// A `log` logger on stderr, like the console of the Xen image.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        eprintln!(
            "{:<5} {}: {}",
            record.level(),
            record.target(),
            record.args()
        );
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn main() -> ExitCode {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(match std::env::var("QUBES_FIREWALL_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    });
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("qubes-firewall-hosted: {message}");
            return ExitCode::from(2);
        }
    };
    let reactor = match Reactor::new() {
        Ok(reactor) => reactor,
        Err(error) => {
            eprintln!("qubes-firewall-hosted: cannot create epoll set: {error}");
            return ExitCode::FAILURE;
        }
    };
    let xenstore = match hosted::xenstore::connect_client(reactor.clone(), &options.xenstore_socket)
    {
        Ok(client) => client,
        Err(error) => {
            eprintln!("qubes-firewall-hosted: {error}");
            return ExitCode::FAILURE;
        }
    };
    log::info!(
        "hosted platform up: domid {}, {} MiB, vchan sockets in {}, xenstored at {}, uplink TAP {}, boot command line {:?}",
        options.config.domid,
        options.config.memory_bytes >> 20,
        options.config.vchan_socket_dir.display(),
        options.xenstore_socket.display(),
        options.config.uplink_tap,
        options.cmdline,
    );
    let mut platform = HostedPlatform::new(options.config, reactor, xenstore);
    let how = unikernel::firewall::run(&mut platform, &options.cmdline);
    platform.exit(how)
}
