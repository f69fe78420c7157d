//! Stored EKM snapshots (O2TR) that are corrupt, truncated, of another
//! format or version, or with out-of-range fields: restoring gives a typed
//! error, `restore_peer` wipes the snapshot with a log line (memory and
//! SQLite stores alike), never panics, and the rebuilt conversation can run
//! a new AKE.

use o2tr_proxy::otr::codec::{CodecError, Reader};
use o2tr_proxy::otr::conversation::Config;
use o2tr_proxy::otr::crypto::CryptoError;
use o2tr_proxy::otr::error::Error;
use o2tr_proxy::otr::offline::{EncryptedSession, SnapshotInfo};
use o2tr_proxy::store::ekm::restore_peer;
use o2tr_proxy::store::{ConversationKey, MemoryStore, SessionState, SqliteStore, Store};

use crate::pair::{ALICE_TAG, BOB_TAG, keys};
use crate::support::*;

/// Where the fields of a snapshot start.
#[derive(Debug, Default)]
struct At {
    our_keyid: usize,
    our_current: usize,
    their_keyid: usize,
    their_current: usize,
    prev_flag: usize,
    retired: usize,
    reveal: usize,
}

fn layout(b: &[u8]) -> At {
    let mut r = Reader::new(b);
    let mut at = At::default();
    r.take(56, "header").unwrap();
    r.short("pubkey type").unwrap();
    for _ in 0..4 {
        r.mpi("dsa").unwrap();
    }
    at.our_keyid = r.position();
    r.int("").unwrap();
    at.our_current = r.position();
    // Format 2: each of our two key pairs is its secret and its public value.
    for _ in 0..2 {
        r.data("").unwrap();
        r.mpi("").unwrap();
    }
    at.their_keyid = r.position();
    r.int("").unwrap();
    at.their_current = r.position();
    r.mpi("").unwrap();
    at.prev_flag = r.position();
    if r.byte("").unwrap() == 1 {
        r.mpi("").unwrap();
    }
    // Per pairing: counters, (format 4) replay window, MAC key.
    for _ in 0..4 {
        r.take(24, "").unwrap();
        if r.byte("").unwrap() == 1 {
            r.take(20, "").unwrap();
        }
    }
    // Format 3: the derived keys of each pairing, then our next key pair.
    for _ in 0..4 {
        if r.byte("").unwrap() == 1 {
            r.take(64, "").unwrap();
        }
    }
    if r.byte("").unwrap() == 1 {
        r.data("").unwrap();
        r.mpi("").unwrap();
    }
    // Format 5: retired generations, ours (keyid, key pair, until), theirs
    // (keyid, key, until), then pairings (keyids, counters, MAC key).
    at.retired = r.position();
    for _ in 0..r.byte("").unwrap() {
        r.int("").unwrap();
        r.data("").unwrap();
        r.mpi("").unwrap();
        r.take(8, "").unwrap();
    }
    for _ in 0..r.byte("").unwrap() {
        r.int("").unwrap();
        r.mpi("").unwrap();
        r.take(8, "").unwrap();
    }
    for _ in 0..r.byte("").unwrap() {
        r.take(24, "").unwrap();
        if r.byte("").unwrap() == 1 {
            r.take(20, "").unwrap();
        }
    }
    at.reveal = r.position();
    at
}

/// Replace the length-prefixed field at `at` with `value`.
fn splice(b: &mut Vec<u8>, at: usize, value: &[u8]) {
    let len = u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
    let mut field = (value.len() as u32).to_be_bytes().to_vec();
    field.extend_from_slice(value);
    b.splice(at..at + 4 + len, field);
}

struct Case {
    name: &'static str,
    damage: fn(&mut Vec<u8>, &At),
    /// The error of `EncryptedSession::restore`, or `None` when the bytes
    /// decode but the conversation refuses them.
    want: Option<fn(&Error) -> bool>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "snapshot: empty",
            damage: |b, _| b.clear(),
            want: Some(|e| {
                matches!(
                    e,
                    Error::Codec(CodecError::Truncated {
                        what: "magic",
                        needed: 8
                    })
                )
            }),
        },
        Case {
            name: "snapshot: 5 bytes",
            damage: |b, _| b.truncate(5),
            want: Some(|e| {
                matches!(
                    e,
                    Error::Codec(CodecError::Truncated {
                        what: "magic",
                        needed: 3
                    })
                )
            }),
        },
        Case {
            name: "snapshot: wrong magic",
            damage: |b, _| b[0] ^= 0x20,
            want: Some(|e| matches!(e, Error::Snapshot("not an EKM snapshot"))),
        },
        Case {
            name: "snapshot: unknown format byte",
            damage: |b, _| b[8] = 6,
            want: Some(|e| matches!(e, Error::Snapshot("unknown snapshot format"))),
        },
        Case {
            name: "snapshot: protocol version 1",
            damage: |b, _| b[10] = 1,
            want: Some(|e| matches!(e, Error::Snapshot("unknown protocol version"))),
        },
        Case {
            name: "snapshot: protocol version 4",
            damage: |b, _| b[10] = 4,
            want: Some(|e| matches!(e, Error::Snapshot("unknown protocol version"))),
        },
        Case {
            name: "snapshot: truncated in the middle",
            damage: |b, _| b.truncate(b.len() / 2),
            want: Some(|e| matches!(e, Error::Codec(CodecError::Truncated { .. }))),
        },
        Case {
            name: "snapshot: last byte missing",
            damage: |b, _| {
                b.pop();
            },
            want: Some(|e| {
                matches!(
                    e,
                    Error::Codec(CodecError::Truncated {
                        what: "to_reveal",
                        needed: 1
                    })
                )
            }),
        },
        Case {
            name: "snapshot: trailing byte",
            damage: |b, _| b.push(0),
            want: Some(|e| matches!(e, Error::Codec(CodecError::TrailingBytes(1)))),
        },
        Case {
            name: "snapshot: public key type 1",
            damage: |b, _| b[57] = 1,
            want: Some(|e| matches!(e, Error::Crypto(CryptoError::UnsupportedPubkeyType(1)))),
        },
        Case {
            name: "snapshot: DSA q shortened",
            damage: |b, _| {
                let at = 58 + 4 + u32::from_be_bytes([b[58], b[59], b[60], b[61]]) as usize;
                splice(b, at, &[0x7f; 19]);
            },
            want: Some(|e| matches!(e, Error::Crypto(CryptoError::InvalidKey(_)))),
        },
        Case {
            name: "snapshot: our keyid 1",
            damage: |b, at| b[at.our_keyid..at.our_keyid + 4].copy_from_slice(&1u32.to_be_bytes()),
            want: Some(|e| matches!(e, Error::Snapshot("our keyid below 2"))),
        },
        Case {
            name: "snapshot: our DH secret of 41 bytes",
            damage: |b, at| splice(b, at.our_current, &[0xff; 41]),
            want: Some(|e| matches!(e, Error::Crypto(CryptoError::InvalidKey(_)))),
        },
        Case {
            name: "snapshot: field length 0xffffffff",
            damage: |b, at| b[at.our_current..at.our_current + 4].copy_from_slice(&[0xff; 4]),
            want: Some(|e| {
                matches!(
                    e,
                    Error::Codec(CodecError::TooLong {
                        what: "our_current",
                        ..
                    })
                )
            }),
        },
        Case {
            name: "snapshot: their keyid 0",
            damage: |b, at| b[at.their_keyid..at.their_keyid + 4].copy_from_slice(&[0; 4]),
            want: Some(|e| matches!(e, Error::Snapshot("their keyid 0"))),
        },
        Case {
            name: "snapshot: their DH key = 1",
            damage: |b, at| splice(b, at.their_current, &[1]),
            want: Some(|e| matches!(e, Error::Crypto(CryptoError::DhOutOfRange))),
        },
        Case {
            name: "snapshot: their DH key = p",
            damage: |b, at| splice(b, at.their_current, &p()),
            want: Some(|e| matches!(e, Error::Crypto(CryptoError::DhOutOfRange))),
        },
        Case {
            name: "snapshot: option flag 7",
            damage: |b, at| b[at.prev_flag] = 7,
            want: Some(|e| matches!(e, Error::Snapshot("bad option flag"))),
        },
        Case {
            name: "snapshot: more retired key generations than are kept",
            damage: |b, at| b[at.retired] = 4,
            want: Some(|e| matches!(e, Error::Snapshot("too many retired keys"))),
        },
        Case {
            name: "snapshot: revealed keys of 7 bytes",
            damage: |b, at| splice(b, at.reveal, &[9; 7]),
            want: Some(|e| matches!(e, Error::Snapshot("revealed keys not a multiple of 20"))),
        },
        Case {
            name: "snapshot: random bytes",
            damage: |b, _| {
                let mut x = 0x9e37_79b9u32;
                for v in b.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *v = x as u8;
                }
            },
            want: Some(|e| matches!(e, Error::Snapshot("not an EKM snapshot"))),
        },
        Case {
            name: "snapshot: all zero bytes",
            damage: |b, _| b.fill(0),
            want: Some(|e| matches!(e, Error::Snapshot("not an EKM snapshot"))),
        },
        Case {
            name: "snapshot: belongs to another instance tag of ours",
            damage: |b, _| b[11..15].copy_from_slice(&0x9999_9999u32.to_be_bytes()),
            want: None,
        },
    ]
}

#[test]
fn corrupt_snapshots() {
    let cases = cases();
    let good = {
        let p = private_pair(1300);
        p.bob.snapshots[&ALICE_TAG].clone()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    run_table(
        "snapshot",
        &cases,
        |c| c.name,
        |i, c| {
            let mut bad = good.clone();
            let at = layout(&bad);
            (c.damage)(&mut bad, &at);
            if bad == good {
                return Err("the damage changed nothing".into());
            }
            let _ = SnapshotInfo::of(&bad); // describes or errs; never panics
            match (EncryptedSession::restore(&bad), c.want) {
                (Err(e), Some(want)) if want(&e) => {}
                (Err(e), _) => return Err(format!("restore failed with {e:?}")),
                (Ok(_), Some(_)) => return Err("restore accepted it".into()),
                (Ok(_), None) => {}
            }
            let sqlite_dir = dir.path().join(format!("case{i}"));
            let stores: Vec<(&str, Box<dyn Store>)> = vec![
                ("memory", Box::new(MemoryStore::new())),
                (
                    "sqlite",
                    Box::new(SqliteStore::open(&sqlite_dir).map_err(|e| e.to_string())?),
                ),
            ];
            for (kind, mut store) in stores {
                let key = ConversationKey::new(BOB, ALICE, ALICE_TAG);
                store
                    .save_snapshot(&key, SessionState::Suspended, &bad, 1_700_000_000)
                    .map_err(|e| e.to_string())?;
                let mark = log_mark();
                let r = restore_peer(
                    store.as_mut(),
                    BOB,
                    ALICE,
                    Config::new(BOB, BOB_TAG),
                    keys().1.clone(),
                    1_700_000_100,
                    30 * 86_400,
                )
                .map_err(|e| format!("{kind}: restore_peer failed: {e}"))?;
                if r.discarded != [ALICE_TAG] || !r.restored.is_empty() {
                    return Err(format!(
                        "{kind}: discarded {:?}, restored {:?}",
                        r.discarded, r.restored
                    ));
                }
                if store.snapshot(&key).map_err(|e| e.to_string())?.is_some() {
                    return Err(format!("{kind}: the bad snapshot is still stored"));
                }
                if !logged_since(mark, &["wiping it", &ALICE_TAG.to_string()]) {
                    return Err(format!("{kind}: no log line about wiping the snapshot"));
                }
                // The rebuilt conversation works: a new AKE, then messages.
                let mut p = crate::pair::Pair::new();
                p.bob.conv = r.conversation;
                if p.bob.conv.is_private() {
                    return Err(format!("{kind}: private from a wiped snapshot"));
                }
                p.establish();
                still_private(&mut p, c.name).map_err(|e| format!("{kind}: {e}"))?;
            }
            Ok(())
        },
    );
}
