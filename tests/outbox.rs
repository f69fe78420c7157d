//! Sender-side crash safety (the outbox) and durable incoming fragments,
//! tested on the router hook itself (no sockets: the test plays the
//! server) over a real [`SqliteStore`], plus how libotr answers a re-sent
//! duplicate.
//!
//! A "crash" is simulated exactly where it hurts: the hook returned the
//! encrypted stanza (snapshot and outbox entry committed) but the
//! connection never wrote it — the hook is dropped without `flushed()` —
//! then a new hook over the reopened database binds the same account.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use common::interop::default_link;
use common::peer::PeerKind;
use o2tr_proxy::proxy::{HookFactory, Incoming, Outgoing, StanzaHook};
use o2tr_proxy::router::{RouterConfig, RouterFactory, SharedStore};
use o2tr_proxy::store::{
    self, CommitReceipt, ConversationKey, FingerprintRecord, HeldMessage, InboxMessage,
    MemoryStore, OutboxMessage, PeerStep, SessionState, SnapshotRecord, SqliteStore, Store, Trust,
};
use o2tr_proxy::xmpp::{Element, Jid, ns, stanza};
use zeroize::Zeroizing;

const ALICE: &str = "alice@example.test/phone";
const BOB: &str = "bob@example.test/laptop";

fn sqlite(dir: &Path) -> SharedStore {
    Arc::new(Mutex::new(
        Box::new(SqliteStore::open(dir).unwrap()) as Box<dyn Store>
    ))
}

fn hook(store: &SharedStore, cfg: RouterConfig, jid: &str) -> Box<dyn StanzaHook> {
    let mut h = RouterFactory::new(cfg, Arc::clone(store)).new_hook();
    h.bound(&Jid::parse(jid).unwrap());
    h
}

fn now() -> SystemTime {
    SystemTime::now()
}

/// The client of `from` types `text` to `to`.
fn typed(from: &str, to: &str, text: &str) -> Element {
    let mut el = Element::new("message", ns::CLIENT)
        .with_attr("from", from)
        .with_attr("to", to)
        .with_attr("type", "chat");
    stanza::set_body(&mut el, text);
    el
}

/// What the server delivers to `to` for a stanza sent by `from`.
fn routed(mut el: Element, from: &str, to: &str) -> Element {
    el.set_attr("from", from);
    el.set_attr("to", to);
    el
}

#[derive(Default)]
struct Seen {
    /// Bodies the client was shown.
    client: Vec<String>,
    /// Stanzas to the server.
    server: Vec<Element>,
}

fn split(outs: Vec<Outgoing>) -> Seen {
    let mut s = Seen::default();
    for o in outs {
        match o {
            Outgoing::ToClient(el) => s.client.extend(stanza::body(&el)),
            Outgoing::ToServer(el) => s.server.push(el),
        }
    }
    s
}

/// Carries server-bound stanzas between the two hooks until both are
/// quiet; returns what each client was shown (alice, bob).
fn pump(
    a: &mut dyn StanzaHook,
    b: &mut dyn StanzaHook,
    mut to_b: Vec<Element>,
    mut to_a: Vec<Element>,
) -> (Vec<String>, Vec<String>) {
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        if to_a.is_empty() && to_b.is_empty() {
            return (seen_a, seen_b);
        }
        for el in std::mem::take(&mut to_b) {
            let s = split(b.from_server(routed(el, ALICE, BOB), now()));
            b.flushed();
            seen_b.extend(s.client);
            to_a.extend(s.server);
        }
        for el in std::mem::take(&mut to_a) {
            let s = split(a.from_server(routed(el, BOB, ALICE), now()));
            a.flushed();
            seen_a.extend(s.client);
            to_b.extend(s.server);
        }
    }
    panic!("the hooks never went quiet");
}

fn is_data(el: &Element) -> bool {
    stanza::body(el).is_some_and(|b| b.starts_with("?OTR:AAMD"))
}

/// Alice (SQLite) and Bob (memory) with a private session; Alice's first
/// message was held by policy `always` and released with the AKE.
/// [`establish`] with Bob's proxy fragmenting above 120 bytes.
fn establish_fragmenting(dir: &Path) -> (SharedStore, Box<dyn StanzaHook>) {
    let bob_cfg = RouterConfig {
        fragment_size: 120,
        ..RouterConfig::default()
    };
    establish(dir, bob_cfg)
}

/// Bob's client types `text` to Alice; what Bob's proxy sends upstream.
fn bob_sends(b: &mut dyn StanzaHook, text: &str) -> Vec<Element> {
    let s = split(b.from_client(typed(BOB, "alice@example.test", text), now()));
    b.flushed();
    s.server
}

fn establish(dir: &Path, bob_cfg: RouterConfig) -> (SharedStore, Box<dyn StanzaHook>) {
    let store_a = sqlite(dir);
    let mut a = hook(&store_a, RouterConfig::default(), ALICE);
    let bob_store: SharedStore = Arc::new(Mutex::new(Box::new(MemoryStore::new())));
    let mut b = hook(&bob_store, bob_cfg, BOB);
    let s = split(a.from_client(typed(ALICE, "bob@example.test", "hello"), now()));
    a.flushed();
    let (_, seen_b) = pump(&mut *a, &mut *b, s.server, Vec::new());
    assert!(seen_b.iter().any(|t| t == "hello"), "bob saw {seen_b:?}");
    assert!(
        store_a
            .lock()
            .unwrap()
            .outbox("alice@example.test")
            .unwrap()
            .is_empty(),
        "flushed stanzas are acknowledged"
    );
    assert!(
        store_a
            .lock()
            .unwrap()
            .held_messages("alice@example.test", "bob@example.test")
            .unwrap()
            .is_empty()
    );
    (bob_store, b)
}

#[test]
fn unsent_message_is_resent_after_a_crash_and_duplicates_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("alice");
    let (_bob_store, mut b) = establish(&dir, RouterConfig::default());

    // Alice types; the stanza is committed but never written: crash.
    let store_a = sqlite(&dir);
    let mut a1 = hook(&store_a, RouterConfig::default(), ALICE);
    let s = split(a1.from_client(typed(ALICE, "bob@example.test", "m1"), now()));
    assert_eq!(s.server.len(), 1);
    assert!(is_data(&s.server[0]));
    let lost = s.server[0].clone();
    drop(a1);
    drop(store_a);

    // Restart: the entry goes out before anything new, unchanged.
    let store_a = sqlite(&dir);
    assert_eq!(
        store_a
            .lock()
            .unwrap()
            .outbox("alice@example.test")
            .unwrap()
            .len(),
        1
    );
    let mut a2 = hook(&store_a, RouterConfig::default(), ALICE);
    let s = split(a2.tick(now()));
    a2.flushed();
    assert_eq!(s.server.len(), 1, "the unsent message is re-sent");
    assert_eq!(stanza::body(&s.server[0]), stanza::body(&lost));
    assert!(
        store_a
            .lock()
            .unwrap()
            .outbox("alice@example.test")
            .unwrap()
            .is_empty(),
        "acknowledged once written"
    );
    let (_, seen_b) = pump(&mut *a2, &mut *b, s.server, Vec::new());
    assert_eq!(seen_b, ["m1"]);

    // The same ciphertext again (it had got through before the crash):
    // Bob's router drops it without a word to either side.
    let dup = split(b.from_server(routed(lost, ALICE, BOB), now()));
    assert!(dup.client.is_empty(), "duplicate shown: {:?}", dup.client);
    assert!(dup.server.is_empty(), "duplicate answered");

    // libotr answers a duplicate with an "unreadable" error: after a
    // re-send that is expected, and Alice neither shows it nor restarts
    // the AKE.
    let err = Element::new("message", ns::CLIENT)
        .with_attr("type", "chat")
        .with_child(
            Element::new("body", ns::CLIENT)
                .with_text("?OTR Error: You transmitted an unreadable encrypted message."),
        );
    let s = split(a2.from_server(routed(err.clone(), BOB, ALICE), now()));
    assert!(s.client.is_empty() && s.server.is_empty());
    // Only as many as were re-sent: the next one is shown.
    let s = split(a2.from_server(routed(err, BOB, ALICE), now()));
    assert!(!s.client.is_empty(), "a real error is reported");

    // The session carries on without a new AKE.
    let s = split(a2.from_client(typed(ALICE, "bob@example.test", "m2"), now()));
    a2.flushed();
    assert!(s.server.iter().all(is_data), "no AKE: {:?}", s.server);
    let (_, seen_b) = pump(&mut *a2, &mut *b, s.server, Vec::new());
    assert_eq!(seen_b, ["m2"]);
}

/// With upstream SM (the default) the proxy reports written stanzas with
/// their count (`flushed_upstream`) and the server's acks
/// (`server_acked`): an outbox entry written into a link that then died
/// without a FIN is not acknowledged, and the next connection re-sends it
/// before anything new; the peer shows it exactly once (issue 9, chaos
/// campaign, upstream TCP cut).
#[test]
fn with_upstream_sm_an_outbox_entry_waits_for_the_servers_ack() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("alice");
    let (_bob_store, mut b) = establish(&dir, RouterConfig::default());
    let outbox = |store: &SharedStore| {
        store
            .lock()
            .unwrap()
            .outbox("alice@example.test")
            .unwrap()
            .len()
    };

    let store_a = sqlite(&dir);
    let mut a1 = hook(&store_a, RouterConfig::default(), ALICE);
    let s = split(a1.from_client(typed(ALICE, "bob@example.test", "m1"), now()));
    assert_eq!(s.server.len(), 1);
    let written = s.server[0].clone();
    // Written as the server's 7th stanza of this stream.
    a1.flushed_upstream(7);
    assert_eq!(
        outbox(&store_a),
        1,
        "written is not yet stored by the server"
    );
    a1.server_acked(6);
    assert_eq!(outbox(&store_a), 1, "an ack short of it");
    // The next hook calls do not acknowledge it either.
    let _ = a1.tick(now());
    a1.flushed_upstream(7);
    assert_eq!(outbox(&store_a), 1);
    // The link was dead: the proxy noticed and the connection ended.
    a1.disconnected(now());
    drop(a1);

    // The next connection re-sends it first, unchanged.
    let mut a2 = hook(&store_a, RouterConfig::default(), ALICE);
    let s = split(a2.tick(now()));
    assert_eq!(s.server.len(), 1, "the unacknowledged message is re-sent");
    assert_eq!(stanza::body(&s.server[0]), stanza::body(&written));
    a2.flushed_upstream(3);
    assert_eq!(outbox(&store_a), 1);
    a2.server_acked(3);
    assert_eq!(outbox(&store_a), 0, "acknowledged by the server's ack");
    let (_, seen_b) = pump(&mut *a2, &mut *b, s.server, Vec::new());
    assert_eq!(seen_b, ["m1"]);

    // Counters wrap (mod 2^32); a server that refuses SM leaves what was
    // written acknowledged as before.
    let _ = split(a2.from_client(typed(ALICE, "bob@example.test", "m2"), now()));
    a2.flushed_upstream(u32::MAX);
    a2.server_acked(u32::MAX - 1);
    assert_eq!(outbox(&store_a), 1);
    a2.server_acked(0);
    assert_eq!(outbox(&store_a), 0, "h wrapped past the entry");
    let _ = split(a2.from_client(typed(ALICE, "bob@example.test", "m3"), now()));
    a2.flushed_upstream(1);
    assert_eq!(outbox(&store_a), 1);
    a2.server_acks_off();
    assert_eq!(outbox(&store_a), 0);
}

#[test]
fn partial_fragments_survive_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("alice");
    let (_bob_store, mut b) = establish_fragmenting(&dir);
    let text = "a reply long enough to need several fragments of 120 bytes each";
    let s = split(b.from_client(typed(BOB, "alice@example.test", text), now()));
    b.flushed();
    assert!(s.server.len() >= 3, "not fragmented: {}", s.server.len());
    let mut frags = s.server.into_iter();

    // The first two fragments arrive; the proxy dies.
    let store_a = sqlite(&dir);
    let mut a1 = hook(&store_a, RouterConfig::default(), ALICE);
    for el in frags.by_ref().take(2) {
        let s = split(a1.from_server(routed(el, BOB, ALICE), now()));
        a1.flushed();
        assert!(s.client.is_empty() && s.server.is_empty());
    }
    assert_eq!(
        store_a
            .lock()
            .unwrap()
            .fragments("alice@example.test", "bob@example.test")
            .unwrap()
            .len(),
        2,
        "one text per held piece"
    );
    drop(a1);
    drop(store_a);

    // The rest comes from offline storage after the restart.
    let store_a = sqlite(&dir);
    let mut a2 = hook(&store_a, RouterConfig::default(), ALICE);
    let mut shown = Vec::new();
    for el in frags {
        let s = split(a2.from_server(routed(el, BOB, ALICE), now()));
        a2.flushed();
        shown.extend(s.client);
    }
    // (After the "resumed from saved keys" notice.)
    let texts: Vec<&String> = shown.iter().filter(|t| !t.starts_with("[o2tr]")).collect();
    assert_eq!(texts, [text]);
    assert!(
        store_a
            .lock()
            .unwrap()
            .fragments("alice@example.test", "bob@example.test")
            .unwrap()
            .is_empty(),
        "cleared with the commit that completed the message"
    );
}

/// After a crash the server delivers again the fragments it had not seen
/// acknowledged, and re-routes the dead session's stanzas after newer
/// ones (ejabberd; found by the chaos campaign, fault between fragments):
/// here the last fragment arrives first (held ahead of the gap, stored
/// with the commit), the proxy dies, and after the restart the first ones
/// come, the second one twice. The message is shown exactly once.
#[test]
fn reordered_and_repeated_fragments_survive_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("alice");
    let (_bob_store, mut b) = establish_fragmenting(&dir);
    let text = "a reply long enough to need several fragments of 120 bytes each";
    let s = split(b.from_client(typed(BOB, "alice@example.test", text), now()));
    b.flushed();
    let frags = s.server;
    assert!(frags.len() >= 3, "not fragmented: {}", frags.len());
    let (last, rest) = frags.split_last().unwrap();

    let store_a = sqlite(&dir);
    let mut a1 = hook(&store_a, RouterConfig::default(), ALICE);
    let s = split(a1.from_server(routed(last.clone(), BOB, ALICE), now()));
    a1.flushed();
    assert!(s.client.is_empty() && s.server.is_empty(), "{:?}", s.client);
    drop(a1);
    drop(store_a);

    let store_a = sqlite(&dir);
    let mut a2 = hook(&store_a, RouterConfig::default(), ALICE);
    let mut order = vec![rest[0].clone(), rest[1].clone(), rest[1].clone()];
    order.extend_from_slice(&rest[2..]);
    let mut shown = Vec::new();
    for el in order {
        let s = split(a2.from_server(routed(el, BOB, ALICE), now()));
        a2.flushed();
        shown.extend(s.client);
    }
    // (After the "resumed from saved keys" notice.)
    let texts: Vec<&String> = shown.iter().filter(|t| !t.starts_with("[o2tr]")).collect();
    assert_eq!(texts, [text], "shown: {shown:?}");
    // Left, and stored: the second piece's spare copy (a repeat cannot be
    // told from another message's identical piece).
    let kept = store_a
        .lock()
        .unwrap()
        .fragments("alice@example.test", "bob@example.test")
        .unwrap();
    let second = stanza::body(&rest[1]).unwrap_or_default().to_string();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].ends_with(second.as_str()), "{kept:?}");
}

/// A first fragment is the same for every message under the same keys
/// (header, instance tags, keyids, next D-H key). When the server
/// reorders two messages' fragments, a late genuine message completed by
/// its first fragment must be read (the replay window) and shown before
/// the newer one — not dropped quietly as if it were an exact copy of the
/// message completed before by an identical first fragment.
#[test]
fn a_late_message_completed_by_its_first_fragment_is_not_taken_for_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("alice");
    let (_bob_store, mut b) = establish_fragmenting(&dir);
    let mut send = |text: &str| bob_sends(b.as_mut(), text);
    let m1 = send("the first of two replies");
    let m2 = send("the second of two replies");
    assert!(
        m1.len() >= 2 && m1.len() == m2.len(),
        "{} {}",
        m1.len(),
        m2.len()
    );
    assert_eq!(
        stanza::body(&m1[0]),
        stanza::body(&m2[0]),
        "first fragments are identical under the same keys"
    );

    let store_a = sqlite(&dir);
    let mut a = hook(&store_a, RouterConfig::default(), ALICE);
    let mut deliver = |els: &[Element]| {
        let mut shown = Vec::new();
        for el in els {
            let s = split(a.from_server(routed(el.clone(), BOB, ALICE), now()));
            a.flushed();
            shown.extend(s.client);
        }
        shown
    };
    let texts = |shown: &[String]| -> Vec<String> {
        shown
            .iter()
            .filter(|t| !t.starts_with("[o2tr]"))
            .cloned()
            .collect()
    };
    // The second message's tail, then a first fragment: the second
    // message, which waits for the first (its counter skipped one).
    let mut order: Vec<Element> = m2[1..].to_vec();
    order.push(m1[0].clone());
    let shown = deliver(&order);
    assert!(texts(&shown).is_empty(), "{shown:?}");
    // The first message's tail, then a first fragment: the first message,
    // late but genuine; both are shown, in the order they were sent.
    let mut order: Vec<Element> = m1[1..].to_vec();
    order.push(m2[0].clone());
    let shown = deliver(&order);
    assert_eq!(
        texts(&shown),
        ["the first of two replies", "the second of two replies"],
        "{shown:?}"
    );
}

/// Two messages of the same shape interleaved by the server: the tail of
/// one kept ahead of the gap completes the other's head into a message
/// that fails its MAC. The user is told; no OTR error goes to the peer
/// (libotr answers one with a new AKE, which would defeat resumption).
#[test]
fn a_wrongly_guessed_reassembly_is_not_answered_with_an_otr_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("alice");
    let (_bob_store, mut b) = establish_fragmenting(&dir);
    let mut send = |text: &str| bob_sends(b.as_mut(), text);
    // Of the same length: the mix parses and fails only its MAC.
    let m1 = send("longer reply number one, long enough for four fragments or more");
    let m2 = send("longer reply number two, long enough for four fragments or more");
    assert!(
        m1.len() >= 4 && m1.len() == m2.len(),
        "{} {}",
        m1.len(),
        m2.len()
    );

    let store_a = sqlite(&dir);
    let mut a = hook(&store_a, RouterConfig::default(), ALICE);
    // m2's last fragments arrive first, then m1 from its start.
    let half = m1.len() / 2;
    let mut order: Vec<Element> = m2[half + 1..].to_vec();
    order.extend_from_slice(&m1[..=half]);
    let mut shown = Vec::new();
    let mut to_server = Vec::new();
    for el in order {
        let s = split(a.from_server(routed(el, BOB, ALICE), now()));
        a.flushed();
        shown.extend(s.client);
        to_server.extend(s.server);
    }
    assert!(
        shown.iter().any(|t| t.starts_with("[o2tr]")),
        "the user is told: {shown:?}"
    );
    assert!(
        !shown.iter().any(|t| t.contains("longer reply")),
        "{shown:?}"
    );
    assert!(to_server.is_empty(), "answered: {to_server:?}");
}

/// What libotr does with a re-sent duplicate: it shows nothing (its
/// counter check), reports it and answers with an OTR error message —
/// which the router ignores after a re-send (test above).
#[test]
fn libotr_does_not_show_a_resent_duplicate() {
    let mut l = default_link(PeerKind::Libotr, 21);
    l.establish(false);
    l.ours.send("only once");
    let m = l.ours.outbox[0].clone();
    l.pump();
    assert_eq!(l.take_peer_seen().plain, ["only once"]);
    let o = l.deliver_to_peer(&m);
    assert!(o.plain.is_empty(), "libotr showed a duplicate: {o:?}");
    assert!(o.has_event("unreadable"), "{o:?}");
    assert!(
        o.wire
            .iter()
            .all(|w| w.starts_with("?OTR Error:") && w.contains("unreadable")),
        "{o:?}"
    );
}

/// The secure-delete wipe is deferred out of the per-message path to the
/// hook's tick (issue 8): a delivered plaintext is still in the receiver's
/// WAL after the flush (the control: the check below can fail), and gone
/// from the database and its WAL after one tick, which truncates the WAL.
#[test]
fn tick_wipes_delivered_plaintext_from_the_wal() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (state_a, state_b) = (dir_a.path().join("state"), dir_b.path().join("state"));
    let store_a = sqlite(&state_a);
    let store_b = sqlite(&state_b);
    let mut a = hook(&store_a, RouterConfig::default(), ALICE);
    let mut b = hook(&store_b, RouterConfig::default(), BOB);
    let s = split(a.from_client(typed(ALICE, "bob@example.test", "hello"), now()));
    a.flushed();
    let (_, seen_b) = pump(&mut *a, &mut *b, s.server, Vec::new());
    assert!(seen_b.iter().any(|t| t == "hello"), "bob saw {seen_b:?}");
    a.tick(now());
    b.tick(now());

    let secret: String = (0..40)
        .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
        .collect();
    let s = split(a.from_client(typed(ALICE, "bob@example.test", &secret), now()));
    a.flushed();
    let (_, seen_b) = pump(&mut *a, &mut *b, s.server, Vec::new());
    assert_eq!(seen_b, std::slice::from_ref(&secret));
    let db = state_b.join(o2tr_proxy::store::DB_FILE_NAME);
    let wal = state_b.join(format!("{}-wal", o2tr_proxy::store::DB_FILE_NAME));
    let holds = |p: &Path| {
        std::fs::read(p)
            .unwrap_or_default()
            .windows(secret.len())
            .any(|w| w == secret.as_bytes())
    };
    assert!(
        holds(&wal),
        "before the tick the acknowledged inbox row is in the WAL"
    );
    b.tick(now());
    assert!(!holds(&db), "plaintext in the database file");
    assert!(!holds(&wal), "plaintext in the WAL");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
    assert!(
        store_b
            .lock()
            .unwrap()
            .inbox("bob@example.test", "alice@example.test")
            .unwrap()
            .is_empty(),
        "the flush acknowledged the entry"
    );
}

// ---- group commit (issue 8) ---------------------------------------------

/// A [`MemoryStore`] that counts group commits and can be made to fail
/// them, to see how many durable commits a batch costs.
#[derive(Default)]
struct Counting {
    inner: MemoryStore,
    commits: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
}

impl Store for Counting {
    fn account_key(&self, a: &str) -> store::Result<Option<Zeroizing<Vec<u8>>>> {
        self.inner.account_key(a)
    }
    fn set_account_key(&mut self, a: &str, k: &[u8]) -> store::Result<()> {
        self.inner.set_account_key(a, k)
    }
    fn accounts(&self) -> store::Result<Vec<String>> {
        self.inner.accounts()
    }
    fn instance_tag(&self, a: &str) -> store::Result<Option<u32>> {
        self.inner.instance_tag(a)
    }
    fn set_instance_tag(&mut self, a: &str, t: u32) -> store::Result<()> {
        self.inner.set_instance_tag(a, t)
    }
    fn fingerprints(&self, a: &str, p: &str) -> store::Result<Vec<FingerprintRecord>> {
        self.inner.fingerprints(a, p)
    }
    fn all_fingerprints(&self) -> store::Result<Vec<FingerprintRecord>> {
        self.inner.all_fingerprints()
    }
    fn set_fingerprint(
        &mut self,
        a: &str,
        p: &str,
        f: &[u8; 20],
        t: Trust,
        now: u64,
    ) -> store::Result<()> {
        self.inner.set_fingerprint(a, p, f, t, now)
    }
    fn remove_fingerprint(&mut self, a: &str, p: &str, f: &[u8; 20]) -> store::Result<bool> {
        self.inner.remove_fingerprint(a, p, f)
    }
    fn snapshot(&self, k: &ConversationKey) -> store::Result<Option<SnapshotRecord>> {
        self.inner.snapshot(k)
    }
    fn snapshots_for_peer(&self, a: &str, p: &str) -> store::Result<Vec<SnapshotRecord>> {
        self.inner.snapshots_for_peer(a, p)
    }
    fn snapshots(&self) -> store::Result<Vec<SnapshotRecord>> {
        self.inner.snapshots()
    }
    fn save_snapshot(
        &mut self,
        k: &ConversationKey,
        s: SessionState,
        d: &[u8],
        now: u64,
    ) -> store::Result<()> {
        self.inner.save_snapshot(k, s, d, now)
    }
    fn set_snapshot_state(
        &mut self,
        k: &ConversationKey,
        s: SessionState,
        now: u64,
    ) -> store::Result<bool> {
        self.inner.set_snapshot_state(k, s, now)
    }
    fn delete_snapshot(&mut self, k: &ConversationKey) -> store::Result<bool> {
        self.inner.delete_snapshot(k)
    }
    fn expire_snapshots(&mut self, older_than: u64) -> store::Result<Vec<ConversationKey>> {
        self.inner.expire_snapshots(older_than)
    }
    fn hold_message(&mut self, a: &str, p: &str, t: &str, now: u64) -> store::Result<i64> {
        self.inner.hold_message(a, p, t, now)
    }
    fn held_messages(&self, a: &str, p: &str) -> store::Result<Vec<HeldMessage>> {
        self.inner.held_messages(a, p)
    }
    fn all_held_messages(&self) -> store::Result<Vec<HeldMessage>> {
        self.inner.all_held_messages()
    }
    fn held_peers(&self, a: &str) -> store::Result<Vec<String>> {
        self.inner.held_peers(a)
    }
    fn release_held(&mut self, id: i64) -> store::Result<bool> {
        self.inner.release_held(id)
    }
    fn commit_steps(
        &mut self,
        a: &str,
        steps: &[PeerStep<'_>],
        now: u64,
    ) -> store::Result<Vec<CommitReceipt>> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(store::Error::Corrupt("disk full (test)".into()));
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit_steps(a, steps, now)
    }
    fn inbox(&self, a: &str, p: &str) -> store::Result<Vec<InboxMessage>> {
        self.inner.inbox(a, p)
    }
    fn all_inbox(&self) -> store::Result<Vec<InboxMessage>> {
        self.inner.all_inbox()
    }
    fn ack_inbox(&mut self, a: &str, p: &str, through: i64) -> store::Result<usize> {
        self.inner.ack_inbox(a, p, through)
    }
    fn outbox(&self, a: &str) -> store::Result<Vec<OutboxMessage>> {
        self.inner.outbox(a)
    }
    fn ack_outbox(&mut self, id: i64) -> store::Result<bool> {
        self.inner.ack_outbox(id)
    }
    fn fragments(&self, a: &str, p: &str) -> store::Result<Vec<String>> {
        self.inner.fragments(a, p)
    }
    fn handshakes(&self, a: &str, p: &str) -> store::Result<Vec<store::HandshakeRecord>> {
        self.inner.handshakes(a, p)
    }
}

/// Alice and Bob with a private session, both over a [`Counting`] store;
/// returns the hooks and the stores' counters.
#[allow(clippy::type_complexity)]
fn counted_pair() -> (
    (Box<dyn StanzaHook>, SharedStore, Arc<AtomicUsize>),
    (Box<dyn StanzaHook>, Arc<AtomicUsize>, Arc<AtomicBool>),
) {
    let ca = Counting::default();
    let a_commits = Arc::clone(&ca.commits);
    let store_a: SharedStore = Arc::new(Mutex::new(Box::new(ca)));
    let cb = Counting::default();
    let (b_commits, b_fail) = (Arc::clone(&cb.commits), Arc::clone(&cb.fail));
    let store_b: SharedStore = Arc::new(Mutex::new(Box::new(cb)));
    let mut a = hook(&store_a, RouterConfig::default(), ALICE);
    let mut b = hook(&store_b, RouterConfig::default(), BOB);
    let s = split(a.from_client(typed(ALICE, "bob@example.test", "hello"), now()));
    a.flushed();
    let (_, seen_b) = pump(&mut *a, &mut *b, s.server, Vec::new());
    assert!(seen_b.iter().any(|t| t == "hello"), "bob saw {seen_b:?}");
    ((a, store_a, a_commits), (b, b_commits, b_fail))
}

fn burst(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("burst {i}")).collect()
}

/// A burst the client wrote in one read is one durable commit on the
/// sending side and one on the receiving side; everything arrives once,
/// in order, and nothing is acknowledged before it was written.
#[test]
fn a_burst_is_one_group_commit_on_each_side() {
    let ((mut a, store_a, a_commits), (mut b, b_commits, _)) = counted_pair();
    let texts = burst(12);
    let before = a_commits.load(Ordering::SeqCst);
    let typed_all = texts
        .iter()
        .map(|t| Incoming::FromClient(typed(ALICE, "bob@example.test", t)))
        .collect();
    let s = split(a.batch(typed_all, now()));
    assert_eq!(a_commits.load(Ordering::SeqCst) - before, 1, "one commit");
    assert_eq!(s.server.len(), texts.len());
    assert!(s.server.iter().all(is_data), "no AKE: {:?}", s.server);
    let outbox = |s: &SharedStore| s.lock().unwrap().outbox("alice@example.test").unwrap();
    assert_eq!(outbox(&store_a).len(), texts.len(), "all in the outbox");
    a.flushed();
    assert!(outbox(&store_a).is_empty(), "acknowledged once written");

    let before = b_commits.load(Ordering::SeqCst);
    let routed_all = s
        .server
        .into_iter()
        .map(|el| Incoming::FromServer(routed(el, ALICE, BOB)))
        .collect();
    let seen = split(b.batch(routed_all, now()));
    b.flushed();
    assert_eq!(b_commits.load(Ordering::SeqCst) - before, 1, "one commit");
    assert_eq!(seen.client, texts);
    assert!(seen.server.is_empty());
}

/// When the group commit fails, nothing of the batch leaves: no
/// plaintext, only the failure notices (one per message).
#[test]
fn a_failed_group_commit_releases_nothing() {
    let ((mut a, _store_a, _), (mut b, _, b_fail)) = counted_pair();
    let typed_all = burst(3)
        .iter()
        .map(|t| Incoming::FromClient(typed(ALICE, "bob@example.test", t)))
        .collect();
    let s = split(a.batch(typed_all, now()));
    a.flushed();
    b_fail.store(true, Ordering::SeqCst);
    let routed_all = s
        .server
        .into_iter()
        .map(|el| Incoming::FromServer(routed(el, ALICE, BOB)))
        .collect();
    let seen = split(b.batch(routed_all, now()));
    assert!(seen.server.is_empty());
    assert_eq!(seen.client.len(), 3, "{:?}", seen.client);
    assert!(
        seen.client
            .iter()
            .all(|t| t.contains("Could not save") && !t.contains("burst")),
        "{:?}",
        seen.client
    );
}

/// The proxy dies after a burst's group commit but before anything was
/// written: after the restart the whole burst goes out again, in order,
/// and the receiver shows each message exactly once (also when part of
/// it had got through).
#[test]
fn a_burst_lost_in_a_crash_is_resent_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("alice");
    let (_bob_store, mut b) = establish(&dir, RouterConfig::default());
    let texts = burst(10);
    let store_a = sqlite(&dir);
    let mut a1 = hook(&store_a, RouterConfig::default(), ALICE);
    let typed_all = texts
        .iter()
        .map(|t| Incoming::FromClient(typed(ALICE, "bob@example.test", t)))
        .collect();
    let s = split(a1.batch(typed_all, now()));
    assert_eq!(s.server.len(), texts.len());
    // Crash: the first four reached the server, the rest never did.
    let got_through: Vec<Element> = s.server[..4].to_vec();
    drop(a1);
    drop(store_a);
    let (_, seen_b) = pump(&mut *dummy_alice(), &mut *b, got_through, Vec::new());
    assert_eq!(seen_b, texts[..4]);

    let store_a = sqlite(&dir);
    let mut a2 = hook(&store_a, RouterConfig::default(), ALICE);
    let s = split(a2.tick(now()));
    a2.flushed();
    assert_eq!(s.server.len(), texts.len(), "the whole burst is re-sent");
    let resent = s
        .server
        .into_iter()
        .map(|el| Incoming::FromServer(routed(el, ALICE, BOB)))
        .collect();
    let seen = split(b.batch(resent, now()));
    b.flushed();
    assert_eq!(
        seen.client,
        texts[4..],
        "the rest, once; duplicates dropped"
    );
    assert!(
        seen.server.is_empty(),
        "duplicates answered: {:?}",
        seen.server
    );
}

/// A hook that is never given anything (for [`pump`] with one side).
fn dummy_alice() -> Box<dyn StanzaHook> {
    Box::new(o2tr_proxy::proxy::PassThrough)
}

/// The AKE responder commits its new session together with its Signature
/// message. If its proxy dies before writing that message, the restarted
/// proxy sends it again, before the data messages of the session, so the
/// initiator goes private and reads them. Before, only data messages were
/// kept: the initiator never got the Signature, answered every message
/// with an OTR error, and the messages were lost (chaos campaign, fault
/// during an AKE, proxy SIGKILL; CI seed 748494199).
#[test]
fn a_signature_lost_in_a_crash_is_sent_again_before_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("alice");
    let store_a = sqlite(&dir);
    let mut a = hook(&store_a, RouterConfig::default(), ALICE);
    let bob_store: SharedStore = Arc::new(Mutex::new(Box::new(MemoryStore::new())));
    let mut b = hook(&bob_store, RouterConfig::default(), BOB);
    let sig = |el: &Element| stanza::body(el).is_some_and(|t| t.starts_with("?OTR:AAMS"));

    // Alice types: held by policy `always`; her query starts the AKE.
    // Query → Bob, D-H Commit → Alice, D-H Key → Bob, Reveal Signature.
    let mut to_b = split(a.from_client(typed(ALICE, "bob@example.test", "hello"), now())).server;
    a.flushed();
    let last = loop {
        let mut to_a = Vec::new();
        for el in to_b.drain(..) {
            to_a.extend(split(b.from_server(routed(el, ALICE, BOB), now())).server);
            b.flushed();
        }
        assert!(!to_a.is_empty(), "the AKE stalled");
        let mut from_a = Vec::new();
        for el in to_a {
            from_a.extend(split(a.from_server(routed(el, BOB, ALICE), now())).server);
        }
        if from_a.iter().any(sig) {
            break from_a;
        }
        a.flushed();
        to_b = from_a;
    };
    // Alice is private: her Signature and her held message are committed,
    // but her proxy dies before writing them.
    assert!(last.iter().any(is_data), "{last:?}");
    drop(a);
    drop(store_a);

    let store_a = sqlite(&dir);
    let mut a = hook(&store_a, RouterConfig::default(), ALICE);
    let resent = split(a.tick(now())).server;
    a.flushed();
    assert!(
        resent.first().is_some_and(sig),
        "the Signature goes first: {resent:?}"
    );
    let (seen_a, seen_b) = pump(&mut *a, &mut *b, resent, Vec::new());
    let shown: Vec<&String> = seen_b.iter().filter(|t| !t.starts_with("[o2tr]")).collect();
    assert_eq!(shown, ["hello"], "bob saw {seen_b:?}");
    assert!(
        !seen_a.iter().any(|t| t.contains("could not read")),
        "{seen_a:?}"
    );
    // And the session goes on both ways.
    let reply = bob_sends(&mut *b, "hi alice");
    let (seen_a, _) = pump(&mut *a, &mut *b, Vec::new(), reply);
    assert!(seen_a.iter().any(|t| t == "hi alice"), "{seen_a:?}");
}
