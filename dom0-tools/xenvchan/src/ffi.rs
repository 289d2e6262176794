//! The libxenvchan calls (feature `xen`): hand-written declarations of Xen
//! 4.17's `tools/include/libxenvchan.h`, an owned handle that closes on
//! drop, and [`XenVchan`], the safe shareable end built on
//! [`crate::blocking::Shared`].
//!
//! Only the functions below are used; the `struct libxenvchan` layout is
//! never touched from Rust (the handle is opaque), so the handle stays in
//! libxenvchan's default non-blocking mode. This module must never hand
//! out the raw pointer, and never call into libxenvchan without holding the
//! handle exclusively (`&mut`, i.e. under `Shared`'s mutex).

use std::ffi::{CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use crate::blocking::{OpenState, RawChannel, Shared};

/// `struct libxenvchan` (opaque here).
#[repr(C)]
struct Libxenvchan {
    _private: [u8; 0],
}

#[link(name = "xenvchan")]
unsafe extern "C" {
    // struct libxenvchan *libxenvchan_server_init(struct xentoollog_logger *logger,
    //     int domain, const char* xs_path, size_t read_min, size_t write_min);
    fn libxenvchan_server_init(
        logger: *mut c_void,
        domain: c_int,
        xs_path: *const c_char,
        read_min: usize,
        write_min: usize,
    ) -> *mut Libxenvchan;
    // struct libxenvchan *libxenvchan_client_init(struct xentoollog_logger *logger,
    //     int domain, const char* xs_path);
    fn libxenvchan_client_init(
        logger: *mut c_void,
        domain: c_int,
        xs_path: *const c_char,
    ) -> *mut Libxenvchan;
    fn libxenvchan_close(ctrl: *mut Libxenvchan);
    fn libxenvchan_read(ctrl: *mut Libxenvchan, data: *mut c_void, size: usize) -> c_int;
    fn libxenvchan_write(ctrl: *mut Libxenvchan, data: *const c_void, size: usize) -> c_int;
    fn libxenvchan_wait(ctrl: *mut Libxenvchan) -> c_int;
    fn libxenvchan_fd_for_select(ctrl: *mut Libxenvchan) -> c_int;
    fn libxenvchan_is_open(ctrl: *mut Libxenvchan) -> c_int;
    fn libxenvchan_data_ready(ctrl: *mut Libxenvchan) -> c_int;
    fn libxenvchan_buffer_space(ctrl: *mut Libxenvchan) -> c_int;
}

/// An owned, open libxenvchan handle; closed on drop.
struct Handle {
    ptr: NonNull<Libxenvchan>,
    /// `libxenvchan_fd_for_select`, fixed for the handle's life.
    fd: c_int,
}

// SAFETY: a libxenvchan handle is plain memory (mapped ring pages) plus
// file descriptors, with no thread-local state; `Handle` is only used
// through `&mut` (under `Shared`'s mutex), so moving it between threads is
// sound.
unsafe impl Send for Handle {}

fn c_path(xs_path: &str) -> io::Result<CString> {
    CString::new(xs_path).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("xenstore path {xs_path:?} contains a NUL byte"),
        )
    })
}

impl Handle {
    fn from_raw(raw: *mut Libxenvchan, what: &str) -> io::Result<Handle> {
        let Some(ptr) = NonNull::new(raw) else {
            let os = io::Error::last_os_error();
            return Err(io::Error::new(
                match os.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => os.kind(),
                    _ => io::ErrorKind::ConnectionRefused,
                },
                format!("{what} failed ({os}); is this dom0 with xenfs, evtchn and gntdev loaded?"),
            ));
        };
        // SAFETY: `ptr` is a handle just returned by libxenvchan and not yet
        // closed; fd_for_select only reads the handle's event channel.
        let fd = unsafe { libxenvchan_fd_for_select(ptr.as_ptr()) };
        let handle = Handle { ptr, fd };
        if fd < 0 {
            return Err(io::Error::other(format!(
                "{what}: libxenvchan gave no event channel fd"
            )));
        }
        Ok(handle)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle is open and owned by us alone; it is never
        // used after this (Handle is being dropped).
        unsafe { libxenvchan_close(self.ptr.as_ptr()) }
    }
}

/// A negative libxenvchan count is an error; the errno says which.
fn count(n: c_int, what: &str) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| {
        let os = io::Error::last_os_error();
        io::Error::new(os.kind(), format!("libxenvchan_{what}: {os}"))
    })
}

impl RawChannel for Handle {
    fn open_state(&mut self) -> OpenState {
        // SAFETY: open handle, used exclusively (&mut self).
        match unsafe { libxenvchan_is_open(self.ptr.as_ptr()) } {
            1 => OpenState::Open,
            2 => OpenState::Waiting,
            // 0, or a peer-written byte that is neither: a peer that
            // scribbles on its live flag loses its link.
            _ => OpenState::Closed,
        }
    }

    fn data_ready(&mut self) -> usize {
        // SAFETY: open handle, used exclusively (&mut self).
        let n = unsafe { libxenvchan_data_ready(self.ptr.as_ptr()) };
        usize::try_from(n).unwrap_or(0)
    }

    fn buffer_space(&mut self) -> usize {
        // SAFETY: open handle, used exclusively (&mut self).
        let n = unsafe { libxenvchan_buffer_space(self.ptr.as_ptr()) };
        usize::try_from(n).unwrap_or(0)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = buf.len().min(c_int::MAX as usize);
        // SAFETY: open handle used exclusively; `buf` is valid for `len`
        // writable bytes, and libxenvchan copies at most `len` into it.
        let n = unsafe { libxenvchan_read(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), len) };
        if n < 0 && self.open_state() == OpenState::Closed {
            // io.c: -1 when nothing is left and the peer closed.
            return Ok(0);
        }
        count(n, "read")
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len().min(c_int::MAX as usize);
        // SAFETY: open handle used exclusively; `buf` is valid for `len`
        // readable bytes, and libxenvchan copies at most `len` from it.
        let n = unsafe { libxenvchan_write(self.ptr.as_ptr(), buf.as_ptr().cast(), len) };
        if n < 0 && self.open_state() == OpenState::Closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "vchan closed by the peer",
            ));
        }
        count(n, "write")
    }

    fn event_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `fd` is libxenvchan's event channel fd, open for as long
        // as the handle is (closed only in Drop), and the borrow cannot
        // outlive `&self`.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    fn consume_event(&mut self) -> io::Result<()> {
        // SAFETY: open handle used exclusively; called after the event fd
        // polled readable, so the pending read inside does not block.
        let rc = unsafe { libxenvchan_wait(self.ptr.as_ptr()) };
        count(rc, "wait").map(drop)
    }
}

/// One end of a real Xen vchan: blocking `read`/`write` safe to call from a
/// reader and a writer thread at once (clones share the handle; the last
/// clone dropped closes it, as does [`XenVchan::shutdown`]).
#[derive(Clone, Debug)]
pub struct XenVchan {
    shared: Arc<Shared<Handle>>,
}

impl XenVchan {
    /// `libxenvchan_server_init`: offer a vchan to domain `peer` at
    /// `xs_path` (see [`crate::xs_path`]), with rings of at least
    /// `read_min`/`write_min` bytes. Returns once offered; the client may
    /// connect later ([`XenVchan::wait_connected`]).
    pub fn server(peer: u16, xs_path: &str, read_min: usize, write_min: usize) -> io::Result<Self> {
        let path = c_path(xs_path)?;
        // SAFETY: a null logger is allowed (libxenvchan then logs to
        // stderr); `path` is a valid C string that outlives the call.
        let raw = unsafe {
            libxenvchan_server_init(
                std::ptr::null_mut(),
                c_int::from(peer),
                path.as_ptr(),
                read_min,
                write_min,
            )
        };
        let handle = Handle::from_raw(raw, &format!("libxenvchan_server_init({peer}, {xs_path})"))?;
        Ok(XenVchan {
            shared: Arc::new(Shared::new(handle)?),
        })
    }

    /// `libxenvchan_client_init`: connect to the vchan domain `server`
    /// offers at `xs_path`. Fails at once if it is not offered (yet).
    pub fn client(server: u16, xs_path: &str) -> io::Result<Self> {
        let path = c_path(xs_path)?;
        // SAFETY: a null logger is allowed; `path` is a valid C string that
        // outlives the call.
        let raw = unsafe {
            libxenvchan_client_init(std::ptr::null_mut(), c_int::from(server), path.as_ptr())
        };
        let handle = Handle::from_raw(
            raw,
            &format!("libxenvchan_client_init({server}, {xs_path})"),
        )?;
        Ok(XenVchan {
            shared: Arc::new(Shared::new(handle)?),
        })
    }

    /// For a server: wait until the client connects (`Ok(false)` if
    /// `timeout` passes first).
    pub fn wait_connected(&self, timeout: Option<Duration>) -> io::Result<bool> {
        self.shared.wait_connected(timeout)
    }

    /// `libxenvchan_is_open`.
    pub fn open_state(&self) -> OpenState {
        self.shared.open_state()
    }

    /// Blocking read (see [`Shared::read`]).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.shared.read(buf)
    }

    /// Blocking write (see [`Shared::write`]).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.shared.write(buf)
    }

    /// Limit how long reads block (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        self.shared.set_read_timeout(timeout);
    }

    /// Close now for every clone: the peer sees the vchan closed.
    pub fn shutdown(&self) -> io::Result<()> {
        self.shared.shutdown()
    }
}
