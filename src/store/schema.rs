//! Schema of the SQLite store: the versioned migrations list, the
//! `PRAGMA user_version` checks and the read-only inspection done before a
//! database is opened for writing (DESIGN §2 store).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use super::{Error, Result};

/// How long a statement waits for a lock held by another connection (for
/// instance a CLI `sessions` command reading while the proxy runs).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations; entry `i` moves the schema from version `i` to `i + 1`.
/// Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    "CREATE TABLE account (
        account      TEXT PRIMARY KEY NOT NULL,
        private_key  BLOB,
        instance_tag INTEGER CHECK (instance_tag BETWEEN 0 AND 4294967295)
    ) STRICT;
    CREATE TABLE fingerprint (
        account     TEXT NOT NULL REFERENCES account(account) ON DELETE CASCADE,
        peer        TEXT NOT NULL,
        fingerprint BLOB NOT NULL CHECK (length(fingerprint) = 20),
        trust       INTEGER NOT NULL,
        first_seen  INTEGER NOT NULL,
        PRIMARY KEY (account, peer, fingerprint)
    ) STRICT;
    CREATE TABLE snapshot (
        account    TEXT NOT NULL REFERENCES account(account) ON DELETE CASCADE,
        peer       TEXT NOT NULL,
        instance   INTEGER NOT NULL CHECK (instance BETWEEN 0 AND 4294967295),
        state      INTEGER NOT NULL,
        data       BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (account, peer, instance)
    ) STRICT;
    CREATE INDEX snapshot_by_updated ON snapshot(updated_at);
    CREATE TABLE held_message (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        account   TEXT NOT NULL REFERENCES account(account) ON DELETE CASCADE,
        peer      TEXT NOT NULL,
        text      TEXT NOT NULL,
        queued_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX held_by_peer ON held_message(account, peer, id);",
    // Version 2: plaintexts committed with the snapshot that consumed them
    // (store/ekm.rs), kept until the client has them.
    "CREATE TABLE inbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        account     TEXT NOT NULL REFERENCES account(account) ON DELETE CASCADE,
        peer        TEXT NOT NULL,
        instance    INTEGER NOT NULL CHECK (instance BETWEEN 0 AND 4294967295),
        text        TEXT NOT NULL,
        encrypted   INTEGER NOT NULL CHECK (encrypted IN (0, 1)),
        offline     INTEGER NOT NULL CHECK (offline IN (0, 1)),
        received_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX inbox_by_peer ON inbox(account, peer, id);",
    // Version 3: encrypted stanzas committed with the snapshot that produced
    // them, kept until written to the server (sender-side crash safety), and
    // the partial reassembly of incoming fragments.
    "CREATE TABLE outbox (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        account   TEXT NOT NULL REFERENCES account(account) ON DELETE CASCADE,
        peer      TEXT NOT NULL,
        stanza    TEXT NOT NULL,
        queued_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX outbox_by_account ON outbox(account, id);
    CREATE TABLE fragment (
        account TEXT NOT NULL REFERENCES account(account) ON DELETE CASCADE,
        peer    TEXT NOT NULL,
        seq     INTEGER NOT NULL,
        text    TEXT NOT NULL,
        PRIMARY KEY (account, peer, seq)
    ) STRICT;",
    // Version 4: the record of a handshake of ours waiting for the peer's
    // Signature (the peer is private once it sent it).
    "CREATE TABLE handshake (
        account  TEXT NOT NULL REFERENCES account(account) ON DELETE CASCADE,
        peer     TEXT NOT NULL,
        instance INTEGER NOT NULL CHECK (instance BETWEEN 0 AND 4294967295),
        data     BLOB NOT NULL,
        saved_at INTEGER NOT NULL,
        PRIMARY KEY (account, peer, instance)
    ) STRICT;",
];

/// The schema version this build writes (and the newest it can read).
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;
const _: () = assert!(SCHEMA_VERSION >= 1);

/// Maps SQLite's "not a database" / "corrupt" errors on `path` to our
/// typed errors.
pub(super) fn classify(path: &Path, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => Error::NotADatabase {
            path: path.to_path_buf(),
        },
        Some(ErrorCode::DatabaseCorrupt) => Error::Corrupt(format!("{}: {e}", path.display())),
        _ => Error::Sqlite(e),
    }
}

pub(super) fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

pub(super) fn check_version(found: i64) -> Result<u32> {
    let found = u32::try_from(found)
        .map_err(|_| Error::Corrupt(format!("invalid schema version {found}")))?;
    if found > SCHEMA_VERSION {
        return Err(Error::NewerSchema {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(found)
}

/// Read-only inspection of an existing database: schema version and
/// `quick_check`. Changes nothing in the database file.
pub(super) fn inspect_read_only(path: &Path) -> Result<()> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    check_version(user_version(&conn).map_err(|e| classify(path, e))?)?;
    let mut stmt = conn
        .prepare("PRAGMA quick_check")
        .map_err(|e| classify(path, e))?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| classify(path, e))?;
    if problems.len() != 1 || problems.first().map(String::as_str) != Some("ok") {
        return Err(Error::Corrupt(format!(
            "{}: integrity check failed: {}",
            path.display(),
            problems.join("; ")
        )));
    }
    Ok(())
}

/// Brings the schema to [`SCHEMA_VERSION`] in one immediate transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = check_version(user_version(&tx)?)?;
    if found == SCHEMA_VERSION {
        return Ok(()); // the transaction rolls back: nothing was written
    }
    for sql in MIGRATIONS.iter().skip(found as usize) {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_matches_migrations() {
        assert_eq!(SCHEMA_VERSION as usize, MIGRATIONS.len());
    }

    #[test]
    fn migrate_creates_tables_and_is_idempotent() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        assert_eq!(user_version(&c).unwrap(), i64::from(SCHEMA_VERSION));
        let tables: Vec<String> = c
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        for t in [
            "account",
            "fingerprint",
            "fragment",
            "handshake",
            "held_message",
            "inbox",
            "outbox",
            "snapshot",
        ] {
            assert!(tables.iter().any(|n| n == t), "{t} missing: {tables:?}");
        }
        migrate(&mut c).unwrap();
        assert_eq!(user_version(&c).unwrap(), i64::from(SCHEMA_VERSION));
    }

    #[test]
    fn check_version_rejects_newer_and_negative() {
        assert_eq!(check_version(0).unwrap(), 0);
        assert!(matches!(
            check_version(i64::from(SCHEMA_VERSION) + 1),
            Err(Error::NewerSchema { .. })
        ));
        assert!(matches!(check_version(-1), Err(Error::Corrupt(_))));
    }
}
