//! OTR wire types (spec §"Data types"): BYTE, SHORT, INT, MPI, DATA, CTR, MAC.
//!
//! [`Writer`] appends big-endian encodings to a buffer (a [`SecretBytes`]
//! for encodings that hold secrets, such as the EKM snapshot); [`Reader`] reads them
//! from a borrowed slice and every read is bounds-checked, so truncated input
//! becomes [`CodecError::Truncated`], never a panic. Decoders finish with
//! [`Reader::finish`], which rejects trailing bytes. [`Overwriter`] writes
//! fields over an existing encoding instead (the EKM snapshot is patched in
//! place between messages); encoders that serve both take a [`Sink`].

use thiserror::Error;
use zeroize::Zeroize;

use super::crypto::SecretBytes;

/// Largest MPI or DATA field we accept from the wire. Nothing in OTR v3 is
/// legitimately larger than a data message body, which the fragment and
/// stanza bounds already cap far below this.
pub const MAX_FIELD_BYTES: usize = 1 << 20;

/// A malformed encoding.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The input ended inside a field.
    #[error("truncated: needed {needed} more bytes for {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// How many bytes were missing.
        needed: usize,
    },
    /// Bytes were left over after the last field.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A length prefix was larger than any legitimate field.
    #[error("{what} length {len} exceeds the limit")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// The announced length.
        len: usize,
    },
    /// An MPI had a leading zero byte (not minimal), which the spec forbids
    /// and which would make two encodings of one number.
    #[error("MPI is not minimally encoded")]
    NonMinimalMpi,
}

/// Appends OTR wire encodings to a byte vector, or to a [`SecretBytes`]
/// ([`Writer::secret`]) for encodings that hold secrets.
#[derive(Debug, Clone)]
pub struct Writer {
    buf: Buf,
}

/// Where a [`Writer`] writes.
#[derive(Debug, Clone)]
enum Buf {
    Plain(Vec<u8>),
    Secret(SecretBytes),
}

impl Default for Writer {
    fn default() -> Self {
        Self {
            buf: Buf::Plain(Vec::new()),
        }
    }
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer with `cap` bytes reserved.
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: Buf::Plain(Vec::with_capacity(cap)),
        }
    }

    /// A writer into `buf`, emptied, with `cap` bytes reserved: reuses its
    /// allocation.
    pub fn reusing(mut buf: Vec<u8>, cap: usize) -> Self {
        buf.clear();
        buf.reserve_exact(cap);
        Self {
            buf: Buf::Plain(buf),
        }
    }

    /// A writer into a [`SecretBytes`] with `cap` bytes reserved; finish
    /// with [`Writer::into_secret`].
    pub fn secret(cap: usize) -> Self {
        Self {
            buf: Buf::Secret(SecretBytes::with_capacity(cap)),
        }
    }

    /// Appends raw bytes to whichever buffer this is.
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        match &mut self.buf {
            Buf::Plain(v) => v.extend_from_slice(bytes),
            Buf::Secret(s) => s.extend_from_slice(bytes),
        }
    }

    /// BYTE.
    #[inline]
    pub fn byte(&mut self, v: u8) -> &mut Self {
        self.put(&[v]);
        self
    }

    /// SHORT (2 bytes, big-endian).
    #[inline]
    pub fn short(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_be_bytes());
        self
    }

    /// INT (4 bytes, big-endian).
    #[inline]
    pub fn int(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_be_bytes());
        self
    }

    /// MPI: 4-byte length then the big-endian magnitude without leading
    /// zeros. Leading zero bytes in `magnitude` are stripped.
    #[inline]
    pub fn mpi(&mut self, magnitude: &[u8]) -> &mut Self {
        let start = magnitude
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(magnitude.len());
        self.data(&magnitude[start..])
    }

    /// DATA: 4-byte length then the bytes.
    #[inline]
    pub fn data(&mut self, bytes: &[u8]) -> &mut Self {
        // Lengths we write come from our own buffers, far below 4 GiB.
        self.int(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
        self.put(bytes);
        self
    }

    /// Raw bytes with no length prefix (CTR, MAC, fixed-size fields).
    #[inline]
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.put(bytes);
        self
    }

    /// Bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        match &self.buf {
            Buf::Plain(v) => v,
            Buf::Secret(s) => s,
        }
    }

    /// The encoded bytes. For a [`Writer::secret`] writer this is an
    /// unprotected copy (the secret buffer is wiped): use
    /// [`Writer::into_secret`] there.
    pub fn into_vec(self) -> Vec<u8> {
        match self.buf {
            Buf::Plain(v) => v,
            Buf::Secret(s) => s.to_vec(),
        }
    }

    /// The encoded bytes as a [`SecretBytes`]. For a plain writer the
    /// bytes are copied and the vector is wiped.
    pub fn into_secret(self) -> SecretBytes {
        match self.buf {
            Buf::Secret(s) => s,
            Buf::Plain(mut v) => {
                let s = SecretBytes::from_slice(&v);
                v.zeroize();
                s
            }
        }
    }
}

/// Where an encoder puts raw bytes: a [`Writer`] (appending) or an
/// [`Overwriter`] (rewriting an encoding in place), so one function
/// describes a field sequence for both.
pub trait Sink {
    /// Puts `bytes` next.
    fn put_raw(&mut self, bytes: &[u8]);
}

impl Sink for Writer {
    #[inline]
    fn put_raw(&mut self, bytes: &[u8]) {
        self.put(bytes);
    }
}

/// Overwrites consecutive bytes of a slice from its start: patches fields
/// of an encoding whose layout is known not to have changed. Never panics:
/// writing past the end is recorded and [`Overwriter::finish`] reports it.
#[derive(Debug)]
pub struct Overwriter<'a> {
    rest: &'a mut [u8],
    overflow: bool,
}

impl<'a> Overwriter<'a> {
    /// An overwriter over `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            rest: buf,
            overflow: false,
        }
    }

    /// Whether exactly the whole slice was written.
    pub fn finish(self) -> bool {
        !self.overflow && self.rest.is_empty()
    }
}

impl Sink for Overwriter<'_> {
    #[inline]
    fn put_raw(&mut self, bytes: &[u8]) {
        if bytes.len() > self.rest.len() {
            self.overflow = true;
            return;
        }
        let (dst, tail) = std::mem::take(&mut self.rest).split_at_mut(bytes.len());
        dst.copy_from_slice(bytes);
        self.rest = tail;
    }
}

/// Reads OTR wire encodings from a borrowed slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Position from the start of the buffer.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The bytes consumed so far (used for MAC'd prefixes).
    pub fn consumed(&self) -> &'a [u8] {
        &self.buf[..self.pos]
    }

    /// Take `n` raw bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if self.remaining() < n {
            return Err(CodecError::Truncated {
                what,
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// Take exactly `N` raw bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let s = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// BYTE.
    pub fn byte(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// SHORT.
    pub fn short(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// INT.
    pub fn int(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// DATA: a length-prefixed byte string.
    pub fn data(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let len = self.int(what)? as usize;
        if len > MAX_FIELD_BYTES {
            return Err(CodecError::TooLong { what, len });
        }
        self.take(len, what)
    }

    /// MPI: a length-prefixed big-endian magnitude. Leading zero bytes are
    /// tolerated on input (libotr's gcrypt never writes them, but some
    /// encoders have), and stripped from the returned slice.
    pub fn mpi(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let raw = self.data(what)?;
        let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
        Ok(&raw[start..])
    }

    /// The rest of the buffer.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// Succeeds only if every byte was consumed.
    pub fn finish(self) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(CodecError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_type() {
        let mut w = Writer::new();
        w.byte(7)
            .short(0x0203)
            .int(0xdead_beef)
            .mpi(&[0, 0, 1, 2])
            .data(b"abc")
            .raw(&[9; 8]);
        let bytes = w.into_vec();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.byte("b").unwrap(), 7);
        assert_eq!(r.short("s").unwrap(), 0x0203);
        assert_eq!(r.int("i").unwrap(), 0xdead_beef);
        assert_eq!(r.mpi("m").unwrap(), &[1, 2]);
        assert_eq!(r.data("d").unwrap(), b"abc");
        assert_eq!(r.array::<8>("c").unwrap(), [9; 8]);
        r.finish().unwrap();
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let bytes = [0, 0, 0, 10, 1, 2];
        let mut r = Reader::new(&bytes);
        assert!(matches!(r.data("d"), Err(CodecError::Truncated { .. })));
        let mut r = Reader::new(&[1]);
        assert!(r.int("i").is_err());
    }

    #[test]
    fn rejects_trailing_bytes_and_huge_lengths() {
        let mut r = Reader::new(&[1, 2]);
        r.byte("b").unwrap();
        assert_eq!(r.finish(), Err(CodecError::TrailingBytes(1)));
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(r.data("d"), Err(CodecError::TooLong { .. })));
    }

    #[test]
    fn zero_mpi_is_empty() {
        let mut w = Writer::new();
        w.mpi(&[0, 0]);
        assert_eq!(w.as_slice(), &[0, 0, 0, 0]);
    }
}
