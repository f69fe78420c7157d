//! SMP interop: our core's Socialist Millionaires' Protocol against real
//! libotr 4.1.1 (OTR v3) and python-potr 1.0.2 (OTR v2), in both roles:
//! same secret, different secrets, a question, and an abort mid-way. The
//! test is the network (see `tests/common/peer.rs`).
//!
//! Needs the peers installed (`scripts/install-test-deps.sh`).

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use common::peer::{MsgState, PeerKind, PeerOptions, PeerOutput, PeerProcess};
use o2tr_proxy::otr::conversation::{Action, Config, Conversation, Notice};
use o2tr_proxy::otr::crypto::DsaPrivateKey;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const US: &str = "alice@example.org";
const THEM: &str = "bob@example.org";
const NOW: u64 = 1_700_000_000;

fn our_key() -> Arc<DsaPrivateKey> {
    static KEY: OnceLock<Arc<DsaPrivateKey>> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(0x5319);
        Arc::new(DsaPrivateKey::generate(&mut rng))
    })
    .clone()
}

/// Our side: a conversation and what it produced.
struct Us {
    conv: Conversation,
    rng: ChaCha20Rng,
    notices: Vec<Notice>,
    texts: Vec<String>,
}

impl Us {
    fn new(seed: u64) -> Self {
        Us {
            conv: Conversation::new(Config::new(US, 0x1234_5678), our_key()),
            rng: ChaCha20Rng::seed_from_u64(seed),
            notices: Vec::new(),
            texts: Vec::new(),
        }
    }

    /// Apply actions; returns the bodies to send. Checks the EKM rule: every
    /// data message sent is preceded by a Persist in the same batch.
    fn apply(&mut self, actions: Vec<Action>) -> Vec<String> {
        let mut sends = Vec::new();
        let mut persisted = false;
        for a in actions {
            match a {
                Action::Send(s) => {
                    if s.starts_with("?OTR:AAMD") || s.starts_with("?OTR:AAID") {
                        assert!(persisted, "data message sent before Persist: {s}");
                    }
                    sends.push(s);
                }
                Action::Persist(_) => persisted = true,
                Action::Notify(n) => self.notices.push(n),
                Action::Deliver(d) => self.texts.push(d.text),
                _ => {}
            }
        }
        sends
    }

    fn smp_notices(&self) -> Vec<&Notice> {
        self.notices
            .iter()
            .filter(|n| {
                matches!(
                    n,
                    Notice::SmpRequested { .. }
                        | Notice::SmpInProgress
                        | Notice::SmpSucceeded { .. }
                        | Notice::SmpFailed
                        | Notice::SmpAborted
                        | Notice::SmpError { .. }
                )
            })
            .collect()
    }
}

/// Carry messages both ways until both sides are quiet; returns what the
/// peer reported.
fn ferry(
    us: &mut Us,
    peer: &mut PeerProcess,
    to_peer: Vec<String>,
    to_us: Vec<String>,
) -> PeerOutput {
    let mut to_peer: VecDeque<String> = to_peer.into();
    let mut to_us: VecDeque<String> = to_us.into();
    let mut out = PeerOutput::default();
    let mut steps = 0;
    while !to_peer.is_empty() || !to_us.is_empty() {
        steps += 1;
        assert!(steps < 200, "ferry ping-pong");
        if let Some(m) = to_peer.pop_front() {
            let o = peer.receive(&m);
            to_us.extend(o.wire.iter().cloned());
            out.extend(o);
        } else if let Some(m) = to_us.pop_front() {
            let a = us.conv.handle_incoming(&m, NOW, &mut us.rng);
            to_peer.extend(us.apply(a));
        }
    }
    out
}

fn spawn(kind: PeerKind) -> PeerProcess {
    PeerProcess::spawn_cached(
        kind,
        &format!("smp-{kind}-bob"),
        THEM,
        US,
        &PeerOptions::default(),
    )
    .unwrap_or_else(|e| panic!("spawning {kind}: {e}"))
}

/// Start a session (we query) and check both sides are private.
fn establish(kind: PeerKind, seed: u64) -> (Us, PeerProcess) {
    let mut us = Us::new(seed);
    let mut peer = spawn(kind);
    let a = us.conv.handle_start(NOW);
    let q = us.apply(a);
    let out = ferry(&mut us, &mut peer, q, Vec::new());
    assert!(out.has_event("gone_secure"), "{out:?}");
    assert!(us.conv.is_private(), "{:?}", us.notices);
    let st = peer.status();
    assert_eq!(st.state, MsgState::Encrypted);
    assert_eq!(
        st.version,
        Some(if kind == PeerKind::Libotr { 3 } else { 2 })
    );
    (us, peer)
}

/// Both directions still carry text after SMP.
fn still_private(us: &mut Us, peer: &mut PeerProcess) {
    let a = us
        .conv
        .handle_outgoing("after smp, to them", NOW, &mut us.rng);
    let w = us.apply(a);
    let out = ferry(us, peer, w, Vec::new());
    assert_eq!(out.plain, vec!["after smp, to them".to_owned()]);
    let w = peer.send_text("after smp, to us");
    us.texts.clear();
    ferry(us, peer, Vec::new(), w);
    assert_eq!(us.texts, vec!["after smp, to us".to_owned()]);
}

/// We start SMP; the peer answers. Returns the peer's accumulated output.
fn we_start(
    us: &mut Us,
    peer: &mut PeerProcess,
    question: Option<&str>,
    ours: &str,
    theirs: &str,
) -> PeerOutput {
    us.notices.clear();
    let a = us.conv.handle_smp_start(ours, question, NOW, &mut us.rng);
    let w = us.apply(a);
    assert_eq!(w.len(), 1, "one SMP1 message: {w:?}");
    let mut out = ferry(us, peer, w, Vec::new());
    assert!(out.has_event("smp_request"), "{out:?}");
    if let Some(q) = question {
        assert_eq!(out.event_text("smp_request").as_deref(), Some(q));
    }
    let w = peer.smp_answer(theirs);
    out.extend(ferry(us, peer, Vec::new(), w));
    out
}

/// The peer starts SMP; we answer. Returns the peer's accumulated output.
fn they_start(
    us: &mut Us,
    peer: &mut PeerProcess,
    question: Option<&str>,
    theirs: &str,
    ours: &str,
) -> PeerOutput {
    us.notices.clear();
    let w = match question {
        Some(q) => peer.smp_start_with_question(q, theirs),
        None => peer.smp_start(theirs),
    };
    let mut out = ferry(us, peer, Vec::new(), w);
    assert_eq!(
        us.smp_notices(),
        vec![&Notice::SmpRequested {
            question: question.map(str::to_owned)
        }]
    );
    assert_eq!(
        us.conv.smp_pending_request(),
        Some(question.map(str::to_owned))
    );
    let a = us.conv.handle_smp_answer(ours, NOW, &mut us.rng);
    let w = us.apply(a);
    assert_eq!(w.len(), 1, "one SMP2 message: {w:?}");
    out.extend(ferry(us, peer, w, Vec::new()));
    assert_eq!(us.conv.smp_pending_request(), None);
    out
}

fn succeeded(us: &Us, peer: &PeerProcess) -> bool {
    us.notices.iter().any(|n| {
        matches!(n, Notice::SmpSucceeded { fingerprint } if fingerprint.to_hex() == peer.fingerprint())
    })
}

fn run_all(kind: PeerKind, seed: u64) {
    let (mut us, mut peer) = establish(kind, seed);

    // We initiate, same secret.
    let out = we_start(&mut us, &mut peer, None, "correct horse", "correct horse");
    assert!(out.has_event("smp_success"), "{kind}: {out:?}");
    assert!(succeeded(&us, &peer), "{kind}: {:?}", us.notices);
    assert!(us.smp_notices().contains(&&Notice::SmpInProgress));

    // We initiate with a question.
    let q = "Where did we meet?";
    let out = we_start(&mut us, &mut peer, Some(q), "Paris", "Paris");
    assert!(out.has_event("smp_success"), "{kind}: {out:?}");
    assert!(succeeded(&us, &peer), "{kind}: {:?}", us.notices);

    // They initiate, same secret, with and without a question.
    let out = they_start(
        &mut us,
        &mut peer,
        Some("favourite colour?"),
        "blue",
        "blue",
    );
    assert!(out.has_event("smp_success"), "{kind}: {out:?}");
    assert!(succeeded(&us, &peer), "{kind}: {:?}", us.notices);
    let out = they_start(&mut us, &mut peer, None, "s3cret", "s3cret");
    assert!(out.has_event("smp_success"), "{kind}: {out:?}");
    assert!(succeeded(&us, &peer), "{kind}: {:?}", us.notices);

    // We initiate, different secrets: libotr answers SMP4 and both fail;
    // potr answers with an abort.
    let out = we_start(&mut us, &mut peer, None, "correct horse", "battery staple");
    assert!(!out.has_event("smp_success") && !succeeded(&us, &peer));
    match kind {
        PeerKind::Libotr => {
            assert!(out.has_event("smp_failure"), "{out:?}");
            assert!(us.notices.contains(&Notice::SmpFailed), "{:?}", us.notices);
        }
        PeerKind::Potr => {
            assert!(
                out.has_event("smp_failure") || out.has_event("smp_abort"),
                "{out:?}"
            );
            assert!(
                us.notices.contains(&Notice::SmpFailed) || us.notices.contains(&Notice::SmpAborted),
                "{:?}",
                us.notices
            );
        }
    }

    // They initiate, different secrets: we compute the failure first.
    let out = they_start(&mut us, &mut peer, None, "correct horse", "battery staple");
    assert!(!out.has_event("smp_success") && !succeeded(&us, &peer));
    assert!(us.notices.contains(&Notice::SmpFailed), "{:?}", us.notices);
    assert!(
        out.has_event("smp_failure") || out.has_event("smp_abort"),
        "{kind}: {out:?}"
    );

    // We abort mid-way (after the peer got SMP1).
    us.notices.clear();
    let a = us
        .conv
        .handle_smp_start("x", Some("abort test?"), NOW, &mut us.rng);
    let w = us.apply(a);
    let out = ferry(&mut us, &mut peer, w, Vec::new());
    assert!(out.has_event("smp_request"), "{out:?}");
    assert!(us.conv.smp_in_progress());
    let a = us.conv.handle_smp_abort(NOW, &mut us.rng);
    let w = us.apply(a);
    assert_eq!(w.len(), 1);
    let out = ferry(&mut us, &mut peer, w, Vec::new());
    assert!(out.has_event("smp_abort"), "{kind}: {out:?}");
    assert!(!us.conv.smp_in_progress());

    // They abort mid-way (after we got SMP1).
    let w = peer.smp_start("y");
    ferry(&mut us, &mut peer, Vec::new(), w);
    assert!(us.conv.smp_pending_request().is_some());
    let w = peer.smp_abort();
    ferry(&mut us, &mut peer, Vec::new(), w);
    assert!(us.notices.contains(&Notice::SmpAborted), "{:?}", us.notices);
    assert_eq!(us.conv.smp_pending_request(), None);
    assert!(!us.conv.smp_in_progress());

    // They abort after we answered (we wait for SMP3).
    us.notices.clear();
    let w = peer.smp_start("z");
    ferry(&mut us, &mut peer, Vec::new(), w);
    let a = us.conv.handle_smp_answer("z", NOW, &mut us.rng);
    let w = us.apply(a);
    // Do not deliver our SMP2: the peer's user aborts first.
    drop(w);
    let w = peer.smp_abort();
    ferry(&mut us, &mut peer, Vec::new(), w);
    assert!(us.notices.contains(&Notice::SmpAborted), "{:?}", us.notices);
    assert!(!us.conv.smp_in_progress());

    // After all that, SMP still works and the session is intact.
    let out = we_start(&mut us, &mut peer, None, "final", "final");
    assert!(out.has_event("smp_success"), "{kind}: {out:?}");
    assert!(succeeded(&us, &peer));
    still_private(&mut us, &mut peer);
    assert_eq!(peer.status().state, MsgState::Encrypted);
}

#[test]
fn smp_with_libotr_v3_both_roles() {
    run_all(PeerKind::Libotr, 1);
}

#[test]
fn smp_with_potr_v2_both_roles() {
    run_all(PeerKind::Potr, 2);
}

/// Rust ↔ Rust through two conversations: SMP over real encrypted data
/// messages, both outcomes, and the session keeps working.
#[test]
fn smp_between_two_rust_conversations() {
    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let bob_key = Arc::new(DsaPrivateKey::generate(&mut rng));
    let mut a = Us::new(3);
    let mut b = Us {
        conv: Conversation::new(Config::new(THEM, 0x8765_4321), bob_key),
        rng: ChaCha20Rng::seed_from_u64(4),
        notices: Vec::new(),
        texts: Vec::new(),
    };
    // Deliver until quiet.
    fn pump(a: &mut Us, b: &mut Us, mut to_b: Vec<String>) {
        let mut to_a: Vec<String> = Vec::new();
        for _ in 0..100 {
            if to_b.is_empty() && to_a.is_empty() {
                return;
            }
            for m in std::mem::take(&mut to_b) {
                let x = b.conv.handle_incoming(&m, NOW, &mut b.rng);
                to_a.extend(b.apply(x));
            }
            for m in std::mem::take(&mut to_a) {
                let x = a.conv.handle_incoming(&m, NOW, &mut a.rng);
                to_b.extend(a.apply(x));
            }
        }
        panic!("ping-pong");
    }
    let q = a.conv.handle_start(NOW);
    let q = a.apply(q);
    pump(&mut a, &mut b, q);
    assert!(a.conv.is_private() && b.conv.is_private());

    for (sa, sb, ok) in [("same", "same", true), ("one", "two", false)] {
        a.notices.clear();
        b.notices.clear();
        let x = a.conv.handle_smp_start(sa, Some("q?"), NOW, &mut a.rng);
        let w = a.apply(x);
        pump(&mut a, &mut b, w);
        assert_eq!(
            b.smp_notices(),
            vec![&Notice::SmpRequested {
                question: Some("q?".into())
            }]
        );
        let x = b.conv.handle_smp_answer(sb, NOW, &mut b.rng);
        let w = b.apply(x);
        pump(&mut b, &mut a, w);
        let a_fpr = our_key().public_key().fingerprint();
        if ok {
            assert!(
                b.notices
                    .contains(&Notice::SmpSucceeded { fingerprint: a_fpr })
            );
            assert!(
                a.notices
                    .iter()
                    .any(|n| matches!(n, Notice::SmpSucceeded { .. }))
            );
        } else {
            assert!(b.notices.contains(&Notice::SmpFailed), "{:?}", b.notices);
            assert!(a.notices.contains(&Notice::SmpFailed), "{:?}", a.notices);
        }
        assert!(!a.conv.smp_in_progress() && !b.conv.smp_in_progress());
    }
    let x = a.conv.handle_outgoing("still private", NOW, &mut a.rng);
    let w = a.apply(x);
    pump(&mut a, &mut b, w);
    assert_eq!(b.texts, vec!["still private".to_owned()]);
}
