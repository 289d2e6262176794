//! qubes.Filecopy for qubes: the wire format of qubes-linux-utils'
//! `qrexec-lib` (pack/unpack), the receiver `qfile-unpacker`, the sender
//! `qfile-agent` and the `qvm-copy`/`qvm-move` front ends; and
//! qubes.OpenInVM ([`openinvm`], [`open_programs`]): `vm-file-editor`,
//! `qopen-in-vm`, `qvm-open-in-vm`, `qvm-open-in-dvm`.
//!
//! The receiver is the attack surface: everything it reads comes from another
//! qube. It parses with checked accessors ([`wire`]), validates every name and
//! symlink target ([`names`]) before touching the filesystem, and only ever
//! writes through directory file descriptors opened component by component
//! with `O_NOFOLLOW` below the incoming directory ([`unpack`]). This crate
//! never uses `unsafe`; syscalls go through `rustix`.
#![forbid(unsafe_code)]

pub mod crc32;
pub mod frontend;
pub mod names;
pub mod open_programs;
pub mod openinvm;
pub mod pack;
pub mod unicode_table;
pub mod unpack;
pub mod wire;

/// errno values used on the wire (Linux numbering, as Qubes sends them).
pub mod errno {
    pub const ENOMEM: u32 = 12;
    pub const EEXIST: u32 = 17;
    pub const EINVAL: u32 = 22;
    pub const ENAMETOOLONG: u32 = 36;
    pub const ENOLINK: u32 = 67;
    pub const EILSEQ: u32 = 84;
    pub const EREMOTEIO: u32 = 121;
    pub const EDQUOT: u32 = 122;
    /// Qubes' "the stream ended early; the sender will explain" code.
    pub const LEGAL_EOF: u32 = 31_415_926;
}
