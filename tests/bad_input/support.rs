//! Shared machinery of the bad-input corpus: a captured log, an
//! established in-memory OTR pair that every case starts from, message
//! surgery (decode, damage, re-encode; forge as a malicious peer holding
//! the session keys), and the outcome checks.

use std::sync::{Arc, Mutex, OnceLock};

use o2tr_proxy::otr::conversation::{Notice, UNREADABLE_ERROR};
use o2tr_proxy::otr::message::{self, Body, DataMessage, EncodedMessage, Header, Message};
use o2tr_proxy::otr::offline::EncryptedSession;
use o2tr_proxy::otr::tlv::{self, Tlv};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

use crate::pair::{ALICE_TAG, BOB_TAG, Pair, Side, keys};

// ---------------------------------------------------------------- log capture

/// Everything logged (INFO and above) by this test binary, all threads.
pub fn log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Arc::clone(&buf);
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(Arc::clone(&w)))
            .finish();
        // Another test thread of this binary may have won the race.
        let _ = tracing::subscriber::set_global_default(sub);
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing; returns the current end of the log.
pub fn log_mark() -> usize {
    log().lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Whether a line logged after `mark` contains every one of `needles`.
pub fn logged_since(mark: usize, needles: &[&str]) -> bool {
    let buf = log().lock().unwrap_or_else(|e| e.into_inner());
    let text = String::from_utf8_lossy(&buf[mark.min(buf.len())..]).into_owned();
    text.lines().any(|l| needles.iter().all(|n| l.contains(n)))
}

// ---------------------------------------------------------------- the group

/// The OTR D-H modulus p (RFC 3526 group 5), big-endian.
pub fn p() -> Vec<u8> {
    hex(concat!(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1",
        "29024E088A67CC74020BBEA63B139B22514A08798E3404DD",
        "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245",
        "E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED",
        "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3D",
        "C2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F",
        "83655D23DCA3AD961C62F356208552BB9ED529077096966D",
        "670C354E4ABC9804F1746C08CA237327FFFFFFFFFFFFFFFF",
    ))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// `p + d` for a small signed `d`, big-endian minimal (p ends in 0xff…).
pub fn p_plus(d: i16) -> Vec<u8> {
    let mut v = p();
    let mut carry: i32 = d.into();
    for b in v.iter_mut().rev() {
        let x = i32::from(*b) + carry;
        *b = x.rem_euclid(256) as u8;
        carry = x.div_euclid(256);
        if carry == 0 {
            break;
        }
    }
    if carry > 0 {
        v.insert(0, carry as u8);
    }
    v
}

/// q = (p-1)/2, the order of the SMP group, big-endian.
pub fn q() -> Vec<u8> {
    let p1 = p_plus(-1);
    let mut out = Vec::with_capacity(p1.len());
    let mut rem = 0u16;
    for b in p1 {
        let cur = (rem << 8) | u16::from(b);
        out.push((cur / 2) as u8);
        rem = cur % 2;
    }
    while out.first() == Some(&0) {
        out.remove(0);
    }
    out
}

// ---------------------------------------------------------------- the pair

/// The two sides' snapshots after one real AKE, made once per binary.
fn base() -> &'static (Vec<u8>, Vec<u8>) {
    static BASE: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut p = Pair::new();
        p.establish();
        (
            p.alice.snapshots[&BOB_TAG].clone(),
            p.bob.snapshots[&ALICE_TAG].clone(),
        )
    })
}

pub const ALICE: &str = "alice@example.test";
pub const BOB: &str = "bob@example.test";

/// A private pair, restored from the base snapshots and confirmed live in
/// both directions; every record (outboxes, deliveries, notices) empty.
pub fn private_pair(seed: u64) -> Pair {
    let (a, b) = base();
    let mut p = Pair::new();
    p.alice.rng = ChaCha20Rng::seed_from_u64(seed);
    p.bob.rng = ChaCha20Rng::seed_from_u64(seed ^ 0xb0b);
    p.alice.snapshots.insert(BOB_TAG, a.clone());
    p.bob.snapshots.insert(ALICE_TAG, b.clone());
    restart_alice(&mut p.alice);
    restart_bob(&mut p.bob);
    p.alice.send("warm a", p.now);
    p.run();
    p.bob.send("warm b", p.now);
    p.run();
    clear(&mut p);
    p
}

pub fn restart_alice(s: &mut Side) {
    s.restart(ALICE, ALICE_TAG, keys().0.clone());
}

pub fn restart_bob(s: &mut Side) {
    s.restart(BOB, BOB_TAG, keys().1.clone());
}

pub fn clear(p: &mut Pair) {
    for s in [&mut p.alice, &mut p.bob] {
        s.outbox.clear();
        s.delivered.clear();
        s.notices.clear();
        s.sent_log.clear();
    }
}

/// The one message `side` sent for `text`.
pub fn send_one(side: &mut Side, text: &str, now: u64) -> String {
    side.send(text, now);
    assert_eq!(side.outbox.len(), 1, "one message for {text:?}");
    side.outbox.pop_front().unwrap_or_default()
}

/// The encoded message in an armoured body.
pub fn decode(armored: &str) -> EncodedMessage {
    match message::parse(armored) {
        Ok(Message::Encoded(m)) => m,
        other => panic!("not an encoded message: {other:?}"),
    }
}

/// Split an armoured data message.
pub fn data(armored: &str) -> (Header, DataMessage) {
    let m = decode(armored);
    match m.body {
        Body::Data(d) => (m.header, d),
        other => panic!("not a data message: {}", other.name()),
    }
}

pub fn encode_data(h: Header, d: DataMessage) -> String {
    EncodedMessage {
        header: h,
        body: Body::Data(d),
    }
    .to_armored()
}

/// The binary form of an armoured message.
pub fn raw(armored: &str) -> Vec<u8> {
    decode(armored).encode()
}

/// The session `side` holds with the peer `their_tag`, as stored.
pub fn session(side: &Side, their_tag: u32) -> EncryptedSession {
    EncryptedSession::restore(&side.snapshots[&their_tag]).expect("stored snapshot restores")
}

/// What `receiver` would decrypt from `armored`, without touching its state.
pub fn peek(receiver: &Side, sender_tag: u32, armored: &str) -> Vec<u8> {
    let (h, d) = data(armored);
    let mut s = session(receiver, sender_tag);
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let r = s
        .ratchet
        .decrypt(&h, &d, 0, &mut rng)
        .expect("peek decrypts");
    r.plaintext.to_vec()
}

/// The TLVs of a data message, as `receiver` would see them.
pub fn peek_tlvs(receiver: &Side, sender_tag: u32, armored: &str) -> Vec<Tlv> {
    let pt = peek(receiver, sender_tag, armored);
    tlv::split_plaintext(&pt).expect("TLVs parse").1
}

/// `side` acts as a malicious peer that holds the real session keys:
/// encrypts and MACs `plaintext` (any bytes) under the session, as its next
/// message. Its conversation is rebuilt from the advanced snapshot, so its
/// own later messages stay in sequence.
pub fn forge(side: &mut Side, is_alice: bool, flags: u8, plaintext: &[u8]) -> String {
    let their = if is_alice { BOB_TAG } else { ALICE_TAG };
    let mut s = session(side, their);
    let header = Header::v3(s.our_tag, s.their_tag);
    let d = s.ratchet.encrypt(&header, flags, plaintext);
    side.snapshots.insert(their, s.snapshot().to_vec());
    if is_alice {
        restart_alice(side);
    } else {
        restart_bob(side);
    }
    encode_data(header, d)
}

// ---------------------------------------------------------------- outcomes

/// What must happen on the side that received the bad input.
#[derive(Debug, Clone)]
pub enum Want {
    /// Parsing fails with exactly this error; the user is told it was
    /// malformed; nothing is delivered; nothing is sent back.
    Malformed(message::MessageError),
    /// A fragment is refused with this error (user told, nothing delivered).
    Fragment(o2tr_proxy::otr::fragment::FragmentError),
    /// Decryption fails with this check; the user is told it was
    /// unreadable; the peer gets an OTR error message unless `replay`.
    Unreadable {
        err: o2tr_proxy::otr::error::PeerMisbehaved,
        replay: bool,
    },
    /// The AKE fails with an error whose text is this; the user is told.
    AkeFailed(String),
    /// SMP is aborted with this error; the user is told; the session stays.
    Smp(o2tr_proxy::otr::smp::SmpError),
    /// Dropped without a word (not for us, or IGNORE_UNREADABLE).
    Ignored,
    /// Authentic despite the damage (an unauthenticated field): delivered.
    Delivered(String),
}

/// Checks `side` against `want` after it received the bad input.
pub fn check(side: &Side, want: &Want) -> Result<(), String> {
    let texts = side.texts();
    let errors_sent = side
        .sent_log
        .iter()
        .filter(|s| s.starts_with("?OTR Error:"))
        .count();
    let only_notice = |n: Notice| -> Result<(), String> {
        if side.notices != vec![n.clone()] {
            return Err(format!("notices {:?}, want [{n:?}]", side.notices));
        }
        Ok(())
    };
    match want {
        Want::Malformed(e) => only_notice(Notice::Malformed(e.to_string()))?,
        Want::Fragment(e) => {
            if !side
                .notices
                .iter()
                .any(|n| *n == Notice::Malformed(e.to_string()))
            {
                return Err(format!("notices {:?}, want Malformed({e})", side.notices));
            }
        }
        Want::Unreadable { err, replay } => {
            let e = o2tr_proxy::otr::error::Error::Peer(*err);
            only_notice(Notice::Unreadable {
                reason: e.to_string(),
                replayed: *replay,
            })?;
            let want_errors = usize::from(!replay);
            if errors_sent != want_errors {
                return Err(format!(
                    "{errors_sent} OTR error messages sent, want {want_errors}"
                ));
            }
            if !replay && !side.sent_log.iter().any(|s| s.contains(UNREADABLE_ERROR)) {
                return Err("OTR error message lacks the unreadable text".into());
            }
        }
        Want::AkeFailed(reason) => {
            if !side.notices.iter().any(|n| {
                *n == Notice::AkeFailed {
                    reason: reason.clone(),
                }
            }) {
                return Err(format!(
                    "notices {:?}, want AkeFailed({reason})",
                    side.notices
                ));
            }
            if side
                .notices
                .iter()
                .any(|n| matches!(n, Notice::GoneSecure { .. }))
            {
                return Err("went secure after a failed AKE".into());
            }
        }
        Want::Smp(e) => {
            if !side.notices.iter().any(|n| {
                *n == Notice::SmpError {
                    reason: e.to_string(),
                }
            }) {
                return Err(format!("notices {:?}, want SmpError({e})", side.notices));
            }
            if side
                .notices
                .iter()
                .any(|n| matches!(n, Notice::SmpSucceeded { .. } | Notice::SmpRequested { .. }))
            {
                return Err(format!("SMP went on: {:?}", side.notices));
            }
        }
        Want::Ignored => {
            if !side.notices.is_empty() {
                return Err(format!("notices {:?}, want none", side.notices));
            }
            if errors_sent != 0 {
                return Err("an OTR error message was sent".into());
            }
        }
        Want::Delivered(t) => {
            if texts != vec![t.clone()] {
                return Err(format!("delivered {texts:?}, want [{t:?}]"));
            }
            return Ok(());
        }
    }
    if !texts.is_empty() {
        return Err(format!("delivered {texts:?} from a bad input"));
    }
    Ok(())
}

/// The session still works both ways: a fresh message each way is
/// delivered encrypted.
pub fn still_private(p: &mut Pair, tag: &str) -> Result<(), String> {
    clear(p);
    let a = format!("after {tag} (a)");
    let b = format!("after {tag} (b)");
    p.alice.send(&a, p.now);
    p.run();
    p.bob.send(&b, p.now);
    p.run();
    if p.bob.texts() != vec![a.clone()] {
        return Err(format!("bob then got {:?}, want [{a:?}]", p.bob.texts()));
    }
    if p.alice.texts() != vec![b.clone()] {
        return Err(format!(
            "alice then got {:?}, want [{b:?}]",
            p.alice.texts()
        ));
    }
    if !p.bob.delivered.iter().all(|d| d.encrypted)
        || !p.alice.delivered.iter().all(|d| d.encrypted)
    {
        return Err("a later message arrived unencrypted".into());
    }
    Ok(())
}

/// Runs every case, then fails once listing each failing case by name.
pub fn run_table<C>(
    what: &str,
    cases: &[C],
    name: impl Fn(&C) -> &str,
    run: impl Fn(usize, &C) -> Result<(), String>,
) {
    let _ = log();
    let mut failures = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in cases.iter().enumerate() {
        assert!(
            names.insert(name(c).to_string()),
            "duplicate case name {}",
            name(c)
        );
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(i, c)));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("  {}: {e}", name(c))),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("  {}: panicked: {msg}", name(c)));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {what} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
