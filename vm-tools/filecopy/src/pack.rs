//! The sending side (`qfile-agent`): walks the given files and directories
//! and writes the qrexec-lib stream, then checks the receiver's answer.
//!
//! Each argument is sent relative to its own parent directory (`a/b/c` is
//! sent as `c`), directories before and again after their contents (so the
//! receiver can set their final mode and times last), symlinks as their
//! target, other file types skipped, as Qubes' packer does. A result that
//! arrives early (the receiver refused something) stops the transfer.
#![deny(clippy::indexing_slicing)]

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, TryRecvError};

use crate::crc32::Crc32;
use crate::errno::{EDQUOT, EEXIST, EILSEQ, EINVAL, ENOLINK};
use crate::wire::{
    self, FileHeader, MAX_PATH_LENGTH, RESULT_HEADER_EXT_LEN, RESULT_HEADER_LEN, ResultHeaderPacket,
};

/// What the receiver answered, as read (`None`: it closed without answering).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub error_code: u32,
    pub crc32: u64,
    pub last_name: Vec<u8>,
    /// The extension announced a last file name that did not arrive whole
    /// (the sender reports "Failed to get last filename", as Qubes' does).
    pub last_name_cut: bool,
}

/// Read the receiver's answer: `result_header`, then (if present)
/// `result_header_ext` and up to `MAX_PATH_LENGTH` bytes of name.
pub fn read_answer<R: Read>(mut input: R) -> Option<Answer> {
    let mut raw = [0u8; RESULT_HEADER_LEN];
    input.read_exact(&mut raw).ok()?;
    let packet = ResultHeaderPacket::new_checked(&raw[..]).ok()?;
    let mut answer = Answer {
        error_code: packet.error_code(),
        crc32: packet.crc32(),
        last_name: Vec::new(),
        last_name_cut: false,
    };
    let mut ext = [0u8; RESULT_HEADER_EXT_LEN];
    if input.read_exact(&mut ext).is_ok() {
        let len = wire::last_namelen(&ext)
            .unwrap_or(0)
            .min(MAX_PATH_LENGTH as u32) as usize;
        let mut name = vec![0u8; len];
        if input.read_exact(&mut name).is_ok() {
            answer.last_name = name;
        } else {
            answer.last_name_cut = true;
        }
    }
    Some(answer)
}

/// Turn the receiver's answer into the sender's verdict, with Qubes'
/// messages. `Err(None)`: fail silently (the receiver already complained).
pub fn judge(answer: Option<&Answer>, sent_crc: u32) -> Result<(), Option<String>> {
    let Some(answer) = answer else {
        return Err(None);
    };
    let name = crate::unpack::printable(&answer.last_name);
    let prefix = if answer.last_name.is_empty() {
        ""
    } else {
        "; Last file: "
    };
    match answer.error_code {
        0 => {}
        EEXIST => {
            return Err(Some(format!(
                "A file named \"{name}\" already exists in QubesIncoming dir"
            )));
        }
        EINVAL => {
            return Err(Some(format!(
                "File copy: Corrupted data from packer{prefix}\"{name}\""
            )));
        }
        EILSEQ => {
            return Err(Some(format!(
                "Forbidden character in file or link target. Name might look somewhat like \"{name}\""
            )));
        }
        ENOLINK => {
            return Err(Some(format!(
                "Cannot verify that link at \"{name}\" would not be broken by copy"
            )));
        }
        code => {
            let reason = if code == EDQUOT {
                "Disk quota exceeded".to_string()
            } else {
                strerror(code)
            };
            return Err(Some(format!("File copy: \"{reason}{prefix}{name}\"")));
        }
    }
    if answer.crc32 != u64::from(sent_crc) {
        return Err(Some("File transfer failed: checksum mismatch".to_string()));
    }
    Ok(())
}

fn strerror(code: u32) -> String {
    let text = io::Error::from_raw_os_error(code as i32).to_string();
    // std appends " (os error N)"; Qubes prints strerror() alone.
    match text.rfind(" (os error") {
        Some(cut) => text.get(..cut).unwrap_or(&text).to_string(),
        None => text,
    }
}

/// Why the agent stopped.
#[derive(Debug)]
pub enum SendError {
    /// The receiver's verdict (message, or silent).
    Receiver(Option<String>),
    /// A local problem (message).
    Local(String),
}

/// The sender: stream out, CRC, and the receiver's answer arriving on a
/// background thread.
pub struct Packer<W: Write> {
    out: W,
    crc: Crc32,
    answers: Receiver<Option<Answer>>,
    answer: Option<Option<Answer>>,
    pub ignore_symlinks: bool,
    buffer: Vec<u8>,
    progress: Option<Box<dyn FnMut(u64) + Send>>,
    sent_bytes: u64,
}

impl<W: Write> std::fmt::Debug for Packer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer")
            .field("crc", &self.crc)
            .field("sent_bytes", &self.sent_bytes)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Packer<W> {
    /// `input` is where the receiver's answer comes from (read on a thread).
    pub fn new<R: Read + Send + 'static>(out: W, input: R) -> Self {
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let answer = read_answer(input);
            if answer.as_ref().is_some_and(|a| a.last_name_cut) {
                eprintln!("Failed to get last filename");
            }
            let _ = tx.send(answer);
        });
        Self {
            out,
            crc: Crc32::new(),
            answers,
            answer: None,
            ignore_symlinks: false,
            buffer: vec![0u8; 128 * 1024],
            progress: None,
            sent_bytes: 0,
        }
    }

    pub fn set_progress(&mut self, progress: Box<dyn FnMut(u64) + Send>) {
        self.progress = Some(progress);
    }

    fn wait_answer(&mut self) -> Option<Answer> {
        if self.answer.is_none() {
            self.answer = Some(self.answers.recv().unwrap_or(None));
        }
        self.answer.clone().flatten()
    }

    /// If the receiver already answered (an early refusal), stop.
    fn check_early_answer(&mut self) -> Result<(), SendError> {
        if self.answer.is_none() {
            match self.answers.try_recv() {
                Ok(answer) => self.answer = Some(answer),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => self.answer = Some(None),
            }
        }
        let answer = self.answer.clone().flatten();
        match judge(answer.as_ref(), self.crc.value()) {
            // An early "success" cannot be right: the stream is not finished.
            Ok(()) => Err(SendError::Receiver(Some(
                "File copy: the receiver answered before the end of the transfer".to_string(),
            ))),
            Err(message) => Err(SendError::Receiver(message)),
        }
    }

    fn write_crc(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        self.crc.update(bytes);
        if self.out.write_all(bytes).is_err() {
            // The receiver went away: its answer says why.
            let answer = self.wait_answer();
            return Err(SendError::Receiver(
                judge(answer.as_ref(), self.crc.value()).err().flatten(),
            ));
        }
        Ok(())
    }

    fn header(&mut self, name: &[u8], meta: &fs::Metadata, filelen: u64) -> Result<(), SendError> {
        let header = FileHeader {
            namelen: u32::try_from(name.len() + 1).map_err(|_| {
                SendError::Local(format!("name too long: {}", crate::unpack::printable(name)))
            })?,
            mode: meta.mode(),
            filelen,
            atime: meta.atime() as u32,
            atime_nsec: meta.atime_nsec() as u32,
            mtime: meta.mtime() as u32,
            mtime_nsec: meta.mtime_nsec() as u32,
        };
        self.write_crc(&header.emit())?;
        let mut with_nul = name.to_vec();
        with_nul.push(0);
        self.write_crc(&with_nul)
    }

    /// Send one entry (not recursing). `path` is where to read it, `name`
    /// what to call it on the wire.
    fn entry(&mut self, path: &Path, name: &[u8], meta: &fs::Metadata) -> Result<(), SendError> {
        let kind = meta.file_type();
        if kind.is_file() {
            let mut file = File::open(path)
                .map_err(|e| SendError::Local(format!("open {}: {e}", path.display())))?;
            let size = meta.len();
            self.header(name, meta, size)?;
            let mut left = size;
            let mut buffer = std::mem::take(&mut self.buffer);
            let result = (|| {
                while left > 0 {
                    let want = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len());
                    let chunk = buffer.get_mut(..want).unwrap_or(&mut []);
                    let got = match file.read(chunk) {
                        Ok(0) => {
                            return Err(SendError::Local(format!(
                                "Copying file {}: Unexpected end of data while reading",
                                path.display()
                            )));
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            return Err(SendError::Local(format!(
                                "Copying file {}: Error reading",
                                path.display()
                            )));
                        }
                    };
                    self.write_crc(chunk.get(..got).unwrap_or(&[]))?;
                    left -= got as u64;
                    self.sent_bytes += got as u64;
                    if let Some(progress) = &mut self.progress {
                        progress(self.sent_bytes);
                    }
                }
                Ok(())
            })();
            self.buffer = buffer;
            result?;
        } else if kind.is_dir() {
            self.header(name, meta, 0)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(path)
                .map_err(|e| SendError::Local(format!("readlink {}: {e}", path.display())))?;
            let target = target.as_os_str().as_bytes();
            if target.len() as u64 != meta.len() {
                return Err(SendError::Local(format!("readlink {}", path.display())));
            }
            self.header(name, meta, meta.len())?;
            self.write_crc(target)?;
        }
        // Other types (FIFOs, devices, sockets) are not sent.
        self.check_early_answer()
    }

    fn walk(&mut self, path: &Path, name: &[u8]) -> Result<(), SendError> {
        let meta = fs::symlink_metadata(path)
            .map_err(|e| SendError::Local(format!("stat {}: {e}", path.display())))?;
        if meta.file_type().is_symlink() && self.ignore_symlinks {
            return Ok(());
        }
        self.entry(path, name, &meta)?;
        if !meta.is_dir() {
            return Ok(());
        }
        let entries = fs::read_dir(path)
            .map_err(|e| SendError::Local(format!("opendir {}: {e}", path.display())))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| SendError::Local(format!("readdir {}: {e}", path.display())))?;
            let child_name = [name, b"/", entry.file_name().as_bytes()].concat();
            self.walk(&entry.path(), &child_name)?;
        }
        // Resent so the receiver sets the directory's final mode and times.
        self.entry(path, name, &meta)
    }

    /// Send one command-line argument: its basename, read from its dirname.
    pub fn send_argument(&mut self, argument: &Path) -> Result<(), SendError> {
        let (dir, base) = split_argument(argument.as_os_str().as_bytes());
        let dir = PathBuf::from(OsStr::from_bytes(&dir));
        self.walk(&dir.join(OsStr::from_bytes(&base)), &base)
    }

    /// Send the end marker and judge the receiver's final answer.
    pub fn finish(mut self) -> Result<(), SendError> {
        self.write_crc(&FileHeader::end_marker().emit())?;
        let _ = self.out.flush();
        let answer = self.wait_answer();
        judge(answer.as_ref(), self.crc.value()).map_err(SendError::Receiver)
    }
}

/// POSIX `dirname`/`basename` of an argument (trailing slashes ignored).
pub fn split_argument(arg: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let trimmed_len = arg.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
    let trimmed = arg.get(..trimmed_len).unwrap_or(&[]);
    if trimmed.is_empty() {
        return (b"/".to_vec(), b"/".to_vec());
    }
    match trimmed.iter().rposition(|&b| b == b'/') {
        None => (b".".to_vec(), trimmed.to_vec()),
        Some(slash) => {
            let base = trimmed.get(slash + 1..).unwrap_or(&[]).to_vec();
            let dir = trimmed.get(..slash).unwrap_or(&[]);
            let dir_len = dir.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
            let dir = if dir_len == 0 {
                b"/".to_vec()
            } else {
                dir.get(..dir_len).unwrap_or(&[]).to_vec()
            };
            (dir, base)
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: a panic is a test failure here
mod tests {
    use super::*;

    #[test]
    fn split_like_dirname_basename() {
        assert_eq!(split_argument(b"a"), (b".".to_vec(), b"a".to_vec()));
        assert_eq!(split_argument(b"a/b/"), (b"a".to_vec(), b"b".to_vec()));
        assert_eq!(split_argument(b"/a"), (b"/".to_vec(), b"a".to_vec()));
        assert_eq!(split_argument(b"x//y"), (b"x".to_vec(), b"y".to_vec()));
        assert_eq!(split_argument(b"/"), (b"/".to_vec(), b"/".to_vec()));
    }

    #[test]
    fn a_last_name_that_does_not_arrive_whole_is_flagged() {
        let mut reply = vec![0u8; RESULT_HEADER_LEN];
        reply.extend_from_slice(&5u32.to_le_bytes());
        reply.extend_from_slice(b"ab");
        let answer = read_answer(&reply[..]).expect("a whole header");
        assert!(answer.last_name_cut);
        assert!(answer.last_name.is_empty());
        reply.extend_from_slice(b"cde");
        let answer = read_answer(&reply[..]).expect("a whole header");
        assert!(!answer.last_name_cut);
        assert_eq!(answer.last_name, b"abcde");
    }

    #[test]
    fn verdicts() {
        let ok = Answer {
            error_code: 0,
            crc32: 5,
            last_name: vec![],
            last_name_cut: false,
        };
        assert_eq!(judge(Some(&ok), 5), Ok(()));
        assert_eq!(
            judge(Some(&ok), 6),
            Err(Some("File transfer failed: checksum mismatch".into()))
        );
        assert_eq!(judge(None, 6), Err(None));
        let exists = Answer {
            error_code: EEXIST,
            crc32: 0,
            last_name: b"x\"y".to_vec(),
            last_name_cut: false,
        };
        assert_eq!(
            judge(Some(&exists), 0),
            Err(Some(
                "A file named \"x_y\" already exists in QubesIncoming dir".into()
            ))
        );
    }
}
