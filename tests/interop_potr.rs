//! Interop acceptance tests (issue 2): our OTR core against potr
//! (v2 only), driven through `tests/common/peer.rs`. The scenarios live in
//! `tests/common/interop.rs` and are shared with the other peer.
//!
//! Needs the peers installed (`scripts/install-test-deps.sh`).

mod common;

use common::interop::*;
use common::peer::PeerKind;

const KIND: PeerKind = PeerKind::Potr;

interop_acceptance_tests!(KIND);
