//! The Rust OTR core against itself, in memory: AKE, ratchet, replays,
//! tampering, fragmentation, ending, and O2TR suspension/resumption at every
//! point of a conversation.

mod common;

use common::pair::{ALICE_TAG, BOB_TAG, Pair, keys};
use o2tr_proxy::otr::conversation::{Action, Notice};
use o2tr_proxy::otr::keys::retired::RETIRED_SECS;

fn is_reveal(body: &str) -> bool {
    // v3 Reveal Signature: version 0x0003, type 0x11 → base64 "AAMR".
    body.starts_with("?OTR:AAMR")
}

/// No message was reported unreadable to `side`'s user.
fn assert_nothing_unreadable(side: &common::pair::Side) {
    assert!(
        !side
            .notices
            .iter()
            .any(|n| matches!(n, Notice::Unreadable { .. })),
        "{:?}",
        side.notices
    );
}

fn is_commit(body: &str) -> bool {
    // v3 D-H Commit: version 0x0003, type 0x02 → base64 "AAMC".
    body.starts_with("?OTR:AAMC")
}

#[test]
fn ake_then_alternating_messages() {
    let mut p = Pair::new();
    p.establish();
    assert_eq!(
        p.alice.conv.peer_fingerprint(),
        Some(keys().1.public_key().fingerprint())
    );
    for i in 0..30 {
        p.alice.send(&format!("a{i}"), p.now);
        p.run();
        p.bob.send(&format!("b{i}"), p.now);
        p.run();
    }
    let a: Vec<String> = (0..30).map(|i| format!("b{i}")).collect();
    let b: Vec<String> = (0..30).map(|i| format!("a{i}")).collect();
    assert_eq!(p.alice.texts(), a);
    assert_eq!(p.bob.texts(), b);
}

#[test]
fn burst_then_reply() {
    let mut p = Pair::new();
    p.establish();
    for i in 0..50 {
        p.alice.send(&format!("burst {i}"), p.now);
    }
    p.run();
    assert_eq!(p.bob.texts().len(), 50);
    p.bob.send("got them", p.now);
    p.run();
    assert_eq!(p.alice.texts(), vec!["got them".to_string()]);
}

#[test]
fn replayed_data_message_is_rejected() {
    let mut p = Pair::new();
    p.establish();
    p.alice.send("once", p.now);
    let m = p.alice.outbox.front().cloned().unwrap();
    p.run();
    p.bob.receive(&m, p.now);
    assert_eq!(p.bob.texts(), vec!["once".to_string()]);
    assert!(
        p.bob
            .notices
            .iter()
            .any(|n| matches!(n, Notice::Unreadable { .. }))
    );
}

#[test]
fn tampered_ciphertext_is_rejected() {
    let mut p = Pair::new();
    p.establish();
    p.alice.send("secret", p.now);
    let m = p.alice.outbox.pop_front().unwrap();
    // Flip a base64 character inside the body.
    let mut bytes = m.into_bytes();
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let m = String::from_utf8(bytes).unwrap();
    p.bob.receive(&m, p.now);
    assert!(p.bob.texts().is_empty());
    assert!(
        p.bob
            .notices
            .iter()
            .any(|n| matches!(n, Notice::Unreadable { .. } | Notice::Malformed(_)))
    );
}

/// Alice's (`alice`) or Bob's conversation, fragmenting at `max_bytes`.
fn fragmenting(alice: bool, max_bytes: usize) -> o2tr_proxy::otr::conversation::Conversation {
    let (name, tag, key) = if alice {
        ("alice@example.test", ALICE_TAG, &keys().0)
    } else {
        ("bob@example.test", BOB_TAG, &keys().1)
    };
    let mut cfg = o2tr_proxy::otr::conversation::Config::new(name, tag);
    cfg.max_message_bytes = max_bytes;
    o2tr_proxy::otr::conversation::Conversation::new(cfg, key.clone())
}

#[test]
fn fragmented_conversation() {
    let mut p = Pair::new();
    p.alice.conv = fragmenting(true, 150);
    p.establish();
    let long = "x".repeat(2000);
    p.alice.send(&long, p.now);
    assert!(p.alice.outbox.len() > 5);
    assert!(p.alice.outbox.iter().all(|m| m.len() <= 150));
    p.run();
    assert_eq!(p.bob.texts(), vec![long]);
}

#[test]
fn ending_the_conversation_finishes_the_peer() {
    let mut p = Pair::new();
    p.establish();
    let a = p.alice.conv.handle_end(p.now, &mut p.alice.rng);
    p.alice.apply(a);
    p.run();
    assert!(p.bob.notices.contains(&Notice::PeerEnded));
    assert!(!p.bob.conv.is_private());
    // Bob's next message is held, not sent in plaintext.
    p.bob.send("are you there?", p.now);
    assert!(p.bob.outbox.is_empty());
    assert!(p.bob.snapshots.is_empty());
    assert!(p.alice.snapshots.is_empty());
}

#[test]
fn always_policy_holds_until_private() {
    let mut p = Pair::new();
    p.alice.send("hello before otr", p.now);
    // Only a query went out, no plaintext.
    assert_eq!(p.alice.outbox.len(), 1);
    assert!(p.alice.outbox[0].starts_with("?OTRv"));
    p.run();
    assert!(p.alice.conv.is_private());
    assert_eq!(p.bob.texts(), vec!["hello before otr".to_string()]);
    assert!(p.alice.held.is_empty());
}

/// The peer's connection dies in the middle of the AKE (its half of the
/// exchange is gone, our D-H Key goes unanswered): the side holding
/// messages starts the handshake over after `ake_retry_secs`, backing off,
/// and the held message goes out once. Without the retry it waits forever.
#[test]
fn stalled_ake_is_started_over_while_messages_are_held() {
    let mut p = Pair::new();
    let t0 = p.now;
    p.alice.send("held until private", t0);
    let query = p.alice.outbox.pop_front().expect("query");
    assert!(query.starts_with("?OTRv"));
    p.bob.receive(&query, t0);
    let commit = p.bob.outbox.pop_front().expect("D-H Commit");
    p.alice.receive(&commit, t0);
    assert_eq!(p.alice.outbox.len(), 1, "alice answered with her D-H Key");
    // Bob's connection drops: his AKE state is abandoned, and the D-H Key
    // reaches him only afterwards.
    p.bob.conv.suspend();
    let dh_key = p.alice.outbox.pop_front().unwrap();
    p.bob.receive(&dh_key, t0 + 1);
    assert!(p.bob.outbox.is_empty(), "bob has nothing to answer with");
    // Nothing for the first 10 s, then a new query.
    for t in 1..10 {
        p.alice.tick(t0 + t);
    }
    assert!(p.alice.outbox.is_empty(), "no retry before ake_retry_secs");
    p.alice.tick(t0 + 10);
    assert_eq!(p.alice.outbox.len(), 1);
    assert!(p.alice.outbox[0].starts_with("?OTRv"), "a new query");
    // The next retry waits twice as long.
    p.alice.outbox.clear();
    p.alice.tick(t0 + 29);
    assert!(p.alice.outbox.is_empty());
    p.alice.tick(t0 + 30);
    assert_eq!(p.alice.outbox.len(), 1);
    p.now = t0 + 30;
    p.run();
    assert!(p.alice.conv.is_private() && p.bob.conv.is_private());
    assert_eq!(p.bob.texts(), vec!["held until private".to_string()]);
    assert!(p.alice.held.is_empty());
    // Private with nothing held: the tick never queries again.
    p.alice.tick(t0 + 1000);
    assert!(p.alice.outbox.is_empty());
}

/// A message typed while we answer the peer's D-H Commit sends no new
/// query: the peer would start its AKE over and ignore our Signature, and
/// everything we send in the session we just completed would be
/// unreadable to it (chaos campaign, fault during an AKE, TCP cut: the
/// proxy's new connection has a fresh query throttle, and only the master
/// AKE state was checked, not the instance's).
#[test]
fn a_message_typed_during_the_handshake_sends_no_new_query() {
    let mut p = Pair::new();
    let t0 = p.now;
    p.alice.send("first", t0);
    let query = p.alice.outbox.pop_front().expect("query");
    p.bob.receive(&query, t0);
    let commit = p.bob.outbox.pop_front().expect("D-H Commit");
    // The commit reaches Alice late (her link was cut and came back).
    let late = t0 + 11;
    p.alice.receive(&commit, late);
    assert_eq!(p.alice.outbox.len(), 1, "alice answered with her D-H Key");
    p.alice.send("second", late);
    assert!(
        !p.alice.outbox.iter().any(|m| m.starts_with("?OTRv")),
        "a new query during the AKE: {:?}",
        p.alice.outbox
    );
    p.now = late;
    p.run();
    assert!(p.alice.conv.is_private() && p.bob.conv.is_private());
    assert_eq!(p.bob.texts(), ["first", "second"]);
}

/// Our D-H Commit answering the peer's query supersedes an older
/// handshake with that instance: the peer's D-H Key for it must not be
/// ignored by the stale state (chaos campaign, fault during an AKE, proxy
/// SIGKILL: both sides waited for a Reveal Signature until the AKE retry,
/// and every message of the trial was late).
#[test]
fn a_newer_commit_of_ours_supersedes_a_stale_handshake() {
    let mut p = Pair::new();
    let t0 = p.now;
    p.alice.send("from alice", t0);
    let query = p.alice.outbox.pop_front().expect("query");
    p.bob.receive(&query, t0);
    let commit = p.bob.outbox.pop_front().expect("D-H Commit");
    p.alice.receive(&commit, t0);
    // Alice's D-H Key is lost; Bob's AKE state dies with his connection.
    assert!(p.alice.outbox.pop_front().is_some());
    p.bob.conv.suspend();
    // Bob types: his query reaches Alice, who answers with her own commit
    // while her answer to his old commit is still pending.
    p.bob.send("from bob", t0 + 1);
    let query = p.bob.outbox.pop_front().expect("bob's query");
    assert!(query.starts_with("?OTRv"));
    p.alice.receive(&query, t0 + 1);
    let ours = p.alice.outbox.pop_front().expect("alice's D-H Commit");
    p.bob.receive(&ours, t0 + 1);
    let key = p.bob.outbox.pop_front().expect("bob's D-H Key");
    p.alice.receive(&key, t0 + 1);
    assert!(
        p.alice
            .outbox
            .front()
            .is_some_and(|m| m.starts_with("?OTR:AAMR")),
        "alice answers with her Reveal Signature: {:?}",
        p.alice.outbox
    );
    p.now = t0 + 1;
    p.run();
    assert!(p.alice.conv.is_private() && p.bob.conv.is_private());
    assert_eq!(p.bob.texts(), ["from alice"]);
    assert_eq!(p.alice.texts(), ["from bob"]);
}

/// The responder is private once it has the Reveal Signature and sends at
/// once; the server may hand its data over before its Signature (ejabberd
/// re-routing a dead session's stanzas after newer ones; chaos campaign,
/// fault during an AKE with fragments, seed 20261205 trial 17). The
/// initiator keeps such data until the Signature completes its session,
/// then reads it: no OTR error, nothing lost.
#[test]
fn data_that_overtakes_the_signature_is_read_after_it() {
    let mut p = Pair::new();
    let t0 = p.now;
    p.alice.send("overtaking", t0);
    let query = p.alice.outbox.pop_front().expect("query");
    p.bob.receive(&query, t0);
    let commit = p.bob.outbox.pop_front().expect("D-H Commit");
    p.alice.receive(&commit, t0);
    let key = p.alice.outbox.pop_front().expect("D-H Key");
    p.bob.receive(&key, t0);
    let reveal = p.bob.outbox.pop_front().expect("Reveal Signature");
    p.alice.receive(&reveal, t0);
    let sig = p.alice.outbox.pop_front().expect("Signature");
    assert!(sig.starts_with("?OTR:AAMS"), "{sig}");
    let data = p.alice.outbox.pop_front().expect("the held message");
    assert!(data.starts_with("?OTR:AAMD"), "{data}");
    p.bob.receive(&data, t0);
    assert!(p.bob.texts().is_empty());
    assert!(p.bob.outbox.is_empty(), "no OTR error: {:?}", p.bob.outbox);
    p.bob.receive(&sig, t0);
    assert!(p.bob.conv.is_private());
    assert_eq!(p.bob.texts(), ["overtaking"]);
    assert_nothing_unreadable(&p.bob);
}

/// Retries are bounded: an offline peer finds at most MAX_AKE_RETRIES
/// extra queries in its offline storage; a new message from the user
/// starts the count again.
#[test]
fn ake_retries_stop_after_the_limit() {
    use o2tr_proxy::otr::conversation::MAX_AKE_RETRIES;
    let mut p = Pair::new();
    let t0 = p.now;
    p.alice.send("to an offline peer", t0);
    p.alice.outbox.clear();
    let mut queries = 0;
    for t in 1..100_000 {
        p.alice.tick(t0 + t);
        queries += p.alice.outbox.drain(..).count();
    }
    assert_eq!(queries, MAX_AKE_RETRIES as usize);
    p.alice.send("again", t0 + 100_000);
    p.alice.outbox.clear();
    p.alice.tick(t0 + 100_010);
    assert_eq!(
        p.alice.outbox.len(),
        1,
        "the user's new message restarts the count"
    );
}

/// The initiator's client connection drops between its Reveal Signature
/// and the peer's Signature (the peer is already private and sends at
/// once): the router parks the handshake in memory and the next
/// connection's conversation takes it over, so the Signature and the
/// messages after it are read. Without the hand-over they are unreadable.
/// Alice asks for OTR; Bob (the AKE's initiator) answers her D-H Key with
/// his Reveal Signature, which is returned (not yet delivered).
fn bob_sends_reveal_signature(p: &mut Pair, t: u64) -> String {
    p.alice.start(t);
    let query = p.alice.outbox.pop_front().unwrap();
    p.bob.receive(&query, t);
    let commit = p.bob.outbox.pop_front().unwrap();
    p.alice.receive(&commit, t);
    let dh_key = p.alice.outbox.pop_front().unwrap();
    p.bob.receive(&dh_key, t);
    p.bob.outbox.pop_front().unwrap()
}

/// How Bob's side comes back between his Reveal Signature and Alice's
/// Signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Comeback {
    /// The client reconnected: the handshake is handed over in memory.
    HandOver,
    /// The proxy was killed: only the durable handshake record is left.
    Crash,
    /// The record was lost as well (the old behaviour).
    RecordLost,
}

#[test]
fn handshake_survives_a_reconnect_or_crash_between_reveal_signature_and_signature() {
    for comeback in [Comeback::HandOver, Comeback::Crash, Comeback::RecordLost] {
        let mut p = Pair::new();
        let t = p.now;
        let reveal = bob_sends_reveal_signature(&mut p, t);
        assert_eq!(p.bob.handshakes.len(), 1, "{comeback:?}: record written");
        p.alice.receive(&reveal, t);
        assert!(p.alice.conv.is_private());
        let signature = p.alice.outbox.pop_front().unwrap();
        p.alice.send("sent right after the handshake", t);
        let data = p.alice.outbox.pop_front().unwrap();
        let (_, kb) = common::pair::keys();
        let akes = match comeback {
            Comeback::HandOver => {
                // Bob's connection ends; a new one starts from the store.
                let akes = p.bob.conv.take_akes();
                assert!(akes.is_some(), "bob was waiting for the Signature");
                p.bob.conv.suspend();
                akes
            }
            Comeback::Crash => None,
            Comeback::RecordLost => {
                p.bob.handshakes.clear();
                None
            }
        };
        p.bob
            .restart_at("bob@example.test", common::pair::BOB_TAG, kb.clone(), t + 1);
        if let Some(akes) = akes {
            p.bob.conv.restore_akes(akes);
        }
        p.bob.receive(&signature, t + 1);
        p.bob.receive(&data, t + 1);
        if comeback == Comeback::RecordLost {
            assert!(!p.bob.conv.is_private());
            assert!(p.bob.texts().is_empty());
            continue;
        }
        assert!(p.bob.conv.is_private(), "{comeback:?}");
        assert_eq!(
            p.bob.texts(),
            vec!["sent right after the handshake".to_string()],
            "{comeback:?}"
        );
        assert!(
            p.bob.handshakes.is_empty(),
            "{comeback:?}: the record is wiped with the Signature"
        );
        // And the session goes on both ways with no new AKE.
        p.bob.send("answer", t + 2);
        p.run();
        assert_eq!(p.alice.texts(), vec!["answer".to_string()]);
        assert!(
            !p.alice.sent_log.iter().any(|m| is_commit(m)),
            "{comeback:?}"
        );
    }
}

/// The handshake record is written before the Reveal Signature leaves
/// (persist before release), once, and wiped when the handshake is
/// started over.
#[test]
fn handshake_record_precedes_the_reveal_signature_and_goes_when_the_handshake_starts_over() {
    let mut p = Pair::new();
    let t = p.now;
    // Bob writes first: his query makes Alice the initiator; Alice writes
    // too while the handshake runs.
    p.bob.send("from bob", t);
    let query = p.bob.outbox.pop_front().unwrap();
    p.alice.receive(&query, t);
    let commit = p.alice.outbox.pop_front().unwrap();
    p.alice.send("from alice", t);
    assert!(p.alice.outbox.is_empty(), "held, no new query");
    let acts = p.bob.conv.handle_incoming(&commit, t, &mut p.bob.rng);
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::PersistHandshake(_))),
        "the responder keeps no record"
    );
    p.bob.apply(acts);
    let dh_key = p.bob.outbox.pop_front().unwrap();
    let acts = p.alice.conv.handle_incoming(&dh_key, t, &mut p.alice.rng);
    let persist = acts
        .iter()
        .position(|a| matches!(a, Action::PersistHandshake(_)))
        .expect("record persisted");
    let send = acts
        .iter()
        .position(|a| matches!(a, Action::Send(s) if is_reveal(s)))
        .expect("Reveal Signature sent");
    assert!(persist < send, "record at {persist}, send at {send}");
    p.alice.apply(acts);
    assert_eq!(p.alice.handshakes.len(), 1);
    p.alice.outbox.clear(); // the Reveal Signature is lost
    // The D-H Key again: the Reveal Signature is re-sent, the record stays.
    let acts = p.alice.conv.handle_incoming(&dh_key, t, &mut p.alice.rng);
    assert!(!acts.iter().any(|a| matches!(
        a,
        Action::PersistHandshake(_) | Action::ForgetHandshake { .. }
    )));
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Send(s) if is_reveal(s)))
    );
    p.alice.apply(acts);
    p.alice.outbox.clear(); // lost again
    // No Signature comes: the stalled handshake is started over, and its
    // record wiped.
    p.alice.tick(t + 9);
    assert_eq!(p.alice.handshakes.len(), 1, "not yet");
    p.alice.tick(t + 11);
    assert!(p.alice.handshakes.is_empty(), "record wiped with the state");
    assert!(
        p.alice
            .outbox
            .iter()
            .any(|m| m.starts_with("?OTR?v") || m.starts_with("?OTRv"))
    );
    p.run();
    assert!(p.alice.conv.is_private() && p.bob.conv.is_private());
    assert_eq!(p.alice.texts(), vec!["from bob".to_string()]);
    assert_eq!(p.bob.texts(), vec!["from alice".to_string()]);
}

#[test]
fn simultaneous_start_resolves_commit_collision() {
    let mut p = Pair::new();
    p.alice.start(p.now);
    p.bob.start(p.now);
    p.run();
    assert!(p.alice.conv.is_private());
    assert!(p.bob.conv.is_private());
    p.alice.send("after collision", p.now);
    p.run();
    assert_eq!(p.bob.texts(), vec!["after collision".to_string()]);
}

/// O2TR: Bob's side crashes at every point of a conversation; Alice keeps
/// writing; Bob restarts from his durable snapshots and reads everything,
/// with no new AKE.
#[test]
fn bob_restarts_at_every_point_and_recovers_everything() {
    let script: Vec<(bool, &str)> = vec![
        (true, "a1"),
        (false, "b1"),
        (true, "a2"),
        (true, "a3"),
        (false, "b2"),
        (false, "b3"),
        (true, "a4"),
        (false, "b4"),
    ];
    for crash_at in 0..=script.len() {
        let mut p = Pair::new();
        p.establish();
        let commits_before = p.alice.sent_log.iter().filter(|m| is_commit(m)).count()
            + p.bob.sent_log.iter().filter(|m| is_commit(m)).count();
        for (i, (from_alice, text)) in script.iter().enumerate() {
            if i == crash_at {
                p.bob.restart("bob@example.test", BOB_TAG, keys().1.clone());
            }
            if *from_alice {
                p.alice.send(text, p.now);
            } else {
                p.bob.send(text, p.now);
            }
            p.run();
        }
        // Offline run: Bob gone, Alice sends 10.
        p.bob.restart("bob@example.test", BOB_TAG, keys().1.clone());
        let mut offline = Vec::new();
        for i in 0..10 {
            p.alice.send(&format!("offline {i}"), p.now);
            offline.extend(p.alice.outbox.drain(..));
        }
        p.bob.restart("bob@example.test", BOB_TAG, keys().1.clone());
        for m in &offline {
            p.bob.receive(m, p.now);
        }
        p.run();
        let got = p.bob.texts();
        let expect_tail: Vec<String> = (0..10).map(|i| format!("offline {i}")).collect();
        assert_eq!(
            got[got.len() - 10..].to_vec(),
            expect_tail,
            "crash at {crash_at}"
        );
        p.bob.send("back", p.now);
        p.run();
        assert_eq!(p.alice.texts().last().map(String::as_str), Some("back"));
        let commits_after = p.alice.sent_log.iter().filter(|m| is_commit(m)).count()
            + p.bob.sent_log.iter().filter(|m| is_commit(m)).count();
        assert_eq!(
            commits_after, commits_before,
            "no new AKE (crash at {crash_at})"
        );
        assert!(
            p.bob
                .notices
                .iter()
                .any(|n| matches!(n, Notice::Resumed { .. }))
        );
    }
}

/// A restart in the middle of a fragmented message loses only that message's
/// partial fragments; the sender's next message is read normally.
#[test]
fn restart_between_fragments() {
    let mut p = Pair::new();
    p.bob.conv = fragmenting(false, 120);
    p.establish();
    p.bob.send(&"long ".repeat(100), p.now);
    let frags: Vec<String> = p.bob.outbox.drain(..).collect();
    assert!(frags.len() > 3);
    for f in &frags[..2] {
        p.alice.receive(f, p.now);
    }
    p.alice
        .restart("alice@example.test", ALICE_TAG, keys().0.clone());
    for f in &frags {
        p.alice.receive(f, p.now);
    }
    assert_eq!(p.alice.texts(), vec!["long ".repeat(100)]);
}

/// Outward resumption: after a restart, the user writes first and the
/// suspended session continues without an AKE.
#[test]
fn outward_resumption_without_ake() {
    let mut p = Pair::new();
    p.establish();
    p.alice.send("hi", p.now);
    p.run();
    p.alice
        .restart("alice@example.test", ALICE_TAG, keys().0.clone());
    p.alice.send("I'm back", p.now);
    assert!(
        !p.alice
            .outbox
            .iter()
            .any(|m| is_commit(m) || m.starts_with("?OTRv"))
    );
    p.run();
    assert_eq!(
        p.bob.texts(),
        vec!["hi".to_string(), "I'm back".to_string()]
    );
}

/// Bound k: beyond k unanswered messages, further messages are held.
#[test]
fn unanswered_bound_holds_messages() {
    let mut p = Pair::new();
    let mut cfg = o2tr_proxy::otr::conversation::Config::new("alice@example.test", ALICE_TAG);
    cfg.max_unanswered = 5;
    p.alice.conv = o2tr_proxy::otr::conversation::Conversation::new(cfg, keys().0.clone());
    p.establish();
    for i in 0..8 {
        p.alice.send(&format!("m{i}"), p.now);
    }
    assert!(
        p.alice
            .notices
            .iter()
            .any(|n| matches!(n, Notice::UnansweredLimit { limit: 5 }))
    );
    assert_eq!(p.alice.held.len(), 3);
}

/// Counter gaps (a message the server dropped or still holds back) are
/// reported with their size; ordinary traffic both ways, bursts included,
/// never reports one; a late message is read once (the replay window), a
/// second copy of it is refused as a replay.
#[test]
fn missing_and_reordered_messages_are_reported() {
    let mut p = Pair::new();
    p.establish();
    for round in 0..5 {
        for i in 0..round + 1 {
            p.alice.send(&format!("a {round} {i}"), p.now);
        }
        p.run();
        for i in 0..round {
            p.bob.send(&format!("b {round} {i}"), p.now);
        }
        p.run();
    }
    let missing = |s: &common::pair::Side| {
        s.notices
            .iter()
            .filter_map(|n| match n {
                Notice::Missing { count } => Some(*count),
                _ => None,
            })
            .collect::<Vec<u64>>()
    };
    assert!(missing(&p.alice).is_empty(), "{:?}", p.alice.notices);
    assert!(missing(&p.bob).is_empty(), "{:?}", p.bob.notices);

    let before = p.bob.texts().len();
    for t in ["m1", "m2", "m3", "m4"] {
        p.alice.send(t, p.now);
    }
    let m: Vec<String> = p.alice.outbox.drain(..).collect();
    // m1 and m2 withheld, m4 before m3, then m1 late; then m3 again. The
    // core hands them over as they come (the router restores the order).
    p.bob.receive(&m[3], p.now);
    p.bob.receive(&m[2], p.now);
    p.bob.receive(&m[0], p.now);
    p.bob.receive(&m[2], p.now);
    assert_eq!(p.bob.texts()[before..], ["m4", "m3", "m1"]);
    assert_eq!(missing(&p.bob), vec![3]);
    let late: Vec<bool> = p
        .bob
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Unreadable { replayed, .. } => Some(*replayed),
            _ => None,
        })
        .collect();
    assert_eq!(late, vec![true], "the copy refused as a replay");
    // No OTR error went back for it (it would force a new AKE).
    assert!(!p.bob.outbox.iter().any(|b| b.starts_with("?OTR Error")));
}

/// The responder's new session is durable before its Signature message
/// leaves: the initiator goes private on that message and may send data at
/// once, so a crash right after sending it must not lose the session (found
/// by the chaos campaign: a proxy SIGKILLed during an AKE).
#[test]
fn responder_crash_right_after_signature_keeps_the_session() {
    let mut p = Pair::new();
    // Bob's query makes alice the initiator and bob the responder.
    p.bob.start(p.now);
    let mut signature = Vec::new();
    for _ in 0..100 {
        if let Some(m) = p.alice.outbox.pop_front() {
            let a = p.bob.conv.handle_incoming(&m, p.now, &mut p.bob.rng);
            let sig = a
                .iter()
                .position(|x| matches!(x, Action::Send(s) if s.starts_with("?OTR:AAMS")));
            let persist = a.iter().position(|x| matches!(x, Action::Persist(_)));
            p.bob.apply(a);
            if let Some(sig) = sig {
                assert!(
                    persist.is_some_and(|q| q < sig),
                    "Persist {persist:?} must precede the Signature at {sig}"
                );
                signature = p.bob.outbox.drain(..).collect();
                break;
            }
        } else if let Some(m) = p.bob.outbox.pop_front() {
            p.alice.receive(&m, p.now);
        } else {
            break;
        }
    }
    assert!(!signature.is_empty(), "bob sent a Signature message");
    // Bob's process dies right after sending it.
    let kb = keys().1.clone();
    p.bob.restart("bob@example.test", BOB_TAG, kb);
    for m in signature {
        p.alice.receive(&m, p.now);
    }
    assert!(p.alice.conv.is_private());
    p.alice.send("right after the AKE", p.now);
    p.run();
    assert_eq!(p.bob.texts(), vec!["right after the AKE".to_string()]);
}

/// A stored copy of a message from before the last key rotations (ejabberd
/// SIGKILLed after it had handed out a spooled offline message: the
/// deletion was lost and the copy came again after the restart, with its
/// old delay stamp; found by the chaos campaign) names keys neither side
/// holds any more. It is refused as a copy, without the OTR error that
/// makes the peer start a new AKE, live or after a restart from the
/// snapshot. Without a stamp older than the session's last receipt the
/// same keyids could be a newer session's whose AKE this side lost in a
/// crash: that one still gets the error, so that the peer starts over.
#[test]
fn a_stored_copy_from_before_the_last_key_rotations_does_not_start_an_ake() {
    for (restart, stamp, copy) in [
        (false, Some(-10), true),
        (true, Some(-10), true),
        (true, Some(0), false),
        (false, None, false),
    ] {
        let case = format!("restart {restart}, stamp {stamp:?}");
        let mut p = Pair::new();
        p.establish();
        p.alice.send("first", p.now);
        let old = p.alice.outbox.front().cloned().unwrap();
        p.run();
        p.now += 60;
        for i in 0..4 {
            p.bob.send(&format!("b{i}"), p.now);
            p.run();
            p.alice.send(&format!("a{i}"), p.now);
            p.run();
        }
        if restart {
            p.bob.conv.suspend();
            let kb = keys().1.clone();
            p.bob.restart("bob@example.test", BOB_TAG, kb);
        }
        let texts = p.bob.texts().len();
        let sent = (p.alice.sent_log.len(), p.bob.sent_log.len());
        p.bob.notices.clear();
        let stamp = stamp.map(|d: i64| p.now.saturating_add_signed(d));
        let a = p
            .bob
            .conv
            .handle_incoming_delayed(&old, stamp, p.now, &mut p.bob.rng);
        p.bob.apply(a);
        assert_eq!(p.bob.texts().len(), texts, "{case}: the copy is not shown");
        assert!(
            matches!(
                p.bob.notices.as_slice(),
                [Notice::Unreadable { replayed, .. }] if *replayed == copy
            ),
            "{case}: {:?}",
            p.bob.notices
        );
        let error = p.bob.outbox.iter().any(|b| b.starts_with("?OTR Error"));
        assert_eq!(error, !copy, "{case}: an OTR error only if not a copy");
        if copy {
            // The conversation goes on under the same keys.
            p.run();
            p.alice.send("after the copy", p.now);
            p.bob.send("reply", p.now);
            p.run();
            assert!(!p.alice.sent_log[sent.0..].iter().any(|b| is_commit(b)));
            assert!(!p.bob.sent_log[sent.1..].iter().any(|b| is_commit(b)));
            assert_eq!(
                p.bob.texts().last().map(String::as_str),
                Some("after the copy")
            );
            assert_eq!(p.alice.texts().last().map(String::as_str), Some("reply"));
        }
    }
}

/// Bob's two messages of the same length, fragmented for Alice (same
/// shape; under the same keys their first pieces are identical).
fn two_fragmented(max_bytes: usize) -> (Pair, [String; 2], [Vec<String>; 2]) {
    let mut p = Pair::new();
    p.bob.conv = fragmenting(false, max_bytes);
    p.establish();
    p.alice.notices.clear();
    let texts = [
        "the first long message ".repeat(30),
        "the other long message ".repeat(30),
    ];
    let mut frags = [Vec::new(), Vec::new()];
    for (t, f) in texts.iter().zip(frags.iter_mut()) {
        p.bob.send(t, p.now);
        f.extend(p.bob.outbox.drain(..));
    }
    assert!(frags[0].len() >= 4 && frags[0].len() == frags[1].len());
    (p, texts, frags)
}

/// After a fault the server interleaves the fragment runs of two messages
/// of the same shape (chaos "fault between fragments"; OTR v3 fragments
/// carry no message id). Alice puts each together from its own pieces
/// (guesses are checked by their MAC, silently), delivers both once, with
/// no notice and no OTR error, whatever the interleaving.
#[test]
fn interleaved_fragment_runs_are_each_delivered_once() {
    for max_bytes in [120, 300] {
        let n = two_fragmented(max_bytes).2[0].len();
        // (message, fragment index) sequences in which the first message
        // completes first.
        let alternate: Vec<(usize, usize)> = (0..n).flat_map(|i| [(0, i), (1, i)]).collect();
        let tail_late: Vec<(usize, usize)> = (0..n - 1)
            .map(|i| (0, i))
            .chain((0..n - 1).map(|i| (1, i)))
            .chain([(0, n - 1), (1, n - 1)])
            .collect();
        let lasts_first: Vec<(usize, usize)> = [(1, n - 1), (0, n - 1)]
            .into_iter()
            .chain((0..n - 1).flat_map(|i| [(0, i), (1, i)]))
            .collect();
        let mut repeats = alternate.clone();
        repeats.insert(3, (0, 1));
        repeats.insert(6, (0, 0));
        repeats.insert(8, (0, 2));
        for (name, order) in [
            ("alternate", &alternate),
            ("tail late", &tail_late),
            ("lasts first", &lasts_first),
            ("repeats", &repeats),
        ] {
            let (mut p, texts, frags) = two_fragmented(max_bytes);
            for &(m, i) in order {
                p.alice.receive(&frags[m][i], p.now);
            }
            let ctx = format!("{max_bytes} bytes, {name}: {order:?}");
            assert_eq!(p.alice.texts(), texts, "{ctx}");
            assert!(p.alice.notices.is_empty(), "{ctx}: {:?}", p.alice.notices);
            assert!(p.alice.outbox.is_empty(), "{ctx}: {:?}", p.alice.outbox);
            // Left: only the copies of pieces delivered twice (a repeat
            // cannot be told from another message's identical piece).
            assert_eq!(
                p.alice.conv.partial_fragments().len(),
                order.len() - 2 * n,
                "{ctx}"
            );
        }
        // The second message completing first: it is delivered (the first
        // one reported missing); the first one, older, is delivered too or
        // (without a replay window in the ratchet) reported as late, never
        // shown twice or answered.
        let (mut p, texts, frags) = two_fragmented(max_bytes);
        for (b, a) in frags[1].iter().zip(&frags[0]) {
            p.alice.receive(b, p.now);
            p.alice.receive(a, p.now);
        }
        let shown = p.alice.texts();
        assert!(
            shown.iter().filter(|t| **t == texts[1]).count() == 1,
            "{shown:?}"
        );
        assert!(
            shown.iter().filter(|t| **t == texts[0]).count() <= 1,
            "{shown:?}"
        );
        assert!(
            p.alice.notices.iter().all(|n| matches!(
                n,
                Notice::Unreadable { replayed: true, .. } | Notice::Missing { count: 1 }
            )),
            "{:?}",
            p.alice.notices
        );
        assert!(p.alice.outbox.is_empty(), "{:?}", p.alice.outbox);
    }
}

/// Interleaved runs survive a crash in the middle: the held pieces are
/// stored ([`Conversation::partial_fragments`]) and restored, and both
/// messages are delivered once.
#[test]
fn interleaved_fragment_runs_survive_a_restart() {
    let (mut p, texts, frags) = two_fragmented(120);
    let n = frags[0].len();
    let order: Vec<(usize, usize)> = (0..n).flat_map(|i| [(0, i), (1, i)]).collect();
    let (before, after) = order.split_at(n - 1);
    for &(m, i) in before {
        p.alice.receive(&frags[m][i], p.now);
    }
    let stored = p.alice.conv.partial_fragments();
    assert!(!stored.is_empty());
    p.alice
        .restart("alice@example.test", ALICE_TAG, keys().0.clone());
    assert_eq!(p.alice.conv.restore_fragments(&stored), stored.len());
    for &(m, i) in after {
        p.alice.receive(&frags[m][i], p.now);
    }
    assert_eq!(p.alice.texts(), texts);
    assert!(
        p.alice
            .notices
            .iter()
            .all(|n| matches!(n, Notice::Resumed { .. })),
        "{:?}",
        p.alice.notices
    );
    assert!(p.alice.conv.partial_fragments().is_empty());
}

/// What versions before the candidate reassembly stored for a partial
/// message, one cumulative fragment (k = pieces received in sequence, their
/// pieces concatenated), still restores.
#[test]
fn a_partial_message_stored_by_an_earlier_version_restores() {
    let (mut p, texts, frags) = two_fragmented(120);
    let first: Vec<_> = frags[0][..3]
        .iter()
        .map(|t| o2tr_proxy::otr::fragment::parse_fragment(t).unwrap())
        .collect();
    let cumulative = o2tr_proxy::otr::fragment::Fragment {
        k: 3,
        piece: first.iter().map(|f| f.piece.as_str()).collect(),
        ..first[0].clone()
    };
    assert_eq!(
        p.alice.conv.restore_fragments(&[cumulative.to_text()]),
        3,
        "split into its three pieces"
    );
    assert_eq!(p.alice.conv.partial_fragments().len(), 3);
    for f in &frags[0][3..] {
        p.alice.receive(f, p.now);
    }
    assert_eq!(p.alice.texts(), texts[..1]);
    assert!(p.alice.notices.is_empty(), "{:?}", p.alice.notices);
}

/// One message's head and another's tail, received in order (after a
/// crash: a stored partial message, then a re-routed tail; chaos seed
/// 20261191 trial 18), make a run that fails its MAC: not answered with an
/// OTR error (libotr would start a new AKE), one notice, and both messages
/// are delivered once their own pieces come. (300-byte fragments: with
/// smaller ones the first pieces of both are identical.)
#[test]
fn a_head_and_another_messages_tail_are_not_answered_with_an_otr_error() {
    let (mut p, texts, frags) = two_fragmented(300);
    let n = frags[0].len();
    for f in frags[0][..2].iter().chain(&frags[1][2..]) {
        p.alice.receive(f, p.now);
    }
    assert!(p.alice.texts().is_empty());
    assert!(p.alice.outbox.is_empty(), "answered: {:?}", p.alice.outbox);
    assert!(
        matches!(
            p.alice.notices.as_slice(),
            [Notice::Unreadable {
                replayed: false,
                ..
            }]
        ),
        "{:?}",
        p.alice.notices
    );
    p.alice.notices.clear();
    for f in [&frags[1][0]]
        .into_iter()
        .chain(&frags[0][2..n])
        .chain([&frags[1][1]])
    {
        p.alice.receive(f, p.now);
    }
    assert_eq!(p.alice.texts(), texts);
    assert!(p.alice.notices.is_empty(), "{:?}", p.alice.notices);
    assert!(p.alice.outbox.is_empty(), "answered: {:?}", p.alice.outbox);
    assert!(p.alice.conv.partial_fragments().is_empty());
}

/// A handshake record that is damaged, truncated, padded or written for
/// another instance tag of ours is refused with an error (the store then
/// wipes it); an intact one restores.
#[test]
fn damaged_handshake_records_are_refused() {
    use o2tr_proxy::otr::conversation::{Config, Conversation};
    let mut p = Pair::new();
    let t = p.now;
    bob_sends_reveal_signature(&mut p, t);
    let record = p.bob.handshakes.get(&ALICE_TAG).expect("record").clone();
    let fresh = |tag| Conversation::new(Config::new("bob@example.test", tag), keys().1.clone());
    assert_eq!(
        fresh(BOB_TAG).restore_handshake(&record, t, 60).unwrap(),
        ALICE_TAG
    );
    assert!(
        fresh(BOB_TAG)
            .restore_handshake(&record, t + 61, 60)
            .is_err(),
        "expired"
    );
    assert!(
        fresh(0x3333_3333)
            .restore_handshake(&record, t, 60)
            .is_err(),
        "other tag"
    );
    let mut bad = vec![record[..record.len() - 1].to_vec()];
    bad.push([record.as_slice(), &[0]].concat());
    bad.push(Vec::new());
    let mut magic = record.clone();
    magic[0] ^= 1;
    bad.push(magic);
    let mut format = record.clone();
    format[8] = 2;
    bad.push(format);
    for b in &bad {
        assert!(fresh(BOB_TAG).restore_handshake(b, t, 60).is_err());
    }
}

/// An established pair whose Alice fragments at 300 bytes and has sent
/// `chaos-0123456789ab TAG i` for i in 1..=n (two pieces each, not yet
/// received).
fn alice_sends_in_two_pieces(tag: &str, n: usize) -> (Pair, Vec<Vec<String>>) {
    let mut p = Pair::new();
    p.alice.conv = fragmenting(true, 300);
    p.establish();
    let t = p.now;
    let mut pieces = Vec::new();
    for i in 1..=n {
        p.alice.send(&format!("chaos-0123456789ab {tag} {i}"), t);
        let m: Vec<String> = p.alice.outbox.drain(..).collect();
        assert_eq!(m.len(), 2, "two fragments each");
        pieces.push(m);
    }
    (p, pieces)
}

/// Chaos seed 20261230 trial 64 (upstream TCP cut, fragments of 300):
/// after the reconnection the server hands over again the tail of a
/// message already read (its head is not re-sent), then copies of two
/// more read messages, then the new ones. Every new one is read once.
#[test]
fn a_stale_tail_and_copies_before_new_fragmented_messages() {
    let (mut p, pieces) = alice_sends_in_two_pieces("t64", 7);
    let t = p.now;
    // Read live: 1, 2, 3.
    for m in &pieces[..3] {
        for f in m {
            p.bob.receive(f, t);
        }
    }
    // After the reconnection: the tail of 1, copies of 2 and 3, then 4–7.
    let mut replay = vec![pieces[0][1].clone()];
    for m in &pieces[1..] {
        replay.extend(m.iter().cloned());
    }
    for f in &replay {
        p.bob.receive(f, t + 6);
    }
    let want: Vec<String> = (1..=7)
        .map(|i| format!("chaos-0123456789ab t64 {i}"))
        .collect();
    assert_eq!(p.bob.texts(), want, "notices: {:?}", p.bob.notices);
    // The copies of 2 and 3 (each one run in order) are reported as such;
    // the stale tail of 1 with the next heads is no news.
    let notices: Vec<&Notice> = p.bob.notices.iter().skip(1).collect();
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert!(
        notices
            .iter()
            .all(|n| matches!(n, Notice::Unreadable { replayed: true, .. })),
        "{notices:?}"
    );
}

/// Chaos seed 20261300, job 0, trial 49 (proxy SIGKILL): the dead
/// session's re-routed stanzas came to the restarted proxy as P1 P1 P2(3)
/// P2(2) P1 P2(4) — three two-piece messages under the same keys, whose
/// first pieces are identical. The second copy of the first piece belongs
/// to message 2; dropping it as a repeat when message 3 was read lost
/// message 4 (its first piece went to message 2).
#[test]
fn identical_first_pieces_of_messages_interleaved_are_all_used() {
    let (mut p, pieces) = alice_sends_in_two_pieces("t49", 4);
    let t = p.now;
    assert_eq!(pieces[1][0], pieces[2][0], "identical first pieces");
    for f in &pieces[0] {
        p.bob.receive(f, t);
    }
    let order = [(2, 0), (1, 0), (2, 1), (1, 1), (3, 0), (3, 1)];
    for (m, k) in order {
        p.bob.receive(&pieces[m][k], t + 1);
    }
    let mut got = p.bob.texts();
    got.sort();
    let want: Vec<String> = (1..=4)
        .map(|i| format!("chaos-0123456789ab t49 {i}"))
        .collect();
    assert_eq!(got, want, "notices: {:?}", p.bob.notices);
}

/// A stale last piece (the server handing over again the tail of a message
/// read already) right after the next message's first piece is one run in
/// order: an authentic copy. It is reported as a replay, and the first
/// piece — identical under the same keys — stays for the next message's
/// own last piece.
#[test]
fn a_stale_tail_after_the_next_first_piece_leaves_that_piece() {
    let (mut p, pieces) = alice_sends_in_two_pieces("tail", 2);
    let t = p.now;
    for f in &pieces[0] {
        p.bob.receive(f, t);
    }
    p.bob.notices.clear();
    for f in [&pieces[1][0], &pieces[0][1], &pieces[1][1]] {
        p.bob.receive(f, t + 1);
    }
    let want: Vec<String> = (1..=2)
        .map(|i| format!("chaos-0123456789ab tail {i}"))
        .collect();
    assert_eq!(p.bob.texts(), want, "notices: {:?}", p.bob.notices);
    assert!(
        matches!(
            p.bob.notices[..],
            [Notice::Unreadable { replayed: true, .. }]
        ),
        "{:?}",
        p.bob.notices
    );
    assert!(p.bob.conv.partial_fragments().is_empty());
}

/// Chaos seed 20261331, trial 164: a first piece left over from an older
/// key generation (its message read long ago), then a new message's last
/// piece arriving before its own first piece. The two are in order but
/// not one run: their failure (keys forgotten since) is a wrong guess, not
/// the sender's unreadable message — no OTR error, which would make the
/// peer start a new AKE; the new message is read when its first piece
/// comes. Chaos seed 20261362, trial 248: the same across a reconnection,
/// which restores the conversation and the held piece from the store —
/// the restored piece and the first one to arrive are not one run either.
#[test]
fn a_left_over_first_piece_does_not_make_a_run_with_a_new_last_piece() {
    for restart in [false, true] {
        let (mut p, pieces) = alice_sends_in_two_pieces("old", 1);
        let t = p.now;
        // Bob reads message 1 with its first piece delivered twice: one
        // copy is left over.
        for f in [&pieces[0][0], &pieces[0][0], &pieces[0][1]] {
            p.bob.receive(f, t);
        }
        assert_eq!(p.bob.conv.partial_fragments().len(), 1);
        // Two rounds of replies, and time: Bob forgets the keys of
        // message 1 (retired, then expired).
        for round in 0..2 {
            p.bob.send(&format!("reply {round}"), t);
            p.run();
            p.alice.send(&format!("answer {round}"), t);
            p.run();
        }
        let t = t + RETIRED_SECS;
        if restart {
            let held = p.bob.conv.partial_fragments();
            p.bob.conv.suspend();
            p.bob.restart("bob@example.test", BOB_TAG, keys().1.clone());
            assert_eq!(p.bob.conv.restore_fragments(&held), 1);
        }
        p.bob.notices.clear();
        p.alice.send("chaos-0123456789ab new 1", t);
        let new: Vec<String> = p.alice.outbox.drain(..).collect();
        assert_eq!(new.len(), 2);
        p.bob.receive(&new[1], t);
        assert!(
            !p.bob.outbox.iter().any(|m| m.starts_with("?OTR Error")),
            "restart {restart}: {:?}",
            p.bob.outbox
        );
        p.bob.receive(&new[0], t);
        assert_eq!(
            p.bob.texts().last().map(String::as_str),
            Some("chaos-0123456789ab new 1"),
            "restart {restart}: {:?}",
            p.bob.notices
        );
        // A heartbeat may go out (time passed), no error and no new AKE.
        assert!(
            !p.bob
                .outbox
                .iter()
                .any(|m| m.starts_with("?OTR Error") || is_commit(m)),
            "{:?}",
            p.bob.outbox
        );
    }
}

/// Chaos seed 20261330, trial 37 (an upstream TCP cut): Alice's message
/// sent on the dead session was re-routed by the server after her next
/// ones, which had stepped Bob's ratchet past its keys. It is read (late),
/// with no OTR error and no new AKE, and the conversation goes on.
#[test]
fn a_message_delivered_after_a_newer_ratchet_step_is_read() {
    let mut p = Pair::new();
    p.establish();
    p.alice.send("hello", p.now);
    p.run();
    p.alice.send("sent on the dead session", p.now);
    let stale = p.alice.outbox.pop_front().expect("the data message");
    for i in 0..2 {
        p.bob.send(&format!("answer {i}"), p.now);
        p.run();
        p.alice.send(&format!("newer {i}"), p.now);
        p.run();
    }
    p.now += 30;
    let sent = (p.alice.sent_log.len(), p.bob.sent_log.len());
    p.bob.notices.clear();
    p.bob.receive(&stale, p.now);
    assert_eq!(
        p.bob.texts().last().map(String::as_str),
        Some("sent on the dead session")
    );
    assert_nothing_unreadable(&p.bob);
    assert!(p.bob.outbox.is_empty(), "no OTR error: {:?}", p.bob.outbox);
    // A second copy is refused as a replay, still without an OTR error.
    p.bob.receive(&stale, p.now);
    assert_eq!(p.bob.texts().len(), 4);
    assert!(p.bob.outbox.is_empty());
    p.bob.send("reply", p.now);
    p.alice.send("after it", p.now);
    p.run();
    assert!(!p.alice.sent_log[sent.0..].iter().any(|b| is_commit(b)));
    assert!(!p.bob.sent_log[sent.1..].iter().any(|b| is_commit(b)));
    assert_eq!(p.bob.texts().last().map(String::as_str), Some("after it"));
    assert_eq!(p.alice.texts().last().map(String::as_str), Some("reply"));
    // An idle conversation wipes the retired keys when their time is up:
    // the snapshot without them replaces the one on disk.
    let kept = p.bob.snapshots.clone();
    p.bob.tick(p.now + 1);
    assert_eq!(p.bob.snapshots, kept);
    p.bob.tick(p.now + RETIRED_SECS);
    let (before, after) = (kept.values().next(), p.bob.snapshots.values().next());
    assert!(
        after.unwrap().len() < before.unwrap().len(),
        "a smaller snapshot is persisted"
    );
}
