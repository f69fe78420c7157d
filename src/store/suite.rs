//! The behaviour suite every [`Store`] must pass, written once over the trait
//! and run on [`MemoryStore`] and [`SqliteStore`] (DESIGN §2: "behind a small
//! trait so an in-memory store serves tests").

use super::*;

const FPR_A: [u8; 20] = [0xaa; 20];
const FPR_B: [u8; 20] = [0x0b; 20];

fn key(account: &str, peer: &str, instance: u32) -> ConversationKey {
    ConversationKey::new(account, peer, instance)
}

pub(super) fn account_keys(s: &mut dyn Store) {
    assert!(s.account_key("alice@x").unwrap().is_none());
    assert!(s.accounts().unwrap().is_empty());
    s.set_account_key("alice@x", b"key-1").unwrap();
    assert_eq!(
        s.account_key("alice@x").unwrap().unwrap().as_slice(),
        b"key-1"
    );
    s.set_account_key("alice@x", b"key-2").unwrap();
    assert_eq!(
        s.account_key("alice@x").unwrap().unwrap().as_slice(),
        b"key-2"
    );
    assert!(s.account_key("bob@x").unwrap().is_none());
    assert_eq!(s.accounts().unwrap(), vec!["alice@x".to_owned()]);
}

pub(super) fn instance_tags(s: &mut dyn Store) {
    assert_eq!(s.instance_tag("alice@x").unwrap(), None);
    s.set_instance_tag("alice@x", 0x1234_5678).unwrap();
    s.set_instance_tag("bob@x", u32::MAX).unwrap();
    assert_eq!(s.instance_tag("alice@x").unwrap(), Some(0x1234_5678));
    assert_eq!(s.instance_tag("bob@x").unwrap(), Some(u32::MAX));
    // A key set later does not disturb the tag, and vice versa.
    s.set_account_key("alice@x", b"k").unwrap();
    assert_eq!(s.instance_tag("alice@x").unwrap(), Some(0x1234_5678));
    assert!(s.account_key("bob@x").unwrap().is_none());
    assert_eq!(s.accounts().unwrap(), vec!["alice@x", "bob@x"]);
}

pub(super) fn fingerprints(s: &mut dyn Store) {
    s.set_fingerprint("alice@x", "bob@y", &FPR_A, Trust::Unverified, 100)
        .unwrap();
    s.set_fingerprint("alice@x", "bob@y", &FPR_B, Trust::Verified, 50)
        .unwrap();
    s.set_fingerprint("alice@x", "carol@y", &FPR_A, Trust::Distrusted, 10)
        .unwrap();
    // Update: trust changes, first_seen stays.
    s.set_fingerprint("alice@x", "bob@y", &FPR_A, Trust::Verified, 999)
        .unwrap();
    let bob = s.fingerprints("alice@x", "bob@y").unwrap();
    assert_eq!(bob.len(), 2);
    assert_eq!(bob[0].fingerprint, FPR_B); // first_seen 50 first
    assert_eq!(bob[1].fingerprint, FPR_A);
    assert_eq!(bob[1].trust, Trust::Verified);
    assert_eq!(bob[1].first_seen, 100);
    let all = s.all_fingerprints().unwrap();
    let peers: Vec<_> = all.iter().map(|f| f.peer.as_str()).collect();
    assert_eq!(peers, vec!["bob@y", "bob@y", "carol@y"]);
    assert_eq!(all[2].trust, Trust::Distrusted);
    assert!(s.remove_fingerprint("alice@x", "bob@y", &FPR_B).unwrap());
    assert!(!s.remove_fingerprint("alice@x", "bob@y", &FPR_B).unwrap());
    assert_eq!(s.fingerprints("alice@x", "bob@y").unwrap().len(), 1);
    assert!(s.fingerprints("alice@x", "nobody@y").unwrap().is_empty());
    assert_eq!(s.accounts().unwrap(), vec!["alice@x"]);
}

pub(super) fn snapshots(s: &mut dyn Store) {
    let k1 = key("alice@x", "bob@y", 0x200);
    let k2 = key("alice@x", "bob@y", 0x100);
    let k3 = key("alice@x", "carol@y", 0x100);
    assert!(s.snapshot(&k1).unwrap().is_none());
    s.save_snapshot(&k1, SessionState::Live, b"one", 10)
        .unwrap();
    s.save_snapshot(&k2, SessionState::Suspended, b"two", 11)
        .unwrap();
    s.save_snapshot(&k3, SessionState::Live, b"", 12).unwrap();
    let r = s.snapshot(&k1).unwrap().unwrap();
    assert_eq!(
        (r.state, r.data.as_slice(), r.created_at, r.updated_at),
        (SessionState::Live, &b"one"[..], 10, 10)
    );
    // Replace: created_at kept.
    s.save_snapshot(&k1, SessionState::Suspended, b"one-b", 20)
        .unwrap();
    let r = s.snapshot(&k1).unwrap().unwrap();
    assert_eq!(
        (r.state, r.data.as_slice(), r.created_at, r.updated_at),
        (SessionState::Suspended, &b"one-b"[..], 10, 20)
    );
    assert_eq!(s.snapshot(&k3).unwrap().unwrap().data.len(), 0);
    // Ordering by instance within a peer, by peer overall.
    let bob: Vec<u32> = s
        .snapshots_for_peer("alice@x", "bob@y")
        .unwrap()
        .iter()
        .map(|r| r.key.instance)
        .collect();
    assert_eq!(bob, vec![0x100, 0x200]);
    let all: Vec<_> = s.snapshots().unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(all, vec![k2.clone(), k1.clone(), k3.clone()]);
    // State change.
    assert!(
        s.set_snapshot_state(&k2, SessionState::Finished, 30)
            .unwrap()
    );
    let r = s.snapshot(&k2).unwrap().unwrap();
    assert_eq!(
        (r.state, r.updated_at, r.created_at),
        (SessionState::Finished, 30, 11)
    );
    assert_eq!(r.data.as_slice(), b"two");
    assert!(
        !s.set_snapshot_state(&key("alice@x", "nobody@y", 1), SessionState::Live, 30)
            .unwrap()
    );
    // Delete.
    assert!(s.delete_snapshot(&k2).unwrap());
    assert!(!s.delete_snapshot(&k2).unwrap());
    assert!(s.snapshot(&k2).unwrap().is_none());
    assert_eq!(s.snapshots().unwrap().len(), 2);
}

pub(super) fn snapshot_debug_hides_data(s: &mut dyn Store) {
    let k = key("alice@x", "bob@y", 0x100);
    s.save_snapshot(&k, SessionState::Live, b"SECRET-BYTES", 1)
        .unwrap();
    let r = s.snapshot(&k).unwrap().unwrap();
    let dbg = format!("{r:?}");
    assert!(!dbg.contains("SECRET"), "{dbg}");
    assert!(!dbg.contains("83, 69, 67"), "{dbg}"); // "SEC" as numbers
    let id = s.hold_message("alice@x", "bob@y", "PLAINTEXT", 1).unwrap();
    let m = s.held_messages("alice@x", "bob@y").unwrap();
    assert_eq!(m[0].id, id);
    assert!(!format!("{m:?}").contains("PLAINTEXT"));
}

pub(super) fn expiry(s: &mut dyn Store) {
    let old1 = key("alice@x", "bob@y", 0x100);
    let old2 = key("alice@x", "amy@y", 0x300);
    let edge = key("alice@x", "bob@y", 0x101);
    let fresh = key("alice@x", "bob@y", 0x102);
    s.save_snapshot(&old1, SessionState::Suspended, b"a", 100)
        .unwrap();
    s.save_snapshot(&old2, SessionState::Live, b"b", 10)
        .unwrap();
    s.save_snapshot(&edge, SessionState::Suspended, b"c", 10)
        .unwrap();
    s.set_snapshot_state(&edge, SessionState::Suspended, 500)
        .unwrap(); // a state change refreshes updated_at
    s.save_snapshot(&fresh, SessionState::Finished, b"d", 800)
        .unwrap();
    assert!(s.expire_snapshots(10).unwrap().is_empty()); // strictly older
    let gone = s.expire_snapshots(500).unwrap();
    assert_eq!(gone, vec![old2, old1]); // sorted by account, peer, instance
    let left: Vec<_> = s.snapshots().unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(left, vec![edge, fresh]);
    assert_eq!(s.expire_snapshots(u64::MAX).unwrap().len(), 2);
    assert!(s.snapshots().unwrap().is_empty());
}

pub(super) fn held_messages(s: &mut dyn Store) {
    let a = s.hold_message("alice@x", "bob@y", "first", 5).unwrap();
    let b = s.hold_message("alice@x", "carol@y", "other", 6).unwrap();
    let c = s.hold_message("alice@x", "bob@y", "second", 4).unwrap();
    let d = s.hold_message("alice@x", "bob@y", "third ✓", 7).unwrap();
    assert!(a < b && b < c && c < d);
    let texts = |v: Vec<HeldMessage>| v.iter().map(|m| m.text.to_string()).collect::<Vec<_>>();
    assert_eq!(
        texts(s.held_messages("alice@x", "bob@y").unwrap()),
        vec!["first", "second", "third ✓"]
    );
    let all = s.all_held_messages().unwrap();
    assert_eq!(
        all.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![a, b, c, d]
    );
    assert_eq!(all[2].queued_at, 4);
    assert_eq!(all[1].peer, "carol@y");
    assert_eq!(s.held_peers("alice@x").unwrap(), ["bob@y", "carol@y"]);
    assert!(s.held_peers("nobody@x").unwrap().is_empty());
    assert!(s.release_held(a).unwrap());
    assert!(!s.release_held(a).unwrap());
    let e = s.hold_message("alice@x", "bob@y", "fourth", 8).unwrap();
    assert!(e > d, "ids are never reused");
    assert_eq!(
        texts(s.held_messages("alice@x", "bob@y").unwrap()),
        vec!["second", "third ✓", "fourth"]
    );
    assert!(s.held_messages("bob@x", "alice@y").unwrap().is_empty());
}

pub(super) fn accounts_are_implicit(s: &mut dyn Store) {
    s.hold_message("h@x", "p@y", "t", 1).unwrap();
    s.save_snapshot(&key("s@x", "p@y", 1), SessionState::Live, b"", 1)
        .unwrap();
    s.set_fingerprint("f@x", "p@y", &FPR_A, Trust::Unverified, 1)
        .unwrap();
    s.set_instance_tag("i@x", 0x100).unwrap();
    assert_eq!(s.accounts().unwrap(), vec!["f@x", "h@x", "i@x", "s@x"]);
    assert!(s.account_key("s@x").unwrap().is_none());
    assert_eq!(s.instance_tag("s@x").unwrap(), None);
}

pub(super) fn group_commit(s: &mut dyn Store) {
    let inbox = |t: &str| {
        DurableOp::Inbox(InboxEntry {
            instance: 7,
            text: Zeroizing::new(t.to_owned()),
            encrypted: true,
            offline: false,
        })
    };
    let snap = |d: &[u8]| DurableOp::SaveSnapshot {
        instance: 7,
        state: SessionState::Live,
        data: SecretBytes::from_slice(d),
    };
    let first = [
        snap(b"a1"),
        inbox("a-one"),
        DurableOp::Outbox("o1".into()),
        DurableOp::Hold(Zeroizing::new("held".into())),
    ];
    let other = [inbox("b-one"), DurableOp::Outbox("o2".into())];
    // A later step of the same peer sees the earlier step's writes: it
    // replaces its snapshot and releases the message it held.
    let second = [
        snap(b"a2"),
        DurableOp::ReleaseHeld(1),
        inbox("a-two"),
        DurableOp::Outbox("o3".into()),
    ];
    let steps = [
        PeerStep {
            peer: "bob@y",
            ops: &first,
        },
        PeerStep {
            peer: "carol@y",
            ops: &other,
        },
        PeerStep {
            peer: "bob@y",
            ops: &second,
        },
    ];
    let r = s.commit_steps("alice@x", &steps, 30).unwrap();
    assert_eq!(r.len(), 3, "one receipt per step");
    assert_eq!(r[0].held_ids.len(), 1);
    let inbox_ids: Vec<i64> = r.iter().flat_map(|r| r.inbox_ids.clone()).collect();
    let outbox_ids: Vec<i64> = r.iter().flat_map(|r| r.outbox_ids.clone()).collect();
    assert_eq!(inbox_ids.len(), 3);
    assert!(inbox_ids.windows(2).all(|w| w[0] < w[1]), "{inbox_ids:?}");
    assert!(outbox_ids.windows(2).all(|w| w[0] < w[1]), "{outbox_ids:?}");
    let stanzas: Vec<String> = s
        .outbox("alice@x")
        .unwrap()
        .into_iter()
        .map(|m| format!("{}:{}", m.peer, m.stanza))
        .collect();
    assert_eq!(stanzas, ["bob@y:o1", "carol@y:o2", "bob@y:o3"]);
    let texts: Vec<String> = s
        .all_inbox()
        .unwrap()
        .into_iter()
        .map(|m| format!("{}:{}", m.peer, m.entry.text.as_str()))
        .collect();
    assert_eq!(texts, ["bob@y:a-one", "carol@y:b-one", "bob@y:a-two"]);
    let bob = s.snapshot(&key("alice@x", "bob@y", 7)).unwrap().unwrap();
    assert_eq!(bob.data.as_slice(), b"a2");
    assert!(s.held_messages("alice@x", "bob@y").unwrap().is_empty());
    assert!(s.snapshot(&key("alice@x", "carol@y", 7)).unwrap().is_none());
    // The single-step call is a group of one; an empty group is a no-op.
    let one = s
        .commit_step("alice@x", "bob@y", &[inbox("a-three")], 31)
        .unwrap();
    assert!(one.inbox_ids[0] > inbox_ids[2], "ids never reused");
    assert!(s.commit_steps("alice@x", &[], 32).unwrap().is_empty());
    assert_eq!(s.all_inbox().unwrap().len(), 4);
}

/// Instantiates the whole suite for a store constructor.
macro_rules! suite_for {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::super::*;

            fn run(f: fn(&mut dyn Store)) {
                #[allow(clippy::redundant_closure_call)]
                let (mut store, _guard) = ($make)();
                f(&mut store);
            }

            #[test]
            fn account_keys() {
                run(super::account_keys)
            }
            #[test]
            fn instance_tags() {
                run(super::instance_tags)
            }
            #[test]
            fn fingerprints() {
                run(super::fingerprints)
            }
            #[test]
            fn snapshots() {
                run(super::snapshots)
            }
            #[test]
            fn snapshot_debug_hides_data() {
                run(super::snapshot_debug_hides_data)
            }
            #[test]
            fn expiry() {
                run(super::expiry)
            }
            #[test]
            fn held_messages() {
                run(super::held_messages)
            }
            #[test]
            fn accounts_are_implicit() {
                run(super::accounts_are_implicit)
            }
            #[test]
            fn group_commit() {
                run(super::group_commit)
            }
        }
    };
}

suite_for!(memory, || (MemoryStore::new(), ()));
suite_for!(sqlite, || {
    let dir = tempfile::tempdir().unwrap();
    (SqliteStore::open(dir.path()).unwrap(), dir)
});
