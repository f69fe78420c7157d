//! The local account's identity: its long-term DSA key and its OTR
//! instance tag, both kept in the store so fingerprints and offline
//! messages (addressed to the instance tag) survive restarts.

use std::sync::Arc;

use rand_core::CryptoRng;

use crate::otr::crypto::DsaPrivateKey;
use crate::otr::message::MIN_INSTANCE_TAG;
use crate::store::{self, Store};

/// Failure to load or create an account identity.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] store::Error),
    /// The stored key could not be decoded.
    #[error("stored private key for {account} is invalid: {cause}")]
    BadKey {
        /// The account.
        account: String,
        /// Why.
        cause: crate::otr::crypto::CryptoError,
    },
}

/// An account's long-term key and instance tag.
pub struct Identity {
    /// Long-term DSA key.
    pub key: Arc<DsaPrivateKey>,
    /// Our instance tag.
    pub tag: u32,
}

/// Load the identity of `account` (a bare JID), creating what is missing.
/// Key generation takes from a fraction of a second to a few seconds.
pub fn load_or_create<R: CryptoRng + ?Sized>(
    store: &mut dyn Store,
    account: &str,
    rng: &mut R,
) -> Result<Identity, AccountError> {
    let key = match store.account_key(account)? {
        Some(bytes) => DsaPrivateKey::from_bytes(&bytes).map_err(|cause| AccountError::BadKey {
            account: account.to_string(),
            cause,
        })?,
        None => {
            tracing::info!(account, "generating a long-term OTR key for this account");
            let key = DsaPrivateKey::generate(rng);
            store.set_account_key(account, &key.to_bytes())?;
            tracing::info!(account, fingerprint = %key.public_key().fingerprint(), "new key");
            key
        }
    };
    let tag = match store.instance_tag(account)? {
        Some(t) if t >= MIN_INSTANCE_TAG => t,
        _ => {
            let t = random_tag(rng);
            store.set_instance_tag(account, t)?;
            t
        }
    };
    Ok(Identity {
        key: Arc::new(key),
        tag,
    })
}

/// A random instance tag >= 0x100 (spec §"Instance Tags").
pub fn random_tag<R: CryptoRng + ?Sized>(rng: &mut R) -> u32 {
    loop {
        let t = rng.next_u32();
        if t >= MIN_INSTANCE_TAG {
            return t;
        }
    }
}
