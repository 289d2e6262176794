//! The PVH `hvm_start_info` (xen `arch-x86/hvm/start_info.h`): the kernel
//! command line and the memory map, copied out at boot into fixed-size
//! storage before the heap may overwrite the pages they live in.
//!
//! The toolstack writes this structure, so it is validated like any other
//! input: the magic must match, the command line is cut at 1023 bytes and
//! must be UTF-8 (else it is ignored), and at most [`MAX_MEMMAP`] entries are
//! kept. Physical memory is read through a callback so that the parser runs
//! on the host in tests; it must never dereference an address itself, and
//! never index out of bounds (`clippy::indexing_slicing` is denied).
#![deny(clippy::indexing_slicing)]

use core::mem::size_of;

use super::abi::{E820_RAM, HVM_START_MAGIC, HvmMemmapEntry, HvmStartInfo};

/// Most memory map entries kept.
pub const MAX_MEMMAP: usize = 32;
/// The platform's own boot option: the log level (`--logs=debug`).
pub const PLATFORM_LOGS_OPTION: &str = "--logs";
/// Longest command line kept (bytes).
pub const MAX_CMDLINE: usize = 1023;

/// Why the start info was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    /// The structure could not be read at the address in %ebx.
    Unreadable,
    /// `magic` was not 0x336ec578: not a PVH boot.
    BadMagic(u32),
    /// Version 0 start info has no memory map; we need one.
    NoMemoryMap,
}

/// One RAM range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What the boot code learned from `hvm_start_info`.
#[derive(Clone, Debug)]
pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    ram: [RamRange; MAX_MEMMAP],
    ram_count: usize,
}

fn read_struct<T: Default>(
    read: &mut impl FnMut(u64, &mut [u8]) -> bool,
    addr: u64,
    decode: impl Fn(&[u8]) -> T,
) -> Option<T> {
    let mut buf = [0u8; 64];
    let bytes = buf.get_mut(..size_of::<T>())?;
    read(addr, bytes).then(|| decode(bytes))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(src) = b.get(at..at + 4) {
        a.copy_from_slice(src);
    }
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(src) = b.get(at..at + 8) {
        a.copy_from_slice(src);
    }
    u64::from_le_bytes(a)
}

impl BootInfo {
    /// Parses the start info at `paddr`; `read(addr, buf)` copies guest
    /// physical memory and returns false when the range is not readable.
    pub fn parse(
        paddr: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> bool,
    ) -> Result<Self, StartInfoError> {
        let info = read_struct(&mut read, paddr, |b| HvmStartInfo {
            magic: u32_at(b, 0),
            version: u32_at(b, 4),
            cmdline_paddr: u64_at(b, 24),
            memmap_paddr: u64_at(b, 40),
            memmap_entries: u32_at(b, 48),
            ..HvmStartInfo::default()
        })
        .ok_or(StartInfoError::Unreadable)?;
        if info.magic != HVM_START_MAGIC {
            return Err(StartInfoError::BadMagic(info.magic));
        }
        if info.version < 1 || info.memmap_paddr == 0 {
            return Err(StartInfoError::NoMemoryMap);
        }
        let mut boot = BootInfo {
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            ram: [RamRange::default(); MAX_MEMMAP],
            ram_count: 0,
        };
        if info.cmdline_paddr != 0 {
            // Byte by byte until NUL: the line may end near unmapped memory.
            for (i, slot) in boot.cmdline.iter_mut().enumerate() {
                let mut byte = [0u8; 1];
                if !read(info.cmdline_paddr.saturating_add(i as u64), &mut byte) {
                    break;
                }
                let [byte] = byte;
                if byte == 0 {
                    break;
                }
                *slot = byte;
                boot.cmdline_len = i + 1;
            }
            if core::str::from_utf8(boot.cmdline.get(..boot.cmdline_len).unwrap_or_default())
                .is_err()
            {
                boot.cmdline_len = 0;
            }
        }
        let entry_size = size_of::<HvmMemmapEntry>() as u64;
        for i in 0..u64::from(info.memmap_entries) {
            if boot.ram_count == MAX_MEMMAP {
                break;
            }
            let addr = info
                .memmap_paddr
                .saturating_add(i.saturating_mul(entry_size));
            let Some(entry) = read_struct(&mut read, addr, |b| HvmMemmapEntry {
                addr: u64_at(b, 0),
                size: u64_at(b, 8),
                kind: u32_at(b, 16),
                reserved: 0,
            }) else {
                break;
            };
            if entry.kind == E820_RAM
                && entry.size > 0
                && entry.addr.checked_add(entry.size).is_some()
            {
                // `ram_count < MAX_MEMMAP` was checked above.
                if let Some(slot) = boot.ram.get_mut(boot.ram_count) {
                    *slot = RamRange {
                        start: entry.addr,
                        len: entry.size,
                    };
                    boot.ram_count += 1;
                }
            }
        }
        Ok(boot)
    }

    /// The kernel command line (`cmdline=` in the xl config; Qubes puts the
    /// VM's kernel options here).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(self.cmdline.get(..self.cmdline_len).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The value of boot option `key` (`key=value` words on the command
    /// line; a bare `key` gives `Some("")`). The last occurrence wins.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.cmdline()
            .split_ascii_whitespace()
            .rev()
            .find_map(|word| match word.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if word == key => Some(""),
                _ => None,
            })
    }

    /// The command line without the platform's own options (`--logs=…`),
    /// for the firewall's boot-option parser.
    pub fn program_cmdline(&self) -> alloc::string::String {
        let mut out = alloc::string::String::new();
        for word in self.cmdline().split_ascii_whitespace() {
            if word == PLATFORM_LOGS_OPTION || word.starts_with("--logs=") {
                continue;
            }
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
        out
    }

    /// The log level asked for with `--logs=LEVEL` (mirage's option; a
    /// `*:LEVEL` form is accepted too): `error`, `warn`, `info`, `debug`,
    /// `trace`. `None` when absent or not understood.
    pub fn log_level(&self) -> Option<log::LevelFilter> {
        let value = self.option(PLATFORM_LOGS_OPTION)?;
        let level = value.rsplit(':').next().unwrap_or(value);
        match level {
            "error" => Some(log::LevelFilter::Error),
            "warn" | "warning" => Some(log::LevelFilter::Warn),
            "info" => Some(log::LevelFilter::Info),
            "debug" => Some(log::LevelFilter::Debug),
            "trace" => Some(log::LevelFilter::Trace),
            _ => None,
        }
    }

    /// The RAM ranges of the memory map.
    pub fn ram(&self) -> &[RamRange] {
        self.ram.get(..self.ram_count).unwrap_or_default()
    }

    /// Total RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram()
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.len))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes buffers it built itself.
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn memory() -> Vec<u8> {
        let mut m = alloc::vec![0u8; 0x2000];
        m[0..4].copy_from_slice(&HVM_START_MAGIC.to_le_bytes());
        m[4..8].copy_from_slice(&1u32.to_le_bytes());
        m[24..32].copy_from_slice(&0x100u64.to_le_bytes());
        m[40..48].copy_from_slice(&0x200u64.to_le_bytes());
        m[48..52].copy_from_slice(&3u32.to_le_bytes());
        m[0x100..0x100 + 26].copy_from_slice(b"--logs=debug quiet x=1\0\0\0\0");
        let entries: [(u64, u64, u32); 3] = [
            (0, 0xa0000, 1),
            (0xf0000, 0x10000, 2),
            (0x100000, 0x1f00000, 1),
        ];
        for (i, (a, s, k)) in entries.iter().enumerate() {
            let at = 0x200 + i * 24;
            m[at..at + 8].copy_from_slice(&a.to_le_bytes());
            m[at + 8..at + 16].copy_from_slice(&s.to_le_bytes());
            m[at + 16..at + 20].copy_from_slice(&k.to_le_bytes());
        }
        m
    }

    fn reader(m: &[u8]) -> impl FnMut(u64, &mut [u8]) -> bool + '_ {
        |addr, buf| match m.get(addr as usize..addr as usize + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    #[test]
    fn parses_cmdline_options_and_ram() {
        let m = memory();
        let boot = BootInfo::parse(0, reader(&m)).unwrap();
        assert_eq!(boot.cmdline(), "--logs=debug quiet x=1");
        assert_eq!(boot.option("--logs"), Some("debug"));
        assert_eq!(boot.log_level(), Some(log::LevelFilter::Debug));
        assert_eq!(boot.program_cmdline(), "quiet x=1");
        assert_eq!(boot.option("quiet"), Some(""));
        assert_eq!(boot.option("missing"), None);
        assert_eq!(boot.ram().len(), 2);
        assert_eq!(boot.ram_bytes(), 0xa0000 + 0x1f00000);
    }

    #[test]
    fn refuses_bad_magic_and_unreadable_info() {
        let mut m = memory();
        m[0] ^= 1;
        assert!(matches!(
            BootInfo::parse(0, reader(&m)),
            Err(StartInfoError::BadMagic(_))
        ));
        assert_eq!(
            BootInfo::parse(0x1ff0, reader(&m)).err(),
            Some(StartInfoError::Unreadable)
        );
    }

    #[test]
    fn survives_hostile_lengths() {
        let mut m = memory();
        // Entry count far past the end of memory; no NUL in the cmdline up to the end.
        m[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
        m[24..32].copy_from_slice(&0x1ff8u64.to_le_bytes());
        for b in &mut m[0x1ff8..] {
            *b = b'a';
        }
        let boot = BootInfo::parse(0, reader(&m)).unwrap();
        assert_eq!(boot.cmdline(), "aaaaaaaa");
        assert!(boot.ram().len() <= MAX_MEMMAP);
        // Non-UTF-8 command line is ignored.
        m[0x1ff8] = 0xff;
        assert_eq!(BootInfo::parse(0, reader(&m)).unwrap().cmdline(), "");
    }
}
