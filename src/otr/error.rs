//! Errors of the OTR core.
//!
//! [`enum@Error`] separates malformed input ([`Error::Message`], [`Error::Codec`])
//! from a well-formed message that fails a protocol check
//! ([`PeerMisbehaved`]). The conversation layer decides from the error which
//! notice the user gets and whether the peer gets an OTR error message.

use thiserror::Error;

use super::codec::CodecError;
use super::crypto::CryptoError;
use super::fragment::FragmentError;
use super::message::MessageError;
use super::tlv::TlvError;

/// Any failure inside the OTR core.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A field could not be decoded.
    #[error("malformed field: {0}")]
    Codec(#[from] CodecError),
    /// The message could not be parsed.
    #[error("malformed message: {0}")]
    Message(#[from] MessageError),
    /// A fragment was invalid.
    #[error("bad fragment: {0}")]
    Fragment(#[from] FragmentError),
    /// The TLV section of a decrypted message was malformed.
    #[error("malformed TLVs: {0}")]
    Tlv(#[from] TlvError),
    /// A key or group element was invalid.
    #[error("cryptographic check failed: {0}")]
    Crypto(#[from] CryptoError),
    /// A well-formed message failed a protocol check.
    #[error("protocol check failed: {0}")]
    Peer(#[from] PeerMisbehaved),
    /// An EKM snapshot could not be decoded.
    #[error("invalid snapshot: {0}")]
    Snapshot(&'static str),
}

/// Protocol checks a well-formed message can fail.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerMisbehaved {
    /// Reveal Signature carried an `r` that is not 16 bytes.
    #[error("revealed key is not 128 bits")]
    BadRevealedKey,
    /// The revealed gx does not hash to the committed value.
    #[error("D-H commitment does not match the revealed value")]
    CommitmentMismatch,
    /// The MAC over the encrypted signature did not verify.
    #[error("AKE MAC mismatch")]
    AkeMacMismatch,
    /// A keyid of 0 was sent where the spec requires > 0.
    #[error("keyid 0")]
    ZeroKeyid,
    /// The long-term signature did not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The data message names keys we do not have.
    #[error("data message uses unknown keyids")]
    UnknownKeyids,
    /// The data-message MAC did not verify.
    #[error("data message MAC mismatch")]
    DataMacMismatch,
    /// The counter was received before (a replay) or is older than the
    /// replay window ([`crate::otr::keys::REPLAY_WINDOW`]).
    #[error("counter already received or too old (replay?)")]
    CounterReused,
    /// The top half of the counter was zero.
    #[error("counter is zero")]
    ZeroCounter,
    /// A data message arrived with no session to decrypt it.
    #[error("no encrypted session for this data message")]
    NotEncrypted,
    /// The message was for another instance of our account.
    #[error("message addressed to another instance")]
    WrongInstance,
}
