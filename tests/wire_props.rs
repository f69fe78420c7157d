//! Property tests for the OTR wire layer: every encoded message type round
//! trips through binary and armoured forms, fragments reassemble to the
//! original for arbitrary strings and sizes, TLVs split/join losslessly,
//! and arbitrary input never panics the parsers.

use o2tr_proxy::otr::fragment::{Fragment, Reassembler, V2_OVERHEAD, V3_OVERHEAD, fragment};
use o2tr_proxy::otr::message::{
    Body, DataMessage, DhCommit, DhKey, EncodedMessage, Header, MIN_INSTANCE_TAG, Message,
    RevealSignature, Signature, Version, parse, whitespace_tag,
};
use o2tr_proxy::otr::tlv::{Tlv, encode_smp_mpis, join_plaintext, parse_smp_mpis, split_plaintext};
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// An MPI magnitude: no leading zero byte (empty is the number 0).
fn magnitude(max: usize) -> impl Strategy<Value = Vec<u8>> {
    bytes(max).prop_map(|mut v| {
        while v.first() == Some(&0) {
            v.remove(0);
        }
        v
    })
}

fn header() -> impl Strategy<Value = Header> {
    prop_oneof![
        Just(Header::v2()),
        (
            MIN_INSTANCE_TAG..=u32::MAX,
            prop_oneof![Just(0u32), MIN_INSTANCE_TAG..=u32::MAX]
        )
            .prop_map(|(s, r)| Header::v3(s, r)),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (bytes(300), bytes(40)).prop_map(|(encrypted_gx, hashed_gx)| Body::DhCommit(DhCommit {
            encrypted_gx,
            hashed_gx
        })),
        magnitude(300).prop_map(|gy| Body::DhKey(DhKey { gy })),
        (bytes(20), bytes(300), any::<[u8; 20]>()).prop_map(
            |(revealed_key, encrypted_sig, mac)| {
                Body::RevealSignature(RevealSignature {
                    revealed_key,
                    encrypted_sig,
                    mac,
                })
            }
        ),
        (bytes(300), any::<[u8; 20]>())
            .prop_map(|(encrypted_sig, mac)| Body::Signature(Signature { encrypted_sig, mac })),
        (
            any::<u8>(),
            any::<u32>(),
            any::<u32>(),
            magnitude(200),
            any::<[u8; 8]>(),
            bytes(300),
            any::<[u8; 20]>(),
            bytes(100)
        )
            .prop_map(
                |(flags, sender_keyid, recipient_keyid, next_dh, ctr, encrypted, mac, revealed)| {
                    Body::Data(DataMessage {
                        flags,
                        sender_keyid,
                        recipient_keyid,
                        next_dh,
                        ctr,
                        encrypted,
                        mac,
                        revealed_mac_keys: revealed,
                    })
                }
            ),
    ]
}

/// Text without commas (a fragment piece cannot carry one).
fn comma_free_text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.replace(',', ";"))
}

fn reassemble(frags: &[String], max_total: usize) -> Option<String> {
    let mut r = Reassembler::new(max_total);
    let mut out = None;
    for (i, f) in frags.iter().enumerate() {
        let Ok(Message::Fragment(f)) = parse(f) else {
            panic!("fragment {i} did not parse: {f:?}");
        };
        out = r.push(&f).unwrap();
        assert_eq!(out.is_some(), i + 1 == frags.len());
    }
    out
}

proptest! {
    #[test]
    fn encoded_messages_round_trip(header in header(), body in body()) {
        let m = EncodedMessage { header, body };
        let bytes = m.encode();
        prop_assert_eq!(EncodedMessage::decode(&bytes).unwrap(), m.clone());
        prop_assert_eq!(parse(&m.to_armored()).unwrap(), Message::Encoded(m.clone()));
        // Every strict prefix is a typed error, never a panic.
        for n in [0, bytes.len() / 2, bytes.len().saturating_sub(1)] {
            if n < bytes.len() {
                prop_assert!(EncodedMessage::decode(&bytes[..n]).is_err());
            }
        }
        if let Body::Data(d) = &m.body {
            let auth = d.authenticated_bytes(&m.header);
            prop_assert!(bytes.starts_with(&auth));
            prop_assert_eq!(bytes.len(), auth.len() + 20 + 4 + d.revealed_mac_keys.len());
        }
    }

    #[test]
    fn fragments_reassemble(
        text in comma_free_text(),
        max_len in 1usize..200,
        v3 in any::<bool>(),
        sender in MIN_INSTANCE_TAG..=u32::MAX,
        receiver in prop_oneof![Just(0u32), MIN_INSTANCE_TAG..=u32::MAX],
    ) {
        let version = if v3 { Version::V3 } else { Version::V2 };
        let overhead = if v3 { V3_OVERHEAD } else { V2_OVERHEAD };
        match fragment(&text, max_len, version, sender, receiver) {
            Ok(frags) => {
                prop_assert!(!frags.is_empty());
                if frags.len() == 1 && text.len() <= max_len {
                    prop_assert_eq!(&frags[0], &text);
                } else {
                    for f in &frags {
                        prop_assert!(f.len() <= max_len, "{} > {}", f.len(), max_len);
                    }
                    prop_assert_eq!(reassemble(&frags, text.len()), Some(text.clone()));
                }
            }
            Err(_) => prop_assert!(max_len <= overhead + 3 && text.len() > max_len),
        }
    }

    #[test]
    fn armoured_messages_fragment_and_reassemble(
        header in header(), body in body(), max_len in 40usize..400,
    ) {
        let m = EncodedMessage { header, body };
        let armored = m.to_armored();
        let frags = fragment(&armored, max_len, header.version, header.sender_tag.max(MIN_INSTANCE_TAG), header.receiver_tag).unwrap();
        let whole = if frags.len() == 1 { frags[0].clone() } else { reassemble(&frags, 1 << 20).unwrap() };
        prop_assert_eq!(parse(&whole).unwrap(), Message::Encoded(m));
    }

    #[test]
    fn reassembler_never_exceeds_its_bound(
        pushes in prop::collection::vec((0u16..5, 0u16..5, "[a-z]{0,10}"), 0..40),
        max in 0usize..30,
    ) {
        let mut r = Reassembler::new(max);
        for (k, n, piece) in pushes {
            let f = Fragment { version: Version::V3, sender_tag: 0x100, receiver_tag: 0, k, n, piece };
            if let Ok(Some(whole)) = r.push(&f) {
                prop_assert!(whole.len() <= max);
            }
            prop_assert!(r.stored_bytes() <= max);
        }
    }

    #[test]
    fn tlvs_split_and_join(
        text in prop::collection::vec(1u8..=255, 0..100),
        tlvs in prop::collection::vec((any::<u16>(), bytes(300)), 0..8),
    ) {
        let tlvs: Vec<Tlv> = tlvs.into_iter().map(|(t, v)| Tlv::new(t, v)).collect();
        let joined = join_plaintext(&text, &tlvs);
        prop_assert_eq!(split_plaintext(&joined).unwrap(), (text, tlvs));
    }

    #[test]
    fn smp_mpis_round_trip(mpis in prop::collection::vec(magnitude(200), 0..=11)) {
        let refs: Vec<&[u8]> = mpis.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(parse_smp_mpis(&encode_smp_mpis(&refs)).unwrap(), mpis);
    }

    #[test]
    fn whitespace_tags_are_found_anywhere(
        before in "[^ \t]{0,20}", after in "[^ \t]{0,20}", v2 in any::<bool>(), v3 in any::<bool>(),
    ) {
        let mut vs = Vec::new();
        if v2 { vs.push(Version::V2); }
        if v3 { vs.push(Version::V3); }
        prop_assume!(!before.contains("?OTR") && !after.contains("?OTR"));
        let text = format!("{before}{}{after}", whitespace_tag(&vs));
        prop_assert_eq!(
            parse(&text).unwrap(),
            Message::Plaintext { text: format!("{before}{after}"), tag: Some(vs) }
        );
    }

    #[test]
    fn parse_never_panics(s in any::<String>()) {
        let _ = parse(&s);
        let _ = o2tr_proxy::otr::decode::describe(&s);
    }

    #[test]
    fn parse_never_panics_on_otr_looking_text(
        prefix in prop_oneof![Just("?OTR:"), Just("?OTR|"), Just("?OTR,"), Just("?OTRv"), Just("?OTR?"), Just("?OTR Error:")],
        rest in "[0-9a-fA-Z+/=.,|?v ]{0,80}",
    ) {
        let _ = o2tr_proxy::otr::decode::describe(&format!("{prefix}{rest}"));
    }

    #[test]
    fn decode_never_panics(b in bytes(600)) {
        if let Ok(m) = EncodedMessage::decode(&b) {
            // Whatever decodes re-encodes to something that decodes the same.
            prop_assert_eq!(EncodedMessage::decode(&m.encode()).unwrap(), m);
        }
        let _ = split_plaintext(&b);
        let _ = parse_smp_mpis(&b);
    }
}
