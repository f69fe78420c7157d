//! O2TR over the real SQLite store (DESIGN §5, O2TR paper §4): Bob's side
//! runs the OTR core with every durable effect committed to a
//! [`SqliteStore`] through the EKM glue (`store::ekm`); Bob's process state
//! is dropped at many points and rebuilt from the reopened database. Alice's
//! messages sent meanwhile are all decrypted (OMD), in order, without a new
//! AKE; replays and tampered messages after a reopen are rejected; expired
//! snapshots are wiped; and a crash between "snapshot stored" and "plaintext
//! delivered" loses the message without the inbox and not with it.

#[path = "common/pair.rs"]
mod pair;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use o2tr_proxy::otr::conversation::{Config, Conversation, Notice};
use o2tr_proxy::otr::crypto::{DsaPrivateKey, SecretBytes};
use o2tr_proxy::store::ekm::{self, Effect};
use o2tr_proxy::store::{ConversationKey, SessionState, SqliteStore, Store};
use pair::{ALICE_TAG, BOB_TAG, Side, keys};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const BOB: &str = "bob@example.test";
const ALICE: &str = "alice@example.test";
const T0: u64 = 1_700_000_000;
const LIFETIME: u64 = 7 * 24 * 3600;

/// Where Bob's process dies inside the handling of one core step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Crash {
    /// The step's transaction committed; nothing was sent or delivered.
    AfterCommit,
    /// The plaintext reached the client but was not acknowledged.
    AfterDeliver,
}

/// Bob's user agent: outlives Bob's process. Remembers the highest inbox
/// id it has shown, which makes the inbox's at-least-once delivery
/// exactly-once.
#[derive(Default)]
struct Client {
    shown: Vec<String>,
    last_id: i64,
    duplicates: usize,
}

impl Client {
    fn show(&mut self, id: i64, text: &str) {
        if id <= self.last_id {
            self.duplicates += 1;
            return;
        }
        self.last_id = id;
        self.shown.push(text.to_owned());
    }
}

/// Bob's proxy process: a conversation and the open store.
struct Proc {
    conv: Conversation,
    store: SqliteStore,
}

/// Bob: the proxy process (dropped on a crash), its state directory, and
/// the client and network that survive it.
struct Bob {
    dir: PathBuf,
    proc: Option<Proc>,
    rng: ChaCha20Rng,
    client: Client,
    notices: Vec<Notice>,
    outbox: VecDeque<String>,
    sent_log: Vec<String>,
    cfg: Config,
    now: u64,
}

impl Bob {
    fn new(dir: &Path) -> Self {
        let cfg = Config::new(BOB, BOB_TAG);
        let store = SqliteStore::open(dir).unwrap();
        Bob {
            dir: dir.to_path_buf(),
            proc: Some(Proc {
                conv: Conversation::new(cfg.clone(), key()),
                store,
            }),
            rng: ChaCha20Rng::seed_from_u64(22),
            client: Client::default(),
            notices: Vec::new(),
            outbox: VecDeque::new(),
            sent_log: Vec::new(),
            cfg,
            now: T0,
        }
    }

    fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("bob is running")
    }

    /// Plan and perform one batch of core actions; stop dead at `crash`.
    fn apply(&mut self, actions: Vec<o2tr_proxy::otr::conversation::Action>, crash: Option<Crash>) {
        let step = ekm::split(actions);
        let now = self.now;
        let p = self.proc.as_mut().expect("bob is running");
        let receipt = p.store.commit_step(BOB, ALICE, &step.durable, now).unwrap();
        if crash == Some(Crash::AfterCommit) {
            self.proc = None;
            return;
        }
        for e in step.effects {
            match e {
                Effect::Send(s) => {
                    self.sent_log.push(s.clone());
                    self.outbox.push_back(s);
                }
                Effect::Deliver { slot, delivery } => {
                    let id = receipt.inbox_ids[slot];
                    self.client.show(id, &delivery.text);
                    if crash == Some(Crash::AfterDeliver) {
                        self.proc = None;
                        return;
                    }
                    self.proc().store.ack_inbox(BOB, ALICE, id).unwrap();
                }
                Effect::Notify(n) => self.notices.push(n),
            }
        }
        let p = self.proc();
        ekm::release_oldest_held(&mut p.store, BOB, ALICE, step.release_held).unwrap();
    }

    fn receive(&mut self, body: &str) {
        self.receive_crashing(body, None);
    }

    fn receive_crashing(&mut self, body: &str, crash: Option<Crash>) {
        let now = self.now;
        let p = self.proc.as_mut().expect("bob is running");
        let a = p.conv.handle_incoming(body, now, &mut self.rng);
        self.apply(a, crash);
    }

    fn send(&mut self, text: &str) {
        let now = self.now;
        let p = self.proc.as_mut().expect("bob is running");
        let a = p.conv.handle_outgoing(text, now, &mut self.rng);
        self.apply(a, None);
    }

    /// Kill the process (if still running) and start a new one from disk:
    /// reopen the database, restore snapshots and held messages, hand the
    /// client whatever the inbox still owes it.
    fn restart(&mut self) -> ekm::Restored {
        self.proc = None;
        self.outbox.clear(); // unsent bodies died with the process
        let mut store = SqliteStore::open(&self.dir).unwrap();
        let mut r = ekm::restore_peer(
            &mut store,
            BOB,
            ALICE,
            self.cfg.clone(),
            key(),
            self.now,
            LIFETIME,
        )
        .unwrap();
        for m in &r.pending {
            self.client.show(m.id, &m.entry.text);
            store.ack_inbox(BOB, ALICE, m.id).unwrap();
        }
        let conv = std::mem::replace(
            &mut r.conversation,
            Conversation::new(self.cfg.clone(), key()),
        );
        self.proc = Some(Proc { conv, store });
        r
    }

    fn store(&mut self) -> &mut SqliteStore {
        &mut self.proc().store
    }

    fn unreadable(&self) -> usize {
        self.notices
            .iter()
            .filter(|n| matches!(n, Notice::Unreadable { .. }))
            .count()
    }

    fn gone_secure(&self) -> usize {
        self.notices
            .iter()
            .filter(|n| matches!(n, Notice::GoneSecure { .. }))
            .count()
    }
}

fn key() -> Arc<DsaPrivateKey> {
    keys().1.clone()
}

fn alice() -> Side {
    Side::new(ALICE, ALICE_TAG, keys().0.clone(), 11)
}

/// Run both directions until quiet; Bob's sends reach Alice, Alice's reach
/// Bob (when Bob is running).
fn settle(alice: &mut Side, bob: &mut Bob) {
    for _ in 0..10_000 {
        if bob.proc.is_some() {
            if let Some(m) = alice.outbox.pop_front() {
                bob.receive(&m);
                continue;
            }
        }
        if let Some(m) = bob.outbox.pop_front() {
            alice.receive(&m, bob.now);
            continue;
        }
        return;
    }
    panic!("did not settle");
}

fn established(dir: &Path) -> (Side, Bob) {
    let mut a = alice();
    let mut b = Bob::new(dir);
    a.start(T0);
    settle(&mut a, &mut b);
    assert!(a.conv.is_private() && b.proc().conv.is_private());
    assert_eq!(b.gone_secure(), 1);
    (a, b)
}

fn is_ake(body: &str) -> bool {
    // v3 D-H Commit / D-H Key / Reveal Sig / Sig: "?OTR:AAMC", "AAMK", "AAMR", "AAMS";
    // query: "?OTRv".
    ["?OTR:AAMC", "?OTR:AAMK", "?OTR:AAMR", "?OTR:AAMS", "?OTRv"]
        .iter()
        .any(|p| body.starts_with(p))
}

fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    (tmp, dir)
}

#[test]
fn restart_at_every_point_recovers_everything_without_ake() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = established(&dir);
    let ake_bodies = b.sent_log.len();
    let mut expected_bob = Vec::new();
    let mut expected_alice = Vec::new();
    // Rounds: Alice writes a few messages; Bob's process dies after a
    // varying number of them (the rest arrive while it is down, and are
    // delivered after the restart); Bob answers sometimes, which rotates
    // keys on both sides.
    for round in 0..12u32 {
        let n = 1 + round % 4;
        let down_after = round % (n + 1);
        for i in 0..n {
            let t = format!("r{round} m{i}");
            a.send(&t, b.now);
            expected_bob.push(t);
            if i < down_after {
                settle(&mut a, &mut b);
            }
        }
        // Crash with Alice's remaining messages still in flight.
        b.restart();
        b.now += 5;
        settle(&mut a, &mut b);
        if round % 3 == 1 {
            let t = format!("bob r{round}");
            b.send(&t);
            expected_alice.push(t);
            settle(&mut a, &mut b);
        }
        if round % 4 == 2 {
            // A restart with nothing in flight, then Bob writes first
            // (outward resumption).
            b.restart();
            let t = format!("bob first r{round}");
            b.send(&t);
            expected_alice.push(t);
            settle(&mut a, &mut b);
        }
    }
    assert_eq!(b.client.shown, expected_bob);
    assert_eq!(a.texts(), expected_alice);
    assert_eq!(b.gone_secure(), 1, "no new AKE on Bob's side");
    assert!(
        b.sent_log[ake_bodies..].iter().all(|m| !is_ake(m)),
        "Bob sent an AKE message after the restarts"
    );
    assert!(
        a.sent_log.iter().skip(3).all(|m| !is_ake(m)),
        "Alice re-keyed"
    );
    assert_eq!(b.unreadable(), 0);
    assert!(
        b.notices
            .iter()
            .any(|n| matches!(n, Notice::Resumed { .. }))
    );
    assert!(b.store().inbox(BOB, ALICE).unwrap().is_empty());
    assert_eq!(b.client.duplicates, 0);
}

#[test]
fn offline_burst_across_a_long_outage_is_decrypted_in_order() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = established(&dir);
    a.send("before", b.now);
    settle(&mut a, &mut b);
    b.proc = None; // killed
    let burst: Vec<String> = (0..40).map(|i| format!("offline {i}")).collect();
    for t in &burst {
        a.send(t, b.now);
    }
    b.now += 3600;
    let r = b.restart();
    assert_eq!(r.restored, vec![ALICE_TAG]);
    settle(&mut a, &mut b);
    let mut expected = vec!["before".to_string()];
    expected.extend(burst);
    assert_eq!(b.client.shown, expected);
    assert_eq!(b.gone_secure(), 1);
}

#[test]
fn replay_after_reopen_is_rejected() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = established(&dir);
    a.send("once", b.now);
    let m = a.outbox.front().cloned().unwrap();
    settle(&mut a, &mut b);
    assert_eq!(b.client.shown, ["once"]);
    let before = b
        .store()
        .snapshot(&ConversationKey::new(BOB, ALICE, ALICE_TAG))
        .unwrap()
        .unwrap();
    b.restart();
    b.receive(&m);
    assert_eq!(b.client.shown, ["once"], "replay delivered");
    assert_eq!(b.unreadable(), 1);
    let after = b
        .store()
        .snapshot(&ConversationKey::new(BOB, ALICE, ALICE_TAG))
        .unwrap()
        .unwrap();
    assert_eq!(
        before.data, after.data,
        "a rejected replay changed the snapshot"
    );
    assert!(b.store().inbox(BOB, ALICE).unwrap().is_empty());
    // The session still works.
    a.send("twice", b.now);
    settle(&mut a, &mut b);
    assert_eq!(b.client.shown, ["once", "twice"]);
}

fn tamper(m: &str) -> String {
    let mut bytes = m.as_bytes().to_vec();
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

#[test]
fn tampered_offline_message_is_reported_not_delivered() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = established(&dir);
    b.proc = None;
    a.send("genuine", b.now);
    let m = a.outbox.pop_front().unwrap();
    b.restart();
    b.receive(&tamper(&m));
    assert!(b.client.shown.is_empty());
    assert_eq!(b.unreadable(), 1, "reported");
    assert!(b.store().inbox(BOB, ALICE).unwrap().is_empty());
    // The forgery did not burn the keys: the genuine message still works.
    b.receive(&m);
    assert_eq!(b.client.shown, ["genuine"]);
    assert_eq!(b.gone_secure(), 1);
}

#[test]
fn expired_snapshot_is_wiped() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = established(&dir);
    a.send("hello", b.now);
    settle(&mut a, &mut b);
    let k = ConversationKey::new(BOB, ALICE, ALICE_TAG);
    let snap = b.store().snapshot(&k).unwrap().unwrap();
    // The most varied 32-byte window of the snapshot (key material).
    let probe = snap
        .data
        .windows(32)
        .max_by_key(|w| w.iter().collect::<std::collections::BTreeSet<_>>().len())
        .unwrap()
        .to_vec();
    b.proc = None;
    a.send("too late", b.now);
    b.now += LIFETIME + 1;
    let r = b.restart();
    assert_eq!(r.expired, vec![ALICE_TAG]);
    assert!(r.restored.is_empty());
    assert!(b.store().snapshot(&k).unwrap().is_none());
    let db = dir.join(o2tr_proxy::store::DB_FILE_NAME);
    let mut wal = db.clone().into_os_string();
    wal.push("-wal");
    for f in [db.clone(), PathBuf::from(wal)] {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(probe.len()).any(|w| w == probe),
            "{} still holds snapshot bytes",
            f.display()
        );
    }
    // Alice's message under the wiped keys cannot be read and is reported.
    b.receive(&a.outbox.pop_front().unwrap());
    assert_eq!(b.client.shown, ["hello"]);
    assert_eq!(b.unreadable(), 1);
    // Just under the lifetime, a snapshot survives.
    let (_tmp2, dir2) = state_dir();
    let (_a2, mut b2) = established(&dir2);
    b2.now += LIFETIME;
    assert_eq!(b2.restart().restored, vec![ALICE_TAG]);
}

/// The flaw of a plain "save snapshot, then deliver" ordering: a crash in
/// between loses the message for good, since the stored snapshot already
/// consumed its ciphertext and a re-delivery is rejected as a replay.
#[test]
fn naive_persist_then_deliver_loses_a_message_on_crash() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = established(&dir);
    a.send("doomed", b.now);
    let m = a.outbox.pop_front().unwrap();
    // Naive handling: store snapshots with save_snapshot, then die before
    // the Deliver action.
    let now = b.now;
    let p = b.proc.as_mut().unwrap();
    let actions = p.conv.handle_incoming(&m, now, &mut b.rng);
    for act in actions {
        if let o2tr_proxy::otr::conversation::Action::Persist(s) = act {
            let k = ConversationKey::new(BOB, ALICE, s.instance);
            b.store()
                .save_snapshot(&k, SessionState::Live, &s.snapshot, now)
                .unwrap();
        }
    }
    b.proc = None; // killed before delivering
    b.restart();
    // The server redelivers the message: rejected, the text is gone.
    b.receive(&m);
    assert!(b.client.shown.is_empty());
    assert_eq!(b.unreadable(), 1);
}

/// The same crash with the inbox: the plaintext was committed with the
/// snapshot, so the restart hands it over; the redelivered ciphertext is
/// rejected as a replay; the client sees it exactly once.
#[test]
fn inbox_survives_crash_between_persist_and_deliver() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = established(&dir);
    a.send("saved", b.now);
    let m = a.outbox.pop_front().unwrap();
    b.receive_crashing(&m, Some(Crash::AfterCommit));
    assert!(b.client.shown.is_empty());
    let r = b.restart();
    assert_eq!(r.pending.len(), 1);
    assert_eq!(b.client.shown, ["saved"]);
    b.receive(&m); // redelivered by the server
    assert_eq!(b.client.shown, ["saved"]);
    assert_eq!(b.unreadable(), 1);

    // Crash after the client got it but before the ack: handed over again,
    // and the client's id check drops the duplicate.
    a.send("acked late", b.now);
    let m = a.outbox.pop_front().unwrap();
    b.receive_crashing(&m, Some(Crash::AfterDeliver));
    assert_eq!(b.client.shown, ["saved", "acked late"]);
    let r = b.restart();
    assert_eq!(r.pending.len(), 1);
    assert_eq!(b.client.shown, ["saved", "acked late"]);
    assert_eq!(b.client.duplicates, 1);
    assert!(b.store().inbox(BOB, ALICE).unwrap().is_empty());
    // And the conversation goes on.
    a.send("next", b.now);
    settle(&mut a, &mut b);
    b.send("reply");
    settle(&mut a, &mut b);
    assert_eq!(b.client.shown, ["saved", "acked late", "next"]);
    assert_eq!(a.texts(), ["reply"]);
}

/// Messages held because of the bound `k` survive a restart and are sent
/// when the peer answers (no AKE).
#[test]
fn held_messages_survive_restart_and_flush_on_resume() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = established(&dir);
    b.cfg.max_unanswered = 2;
    b.restart(); // pick up the small bound
    for t in ["k1", "k2", "k3", "k4"] {
        b.send(t);
    }
    assert_eq!(b.store().held_messages(BOB, ALICE).unwrap().len(), 2);
    let to_alice: Vec<String> = b.outbox.drain(..).collect();
    b.restart(); // held messages come back from the store
    assert_eq!(b.proc().conv.held_count(), 2);
    for m in to_alice.iter().filter(|m| !m.starts_with("?OTRv")) {
        a.receive(m, b.now);
    }
    a.outbox.clear(); // heartbeats
    a.send("answer", b.now);
    settle(&mut a, &mut b);
    assert_eq!(b.client.shown, ["answer"]);
    assert_eq!(a.texts(), ["k1", "k2", "k3", "k4"]);
    assert!(b.store().held_messages(BOB, ALICE).unwrap().is_empty());
    assert_eq!(b.gone_secure(), 1);
}

/// The bytes of the most varied 32-byte window of `data` (key material).
fn key_probe(data: &[u8]) -> Vec<u8> {
    data.windows(32)
        .max_by_key(|w| w.iter().collect::<std::collections::BTreeSet<_>>().len())
        .unwrap()
        .to_vec()
}

/// Whether the database or its WAL still holds `probe`.
fn on_disk(dir: &Path, probe: &[u8]) -> bool {
    let db = dir.join(o2tr_proxy::store::DB_FILE_NAME);
    let mut wal = db.clone().into_os_string();
    wal.push("-wal");
    [db, PathBuf::from(wal)].iter().any(|f| {
        std::fs::read(f)
            .unwrap_or_default()
            .windows(probe.len())
            .any(|w| w == probe)
    })
}

/// Alice asks for OTR; Bob, the AKE's initiator, answers her D-H Key: his
/// Reveal Signature is in his outbox.
fn bob_sent_reveal_signature(dir: &Path) -> (Side, Bob) {
    let mut a = alice();
    let mut b = Bob::new(dir);
    a.start(T0);
    let query = a.outbox.pop_front().unwrap();
    b.receive(&query);
    let commit = b.outbox.pop_front().unwrap();
    a.receive(&commit, b.now);
    let dh_key = a.outbox.pop_front().unwrap();
    b.receive(&dh_key);
    (a, b)
}

/// Bob is the AKE initiator and is killed right after his Reveal
/// Signature went out. Alice completes the handshake and writes at once;
/// after the restart Bob's durable handshake record reads her Signature
/// and messages, with no new AKE (chaos campaign: `AkeInitiatorKilled`).
/// The record is wiped when the Signature completes the session, and its
/// bytes leave the database file.
#[test]
fn initiator_killed_after_its_reveal_signature_reads_the_first_messages() {
    let (_tmp, dir) = state_dir();
    let (mut a, mut b) = bob_sent_reveal_signature(&dir);
    let records = b.store().handshakes(BOB, ALICE).unwrap();
    assert_eq!(
        records.len(),
        1,
        "record committed with the Reveal Signature"
    );
    assert_eq!(records[0].instance, ALICE_TAG);
    let probe = key_probe(&records[0].data);
    let reveal = b.outbox.pop_front().unwrap();
    b.proc = None; // killed: the AKE state in memory is gone
    let (b_sent, a_sent) = (b.sent_log.len(), a.sent_log.len());
    a.receive(&reveal, b.now);
    assert!(a.conv.is_private());
    a.send("first", b.now);
    a.send("second", b.now);
    b.now += 30;
    let r = b.restart();
    assert_eq!(r.handshakes, vec![ALICE_TAG]);
    settle(&mut a, &mut b);
    assert!(b.proc().conv.is_private());
    assert_eq!(b.client.shown, ["first", "second"]);
    assert_eq!(b.unreadable(), 0);
    let new_ake = |log: &[String]| log.iter().any(|m| is_ake(m) && !m.starts_with("?OTR:AAMS"));
    assert!(
        !new_ake(&b.sent_log[b_sent..]),
        "{:?}",
        &b.sent_log[b_sent..]
    );
    assert!(
        !new_ake(&a.sent_log[a_sent..]),
        "{:?}",
        &a.sent_log[a_sent..]
    );
    assert!(b.store().handshakes(BOB, ALICE).unwrap().is_empty());
    b.store().maintenance().unwrap();
    assert!(
        !on_disk(&dir, &probe),
        "handshake record bytes still on disk"
    );
    // Both ways, still without a new AKE.
    b.send("answer");
    settle(&mut a, &mut b);
    assert_eq!(a.texts(), ["answer"]);
}

/// A handshake record older than the snapshot lifetime, or unreadable, is
/// wiped at restart instead of restored.
#[test]
fn expired_or_unreadable_handshake_record_is_wiped() {
    let (_tmp, dir) = state_dir();
    let (_a, mut b) = bob_sent_reveal_signature(&dir);
    b.now += LIFETIME + 1;
    let r = b.restart();
    assert!(r.handshakes.is_empty(), "expired");
    assert!(b.store().handshakes(BOB, ALICE).unwrap().is_empty());
    // Garbage under the key (a damaged file) is wiped, not fatal.
    let now = b.now;
    b.store()
        .commit_step(
            BOB,
            ALICE,
            &[o2tr_proxy::store::DurableOp::SaveHandshake {
                instance: ALICE_TAG,
                data: SecretBytes::from_slice(b"O2TR-AKE\x01garbage"),
            }],
            now,
        )
        .unwrap();
    let r = b.restart();
    assert!(r.handshakes.is_empty());
    assert!(b.store().handshakes(BOB, ALICE).unwrap().is_empty());
}
