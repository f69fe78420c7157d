//! O2TR acceptance tests (issue 3): our side crashes and restarts from its
//! persisted EKM snapshots at every point of a conversation with a real OTR
//! implementation — libotr (v3) and python-potr (v2) — which never learns
//! about it.
//!
//! Every restart is `Link::restart_ours` (drop the `Conversation`, rebuild it
//! with `restore` from the snapshots the `Persist` actions stored, like
//! `Side::restart` in `tests/common/pair.rs`). While we are down the peer
//! keeps its session and sends messages; after the restart every one of
//! them must be decrypted, in order, and the conversation must go on both
//! ways with no new AKE: no query, D-H Commit or other AKE message crosses
//! the wire, and the peer stays encrypted with the same fingerprint.
//!
//! Needs the peers installed (`scripts/install-test-deps.sh`).

mod common;

use common::interop::*;
use common::peer::{PeerKind, PeerOptions, PeerStatus};
use o2tr_proxy::otr::conversation::Notice;
use o2tr_proxy::otr::policy::Policy;

const LIBOTR: PeerKind = PeerKind::Libotr;
const POTR: PeerKind = PeerKind::Potr;

/// Fragment size when a test forces fragmentation.
const FRAG: usize = 180;

fn link(kind: PeerKind, fragmented: bool, seed: u64) -> Link {
    let mut cfg = config(Policy::Always);
    let mut opts = PeerOptions::default();
    if fragmented {
        cfg.max_message_bytes = FRAG;
        opts = opts.with_fragment_size(FRAG);
    }
    Link::new(kind, &opts, cfg, seed)
}

/// A private conversation with some traffic both ways.
fn established(kind: PeerKind, fragmented: bool, seed: u64) -> (Link, PeerStatus) {
    let mut l = link(kind, fragmented, seed);
    l.establish(seed % 2 == 0);
    l.we_say("hi");
    l.they_say("hello");
    l.we_say("how are you?");
    l.they_say("fine");
    let st = l.peer.status();
    (l, st)
}

/// Our side is down (already restarted from the store by the caller at
/// `mark`): an hour passes, the peer sends three messages. Then we are back:
/// `pending` (messages already on the network to us before the crash) and
/// the three are decrypted in order; the conversation continues both ways;
/// no AKE happened since `mark`; the peer's status is unchanged.
fn finish(l: &mut Link, mark: usize, status_before: &PeerStatus, pending: &[String]) {
    assert!(
        l.ours.conv.is_private(),
        "restored session is not selected for sending"
    );
    l.ours.now += 3600;
    let before = l.ours.delivered.len();
    let texts: Vec<String> = (0..3)
        .map(|i| format!("sent while you were down #{i}"))
        .collect();
    for t in &texts {
        let o = l.peer_types(t);
        assert!(!o.wire.is_empty());
        assert!(
            o.wire.iter().all(|m| !is_ake_or_query(m)),
            "peer did not send a data message: {o:?}"
        );
    }
    l.pump();
    let expected: Vec<String> = pending.iter().chain(&texts).cloned().collect();
    assert_eq!(
        l.ours.texts()[before..],
        expected[..],
        "offline messages not all delivered in order; notices {:?}",
        l.ours.notices
    );
    let got = &l.ours.delivered[before..];
    assert!(got.iter().all(|d| d.encrypted), "{got:?}");
    assert!(
        got[0].offline,
        "first message after restart not marked offline"
    );
    assert!(l.ours.noticed(|n| matches!(n, Notice::Resumed { .. })));
    assert!(
        !l.ours
            .noticed(|n| matches!(n, Notice::Unreadable { .. } | Notice::Malformed(_))),
        "{:?}",
        l.ours.notices
    );

    l.we_say("back online");
    l.they_say("welcome back");
    l.we_say("thanks");
    l.they_say("anything new?");

    let akes = l.ake_since(mark);
    assert!(akes.is_empty(), "AKE/query after the restart: {akes:?}");
    let st = l.peer.status();
    assert_eq!(&st, status_before, "peer status changed");
    let seen = l.take_peer_seen();
    for ev in [
        "gone_secure",
        "still_secure",
        "gone_insecure",
        "unreadable",
        "malformed",
    ] {
        assert!(!seen.has_event(ev), "peer reported {ev}: {seen:?}");
    }
}

// --- restart after our send -------------------------------------------------

fn after_our_send(kind: PeerKind, seed: u64) {
    let (mut l, st) = established(kind, false, seed);
    l.ours.send("my last words");
    l.pump();
    assert_eq!(l.take_peer_seen().plain, ["my last words".to_owned()]);
    let mark = l.mark();
    l.restart_ours();
    finish(&mut l, mark, &st, &[]);
}

#[test]
fn libotr_restart_after_our_send() {
    after_our_send(LIBOTR, 100);
}

#[test]
fn potr_restart_after_our_send() {
    after_our_send(POTR, 101);
}

/// We send and crash before the message is delivered; the peer answers
/// messages sent before ours arrives (crossing).
fn after_our_send_crossing(kind: PeerKind, seed: u64) {
    let (mut l, st) = established(kind, false, seed);
    l.ours.send("in flight when we crashed");
    let mark = l.mark();
    l.restart_ours();
    let in_flight: Vec<String> = l.ours.outbox.drain(..).collect();
    assert_eq!(in_flight.len(), 1);
    // The peer sends first, then gets our message.
    l.ours.now += 60;
    let before = l.ours.delivered.len();
    l.peer_types("crossing 1");
    let o = l.deliver_to_peer(&in_flight[0]);
    assert_eq!(o.plain, ["in flight when we crashed".to_owned()]);
    l.take_peer_seen();
    finish(&mut l, mark, &st, &["crossing 1".to_owned()]);
    assert_eq!(l.ours.texts()[before], "crossing 1");
}

#[test]
fn libotr_restart_with_our_message_in_flight() {
    after_our_send_crossing(LIBOTR, 102);
}

#[test]
fn potr_restart_with_our_message_in_flight() {
    after_our_send_crossing(POTR, 103);
}

// --- restart after their send -------------------------------------------------

fn after_their_send(kind: PeerKind, seed: u64) {
    let (mut l, st) = established(kind, false, seed);
    l.they_say("your last received");
    let mark = l.mark();
    l.restart_ours();
    finish(&mut l, mark, &st, &[]);
}

#[test]
fn libotr_restart_after_their_send() {
    after_their_send(LIBOTR, 104);
}

#[test]
fn potr_restart_after_their_send() {
    after_their_send(POTR, 105);
}

// --- restart in the middle of a burst ---------------------------------------

fn mid_their_burst(kind: PeerKind, seed: u64) {
    let (mut l, st) = established(kind, false, seed);
    let burst: Vec<String> = (0..10).map(|i| format!("their burst {i}")).collect();
    for t in &burst {
        l.peer_types(t);
    }
    let before = l.ours.delivered.len();
    for _ in 0..5 {
        let m = l.to_us.pop_front().unwrap();
        l.deliver_to_us(&m);
    }
    assert_eq!(l.ours.texts()[before..], burst[..5]);
    let mark = l.mark();
    l.restart_ours();
    finish(&mut l, mark, &st, &burst[5..]);
}

#[test]
fn libotr_restart_mid_their_burst() {
    mid_their_burst(LIBOTR, 106);
}

#[test]
fn potr_restart_mid_their_burst() {
    mid_their_burst(POTR, 107);
}

fn mid_our_burst(kind: PeerKind, seed: u64) {
    let (mut l, st) = established(kind, false, seed);
    let burst: Vec<String> = (0..10).map(|i| format!("our burst {i}")).collect();
    for t in &burst {
        l.ours.send(t);
    }
    let mut shown = Vec::new();
    for _ in 0..5 {
        let m = l.ours.outbox.pop_front().unwrap();
        shown.extend(l.deliver_to_peer(&m).plain);
    }
    let mark = l.mark();
    l.restart_ours();
    // The rest of the burst was already on the network.
    while let Some(m) = l.ours.outbox.pop_front() {
        shown.extend(l.deliver_to_peer(&m).plain);
    }
    assert_eq!(shown, burst);
    l.take_peer_seen();
    finish(&mut l, mark, &st, &[]);
}

#[test]
fn libotr_restart_mid_our_burst() {
    mid_our_burst(LIBOTR, 108);
}

#[test]
fn potr_restart_mid_our_burst() {
    mid_our_burst(POTR, 109);
}

// --- restart between fragments -----------------------------------------------

/// We crash after receiving half the fragments of a message. The fragments
/// we had were lost with the process; the rest arrive after the restart
/// (and cannot be reassembled), then the server redelivers the whole
/// unacknowledged message, which must decrypt on the restored session.
fn between_incoming_fragments(kind: PeerKind, seed: u64) {
    let (mut l, st) = established(kind, true, seed);
    let long = format!("long message: {}", "0123456789".repeat(50));
    let o = l.peer_types(&long);
    let frags = o.wire.clone();
    assert!(frags.len() > 3, "not fragmented: {frags:?}");
    l.to_us.clear();
    let half = frags.len() / 2;
    for m in &frags[..half] {
        l.deliver_to_us(m);
    }
    let before = l.ours.delivered.len();
    let mark = l.mark();
    l.restart_ours();
    for m in &frags[half..] {
        l.deliver_to_us(m);
    }
    assert_eq!(
        l.ours.delivered.len(),
        before,
        "a partial message was delivered"
    );
    assert!(l.ours.outbox.is_empty(), "{:?}", l.ours.outbox);
    l.ours.notices.clear(); // the out-of-sequence fragments are reported
    l.to_us.extend(frags);
    finish(&mut l, mark, &st, &[long]);
}

#[test]
fn libotr_restart_between_incoming_fragments() {
    between_incoming_fragments(LIBOTR, 110);
}

#[test]
fn potr_restart_between_incoming_fragments() {
    between_incoming_fragments(POTR, 111);
}

/// We crash after the network took half the fragments of our message; the
/// rest were already handed to the network too.
fn between_outgoing_fragments(kind: PeerKind, seed: u64) {
    let (mut l, st) = established(kind, true, seed);
    let long = format!("long message: {}", "abcdefghij".repeat(50));
    l.ours.send(&long);
    let n = l.ours.outbox.len();
    assert!(n > 3, "not fragmented");
    let mut shown = Vec::new();
    for _ in 0..n / 2 {
        let m = l.ours.outbox.pop_front().unwrap();
        shown.extend(l.deliver_to_peer(&m).plain);
    }
    assert!(shown.is_empty());
    let mark = l.mark();
    l.restart_ours();
    while let Some(m) = l.ours.outbox.pop_front() {
        shown.extend(l.deliver_to_peer(&m).plain);
    }
    assert_eq!(shown, [long]);
    l.take_peer_seen();
    finish(&mut l, mark, &st, &[]);
}

#[test]
fn libotr_restart_between_outgoing_fragments() {
    between_outgoing_fragments(LIBOTR, 112);
}

#[test]
fn potr_restart_between_outgoing_fragments() {
    between_outgoing_fragments(POTR, 113);
}

// --- restart during an AKE ----------------------------------------------------

/// Starts an AKE (`we_start`: our query, else theirs), delivers `steps`
/// messages one at a time, crashes, lets the rest of the AKE run into the
/// restarted side, then: if the AKE did not complete on both sides, a fresh
/// one (our query) must; either way the conversation then works.
fn during_ake(kind: PeerKind, we_start: bool, steps: usize, seed: u64) {
    let mut l = link(kind, false, seed);
    if we_start {
        l.ours.start();
    } else {
        l.peer_query();
    }
    for _ in 0..steps {
        if let Some(m) = l.ours.outbox.pop_front() {
            l.deliver_to_peer(&m);
        } else if let Some(m) = l.to_us.pop_front() {
            l.deliver_to_us(&m);
        } else {
            panic!("AKE finished before step {steps}");
        }
    }
    l.restart_ours();
    l.pump();
    let both =
        l.ours.conv.is_private() && l.peer.status().state == common::peer::MsgState::Encrypted;
    if !both {
        l.ours.start();
        l.pump();
    }
    l.check_private();
    l.we_say("after the interrupted AKE");
    l.they_say("works");
    l.we_say("both ways");
}

fn during_ake_all_steps(kind: PeerKind, seed: u64) {
    // query, D-H Commit, D-H Key, Reveal Signature, Signature: crash after
    // 1..=4 of them were delivered, each side starting.
    for we_start in [true, false] {
        for steps in 1..=4 {
            during_ake(kind, we_start, steps, seed + steps as u64);
        }
    }
}

#[test]
fn libotr_restart_during_ake() {
    during_ake_all_steps(LIBOTR, 120);
}

#[test]
fn potr_restart_during_ake() {
    during_ake_all_steps(POTR, 130);
}

// --- replay and tampering of offline messages --------------------------------

/// An offline message accepted after the restart is rejected when replayed:
/// right away, and after another restart from the snapshot persisted on
/// accepting it. No other traffic happens in between, so the keys have not
/// moved on: only the receive counters kept in the snapshot stop the
/// replays.
fn replay_after_restart(kind: PeerKind, seed: u64) {
    let (mut l, _st) = established(kind, false, seed);
    l.restart_ours();
    l.ours.now += 3600;
    let texts: Vec<String> = (0..3).map(|i| format!("offline {i}")).collect();
    let mut wire = Vec::new();
    for t in &texts {
        wire.extend(l.peer_types(t).wire);
    }
    l.to_us.clear();
    assert_eq!(wire.len(), 3);
    let before = l.ours.delivered.len();
    for m in &wire {
        l.deliver_to_us(m);
    }
    assert_eq!(l.ours.texts()[before..], texts[..]);
    let unreadable = |l: &Link| {
        l.ours
            .notices
            .iter()
            .filter(|n| matches!(n, Notice::Unreadable { .. }))
            .count()
    };
    assert_eq!(unreadable(&l), 0);
    l.deliver_to_us(&wire[1]);
    assert_eq!(l.ours.delivered.len(), before + 3, "replay delivered");
    assert_eq!(unreadable(&l), 1);

    l.restart_ours();
    for m in [&wire[2], &wire[0], &wire[1]] {
        l.deliver_to_us(m);
    }
    assert_eq!(
        l.ours.delivered.len(),
        before + 3,
        "replay after a restart delivered"
    );
    assert_eq!(unreadable(&l), 4);
    // Our error messages are dropped by the network; the heartbeat we sent
    // on receiving the first offline message goes through.
    l.ours.outbox.retain(|m| !m.starts_with("?OTR Error"));
    l.pump();
    l.take_peer_seen();
    l.they_say("still there?");
    l.we_say("yes, still here");
}

#[test]
fn libotr_offline_replay_rejected() {
    replay_after_restart(LIBOTR, 140);
}

#[test]
fn potr_offline_replay_rejected() {
    replay_after_restart(POTR, 141);
}

/// Offline messages tampered with (MAC of the first one, before the session
/// resumed; ciphertext of the third, after) are rejected and reported, not
/// delivered, and do not disturb the genuine ones.
fn tampered_offline(kind: PeerKind, seed: u64) {
    let (mut l, _st) = established(kind, false, seed);
    l.restart_ours();
    l.ours.now += 3600;
    let texts: Vec<String> = (0..3).map(|i| format!("offline {i}")).collect();
    let mut wire = Vec::new();
    for t in &texts {
        wire.extend(l.peer_types(t).wire);
    }
    l.to_us.clear();
    assert_eq!(wire.len(), 3);
    let before = l.ours.delivered.len();

    l.deliver_to_us(&tamper(&wire[0], Tamper::Mac));
    assert_eq!(l.ours.delivered.len(), before, "tampered message delivered");
    assert!(l.ours.noticed(|n| matches!(n, Notice::Unreadable { .. })));
    assert!(
        !l.ours.noticed(|n| matches!(n, Notice::Resumed { .. })),
        "a tampered message resumed the session"
    );
    l.ours.notices.clear();
    l.deliver_to_us(&wire[0]);
    l.deliver_to_us(&wire[1]);
    l.deliver_to_us(&tamper(&wire[2], Tamper::Ciphertext));
    assert!(l.ours.noticed(|n| matches!(n, Notice::Unreadable { .. })));
    l.deliver_to_us(&wire[2]);
    assert_eq!(l.ours.texts()[before..], texts[..]);
    assert!(l.ours.delivered[before].offline);
    // Our error messages go to the peer now (it may refresh the session).
    l.pump();
    l.check_private();
    l.we_say("after the tampering");
    l.they_say("ok");
}

#[test]
fn libotr_tampered_offline_rejected() {
    tampered_offline(LIBOTR, 150);
}

#[test]
fn potr_tampered_offline_rejected() {
    tampered_offline(POTR, 151);
}
