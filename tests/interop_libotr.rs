//! Interop acceptance tests (issue 2): our OTR core against libotr
//! (v3, instance tags), driven through `tests/common/peer.rs`. The scenarios live in
//! `tests/common/interop.rs` and are shared with the other peer.
//!
//! Needs the peers installed (`scripts/install-test-deps.sh`).

mod common;

use common::interop::*;
use common::peer::{PeerKind, PeerOptions, PeerPolicy};
use o2tr_proxy::otr::policy::Policy;

const KIND: PeerKind = PeerKind::Libotr;

#[test]
fn ake_we_start() {
    scenario_ake(KIND, true);
}

#[test]
fn ake_they_start() {
    scenario_ake(KIND, false);
}

#[test]
fn alternating_200_messages() {
    scenario_alternating(KIND, 200);
}

#[test]
fn burst_of_50_then_reply() {
    scenario_burst(KIND);
}

#[test]
fn fragmented_both_sides() {
    scenario_fragmented(KIND, 180);
}

#[test]
fn whitespace_tag_from_us_starts_ake() {
    scenario_whitespace(KIND, true);
}

#[test]
fn whitespace_tag_from_peer_starts_ake() {
    scenario_whitespace(KIND, false);
}

#[test]
fn peer_ends_session() {
    scenario_peer_ends(KIND);
}

#[test]
fn we_end_session() {
    scenario_we_end(KIND);
}

#[test]
fn tampered_ciphertext_from_peer_rejected() {
    scenario_tampered_incoming(KIND, Tamper::Ciphertext);
}

#[test]
fn tampered_mac_from_peer_rejected() {
    scenario_tampered_incoming(KIND, Tamper::Mac);
}

#[test]
fn tampered_ciphertext_to_peer_rejected() {
    scenario_tampered_outgoing(KIND, Tamper::Ciphertext);
}

#[test]
fn tampered_mac_to_peer_rejected() {
    scenario_tampered_outgoing(KIND, Tamper::Mac);
}

#[test]
fn replay_from_peer_rejected() {
    scenario_replay_incoming(KIND);
}

#[test]
fn replay_to_peer_rejected() {
    scenario_replay_outgoing(KIND);
}

#[test]
fn heartbeat_after_silence() {
    scenario_heartbeat(KIND);
}

#[test]
fn smp_request_is_refused_with_abort() {
    scenario_smp_refused(KIND);
}

/// Extra: libotr restricted to version 2 (no instance tags), with
/// fragmentation, both sides starting.
#[test]
fn version_2_with_libotr() {
    for we_start in [true, false] {
        let mut cfg = config(Policy::Always);
        cfg.max_message_bytes = 200;
        let opts = PeerOptions::policy(PeerPolicy::V2).with_fragment_size(200);
        let mut l = Link::new(KIND, &opts, cfg, 14);
        l.establish(we_start);
        assert_eq!(l.peer.status().version, Some(2));
        for i in 0..10 {
            l.we_say(&format!("v2 message {i} {}", "z".repeat(i * 40)));
            l.they_say(&format!("v2 answer {i} {}", "w".repeat(i * 40)));
        }
        assert!(l.wire_log.iter().any(|(_, m)| m.starts_with("?OTR,")));
    }
}
