//! The Qubes firewall rules of one client: parsed from QubesDB, matched
//! against new flows.
//!
//! dom0 writes a client's rules under `/qubes-firewall/<client-ip>/`:
//! `policy` (`accept`/`drop`, the default) and one key per rule (`0000`,
//! `0001`, …), each a space-separated list of `option=value` words. The
//! grammar here follows Qubes' own parser and rule generator
//! (qubes-core-agent-linux `qubesagent/firewall.py`, `read_rules` and
//! `prepare_rules`; qubes-core-admin `qubes/firewall.py`):
//! - keys are read in numeric order and gaps are allowed: dom0
//!   (qubes-core-admin `Firewall.qdb_entries`) numbers each rule by its
//!   position in the VM's list and skips expired rules and rules of the
//!   other address family, so gaps are normal;
//!   qubes-mirage-firewall stopped at the first gap, we do not. A key that is
//!   not all digits (Linux: exactly four digits; we also take longer ones,
//!   for sets of 10 000 rules and more) is a parse error, as in Linux.
//! - options: `action` (required: `accept`/`drop`), one of `dst4`
//!   (`a.b.c.d[/len]`), `dst6` (`addr[/len]`) or `dsthost` (a DNS name),
//!   `proto` (`tcp`/`udp`/`icmp`; `icmp` means ICMPv6 for IPv6 traffic),
//!   `specialtarget=dns`, `dstports` (`lo-hi`) and `icmptype` (a number) —
//!   exactly Linux's `supported_rule_opts`. Any other option, `expire` and
//!   `comment` included, is an error of the whole set, as Qubes'
//!   `vm-interface` documentation asks and `firewall.py` does ("Unsupported
//!   rule option(s)"): qubesd never writes either (it drops expired rules
//!   itself and keeps comments in dom0), so one in QubesDB means a writer
//!   this firewall does not understand, and the client's traffic is
//!   blocked. A repeated option, a missing `action` or a value that does
//!   not parse is an error too (Linux's `dict()` would keep the last of a
//!   repeated option; the documentation's fail-closed reading is kept).
//! - `specialtarget=dns` means: destination is one of the DNS servers
//!   (`/qubes-primary-dns`, `/qubes-secondary-dns`), port 53, protocol TCP or
//!   UDP intersected with the rule's `proto` — so `action=drop proto=tcp
//!   specialtarget=dns` drops only DNS over TCP (mirage-firewall got this
//!   wrong). Like Linux, a `dstports` other than `53-53` next to it makes the
//!   rule match nothing.
//! - one rule that cannot be parsed (or a missing `policy`) makes the whole
//!   set deny-all; the key and the reason are kept in [`RuleSet::error`] for
//!   the caller to log, as Linux's "Failed to parse rules for …, blocking
//!   traffic".
//! - `dsthost`: Linux resolves the name when it loads the rules and, when
//!   the name does not resolve, treats it as a parse error and blocks all of
//!   the client's traffic. We cannot resolve on the packet path, so names are
//!   resolved in the background by `dns.rs` and looked up through
//!   [`NameLookup`]. **Choice:** while any `dsthost` name of the set has no
//!   answer (still pending, or the lookup failed), the whole set is
//!   deny-all, exactly what Linux ends up doing; once every name has
//!   addresses, the rule matches those addresses (A records for IPv4, AAAA
//!   for IPv6 — like Linux, which resolves in the client's family: a name
//!   with only AAAA records blocks an IPv4 client's new flows). mirage-firewall skipped such rules silently, letting later
//!   accept rules apply — we never do that.
//!
//! Matching is pure and allocation-free. This module must never panic on
//! what dom0 writes, and never let a set that failed to parse accept
//! anything.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::HashMap;

use crate::nat::SeededState;

/// IP protocol numbers used by rule matching (defined in [`crate::wire`]).
pub use crate::wire::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// Maximum number of rules kept for one client; more is a parse error.
pub const MAX_RULES: usize = 16_384;
/// Maximum length of a `dsthost` name (RFC 1035).
pub const MAX_HOSTNAME_LEN: usize = 253;

/// What a rule (or the policy) does with a matching flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let the flow through.
    Accept,
    /// Drop the flow.
    Drop,
}

/// The `proto=` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// `tcp`
    Tcp,
    /// `udp`
    Udp,
    /// `icmp` (ICMPv4 for IPv4 traffic, ICMPv6 for IPv6 traffic)
    Icmp,
}

/// An address prefix (`dst4=` / `dst6=`), stored masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefix {
    /// IPv4 network and prefix length.
    V4(u32, u8),
    /// IPv6 network and prefix length.
    V6(u128, u8),
}

impl Prefix {
    fn mask4(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len.min(32)))
        }
    }
    fn mask6(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len.min(128)))
        }
    }
    /// Whether `addr` is inside this prefix (never across families).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self, addr) {
            (Prefix::V4(net, len), IpAddr::V4(a)) => u32::from(a) & Self::mask4(*len) == *net,
            (Prefix::V6(net, len), IpAddr::V6(a)) => u128::from(a) & Self::mask6(*len) == *net,
            _ => false,
        }
    }
    /// A host prefix (/32 or /128) for one address.
    pub fn host(addr: IpAddr) -> Prefix {
        match addr {
            IpAddr::V4(a) => Prefix::V4(u32::from(a), 32),
            IpAddr::V6(a) => Prefix::V6(u128::from(a), 128),
        }
    }
}

/// The destination part of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// No destination option: any address.
    Any,
    /// `dst4=` or `dst6=`.
    Prefix(Prefix),
    /// `dsthost=`: a DNS name, lowercased, resolved in the background.
    Host(String),
}

/// One parsed rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The rule's QubesDB key as a number (`0003` → 3).
    pub number: u32,
    /// `action=`
    pub action: Action,
    /// `dst4=` / `dst6=` / `dsthost=`
    pub destination: Destination,
    /// `proto=`
    pub proto: Option<Proto>,
    /// `specialtarget=dns`
    pub dns_only: bool,
    /// `dstports=lo-hi` (inclusive).
    pub ports: Option<(u16, u16)>,
    /// `icmptype=`
    pub icmp_type: Option<u8>,
}

/// Why a rule set could not be parsed. Kept in the (deny-all) set so the
/// caller can log it and the status service can show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    /// The QubesDB key below `/qubes-firewall/<ip>/` that was wrong
    /// (`policy`, `0003`, …).
    pub key: String,
    /// What was wrong with it.
    pub reason: RuleErrorReason,
}

/// What was wrong with a rule key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleErrorReason {
    /// No `policy` key was written.
    NoPolicy,
    /// `policy` is neither `accept` nor `drop`.
    BadPolicy,
    /// A key that is neither `policy` nor a rule number.
    NotARuleKey,
    /// The rule has no `action=`.
    NoAction,
    /// A word without `=`.
    NotKeyValue,
    /// An option Qubes does not define.
    UnknownOption(String),
    /// An option given twice, or two destination options.
    Repeated(&'static str),
    /// The value of an option did not parse.
    BadValue(&'static str),
    /// More rules than [`MAX_RULES`].
    TooManyRules,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/qubes-firewall/<ip>/{}: ", self.key)?;
        match &self.reason {
            RuleErrorReason::NoPolicy => f.write_str("no 'policy' defined"),
            RuleErrorReason::BadPolicy => f.write_str("policy must be 'accept' or 'drop'"),
            RuleErrorReason::NotARuleKey => f.write_str("unexpected non-rule key"),
            RuleErrorReason::NoAction => f.write_str("rule lacks action"),
            RuleErrorReason::NotKeyValue => f.write_str("a word is not option=value"),
            RuleErrorReason::UnknownOption(name) => write!(f, "unsupported rule option '{name}'"),
            RuleErrorReason::Repeated(name) => write!(f, "option '{name}' given more than once"),
            RuleErrorReason::BadValue(name) => write!(f, "invalid value for '{name}'"),
            RuleErrorReason::TooManyRules => write!(f, "more than {MAX_RULES} rules"),
        }?;
        f.write_str(" (all traffic of this client is blocked until dom0 rewrites the rules)")
    }
}

/// What is known about a `dsthost` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameState<'a> {
    /// The name resolved to these addresses (of the family asked for).
    Resolved(&'a [IpAddr]),
    /// No answer yet, or the lookup failed.
    Unresolved,
}

/// The DNS cache as the matcher sees it.
pub trait NameLookup {
    /// The addresses of `name` (lowercase) in one family (`ipv6`: AAAA
    /// records, else A records), if that lookup has succeeded.
    fn lookup(&self, name: &str, ipv6: bool) -> NameState<'_>;
}

/// A lookup that knows no names (every `dsthost` stays unresolved).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoNames;

impl NameLookup for NoNames {
    fn lookup(&self, _name: &str, _ipv6: bool) -> NameState<'_> {
        NameState::Unresolved
    }
}

/// What the matcher needs besides the packet.
#[derive(Clone, Copy)]
pub struct MatchContext<'a> {
    /// The DNS server addresses `specialtarget=dns` means.
    pub dns_servers: &'a [IpAddr],
    /// Wall-clock time (unix seconds) if known. No rule option reads it
    /// any more (`expire=` is refused, as on Linux); matching ignores it.
    pub now_unix: Option<u64>,
    /// The background DNS cache for `dsthost=`.
    pub names: &'a dyn NameLookup,
}

impl fmt::Debug for MatchContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatchContext")
            .field("dns_servers", &self.dns_servers)
            .field("now_unix", &self.now_unix)
            .finish_non_exhaustive()
    }
}

/// The fields of a new flow the rules look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowMeta {
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, …).
    pub protocol: u8,
    /// Destination port (TCP/UDP), 0 otherwise.
    pub dst_port: u16,
    /// ICMP type (ICMP/ICMPv6), `None` otherwise.
    pub icmp_type: Option<u8>,
}

/// Why the rules decided what they did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted by rule `number`.
    AcceptedByRule(u32),
    /// Accepted by the default policy.
    AcceptedByPolicy,
    /// Dropped by rule `number`.
    DroppedByRule(u32),
    /// Dropped by the default policy.
    DroppedByPolicy,
    /// Dropped: the rule set failed to parse.
    DroppedParseError,
    /// Dropped: a `dsthost` name of the set is not resolved yet.
    DroppedUnresolvedHost,
}

impl Verdict {
    /// Whether the flow may pass.
    pub fn accepts(self) -> bool {
        matches!(self, Verdict::AcceptedByRule(_) | Verdict::AcceptedByPolicy)
    }
}

/// The parsed rules of one client address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
    policy: Action,
    error: Option<RuleError>,
    hostnames: Vec<String>,
    index: RuleIndex,
}

/// Which rules can match a flow of one protocol class and address family:
/// rules for an address prefix (looked up by the destination masked to each
/// prefix length in use), rules for a port range (looked up by port), and
/// the rest. First-match order is kept by merging the sorted lists of rule
/// positions, so a new flow costs a few hash lookups and a binary search
/// plus the rules the index cannot narrow down, instead of every rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RuleIndex {
    classes: [ClassIndex; 8],
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ClassIndex {
    /// Rules whose destination is an address prefix (a host is a /32 or
    /// /128), by (masked network, prefix length).
    by_prefix: HashMap<(u128, u8), Vec<u32>, SeededState>,
    /// The distinct prefix lengths in `by_prefix`, longest first.
    prefix_lengths: Vec<u8>,
    general: Vec<u32>,
    /// TCP/UDP rules that are not for one host but for a port range: the
    /// port space cut at every range boundary (`port_starts[i]` starts
    /// segment `i`), each segment listing the rules whose range covers it.
    port_starts: Vec<u16>,
    port_rules: Vec<Vec<u32>>,
}

/// Most rule positions kept in a class's port segments; beyond that (many
/// overlapping ranges) the port rules stay in the general list.
const PORT_INDEX_BUDGET: usize = 1 << 18;

impl ClassIndex {
    /// Moves the port-range rules of `general` into port segments.
    fn index_ports(&mut self, rules: &[Rule]) {
        let range_of = |position: u32| -> Option<(u16, u16)> {
            let rule = rules.get(position as usize)?;
            match (rule.ports, rule.dns_only) {
                (Some(range), _) => Some(range),
                (None, true) => Some((53, 53)),
                (None, false) => None,
            }
        };
        let ranged: Vec<(u32, (u16, u16))> = self
            .general
            .iter()
            .filter_map(|&p| range_of(p).map(|range| (p, range)))
            .collect();
        if ranged.len() < 8 {
            return;
        }
        let mut starts: Vec<u16> = alloc::vec![0];
        for &(_, (low, high)) in &ranged {
            starts.push(low);
            if let Some(next) = high.checked_add(1) {
                starts.push(next);
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let mut segments: Vec<Vec<u32>> = alloc::vec![Vec::new(); starts.len()];
        let mut total = 0usize;
        for &(position, (low, high)) in &ranged {
            let first = starts.partition_point(|&start| start < low);
            for (segment, &start) in starts.iter().enumerate().skip(first) {
                if start > high {
                    break;
                }
                if let Some(list) = segments.get_mut(segment) {
                    list.push(position);
                    total += 1;
                }
            }
            if total > PORT_INDEX_BUDGET {
                return;
            }
        }
        self.general.retain(|&p| range_of(p).is_none());
        self.port_starts = starts;
        self.port_rules = segments;
    }

    /// The port-range rules that may match `port`.
    fn port_candidates(&self, port: u16) -> &[u32] {
        let segment = self.port_starts.partition_point(|&start| start <= port);
        segment
            .checked_sub(1)
            .and_then(|segment| self.port_rules.get(segment))
            .map_or(&[], Vec::as_slice)
    }
}

/// The index slot of a flow: protocol class (TCP, UDP, ICMP, other) plus
/// 4 for IPv6.
fn flow_class(protocol: u8, ipv6: bool) -> usize {
    let class = match protocol {
        PROTO_TCP => 0,
        PROTO_UDP => 1,
        PROTO_ICMP if !ipv6 => 2,
        PROTO_ICMPV6 if ipv6 => 2,
        _ => 3,
    };
    class + if ipv6 { 4 } else { 0 }
}

impl RuleIndex {
    fn build(rules: &[Rule]) -> RuleIndex {
        let mut index = RuleIndex::default();
        for (position, rule) in rules.iter().enumerate() {
            let position = position as u32;
            for (slot, class) in index.classes.iter_mut().enumerate() {
                let ipv6 = slot >= 4;
                let protocol_class = slot % 4;
                let proto_ok = match rule.proto {
                    Some(Proto::Tcp) => protocol_class == 0,
                    Some(Proto::Udp) => protocol_class == 1,
                    Some(Proto::Icmp) => protocol_class == 2,
                    None => true,
                };
                let ports_ok = !(rule.dns_only || rule.ports.is_some()) || protocol_class <= 1;
                let icmp_ok = rule.icmp_type.is_none() || protocol_class == 2;
                let family_ok = match &rule.destination {
                    Destination::Prefix(Prefix::V4(..)) => !ipv6,
                    Destination::Prefix(Prefix::V6(..)) => ipv6,
                    _ => true,
                };
                if !(proto_ok && ports_ok && icmp_ok && family_ok) {
                    continue;
                }
                match rule.destination {
                    Destination::Prefix(Prefix::V4(net, len)) => class
                        .by_prefix
                        .entry((u128::from(net), len))
                        .or_default()
                        .push(position),
                    Destination::Prefix(Prefix::V6(net, len)) => class
                        .by_prefix
                        .entry((net, len))
                        .or_default()
                        .push(position),
                    _ => class.general.push(position),
                }
            }
        }
        for class in index.classes.iter_mut() {
            let mut lengths: Vec<u8> = class.by_prefix.keys().map(|(_, len)| *len).collect();
            lengths.sort_unstable_by(|a, b| b.cmp(a));
            lengths.dedup();
            class.prefix_lengths = lengths;
        }
        // TCP and UDP, both families.
        for slot in [0, 1, 4, 5] {
            if let Some(class) = index.classes.get_mut(slot) {
                class.index_ports(rules);
            }
        }
        index
    }
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::deny_all()
    }
}

impl RuleSet {
    /// A set with no rules and `policy=drop`: what a client has before dom0
    /// wrote its rules.
    pub fn deny_all() -> RuleSet {
        RuleSet {
            rules: Vec::new(),
            policy: Action::Drop,
            error: None,
            hostnames: Vec::new(),
            index: RuleIndex::default(),
        }
    }

    /// A set with no rules and `policy=accept`.
    pub fn accept_all() -> RuleSet {
        RuleSet {
            rules: Vec::new(),
            policy: Action::Accept,
            error: None,
            hostnames: Vec::new(),
            index: RuleIndex::default(),
        }
    }

    /// Parses the entries below `/qubes-firewall/<client-ip>/`. Each item is
    /// (key relative to that directory, value), e.g. `("0000",
    /// "action=accept proto=tcp dstports=443-443")`, `("policy", "drop")`.
    /// Entries may come in any order. On any error the result denies
    /// everything and [`RuleSet::error`] says which key and why.
    pub fn parse<'a, I>(entries: I) -> RuleSet
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        match Self::try_parse(entries) {
            Ok(set) => set,
            Err(error) => RuleSet {
                rules: Vec::new(),
                policy: Action::Drop,
                error: Some(error),
                hostnames: Vec::new(),
                index: RuleIndex::default(),
            },
        }
    }

    fn try_parse<'a, I>(entries: I) -> Result<RuleSet, RuleError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut policy = None;
        let mut rules = Vec::new();
        for (key, value) in entries {
            let err = |reason| RuleError {
                key: String::from(key),
                reason,
            };
            if key == "policy" {
                policy = Some(match value.trim() {
                    "accept" => Action::Accept,
                    "drop" => Action::Drop,
                    _ => return Err(err(RuleErrorReason::BadPolicy)),
                });
                continue;
            }
            let number = parse_rule_key(key).ok_or_else(|| err(RuleErrorReason::NotARuleKey))?;
            if rules.len() >= MAX_RULES {
                return Err(err(RuleErrorReason::TooManyRules));
            }
            rules.push(parse_rule(number, value).map_err(err)?);
        }
        let policy = policy.ok_or_else(|| RuleError {
            key: String::from("policy"),
            reason: RuleErrorReason::NoPolicy,
        })?;
        rules.sort_by_key(|rule| rule.number);
        let mut hostnames: Vec<String> = rules
            .iter()
            .filter_map(|rule| match &rule.destination {
                Destination::Host(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        hostnames.sort();
        hostnames.dedup();
        Ok(RuleSet {
            index: RuleIndex::build(&rules),
            rules,
            policy,
            error: None,
            hostnames,
        })
    }

    /// The rules, in matching order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The default action.
    pub fn policy(&self) -> Action {
        self.policy
    }

    /// The parse error that made this set deny-all, if any.
    pub fn error(&self) -> Option<&RuleError> {
        self.error.as_ref()
    }

    /// The `dsthost` names the DNS client must keep resolved for this set.
    pub fn hostnames(&self) -> &[String] {
        &self.hostnames
    }

    /// Decides a new flow: first matching rule wins, else the policy.
    pub fn decide(&self, flow: &FlowMeta, ctx: &MatchContext<'_>) -> Verdict {
        if self.error.is_some() {
            return Verdict::DroppedParseError;
        }
        for name in &self.hostnames {
            if ctx.names.lookup(name, flow.dst.is_ipv6()) == NameState::Unresolved {
                return Verdict::DroppedUnresolvedHost;
            }
        }
        let class = self
            .index
            .classes
            .get(flow_class(flow.protocol, flow.dst.is_ipv6()));
        // The candidate lists, each sorted by rule position: the rules for
        // every prefix holding the destination, the port segment of its
        // port, and the rules the index cannot narrow down.
        let mut lists: Vec<(&[u32], usize)> = Vec::new();
        if let Some(class) = class {
            let address = match flow.dst {
                IpAddr::V4(a) => u128::from(u32::from(a)),
                IpAddr::V6(a) => u128::from(a),
            };
            let bits = if flow.dst.is_ipv6() { 128 } else { 32 };
            for &len in &class.prefix_lengths {
                let shift = u32::from(bits - len.min(bits));
                let network = if shift >= 128 {
                    0
                } else {
                    (address >> shift) << shift
                };
                if let Some(list) = class.by_prefix.get(&(network, len)) {
                    lists.push((list, 0));
                }
            }
            lists.push((&class.general, 0));
            lists.push((class.port_candidates(flow.dst_port), 0));
        }
        // Merge them: the lowest position first, so the first match wins.
        loop {
            let mut best: Option<(usize, u32)> = None;
            for (which, (list, at)) in lists.iter().enumerate() {
                if let Some(&position) = list.get(*at)
                    && best.is_none_or(|(_, current)| position < current)
                {
                    best = Some((which, position));
                }
            }
            let Some((which, next)) = best else { break };
            if let Some((_, at)) = lists.get_mut(which) {
                *at += 1;
            }
            let Some(rule) = self.rules.get(next as usize) else {
                continue;
            };
            if rule.matches(flow, ctx) {
                return match rule.action {
                    Action::Accept => Verdict::AcceptedByRule(rule.number),
                    Action::Drop => Verdict::DroppedByRule(rule.number),
                };
            }
        }
        match self.policy {
            Action::Accept => Verdict::AcceptedByPolicy,
            Action::Drop => Verdict::DroppedByPolicy,
        }
    }
}

impl Rule {
    /// Whether this rule matches the flow (the action is not looked at).
    pub fn matches(&self, flow: &FlowMeta, ctx: &MatchContext<'_>) -> bool {
        let is_v6 = flow.dst.is_ipv6();
        let is_icmp = flow.protocol == if is_v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
        let is_port_proto = flow.protocol == PROTO_TCP || flow.protocol == PROTO_UDP;
        match self.proto {
            Some(Proto::Tcp) if flow.protocol != PROTO_TCP => return false,
            Some(Proto::Udp) if flow.protocol != PROTO_UDP => return false,
            Some(Proto::Icmp) if !is_icmp => return false,
            _ => {}
        }
        if self.dns_only {
            if !is_port_proto || flow.dst_port != 53 {
                return false;
            }
            if matches!(self.ports, Some(range) if range != (53, 53)) {
                return false;
            }
            if !ctx.dns_servers.contains(&flow.dst) {
                return false;
            }
        }
        if let Some((low, high)) = self.ports
            && (!is_port_proto || flow.dst_port < low || flow.dst_port > high)
        {
            return false;
        }
        if let Some(icmp_type) = self.icmp_type
            && (!is_icmp || flow.icmp_type != Some(icmp_type))
        {
            return false;
        }
        match &self.destination {
            Destination::Any => true,
            Destination::Prefix(prefix) => prefix.contains(flow.dst),
            Destination::Host(name) => match ctx.names.lookup(name, flow.dst.is_ipv6()) {
                NameState::Resolved(addrs) => addrs.contains(&flow.dst),
                NameState::Unresolved => false,
            },
        }
    }
}

/// `0000` → 0. All ASCII digits, at least four of them, at most nine.
fn parse_rule_key(key: &str) -> Option<u32> {
    if key.len() < 4 || key.len() > 9 || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}

fn parse_rule(number: u32, text: &str) -> Result<Rule, RuleErrorReason> {
    let mut action = None;
    let mut destination = None;
    let mut proto = None;
    let mut dns_only = None;
    let mut ports = None;
    let mut icmp_type = None;
    for word in text.split(' ').filter(|word| !word.is_empty()) {
        let (name, value) = word.split_once('=').ok_or(RuleErrorReason::NotKeyValue)?;
        match name {
            "action" => set_once(&mut action, "action", parse_action(value)?)?,
            "dst4" => set_once(&mut destination, "dst4/dst6/dsthost", parse_dst4(value)?)?,
            "dst6" => set_once(&mut destination, "dst4/dst6/dsthost", parse_dst6(value)?)?,
            "dsthost" => set_once(&mut destination, "dst4/dst6/dsthost", parse_dsthost(value)?)?,
            "proto" => set_once(&mut proto, "proto", parse_proto(value)?)?,
            "specialtarget" => {
                if value != "dns" {
                    return Err(RuleErrorReason::BadValue("specialtarget"));
                }
                set_once(&mut dns_only, "specialtarget", true)?
            }
            "dstports" => set_once(&mut ports, "dstports", parse_ports(value)?)?,
            "icmptype" => {
                let value = value
                    .parse()
                    .map_err(|_| RuleErrorReason::BadValue("icmptype"))?;
                set_once(&mut icmp_type, "icmptype", value)?
            }
            // `expire`, `comment` and anything else: Linux's
            // "Unsupported rule option(s)", the whole set blocked.
            other => return Err(RuleErrorReason::UnknownOption(String::from(other))),
        }
    }
    Ok(Rule {
        number,
        action: action.ok_or(RuleErrorReason::NoAction)?,
        destination: destination.unwrap_or(Destination::Any),
        proto,
        dns_only: dns_only.unwrap_or(false),
        ports,
        icmp_type,
    })
}

fn set_once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), RuleErrorReason> {
    if slot.is_some() {
        return Err(RuleErrorReason::Repeated(name));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_action(value: &str) -> Result<Action, RuleErrorReason> {
    match value {
        "accept" => Ok(Action::Accept),
        "drop" => Ok(Action::Drop),
        _ => Err(RuleErrorReason::BadValue("action")),
    }
}

fn parse_proto(value: &str) -> Result<Proto, RuleErrorReason> {
    match value {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        "icmp" => Ok(Proto::Icmp),
        _ => Err(RuleErrorReason::BadValue("proto")),
    }
}

fn split_prefix<'v>(
    value: &'v str,
    max: u8,
    name: &'static str,
) -> Result<(&'v str, u8), RuleErrorReason> {
    match value.split_once('/') {
        None => Ok((value, max)),
        Some((addr, len)) => {
            if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RuleErrorReason::BadValue(name));
            }
            let len: u8 = len.parse().map_err(|_| RuleErrorReason::BadValue(name))?;
            if len > max {
                return Err(RuleErrorReason::BadValue(name));
            }
            Ok((addr, len))
        }
    }
}

fn parse_dst4(value: &str) -> Result<Destination, RuleErrorReason> {
    let (addr, len) = split_prefix(value, 32, "dst4")?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| RuleErrorReason::BadValue("dst4"))?;
    Ok(Destination::Prefix(Prefix::V4(
        u32::from(addr) & Prefix::mask4(len),
        len,
    )))
}

fn parse_dst6(value: &str) -> Result<Destination, RuleErrorReason> {
    let (addr, len) = split_prefix(value, 128, "dst6")?;
    let addr: Ipv6Addr = addr
        .parse()
        .map_err(|_| RuleErrorReason::BadValue("dst6"))?;
    Ok(Destination::Prefix(Prefix::V6(
        u128::from(addr) & Prefix::mask6(len),
        len,
    )))
}

fn parse_dsthost(value: &str) -> Result<Destination, RuleErrorReason> {
    // An address literal resolves to itself (getaddrinfo does the same).
    if let Ok(addr) = value.parse::<IpAddr>() {
        return Ok(Destination::Prefix(Prefix::host(addr)));
    }
    let name = value.strip_suffix('.').unwrap_or(value);
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > MAX_HOSTNAME_LEN || !name.split('.').all(valid_label) {
        return Err(RuleErrorReason::BadValue("dsthost"));
    }
    Ok(Destination::Host(name.to_ascii_lowercase()))
}

fn parse_ports(value: &str) -> Result<(u16, u16), RuleErrorReason> {
    let bad = || RuleErrorReason::BadValue("dstports");
    let (low, high) = value.split_once('-').unwrap_or((value, value));
    let low: u16 = low.parse().map_err(|_| bad())?;
    let high: u16 = high.parse().map_err(|_| bad())?;
    if low > high {
        return Err(bad());
    }
    Ok((low, high))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes buffers it built itself.
mod tests {
    use super::*;
    use alloc::vec;

    struct Names(Vec<(&'static str, Vec<IpAddr>)>);
    impl NameLookup for Names {
        fn lookup(&self, name: &str, ipv6: bool) -> NameState<'_> {
            self.0
                .iter()
                .find(|(n, a)| *n == name && a.iter().all(|a| a.is_ipv6() == ipv6))
                .map(|(_, a)| NameState::Resolved(a))
                .unwrap_or(NameState::Unresolved)
        }
    }

    const DNS: [IpAddr; 2] = [
        IpAddr::V4(Ipv4Addr::new(10, 139, 1, 1)),
        IpAddr::V4(Ipv4Addr::new(10, 139, 1, 2)),
    ];

    fn ctx<'a>(names: &'a dyn NameLookup, now: Option<u64>) -> MatchContext<'a> {
        MatchContext {
            dns_servers: &DNS,
            now_unix: now,
            names,
        }
    }

    fn flow(dst: &str, protocol: u8, port: u16) -> FlowMeta {
        FlowMeta {
            dst: dst.parse().unwrap(),
            protocol,
            dst_port: port,
            icmp_type: None,
        }
    }

    fn set<'a>(entries: &[(&'a str, &'a str)]) -> RuleSet {
        RuleSet::parse(entries.iter().copied())
    }

    #[test]
    fn examples_from_dom0_parse() {
        let s = set(&[
            ("policy", "drop"),
            (
                "0000",
                "action=accept dst4=10.137.0.5/32 proto=tcp dstports=6668-6670",
            ),
            (
                "0001",
                "action=accept dst4=10.137.0.5/32 proto=icmp icmptype=8",
            ),
            ("0002", "action=accept dsthost=Example.com"),
            ("0003", "action=accept proto=tcp dstports=443-443"),
            ("0004", "action=accept specialtarget=dns"),
            ("0005", "action=drop proto=tcp specialtarget=dns"),
            (
                "0006",
                "action=accept dst6=2001:db8::/32 proto=udp dstports=123-123",
            ),
            ("0007", "action=drop proto=icmp icmptype=13"),
        ]);
        assert_eq!(s.error(), None);
        assert_eq!(s.rules().len(), 8);
        assert_eq!(s.hostnames(), &[String::from("example.com")]);
        assert_eq!(s.rules()[7].icmp_type, Some(13));
        assert_eq!(
            s.rules()[6].destination,
            Destination::Prefix(Prefix::V6(0x2001_0db8 << 96, 32))
        );
    }

    #[test]
    fn first_match_wins_and_policy_applies() {
        let s = set(&[
            ("policy", "drop"),
            ("0000", "action=drop proto=tcp dstports=80-80"),
            ("0001", "action=accept proto=tcp"),
        ]);
        let c = ctx(&NoNames, None);
        assert_eq!(
            s.decide(&flow("1.2.3.4", PROTO_TCP, 80), &c),
            Verdict::DroppedByRule(0)
        );
        assert_eq!(
            s.decide(&flow("1.2.3.4", PROTO_TCP, 81), &c),
            Verdict::AcceptedByRule(1)
        );
        assert_eq!(
            s.decide(&flow("1.2.3.4", PROTO_UDP, 81), &c),
            Verdict::DroppedByPolicy
        );
        let open = set(&[("policy", "accept")]);
        assert_eq!(
            open.decide(&flow("1.2.3.4", PROTO_UDP, 1), &c),
            Verdict::AcceptedByPolicy
        );
    }

    #[test]
    fn rules_after_a_gap_and_out_of_order_are_read() {
        let s = set(&[
            ("0010", "action=accept proto=udp"),
            ("policy", "drop"),
            ("0002", "action=drop proto=udp dstports=53-53"),
        ]);
        let c = ctx(&NoNames, None);
        assert_eq!(
            s.decide(&flow("1.2.3.4", PROTO_UDP, 53), &c),
            Verdict::DroppedByRule(2)
        );
        assert_eq!(
            s.decide(&flow("1.2.3.4", PROTO_UDP, 54), &c),
            Verdict::AcceptedByRule(10)
        );
    }

    #[test]
    fn dst4_prefix_and_host_bits() {
        let s = set(&[
            ("policy", "drop"),
            ("0000", "action=accept dst4=10.1.2.3/16"),
        ]);
        let c = ctx(&NoNames, None);
        assert!(s.decide(&flow("10.1.200.1", PROTO_TCP, 1), &c).accepts());
        assert!(!s.decide(&flow("10.2.0.1", PROTO_TCP, 1), &c).accepts());
        assert!(!s.decide(&flow("::1", PROTO_TCP, 1), &c).accepts());
        let all = set(&[("policy", "drop"), ("0000", "action=accept dst4=0.0.0.0/0")]);
        assert!(all.decide(&flow("8.8.8.8", PROTO_UDP, 1), &c).accepts());
        let bare = set(&[("policy", "drop"), ("0000", "action=accept dst4=8.8.8.8")]);
        assert!(bare.decide(&flow("8.8.8.8", PROTO_UDP, 1), &c).accepts());
        assert!(!bare.decide(&flow("8.8.8.9", PROTO_UDP, 1), &c).accepts());
    }

    #[test]
    fn dst6_rule_matches_only_ipv6() {
        let s = set(&[
            ("policy", "drop"),
            (
                "0000",
                "action=accept dst6=2001:db8::/32 proto=udp dstports=123-123",
            ),
        ]);
        let c = ctx(&NoNames, None);
        assert!(s.decide(&flow("2001:db8::1", PROTO_UDP, 123), &c).accepts());
        assert!(!s.decide(&flow("2001:db9::1", PROTO_UDP, 123), &c).accepts());
        assert!(!s.decide(&flow("2001:db8::1", PROTO_UDP, 124), &c).accepts());
        assert!(!s.decide(&flow("1.2.3.4", PROTO_UDP, 123), &c).accepts());
    }

    #[test]
    fn icmp_and_icmptype() {
        let s = set(&[
            ("policy", "drop"),
            ("0000", "action=accept proto=icmp icmptype=8"),
        ]);
        let c = ctx(&NoNames, None);
        let mut ping = flow("1.2.3.4", PROTO_ICMP, 0);
        ping.icmp_type = Some(8);
        assert!(s.decide(&ping, &c).accepts());
        ping.icmp_type = Some(13);
        assert!(!s.decide(&ping, &c).accepts());
        let mut ping6 = flow("2001:db8::1", PROTO_ICMPV6, 0);
        ping6.icmp_type = Some(8);
        assert!(
            s.decide(&ping6, &c).accepts(),
            "proto=icmp means ICMPv6 for IPv6"
        );
        ping6.protocol = PROTO_ICMP;
        assert!(!s.decide(&ping6, &c).accepts());
    }

    #[test]
    fn specialtarget_dns_combines_with_proto() {
        let s = set(&[
            ("policy", "accept"),
            ("0000", "action=drop proto=tcp specialtarget=dns"),
        ]);
        let c = ctx(&NoNames, None);
        assert_eq!(
            s.decide(&flow("10.139.1.1", PROTO_TCP, 53), &c),
            Verdict::DroppedByRule(0)
        );
        assert_eq!(
            s.decide(&flow("10.139.1.1", PROTO_UDP, 53), &c),
            Verdict::AcceptedByPolicy
        );
        assert_eq!(
            s.decide(&flow("10.139.1.3", PROTO_TCP, 53), &c),
            Verdict::AcceptedByPolicy
        );
        assert_eq!(
            s.decide(&flow("10.139.1.2", PROTO_TCP, 54), &c),
            Verdict::AcceptedByPolicy
        );
        let dns = set(&[
            ("policy", "drop"),
            ("0000", "action=accept specialtarget=dns"),
        ]);
        assert!(dns.decide(&flow("10.139.1.2", PROTO_UDP, 53), &c).accepts());
        assert!(dns.decide(&flow("10.139.1.2", PROTO_TCP, 53), &c).accepts());
        assert!(!dns.decide(&flow("10.139.1.2", PROTO_ICMP, 0), &c).accepts());
        let ported = set(&[
            ("policy", "drop"),
            ("0000", "action=accept specialtarget=dns dstports=1-100"),
        ]);
        assert!(
            !ported
                .decide(&flow("10.139.1.2", PROTO_UDP, 53), &c)
                .accepts(),
            "Linux skips the rule"
        );
    }

    #[test]
    fn dsthost_blocks_until_resolved() {
        let s = set(&[
            ("policy", "drop"),
            ("0000", "action=accept dsthost=example.com"),
            ("0001", "action=accept proto=udp"),
        ]);
        // Unresolved: the whole client is blocked, even what rule 1 accepts.
        let c = ctx(&NoNames, None);
        assert_eq!(
            s.decide(&flow("93.184.216.34", PROTO_TCP, 80), &c),
            Verdict::DroppedUnresolvedHost
        );
        assert_eq!(
            s.decide(&flow("1.1.1.1", PROTO_UDP, 80), &c),
            Verdict::DroppedUnresolvedHost
        );
        let names = Names(vec![(
            "example.com",
            vec!["93.184.216.34".parse().unwrap()],
        )]);
        let c = ctx(&names, None);
        assert_eq!(
            s.decide(&flow("93.184.216.34", PROTO_TCP, 80), &c),
            Verdict::AcceptedByRule(0)
        );
        assert_eq!(
            s.decide(&flow("93.184.216.35", PROTO_TCP, 80), &c),
            Verdict::DroppedByPolicy
        );
        assert_eq!(
            s.decide(&flow("1.1.1.1", PROTO_UDP, 80), &c),
            Verdict::AcceptedByRule(1)
        );
    }

    #[test]
    fn expire_comment_and_unknown_options_block_the_whole_set() {
        // qubesd never writes `expire=` or `comment=`; Linux refuses every
        // option outside its `supported_rule_opts`, and so do we: the
        // whole set drops, whatever the policy and the other rules say.
        let names = NoNames;
        for (bad, option) in [
            ("action=accept expire=1000", "expire"),
            ("action=drop proto=udp expire=99999999999", "expire"),
            ("action=accept comment=x", "comment"),
            ("action=accept proto=tcp dstports=80-80 comment=", "comment"),
            ("action=accept srcports=1-2", "srcports"),
            ("action=accept dst4=1.2.3.4 Proto=tcp", "Proto"),
            ("action=accept =x", ""),
        ] {
            let s = set(&[
                ("policy", "accept"),
                ("0000", "action=accept proto=tcp"),
                ("0001", bad),
            ]);
            let error = s.error().unwrap_or_else(|| panic!("{bad:?} parsed"));
            assert_eq!(error.key, "0001", "{bad}");
            assert_eq!(
                error.reason,
                RuleErrorReason::UnknownOption(String::from(option)),
                "{bad}"
            );
            let text = alloc::format!("{error}");
            assert!(
                text.contains(&alloc::format!("unsupported rule option '{option}'")),
                "{text}"
            );
            assert!(text.contains("blocked"), "{text}");
            for now in [None, Some(0), Some(u64::MAX)] {
                for protocol in [PROTO_TCP, PROTO_UDP, PROTO_ICMP] {
                    assert_eq!(
                        s.decide(&flow("1.1.1.1", protocol, 80), &ctx(&names, now)),
                        Verdict::DroppedParseError,
                        "{bad}"
                    );
                }
            }
            assert!(s.rules().is_empty() && s.policy() == Action::Drop);
        }
        // Duplicated options fail closed, known ones and unknown ones.
        for bad in [
            "action=accept proto=tcp proto=tcp",
            "action=accept icmptype=8 icmptype=8",
            "action=accept dstports=1-2 dstports=1-2",
            "action=accept specialtarget=dns specialtarget=dns",
        ] {
            let s = set(&[("policy", "accept"), ("0000", bad)]);
            assert!(
                matches!(
                    s.error().map(|e| &e.reason),
                    Some(RuleErrorReason::Repeated(_))
                ),
                "{bad}: {:?}",
                s.error()
            );
        }
        let s = set(&[("policy", "accept"), ("0000", "comment=a comment=b")]);
        assert!(s.error().is_some());
    }

    #[test]
    fn dstports_without_proto_matches_tcp_and_udp_only() {
        let s = set(&[("policy", "drop"), ("0000", "action=accept dstports=22-23")]);
        let c = ctx(&NoNames, None);
        assert!(s.decide(&flow("1.1.1.1", PROTO_TCP, 22), &c).accepts());
        assert!(s.decide(&flow("1.1.1.1", PROTO_UDP, 23), &c).accepts());
        assert!(!s.decide(&flow("1.1.1.1", PROTO_ICMP, 0), &c).accepts());
        assert!(!s.decide(&flow("1.1.1.1", PROTO_TCP, 24), &c).accepts());
    }

    #[test]
    fn malformed_sets_deny_everything_and_say_why() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, RuleErrorReason);
        let cases: &[Case<'_>] = &[
            (
                &[("0000", "action=accept")],
                "policy",
                RuleErrorReason::NoPolicy,
            ),
            (&[("policy", "maybe")], "policy", RuleErrorReason::BadPolicy),
            (
                &[("policy", "accept"), ("12", "action=accept")],
                "12",
                RuleErrorReason::NotARuleKey,
            ),
            (
                &[("policy", "accept"), ("00x1", "action=accept")],
                "00x1",
                RuleErrorReason::NotARuleKey,
            ),
            (
                &[("policy", "accept"), ("0000", "proto=tcp")],
                "0000",
                RuleErrorReason::NoAction,
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept tcp")],
                "0000",
                RuleErrorReason::NotKeyValue,
            ),
            (
                &[("policy", "accept"), ("0000", "action=reject")],
                "0000",
                RuleErrorReason::BadValue("action"),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept foo=1")],
                "0000",
                RuleErrorReason::UnknownOption(String::from("foo")),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept action=drop")],
                "0000",
                RuleErrorReason::Repeated("action"),
            ),
            (
                &[
                    ("policy", "accept"),
                    ("0000", "action=accept dst4=1.2.3.4 dsthost=a.b"),
                ],
                "0000",
                RuleErrorReason::Repeated("dst4/dst6/dsthost"),
            ),
            (
                &[
                    ("policy", "accept"),
                    ("0000", "action=accept dst4=1.2.3.4/33"),
                ],
                "0000",
                RuleErrorReason::BadValue("dst4"),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept dst4=1.2.3/8")],
                "0000",
                RuleErrorReason::BadValue("dst4"),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept dst6=zz::/8")],
                "0000",
                RuleErrorReason::BadValue("dst6"),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept dsthost=a..b")],
                "0000",
                RuleErrorReason::BadValue("dsthost"),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept proto=sctp")],
                "0000",
                RuleErrorReason::BadValue("proto"),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept dstports=9-1")],
                "0000",
                RuleErrorReason::BadValue("dstports"),
            ),
            (
                &[
                    ("policy", "accept"),
                    ("0000", "action=accept dstports=70000"),
                ],
                "0000",
                RuleErrorReason::BadValue("dstports"),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept icmptype=256")],
                "0000",
                RuleErrorReason::BadValue("icmptype"),
            ),
            (
                &[
                    ("policy", "accept"),
                    ("0000", "action=accept specialtarget=ntp"),
                ],
                "0000",
                RuleErrorReason::BadValue("specialtarget"),
            ),
            (
                &[("policy", "accept"), ("0000", "action=accept expire=-1")],
                "0000",
                RuleErrorReason::UnknownOption(String::from("expire")),
            ),
        ];
        let c = ctx(&NoNames, None);
        for (entries, key, reason) in cases {
            let s = set(entries);
            let error = s.error().unwrap_or_else(|| panic!("{entries:?} parsed"));
            assert_eq!(error.key, *key, "{entries:?}");
            assert_eq!(&error.reason, reason, "{entries:?}");
            assert_eq!(
                s.decide(&flow("1.1.1.1", PROTO_TCP, 80), &c),
                Verdict::DroppedParseError
            );
            assert!(!alloc::format!("{error}").is_empty());
        }
    }

    #[test]
    fn index_agrees_with_a_linear_scan() {
        let s = set(&[
            ("policy", "accept"),
            (
                "0000",
                "action=drop dst4=1.2.3.4/32 proto=tcp dstports=22-22",
            ),
            ("0001", "action=accept dst4=1.2.3.0/24 proto=udp"),
            ("0002", "action=drop dst4=1.2.3.4"),
            ("0003", "action=accept dsthost=example.com proto=tcp"),
            ("0004", "action=drop proto=tcp specialtarget=dns"),
            ("0005", "action=accept specialtarget=dns"),
            ("0006", "action=drop proto=icmp icmptype=8"),
            ("0007", "action=accept dst6=2001:db8::1/128 proto=icmp"),
            ("0008", "action=drop dst6=2001:db8::/32"),
            ("0009", "action=accept dstports=80-443"),
            ("0010", "action=drop dst4=10.139.1.1/32"),
            ("0011", "action=drop dst4=9.9.9.9/32 proto=udp"),
        ]);
        let names = Names(vec![
            ("example.com", vec!["9.9.9.9".parse().unwrap()]),
            ("example.com", vec!["2001:db8::99".parse().unwrap()]),
        ]);
        let c = ctx(&names, None);
        let destinations = [
            "1.2.3.4",
            "1.2.3.5",
            "9.9.9.9",
            "10.139.1.1",
            "10.139.1.2",
            "8.8.8.8",
            "2001:db8::1",
            "2001:db8::2",
            "2001:db9::1",
        ];
        let mut checked = 0;
        for dst in destinations {
            for protocol in [PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, 47] {
                for port in [0, 22, 53, 80, 443, 1000] {
                    for icmp_type in [None, Some(8), Some(0)] {
                        let f = FlowMeta {
                            dst: dst.parse().unwrap(),
                            protocol,
                            dst_port: port,
                            icmp_type,
                        };
                        let linear = s
                            .rules()
                            .iter()
                            .find(|r| r.matches(&f, &c))
                            .map(|r| match r.action {
                                Action::Accept => Verdict::AcceptedByRule(r.number),
                                Action::Drop => Verdict::DroppedByRule(r.number),
                            })
                            .unwrap_or(Verdict::AcceptedByPolicy);
                        assert_eq!(s.decide(&f, &c), linear, "{f:?}");
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 9 * 5 * 6 * 3);
    }

    #[test]
    fn port_index_agrees_with_a_linear_scan() {
        let mut owned: Vec<(String, String)> = vec![(String::from("policy"), String::from("drop"))];
        let ranges = [
            (1, 1024),
            (22, 22),
            (80, 80),
            (443, 443),
            (1000, 2000),
            (53, 53),
            (65535, 65535),
            (0, 0),
        ];
        for (i, (low, high)) in ranges.iter().enumerate() {
            let action = if i % 2 == 0 { "drop" } else { "accept" };
            let proto = ["tcp", "udp"][i % 2];
            owned.push((
                alloc::format!("{:04}", i * 3),
                alloc::format!("action={action} proto={proto} dstports={low}-{high}"),
            ));
            owned.push((
                alloc::format!("{:04}", i * 3 + 1),
                alloc::format!("action={action} dstports={low}-{high}"),
            ));
            owned.push((
                alloc::format!("{:04}", i * 3 + 2),
                alloc::format!("action=accept dst4=1.2.3.{i} proto=tcp dstports={high}-{high}"),
            ));
        }
        owned.push((
            String::from("0100"),
            String::from("action=accept specialtarget=dns"),
        ));
        owned.push((String::from("0101"), String::from("action=drop proto=udp")));
        let s = RuleSet::parse(owned.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(s.error(), None);
        let class = &s.index.classes[0];
        assert!(
            !class.port_starts.is_empty(),
            "the TCP port index was built"
        );
        let c = ctx(&NoNames, None);
        for dst in ["1.2.3.0", "1.2.3.4", "10.139.1.1", "8.8.8.8"] {
            for protocol in [PROTO_TCP, PROTO_UDP] {
                for port in [
                    0, 1, 21, 22, 23, 52, 53, 54, 80, 443, 999, 1000, 1024, 1025, 2000, 2001,
                    65534, 65535,
                ] {
                    let f = FlowMeta {
                        dst: dst.parse().unwrap(),
                        protocol,
                        dst_port: port,
                        icmp_type: None,
                    };
                    let linear = s
                        .rules()
                        .iter()
                        .find(|r| r.matches(&f, &c))
                        .map(|r| match r.action {
                            Action::Accept => Verdict::AcceptedByRule(r.number),
                            Action::Drop => Verdict::DroppedByRule(r.number),
                        })
                        .unwrap_or(Verdict::DroppedByPolicy);
                    assert_eq!(s.decide(&f, &c), linear, "{f:?}");
                }
            }
        }
    }

    #[test]
    fn nested_prefixes_keep_first_match_order() {
        let s = set(&[
            ("policy", "drop"),
            ("0000", "action=drop dst4=10.1.2.0/24"),
            ("0001", "action=accept dst4=10.1.0.0/16 proto=tcp"),
            (
                "0002",
                "action=drop dst4=10.0.0.0/8 proto=tcp dstports=22-22",
            ),
            ("0003", "action=accept dst4=10.0.0.0/8"),
            ("0004", "action=drop dst4=0.0.0.0/0 proto=udp"),
            ("0005", "action=accept dst6=::/0"),
            ("0006", "action=accept dst4=0.0.0.0/1"),
        ]);
        let c = ctx(&NoNames, None);
        let cases = [
            ("10.1.2.3", PROTO_TCP, 80, Verdict::DroppedByRule(0)),
            ("10.1.3.3", PROTO_TCP, 22, Verdict::AcceptedByRule(1)),
            ("10.1.3.3", PROTO_UDP, 22, Verdict::AcceptedByRule(3)),
            ("10.9.3.3", PROTO_TCP, 22, Verdict::DroppedByRule(2)),
            ("10.9.3.3", PROTO_TCP, 23, Verdict::AcceptedByRule(3)),
            ("11.0.0.1", PROTO_UDP, 1, Verdict::DroppedByRule(4)),
            ("11.0.0.1", PROTO_TCP, 1, Verdict::AcceptedByRule(6)),
            ("200.0.0.1", PROTO_TCP, 1, Verdict::DroppedByPolicy),
            ("2001:db8::1", PROTO_UDP, 1, Verdict::AcceptedByRule(5)),
        ];
        for (dst, protocol, port, expected) in cases {
            let f = FlowMeta {
                dst: dst.parse().unwrap(),
                protocol,
                dst_port: port,
                icmp_type: None,
            };
            assert_eq!(s.decide(&f, &c), expected, "{f:?}");
        }
    }

    #[test]
    fn dsthost_literal_is_an_address() {
        let s = set(&[
            ("policy", "drop"),
            ("0000", "action=accept dsthost=1.2.3.4"),
        ]);
        assert!(s.hostnames().is_empty());
        assert!(
            s.decide(&flow("1.2.3.4", PROTO_TCP, 1), &ctx(&NoNames, None))
                .accepts()
        );
    }
}
