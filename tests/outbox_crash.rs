//! SIGKILL crash test of the sender side (the outbox) over the real SQLite
//! store, in the style of `tests/o2tr_crash.rs`.
//!
//! The parent establishes an OTR session between Alice (snapshot committed
//! to a [`SqliteStore`]) and Bob (in memory, in the parent). A child
//! process (this test binary, re-invoked with `O2TR_OUTBOX_CHILD` set)
//! plays Alice's proxy: it reopens the store, restores the conversation,
//! first re-sends every outbox entry not acknowledged (appends it to the
//! "wire" file with `fsync`, then acknowledges it), then encrypts the
//! remaining messages of a one-way stream, committing each step (snapshot
//! and outbox entry in one transaction), writing the stanza to the wire file
//! and acknowledging it. The parent kills it with SIGKILL at random
//! moments — so kills land between the commit and the write, and between
//! the write and the acknowledgement — then lets one child finish.
//!
//! Proven, by feeding the wire file to Bob: every message arrives, in
//! order, decrypted exactly once; the re-sent duplicates are dropped by
//! Bob's counter check without an error message; no AKE is ever started.
//!
//! A second run encrypts 6 messages at a time and commits them in one
//! transaction (group commit, as the proxy does for one read) before
//! writing any.
//!
//! `O2TR_OUTBOX_CRASH_TRIALS` sets the number of kills (default 25 per run).

#[path = "common/pair.rs"]
mod pair;

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use o2tr_proxy::otr::conversation::{Action, Config, Conversation, Notice};
use o2tr_proxy::otr::crypto::DsaPrivateKey;
use o2tr_proxy::store::ekm::{self, Effect};
use o2tr_proxy::store::{DurableOp, PeerStep, SqliteStore, Store};
use pair::{ALICE_TAG, BOB_TAG, Side, keys};
use rand::RngExt;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const CHILD_ENV: &str = "O2TR_OUTBOX_CHILD";
/// Messages per group commit in the child (unset: one commit each).
const BURST_ENV: &str = "O2TR_OUTBOX_CHILD_BURST";
const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";
const T0: u64 = 1_700_000_000;
const LIFETIME: u64 = 7 * 24 * 3600;
const TOTAL: usize = 120;

fn text_of(i: usize) -> String {
    format!("m{i:06} {}", "y".repeat(i % 53))
}

fn alice_config() -> Config {
    let mut cfg = Config::new(ALICE, ALICE_TAG);
    cfg.max_unanswered = u32::MAX; // a one-way stream
    cfg
}

struct Paths {
    state: PathBuf,
    key: PathBuf,
    wire: PathBuf,
}

impl Paths {
    fn new(root: &Path) -> Self {
        Paths {
            state: root.join("state"),
            key: root.join("alice.key"),
            wire: root.join("wire"),
        }
    }
}

/// The wire file: complete lines `index<TAB>body`; a torn last line (a
/// kill in the middle of a write) is cut off.
fn read_wire(path: &Path) -> Vec<(usize, String)> {
    let Ok(bytes) = fs::read(path) else {
        return Vec::new();
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(complete as u64).unwrap();
        f.sync_all().unwrap();
    }
    String::from_utf8(bytes[..complete].to_vec())
        .unwrap()
        .lines()
        .map(|l| {
            let (i, body) = l.split_once('\t').unwrap();
            (i.parse().unwrap(), body.to_owned())
        })
        .collect()
}

// ---- the child: Alice's proxy -------------------------------------------

fn fail(out: &mut impl Write, msg: &str) {
    writeln!(out, "FAIL {msg}").unwrap();
    out.flush().unwrap();
}

#[test]
fn outbox_child_entry() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let paths = Paths::new(Path::new(&root));
    let mut out = std::io::stdout().lock();
    writeln!(out).unwrap();
    let key = Arc::new(DsaPrivateKey::from_bytes(&fs::read(&paths.key).unwrap()).unwrap());
    let now = T0 + 10;
    let mut store = SqliteStore::open(&paths.state).unwrap();
    let restored =
        ekm::restore_peer(&mut store, ALICE, BOB, alice_config(), key, now, LIFETIME).unwrap();
    if restored.restored != [BOB_TAG] {
        fail(&mut out, &format!("restored {:?}", restored.restored));
    }
    let mut conv: Conversation = restored.conversation;
    let mut rng = ChaCha20Rng::seed_from_u64(std::process::id().into());
    let written = read_wire(&paths.wire);
    let mut wire = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.wire)
        .unwrap();

    // Committed but not confirmed written: out again, first.
    let mut next = written.last().map_or(0, |(i, _)| i + 1);
    let pending = store.outbox(ALICE).unwrap();
    for m in &pending {
        writeln!(wire, "{}", m.stanza).unwrap();
        wire.sync_data().unwrap();
        store.ack_outbox(m.id).unwrap();
        let idx: usize = m.stanza.split('\t').next().unwrap().parse().unwrap();
        next = next.max(idx + 1);
    }
    writeln!(out, "resent {}", pending.len()).unwrap();
    out.flush().unwrap();

    // `burst` messages at a time, as the proxy does with the stanzas of
    // one read: every step planned, then one group commit, then the
    // writes (group commit, issue 8).
    let burst: usize = std::env::var(BURST_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let todo: Vec<usize> = (next..TOTAL).collect();
    for chunk in todo.chunks(burst.max(1)) {
        let planned: Vec<(ekm::Step, Vec<String>)> = chunk
            .iter()
            .map(|&j| plan_send(&mut out, &mut conv, &mut rng, j, now))
            .collect();
        let receipts = if let [(step, _)] = &planned[..] {
            vec![store.commit_step(ALICE, BOB, &step.durable, now).unwrap()]
        } else {
            let group: Vec<PeerStep<'_>> = planned
                .iter()
                .map(|(s, _)| PeerStep {
                    peer: BOB,
                    ops: &s.durable,
                })
                .collect();
            store.commit_steps(ALICE, &group, now).unwrap()
        };
        for ((_, lines), receipt) in planned.iter().zip(&receipts) {
            for (l, id) in lines.iter().zip(&receipt.outbox_ids) {
                writeln!(wire, "{l}").unwrap();
                wire.sync_data().unwrap();
                store.ack_outbox(*id).unwrap();
            }
        }
    }
    writeln!(out, "done").unwrap();
    out.flush().unwrap();
}

/// Encrypt message `j`: its step, with the data stanza (`j<TAB>body`)
/// as an outbox op, and the wire lines to write once committed.
fn plan_send(
    out: &mut impl Write,
    conv: &mut Conversation,
    rng: &mut ChaCha20Rng,
    j: usize,
    now: u64,
) -> (ekm::Step, Vec<String>) {
    let mut step = ekm::split(conv.handle_outgoing(&text_of(j), now, rng));
    let data = step.outbox_sends();
    let mut lines = Vec::new();
    for (e, d) in step
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::Send(_)))
        .zip(data)
    {
        let Effect::Send(body) = e else { continue };
        if !d {
            fail(out, &format!("message {j}: a non-data send {body:.12}"));
        }
        lines.push(format!("{j}\t{body}"));
    }
    if lines.len() != 1 {
        fail(out, &format!("message {j}: {} sends", lines.len()));
    }
    for l in &lines {
        step.durable.push(DurableOp::Outbox(l.clone()));
    }
    step.release_in_commit();
    (step, lines)
}

// ---- the parent -----------------------------------------------------------

/// Establish the session: Alice's side committed to the store.
fn setup(paths: &Paths) -> Side {
    let (ka, kb) = keys();
    fs::write(&paths.key, ka.to_bytes().as_slice()).unwrap();
    let mut store = SqliteStore::open(&paths.state).unwrap();
    let mut alice = Conversation::new(alice_config(), ka.clone());
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let mut bob = Side::new(BOB, BOB_TAG, kb.clone(), 4);
    let mut to_bob: Vec<String> = Vec::new();
    let apply = |actions: Vec<Action>, store: &mut SqliteStore, to_bob: &mut Vec<String>| {
        let step = ekm::split(actions);
        store.commit_step(ALICE, BOB, &step.durable, T0).unwrap();
        for e in step.effects {
            if let Effect::Send(s) = e {
                to_bob.push(s);
            }
        }
    };
    bob.start(T0);
    for _ in 0..100 {
        let from_bob: Vec<String> = bob.outbox.drain(..).collect();
        if from_bob.is_empty() && to_bob.is_empty() {
            break;
        }
        for m in from_bob {
            apply(
                alice.handle_incoming(&m, T0, &mut rng),
                &mut store,
                &mut to_bob,
            );
        }
        for m in std::mem::take(&mut to_bob) {
            bob.receive(&m, T0);
        }
    }
    assert!(alice.is_private() && bob.conv.is_private());
    assert!(store.snapshots_for_peer(ALICE, BOB).unwrap().len() == 1);
    bob
}

fn spawn(root: &Path, burst: usize) -> (std::process::Child, std::thread::JoinHandle<Vec<String>>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "outbox_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, root)
        .env(BURST_ENV, burst.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    (child, reader)
}

#[test]
fn sigkill_between_commit_and_send_loses_nothing() {
    run_trials(1);
}

/// The same with group commit: 6 messages per transaction, written only
/// after it, so kills land before a group's commit (its messages are
/// encrypted again, with the same counters, from the durable snapshot),
/// after it and between the writes of one group.
#[test]
fn sigkill_in_the_middle_of_a_burst_loses_nothing() {
    run_trials(6);
}

fn run_trials(burst: usize) {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let paths = Paths::new(root);
    let mut bob = setup(&paths);
    let trials: usize = std::env::var("O2TR_OUTBOX_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut resent = 0usize;
    let mut fails = Vec::new();
    for _ in 0..trials {
        let (mut child, reader) = spawn(root, burst);
        std::thread::sleep(Duration::from_millis(rng.random_range(20..120)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for l in reader.join().unwrap() {
            if let Some(n) = l.strip_prefix("resent ") {
                resent += n.parse::<usize>().unwrap();
            }
            if let Some(f) = l.strip_prefix("FAIL ") {
                fails.push(f.to_owned());
            }
        }
    }
    let (mut child, reader) = spawn(root, burst);
    assert!(child.wait().unwrap().success());
    let lines = reader.join().unwrap();
    fails.extend(
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("FAIL ").map(str::to_owned)),
    );
    assert!(fails.is_empty(), "{fails:?}");
    assert!(lines.iter().any(|l| l == "done"), "{lines:?}");
    resent += lines
        .iter()
        .filter_map(|l| l.strip_prefix("resent "))
        .map(|n| n.parse::<usize>().unwrap())
        .sum::<usize>();

    // Bob reads the wire: each message once, in order; duplicates dropped
    // silently (no error message back), no AKE.
    let wire = read_wire(&paths.wire);
    let mut duplicates = 0;
    for (i, body) in &wire {
        let before = bob.delivered.len();
        bob.notices.clear();
        bob.receive(body, T0 + 20);
        if bob.delivered.len() == before {
            duplicates += 1;
            assert!(
                bob.notices
                    .iter()
                    .any(|n| matches!(n, Notice::Unreadable { replayed: true, .. })),
                "message {i}: not delivered and not a replay: {:?}",
                bob.notices
            );
        }
        assert!(
            bob.outbox.is_empty(),
            "Bob answered message {i}: {:?}",
            bob.outbox
        );
        assert!(
            !bob.notices
                .iter()
                .any(|n| matches!(n, Notice::GoneSecure { .. })),
            "a new AKE"
        );
    }
    let expected: Vec<String> = (0..TOTAL).map(text_of).collect();
    assert_eq!(bob.texts(), expected, "lost, reordered or repeated");
    assert_eq!(wire.len(), TOTAL + duplicates);
    eprintln!(
        "outbox_crash (burst {burst}): {trials} SIGKILLs, {TOTAL} messages delivered exactly once in order; \
         {resent} outbox entries re-sent after a kill, {duplicates} of them duplicates dropped"
    );
}
