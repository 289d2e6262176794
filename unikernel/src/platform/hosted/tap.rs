//! A Linux TAP device as a `smoltcp::phy::Device`: the hosted stand-in for a
//! Xen vif (netback for a client, netfront for the uplink).
//!
//! The device is opened through `/dev/net/tun` with `TUNSETIFF` and
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (Linux
//! `Documentation/networking/tuntap.rst`), so every `read` is one
//! `virtio_net_hdr` and one Ethernet frame and every `write` sends one; the
//! descriptor is non-blocking and registered with the platform's epoll set.
//! We offer the kernel checksum and TCP segmentation offload
//! (`TUNSETOFFLOAD` with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`): a frame
//! whose header asks for a checksum or is a TCP GSO frame of up to 64 KiB
//! goes to the firewall core whole, with its metadata
//! ([`crate::offload::accept`] checks it against the frame; the device is
//! an [`crate::offload::OffloadNic`]), no segmentation on receive; the
//! core sends such frames back out as GSO frames with their own vnet
//! header (the kernel on the other side segments them, or not, as its
//! device needs). Complete frames we write go through
//! [`super::gso::Coalescer`], which merges runs of one TCP flow's segments
//! into GSO frames the kernel carries as one packet. The kernel side of
//! the device can be moved into another network namespace (the client
//! qube's, in the box) while we keep the descriptor.
//!
//! Frames the other side sends are hostile input: a frame without GSO
//! larger than our MTU is dropped and counted, never truncated and passed
//! on; offload metadata that does not match its frame is dropped and
//! counted (`rx_offloaded`); a write the kernel refuses (queue full) drops
//! that frame and counts it. Nothing here panics on any frame. A caller
//! that uses the plain `smoltcp::phy::Device::receive` gets offloaded
//! frames cut and completed in software ([`crate::offload::finish`]).

use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::string::String;
use std::vec::Vec;

use std::collections::VecDeque;

use smoltcp::phy::{self, DeviceCapabilities, Medium};

use super::epoll::Readiness;
use super::gso::{Coalescer, VNET_HDR_LEN, VnetHeader};
use super::reactor::{Flush, Reactor};
use crate::offload::{self, Offload, OffloadNic, TxOffloads};
use crate::platform::Instant;

/// The IP MTU of a Qubes vif (Xen netfront default).
pub const DEFAULT_MTU: usize = 1500;
/// The kernel's queue of frames for us on each TAP (see [`set_txqueuelen`]).
pub const DEFAULT_QUEUE_LEN: u32 = 10000;
/// Ethernet header bytes on top of the IP MTU.
const ETHERNET_HEADER: usize = 14;
/// Largest frame the kernel can hand us on a TAP (a GSO frame); each read
/// has room for this much after the vnet header, so that an oversized
/// frame is seen whole and dropped.
const READ_BUFFER: usize = offload::MAX_OFFLOAD_FRAME;
/// Frames longer than this go to [`OffloadNic::receive_into`]'s caller in
/// the receive buffer itself (swapped for the caller's); shorter ones are
/// copied, so that a queued small frame does not hold a whole receive
/// buffer's capacity.
const HAND_OVER_ABOVE: usize = 4096;

/// Per-device counters, readable for the status service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapCounters {
    /// Frames handed to the firewall.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Frames dropped because they exceeded the MTU.
    pub rx_oversized: u64,
    /// Frames dropped because the kernel refused the write.
    pub tx_dropped: u64,
    /// Read errors other than "nothing there".
    pub rx_errors: u64,
    /// Frames dropped because their vnet header's offloads did not match
    /// the frame or were of a kind we never offered.
    pub rx_offloaded: u64,
    /// GSO frames handed to the firewall whole.
    pub rx_gso_frames: u64,
    /// GSO frames the firewall wrote whole (received as such).
    pub tx_gso_frames: u64,
    /// Writes that were GSO frames (each several frames merged).
    pub tx_gso_writes: u64,
    /// Frames that went out merged into GSO frames.
    pub tx_merged_frames: u64,
}

/// The transmit side, shared with the reactor so that frames held back
/// for merging are written before the platform sleeps.
#[derive(Debug)]
struct TxPath {
    fd: OwnedFd,
    coalescer: RefCell<Coalescer>,
    tx_frames: Cell<u64>,
    tx_dropped: Cell<u64>,
    tx_gso_frames: Cell<u64>,
}

impl TxPath {
    /// Writes a vnet header and a frame with one `writev`.
    fn write_parts(&self, header: &[u8; VNET_HDR_LEN], frame: &[u8]) {
        let parts = [
            libc::iovec {
                iov_base: header.as_ptr().cast_mut().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs describe live buffers that outlive the call;
        // writev only reads them.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), parts.as_ptr(), 2) };
        if usize::try_from(n).ok() == Some(header.len() + frame.len()) {
            self.tx_frames.set(self.tx_frames.get().saturating_add(1));
        } else {
            self.tx_dropped.set(self.tx_dropped.get().saturating_add(1));
        }
    }

    /// Sends a frame with offloads as it is, after whatever the coalescer
    /// holds (order on the wire never changes).
    fn send_offloaded(&self, frame: &[u8], offload: Offload) {
        if offload.is_none() {
            return self.send(frame);
        }
        Flush::flush(self);
        match VnetHeader::for_frame(frame, offload) {
            Some(header) => {
                if offload.is_gso() {
                    self.tx_gso_frames
                        .set(self.tx_gso_frames.get().saturating_add(1));
                }
                self.write_parts(&header.to_bytes(), frame);
            }
            None => {
                // Not one the kernel could take: finished here.
                let mut scratch = Vec::new();
                let result = offload::finish(frame, offload, &mut scratch, &mut |piece| {
                    self.write_parts(&[0; VNET_HDR_LEN], piece)
                });
                if result.is_err() {
                    self.tx_dropped.set(self.tx_dropped.get().saturating_add(1));
                }
            }
        }
    }

    fn write(&self, bytes: &[u8]) {
        // SAFETY: the pointer and length describe `bytes`, which outlives
        // the call; write does not keep the pointer.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if usize::try_from(n).ok() == Some(bytes.len()) {
            self.tx_frames.set(self.tx_frames.get().saturating_add(1));
        } else {
            self.tx_dropped.set(self.tx_dropped.get().saturating_add(1));
        }
    }

    fn send(&self, frame: &[u8]) {
        if let Ok(mut coalescer) = self.coalescer.try_borrow_mut() {
            coalescer.push(frame, &mut |bytes| self.write(bytes));
        }
    }
}

impl Flush for TxPath {
    fn flush(&self) {
        if let Ok(mut coalescer) = self.coalescer.try_borrow_mut()
            && coalescer.is_pending()
        {
            coalescer.flush(&mut |bytes| self.write(bytes));
        }
    }
}

/// One TAP device.
#[derive(Debug)]
pub struct TapDevice {
    tx: Rc<TxPath>,
    name: String,
    mtu: usize,
    reactor: Rc<Reactor>,
    /// The frame last read, from its first byte (its vnet header is read
    /// apart); capacity for [`READ_BUFFER`] bytes is restored before each
    /// read, as [`OffloadNic::receive_into`] may have swapped it away.
    rx_buffer: Vec<u8>,
    tx_buffer: Vec<u8>,
    counters: TapCounters,
    /// Frames cut in software for [`phy::Device::receive`] callers.
    finished: VecDeque<Vec<u8>>,
    segment: Vec<u8>,
    /// Raised by the platform's `wait` when the kernel has frames for us,
    /// lowered when a read finds none: an idle TAP costs no syscall.
    readable: Readiness,
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            std::format!(
                "interface name {name:?} must be 1..{} bytes without NUL",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    // SAFETY: ifreq is a plain C struct/union of integers and arrays, for
    // which all-zero bytes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    Ok(request)
}

impl TapDevice {
    /// Attaches to the TAP device `name`, creating it if it does not exist
    /// (needs `CAP_NET_ADMIN`, or a persistent device owned by our user).
    pub fn open(reactor: Rc<Reactor>, name: &str, mtu: usize) -> io::Result<TapDevice> {
        let mut request = ifreq_for(name)?;
        request.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: `path` is a valid NUL-terminated string for the call.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by open and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
        // `request` is, alive for the duration of the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // Let the kernel hand us checksum-pending and TCP GSO frames (the
        // firewall forwards them whole): one read per run instead of per
        // segment. Without it every frame comes complete, also fine.
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its flags as the integer argument.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                offloads as libc::c_ulong,
            )
        };
        if rc < 0 {
            log::warn!(
                "TAP {name}: no receive offloads ({}); one frame per read",
                io::Error::last_os_error()
            );
        }
        TapDevice::attach(reactor, fd, name, mtu)
    }

    /// A device on `fd`, a descriptor with one vnet header and frame per
    /// read and write (an attached TAP; a datagram socket in tests).
    fn attach(reactor: Rc<Reactor>, fd: OwnedFd, name: &str, mtu: usize) -> io::Result<TapDevice> {
        let readable = reactor.epoll.add_tracked(fd.as_raw_fd())?;
        let tx = Rc::new(TxPath {
            fd,
            coalescer: RefCell::new(Coalescer::default()),
            tx_frames: Cell::new(0),
            tx_dropped: Cell::new(0),
            tx_gso_frames: Cell::new(0),
        });
        let flusher: Rc<dyn Flush> = tx.clone();
        let weak: Weak<dyn Flush> = Rc::downgrade(&flusher);
        reactor.add_flusher(weak);
        Ok(TapDevice {
            tx,
            name: String::from(name),
            mtu,
            reactor,
            rx_buffer: Vec::with_capacity(READ_BUFFER),
            tx_buffer: Vec::with_capacity(mtu + ETHERNET_HEADER),
            counters: TapCounters::default(),
            finished: VecDeque::new(),
            segment: Vec::with_capacity(mtu + ETHERNET_HEADER),
            readable,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The counters so far.
    pub fn counters(&self) -> TapCounters {
        let mut counters = self.counters;
        counters.tx_frames = self.tx.tx_frames.get();
        counters.tx_dropped = self.tx.tx_dropped.get();
        counters.tx_gso_frames = self.tx.tx_gso_frames.get();
        if let Ok(coalescer) = self.tx.coalescer.try_borrow() {
            counters.tx_gso_writes = coalescer.gso_writes;
            counters.tx_merged_frames = coalescer.merged_frames;
        }
        counters
    }

    /// Writes out any frames held back for merging.
    pub fn flush(&self) {
        self.tx.flush();
    }

    /// Sets the kernel side of the device administratively up (what
    /// `ip link set NAME up` does), in the network namespace it lives in.
    pub fn set_up(&self) -> io::Result<()> {
        set_link_up(&self.name)
    }

    /// Sets the kernel's queue towards us (see [`set_txqueuelen`]).
    pub fn set_queue_len(&self, len: u32) -> io::Result<()> {
        set_txqueuelen(&self.name, len)
    }

    /// Reads one vnet header and frame, the frame into the receive buffer
    /// (from its start; the buffer's length is the frame's): the frame's
    /// length and its offloads (checked against it).
    fn read_frame(&mut self) -> Option<(usize, Offload)> {
        if !self.readable.get() {
            return None;
        }
        if self.rx_buffer.capacity() < READ_BUFFER {
            // Swapped away for a smaller one: a fresh buffer rather than a
            // reallocation that would copy the old one's bytes.
            self.rx_buffer = Vec::with_capacity(READ_BUFFER);
        }
        loop {
            let mut header = [0u8; VNET_HDR_LEN];
            self.rx_buffer.clear();
            let room = self.rx_buffer.spare_capacity_mut();
            let room_len = room.len().min(READ_BUFFER);
            let parts = [
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: header.len(),
                },
                libc::iovec {
                    iov_base: room.as_mut_ptr().cast(),
                    iov_len: room_len,
                },
            ];
            // SAFETY: the iovecs describe `header` and `room_len` bytes of
            // `rx_buffer`'s spare capacity, both writable and alive for the
            // call; readv keeps neither pointer.
            let n = unsafe { libc::readv(self.tx.fd.as_raw_fd(), parts.as_ptr(), 2) };
            if n < 0 {
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::WouldBlock => {
                        self.readable.set(false);
                        return None;
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.counters.rx_errors = self.counters.rx_errors.saturating_add(1);
                        return None;
                    }
                }
            }
            let Some(len) = usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_sub(VNET_HDR_LEN))
            else {
                self.counters.rx_errors = self.counters.rx_errors.saturating_add(1);
                continue;
            };
            if len > room_len {
                // More than we asked for: never from the kernel.
                self.counters.rx_errors = self.counters.rx_errors.saturating_add(1);
                continue;
            }
            // SAFETY: readv filled the iovecs in order, so the `len` bytes
            // after the header are initialized at the start of
            // `rx_buffer`'s spare capacity (`len <= room_len`, within it).
            unsafe { self.rx_buffer.set_len(len) };
            if len == 0 {
                continue;
            }
            let header = VnetHeader::parse(&header).unwrap_or_default();
            let Some(frame) = self.rx_buffer.get_mut(..len) else {
                self.counters.rx_errors = self.counters.rx_errors.saturating_add(1);
                continue;
            };
            let offload = match offload::accept(frame, header.nic_offload()) {
                Ok(offload) => offload,
                Err(_) => {
                    self.counters.rx_offloaded = self.counters.rx_offloaded.saturating_add(1);
                    continue;
                }
            };
            if offload.is_gso() {
                self.counters.rx_gso_frames = self.counters.rx_gso_frames.saturating_add(1);
            } else if len > self.mtu + ETHERNET_HEADER {
                self.counters.rx_oversized = self.counters.rx_oversized.saturating_add(1);
                continue;
            }
            self.counters.rx_frames = self.counters.rx_frames.saturating_add(1);
            return Some((len, offload));
        }
    }
}

impl OffloadNic for TapDevice {
    fn receive_offloaded<R>(
        &mut self,
        _now: Instant,
        f: impl FnOnce(&[u8], Offload) -> R,
    ) -> Option<R> {
        if let Some(frame) = self.finished.pop_front() {
            return Some(f(&frame, Offload::NONE));
        }
        let (len, offload) = self.read_frame()?;
        let frame = self.rx_buffer.get(..len)?;
        Some(f(frame, offload))
    }

    fn receive_into(&mut self, _now: Instant, frame: &mut Vec<u8>) -> Option<Offload> {
        if let Some(finished) = self.finished.pop_front() {
            *frame = finished;
            return Some(Offload::NONE);
        }
        let (len, offload) = self.read_frame()?;
        if len > HAND_OVER_ABOVE {
            // Handed over whole; `read_frame` gives the device a buffer
            // with room again (this one if it is big enough).
            std::mem::swap(&mut self.rx_buffer, frame);
            frame.truncate(len);
        } else {
            frame.clear();
            frame.extend_from_slice(self.rx_buffer.get(..len)?);
        }
        Some(offload)
    }

    fn tx_offloads(&self) -> TxOffloads {
        TxOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        }
    }

    fn transmit_offloaded(&mut self, _now: Instant, frame: &[u8], offload: Offload) -> bool {
        self.tx.send_offloaded(frame, offload);
        true
    }
}

/// A throw-away socket for interface ioctls.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; a negative return is an error.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by socket and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets the kernel's queue of frames waiting for us on interface `name`
/// (`SIOCSIFTXQLEN`, what `ip link set NAME txqueuelen LEN` does). A TAP
/// attached with `TUNSETIFF` starts at 1000, which a fast TCP sender
/// overflows while the single-threaded firewall is busy; the drops stall
/// the connection for seconds (retransmission timeouts).
pub fn set_txqueuelen(name: &str, len: u32) -> io::Result<()> {
    let mut request = ifreq_for(name)?;
    // `ifr_qlen` is the union's int member, at the same place as `ifru_mtu`.
    request.ifr_ifru.ifru_mtu = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
    let socket = ioctl_socket()?;
    // SAFETY: SIOCSIFTXQLEN reads one `struct ifreq`, which `request` is.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFTXQLEN, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BR_STATE_FORWARDING` in `/sys/class/net/<port>/brport/state`.
const BRIDGE_PORT_FORWARDING: &str = "3";

/// If `name` is a bridge port (`/sys/class/net/<name>/brport` exists in our
/// network namespace), waits until the bridge forwards on it, at most
/// `limit`; returns whether it forwards (`true` at once for a device that
/// is not bridged). A TAP gets its carrier only when we attach, and the
/// kernel applies carrier changes to bridge ports asynchronously (link
/// watch, up to a second later): frames written before then are dropped by
/// the bridge, the firewall's first ARP request for its gateway among them.
pub fn wait_until_bridge_forwards(name: &str, limit: std::time::Duration) -> bool {
    wait_for_port_state(
        std::path::Path::new(&std::format!("/sys/class/net/{name}/brport/state")),
        limit,
    )
}

fn wait_for_port_state(path: &std::path::Path, limit: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        match std::fs::read_to_string(path) {
            Err(_) => return true,
            Ok(state) if state.trim() == BRIDGE_PORT_FORWARDING => return true,
            Ok(_) if start.elapsed() >= limit => return false,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Sets interface `name` up through `SIOCSIFFLAGS` on a throw-away socket.
pub fn set_link_up(name: &str) -> io::Result<()> {
    let mut request = ifreq_for(name)?;
    let socket = ioctl_socket()?;
    // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags member.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, which `request` is.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for TapDevice {
    fn drop(&mut self) {
        self.tx.flush();
        self.reactor.epoll.remove(self.tx.fd.as_raw_fd());
    }
}

/// A received frame, borrowed from the device's receive buffer.
#[derive(Debug)]
pub struct TapRxToken<'a> {
    frame: &'a [u8],
}

/// Permission to send one frame.
#[derive(Debug)]
pub struct TapTxToken<'a> {
    tx: &'a TxPath,
    buffer: &'a mut Vec<u8>,
}

impl phy::RxToken for TapRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

impl phy::TxToken for TapTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // Grown once, not zeroed per frame: the router's `f` writes every
        // byte. Even a writer that did not could only resend bytes this
        // same TAP already sent to the same peer (each TAP has its own
        // buffer), never another domain's.
        if self.buffer.len() < len {
            self.buffer.resize(len, 0);
        }
        let frame = self.buffer.get_mut(..len).unwrap_or(&mut []);
        let result = f(frame);
        self.tx.send(frame);
        result
    }
}

impl phy::Device for TapDevice {
    type RxToken<'a>
        = TapRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TapTxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let plain = match self.finished.pop_front() {
            Some(frame) => {
                self.segment = frame;
                None
            }
            None => {
                let (len, offload) = self.read_frame()?;
                if offload.is_none() {
                    Some(len)
                } else {
                    // Cut and completed here for a caller without offloads.
                    let frame = self.rx_buffer.get(..len)?;
                    let mut scratch = Vec::new();
                    let finished = &mut self.finished;
                    offload::finish(frame, offload, &mut scratch, &mut |piece| {
                        finished.push_back(piece.to_vec())
                    })
                    .ok()?;
                    self.segment = self.finished.pop_front()?;
                    None
                }
            }
        };
        let TapDevice {
            tx,
            rx_buffer,
            tx_buffer,
            segment,
            ..
        } = self;
        let frame = match plain {
            Some(len) => rx_buffer.get(..len)?,
            None => segment.as_slice(),
        };
        Some((
            TapRxToken { frame },
            TapTxToken {
                tx,
                buffer: tx_buffer,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        Some(TapTxToken {
            tx: &self.tx,
            buffer: &mut self.tx_buffer,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = self.mtu + ETHERNET_HEADER;
        capabilities
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Device, RxToken, TxToken};
    use std::time::Duration;
    use std::vec;

    #[test]
    fn waits_for_a_bridge_port_to_forward_and_no_longer() {
        let dir = std::env::temp_dir().join(std::format!("tap-brport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state");
        // Not a bridge port: no wait.
        assert!(wait_for_port_state(&state, Duration::from_secs(5)));
        // Disabled (0) for good: gives up after the limit.
        std::fs::write(&state, "0\n").unwrap();
        let start = std::time::Instant::now();
        assert!(!wait_for_port_state(&state, Duration::from_millis(100)));
        assert!(start.elapsed() >= Duration::from_millis(100));
        // Forwarding (3) later: returns once it is.
        let later = state.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(later, "3\n").unwrap();
        });
        assert!(wait_for_port_state(&state, Duration::from_secs(5)));
        writer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_bad_interface_names() {
        assert!(ifreq_for("").is_err());
        assert!(ifreq_for("0123456789abcdef").is_err());
        assert!(ifreq_for("a\0b").is_err());
        assert!(ifreq_for("vif5.0").is_ok());
    }

    /// An AF_PACKET socket bound to `ifname`: sees frames the kernel
    /// receives on the TAP and sends frames out of it.
    fn packet_socket(ifname: &str) -> OwnedFd {
        let cname = CString::new(ifname).unwrap();
        // SAFETY: cname is a valid C string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() takes no pointers.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        assert!(raw >= 0, "{}", io::Error::last_os_error());
        // SAFETY: raw is a fresh fd owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; zero is valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = index as i32;
        // SAFETY: the pointer and size describe `address`.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert!(rc == 0, "{}", io::Error::last_os_error());
        fd
    }

    fn frame(source_last: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, source_last]);
        // An experimental EtherType so the kernel stack ignores it.
        frame.extend_from_slice(&[0x88, 0xb5]);
        frame.extend_from_slice(payload);
        frame
    }

    /// A device on one end of a datagram socket pair (one message per
    /// read, as on a TAP); the other end, returned, plays the kernel.
    fn socket_device(mtu: usize) -> (Rc<Reactor>, TapDevice, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: fds[0] was just returned and is owned by no one else.
        let ours = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: fds[1] likewise.
        let kernel = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        let reactor = Reactor::new().unwrap();
        let tap = TapDevice::attach(reactor.clone(), ours, "test0", mtu).unwrap();
        (reactor, tap, kernel)
    }

    /// Sends `bytes` as one message from the kernel's end and lets the
    /// reactor see it.
    fn kernel_sends(reactor: &Reactor, kernel: &OwnedFd, bytes: &[u8]) {
        // SAFETY: the pointer and length describe `bytes`.
        let n = unsafe { libc::send(kernel.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        assert_eq!(n as usize, bytes.len(), "{}", io::Error::last_os_error());
        reactor.epoll.wait(Some(Duration::ZERO)).unwrap();
    }

    fn with_header(header: VnetHeader, frame: &[u8]) -> Vec<u8> {
        let mut message = header.to_bytes().to_vec();
        message.extend_from_slice(frame);
        message
    }

    /// An IPv4 TCP frame with `payload` bytes after the headers.
    fn tcp_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        let total = (20 + 20 + payload) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 192, 0, 2, 80]);
        f.extend_from_slice(&[0x12, 0x34, 0, 80, 0, 0, 0, 1, 0, 0, 0, 7]);
        f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload).map(|i| i as u8));
        f
    }

    fn gso_header(gso_size: u16) -> VnetHeader {
        VnetHeader {
            flags: super::super::gso::F_NEEDS_CSUM,
            gso_type: super::super::gso::GSO_TCPV4,
            hdr_len: 54,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    #[test]
    fn receive_into_hands_big_frames_over_and_copies_small_ones() {
        let (reactor, mut tap, kernel) = socket_device(9000);
        let now = Instant::from_millis(0);

        // Small: copied into the caller's buffer; the device keeps its own.
        let small = frame(1, &[7u8; 100]);
        kernel_sends(
            &reactor,
            &kernel,
            &with_header(VnetHeader::default(), &small),
        );
        let mut buffer = Vec::with_capacity(2048);
        buffer.extend_from_slice(&[0xee; 1000]);
        let caller = buffer.as_ptr();
        assert_eq!(tap.receive_into(now, &mut buffer), Some(Offload::NONE));
        assert_eq!(buffer, small);
        assert_eq!((buffer.as_ptr(), buffer.capacity()), (caller, 2048));
        assert!(tap.rx_buffer.capacity() >= READ_BUFFER);

        // Big: the device's buffer itself, the caller's swapped in.
        let big = frame(2, &[9u8; 6000]);
        kernel_sends(&reactor, &kernel, &with_header(VnetHeader::default(), &big));
        let device = tap.rx_buffer.as_ptr();
        assert_eq!(tap.receive_into(now, &mut buffer), Some(Offload::NONE));
        assert_eq!(buffer, big);
        assert_eq!(buffer.as_ptr(), device);
        assert_eq!(tap.rx_buffer.as_ptr(), caller);

        // The next read has room again (the caller's buffer was too small
        // for a read: a fresh one), and a big buffer handed back is reused.
        let bigger = frame(3, &[5u8; 8000]);
        kernel_sends(
            &reactor,
            &kernel,
            &with_header(VnetHeader::default(), &bigger),
        );
        let mut second = Vec::new();
        assert_eq!(tap.receive_into(now, &mut second), Some(Offload::NONE));
        assert_eq!(second, bigger);
        assert!(second.capacity() >= READ_BUFFER);
        let recycled = buffer.as_ptr();
        kernel_sends(&reactor, &kernel, &with_header(VnetHeader::default(), &big));
        let mut third = std::mem::take(&mut buffer);
        assert_eq!(tap.receive_into(now, &mut third), Some(Offload::NONE));
        assert_eq!(third, big);
        assert_eq!(tap.rx_buffer.as_ptr(), recycled);
        kernel_sends(
            &reactor,
            &kernel,
            &with_header(VnetHeader::default(), &small),
        );
        assert_eq!(tap.receive_into(now, &mut third), Some(Offload::NONE));
        assert_eq!(third, small);
        kernel_sends(&reactor, &kernel, &with_header(VnetHeader::default(), &big));
        assert_eq!(tap.receive_into(now, &mut buffer), Some(Offload::NONE));
        assert_eq!((buffer.as_slice(), buffer.as_ptr()), (&big[..], recycled));

        // Nothing more: none, and no read until the reactor sees input.
        assert_eq!(tap.receive_into(now, &mut buffer), None);
        assert!(!tap.readable.get());
        assert_eq!(tap.counters().rx_frames, 6);
        assert_eq!(tap.counters().rx_errors, 0);
    }

    #[test]
    fn reads_drop_and_count_bad_frames_and_every_receive_path_works() {
        let (reactor, mut tap, kernel) = socket_device(DEFAULT_MTU);
        let now = Instant::from_millis(0);
        let good = frame(1, b"good");

        // Shorter than a vnet header, a header alone, an oversized frame
        // without GSO, GSO metadata on a frame that is not TCP: all
        // skipped in one receive, which returns the good frame after them.
        kernel_sends(&reactor, &kernel, &[0u8; 5]);
        kernel_sends(&reactor, &kernel, &[0u8; VNET_HDR_LEN]);
        let oversized = frame(2, &[0u8; DEFAULT_MTU + 1]);
        kernel_sends(
            &reactor,
            &kernel,
            &with_header(VnetHeader::default(), &oversized),
        );
        kernel_sends(&reactor, &kernel, &with_header(gso_header(1448), &good));
        kernel_sends(
            &reactor,
            &kernel,
            &with_header(VnetHeader::default(), &good),
        );
        let mut buffer = Vec::new();
        assert_eq!(tap.receive_into(now, &mut buffer), Some(Offload::NONE));
        assert_eq!(buffer, good);
        let counters = tap.counters();
        assert_eq!(
            (
                counters.rx_errors,
                counters.rx_oversized,
                counters.rx_offloaded
            ),
            (1, 1, 1)
        );
        assert_eq!(counters.rx_frames, 1);

        // A GSO frame: accepted whole with its metadata (the checksum field
        // rewritten to the pseudo-header sum) and handed over.
        let gso = tcp_frame(8000);
        kernel_sends(&reactor, &kernel, &with_header(gso_header(1448), &gso));
        let offload = tap.receive_into(now, &mut buffer).unwrap();
        assert!(offload.is_gso());
        assert_eq!(offload.gso_size, 1448);
        assert_eq!(buffer.len(), gso.len());
        assert_eq!(buffer.get(..50), gso.get(..50));
        assert_eq!(buffer.get(52..), gso.get(52..));
        assert_eq!(tap.counters().rx_gso_frames, 1);

        // receive_offloaded gives the same frame.
        kernel_sends(&reactor, &kernel, &with_header(gso_header(1448), &gso));
        let got = tap
            .receive_offloaded(now, |bytes, offload| (bytes.to_vec(), offload))
            .unwrap();
        assert_eq!((got.0, got.1), (buffer.clone(), offload));

        // smoltcp's receive cuts it into segments; receive_into takes the
        // rest of them, in order.
        kernel_sends(&reactor, &kernel, &with_header(gso_header(1448), &gso));
        let first = tap
            .receive(now)
            .map(|(rx, _tx)| rx.consume(|bytes| bytes.to_vec()))
            .unwrap();
        assert_eq!(first.len(), 54 + 1448);
        let mut payload = first.get(54..).unwrap().to_vec();
        while let Some(offload) = tap.receive_into(now, &mut buffer) {
            assert_eq!(offload, Offload::NONE);
            assert!(buffer.len() <= DEFAULT_MTU + ETHERNET_HEADER);
            payload.extend_from_slice(buffer.get(54..).unwrap());
        }
        assert_eq!(payload.as_slice(), gso.get(54..).unwrap());
        assert_eq!(tap.counters().rx_errors, 1);
    }

    /// Creates a TAP in a private network namespace (needs root: CI runs
    /// as root), and exchanges one frame in each direction with the kernel.
    #[test]
    fn tap_exchanges_frames_with_the_kernel_in_a_private_netns() {
        if !std::path::Path::new("/dev/net/tun").exists() {
            std::eprintln!("skipped: no /dev/net/tun");
            return;
        }
        let handle = std::thread::spawn(|| {
            // Network namespaces are per thread: this affects only this one.
            // SAFETY: unshare takes no pointers.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::format!(
                    "unshare(CLONE_NEWNET) failed (not root?): {}",
                    io::Error::last_os_error()
                ));
            }
            let reactor = Reactor::new().unwrap();
            let mut tap = TapDevice::open(reactor.clone(), "qbtap0", DEFAULT_MTU).unwrap();
            tap.set_up().unwrap();
            tap.set_queue_len(DEFAULT_QUEUE_LEN).unwrap();
            let mut query = ifreq_for("qbtap0").unwrap();
            let socket = ioctl_socket().unwrap();
            // SAFETY: SIOCGIFTXQLEN fills one ifreq, which `query` is.
            let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFTXQLEN, &mut query) };
            assert_eq!(rc, 0);
            // SAFETY: after SIOCGIFTXQLEN the union holds the int member.
            assert_eq!(unsafe { query.ifr_ifru.ifru_mtu }, DEFAULT_QUEUE_LEN as i32);
            let sniffer = packet_socket("qbtap0");

            // Firewall → kernel.
            let outgoing = frame(1, b"from-the-firewall");
            let token = tap.transmit(Instant::from_millis(0)).unwrap();
            token.consume(outgoing.len(), |buffer| buffer.copy_from_slice(&outgoing));
            assert_eq!(tap.counters().tx_frames, 1);
            // The sniffer sees the kernel's own frames on the link too (an
            // IPv6 MLD report as the interface comes up): ours is the one
            // with the test EtherType. A receive timeout keeps a lost frame
            // from hanging the test.
            let timeout = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            // SAFETY: SO_RCVTIMEO reads one timeval, which `timeout` is.
            let rc = unsafe {
                libc::setsockopt(
                    sniffer.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const timeout).cast(),
                    core::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
            let mut seen = vec![0u8; 2048];
            let mut ours = None;
            for _ in 0..50 {
                // SAFETY: the pointer and length describe `seen`.
                let n = unsafe {
                    libc::recv(sniffer.as_raw_fd(), seen.as_mut_ptr().cast(), seen.len(), 0)
                };
                assert!(n > 0, "no frame seen: {}", io::Error::last_os_error());
                let got = &seen[..n as usize];
                if got.get(12..14) == Some(&[0x88, 0xb5][..]) {
                    ours = Some(got.to_vec());
                    break;
                }
            }
            assert_eq!(ours.as_deref(), Some(&outgoing[..]));

            // Kernel → firewall: the device must wake epoll and yield it whole.
            let incoming = frame(2, b"from-the-kernel");
            // SAFETY: the pointer and length describe `incoming`.
            let n = unsafe {
                libc::send(
                    sniffer.as_raw_fd(),
                    incoming.as_ptr().cast(),
                    incoming.len(),
                    0,
                )
            };
            assert_eq!(n as usize, incoming.len());
            let mut got = None;
            for _ in 0..50 {
                reactor
                    .epoll
                    .wait(Some(Duration::from_millis(100)))
                    .unwrap();
                if let Some((rx, _tx)) = tap.receive(Instant::from_millis(0)) {
                    let bytes = rx.consume(|b| b.to_vec());
                    if bytes.get(12..14) == Some(&[0x88, 0xb5][..]) {
                        got = Some(bytes);
                        break;
                    }
                }
            }
            assert_eq!(got.as_deref(), Some(&incoming[..]));

            // Oversized from the kernel: dropped and counted, not delivered.
            let mut request = ifreq_for("qbtap0").unwrap();
            request.ifr_ifru.ifru_mtu = 4000;
            // SAFETY: SIOCSIFMTU reads one ifreq, which `request` is.
            let rc = unsafe { libc::ioctl(sniffer.as_raw_fd(), libc::SIOCSIFMTU, &mut request) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
            let big = frame(3, &vec![0u8; 3000]);
            // SAFETY: the pointer and length describe `big`.
            unsafe {
                libc::send(sniffer.as_raw_fd(), big.as_ptr().cast(), big.len(), 0);
            }
            std::thread::sleep(Duration::from_millis(50));
            while tap.receive(Instant::from_millis(0)).is_some() {}
            assert_eq!(tap.counters().rx_oversized, 1);
            Ok(())
        });
        match handle.join().unwrap() {
            Ok(()) => {}
            Err(reason) => std::eprintln!("skipped: {reason}"),
        }
    }
}
