//! SIGKILL crash test of O2TR's persist-before-release path (DESIGN §5,
//! O2TR paper §4) over the real SQLite store.
//!
//! The parent establishes an OTR session between Alice (in memory) and Bob
//! (snapshot committed to a [`SqliteStore`]), then writes Alice's one-way
//! message stream — the offline case: Bob never answers — to a file, with
//! a fixed seed. A child process (this test binary, re-invoked with
//! `O2TR_CRASH_CHILD` set) plays Bob's proxy: it reopens the store,
//! restores the conversation, hands the client what the inbox still owes,
//! checks that a few already-consumed messages are rejected as replays,
//! then reads Alice's messages, commits each step (snapshot + inbox entry in
//! one transaction), appends the plaintext to the "client" file with
//! `fsync`, and acknowledges the inbox entry. The parent kills it with
//! SIGKILL at a random moment, many times, and finally lets one child run
//! to the end.
//!
//! Proven: every message of the stream reaches the client exactly once and
//! in order, no AKE is ever started, replays are rejected. The client file
//! records each entry's inbox id, which is how the client drops the
//! duplicate handed over again when a kill lands between its write and the
//! acknowledgement.
//!
//! A second run commits the messages in groups of 8 (one transaction per
//! group, as the proxy does for the stanzas of one read) before delivering
//! them.
//!
//! `O2TR_CRASH_TRIALS` sets the number of kills (default 200; 100 for the
//! group-commit run).

#[path = "common/pair.rs"]
mod pair;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use o2tr_proxy::otr::conversation::{Config, Conversation, Notice};
use o2tr_proxy::otr::crypto::DsaPrivateKey;
use o2tr_proxy::store::ekm::{self, Effect};
use o2tr_proxy::store::{CommitReceipt, PeerStep, SqliteStore, Store};
use pair::{ALICE_TAG, BOB_TAG, Side, keys};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const CHILD_ENV: &str = "O2TR_CRASH_CHILD";
/// Messages per group commit in the child (unset: one commit each).
const BURST_ENV: &str = "O2TR_CRASH_CHILD_BURST";
const BOB: &str = "bob@example.test";
const ALICE: &str = "alice@example.test";
const T0: u64 = 1_700_000_000;
const LIFETIME: u64 = 7 * 24 * 3600;
/// Already-consumed messages each child re-feeds to check replay rejection.
const REPLAYS: usize = 2;
/// Messages written ahead of what the client has.
const AHEAD: usize = 40;

struct Paths {
    state: PathBuf,
    key: PathBuf,
    stream: PathBuf,
    client: PathBuf,
}

impl Paths {
    fn new(root: &Path) -> Self {
        Paths {
            state: root.join("state"),
            key: root.join("bob.key"),
            stream: root.join("stream"),
            client: root.join("client"),
        }
    }
}

fn text_of(index: usize) -> String {
    // Varying lengths; the index leads.
    format!("m{index:06} {}", "x".repeat(index % 97))
}

fn index_of(text: &str) -> Option<usize> {
    text.strip_prefix('m')?.get(..6)?.parse().ok()
}

fn is_ake(body: &str) -> bool {
    ["?OTR:AAMC", "?OTR:AAMK", "?OTR:AAMR", "?OTR:AAMS", "?OTRv"]
        .iter()
        .any(|p| body.starts_with(p))
}

/// The client file: complete lines `id<TAB>text`; a torn last line (a
/// kill in the middle of a write) is cut off.
fn read_client(path: &Path) -> Vec<(i64, String)> {
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
            let (id, text) = l.split_once('\t').unwrap();
            (id.parse().unwrap(), text.to_owned())
        })
        .collect()
}

// ---- the child: Bob's proxy --------------------------------------------

/// Reports a violated expectation to the parent (a panic would only be
/// seen as a dead child).
fn fail(out: &mut impl Write, msg: &str) {
    writeln!(out, "FAIL {msg}").unwrap();
    out.flush().unwrap();
}

#[test]
fn crash_child_entry() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let paths = Paths::new(Path::new(&root));
    let mut out = std::io::stdout().lock();
    // The test harness's "test crash_child_entry ... " has no newline.
    writeln!(out).unwrap();
    let key = Arc::new(DsaPrivateKey::from_bytes(&fs::read(&paths.key).unwrap()).unwrap());
    let now = T0 + 10;
    let mut store = SqliteStore::open(&paths.state).unwrap();
    let cfg = Config::new(BOB, BOB_TAG);
    let restored = ekm::restore_peer(&mut store, BOB, ALICE, cfg, key, now, LIFETIME).unwrap();
    if restored.restored != [ALICE_TAG] {
        fail(&mut out, &format!("restored {:?}", restored.restored));
    }
    let mut conv: Conversation = restored.conversation;
    let mut rng = ChaCha20Rng::seed_from_u64(std::process::id().into());

    // The client's view, then what the inbox still owes it.
    let shown = read_client(&paths.client);
    let mut last_id = shown.last().map_or(0, |(id, _)| *id);
    let mut next = shown.last().map_or(0, |(_, t)| index_of(t).unwrap() + 1);
    let mut client = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.client)
        .unwrap();
    let mut recovered = 0;
    for m in &restored.pending {
        if m.id > last_id {
            let idx = index_of(&m.entry.text).unwrap();
            if idx != next {
                fail(&mut out, &format!("inbox holds {idx}, expected {next}"));
            }
            writeln!(client, "{}\t{}", m.id, m.entry.text.as_str()).unwrap();
            client.sync_data().unwrap();
            last_id = m.id;
            next = idx + 1;
            recovered += 1;
        }
        store.ack_inbox(BOB, ALICE, m.id).unwrap();
    }
    writeln!(
        out,
        "recovered {recovered} pending {}",
        restored.pending.len()
    )
    .unwrap();

    let stream: Vec<String> = fs::read_to_string(&paths.stream)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();

    // Already-consumed messages, redelivered by the server: rejected.
    for body in &stream[next.saturating_sub(REPLAYS)..next] {
        let step = ekm::split(conv.handle_incoming(body, now, &mut rng));
        let unreadable = step
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Notify(Notice::Unreadable { .. })));
        if !step.durable.is_empty() || !unreadable {
            fail(&mut out, "a replay was accepted");
        }
        writeln!(out, "replay-rejected").unwrap();
    }
    writeln!(out, "ready {next}").unwrap();
    out.flush().unwrap();

    // Messages are handled `burst` at a time, as the proxy does with the
    // stanzas of one read: every step planned first, then one group
    // commit, then the deliveries (group commit, issue 8).
    let burst: usize = std::env::var(BURST_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let todo: Vec<(usize, &String)> = stream.iter().enumerate().skip(next).collect();
    for chunk in todo.chunks(burst.max(1)) {
        let steps: Vec<ekm::Step> = chunk
            .iter()
            .map(|(_, body)| ekm::split(conv.handle_incoming(body, now, &mut rng)))
            .collect();
        let receipts = if let [step] = &steps[..] {
            vec![store.commit_step(BOB, ALICE, &step.durable, now).unwrap()]
        } else {
            let group: Vec<PeerStep<'_>> = steps
                .iter()
                .map(|s| PeerStep {
                    peer: ALICE,
                    ops: &s.durable,
                })
                .collect();
            store.commit_steps(BOB, &group, now).unwrap()
        };
        for ((&(j, _), step), receipt) in chunk.iter().zip(steps).zip(receipts) {
            deliver_step(&mut out, &mut store, &mut client, j, step, &receipt);
        }
    }
    writeln!(out, "done {}", stream.len()).unwrap();
    out.flush().unwrap();
}

/// The effects of message `j`'s committed step: its plaintext to the
/// client file (with its inbox id), then the acknowledgement.
fn deliver_step(
    out: &mut impl Write,
    store: &mut SqliteStore,
    client: &mut File,
    j: usize,
    step: ekm::Step,
    receipt: &CommitReceipt,
) {
    let mut delivered = 0;
    for e in step.effects {
        match e {
            Effect::Send(s) if is_ake(&s) => fail(out, "sent an AKE message"),
            Effect::Send(_) => {}
            Effect::Deliver { slot, delivery } => {
                if index_of(&delivery.text) != Some(j) {
                    fail(out, &format!("message {j} decrypted wrongly"));
                }
                let id = receipt.inbox_ids[slot];
                writeln!(client, "{id}\t{}", delivery.text).unwrap();
                client.sync_data().unwrap();
                store.ack_inbox(BOB, ALICE, id).unwrap();
                delivered += 1;
            }
            Effect::Notify(n @ (Notice::GoneSecure { .. } | Notice::Unreadable { .. })) => {
                fail(out, &format!("message {j}: {n:?}"));
            }
            Effect::Notify(_) => {}
        }
    }
    if delivered != 1 {
        fail(out, &format!("message {j} delivered {delivered} times"));
    }
    ekm::release_oldest_held(store, BOB, ALICE, step.release_held).unwrap();
}

// ---- the parent ---------------------------------------------------------

/// Alice's side and the stream file she writes to.
struct Stream {
    alice: Side,
    file: File,
    len: usize,
}

impl Stream {
    fn extend_to(&mut self, n: usize) {
        while self.len < n {
            self.alice.send(&text_of(self.len), T0);
            let body = self.alice.outbox.pop_front().unwrap();
            assert!(self.alice.outbox.is_empty(), "one body per message");
            assert!(!body.contains('\n'));
            writeln!(self.file, "{body}").unwrap();
            self.len += 1;
        }
        self.file.sync_all().unwrap();
    }
}

/// Commit Bob's actions in the parent (setup only).
fn bob_apply(store: &mut SqliteStore, actions: Vec<o2tr_proxy::otr::conversation::Action>) {
    let step = ekm::split(actions);
    let r = store.commit_step(BOB, ALICE, &step.durable, T0).unwrap();
    if let Some(last) = r.inbox_ids.last() {
        store.ack_inbox(BOB, ALICE, *last).unwrap();
    }
    for e in step.effects {
        if let Effect::Send(s) = e {
            BOB_OUT.with(|o| o.borrow_mut().push(s));
        }
    }
}

thread_local! {
    static BOB_OUT: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Establish the session (Bob's side committed to the store) and exchange a
/// few messages both ways so the ratchet has moved; returns Alice.
fn setup(paths: &Paths) -> Side {
    let (ka, kb) = keys();
    fs::write(&paths.key, kb.to_bytes().as_slice()).unwrap();
    let mut store = SqliteStore::open(&paths.state).unwrap();
    let mut bob = Conversation::new(Config::new(BOB, BOB_TAG), kb.clone());
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut alice = Side::new(ALICE, ALICE_TAG, ka.clone(), 1);
    // A one-way stream longer than the default bound `k` would be held.
    let mut cfg = Config::new(ALICE, ALICE_TAG);
    cfg.max_unanswered = u32::MAX;
    alice.conv = Conversation::new(cfg, ka.clone());
    let pump = |alice: &mut Side,
                bob: &mut Conversation,
                store: &mut SqliteStore,
                rng: &mut ChaCha20Rng| {
        for _ in 0..100 {
            let mut idle = true;
            while let Some(m) = alice.outbox.pop_front() {
                bob_apply(store, bob.handle_incoming(&m, T0, rng));
                idle = false;
            }
            for m in BOB_OUT.with(|o| std::mem::take(&mut *o.borrow_mut())) {
                alice.receive(&m, T0);
                idle = false;
            }
            if idle {
                return;
            }
        }
        panic!("setup did not settle");
    };
    alice.start(T0);
    pump(&mut alice, &mut bob, &mut store, &mut rng);
    assert!(alice.conv.is_private() && bob.is_private());
    for i in 0..3 {
        alice.send(&format!("warm-up {i}"), T0);
        pump(&mut alice, &mut bob, &mut store, &mut rng);
        bob_apply(
            &mut store,
            bob.handle_outgoing(&format!("re {i}"), T0, &mut rng),
        );
        pump(&mut alice, &mut bob, &mut store, &mut rng);
    }
    assert_eq!(alice.texts(), ["re 0", "re 1", "re 2"]);
    assert!(store.inbox(BOB, ALICE).unwrap().is_empty());
    alice
}

/// What a child printed.
#[derive(Default, Debug)]
struct Report {
    fails: Vec<String>,
    recovered: usize,
    pending: usize,
    replays: usize,
    ready: bool,
    done: bool,
}

fn spawn(
    root: &Path,
    burst: usize,
) -> (
    std::process::Child,
    mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "crash_child_entry",
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
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx, reader)
}

fn absorb(report: &mut Report, line: &str) {
    if std::env::var_os("O2TR_CRASH_VERBOSE").is_some() {
        eprintln!("child: {line}");
    }
    if let Some(f) = line.strip_prefix("FAIL ") {
        report.fails.push(f.to_owned());
    } else if let Some(r) = line.strip_prefix("recovered ") {
        let v: Vec<usize> = r
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        report.recovered += v[0];
        report.pending += v[1];
    } else if line == "replay-rejected" {
        report.replays += 1;
    } else if line.starts_with("ready ") {
        report.ready = true;
    } else if line.starts_with("done ") {
        report.done = true;
    }
}

#[test]
fn sigkill_during_offline_stream_loses_nothing() {
    run_trials(1, 200);
}

/// The same with group commit: the child commits the steps of 8 messages
/// in one transaction before delivering any of them, so kills land before
/// a group's commit (the whole group is handled again from the stream),
/// after it (the whole group is in the inbox), and between deliveries.
#[test]
fn sigkill_during_offline_burst_loses_nothing() {
    run_trials(8, 100);
}

fn run_trials(burst: usize, default_trials: usize) {
    let trials: usize = std::env::var("O2TR_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_trials);
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let paths = Paths::new(root);
    let alice = setup(&paths);
    let mut stream = Stream {
        alice,
        file: File::create(&paths.stream).unwrap(),
        len: 0,
    };
    // Kill timing is random per trial (not seeded: each run differs), but
    // Alice's stream is fixed by the seeds above.
    let mut total = Report::default();
    let mut killed_before_ready = 0;
    for trial in 0..trials {
        let shown = read_client(&paths.client).len();
        stream.extend_to(shown + AHEAD);
        let (mut child, rx, reader) = spawn(root, burst);
        let mut report = Report::default();
        if trial % 5 == 0 {
            // Kill somewhere in start-up: open, restore, pending inbox.
            std::thread::sleep(Duration::from_micros(rand::random::<u64>() % 15_000));
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !report.ready {
                let line = rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|_| panic!("trial {trial}: child never got ready"));
                absorb(&mut report, &line);
            }
            std::thread::sleep(Duration::from_micros(rand::random::<u64>() % 60_000));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for line in rx.try_iter() {
            absorb(&mut report, &line);
        }
        assert!(report.fails.is_empty(), "trial {trial}: {:?}", report.fails);
        killed_before_ready += usize::from(!report.ready);
        total.recovered += report.recovered;
        total.pending += report.pending;
        total.replays += report.replays;
    }

    // A last child runs to the end of the stream.
    let shown = read_client(&paths.client).len();
    stream.extend_to(shown + AHEAD);
    let (mut child, rx, reader) = spawn(root, burst);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let mut last = Report::default();
    for line in rx.try_iter() {
        absorb(&mut last, &line);
    }
    assert!(status.success(), "final child: {status}");
    assert!(last.fails.is_empty(), "final child: {:?}", last.fails);
    assert!(last.done, "final child did not finish");
    total.recovered += last.recovered;
    total.pending += last.pending;
    total.replays += last.replays;

    // Every message exactly once, in order, with increasing inbox ids.
    let shown = read_client(&paths.client);
    let indices: Vec<usize> = shown.iter().map(|(_, t)| index_of(t).unwrap()).collect();
    assert_eq!(indices, (0..stream.len).collect::<Vec<_>>());
    for (i, (_, t)) in shown.iter().enumerate() {
        assert_eq!(t, &text_of(i));
    }
    assert!(shown.windows(2).all(|w| w[0].0 < w[1].0));
    let store = SqliteStore::open(&paths.state).unwrap();
    assert!(store.inbox(BOB, ALICE).unwrap().is_empty());
    eprintln!(
        "o2tr_crash (burst {burst}): {trials} SIGKILLs ({killed_before_ready} before the child was ready), \
         {} messages delivered exactly once in order; after a kill the inbox held {} entries: \
         {} recovered (committed, not yet shown) and {} duplicates dropped by the client's id \
         check (shown, not yet acknowledged); {} replays rejected; {:.1} s",
        stream.len,
        total.pending,
        total.recovered,
        total.pending - total.recovered,
        total.replays,
        started.elapsed().as_secs_f64()
    );
}
