//! The AKE (spec §"Authenticated Key Exchange"): a live exchange between
//! Alice and Bob (Bob initiates after Alice's query), with one of the four
//! messages — D-H Commit, D-H Key, Reveal Signature, Signature — damaged
//! field by field on its way. The side that detects the damage tells its
//! user, neither side goes private from it, and a new AKE afterwards works.

use o2tr_proxy::otr::codec::{CodecError, Writer};
use o2tr_proxy::otr::crypto::{CryptoError, aes128_ctr, sha256};
use o2tr_proxy::otr::error::{Error, PeerMisbehaved as P};
use o2tr_proxy::otr::message::{self, Body, EncodedMessage, Message, MessageError as M};

use crate::pair::{ALICE_TAG, Pair};
use crate::support::*;

const COMMIT: usize = 0;
const DH_KEY: usize = 1;
const REVEAL: usize = 2;
const SIG: usize = 3;

/// The AES key a forged commitment is made with.
const R: [u8; 16] = [0x42; 16];

#[derive(Clone, Copy, PartialEq)]
enum Who {
    Alice,
    Bob,
}

enum Damage {
    /// Called with every AKE message (stage, message) on its way.
    Fields(fn(usize, &mut EncodedMessage)),
    /// Change the binary form of the message of this stage.
    Bytes(usize, fn(&mut Vec<u8>)),
}

struct Case {
    name: &'static str,
    damage: Damage,
    /// Who must notice.
    victim: Who,
    want: Want,
}

fn ake(e: impl Into<Error>) -> Want {
    Want::AkeFailed(e.into().to_string())
}

/// The MPI encoding of `gx`, then `extra`.
fn mpi_then(gx: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.mpi(gx).raw(extra);
    w.into_vec()
}

/// A D-H Commit whose committed bytes are `committed`, encrypted under
/// [`R`] — and, at the Reveal Signature, `R` revealed: a peer free to
/// choose its D-H value.
fn commit_to(stage: usize, m: &mut EncodedMessage, committed: Vec<u8>) {
    match (&mut m.body, stage) {
        (Body::DhCommit(c), COMMIT) => {
            let mut bytes = committed;
            c.hashed_gx = sha256(&bytes).to_vec();
            aes128_ctr(&R, &[0; 8], &mut bytes);
            c.encrypted_gx = bytes;
        }
        (Body::RevealSignature(rs), REVEAL) => rs.revealed_key = R.to_vec(),
        _ => {}
    }
}

fn cases() -> Vec<Case> {
    use Damage::*;
    use Who::*;
    vec![
        // D-H Commit (Bob → Alice); Alice finds out at the Reveal Signature.
        Case {
            name: "ake commit: hashed gx bit flip",
            damage: Fields(|s, m| {
                if let (COMMIT, Body::DhCommit(c)) = (s, &mut m.body) {
                    c.hashed_gx[0] ^= 1
                }
            }),
            victim: Alice,
            want: ake(P::CommitmentMismatch),
        },
        Case {
            name: "ake commit: hashed gx truncated to 16 bytes",
            damage: Fields(|s, m| {
                if let (COMMIT, Body::DhCommit(c)) = (s, &mut m.body) {
                    c.hashed_gx.truncate(16)
                }
            }),
            victim: Alice,
            want: ake(P::CommitmentMismatch),
        },
        Case {
            name: "ake commit: hashed gx 4 KiB",
            damage: Fields(|s, m| {
                if let (COMMIT, Body::DhCommit(c)) = (s, &mut m.body) {
                    c.hashed_gx = vec![0xee; 4096]
                }
            }),
            victim: Alice,
            want: ake(P::CommitmentMismatch),
        },
        Case {
            name: "ake commit: encrypted gx bit flip",
            damage: Fields(|s, m| {
                if let (COMMIT, Body::DhCommit(c)) = (s, &mut m.body) {
                    c.encrypted_gx[10] ^= 0x10
                }
            }),
            victim: Alice,
            want: ake(P::CommitmentMismatch),
        },
        Case {
            name: "ake commit: encrypted gx empty",
            damage: Fields(|s, m| {
                if let (COMMIT, Body::DhCommit(c)) = (s, &mut m.body) {
                    c.encrypted_gx.clear()
                }
            }),
            victim: Alice,
            want: ake(P::CommitmentMismatch),
        },
        Case {
            name: "ake commit: committed gx = 0",
            damage: Fields(|s, m| commit_to(s, m, mpi_then(&[], &[]))),
            victim: Alice,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake commit: committed gx = 1",
            damage: Fields(|s, m| commit_to(s, m, mpi_then(&[1], &[]))),
            victim: Alice,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake commit: committed gx = p-1",
            damage: Fields(|s, m| commit_to(s, m, mpi_then(&p_plus(-1), &[]))),
            victim: Alice,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake commit: committed gx = p",
            damage: Fields(|s, m| commit_to(s, m, mpi_then(&p(), &[]))),
            victim: Alice,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake commit: committed gx = p+1",
            damage: Fields(|s, m| commit_to(s, m, mpi_then(&p_plus(1), &[]))),
            victim: Alice,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake commit: committed gx MPI with trailing bytes",
            damage: Fields(|s, m| commit_to(s, m, mpi_then(&[2; 192], &[9, 9]))),
            victim: Alice,
            want: ake(CodecError::TrailingBytes(2)),
        },
        Case {
            name: "ake commit: committed gx MPI truncated",
            damage: Fields(|s, m| commit_to(s, m, [&[0, 0, 0, 192][..], &[1; 10]].concat())),
            victim: Alice,
            want: ake(CodecError::Truncated {
                what: "gx",
                needed: 182,
            }),
        },
        Case {
            name: "ake commit: protocol version 1",
            damage: Bytes(COMMIT, |b| b[1] = 1),
            victim: Alice,
            want: Want::Malformed(M::UnknownVersion(1)),
        },
        Case {
            name: "ake commit: unknown message type 0x0b",
            damage: Bytes(COMMIT, |b| b[2] = 0x0b),
            victim: Alice,
            want: Want::Malformed(M::UnknownType(0x0b)),
        },
        Case {
            name: "ake commit: sender instance tag 0",
            damage: Bytes(COMMIT, |b| b[3..7].copy_from_slice(&[0; 4])),
            victim: Alice,
            want: Want::Malformed(M::InvalidInstanceTag {
                sender: 0,
                receiver: 0,
            }),
        },
        Case {
            name: "ake commit: truncated in the hashed gx",
            damage: Bytes(COMMIT, |b| {
                b.truncate(b.len() - 5);
            }),
            victim: Alice,
            want: Want::Malformed(M::Codec(CodecError::Truncated {
                what: "hashed gx",
                needed: 5,
            })),
        },
        Case {
            name: "ake commit: encrypted gx length 0xffffffff",
            damage: Bytes(COMMIT, |b| b[11..15].copy_from_slice(&[0xff; 4])),
            victim: Alice,
            want: Want::Malformed(M::Codec(CodecError::TooLong {
                what: "encrypted gx",
                len: u32::MAX as usize,
            })),
        },
        // D-H Key (Alice → Bob); Bob checks gy at once.
        Case {
            name: "ake dh-key: gy = 0",
            damage: Fields(|s, m| {
                if let (DH_KEY, Body::DhKey(k)) = (s, &mut m.body) {
                    k.gy = Vec::new()
                }
            }),
            victim: Bob,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake dh-key: gy = 1",
            damage: Fields(|s, m| {
                if let (DH_KEY, Body::DhKey(k)) = (s, &mut m.body) {
                    k.gy = vec![1]
                }
            }),
            victim: Bob,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake dh-key: gy = p-1",
            damage: Fields(|s, m| {
                if let (DH_KEY, Body::DhKey(k)) = (s, &mut m.body) {
                    k.gy = p_plus(-1)
                }
            }),
            victim: Bob,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake dh-key: gy = p",
            damage: Fields(|s, m| {
                if let (DH_KEY, Body::DhKey(k)) = (s, &mut m.body) {
                    k.gy = p()
                }
            }),
            victim: Bob,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake dh-key: gy = p+1",
            damage: Fields(|s, m| {
                if let (DH_KEY, Body::DhKey(k)) = (s, &mut m.body) {
                    k.gy = p_plus(1)
                }
            }),
            victim: Bob,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake dh-key: gy of 300 bytes",
            damage: Fields(|s, m| {
                if let (DH_KEY, Body::DhKey(k)) = (s, &mut m.body) {
                    k.gy = vec![0x7f; 300]
                }
            }),
            victim: Bob,
            want: ake(CryptoError::DhOutOfRange),
        },
        Case {
            name: "ake dh-key: gy replaced by a valid other value",
            damage: Fields(|s, m| {
                if let (DH_KEY, Body::DhKey(k)) = (s, &mut m.body) {
                    k.gy = vec![2]
                }
            }),
            victim: Alice,
            want: ake(P::AkeMacMismatch),
        },
        Case {
            name: "ake dh-key: receiver is another instance of Bob",
            damage: Fields(|s, m| {
                if s == DH_KEY {
                    m.header.receiver_tag = 0x3333_3333
                }
            }),
            victim: Bob,
            want: Want::Ignored,
        },
        Case {
            name: "ake dh-key: receiver instance tag 0x10",
            damage: Bytes(DH_KEY, |b| b[7..11].copy_from_slice(&0x10u32.to_be_bytes())),
            victim: Bob,
            want: Want::Malformed(M::InvalidInstanceTag {
                sender: ALICE_TAG,
                receiver: 0x10,
            }),
        },
        Case {
            name: "ake dh-key: gy length beyond the message",
            damage: Bytes(DH_KEY, |b| {
                b[11..15].copy_from_slice(&1000u32.to_be_bytes())
            }),
            victim: Bob,
            want: Want::Malformed(M::Codec(CodecError::Truncated {
                what: "gy",
                needed: 1000 - 192,
            })),
        },
        // Reveal Signature (Bob → Alice).
        Case {
            name: "ake reveal: revealed key 15 bytes",
            damage: Fields(|s, m| {
                if let (REVEAL, Body::RevealSignature(r)) = (s, &mut m.body) {
                    r.revealed_key.pop();
                }
            }),
            victim: Alice,
            want: ake(P::BadRevealedKey),
        },
        Case {
            name: "ake reveal: revealed key 17 bytes",
            damage: Fields(|s, m| {
                if let (REVEAL, Body::RevealSignature(r)) = (s, &mut m.body) {
                    r.revealed_key.push(0)
                }
            }),
            victim: Alice,
            want: ake(P::BadRevealedKey),
        },
        Case {
            name: "ake reveal: revealed key empty",
            damage: Fields(|s, m| {
                if let (REVEAL, Body::RevealSignature(r)) = (s, &mut m.body) {
                    r.revealed_key.clear()
                }
            }),
            victim: Alice,
            want: ake(P::BadRevealedKey),
        },
        Case {
            name: "ake reveal: revealed key bit flip",
            damage: Fields(|s, m| {
                if let (REVEAL, Body::RevealSignature(r)) = (s, &mut m.body) {
                    r.revealed_key[3] ^= 4
                }
            }),
            victim: Alice,
            want: ake(P::CommitmentMismatch),
        },
        Case {
            name: "ake reveal: encrypted signature bit flip",
            damage: Fields(|s, m| {
                if let (REVEAL, Body::RevealSignature(r)) = (s, &mut m.body) {
                    r.encrypted_sig[20] ^= 1
                }
            }),
            victim: Alice,
            want: ake(P::AkeMacMismatch),
        },
        Case {
            name: "ake reveal: encrypted signature truncated",
            damage: Fields(|s, m| {
                if let (REVEAL, Body::RevealSignature(r)) = (s, &mut m.body) {
                    r.encrypted_sig.truncate(40)
                }
            }),
            victim: Alice,
            want: ake(P::AkeMacMismatch),
        },
        Case {
            name: "ake reveal: MAC bit flip",
            damage: Fields(|s, m| {
                if let (REVEAL, Body::RevealSignature(r)) = (s, &mut m.body) {
                    r.mac[0] ^= 1
                }
            }),
            victim: Alice,
            want: ake(P::AkeMacMismatch),
        },
        Case {
            name: "ake reveal: truncated in the MAC",
            damage: Bytes(REVEAL, |b| {
                b.truncate(b.len() - 1);
            }),
            victim: Alice,
            want: Want::Malformed(M::Codec(CodecError::Truncated {
                what: "signature MAC",
                needed: 1,
            })),
        },
        // Signature (Alice → Bob).
        Case {
            name: "ake signature: encrypted signature bit flip",
            damage: Fields(|s, m| {
                if let (SIG, Body::Signature(g)) = (s, &mut m.body) {
                    g.encrypted_sig[0] ^= 0x80
                }
            }),
            victim: Bob,
            want: ake(P::AkeMacMismatch),
        },
        Case {
            name: "ake signature: encrypted signature empty",
            damage: Fields(|s, m| {
                if let (SIG, Body::Signature(g)) = (s, &mut m.body) {
                    g.encrypted_sig.clear()
                }
            }),
            victim: Bob,
            want: ake(P::AkeMacMismatch),
        },
        Case {
            name: "ake signature: MAC zeroed",
            damage: Fields(|s, m| {
                if let (SIG, Body::Signature(g)) = (s, &mut m.body) {
                    g.mac = [0; 20]
                }
            }),
            victim: Bob,
            want: ake(P::AkeMacMismatch),
        },
        Case {
            name: "ake signature: trailing bytes",
            damage: Bytes(SIG, |b| b.push(0)),
            victim: Bob,
            want: Want::Malformed(M::Codec(CodecError::TrailingBytes(1))),
        },
        Case {
            name: "ake signature: sender is another instance of Alice",
            damage: Fields(|s, m| {
                if s == SIG {
                    m.header.sender_tag = 0x5555_5555
                }
            }),
            victim: Bob,
            want: Want::Ignored,
        },
    ]
}

/// Runs Alice's query and the AKE, passing every AKE message through
/// `damage`; returns the AKE messages as sent (undamaged).
fn run_ake(p: &mut Pair, damage: &Damage) -> Vec<String> {
    let mut stage = 0;
    let mut sent = Vec::new();
    p.alice.start(p.now);
    for _ in 0..100 {
        let (from_alice, msg) = if let Some(m) = p.alice.outbox.pop_front() {
            (true, m)
        } else if let Some(m) = p.bob.outbox.pop_front() {
            (false, m)
        } else {
            break;
        };
        let is_ake = matches!(message::parse(&msg), Ok(Message::Encoded(ref m)) if !matches!(m.body, Body::Data(_)));
        let msg = if is_ake {
            sent.push(msg.clone());
            let out = match damage {
                Damage::Fields(f) => {
                    let mut m = decode(&msg);
                    f(stage, &mut m);
                    m.to_armored()
                }
                Damage::Bytes(s, f) if *s == stage => {
                    let mut b = raw(&msg);
                    f(&mut b);
                    message::armor(&b)
                }
                Damage::Bytes(..) => msg,
            };
            stage += 1;
            out
        } else {
            msg
        };
        if from_alice {
            p.bob.receive(&msg, p.now);
        } else {
            p.alice.receive(&msg, p.now);
        }
    }
    sent
}

#[test]
fn ake_messages() {
    let cases = cases();
    run_table(
        "AKE",
        &cases,
        |c| c.name,
        |_, c| {
            let mut p = Pair::new();
            let sent = run_ake(&mut p, &c.damage);
            if sent.is_empty() {
                return Err(format!("the AKE stopped after {} messages", sent.len()));
            }
            let (victim, other) = match c.victim {
                Who::Alice => (&p.alice, &p.bob),
                Who::Bob => (&p.bob, &p.alice),
            };
            check(victim, &c.want)?;
            if victim.conv.is_private() {
                return Err("the victim went private".into());
            }
            if !other.delivered.is_empty() {
                return Err(format!("the other side delivered {:?}", other.texts()));
            }
            // A fresh AKE afterwards works.
            clear(&mut p);
            p.establish();
            still_private(&mut p, c.name)
        },
    );
}

/// AKE messages out of place: replayed or sent in the wrong state.
#[test]
fn ake_out_of_order() {
    struct Case {
        name: &'static str,
        run: fn(&mut Pair, &[String]) -> Result<(), String>,
    }
    let cases = [
        Case {
            name: "ake replay: Reveal Signature again after the AKE",
            run: |p, sent| {
                p.alice.receive(&sent[REVEAL], p.now);
                check(&p.alice, &Want::Ignored)?;
                p.alice.outbox.clear();
                Ok(())
            },
        },
        Case {
            name: "ake replay: Signature again after the AKE",
            run: |p, sent| {
                p.bob.receive(&sent[SIG], p.now);
                check(&p.bob, &Want::Ignored)
            },
        },
        Case {
            name: "ake replay: D-H Key again after the AKE",
            run: |p, sent| {
                p.bob.receive(&sent[DH_KEY], p.now);
                check(&p.bob, &Want::Ignored)?;
                p.bob.outbox.clear();
                Ok(())
            },
        },
        Case {
            name: "ake replay: an old D-H Commit (answered, not harmful)",
            run: |p, sent| {
                p.alice.receive(&sent[COMMIT], p.now);
                check(&p.alice, &Want::Ignored)?;
                // Alice answers with a D-H Key; Bob is not waiting for one.
                p.run();
                check(&p.bob, &Want::Ignored)
            },
        },
    ];
    run_table(
        "AKE order",
        &cases,
        |c| c.name,
        |_, c| {
            let mut p = Pair::new();
            let sent = run_ake(&mut p, &Damage::Bytes(99, |_| {}));
            if !(p.alice.conv.is_private() && p.bob.conv.is_private() && sent.len() == 4) {
                return Err("the undamaged AKE did not complete".into());
            }
            clear(&mut p);
            (c.run)(&mut p, &sent)?;
            if !(p.alice.conv.is_private() && p.bob.conv.is_private()) {
                return Err("a replay ended the private session".into());
            }
            still_private(&mut p, c.name)
        },
    );
}
