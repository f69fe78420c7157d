//! [`SecretBytes`]: a byte buffer for secrets, wiped a word at a time on
//! drop; [`SecretArray`]: a fixed-size one on the stack.
//!
//! `Zeroizing<Vec<u8>>` wipes with one volatile store per *byte* (this
//! crate forbids unsafe code). The EKM snapshot (~1.6 KiB, DESIGN §5) is
//! made for every message on each side and dropped once the store has it,
//! so that wipe was ~10 % of a one-way burst message. Here the bytes live
//! in `u64` words, viewed as bytes through `bytemuck` (a safe cast), and
//! the wipe is an ordinary fill with zeros (a vectorised `memset`) followed
//! by [`zeroize::optimization_barrier`], which makes the compiler assume
//! the zeros are read, so the fill cannot be removed as a dead store before
//! the free (the pattern the `zeroize` crate documents for this; one
//! volatile store per word was still ~2 % of a burst message).
//!
//! The buffer never reallocates in place: growing copies into a fresh
//! buffer and wipes the old one, so no unwiped copy is left in freed memory
//! (`Vec::reserve` could leave one).
//!
//! A dropped buffer's storage, once wiped, is kept for the next buffer made
//! on the same thread (at most four, of up to 8 KiB each): a burst makes
//! and drops two snapshots per message, too large for the allocator's
//! per-thread cache, and their `malloc`/`free` cost more than the copy.
//! Kept storage holds only zeros: every buffer zeroes the words it used
//! before it is dropped or kept, and never writes beyond them.

use std::cell::RefCell;
use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

const WORD: usize = std::mem::size_of::<u64>();

/// Most wiped storages kept per thread for reuse.
const SPARE_BUFFERS: usize = 4;
/// Largest storage kept for reuse, in words (8 KiB).
const SPARE_MAX_WORDS: usize = 1024;

thread_local! {
    /// Wiped storage of dropped buffers (all zeros; see the module docs).
    static SPARE: RefCell<Vec<Vec<u64>>> = const { RefCell::new(Vec::new()) };
}

/// Kept storage, emptied, or a new empty vector.
fn spare_storage() -> Vec<u64> {
    let mut words = SPARE
        .try_with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()))
        .ok()
        .flatten()
        .unwrap_or_default();
    words.clear();
    words
}

/// Keeps wiped storage for reuse if there is room; frees it otherwise.
fn keep_storage(words: Vec<u64>) {
    if words.capacity() == 0 || words.capacity() > SPARE_MAX_WORDS {
        return;
    }
    // During thread teardown the list may be gone: then it is just freed.
    let _ = SPARE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut()
            && s.len() < SPARE_BUFFERS
        {
            s.push(words);
        }
    });
}

/// A growable byte buffer holding secrets; wiped on drop (and before its
/// storage is replaced when it grows). `Debug` prints only the length.
#[derive(Default)]
pub struct SecretBytes {
    /// Storage; every word is initialised, `words.len() * 8` is the
    /// capacity in bytes.
    words: Vec<u64>,
    /// Bytes in use, from the start of `words`.
    len: usize,
}

impl SecretBytes {
    /// An empty buffer (no allocation).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty buffer with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        let mut words = spare_storage();
        words.resize(cap.div_ceil(WORD), 0);
        Self { words, len: 0 }
    }

    /// A copy of `bytes` (the caller wipes the original if it must).
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut s = Self::with_capacity(bytes.len());
        s.extend_from_slice(bytes);
        s
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }

    /// The bytes, mutable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[..self.len]
    }

    /// Appends one byte.
    pub fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b]);
    }

    /// Appends `bytes`, growing into a fresh buffer if needed.
    #[inline]
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let end = self.len.saturating_add(bytes.len());
        // One bounds check on the fast path (the snapshot encoders append
        // ~100 small fields into an exactly sized buffer).
        if let Some(dst) =
            bytemuck::cast_slice_mut::<u64, u8>(&mut self.words).get_mut(self.len..end)
        {
            dst.copy_from_slice(bytes);
        } else {
            self.grow(end);
            bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[self.len..end]
                .copy_from_slice(bytes);
        }
        self.len = end;
    }

    /// Moves the contents into a buffer of at least `needed` bytes (and at
    /// least twice the current capacity); the old storage is wiped.
    #[cold]
    fn grow(&mut self, needed: usize) {
        let cap = needed.max(self.words.len() * WORD * 2);
        let mut next = Self::with_capacity(cap);
        next.extend_from_slice(self.as_slice());
        // The old buffer is dropped here, and wiped.
        *self = next;
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.words.fill(0);
        zeroize::optimization_barrier(self.words.as_slice());
        keep_storage(std::mem::take(&mut self.words));
    }
}

impl std::ops::Deref for SecretBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for SecretBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AsRef<[u8]> for SecretBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Clone for SecretBytes {
    /// Copies the words in use (the snapshot is copied for every message):
    /// no zero-filling first.
    fn clone(&self) -> Self {
        let mut words = spare_storage();
        words.extend_from_slice(
            self.words
                .get(..self.len.div_ceil(WORD))
                .unwrap_or(&self.words),
        );
        Self {
            words,
            len: self.len,
        }
    }
}

/// Constant-time in the contents (the lengths are not secret).
impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice().ct_eq(other.as_slice()).into()
    }
}

impl Eq for SecretBytes {}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.len)
    }
}

/// `N` secret bytes without a heap allocation (a DH secret written into
/// each snapshot); wiped on drop. Derefs to `[u8]`; `Debug` prints only
/// the length. Aligned to a word so that it is wiped a word at a time
/// (three are made per snapshot).
#[repr(C, align(8))]
pub struct SecretArray<const N: usize>(pub [u8; N]);

impl<const N: usize> Drop for SecretArray<N> {
    fn drop(&mut self) {
        // The alignment makes the cast succeed whenever N is a multiple
        // of the word size; other lengths are wiped byte by byte.
        match bytemuck::try_cast_slice_mut::<u8, u64>(&mut self.0) {
            Ok(words) => words.zeroize(),
            Err(_) => self.0.zeroize(),
        }
    }
}

impl<const N: usize> std::ops::Deref for SecretArray<N> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl<const N: usize> fmt::Debug for SecretArray<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretArray(<{N} bytes redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_was_written_across_growth() {
        let mut s = SecretBytes::with_capacity(3);
        let mut want = Vec::new();
        for i in 0..100u8 {
            s.push(i);
            want.push(i);
            s.extend_from_slice(&[i; 7][..usize::from(i % 8)]);
            want.extend_from_slice(&[i; 7][..usize::from(i % 8)]);
            assert_eq!(s.as_slice(), want.as_slice());
        }
        assert_eq!(s.len(), want.len());
        assert_eq!(SecretBytes::from_slice(&want), s);
        assert_eq!(s.clone(), s);
        s.as_mut_slice()[0] = 0xff;
        assert_ne!(SecretBytes::from_slice(&want), s);
    }

    #[test]
    fn exact_capacity_and_empty() {
        for n in [0usize, 1, 7, 8, 9, 1600, 1601] {
            let bytes: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let s = SecretBytes::from_slice(&bytes);
            assert_eq!(&*s, bytes.as_slice());
            assert_eq!(s.words.len(), n.div_ceil(WORD), "no spare words");
        }
        assert!(SecretBytes::new().is_empty());
    }

    /// Dropped buffers leave only zeros in the storage kept for reuse, and
    /// a buffer made from kept storage starts as zeros.
    #[test]
    fn kept_storage_is_wiped() {
        let kept_are_zeros = || {
            SPARE.with(|s| {
                let s = s.borrow();
                assert!(!s.is_empty());
                s.iter().all(|v| v.iter().all(|&w| w == 0))
            })
        };
        let big = SecretBytes::from_slice(&[0xaa; 1601]);
        let copy = big.clone();
        drop(big);
        assert!(kept_are_zeros());
        let mut reused = SecretBytes::with_capacity(800);
        assert!(reused.words.iter().all(|&w| w == 0));
        reused.extend_from_slice(&[0x55; 800]);
        assert_eq!(copy.len(), 1601);
        assert!(copy.iter().all(|&b| b == 0xaa));
        drop(copy);
        drop(reused);
        assert!(kept_are_zeros());
        // Never more than the bound, whatever is dropped.
        let many: Vec<_> = (0..2 * SPARE_BUFFERS)
            .map(|_| SecretBytes::from_slice(&[1; 100]))
            .collect();
        drop(many);
        assert!(kept_are_zeros());
        assert!(SPARE.with(|s| s.borrow().len()) <= SPARE_BUFFERS);
    }

    #[test]
    fn debug_does_not_print_the_bytes() {
        let s = SecretBytes::from_slice(b"secret");
        assert_eq!(format!("{s:?}"), "SecretBytes(<6 bytes redacted>)");
    }
}
