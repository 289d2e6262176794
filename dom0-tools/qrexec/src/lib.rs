//! The qrexec programs of a Qubes system — `qrexec-daemon`, `qrexec-client`
//! (dom0), `qrexec-agent`, `qrexec-client-vm` (Linux qubes) — as a library
//! the four thin binaries in `src/bin/` call into.
//!
//! They are drop-in replacements for Qubes' own (qubes-core-qrexec): same
//! program names, flags, socket names, messages in the same order, exit codes
//! (125 qrexec problem, 126 refused, 127 service not found). The wire format
//! comes from `protocol::qrexec`; nothing here re-declares a layout. Every
//! byte from another domain, and from a local client of the daemon, is
//! treated as hostile: peers are parsed with checked views, a misbehaving
//! client is cut off alone, and nothing a peer sends can make us panic. No
//! `unsafe` here: syscalls go through `std` and `rustix`.
//!
//! Layout:
//! - [`vchan`]: the `Vchan`/`Transport` traits and the UNIX-socket backend
//!   laid out as qubes-core-vchan-socket does.
//! - [`wire`]: blocking message I/O over any byte stream.
//! - [`data`]: the data channel (handshake, stdin/stdout/stderr streaming, EOF
//!   order, exit code) for both the requesting and the executing side.
//! - [`exec`]: running commands and RPC services (`/etc/qubes-rpc`, the
//!   `QREXEC_*` environment, users).
//! - [`service`]: socket and `/dev/tcp` services, `rpc-config`.
//! - [`stdio_socket`]: `QREXEC_AGENT_PID` and SIGUSR1 (a process's output
//!   through its stdin socket).
//! - [`policy`]: asking the policy daemon socket or the policy program.
//! - [`qubesd`]: calls to qubesd (disposables, `autostart`, `-k`, the
//!   policy's system info).
//! - [`daemon`], [`client`], [`agent`], [`client_vm`]: the four programs.
//!
//! Environment variables beyond Qubes' own (all optional, for tests and
//! unusual installs): `QREXEC_POLICY_SOCKET` (default `/run/qubes/policy.sock`),
//! `QREXEC_LOG_DIR` (default `/var/log/qubes`), `QREXEC_CLIENT_PATH` (the
//! `qrexec-client` the daemon runs; default: next to `qrexec-daemon`),
//! `QUBESD_SOCKET` / `QUBESD_INTERNAL_SOCKET` (qubesd's sockets; default
//! `/var/run/qubesd.sock` / `/var/run/qubesd.internal.sock`). Qubes'
//! own: `VCHAN_DOMAIN`, `VCHAN_SOCKET_DIR`, `QREXEC_SERVICE_PATH`,
//! `QREXEC_STARTUP_TIMEOUT`, `QREXEC_STARTUP_NOWAIT`.
#![forbid(unsafe_code)]
// Every module here reads what a peer or a caller sent: an index or a
// slice that could panic is an error (tests opt out per module).
#![deny(clippy::indexing_slicing)]

pub mod agent;
pub mod args;
pub mod client;
pub mod client_vm;

pub mod daemon;
pub mod data;
pub mod error;
pub mod exec;
pub mod log;
pub mod policy;
pub mod qubesd;
pub mod service;
pub mod stdio_socket;
pub mod vchan;
pub mod wire;

pub use error::{Error, Result};
