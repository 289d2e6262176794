//! Qubes in a box: the pieces that let the whole system run on one Linux
//! machine without Xen. This crate holds the box's own tooling, starting
//! with a small xenstored ([`xenstored`], [`store`]) that the hosted
//! firewall and the box's scripts share, a blocking client for it
//! ([`client`]), the namespaces and processes of the box itself
//! ([`netbox`]: `qubes-box up|down|status`) and sys-net's tiny HTTP and DNS
//! servers ([`services`]), the box's qubesd ([`qubesd`]: system info,
//! starting halted qubes, disposables) and what each qube has besides its
//! agent ([`vmtools`]: home, file-copy and open-in-disposable services,
//! QubesDB), and the differential test's Qubes Linux sys-firewall
//! ([`linuxfw`]) and probe packets ([`probe`]).
//!
//! It is test and box tooling: it must never be mistaken for, or installed
//! as, a real xenstored, and it never touches anything outside the sockets
//! and directories it is given, nor any namespace or process it did not
//! record itself.
#![forbid(unsafe_code)]

pub mod client;
pub mod linuxfw;
pub mod netbox;
pub mod probe;
pub mod qubesd;
pub mod services;
pub mod store;
pub mod vmtools;
pub mod xenstored;
