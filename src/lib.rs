//! # o2tr-proxy
//!
//! A local XMPP proxy that applies OTR version 3 (and 2) end-to-end
//! encryption, extended with the O2TR offline mechanism, to chat message
//! bodies of any unmodified client.
//!
//! The crate is a sans-IO core with thin I/O at the edge:
//!
//! * [`otr`] — OTR v2/v3 and O2TR as pure, deterministic state machines:
//!   bytes, time and randomness in; actions out.
//! * [`store`] — durable state (keys, instance tags, trust, EKM snapshots,
//!   held messages) behind a small trait; SQLite or in memory.
//! * [`xmpp`] — sans-IO XMPP: stream framer, element tree, stanza
//!   rewriting, stream feature filtering, JIDs.
//! * [`proxy`] — tokio: listener, STARTTLS on both legs, per-connection
//!   relay and the [`proxy::StanzaHook`] the OTR router plugs into.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod certs;
pub mod config;
pub mod libotr_import;
pub mod otr;
pub mod proxy;
pub mod router;
pub mod store;
pub mod telemetry;
pub mod xmpp;
