//! Deterministic fixtures shared by the stateful fuzz targets: two
//! long-term keys, an encrypted session between Alice and Bob established
//! through the real [`Conversation`] API (AKE, then one message each way so
//! both ratchets have rotated), and a cursor that turns fuzz bytes into
//! decisions.
//!
//! Everything is built once per process from fixed seeds, so a crashing
//! input reproduces exactly.

use std::sync::{Arc, OnceLock};

use o2tr_proxy::otr::conversation::{Action, Config, Conversation};
use o2tr_proxy::otr::crypto::DsaPrivateKey;
use o2tr_proxy::otr::offline::EncryptedSession;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

/// Alice's instance tag (the side under test).
pub const ALICE_TAG: u32 = 0x1111_1111;
/// Bob's instance tag (the peer the targets play).
pub const BOB_TAG: u32 = 0x2222_2222;
/// A fixed clock (unix seconds) the fixture session was made at.
pub const T0: u64 = 1_700_000_000;

/// A seeded RNG: the same input always takes the same path.
pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Alice's and Bob's long-term keys and their latest EKM snapshots.
pub struct Fixture {
    /// Alice's long-term key.
    pub alice_key: Arc<DsaPrivateKey>,
    /// Alice's snapshot of the session with Bob.
    pub alice_snapshot: Vec<u8>,
    /// Bob's snapshot of the session with Alice.
    pub bob_snapshot: Vec<u8>,
}

impl Fixture {
    /// Alice's side, restored as a suspended session (the O2TR restart path).
    pub fn alice(&self) -> Conversation {
        let mut c = Conversation::new(alice_config(), Arc::clone(&self.alice_key));
        let tag = c
            .restore(&self.alice_snapshot)
            .expect("fixture snapshot restores");
        assert_eq!(tag, BOB_TAG);
        c
    }

    /// Bob's session keys, to forge nothing but send authentic messages.
    pub fn bob_session(&self) -> EncryptedSession {
        EncryptedSession::restore(&self.bob_snapshot).expect("fixture snapshot restores")
    }
}

/// The configuration Alice runs with.
pub fn alice_config() -> Config {
    Config::new("alice@fuzz.example", ALICE_TAG)
}

/// The fixture, built on first use (DSA key generation and one AKE).
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build)
}

fn build() -> Fixture {
    let mut r = rng(0x0f0f_1234);
    let alice_key = Arc::new(DsaPrivateKey::generate(&mut r));
    let bob_key = Arc::new(DsaPrivateKey::generate(&mut r));
    let mut alice = Conversation::new(alice_config(), Arc::clone(&alice_key));
    let mut bob = Conversation::new(
        Config::new("bob@fuzz.example", BOB_TAG),
        Arc::clone(&bob_key),
    );
    let (mut ra, mut rb) = (rng(1), rng(2));
    let mut snaps = (Vec::new(), Vec::new());
    let mut to_bob = sends(alice.handle_start(T0), &mut snaps.0);
    let mut to_alice = Vec::new();
    let mut step = |alice: &mut Conversation,
                    bob: &mut Conversation,
                    a2b: &mut Vec<String>,
                    b2a: &mut Vec<String>,
                    snaps: &mut (Vec<u8>, Vec<u8>)| {
        for _ in 0..20 {
            if a2b.is_empty() && b2a.is_empty() {
                return;
            }
            for m in std::mem::take(a2b) {
                b2a.extend(sends(bob.handle_incoming(&m, T0, &mut rb), &mut snaps.1));
            }
            for m in std::mem::take(b2a) {
                a2b.extend(sends(alice.handle_incoming(&m, T0, &mut ra), &mut snaps.0));
            }
        }
        panic!("fixture conversation did not settle");
    };
    step(&mut alice, &mut bob, &mut to_bob, &mut to_alice, &mut snaps);
    assert!(alice.is_private() && bob.is_private(), "fixture AKE failed");
    // One message each way: both sides acknowledge each other's next key.
    let mut ra2 = rng(3);
    to_bob = sends(
        alice.handle_outgoing("hello bob", T0, &mut ra2),
        &mut snaps.0,
    );
    step(&mut alice, &mut bob, &mut to_bob, &mut to_alice, &mut snaps);
    let mut rb2 = rng(4);
    to_alice = sends(
        bob.handle_outgoing("hello alice", T0, &mut rb2),
        &mut snaps.1,
    );
    step(&mut alice, &mut bob, &mut to_bob, &mut to_alice, &mut snaps);
    assert!(!snaps.0.is_empty() && !snaps.1.is_empty());
    Fixture {
        alice_key,
        alice_snapshot: snaps.0,
        bob_snapshot: snaps.1,
    }
}

/// The bodies to send; records the latest snapshot.
fn sends(actions: Vec<Action>, snapshot: &mut Vec<u8>) -> Vec<String> {
    let mut out = Vec::new();
    for a in actions {
        match a {
            Action::Send(s) => out.push(s),
            Action::Persist(p) => *snapshot = p.snapshot.to_vec(),
            _ => {}
        }
    }
    out
}

/// Reads decisions from fuzz input; past the end every read is zero/empty.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte.
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    /// Two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// A length-prefixed chunk (one length byte; 255 means "the rest").
    pub fn chunk(&mut self) -> &'a [u8] {
        match self.byte() {
            255 => self.take(usize::MAX),
            n => self.take(usize::from(n)),
        }
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
}

/// Applies edits read from `input` to `bytes`: each is (position, value)
/// with a few bytes choosing to truncate, insert or flip instead.
pub fn edit(bytes: &mut Vec<u8>, input: &mut Input<'_>, count: usize) {
    for _ in 0..count {
        if input.is_empty() || bytes.is_empty() {
            return;
        }
        let at = usize::from(input.u16()) % bytes.len();
        let v = input.byte();
        match input.byte() % 8 {
            0 => bytes.truncate(at),
            1 => bytes.insert(at, v),
            2 => bytes[at] ^= 1 << (v % 8),
            _ => bytes[at] = v,
        }
    }
}
