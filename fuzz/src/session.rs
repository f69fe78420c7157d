//! Bodies of the stateful OTR targets: `data_message` (a live session
//! receiving arbitrary, mutated and authentic data messages) and
//! `snapshot_decode` (EKM snapshot decoding and restore).

use o2tr_proxy::otr::conversation::{Action, Conversation, Delivery};
use o2tr_proxy::otr::fragment::{Reassembler, fragment as split};
use o2tr_proxy::otr::message::{self, Body, EncodedMessage, Header, Message, Version, armor};
use o2tr_proxy::otr::offline::{EncryptedSession, SnapshotInfo};
use o2tr_proxy::otr::tlv::{self, Tlv};
use o2tr_proxy::store::{ConversationKey, MemoryStore, SessionState, Store, ekm};
use rand_chacha::ChaCha20Rng;

use super::fixture::{ALICE_TAG, BOB_TAG, Input, T0, alice_config, edit, fixture, rng};

/// What Alice's side did, as the harness's "network and store".
struct Alice {
    conv: Conversation,
    rng: ChaCha20Rng,
    now: u64,
    /// The durable store: her latest snapshot of the session with Bob.
    snapshot: Option<Vec<u8>>,
    /// Bodies she sent, not yet seen by Bob.
    outbox: Vec<String>,
}

impl Alice {
    fn apply(&mut self, actions: Vec<Action>) -> Vec<Delivery> {
        let mut delivered = Vec::new();
        for a in actions {
            match a {
                Action::Send(s) => self.outbox.push(s),
                Action::Deliver(d) => delivered.push(d),
                Action::Persist(p) => {
                    assert_eq!(p.instance, BOB_TAG);
                    check_snapshot(&p.snapshot);
                    self.snapshot = Some(p.snapshot.to_vec());
                }
                Action::Forget { instance } => {
                    assert_eq!(instance, BOB_TAG);
                    self.snapshot = None;
                }
                Action::Notify(_)
                | Action::Hold(_)
                | Action::ReleaseHeld { .. }
                | Action::PersistHandshake(_)
                | Action::ForgetHandshake { .. } => {}
            }
        }
        delivered
    }

    fn receive(&mut self, body: &str) -> Vec<Delivery> {
        let a = self.conv.handle_incoming(body, self.now, &mut self.rng);
        self.apply(a)
    }

    /// Whether her session with Bob is encrypted (live or suspended).
    fn encrypted(&self) -> bool {
        self.conv
            .status()
            .iter()
            .any(|s| s.instance == BOB_TAG && matches!(s.state, "encrypted" | "suspended"))
    }
}

/// Bob, played with his raw session keys: he sends authentic messages with
/// any plaintext and must be able to read everything Alice sends.
struct Bob {
    session: EncryptedSession,
    rng: ChaCha20Rng,
    reassembly: Reassembler,
}

impl Bob {
    fn encrypt(&mut self, flags: u8, plaintext: &[u8]) -> EncodedMessage {
        let header = Header::v3(BOB_TAG, ALICE_TAG);
        let data = self.session.ratchet.encrypt(&header, flags, plaintext);
        EncodedMessage {
            header,
            body: Body::Data(data),
        }
    }

    /// Reads what Alice sent; returns the plaintexts of her data messages.
    /// Every data message she sends must verify and decrypt.
    fn read(&mut self, outbox: Vec<String>) -> Vec<Vec<u8>> {
        let mut plain = Vec::new();
        for body in outbox {
            let msg = match message::parse(&body) {
                Ok(Message::Fragment(f)) => match self.reassembly.push(&f) {
                    Ok(Some(whole)) => message::parse(&whole).expect("Alice's reassembled message"),
                    Ok(None) => continue,
                    Err(e) => panic!("Alice sent a bad fragment sequence: {e}"),
                },
                Ok(m) => m,
                Err(e) => panic!("Alice sent an unparsable body {body:?}: {e}"),
            };
            if let Message::Encoded(EncodedMessage {
                header,
                body: Body::Data(d),
            }) = msg
            {
                let r = self
                    .session
                    .ratchet
                    .decrypt(&header, &d, 0, &mut self.rng)
                    .unwrap_or_else(|e| panic!("Bob cannot read Alice's data message: {e}"));
                plain.push(r.plaintext.to_vec());
            }
        }
        plain
    }
}

/// An EKM snapshot the core produced must restore to the same bytes.
fn check_snapshot(snapshot: &[u8]) {
    let s = EncryptedSession::restore(snapshot).expect("own snapshot restores");
    assert_eq!(&s.snapshot()[..], snapshot, "snapshot is not canonical");
}

/// The human part of a plaintext: everything before the first NUL.
fn human(plaintext: &[u8]) -> &[u8] {
    plaintext.split(|&b| b == 0).next().unwrap_or_default()
}

/// Alice, restored from the fixture's EKM snapshot, receives a sequence of
/// operations read from `data`: arbitrary text; authentic messages from
/// Bob with arbitrary plaintext (TLVs, SMP, disconnect, extra key);
/// Bob's real messages with byte mutations; fragmented and reordered
/// messages; her own sends (which Bob must read); suspend; restart from
/// the stored snapshot; time passing. An authentic message is delivered
/// exactly when her session is encrypted, and at the end a session still
/// encrypted must read Bob's next message.
pub fn data_message(data: &[u8]) {
    let fx = fixture();
    let mut input = Input::new(data);
    let mut alice = Alice {
        conv: fx.alice(),
        rng: rng(0xa11ce),
        now: T0 + 5,
        snapshot: Some(fx.alice_snapshot.clone()),
        outbox: Vec::new(),
    };
    let mut bob = Bob {
        session: fx.bob_session(),
        rng: rng(0xb0b),
        reassembly: Reassembler::new(1 << 20),
    };
    let mut ops = 0;
    while !input.is_empty() && ops < 24 {
        ops += 1;
        match input.byte() % 10 {
            // Arbitrary text as a message body.
            0 | 1 => {
                let text = String::from_utf8_lossy(input.chunk()).into_owned();
                alice.receive(&text);
            }
            // An authentic data message with arbitrary plaintext.
            2 | 3 => {
                let flags = input.byte();
                let plaintext = input.chunk().to_vec();
                let expect = alice.encrypted();
                let msg = bob.encrypt(flags, &plaintext);
                let got = alice.receive(&msg.to_armored());
                let want = human(&plaintext);
                if expect && !want.is_empty() {
                    assert_eq!(got.len(), 1, "authentic message not delivered once");
                    assert_eq!(got[0].text, String::from_utf8_lossy(want));
                    assert!(got[0].encrypted);
                    assert_eq!(got[0].instance, BOB_TAG);
                } else {
                    assert!(got.iter().all(|d| !d.encrypted));
                }
            }
            // Bob's real message, mutated on the wire (after encoding).
            4 => {
                let msg = bob.encrypt(0, b"a message on the wire");
                let mut bytes = msg.encode();
                let n = usize::from(input.byte() % 4) + 1;
                edit(&mut bytes, &mut input, n);
                let got = alice.receive(&armor(&bytes));
                // Only an edit outside the MAC'd bytes keeps it authentic.
                assert!(
                    got.iter()
                        .all(|d| !d.encrypted || d.text == "a message on the wire")
                );
            }
            // An authentic message fragmented, pieces reordered/dropped/doubled.
            5 => {
                let size = usize::from(input.byte()) + 40;
                let plaintext = input.chunk().to_vec();
                let armored = bob.encrypt(0, &plaintext).to_armored();
                let mut pieces = split(&armored, size, Version::V3, BOB_TAG, ALICE_TAG)
                    .expect("an armored message fragments");
                for _ in 0..usize::from(input.byte() % 4) {
                    if pieces.is_empty() {
                        break;
                    }
                    let i = usize::from(input.byte()) % pieces.len();
                    let j = usize::from(input.byte()) % pieces.len();
                    match input.byte() % 3 {
                        0 => pieces.swap(i, j),
                        1 => drop(pieces.remove(i)),
                        _ => {
                            let p = pieces[i].clone();
                            pieces.insert(j, p);
                        }
                    }
                }
                for p in pieces {
                    alice.receive(&p);
                }
            }
            // Alice sends; Bob must read it.
            6 => {
                let text = String::from_utf8_lossy(input.chunk()).into_owned();
                let private = alice.conv.is_private();
                let a = alice.conv.handle_outgoing(&text, alice.now, &mut alice.rng);
                alice.apply(a);
                let plain = bob.read(std::mem::take(&mut alice.outbox));
                if private {
                    assert!(
                        plain.iter().any(|p| p == text.as_bytes()),
                        "Bob did not get Alice's text"
                    );
                }
            }
            // The connection drops: the session is suspended.
            7 => alice.conv.suspend(),
            // The proxy restarts from its store.
            8 => {
                let mut c = Conversation::new(alice_config(), fx.alice_key.clone());
                if let Some(s) = &alice.snapshot {
                    assert_eq!(c.restore(s).expect("stored snapshot restores"), BOB_TAG);
                }
                alice.conv = c;
                alice.outbox.clear();
            }
            // Time passes (heartbeats).
            _ => alice.now += u64::from(input.u16()),
        }
        // Whatever Alice sent (heartbeats, SMP answers, errors) reaches Bob.
        bob.read(std::mem::take(&mut alice.outbox));
    }
    if alice.encrypted() {
        let msg = bob.encrypt(0, b"still private?");
        let got = alice.receive(&msg.to_armored());
        assert_eq!(got.len(), 1, "session broken by unauthenticated input");
        assert_eq!(got[0].text, "still private?");
        bob.read(std::mem::take(&mut alice.outbox));
    }
}

/// EKM snapshot decoding: arbitrary bytes, or the fixture's real snapshot
/// with edits. What decodes must re-encode canonically, restore into a
/// conversation (unless it names another instance tag), survive use, and
/// go through the store's restore path (unreadable snapshots are wiped).
pub fn snapshot_decode(data: &[u8]) {
    let fx = fixture();
    let mut input = Input::new(data);
    let bytes = match input.byte() % 3 {
        0 => input.rest().to_vec(),
        _ => {
            let mut b = fx.alice_snapshot.clone();
            let n = usize::from(input.byte() % 8) + 1;
            edit(&mut b, &mut input, n);
            b.extend_from_slice(input.rest());
            b
        }
    };
    let decoded = EncryptedSession::restore(&bytes);
    assert_eq!(decoded.is_ok(), SnapshotInfo::of(&bytes).is_ok());
    let mut conv = Conversation::new(alice_config(), fx.alice_key.clone());
    let restored = conv.restore(&bytes);
    match &decoded {
        Ok(s) => {
            let again = s.snapshot();
            check_snapshot(&again);
            let ours = s.our_tag == 0 || s.our_tag == ALICE_TAG;
            assert_eq!(restored.is_ok(), ours);
            if ours {
                assert_eq!(restored.as_ref().ok().copied(), Some(s.their_tag));
            }
        }
        Err(_) => assert!(restored.is_err()),
    }
    // The same bytes as a handshake record: refused or restored, no panic.
    let _ = Conversation::new(alice_config(), fx.alice_key.clone()).restore_handshake(
        &bytes,
        0,
        u64::MAX,
    );
    if restored.is_ok() {
        // Use the restored session: send, receive Bob's message, end.
        let mut r = rng(7);
        let out = conv.handle_outgoing("probe", T0 + 1, &mut r);
        for a in &out {
            if let Action::Persist(p) = a {
                check_snapshot(&p.snapshot);
            }
        }
        let mut bob = fx.bob_session();
        let header = Header::v3(BOB_TAG, ALICE_TAG);
        let body = tlv::join_plaintext(b"hi", &[Tlv::new(tlv::types::PADDING, vec![0; 3])]);
        let d = bob.ratchet.encrypt(&header, 0, &body);
        let m = EncodedMessage {
            header,
            body: Body::Data(d),
        };
        let _ = conv.handle_incoming(&m.to_armored(), T0 + 2, &mut r);
        let _ = conv.status();
        conv.suspend();
        let _ = conv.handle_end(T0 + 3, &mut r);
    }

    // The store's path: a stored row with these bytes.
    let mut store = MemoryStore::new();
    let key = ConversationKey::new("alice@fuzz.example", "bob@fuzz.example", 0x4242_4242);
    store
        .save_snapshot(&key, SessionState::Suspended, &bytes, T0)
        .expect("memory store saves");
    let r = ekm::restore_peer(
        &mut store,
        &key.account,
        &key.peer,
        alice_config(),
        fx.alice_key.clone(),
        T0,
        u64::MAX,
    )
    .expect("restore_peer never fails on bad snapshot bytes");
    let usable = restored.is_ok();
    assert_eq!(r.restored.len() + r.expired.len(), usize::from(usable));
    assert_eq!(r.discarded.len(), usize::from(!usable));
    assert_eq!(
        store.snapshot(&key).expect("memory store reads").is_some(),
        usable && r.expired.is_empty()
    );
}
