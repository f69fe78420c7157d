//! An in-memory pair of conversations (quinn's `Pair` idea): Alice and Bob
//! each run the Rust OTR core; the test is the network and the store.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, OnceLock};

use o2tr_proxy::otr::conversation::{Action, Config, Conversation, Delivery, Notice};
use o2tr_proxy::otr::crypto::DsaPrivateKey;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

/// Two long-term keys shared by every test in a binary (DSA parameter
/// generation is slow).
pub fn keys() -> &'static (Arc<DsaPrivateKey>, Arc<DsaPrivateKey>) {
    static KEYS: OnceLock<(Arc<DsaPrivateKey>, Arc<DsaPrivateKey>)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(0x5eed);
        (
            Arc::new(DsaPrivateKey::generate(&mut rng)),
            Arc::new(DsaPrivateKey::generate(&mut rng)),
        )
    })
}

/// One side: a conversation plus what it produced.
pub struct Side {
    pub conv: Conversation,
    pub rng: ChaCha20Rng,
    pub outbox: VecDeque<String>,
    pub delivered: Vec<Delivery>,
    pub notices: Vec<Notice>,
    /// The durable store: snapshot per instance, handshake record per
    /// instance, held messages.
    pub snapshots: BTreeMap<u32, Vec<u8>>,
    pub handshakes: BTreeMap<u32, Vec<u8>>,
    pub held: VecDeque<String>,
    /// Every body this side ever sent, in order.
    pub sent_log: Vec<String>,
}

impl Side {
    pub fn new(name: &str, tag: u32, key: Arc<DsaPrivateKey>, seed: u64) -> Self {
        let cfg = Config::new(name, tag);
        Side {
            conv: Conversation::new(cfg, key),
            rng: ChaCha20Rng::seed_from_u64(seed),
            outbox: VecDeque::new(),
            delivered: Vec::new(),
            notices: Vec::new(),
            snapshots: BTreeMap::new(),
            handshakes: BTreeMap::new(),
            held: VecDeque::new(),
            sent_log: Vec::new(),
        }
    }

    pub fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send(s) => {
                    self.sent_log.push(s.clone());
                    self.outbox.push_back(s);
                }
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

    pub fn send(&mut self, text: &str, now: u64) {
        let a = self.conv.handle_outgoing(text, now, &mut self.rng);
        self.apply(a);
    }

    pub fn receive(&mut self, body: &str, now: u64) {
        let a = self.conv.handle_incoming(body, now, &mut self.rng);
        self.apply(a);
    }

    pub fn start(&mut self, now: u64) {
        let a = self.conv.handle_start(now);
        self.apply(a);
    }

    pub fn tick(&mut self, now: u64) {
        let a = self.conv.handle_tick(now);
        self.apply(a);
    }

    pub fn texts(&self) -> Vec<String> {
        self.delivered.iter().map(|d| d.text.clone()).collect()
    }

    /// Simulate a crash: drop the in-memory conversation and rebuild it
    /// from the durable snapshots and held messages.
    pub fn restart(&mut self, name: &str, tag: u32, key: Arc<DsaPrivateKey>) {
        self.restart_at(name, tag, key, 0);
    }

    /// [`Side::restart`] at `now` (the handshake records' clock).
    pub fn restart_at(&mut self, name: &str, tag: u32, key: Arc<DsaPrivateKey>, now: u64) {
        let mut conv = Conversation::new(Config::new(name, tag), key);
        for snap in self.snapshots.values() {
            conv.restore(snap).expect("snapshot restores");
        }
        for record in self.handshakes.values() {
            conv.restore_handshake(record, now, u64::MAX)
                .expect("handshake record restores");
        }
        conv.restore_held(self.held.iter().map(|t| zeroize::Zeroizing::new(t.clone())));
        self.conv = conv;
        self.outbox.clear();
    }
}

pub struct Pair {
    pub alice: Side,
    pub bob: Side,
    pub now: u64,
}

pub const ALICE_TAG: u32 = 0x1111_1111;
pub const BOB_TAG: u32 = 0x2222_2222;

impl Pair {
    pub fn new() -> Self {
        let (ka, kb) = keys();
        Pair {
            alice: Side::new("alice@example.test", ALICE_TAG, ka.clone(), 1),
            bob: Side::new("bob@example.test", BOB_TAG, kb.clone(), 2),
            now: 1_700_000_000,
        }
    }

    /// Deliver queued messages both ways until nobody has anything to send.
    pub fn run(&mut self) {
        for _ in 0..10_000 {
            if let Some(m) = self.alice.outbox.pop_front() {
                self.bob.receive(&m, self.now);
                continue;
            }
            if let Some(m) = self.bob.outbox.pop_front() {
                self.alice.receive(&m, self.now);
                continue;
            }
            return;
        }
        panic!("conversation did not settle");
    }

    /// Alice starts OTR; both sides end up private.
    pub fn establish(&mut self) {
        self.alice.start(self.now);
        self.run();
        assert!(self.alice.conv.is_private(), "alice private");
        assert!(self.bob.conv.is_private(), "bob private");
    }
}
