//! File-level tests of the SQLite store (DESIGN §2 store, §5 persist before
//! release): reopen, permissions, refusing newer/garbage/corrupt files
//! without changing them, secure deletion, and crash durability under
//! SIGKILL.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use o2tr_proxy::otr::crypto::SecretBytes;
use o2tr_proxy::store::{
    ConversationKey, DB_FILE_NAME, DurableOp, Error, SCHEMA_VERSION, SessionState, SqliteStore,
    Store, Trust,
};

fn key(instance: u32) -> ConversationKey {
    ConversationKey::new("alice@example.org", "bob@example.net", instance)
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn companion(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Bytes and mtime of a file, to prove it was not changed.
fn fingerprint_of(path: &Path) -> (Vec<u8>, SystemTime) {
    (
        fs::read(path).unwrap(),
        fs::metadata(path).unwrap().modified().unwrap(),
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A fresh state directory inside a temporary directory (so the state
/// directory itself is created by the store).
fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    (tmp, dir)
}

#[test]
fn reopen_keeps_everything() {
    let (_tmp, dir) = state_dir();
    let fpr = [7u8; 20];
    {
        let mut s = SqliteStore::open(&dir).unwrap();
        s.set_account_key("alice@example.org", b"dsa-private")
            .unwrap();
        s.set_instance_tag("alice@example.org", 0xdead_beef)
            .unwrap();
        s.set_fingerprint(
            "alice@example.org",
            "bob@example.net",
            &fpr,
            Trust::Verified,
            42,
        )
        .unwrap();
        s.save_snapshot(&key(0x100), SessionState::Suspended, b"ekm", 50)
            .unwrap();
        s.hold_message("alice@example.org", "bob@example.net", "one", 60)
            .unwrap();
        s.hold_message("alice@example.org", "bob@example.net", "two", 61)
            .unwrap();
    }
    let mut s = SqliteStore::open(&dir).unwrap();
    assert_eq!(
        s.account_key("alice@example.org")
            .unwrap()
            .unwrap()
            .as_slice(),
        b"dsa-private"
    );
    assert_eq!(
        s.instance_tag("alice@example.org").unwrap(),
        Some(0xdead_beef)
    );
    let f = s.all_fingerprints().unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(
        (f[0].fingerprint, f[0].trust, f[0].first_seen),
        (fpr, Trust::Verified, 42)
    );
    let snap = s.snapshot(&key(0x100)).unwrap().unwrap();
    assert_eq!(snap.state, SessionState::Suspended);
    assert_eq!(snap.data.as_slice(), b"ekm");
    assert_eq!((snap.created_at, snap.updated_at), (50, 50));
    // FIFO order survives, and ids keep increasing after reopen.
    let held = s
        .held_messages("alice@example.org", "bob@example.net")
        .unwrap();
    let texts: Vec<&str> = held.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["one", "two"]);
    s.release_held(held[0].id).unwrap();
    let id3 = s
        .hold_message("alice@example.org", "bob@example.net", "three", 62)
        .unwrap();
    assert!(id3 > held[1].id);
    drop(s);
    let s = SqliteStore::open(&dir).unwrap();
    let texts: Vec<String> = s
        .all_held_messages()
        .unwrap()
        .iter()
        .map(|m| m.text.to_string())
        .collect();
    assert_eq!(texts, vec!["two", "three"]);
}

#[test]
fn creates_private_dir_and_files() {
    let (_tmp, dir) = state_dir();
    let mut s = SqliteStore::open(&dir).unwrap();
    s.save_snapshot(&key(1), SessionState::Live, b"x", 1)
        .unwrap();
    let db = dir.join(DB_FILE_NAME);
    assert_eq!(s.path(), db);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&db), 0o600);
    for suffix in ["-wal", "-shm"] {
        let p = companion(&db, suffix);
        assert!(p.exists(), "{} should exist while open", p.display());
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
}

#[test]
fn refuses_group_or_world_writable_dir() {
    for bad in [0o777, 0o770, 0o702] {
        let (_tmp, dir) = state_dir();
        fs::create_dir(&dir).unwrap();
        chmod(&dir, bad);
        let err = SqliteStore::open(&dir).unwrap_err();
        match &err {
            Error::UnsafePermissions { path, mode } => {
                assert_eq!(path, &dir);
                assert_eq!(*mode, bad);
            }
            other => panic!("expected UnsafePermissions, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("{bad:04o}")), "{msg}");
        assert!(!dir.join(DB_FILE_NAME).exists(), "nothing created");
    }
    // A readable but not writable directory is accepted.
    let (_tmp, dir) = state_dir();
    fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    SqliteStore::open(&dir).unwrap();
}

#[test]
fn refuses_database_readable_by_others_unchanged() {
    let (_tmp, dir) = state_dir();
    drop(SqliteStore::open(&dir).unwrap());
    let db = dir.join(DB_FILE_NAME);
    for bad in [0o644, 0o640, 0o604] {
        chmod(&db, bad);
        let before = fingerprint_of(&db);
        match SqliteStore::open(&dir) {
            Err(Error::UnsafePermissions { path, mode }) => {
                assert_eq!(path, db);
                assert_eq!(mode, bad);
            }
            other => panic!("expected UnsafePermissions, got {other:?}"),
        }
        assert_eq!(fingerprint_of(&db), before);
        assert_eq!(mode(&db), bad, "mode not silently fixed");
    }
    // A leaked -wal is refused too.
    chmod(&db, 0o600);
    let wal = companion(&db, "-wal");
    fs::write(&wal, b"").unwrap();
    chmod(&wal, 0o644);
    assert!(matches!(
        SqliteStore::open(&dir),
        Err(Error::UnsafePermissions { path, .. }) if path == wal
    ));
    fs::remove_file(&wal).unwrap();
    SqliteStore::open(&dir).unwrap();
}

fn set_user_version(db: &Path, v: u32) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.pragma_update(None, "user_version", v).unwrap();
}

#[test]
fn refuses_newer_schema_unchanged() {
    let (_tmp, dir) = state_dir();
    {
        let mut s = SqliteStore::open(&dir).unwrap();
        s.save_snapshot(&key(1), SessionState::Live, b"x", 1)
            .unwrap();
    }
    let db = dir.join(DB_FILE_NAME);
    set_user_version(&db, SCHEMA_VERSION + 1);
    chmod(&db, 0o600);
    let before = fingerprint_of(&db);
    std::thread::sleep(Duration::from_millis(20)); // an mtime change would show
    match SqliteStore::open(&dir) {
        Err(Error::NewerSchema { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    assert_eq!(fingerprint_of(&db), before);
}

#[test]
fn refuses_newer_schema_found_only_in_wal() {
    // A crash after a newer build's migration committed to the WAL but
    // before a checkpoint: the main file's header still shows the old
    // version; the WAL has the new one.
    let (_tmp, dir) = state_dir();
    drop(SqliteStore::open(&dir).unwrap());
    let db = dir.join(DB_FILE_NAME);
    let c = rusqlite::Connection::open(&db).unwrap();
    c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    c.pragma_update(None, "user_version", SCHEMA_VERSION + 5)
        .unwrap();
    let copy_dir = dir.with_file_name("copy");
    fs::create_dir(&copy_dir).unwrap();
    chmod(&copy_dir, 0o700);
    let copy = copy_dir.join(DB_FILE_NAME);
    fs::copy(&db, &copy).unwrap();
    fs::copy(companion(&db, "-wal"), companion(&copy, "-wal")).unwrap();
    drop(c);
    let before = fingerprint_of(&copy);
    assert!(matches!(
        SqliteStore::open(&copy_dir),
        Err(Error::NewerSchema { found, .. }) if found == SCHEMA_VERSION + 5
    ));
    assert_eq!(fingerprint_of(&copy), before);
}

#[test]
fn refuses_garbage_file_unchanged() {
    let (_tmp, dir) = state_dir();
    fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o700);
    let db = dir.join(DB_FILE_NAME);
    let mut garbage = vec![0u8; 8192];
    rand::fill(&mut garbage[..]);
    let mut magic_then_garbage = garbage.clone();
    magic_then_garbage[..16].copy_from_slice(b"SQLite format 3\0");
    for (name, bytes) in [
        ("random", garbage.as_slice()),
        ("text", b"not a database at all\n".as_slice()),
        ("magic+random", magic_then_garbage.as_slice()),
    ] {
        fs::write(&db, bytes).unwrap();
        chmod(&db, 0o600);
        let before = fingerprint_of(&db);
        let r = SqliteStore::open(&dir);
        assert!(
            matches!(r, Err(Error::NotADatabase { .. } | Error::Corrupt(_))),
            "{name}: {r:?}"
        );
        assert_eq!(fingerprint_of(&db), before, "{name}: file changed");
    }
    // The plain cases are named precisely.
    fs::write(&db, &garbage).unwrap();
    assert!(matches!(
        SqliteStore::open(&dir),
        Err(Error::NotADatabase { path }) if path == db
    ));
}

#[test]
fn refuses_damaged_database_unchanged() {
    let (_tmp, dir) = state_dir();
    {
        let mut s = SqliteStore::open(&dir).unwrap();
        for i in 0..50 {
            s.save_snapshot(&key(i), SessionState::Live, &[i as u8; 3000], 1)
                .unwrap();
        }
    }
    let db = dir.join(DB_FILE_NAME);
    let mut bytes = fs::read(&db).unwrap();
    assert!(bytes.len() > 8 * 4096);
    // Smash the middle of the file (b-tree pages), keep the header.
    for b in &mut bytes[3 * 4096..6 * 4096] {
        *b = 0x5a;
    }
    fs::write(&db, &bytes).unwrap();
    let before = fingerprint_of(&db);
    let r = SqliteStore::open(&dir);
    assert!(matches!(r, Err(Error::Corrupt(_))), "{r:?}");
    assert_eq!(fingerprint_of(&db), before);
}

/// Concatenated bytes of the database file and its WAL, as on disk now.
fn raw_db_bytes(db: &Path) -> (Vec<u8>, Vec<u8>) {
    let main = fs::read(db).unwrap();
    let wal = fs::read(companion(db, "-wal")).unwrap_or_default();
    (main, wal)
}

fn assert_absent(db: &Path, pattern: &[u8], what: &str) {
    let (main, wal) = raw_db_bytes(db);
    assert!(!contains(&main, pattern), "{what}: old bytes in db file");
    assert!(!contains(&wal, pattern), "{what}: old bytes in -wal");
}

fn assert_present_in_db(db: &Path, pattern: &[u8], what: &str) {
    let (main, _) = raw_db_bytes(db);
    assert!(contains(&main, pattern), "{what}: control pattern missing");
}

/// Runs the deferred wipe the router runs every tick, and checks it did
/// something (the store had superseded bytes pending) and finished.
fn wipe(s: &mut SqliteStore) {
    assert!(s.has_unwiped(), "expected superseded content pending");
    s.maintenance().unwrap();
    assert!(!s.has_unwiped());
}

#[test]
fn replaced_and_deleted_secrets_leave_no_bytes_on_disk_after_maintenance() {
    let (_tmp, dir) = state_dir();
    let db = dir.join(DB_FILE_NAME);
    let mut s = SqliteStore::open(&dir).unwrap();
    // A small snapshot (stored inline in a b-tree page) and a large one
    // (overflow pages).
    for (instance, filler) in [(0x100u32, 100usize), (0x200, 20_000)] {
        let k = key(instance);
        let mut old = [0u8; 32];
        let mut new = [0u8; 32];
        rand::fill(&mut old);
        rand::fill(&mut new);
        let wrap = |p: &[u8; 32]| {
            let mut v = vec![0x11u8; filler];
            v.extend_from_slice(p);
            v.extend(std::iter::repeat_n(0x22u8, filler));
            v
        };
        s.save_snapshot(&k, SessionState::Live, &wrap(&old), 1)
            .unwrap();
        s.checkpoint().unwrap();
        assert_present_in_db(&db, &old, "first version"); // the check can fail
        s.save_snapshot(&k, SessionState::Live, &wrap(&new), 2)
            .unwrap();
        wipe(&mut s);
        assert_absent(&db, &old, "replaced snapshot");
        assert_present_in_db(&db, &new, "current snapshot");
        assert!(s.delete_snapshot(&k).unwrap()); // checkpoints by itself
        assert!(!s.has_unwiped());
        assert_absent(&db, &new, "deleted snapshot");
    }

    // Expiry wipes too.
    let mut pat = [0u8; 32];
    rand::fill(&mut pat);
    s.save_snapshot(&key(0x300), SessionState::Suspended, &pat, 5)
        .unwrap();
    s.checkpoint().unwrap();
    assert_present_in_db(&db, &pat, "before expiry");
    assert_eq!(s.expire_snapshots(6).unwrap(), vec![key(0x300)]); // checkpoints too
    assert!(!s.has_unwiped());
    assert_absent(&db, &pat, "expired snapshot");

    // A replaced private key.
    let mut k1 = [0u8; 32];
    rand::fill(&mut k1);
    s.set_account_key("alice@example.org", &k1).unwrap();
    s.checkpoint().unwrap();
    assert_present_in_db(&db, &k1, "first key");
    s.set_account_key("alice@example.org", b"another key")
        .unwrap();
    wipe(&mut s);
    assert_absent(&db, &k1, "replaced key");

    // A released held message (plaintext).
    let text = random_text();
    let id = s
        .hold_message("alice@example.org", "bob@example.net", &text, 1)
        .unwrap();
    s.checkpoint().unwrap();
    assert_present_in_db(&db, text.as_bytes(), "held text");
    assert!(s.release_held(id).unwrap());
    wipe(&mut s);
    assert_absent(&db, text.as_bytes(), "released text");

    // An acknowledged inbox entry (plaintext; the ack itself is not fsynced).
    let text = random_text();
    let r = s
        .commit_step(
            "alice@example.org",
            "bob@example.net",
            &[DurableOp::Inbox(o2tr_proxy::store::InboxEntry {
                instance: 0x100,
                text: text.clone().into(),
                encrypted: true,
                offline: false,
            })],
            7,
        )
        .unwrap();
    s.checkpoint().unwrap();
    assert_present_in_db(&db, text.as_bytes(), "inbox text");
    assert_eq!(
        s.ack_inbox("alice@example.org", "bob@example.net", r.inbox_ids[0])
            .unwrap(),
        1
    );
    wipe(&mut s);
    assert_absent(&db, text.as_bytes(), "acknowledged inbox text");

    // A handshake record (our AKE secret), replaced, then deleted.
    let (acct, peer) = ("alice@example.org", "bob@example.net");
    let mut first = [0u8; 32];
    let mut second = [0u8; 32];
    rand::fill(&mut first);
    rand::fill(&mut second);
    let save = |p: &[u8; 32]| DurableOp::SaveHandshake {
        instance: 0x100,
        data: SecretBytes::from_slice(p),
    };
    s.commit_step(acct, peer, &[save(&first)], 8).unwrap();
    s.checkpoint().unwrap();
    assert_present_in_db(&db, &first, "handshake record");
    s.commit_step(acct, peer, &[save(&second)], 9).unwrap();
    wipe(&mut s);
    assert_absent(&db, &first, "replaced handshake record");
    assert_present_in_db(&db, &second, "current handshake record");
    assert_eq!(s.handshakes(acct, peer).unwrap().len(), 1);
    s.commit_step(
        acct,
        peer,
        &[DurableOp::DeleteHandshake { instance: 0x100 }],
        10,
    )
    .unwrap();
    wipe(&mut s);
    assert_absent(&db, &second, "deleted handshake record");
    assert!(s.handshakes(acct, peer).unwrap().is_empty());
}

fn random_text() -> String {
    (0..32)
        .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
        .collect()
}

#[test]
fn superseded_bytes_stay_in_wal_until_maintenance() {
    // The control for the test above: a replaced snapshot is still in the
    // WAL until the deferred checkpoint runs (so "absent" can fail), and
    // maintenance is what removes it. Also: the save itself did not
    // checkpoint (the per-message cost issue 8 removed).
    let (_tmp, dir) = state_dir();
    let db = dir.join(DB_FILE_NAME);
    let mut s = SqliteStore::open(&dir).unwrap();
    assert!(!s.has_unwiped(), "open wipes");
    s.maintenance().unwrap(); // nothing pending: a no-op
    let mut old = [0u8; 32];
    rand::fill(&mut old);
    s.save_snapshot(&key(1), SessionState::Live, &old, 1)
        .unwrap();
    assert!(!s.has_unwiped(), "an insert supersedes nothing");
    s.save_snapshot(&key(1), SessionState::Live, b"new", 2)
        .unwrap();
    let (_, wal) = raw_db_bytes(&db);
    assert!(contains(&wal, &old), "expected the old frame in the WAL");
    wipe(&mut s);
    assert_absent(&db, &old, "after maintenance");
}

#[test]
fn wipe_immediately_checkpoints_inside_the_call() {
    let (_tmp, dir) = state_dir();
    let db = dir.join(DB_FILE_NAME);
    let mut s = SqliteStore::open(&dir).unwrap();
    s.set_wipe_immediately(true);
    let mut old = [0u8; 32];
    rand::fill(&mut old);
    s.save_snapshot(&key(1), SessionState::Live, &old, 1)
        .unwrap();
    s.save_snapshot(&key(1), SessionState::Live, b"new", 2)
        .unwrap();
    assert!(!s.has_unwiped());
    assert_absent(&db, &old, "replaced with wipe_immediately");
}

#[test]
fn open_wipes_what_a_crash_left_in_the_wal() {
    // The files as a crash between a replacing save and the next
    // maintenance leaves them: copied while the store is open, never closed.
    let (_tmp, dir) = state_dir();
    let (_tmp2, crashed) = state_dir();
    fs::create_dir(&crashed).unwrap();
    chmod(&crashed, 0o700);
    let db = dir.join(DB_FILE_NAME);
    let mut s = SqliteStore::open(&dir).unwrap();
    let mut old = [0u8; 32];
    rand::fill(&mut old);
    s.save_snapshot(&key(1), SessionState::Live, &old, 1)
        .unwrap();
    s.save_snapshot(&key(1), SessionState::Live, b"new", 2)
        .unwrap();
    for suffix in ["", "-wal"] {
        let to = companion(&crashed.join(DB_FILE_NAME), suffix);
        fs::copy(companion(&db, suffix), &to).unwrap();
        chmod(&to, 0o600);
    }
    let crashed_db = crashed.join(DB_FILE_NAME);
    let (_, wal) = raw_db_bytes(&crashed_db);
    assert!(contains(&wal, &old), "the copied WAL holds the old bytes");
    let reopened = SqliteStore::open(&crashed).unwrap();
    assert!(!reopened.has_unwiped());
    assert_absent(&crashed_db, &old, "after reopening");
    let snap = reopened.snapshot(&key(1)).unwrap().unwrap();
    assert_eq!(snap.data.as_slice(), b"new", "the committed save survived");
    drop(s);
}

#[test]
fn drop_wipes_pending_content() {
    let (_tmp, dir) = state_dir();
    let db = dir.join(DB_FILE_NAME);
    let mut s = SqliteStore::open(&dir).unwrap();
    let mut old = [0u8; 32];
    rand::fill(&mut old);
    s.save_snapshot(&key(1), SessionState::Live, &old, 1)
        .unwrap();
    s.save_snapshot(&key(1), SessionState::Live, b"new", 2)
        .unwrap();
    assert!(s.has_unwiped());
    drop(s);
    assert_absent(&db, &old, "after drop");
}

// ---- crash durability -------------------------------------------------

const CRASH_CHILD_ENV: &str = "O2TR_STORE_CRASH_CHILD_DIR";
const CRASH_ACCOUNT: &str = "alice@example.org";
const CRASH_PEER: &str = "bob@example.net";

fn crash_payload(n: u64) -> Vec<u8> {
    let mut v = n.to_le_bytes().to_vec();
    v.extend(std::iter::repeat_n((n % 251) as u8, 700));
    v
}

/// The child side of `survives_sigkill_after_every_save`: a no-op unless the
/// parent set the environment variable. Saves snapshot n = k+1, k+2, ...
/// (k: the number found in the store) and
/// prints `saved n` after each save returns (also holds message n and
/// releases message n-1, to exercise deletion and checkpoints).
#[test]
fn crash_child_entry() {
    let Ok(dir) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let mut s = SqliteStore::open(Path::new(&dir)).unwrap();
    let mut out = std::io::stdout().lock();
    // Continue the numbering from what a previous (killed) child left.
    let start = s
        .snapshot(&key(0x100))
        .unwrap()
        .map_or(0, |r| u64::from_le_bytes(r.data[..8].try_into().unwrap()));
    for m in s.all_held_messages().unwrap() {
        s.release_held(m.id).unwrap();
    }
    let mut prev_held = None;
    for n in start + 1.. {
        s.save_snapshot(&key(0x100), SessionState::Live, &crash_payload(n), n)
            .unwrap();
        let id = s
            .hold_message(CRASH_ACCOUNT, CRASH_PEER, &n.to_string(), n)
            .unwrap();
        if let Some(prev) = prev_held.replace(id) {
            s.release_held(prev).unwrap();
        }
        writeln!(out, "saved {n}").unwrap();
        out.flush().unwrap();
    }
}

/// Random-ish delay in `0..max_ms` milliseconds, without a seeded RNG (each
/// trial should differ).
fn random_delay(max_ms: u64) -> Duration {
    Duration::from_micros(rand::random::<u64>() % (max_ms * 1000))
}

#[test]
fn survives_sigkill_after_every_save() {
    let trials: usize = std::env::var("O2TR_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let exe = std::env::current_exe().unwrap();
    let (_tmp, dir) = state_dir();
    let mut last_stored = 0u64;
    for trial in 0..trials {
        // The child continues from what the previous trial left.
        let mut child = Command::new(&exe)
            .args([
                "crash_child_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<u64>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("saved ") {
                    if let Ok(n) = n.trim().parse() {
                        let _ = tx.send(n);
                    }
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child never saved");
        std::thread::sleep(random_delay(60));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let last_printed = rx.try_iter().last().unwrap_or(first);

        let s = SqliteStore::open(&dir).expect("reopen after SIGKILL");
        let snap = s.snapshot(&key(0x100)).unwrap().unwrap();
        let stored = u64::from_le_bytes(snap.data[..8].try_into().unwrap());
        assert_eq!(snap.data.as_slice(), crash_payload(stored).as_slice());
        assert_eq!(snap.updated_at, stored);
        assert!(
            stored == last_printed || stored == last_printed + 1,
            "trial {trial}: printed {last_printed}, stored {stored}"
        );
        let held: Vec<u64> = s
            .all_held_messages()
            .unwrap()
            .iter()
            .map(|m| m.text.parse().unwrap())
            .collect();
        assert!(
            held.iter().max().copied().unwrap_or(0) >= last_printed,
            "trial {trial}: held {held:?}, printed {last_printed}"
        );
        assert!(held.len() <= 2, "trial {trial}: held {held:?}");
        assert!(stored > last_stored, "trial {trial}: no progress");
        last_stored = stored;
    }
}

#[test]
fn opens_a_version_2_database_and_adds_the_outbox() {
    // A database as schema version 2 left it: no outbox, no fragment and no
    // handshake table.
    let (_tmp, dir) = state_dir();
    {
        let mut s = SqliteStore::open(&dir).unwrap();
        s.save_snapshot(&key(1), SessionState::Live, b"v2-snap", 1)
            .unwrap();
        s.hold_message("alice@x", "bob@y", "held", 2).unwrap();
    }
    let db = dir.join(DB_FILE_NAME);
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "DROP TABLE outbox; DROP TABLE fragment; DROP TABLE handshake;
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    chmod(&db, 0o600);
    let mut s = SqliteStore::open(&dir).unwrap();
    assert_eq!(
        s.snapshot(&key(1)).unwrap().unwrap().data.as_slice(),
        b"v2-snap"
    );
    assert_eq!(s.held_messages("alice@x", "bob@y").unwrap().len(), 1);
    let r = s
        .commit_step(
            "alice@x",
            "bob@y",
            &[
                DurableOp::Outbox("<message/>".into()),
                DurableOp::Fragments(vec!["?OTR,00001,00002,a,".into()]),
                DurableOp::SaveHandshake {
                    instance: 7,
                    data: SecretBytes::from_slice(b"record"),
                },
            ],
            3,
        )
        .unwrap();
    assert_eq!(s.outbox("alice@x").unwrap()[0].id, r.outbox_ids[0]);
    assert_eq!(s.fragments("alice@x", "bob@y").unwrap().len(), 1);
    let hs = s.handshakes("alice@x", "bob@y").unwrap();
    assert_eq!((hs.len(), hs[0].instance), (1, 7));
    assert_eq!(hs[0].data.as_slice(), b"record");
    drop(s);
    let c = rusqlite::Connection::open(&db).unwrap();
    let v: u32 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
}
