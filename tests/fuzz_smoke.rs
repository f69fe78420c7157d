//! Stable-toolchain stand-in for the cargo-fuzz targets in `fuzz/`: runs
//! the same target bodies over a few hundred thousand inputs from a seeded
//! generator (random bytes, and valid messages and fragments with random
//! mutations), so every `cargo test` exercises them.

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
