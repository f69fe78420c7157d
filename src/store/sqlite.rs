//! [`SqliteStore`]: the embedded, durable [`Store`] (DESIGN §2 store, §5
//! "persist before release", "superseded keys are wiped").
//!
//! One SQLite database file, `o2tr.db` in the state directory, opened with
//! WAL, `synchronous=FULL` (each commit fsyncs the WAL before returning),
//! `secure_delete=ON` (freed content is zeroed), foreign keys on. The schema
//! is versioned with `PRAGMA user_version` and a migrations list (`schema.rs`).
//!
//! Two choices keep the per-message cost at one fsync (issue 8):
//!
//! * **Deferred wipe.** Replacing or deleting secret content leaves the old
//!   page versions in the `-wal` file until a `wal_checkpoint(TRUNCATE)`.
//!   That checkpoint (~25 ms) is not run inside every save: the store marks
//!   itself "unwiped" and the owner calls [`Store::maintenance`] about once a
//!   second (the router does, from its tick and on disconnect); the store
//!   also checkpoints by itself when the WAL passes [`WAL_WIPE_BYTES`], when
//!   opened (a crash may have left old bytes in the WAL) and when dropped.
//! * **Relaxed acks.** [`Store::ack_inbox`] and [`Store::ack_outbox`] commit
//!   with `synchronous=NORMAL` (no fsync). In WAL mode commits stay ordered,
//!   so a power cut can only lose the newest acks, never apply one without
//!   the snapshot commit before it; a lost ack means an entry is handed out
//!   again after a restart, which the design tolerates (the client gets a
//!   duplicate inbox message, the peer drops a re-sent stanza as a replay).
//!   The next `FULL` commit (or checkpoint) makes earlier acks durable too.
//!
//! Opening never changes a file it refuses: permissions and the SQLite
//! header are checked first, then the file is opened read-only to check the
//! schema version and run `PRAGMA quick_check`; only then is it opened
//! read-write, switched to WAL and migrated (in one transaction).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use zeroize::Zeroizing;

use super::row::{
    FINGERPRINT_COLUMNS, HELD_COLUMNS, RawFingerprint, RawSnapshot, SNAPSHOT_COLUMNS,
    ensure_account, fingerprint_record, held_from_row, held_record, to_i64, to_u32, to_u64,
};
use super::schema::{
    BUSY_TIMEOUT, check_version, classify, inspect_read_only, migrate, user_version,
};
use super::{
    CommitReceipt, ConversationKey, DurableOp, Error, FingerprintRecord, HandshakeRecord,
    HeldMessage, InboxEntry, InboxMessage, OutboxMessage, PeerStep, Result, SessionState,
    SnapshotRecord, Store,
};
use super::{Trust, disk};

/// File name of the database inside the state directory.
pub const DB_FILE_NAME: &str = "o2tr.db";

/// The WAL size above which a store holding superseded secret bytes
/// checkpoints at the end of a write instead of waiting for
/// [`Store::maintenance`]: bounds both the disk space and how much old
/// content a burst can leave behind.
pub const WAL_WIPE_BYTES: u64 = 4 << 20;

/// The SQLite-backed [`Store`]. `Send`, not `Sync`: share it behind a mutex.
///
/// Every mutating call commits before returning; snapshot, key, held,
/// inbox and outbox writes with `synchronous=FULL`, acks with `NORMAL` (see
/// the module docs). Calls that replace or delete secret content on the
/// per-message path (snapshot replaced, snapshot deleted or held message
/// released inside [`Store::commit_step`], key replaced, held message
/// released, inbox entry acknowledged) leave the old bytes in the `-wal`
/// file until the next `wal_checkpoint(TRUNCATE)`: [`Store::maintenance`] (run it about
/// once a second; it does nothing when nothing is pending), a WAL larger
/// than [`WAL_WIPE_BYTES`], [`SqliteStore::open`] or drop. If a checkpoint
/// cannot complete (another process is reading the database, e.g. a CLI
/// command), the store stays "unwiped" and the next one retries. The rare,
/// explicit [`Store::delete_snapshot`] and [`Store::expire_snapshots`]
/// still checkpoint before returning.
///
/// Cost (measured on the development VM, ext4): a commit is one fsync
/// (~5 ms); a checkpoint ~25 ms. [`SqliteStore::set_wipe_immediately`]
/// restores the checkpoint inside every wiping call (slow; for callers
/// that cannot run maintenance).
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    wal_path: PathBuf,
    wipe_immediately: bool,
    /// Superseded secret content may remain in the `-wal` file.
    unwiped: bool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `state_dir`: the directory is
    /// created with mode 0700 if missing and must not be group/world
    /// writable; the database is `state_dir/o2tr.db` (see [`Self::open_file`]).
    pub fn open(state_dir: &Path) -> Result<Self> {
        disk::ensure_state_dir(state_dir)?;
        Self::open_file(&state_dir.join(DB_FILE_NAME))
    }

    /// Opens (creating with mode 0600 if needed) the database file `path`.
    /// Its directory is not checked (use [`Self::open`] for that).
    ///
    /// Refuses, changing nothing: a file (or its `-wal`/`-shm`) with any
    /// group/other permission bit ([`Error::UnsafePermissions`]), a symlink
    /// or a file that is not SQLite ([`Error::NotADatabase`]), a damaged
    /// database ([`Error::Corrupt`]), a schema newer than this build
    /// ([`Error::NewerSchema`]).
    pub fn open_file(path: &Path) -> Result<Self> {
        let existing = disk::check_private_file(path)?;
        for suffix in ["-wal", "-shm"] {
            disk::check_private_file(&disk::companion(path, suffix))?;
        }
        match existing {
            None => disk::create_private_file(path)?,
            Some(0) => {}
            Some(_) => {
                disk::check_header(path)?;
                inspect_read_only(path)?;
            }
        }

        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let mut conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Per-connection settings; none of these writes to the file.
        conn.pragma_update(None, "trusted_schema", false)?;
        conn.pragma_update(None, "secure_delete", true)?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // Re-check before the first write: a WAL left by a crash may hold a
        // newer header than the main file showed.
        check_version(user_version(&conn).map_err(|e| classify(path, e))?)?;

        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Corrupt(format!(
                "{}: could not enable WAL (journal_mode is {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        let secure: i64 = conn.pragma_query_value(None, "secure_delete", |r| r.get(0))?;
        if secure != 1 {
            return Err(Error::Corrupt("secure_delete could not be enabled".into()));
        }
        migrate(&mut conn)?;
        for suffix in ["-wal", "-shm"] {
            disk::restrict_if_exists(&disk::companion(path, suffix))?;
        }
        let mut store = Self {
            conn,
            path: path.to_path_buf(),
            wal_path: disk::companion(path, "-wal"),
            wipe_immediately: false,
            // A crash may have left superseded bytes in the WAL: wipe now.
            unwiped: true,
        };
        match store.maintenance() {
            Ok(()) => {}
            Err(Error::CheckpointBusy) => tracing::warn!(
                path = %path.display(),
                "WAL checkpoint at open incomplete (another process is reading); retried later"
            ),
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    /// Whether every call that replaces or deletes secret content runs the
    /// TRUNCATE checkpoint itself before returning (default `false`: the
    /// wipe waits for [`Store::maintenance`], the WAL size limit, or drop).
    pub fn set_wipe_immediately(&mut self, on: bool) {
        self.wipe_immediately = on;
    }

    /// Whether superseded secret content may still be in the `-wal` file
    /// (a wiping change was committed and no checkpoint completed since).
    pub fn has_unwiped(&self) -> bool {
        self.unwiped
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `PRAGMA wal_checkpoint(TRUNCATE)`: copies the WAL into the
    /// database file and truncates the WAL to zero bytes, so content
    /// replaced or deleted earlier (already zeroed by `secure_delete` in the
    /// new page versions) no longer exists in either file. Returns
    /// [`Error::CheckpointBusy`] if another connection's read prevented it.
    pub fn checkpoint(&mut self) -> Result<()> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            return Err(Error::CheckpointBusy);
        }
        self.unwiped = false;
        Ok(())
    }

    /// Called after a committed change that superseded secret content: the
    /// old bytes are now only in the WAL. Checkpoints at once when asked to
    /// or when the WAL is large, else leaves it to [`Store::maintenance`].
    /// A failed checkpoint is logged, not returned: the change itself is
    /// already durable, and the store stays "unwiped" so the next
    /// maintenance retries.
    fn superseded(&mut self) {
        self.unwiped = true;
        let large = std::fs::metadata(&self.wal_path).is_ok_and(|m| m.len() > WAL_WIPE_BYTES);
        if self.wipe_immediately || large {
            if let Err(err) = self.checkpoint() {
                tracing::warn!(
                    path = %self.path.display(),
                    cause = %err,
                    "WAL checkpoint failed; old content stays in the WAL until the next one"
                );
            }
        }
    }

    /// Checkpoint at once after an explicit deletion of whole conversations
    /// ([`Store::delete_snapshot`], [`Store::expire_snapshots`]): rare, and
    /// the user expects those keys gone when the call returns. Failure is
    /// logged and left to the next maintenance, as in [`Self::superseded`].
    fn wipe_now(&mut self) {
        self.unwiped = true;
        if let Err(err) = self.checkpoint() {
            tracing::warn!(
                path = %self.path.display(),
                cause = %err,
                "WAL checkpoint after deletion failed; old content stays in the WAL until the next one"
            );
        }
    }

    /// Runs `f` (one autocommit statement or transaction) with
    /// `synchronous=NORMAL`: committed, ordered after every earlier commit,
    /// but not fsynced. For acknowledgements only (see the module docs).
    fn relaxed<T>(&mut self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let out = f(&self.conn);
        // Setting the pragma touches no file, so this does not fail in
        // practice; if it did, the error is returned rather than leaving
        // later snapshot commits unsynced silently.
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(out?)
    }

    fn snapshots_where(
        &self,
        cond: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<SnapshotRecord>> {
        let sql = format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshot {cond} ORDER BY account, peer, instance"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let raws = stmt
            .query_map(args, RawSnapshot::from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter().map(RawSnapshot::into_record).collect()
    }

    fn fingerprints_where(
        &self,
        cond: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<FingerprintRecord>> {
        let sql = format!(
            "SELECT {FINGERPRINT_COLUMNS} FROM fingerprint {cond} \
             ORDER BY account, peer, first_seen, fingerprint"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let raws = stmt
            .query_map(args, |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<Vec<RawFingerprint>>>()?;
        raws.into_iter().map(fingerprint_record).collect()
    }

    fn inbox_where(&self, cond: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<InboxMessage>> {
        let sql = format!(
            "SELECT id, account, peer, instance, text, encrypted, offline, received_at \
             FROM inbox {cond} ORDER BY id"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        type Raw = (i64, String, String, i64, Zeroizing<String>, bool, bool, i64);
        let raws = stmt
            .query_map(args, |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    // Copied straight from SQLite's buffer into a zeroizing String.
                    Zeroizing::new(r.get_ref(4)?.as_str()?.to_owned()),
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<Raw>>>()?;
        raws.into_iter()
            .map(
                |(id, account, peer, instance, text, encrypted, offline, at)| {
                    Ok(InboxMessage {
                        id,
                        account,
                        peer,
                        entry: InboxEntry {
                            instance: to_u32(instance, "instance tag")?,
                            text,
                            encrypted,
                            offline,
                        },
                        received_at: to_u64(at, "received_at")?,
                    })
                },
            )
            .collect()
    }

    fn held_where(&self, cond: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<HeldMessage>> {
        let sql = format!("SELECT {HELD_COLUMNS} FROM held_message {cond} ORDER BY id");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let raws = stmt
            .query_map(args, held_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter().map(held_record).collect()
    }
}

impl Store for SqliteStore {
    fn account_key(&self, account: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT private_key FROM account WHERE account = ?1")?;
        let key = stmt
            .query_row([account], |r| {
                Ok(r.get_ref(0)?
                    .as_blob_or_null()?
                    .map(|b| Zeroizing::new(b.to_vec())))
            })
            .optional()?;
        Ok(key.flatten())
    }

    fn set_account_key(&mut self, account: &str, key: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO account(account, private_key) VALUES (?1, ?2)
             ON CONFLICT(account) DO UPDATE SET private_key = excluded.private_key",
            params![account, key],
        )?;
        self.superseded();
        Ok(())
    }

    fn accounts(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT account FROM account ORDER BY account")?;
        let v = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(v)
    }

    fn instance_tag(&self, account: &str) -> Result<Option<u32>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT instance_tag FROM account WHERE account = ?1")?;
        let tag: Option<Option<i64>> = stmt.query_row([account], |r| r.get(0)).optional()?;
        tag.flatten().map(|t| to_u32(t, "instance tag")).transpose()
    }

    fn set_instance_tag(&mut self, account: &str, tag: u32) -> Result<()> {
        self.conn.execute(
            "INSERT INTO account(account, instance_tag) VALUES (?1, ?2)
             ON CONFLICT(account) DO UPDATE SET instance_tag = excluded.instance_tag",
            params![account, i64::from(tag)],
        )?;
        Ok(())
    }

    fn fingerprints(&self, account: &str, peer: &str) -> Result<Vec<FingerprintRecord>> {
        self.fingerprints_where("WHERE account = ?1 AND peer = ?2", &[&account, &peer])
    }

    fn all_fingerprints(&self) -> Result<Vec<FingerprintRecord>> {
        self.fingerprints_where("", &[])
    }

    fn set_fingerprint(
        &mut self,
        account: &str,
        peer: &str,
        fingerprint: &[u8; 20],
        trust: Trust,
        now: u64,
    ) -> Result<()> {
        let now = to_i64(now, "first_seen")?;
        let tx = self.conn.transaction()?;
        ensure_account(&tx, account)?;
        tx.execute(
            "INSERT INTO fingerprint(account, peer, fingerprint, trust, first_seen)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(account, peer, fingerprint) DO UPDATE SET trust = excluded.trust",
            params![account, peer, &fingerprint[..], trust.to_code(), now],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn remove_fingerprint(
        &mut self,
        account: &str,
        peer: &str,
        fingerprint: &[u8; 20],
    ) -> Result<bool> {
        let n = self.conn.execute(
            "DELETE FROM fingerprint WHERE account = ?1 AND peer = ?2 AND fingerprint = ?3",
            params![account, peer, &fingerprint[..]],
        )?;
        Ok(n > 0)
    }

    fn snapshot(&self, key: &ConversationKey) -> Result<Option<SnapshotRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshot
             WHERE account = ?1 AND peer = ?2 AND instance = ?3"
        ))?;
        let raw = stmt
            .query_row(
                params![key.account, key.peer, i64::from(key.instance)],
                RawSnapshot::from_row,
            )
            .optional()?;
        raw.map(RawSnapshot::into_record).transpose()
    }

    fn snapshots_for_peer(&self, account: &str, peer: &str) -> Result<Vec<SnapshotRecord>> {
        self.snapshots_where("WHERE account = ?1 AND peer = ?2", &[&account, &peer])
    }

    fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.snapshots_where("", &[])
    }

    fn save_snapshot(
        &mut self,
        key: &ConversationKey,
        state: SessionState,
        data: &[u8],
        now: u64,
    ) -> Result<()> {
        let now = to_i64(now, "updated_at")?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_account(&tx, &key.account)?;
        let replaced = tx
            .query_row(
                "SELECT 1 FROM snapshot WHERE account = ?1 AND peer = ?2 AND instance = ?3",
                params![key.account, key.peer, i64::from(key.instance)],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        tx.execute(
            "INSERT INTO snapshot(account, peer, instance, state, data, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT(account, peer, instance) DO UPDATE SET
                 state = excluded.state, data = excluded.data, updated_at = excluded.updated_at",
            params![
                key.account,
                key.peer,
                i64::from(key.instance),
                state.to_code(),
                data,
                now
            ],
        )?;
        tx.commit()?;
        if replaced {
            self.superseded();
        }
        Ok(())
    }

    fn set_snapshot_state(
        &mut self,
        key: &ConversationKey,
        state: SessionState,
        now: u64,
    ) -> Result<bool> {
        let now = to_i64(now, "updated_at")?;
        let n = self.conn.execute(
            "UPDATE snapshot SET state = ?4, updated_at = ?5
             WHERE account = ?1 AND peer = ?2 AND instance = ?3",
            params![
                key.account,
                key.peer,
                i64::from(key.instance),
                state.to_code(),
                now
            ],
        )?;
        Ok(n > 0)
    }

    fn delete_snapshot(&mut self, key: &ConversationKey) -> Result<bool> {
        let n = self.conn.execute(
            "DELETE FROM snapshot WHERE account = ?1 AND peer = ?2 AND instance = ?3",
            params![key.account, key.peer, i64::from(key.instance)],
        )?;
        if n > 0 {
            self.wipe_now();
        }
        Ok(n > 0)
    }

    fn expire_snapshots(&mut self, older_than: u64) -> Result<Vec<ConversationKey>> {
        // Stored times are <= i64::MAX, so a larger cutoff expires everything.
        let cutoff: Option<i64> = i64::try_from(older_than).ok();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let raw = {
            let mut stmt = tx.prepare_cached(
                "SELECT account, peer, instance FROM snapshot
                 WHERE ?1 IS NULL OR updated_at < ?1 ORDER BY account, peer, instance",
            )?;
            stmt.query_map([cutoff], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
        };
        let keys = raw
            .into_iter()
            .map(|(account, peer, instance)| {
                Ok(ConversationKey {
                    account,
                    peer,
                    instance: to_u32(instance, "instance tag")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        tx.execute(
            "DELETE FROM snapshot WHERE ?1 IS NULL OR updated_at < ?1",
            [cutoff],
        )?;
        tx.commit()?;
        if !keys.is_empty() {
            self.wipe_now();
        }
        Ok(keys)
    }

    fn hold_message(&mut self, account: &str, peer: &str, text: &str, now: u64) -> Result<i64> {
        let now = to_i64(now, "queued_at")?;
        let tx = self.conn.transaction()?;
        ensure_account(&tx, account)?;
        tx.execute(
            "INSERT INTO held_message(account, peer, text, queued_at) VALUES (?1, ?2, ?3, ?4)",
            params![account, peer, text, now],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    fn held_messages(&self, account: &str, peer: &str) -> Result<Vec<HeldMessage>> {
        self.held_where("WHERE account = ?1 AND peer = ?2", &[&account, &peer])
    }

    fn all_held_messages(&self) -> Result<Vec<HeldMessage>> {
        self.held_where("", &[])
    }

    fn held_peers(&self, account: &str) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT peer FROM held_message WHERE account = ?1 ORDER BY peer",
        )?;
        let peers = stmt
            .query_map([account], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(peers)
    }

    fn release_held(&mut self, id: i64) -> Result<bool> {
        let n = self
            .conn
            .execute("DELETE FROM held_message WHERE id = ?1", [id])?;
        if n > 0 {
            self.superseded();
        }
        Ok(n > 0)
    }

    fn commit_steps(
        &mut self,
        account: &str,
        steps: &[PeerStep<'_>],
        now: u64,
    ) -> Result<Vec<CommitReceipt>> {
        let now = to_i64(now, "commit time")?;
        let mut superseded = false;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_account(&tx, account)?;
        let receipts = steps
            .iter()
            .map(|s| apply_step(&tx, account, s.peer, s.ops, now, &mut superseded))
            .collect::<Result<Vec<_>>>()?;
        // One commit, so one WAL fsync, for the whole group.
        tx.commit()?;
        if superseded {
            self.superseded();
        }
        Ok(receipts)
    }

    fn inbox(&self, account: &str, peer: &str) -> Result<Vec<InboxMessage>> {
        self.inbox_where("WHERE account = ?1 AND peer = ?2", &[&account, &peer])
    }

    fn all_inbox(&self) -> Result<Vec<InboxMessage>> {
        self.inbox_where("", &[])
    }

    fn ack_inbox(&mut self, account: &str, peer: &str, through: i64) -> Result<usize> {
        let n = self.relaxed(|c| {
            c.execute(
                "DELETE FROM inbox WHERE account = ?1 AND peer = ?2 AND id <= ?3",
                params![account, peer, through],
            )
        })?;
        if n > 0 {
            // Plaintext: wiped by the next checkpoint.
            self.superseded();
        }
        Ok(n)
    }

    fn outbox(&self, account: &str) -> Result<Vec<OutboxMessage>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, account, peer, stanza, queued_at FROM outbox
             WHERE account = ?1 ORDER BY id",
        )?;
        let raws = stmt
            .query_map([account], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter()
            .map(|(id, account, peer, stanza, queued_at)| {
                Ok(OutboxMessage {
                    id,
                    account,
                    peer,
                    stanza,
                    queued_at: to_u64(queued_at, "queued_at")?,
                })
            })
            .collect()
    }

    fn ack_outbox(&mut self, id: i64) -> Result<bool> {
        // Ciphertext only: no wipe needed.
        let n = self.relaxed(|c| c.execute("DELETE FROM outbox WHERE id = ?1", [id]))?;
        Ok(n > 0)
    }

    fn maintenance(&mut self) -> Result<()> {
        if self.unwiped {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn handshakes(&self, account: &str, peer: &str) -> Result<Vec<HandshakeRecord>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT instance, data FROM handshake
             WHERE account = ?1 AND peer = ?2 ORDER BY instance",
        )?;
        let rows = stmt
            .query_map(params![account, peer], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    crate::otr::crypto::SecretBytes::from_slice(r.get_ref(1)?.as_blob()?),
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(instance, data)| {
                Ok(HandshakeRecord {
                    instance: to_u32(instance, "handshake instance tag")?,
                    data,
                })
            })
            .collect()
    }

    fn fragments(&self, account: &str, peer: &str) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT text FROM fragment WHERE account = ?1 AND peer = ?2 ORDER BY seq",
        )?;
        let texts = stmt
            .query_map(params![account, peer], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(texts)
    }
}

impl Drop for SqliteStore {
    /// Clean shutdown: wipe what is pending before SQLite's own close-time
    /// checkpoint (which does the same, but silently).
    fn drop(&mut self) {
        if let Err(err) = self.maintenance() {
            tracing::warn!(path = %self.path.display(), cause = %err, "WAL checkpoint at close failed");
        }
    }
}

/// Applies one peer's ops of a [`Store::commit_steps`] group inside `tx`;
/// sets `superseded` when a snapshot or held message was replaced or
/// deleted (its bytes then wait for the deferred wipe).
fn apply_step(
    tx: &rusqlite::Transaction<'_>,
    account: &str,
    peer: &str,
    ops: &[DurableOp],
    now: i64,
    superseded: &mut bool,
) -> Result<CommitReceipt> {
    let mut receipt = CommitReceipt::default();
    let mut replaced = false;
    let mut deleted = false;
    for op in ops {
        match op {
            DurableOp::SaveSnapshot {
                instance,
                state,
                data,
            } => {
                let args = params![account, peer, i64::from(*instance)];
                replaced |= tx
                    .query_row(
                        "SELECT 1 FROM snapshot
                         WHERE account = ?1 AND peer = ?2 AND instance = ?3",
                        args,
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                tx.execute(
                    "INSERT INTO snapshot(account, peer, instance, state, data,
                                          created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                     ON CONFLICT(account, peer, instance) DO UPDATE SET
                         state = excluded.state, data = excluded.data,
                         updated_at = excluded.updated_at",
                    params![
                        account,
                        peer,
                        i64::from(*instance),
                        state.to_code(),
                        data.as_slice(),
                        now
                    ],
                )?;
            }
            DurableOp::DeleteSnapshot { instance } => {
                deleted |= tx.execute(
                    "DELETE FROM snapshot WHERE account = ?1 AND peer = ?2 AND instance = ?3",
                    params![account, peer, i64::from(*instance)],
                )? > 0;
            }
            DurableOp::Hold(text) => {
                tx.execute(
                    "INSERT INTO held_message(account, peer, text, queued_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![account, peer, text.as_str(), now],
                )?;
                receipt.held_ids.push(tx.last_insert_rowid());
            }
            DurableOp::Inbox(e) => {
                tx.execute(
                    "INSERT INTO inbox(account, peer, instance, text, encrypted, offline,
                                       received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        account,
                        peer,
                        i64::from(e.instance),
                        e.text.as_str(),
                        e.encrypted,
                        e.offline,
                        now
                    ],
                )?;
                receipt.inbox_ids.push(tx.last_insert_rowid());
            }
            DurableOp::Outbox(stanza) => {
                tx.execute(
                    "INSERT INTO outbox(account, peer, stanza, queued_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![account, peer, stanza.as_str(), now],
                )?;
                receipt.outbox_ids.push(tx.last_insert_rowid());
            }
            DurableOp::ReleaseHeld(n) => {
                let n = i64::try_from(*n).unwrap_or(i64::MAX);
                deleted |= tx.execute(
                    "DELETE FROM held_message WHERE id IN (
                         SELECT id FROM held_message WHERE account = ?1 AND peer = ?2
                         ORDER BY id LIMIT ?3)",
                    params![account, peer, n],
                )? > 0;
            }
            DurableOp::Fragments(texts) => {
                tx.execute(
                    "DELETE FROM fragment WHERE account = ?1 AND peer = ?2",
                    params![account, peer],
                )?;
                for (seq, text) in texts.iter().enumerate() {
                    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                    tx.execute(
                        "INSERT INTO fragment(account, peer, seq, text) VALUES (?1, ?2, ?3, ?4)",
                        params![account, peer, seq, text.as_str()],
                    )?;
                }
            }
            DurableOp::SaveHandshake { instance, data } => {
                // Replacing a record leaves its bytes for the deferred wipe.
                replaced |= tx.execute(
                    "DELETE FROM handshake WHERE account = ?1 AND peer = ?2 AND instance = ?3",
                    params![account, peer, i64::from(*instance)],
                )? > 0;
                tx.execute(
                    "INSERT INTO handshake(account, peer, instance, data, saved_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![account, peer, i64::from(*instance), data.as_slice(), now],
                )?;
            }
            DurableOp::DeleteHandshake { instance } => {
                deleted |= tx.execute(
                    "DELETE FROM handshake WHERE account = ?1 AND peer = ?2 AND instance = ?3",
                    params![account, peer, i64::from(*instance)],
                )? > 0;
            }
        }
    }
    *superseded |= replaced || deleted;
    Ok(receipt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SCHEMA_VERSION;

    #[test]
    fn is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<SqliteStore>();
    }

    #[test]
    fn pragmas_are_set() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let q = |p: &str| -> String {
            s.conn
                .query_row(&format!("PRAGMA {p}"), [], |r| {
                    r.get::<_, rusqlite::types::Value>(0)
                })
                .map(|v| format!("{v:?}"))
                .unwrap()
        };
        assert_eq!(q("journal_mode"), "Text(\"wal\")");
        assert_eq!(q("synchronous"), "Integer(2)"); // FULL
        assert_eq!(q("secure_delete"), "Integer(1)");
        assert_eq!(q("foreign_keys"), "Integer(1)");
        assert_eq!(q("user_version"), format!("Integer({SCHEMA_VERSION})"));
    }

    #[test]
    fn acks_commit_relaxed_then_full_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(dir.path()).unwrap();
        let sync =
            |c: &Connection| c.pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0));
        let inside = s.relaxed(sync).unwrap();
        assert_eq!(inside, 1, "NORMAL inside an ack");
        assert_eq!(sync(&s.conn).unwrap(), 2, "FULL again after it");
        // A failing statement restores FULL too.
        assert!(
            s.relaxed(|c| c.execute("DELETE FROM no_such_table", []))
                .is_err()
        );
        assert_eq!(sync(&s.conn).unwrap(), 2);
        assert!(!s.ack_outbox(1).unwrap());
        assert_eq!(sync(&s.conn).unwrap(), 2);
    }

    #[test]
    fn rejects_times_beyond_i64() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(dir.path()).unwrap();
        let k = ConversationKey::new("a@x", "b@y", 0x100);
        assert!(matches!(
            s.save_snapshot(&k, SessionState::Live, b"d", u64::MAX),
            Err(Error::OutOfRange(_))
        ));
        assert!(s.snapshot(&k).unwrap().is_none());
    }
}
