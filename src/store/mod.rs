//! Durable state of the proxy (DESIGN §2 "store", §5 EKM snapshots).
//!
//! The OTR core hands us opaque serialized blobs (long-term DSA private keys,
//! EKM snapshots); this module keeps them, together with the small amount of
//! metadata the router needs:
//!
//! * per local account: the long-term private key (opaque bytes) and our OTR
//!   instance tag (OTR v3 §"Instance Tags": stable across restarts);
//! * per (account, peer): the peers' fingerprints and the trust we give them;
//! * per conversation (account, peer bare JID, peer instance tag): the EKM
//!   snapshot (opaque bytes) with its [`SessionState`] and timestamps;
//! * outgoing messages held by policy (DESIGN §3, policy `always`), in FIFO
//!   order;
//! * the *inbox*: decrypted plaintexts committed together with the snapshot
//!   that consumed them and kept until the client has them ([`ekm`]);
//! * the *outbox*: encrypted outgoing stanzas (data messages, and the AKE
//!   Signature message that completes the peer's side of a new session)
//!   committed together with the snapshot that produced them and kept
//!   until written to (or, with upstream XEP-0198, acknowledged by) the
//!   server;
//! * per (account, peer): the partially reassembled incoming fragments;
//! * per conversation: the record of a handshake of ours that sent its
//!   Reveal Signature and waits for the Signature (the peer may be private
//!   already), until the handshake completes or is abandoned.
//!
//! Everything goes through the small [`Store`] trait, with two
//! implementations: [`MemoryStore`] for tests and [`SqliteStore`], the
//! embedded SQLite database the product uses.
//!
//! # Contract
//!
//! * **Persist before release** (DESIGN §5): every mutating call is durable
//!   when it returns `Ok` — for [`SqliteStore`] the transaction is committed
//!   with `synchronous=FULL`, so the WAL is fsynced before the call returns.
//!   The exception are the acknowledgements [`Store::ack_inbox`] and
//!   [`Store::ack_outbox`]: committed in order but not fsynced, so a power
//!   cut may undo the newest ones (an entry is then handed out once more,
//!   at-least-once, which the router and the peer tolerate). A call that
//!   returns `Err` changed nothing.
//! * **Wiping**: replaced or deleted snapshots, keys, held messages and
//!   acknowledged inbox plaintexts do not stay on disk: `secure_delete=ON`
//!   zeroes freed content in the database file at once, and the old page
//!   versions leave the WAL at the next `wal_checkpoint(TRUNCATE)`: at once
//!   for the explicit [`Store::delete_snapshot`] and
//!   [`Store::expire_snapshots`]; for the per-message changes, by
//!   [`Store::maintenance`] (the router calls it every second and on
//!   disconnect), when the WAL grows past [`WAL_WIPE_BYTES`], at open
//!   (after a crash) and at close. Bound: superseded key material is on
//!   disk ~1–2 s at most while the proxy runs; a crash inside that window
//!   leaves it in the `-wal` file until the next start.
//! * Secrets come back wrapped in [`Zeroizing`] (snapshots in
//!   [`SecretBytes`], which wipes a word at a time); no type here prints
//!   secret bytes through `Debug`.
//! * Time is passed in (`now`, unix seconds); the store never reads a clock.
//! * Stores are synchronous and `Send`; an async caller wraps one in a mutex
//!   and calls it from `spawn_blocking`.
//! * Accounts are created implicitly: any write that names an account makes
//!   it known, and [`Store::accounts`] lists every known account.

mod disk;
pub mod ekm;
mod memory;
mod row;
mod schema;
mod sqlite;
#[cfg(test)]
mod suite;

use std::fmt;
use std::path::PathBuf;

use zeroize::Zeroizing;

use crate::otr::crypto::SecretBytes;

pub use ekm::{CommitReceipt, DurableOp, InboxEntry, InboxMessage, OutboxMessage, PeerStep};
pub use memory::MemoryStore;
pub use schema::SCHEMA_VERSION;
pub use sqlite::{DB_FILE_NAME, SqliteStore, WAL_WIPE_BYTES};

/// Result of every store operation.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the store.
///
/// The "refuse to open" variants ([`Error::UnsafePermissions`],
/// [`Error::NewerSchema`], [`Error::NotADatabase`], [`Error::Corrupt`]) are
/// returned by the `open*` constructors before anything on disk was changed;
/// the application is expected to report them and exit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from SQLite.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file-system operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The state directory is group/world writable, or the database file (or
    /// its `-wal`/`-shm` companion) is accessible by group or others.
    #[error(
        "refusing to use {path}: its mode {mode:04o} lets other users read or modify it \
         (expected 0700 for the directory, 0600 for database files; fix with chmod)"
    )]
    UnsafePermissions {
        /// The offending file or directory.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    /// The database was written by a newer version of this program.
    #[error(
        "database schema version {found} is newer than the supported version {supported}; \
         upgrade o2tr-proxy"
    )]
    NewerSchema {
        /// The schema version found in the file (`PRAGMA user_version`).
        found: u32,
        /// The newest schema version this build knows.
        supported: u32,
    },
    /// The file is not an SQLite database (or not a regular file).
    #[error("{path} is not an SQLite database")]
    NotADatabase {
        /// The offending file.
        path: PathBuf,
    },
    /// The database is damaged or holds a value this build cannot decode.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// A value passed in cannot be stored (e.g. a time beyond `i64::MAX`).
    #[error("value out of range: {0}")]
    OutOfRange(&'static str),
    /// A WAL checkpoint could not complete because another connection is
    /// reading; old content may remain in the `-wal` file until the next
    /// checkpoint.
    #[error("WAL checkpoint incomplete: another connection is reading the database")]
    CheckpointBusy,
}

/// The trust we give a peer's fingerprint (DESIGN §4: trust on first use with
/// explicit verification).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trust {
    /// Seen, not verified (trust on first use).
    Unverified,
    /// Verified by the user (fingerprint comparison or SMP).
    Verified,
    /// Explicitly distrusted by the user.
    Distrusted,
}

impl Trust {
    pub(crate) fn to_code(self) -> i64 {
        match self {
            Trust::Unverified => 0,
            Trust::Verified => 1,
            Trust::Distrusted => 2,
        }
    }

    pub(crate) fn from_code(code: i64) -> Result<Self> {
        match code {
            0 => Ok(Trust::Unverified),
            1 => Ok(Trust::Verified),
            2 => Ok(Trust::Distrusted),
            other => Err(Error::Corrupt(format!("unknown trust code {other}"))),
        }
    }
}

/// State of a conversation's EKM snapshot (DESIGN §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// The session is live in memory; the snapshot mirrors it.
    Live,
    /// The client or upstream went away; the snapshot waits for OMD /
    /// resumption.
    Suspended,
    /// The conversation was ended explicitly.
    Finished,
}

impl SessionState {
    pub(crate) fn to_code(self) -> i64 {
        match self {
            SessionState::Live => 0,
            SessionState::Suspended => 1,
            SessionState::Finished => 2,
        }
    }

    pub(crate) fn from_code(code: i64) -> Result<Self> {
        match code {
            0 => Ok(SessionState::Live),
            1 => Ok(SessionState::Suspended),
            2 => Ok(SessionState::Finished),
            other => Err(Error::Corrupt(format!(
                "unknown session state code {other}"
            ))),
        }
    }
}

/// Identifies one conversation: local account, peer bare JID, peer instance
/// tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationKey {
    /// Local account (bare JID).
    pub account: String,
    /// Peer bare JID.
    pub peer: String,
    /// The peer's OTR instance tag (0 for OTR v2 peers).
    pub instance: u32,
}

impl ConversationKey {
    /// Builds a key from its parts.
    pub fn new(account: impl Into<String>, peer: impl Into<String>, instance: u32) -> Self {
        Self {
            account: account.into(),
            peer: peer.into(),
            instance,
        }
    }
}

/// A stored EKM snapshot. `Debug` does not print `data`.
#[derive(Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The conversation.
    pub key: ConversationKey,
    /// Live / suspended / finished.
    pub state: SessionState,
    /// The opaque serialized snapshot from the OTR core (wiped a word at a
    /// time: the memory store replaces one per message).
    pub data: SecretBytes,
    /// When the snapshot was first saved (unix seconds).
    pub created_at: u64,
    /// When it was last saved or its state changed (unix seconds).
    pub updated_at: u64,
}

impl fmt::Debug for SnapshotRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotRecord")
            .field("key", &self.key)
            .field("state", &self.state)
            .field(
                "data",
                &format_args!("<{} bytes redacted>", self.data.len()),
            )
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// A stored handshake record ([`DurableOp::SaveHandshake`]). `Debug` does
/// not print `data`.
#[derive(Clone, PartialEq, Eq)]
pub struct HandshakeRecord {
    /// The peer's instance tag.
    pub instance: u32,
    /// The opaque record from the OTR core (secret).
    pub data: SecretBytes,
}

impl fmt::Debug for HandshakeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeRecord")
            .field("instance", &self.instance)
            .field(
                "data",
                &format_args!("<{} bytes redacted>", self.data.len()),
            )
            .finish()
    }
}

/// A peer fingerprint we have seen, with its trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FingerprintRecord {
    /// Local account.
    pub account: String,
    /// Peer bare JID.
    pub peer: String,
    /// SHA-1 of the peer's DSA public key (libotr's fingerprint).
    pub fingerprint: [u8; 20],
    /// The trust given to it.
    pub trust: Trust,
    /// When it was first stored (unix seconds).
    pub first_seen: u64,
}

/// An outgoing message held by policy until the session is private.
/// `Debug` does not print `text`.
#[derive(Clone, PartialEq, Eq)]
pub struct HeldMessage {
    /// Store-assigned id, increasing in queue order, never reused.
    pub id: i64,
    /// Local account.
    pub account: String,
    /// Peer bare JID.
    pub peer: String,
    /// The plaintext body.
    pub text: Zeroizing<String>,
    /// When it was held (unix seconds).
    pub queued_at: u64,
}

impl fmt::Debug for HeldMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldMessage")
            .field("id", &self.id)
            .field("account", &self.account)
            .field("peer", &self.peer)
            .field(
                "text",
                &format_args!("<{} bytes redacted>", self.text.len()),
            )
            .field("queued_at", &self.queued_at)
            .finish()
    }
}

/// The store's interface. See the module docs for the contract (durable on
/// return, wiping, no clock).
///
/// Listings are ordered deterministically, as documented on each method, and
/// both implementations return identical results for identical calls.
pub trait Store: Send {
    /// The long-term private key of `account` (opaque bytes), if any.
    fn account_key(&self, account: &str) -> Result<Option<Zeroizing<Vec<u8>>>>;
    /// Stores (or replaces, wiping the old one) the private key of `account`.
    fn set_account_key(&mut self, account: &str, key: &[u8]) -> Result<()>;
    /// Every account the store knows (anything was stored for it), sorted.
    fn accounts(&self) -> Result<Vec<String>>;

    /// Our instance tag for `account`, if one was stored.
    fn instance_tag(&self, account: &str) -> Result<Option<u32>>;
    /// Stores (or replaces) our instance tag for `account`.
    fn set_instance_tag(&mut self, account: &str, tag: u32) -> Result<()>;

    /// Fingerprints of `peer` seen by `account`, ordered by `first_seen` then
    /// fingerprint bytes.
    fn fingerprints(&self, account: &str, peer: &str) -> Result<Vec<FingerprintRecord>>;
    /// All fingerprints, ordered by account, peer, `first_seen`, fingerprint.
    fn all_fingerprints(&self) -> Result<Vec<FingerprintRecord>>;
    /// Inserts a fingerprint with `trust` and `first_seen = now`, or, if it is
    /// already known, updates its trust only (keeping `first_seen`).
    fn set_fingerprint(
        &mut self,
        account: &str,
        peer: &str,
        fingerprint: &[u8; 20],
        trust: Trust,
        now: u64,
    ) -> Result<()>;
    /// Forgets a fingerprint; returns whether it was known.
    fn remove_fingerprint(
        &mut self,
        account: &str,
        peer: &str,
        fingerprint: &[u8; 20],
    ) -> Result<bool>;

    /// The snapshot of one conversation, if any.
    fn snapshot(&self, key: &ConversationKey) -> Result<Option<SnapshotRecord>>;
    /// Snapshots of every instance of `peer` for `account`, ordered by
    /// instance tag.
    fn snapshots_for_peer(&self, account: &str, peer: &str) -> Result<Vec<SnapshotRecord>>;
    /// All snapshots, ordered by account, peer, instance (for a `sessions`
    /// listing: the caller must not print `data`).
    fn snapshots(&self) -> Result<Vec<SnapshotRecord>>;
    /// Saves the snapshot of a conversation: inserts it (`created_at =
    /// updated_at = now`) or replaces data and state (`updated_at = now`,
    /// `created_at` kept; the old bytes are wiped). Durable on return.
    fn save_snapshot(
        &mut self,
        key: &ConversationKey,
        state: SessionState,
        data: &[u8],
        now: u64,
    ) -> Result<()>;
    /// Changes the state of a snapshot (and `updated_at = now`); returns
    /// whether the snapshot exists.
    fn set_snapshot_state(
        &mut self,
        key: &ConversationKey,
        state: SessionState,
        now: u64,
    ) -> Result<bool>;
    /// Deletes (and wipes) a snapshot; returns whether it existed.
    fn delete_snapshot(&mut self, key: &ConversationKey) -> Result<bool>;
    /// Deletes (and wipes) every snapshot, whatever its state, whose
    /// `updated_at` is strictly less than `older_than`; returns the deleted
    /// keys ordered by account, peer, instance, so the caller can notify.
    fn expire_snapshots(&mut self, older_than: u64) -> Result<Vec<ConversationKey>>;

    /// Holds an outgoing message; returns its id (increasing, never reused).
    fn hold_message(&mut self, account: &str, peer: &str, text: &str, now: u64) -> Result<i64>;
    /// Messages held for `peer` by `account`, oldest first (FIFO).
    fn held_messages(&self, account: &str, peer: &str) -> Result<Vec<HeldMessage>>;
    /// All held messages, oldest first.
    fn all_held_messages(&self) -> Result<Vec<HeldMessage>>;
    /// The peers `account` holds messages for, sorted (reads no message
    /// text: a connection asks at bind which conversations to open).
    fn held_peers(&self, account: &str) -> Result<Vec<String>>;
    /// Removes (and wipes) a held message once it has been sent; returns
    /// whether it existed.
    fn release_held(&mut self, id: i64) -> Result<bool>;

    /// Applies the durable part of one OTR core step for (`account`, `peer`)
    /// atomically, in order: snapshot saves (state and data, `updated_at =
    /// now`) and deletions of that peer's instances, held messages, inbox
    /// entries (`received_at = now`). Either every op is durable on return,
    /// or (on `Err`) none is. Replaced and deleted snapshot bytes are wiped
    /// as by [`Store::save_snapshot`] / [`Store::delete_snapshot`]. See
    /// [`ekm`] for why the inbox must share the snapshot's transaction.
    ///
    /// The same as a [`Store::commit_steps`] group of one step.
    fn commit_step(
        &mut self,
        account: &str,
        peer: &str,
        ops: &[DurableOp],
        now: u64,
    ) -> Result<CommitReceipt> {
        let mut receipts = self.commit_steps(account, &[PeerStep { peer, ops }], now)?;
        Ok(receipts.pop().unwrap_or_default())
    }
    /// Group commit: applies several steps of `account` (each as by
    /// [`Store::commit_step`], one after the other, in the order given, so
    /// a later step sees what an earlier one held, released or replaced)
    /// in **one** atomic, durable transaction — for [`SqliteStore`] one
    /// WAL fsync for the whole group. Either every step is durable on
    /// return, or (on `Err`) none is. Returns one receipt per step, in
    /// order; ids keep increasing across the steps.
    fn commit_steps(
        &mut self,
        account: &str,
        steps: &[PeerStep<'_>],
        now: u64,
    ) -> Result<Vec<CommitReceipt>>;
    /// Inbox entries of (`account`, `peer`) not yet acknowledged, oldest
    /// (lowest id) first.
    fn inbox(&self, account: &str, peer: &str) -> Result<Vec<InboxMessage>>;
    /// Every inbox entry not yet acknowledged, by id.
    fn all_inbox(&self) -> Result<Vec<InboxMessage>>;
    /// Removes (and wipes) every inbox entry of (`account`, `peer`) whose id
    /// is at most `through` (the client has them); returns how many.
    fn ack_inbox(&mut self, account: &str, peer: &str, through: i64) -> Result<usize>;

    /// Outbox entries of `account` not yet acknowledged, every peer, oldest
    /// (lowest id) first: re-send them, in this order, before new traffic.
    fn outbox(&self, account: &str) -> Result<Vec<OutboxMessage>>;
    /// Removes one outbox entry once its stanza was written to the server;
    /// returns whether it existed.
    fn ack_outbox(&mut self, id: i64) -> Result<bool>;
    /// The partially reassembled incoming fragments of (`account`, `peer`)
    /// stored by the last [`DurableOp::Fragments`], in order.
    fn fragments(&self, account: &str, peer: &str) -> Result<Vec<String>>;
    /// The handshake records of (`account`, `peer`)
    /// ([`DurableOp::SaveHandshake`]), by instance.
    fn handshakes(&self, account: &str, peer: &str) -> Result<Vec<HandshakeRecord>>;

    /// Finishes deferred wiping: removes content that earlier calls
    /// replaced or deleted from any journal it still lingers in
    /// ([`SqliteStore`]: a `wal_checkpoint(TRUNCATE)`, only if such content
    /// is pending, so an idle call costs nothing). Call it about once a
    /// second and before shutting down; that bounds how long superseded
    /// keys and plaintexts stay on disk. [`Error::CheckpointBusy`] when
    /// another connection's read prevented it (retry later). The default
    /// (for stores with no journal, like [`MemoryStore`]) does nothing.
    fn maintenance(&mut self) -> Result<()> {
        Ok(())
    }
}
