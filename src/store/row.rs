//! Conversions between SQLite rows and the store's records: integer range
//! checks, enum codes, and secret columns copied straight into zeroizing
//! buffers (DESIGN §2 store).

use rusqlite::{Connection, Row};
use zeroize::Zeroizing;

use crate::otr::crypto::SecretBytes;

use super::{
    ConversationKey, Error, FingerprintRecord, HeldMessage, Result, SessionState, SnapshotRecord,
    Trust,
};

pub(super) fn to_i64(v: u64, what: &'static str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::OutOfRange(what))
}

pub(super) fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Corrupt(format!("negative {what}: {v}")))
}

pub(super) fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Corrupt(format!("{what} out of range: {v}")))
}

/// A snapshot row as read, before its integers are validated.
pub(super) struct RawSnapshot {
    account: String,
    peer: String,
    instance: i64,
    state: i64,
    data: SecretBytes,
    created_at: i64,
    updated_at: i64,
}

pub(super) const SNAPSHOT_COLUMNS: &str =
    "account, peer, instance, state, data, created_at, updated_at";

impl RawSnapshot {
    pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            account: r.get(0)?,
            peer: r.get(1)?,
            instance: r.get(2)?,
            state: r.get(3)?,
            // Copied straight from SQLite's buffer into a zeroizing Vec.
            data: SecretBytes::from_slice(r.get_ref(4)?.as_blob()?),
            created_at: r.get(5)?,
            updated_at: r.get(6)?,
        })
    }

    pub(super) fn into_record(self) -> Result<SnapshotRecord> {
        Ok(SnapshotRecord {
            key: ConversationKey {
                account: self.account,
                peer: self.peer,
                instance: to_u32(self.instance, "instance tag")?,
            },
            state: SessionState::from_code(self.state)?,
            data: self.data,
            created_at: to_u64(self.created_at, "created_at")?,
            updated_at: to_u64(self.updated_at, "updated_at")?,
        })
    }
}

pub(super) type RawFingerprint = (String, String, Vec<u8>, i64, i64);

pub(super) const FINGERPRINT_COLUMNS: &str = "account, peer, fingerprint, trust, first_seen";

pub(super) fn fingerprint_record(raw: RawFingerprint) -> Result<FingerprintRecord> {
    let (account, peer, fpr, trust, first_seen) = raw;
    let fingerprint: [u8; 20] = fpr
        .as_slice()
        .try_into()
        .map_err(|_| Error::Corrupt(format!("fingerprint of {} bytes", fpr.len())))?;
    Ok(FingerprintRecord {
        account,
        peer,
        fingerprint,
        trust: Trust::from_code(trust)?,
        first_seen: to_u64(first_seen, "first_seen")?,
    })
}

pub(super) const HELD_COLUMNS: &str = "id, account, peer, text, queued_at";

pub(super) fn held_from_row(r: &Row<'_>) -> rusqlite::Result<(HeldMessage, i64)> {
    Ok((
        HeldMessage {
            id: r.get(0)?,
            account: r.get(1)?,
            peer: r.get(2)?,
            text: Zeroizing::new(r.get_ref(3)?.as_str()?.to_owned()),
            queued_at: 0,
        },
        r.get(4)?,
    ))
}

pub(super) fn held_record((mut m, queued_at): (HeldMessage, i64)) -> Result<HeldMessage> {
    m.queued_at = to_u64(queued_at, "queued_at")?;
    Ok(m)
}

pub(super) fn ensure_account(conn: &Connection, account: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO account(account) VALUES (?1)",
        [account],
    )?;
    Ok(())
}
