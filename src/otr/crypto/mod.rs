//! Cryptographic primitives of OTR version 3 (spec §"Notation and
//! definitions", §"Public keys, signatures, and fingerprints", §"Computing
//! AES keys and MAC keys").
//!
//! This module is the only user of the primitive crates in the OTR core:
//!
//! * [`dh`] — the RFC 3526 1536-bit MODP group (generator 2) with 320-bit
//!   secret exponents, constant-time in the secret, and the `h1`/`h2` key
//!   derivation over the shared secret's MPI encoding ("secbytes").
//! * [`sym`] — AES-128 in OTR's counter layout, SHA-1/SHA-256, the HMACs
//!   and a constant-time comparison.
//! * [`dsa`] — OTR's long-term DSA keys (PUBKEY encoding, fingerprints,
//!   signatures over a 32-byte value taken **mod q**).
//! * [`secret`] — [`SecretBytes`], a byte buffer wiped a word at a time
//!   (the EKM snapshot).
//!
//! Randomness is always a parameter (`rng`); nothing here reads a global
//! RNG. Secret material is zeroized on drop and never printed by `Debug`.

pub mod dh;
pub mod dsa;
pub mod secret;
pub mod sym;

use thiserror::Error;

use super::codec::CodecError;

pub use self::dh::{DH_MODULUS_BYTES, DhKeyPair, DhPublicKey, SharedSecret, h1, h2};
pub use self::dsa::{DsaPrivateKey, DsaPublicKey, Fingerprint, PUBKEY_TYPE_DSA};
pub use self::secret::SecretBytes;

pub use self::sym::{
    AesCtrKey, HmacSha1Key, aes128_ctr, ct_eq, hmac_sha1, hmac_sha256, hmac_sha256_160, sha1,
    sha256,
};

/// Errors from decoding or validating cryptographic values.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// A Diffie-Hellman public value was outside `2 ..= p-2` (or longer
    /// than the modulus).
    #[error("Diffie-Hellman public value out of range")]
    DhOutOfRange,
    /// A key (public or private) failed validation; the text says which
    /// check.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// The key or signature encoding was malformed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A PUBKEY had a type other than DSA (0x0000).
    #[error("unsupported public key type {0:#06x}")]
    UnsupportedPubkeyType(u16),
}

use crypto_bigint::{Limb, Uint, Word};

/// Big-endian bytes (leading zeros allowed) into a `Uint<L>`; `None` if the
/// value needs more than `L` limbs. Variable time in the *length* only.
pub(crate) fn uint_from_be<const L: usize>(bytes: &[u8]) -> Option<Uint<L>> {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    if bytes.len() > L * Limb::BYTES {
        return None;
    }
    let mut limbs = [Limb::ZERO; L];
    for (limb, chunk) in limbs.iter_mut().zip(bytes.rchunks(Limb::BYTES)) {
        let mut word = [0u8; Limb::BYTES];
        word[Limb::BYTES - chunk.len()..].copy_from_slice(chunk);
        *limb = Limb(Word::from_be_bytes(word));
    }
    Some(Uint::new(limbs))
}

/// Fixed-width big-endian bytes of `v` (`L * Limb::BYTES` long).
pub(crate) fn uint_to_be<const L: usize>(v: &Uint<L>) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(L * Limb::BYTES));
    for limb in v.as_limbs().iter().rev() {
        out.extend_from_slice(&limb.0.to_be_bytes());
    }
    out
}

/// Minimal big-endian magnitude of `v` (no leading zero bytes; empty for 0).
pub(crate) fn uint_to_minimal_be<const L: usize>(v: &Uint<L>) -> zeroize::Zeroizing<Vec<u8>> {
    let full = uint_to_be(v);
    let start = full.iter().position(|&b| b != 0).unwrap_or(full.len());
    zeroize::Zeroizing::new(full[start..].to_vec())
}
