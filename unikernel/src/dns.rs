//! The DNS client behind `dsthost=` rules: A and AAAA lookups over the
//! uplink, TTL-cached and refreshed in the background.
//!
//! The router tells the resolver which names the rule sets use
//! ([`Resolver::set_wanted`]); the resolver sends queries (UDP from the
//! firewall's uplink address and [`Resolver::port`] to `/qubes-primary-dns`,
//! then `/qubes-secondary-dns` on timeout) when the router polls it, and
//! takes the answers the router hands back. The rules see the cache through
//! [`NameLookup`]; no lookup ever happens on the packet path.
//!
//! Choices (see `rules.rs` for what an unresolved name means to a client):
//! a name with no answer yet, or whose every lookup failed, is unresolved;
//! answers are cached for their TTL (clamped to 60 s – 1 day) and
//! re-queried at three quarters of it; when a refresh fails the last
//! addresses are kept (Linux resolves once per rule load and keeps the
//! result), so a DNS outage does not cut established rule sets. A failed
//! name is retried after 5 s, doubling up to 5 min. Queries time out after
//! 2 s and are tried three times, alternating servers. Answers must come
//! from the server asked, to our port, with the pending transaction id and
//! the question we asked (ids come from a generator seeded at boot).
//!
//! Bounded: at most `max_names` names and one outstanding query per name and
//! family. The answer is a peer's bytes: parsing never panics, loops are
//! bounded by counts and lengths, compression pointers are not followed
//! (answers are matched by position, not by name); `clippy::indexing_slicing`
//! is denied so the compiler checks that no index can panic.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use alloc::string::String;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::nat::Millis;
use crate::rules::{NameLookup, NameState};

/// Shortest TTL honoured.
pub const MIN_TTL: Millis = 60_000;
/// Longest TTL honoured.
pub const MAX_TTL: Millis = 86_400_000;
/// Time to wait for an answer.
pub const QUERY_TIMEOUT: Millis = 2_000;
/// Tries per lookup (alternating servers).
pub const TRIES: u8 = 3;
/// First retry delay after a failed lookup.
pub const RETRY_MIN: Millis = 5_000;
/// Longest retry delay.
pub const RETRY_MAX: Millis = 300_000;
/// Most addresses kept per name and family.
pub const MAX_ADDRESSES: usize = 32;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// Why an answer was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than its counts say, or a name that runs off the end.
    Malformed,
    /// No pending query with this id from this server.
    Unexpected,
    /// The question section is not the question we asked.
    WrongQuestion,
}

impl core::fmt::Display for DnsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            DnsError::Malformed => {
                "DNS answer malformed (truncated, or a name running off the end)"
            }
            DnsError::Unexpected => "DNS answer for no pending query (wrong id or server): ignored",
            DnsError::WrongQuestion => "DNS answer to a question we did not ask: ignored",
        })
    }
}

#[derive(Clone, Debug, Default)]
struct Family {
    addresses: Vec<IpAddr>,
    /// When the cached addresses stop being valid.
    expires: Millis,
    /// When to ask next.
    next_query: Millis,
    resolved_once: bool,
    failures: u32,
}

#[derive(Clone, Debug)]
struct Name {
    name: String,
    v4: Family,
    v6: Family,
}

#[derive(Clone, Debug)]
struct Query {
    id: u16,
    name: String,
    ipv6: bool,
    server: Ipv4Addr,
    sent: Millis,
    tries: u8,
}

/// The resolver and its cache.
#[derive(Debug)]
pub struct Resolver {
    servers: Vec<Ipv4Addr>,
    names: Vec<Name>,
    queries: Vec<Query>,
    max_names: usize,
    want_ipv6: bool,
    port: u16,
    rng: u64,
    refused_names: u64,
}

impl Resolver {
    /// A resolver asking `servers` (primary first), keeping at most
    /// `max_names` names; `want_ipv6` also asks AAAA.
    pub fn new(servers: Vec<Ipv4Addr>, max_names: usize, want_ipv6: bool, seed: u64) -> Resolver {
        let mut rng = seed | 1;
        let port = 49152 + (xorshift(&mut rng) % 16384) as u16;
        Resolver {
            servers,
            names: Vec::new(),
            queries: Vec::new(),
            max_names,
            want_ipv6,
            port,
            rng,
            refused_names: 0,
        }
    }

    /// Our UDP source port for queries (answers come back to it).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The servers asked.
    pub fn servers(&self) -> &[Ipv4Addr] {
        &self.servers
    }

    /// Names refused because the cache was full.
    pub fn refused_names(&self) -> u64 {
        self.refused_names
    }

    /// Names in the cache.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Makes the cache hold exactly these names (lowercase): new ones are
    /// queried at the next poll, dropped ones are forgotten.
    pub fn set_wanted<'a>(&mut self, wanted: impl IntoIterator<Item = &'a str>, now: Millis) {
        let wanted: Vec<&str> = wanted.into_iter().collect();
        self.names.retain(|n| wanted.contains(&n.name.as_str()));
        self.queries.retain(|q| wanted.contains(&q.name.as_str()));
        for name in wanted {
            if self.names.iter().any(|n| n.name == name) {
                continue;
            }
            if self.names.len() >= self.max_names {
                self.refused_names += 1;
                continue;
            }
            let fresh = Family {
                next_query: now,
                ..Family::default()
            };
            self.names.push(Name {
                name: String::from(name),
                v4: fresh.clone(),
                v6: fresh,
            });
        }
    }

    /// Sends the queries that are due and retries timed-out ones: `send`
    /// gets (server, payload) for a UDP datagram from [`Resolver::port`]
    /// to port 53.
    pub fn poll(&mut self, now: Millis, send: &mut dyn FnMut(Ipv4Addr, &[u8])) {
        if self.servers.is_empty() {
            return;
        }
        // Time-outs: try again (next server) or give up.
        let mut index = 0;
        while index < self.queries.len() {
            let Some(query) = self.queries.get_mut(index) else {
                break;
            };
            if now.saturating_sub(query.sent) < QUERY_TIMEOUT {
                index += 1;
                continue;
            }
            if query.tries >= TRIES {
                let query = self.queries.swap_remove(index);
                self.fail(&query.name, query.ipv6, now);
                continue;
            }
            let server_index = usize::from(query.tries) % self.servers.len();
            query.server = self
                .servers
                .get(server_index)
                .copied()
                .unwrap_or(query.server);
            query.tries += 1;
            query.sent = now;
            query.id = xorshift(&mut self.rng) as u16;
            let message = build_query(query.id, &query.name, query.ipv6);
            send(query.server, &message);
            index += 1;
        }
        // New lookups and refreshes.
        let want_ipv6 = self.want_ipv6;
        for name_index in 0..self.names.len() {
            for ipv6 in [false, true] {
                if ipv6 && !want_ipv6 {
                    continue;
                }
                let Some(name) = self.names.get_mut(name_index) else {
                    break;
                };
                let family = if ipv6 { &mut name.v6 } else { &mut name.v4 };
                if family.next_query > now {
                    continue;
                }
                if self
                    .queries
                    .iter()
                    .any(|q| q.name == name.name && q.ipv6 == ipv6)
                {
                    continue;
                }
                family.next_query = now + QUERY_TIMEOUT * Millis::from(TRIES) + 1;
                let id = xorshift(&mut self.rng) as u16;
                let server = self
                    .servers
                    .first()
                    .copied()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                let message = build_query(id, &name.name, ipv6);
                self.queries.push(Query {
                    id,
                    name: name.name.clone(),
                    ipv6,
                    server,
                    sent: now,
                    tries: 1,
                });
                send(server, &message);
            }
        }
    }

    fn fail(&mut self, name: &str, ipv6: bool, now: Millis) {
        if let Some(entry) = self.names.iter_mut().find(|n| n.name == name) {
            let family = if ipv6 { &mut entry.v6 } else { &mut entry.v4 };
            family.failures = family.failures.saturating_add(1);
            let delay = RETRY_MIN.saturating_mul(1 << family.failures.min(6).saturating_sub(1));
            family.next_query = now + delay.min(RETRY_MAX);
        }
    }

    /// The earliest time [`Resolver::poll`] has work to do.
    pub fn poll_at(&self) -> Option<Millis> {
        let queries = self.queries.iter().map(|q| q.sent + QUERY_TIMEOUT);
        let names = self.names.iter().flat_map(|n| {
            let v6 = self.want_ipv6.then_some(n.v6.next_query);
            core::iter::once(n.v4.next_query).chain(v6)
        });
        if self.servers.is_empty() {
            return None;
        }
        queries.chain(names).min()
    }

    /// Takes a UDP payload that came from `server` port 53 to our port.
    /// Returns whether the cache changed.
    pub fn handle_response(
        &mut self,
        server: Ipv4Addr,
        message: &[u8],
        now: Millis,
    ) -> Result<bool, DnsError> {
        let [id0, id1, flags0, flags1, qd0, qd1, an0, an1, ..] =
            *message.first_chunk::<12>().ok_or(DnsError::Malformed)?;
        let id = u16::from_be_bytes([id0, id1]);
        let flags = u16::from_be_bytes([flags0, flags1]);
        let questions = u16::from_be_bytes([qd0, qd1]);
        let answers = u16::from_be_bytes([an0, an1]);
        let index = self
            .queries
            .iter()
            .position(|q| q.id == id && q.server == server)
            .ok_or(DnsError::Unexpected)?;
        let query = self
            .queries
            .get(index)
            .cloned()
            .ok_or(DnsError::Unexpected)?;
        if flags & 0x8000 == 0 || questions != 1 {
            return Err(DnsError::WrongQuestion);
        }
        // The question must be ours, uncompressed.
        let (qname_end, matches) = question_matches(message, 12, &query.name)?;
        let qtype_class = message
            .get(qname_end..qname_end + 4)
            .ok_or(DnsError::Malformed)?;
        let wanted_type = if query.ipv6 { TYPE_AAAA } else { TYPE_A };
        if !matches || qtype_class != [(wanted_type >> 8) as u8, wanted_type as u8, 0, 1] {
            return Err(DnsError::WrongQuestion);
        }
        let mut at = qname_end + 4;
        let mut addresses = Vec::new();
        let mut ttl_min: Option<u32> = None;
        for _ in 0..answers.min(64) {
            at = skip_name(message, at)?;
            let [t0, t1, c0, c1, ttl0, ttl1, ttl2, ttl3, l0, l1] = *message
                .get(at..)
                .and_then(<[u8]>::first_chunk::<10>)
                .ok_or(DnsError::Malformed)?;
            let rtype = u16::from_be_bytes([t0, t1]);
            let class = u16::from_be_bytes([c0, c1]);
            let ttl = u32::from_be_bytes([ttl0, ttl1, ttl2, ttl3]);
            let length = usize::from(u16::from_be_bytes([l0, l1]));
            let data = message
                .get(at + 10..at + 10 + length)
                .ok_or(DnsError::Malformed)?;
            at += 10 + length;
            if class != 1 || rtype != wanted_type || addresses.len() >= MAX_ADDRESSES {
                continue;
            }
            // An A record is exactly 4 bytes, AAAA exactly 16; others skipped.
            let address = if rtype == TYPE_A {
                match <[u8; 4]>::try_from(data) {
                    Ok(raw) => IpAddr::V4(Ipv4Addr::from(raw)),
                    Err(_) => continue,
                }
            } else {
                match <[u8; 16]>::try_from(data) {
                    Ok(raw) => IpAddr::V6(Ipv6Addr::from(raw)),
                    Err(_) => continue,
                }
            };
            if !addresses.contains(&address) {
                addresses.push(address);
            }
            ttl_min = Some(ttl_min.map_or(ttl, |t| t.min(ttl)));
        }
        self.queries.swap_remove(index);
        let rcode = flags & 0x000f;
        if rcode != 0 || addresses.is_empty() {
            self.fail(&query.name, query.ipv6, now);
            return Ok(false);
        }
        let ttl = (Millis::from(ttl_min.unwrap_or(0)) * 1000).clamp(MIN_TTL, MAX_TTL);
        let Some(entry) = self.names.iter_mut().find(|n| n.name == query.name) else {
            return Ok(false);
        };
        let family = if query.ipv6 {
            &mut entry.v6
        } else {
            &mut entry.v4
        };
        let changed = family.addresses != addresses || !family.resolved_once;
        family.addresses = addresses;
        family.expires = now + ttl;
        family.next_query = now + ttl * 3 / 4;
        family.resolved_once = true;
        family.failures = 0;
        Ok(changed)
    }
}

impl NameLookup for Resolver {
    fn lookup(&self, name: &str, ipv6: bool) -> NameState<'_> {
        match self.names.iter().find(|n| n.name == name) {
            Some(entry) => {
                let family = if ipv6 { &entry.v6 } else { &entry.v4 };
                if family.resolved_once && !family.addresses.is_empty() {
                    NameState::Resolved(&family.addresses)
                } else {
                    NameState::Unresolved
                }
            }
            None => NameState::Unresolved,
        }
    }
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// A standard query (RD set) for `name`, type A or AAAA.
pub fn build_query(id: u16, name: &str, ipv6: bool) -> Vec<u8> {
    let mut message = Vec::with_capacity(18 + name.len());
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        message.push(label.len().min(63) as u8);
        message.extend_from_slice(label.as_bytes().get(..label.len().min(63)).unwrap_or(&[]));
    }
    message.push(0);
    let qtype = if ipv6 { TYPE_AAAA } else { TYPE_A };
    message.extend_from_slice(&qtype.to_be_bytes());
    message.extend_from_slice(&[0, 1]);
    message
}

/// Compares the uncompressed name at `at` with `name` (ASCII case
/// insensitive); returns where the name ends and whether it matched.
fn question_matches(message: &[u8], mut at: usize, name: &str) -> Result<(usize, bool), DnsError> {
    let mut labels = name.split('.').filter(|l| !l.is_empty());
    let mut matches = true;
    for _ in 0..128 {
        let length = usize::from(*message.get(at).ok_or(DnsError::Malformed)?);
        if length == 0 {
            return Ok((at + 1, matches && labels.next().is_none()));
        }
        if length > 63 {
            return Err(DnsError::WrongQuestion);
        }
        let label = message
            .get(at + 1..at + 1 + length)
            .ok_or(DnsError::Malformed)?;
        matches &= labels
            .next()
            .is_some_and(|ours| ours.as_bytes().eq_ignore_ascii_case(label));
        at += 1 + length;
    }
    Err(DnsError::Malformed)
}

/// Skips a (possibly compressed) name; a pointer ends it.
fn skip_name(message: &[u8], mut at: usize) -> Result<usize, DnsError> {
    for _ in 0..128 {
        let length = *message.get(at).ok_or(DnsError::Malformed)?;
        match length {
            0 => return Ok(at + 1),
            0xc0..=0xff => {
                message.get(at + 1).ok_or(DnsError::Malformed)?;
                return Ok(at + 2);
            }
            64..=0xbf => return Err(DnsError::Malformed),
            _ => at += 1 + usize::from(length),
        }
    }
    Err(DnsError::Malformed)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes messages it built itself.
mod tests {
    use super::*;
    use alloc::vec;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 139, 1, 1);
    const SERVER2: Ipv4Addr = Ipv4Addr::new(10, 139, 1, 2);

    /// An answer to `query` with the given records (compressed owner names).
    pub(crate) fn answer(query: &[u8], rcode: u8, records: &[(u16, &[u8], u32)]) -> Vec<u8> {
        let mut m = query.to_vec();
        m[2] = 0x81;
        m[3] = 0x80 | rcode;
        m[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (rtype, data, ttl) in records {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&rtype.to_be_bytes());
            m.extend_from_slice(&[0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(data.len() as u16).to_be_bytes());
            m.extend_from_slice(data);
        }
        m
    }

    fn sent(r: &mut Resolver, now: Millis) -> Vec<(Ipv4Addr, Vec<u8>)> {
        let mut out = Vec::new();
        r.poll(now, &mut |server, m| out.push((server, m.to_vec())));
        out
    }

    #[test]
    fn resolves_caches_and_refreshes() {
        let mut r = Resolver::new(vec![SERVER], 8, false, 42);
        r.set_wanted(["example.com"], 0);
        assert_eq!(r.lookup("example.com", false), NameState::Unresolved);
        let q = sent(&mut r, 0);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].0, SERVER);
        let reply = answer(
            &q[0].1,
            0,
            &[
                (5, &[3, b'f', b'o', b'o', 0], 300),
                (TYPE_A, &[93, 184, 216, 34], 300),
            ],
        );
        assert_eq!(r.handle_response(SERVER, &reply, 10), Ok(true));
        assert_eq!(
            r.lookup("example.com", false),
            NameState::Resolved(&[IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34))])
        );
        assert!(sent(&mut r, 1000).is_empty(), "cached");
        let refresh = sent(&mut r, 10 + 225_000);
        assert_eq!(refresh.len(), 1, "refreshed at 3/4 of the TTL");
        // The refresh fails: the old addresses stay.
        let nx = answer(&refresh[0].1, 3, &[]);
        assert_eq!(r.handle_response(SERVER, &nx, 225_100), Ok(false));
        assert!(matches!(
            r.lookup("example.com", false),
            NameState::Resolved(_)
        ));
    }

    #[test]
    fn spoofed_or_wrong_answers_are_refused() {
        let mut r = Resolver::new(vec![SERVER], 8, false, 1);
        r.set_wanted(["example.com"], 0);
        let q = sent(&mut r, 0);
        let good = answer(&q[0].1, 0, &[(TYPE_A, &[1, 2, 3, 4], 60)]);
        assert_eq!(
            r.handle_response(SERVER2, &good, 1),
            Err(DnsError::Unexpected)
        );
        let mut wrong_id = good.clone();
        wrong_id[0] ^= 0xff;
        assert_eq!(
            r.handle_response(SERVER, &wrong_id, 1),
            Err(DnsError::Unexpected)
        );
        let other = build_query(
            u16::from_be_bytes([q[0].1[0], q[0].1[1]]),
            "evil.com",
            false,
        );
        let other = answer(&other, 0, &[(TYPE_A, &[6, 6, 6, 6], 60)]);
        assert_eq!(
            r.handle_response(SERVER, &other, 1),
            Err(DnsError::WrongQuestion)
        );
        assert_eq!(
            r.handle_response(SERVER, &good[..good.len() - 2], 1),
            Err(DnsError::Malformed)
        );
        assert_eq!(r.handle_response(SERVER, &[], 1), Err(DnsError::Malformed));
        assert_eq!(r.lookup("example.com", false), NameState::Unresolved);
        assert_eq!(r.handle_response(SERVER, &good, 1), Ok(true));
    }

    #[test]
    fn address_records_of_the_wrong_length_are_skipped() {
        let mut r = Resolver::new(vec![SERVER], 8, true, 7);
        r.set_wanted(["example.com"], 0);
        let q = sent(&mut r, 0);
        let (v4, v6) = if q[0].1.ends_with(&[0, 1, 0, 1]) {
            (&q[0].1, &q[1].1)
        } else {
            (&q[1].1, &q[0].1)
        };
        let short_a = answer(
            v4,
            0,
            &[(TYPE_A, &[1, 2, 3], 60), (TYPE_A, &[1, 2, 3, 4, 5], 60)],
        );
        assert_eq!(r.handle_response(SERVER, &short_a, 1), Ok(false));
        assert_eq!(r.lookup("example.com", false), NameState::Unresolved);
        let aaaa = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mixed = answer(
            v6,
            0,
            &[(TYPE_AAAA, &aaaa[..15], 60), (TYPE_AAAA, &aaaa, 60)],
        );
        assert_eq!(r.handle_response(SERVER, &mixed, 1), Ok(true));
        assert_eq!(
            r.lookup("example.com", true),
            NameState::Resolved(&[IpAddr::V6(Ipv6Addr::from(aaaa))])
        );
    }

    #[test]
    fn timeouts_retry_other_server_then_back_off() {
        let mut r = Resolver::new(vec![SERVER, SERVER2], 8, true, 5);
        r.set_wanted(["example.com"], 0);
        assert_eq!(sent(&mut r, 0).len(), 2, "A and AAAA");
        let retry = sent(&mut r, QUERY_TIMEOUT);
        assert_eq!(retry.len(), 2);
        assert!(retry.iter().all(|(s, _)| *s == SERVER2));
        assert_eq!(sent(&mut r, 2 * QUERY_TIMEOUT).len(), 2);
        assert!(sent(&mut r, 3 * QUERY_TIMEOUT).is_empty(), "gave up");
        assert_eq!(r.lookup("example.com", true), NameState::Unresolved);
        assert_eq!(
            sent(&mut r, 3 * QUERY_TIMEOUT + RETRY_MIN).len(),
            2,
            "retried after back-off"
        );
    }

    #[test]
    fn cache_is_bounded_and_follows_wanted() {
        let mut r = Resolver::new(vec![SERVER], 2, false, 5);
        r.set_wanted(["a.com", "b.com", "c.com"], 0);
        assert_eq!(r.len(), 2);
        assert_eq!(r.refused_names(), 1);
        r.set_wanted(["c.com"], 0);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn hostile_names_do_not_loop_or_panic() {
        let mut m = vec![0u8; 12];
        m.extend_from_slice(&[0xc0, 12]);
        assert!(skip_name(&m, 12).is_ok());
        assert_eq!(skip_name(&[0x80], 0), Err(DnsError::Malformed));
        assert_eq!(skip_name(&[5, 1], 0), Err(DnsError::Malformed));
        let long = vec![1u8; 600];
        assert_eq!(skip_name(&long, 0), Err(DnsError::Malformed));
    }
}
