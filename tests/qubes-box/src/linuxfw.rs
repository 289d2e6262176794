//! Qubes' Linux sys-firewall beside the box, for the differential test
//! (`tests/linux_differential.rs`): network namespaces wired as a Qubes
//! sys-firewall is (client vifs in interface group 2 with the firewall's
//! address, proxy ARP, permanent neighbours and routes as
//! `vif-route-qubes` sets them; the uplink with masquerade; forwarding on),
//! Qubes' own `qubes-ipv4.nft`, `qubes-ipv6.nft` and `qubes-antispoof.nft`
//! with the clients in the anti-spoofing sets, and the `qubes-firewall`
//! tables that Qubes' own `qubesagent/firewall.py` writes for the rules
//! given (run by `linuxfw/qubes_firewall_driver.py`). Qubes' sources are
//! read from an unpacked `qubes-core-agent-linux` tree at test time and
//! never copied into the project.
//!
//! The machines: `<prefix>net` (sys-net: the addresses of the box's sys-net
//! on `lo`, forwarding off so it answers nothing for other hosts),
//! `<prefix>fw` (the firewall), `<prefix>client1`, `<prefix>client2`, with
//! the box's addresses and MACs, so a probe frame means the same on both
//! sides. Everything made is removed on drop.
//!
//! Also: random rule sets shaped as qubesd writes them
//! ([`random_rules`]).

use std::io::{self, BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::netbox::{DNS, FIREWALL_IP, SYS_NET_IP, WEB, WEB2, WEB6, qubes_ip6};
use crate::probe::{self, Rng};

/// The clients of the Linux firewall: name, domid, address.
pub const CLIENTS: [(&str, u16, Ipv4Addr); 2] = [
    ("client1", 3, probe::CLIENT1),
    ("client2", 4, probe::CLIENT2),
];

fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn run_stdin(program: &str, args: &[&str], input: &str) -> io::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {args:?} failed: {}{}\ninput:\n{input}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The Linux sys-firewall and its neighbours.
#[derive(Debug)]
pub struct LinuxFirewall {
    prefix: String,
    namespaces: Vec<String>,
    driver: Option<Driver>,
}

#[derive(Debug)]
struct Driver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for LinuxFirewall {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            let _ = driver.child.kill();
            let _ = driver.child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl LinuxFirewall {
    /// The namespace of a machine (`net`, `fw`, `client1`, `client2`).
    pub fn netns(&self, machine: &str) -> String {
        format!("{}{machine}", self.prefix)
    }

    fn netns_add(&mut self, machine: &str) -> io::Result<String> {
        let ns = self.netns(machine);
        self.namespaces.push(ns.clone());
        run("ip", &["netns", "add", &ns])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn sysctl(ns: &str, key: &str) -> io::Result<()> {
        run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", key])
    }

    /// Builds the machines and loads Qubes' tables from `qubes_src` (an
    /// unpacked qubes-core-agent-linux), with `scripts` the directory of
    /// `qubes_firewall_driver.py` and `python` the interpreter.
    pub fn up(prefix: &str, qubes_src: &Path, scripts: &Path, python: &Path) -> io::Result<Self> {
        let mut fw = LinuxFirewall {
            prefix: prefix.to_string(),
            namespaces: Vec::new(),
            driver: None,
        };
        let net = fw.netns_add("net")?;
        let fwns = fw.netns_add("fw")?;
        let ip6 = |a: Ipv4Addr| qubes_ip6(a).to_string();

        // sys-net: the box's sys-net addresses, no forwarding.
        for a in [WEB, WEB2, DNS[0], DNS[1]] {
            run(
                "ip",
                &["-n", &net, "addr", "add", &format!("{a}/32"), "dev", "lo"],
            )?;
        }
        run(
            "ip",
            &[
                "-n",
                &net,
                "addr",
                "add",
                &format!("{WEB6}/128"),
                "dev",
                "lo",
            ],
        )?;
        run(
            "ip",
            &[
                "link", "add", "vif2.0", "netns", &net, "type", "veth", "peer", "name", "eth0",
                "netns", &fwns,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &net,
                "addr",
                "add",
                &format!("{SYS_NET_IP}/32"),
                "dev",
                "vif2.0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &net,
                "addr",
                "add",
                &format!("{}/128", ip6(SYS_NET_IP)),
                "dev",
                "vif2.0",
                "nodad",
            ],
        )?;
        run("ip", &["-n", &net, "link", "set", "vif2.0", "up"])?;
        silence_sys_net(&net)?;
        run(
            "ip",
            &[
                "-n",
                &net,
                "route",
                "add",
                &format!("{FIREWALL_IP}/32"),
                "dev",
                "vif2.0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &net,
                "route",
                "add",
                &format!("{}/128", ip6(FIREWALL_IP)),
                "dev",
                "vif2.0",
            ],
        )?;

        // sys-firewall: uplink eth0 with its own address, default routes.
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            // every rejection seen, as ours sends up to 1000 a second
            "net.ipv4.icmp_ratelimit=0",
            "net.ipv6.icmp.ratelimit=0",
            "net.ipv4.icmp_msgs_per_sec=100000",
            "net.ipv4.icmp_msgs_burst=100000",
        ] {
            Self::sysctl(&fwns, key)?;
        }
        run(
            "ip",
            &[
                "-n",
                &fwns,
                "addr",
                "add",
                &format!("{FIREWALL_IP}/32"),
                "dev",
                "eth0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &fwns,
                "addr",
                "add",
                &format!("{}/128", ip6(FIREWALL_IP)),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        run("ip", &["-n", &fwns, "link", "set", "eth0", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &fwns,
                "route",
                "add",
                &format!("{SYS_NET_IP}/32"),
                "dev",
                "eth0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &fwns,
                "route",
                "add",
                "default",
                "via",
                &SYS_NET_IP.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &fwns,
                "-6",
                "route",
                "add",
                &format!("{}/128", ip6(SYS_NET_IP)),
                "dev",
                "eth0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &fwns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &ip6(SYS_NET_IP),
                "dev",
                "eth0",
            ],
        )?;

        // Qubes' base tables.
        let network = qubes_src.join("network");
        for file in ["qubes-ipv4.nft", "qubes-ipv6.nft", "qubes-antispoof.nft"] {
            let path = network.join(file);
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &fwns,
                    "nft",
                    "-f",
                    &path.display().to_string(),
                ],
            )?;
        }

        // The clients, wired as vif-route-qubes does.
        for (name, domid, addr) in CLIENTS {
            let ns = fw.netns_add(name)?;
            let vif = format!("vif{domid}.0");
            let mac = format!("00:16:3e:5e:6c:{domid:02x}");
            run(
                "ip",
                &[
                    "link",
                    "add",
                    "eth0",
                    "netns",
                    &ns,
                    "address",
                    &mac,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &vif,
                    "netns",
                    &fwns,
                    "address",
                    "fe:ff:ff:ff:ff:ff",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/32"),
                    "dev",
                    "eth0",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/128", ip6(addr)),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &format!("{FIREWALL_IP}/32"),
                    "dev",
                    "eth0",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &FIREWALL_IP.to_string(),
                    "dev",
                    "eth0",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "-6",
                    "route",
                    "add",
                    &format!("{}/128", ip6(FIREWALL_IP)),
                    "dev",
                    "eth0",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &ip6(FIREWALL_IP),
                    "dev",
                    "eth0",
                ],
            )?;

            Self::sysctl(&fwns, &format!("net/ipv4/conf/{vif}/proxy_arp=1"))?;
            for a in [addr.to_string(), ip6(addr)] {
                run(
                    "ip",
                    &[
                        "-n",
                        &fwns,
                        "neighbour",
                        "add",
                        "to",
                        &a,
                        "dev",
                        &vif,
                        "lladdr",
                        &mac,
                        "nud",
                        "permanent",
                    ],
                )?;
                let family = if a.contains(':') { "ip6" } else { "ip" };
                run_stdin(
                    "ip",
                    &["netns", "exec", &fwns, "nft", "-f", "-"],
                    &format!(
                        "add element {family} qubes allowed {{ \"{vif}\" . {a} }}\nadd element {family} qubes downstream {{ {a} }}\n"
                    ),
                )?;
            }
            run(
                "ip",
                &["-n", &fwns, "link", "set", "dev", &vif, "group", "2", "up"],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &fwns,
                    "route",
                    "add",
                    &addr.to_string(),
                    "dev",
                    &vif,
                    "metric",
                    &(32752 - domid).to_string(),
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &fwns,
                    "route",
                    "add",
                    &ip6(addr),
                    "dev",
                    &vif,
                    "metric",
                    &(32752 - domid).to_string(),
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &fwns,
                    "addr",
                    "add",
                    &format!("{FIREWALL_IP}/32"),
                    "dev",
                    &vif,
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &fwns,
                    "addr",
                    "add",
                    &format!("{}/128", ip6(FIREWALL_IP)),
                    "dev",
                    &vif,
                    "nodad",
                ],
            )?;
            Self::sysctl(&fwns, &format!("net/ipv6/conf/{vif}/proxy_ndp=1"))?;
        }

        // Qubes' own qubes-firewall daemon code, driven by us.
        let mut child = Command::new("ip")
            .args(["netns", "exec", &fwns])
            .arg(python)
            .arg(scripts.join("qubes_firewall_driver.py"))
            .arg(qubes_src)
            .env("QUBES_DNS", format!("{} {}", DNS[0], DNS[1]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(io::Error::other("qubes_firewall_driver.py: no pipes"));
        };
        let mut driver = Driver {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let mut line = String::new();
        driver.stdout.read_line(&mut line)?;
        fw.driver = Some(driver);
        if line != "ready\n" {
            return Err(io::Error::other(format!(
                "qubes_firewall_driver.py did not start (said {line:?}); its error is above"
            )));
        }
        Ok(fw)
    }

    /// Gives Qubes' firewall code the QubesDB entries of the clients
    /// (`/qubes-firewall/…` as qubesd writes them, and `/connected-ips`)
    /// and has it apply them for `addresses`, as the daemon does on the
    /// commit writes. Returns the errors it logged.
    pub fn apply(
        &mut self,
        entries: &[(String, String)],
        addresses: &[String],
    ) -> io::Result<Vec<String>> {
        let driver = self
            .driver
            .as_mut()
            .ok_or_else(|| io::Error::other("no driver"))?;
        let mut input = String::from("clear\n");
        for (key, value) in entries {
            input.push_str(&format!("set {key}\t{value}\n"));
        }
        input.push_str(&format!("apply {}\n", addresses.join(" ")));
        driver.stdin.write_all(input.as_bytes())?;
        driver.stdin.flush()?;
        let mut errors = Vec::new();
        loop {
            let mut line = String::new();
            if driver.stdout.read_line(&mut line)? == 0 {
                return Err(io::Error::other("qubes_firewall_driver.py exited"));
            }
            let line = line.trim_end();
            if line == "done" {
                return Ok(errors);
            }
            errors.push(line.strip_prefix("error ").unwrap_or(line).to_string());
        }
    }

    /// `nft list ruleset` in the firewall (for a report).
    pub fn ruleset(&self) -> String {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns("fw"),
                "nft",
                "list",
                "table",
                "ip",
                "qubes-firewall",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// Makes sys-net namespace `netns` silent about destinations it does not
/// have (blackhole default routes, IPv4 and IPv6: no ICMP "no route"
/// coming back), so the only ICMP errors a client gets about its probes
/// are the firewall's and those of the destination itself.
pub fn silence_sys_net(netns: &str) -> io::Result<()> {
    run("ip", &["-n", netns, "route", "add", "blackhole", "default"])?;
    run(
        "ip",
        &["-n", netns, "-6", "route", "add", "blackhole", "default"],
    )
}

/// Unpacks `tarball` (qubes-core-agent-linux) under `dir`; returns the tree.
pub fn unpack_qubes_sources(tarball: &Path, dir: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    run(
        "tar",
        &[
            "-xzf",
            &tarball.display().to_string(),
            "-C",
            &dir.display().to_string(),
        ],
    )?;
    let tree = dir.join("qubes-core-agent-linux");
    if tree.join("qubesagent/firewall.py").exists() {
        Ok(tree)
    } else {
        Err(io::Error::other(format!(
            "{} holds no qubes-core-agent-linux/qubesagent/firewall.py",
            tarball.display()
        )))
    }
}

/// One random rule as qubesd's `Rule.rule` writes it (`action`, then
/// `dst4`/`dst6`, `proto`, `specialtarget`, `dstports`, `icmptype`, each
/// when set), over the probes' destinations and ports.
pub fn random_rule(rng: &mut Rng) -> String {
    let mut words = vec![format!(
        "action={}",
        if rng.chance(50) { "accept" } else { "drop" }
    )];
    let proto = match rng.below(10) {
        0..=2 => Some("tcp"),
        3..=5 => Some("udp"),
        6..=7 => Some("icmp"),
        _ => None,
    };
    if rng.chance(55) {
        if rng.chance(65) {
            let host = rng.pick(&probe::DST4).unwrap_or(WEB);
            let len = rng.pick(&[32u32, 32, 30, 24, 16, 8]).unwrap_or(32);
            let net = if len == 0 {
                0
            } else {
                u32::from(host) & (u32::MAX << (32 - len))
            };
            words.push(format!("dst4={}/{len}", Ipv4Addr::from(net)));
        } else {
            let host = rng.pick(&probe::DST6).unwrap_or(WEB6);
            let len = rng.pick(&[128u32, 128, 64, 48, 32, 16]).unwrap_or(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            words.push(format!(
                "dst6={}/{len}",
                std::net::Ipv6Addr::from(u128::from(host) & mask)
            ));
        }
    }
    if let Some(p) = proto {
        words.push(format!("proto={p}"));
    }
    if rng.chance(12) {
        words.push("specialtarget=dns".into());
    }
    match proto {
        Some("tcp" | "udp") if rng.chance(60) => {
            let a = if rng.chance(25) {
                rng.below(65536) as u16
            } else {
                rng.pick(&probe::PORTS).unwrap_or(80)
            };
            let b = if rng.chance(60) {
                a
            } else {
                a.saturating_add(rng.below(2000) as u16)
            };
            words.push(format!("dstports={a}-{b}"));
        }
        Some("icmp") if rng.chance(60) => {
            let ty = if rng.chance(25) {
                rng.below(256)
            } else {
                rng.pick(&[0u64, 3, 8, 11, 13, 15, 17, 128, 129, 135, 136])
                    .unwrap_or(8)
            };
            words.push(format!("icmptype={ty}"));
        }
        _ => {}
    }
    words.join(" ")
}

/// A random rule set: `(policy, rules)`.
pub fn random_rules(rng: &mut Rng) -> (String, Vec<String>) {
    let policy = if rng.chance(50) { "accept" } else { "drop" };
    let count = rng.below(7) as usize;
    let rules = (0..count).map(|_| random_rule(rng)).collect();
    (policy.to_string(), rules)
}

/// A known accident of Qubes' translation that makes Linux block all of
/// the client's traffic for a rule set that qubesd accepts: then Linux
/// applies no rule of the set, which the project deliberately does not
/// copy (it keeps the rules' documented meaning). The reason, with the
/// Qubes code line (qubes-core-agent-linux `qubesagent/firewall.py`), or
/// `None`.
pub fn qubes_accident(rule: &str) -> Option<&'static str> {
    let words: Vec<&str> = rule.split(' ').collect();
    let has = |w: &str| words.contains(&w);
    if has("specialtarget=dns") && has("proto=icmp") {
        return Some(
            "proto=icmp specialtarget=dns: firewall.py prepare_rules (`dstports = '53'` for \
             specialtarget=dns, then `{proto} dport {dstports}`) writes `icmp dport 53`, which nft \
             rejects, so handle_addr falls back to blocking everything",
        );
    }
    None
}
