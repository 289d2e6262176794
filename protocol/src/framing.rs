//! Reassembly of header + length-prefixed messages from a byte stream that
//! arrives in arbitrary chunks (ring reads, socket reads): the common core of
//! the QubesDB and XenStore stream decoders.
//!
//! It holds at most one message in a fixed buffer and never allocates. The
//! caller's `body_len` checks each complete header and says how long the
//! body is; a rejected header (or a length that does not fit the buffer)
//! fails the reassembler for good, because a stream that lost its framing
//! cannot be resynchronised. It must never trust the length it reads before
//! `body_len` has accepted it.

/// Why [`Reassembler::feed`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault<E> {
    /// The stream failed earlier, or a message would not fit the buffer.
    Failed,
    /// `body_len` rejected the header just completed.
    Header(E),
}

/// One message's worth of buffer and where the stream stands.
#[derive(Debug, Clone)]
pub(crate) struct Reassembler<const N: usize> {
    buffer: [u8; N],
    filled: usize,
    /// The buffer holds a complete message that was handed out; the next
    /// `feed` starts a new one.
    delivered: bool,
    failed: bool,
}

impl<const N: usize> Default for Reassembler<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Reassembler<N> {
    pub(crate) const fn new() -> Self {
        Reassembler {
            buffer: [0; N],
            filled: 0,
            delivered: false,
            failed: false,
        }
    }

    /// Bytes of an incomplete message held so far.
    pub(crate) fn buffered(&self) -> usize {
        if self.delivered { 0 } else { self.filled }
    }

    /// Consumes bytes from `input` up to the end of the current message.
    /// Returns how many were consumed and, when they completed a message,
    /// its bytes (header and body; valid until the next call).
    pub(crate) fn feed<E>(
        &mut self,
        input: &[u8],
        header_len: usize,
        body_len: impl FnOnce(&[u8]) -> Result<usize, E>,
    ) -> Result<(usize, Option<&[u8]>), Fault<E>> {
        if self.failed {
            return Err(Fault::Failed);
        }
        if self.delivered {
            self.filled = 0;
            self.delivered = false;
        }
        let mut consumed = self.take(input, header_len);
        if self.filled < header_len {
            return Ok((consumed, None));
        }
        let header = self.buffer.get(..header_len).unwrap_or(&[]);
        let total = match body_len(header) {
            Ok(len) if header_len + len <= N => header_len + len,
            Ok(_) => {
                self.failed = true;
                return Err(Fault::Failed);
            }
            Err(error) => {
                self.failed = true;
                return Err(Fault::Header(error));
            }
        };
        consumed += self.take(input.get(consumed..).unwrap_or(&[]), total);
        if self.filled < total {
            return Ok((consumed, None));
        }
        self.delivered = true;
        Ok((consumed, Some(self.buffer.get(..total).unwrap_or(&[]))))
    }

    /// Copies from `input` until `filled` reaches `target`; returns bytes taken.
    fn take(&mut self, input: &[u8], target: usize) -> usize {
        let want = target.saturating_sub(self.filled).min(input.len());
        if let (Some(dst), Some(src)) = (
            self.buffer.get_mut(self.filled..self.filled + want),
            input.get(..want),
        ) {
            dst.copy_from_slice(src);
            self.filled += want;
            want
        } else {
            0
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    /// A 2-byte header holding the body length.
    fn body_len(header: &[u8]) -> Result<usize, &'static str> {
        match header {
            [0xff, _] => Err("bad header"),
            [_, len] => Ok(usize::from(*len)),
            _ => Err("short"),
        }
    }

    #[test]
    fn messages_come_whole_whatever_the_chunking() {
        let stream = [0, 3, b'a', b'b', b'c', 0, 0, 0, 1, b'z'];
        for chunk in 1..=stream.len() {
            let mut r = Reassembler::<8>::new();
            let mut got: [Option<([u8; 8], usize)>; 3] = [None; 3];
            let mut count = 0;
            for piece in stream.chunks(chunk) {
                let mut rest = piece;
                while !rest.is_empty() {
                    let (used, message) = r.feed(rest, 2, body_len).unwrap();
                    if let Some(message) = message {
                        let mut copy = [0u8; 8];
                        copy[..message.len()].copy_from_slice(message);
                        got[count] = Some((copy, message.len()));
                        count += 1;
                    }
                    rest = &rest[used..];
                }
            }
            assert_eq!(count, 3, "chunk {chunk}");
            assert_eq!(
                got[0].map(|(m, n)| m[..n].to_vec()),
                Some(b"\x00\x03abc".to_vec())
            );
            assert_eq!(got[1].map(|(_, n)| n), Some(2));
            assert_eq!(
                got[2].map(|(m, n)| m[..n].to_vec()),
                Some(b"\x00\x01z".to_vec())
            );
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn a_bad_header_or_an_oversized_body_fails_for_good() {
        let mut r = Reassembler::<8>::new();
        assert_eq!(
            r.feed(&[0xff, 0], 2, body_len),
            Err(Fault::Header("bad header"))
        );
        assert_eq!(r.feed(&[0, 0], 2, body_len), Err(Fault::Failed));

        let mut r = Reassembler::<8>::new();
        assert_eq!(r.feed(&[0, 7], 2, body_len), Err(Fault::Failed));
        assert_eq!(r.feed(&[0, 0], 2, body_len), Err(Fault::Failed));
    }

    #[test]
    fn an_incomplete_message_is_held() {
        let mut r = Reassembler::<8>::new();
        assert_eq!(r.feed(&[0], 2, body_len), Ok((1, None)));
        assert_eq!(r.buffered(), 1);
        assert_eq!(r.feed(&[4, b'x'], 2, body_len), Ok((2, None)));
        assert_eq!(r.buffered(), 3);
    }
}
