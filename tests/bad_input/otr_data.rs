//! Data messages (spec §"Data Message"): a real message from Alice to
//! Bob, each field damaged in turn. Every rejected message must leave Bob's
//! keys untouched: the genuine message delivered afterwards must still
//! decrypt, and the session must still work both ways.

use o2tr_proxy::otr::codec::CodecError;
use o2tr_proxy::otr::error::{Error, PeerMisbehaved as P};
use o2tr_proxy::otr::message::{
    self, DataMessage, FLAG_IGNORE_UNREADABLE, Header, MessageError as M,
};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

use crate::pair::{ALICE_TAG, BOB_TAG};
use crate::support::*;

/// How a genuine message is damaged.
enum Damage {
    /// Change decoded fields; the message is re-encoded (MAC unchanged).
    Fields(fn(&mut Header, &mut DataMessage)),
    /// Change the binary encoding; re-armoured.
    Bytes(fn(&mut Vec<u8>)),
    /// Change the armoured text.
    Text(fn(&str) -> String),
}

struct Case {
    name: &'static str,
    damage: Damage,
    want: Want,
}

/// Length of the revealed MAC keys of a binary data message.
fn reveal_len(b: &[u8]) -> usize {
    match o2tr_proxy::otr::message::EncodedMessage::decode(b).map(|m| m.body) {
        Ok(o2tr_proxy::otr::message::Body::Data(d)) => d.revealed_mac_keys.len(),
        _ => 0,
    }
}

fn unreadable(err: P) -> Want {
    Want::Unreadable { err, replay: false }
}

fn cases() -> Vec<Case> {
    use Damage::*;
    let mac = || unreadable(P::DataMacMismatch);
    let keyids = || unreadable(P::UnknownKeyids);
    vec![
        Case {
            name: "data: unknown flag bit set",
            damage: Fields(|_, d| d.flags |= 0x80),
            want: mac(),
        },
        Case {
            name: "data: IGNORE_UNREADABLE flag added (MAC no longer matches)",
            damage: Fields(|_, d| d.flags |= FLAG_IGNORE_UNREADABLE),
            want: Want::Ignored,
        },
        Case {
            name: "data: sender keyid 0",
            damage: Fields(|_, d| d.sender_keyid = 0),
            want: keyids(),
        },
        Case {
            name: "data: recipient keyid 0",
            damage: Fields(|_, d| d.recipient_keyid = 0),
            want: keyids(),
        },
        Case {
            name: "data: sender keyid from the future",
            damage: Fields(|_, d| d.sender_keyid += 5),
            want: keyids(),
        },
        Case {
            name: "data: recipient keyid from the future",
            damage: Fields(|_, d| d.recipient_keyid += 5),
            want: keyids(),
        },
        Case {
            name: "data: sender keyid 0xffffffff",
            damage: Fields(|_, d| d.sender_keyid = u32::MAX),
            want: keyids(),
        },
        Case {
            name: "data: recipient keyid long gone",
            damage: Fields(|_, d| d.recipient_keyid = d.recipient_keyid.wrapping_sub(2)),
            want: keyids(),
        },
        Case {
            name: "data: next DH = 0",
            damage: Fields(|_, d| d.next_dh = Vec::new()),
            want: mac(),
        },
        Case {
            name: "data: next DH = 1",
            damage: Fields(|_, d| d.next_dh = vec![1]),
            want: mac(),
        },
        Case {
            name: "data: next DH = p-1",
            damage: Fields(|_, d| d.next_dh = p_plus(-1)),
            want: mac(),
        },
        Case {
            name: "data: next DH = p",
            damage: Fields(|_, d| d.next_dh = p()),
            want: mac(),
        },
        Case {
            name: "data: next DH = p+1 (longer than the modulus)",
            damage: Fields(|_, d| d.next_dh = p_plus(1)),
            want: mac(),
        },
        Case {
            name: "data: next DH 4 KiB",
            damage: Fields(|_, d| d.next_dh = vec![0x55; 4096]),
            want: mac(),
        },
        Case {
            name: "data: counter 0",
            damage: Fields(|_, d| d.ctr = [0; 8]),
            want: mac(),
        },
        Case {
            name: "data: counter changed",
            damage: Fields(|_, d| d.ctr[7] ^= 1),
            want: mac(),
        },
        Case {
            name: "data: counter all ones",
            damage: Fields(|_, d| d.ctr = [0xff; 8]),
            want: mac(),
        },
        Case {
            name: "data: ciphertext bit flip",
            damage: Fields(|_, d| d.encrypted[0] ^= 0x01),
            want: mac(),
        },
        Case {
            name: "data: ciphertext truncated",
            damage: Fields(|_, d| {
                d.encrypted.pop();
            }),
            want: mac(),
        },
        Case {
            name: "data: ciphertext empty",
            damage: Fields(|_, d| d.encrypted.clear()),
            want: mac(),
        },
        Case {
            name: "data: ciphertext extended",
            damage: Fields(|_, d| d.encrypted.extend_from_slice(b"more")),
            want: mac(),
        },
        Case {
            name: "data: MAC first bit flipped",
            damage: Fields(|_, d| d.mac[0] ^= 0x80),
            want: mac(),
        },
        Case {
            name: "data: MAC last bit flipped",
            damage: Fields(|_, d| d.mac[19] ^= 0x01),
            want: mac(),
        },
        Case {
            name: "data: MAC zeroed",
            damage: Fields(|_, d| d.mac = [0; 20]),
            want: mac(),
        },
        Case {
            name: "data: revealed MAC keys garbage (unauthenticated, ignored)",
            damage: Fields(|_, d| d.revealed_mac_keys = vec![0xa5; 20]),
            want: Want::Delivered("genuine".into()),
        },
        Case {
            name: "data: revealed MAC keys odd length",
            damage: Fields(|_, d| d.revealed_mac_keys = vec![7; 7]),
            want: Want::Delivered("genuine".into()),
        },
        Case {
            name: "data: revealed MAC keys 8 KiB",
            damage: Fields(|_, d| d.revealed_mac_keys = vec![1; 8192]),
            want: Want::Delivered("genuine".into()),
        },
        Case {
            name: "data: sender instance tag 0",
            damage: Fields(|h, _| h.sender_tag = 0),
            want: Want::Malformed(M::InvalidInstanceTag {
                sender: 0,
                receiver: BOB_TAG,
            }),
        },
        Case {
            name: "data: sender instance tag 0xff",
            damage: Fields(|h, _| h.sender_tag = 0xff),
            want: Want::Malformed(M::InvalidInstanceTag {
                sender: 0xff,
                receiver: BOB_TAG,
            }),
        },
        Case {
            name: "data: receiver instance tag 0x7f",
            damage: Fields(|h, _| h.receiver_tag = 0x7f),
            want: Want::Malformed(M::InvalidInstanceTag {
                sender: ALICE_TAG,
                receiver: 0x7f,
            }),
        },
        Case {
            name: "data: receiver is another instance of Bob's account",
            damage: Fields(|h, _| h.receiver_tag = 0x3333_3333),
            want: Want::Ignored,
        },
        Case {
            name: "data: receiver instance tag 0 (only D-H Commit may)",
            damage: Fields(|h, _| h.receiver_tag = 0),
            want: Want::Ignored,
        },
        Case {
            name: "data: sender is an unknown instance of Alice",
            damage: Fields(|h, _| h.sender_tag = 0x4444_4444),
            want: unreadable(P::NotEncrypted),
        },
        Case {
            name: "data: re-sent as protocol version 2",
            damage: Fields(|h, _| *h = Header::v2()),
            want: unreadable(P::NotEncrypted),
        },
        Case {
            name: "data: protocol version 1",
            damage: Bytes(|b| b[1] = 1),
            want: Want::Malformed(M::UnknownVersion(1)),
        },
        Case {
            name: "data: protocol version 4",
            damage: Bytes(|b| b[1] = 4),
            want: Want::Malformed(M::UnknownVersion(4)),
        },
        Case {
            name: "data: protocol version 0xffff",
            damage: Bytes(|b| {
                b[0] = 0xff;
                b[1] = 0xff;
            }),
            want: Want::Malformed(M::UnknownVersion(0xffff)),
        },
        Case {
            name: "data: message type 0x01 (OTR v1 key exchange)",
            damage: Bytes(|b| b[2] = 0x01),
            want: Want::Malformed(M::UnknownType(0x01)),
        },
        Case {
            name: "data: message type 0xff",
            damage: Bytes(|b| b[2] = 0xff),
            want: Want::Malformed(M::UnknownType(0xff)),
        },
        Case {
            name: "data: truncated inside the revealed-keys length",
            damage: Bytes(|b| {
                b.truncate(b.len() - 2);
            }),
            want: Want::Malformed(M::Codec(CodecError::Truncated {
                what: "revealed MAC keys",
                needed: 2,
            })),
        },
        Case {
            name: "data: truncated inside the MAC",
            damage: Bytes(|b| {
                let reveal = reveal_len(b);
                b.truncate(b.len() - 4 - reveal - 10);
            }),
            want: Want::Malformed(M::Codec(CodecError::Truncated {
                what: "data MAC",
                needed: 10,
            })),
        },
        Case {
            name: "data: trailing bytes",
            damage: Bytes(|b| b.extend_from_slice(&[1, 2, 3])),
            want: Want::Malformed(M::Codec(CodecError::TrailingBytes(3))),
        },
        Case {
            name: "data: next DH MPI length 0xffffffff",
            damage: Bytes(|b| b[20..24].copy_from_slice(&[0xff; 4])),
            want: Want::Malformed(M::Codec(CodecError::TooLong {
                what: "next DH key",
                len: u32::MAX as usize,
            })),
        },
        Case {
            name: "data: next DH MPI with a leading zero byte",
            damage: Bytes(|b| {
                let len = u32::from_be_bytes([b[20], b[21], b[22], b[23]]) + 1;
                b[20..24].copy_from_slice(&len.to_be_bytes());
                b.insert(24, 0);
            }),
            want: Want::Malformed(M::NonMinimalMpi("next DH key")),
        },
        Case {
            name: "data: base64 with a character outside the alphabet",
            damage: Text(|t| format!("{}*{}", &t[..9], &t[9..])),
            want: Want::Malformed(M::Base64),
        },
        Case {
            name: "data: base64 cut in the middle of a quantum",
            damage: Text(|t| format!("{}.", &t[..t.len() - 4])),
            want: Want::Malformed(M::Base64),
        },
        Case {
            name: "data: no terminating dot",
            damage: Text(|t| t.trim_end_matches('.').to_string()),
            want: Want::Malformed(M::Unterminated),
        },
    ]
}

#[test]
fn data_message_fields() {
    let cases = cases();
    run_table(
        "data-message",
        &cases,
        |c| c.name,
        |i, c| {
            let mut p = private_pair(100 + i as u64);
            let genuine = send_one(&mut p.alice, "genuine", p.now);
            let bad = match &c.damage {
                Damage::Fields(f) => {
                    let (mut h, mut d) = data(&genuine);
                    f(&mut h, &mut d);
                    encode_data(h, d)
                }
                Damage::Bytes(f) => {
                    let mut b = raw(&genuine);
                    f(&mut b);
                    message::armor(&b)
                }
                Damage::Text(f) => f(&genuine),
            };
            if bad == genuine {
                return Err("the damage changed nothing".into());
            }
            // The typed error, at the layer that produces it.
            match (&c.want, message::parse(&bad)) {
                (Want::Malformed(e), r) if r.as_ref().err() != Some(e) => {
                    return Err(format!("parse gave {r:?}, want Err({e:?})"));
                }
                (Want::Malformed(_), _) => {}
                (Want::Unreadable { err, .. }, Ok(message::Message::Encoded(m)))
                    if m.header.sender_tag == ALICE_TAG =>
                {
                    let (h, d) = data(&bad);
                    let mut s = session(&p.bob, ALICE_TAG);
                    let mut rng = ChaCha20Rng::seed_from_u64(1);
                    match s.ratchet.decrypt(&h, &d, 0, &mut rng) {
                        Err(Error::Peer(got)) if got == *err => {}
                        Err(e) => return Err(format!("decrypt failed with {e:?}, want {err:?}")),
                        Ok(_) => return Err(format!("decrypt accepted it, want {err:?}")),
                    }
                }
                (_, Err(e)) => return Err(format!("parse failed unexpectedly: {e}")),
                _ => {}
            }
            p.bob.receive(&bad, p.now);
            check(&p.bob, &c.want)?;
            if !matches!(c.want, Want::Delivered(_)) {
                // Nothing changed: the genuine message still decrypts.
                clear(&mut p);
                p.bob.receive(&genuine, p.now);
                check(&p.bob, &Want::Delivered("genuine".into()))
                    .map_err(|e| format!("genuine afterwards: {e}"))?;
            }
            still_private(&mut p, c.name)
        },
    );
}

/// Replays and reordering (the ratchet's counter check).
#[test]
fn replay_and_reorder() {
    struct Case {
        name: &'static str,
        run: fn(&mut crate::pair::Pair) -> Result<(), String>,
    }
    let cases = [
        Case {
            name: "replay: the same data message twice",
            run: |p| {
                let m = send_one(&mut p.alice, "once", p.now);
                p.bob.receive(&m, p.now);
                clear(p);
                p.bob.receive(&m, p.now);
                check(
                    &p.bob,
                    &Want::Unreadable {
                        err: P::CounterReused,
                        replay: true,
                    },
                )
            },
        },
        Case {
            name: "replay: an old message after the keys rotated",
            run: |p| {
                let m = send_one(&mut p.alice, "old", p.now);
                p.bob.receive(&m, p.now);
                p.run();
                p.bob.send("answer", p.now);
                p.run();
                p.alice.send("newer", p.now);
                p.run();
                clear(p);
                p.bob.receive(&m, p.now);
                // Bob may still hold the pairing (counter check) or have
                // dropped the keys (unknown keyids); either way, rejected.
                let a = check(
                    &p.bob,
                    &Want::Unreadable {
                        err: P::CounterReused,
                        replay: true,
                    },
                );
                let b = check(
                    &p.bob,
                    &Want::Unreadable {
                        err: P::UnknownKeyids,
                        replay: false,
                    },
                );
                a.or(b)
            },
        },
        Case {
            name: "reorder: second message before the first, then the first again",
            run: |p| {
                let m1 = send_one(&mut p.alice, "first", p.now);
                let m2 = send_one(&mut p.alice, "second", p.now);
                p.bob.receive(&m2, p.now);
                clear(p);
                // Late but authentic: read once (the replay window).
                p.bob.receive(&m1, p.now);
                check(&p.bob, &Want::Delivered("first".into()))?;
                clear(p);
                p.bob.receive(&m1, p.now);
                check(
                    &p.bob,
                    &Want::Unreadable {
                        err: P::CounterReused,
                        replay: true,
                    },
                )
            },
        },
        Case {
            name: "reorder: a message older than the replay window",
            run: |p| {
                let old = send_one(&mut p.alice, "too old", p.now);
                let window = o2tr_proxy::otr::keys::REPLAY_WINDOW;
                let newer: Vec<String> = (0..=window)
                    .map(|i| send_one(&mut p.alice, &format!("n{i}"), p.now))
                    .collect();
                if let Some(last) = newer.last() {
                    p.bob.receive(last, p.now);
                }
                clear(p);
                p.bob.receive(&old, p.now);
                check(
                    &p.bob,
                    &Want::Unreadable {
                        err: P::CounterReused,
                        replay: true,
                    },
                )
            },
        },
        Case {
            name: "data message with no session (Bob forgot it)",
            run: |p| {
                let m = send_one(&mut p.alice, "lost", p.now);
                let a = p.bob.conv.forget();
                p.bob.apply(a);
                clear(p);
                p.bob.receive(&m, p.now);
                check(
                    &p.bob,
                    &Want::Unreadable {
                        err: P::NotEncrypted,
                        replay: false,
                    },
                )?;
                // The peer's error message makes Alice re-key; afterwards a
                // new AKE gets both private again.
                p.bob.outbox.clear();
                clear(p);
                p.establish();
                Ok(())
            },
        },
    ];
    run_table(
        "replay",
        &cases,
        |c| c.name,
        |i, c| {
            let mut p = private_pair(300 + i as u64);
            (c.run)(&mut p)?;
            still_private(&mut p, c.name)
        },
    );
}
