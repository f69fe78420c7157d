//! Self-test of the interop harness (`tests/common/peer.rs`): the real OTR
//! implementations — libotr 4.1.1 and python-potr 1.0.2 — talk to EACH
//! OTHER with this test as the network. If these pass, a failure in a test
//! pitting our core against a peer is our core's fault, not the harness's.
//!
//! Needs the peers installed (`scripts/install-test-deps.sh`).

mod common;

use common::peer::{
    MsgState, PeerKind, PeerOptions, PeerOutput, PeerPolicy, PeerProcess, ferry, ferry_both,
};

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";

fn spawn(kind: PeerKind, who: &str, opts: &PeerOptions) -> PeerProcess {
    let (account, peer) = if who == "alice" {
        (ALICE, BOB)
    } else {
        (BOB, ALICE)
    };
    PeerProcess::spawn_cached(kind, &format!("selftest-{kind}-{who}"), account, peer, opts)
        .unwrap_or_else(|e| panic!("spawning {kind} {who}: {e}"))
}

/// Runs the AKE started by `a`'s query and checks both sides are encrypted
/// with each other's key at `version`.
fn establish(a: &mut PeerProcess, b: &mut PeerProcess, version: u8) -> (PeerOutput, PeerOutput) {
    let q = a.query();
    assert_eq!(q.len(), 1, "one query message");
    assert!(q[0].starts_with("?OTRv"), "query message: {:?}", q[0]);
    let (oa, ob) = ferry(a, b, q);
    assert!(oa.has_event("gone_secure"), "a not gone secure: {oa:?}");
    assert!(ob.has_event("gone_secure"), "b not gone secure: {ob:?}");
    assert!(oa.plain.is_empty() && ob.plain.is_empty());
    check_encrypted(a, b, version);
    (oa, ob)
}

fn check_encrypted(a: &mut PeerProcess, b: &mut PeerProcess, version: u8) {
    let (fa, fb) = (a.fingerprint().to_owned(), b.fingerprint().to_owned());
    let sa = a.status();
    let sb = b.status();
    assert_eq!(sa.state, MsgState::Encrypted, "a: {sa:?}");
    assert_eq!(sb.state, MsgState::Encrypted, "b: {sb:?}");
    assert_eq!(sa.peer_fingerprint.as_deref(), Some(fb.as_str()));
    assert_eq!(sb.peer_fingerprint.as_deref(), Some(fa.as_str()));
    assert_eq!(sa.version, Some(version));
    assert_eq!(sb.version, Some(version));
}

/// Prefix every encrypted (unfragmented) data message of `version` has:
/// base64 of protocol version (2 bytes) and message type 0x03.
fn data_prefix(version: u8) -> &'static str {
    if version == 3 {
        "?OTR:AAMD"
    } else {
        "?OTR:AAID"
    }
}

/// `from` says `text`; it must cross encrypted and arrive intact.
fn say(from: &mut PeerProcess, to: &mut PeerProcess, text: &str, version: u8) {
    let wire = from.send_text(text);
    assert!(!wire.is_empty(), "{:?} sent nothing for {text:?}", from);
    for w in &wire {
        assert!(!w.contains(text), "plaintext leaked on the wire: {w:?}");
        assert!(
            w.starts_with(data_prefix(version)) || w.starts_with("?OTR|") || w.starts_with("?OTR,"),
            "not an OTR v{version} data message: {w:?}"
        );
    }
    let (back, got) = ferry(from, to, wire);
    assert_eq!(got.plain, vec![text.to_owned()], "received: {got:?}");
    assert!(back.plain.is_empty());
}

fn conversation(a: &mut PeerProcess, b: &mut PeerProcess, version: u8, each_way: usize) {
    for i in 0..each_way {
        say(a, b, &format!("a→b #{i}: grüße, Ünïcødé ✓"), version);
        say(
            b,
            a,
            &format!("b→a #{i}: <xml> & \"quotes\" '\t' "),
            version,
        );
    }
    // A burst one way without replies (no DH ratchet turn).
    for i in 0..5 {
        say(a, b, &format!("burst {i}"), version);
    }
}

/// `initiator` starts SMP (with a question if given), `responder` answers.
/// Returns the events each side saw.
fn smp(
    initiator: &mut PeerProcess,
    responder: &mut PeerProcess,
    question: Option<&str>,
    secret_i: &str,
    secret_r: &str,
) -> (PeerOutput, PeerOutput) {
    let wire = match question {
        Some(q) => initiator.smp_start_with_question(q, secret_i),
        None => initiator.smp_start(secret_i),
    };
    assert!(!wire.is_empty());
    let (oi1, or1) = ferry(initiator, responder, wire);
    assert!(
        or1.has_event("smp_request"),
        "responder got no smp_request: {or1:?}"
    );
    if let Some(q) = question {
        assert_eq!(or1.event_text("smp_request").as_deref(), Some(q));
    }
    let answer = responder.smp_answer(secret_r);
    let (mut or2, mut oi2) = ferry(responder, initiator, answer);
    oi2.events.splice(0..0, oi1.events);
    or2.events.splice(0..0, or1.events);
    (oi2, or2)
}

fn smp_same_secret(i: &mut PeerProcess, r: &mut PeerProcess, question: Option<&str>) {
    let (oi, or) = smp(i, r, question, "correct horse", "correct horse");
    assert!(oi.has_event("smp_success"), "initiator: {oi:?}");
    assert!(or.has_event("smp_success"), "responder: {or:?}");
    assert!(!oi.has_event("smp_failure") && !or.has_event("smp_failure"));
}

fn smp_different_secret(i: &mut PeerProcess, r: &mut PeerProcess) {
    let (oi, or) = smp(i, r, None, "correct horse", "battery staple");
    assert!(!oi.has_event("smp_success"), "initiator: {oi:?}");
    assert!(!or.has_event("smp_success"), "responder: {or:?}");
    // Whoever computes the result first reports failure; libotr sends SMP4
    // (the initiator then fails too), potr sends an abort instead.
    assert!(
        oi.has_event("smp_failure") || or.has_event("smp_failure"),
        "no side reported failure: {oi:?} / {or:?}"
    );
    assert!(
        (oi.has_event("smp_failure") || oi.has_event("smp_abort"))
            && (or.has_event("smp_failure") || or.has_event("smp_abort")),
        "a side saw neither failure nor abort: {oi:?} / {or:?}"
    );
}

fn end(ender: &mut PeerProcess, other: &mut PeerProcess) {
    let wire = ender.end();
    assert_eq!(wire.len(), 1, "one disconnect message");
    let (_, got) = ferry(ender, other, wire);
    assert!(got.has_event("finished"), "no finished event: {got:?}");
    assert!(got.plain.is_empty());
    assert_eq!(ender.status().state, MsgState::Plaintext);
    assert_eq!(other.status().state, MsgState::Finished);
    // The other side must refuse to send in the FINISHED state.
    let out = other.send("are you there?");
    assert!(out.wire.is_empty(), "sent in FINISHED state: {out:?}");
    assert!(out.has_event("connection_ended"), "{out:?}");
}

#[test]
fn libotr_libotr_v3_conversation_and_end() {
    let v3 = PeerOptions::policy(PeerPolicy::V3);
    let mut a = spawn(PeerKind::Libotr, "alice", &v3);
    let mut b = spawn(PeerKind::Libotr, "bob", &v3);
    assert_ne!(a.fingerprint(), b.fingerprint());
    establish(&mut a, &mut b, 3);
    let (ia, ib) = (a.instag().unwrap(), b.instag().unwrap());
    assert!(ia >= 0x100 && ib >= 0x100, "instance tags {ia:x} {ib:x}");
    assert_eq!(a.status().their_instag, Some(ib));
    assert_eq!(b.status().their_instag, Some(ia));
    conversation(&mut a, &mut b, 3, 20);
    end(&mut a, &mut b);
    a.quit().unwrap();
    b.quit().unwrap();
}

#[test]
fn libotr_libotr_v3_fragmentation() {
    let opts = PeerOptions::policy(PeerPolicy::V3).with_fragment_size(200);
    let mut a = spawn(PeerKind::Libotr, "alice", &opts);
    let mut b = spawn(PeerKind::Libotr, "bob", &opts);
    // The AKE messages themselves exceed 200 bytes: they are fragmented too.
    establish(&mut a, &mut b, 3);
    let text: String = (0..1500)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let wire = a.send_text(&text);
    assert!(
        wire.len() >= 8,
        "expected many fragments, got {}",
        wire.len()
    );
    for w in &wire {
        assert!(w.len() <= 200, "fragment of {} bytes", w.len());
        assert!(w.starts_with("?OTR|"), "v3 fragment: {w:?}");
    }
    let (last, head) = wire.split_last().unwrap();
    for w in head {
        let o = b.receive(w);
        assert!(o.plain.is_empty() && o.wire.is_empty(), "{o:?}");
    }
    let o = b.receive(last);
    assert_eq!(o.plain, vec![text.clone()]);
    say(&mut b, &mut a, &text, 3);
    conversation(&mut a, &mut b, 3, 3);
}

#[test]
fn libotr_errors_and_plaintext_quirk() {
    let mut a = spawn(PeerKind::Libotr, "alice", &PeerOptions::default());
    let mut b = spawn(PeerKind::Libotr, "bob", &PeerOptions::default());

    // Plaintext: the first message carries the whitespace tag.
    let wire = a.send_text("hello");
    assert_eq!(wire.len(), 1);
    assert!(
        wire[0].starts_with("hello \t  \t\t\t\t \t \t \t  "),
        "{:?}",
        wire[0]
    );
    // An untagged plaintext reply makes libotr stop tagging; then it injects
    // nothing and the application sends the original text (the quirk).
    let o = a.receive("plain reply");
    assert_eq!(o.plain, vec!["plain reply".to_owned()]);
    assert_eq!(a.send_text("second"), vec!["second".to_owned()]);

    establish(&mut a, &mut b, 3);
    // A corrupted data message: unreadable for b, which answers with an OTR
    // error that a reports.
    let mut wire = a.send_text("to be corrupted");
    assert_eq!(wire.len(), 1);
    let w = &mut wire[0];
    let pos = w.len() - 12;
    let flipped = if &w[pos..=pos] == "A" { "B" } else { "A" };
    w.replace_range(pos..=pos, flipped);
    let o = b.receive(&wire[0]);
    assert!(o.plain.is_empty());
    assert!(
        o.has_event("unreadable") || o.has_event("malformed"),
        "{o:?}"
    );
    assert_eq!(o.wire.len(), 1);
    assert!(o.wire[0].starts_with("?OTR Error:"), "{:?}", o.wire);
    let back = a.receive(&o.wire[0]);
    assert!(back.has_event("otr_error"), "{back:?}");
    // Unencrypted text while encrypted is reported, not shown.
    let o = b.receive("sneaky plaintext");
    assert_eq!(
        o.event_text("unencrypted").as_deref(),
        Some("sneaky plaintext")
    );
    // The session survives.
    say(&mut a, &mut b, "still fine", 3);
    say(&mut b, &mut a, "indeed", 3);
}

#[test]
fn libotr_require_encryption_starts_ake() {
    let mut a = spawn(
        PeerKind::Libotr,
        "alice",
        &PeerOptions::default().with_always(),
    );
    let mut b = spawn(PeerKind::Libotr, "bob", &PeerOptions::default());
    let out = a.send("secret before AKE");
    assert!(out.has_event("encryption_required"), "{out:?}");
    assert_eq!(out.wire.len(), 1);
    assert!(out.wire[0].starts_with("?OTRv"), "{:?}", out.wire);
    assert!(!out.wire[0].contains("secret"));
    let (oa, ob) = ferry(&mut a, &mut b, out.wire);
    assert!(oa.has_event("gone_secure") && ob.has_event("gone_secure"));
    check_encrypted(&mut a, &mut b, 3);
    // libotr retransmits the held message once the session is up.
    assert_eq!(ob.plain, vec!["secret before AKE".to_owned()], "{ob:?}");
}

#[test]
fn libotr_potr_v2_conversation_and_smp() {
    // libotr allows v2+v3; potr only speaks v2: they must settle on v2.
    let mut l = spawn(PeerKind::Libotr, "alice", &PeerOptions::default());
    let mut p = spawn(PeerKind::Potr, "bob", &PeerOptions::default());
    establish(&mut l, &mut p, 2);
    conversation(&mut l, &mut p, 2, 5);

    smp_same_secret(&mut l, &mut p, Some("Where did we meet?"));
    smp_same_secret(&mut p, &mut l, None);
    smp_different_secret(&mut l, &mut p);
    smp_different_secret(&mut p, &mut l);
    smp_same_secret(&mut l, &mut p, None);

    say(&mut l, &mut p, "after SMP", 2);
    say(&mut p, &mut l, "after SMP too", 2);
    end(&mut p, &mut l);
}

#[test]
fn potr_initiates_with_libotr_v2_only() {
    let mut p = spawn(PeerKind::Potr, "alice", &PeerOptions::default());
    let mut l = spawn(
        PeerKind::Libotr,
        "bob",
        &PeerOptions::policy(PeerPolicy::V2),
    );
    establish(&mut p, &mut l, 2);
    conversation(&mut p, &mut l, 2, 3);
    end(&mut l, &mut p);
}

#[test]
fn libotr_v3_only_and_potr_do_not_start() {
    let mut p = spawn(PeerKind::Potr, "alice", &PeerOptions::default());
    let mut l = spawn(
        PeerKind::Libotr,
        "bob",
        &PeerOptions::policy(PeerPolicy::V3),
    );
    let q = p.query();
    let (op, ol) = ferry(&mut p, &mut l, q);
    assert!(!op.has_event("gone_secure") && !ol.has_event("gone_secure"));
    assert_eq!(p.status().state, MsgState::Plaintext);
    assert_eq!(l.status().state, MsgState::Plaintext);
}

#[test]
fn potr_libotr_fragmentation_v2() {
    let opts = PeerOptions::default().with_fragment_size(200);
    let mut l = spawn(PeerKind::Libotr, "alice", &opts);
    let mut p = spawn(PeerKind::Potr, "bob", &opts);
    establish(&mut p, &mut l, 2);
    let text = "0123456789".repeat(80);
    for potr_sends in [true, false] {
        let (from, to) = if potr_sends {
            (&mut p, &mut l)
        } else {
            (&mut l, &mut p)
        };
        let wire = from.send_text(&text);
        assert!(wire.len() > 3, "{} fragments", wire.len());
        for w in &wire {
            assert!(w.len() <= 200 && w.starts_with("?OTR,"), "{w:?}");
        }
        let (_, got) = ferry(from, to, wire);
        assert_eq!(got.plain, vec![text.clone()]);
    }
}

#[test]
fn potr_potr_conversation_smp_end() {
    let mut a = spawn(PeerKind::Potr, "alice", &PeerOptions::default());
    let mut b = spawn(PeerKind::Potr, "bob", &PeerOptions::default());
    establish(&mut a, &mut b, 2);
    conversation(&mut a, &mut b, 2, 5);
    smp_same_secret(&mut a, &mut b, Some("favourite colour?"));
    smp_different_secret(&mut b, &mut a);
    say(&mut a, &mut b, "after SMP", 2);
    end(&mut b, &mut a);
}

#[test]
fn libotr_simultaneous_queries_stall_then_recover() {
    // Measured libotr 4.1.1 behaviour, kept here as a fact for our core's
    // interop tests: when both sides send a query at once, both answer the
    // other's D-H Commit with a D-H Key (each decides its own commit lost),
    // and nobody goes secure. A later query from one side recovers.
    let mut a = spawn(PeerKind::Libotr, "alice", &PeerOptions::default());
    let mut b = spawn(PeerKind::Libotr, "bob", &PeerOptions::default());
    let (qa, qb) = (a.query(), b.query());
    let (oa, ob) = ferry_both(&mut a, &mut b, qa, qb);
    assert!(!oa.has_event("gone_secure") && !ob.has_event("gone_secure"));
    assert_eq!(a.status().state, MsgState::Plaintext);
    let q = a.query();
    let (oa, ob) = ferry(&mut a, &mut b, q);
    assert!(oa.has_event("gone_secure") && ob.has_event("gone_secure"));
    check_encrypted(&mut a, &mut b, 3);
    say(&mut a, &mut b, "recovered", 3);
}

#[test]
fn keys_are_cached_in_the_dir() {
    for kind in [PeerKind::Libotr, PeerKind::Potr] {
        let name = format!("selftest-cache-{kind}");
        let first =
            PeerProcess::spawn_cached(kind, &name, ALICE, BOB, &PeerOptions::default()).unwrap();
        let fpr = first.fingerprint().to_owned();
        first.quit().unwrap();
        let mut again =
            PeerProcess::spawn_cached(kind, &name, ALICE, BOB, &PeerOptions::default()).unwrap();
        assert_eq!(again.fingerprint(), fpr, "{kind} regenerated its key");
        let out = again.command("FPR").unwrap();
        assert_eq!(out.other, vec![format!("FPR {fpr}")]);
        assert!(again.command("BOGUS").is_err());
        // Still alive and answering after an error.
        assert_eq!(again.status().state, MsgState::Plaintext);
    }
}
