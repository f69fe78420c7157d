//! Interop acceptance tests (issue 2): our OTR core against potr
//! (v2 only), driven through `tests/common/peer.rs`. The scenarios live in
//! `tests/common/interop.rs` and are shared with the other peer.
//!
//! Needs the peers installed (`scripts/install-test-deps.sh`).

mod common;

use common::interop::*;
use common::peer::PeerKind;

const KIND: PeerKind = PeerKind::Potr;

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
