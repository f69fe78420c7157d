//! Criterion benchmarks of the OTR core as a whole (issue 8 "Figures"):
//! the AKE, data messages with and without a DH ratchet step, and the O2TR
//! offline paths against the on-disk SQLite store. `scripts/bench.sh` runs
//! these next to the libotr reference harness (`benches/reference/`) and
//! prints one comparison table; docs/performance.md has the results.
//!
//! Two conversations run in one process and the benchmark ferries the
//! `Action::Send` bodies between them (as tests/common/pair.rs does).
//! Benchmark ids (stable; the script reads `target/criterion/<id>/new/`):
//!
//! * `ake/full` — query → both sides encrypted (long-term keys preloaded).
//! * `data/alternating`, `data/alternating_16k` — one message sent and
//!   received, the direction alternating, so each message costs a DH ratchet
//!   step. `data/alternating_persisted` also writes every `Persist` snapshot
//!   of both sides to an on-disk `SqliteStore` (the durable cost).
//! * `data/burst`, `data/burst_16k` — one message sent and received inside a
//!   one-way burst (no ratchet step).
//! * `o2tr/offline_first` — the first offline message after a restart: the
//!   EKM snapshot loaded from the on-disk store, restored, the message
//!   verified and decrypted, the new snapshot written back.
//! * `o2tr/offline_next` — a later offline message (keys already derived),
//!   its snapshot written back.
//! * `o2tr/resume` — `offline_first` plus the first reply going out
//!   (encrypted, its snapshot written before release).
//! * `o2tr/offline_first_mem`, `o2tr/resume_mem` — the same without the
//!   store (snapshot bytes in memory, new snapshots encoded, not written):
//!   the protocol's own cost.
//! * `modexp/dh_shared` — one 1536-bit modexp with a 320-bit exponent, the
//!   floor of every DH step.
//!
//! Plain data benches ignore `Persist` actions (they measure the protocol);
//! the `o2tr/*` ones honour them, as the product must ("persist before
//! release").

use std::cell::RefCell;
use std::hint::black_box;
use std::sync::Arc;

use criterion::measurement::{Measurement, WallTime};
use criterion::{BatchSize, Criterion};
use o2tr_proxy::otr::conversation::{Action, Config, Conversation};
use o2tr_proxy::otr::crypto::{DhKeyPair, DsaPrivateKey};
use o2tr_proxy::store::{ConversationKey, SessionState, SqliteStore, Store};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";
const ALICE_TAG: u32 = 0x1111_1111;
const BOB_TAG: u32 = 0x2222_2222;
const NOW: u64 = 1_700_000_000;

/// One side of an in-memory conversation.
struct Side {
    name: &'static str,
    peer: &'static str,
    key: Arc<DsaPrivateKey>,
    conv: Conversation,
    rng: ChaCha20Rng,
}

impl Side {
    fn new(name: &'static str, peer: &'static str, tag: u32, key: &Arc<DsaPrivateKey>) -> Self {
        Side {
            name,
            peer,
            key: Arc::clone(key),
            conv: Conversation::new(config(name, tag), Arc::clone(key)),
            rng: ChaCha20Rng::seed_from_u64(u64::from(tag)),
        }
    }

    /// The store key of this side's conversation with the peer instance.
    fn store_key(&self, instance: u32) -> ConversationKey {
        ConversationKey::new(self.name, self.peer, instance)
    }
}

fn config(name: &str, tag: u32) -> Config {
    let mut cfg = Config::new(name, tag);
    // A one-way burst longer than the paper's bound `k` would be held; the
    // benches send many thousands of messages without an answer.
    cfg.max_unanswered = u32::MAX;
    cfg
}

/// What a batch of actions asks the network (and the store) to do.
#[derive(Default)]
struct Effects {
    sends: Vec<String>,
    delivered: usize,
}

/// Performs `actions`: collects the bodies to send, counts deliveries and,
/// when `store` is given, writes every snapshot durably (in order, before
/// anything that follows — here simply before returning).
fn perform(side: &Side, actions: Vec<Action>, store: Option<&mut SqliteStore>) -> Effects {
    let mut fx = Effects::default();
    let mut store = store;
    for a in actions {
        match a {
            Action::Send(s) => fx.sends.push(s),
            Action::Deliver(_) => fx.delivered += 1,
            Action::Persist(p) => {
                if let Some(st) = store.as_deref_mut() {
                    st.save_snapshot(
                        &side.store_key(p.instance),
                        SessionState::Live,
                        &p.snapshot,
                        NOW,
                    )
                    .expect("snapshot saved");
                }
            }
            _ => {}
        }
    }
    fx
}

/// Ferries messages both ways until nobody has anything to send. Returns
/// how many user messages were delivered on each side.
fn run(
    a: &mut Side,
    b: &mut Side,
    mut to_b: Vec<String>,
    mut store_a: Option<&mut SqliteStore>,
    mut store_b: Option<&mut SqliteStore>,
) -> (usize, usize) {
    let mut to_a: Vec<String> = Vec::new();
    let (mut got_a, mut got_b) = (0, 0);
    while !to_b.is_empty() || !to_a.is_empty() {
        for m in std::mem::take(&mut to_b) {
            let acts = b.conv.handle_incoming(&m, NOW, &mut b.rng);
            let fx = perform(b, acts, store_b.as_deref_mut());
            got_b += fx.delivered;
            to_a.extend(fx.sends);
        }
        for m in std::mem::take(&mut to_a) {
            let acts = a.conv.handle_incoming(&m, NOW, &mut a.rng);
            let fx = perform(a, acts, store_a.as_deref_mut());
            got_a += fx.delivered;
            to_b.extend(fx.sends);
        }
    }
    (got_a, got_b)
}

/// A fresh pair: no session yet.
fn pair(keys: &Keys) -> (Side, Side) {
    (
        Side::new(ALICE, BOB, ALICE_TAG, &keys.0),
        Side::new(BOB, ALICE, BOB_TAG, &keys.1),
    )
}

/// Runs the AKE started by `a`'s query.
fn ake(a: &mut Side, b: &mut Side) {
    let start = a.conv.handle_start(NOW);
    let fx = perform(a, start, None);
    run(a, b, fx.sends, None, None);
}

/// A pair that completed the AKE.
fn established(keys: &Keys) -> (Side, Side) {
    let (mut a, mut b) = pair(keys);
    ake(&mut a, &mut b);
    assert!(a.conv.is_private() && b.conv.is_private(), "AKE completed");
    (a, b)
}

/// `from` sends `text`; `to` receives it (and anything it answers is
/// ferried back). Panics unless exactly one message was delivered.
fn one_message(
    from: &mut Side,
    to: &mut Side,
    text: &str,
    store_from: Option<&mut SqliteStore>,
    store_to: Option<&mut SqliteStore>,
) {
    let mut store_from = store_from;
    let acts = from.conv.handle_outgoing(text, NOW, &mut from.rng);
    let fx = perform(from, acts, store_from.as_deref_mut());
    let (_, got) = run(from, to, fx.sends, store_from, store_to);
    assert_eq!(got, 1, "one message delivered");
}

fn temp_store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let store = SqliteStore::open(&state).expect("store opens");
    (dir, store)
}

fn bench_ake<M: Measurement + 'static>(c: &mut Criterion<M>, keys: &Keys) {
    c.bench_function("ake/full", |bench| {
        bench.iter(|| {
            let (mut a, mut b) = pair(keys);
            ake(&mut a, &mut b);
            debug_assert!(a.conv.is_private() && b.conv.is_private());
            black_box((a, b))
        })
    });
}

fn bench_data<M: Measurement + 'static>(c: &mut Criterion<M>, keys: &Keys) {
    for (suffix, size) in [("", 1024usize), ("_16k", 16 * 1024)] {
        let text = "x".repeat(size);

        let (mut a, mut b) = established(keys);
        let mut turn = false;
        c.bench_function(&format!("data/alternating{suffix}"), |bench| {
            bench.iter(|| {
                turn = !turn;
                if turn {
                    one_message(&mut a, &mut b, &text, None, None);
                } else {
                    one_message(&mut b, &mut a, &text, None, None);
                }
            })
        });

        let (mut a, mut b) = established(keys);
        // Enter the burst: the first message still moves the ratchet.
        one_message(&mut a, &mut b, &text, None, None);
        c.bench_function(&format!("data/burst{suffix}"), |bench| {
            bench.iter(|| one_message(&mut a, &mut b, &text, None, None))
        });
    }
}

fn bench_persisted<M: Measurement + 'static>(c: &mut Criterion<M>, keys: &Keys) {
    let text = "x".repeat(1024);
    let (_dir_a, mut store_a) = temp_store();
    let (_dir_b, mut store_b) = temp_store();
    let (mut a, mut b) = established(keys);
    let mut turn = false;
    c.bench_function("data/alternating_persisted", |bench| {
        bench.iter(|| {
            turn = !turn;
            if turn {
                one_message(
                    &mut a,
                    &mut b,
                    &text,
                    Some(&mut store_a),
                    Some(&mut store_b),
                );
            } else {
                one_message(
                    &mut b,
                    &mut a,
                    &text,
                    Some(&mut store_b),
                    Some(&mut store_a),
                );
            }
        })
    });
}

/// Bob's side of the offline scenario: his snapshot on disk, and messages
/// Alice wrote while he was away.
struct Offline {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    /// Bob's snapshot as it was when he went away.
    snapshot: Vec<u8>,
    key: ConversationKey,
    bob_key: Arc<DsaPrivateKey>,
    offline: Vec<String>,
}

impl Offline {
    fn new(keys: &Keys, text: &str) -> Self {
        let (_dir, mut store) = temp_store();
        let (mut a, mut b) = established(keys);
        // Some live traffic both ways first, Bob's snapshots written to disk.
        one_message(&mut a, &mut b, text, None, Some(&mut store));
        one_message(&mut b, &mut a, text, Some(&mut store), None);
        let key = b.store_key(ALICE_TAG);
        let snapshot = store
            .snapshot(&key)
            .expect("store readable")
            .expect("snapshot stored")
            .data
            .to_vec();
        // Bob goes away; Alice keeps writing.
        let mut offline = Vec::new();
        for _ in 0..2 {
            let acts = a.conv.handle_outgoing(text, NOW, &mut a.rng);
            offline.extend(perform(&a, acts, None).sends);
        }
        assert_eq!(offline.len(), 2);
        Offline {
            _dir,
            store,
            snapshot,
            key,
            bob_key: Arc::clone(&b.key),
            offline,
        }
    }

    /// Puts Bob's suspended snapshot back on disk (untimed set-up).
    fn reset(&mut self) {
        self.store
            .save_snapshot(&self.key, SessionState::Suspended, &self.snapshot, NOW)
            .expect("snapshot saved");
    }

    /// Bob restarts: his conversation restored from the on-disk store.
    fn restart(&mut self) -> Side {
        let record = self
            .store
            .snapshot(&self.key)
            .expect("store readable")
            .expect("snapshot stored");
        let mut bob = Side::new(BOB, ALICE, BOB_TAG, &self.bob_key);
        bob.conv.restore(&record.data).expect("snapshot restores");
        bob
    }

    /// Bob restarts from the snapshot bytes held in memory (no store).
    fn restart_in_memory(&self) -> Side {
        let mut bob = Side::new(BOB, ALICE, BOB_TAG, &self.bob_key);
        bob.conv.restore(&self.snapshot).expect("snapshot restores");
        bob
    }

    /// Bob receives offline message `i`, honouring the Persist actions
    /// unless `durable` is false; returns what he would send.
    fn receive(&mut self, bob: &mut Side, i: usize) -> Vec<String> {
        self.receive_to(bob, i, true)
    }

    fn receive_to(&mut self, bob: &mut Side, i: usize, durable: bool) -> Vec<String> {
        let acts = bob
            .conv
            .handle_incoming(&self.offline[i], NOW, &mut bob.rng);
        let store = if durable { Some(&mut self.store) } else { None };
        let fx = perform(bob, acts, store);
        assert_eq!(fx.delivered, 1, "offline message delivered");
        fx.sends
    }
}

fn bench_o2tr<M: Measurement + 'static>(c: &mut Criterion<M>, keys: &Keys) {
    let text = "x".repeat(1024);
    // Set-up and routine closures both need the scenario.
    let off = RefCell::new(Offline::new(keys, &text));

    c.bench_function("o2tr/offline_first", |bench| {
        bench.iter_batched(
            || off.borrow_mut().reset(),
            |()| {
                let mut off = off.borrow_mut();
                let mut bob = off.restart();
                black_box(off.receive(&mut bob, 0));
                bob
            },
            BatchSize::PerIteration,
        )
    });

    c.bench_function("o2tr/offline_next", |bench| {
        bench.iter_batched(
            || {
                let mut off = off.borrow_mut();
                off.reset();
                let mut bob = off.restart();
                off.receive(&mut bob, 0);
                bob
            },
            |mut bob| {
                black_box(off.borrow_mut().receive(&mut bob, 1));
                bob
            },
            BatchSize::PerIteration,
        )
    });

    c.bench_function("o2tr/resume", |bench| {
        bench.iter_batched(
            || off.borrow_mut().reset(),
            |()| {
                let mut off = off.borrow_mut();
                let mut bob = off.restart();
                off.receive(&mut bob, 0);
                let acts = bob.conv.handle_outgoing(&text, NOW, &mut bob.rng);
                let fx = perform(&bob, acts, Some(&mut off.store));
                assert_eq!(fx.sends.len(), 1, "the reply goes out");
                black_box(fx.sends);
                bob
            },
            BatchSize::PerIteration,
        )
    });
}

/// The O2TR paths without the store: the snapshot restored from bytes in
/// memory and the new snapshots encoded but not written. This is the
/// protocol's own cost; the `o2tr/*` items above add the store's.
fn bench_o2tr_in_memory<M: Measurement + 'static>(c: &mut Criterion<M>, keys: &Keys) {
    let text = "x".repeat(1024);
    let mut off = Offline::new(keys, &text);
    c.bench_function("o2tr/offline_first_mem", |bench| {
        bench.iter(|| {
            let mut bob = off.restart_in_memory();
            black_box(off.receive_to(&mut bob, 0, false));
            bob
        })
    });
    c.bench_function("o2tr/resume_mem", |bench| {
        bench.iter(|| {
            let mut bob = off.restart_in_memory();
            off.receive_to(&mut bob, 0, false);
            let acts = bob.conv.handle_outgoing(&text, NOW, &mut bob.rng);
            let fx = perform(&bob, acts, None);
            assert_eq!(fx.sends.len(), 1, "the reply goes out");
            black_box(fx.sends);
            bob
        })
    });
}

fn bench_modexp<M: Measurement + 'static>(c: &mut Criterion<M>) {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let a = DhKeyPair::generate(&mut rng);
    let b = DhKeyPair::generate(&mut rng);
    c.bench_function("modexp/dh_shared", |bench| {
        bench.iter(|| black_box(a.shared_secret(black_box(b.public()))))
    });
}

/// Thread CPU time, for a machine shared with other work: wall-clock
/// medians of compute-bound items swing with the load, CPU time does not.
mod clock {
    use std::time::Duration;

    use criterion::measurement::{Measurement, ValueFormatter, WallTime};
    use rustix::time::{ClockId, clock_gettime};

    /// `CLOCK_THREAD_CPUTIME_ID` as a criterion measurement (values are
    /// `Duration`s, formatted like wall time).
    pub struct ThreadCpu;

    static WALL: WallTime = WallTime;

    fn now_ns() -> u64 {
        let t = clock_gettime(ClockId::ThreadCPUTime);
        (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64
    }

    impl Measurement for ThreadCpu {
        type Intermediate = u64;
        type Value = Duration;

        fn start(&self) -> u64 {
            now_ns()
        }
        fn end(&self, start: u64) -> Duration {
            Duration::from_nanos(now_ns().saturating_sub(start))
        }
        fn add(&self, a: &Duration, b: &Duration) -> Duration {
            *a + *b
        }
        fn zero(&self) -> Duration {
            Duration::ZERO
        }
        fn to_f64(&self, v: &Duration) -> f64 {
            v.as_nanos() as f64
        }
        fn formatter(&self) -> &dyn ValueFormatter {
            WALL.formatter()
        }
    }
}

type Keys = (Arc<DsaPrivateKey>, Arc<DsaPrivateKey>);

/// The compute-bound items, measured with clock `M`.
fn compute<M: Measurement + 'static>(c: &mut Criterion<M>, keys: &Keys) {
    bench_modexp(c);
    bench_ake(c, keys);
    bench_data(c, keys);
    bench_o2tr_in_memory(c, keys);
}

/// `O2TR_BENCH_CLOCK=cpu` measures the compute-bound items in thread CPU
/// time; the items that write to the on-disk store are always measured in
/// wall-clock time (their cost includes waiting for fsync).
fn main() {
    let mut rng = ChaCha20Rng::seed_from_u64(0x5eed);
    let keys = (
        Arc::new(DsaPrivateKey::generate(&mut rng)),
        Arc::new(DsaPrivateKey::generate(&mut rng)),
    );
    let cpu = std::env::var("O2TR_BENCH_CLOCK").is_ok_and(|v| v == "cpu");
    if cpu {
        let mut c = Criterion::default()
            .with_measurement(clock::ThreadCpu)
            .configure_from_args();
        compute(&mut c, &keys);
        c.final_summary();
    }
    let mut c: Criterion<WallTime> = Criterion::default().configure_from_args();
    if !cpu {
        compute(&mut c, &keys);
    }
    bench_persisted(&mut c, &keys);
    bench_o2tr(&mut c, &keys);
    c.final_summary();
}
