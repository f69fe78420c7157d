//! Stable-toolchain stand-in for the cargo-fuzz targets in `fuzz/`: runs
//! the same target bodies over inputs from a seeded generator (random
//! bytes, and valid messages, fragments, operation streams, XMPP streams
//! and stanzas with random mutations), so every `cargo test` exercises
//! every target. Crashes found by real fuzzing are pinned here or as unit
//! tests next to the fixed code (docs/fuzzing.md).

#[path = "../fuzz/src/lib.rs"]
mod bodies;

use o2tr_proxy::otr::fragment::fragment;
use o2tr_proxy::otr::message::{
    Body, DataMessage, DhCommit, DhKey, EncodedMessage, Header, RevealSignature, Signature,
    Version, error_message, query_message, whitespace_tag,
};

/// SplitMix64: small, seedable, good enough to drive a smoke fuzzer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn tag(&mut self) -> u32 {
        match self.below(4) {
            0 => 0,
            1 => self.below(0x200) as u32,
            _ => self.next() as u32,
        }
    }
}

fn random_message(rng: &mut Rng) -> EncodedMessage {
    let header = if rng.below(2) == 0 {
        Header::v2()
    } else {
        Header::v3(0x100 + rng.below(1 << 20) as u32, 0)
    };
    let mac = [rng.next() as u8; 20];
    let body = match rng.below(5) {
        0 => Body::DhCommit(DhCommit {
            encrypted_gx: rng.bytes(200),
            hashed_gx: rng.bytes(32),
        }),
        1 => Body::DhKey(DhKey { gy: rng.bytes(200) }),
        2 => Body::RevealSignature(RevealSignature {
            revealed_key: rng.bytes(16),
            encrypted_sig: rng.bytes(100),
            mac,
        }),
        3 => Body::Signature(Signature {
            encrypted_sig: rng.bytes(100),
            mac,
        }),
        _ => Body::Data(DataMessage {
            flags: rng.next() as u8,
            sender_keyid: rng.next() as u32,
            recipient_keyid: rng.next() as u32,
            next_dh: rng.bytes(200),
            ctr: (rng.next()).to_be_bytes(),
            encrypted: rng.bytes(100),
            mac,
            revealed_mac_keys: rng.bytes(60),
        }),
    };
    EncodedMessage { header, body }
}

fn mutate(rng: &mut Rng, mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(3) {
        match rng.below(4) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            1 => data.truncate(rng.below(data.len() + 1)),
            2 => {
                let i = rng.below(data.len() + 1);
                data.insert(i, rng.next() as u8);
            }
            _ => {
                let extra = rng.bytes(8);
                data.extend(extra);
            }
        }
    }
    data
}

fn otr_text(rng: &mut Rng) -> String {
    let m = random_message(rng);
    match rng.below(7) {
        0 => m.to_armored(),
        1 => query_message(&[Version::V2, Version::V3][..rng.below(3)], "alice"),
        2 => error_message("bad"),
        3 => format!("hi{}there", whitespace_tag(&[Version::V3])),
        4 => format!(
            "?OTR|{:x}|{:x},{},{},{},",
            rng.tag(),
            rng.tag(),
            rng.below(4),
            rng.below(4),
            "AAMD"
        ),
        5 => format!("?OTR,{},{},piece,", rng.below(70_000), rng.below(4)),
        _ => {
            let alphabet = b"?OTR:|,v23 Error.AZaz09+/=\t ";
            (0..rng.below(60))
                .map(|_| char::from(alphabet[rng.below(alphabet.len())]))
                .collect()
        }
    }
}

#[test]
fn otr_message_target_survives_seeded_inputs() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for i in 0..200_000 {
        let input = match i % 4 {
            0 => rng.bytes(300),
            1 => {
                let bytes = random_message(&mut rng).encode();
                mutate(&mut rng, bytes)
            }
            2 => {
                let text = otr_text(&mut rng);
                mutate(&mut rng, text.into_bytes())
            }
            _ => otr_text(&mut rng).into_bytes(),
        };
        bodies::otr_message(&input);
    }
}

#[test]
fn fragment_target_survives_seeded_inputs() {
    let mut rng = Rng(0xfeed_face_cafe_beef);
    for i in 0..100_000 {
        let mut input = (rng.below(1 << 16) as u16).to_be_bytes().to_vec();
        if i % 3 == 0 {
            input.extend(rng.bytes(300));
        } else {
            // Lines of fragments of a real message, shuffled and mutated.
            let armored = random_message(&mut rng).to_armored();
            let version = if rng.below(2) == 0 {
                Version::V2
            } else {
                Version::V3
            };
            let max_len = 37 + rng.below(100);
            let mut lines = fragment(&armored, max_len, version, 0x100, 0).unwrap();
            if i % 3 == 2 && lines.len() > 1 {
                let a = rng.below(lines.len());
                let b = rng.below(lines.len());
                lines.swap(a, b);
            }
            let mut text = lines.join("\n").into_bytes();
            if rng.below(2) == 0 {
                text = mutate(&mut rng, text);
            }
            input.extend(text);
        }
        bodies::fragment(&input);
    }
}

/// Operation streams for the stateful targets: random bytes, biased so
/// short chunks and the interesting op codes come up often.
fn op_stream(rng: &mut Rng, ops: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..ops {
        out.push(rng.next() as u8);
        // A flags/size byte and a short length-prefixed chunk.
        out.push(rng.next() as u8);
        let len = rng.below(40);
        out.push(len as u8);
        out.extend(rng.bytes(len));
    }
    out
}

#[test]
fn data_message_target_survives_seeded_inputs() {
    let mut rng = Rng(0xda7a_0001);
    for i in 0..500 {
        let ops = 1 + rng.below(8);
        let mut input = op_stream(&mut rng, ops);
        if i % 5 == 0 {
            // Authentic plaintexts carrying TLVs: disconnect, SMP, extra key.
            let typ = rng.below(10) as u8;
            let value = rng.bytes(20);
            let mut plain = b"hi\0".to_vec();
            plain.extend([0, typ]);
            plain.extend((value.len() as u16).to_be_bytes());
            plain.extend(value);
            input.extend([2, 0, plain.len() as u8]);
            input.extend(plain);
        }
        bodies::data_message(&input);
    }
}

#[test]
fn snapshot_decode_target_survives_seeded_inputs() {
    let mut rng = Rng(0x5a9_0002);
    for i in 0..1500 {
        let mut input = vec![(i % 3) as u8, rng.next() as u8];
        input.extend(rng.bytes(if i % 3 == 0 { 600 } else { 40 }));
        bodies::snapshot_decode(&input);
    }
}

#[test]
fn smp_target_survives_seeded_inputs() {
    let mut rng = Rng(0x5_3900_0003);
    for i in 0..40 {
        let mut input = vec![i as u8 % 5, rng.next() as u8];
        let ops = 1 + rng.below(3);
        input.extend(op_stream(&mut rng, ops));
        bodies::smp(&input);
    }
}

/// A client→server and a server→client stream, to cut and mutate.
const XMPP_STREAMS: [&str; 2] = [
    "<?xml version='1.0'?><stream:stream to='example.org' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'> <iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq><message to='bob@example.org' type='chat' id='m1'><body>hi &amp; &#x263A; <![CDATA[<x>]]></body><active xmlns='http://jabber.org/protocol/chatstates'/><!-- c --></message>\n<presence/></stream:stream>",
    "<stream:stream id='1' version='1.0' xml:lang='en' xmlns:stream='http://etherx.jabber.org/streams' from='example.org' xmlns='jabber:client'><stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><sm xmlns='urn:xmpp:sm:3'/></stream:features><message from='bob@example.org' to='bob@example.org/phone' type='chat'><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='bob@example.org/laptop' type='chat'><body>?OTR:AAMD.</body></message></forwarded></sent></message><x:y xmlns:x='urn:x' a='&lt;'/>  </stream:stream>",
];

#[test]
fn xml_framer_target_survives_seeded_inputs() {
    let mut rng = Rng(0xf4a3_0004);
    for i in 0..60_000 {
        let mut input = vec![rng.next() as u8, rng.next() as u8];
        let stream = XMPP_STREAMS[i % 2].as_bytes().to_vec();
        input.extend(match i % 4 {
            0 => rng.bytes(200),
            1 => stream,
            _ => mutate(&mut rng, stream),
        });
        bodies::xml_framer(&input);
    }
}

/// Children a client may put on a message: allowed, forbidden, and
/// forbidden content hidden inside allowed ones.
const CHILDREN: [&str; 14] = [
    "<active xmlns='http://jabber.org/protocol/chatstates'/>",
    "<request xmlns='urn:xmpp:receipts'/>",
    "<markable xmlns='urn:xmpp:chat-markers:0'/>",
    "<origin-id xmlns='urn:xmpp:sid:0' id='o1'/>",
    "<delay xmlns='urn:xmpp:delay' stamp='2023-11-14T22:13:20Z'>Offline storage</delay>",
    "<no-store xmlns='urn:xmpp:hints'/>",
    "<no-copy xmlns='urn:xmpp:hints'/>",
    "<store xmlns='urn:xmpp:hints'/>",
    "<subject>the subject</subject>",
    "<thread>t1</thread>",
    "<html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'><p>the secret body text</p></body></html>",
    "<composing xmlns='http://jabber.org/protocol/chatstates'><body>the secret body text</body></composing>",
    "<received xmlns='urn:xmpp:receipts' id='r1'>the secret body text</received>",
    "loose text",
];

/// Whole stanzas from a server: a carbon and an archive result.
const WHOLE_STANZAS: [&str; 2] = [
    "<message from='bob@example.org' to='bob@example.org/phone' type='chat'><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='bob@example.org/laptop' type='chat'><body>?OTR:AAMD.</body><encryption xmlns='urn:xmpp:eme:0' namespace='urn:xmpp:otr:0'/></message></forwarded></sent></message>",
    "<message from='bob@example.org' to='bob@example.org/phone'><result xmlns='urn:xmpp:mam:2' queryid='q1' id='2'><forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2010-07-10T23:08:25Z'/><message xmlns='jabber:client' from='alice@example.org/laptop' type='chat'><body>archived</body></message></forwarded></result></message>",
];

#[test]
fn stanza_rewrite_target_survives_seeded_inputs() {
    let mut rng = Rng(0x5747_0005);
    for i in 0..40_000 {
        let mut children = String::new();
        for _ in 0..rng.below(5) {
            children.push_str(CHILDREN[rng.below(CHILDREN.len())]);
        }
        let mut input = vec![1u8];
        let bytes = children.into_bytes();
        input.extend(if i % 3 == 0 {
            mutate(&mut rng, bytes)
        } else {
            bytes
        });
        if i % 5 == 0 {
            // A whole stanza (mode 0): a carbon or an archive result.
            let whole = WHOLE_STANZAS[rng.below(WHOLE_STANZAS.len())]
                .as_bytes()
                .to_vec();
            input = vec![0];
            input.extend(mutate(&mut rng, whole));
        }
        bodies::stanza_rewrite(&input);
    }
}

#[test]
fn stanza_rewrite_target_through_the_router() {
    // Bare messages first: the incoming one must be delivered (asserted
    // inside the target), the outgoing one encrypted.
    bodies::stanza_rewrite(&[2]);
    bodies::stanza_rewrite(&[3]);
    let mut rng = Rng(0x5747_0006);
    for i in 0..150 {
        let mut children = String::new();
        for _ in 0..rng.below(4) {
            children.push_str(CHILDREN[rng.below(CHILDREN.len())]);
        }
        if i % 6 == 0 {
            // A carbon or archive wrapper around the peer's message.
            children.push_str(
                WHOLE_STANZAS[rng.below(2)]
                    .split_once('>')
                    .map_or("", |(_, r)| r)
                    .trim_end_matches("</message>"),
            );
        }
        let mut input = vec![2 + (i % 2) as u8];
        let bytes = children.into_bytes();
        input.extend(if i % 4 == 0 {
            mutate(&mut rng, bytes)
        } else {
            bytes
        });
        bodies::stanza_rewrite(&input);
    }
}

/// Inputs that made a target fail, kept so CI replays them on stable.
#[test]
fn fuzz_crash_regressions() {
    // stanza_rewrite (cargo-fuzz, 10 s in): quick-xml accepted the element
    // name `message2from='bob@example]]>g'`; re-serialised, it became XML
    // the framer rejects. Names are now checked (xmpp::element::is_xml_name).
    bodies::stanza_rewrite(b"\x00<message2from='bob@example]]>g' to=':fb@example.org/phop:otr:1'/></me\xff\xff\xff\xff\xff\xff\xff\x88forwarded><><de\x00<messag");
    // stanza_rewrite (smoke run): content nested in an allowed child
    // survived rewrite_for_encryption in clear.
    bodies::stanza_rewrite(
        b"\x01<composing xmlns='http://jabber.org/protocol/chatstates'><body>the secret body text</body></composing>",
    );
    // data_message (cargo-fuzz, a slow unit: ~2 s of CPU): two messages in
    // 90 four-character pieces, two candidates per number; every arrival
    // enumerated 65,536 combinations of 90 entries. Now bounded by
    // entries (fragment::MAX_ENUMERATED).
    bodies::data_message(
        b"\x19\x00\x02\x20\x28\x5d\x12\x00\x00\x00\x00\x7e\x00\x00\x03\x00\xfa\x00\x19\x00\x02\x20\x28\x12\x00\x5d\x96\x00\x19\x00\x19\x00\x03\x00\x00\x02",
    );
}
