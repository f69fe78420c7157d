//! Bodies of the fuzz targets, shared by the cargo-fuzz binaries in
//! `fuzz_targets/` and by the stable-toolchain smoke test
//! `tests/fuzz_smoke.rs` (which includes this file by path).
//!
//! Each body panics only if an invariant breaks; malformed input must come
//! back as a typed error. Targets: `otr_message`, `fragment` (below),
//! `data_message`, `snapshot_decode` (session.rs), `smp` (smp.rs),
//! `xml_framer`, `stanza_rewrite` (xml.rs). See docs/fuzzing.md.

// Paths relative to this file, so the smoke test's `#[path]` include works.
#[path = "fixture.rs"]
pub mod fixture;
#[path = "session.rs"]
mod session;
#[path = "smp.rs"]
mod smp_target;
#[path = "xml.rs"]
mod xml;

pub use session::{data_message, snapshot_decode};
pub use smp_target::smp;
pub use xml::{stanza_rewrite, xml_framer};

use o2tr_proxy::otr::decode::describe;
use o2tr_proxy::otr::fragment::{FragmentError, MAX_PIECES, Reassembler, fragment as split};
use o2tr_proxy::otr::message::{EncodedMessage, Message, Version, parse};
use o2tr_proxy::otr::tlv::{join_plaintext, parse_smp_mpis, split_plaintext};

/// Arbitrary bytes as a binary message, and (lossily) as received text.
pub fn otr_message(data: &[u8]) {
    if let Ok(m) = EncodedMessage::decode(data) {
        let again = EncodedMessage::decode(&m.encode()).expect("re-encoding must decode");
        assert_eq!(again, m);
        assert_eq!(parse(&m.to_armored()).ok(), Some(Message::Encoded(m)));
    }
    if let Ok((text, tlvs)) = split_plaintext(data) {
        if !tlvs.is_empty() {
            assert_eq!(
                split_plaintext(&join_plaintext(&text, &tlvs)).ok(),
                Some((text, tlvs))
            );
        }
    }
    let _ = parse_smp_mpis(data);
    let text = String::from_utf8_lossy(data);
    let parsed = parse(&text);
    let described = describe(&text);
    assert_eq!(parsed.is_ok(), described.is_ok());
}

/// The first two bytes choose a memory bound; the rest is lines of text,
/// each parsed and, when a fragment, pushed into one reassembler. The
/// whole text is also fragmented and reassembled.
pub fn fragment(data: &[u8]) {
    let (max, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
        _ => return,
    };
    let text = String::from_utf8_lossy(rest);
    let mut r = Reassembler::new(max);
    for line in text.split('\n') {
        match parse(line) {
            Ok(Message::Fragment(f)) => {
                if let Ok(Some(whole)) = r.push(&f) {
                    assert!(whole.len() <= max);
                    let _ = parse(&whole);
                }
            }
            Ok(_) => r.reset(),
            Err(_) => {}
        }
        assert!(r.stored_bytes() <= max);
    }

    let plain = text.replace(',', ";");
    let max_len = max % 512;
    let version = if max & 0x8000 != 0 {
        Version::V3
    } else {
        Version::V2
    };
    if let Ok(frags) = split(&plain, max_len, version, 0x100, 0) {
        if frags.len() == 1 && plain.len() <= max_len {
            assert_eq!(frags[0], plain);
            return;
        }
        let mut r = Reassembler::new(plain.len());
        let mut out = None;
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= max_len);
            let Ok(Message::Fragment(f)) = parse(f) else {
                panic!("own fragment did not parse: {f:?}");
            };
            if i >= MAX_PIECES {
                // More pieces than a reassembler holds (tiny pieces).
                assert_eq!(
                    r.push(&f),
                    Err(FragmentError::TooManyPieces { max: MAX_PIECES })
                );
                return;
            }
            out = r.push(&f).expect("own fragments are in sequence");
        }
        assert_eq!(out.as_deref(), Some(plain.as_str()));
    }
}
