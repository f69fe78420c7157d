//! Our OTR core talking to a real OTR implementation (libotr or potr, see
//! [`super::peer`]), with the test as the network and as the proxy's
//! durable store.
//!
//! [`Ours`] is one side running `o2tr_proxy::otr::conversation` — it applies
//! every [`Action`] like the proxy does (snapshots and held messages go to an
//! in-memory "store" that survives [`Ours::restart`]). [`Link`] joins it to a
//! [`PeerProcess`] and logs every message that crosses the wire, so tests can
//! assert what did (or did not) travel, e.g. that no AKE happened after a
//! restart.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, OnceLock};

use o2tr_proxy::otr::conversation::{Action, Config, Conversation, Delivery, Notice};
use o2tr_proxy::otr::crypto::DsaPrivateKey;
use o2tr_proxy::otr::message::{Body, EncodedMessage, WHITESPACE_TAG_BASE};
use o2tr_proxy::otr::policy::Policy;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

use super::peer::{MsgState, PeerKind, PeerOptions, PeerOutput, PeerProcess};

/// Our account name.
pub const OUR_ACCOUNT: &str = "alice@example.org";
/// The peer's account name.
pub const PEER_ACCOUNT: &str = "bob@example.org";
/// Our instance tag.
pub const OUR_TAG: u32 = 0x1234_5678;
/// The `now` every test starts at.
pub const T0: u64 = 1_700_000_000;

/// Our long-term DSA key, generated once per test binary from a fixed seed.
pub fn our_key() -> Arc<DsaPrivateKey> {
    static KEY: OnceLock<Arc<DsaPrivateKey>> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(0x0172_1e70);
        Arc::new(DsaPrivateKey::generate(&mut rng))
    })
    .clone()
}

/// Our fingerprint as the peers print it.
pub fn our_fingerprint() -> String {
    our_key().public_key().fingerprint().to_hex()
}

/// Our configuration with `policy`; everything else default.
pub fn config(policy: Policy) -> Config {
    let mut c = Config::new(OUR_ACCOUNT, OUR_TAG);
    c.policy = policy;
    c
}

/// Our side: a conversation plus everything it produced.
pub struct Ours {
    /// The configuration (reused by [`Ours::restart`]).
    pub cfg: Config,
    /// The live conversation.
    pub conv: Conversation,
    /// Our randomness (fixed seed).
    pub rng: ChaCha20Rng,
    /// Current time (unix seconds) handed to the core.
    pub now: u64,
    /// Bodies to put on the network, oldest first.
    pub outbox: VecDeque<String>,
    /// Everything shown to the user.
    pub delivered: Vec<Delivery>,
    /// Everything the user was told.
    pub notices: Vec<Notice>,
    /// The durable store: the snapshot of each instance.
    pub snapshots: BTreeMap<u32, Vec<u8>>,
    /// The durable store: the handshake record of each instance.
    pub handshakes: BTreeMap<u32, Vec<u8>>,
    /// The durable store: held messages.
    pub held: VecDeque<String>,
    /// How many restarts happened.
    pub restarts: usize,
}

impl Ours {
    /// A fresh side with `cfg`, randomness from `seed`.
    pub fn new(cfg: Config, seed: u64) -> Self {
        Ours {
            conv: Conversation::new(cfg.clone(), our_key()),
            cfg,
            rng: ChaCha20Rng::seed_from_u64(seed),
            now: T0,
            outbox: VecDeque::new(),
            delivered: Vec::new(),
            notices: Vec::new(),
            snapshots: BTreeMap::new(),
            handshakes: BTreeMap::new(),
            held: VecDeque::new(),
            restarts: 0,
        }
    }

    /// Performs `actions` in order, like the proxy.
    pub fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send(s) => self.outbox.push_back(s),
                Action::Deliver(d) => self.delivered.push(d),
                Action::Notify(n) => self.notices.push(n),
                Action::Persist(p) => {
                    self.snapshots.insert(p.instance, p.snapshot.to_vec());
                }
                Action::Forget { instance } => {
                    self.snapshots.remove(&instance);
                }
                Action::PersistHandshake(p) => {
                    self.handshakes.insert(p.instance, p.snapshot.to_vec());
                }
                Action::ForgetHandshake { instance } => {
                    self.handshakes.remove(&instance);
                }
                Action::Hold(t) => self.held.push_back(t.to_string()),
                Action::ReleaseHeld { count } => {
                    for _ in 0..count {
                        self.held.pop_front();
                    }
                }
            }
        }
    }

    /// The user typed `text`.
    pub fn send(&mut self, text: &str) {
        let a = self.conv.handle_outgoing(text, self.now, &mut self.rng);
        self.apply(a);
    }

    /// `body` arrived from the network.
    pub fn receive(&mut self, body: &str) {
        let a = self.conv.handle_incoming(body, self.now, &mut self.rng);
        self.apply(a);
    }

    /// The user asked for OTR (query message).
    pub fn start(&mut self) {
        let a = self.conv.handle_start(self.now);
        self.apply(a);
    }

    /// The user ended the private conversation.
    pub fn end(&mut self) {
        let a = self.conv.handle_end(self.now, &mut self.rng);
        self.apply(a);
    }

    /// Texts delivered so far.
    pub fn texts(&self) -> Vec<String> {
        self.delivered.iter().map(|d| d.text.clone()).collect()
    }

    /// Whether a notice matching `f` was given.
    pub fn noticed(&self, f: impl Fn(&Notice) -> bool) -> bool {
        self.notices.iter().any(f)
    }

    /// Crash and restart: drop the in-memory conversation and anything not
    /// yet sent, rebuild from the durable snapshots and held messages (the
    /// same as `Side::restart` in `pair.rs`).
    pub fn restart(&mut self) {
        let mut conv = Conversation::new(self.cfg.clone(), our_key());
        for snap in self.snapshots.values() {
            conv.restore(snap).expect("snapshot restores");
        }
        for record in self.handshakes.values() {
            conv.restore_handshake(record, self.now, u64::MAX)
                .expect("handshake record restores");
        }
        conv.restore_held(self.held.iter().map(|t| zeroize::Zeroizing::new(t.clone())));
        self.conv = conv;
        self.outbox.clear();
        self.restarts += 1;
    }
}

/// Which way a message crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From our core to the peer.
    ToPeer,
    /// From the peer to our core.
    ToUs,
}

/// Our core joined to a real peer.
pub struct Link {
    /// Our side.
    pub ours: Ours,
    /// The real implementation.
    pub peer: PeerProcess,
    /// Messages the peer emitted that are still on the network to us.
    pub to_us: VecDeque<String>,
    /// Everything the peer reported while receiving (accumulated).
    pub peer_seen: PeerOutput,
    /// Every message that crossed the wire, in order.
    pub wire_log: Vec<(Dir, String)>,
}

/// Key cache name for a peer kind (keys are generated once per machine).
fn key_name(kind: PeerKind) -> String {
    format!("interop-{kind}-bob")
}

impl Link {
    /// Starts a `kind` peer with `opts` and our side with `cfg`.
    pub fn new(kind: PeerKind, opts: &PeerOptions, cfg: Config, seed: u64) -> Self {
        let peer =
            PeerProcess::spawn_cached(kind, &key_name(kind), PEER_ACCOUNT, OUR_ACCOUNT, opts)
                .unwrap_or_else(|e| panic!("spawning {kind}: {e}"));
        Link {
            ours: Ours::new(cfg, seed),
            peer,
            to_us: VecDeque::new(),
            peer_seen: PeerOutput::default(),
            wire_log: Vec::new(),
        }
    }

    /// Delivers one message to the peer (logged); the peer's answers go on
    /// the network to us.
    pub fn deliver_to_peer(&mut self, m: &str) -> PeerOutput {
        self.wire_log.push((Dir::ToPeer, m.to_owned()));
        let o = self.peer.receive(m);
        self.to_us.extend(o.wire.iter().cloned());
        self.peer_seen.extend(o.clone());
        o
    }

    /// Delivers one message to us (logged).
    pub fn deliver_to_us(&mut self, m: &str) {
        self.wire_log.push((Dir::ToUs, m.to_owned()));
        self.ours.receive(m);
    }

    /// Carries messages both ways until nobody has anything to send.
    pub fn pump(&mut self) {
        for _ in 0..20_000 {
            if let Some(m) = self.ours.outbox.pop_front() {
                self.deliver_to_peer(&m);
            } else if let Some(m) = self.to_us.pop_front() {
                self.deliver_to_us(&m);
            } else {
                return;
            }
        }
        panic!("conversation did not settle");
    }

    /// The peer's user typed `text`: its wire messages go on the network
    /// (not delivered yet). Returns what the peer printed.
    pub fn peer_types(&mut self, text: &str) -> PeerOutput {
        let o = self.peer.send(text);
        self.to_us.extend(o.wire.iter().cloned());
        self.peer_seen.extend(o.clone());
        o
    }

    /// The peer sends its query message (not delivered yet).
    pub fn peer_query(&mut self) {
        let q = self.peer.query();
        self.to_us.extend(q);
    }

    /// Takes what the peer reported since the last call.
    pub fn take_peer_seen(&mut self) -> PeerOutput {
        std::mem::take(&mut self.peer_seen)
    }

    /// Establishes a private conversation; `we_start` says who sends the
    /// query. Checks both sides are private with each other's key.
    pub fn establish(&mut self, we_start: bool) {
        if we_start {
            self.ours.start();
        } else {
            self.peer_query();
        }
        self.pump();
        self.check_private();
        let seen = self.take_peer_seen();
        assert!(
            seen.has_event("gone_secure"),
            "peer not gone secure: {seen:?}"
        );
        assert!(
            self.ours
                .noticed(|n| matches!(n, Notice::GoneSecure { .. })),
            "we did not go secure: {:?}",
            self.ours.notices
        );
    }

    /// Both sides private, each with the other's fingerprint.
    pub fn check_private(&mut self) {
        assert!(self.ours.conv.is_private(), "our side is not private");
        assert_eq!(
            self.ours.conv.peer_fingerprint().map(|f| f.to_hex()),
            Some(self.peer.fingerprint().to_owned()),
            "our side sees the wrong peer fingerprint"
        );
        let st = self.peer.status();
        assert_eq!(st.state, MsgState::Encrypted, "peer status {st:?}");
        assert_eq!(
            st.peer_fingerprint.as_deref(),
            Some(our_fingerprint().as_str()),
            "peer sees the wrong fingerprint"
        );
    }

    /// We say `text`; it must reach the peer's user exactly, encrypted.
    pub fn we_say(&mut self, text: &str) {
        self.ours.send(text);
        assert!(!self.ours.outbox.is_empty(), "we sent nothing for {text:?}");
        // (Short texts can occur in base64 by chance.)
        if text.len() >= 8 {
            for m in &self.ours.outbox {
                assert!(!m.contains(text), "plaintext on the wire: {m:?}");
            }
        }
        self.take_peer_seen();
        self.pump();
        let seen = self.take_peer_seen();
        assert_eq!(seen.plain, vec![text.to_owned()], "peer got {seen:?}");
    }

    /// The peer says `text`; it must reach our user exactly, encrypted.
    pub fn they_say(&mut self, text: &str) {
        let before = self.ours.delivered.len();
        let o = self.peer_types(text);
        assert!(!o.wire.is_empty(), "peer sent nothing for {text:?}");
        self.pump();
        let got: Vec<&Delivery> = self.ours.delivered[before..].iter().collect();
        assert_eq!(got.len(), 1, "we got {got:?}");
        assert_eq!(got[0].text, text);
        assert!(got[0].encrypted, "not encrypted: {:?}", got[0]);
    }

    /// Our side crashes and restarts from its durable store. Messages it
    /// already handed to the network stay on the network.
    pub fn restart_ours(&mut self) {
        let in_flight = std::mem::take(&mut self.ours.outbox);
        self.ours.restart();
        self.ours.outbox = in_flight;
    }

    /// Index into [`Link::wire_log`] for later [`Link::ake_since`] checks.
    pub fn mark(&self) -> usize {
        self.wire_log.len()
    }

    /// AKE messages, queries and error messages that crossed since `mark`.
    pub fn ake_since(&self, mark: usize) -> Vec<(Dir, String)> {
        self.wire_log[mark..]
            .iter()
            .filter(|(_, m)| is_ake_or_query(m))
            .cloned()
            .collect()
    }
}

/// Whether a wire message (or fragment) is a query, an error message or
/// any AKE message (D-H Commit, D-H Key, Reveal Signature, Signature).
pub fn is_ake_or_query(m: &str) -> bool {
    if m.contains("?OTRv") || m.contains("?OTR?") || m.contains("?OTR Error") {
        return true;
    }
    // base64 of (version 0x0003|0x0002, type): 0x02 C, 0x0a K, 0x11 R, 0x12 S.
    [
        "AAMC", "AAMK", "AAMR", "AAMS", "AAIC", "AAIK", "AAIR", "AAIS",
    ]
    .iter()
    .any(|p| m.contains(&format!("?OTR:{p}")))
}

/// Whether `m` is an (unfragmented) data message.
pub fn is_data(m: &str) -> bool {
    matches!(
        EncodedMessage::from_armored(m).map(|e| e.body),
        Ok(Body::Data(_))
    )
}

/// Which field of a data message to damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Flip a bit of the ciphertext.
    Ciphertext,
    /// Flip a bit of the MAC.
    Mac,
}

/// Decodes the armoured data message `m`, flips one bit in the chosen
/// field and re-armours it.
pub fn tamper(m: &str, what: Tamper) -> String {
    let mut e = EncodedMessage::from_armored(m).expect("an armoured message");
    let Body::Data(d) = &mut e.body else {
        panic!("not a data message: {m:?}");
    };
    match what {
        Tamper::Ciphertext => {
            assert!(!d.encrypted.is_empty(), "empty ciphertext");
            let i = d.encrypted.len() / 2;
            d.encrypted[i] ^= 0x04;
        }
        Tamper::Mac => d.mac[7] ^= 0x80,
    }
    let out = e.to_armored();
    assert_ne!(out, m);
    out
}

// ---------------------------------------------------------------------------
// Scenarios shared by `interop_libotr.rs` (v3) and `interop_potr.rs` (v2).
// ---------------------------------------------------------------------------

/// The protocol version our core and `kind` agree on.
pub fn expected_version(kind: PeerKind) -> u8 {
    match kind {
        PeerKind::Libotr => 3,
        PeerKind::Potr => 2,
    }
}

/// A link with default options (peer opportunistic, we `Always`).
pub fn default_link(kind: PeerKind, seed: u64) -> Link {
    Link::new(kind, &PeerOptions::default(), config(Policy::Always), seed)
}

/// Checks the version both sides report.
pub fn check_version(l: &mut Link) {
    let v = expected_version(l.peer.kind());
    assert_eq!(l.peer.status().version, Some(v), "peer version");
    let st = l.ours.conv.status();
    let ours: Vec<u16> = st
        .iter()
        .filter(|s| s.state == "encrypted")
        .filter_map(|s| s.version.map(|v| v.number()))
        .collect();
    assert_eq!(ours, vec![u16::from(v)], "our version: {st:?}");
}

/// Scenario 1: AKE started by us (our query) or by them (their query).
pub fn scenario_ake(kind: PeerKind, we_start: bool) {
    let mut l = default_link(kind, 1);
    l.establish(we_start);
    check_version(&mut l);
    // Their READY fingerprint and our key fingerprint, seen from the other
    // side (checked in `check_private`), and the reverse.
    assert_eq!(
        l.peer.status().peer_fingerprint.as_deref(),
        Some(our_fingerprint().as_str())
    );
    assert_eq!(
        l.ours.conv.peer_fingerprint().unwrap().to_hex(),
        l.peer.fingerprint()
    );
    l.we_say("hello from the core");
    l.they_say("hello from the peer");
}

/// Scenario 2: `n` messages alternating, each delivered exactly and in order.
pub fn scenario_alternating(kind: PeerKind, n: usize) {
    let mut l = default_link(kind, 2);
    l.establish(true);
    let mut to_peer = Vec::new();
    let mut to_us = Vec::new();
    let mut peer_plain = Vec::new();
    for i in 0..n {
        if i % 2 == 0 {
            let t = format!("core→peer #{i} «ünïcødé» {}", "x".repeat(i % 37));
            l.ours.send(&t);
            l.pump();
            peer_plain.extend(l.take_peer_seen().plain);
            to_peer.push(t);
        } else {
            let t = format!("peer→core #{i} {}", "y".repeat(i % 41));
            l.peer_types(&t);
            l.pump();
            peer_plain.extend(l.take_peer_seen().plain);
            to_us.push(t);
        }
    }
    assert_eq!(peer_plain, to_peer);
    assert_eq!(l.ours.texts(), to_us);
    assert!(l.ours.delivered.iter().all(|d| d.encrypted && !d.offline));
    // One AKE (query, D-H Commit, D-H Key, Reveal Signature, Signature).
    assert_eq!(l.ake_since(0).len(), 5, "{:?}", l.ake_since(0));
    // The peer numbers its messages 1, 2, 3… per key pairing as we assume:
    // ordinary traffic never looks like a gap (a "missing" notice).
    assert!(!l.ours.noticed(|n| matches!(n, Notice::Missing { .. })));
    l.check_private();
}

/// Scenario 3: A burst of 50 one way without replies, then a reply; both ways.
pub fn scenario_burst(kind: PeerKind) {
    let mut l = default_link(kind, 3);
    l.establish(true);
    let ours: Vec<String> = (0..50).map(|i| format!("burst from core {i}")).collect();
    for t in &ours {
        l.ours.send(t);
    }
    assert_eq!(l.ours.outbox.len(), 50);
    l.pump();
    assert_eq!(l.take_peer_seen().plain, ours);
    l.they_say("got your 50");

    let theirs: Vec<String> = (0..50).map(|i| format!("burst from peer {i}")).collect();
    let before = l.ours.delivered.len();
    for t in &theirs {
        l.peer_types(t);
    }
    assert_eq!(l.to_us.len(), 50);
    l.pump();
    assert_eq!(l.ours.texts()[before..], theirs[..]);
    l.we_say("got your 50 too");
    assert!(!l.ours.noticed(|n| matches!(n, Notice::Missing { .. })));
    l.check_private();
}

/// Scenario 4: Fragmentation forced on both sides (`size` bytes), AKE included.
pub fn scenario_fragmented(kind: PeerKind, size: usize) {
    let mut cfg = config(Policy::Always);
    cfg.max_message_bytes = size;
    let opts = PeerOptions::default().with_fragment_size(size);
    let mut l = Link::new(kind, &opts, cfg, 4);
    l.establish(true);
    let long_ours = format!("from the core: {}", "0123456789".repeat(60));
    let long_theirs = format!("from the peer: {}", "abcdefghij".repeat(60));
    l.we_say(&long_ours);
    l.they_say(&long_theirs);
    l.we_say("short");
    l.they_say("short too");
    // Every encoded message (AKE and data) fits; the query message is
    // plaintext and is not fragmented by either side.
    for (d, m) in &l.wire_log {
        if !m.starts_with("?OTRv") {
            assert!(
                m.len() <= size,
                "{d:?} message of {} bytes > {size}: {m:?}",
                m.len()
            );
        }
    }
    let frag = |dir: Dir| {
        l.wire_log
            .iter()
            .filter(|(d, m)| *d == dir && (m.starts_with("?OTR|") || m.starts_with("?OTR,")))
            .count()
    };
    assert!(frag(Dir::ToPeer) > 5, "we did not fragment");
    assert!(frag(Dir::ToUs) > 5, "the peer did not fragment");
}

/// Scenario 5: Opportunistic policy: a whitespace-tagged plaintext from one side
/// starts the AKE.
pub fn scenario_whitespace(kind: PeerKind, we_start: bool) {
    let mut l = Link::new(
        kind,
        &PeerOptions::default(),
        config(Policy::Opportunistic),
        5,
    );
    if we_start {
        l.ours.send("hello in plaintext");
        assert_eq!(l.ours.outbox.len(), 1);
        let m = l.ours.outbox[0].clone();
        assert!(m.starts_with("hello in plaintext"), "{m:?}");
        assert!(m.contains(WHITESPACE_TAG_BASE), "no whitespace tag: {m:?}");
        l.pump();
        let seen = l.take_peer_seen();
        assert_eq!(seen.plain, vec!["hello in plaintext".to_owned()]);
        assert!(seen.has_event("gone_secure"), "{seen:?}");
    } else {
        let o = l.peer_types("hi, plaintext");
        assert_eq!(o.wire.len(), 1, "{o:?}");
        assert!(o.wire[0].contains(WHITESPACE_TAG_BASE), "no tag: {o:?}");
        l.pump();
        assert_eq!(l.ours.delivered.len(), 1);
        assert_eq!(l.ours.delivered[0].text, "hi, plaintext");
        assert!(!l.ours.delivered[0].encrypted);
        assert!(l.take_peer_seen().has_event("gone_secure"));
    }
    // Someone started an AKE; no query was needed.
    assert!(
        !l.wire_log.iter().any(|(_, m)| m.contains("?OTRv")),
        "a query was sent: {:?}",
        l.wire_log
    );
    l.check_private();
    check_version(&mut l);
    l.we_say("now private");
    l.they_say("indeed");
}

/// Scenario 6a: The peer ends the session.
pub fn scenario_peer_ends(kind: PeerKind) {
    let mut l = default_link(kind, 6);
    l.establish(false);
    l.we_say("before the end");
    let w = l.peer.end();
    assert_eq!(w.len(), 1, "disconnect message: {w:?}");
    assert!(is_data(&w[0]));
    l.to_us.extend(w);
    l.pump();
    assert!(
        l.ours.noticed(|n| *n == Notice::PeerEnded),
        "{:?}",
        l.ours.notices
    );
    assert!(!l.ours.conv.is_private());
    assert!(l.ours.snapshots.is_empty(), "keys kept after the end");
    let mark = l.mark();
    l.ours.send("must not leak");
    assert!(l.ours.noticed(|n| *n == Notice::CannotSendFinished));
    assert!(
        l.ours.outbox.iter().all(|m| !m.contains("must not leak")),
        "plaintext sent after the peer ended: {:?}",
        l.ours.outbox
    );
    l.pump();
    assert!(
        l.wire_log[mark..]
            .iter()
            .all(|(_, m)| !m.contains("must not leak"))
    );
    assert!(l.take_peer_seen().plain.is_empty());
}

/// Scenario 6b: We end the session: the peer sees `finished`.
pub fn scenario_we_end(kind: PeerKind) {
    let mut l = default_link(kind, 7);
    l.establish(true);
    l.they_say("before the end");
    l.ours.end();
    assert!(l.ours.noticed(|n| *n == Notice::Ended));
    assert!(!l.ours.conv.is_private());
    assert!(l.ours.snapshots.is_empty());
    l.pump();
    let seen = l.take_peer_seen();
    assert!(seen.has_event("finished"), "{seen:?}");
    assert!(seen.plain.is_empty(), "{seen:?}");
    assert_eq!(l.peer.status().state, MsgState::Finished);
}

/// Scenario 7a: A tampered data message from the peer is rejected and reported; the
/// genuine one is still accepted afterwards.
pub fn scenario_tampered_incoming(kind: PeerKind, what: Tamper) {
    let mut l = default_link(kind, 8);
    l.establish(true);
    l.they_say("warm-up");
    l.we_say("warm-up back");
    l.peer_types("the real text");
    assert_eq!(l.to_us.len(), 1);
    let genuine = l.to_us.pop_front().unwrap();
    let before = l.ours.delivered.len();
    l.deliver_to_us(&tamper(&genuine, what));
    assert_eq!(l.ours.delivered.len(), before, "tampered message delivered");
    assert!(
        l.ours.noticed(|n| matches!(n, Notice::Unreadable { .. })),
        "{:?}",
        l.ours.notices
    );
    // The error message we answered with is on its way; the genuine message
    // arrived before it.
    l.deliver_to_us(&genuine);
    assert_eq!(l.ours.texts()[before..], ["the real text".to_owned()]);
    l.pump();
    l.check_private();
    l.we_say("still talking");
    l.they_say("yes");
}

/// Scenario 7b: A data message we send, tampered on the way, is rejected by the peer.
pub fn scenario_tampered_outgoing(kind: PeerKind, what: Tamper) {
    let mut l = default_link(kind, 9);
    l.establish(false);
    l.we_say("warm-up");
    l.they_say("warm-up back");
    l.ours.send("the real text");
    assert_eq!(l.ours.outbox.len(), 1);
    let genuine = l.ours.outbox.pop_front().unwrap();
    let o = l.deliver_to_peer(&tamper(&genuine, what));
    assert!(o.plain.is_empty(), "peer showed a tampered message: {o:?}");
    assert!(
        o.has_event("unreadable"),
        "peer did not report the tampered message: {o:?}"
    );
    let o = l.deliver_to_peer(&genuine);
    assert_eq!(o.plain, vec!["the real text".to_owned()]);
    l.pump();
    l.check_private();
    l.take_peer_seen();
    l.we_say("still talking");
    l.they_say("yes");
}

/// Scenario 8a: A data message from the peer replayed to us is rejected, right away
/// and after the keys moved on.
pub fn scenario_replay_incoming(kind: PeerKind) {
    let mut l = default_link(kind, 10);
    l.establish(true);
    l.peer_types("only once");
    let m = l.to_us[0].clone();
    l.pump();
    assert_eq!(l.ours.texts(), ["only once".to_owned()]);
    l.deliver_to_us(&m);
    assert_eq!(l.ours.texts(), ["only once".to_owned()], "replay delivered");
    assert!(l.ours.noticed(|n| matches!(n, Notice::Unreadable { .. })));
    l.ours.outbox.clear(); // our error message: dropped by the network
    l.we_say("reply");
    l.they_say("again");
    l.we_say("and again");
    l.deliver_to_us(&m);
    assert_eq!(
        l.ours.texts(),
        ["only once".to_owned(), "again".to_owned()],
        "late replay delivered"
    );
    l.ours.outbox.clear();
    l.they_say("still fine");
}

/// Scenario 8b: A data message of ours replayed to the peer is rejected.
pub fn scenario_replay_outgoing(kind: PeerKind) {
    let mut l = default_link(kind, 11);
    l.establish(false);
    l.ours.send("only once");
    let m = l.ours.outbox[0].clone();
    l.pump();
    assert_eq!(l.take_peer_seen().plain, ["only once".to_owned()]);
    let o = l.deliver_to_peer(&m);
    assert!(o.plain.is_empty(), "peer accepted a replay: {o:?}");
    assert!(o.has_event("unreadable"), "replay not reported: {o:?}");
    l.to_us.clear(); // the peer's error message: dropped by the network
    l.they_say("reply");
    l.we_say("again");
    let o = l.deliver_to_peer(&m);
    assert!(o.plain.is_empty(), "peer accepted a late replay: {o:?}");
    l.to_us.clear();
    l.take_peer_seen();
    l.we_say("still fine");
}

/// Scenario 9: Heartbeat: after receiving, with nothing sent for `heartbeat_secs`,
/// we send an empty IGNORE_UNREADABLE data message the peer shows nothing
/// for.
pub fn scenario_heartbeat(kind: PeerKind) {
    let mut cfg = config(Policy::Always);
    cfg.heartbeat_secs = 5;
    let mut l = Link::new(kind, &PeerOptions::default(), cfg, 12);
    l.establish(true);
    l.we_say("hello");
    // Within the interval: no heartbeat.
    l.ours.now += 2;
    l.peer_types("quick answer");
    let m = l.to_us.pop_front().unwrap();
    l.deliver_to_us(&m);
    assert_eq!(l.ours.texts(), ["quick answer".to_owned()]);
    assert!(
        l.ours.outbox.is_empty(),
        "heartbeat too early: {:?}",
        l.ours.outbox
    );
    // Past the interval: a heartbeat.
    l.ours.now += 10;
    l.peer_types("late answer");
    let m = l.to_us.pop_front().unwrap();
    l.deliver_to_us(&m);
    assert_eq!(l.ours.texts()[1..], ["late answer".to_owned()]);
    assert_eq!(l.ours.outbox.len(), 1, "no heartbeat: {:?}", l.ours.outbox);
    let hb = EncodedMessage::from_armored(&l.ours.outbox[0]).expect("heartbeat decodes");
    match hb.body {
        Body::Data(d) => assert!(d.ignore_unreadable(), "heartbeat without IGNORE_UNREADABLE"),
        other => panic!("heartbeat is a {}", other.name()),
    }
    l.take_peer_seen();
    l.pump();
    let seen = l.take_peer_seen();
    assert!(seen.plain.is_empty(), "peer showed the heartbeat: {seen:?}");
    assert!(
        seen.wire.is_empty(),
        "peer answered the heartbeat: {seen:?}"
    );
    assert!(seen.has_event("heartbeat_rcvd"), "{seen:?}");
    l.we_say("after the heartbeat");
    l.they_say("fine");
}

/// Extra: the peer starts SMP, which this core does not implement: we
/// answer with an SMP abort (and tell our user); the peer sees the abort
/// and the session goes on.
pub fn scenario_smp_refused(kind: PeerKind) {
    let mut l = default_link(kind, 13);
    l.establish(true);
    let w = l.peer.smp_start("the shared secret");
    l.to_us.extend(w);
    l.pump();
    assert!(
        l.ours
            .noticed(|n| matches!(n, Notice::SmpRequested { question: None })),
        "{:?}",
        l.ours.notices
    );
    assert!(l.ours.delivered.is_empty(), "{:?}", l.ours.delivered);
    // The user declines: we abort, the peer sees it, the session goes on.
    let a = l.ours.conv.handle_smp_abort(l.ours.now, &mut l.ours.rng);
    l.ours.apply(a);
    l.pump();
    let seen = l.take_peer_seen();
    assert!(seen.has_event("smp_abort"), "{seen:?}");
    assert!(seen.plain.is_empty(), "{seen:?}");
    l.we_say("no SMP here");
    l.they_say("understood");
}

/// The acceptance tests every peer must pass (issue 2), as one `#[test]`
/// per scenario: `interop_acceptance_tests!(PeerKind::Libotr);` in a test
/// binary that uses `common::interop::*`.
#[macro_export]
macro_rules! interop_acceptance_tests {
    ($kind:expr) => {
        #[test]
        fn ake_we_start() {
            scenario_ake($kind, true);
        }

        #[test]
        fn ake_they_start() {
            scenario_ake($kind, false);
        }

        #[test]
        fn alternating_200_messages() {
            scenario_alternating($kind, 200);
        }

        #[test]
        fn burst_of_50_then_reply() {
            scenario_burst($kind);
        }

        #[test]
        fn fragmented_both_sides() {
            scenario_fragmented($kind, 180);
        }

        #[test]
        fn whitespace_tag_from_us_starts_ake() {
            scenario_whitespace($kind, true);
        }

        #[test]
        fn whitespace_tag_from_peer_starts_ake() {
            scenario_whitespace($kind, false);
        }

        #[test]
        fn peer_ends_session() {
            scenario_peer_ends($kind);
        }

        #[test]
        fn we_end_session() {
            scenario_we_end($kind);
        }

        #[test]
        fn tampered_ciphertext_from_peer_rejected() {
            scenario_tampered_incoming($kind, Tamper::Ciphertext);
        }

        #[test]
        fn tampered_mac_from_peer_rejected() {
            scenario_tampered_incoming($kind, Tamper::Mac);
        }

        #[test]
        fn tampered_ciphertext_to_peer_rejected() {
            scenario_tampered_outgoing($kind, Tamper::Ciphertext);
        }

        #[test]
        fn tampered_mac_to_peer_rejected() {
            scenario_tampered_outgoing($kind, Tamper::Mac);
        }

        #[test]
        fn replay_from_peer_rejected() {
            scenario_replay_incoming($kind);
        }

        #[test]
        fn replay_to_peer_rejected() {
            scenario_replay_outgoing($kind);
        }

        #[test]
        fn heartbeat_after_silence() {
            scenario_heartbeat($kind);
        }

        #[test]
        fn smp_request_is_refused_with_abort() {
            scenario_smp_refused($kind);
        }
    };
}
