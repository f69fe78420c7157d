//! OTR fragmentation (spec §"Fragmentation").
//!
//! [`fragment`] splits an armoured message into pieces formatted exactly as
//! libotr 4.1.1 writes them: `?OTR|%08x|%08x,%05hu,%05hu,piece,` for
//! version 3 and `?OTR,%05hu,%05hu,piece,` for version 2 (python-potr
//! writes the v2 numbers without leading zeros; both forms are read).
//! [`parse_fragment`] reads one fragment and [`Reassembler`] applies the
//! spec's receiving rules with a bound on the memory it holds, with two
//! tolerances the spec lacks: a fragment of the message being reassembled
//! that is already held is ignored, and fragments that arrive ahead of a
//! gap are kept until the gap is filled (after a crash the server delivers
//! again what it had not seen acknowledged, and re-routes a dead session's
//! unacknowledged stanzas after newer ones; see [`Reassembler::push`]).

use std::collections::BTreeMap;

use thiserror::Error;

use super::message::{MessageError, Version, check_instance_tags};

/// Length of the v3 framing: `?OTR|` + 8 + `|` + 8 + `,` + 5 + `,` + 5 +
/// `,` + trailing `,`.
pub const V3_OVERHEAD: usize = 36;
/// Length of the v2 framing: `?OTR,` + 5 + `,` + 5 + `,` + trailing `,`.
pub const V2_OVERHEAD: usize = 18;

/// One received fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// `V3` for `?OTR|…` fragments, `V2` for `?OTR,…`.
    pub version: Version,
    /// Sender instance tag (0 for v2).
    pub sender_tag: u32,
    /// Receiver instance tag (0 for v2, or when unknown).
    pub receiver_tag: u32,
    /// This fragment's number, 1-based.
    pub k: u16,
    /// The total number of fragments.
    pub n: u16,
    /// The fragment's piece of the armoured message.
    pub piece: String,
}

impl Fragment {
    /// The fragment's text form, as libotr formats it.
    pub fn to_text(&self) -> String {
        match self.version {
            Version::V3 => format!(
                "?OTR|{:08x}|{:08x},{:05},{:05},{},",
                self.sender_tag, self.receiver_tag, self.k, self.n, self.piece
            ),
            Version::V2 => format!("?OTR,{:05},{:05},{},", self.k, self.n, self.piece),
        }
    }
}

/// Why a message could not be fragmented or a fragment was not accepted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FragmentError {
    /// `max_len` leaves no room for a piece after the framing.
    #[error("maximum fragment length {max_len} leaves no room after the {overhead}-byte framing")]
    MaxLenTooSmall {
        /// The requested maximum.
        max_len: usize,
        /// The framing length for the version.
        overhead: usize,
    },
    /// More than 65535 fragments would be needed.
    #[error("message needs more than 65535 fragments")]
    TooManyFragments,
    /// The message contains a comma, which cannot be carried in a piece.
    #[error("a message containing ',' cannot be fragmented")]
    CommaInMessage,
    /// k == 0, n == 0 or k > n: the fragment is illegal and ignored (any
    /// stored partial message is kept, as the spec says).
    #[error("illegal fragment {k}/{n}")]
    Illegal {
        /// Fragment number.
        k: u16,
        /// Fragment count.
        n: u16,
    },
    /// The fragment does not continue the stored partial message; the
    /// stored partial message was discarded.
    #[error("fragment {k}/{n} out of sequence; partial message discarded")]
    OutOfSequence {
        /// Fragment number.
        k: u16,
        /// Fragment count.
        n: u16,
    },
    /// The reassembled message would exceed the bound; the partial message
    /// was discarded.
    #[error("reassembled message would exceed {max} bytes; discarded")]
    TooLarge {
        /// The reassembler's bound.
        max: usize,
    },
    /// Partial messages from too many sender instances were being
    /// reassembled; one of them was discarded to make room.
    #[error(
        "fragmented messages from more than {max} senders at once; one partial message was discarded"
    )]
    TooManySenders {
        /// The bound on concurrent partial messages.
        max: usize,
    },
}

/// Splits `message` into fragments no longer than `max_len` bytes each,
/// framed as libotr 4.1.1 frames them.
///
/// If `message` already fits, it is returned unchanged as the only element.
/// Pieces never split a UTF-8 character. Fails if `max_len` leaves no room
/// for a piece, if more than 65535 fragments would be needed, or if the
/// message contains a `,` (which the fragment format cannot carry).
pub fn fragment(
    message: &str,
    max_len: usize,
    version: Version,
    sender_tag: u32,
    receiver_tag: u32,
) -> Result<Vec<String>, FragmentError> {
    if message.len() <= max_len {
        return Ok(vec![message.to_string()]);
    }
    if message.contains(',') {
        return Err(FragmentError::CommaInMessage);
    }
    let overhead = match version {
        Version::V3 => V3_OVERHEAD,
        Version::V2 => V2_OVERHEAD,
    };
    let room = max_len.saturating_sub(overhead);
    let too_small = FragmentError::MaxLenTooSmall { max_len, overhead };
    if room == 0 {
        return Err(too_small);
    }
    if message.len().div_ceil(room) > usize::from(u16::MAX) {
        return Err(FragmentError::TooManyFragments);
    }
    let mut pieces = Vec::with_capacity(message.len().div_ceil(room));
    let mut rest = message;
    while !rest.is_empty() {
        let mut cut = room.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            // A single character longer than the room left for a piece.
            return Err(too_small);
        }
        let (piece, tail) = rest.split_at(cut);
        pieces.push(piece);
        rest = tail;
    }
    let n = u16::try_from(pieces.len()).map_err(|_| FragmentError::TooManyFragments)?;
    Ok(pieces
        .into_iter()
        .zip(1..=n)
        .map(|(piece, k)| {
            Fragment {
                version,
                sender_tag,
                receiver_tag,
                k,
                n,
                piece: piece.to_string(),
            }
            .to_text()
        })
        .collect())
}

/// Reads one fragment from `text`, which must start with `?OTR|` (v3) or
/// `?OTR,` (v2). Anything after the closing `,` is ignored, as libotr
/// does. Tags and numbers may have leading zeros. Version 3 instance tags
/// are checked (sender at least 0x100, receiver 0 or at least 0x100). The
/// values of k and n are not judged here; [`Reassembler::push`] does that.
pub fn parse_fragment(text: &str) -> Result<Fragment, MessageError> {
    let (version, rest) = if let Some(rest) = text.strip_prefix("?OTR|") {
        (Version::V3, rest)
    } else if let Some(rest) = text.strip_prefix("?OTR,") {
        (Version::V2, rest)
    } else {
        return Err(MessageError::MalformedFragment("no fragment marker"));
    };
    let mut c = Cursor { rest };
    let (sender_tag, receiver_tag) = match version {
        Version::V3 => {
            let s = c.number(16, "sender instance tag")?;
            c.expect('|', "'|' after sender instance tag")?;
            let r = c.number(16, "receiver instance tag")?;
            c.expect(',', "',' after receiver instance tag")?;
            (s, r)
        }
        Version::V2 => (0, 0),
    };
    let k = c.short("fragment number k")?;
    c.expect(',', "',' after k")?;
    let n = c.short("fragment count n")?;
    c.expect(',', "',' after n")?;
    let end = c
        .rest
        .find(',')
        .ok_or(MessageError::MalformedFragment("unterminated piece"))?;
    if end == 0 {
        return Err(MessageError::MalformedFragment("empty piece"));
    }
    let piece = c.rest[..end].to_string();
    if version == Version::V3 {
        check_instance_tags(sender_tag, receiver_tag)?;
    }
    Ok(Fragment {
        version,
        sender_tag,
        receiver_tag,
        k,
        n,
        piece,
    })
}

struct Cursor<'a> {
    rest: &'a str,
}

impl Cursor<'_> {
    fn number(&mut self, radix: u32, what: &'static str) -> Result<u32, MessageError> {
        let len = self
            .rest
            .bytes()
            .take_while(|b| char::from(*b).is_digit(radix))
            .count();
        if len == 0 {
            return Err(MessageError::MalformedFragment(what));
        }
        let mut value: u32 = 0;
        for ch in self.rest[..len].chars() {
            let d = ch
                .to_digit(radix)
                .ok_or(MessageError::MalformedFragment(what))?;
            value = value
                .checked_mul(radix)
                .and_then(|v| v.checked_add(d))
                .ok_or(MessageError::MalformedFragment(what))?;
        }
        self.rest = &self.rest[len..];
        Ok(value)
    }

    fn short(&mut self, what: &'static str) -> Result<u16, MessageError> {
        u16::try_from(self.number(10, what)?).map_err(|_| MessageError::MalformedFragment(what))
    }

    fn expect(&mut self, ch: char, what: &'static str) -> Result<(), MessageError> {
        self.rest = self
            .rest
            .strip_prefix(ch)
            .ok_or(MessageError::MalformedFragment(what))?;
        Ok(())
    }
}

/// Whether a first piece begins an OTR data message (`?OTR:` and the
/// base64 of protocol version 3 or 2 and message type 0x03).
fn starts_data_message(piece: &str) -> bool {
    piece.starts_with("?OTR:AAMD") || piece.starts_with("?OTR:AAID")
}

/// How many fragments a [`Reassembler`] keeps ahead of a gap.
pub const MAX_AHEAD: usize = 64;

/// Reassembles fragments of one sender (spec §"Receiving Fragments"),
/// holding at most `max_total_bytes` of pieces.
///
/// The caller keeps one per (peer, sender instance) and calls
/// [`Reassembler::reset`] when an unfragmented message arrives from that
/// sender, as the spec asks.
#[derive(Debug, Clone)]
pub struct Reassembler {
    max_total_bytes: usize,
    /// (K, N) of the stored partial message; (0, 0) when empty.
    k: u16,
    n: u16,
    /// Version and tags of the stored partial message.
    origin: Option<(Version, u32, u32)>,
    buf: String,
    /// Fragments of the stored message (same n, version and tags) that
    /// arrived before one preceding them, by k (all > K + 1): appended
    /// when the gap is filled. At most [`MAX_AHEAD`].
    ahead: BTreeMap<u16, String>,
    /// The message the last [`Reassembler::push`] completed used
    /// fragments kept ahead of a gap.
    reordered: bool,
}

impl Reassembler {
    /// An empty reassembler that never holds more than `max_total_bytes`
    /// of pieces.
    pub fn new(max_total_bytes: usize) -> Self {
        Self {
            max_total_bytes,
            k: 0,
            n: 0,
            origin: None,
            buf: String::new(),
            ahead: BTreeMap::new(),
            reordered: false,
        }
    }

    /// Forgets any stored partial message.
    pub fn reset(&mut self) {
        self.k = 0;
        self.n = 0;
        self.origin = None;
        self.buf = String::new();
        self.ahead.clear();
    }

    /// Whether a partial message is stored.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes of pieces currently stored.
    pub fn stored_bytes(&self) -> usize {
        self.buf
            .len()
            .saturating_add(self.ahead.values().map(String::len).sum())
    }

    /// Whether the message the last [`Reassembler::push`] completed was
    /// put together with fragments kept ahead of a gap: a guess, wrong if
    /// two messages of the same shape were interleaved.
    pub fn reordered(&self) -> bool {
        self.reordered
    }

    /// The fragments held ahead of a gap, for durable storage next to
    /// [`Reassembler::partial`] (restored by [`Reassembler::push`]).
    pub fn ahead(&self) -> Vec<Fragment> {
        let Some((version, sender_tag, receiver_tag)) = self.origin else {
            return Vec::new();
        };
        self.ahead
            .iter()
            .map(|(k, piece)| Fragment {
                version,
                sender_tag,
                receiver_tag,
                k: *k,
                n: self.n,
                piece: piece.clone(),
            })
            .collect()
    }

    /// The stored partial message as one cumulative fragment (k = K, the
    /// number of fragments received in sequence, and the concatenated
    /// pieces), for durable storage; `None` when nothing is stored in
    /// sequence (fragments ahead of a gap: [`Reassembler::ahead`]).
    pub fn partial(&self) -> Option<Fragment> {
        let (version, sender_tag, receiver_tag) = self.origin?;
        if self.n == 0 || self.k == 0 || self.buf.is_empty() {
            return None;
        }
        Some(Fragment {
            version,
            sender_tag,
            receiver_tag,
            k: self.k,
            n: self.n,
            piece: self.buf.clone(),
        })
    }

    /// A reassembler holding what [`Reassembler::partial`] returned, under
    /// the same bound; `None` if `f` is not a valid partial state (k < n
    /// required, pieces within `max_total_bytes`).
    pub fn resume(max_total_bytes: usize, f: &Fragment) -> Option<Self> {
        if f.k == 0 || f.k >= f.n || f.piece.is_empty() || f.piece.len() > max_total_bytes {
            return None;
        }
        Some(Self {
            max_total_bytes,
            k: f.k,
            n: f.n,
            origin: Some((f.version, f.sender_tag, f.receiver_tag)),
            buf: f.piece.clone(),
            ahead: BTreeMap::new(),
            reordered: false,
        })
    }

    /// Feeds one fragment. Returns the whole message when `f` completes it,
    /// `None` when more fragments are needed.
    ///
    /// Rules (spec): k == 1 starts a new message, discarding any partial
    /// one; k == K+1 with the same n (and the same version and tags)
    /// appends; anything else discards the partial message
    /// ([`FragmentError::OutOfSequence`]). k == 0, n == 0 or k > n is
    /// illegal and ignored ([`FragmentError::Illegal`], state unchanged).
    /// Growing past the bound discards the partial message
    /// ([`FragmentError::TooLarge`]).
    ///
    /// Two exceptions to "anything else": 2 <= k <= K with the same n,
    /// version and tags is a fragment delivered again and is ignored; and
    /// k > K+1 with the same n, version
    /// and tags (or into an empty reassembler) is kept ahead of the gap,
    /// up to [`MAX_AHEAD`] fragments and within the bound, and appended
    /// once the fragments before it arrive; a k == 1 of the same shape
    /// keeps them. The order of fragments is only the server's order: a
    /// server that re-routes a dead session's unacknowledged stanzas after
    /// newer ones delivers, say, 9 and 10 of ten before 1 to 8. A wrong
    /// guess (two messages of the same shape interleaved) yields a message
    /// that fails its MAC, as a discarded one would have been lost.
    pub fn push(&mut self, f: &Fragment) -> Result<Option<String>, FragmentError> {
        self.reordered = false;
        let (k, n) = (f.k, f.n);
        if k == 0 || n == 0 || k > n {
            return Err(FragmentError::Illegal { k, n });
        }
        let origin = (f.version, f.sender_tag, f.receiver_tag);
        let same_shape = n == self.n && self.origin == Some(origin);
        if k == 1 {
            // Only a data message may take the fragments kept ahead: a
            // wrong guess fails its MAC and is dropped, while a wrong AKE
            // message (a D-H Commit's encrypted g^x is opaque until the
            // Reveal Signature) would derail the handshake.
            let ahead = if same_shape && starts_data_message(&f.piece) {
                std::mem::take(&mut self.ahead)
            } else {
                BTreeMap::new()
            };
            self.reset();
            self.origin = Some(origin);
            self.n = n;
            self.ahead = ahead;
        } else if same_shape && k == self.k.wrapping_add(1) {
            // In sequence.
        } else if same_shape && k <= self.k {
            // Already held: the server delivers again what it had not seen
            // acknowledged when the proxy died (the stored partial state
            // has it). A new message would start with k == 1.
            return Ok(None);
        } else if (same_shape || self.is_empty()) && k > self.k.wrapping_add(1) {
            return self.keep_ahead(f, origin);
        } else {
            self.reset();
            return Err(FragmentError::OutOfSequence { k, n });
        }
        if self.stored_bytes().saturating_add(f.piece.len()) > self.max_total_bytes {
            self.reset();
            return Err(FragmentError::TooLarge {
                max: self.max_total_bytes,
            });
        }
        self.buf.push_str(&f.piece);
        self.k = k;
        self.n = n;
        // Fill in what arrived ahead of this one.
        let mut filled = false;
        while let Some(piece) = self.ahead.remove(&self.k.wrapping_add(1)) {
            self.buf.push_str(&piece);
            self.k += 1;
            filled = true;
        }
        if self.k == n {
            let whole = std::mem::take(&mut self.buf);
            self.reset();
            self.reordered = filled;
            return Ok(Some(whole));
        }
        Ok(None)
    }

    /// Keeps `f` (k > K+1) until the fragments before it arrive.
    fn keep_ahead(
        &mut self,
        f: &Fragment,
        origin: (Version, u32, u32),
    ) -> Result<Option<String>, FragmentError> {
        let replaced = self.ahead.get(&f.k).map_or(0, String::len);
        if !self.ahead.contains_key(&f.k) && self.ahead.len() >= MAX_AHEAD {
            self.reset();
            return Err(FragmentError::OutOfSequence { k: f.k, n: f.n });
        }
        let bytes = self.stored_bytes() - replaced;
        if bytes.saturating_add(f.piece.len()) > self.max_total_bytes {
            self.reset();
            return Err(FragmentError::TooLarge {
                max: self.max_total_bytes,
            });
        }
        self.origin = Some(origin);
        self.n = f.n;
        self.ahead.insert(f.k, f.piece.clone());
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otr::message::{Message, parse};

    const SPEC_FRAGMENTS: [&str; 3] = [
        "?OTR|5a73a599|27e31597,00001,00003,?OTR:AAMDJ+MVmSfjFZcAAAAA\
AQAAAAIAAADA1g5IjD1ZGLDVQEyCgCyn9hbrL3KAbGDdzE2ZkMyTKl7XfkSx\
h8YJnudstiB74i4BzT0W2haClg6dMary/jo9sMudwmUdlnKpIGEKXWdvJKT+\
hQ26h9nzMgEditLB8v,",
        "?OTR|5a73a599|27e31597,00002,00003,jPEWAJ6gBXvZrY6ZQrx3gb4v0\
UaSMOMiR5sB7Eaulb2Yc6RmRnnlxgUUC2alosg4WIeFN951PLjScajVba6dq\
lDi+q1H5tPvI5SWMN7PCBWIJ41+WvF+5IAZzQZYgNaVLbAAAAAAAAAAEAAAA\
HwNiIi5Ms+4PsY/L2i,",
        "?OTR|5a73a599|27e31597,00003,00003,pkTtquknfx6HodLvk3RAAAAAA\
==.,",
    ];

    fn frag(text: &str) -> Fragment {
        match parse(text).unwrap() {
            Message::Fragment(f) => f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reassembles_the_spec_example() {
        let mut r = Reassembler::new(10_000);
        let f1 = frag(SPEC_FRAGMENTS[0]);
        assert_eq!(
            (f1.version, f1.sender_tag, f1.receiver_tag, f1.k, f1.n),
            (Version::V3, 0x5a73_a599, 0x27e3_1597, 1, 3)
        );
        assert_eq!(r.push(&f1).unwrap(), None);
        assert_eq!(r.push(&frag(SPEC_FRAGMENTS[1])).unwrap(), None);
        let whole = r.push(&frag(SPEC_FRAGMENTS[2])).unwrap().unwrap();
        assert!(whole.starts_with("?OTR:AAMD") && whole.ends_with("=."));
        assert!(matches!(parse(&whole).unwrap(), Message::Encoded(_)));
        assert!(r.is_empty());
    }

    #[test]
    fn formats_like_libotr_and_fits_max_len() {
        let msg = format!("?OTR:{}.", "A".repeat(300));
        let frags = fragment(&msg, 100, Version::V3, 0x100, 0xdead_beef).unwrap();
        assert_eq!(frags.len(), 5);
        assert!(frags[0].starts_with("?OTR|00000100|deadbeef,00001,00005,?OTR:"));
        assert!(frags.iter().all(|f| f.len() <= 100 && f.ends_with(',')));
        assert_eq!(frags[0].len(), 100);
        let v2 = fragment(&msg, 50, Version::V2, 7, 7).unwrap();
        assert!(v2[0].starts_with("?OTR,00001,00010,?OTR:"));
        assert!(v2.iter().all(|f| f.len() <= 50));
        let mut r = Reassembler::new(1000);
        let mut out = None;
        for f in &v2 {
            out = r.push(&frag(f)).unwrap();
        }
        assert_eq!(out.unwrap(), msg);
    }

    #[test]
    fn short_messages_are_not_fragmented() {
        assert_eq!(
            fragment("abc", 3, Version::V3, 0x100, 0).unwrap(),
            vec!["abc"]
        );
        assert_eq!(
            fragment("a,c", 3, Version::V3, 0x100, 0).unwrap(),
            vec!["a,c"]
        );
    }

    #[test]
    fn fragment_errors() {
        let msg = "x".repeat(100);
        assert_eq!(
            fragment(&msg, 36, Version::V3, 0x100, 0),
            Err(FragmentError::MaxLenTooSmall {
                max_len: 36,
                overhead: 36
            })
        );
        assert!(fragment(&msg, 37, Version::V3, 0x100, 0).is_ok());
        assert!(fragment(&msg, 19, Version::V2, 0, 0).is_ok());
        assert_eq!(
            fragment("a,b,c,d", 3, Version::V2, 0, 0),
            Err(FragmentError::CommaInMessage)
        );
        // A 2-byte character with room for one byte.
        assert!(matches!(
            fragment(&"é".repeat(20), 19, Version::V2, 0, 0),
            Err(FragmentError::MaxLenTooSmall { .. })
        ));
        assert!(fragment(&"é".repeat(20), 20, Version::V2, 0, 0).is_ok());
        let huge = "y".repeat(70_000);
        assert_eq!(
            fragment(&huge, 19, Version::V2, 0, 0),
            Err(FragmentError::TooManyFragments)
        );
    }

    #[test]
    fn parses_potr_unpadded_v2_fragments() {
        let f = frag("?OTR,1,2,?OTR:AAIK,");
        assert_eq!(
            (f.version, f.k, f.n, f.piece.as_str()),
            (Version::V2, 1, 2, "?OTR:AAIK")
        );
        let f = frag("prefix ?OTR,00002,00002,AAA., and more");
        assert_eq!((f.k, f.n, f.piece.as_str()), (2, 2, "AAA."));
    }

    #[test]
    fn malformed_fragments_are_typed_errors() {
        for bad in [
            "?OTR|",
            "?OTR|zz|100,1,1,a,",
            "?OTR|100|100,1,1,a",
            "?OTR|100|100,1,1,,",
            "?OTR|100|100,70000,1,a,",
            "?OTR|100|100;1,1,a,",
            "?OTR|1000000000|100,1,1,a,",
            "?OTR,1,1",
            "?OTR,-1,1,a,",
            "?OTR,,1,a,",
        ] {
            assert!(
                matches!(parse(bad), Err(MessageError::MalformedFragment(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
        assert_eq!(
            parse("?OTR|ff|0,1,1,a,"),
            Err(MessageError::InvalidInstanceTag {
                sender: 0xff,
                receiver: 0
            })
        );
        assert_eq!(
            parse("?OTR|100|1,1,1,a,"),
            Err(MessageError::InvalidInstanceTag {
                sender: 0x100,
                receiver: 1
            })
        );
        // Leading zeros beyond 8 digits are fine.
        assert_eq!(frag("?OTR|0000000100|0,1,1,a,").sender_tag, 0x100);
    }

    fn f(k: u16, n: u16, piece: &str) -> Fragment {
        Fragment {
            version: Version::V3,
            sender_tag: 0x100,
            receiver_tag: 0x200,
            k,
            n,
            piece: piece.into(),
        }
    }

    #[test]
    fn reassembler_follows_the_spec_rules() {
        let mut r = Reassembler::new(100);
        assert_eq!(
            r.push(&f(0, 1, "a")),
            Err(FragmentError::Illegal { k: 0, n: 1 })
        );
        assert_eq!(
            r.push(&f(1, 0, "a")),
            Err(FragmentError::Illegal { k: 1, n: 0 })
        );
        assert_eq!(
            r.push(&f(3, 2, "a")),
            Err(FragmentError::Illegal { k: 3, n: 2 })
        );
        assert_eq!(r.push(&f(1, 1, "whole")), Ok(Some("whole".into())));

        assert_eq!(r.push(&f(1, 3, "a")), Ok(None));
        // Illegal fragments leave the partial message alone.
        assert!(r.push(&f(0, 3, "x")).is_err());
        assert_eq!(r.push(&f(2, 3, "b")), Ok(None));
        // A restart discards the partial message.
        assert_eq!(r.push(&f(1, 3, "A")), Ok(None));
        assert_eq!(r.push(&f(2, 3, "B")), Ok(None));
        assert_eq!(r.push(&f(3, 3, "C")), Ok(Some("ABC".into())));

        // Wrong n: discard.
        r.reset();
        assert_eq!(r.push(&f(1, 3, "a")), Ok(None));
        assert_eq!(
            r.push(&f(2, 4, "c")),
            Err(FragmentError::OutOfSequence { k: 2, n: 4 })
        );
        assert!(r.is_empty());

        // Beyond the spec: a fragment delivered again is ignored…
        r.reset();
        assert_eq!(r.push(&f(1, 3, "a")), Ok(None));
        assert_eq!(r.push(&f(2, 3, "b")), Ok(None));
        assert_eq!(r.push(&f(2, 3, "b")), Ok(None));
        assert_eq!(r.push(&f(3, 3, "c")), Ok(Some("abc".into())));
        // …and fragments ahead of a gap wait for it, also into an empty
        // reassembler (9 and 10 of ten re-routed before 1 to 8).
        assert_eq!(r.push(&f(3, 4, "c")), Ok(None));
        assert_eq!(r.push(&f(4, 4, "d")), Ok(None));
        assert!(!r.is_empty());
        assert_eq!(r.stored_bytes(), 2);
        assert_eq!(r.ahead().len(), 2);
        assert!(r.partial().is_none(), "nothing in sequence yet");
        assert_eq!(r.push(&f(1, 4, "?OTR:AAMDa")), Ok(None));
        assert_eq!(r.push(&f(2, 4, "b")), Ok(Some("?OTR:AAMDabcd".into())));
        assert!(r.is_empty());
        assert!(r.reordered(), "completed with fragments kept ahead");
        // Only for a data message: an AKE message (here a D-H Commit)
        // starts afresh and the kept fragments are dropped.
        assert_eq!(r.push(&f(2, 2, "x")), Ok(None));
        assert_eq!(r.push(&f(1, 2, "?OTR:AAMCa")), Ok(None));
        assert_eq!(r.push(&f(2, 2, "b")), Ok(Some("?OTR:AAMCab".into())));
        assert!(!r.reordered());
        assert_eq!(r.push(&f(1, 1, "whole")), Ok(Some("whole".into())));
        assert!(!r.reordered());
        // A fragment ahead of a gap of another shape is out of sequence.
        assert_eq!(r.push(&f(1, 3, "a")), Ok(None));
        assert_eq!(
            r.push(&f(3, 4, "c")),
            Err(FragmentError::OutOfSequence { k: 3, n: 4 })
        );
        assert!(r.is_empty());
        // At most MAX_AHEAD are kept.
        for k in 0..MAX_AHEAD {
            assert_eq!(r.push(&f(k as u16 + 2, 1000, "x")), Ok(None));
        }
        assert_eq!(
            r.push(&f(999, 1000, "x")),
            Err(FragmentError::OutOfSequence { k: 999, n: 1000 })
        );
        assert!(r.is_empty());

        // A different sender instance does not continue the message.
        r.reset();
        assert_eq!(r.push(&f(1, 2, "a")), Ok(None));
        let mut other = f(2, 2, "b");
        other.sender_tag = 0x101;
        assert!(r.push(&other).is_err());
    }

    #[test]
    fn partial_state_survives_a_round_trip() {
        let mut r = Reassembler::new(64 * 1024);
        assert!(r.partial().is_none());
        r.push(&frag(SPEC_FRAGMENTS[0])).unwrap();
        r.push(&frag(SPEC_FRAGMENTS[1])).unwrap();
        let p = r.partial().unwrap();
        assert_eq!((p.k, p.n), (2, 3));
        // Through its text form, as stored.
        let text = p.to_text();
        let mut resumed = Reassembler::resume(64 * 1024, &parse_fragment(&text).unwrap()).unwrap();
        let a = resumed.push(&frag(SPEC_FRAGMENTS[2])).unwrap().unwrap();
        let b = r.push(&frag(SPEC_FRAGMENTS[2])).unwrap().unwrap();
        assert_eq!(a, b);
        assert!(resumed.partial().is_none(), "complete: nothing partial");
        // Invalid states and states over the bound are refused.
        assert!(Reassembler::resume(10, &p).is_none());
        let done = Fragment { k: 3, ..p.clone() };
        assert!(Reassembler::resume(64 * 1024, &done).is_none());
        let zero = Fragment { k: 0, ..p };
        assert!(Reassembler::resume(64 * 1024, &zero).is_none());
    }

    #[test]
    fn reassembler_is_bounded() {
        let mut r = Reassembler::new(5);
        assert_eq!(r.push(&f(1, 3, "abc")), Ok(None));
        assert_eq!(
            r.push(&f(2, 3, "def")),
            Err(FragmentError::TooLarge { max: 5 })
        );
        assert!(r.is_empty());
        assert_eq!(r.stored_bytes(), 0);
        assert_eq!(
            r.push(&f(1, 1, "123456")),
            Err(FragmentError::TooLarge { max: 5 })
        );
        assert_eq!(r.push(&f(1, 1, "12345")), Ok(Some("12345".into())));
    }
}
