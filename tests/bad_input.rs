//! The curated bad-input corpus (issue 9): every case is built from a real,
//! valid input and then damaged, and states its expected outcome — the
//! typed error, the user notice where a human should know, nothing
//! delivered that failed verification, and the conversation or proxy still
//! working afterwards.
//!
//! Cases live in tables, one module per layer; a table runs all its cases
//! and fails once, naming every case that did not behave.

#[path = "common/pair.rs"]
mod pair;
#[path = "bad_input/support.rs"]
mod support;

#[path = "bad_input/otr_ake.rs"]
mod otr_ake;
#[path = "bad_input/otr_data.rs"]
mod otr_data;
#[path = "bad_input/otr_misc.rs"]
mod otr_misc;
#[path = "bad_input/otr_smp.rs"]
mod otr_smp;
#[path = "bad_input/proxy.rs"]
mod proxy;
#[path = "bad_input/store.rs"]
mod store;
#[path = "bad_input/xml.rs"]
mod xml;
