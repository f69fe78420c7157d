//! OTR version 3 (and 2) protocol core, sans-IO, with the O2TR offline
//! extension.
//!
//! Nothing here opens sockets, reads the clock or owns a global RNG: `now`
//! and `rng` are parameters, and every state change is returned as an
//! [`conversation::Action`] for the caller to carry out.
//!
//! * [`codec`], [`message`], [`fragment`], [`tlv`] — the wire format.
//! * [`crypto`] — the only user of primitive crates: DH group, DSA, AES-CTR,
//!   HMAC, fingerprints.
//! * [`ake`] — the authenticated key exchange.
//! * [`keys`] — the data-message key ratchet.
//! * [`smp`] — the Socialist Millionaires' Protocol.
//! * [`offline`] — O2TR: the EKM snapshot of an encrypted session.
//! * [`conversation`] — the message state machine per peer; the API the
//!   proxy uses.

pub mod ake;
pub mod codec;
pub mod conversation;
pub mod crypto;
pub mod decode;
pub mod fragment;
pub mod message;
pub mod tlv;

pub mod error;
pub mod keys;
pub mod offline;
pub mod policy;
pub mod smp;
