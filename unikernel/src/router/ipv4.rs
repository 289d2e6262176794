//! IPv4 header options, as a Linux router forwarding them
//! (`ip_options_compile`, `ip_rcv_options`, `ip_forward_options`):
//! - options are checked before anything else is decided: a malformed one
//!   (bad length or pointer, an unknown timestamp flag, a full timestamp
//!   whose overflow counter is spent, two source routes, a CIPSO label we
//!   have no domain for) drops the packet with an ICMP parameter problem
//!   pointing at the bad byte;
//! - a source route (loose or strict) is dropped silently: Qubes' templates
//!   run with `accept_source_route = 0` (systemd's default sysctl);
//! - record route and timestamp options of a packet we forward get our
//!   address (and the time in milliseconds since midnight UTC) where their
//!   pointer says, as Linux's `ip_forward_options` does; unknown options
//!   are forwarded untouched.
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing)]

use core::net::Ipv4Addr;

use crate::wire::checksum;

/// IPv4 option: end of list.
const END: u8 = 0;
/// No operation.
const NOP: u8 = 1;
/// Record route.
const RECORD_ROUTE: u8 = 7;
/// Timestamp.
const TIMESTAMP: u8 = 68;
/// Loose source route.
const LOOSE_SOURCE_ROUTE: u8 = 131;
/// Strict source route.
const STRICT_SOURCE_ROUTE: u8 = 137;
/// Commercial IP security option (CIPSO).
const CIPSO: u8 = 134;
/// Router alert.
const ROUTER_ALERT: u8 = 148;

/// What the options of a packet say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Options {
    /// Nothing for a router to do, or options to fill in on forwarding.
    Forward,
    /// A source route: dropped silently.
    SourceRoute,
    /// Malformed: parameter problem, pointing at this byte of the header.
    Bad(u8),
}

/// One option of a header: where it starts, its kind and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Opt {
    at: usize,
    kind: u8,
    length: usize,
}

/// The one walk over a header's options, for [`check`] and [`record`]
/// alike: NOPs skipped, the list ends at END or the header's end; an
/// option whose length byte is missing, below 2 or past the header ends
/// the walk with the byte to point a parameter problem at. A cursor, not
/// a borrowing iterator, so [`record`] can write between steps.
#[derive(Clone, Copy, Debug)]
struct Walk {
    at: usize,
    done: bool,
}

impl Walk {
    fn new() -> Walk {
        Walk {
            at: 20,
            done: false,
        }
    }

    fn next(&mut self, header: &[u8]) -> Option<Result<Opt, usize>> {
        if self.done {
            return None;
        }
        loop {
            let at = self.at;
            match header.get(at) {
                None | Some(&END) => {
                    self.done = true;
                    return None;
                }
                Some(&NOP) => self.at += 1,
                Some(&kind) => {
                    let Some(&length) = header.get(at + 1) else {
                        self.done = true;
                        return Some(Err(at));
                    };
                    let length = usize::from(length);
                    if length < 2 || at + length > header.len() {
                        self.done = true;
                        return Some(Err(at + 1));
                    }
                    self.at += length;
                    return Some(Ok(Opt { at, kind, length }));
                }
            }
        }
    }
}

/// Checks the options of the IPv4 header `header` (its full length, fixed
/// part included).
pub(super) fn check(header: &[u8]) -> Options {
    let mut walk = Walk::new();
    let mut source_route = false;
    while let Some(item) = walk.next(header) {
        let Opt { at, kind, length } = match item {
            Ok(opt) => opt,
            Err(bad) => return Options::Bad(bad as u8),
        };
        let pointer = usize::from(header.get(at + 2).copied().unwrap_or(0));
        let bad = match kind {
            LOOSE_SOURCE_ROUTE | STRICT_SOURCE_ROUTE => {
                if length < 3 {
                    Some(at + 1)
                } else if pointer < 4 {
                    Some(at + 2)
                } else if source_route {
                    Some(at)
                } else {
                    source_route = true;
                    None
                }
            }
            RECORD_ROUTE => {
                if length < 3 {
                    Some(at + 1)
                } else if pointer < 4 || (pointer <= length && pointer + 3 > length) {
                    // Before the data, or room for less than an address.
                    Some(at + 2)
                } else {
                    None
                }
            }
            TIMESTAMP => {
                let flags = header.get(at + 3).copied().unwrap_or(0);
                if length < 4 {
                    Some(at + 1)
                } else if pointer < 5 {
                    Some(at + 2)
                } else if pointer <= length {
                    match flags & 0x0f {
                        0 if pointer + 3 > length => Some(at + 2),
                        1 | 3 if pointer + 7 > length => Some(at + 2),
                        0 | 1 | 3 => None,
                        _ => Some(at + 3),
                    }
                } else if flags >> 4 == 15 {
                    // Full, and its overflow counter is spent.
                    Some(at + 3)
                } else {
                    None
                }
            }
            // No CIPSO domain is configured: Linux refuses every label.
            CIPSO => Some(at),
            ROUTER_ALERT if length < 4 => Some(at + 1),
            _ => None,
        };
        if let Some(bad) = bad {
            return Options::Bad(bad as u8);
        }
    }
    if source_route {
        Options::SourceRoute
    } else {
        Options::Forward
    }
}

/// Fills in the record route and timestamp options of a packet we forward
/// (`packet`: the IP packet, header checksum valid): our address `ours`,
/// the time `ms_since_midnight` (RFC 791: with the top bit set when it is
/// not that). Keeps the header checksum valid.
pub(super) fn record(packet: &mut [u8], ours: Ipv4Addr, ms_since_midnight: u32) {
    let header_len = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
    let Some(header) = packet.get_mut(..header_len) else {
        return;
    };
    let mut walk = Walk::new();
    let mut changed = false;
    // `check` refused malformed lists before we get here.
    while let Some(Ok(Opt { at, kind, length })) = walk.next(header) {
        let pointer = usize::from(header.get(at + 2).copied().unwrap_or(0));
        match kind {
            RECORD_ROUTE if pointer >= 4 && pointer + 3 <= length => {
                if let Some(slot) = header.get_mut(at + pointer - 1..at + pointer + 3) {
                    slot.copy_from_slice(&ours.octets());
                    changed = true;
                }
                if let Some(p) = header.get_mut(at + 2) {
                    *p += 4;
                }
            }
            TIMESTAMP if pointer >= 5 => {
                let flags = header.get(at + 3).copied().unwrap_or(0);
                let time = ms_since_midnight.to_be_bytes();
                let start = at + pointer - 1;
                let step = match flags & 0x0f {
                    0 if pointer + 3 <= length => {
                        if let Some(slot) = header.get_mut(start..start + 4) {
                            slot.copy_from_slice(&time);
                        }
                        4
                    }
                    1 if pointer + 7 <= length => {
                        if let Some(slot) = header.get_mut(start..start + 8) {
                            let (address, stamp) = slot.split_at_mut(4);
                            address.copy_from_slice(&ours.octets());
                            stamp.copy_from_slice(&time);
                        }
                        8
                    }
                    // Prespecified: only where the next address is ours.
                    3 if pointer + 7 <= length => {
                        let next = header.get(start..start + 4);
                        if next == Some(&ours.octets()[..]) {
                            if let Some(slot) = header.get_mut(start + 4..start + 8) {
                                slot.copy_from_slice(&time);
                            }
                            8
                        } else {
                            0
                        }
                    }
                    _ if pointer > length => {
                        // Full: count the overflow (check() refused 15).
                        if let Some(f) = header.get_mut(at + 3) {
                            *f = f.saturating_add(0x10);
                        }
                        changed = true;
                        0
                    }
                    _ => 0,
                };
                if step > 0 {
                    if let Some(p) = header.get_mut(at + 2) {
                        *p += step;
                    }
                    changed = true;
                }
            }
            _ => {}
        }
    }
    if changed {
        if let Some(field) = header.get_mut(10..12) {
            field.copy_from_slice(&[0, 0]);
        }
        let sum = checksum::finish(checksum::add(0, header));
        if let Some(field) = header.get_mut(10..12) {
            field.copy_from_slice(&sum.to_be_bytes());
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes headers it built itself.
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn header(options: &[u8]) -> Vec<u8> {
        let mut h = alloc::vec![0u8; 20];
        h.extend_from_slice(options);
        while !h.len().is_multiple_of(4) {
            h.push(0);
        }
        h[0] = 0x40 | (h.len() / 4) as u8;
        let sum = checksum::finish(checksum::add(0, &h));
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h
    }

    #[test]
    fn options_are_checked_like_ip_options_compile() {
        assert_eq!(check(&header(&[])), Options::Forward);
        assert_eq!(check(&header(&[1, 1, 0, 7])), Options::Forward);
        assert_eq!(check(&header(&[7, 7, 4, 0, 0, 0, 0])), Options::Forward);
        assert_eq!(
            check(&header(&[7, 7, 8, 1, 2, 3, 4])),
            Options::Forward,
            "full"
        );
        assert_eq!(check(&header(&[7, 7, 3, 0, 0, 0, 0])), Options::Bad(22));
        assert_eq!(
            check(&header(&[7, 6, 4, 0, 0, 0])),
            Options::Bad(22),
            "no room"
        );
        assert_eq!(check(&header(&[7, 2])), Options::Bad(21));
        assert_eq!(check(&header(&[7, 1])), Options::Bad(21));
        assert_eq!(
            check(&header(&[7, 40])),
            Options::Bad(21),
            "past the header"
        );
        assert_eq!(check(&header(&[68, 8, 5, 0, 0, 0, 0, 0])), Options::Forward);
        assert_eq!(check(&header(&[68, 8, 5, 1, 0, 0, 0, 0])), Options::Bad(22));
        assert_eq!(check(&header(&[68, 8, 5, 2, 0, 0, 0, 0])), Options::Bad(23));
        assert_eq!(
            check(&header(&[68, 8, 9, 0xf0, 0, 0, 0, 0])),
            Options::Bad(23)
        );
        assert_eq!(
            check(&header(&[68, 8, 9, 0xe0, 0, 0, 0, 0])),
            Options::Forward
        );
        assert_eq!(
            check(&header(&[131, 7, 4, 1, 2, 3, 4])),
            Options::SourceRoute
        );
        assert_eq!(
            check(&header(&[131, 7, 4, 1, 2, 3, 4, 137, 7, 4, 1, 2, 3, 4])),
            Options::Bad(27),
            "two source routes"
        );
        assert_eq!(check(&header(&[134, 6, 0, 0, 0, 1])), Options::Bad(20));
        assert_eq!(check(&header(&[148, 4, 0, 0])), Options::Forward);
        assert_eq!(
            check(&header(&[0, 7, 3])),
            Options::Forward,
            "after the end"
        );
        // Every truncation is handled.
        let h = header(&[7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
        for len in 0..h.len() {
            let _ = check(&h[..len]);
        }
    }

    #[test]
    fn forwarding_fills_in_record_route_and_timestamps() {
        let ours = Ipv4Addr::new(10, 137, 0, 2);
        let mut h = header(&[7, 11, 8, 1, 2, 3, 4, 0, 0, 0, 0, 68, 8, 5, 0, 0, 0, 0, 0]);
        record(&mut h, ours, 0x0102_0304);
        assert_eq!(&h[20..31], &[7, 11, 12, 1, 2, 3, 4, 10, 137, 0, 2]);
        assert_eq!(&h[31..39], &[68, 8, 9, 0, 1, 2, 3, 4]);
        assert_eq!(checksum::fold(checksum::add(0, &h)), 0xffff);
        // Full: the timestamp's overflow counts, record route stays.
        let mut h = header(&[7, 7, 8, 1, 2, 3, 4, 68, 8, 9, 0x20, 9, 9, 9, 9]);
        record(&mut h, ours, 5);
        assert_eq!(&h[20..27], &[7, 7, 8, 1, 2, 3, 4]);
        assert_eq!(h[30], 0x30);
        assert_eq!(checksum::fold(checksum::add(0, &h)), 0xffff);
        // Prespecified: stamped only where the address is ours.
        let mut h = header(&[
            68, 20, 5, 3, 1, 1, 1, 1, 0, 0, 0, 0, 10, 137, 0, 2, 0, 0, 0, 0,
        ]);
        record(&mut h, ours, 7);
        assert_eq!(h[22], 5, "not ours: the pointer stays");
        h[24..28].copy_from_slice(&ours.octets());
        record(&mut h, ours, 7);
        assert_eq!((h[22], h[31]), (13, 7));
    }
}
