//! Fragments (spec §"Fragmentation"), raw message text, the TLV section
//! and plaintext of authentic messages, and `otr::decode` on bad input.

use o2tr_proxy::otr::codec::CodecError;
use o2tr_proxy::otr::decode;
use o2tr_proxy::otr::fragment::{self, Fragment, FragmentError as F};
use o2tr_proxy::otr::message::{self, Message, MessageError as M, Version};

use crate::pair::{ALICE_TAG, BOB_TAG, Pair};
use crate::support::*;

const MAX_REASSEMBLY: usize = 256 * 1024;
const MAX_SENDERS: usize = 8;

fn frag(text: &str) -> Fragment {
    match message::parse(text) {
        Ok(Message::Fragment(f)) => f,
        other => panic!("not a fragment: {other:?}"),
    }
}

/// `text` split into fragments of `sender` for Bob.
fn pieces(text: &str, sender: u32) -> Vec<String> {
    fragment::fragment(text, 160, Version::V3, sender, BOB_TAG).expect("fragments")
}

fn edit(piece: &str, f: impl FnOnce(&mut Fragment)) -> String {
    let mut x = frag(piece);
    f(&mut x);
    x.to_text()
}

struct FragCase {
    name: &'static str,
    /// The bad sequence, from the genuine fragments of a data message.
    build: fn(&[String]) -> Vec<String>,
    /// The outcome, given the genuine message's fragment count n.
    want: fn(u16) -> Want,
    /// A log line (all of these words) that must have been written.
    log: &'static [&'static str],
}

fn frag_cases() -> Vec<FragCase> {
    vec![
        FragCase {
            name: "fragment: k = 0",
            build: |g| vec![edit(&g[0], |f| f.k = 0)],
            want: |n| Want::Fragment(F::Illegal { k: 0, n }),
            log: &[],
        },
        FragCase {
            name: "fragment: n = 0",
            build: |g| vec![edit(&g[0], |f| f.n = 0)],
            want: |_| Want::Fragment(F::Illegal { k: 1, n: 0 }),
            log: &[],
        },
        FragCase {
            name: "fragment: k > n",
            build: |g| vec![edit(&g[0], |f| f.k = f.n + 1)],
            want: |n| Want::Fragment(F::Illegal { k: n + 1, n }),
            log: &[],
        },
        FragCase {
            // A server delivers again what it did not see acknowledged.
            name: "fragment: overlapping (piece 2 twice) is ignored",
            build: |g| {
                let mut v = vec![g[0].clone(), g[1].clone(), g[1].clone()];
                v.extend_from_slice(&g[2..]);
                v
            },
            want: |_| Want::Delivered("genuine".into()),
            log: &[],
        },
        FragCase {
            // Kept ahead of the gap (a server re-routing a dead session's
            // stanzas after newer ones reorders them).
            name: "fragment: reordered (2 before 1) is reassembled",
            build: |g| {
                let mut v = vec![g[1].clone(), g[0].clone()];
                v.extend_from_slice(&g[2..]);
                v
            },
            want: |_| Want::Delivered("genuine".into()),
            log: &[],
        },
        FragCase {
            name: "fragment: n changes mid-message",
            build: |g| vec![g[0].clone(), edit(&g[1], |f| f.n += 1)],
            want: |_| Want::Ignored,
            log: &[],
        },
        FragCase {
            name: "fragment: last piece never comes",
            build: |g| g[..g.len() - 1].to_vec(),
            want: |_| Want::Ignored,
            log: &[],
        },
        FragCase {
            name: "fragment: piece 1 twice restarts the message",
            build: |g| {
                let mut v = vec![g[0].clone()];
                v.extend_from_slice(g);
                v
            },
            want: |_| Want::Delivered("genuine".into()),
            log: &[],
        },
        FragCase {
            // The rest waits ahead of the gap that never fills: nothing
            // shown, nothing answered.
            name: "fragment: a middle piece for another receiver",
            build: |g| {
                let mut v = vec![g[0].clone(), edit(&g[1], |f| f.receiver_tag = 0x3333_3333)];
                v.extend_from_slice(&g[2..]);
                v
            },
            want: |_| Want::Ignored,
            log: &[],
        },
        FragCase {
            name: "fragment: the whole message for another receiver",
            build: |g| {
                g.iter()
                    .map(|p| edit(p, |f| f.receiver_tag = 0x3333_3333))
                    .collect()
            },
            want: |_| Want::Ignored,
            log: &[],
        },
        FragCase {
            name: "fragment: mixed senders interleaved",
            build: |g| {
                let x = pieces("?OTR:!!not base64!!.", 0x5555_5555);
                let mut v = Vec::new();
                for (i, p) in g.iter().enumerate() {
                    v.push(p.clone());
                    if let Some(q) = x.get(i) {
                        v.push(q.clone());
                    }
                }
                v
            },
            want: |_| Want::Delivered("genuine".into()),
            log: &[],
        },
        FragCase {
            name: "fragment: reassembles to invalid base64",
            build: |_| pieces("?OTR:!!not base64 at all!!.", ALICE_TAG),
            want: |_| Want::Malformed(M::Base64),
            log: &[],
        },
        FragCase {
            name: "fragment: huge n flood past the reassembly bound",
            build: |_| {
                (1..=300u16)
                    .map(|k| {
                        Fragment {
                            version: Version::V3,
                            sender_tag: ALICE_TAG,
                            receiver_tag: BOB_TAG,
                            k,
                            n: u16::MAX,
                            piece: "A".repeat(1000),
                        }
                        .to_text()
                    })
                    .collect()
            },
            want: |_| {
                Want::Fragment(F::TooLarge {
                    max: MAX_REASSEMBLY,
                })
            },
            log: &["fragment buffer limit reached", "exceed"],
        },
        FragCase {
            name: "fragment: flood from many sender instances",
            build: |_| {
                let v: Vec<String> = (0..20u32)
                    .map(|i| {
                        Fragment {
                            version: Version::V3,
                            sender_tag: 0x6000_0000 + i,
                            receiver_tag: BOB_TAG,
                            k: 1,
                            n: 2,
                            piece: "AAAA".into(),
                        }
                        .to_text()
                    })
                    .collect();
                v
            },
            want: |_| Want::Fragment(F::TooManySenders { max: MAX_SENDERS }),
            log: &["fragment buffer limit reached", "senders"],
        },
        FragCase {
            name: "fragment: n above 65535",
            build: |_| {
                vec![format!(
                    "?OTR|{ALICE_TAG:08x}|{BOB_TAG:08x},00001,99999,AAAA,"
                )]
            },
            want: |_| Want::Malformed(M::MalformedFragment("fragment count n")),
            log: &[],
        },
        FragCase {
            name: "fragment: k not a number",
            build: |_| vec![format!("?OTR|{ALICE_TAG:08x}|{BOB_TAG:08x},x,00002,AAAA,")],
            want: |_| Want::Malformed(M::MalformedFragment("fragment number k")),
            log: &[],
        },
        FragCase {
            name: "fragment: piece not terminated",
            build: |g| vec![g[0].trim_end_matches(',').to_string()],
            want: |_| Want::Malformed(M::MalformedFragment("unterminated piece")),
            log: &[],
        },
        FragCase {
            name: "fragment: empty piece",
            build: |_| vec![format!("?OTR|{ALICE_TAG:08x}|{BOB_TAG:08x},00001,00002,,")],
            want: |_| Want::Malformed(M::MalformedFragment("empty piece")),
            log: &[],
        },
        FragCase {
            name: "fragment: sender instance tag 0",
            build: |g| vec![edit(&g[0], |f| f.sender_tag = 0)],
            want: |_| {
                Want::Malformed(M::InvalidInstanceTag {
                    sender: 0,
                    receiver: BOB_TAG,
                })
            },
            log: &[],
        },
        FragCase {
            name: "fragment: receiver instance tag 0xff",
            build: |g| vec![edit(&g[0], |f| f.receiver_tag = 0xff)],
            want: |_| {
                Want::Malformed(M::InvalidInstanceTag {
                    sender: ALICE_TAG,
                    receiver: 0xff,
                })
            },
            log: &[],
        },
        FragCase {
            name: "fragment: sender tag of nine hex digits",
            build: |_| {
                vec![format!(
                    "?OTR|1{ALICE_TAG:08x}|{BOB_TAG:08x},00001,00002,AAAA,"
                )]
            },
            want: |_| Want::Malformed(M::MalformedFragment("sender instance tag")),
            log: &[],
        },
        FragCase {
            name: "fragment: missing separator after the tags",
            build: |_| {
                vec![format!(
                    "?OTR|{ALICE_TAG:08x}{BOB_TAG:08x},00001,00002,AAAA,"
                )]
            },
            want: |_| Want::Malformed(M::MalformedFragment("sender instance tag")),
            log: &[],
        },
    ]
}

#[test]
fn fragments() {
    let cases = frag_cases();
    run_table(
        "fragment",
        &cases,
        |c| c.name,
        |i, c| {
            let mut p = private_pair(500 + i as u64);
            let genuine = send_one(&mut p.alice, "genuine", p.now);
            let g = pieces(&genuine, ALICE_TAG);
            if g.len() < 3 {
                return Err(format!("only {} genuine fragments", g.len()));
            }
            let mark = log_mark();
            for m in (c.build)(&g) {
                p.bob.receive(&m, p.now);
            }
            let want = (c.want)(g.len() as u16);
            check(&p.bob, &want)?;
            if !c.log.is_empty() && !logged_since(mark, c.log) {
                return Err(format!("no log line with {:?}", c.log));
            }
            if !matches!(want, Want::Delivered(_)) {
                // The genuine message, fragmented, still gets through.
                clear(&mut p);
                for m in &g {
                    p.bob.receive(m, p.now);
                }
                if p.bob.texts() != ["genuine"] {
                    return Err(format!(
                        "genuine fragments afterwards gave {:?} ({:?})",
                        p.bob.texts(),
                        p.bob.notices
                    ));
                }
            }
            still_private(&mut p, c.name)
        },
    );
}

/// Raw text a peer (or anyone able to send to us) can put in a body.
#[test]
fn raw_text() {
    struct Case {
        name: &'static str,
        text: fn() -> String,
        want: Want,
    }
    let cases = [
        Case {
            name: "text: base64 outside the alphabet",
            text: || "?OTR:!!!!.".into(),
            want: Want::Malformed(M::Base64),
        },
        Case {
            name: "text: base64 with padding in the middle",
            text: || "?OTR:AA==AAMD.".into(),
            want: Want::Malformed(M::Base64),
        },
        Case {
            name: "text: encoded message without the final dot",
            text: || "?OTR:AAMD".into(),
            want: Want::Malformed(M::Unterminated),
        },
        Case {
            name: "text: empty encoded message",
            text: || "?OTR:.".into(),
            want: Want::Malformed(M::Codec(CodecError::Truncated {
                what: "protocol version",
                needed: 2,
            })),
        },
        Case {
            name: "text: version only",
            text: || "?OTR:AAM=.".into(),
            want: Want::Malformed(M::Codec(CodecError::Truncated {
                what: "message type",
                needed: 1,
            })),
        },
        Case {
            name: "text: header cut before the instance tags",
            text: || "?OTR:AAMD.".into(),
            want: Want::Malformed(M::Codec(CodecError::Truncated {
                what: "sender instance tag",
                needed: 4,
            })),
        },
        Case {
            name: "text: 96 KiB of zero bytes",
            text: || format!("?OTR:{}.", "A".repeat(128 * 1024)),
            want: Want::Malformed(M::UnknownVersion(0)),
        },
        Case {
            name: "text: query offering no version we speak",
            text: || "?OTRv?".into(),
            want: Want::Ignored,
        },
        Case {
            name: "text: query offering only version 1",
            text: || "?OTR?".into(),
            want: Want::Ignored,
        },
        Case {
            name: "text: query offering only unknown versions",
            text: || "?OTRv4567?".into(),
            want: Want::Ignored,
        },
    ];
    run_table(
        "raw text",
        &cases,
        |c| c.name,
        |i, c| {
            let mut p = private_pair(700 + i as u64);
            let text = (c.text)();
            if let Want::Malformed(e) = &c.want {
                let got = message::parse(&text);
                if got.as_ref().err() != Some(e) {
                    return Err(format!("parse gave {got:?}, want {e:?}"));
                }
            }
            p.bob.receive(&text, p.now);
            check(&p.bob, &c.want)?;
            if !p.bob.conv.is_private() {
                return Err("no longer private".into());
            }
            still_private(&mut p, c.name)
        },
    );
}

/// Authentic messages (a malicious peer holds the session keys) whose
/// decrypted plaintext or TLV section is malformed: the human part is
/// delivered as sent (invalid UTF-8 replaced), malformed TLVs are dropped,
/// nothing else happens.
#[test]
fn authentic_but_odd_plaintext() {
    struct Case {
        name: &'static str,
        plaintext: &'static [u8],
        want: Want,
    }
    let cases = [
        Case {
            name: "plaintext: TLV record truncated",
            plaintext: b"hi\0\x00\x01\x00\x09ab",
            want: Want::Delivered("hi".into()),
        },
        Case {
            name: "plaintext: TLV length 0xffff with 2 bytes",
            plaintext: b"hi\0\x00\x00\xff\xffab",
            want: Want::Delivered("hi".into()),
        },
        Case {
            name: "plaintext: TLV header cut in half",
            plaintext: b"hi\0\x00",
            want: Want::Delivered("hi".into()),
        },
        Case {
            name: "plaintext: unknown TLV type",
            plaintext: b"hi\0\x12\x34\x00\x02ab",
            want: Want::Delivered("hi".into()),
        },
        Case {
            name: "plaintext: invalid UTF-8",
            plaintext: b"\xff\xfeok",
            want: Want::Delivered("\u{fffd}\u{fffd}ok".into()),
        },
        Case {
            name: "plaintext: overlong UTF-8 encoding of '/'",
            plaintext: b"a\xc0\xafb",
            want: Want::Delivered("a\u{fffd}\u{fffd}b".into()),
        },
        Case {
            name: "plaintext: only a NUL",
            plaintext: b"\0",
            want: Want::Ignored,
        },
        Case {
            name: "plaintext: SMP abort with nothing under way",
            plaintext: b"\0\x00\x06\x00\x00",
            want: Want::Ignored,
        },
    ];
    run_table(
        "plaintext",
        &cases,
        |c| c.name,
        |i, c| {
            let mut p = private_pair(800 + i as u64);
            let m = forge(&mut p.alice, true, 0, c.plaintext);
            p.bob.receive(&m, p.now);
            check(&p.bob, &c.want)?;
            still_private(&mut p, c.name)
        },
    );
}

/// `o2tr-proxy decode` on bad input: the same typed error as the parser,
/// never a panic; odd but well-formed values are described.
#[test]
fn decode_describes_or_errs() {
    struct Case {
        name: &'static str,
        text: fn(&mut Pair) -> String,
        want: Result<&'static str, M>,
    }
    let cases = [
        Case {
            name: "decode: invalid base64",
            text: |_| "?OTR:@@@@.".into(),
            want: Err(M::Base64),
        },
        Case {
            name: "decode: unterminated",
            text: |_| "?OTR:AAMD".into(),
            want: Err(M::Unterminated),
        },
        Case {
            name: "decode: version 1 message",
            text: |_| message::armor(&[0, 1, 2]),
            want: Err(M::UnknownVersion(1)),
        },
        Case {
            name: "decode: trailing bytes",
            text: |p| {
                let mut b = raw(&send_one(&mut p.alice, "x", p.now));
                b.push(0);
                message::armor(&b)
            },
            want: Err(M::Codec(CodecError::TrailingBytes(1))),
        },
        Case {
            name: "decode: fragment with n above 65535",
            text: |_| "?OTR|00000100|00000200,1,70000,AAAA,".into(),
            want: Err(M::MalformedFragment("fragment count n")),
        },
        Case {
            name: "decode: fragment with k = 0 (described, judged later)",
            text: |_| "?OTR|00000100|00000200,0,2,AAAA,".into(),
            want: Ok("illegal k/n"),
        },
        Case {
            name: "decode: data message with keyids 0 and odd revealed keys",
            text: |p| {
                let (h, mut d) = data(&send_one(&mut p.alice, "x", p.now));
                d.sender_keyid = 0;
                d.recipient_keyid = 0;
                d.revealed_mac_keys = vec![1; 7];
                encode_data(h, d)
            },
            want: Ok("Data"),
        },
        Case {
            name: "decode: data message with next DH = p",
            text: |pair| {
                let (h, mut d) = data(&send_one(&mut pair.alice, "x", pair.now));
                d.next_dh = p();
                encode_data(h, d)
            },
            want: Ok("Data"),
        },
    ];
    run_table(
        "decode",
        &cases,
        |c| c.name,
        |i, c| {
            let mut p = private_pair(900 + i as u64);
            let text = (c.text)(&mut p);
            match (decode::describe(&text), &c.want) {
                (Err(e), Err(w)) if e == *w => {
                    if message::parse(&text).err().as_ref() != Some(w) {
                        return Err("parse and describe disagree".into());
                    }
                    Ok(())
                }
                (Ok(d), Ok(w)) if d.contains(w) => Ok(()),
                (got, w) => Err(format!("describe gave {got:?}, want {w:?}")),
            }
        },
    );
}

/// Resource bounds of one conversation: the held-message queue and the
/// number of peer instances. Each has a limit, a notice and a log line
/// when hit, and the conversation keeps working.
#[test]
fn conversation_bounds() {
    use o2tr_proxy::otr::ake::{AuthState, Tags};
    use o2tr_proxy::otr::conversation::{Config, Conversation, Notice};
    use rand_chacha::ChaCha20Rng;
    use rand_chacha::rand_core::SeedableRng;

    struct Case {
        name: &'static str,
        run: fn() -> Result<(), String>,
    }
    let cases = [
        Case {
            name: "bound: held-message queue full",
            run: || {
                let mut p = Pair::new();
                let mut cfg = Config::new(ALICE, ALICE_TAG);
                cfg.max_held = 3;
                p.alice.conv = Conversation::new(cfg, crate::pair::keys().0.clone());
                let mark = log_mark();
                for i in 0..5 {
                    p.alice.send(&format!("held {i}"), p.now);
                }
                let full = p
                    .alice
                    .notices
                    .iter()
                    .filter(|n| **n == Notice::HeldQueueFull)
                    .count();
                if p.alice.held.len() != 3 || full != 2 {
                    return Err(format!(
                        "{} held, {full} queue-full notices",
                        p.alice.held.len()
                    ));
                }
                if !logged_since(mark, &["held-message queue full", "limit=3"]) {
                    return Err("no log line at the limit".into());
                }
                if p.alice.sent_log.iter().any(|s| s.contains("held ")) {
                    return Err("a held message went out in plaintext".into());
                }
                // The kept ones go out encrypted once private.
                p.alice.outbox.clear();
                p.establish();
                if p.bob.texts() != ["held 0", "held 1", "held 2"] {
                    return Err(format!("bob got {:?}", p.bob.texts()));
                }
                still_private(&mut p, "held")
            },
        },
        Case {
            name: "bound: D-H Commits from too many instances",
            run: || {
                let mut p = private_pair(1500);
                let mut rng = ChaCha20Rng::seed_from_u64(99);
                let mark = log_mark();
                for i in 0..40u32 {
                    let tags = Tags {
                        ours: 0x7000_0000 + i,
                        theirs: 0,
                    };
                    let (_, commit) = AuthState::start(Version::V3, tags, &mut rng);
                    p.bob.receive(&commit.to_armored(), p.now);
                }
                let limit = Config::new(BOB, BOB_TAG).max_instances;
                let told = p
                    .bob
                    .notices
                    .iter()
                    .filter(|n| **n == Notice::TooManyInstances { limit })
                    .count();
                // Alice's instance is one of the `limit`.
                if told != 40 - (limit - 1) {
                    return Err(format!("{told} notices, {} answers", p.bob.outbox.len()));
                }
                if p.bob.outbox.len() != limit - 1 {
                    return Err(format!("{} D-H Keys sent", p.bob.outbox.len()));
                }
                if !logged_since(mark, &["instance limit reached", &format!("limit={limit}")]) {
                    return Err("no log line at the limit".into());
                }
                p.bob.outbox.clear();
                still_private(&mut p, "instances")
            },
        },
    ];
    run_table("bounds", &cases, |c| c.name, |_, c| (c.run)());
}
