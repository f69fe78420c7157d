//! File-system checks done before SQLite touches anything (DESIGN §2 store:
//! state directory 0700, database files 0600).
//!
//! Everything here only reads, except the creation of a missing state
//! directory (mode 0700) and of a missing database file (mode 0600, created
//! empty before SQLite opens it, so SQLite's `-wal`/`-shm` files, which copy
//! the database file's mode, are 0600 too).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Error, Result};

/// The 16-byte magic string at the start of every SQLite 3 database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// Size of the SQLite database header.
const SQLITE_HEADER_BYTES: usize = 100;

pub(super) fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mode_of(meta: &fs::Metadata) -> u32 {
    meta.permissions().mode() & 0o7777
}

/// The directory holding `path` (`.` for a bare file name).
pub(super) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Best-effort fsync of a directory, so a file created in it survives a
/// power loss.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Creates the state directory with mode 0700 if it is missing; refuses an
/// existing one that is not a directory or is group/world writable.
pub(super) fn ensure_state_dir(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(io_err(
                    dir,
                    io::Error::new(
                        io::ErrorKind::NotADirectory,
                        "state path is not a directory",
                    ),
                ));
            }
            let mode = mode_of(&meta);
            if mode & 0o022 != 0 {
                return Err(Error::UnsafePermissions {
                    path: dir.to_path_buf(),
                    mode,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io_err(dir, e))?;
            // The umask can only remove bits; make sure of exactly 0700.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| io_err(dir, e))?;
            sync_dir(&parent_dir(dir))
        }
        Err(e) => Err(io_err(dir, e)),
    }
}

/// Checks an existing database-related file: a regular file (not a symlink)
/// with no group/other permission bits. Returns its length, or `None` if it
/// does not exist.
pub(super) fn check_private_file(path: &Path) -> Result<Option<u64>> {
    match fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_file() {
                return Err(Error::NotADatabase {
                    path: path.to_path_buf(),
                });
            }
            let mode = mode_of(&meta);
            if mode & 0o077 != 0 {
                return Err(Error::UnsafePermissions {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            Ok(Some(meta.len()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Path of an SQLite companion file (`-wal`, `-shm`).
pub(super) fn companion(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Refuses a non-empty file that does not start with the SQLite header.
pub(super) fn check_header(path: &Path) -> Result<()> {
    let mut header = Vec::with_capacity(SQLITE_HEADER_BYTES);
    File::open(path)
        .and_then(|f| f.take(SQLITE_HEADER_BYTES as u64).read_to_end(&mut header))
        .map_err(|e| io_err(path, e))?;
    if header.is_empty() {
        return Ok(());
    }
    if header.len() < SQLITE_HEADER_BYTES || !header.starts_with(SQLITE_MAGIC) {
        return Err(Error::NotADatabase {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Creates an empty database file with mode 0600 (fails if it exists) and
/// makes its directory entry durable.
pub(super) fn create_private_file(path: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    file.sync_all().map_err(|e| io_err(path, e))?;
    sync_dir(&parent_dir(path))
}

/// Forces mode 0600 on a file if it exists (for SQLite's `-wal`/`-shm`).
pub(super) fn restrict_if_exists(path: &Path) -> Result<()> {
    match fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn companion_appends_suffix() {
        assert_eq!(
            companion(Path::new("/a/o2tr.db"), "-wal"),
            PathBuf::from("/a/o2tr.db-wal")
        );
    }

    #[test]
    fn parent_of_bare_name_is_dot() {
        assert_eq!(parent_dir(Path::new("x.db")), PathBuf::from("."));
        assert_eq!(parent_dir(Path::new("/s/x.db")), PathBuf::from("/s"));
    }

    #[test]
    fn header_check_accepts_empty_and_rejects_short_or_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"").unwrap();
        assert!(check_header(&p).is_ok());
        fs::write(&p, b"SQLite format 3\0short").unwrap();
        assert!(matches!(check_header(&p), Err(Error::NotADatabase { .. })));
        fs::write(&p, [0u8; 200]).unwrap();
        assert!(matches!(check_header(&p), Err(Error::NotADatabase { .. })));
    }

    #[test]
    fn refuses_symlink_as_database() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        fs::write(&target, b"").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            check_private_file(&link),
            Err(Error::NotADatabase { .. })
        ));
    }
}
