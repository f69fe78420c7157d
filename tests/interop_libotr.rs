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

interop_acceptance_tests!(KIND);

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
