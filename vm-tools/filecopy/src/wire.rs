//! qrexec-lib's file-copy wire format, byte for byte (little-endian, as the
//! x86 qubes that speak it): `struct file_header` (32 bytes) before each
//! entry, followed by the name (with its NUL) and then the file contents or
//! the symlink target; a header with `namelen == 0` ends the stream. The
//! receiver answers with `struct result_header` (16 bytes: error code,
//! padding, CRC-32 of everything it read) and `struct result_header_ext`
//! (length + last file name, no NUL).
//!
//! Parsing is smoltcp-style: `Packet::new_checked` checks the length once,
//! after which no accessor can panic. Nothing here trusts a length field.
#![deny(clippy::indexing_slicing)]

use core::fmt;

/// Longest name or symlink target Qubes accepts, including the NUL.
pub const MAX_PATH_LENGTH: usize = 16384;

/// The fields' byte ranges.
mod field {
    use core::ops::Range;
    pub const NAMELEN: Range<usize> = 0..4;
    pub const MODE: Range<usize> = 4..8;
    pub const FILELEN: Range<usize> = 8..16;
    pub const ATIME: Range<usize> = 16..20;
    pub const ATIME_NSEC: Range<usize> = 20..24;
    pub const MTIME: Range<usize> = 24..28;
    pub const MTIME_NSEC: Range<usize> = 28..32;
    pub const FILE_HEADER_END: usize = 32;

    pub const ERROR_CODE: Range<usize> = 0..4;
    pub const PAD: Range<usize> = 4..8;
    pub const CRC32: Range<usize> = 8..16;
    pub const RESULT_HEADER_END: usize = 16;

    pub const LAST_NAMELEN: Range<usize> = 0..4;
}

pub const FILE_HEADER_LEN: usize = field::FILE_HEADER_END;
pub const RESULT_HEADER_LEN: usize = field::RESULT_HEADER_END;
pub const RESULT_HEADER_EXT_LEN: usize = 4;

/// A buffer too short for the structure asked of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    pub needed: usize,
    pub got: usize,
}

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "truncated header: {} bytes, {} needed",
            self.got, self.needed
        )
    }
}

impl std::error::Error for Truncated {}

fn u32_at(bytes: &[u8], range: core::ops::Range<usize>) -> u32 {
    let mut raw = [0u8; 4];
    if let Some(src) = bytes.get(range) {
        raw.copy_from_slice(src);
    }
    u32::from_le_bytes(raw)
}

fn u64_at(bytes: &[u8], range: core::ops::Range<usize>) -> u64 {
    let mut raw = [0u8; 8];
    if let Some(src) = bytes.get(range) {
        raw.copy_from_slice(src);
    }
    u64::from_le_bytes(raw)
}

fn put(bytes: &mut [u8], range: core::ops::Range<usize>, value: &[u8]) {
    if let Some(dst) = bytes.get_mut(range) {
        dst.copy_from_slice(value);
    }
}

/// A `struct file_header` in a buffer.
#[derive(Debug, Clone, Copy)]
pub struct FileHeaderPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> FileHeaderPacket<T> {
    pub fn new_checked(buffer: T) -> Result<Self, Truncated> {
        let got = buffer.as_ref().len();
        if got < FILE_HEADER_LEN {
            return Err(Truncated {
                needed: FILE_HEADER_LEN,
                got,
            });
        }
        Ok(Self { buffer })
    }
    pub fn namelen(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::NAMELEN)
    }
    pub fn mode(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::MODE)
    }
    pub fn filelen(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::FILELEN)
    }
    pub fn atime(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::ATIME)
    }
    pub fn atime_nsec(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::ATIME_NSEC)
    }
    pub fn mtime(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::MTIME)
    }
    pub fn mtime_nsec(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::MTIME_NSEC)
    }
}

/// The parsed form of a `struct file_header` (raw integers: the mode's type
/// bits are interpreted by [`EntryKind::from_mode`], never trusted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileHeader {
    pub namelen: u32,
    pub mode: u32,
    pub filelen: u64,
    pub atime: u32,
    pub atime_nsec: u32,
    pub mtime: u32,
    pub mtime_nsec: u32,
}

impl FileHeader {
    pub fn parse<T: AsRef<[u8]>>(packet: &FileHeaderPacket<T>) -> Self {
        Self {
            namelen: packet.namelen(),
            mode: packet.mode(),
            filelen: packet.filelen(),
            atime: packet.atime(),
            atime_nsec: packet.atime_nsec(),
            mtime: packet.mtime(),
            mtime_nsec: packet.mtime_nsec(),
        }
    }

    pub fn emit(&self) -> [u8; FILE_HEADER_LEN] {
        let mut out = [0u8; FILE_HEADER_LEN];
        put(&mut out, field::NAMELEN, &self.namelen.to_le_bytes());
        put(&mut out, field::MODE, &self.mode.to_le_bytes());
        put(&mut out, field::FILELEN, &self.filelen.to_le_bytes());
        put(&mut out, field::ATIME, &self.atime.to_le_bytes());
        put(&mut out, field::ATIME_NSEC, &self.atime_nsec.to_le_bytes());
        put(&mut out, field::MTIME, &self.mtime.to_le_bytes());
        put(&mut out, field::MTIME_NSEC, &self.mtime_nsec.to_le_bytes());
        out
    }

    /// The end-of-transfer marker: an all-zero header.
    pub const fn end_marker() -> Self {
        Self {
            namelen: 0,
            mode: 0,
            filelen: 0,
            atime: 0,
            atime_nsec: 0,
            mtime: 0,
            mtime_nsec: 0,
        }
    }
}

/// What a header's mode says the entry is (`S_IFMT` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Regular,
    Directory,
    Symlink,
    Unknown(u32),
}

pub const S_IFMT: u32 = 0o170_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFLNK: u32 = 0o120_000;

impl EntryKind {
    pub fn from_mode(mode: u32) -> Self {
        match mode & S_IFMT {
            S_IFREG => Self::Regular,
            S_IFDIR => Self::Directory,
            S_IFLNK => Self::Symlink,
            other => Self::Unknown(other),
        }
    }
}

/// A `struct result_header` in a buffer.
#[derive(Debug, Clone, Copy)]
pub struct ResultHeaderPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ResultHeaderPacket<T> {
    pub fn new_checked(buffer: T) -> Result<Self, Truncated> {
        let got = buffer.as_ref().len();
        if got < RESULT_HEADER_LEN {
            return Err(Truncated {
                needed: RESULT_HEADER_LEN,
                got,
            });
        }
        Ok(Self { buffer })
    }
    pub fn error_code(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::ERROR_CODE)
    }
    pub fn pad(&self) -> u32 {
        u32_at(self.buffer.as_ref(), field::PAD)
    }
    /// The receiver's CRC; an `unsigned long` on the wire, compared whole.
    pub fn crc32(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::CRC32)
    }
}

/// The receiver's answer: `result_header` plus, normally, the
/// `result_header_ext` naming the last file it processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultReport {
    pub error_code: u32,
    pub crc32: u64,
    pub last_name: Option<Vec<u8>>,
}

impl ResultReport {
    pub fn emit(&self) -> Vec<u8> {
        let mut out = vec![0u8; RESULT_HEADER_LEN];
        put(&mut out, field::ERROR_CODE, &self.error_code.to_le_bytes());
        put(&mut out, field::PAD, &0u32.to_le_bytes());
        put(&mut out, field::CRC32, &self.crc32.to_le_bytes());
        if let Some(name) = &self.last_name {
            let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name.get(..len as usize).unwrap_or(name));
        }
        out
    }
}

/// `result_header_ext.last_namelen`, from its 4 bytes.
pub fn last_namelen(bytes: &[u8]) -> Result<u32, Truncated> {
    if bytes.len() < RESULT_HEADER_EXT_LEN {
        return Err(Truncated {
            needed: RESULT_HEADER_EXT_LEN,
            got: bytes.len(),
        });
    }
    Ok(u32_at(bytes, field::LAST_NAMELEN))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: a panic is a test failure here
mod tests {
    use super::*;

    #[test]
    fn file_header_round_trip_and_layout() {
        let header = FileHeader {
            namelen: 0x0403_0201,
            mode: 0o100_644,
            filelen: 0x0102_0304_0506_0708,
            atime: 11,
            atime_nsec: 12,
            mtime: 13,
            mtime_nsec: 14,
        };
        let bytes = header.emit();
        assert_eq!(&bytes[0..4], &[1, 2, 3, 4]);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(bytes[28], 14);
        let packet = FileHeaderPacket::new_checked(&bytes[..]).unwrap();
        assert_eq!(FileHeader::parse(&packet), header);
    }

    #[test]
    fn short_buffers_are_refused() {
        assert_eq!(
            FileHeaderPacket::new_checked(&[0u8; 31][..]).unwrap_err(),
            Truncated {
                needed: 32,
                got: 31
            }
        );
        assert!(ResultHeaderPacket::new_checked(&[0u8; 15][..]).is_err());
        assert!(last_namelen(&[1, 2, 3]).is_err());
    }

    #[test]
    fn result_report_layout() {
        let report = ResultReport {
            error_code: 17,
            crc32: 0xAABB_CCDD,
            last_name: Some(b"a/b".to_vec()),
        };
        let bytes = report.emit();
        assert_eq!(bytes.len(), 16 + 4 + 3);
        let packet = ResultHeaderPacket::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.error_code(), 17);
        assert_eq!(packet.pad(), 0);
        assert_eq!(packet.crc32(), 0xAABB_CCDD);
        assert_eq!(last_namelen(&bytes[16..]).unwrap(), 3);
        assert_eq!(&bytes[20..], b"a/b");
        let bare = ResultReport {
            error_code: 36,
            crc32: 1,
            last_name: None,
        }
        .emit();
        assert_eq!(bare.len(), 16);
    }

    #[test]
    fn kinds_from_mode() {
        assert_eq!(EntryKind::from_mode(0o100_600), EntryKind::Regular);
        assert_eq!(EntryKind::from_mode(0o040_755), EntryKind::Directory);
        assert_eq!(EntryKind::from_mode(0o120_777), EntryKind::Symlink);
        assert_eq!(
            EntryKind::from_mode(0o010_644),
            EntryKind::Unknown(0o010_000)
        );
    }
}
