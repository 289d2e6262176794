//! vchan conventions: where a vchan lives (UNIX socket name, XenStore
//! path) and the libxenvchan shared page (layout, ring placement, checked
//! ring index arithmetic).
//!
//! vchan is the byte stream under qrexec and QubesDB. Hosted, it is a UNIX
//! socket named after the two domains and the port; on Xen, it is a pair of
//! rings on pages the server grants to the client. This module holds only
//! names, byte offsets and pure functions over values already copied out of
//! the page: it must never touch shared memory itself (the platform layer
//! reads each peer-written index once, volatile, and hands the copy here)
//! and must never accept an order, grant count or index a hostile peer could
//! use to make us read or write outside the rings.
//!
//! Facts and where they come from:
//! - Socket path `$VCHAN_SOCKET_DIR/vchan.<server>.<client>.<port>.sock`
//!   (default directory `/var/run/vchan`, own domain id from `VCHAN_DOMAIN`,
//!   numbers printed with `%d`): qubes-core-vchan-socket `vchan/init.c`.
//! - XenStore directory `/local/domain/<server>/data/vchan/<client>/<port>`
//!   holding `ring-ref` and `event-channel`: qubes-core-vchan-xen
//!   (`data/vchan/%d/%d` relative to the server) and Xen
//!   `tools/libs/vchan/init.c` (`init_xs_srv`).
//! - `struct vchan_interface { struct ring_shared left, right; uint16_t
//!   left_order, right_order; uint8_t cli_live, srv_live, cli_notify,
//!   srv_notify; uint32_t grants[]; }` with `ring_shared { uint32_t cons,
//!   prod; }`, `VCHAN_NOTIFY_WRITE` = 1, `VCHAN_NOTIFY_READ` = 2, the live
//!   values 0/1/2, "left is client write, server read; right is client read,
//!   server write": Xen `xen/include/public/io/libxenvchan.h`. (There is no
//!   `debug` field; the two bytes after the live flags are the notify bits.)
//! - Orders 10 and 11 put the ring inside the shared page at 1024 and 2048;
//!   order ≥ 12 uses 2^(order-12) granted pages listed in `grants[]`, left
//!   ring first; orders run 10..=20 (`MAX_RING_SHIFT`); the client rejects
//!   two equal in-page orders; the server's order choice and initial flag
//!   values; the page offsets mapped with unmap-notify (`srv_live` by the
//!   server, `cli_live` by the client): Xen `tools/libs/vchan/init.c`.
//! - Index rules (`prod - cons` must not exceed the ring size, positions are
//!   `index & (size - 1)`, writes wrap across the ring end, which side sets
//!   and which side tests each notify byte): Xen `tools/libs/vchan/io.c`.

use core::fmt;
use core::ops::Range;

/// Directory used when `VCHAN_SOCKET_DIR` is not set.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/vchan";
/// Environment variable naming the socket directory.
pub const SOCKET_DIR_ENV: &str = "VCHAN_SOCKET_DIR";
/// Environment variable holding the process's own domain id (0 if unset).
pub const DOMAIN_ENV: &str = "VCHAN_DOMAIN";
/// XenStore key under the vchan directory holding the shared page's grant.
pub const RING_REF_KEY: &str = "ring-ref";
/// XenStore key under the vchan directory holding the event channel port.
pub const EVENT_CHANNEL_KEY: &str = "event-channel";

/// Everything that can be wrong with a vchan name or shared page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A socket file name does not have the form `vchan.S.C.P.sock`.
    BadSocketName,
    /// A ring order outside 10..=20 (`left` says which ring).
    BadOrder { left: bool, order: u16 },
    /// Both rings would sit at the same offset inside the shared page.
    SameInPageOrder { order: u16 },
    /// The grant list would run into an in-page ring or off the page.
    GrantsOverlap { grants_end: usize, limit: usize },
    /// A requested ring size above 2^20 bytes.
    RingTooLarge { requested: usize },
    /// Peer-written ring indices are inconsistent: the producer is more than
    /// the ring size ahead of the consumer.
    RingIndex { cons: u32, prod: u32, size: u32 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::BadSocketName => write!(
                f,
                "not a vchan socket name: expected vchan.<server>.<client>.<port>.sock"
            ),
            Error::BadOrder { left, order } => write!(
                f,
                "vchan {} ring order {order} outside {MIN_RING_ORDER}..={MAX_RING_ORDER}: the server's shared page is corrupt, refuse the connection",
                if left { "left" } else { "right" }
            ),
            Error::SameInPageOrder { order } => write!(
                f,
                "vchan rings both use in-page order {order} and would overlap: refuse the connection"
            ),
            Error::GrantsOverlap { grants_end, limit } => write!(
                f,
                "vchan grant list ends at byte {grants_end}, past {limit} where a ring or the page ends: refuse the connection"
            ),
            Error::RingTooLarge { requested } => write!(
                f,
                "vchan ring of {requested} bytes requested; the maximum is {MAX_RING_SIZE}"
            ),
            Error::RingIndex { cons, prod, size } => write!(
                f,
                "vchan ring indices inconsistent (cons {cons}, prod {prod}, size {size}): the peer corrupted the ring, close the vchan"
            ),
        }
    }
}

/// The three numbers that name a vchan: server domain, client domain, port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VchanName {
    pub server: u16,
    pub client: u16,
    pub port: u32,
}

impl VchanName {
    /// Writes the socket file name `vchan.<server>.<client>.<port>.sock`.
    pub fn write_socket_name(&self, out: &mut impl fmt::Write) -> fmt::Result {
        write!(
            out,
            "vchan.{}.{}.{}.sock",
            self.server, self.client, self.port
        )
    }

    /// Writes the socket path `<dir>/vchan.<server>.<client>.<port>.sock`
    /// (`dir` is `$VCHAN_SOCKET_DIR` or [`DEFAULT_SOCKET_DIR`]).
    pub fn write_socket_path(&self, dir: &str, out: &mut impl fmt::Write) -> fmt::Result {
        out.write_str(dir)?;
        out.write_char('/')?;
        self.write_socket_name(out)
    }

    /// Writes the XenStore directory the server publishes `ring-ref` and
    /// `event-channel` in: `/local/domain/<server>/data/vchan/<client>/<port>`.
    pub fn write_xenstore_dir(&self, out: &mut impl fmt::Write) -> fmt::Result {
        write!(
            out,
            "/local/domain/{}/data/vchan/{}/{}",
            self.server, self.client, self.port
        )
    }

    /// Parses a socket file name (the last path component).
    pub fn parse_socket_name(name: &str) -> Result<Self, Error> {
        let inner = name
            .strip_prefix("vchan.")
            .and_then(|rest| rest.strip_suffix(".sock"))
            .ok_or(Error::BadSocketName)?;
        let mut parts = inner.split('.');
        let server = parse_number(parts.next(), u64::from(u16::MAX))?;
        let client = parse_number(parts.next(), u64::from(u16::MAX))?;
        let port = parse_number(parts.next(), u64::from(u32::MAX))?;
        if parts.next().is_some() {
            return Err(Error::BadSocketName);
        }
        Ok(VchanName {
            server: server as u16,
            client: client as u16,
            port: port as u32,
        })
    }

    /// Parses a socket path: the part after the last `/` is the name.
    pub fn parse_socket_path(path: &str) -> Result<Self, Error> {
        let name = path.rsplit('/').next().unwrap_or(path);
        Self::parse_socket_name(name)
    }
}

impl fmt::Display for VchanName {
    /// The socket file name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_socket_name(f)
    }
}

/// Canonical unsigned decimal (no sign, no leading zero unless `0`) up to
/// `max`, as `%d` prints a non-negative number.
fn parse_number(text: Option<&str>, max: u64) -> Result<u64, Error> {
    let text = text.ok_or(Error::BadSocketName)?;
    if text.is_empty() || text.len() > 10 || (text.len() > 1 && text.starts_with('0')) {
        return Err(Error::BadSocketName);
    }
    let mut value: u64 = 0;
    for byte in text.bytes() {
        if !byte.is_ascii_digit() {
            return Err(Error::BadSocketName);
        }
        value = value * 10 + u64::from(byte - b'0');
    }
    if value > max {
        return Err(Error::BadSocketName);
    }
    Ok(value)
}

/// A `fmt::Write` into a caller's byte buffer, for building socket and
/// XenStore paths without allocation.
#[derive(Debug)]
pub struct BufWriter<'b> {
    buffer: &'b mut [u8],
    len: usize,
}

impl<'b> BufWriter<'b> {
    /// Writes into `buffer` from its start.
    pub fn new(buffer: &'b mut [u8]) -> Self {
        BufWriter { buffer, len: 0 }
    }

    /// The text written so far.
    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are ever copied in, so this cannot fail.
        core::str::from_utf8(self.buffer.get(..self.len).unwrap_or(&[])).unwrap_or("")
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Write for BufWriter<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let end = self.len.checked_add(text.len()).ok_or(fmt::Error)?;
        self.buffer
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Size of a Xen page, and of the shared control page.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`]; orders from here on use granted pages.
pub const PAGE_ORDER: u16 = 12;
/// `SMALL_RING_SHIFT`: an order-10 ring sits in the shared page.
pub const SMALL_RING_ORDER: u16 = 10;
/// `LARGE_RING_SHIFT`: an order-11 ring sits in the shared page.
pub const LARGE_RING_ORDER: u16 = 11;
/// `SMALL_RING_OFFSET`: where an order-10 ring starts in the shared page.
pub const SMALL_RING_OFFSET: usize = 1024;
/// `LARGE_RING_OFFSET`: where an order-11 ring starts in the shared page.
pub const LARGE_RING_OFFSET: usize = 2048;
/// Smallest ring order.
pub const MIN_RING_ORDER: u16 = SMALL_RING_ORDER;
/// `MAX_RING_SHIFT`: largest ring order.
pub const MAX_RING_ORDER: u16 = 20;
/// `MAX_RING_SIZE`: largest ring, in bytes.
pub const MAX_RING_SIZE: usize = 1 << MAX_RING_ORDER;

/// `VCHAN_NOTIFY_WRITE`: notify me when data is written.
pub const VCHAN_NOTIFY_WRITE: u8 = 0x1;
/// `VCHAN_NOTIFY_READ`: notify me when data is read (space freed).
pub const VCHAN_NOTIFY_READ: u8 = 0x2;

/// Byte offsets of `struct vchan_interface` in the shared page.
pub mod field {
    /// `left.cons`: the server's consumer index of the client→server ring.
    pub const LEFT_CONS: usize = 0;
    /// `left.prod`: the client's producer index of the client→server ring.
    pub const LEFT_PROD: usize = 4;
    /// `right.cons`: the client's consumer index of the server→client ring.
    pub const RIGHT_CONS: usize = 8;
    /// `right.prod`: the server's producer index of the server→client ring.
    pub const RIGHT_PROD: usize = 12;
    /// `uint16_t left_order`.
    pub const LEFT_ORDER: usize = 16;
    /// `uint16_t right_order`.
    pub const RIGHT_ORDER: usize = 18;
    /// `uint8_t cli_live` (the client's unmap-notify byte).
    pub const CLI_LIVE: usize = 20;
    /// `uint8_t srv_live` (the server's unmap-notify byte).
    pub const SRV_LIVE: usize = 21;
    /// `uint8_t cli_notify`: bits the client tests before notifying.
    pub const CLI_NOTIFY: usize = 22;
    /// `uint8_t srv_notify`: bits the server tests before notifying.
    pub const SRV_NOTIFY: usize = 23;
    /// `uint32_t grants[]`: left ring's grants, then the right ring's.
    pub const GRANTS: usize = 24;
}

/// Offset of `grants[index]` in the shared page.
pub const fn grant_offset(index: usize) -> usize {
    field::GRANTS + 4 * index
}

/// A `cli_live`/`srv_live` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// 0: the side has exited (or unmapped the page).
    Exited,
    /// 1: the side is connected.
    Connected,
    /// 2: the client has not yet connected (set by the server).
    NotYetConnected,
    /// Anything else a peer wrote.
    Unknown(u8),
}

impl From<u8> for Liveness {
    fn from(raw: u8) -> Self {
        match raw {
            0 => Liveness::Exited,
            1 => Liveness::Connected,
            2 => Liveness::NotYetConnected,
            other => Liveness::Unknown(other),
        }
    }
}

impl From<Liveness> for u8 {
    fn from(value: Liveness) -> Self {
        match value {
            Liveness::Exited => 0,
            Liveness::Connected => 1,
            Liveness::NotYetConnected => 2,
            Liveness::Unknown(raw) => raw,
        }
    }
}

/// Which end of the vchan we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Grants the page and publishes it in XenStore.
    Server,
    /// Maps the page the server granted.
    Client,
}

/// Offsets one end uses on the shared page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The ring we read: its `cons` we write, its `prod` the peer writes.
    pub read_cons: usize,
    pub read_prod: usize,
    /// The ring we write: its `prod` we write, its `cons` the peer writes.
    pub write_cons: usize,
    pub write_prod: usize,
    /// Our own live byte (set to 0 on close; unmap-notify target).
    pub own_live: usize,
    /// The peer's live byte: the vchan is open while it is non-zero.
    pub peer_live: usize,
    /// Where we set bits to ask the peer for a notification
    /// (`request_notify`).
    pub request_notify: usize,
    /// Where we test-and-clear bits before notifying the peer
    /// (`send_notify`).
    pub send_notify: usize,
}

impl Role {
    /// The offsets this end reads and writes.
    pub const fn endpoint(self) -> Endpoint {
        match self {
            Role::Server => Endpoint {
                read_cons: field::LEFT_CONS,
                read_prod: field::LEFT_PROD,
                write_cons: field::RIGHT_CONS,
                write_prod: field::RIGHT_PROD,
                own_live: field::SRV_LIVE,
                peer_live: field::CLI_LIVE,
                request_notify: field::CLI_NOTIFY,
                send_notify: field::SRV_NOTIFY,
            },
            Role::Client => Endpoint {
                read_cons: field::RIGHT_CONS,
                read_prod: field::RIGHT_PROD,
                write_cons: field::LEFT_CONS,
                write_prod: field::LEFT_PROD,
                own_live: field::CLI_LIVE,
                peer_live: field::SRV_LIVE,
                request_notify: field::SRV_NOTIFY,
                send_notify: field::CLI_NOTIFY,
            },
        }
    }
}

/// Values the server writes into a zeroed page before publishing it
/// (`init_gnt_srv`): `cli_live` = 2, `srv_live` = 1,
/// `cli_notify` = `VCHAN_NOTIFY_WRITE`; orders from [`RingOrders`].
pub const SERVER_INITIAL_CLI_LIVE: u8 = 2;
/// See [`SERVER_INITIAL_CLI_LIVE`].
pub const SERVER_INITIAL_SRV_LIVE: u8 = 1;
/// See [`SERVER_INITIAL_CLI_LIVE`].
pub const SERVER_INITIAL_CLI_NOTIFY: u8 = VCHAN_NOTIFY_WRITE;
/// What the client writes once it has mapped everything
/// (`libxenvchan_client_init`): `cli_live` = 1, `srv_notify` =
/// `VCHAN_NOTIFY_WRITE`, then it notifies the server.
pub const CLIENT_CONNECTED_CLI_LIVE: u8 = 1;
/// See [`CLIENT_CONNECTED_CLI_LIVE`].
pub const CLIENT_CONNECTED_SRV_NOTIFY: u8 = VCHAN_NOTIFY_WRITE;

/// Where one ring's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingPlacement {
    /// Inside the shared page, from `offset`.
    InPage { offset: usize },
    /// In `pages` separately granted pages whose grant references are
    /// `grants[first_grant..first_grant + pages]`.
    Granted { first_grant: usize, pages: usize },
}

/// One ring: its order and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    order: u16,
    placement: RingPlacement,
}

impl RingLayout {
    /// log2 of the ring size.
    pub fn order(&self) -> u16 {
        self.order
    }

    /// Ring size in bytes (2^order).
    pub fn size(&self) -> u32 {
        1 << self.order
    }

    /// Where the ring's bytes are.
    pub fn placement(&self) -> RingPlacement {
        self.placement
    }

    /// Checks a copied pair of this ring's indices.
    pub fn indices(&self, cons: u32, prod: u32) -> Result<RingIndices, Error> {
        RingIndices::new(cons, prod, self.order)
    }
}

/// The two ring orders of a shared page, validated, with each ring's
/// placement worked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingOrders {
    left: RingLayout,
    right: RingLayout,
    grant_count: usize,
}

impl RingOrders {
    /// Validates `left_order`/`right_order` as read (once) from the shared
    /// page: both in 10..=20, not both the same in-page order, and the grant
    /// list must end before any in-page ring and within the page.
    pub fn new(left_order: u16, right_order: u16) -> Result<Self, Error> {
        for (left, order) in [(true, left_order), (false, right_order)] {
            if !(MIN_RING_ORDER..=MAX_RING_ORDER).contains(&order) {
                return Err(Error::BadOrder { left, order });
            }
        }
        if left_order == right_order && left_order < PAGE_ORDER {
            return Err(Error::SameInPageOrder { order: left_order });
        }
        let pages = |order: u16| -> usize {
            if order >= PAGE_ORDER {
                1 << (order - PAGE_ORDER)
            } else {
                0
            }
        };
        let left_pages = pages(left_order);
        let right_pages = pages(right_order);
        let place = |order: u16, first_grant: usize, count: usize| match order {
            SMALL_RING_ORDER => RingPlacement::InPage {
                offset: SMALL_RING_OFFSET,
            },
            LARGE_RING_ORDER => RingPlacement::InPage {
                offset: LARGE_RING_OFFSET,
            },
            _ => RingPlacement::Granted {
                first_grant,
                pages: count,
            },
        };
        let grant_count = left_pages + right_pages;
        let grants_end = grant_offset(grant_count);
        let limit = [left_order, right_order]
            .iter()
            .filter_map(|&order| match order {
                SMALL_RING_ORDER => Some(SMALL_RING_OFFSET),
                LARGE_RING_ORDER => Some(LARGE_RING_OFFSET),
                _ => None,
            })
            .min()
            .unwrap_or(PAGE_SIZE);
        if grants_end > limit {
            return Err(Error::GrantsOverlap { grants_end, limit });
        }
        Ok(RingOrders {
            left: RingLayout {
                order: left_order,
                placement: place(left_order, 0, left_pages),
            },
            right: RingLayout {
                order: right_order,
                placement: place(right_order, left_pages, right_pages),
            },
            grant_count,
        })
    }

    /// The orders a server picks for rings of at least `left_min` (client
    /// to server) and `right_min` (server to client) bytes, preferring
    /// in-page rings as `libxenvchan_server_init` does.
    pub fn for_server(left_min: usize, right_min: usize) -> Result<Self, Error> {
        for requested in [left_min, right_min] {
            if requested > MAX_RING_SIZE {
                return Err(Error::RingTooLarge { requested });
            }
        }
        let min_order = |size: usize| -> u16 {
            let mut order = PAGE_ORDER;
            while size > (1usize << order) {
                order += 1;
            }
            order
        };
        let small = 1usize << SMALL_RING_ORDER;
        let large = 1usize << LARGE_RING_ORDER;
        let (left, right) = if left_min <= small && right_min <= large {
            (SMALL_RING_ORDER, LARGE_RING_ORDER)
        } else if left_min <= large && right_min <= small {
            (LARGE_RING_ORDER, SMALL_RING_ORDER)
        } else if left_min <= large {
            (LARGE_RING_ORDER, min_order(right_min))
        } else if right_min <= large {
            (min_order(left_min), LARGE_RING_ORDER)
        } else {
            (min_order(left_min), min_order(right_min))
        };
        RingOrders::new(left, right)
    }

    /// The client→server ring (`left`).
    pub fn left(&self) -> RingLayout {
        self.left
    }

    /// The server→client ring (`right`).
    pub fn right(&self) -> RingLayout {
        self.right
    }

    /// The ring `role` reads.
    pub fn read_ring(&self, role: Role) -> RingLayout {
        match role {
            Role::Server => self.left,
            Role::Client => self.right,
        }
    }

    /// The ring `role` writes.
    pub fn write_ring(&self, role: Role) -> RingLayout {
        match role {
            Role::Server => self.right,
            Role::Client => self.left,
        }
    }

    /// Number of entries used in `grants[]`.
    pub fn grant_count(&self) -> usize {
        self.grant_count
    }
}

/// A validated (consumer, producer) pair of one vchan ring, copied once
/// from the shared page.
///
/// Indices run freely (wrapping at 2^32); a position is `index & (size-1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIndices {
    cons: u32,
    prod: u32,
    order: u16,
}

impl RingIndices {
    /// Checks that `prod - cons` does not exceed the ring of 2^`order`
    /// bytes; `order` must be a valid ring order.
    pub fn new(cons: u32, prod: u32, order: u16) -> Result<Self, Error> {
        if !(MIN_RING_ORDER..=MAX_RING_ORDER).contains(&order) {
            return Err(Error::BadOrder { left: true, order });
        }
        let size = 1u32 << order;
        if prod.wrapping_sub(cons) > size {
            return Err(Error::RingIndex { cons, prod, size });
        }
        Ok(RingIndices { cons, prod, order })
    }

    /// The consumer index.
    pub fn cons(&self) -> u32 {
        self.cons
    }

    /// The producer index.
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Ring size in bytes.
    pub fn size(&self) -> u32 {
        1 << self.order
    }

    /// Position of a free-running index in this ring.
    pub fn mask(&self, index: u32) -> usize {
        (index & (self.size() - 1)) as usize
    }

    /// Bytes ready to read (`raw_get_data_ready`).
    pub fn available(&self) -> u32 {
        self.prod.wrapping_sub(self.cons)
    }

    /// Bytes that may be written (`raw_get_buffer_space`).
    pub fn free(&self) -> u32 {
        self.size() - self.available()
    }

    /// Where to read `count` bytes (at most [`Self::available`]): one or two
    /// ranges of the ring, the second non-empty when the data wraps.
    pub fn read_ranges(&self, count: u32) -> Result<[Range<usize>; 2], Error> {
        if count > self.available() {
            return Err(self.overrun(self.cons.wrapping_add(count), self.prod));
        }
        Ok(self.split(self.cons, count))
    }

    /// Where to write `count` bytes (at most [`Self::free`]): one or two
    /// ranges of the ring, the second non-empty when the data wraps.
    pub fn write_ranges(&self, count: u32) -> Result<[Range<usize>; 2], Error> {
        if count > self.free() {
            return Err(self.overrun(self.cons, self.prod.wrapping_add(count)));
        }
        Ok(self.split(self.prod, count))
    }

    /// The indices after we consumed `count` bytes.
    pub fn consume(&self, count: u32) -> Result<Self, Error> {
        if count > self.available() {
            return Err(self.overrun(self.cons.wrapping_add(count), self.prod));
        }
        Ok(RingIndices {
            cons: self.cons.wrapping_add(count),
            ..*self
        })
    }

    /// The indices after we produced `count` bytes.
    pub fn produce(&self, count: u32) -> Result<Self, Error> {
        if count > self.free() {
            return Err(self.overrun(self.cons, self.prod.wrapping_add(count)));
        }
        Ok(RingIndices {
            prod: self.prod.wrapping_add(count),
            ..*self
        })
    }

    fn overrun(&self, cons: u32, prod: u32) -> Error {
        Error::RingIndex {
            cons,
            prod,
            size: self.size(),
        }
    }

    /// `count` (≤ size) bytes from `index`, split at the ring's end.
    fn split(&self, index: u32, count: u32) -> [Range<usize>; 2] {
        let start = self.mask(index);
        let size = self.size() as usize;
        let first = (size - start).min(count as usize);
        let second = count as usize - first;
        [start..start + first, 0..second]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn socket_name_format_and_parse() {
        let name = VchanName {
            server: 2,
            client: 0,
            port: 512,
        };
        let mut buf = [0u8; 64];
        let mut out = BufWriter::new(&mut buf);
        name.write_socket_name(&mut out).unwrap();
        assert_eq!(out.as_str(), "vchan.2.0.512.sock");
        let mut buf = [0u8; 64];
        let mut out = BufWriter::new(&mut buf);
        name.write_socket_path("/var/run/vchan", &mut out).unwrap();
        assert_eq!(out.as_str(), "/var/run/vchan/vchan.2.0.512.sock");
        assert_eq!(VchanName::parse_socket_name("vchan.2.0.512.sock"), Ok(name));
        assert_eq!(
            VchanName::parse_socket_path("/tmp/x/vchan.2.0.512.sock"),
            Ok(name)
        );
        let max = VchanName {
            server: 65535,
            client: 65535,
            port: u32::MAX,
        };
        let mut buf = [0u8; 64];
        let mut out = BufWriter::new(&mut buf);
        write!(out, "{max}").unwrap();
        assert_eq!(VchanName::parse_socket_name(out.as_str()), Ok(max));
    }

    #[test]
    fn socket_name_rejects_malformed() {
        for bad in [
            "",
            "vchan.2.0.512",
            "vchan.2.0.sock",
            "vchan.2.0.512.1.sock",
            "vchan.-1.0.512.sock",
            "vchan.+1.0.512.sock",
            "vchan.02.0.512.sock",
            "vchan.65536.0.512.sock",
            "vchan.2.0.4294967296.sock",
            "vchan.2..512.sock",
            "vchan.2.0.5 12.sock",
            "qrexec.2.0.512.sock",
            "vchan.2.0.512.socket",
        ] {
            assert_eq!(
                VchanName::parse_socket_name(bad),
                Err(Error::BadSocketName),
                "{bad}"
            );
        }
    }

    #[test]
    fn xenstore_dir() {
        let name = VchanName {
            server: 3,
            client: 0,
            port: 111,
        };
        let mut buf = [0u8; 64];
        let mut out = BufWriter::new(&mut buf);
        name.write_xenstore_dir(&mut out).unwrap();
        assert_eq!(out.as_str(), "/local/domain/3/data/vchan/0/111");
    }

    #[test]
    fn buf_writer_refuses_overflow() {
        let mut buf = [0u8; 8];
        let mut out = BufWriter::new(&mut buf);
        let name = VchanName {
            server: 1,
            client: 2,
            port: 3,
        };
        assert!(name.write_socket_name(&mut out).is_err());
        assert!(out.len() <= 8);
    }

    /// The offsets of `struct vchan_interface` as a C compiler lays it out:
    /// two `{u32, u32}`, two `u16`, four `u8`, then the `u32` array
    /// (already 4-aligned at 24).
    #[test]
    fn interface_offsets_match_c_layout() {
        assert_eq!(field::LEFT_CONS, 0);
        assert_eq!(field::LEFT_PROD, field::LEFT_CONS + 4);
        assert_eq!(field::RIGHT_CONS, field::LEFT_PROD + 4);
        assert_eq!(field::RIGHT_PROD, field::RIGHT_CONS + 4);
        assert_eq!(field::LEFT_ORDER, field::RIGHT_PROD + 4);
        assert_eq!(field::RIGHT_ORDER, field::LEFT_ORDER + 2);
        assert_eq!(field::CLI_LIVE, field::RIGHT_ORDER + 2);
        assert_eq!(field::SRV_LIVE, field::CLI_LIVE + 1);
        assert_eq!(field::CLI_NOTIFY, field::SRV_LIVE + 1);
        assert_eq!(field::SRV_NOTIFY, field::CLI_NOTIFY + 1);
        assert_eq!(field::GRANTS, field::SRV_NOTIFY + 1);
        assert_eq!(field::GRANTS % 4, 0);
        assert_eq!(grant_offset(3), 36);
    }

    /// `struct vchan_interface` from `libxenvchan.h`, laid out by the
    /// compiler under C rules (the flexible `grants[]` as a zero-length
    /// array). gcc printed the same offsets for the header's definition.
    #[repr(C)]
    #[allow(dead_code)] // reason: only its layout is inspected.
    struct CRingShared {
        cons: u32,
        prod: u32,
    }

    #[repr(C)]
    #[allow(dead_code)] // reason: only its layout is inspected.
    struct CVchanInterface {
        left: CRingShared,
        right: CRingShared,
        left_order: u16,
        right_order: u16,
        cli_live: u8,
        srv_live: u8,
        cli_notify: u8,
        srv_notify: u8,
        grants: [u32; 0],
    }

    #[test]
    fn offsets_match_repr_c_mirror() {
        use core::mem::{offset_of, size_of};
        let left = offset_of!(CVchanInterface, left);
        let right = offset_of!(CVchanInterface, right);
        assert_eq!(left + offset_of!(CRingShared, cons), field::LEFT_CONS);
        assert_eq!(left + offset_of!(CRingShared, prod), field::LEFT_PROD);
        assert_eq!(right + offset_of!(CRingShared, cons), field::RIGHT_CONS);
        assert_eq!(right + offset_of!(CRingShared, prod), field::RIGHT_PROD);
        assert_eq!(offset_of!(CVchanInterface, left_order), field::LEFT_ORDER);
        assert_eq!(offset_of!(CVchanInterface, right_order), field::RIGHT_ORDER);
        assert_eq!(offset_of!(CVchanInterface, cli_live), field::CLI_LIVE);
        assert_eq!(offset_of!(CVchanInterface, srv_live), field::SRV_LIVE);
        assert_eq!(offset_of!(CVchanInterface, cli_notify), field::CLI_NOTIFY);
        assert_eq!(offset_of!(CVchanInterface, srv_notify), field::SRV_NOTIFY);
        assert_eq!(offset_of!(CVchanInterface, grants), field::GRANTS);
        assert_eq!(size_of::<CVchanInterface>(), 24);
    }

    #[test]
    fn roles_are_mirror_images() {
        let server = Role::Server.endpoint();
        let client = Role::Client.endpoint();
        assert_eq!(server.read_prod, client.write_prod);
        assert_eq!(server.read_cons, client.write_cons);
        assert_eq!(server.write_prod, client.read_prod);
        assert_eq!(server.own_live, client.peer_live);
        assert_eq!(server.request_notify, client.send_notify);
        assert_eq!(client.request_notify, server.send_notify);
        // The server reads the left ring (client write, server read).
        assert_eq!(server.read_prod, field::LEFT_PROD);
        assert_eq!(server.own_live, field::SRV_LIVE);
    }

    #[test]
    fn liveness_values() {
        assert_eq!(Liveness::from(0), Liveness::Exited);
        assert_eq!(Liveness::from(1), Liveness::Connected);
        assert_eq!(Liveness::from(2), Liveness::NotYetConnected);
        assert_eq!(Liveness::from(9), Liveness::Unknown(9));
        for raw in 0..=255u8 {
            assert_eq!(u8::from(Liveness::from(raw)), raw);
        }
        assert_eq!(SERVER_INITIAL_CLI_LIVE, u8::from(Liveness::NotYetConnected));
        assert_eq!(CLIENT_CONNECTED_CLI_LIVE, u8::from(Liveness::Connected));
    }

    #[test]
    fn placements() {
        let small = RingOrders::new(10, 11).unwrap();
        assert_eq!(
            small.left().placement(),
            RingPlacement::InPage { offset: 1024 }
        );
        assert_eq!(
            small.right().placement(),
            RingPlacement::InPage { offset: 2048 }
        );
        assert_eq!(small.grant_count(), 0);
        let big = RingOrders::new(13, 12).unwrap();
        assert_eq!(
            big.left().placement(),
            RingPlacement::Granted {
                first_grant: 0,
                pages: 2
            }
        );
        assert_eq!(
            big.right().placement(),
            RingPlacement::Granted {
                first_grant: 2,
                pages: 1
            }
        );
        assert_eq!(big.grant_count(), 3);
        assert_eq!(big.read_ring(Role::Server), big.left());
        assert_eq!(big.write_ring(Role::Server), big.right());
        assert_eq!(big.read_ring(Role::Client), big.right());
        let largest = RingOrders::new(20, 20).unwrap();
        assert_eq!(largest.grant_count(), 512);
        let mixed = RingOrders::new(11, 20).unwrap();
        assert_eq!(
            mixed.right().placement(),
            RingPlacement::Granted {
                first_grant: 0,
                pages: 256
            }
        );
    }

    #[test]
    fn hostile_orders_are_refused() {
        assert_eq!(
            RingOrders::new(9, 11),
            Err(Error::BadOrder {
                left: true,
                order: 9
            })
        );
        assert_eq!(
            RingOrders::new(11, 21),
            Err(Error::BadOrder {
                left: false,
                order: 21
            })
        );
        assert_eq!(
            RingOrders::new(0xffff, 12),
            Err(Error::BadOrder {
                left: true,
                order: 0xffff
            })
        );
        assert_eq!(
            RingOrders::new(10, 10),
            Err(Error::SameInPageOrder { order: 10 })
        );
        // 256 grants (1048 bytes) would run into the ring at 1024.
        assert_eq!(
            RingOrders::new(10, 20),
            Err(Error::GrantsOverlap {
                grants_end: 1048,
                limit: 1024
            })
        );
    }

    #[test]
    fn server_order_choice_matches_libxenvchan() {
        // qrexec/qubesdb ask for small rings: both in the page.
        let orders = RingOrders::for_server(1024, 2048).unwrap();
        assert_eq!((orders.left().order(), orders.right().order()), (10, 11));
        let orders = RingOrders::for_server(2048, 1000).unwrap();
        assert_eq!((orders.left().order(), orders.right().order()), (11, 10));
        let orders = RingOrders::for_server(65536, 65536).unwrap();
        assert_eq!((orders.left().order(), orders.right().order()), (16, 16));
        let orders = RingOrders::for_server(2000, 65536).unwrap();
        assert_eq!((orders.left().order(), orders.right().order()), (11, 16));
        let orders = RingOrders::for_server(5000, 2).unwrap();
        assert_eq!((orders.left().order(), orders.right().order()), (13, 11));
        assert_eq!(
            RingOrders::for_server(MAX_RING_SIZE + 1, 0),
            Err(Error::RingTooLarge {
                requested: MAX_RING_SIZE + 1
            })
        );
    }

    #[test]
    fn ring_arithmetic() {
        let ring = RingIndices::new(0, 0, 10).unwrap();
        assert_eq!(ring.size(), 1024);
        assert_eq!(ring.free(), 1024);
        assert_eq!(ring.write_ranges(1024).unwrap(), [0..1024, 0..0]);
        assert!(ring.write_ranges(1025).is_err());
        assert!(ring.read_ranges(1).is_err());
        let ring = RingIndices::new(1000, 1100, 10).unwrap();
        assert_eq!(ring.available(), 100);
        assert_eq!(ring.read_ranges(100).unwrap(), [1000..1024, 0..76]);
        assert_eq!(ring.write_ranges(924).unwrap(), [76..1000, 0..0]);
        let after = ring.consume(30).unwrap();
        assert_eq!(after.cons(), 1030);
        assert_eq!(after.read_ranges(70).unwrap(), [6..76, 0..0]);
        assert!(ring.consume(101).is_err());
        assert_eq!(ring.produce(924).unwrap().free(), 0);
        assert!(ring.produce(925).is_err());
        // Wrapping at 2^32.
        let ring = RingIndices::new(u32::MAX - 3, 4, 11).unwrap();
        assert_eq!(ring.available(), 8);
        assert_eq!(ring.read_ranges(8).unwrap(), [2044..2048, 0..4]);
        // Hostile producer.
        assert_eq!(
            RingIndices::new(0, 2049, 11),
            Err(Error::RingIndex {
                cons: 0,
                prod: 2049,
                size: 2048
            })
        );
        assert!(RingIndices::new(5, 4, 12).is_err());
        assert!(RingIndices::new(0, 0, 30).is_err());
        let layout = RingOrders::new(10, 11).unwrap().left();
        assert!(layout.indices(0, 1025).is_err());
        assert_eq!(layout.indices(3, 1027).unwrap().free(), 0);
    }
}
