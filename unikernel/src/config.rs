//! Boot options, the network configuration and the control plane's caps.
//!
//! Three things are decided here, before any packet flows:
//! - the boot options from the kernel command line, named as
//!   qubes-mirage-firewall names them in `unikernel.ml` (cmdliner
//!   arguments): `--ipv4`, `--ipv4-gw`, `--ipv4-dns`, `--ipv4-dns2`,
//!   `--nat-table-size`, each as `--name=value` or `--name value`; words
//!   without `--` are Linux kernel options (Qubes adds its default ones,
//!   `kernelopts_common` and `swiotlb=2048`, unless the qube has the feature
//!   `no-default-kernelopts`): they are ignored with one warning, where
//!   mirage-firewall's argument parser refuses them and stops;
//! - the network configuration, from QubesDB (`/qubes-ip`,
//!   `/qubes-gateway`, `/qubes-primary-dns`, `/qubes-secondary-dns`,
//!   `/qubes-ip6`, `/qubes-gateway6`) unless the boot options give it;
//! - the caps of the control plane (QubesDB entries, qrexec connections and
//!   buffers), derived from the VM's memory size.
//!
//! The other keys qubesd writes for a firewall qube (`/qubes-netmask`,
//! `/qubes-mac`, the `/qubes-netvm-*` keys, `/mapped-ip/…` of a client's
//! `net.fake-ip`, `/connected-ips`, …) are not network settings of ours:
//! the table in the [`crate::firewall`] docs says, key by key, what Linux's
//! sys-firewall does with it and what we do (the same, or why it does not
//! apply).
//!
//! Differences from mirage-firewall, on purpose: mirage treats
//! `0.0.0.0` as "not given" and would start with only one of `--ipv4` /
//! `--ipv4-gw` set (and then trips an assertion); here giving one without
//! the other is a [`BootOptionError`] that names the missing option. The DNS
//! defaults when the command line configures the network are mirage's
//! (`10.139.1.1`, `10.139.1.2`, Qubes' virtual DNS addresses).
//!
//! This module must never panic on any command line or QubesDB value: every
//! failure is a typed error saying which option or key and what to do.
#![forbid(unsafe_code)]

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::net::{Ipv4Addr, Ipv6Addr};

/// Qubes' virtual DNS servers (what `/qubes-primary-dns` and
/// `/qubes-secondary-dns` hold on a default install; mirage-firewall's
/// defaults for `--ipv4-dns` / `--ipv4-dns2`).
pub const DEFAULT_DNS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 139, 1, 1), Ipv4Addr::new(10, 139, 1, 2)];

/// The boot options, as given on the kernel command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootOptions {
    /// `--ipv4`: our address on the uplink (replaces `/qubes-ip`).
    pub ipv4: Option<Ipv4Addr>,
    /// `--ipv4-gw`: the net qube's address (replaces `/qubes-gateway`).
    pub ipv4_gw: Option<Ipv4Addr>,
    /// `--ipv4-dns`: the primary DNS server.
    pub ipv4_dns: Option<Ipv4Addr>,
    /// `--ipv4-dns2`: the secondary DNS server.
    pub ipv4_dns2: Option<Ipv4Addr>,
    /// `--nat-table-size`: the number of NAT entries (capped by memory).
    pub nat_table_size: Option<usize>,
    /// Linux kernel options (words without `--`, such as Qubes' defaults
    /// `root=/dev/mapper/dmroot ro nomodeset console=hvc0`), ignored.
    pub ignored: Vec<String>,
}

/// Why the command line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootOptionError {
    /// An option this firewall does not know.
    Unknown(String),
    /// A word that is neither an option (`--name`) nor a Linux kernel
    /// option (`name` or `name=value`, printable ASCII, not starting with
    /// `-`).
    NotAnOption(String),
    /// An option without its value at the end of the line.
    MissingValue(&'static str),
    /// A value that does not parse.
    BadValue {
        /// The option.
        option: &'static str,
        /// What was given.
        value: String,
    },
    /// An option given twice.
    Repeated(&'static str),
    /// The network is configured on the command line but this is missing.
    Requires {
        /// The option given.
        given: &'static str,
        /// The option that must come with it.
        missing: &'static str,
    },
}

const OPTIONS: &str = "--ipv4, --ipv4-gw, --ipv4-dns, --ipv4-dns2, --nat-table-size";

impl fmt::Display for BootOptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("kernel command line: ")?;
        match self {
            BootOptionError::Unknown(name) => {
                write!(f, "unknown option '{name}' (known: {OPTIONS})")
            }
            BootOptionError::NotAnOption(word) => {
                write!(f, "'{word}' is not an option (known: {OPTIONS})")
            }
            BootOptionError::MissingValue(name) => write!(f, "{name} needs a value"),
            BootOptionError::BadValue { option, value } => {
                let expected = if *option == "--nat-table-size" {
                    "a number of entries"
                } else {
                    "an IPv4 address like 10.137.0.2"
                };
                write!(f, "{option}={value}: expected {expected}")
            }
            BootOptionError::Repeated(name) => write!(f, "{name} given more than once"),
            BootOptionError::Requires { given, missing } => write!(
                f,
                "{given} is given but {missing} is not: give both (or neither, to read QubesDB)"
            ),
        }?;
        f.write_str("; fix the VM's kernelopts (qvm-prefs VM kernelopts)")
    }
}

impl BootOptions {
    /// Parses the kernel command line. Empty or all-blank means "no options".
    pub fn parse(cmdline: &str) -> Result<BootOptions, BootOptionError> {
        let mut options = BootOptions::default();
        let mut words = cmdline.split_ascii_whitespace();
        while let Some(word) = words.next() {
            let Some(option) = word.strip_prefix("--") else {
                if !is_kernel_option(word) {
                    return Err(BootOptionError::NotAnOption(word.to_string()));
                }
                options.ignored.push(word.to_string());
                continue;
            };
            let (name, inline) = match option.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (option, None),
            };
            let name: &'static str = match name {
                "ipv4" => "--ipv4",
                "ipv4-gw" => "--ipv4-gw",
                "ipv4-dns" => "--ipv4-dns",
                "ipv4-dns2" => "--ipv4-dns2",
                "nat-table-size" => "--nat-table-size",
                _ => return Err(BootOptionError::Unknown(word.to_string())),
            };
            let value = match inline {
                Some(value) => value,
                None => words.next().ok_or(BootOptionError::MissingValue(name))?,
            };
            let bad = || BootOptionError::BadValue {
                option: name,
                value: value.to_string(),
            };
            if name == "--nat-table-size" {
                let size = value.parse::<usize>().map_err(|_| bad())?;
                if size == 0 {
                    return Err(bad());
                }
                set_once(&mut options.nat_table_size, size, name)?;
                continue;
            }
            let addr = value.parse::<Ipv4Addr>().map_err(|_| bad())?;
            let slot = match name {
                "--ipv4" => &mut options.ipv4,
                "--ipv4-gw" => &mut options.ipv4_gw,
                "--ipv4-dns" => &mut options.ipv4_dns,
                _ => &mut options.ipv4_dns2,
            };
            set_once(slot, addr, name)?;
        }
        if !options.ignored.is_empty() {
            log::warn!(
                "kernel command line: ignoring {} Linux kernel option(s) {:?} (Qubes' defaults; \
                 `qvm-features VM no-default-kernelopts 1` stops Qubes adding them)",
                options.ignored.len(),
                options.ignored
            );
        }
        match (options.ipv4, options.ipv4_gw) {
            (Some(_), None) => Err(BootOptionError::Requires {
                given: "--ipv4",
                missing: "--ipv4-gw",
            }),
            (None, Some(_)) => Err(BootOptionError::Requires {
                given: "--ipv4-gw",
                missing: "--ipv4",
            }),
            _ => Ok(options),
        }
    }

    /// The network configuration the command line gives, if it gives one
    /// (`--ipv4` and `--ipv4-gw`); DNS defaults to Qubes' virtual servers.
    pub fn network(&self) -> Option<NetworkSettings> {
        let (ip, gateway) = (self.ipv4?, self.ipv4_gw?);
        Some(NetworkSettings {
            ip,
            gateway,
            primary_dns: self.ipv4_dns.unwrap_or(DEFAULT_DNS[0]),
            secondary_dns: self.ipv4_dns2.unwrap_or(DEFAULT_DNS[1]),
            ip6: None,
            gateway6: None,
            from_cmdline: true,
        })
    }
}

/// A Linux kernel option as Qubes passes them: `name` or `name=value`,
/// printable ASCII, not starting with `-` (so `-x` or a stray control byte
/// is still refused).
fn is_kernel_option(word: &str) -> bool {
    !word.starts_with('-') && word.bytes().all(|b| b.is_ascii_graphic())
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), BootOptionError> {
    if slot.is_some() {
        return Err(BootOptionError::Repeated(name));
    }
    *slot = Some(value);
    Ok(())
}

/// The firewall's own network configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSettings {
    /// Our address on the uplink; also the gateway we present to clients
    /// (`/qubes-ip`).
    pub ip: Ipv4Addr,
    /// The net qube (`/qubes-gateway`).
    pub gateway: Ipv4Addr,
    /// `/qubes-primary-dns`.
    pub primary_dns: Ipv4Addr,
    /// `/qubes-secondary-dns`.
    pub secondary_dns: Ipv4Addr,
    /// `/qubes-ip6`, when the VM has IPv6.
    pub ip6: Option<Ipv6Addr>,
    /// `/qubes-gateway6`.
    pub gateway6: Option<Ipv6Addr>,
    /// True when it came from the boot options rather than QubesDB.
    pub from_cmdline: bool,
}

/// Why the network configuration could not be read from QubesDB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkConfigError {
    /// A required key is not (yet) in QubesDB: wait for dom0 to write it.
    Missing(&'static str),
    /// A key holds something that is not an address.
    Bad {
        /// The key.
        key: &'static str,
        /// Its value, as written by dom0.
        value: String,
    },
}

impl fmt::Display for NetworkConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkConfigError::Missing(key) => write!(
                f,
                "QubesDB key {key} not (yet) present; waiting for dom0 to write it \
                 (is the firewall VM's netvm set?)"
            ),
            NetworkConfigError::Bad { key, value } => write!(
                f,
                "QubesDB key {key} = {value:?} is not an IP address; \
                 check the VM's network settings in dom0"
            ),
        }
    }
}

impl NetworkSettings {
    /// Reads the configuration from QubesDB entries (`lookup(key)` returns
    /// the value of a key). IPv6 is on only when both `/qubes-ip6` and
    /// `/qubes-gateway6` are present; a missing DNS key falls back to
    /// Qubes' defaults.
    pub fn from_qubesdb<'a, F>(lookup: F) -> Result<NetworkSettings, NetworkConfigError>
    where
        F: Fn(&str) -> Option<&'a str>,
    {
        fn v4<'a>(
            lookup: &impl Fn(&str) -> Option<&'a str>,
            key: &'static str,
        ) -> Result<Option<Ipv4Addr>, NetworkConfigError> {
            match lookup(key) {
                None => Ok(None),
                Some(value) => {
                    value
                        .trim()
                        .parse()
                        .map(Some)
                        .map_err(|_| NetworkConfigError::Bad {
                            key,
                            value: value.to_string(),
                        })
                }
            }
        }
        fn v6<'a>(
            lookup: &impl Fn(&str) -> Option<&'a str>,
            key: &'static str,
        ) -> Result<Option<Ipv6Addr>, NetworkConfigError> {
            match lookup(key) {
                None | Some("") => Ok(None),
                Some(value) => {
                    value
                        .trim()
                        .parse()
                        .map(Some)
                        .map_err(|_| NetworkConfigError::Bad {
                            key,
                            value: value.to_string(),
                        })
                }
            }
        }
        let ip = v4(&lookup, "/qubes-ip")?.ok_or(NetworkConfigError::Missing("/qubes-ip"))?;
        let gateway =
            v4(&lookup, "/qubes-gateway")?.ok_or(NetworkConfigError::Missing("/qubes-gateway"))?;
        let primary_dns = v4(&lookup, "/qubes-primary-dns")?.unwrap_or(DEFAULT_DNS[0]);
        let secondary_dns = v4(&lookup, "/qubes-secondary-dns")?.unwrap_or(DEFAULT_DNS[1]);
        let ip6 = v6(&lookup, "/qubes-ip6")?;
        let gateway6 = v6(&lookup, "/qubes-gateway6")?;
        let (ip6, gateway6) = match (ip6, gateway6) {
            (Some(ip6), Some(gateway6)) => (Some(ip6), Some(gateway6)),
            _ => (None, None),
        };
        Ok(NetworkSettings {
            ip,
            gateway,
            primary_dns,
            secondary_dns,
            ip6,
            gateway6,
            from_cmdline: false,
        })
    }
}

impl fmt::Display for NetworkSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "network configuration from {}: our IP {}, net qube {}, DNS {} and {}",
            if self.from_cmdline {
                "the command line"
            } else {
                "QubesDB"
            },
            self.ip,
            self.gateway,
            self.primary_dns,
            self.secondary_dns
        )?;
        if let (Some(ip6), Some(gateway6)) = (self.ip6, self.gateway6) {
            write!(f, ", IPv6 {ip6} via {gateway6}")?;
        }
        Ok(())
    }
}

/// The control plane's caps, derived from the VM's memory. At a cap the
/// newest work is refused and counted; nothing here grows without bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlCaps {
    /// QubesDB entries kept (dom0 writes ~10 keys plus one per rule).
    pub qubesdb_entries: usize,
    /// Total bytes of QubesDB paths and values kept.
    pub qubesdb_bytes: usize,
    /// qrexec calls running at once (each holds a data vchan).
    pub qrexec_connections: usize,
    /// Bytes of a call's output waiting for the data vchan to drain.
    pub qrexec_output_bytes: usize,
    /// Bytes of a call's stdin kept (our services read one line).
    pub qrexec_stdin_bytes: usize,
}

impl ControlCaps {
    /// The caps for a VM with `memory_bytes` of RAM. A 32 MiB firewall
    /// (mirage's default) keeps 2048 QubesDB entries in at most 2 MiB and
    /// runs 8 qrexec calls at once.
    pub fn for_memory(memory_bytes: usize) -> ControlCaps {
        let mib = memory_bytes / (1024 * 1024);
        ControlCaps {
            qubesdb_entries: (mib.saturating_mul(64)).clamp(256, 65_536),
            qubesdb_bytes: (memory_bytes / 16).clamp(256 * 1024, 64 * 1024 * 1024),
            qrexec_connections: (mib / 4).clamp(2, 32),
            qrexec_output_bytes: (memory_bytes / 64).clamp(64 * 1024, 1024 * 1024),
            qrexec_stdin_bytes: 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;

    #[test]
    fn empty_command_line_means_qubesdb() {
        let options = BootOptions::parse("  ").unwrap();
        assert_eq!(options, BootOptions::default());
        assert_eq!(options.network(), None);
    }

    #[test]
    fn mirage_style_options_both_forms() {
        let options = BootOptions::parse(
            "--ipv4=10.137.0.9 --ipv4-gw 10.137.0.1 --ipv4-dns=9.9.9.9 --nat-table-size=700",
        )
        .unwrap();
        assert_eq!(options.nat_table_size, Some(700));
        let network = options.network().unwrap();
        assert_eq!(network.ip, Ipv4Addr::new(10, 137, 0, 9));
        assert_eq!(network.gateway, Ipv4Addr::new(10, 137, 0, 1));
        assert_eq!(network.primary_dns, Ipv4Addr::new(9, 9, 9, 9));
        assert_eq!(network.secondary_dns, DEFAULT_DNS[1]);
        assert!(network.from_cmdline);
    }

    #[test]
    fn nat_table_size_alone_keeps_qubesdb_network() {
        let options = BootOptions::parse("--nat-table-size 10").unwrap();
        assert_eq!(options.network(), None);
        assert_eq!(options.nat_table_size, Some(10));
    }

    #[test]
    fn one_address_without_the_other_is_a_clear_error() {
        let error = BootOptions::parse("--ipv4=10.137.0.9").unwrap_err();
        assert_eq!(
            error,
            BootOptionError::Requires {
                given: "--ipv4",
                missing: "--ipv4-gw"
            }
        );
        let text = alloc::format!("{error}");
        assert!(text.contains("--ipv4-gw"), "{text}");
        assert!(text.contains("kernelopts"), "{text}");
        assert_eq!(
            BootOptions::parse("--ipv4-gw=1.2.3.4").unwrap_err(),
            BootOptionError::Requires {
                given: "--ipv4-gw",
                missing: "--ipv4"
            }
        );
    }

    #[test]
    fn malformed_command_lines_are_typed_errors() {
        assert_eq!(
            BootOptions::parse("--ipv4").unwrap_err(),
            BootOptionError::MissingValue("--ipv4")
        );
        assert!(matches!(
            BootOptions::parse("--ipv4=300.1.1.1").unwrap_err(),
            BootOptionError::BadValue {
                option: "--ipv4",
                ..
            }
        ));
        assert!(matches!(
            BootOptions::parse("--nat-table-size=-1").unwrap_err(),
            BootOptionError::BadValue { .. }
        ));
        assert!(matches!(
            BootOptions::parse("--nat-table-size=0").unwrap_err(),
            BootOptionError::BadValue { .. }
        ));
        assert_eq!(
            BootOptions::parse("--frobnicate=1").unwrap_err(),
            BootOptionError::Unknown("--frobnicate=1".into())
        );
        assert_eq!(
            BootOptions::parse("-q").unwrap_err(),
            BootOptionError::NotAnOption("-q".into())
        );
        assert_eq!(
            BootOptions::parse("caf\u{e9}").unwrap_err(),
            BootOptionError::NotAnOption("caf\u{e9}".into())
        );
        assert_eq!(
            BootOptions::parse("--ipv4-dns=1.1.1.1 --ipv4-dns=1.1.1.2").unwrap_err(),
            BootOptionError::Repeated("--ipv4-dns")
        );
        // Non-ASCII and control bytes never panic.
        assert!(BootOptions::parse("--ipv4=\u{1F525} --\u{0}").is_err());
        assert!(BootOptions::parse("--=").is_err());
    }

    /// What qubes-core-admin puts before `kernelopts` without the feature
    /// `no-default-kernelopts` (its `kernelopts_common` default, the
    /// default `kernelopts` `swiotlb=2048`, and the `systemd.machine_id=`
    /// it adds for Linux qubes).
    const QUBES_DEFAULT_OPTIONS: &str = "root=/dev/mapper/dmroot ro nomodeset console=hvc0 \
        rd_NO_PLYMOUTH rd.plymouth.enable=0 plymouth.enable=0 xen_privcmd.unrestricted \
        swiotlb=2048 systemd.machine_id=0123456789abcdef0123456789abcdef";

    #[test]
    fn qubes_default_kernel_options_are_ignored() {
        let options = BootOptions::parse(QUBES_DEFAULT_OPTIONS).unwrap();
        assert_eq!(options.network(), None);
        assert_eq!(options.nat_table_size, None);
        assert_eq!(options.ignored.len(), 10);
        assert_eq!(options.ignored[0], "root=/dev/mapper/dmroot");
        assert_eq!(
            options.ignored[9],
            "systemd.machine_id=0123456789abcdef0123456789abcdef"
        );
    }

    #[test]
    fn our_options_still_work_after_qubes_defaults() {
        let line = alloc::format!(
            "{QUBES_DEFAULT_OPTIONS} --ipv4=10.137.0.9 --ipv4-gw 10.137.0.1 --nat-table-size=50"
        );
        let options = BootOptions::parse(&line).unwrap();
        assert_eq!(options.nat_table_size, Some(50));
        let network = options.network().unwrap();
        assert_eq!(network.ip, Ipv4Addr::new(10, 137, 0, 9));
        assert_eq!(network.gateway, Ipv4Addr::new(10, 137, 0, 1));
        // A kernel option between `--ipv4-gw` and its value is taken as the
        // value and refused: ours are never split by Qubes' (it puts its
        // defaults first).
        assert!(matches!(
            BootOptions::parse("--ipv4-gw ro --ipv4=10.137.0.9").unwrap_err(),
            BootOptionError::BadValue {
                option: "--ipv4-gw",
                ..
            }
        ));
        // An unknown `--` option is still a typo in the VM's kernelopts.
        assert_eq!(
            BootOptions::parse("ro --ipv44=1.2.3.4").unwrap_err(),
            BootOptionError::Unknown("--ipv44=1.2.3.4".into())
        );
    }

    fn db(entries: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
        entries.iter().copied().collect()
    }

    #[test]
    fn network_from_qubesdb_with_defaults_and_ipv6() {
        let map = db(&[
            ("/qubes-ip", "10.137.0.2"),
            ("/qubes-gateway", "10.137.0.1"),
            ("/qubes-ip6", "fd09:24ef:4179::a89:2"),
            ("/qubes-gateway6", "fd09:24ef:4179::a89:1"),
        ]);
        let network = NetworkSettings::from_qubesdb(|k| map.get(k).copied()).unwrap();
        assert_eq!(network.ip, Ipv4Addr::new(10, 137, 0, 2));
        assert_eq!(network.primary_dns, DEFAULT_DNS[0]);
        assert!(network.ip6.is_some() && network.gateway6.is_some());
        assert!(!network.from_cmdline);
        let text = alloc::format!("{network}");
        assert!(text.contains("QubesDB") && text.contains("IPv6"), "{text}");
    }

    #[test]
    fn network_from_qubesdb_missing_or_bad_keys() {
        let map = db(&[("/qubes-ip", "10.137.0.2")]);
        assert_eq!(
            NetworkSettings::from_qubesdb(|k| map.get(k).copied()).unwrap_err(),
            NetworkConfigError::Missing("/qubes-gateway")
        );
        let map = db(&[("/qubes-ip", "10.137.0.2"), ("/qubes-gateway", "gw")]);
        assert!(matches!(
            NetworkSettings::from_qubesdb(|k| map.get(k).copied()).unwrap_err(),
            NetworkConfigError::Bad {
                key: "/qubes-gateway",
                ..
            }
        ));
        // IPv6 needs both keys; one alone leaves IPv6 off.
        let map = db(&[
            ("/qubes-ip", "10.137.0.2"),
            ("/qubes-gateway", "10.137.0.1"),
            ("/qubes-ip6", "fd09::2"),
        ]);
        let network = NetworkSettings::from_qubesdb(|k| map.get(k).copied()).unwrap();
        assert_eq!(network.ip6, None);
    }

    #[test]
    fn caps_grow_with_memory_and_stay_bounded() {
        let small = ControlCaps::for_memory(0);
        let default = ControlCaps::for_memory(32 << 20);
        let huge = ControlCaps::for_memory(usize::MAX);
        assert_eq!(small.qubesdb_entries, 256);
        assert_eq!(default.qubesdb_entries, 2048);
        assert_eq!(default.qrexec_connections, 8);
        assert!(small.qrexec_connections >= 2);
        assert_eq!(huge.qubesdb_entries, 65_536);
        assert_eq!(huge.qrexec_connections, 32);
        assert!(huge.qubesdb_bytes <= 64 << 20);
    }
}
