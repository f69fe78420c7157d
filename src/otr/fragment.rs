//! OTR fragmentation (spec §"Fragmentation").
//!
//! [`fragment`] splits an armoured message into pieces formatted exactly as
//! libotr 4.1.1 writes them: `?OTR|%08x|%08x,%05hu,%05hu,piece,` for
//! version 3 and `?OTR,%05hu,%05hu,piece,` for version 2 (python-potr
//! writes the v2 numbers without leading zeros; both forms are read).
//! [`parse_fragment`] reads one fragment and [`Reassembler`] puts
//! messages back together within bounds on the memory it holds. It departs
//! from the spec's receiving rules (one partial message per sender, any
//! fragment out of sequence discards it) because after a fault the server
//! delivers again what it had not seen acknowledged, re-routes a dead
//! session's unacknowledged stanzas after newer ones, and so interleaves
//! the fragment runs of two messages of the same shape, which v3
//! fragments cannot tell apart (no message id). It keeps candidate pieces
//! per fragment number and lets the caller verify guessed combinations
//! (a data message's MAC); see [`Reassembler::push_with`].

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
    /// Holding the fragment would exceed the reassembler's byte bound even
    /// after evicting the pieces of every other shape; the pieces of its
    /// shape were discarded.
    #[error("reassembled message would exceed {max} bytes; discarded")]
    TooLarge {
        /// The reassembler's bound.
        max: usize,
    },
    /// Holding the fragment would exceed [`MAX_PIECES`] even after evicting
    /// the pieces of every other shape; the pieces of its shape were
    /// discarded.
    #[error("fragmented message of more than {max} pieces; discarded")]
    TooManyPieces {
        /// The bound on pieces held.
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

/// Most distinct pieces a [`Reassembler`] keeps for one fragment number of
/// one shape: the candidates of that many interleaved messages (a fifth
/// evicts the oldest).
pub const MAX_CANDIDATES: usize = 4;
/// Most shapes (version, tags, n) a [`Reassembler`] holds pieces of at
/// once; a new one evicts the one that got a fragment least recently.
pub const MAX_SHAPES: usize = 4;
/// Most pieces a [`Reassembler`] holds at once, whatever their size (the
/// byte bound alone would let 1-byte pieces cost far more than their size).
pub const MAX_PIECES: usize = 4096;
/// Most combinations [`Reassembler::push_with`] hands to its verifier in
/// one search. Three interleaved 10-piece messages (seen after a proxy
/// kill in the chaos campaign) leave 3^7 combinations for the one that
/// completes last; a guess (join, parse, MAC) costs microseconds.
pub const MAX_GUESSES: usize = 4096;
/// Most bytes of reassembled text handed to the verifier in one search.
pub const MAX_GUESS_BYTES: usize = 8 << 20;
/// Most combination entries looked at (handed over or skipped) per search:
/// combinations times fragments per message. Counting whole combinations
/// let a message of 90 tiny pieces with two candidates each cost ~2 s of
/// CPU over its arrivals (found by the `data_message` fuzz target); three
/// interleaved 10-piece messages still get all their 3^7 combinations.
const MAX_ENUMERATED: usize = 1 << 16;
/// How many unconsumed arrivals of one identical piece are counted.
const MAX_COPIES: u16 = 8;

/// What a fragment's pieces belong to: fragments of one message share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    version: Version,
    sender_tag: u32,
    receiver_tag: u32,
    n: u16,
}

impl Shape {
    fn of(f: &Fragment) -> Self {
        Shape {
            version: f.version,
            sender_tag: f.sender_tag,
            receiver_tag: f.receiver_tag,
            n: f.n,
        }
    }
}

/// One distinct piece held for a fragment number.
#[derive(Debug, Clone)]
struct Candidate {
    piece: String,
    /// Arrivals not yet consumed. Under the same keys the first pieces of
    /// two data messages are identical (header, tags, keyids, next D-H
    /// key), so one held piece may serve two messages: a copy left after
    /// a message took one is kept (a repeat and another message's piece
    /// cannot be told apart; bounded by [`MAX_COPIES`]).
    copies: u16,
    /// Arrival order of its latest copy.
    seq: u64,
    /// A copy of it went into a message: what is left is a repeat or
    /// another message's identical piece, not a sign of a missing one.
    used: bool,
}

/// What the caller's verifier made of a combination of pieces
/// ([`Reassembler::push_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not an authentic message: nothing changed, the pieces wait.
    Refused,
    /// Handled: its pieces are consumed.
    Accepted,
    /// An authentic copy of a message read already, handled as such: its
    /// pieces are consumed except the first, which is kept. Under the
    /// same keys every message's first piece is the same, so the first
    /// piece that completed a stale tail may be the one of a message
    /// whose other pieces are still to come.
    Copy,
}

/// The pieces held for one shape, by fragment number.
#[derive(Debug, Clone)]
struct Run {
    shape: Shape,
    slots: BTreeMap<u16, Vec<Candidate>>,
    /// Arrival order of the latest fragment of this shape.
    last_seq: u64,
    /// [`Assembly::Unverified`] was returned since a message of this shape
    /// was last accepted: not again (one notice, not one per fragment).
    reported: bool,
}

/// What [`Reassembler::push_with`] made of a fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembly {
    /// More fragments are needed.
    Pending,
    /// A combination the verifier accepted (the first, if the fragment
    /// completed several messages): the verifier has handled it. Its
    /// pieces are consumed.
    Verified(String),
    /// Complete combinations were tried and none verified; every piece is
    /// kept (the other message may complete later).
    Unverified {
        /// How many combinations the verifier refused.
        tried: usize,
    },
}

/// Reassembles fragments of one sender (spec §"Receiving Fragments"),
/// holding at most `max_total_bytes` of pieces.
///
/// OTR v3 fragments carry no message id, and after a fault the server
/// interleaves the runs of two messages of the same shape (a dead
/// session's re-routed stanzas and newer ones, or a re-send). So instead
/// of the spec's one partial message, the reassembler keeps per shape up
/// to [`MAX_CANDIDATES`] distinct pieces for each fragment number, and when
/// a fragment makes a shape complete, combines pieces into messages and
/// has the caller's verifier check them (for a data message, its MAC):
/// a single run received in order first, or else guesses, within
/// [`MAX_GUESSES`] and [`MAX_GUESS_BYTES`] per search. A combination's
/// pieces are consumed only when it is accepted; the rest wait. A piece
/// delivered again is counted, not stored twice.
///
/// The caller keeps one per (peer, sender instance).
#[derive(Debug, Clone)]
pub struct Reassembler {
    max_total_bytes: usize,
    /// At most [`MAX_SHAPES`].
    runs: Vec<Run>,
    next_seq: u64,
    /// Bytes of distinct pieces held.
    bytes: usize,
    /// Distinct pieces held.
    pieces: usize,
}

impl Reassembler {
    /// An empty reassembler that never holds more than `max_total_bytes`
    /// of pieces.
    pub fn new(max_total_bytes: usize) -> Self {
        Self {
            max_total_bytes,
            runs: Vec::new(),
            next_seq: 0,
            bytes: 0,
            pieces: 0,
        }
    }

    /// Forgets every held piece.
    pub fn reset(&mut self) {
        self.runs.clear();
        self.bytes = 0;
        self.pieces = 0;
    }

    /// Whether no piece is held.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether a held piece has never gone into a message: a message is
    /// incomplete (its other pieces are late, or the server kept one back),
    /// as opposed to copies left over after their message.
    pub fn waiting(&self) -> bool {
        self.runs
            .iter()
            .flat_map(|r| r.slots.values().flatten())
            .any(|c| !c.used)
    }

    /// Bytes of pieces currently held.
    pub fn stored_bytes(&self) -> usize {
        self.bytes
    }

    /// Every held piece as a fragment (a piece that arrived several times
    /// unconsumed, that many times), in arrival order: for durable storage,
    /// restored by [`Reassembler::hold`].
    pub fn held(&self) -> Vec<Fragment> {
        let mut out: Vec<(u64, Fragment)> = Vec::new();
        for run in &self.runs {
            let s = run.shape;
            for (k, slot) in &run.slots {
                for c in slot {
                    let f = Fragment {
                        version: s.version,
                        sender_tag: s.sender_tag,
                        receiver_tag: s.receiver_tag,
                        k: *k,
                        n: s.n,
                        piece: c.piece.clone(),
                    };
                    out.extend(std::iter::repeat_n((c.seq, f), usize::from(c.copies)));
                }
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        out.into_iter().map(|(_, f)| f).collect()
    }

    /// Splits what an earlier version stored for a partial message — one
    /// cumulative fragment, k = K pieces received in sequence, concatenated
    /// — into its K fragments. Senders cut every piece but the last to the
    /// same length (libotr, python-potr, [`fragment`]; armoured text is
    /// ASCII), so K pieces are K equal parts. `None` if `f` is not such a
    /// state (k < n required, length a multiple of k).
    pub fn split_cumulative(f: &Fragment) -> Option<Vec<Fragment>> {
        let k = usize::from(f.k);
        if f.k == 0 || f.k >= f.n || f.piece.is_empty() || f.piece.len() % k != 0 {
            return None;
        }
        let len = f.piece.len() / k;
        let mut out = Vec::with_capacity(k);
        for i in 1..=f.k {
            let start = usize::from(i - 1) * len;
            let piece = f.piece.get(start..start + len)?;
            out.push(Fragment {
                k: i,
                piece: piece.to_string(),
                ..f.clone()
            });
        }
        Some(out)
    }

    /// Holds `f` without trying to complete a message (restoring what
    /// [`Reassembler::held`] returned: a message complete then would have
    /// been completed before). Returns whether it is held.
    ///
    /// A restored piece is left over from before the restart: it never
    /// makes one run with the next one to arrive (a gap in the arrival
    /// count follows it). Restored with consecutive counts, the left-over
    /// first piece of an older key generation and a new last piece looked
    /// like the sender's message as sent, and their failure was answered
    /// with an OTR error (chaos seed 20261362, trial 248: the peer started
    /// a new AKE). Such pieces still complete messages as guesses.
    pub fn hold(&mut self, f: &Fragment) -> bool {
        if f.k == 0 || f.n == 0 || f.k > f.n {
            return false;
        }
        let held = self.insert(f).is_ok();
        self.next_seq += 1;
        held
    }

    /// Feeds one fragment and returns the first complete combination in the
    /// order of [`Reassembler::push_with`], unverified: for callers that
    /// cannot verify. `None` when more fragments are needed.
    pub fn push(&mut self, f: &Fragment) -> Result<Option<String>, FragmentError> {
        Ok(match self.push_with(f, |_| 0, |_, _| Verdict::Accepted)? {
            Assembly::Verified(w) => Some(w),
            Assembly::Pending | Assembly::Unverified { .. } => None,
        })
    }

    /// Feeds one fragment; when it completes its shape, combines the held
    /// pieces into messages.
    ///
    /// k == 0, n == 0 or k > n is illegal and ignored
    /// ([`FragmentError::Illegal`], state unchanged). A piece already held
    /// for the same number and shape is counted again (a repeat delivery,
    /// or the identical piece of another message: under the same keys the
    /// first pieces of data messages are identical, and short last pieces
    /// can be). Bounds: a new shape beyond [`MAX_SHAPES`] evicts the least
    /// recently fed one, a fifth distinct piece for a number evicts that
    /// number's oldest; beyond `max_total_bytes` or [`MAX_PIECES`] other
    /// shapes are evicted, and if this shape alone is too big it is
    /// discarded ([`FragmentError::TooLarge`], [`FragmentError::TooManyPieces`]).
    ///
    /// Completion. Every combination is made of one piece per number
    /// 1..=n and includes `f`'s (those without it were tried when they
    /// completed). If there is one, and its pieces arrived as one run (in order, one right after the other, none left over from an earlier message), it goes
    /// to `verify` with `plain` true (the caller may then treat a failure
    /// as the sender's, not a guess's); if refused, it is
    /// [`Assembly::Unverified`]. Otherwise combinations go to `verify`
    /// (`plain` false) until it does not refuse one — first those taking the
    /// newest piece of every number,
    /// then the second newest…, sorted by `order` (stable; the caller's
    /// idea of which message is older, so that two messages completed by
    /// one fragment come in order), then all others, within
    /// [`MAX_GUESSES`] and [`MAX_GUESS_BYTES`]. When it is not refused the
    /// caller has handled the message, its pieces are consumed (see
    /// [`Verdict`]; a copy of a piece left over is kept) and, with fewer
    /// candidates left, every complete combination (with or without `f`'s
    /// piece) is searched again. `verify` must leave no trace when it
    /// refuses. Only a data message may be put together from pieces
    /// received out of order: a wrongly combined AKE message (a D-H
    /// Commit's encrypted g^x is opaque until the Reveal Signature) would
    /// derail the handshake, while a data message fails its MAC.
    /// [`Assembly::Unverified`] comes once until a message of the shape is
    /// accepted (one notice, not one per fragment), and never for a repeat
    /// delivery; [`Assembly::Pending`] otherwise.
    pub fn push_with<K: Ord>(
        &mut self,
        f: &Fragment,
        mut order: impl FnMut(&str) -> K,
        mut verify: impl FnMut(&str, bool) -> Verdict,
    ) -> Result<Assembly, FragmentError> {
        let (k, n) = (f.k, f.n);
        if k == 0 || n == 0 || k > n {
            return Err(FragmentError::Illegal { k, n });
        }
        let (ri, repeat) = self.insert(f)?;
        let Some(lists) = self.lists(ri, Some(f)) else {
            return Ok(Assembly::Pending);
        };
        let first: Vec<usize> = lists.iter().map(|l| l[0]).collect();
        if lists.iter().all(|l| l.len() == 1) && self.one_run(ri, &first) {
            let whole = self.join(ri, &first);
            let verdict = verify(&whole, true);
            if verdict != Verdict::Refused {
                self.consume(ri, &first, verdict);
                return Ok(Assembly::Verified(whole));
            }
            return Ok(self.unverified(ri, repeat, 1));
        }
        let shape = Shape::of(f);
        let mut accepted = None;
        let mut tried = 0;
        // The first search takes f's piece; once a message is accepted,
        // fewer candidates are left and every complete combination is
        // searched again (a message stuck behind too many combinations).
        let mut fixed = Some(f);
        for _ in 0..=MAX_CANDIDATES {
            let Some(ri) = self.runs.iter().position(|r| r.shape == shape) else {
                break;
            };
            let Some(lists) = self.lists(ri, fixed) else {
                break;
            };
            let Some((whole, combo, verdict)) =
                self.search(ri, &lists, &mut order, &mut verify, &mut tried)
            else {
                break;
            };
            self.consume(ri, &combo, verdict);
            accepted.get_or_insert(whole);
            fixed = None;
        }
        Ok(match accepted {
            Some(whole) => Assembly::Verified(whole),
            None if tried == 0 => Assembly::Pending,
            None => self.unverified(ri, repeat, tried),
        })
    }

    /// [`Assembly::Unverified`] once after an accepted message (and not
    /// for a repeat delivery), else [`Assembly::Pending`].
    fn unverified(&mut self, ri: usize, repeat: bool, tried: usize) -> Assembly {
        match self.runs.get_mut(ri) {
            Some(run) if !repeat && !run.reported => {
                run.reported = true;
                Assembly::Unverified { tried }
            }
            _ => Assembly::Pending,
        }
    }

    /// Hands combinations of `lists` to `verify` until it accepts one,
    /// within [`MAX_GUESSES`] and [`MAX_GUESS_BYTES`]: first those taking
    /// the i-th newest piece of every number, sorted by `order`, then the
    /// others. Counts the refused ones in `tried`.
    fn search<K: Ord>(
        &self,
        ri: usize,
        lists: &[Vec<usize>],
        order: &mut impl FnMut(&str) -> K,
        verify: &mut impl FnMut(&str, bool) -> Verdict,
        tried: &mut usize,
    ) -> Option<(String, Vec<usize>, Verdict)> {
        let slot1 = self.runs[ri].slots.get(&1)?;
        let eligible = |combo: &[usize]| {
            slot1
                .get(combo[0])
                .is_some_and(|c| starts_data_message(&c.piece))
                || self.in_order(ri, combo)
        };
        let ranked = ranked(lists);
        let mut first: Vec<(K, usize, &Vec<usize>)> = ranked
            .iter()
            .filter(|c| eligible(c))
            .enumerate()
            .map(|(i, c)| (order(&self.join(ri, c)), i, c))
            .collect();
        first.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let rest = Odometer::new(lists).filter(|c| !ranked.contains(c) && eligible(c));
        let (mut guesses, mut bytes) = (0, 0usize);
        for combo in first.into_iter().map(|(_, _, c)| c.clone()).chain(rest) {
            if guesses >= MAX_GUESSES || bytes >= MAX_GUESS_BYTES {
                break;
            }
            let whole = self.join(ri, &combo);
            guesses += 1;
            bytes = bytes.saturating_add(whole.len());
            let verdict = verify(&whole, false);
            if verdict != Verdict::Refused {
                return Some((whole, combo, verdict));
            }
            *tried += 1;
        }
        None
    }

    /// For a complete run, the candidates per number (indices into the
    /// slot), newest first; for `fixed`'s number only its piece (`None`
    /// when it is not held).
    fn lists(&self, ri: usize, fixed: Option<&Fragment>) -> Option<Vec<Vec<usize>>> {
        let run = &self.runs[ri];
        if run.slots.len() < usize::from(run.shape.n) {
            return None;
        }
        let mut lists = Vec::with_capacity(usize::from(run.shape.n));
        for (num, slot) in &run.slots {
            let mut idx: Vec<usize> = match fixed {
                Some(f) if *num == f.k => slot
                    .iter()
                    .position(|c| c.piece == f.piece)
                    .into_iter()
                    .collect(),
                _ => (0..slot.len()).collect(),
            };
            if idx.is_empty() {
                return None;
            }
            idx.sort_by_key(|&i| std::cmp::Reverse(slot[i].seq));
            lists.push(idx);
        }
        Some(lists)
    }

    /// Stores `f`'s piece (or counts it again); returns its run's index and
    /// whether it was already held.
    fn insert(&mut self, f: &Fragment) -> Result<(usize, bool), FragmentError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let shape = Shape::of(f);
        let mut ri = match self.runs.iter().position(|r| r.shape == shape) {
            Some(i) => i,
            None => {
                if self.runs.len() >= MAX_SHAPES {
                    if let Some(j) = self.least_recent(None) {
                        self.remove_run(j);
                    }
                }
                self.runs.push(Run {
                    shape,
                    slots: BTreeMap::new(),
                    last_seq: seq,
                    reported: false,
                });
                self.runs.len() - 1
            }
        };
        self.runs[ri].last_seq = seq;
        let slot = self.runs[ri].slots.entry(f.k).or_default();
        if let Some(c) = slot.iter_mut().find(|c| c.piece == f.piece) {
            c.copies = c.copies.saturating_add(1).min(MAX_COPIES);
            c.seq = seq;
            return Ok((ri, true));
        }
        if slot.len() >= MAX_CANDIDATES {
            if let Some(old) = (0..slot.len()).min_by_key(|&i| slot[i].seq) {
                let c = slot.remove(old);
                self.bytes -= c.piece.len();
                self.pieces -= 1;
            }
        }
        // Room: other shapes go first; this one alone too big is dropped.
        let len = f.piece.len();
        while self.bytes.saturating_add(len) > self.max_total_bytes || self.pieces >= MAX_PIECES {
            match self.least_recent(Some(ri)) {
                Some(j) => {
                    self.remove_run(j);
                    if j < ri {
                        ri -= 1;
                    }
                }
                None => {
                    let too_many = self.pieces >= MAX_PIECES;
                    self.remove_run(ri);
                    return Err(if too_many {
                        FragmentError::TooManyPieces { max: MAX_PIECES }
                    } else {
                        FragmentError::TooLarge {
                            max: self.max_total_bytes,
                        }
                    });
                }
            }
        }
        self.runs[ri].slots.entry(f.k).or_default().push(Candidate {
            piece: f.piece.clone(),
            copies: 1,
            seq,
            used: false,
        });
        self.bytes += len;
        self.pieces += 1;
        Ok((ri, false))
    }

    /// The run fed least recently, other than `except`.
    fn least_recent(&self, except: Option<usize>) -> Option<usize> {
        (0..self.runs.len())
            .filter(|&i| Some(i) != except)
            .min_by_key(|&i| self.runs[i].last_seq)
    }

    fn remove_run(&mut self, i: usize) {
        let run = self.runs.remove(i);
        for c in run.slots.values().flatten() {
            self.bytes -= c.piece.len();
            self.pieces -= 1;
        }
    }

    /// Whether the pieces chosen by `combo` arrived one right after the
    /// other, in the order of their numbers, none of them a copy left over
    /// from an earlier message: one run, the sender's message as sent. A
    /// piece held from long ago (a stale copy, another key generation's
    /// first piece) followed by a new one is in order but not one run,
    /// and its failure says nothing about the sender (chaos seed 20261331,
    /// trial 164: an "unreadable" OTR error, and the peer started a new
    /// AKE).
    fn one_run(&self, ri: usize, combo: &[usize]) -> bool {
        let run = &self.runs[ri];
        let mut last: Option<u64> = None;
        for (slot, &i) in run.slots.values().zip(combo) {
            let Some(c) = slot.get(i) else { return false };
            if c.used || last.is_some_and(|l| c.seq != l + 1) {
                return false;
            }
            last = Some(c.seq);
        }
        true
    }

    /// Whether the pieces chosen by `combo` (an index per number) arrived
    /// in the order of their numbers.
    fn in_order(&self, ri: usize, combo: &[usize]) -> bool {
        let seqs = self.runs[ri]
            .slots
            .values()
            .zip(combo)
            .map(|(slot, &i)| slot.get(i).map_or(0, |c| c.seq));
        let mut last = None;
        for s in seqs {
            if last.is_some_and(|l| s <= l) {
                return false;
            }
            last = Some(s);
        }
        true
    }

    fn join(&self, ri: usize, combo: &[usize]) -> String {
        let mut whole = String::new();
        for (slot, &i) in self.runs[ri].slots.values().zip(combo) {
            if let Some(c) = slot.get(i) {
                whole.push_str(&c.piece);
            }
        }
        whole
    }

    /// Takes one copy of each piece of `combo` (for a [`Verdict::Copy`],
    /// of each but the first). Copies left over stay: a repeat cannot be
    /// told from another message's identical piece (chaos seed 20261300,
    /// job 0, trial 49: dropping them lost a message).
    fn consume(&mut self, ri: usize, combo: &[usize], verdict: Verdict) {
        let run = &mut self.runs[ri];
        let skip = usize::from(verdict == Verdict::Copy);
        for (slot, &i) in run.slots.values_mut().zip(combo).skip(skip) {
            let Some(c) = slot.get_mut(i) else { continue };
            c.copies -= 1;
            c.used = true;
            if c.copies == 0 {
                let c = slot.remove(i);
                self.bytes -= c.piece.len();
                self.pieces -= 1;
            }
        }
        run.slots.retain(|_, slot| !slot.is_empty());
        run.reported = false;
        if run.slots.is_empty() {
            self.remove_run(ri);
        }
    }
}

/// The combinations taking the i-th entry of every list (or its last),
/// for i = 0, 1, …, without repeats: with each list newest first, these
/// are the messages whose pieces all arrived in the same rank (two runs
/// interleaved one after the other, or one after another).
fn ranked(lists: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let widest = lists.iter().map(Vec::len).max().unwrap_or(0);
    let mut out: Vec<Vec<usize>> = Vec::new();
    for rank in 0..widest {
        let c: Vec<usize> = lists
            .iter()
            .map(|l| l[rank.min(l.len().saturating_sub(1))])
            .collect();
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// Every combination of `lists` (one entry per list), the last list
/// varying fastest; at most [`MAX_ENUMERATED`] entries in all.
struct Odometer<'a> {
    lists: &'a [Vec<usize>],
    /// `None` when exhausted.
    pos: Option<Vec<usize>>,
    given: usize,
}

impl<'a> Odometer<'a> {
    fn new(lists: &'a [Vec<usize>]) -> Self {
        Odometer {
            lists,
            pos: Some(vec![0; lists.len()]),
            given: 0,
        }
    }
}

impl Iterator for Odometer<'_> {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.given >= MAX_ENUMERATED {
            return None;
        }
        self.given += self.lists.len().max(1);
        let pos = self.pos.as_mut()?;
        let c: Vec<usize> = self
            .lists
            .iter()
            .zip(pos.iter())
            .map(|(l, &p)| l[p])
            .collect();
        let mut i = pos.len();
        loop {
            if i == 0 {
                self.pos = None;
                break;
            }
            i -= 1;
            pos[i] += 1;
            if pos[i] < self.lists[i].len() {
                break;
            }
            pos[i] = 0;
        }
        Some(c)
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
    fn reassembler_rules() {
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
        assert!(r.is_empty());
        assert_eq!(r.push(&f(1, 1, "whole")), Ok(Some("whole".into())));

        // In order; illegal fragments leave the held pieces alone.
        assert_eq!(r.push(&f(1, 3, "a")), Ok(None));
        assert!(r.push(&f(0, 3, "x")).is_err());
        assert_eq!(r.push(&f(2, 3, "b")), Ok(None));
        assert_eq!(
            r.push_with(
                &f(3, 3, "c"),
                |_| 0,
                |_, plain| {
                    assert!(plain);
                    Verdict::Accepted
                }
            ),
            Ok(Assembly::Verified("abc".into()))
        );
        assert!(r.is_empty());

        // A piece delivered again is counted, not a new candidate; the
        // spare copy stays (it may be another message's identical piece).
        assert_eq!(r.push(&f(1, 3, "a")), Ok(None));
        assert_eq!(r.push(&f(2, 3, "b")), Ok(None));
        assert_eq!(r.push(&f(2, 3, "b")), Ok(None));
        assert_eq!(r.held().len(), 3);
        assert_eq!(r.stored_bytes(), 2);
        assert_eq!(r.push(&f(3, 3, "c")), Ok(Some("abc".into())));
        assert_eq!(r.held(), [f(2, 3, "b")], "{r:?}");
        r.reset();

        // Out of order (9 and 10 of ten re-routed before 1 to 8): a data
        // message is a guess, handed to the verifier.
        assert_eq!(r.push(&f(3, 4, "c")), Ok(None));
        assert_eq!(r.push(&f(4, 4, "d")), Ok(None));
        assert_eq!(r.push(&f(1, 4, "?OTR:AAMDa")), Ok(None));
        let mut seen = Vec::new();
        assert_eq!(
            r.push_with(
                &f(2, 4, "b"),
                |_| 0,
                |w, _| {
                    seen.push(w.to_string());
                    Verdict::Accepted
                }
            ),
            Ok(Assembly::Verified("?OTR:AAMDabcd".into()))
        );
        assert_eq!(seen, ["?OTR:AAMDabcd"]);
        assert!(r.is_empty());

        // An AKE message (here a D-H Commit) only from pieces in order:
        // the piece that came before its first one is not taken.
        assert_eq!(r.push(&f(2, 2, "x")), Ok(None));
        assert_eq!(
            r.push_with(&f(1, 2, "?OTR:AAMCa"), |_| 0, |_, _| panic!("out of order")),
            Ok(Assembly::Pending)
        );
        assert_eq!(r.push(&f(2, 2, "b")), Ok(Some("?OTR:AAMCab".into())));
        assert_eq!(r.held().len(), 1, "the stray piece waits");
        r.reset();

        // Another n (or sender instance) is another shape: both complete.
        assert_eq!(r.push(&f(1, 3, "a")), Ok(None));
        assert_eq!(r.push(&f(1, 2, "?OTR:AAMDp")), Ok(None));
        let mut other = f(1, 2, "?OTR:AAMDs");
        other.sender_tag = 0x101;
        assert_eq!(r.push(&other), Ok(None));
        assert_eq!(r.push(&f(2, 3, "b")), Ok(None));
        assert_eq!(r.push(&f(2, 2, "q")), Ok(Some("?OTR:AAMDpq".into())));
        assert_eq!(r.push(&f(3, 3, "c")), Ok(Some("abc".into())));
        other.k = 2;
        other.piece = "t".into();
        assert_eq!(r.push(&other), Ok(Some("?OTR:AAMDst".into())));
        assert!(r.is_empty());
    }

    /// The fragments of messages `m` (n = pieces.len() each).
    fn runs(msgs: &[&[&str]]) -> Vec<Vec<Fragment>> {
        msgs.iter()
            .map(|pieces| {
                let n = pieces.len() as u16;
                (1..=n)
                    .zip(pieces.iter())
                    .map(|(k, p)| f(k, n, p))
                    .collect()
            })
            .collect()
    }

    /// Feeds `order` ((message, k) pairs) with a verifier that accepts only
    /// the genuine messages; returns what was accepted, in order, and how
    /// many guesses were refused.
    fn feed(r: &mut Reassembler, msgs: &[&[&str]], order: &[(usize, u16)]) -> (Vec<String>, usize) {
        let genuine: Vec<String> = msgs.iter().map(|m| m.concat()).collect();
        let frags = runs(msgs);
        let (mut out, mut refused) = (Vec::new(), 0);
        for &(m, k) in order {
            let fr = &frags[m][usize::from(k) - 1];
            let res = r.push_with(
                fr,
                |_| 0,
                |w, _| {
                    let ok = genuine.iter().any(|g| g == w);
                    refused += usize::from(!ok);
                    if ok {
                        Verdict::Accepted
                    } else {
                        Verdict::Refused
                    }
                },
            );
            match res.unwrap() {
                Assembly::Verified(w) => {
                    assert!(genuine.contains(&w), "{w}");
                    out.push(w);
                }
                Assembly::Pending | Assembly::Unverified { .. } => {}
            }
        }
        (out, refused)
    }

    const A: &[&str] = &["?OTR:AAMDhead", "a2", "a3", "a4."];
    const B: &[&str] = &["?OTR:AAMDhead", "b2", "b3", "b4."];
    const C: &[&str] = &["?OTR:AAMDhdC", "c2", "c3", "c4."];

    #[test]
    fn interleaved_runs_of_the_same_shape_are_told_apart() {
        let ab = |r: &mut Reassembler, order: &[(usize, u16)]| {
            let (out, _) = feed(r, &[A, B], order);
            let mut sorted = out.clone();
            sorted.sort();
            assert_eq!(sorted, [A.concat(), B.concat()], "order {order:?}");
            // Left: the copies of pieces that came more often than used.
            assert_eq!(r.held().len(), order.len() - 8, "{order:?}: {r:?}");
            r.reset();
            out
        };
        let mut r = Reassembler::new(1000);
        // A1 B1 A2 B2 …: the first pieces are identical (same keys), held
        // once with two copies.
        let out = ab(
            &mut r,
            &[
                (0, 1),
                (1, 1),
                (0, 2),
                (1, 2),
                (0, 3),
                (1, 3),
                (0, 4),
                (1, 4),
            ],
        );
        assert_eq!(out, [A.concat(), B.concat()]);
        // B1 A1 B2 A2 …
        let out = ab(
            &mut r,
            &[
                (1, 1),
                (0, 1),
                (1, 2),
                (0, 2),
                (1, 3),
                (0, 3),
                (1, 4),
                (0, 4),
            ],
        );
        assert_eq!(out, [B.concat(), A.concat()]);
        // A's tail re-routed after all of B.
        let out = ab(
            &mut r,
            &[
                (0, 1),
                (0, 2),
                (1, 1),
                (1, 2),
                (1, 3),
                (1, 4),
                (0, 3),
                (0, 4),
            ],
        );
        assert_eq!(out, [B.concat(), A.concat()]);
        // The last pieces first, then the heads interleaved.
        ab(
            &mut r,
            &[
                (1, 4),
                (0, 4),
                (0, 1),
                (1, 1),
                (1, 2),
                (0, 2),
                (0, 3),
                (1, 3),
            ],
        );
        // Repeats of A's pieces mixed in, before it completes.
        ab(
            &mut r,
            &[
                (0, 1),
                (0, 2),
                (1, 1),
                (0, 2),
                (1, 2),
                (0, 3),
                (0, 2),
                (1, 3),
                (0, 4),
                (1, 4),
            ],
        );

        // Distinct heads, interleaved with a run missing a piece: A and C
        // complete, B's pieces wait and complete when its last comes.
        let msgs: &[&[&str]] = &[A, B, C];
        let (out, refused) = feed(
            &mut r,
            msgs,
            &[
                (0, 1),
                (2, 1),
                (0, 2),
                (2, 2),
                (1, 2),
                (0, 3),
                (2, 3),
                (1, 3),
                (2, 4),
                (0, 4),
            ],
        );
        assert_eq!(out, [C.concat(), A.concat()]);
        assert!(refused > 0);
        assert_eq!(r.held().len(), 2, "B's pieces wait: {r:?}");
        let (out, _) = feed(&mut r, msgs, &[(1, 4), (1, 1)]);
        assert_eq!(out, [B.concat()]);
        assert!(r.is_empty(), "{r:?}");
    }

    /// After a proxy kill (chaos campaign, seed 20261191, trial 18): four
    /// messages of ten pieces under the same keys (identical first and
    /// last pieces), their runs cut and re-routed by the server into one
    /// another. Every message is put together once.
    #[test]
    fn several_messages_cut_into_one_another() {
        let msgs: Vec<Vec<String>> = (0..4)
            .map(|m| {
                (1..=10)
                    .map(|k| match k {
                        1 => "?OTR:AAMDhead".to_string(),
                        10 => "=.".to_string(),
                        _ => format!("m{m}k{k}"),
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<Vec<&str>> = msgs
            .iter()
            .map(|m| m.iter().map(String::as_str).collect())
            .collect();
        let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
        // (message, k) as the proxy saw them: message 0 pieces 1 to 7 and
        // message 1 piece 1 before the kill, the rest after.
        let mut order: Vec<(usize, u16)> = (1..=7).map(|k| (0, k)).chain([(1, 1)]).collect();
        order.extend([
            (0, 8),
            (0, 9),
            (0, 10),
            (2, 9),
            (2, 10),
            (3, 1),
            (3, 2),
            (1, 1),
        ]);
        order.extend([
            (1, 9),
            (1, 10),
            (2, 1),
            (2, 2),
            (3, 3),
            (3, 4),
            (3, 5),
            (2, 3),
        ]);
        order.extend([
            (1, 2),
            (3, 6),
            (3, 7),
            (3, 8),
            (3, 9),
            (3, 10),
            (1, 3),
            (1, 4),
        ]);
        order.extend([
            (1, 5),
            (2, 4),
            (2, 5),
            (2, 6),
            (2, 7),
            (1, 6),
            (1, 7),
            (1, 8),
        ]);
        order.extend([(2, 8)]);
        let mut r = Reassembler::new(100_000);
        let (out, _) = feed(&mut r, &slices, &order);
        let mut sorted = out.clone();
        sorted.sort();
        let mut want: Vec<String> = msgs.iter().map(|m| m.concat()).collect();
        want.sort();
        assert_eq!(sorted, want, "delivered {out:?}");
        // Message 1's first piece came twice: one copy is left.
        assert_eq!(r.held(), [runs(&slices)[1][0].clone()], "{r:?}");
    }

    /// Chaos seed 20261300, job 0, trial 49: three two-piece messages under
    /// the same keys (identical first pieces) re-routed as B1 A1 B2 A2 C1
    /// C2. The copy of the first piece left when B completed is A's.
    #[test]
    fn a_copy_left_over_is_another_messages_identical_piece() {
        const A2: &[&str] = &["?OTR:AAMDhead", "a."];
        const B2: &[&str] = &["?OTR:AAMDhead", "b."];
        const C2: &[&str] = &["?OTR:AAMDhead", "c."];
        let mut r = Reassembler::new(1000);
        let (out, _) = feed(
            &mut r,
            &[A2, B2, C2],
            &[(1, 1), (0, 1), (1, 2), (0, 2), (2, 1), (2, 2)],
        );
        assert_eq!(out, [B2.concat(), A2.concat(), C2.concat()]);
        assert!(r.is_empty(), "{r:?}");
    }

    /// A stale last piece (its message read already) right after the first
    /// piece of the next message is one run in order: the verifier calls
    /// it a copy, which consumes the stale piece and keeps the first one
    /// for the next message's own last piece.
    #[test]
    fn a_copy_keeps_its_first_piece() {
        const A2: &[&str] = &["?OTR:AAMDhead", "a."];
        const B2: &[&str] = &["?OTR:AAMDhead", "b."];
        let frags = runs(&[A2, B2]);
        let mut r = Reassembler::new(1000);
        assert_eq!(r.push(&frags[1][0]), Ok(None));
        let mut seen = Vec::new();
        let res = r.push_with(
            &frags[0][1],
            |_| 0,
            |w, plain| {
                seen.push((w.to_string(), plain));
                Verdict::Copy
            },
        );
        assert_eq!(res, Ok(Assembly::Verified(A2.concat())));
        assert_eq!(seen, [(A2.concat(), true)]);
        assert_eq!(r.held(), [frags[1][0].clone()]);
        assert_eq!(r.push(&frags[1][1]), Ok(Some(B2.concat())));
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn a_guess_that_never_verifies_keeps_its_pieces() {
        let mut r = Reassembler::new(1000);
        let frags = runs(&[A, B]);
        // A1 A2 B4 B3: one combination, out of order; the verifier says no.
        for fr in [&frags[0][0], &frags[0][1], &frags[1][3]] {
            assert_eq!(
                r.push_with(fr, |_| 0, |_, _| panic!("incomplete")),
                Ok(Assembly::Pending)
            );
        }
        let mut calls = 0;
        assert_eq!(
            r.push_with(
                &frags[1][2],
                |_| 0,
                |_, _| {
                    calls += 1;
                    Verdict::Refused
                }
            ),
            Ok(Assembly::Unverified { tried: 1 })
        );
        assert_eq!(calls, 1);
        assert_eq!(r.held().len(), 4);
        // Delivered again: tried again, but no second report.
        assert_eq!(
            r.push_with(&frags[1][2], |_| 0, |_, _| Verdict::Refused),
            Ok(Assembly::Pending)
        );
        // The pieces that were missing arrive: both messages.
        let (out, _) = feed(&mut r, &[A, B], &[(0, 3), (0, 4), (1, 1), (1, 2)]);
        assert_eq!(out, [A.concat(), B.concat()]);
        // B3 was counted twice: the spare copy is kept (a repeat cannot be
        // told from another message's identical piece).
        assert_eq!(r.held(), [frags[1][2].clone()], "{r:?}");
    }

    /// A search looks at a bounded number of entries whatever the number
    /// of fragments (`data_message` fuzz target: 90 pieces with two
    /// candidates each took ~2 s of CPU over their arrivals).
    #[test]
    fn the_enumeration_is_bounded_by_entries() {
        let lists = vec![vec![0, 1]; 90];
        let combos = Odometer::new(&lists).count();
        assert_eq!(combos, MAX_ENUMERATED.div_ceil(90));
        // Small messages still get every combination of three candidates.
        let lists = vec![vec![0, 1, 2]; 7];
        assert_eq!(Odometer::new(&lists).count(), 3usize.pow(7));
    }

    #[test]
    fn candidates_and_guesses_are_bounded() {
        let mut r = Reassembler::new(1_000_000);
        // A flood of distinct pieces for every number of one shape.
        let n = 8;
        for round in 0..10 {
            for k in 2..=n {
                assert_eq!(r.push(&f(k, n, &format!("p{round}-{k}"))), Ok(None));
            }
        }
        assert_eq!(r.held().len(), MAX_CANDIDATES * usize::from(n - 1));
        // Completing it tries at most MAX_GUESSES of the 4^7 combinations.
        let mut calls = 0;
        let res = r.push_with(
            &f(1, n, "?OTR:AAMDx"),
            |_| 0,
            |_, _| {
                calls += 1;
                Verdict::Refused
            },
        );
        assert_eq!(res, Ok(Assembly::Unverified { tried: MAX_GUESSES }));
        assert_eq!(calls, MAX_GUESSES);
        // The newest of every number is tried first, then the second
        // newest…, then the others, each once.
        let mut seen = Vec::new();
        let _ = r.push_with(
            &f(1, n, "?OTR:AAMDy"),
            |_| 0,
            |w, _| {
                seen.push(w.to_string());
                Verdict::Refused
            },
        );
        assert_eq!(seen[0], "?OTR:AAMDyp9-2p9-3p9-4p9-5p9-6p9-7p9-8");
        assert_eq!(seen[1], "?OTR:AAMDyp8-2p8-3p8-4p8-5p8-6p8-7p8-8");
        assert_eq!(seen[4], "?OTR:AAMDyp9-2p9-3p9-4p9-5p9-6p9-7p8-8");
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len());
        // Big pieces: the byte budget ends the search first.
        let mut r = Reassembler::new(usize::MAX);
        let big = "b".repeat(MAX_GUESS_BYTES / 8);
        for round in 0..2 {
            for k in 2..=4 {
                assert_eq!(r.push(&f(k, 4, &format!("{round}{big}"))), Ok(None));
            }
        }
        let mut calls = 0;
        let _ = r.push_with(
            &f(1, 4, "?OTR:AAMDx"),
            |_| 0,
            |_, _| {
                calls += 1;
                Verdict::Refused
            },
        );
        assert_eq!(calls, 3, "three of 8 combinations fill the byte budget");

        // At most MAX_SHAPES shapes: the least recently fed goes.
        r.reset();
        for n in 2..(2 + MAX_SHAPES as u16 + 3) {
            assert_eq!(r.push(&f(2, n, "z")), Ok(None));
        }
        assert_eq!(r.held().len(), MAX_SHAPES);
        assert!(r.held().iter().all(|h| h.n >= 5));

        // At most MAX_PIECES pieces, whatever their size: other shapes are
        // evicted first, then the shape that grows too big is dropped.
        let mut r = Reassembler::new(usize::MAX);
        assert_eq!(r.push(&f(2, 3, "other")), Ok(None));
        let mut res = Ok(None);
        for k in 1..=MAX_PIECES as u16 {
            res = r.push(&f(k, u16::MAX, "x"));
        }
        assert_eq!(res, Ok(None));
        assert_eq!(r.held().len(), MAX_PIECES);
        assert!(r.held().iter().all(|h| h.n == u16::MAX));
        assert_eq!(
            r.push(&f(MAX_PIECES as u16 + 1, u16::MAX, "x")),
            Err(FragmentError::TooManyPieces { max: MAX_PIECES })
        );
        assert!(r.is_empty());
    }

    #[test]
    fn held_pieces_survive_a_round_trip() {
        let mut r = Reassembler::new(64 * 1024);
        assert!(r.held().is_empty());
        let frags = runs(&[A, B]);
        for fr in [
            &frags[1][3],
            &frags[0][0],
            &frags[0][1],
            &frags[1][0],
            &frags[1][1],
        ] {
            assert_eq!(r.push(fr), Ok(None));
        }
        // Through the text form, as stored.
        let texts: Vec<String> = r.held().iter().map(Fragment::to_text).collect();
        assert_eq!(texts.len(), 5, "the shared first piece twice");
        let mut restored = Reassembler::new(64 * 1024);
        for t in &texts {
            assert!(restored.hold(&parse_fragment(t).unwrap()));
        }
        assert_eq!(restored.held(), r.held());
        let (out, _) = feed(&mut restored, &[A, B], &[(0, 3), (0, 4), (1, 3)]);
        assert_eq!(out, [A.concat(), B.concat()]);
        assert!(restored.is_empty());
        assert!(!restored.hold(&f(0, 2, "x")));

        // What earlier versions stored: one cumulative fragment of K pieces
        // received in sequence.
        let mut old = Reassembler::new(64 * 1024);
        old.push(&frag(SPEC_FRAGMENTS[0])).unwrap();
        old.push(&frag(SPEC_FRAGMENTS[1])).unwrap();
        let first = frag(SPEC_FRAGMENTS[0]);
        let cumulative = Fragment {
            k: 2,
            piece: format!("{}{}", first.piece, frag(SPEC_FRAGMENTS[1]).piece),
            ..first
        };
        let text = cumulative.to_text();
        let split = Reassembler::split_cumulative(&parse_fragment(&text).unwrap()).unwrap();
        assert_eq!(split, old.held());
        let mut resumed = Reassembler::new(64 * 1024);
        assert!(split.iter().all(|p| resumed.hold(p)));
        let a = resumed.push(&frag(SPEC_FRAGMENTS[2])).unwrap().unwrap();
        assert_eq!(Some(a), old.push(&frag(SPEC_FRAGMENTS[2])).unwrap());
        // Not a partial state: complete, empty, or not K equal pieces.
        assert!(
            Reassembler::split_cumulative(&Fragment {
                k: 3,
                ..cumulative.clone()
            })
            .is_none()
        );
        assert!(
            Reassembler::split_cumulative(&Fragment {
                k: 0,
                ..cumulative.clone()
            })
            .is_none()
        );
        let odd = Fragment {
            piece: format!("{}x", cumulative.piece),
            ..cumulative
        };
        assert!(Reassembler::split_cumulative(&odd).is_none());
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
        // Another shape's pieces make room first.
        assert_eq!(r.push(&f(1, 3, "abc")), Ok(None));
        assert_eq!(r.push(&f(1, 2, "de")), Ok(None));
        assert_eq!(
            r.push(&f(2, 2, "fghi")),
            Err(FragmentError::TooLarge { max: 5 })
        );
        assert!(r.is_empty());
        let mut r = Reassembler::new(5);
        assert_eq!(r.push(&f(1, 3, "abc")), Ok(None));
        assert_eq!(r.push(&f(1, 2, "de")), Ok(None));
        assert_eq!(r.push(&f(2, 2, "f")), Ok(Some("def".into())));
        assert!(r.is_empty());
    }
}
