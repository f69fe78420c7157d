//! Human-readable description of any OTR message, for `o2tr-proxy decode`
//! (in the spirit of libotr's `otr_parse`). Uses [`parse`] and prints
//! every wire field (spec §"Encoded messages", §"Fragmentation"); long
//! byte strings are shortened to their first and last bytes and length.
//!
//! Nothing secret is shown: these are the bytes that were on the wire.

use std::fmt::Write as _;

use super::fragment::Fragment;
use super::message::{Body, EncodedMessage, Message, MessageError, Version, parse};

/// Byte strings up to this length are printed in full.
const FULL_HEX_BYTES: usize = 8;
/// How many leading and trailing bytes a shortened byte string shows.
const EDGE_BYTES: usize = 4;
/// Revealed MAC keys listed one per line at most.
const MAX_LISTED_KEYS: usize = 16;

/// A multi-line description of `text`: its kind, version, instance tags,
/// and every field, or the error that made it unreadable.
pub fn describe(text: &str) -> Result<String, MessageError> {
    let mut out = String::new();
    match parse(text)? {
        Message::Plaintext { text, tag } => {
            line(&mut out, format_args!("Plaintext ({} bytes)", text.len()));
            match tag {
                None => {}
                Some(v) if v.is_empty() => line(
                    &mut out,
                    format_args!("  whitespace tag: no supported version"),
                ),
                Some(v) => line(&mut out, format_args!("  whitespace tag: {}", versions(&v))),
            }
        }
        Message::Query { versions: v } => {
            line(&mut out, format_args!("Query message"));
            if v.is_empty() {
                line(
                    &mut out,
                    format_args!("  versions: none supported (v1 only or none)"),
                );
            } else {
                line(&mut out, format_args!("  versions: {}", versions(&v)));
            }
        }
        Message::Error { text } => {
            line(&mut out, format_args!("Error message"));
            line(&mut out, format_args!("  text: {text}"));
        }
        Message::Fragment(f) => describe_fragment(&mut out, &f),
        Message::Encoded(m) => describe_encoded(&mut out, &m),
    }
    Ok(out)
}

fn line(out: &mut String, args: std::fmt::Arguments<'_>) {
    // Writing to a String cannot fail.
    let _ = out.write_fmt(args);
    out.push('\n');
}

fn versions(v: &[Version]) -> String {
    v.iter()
        .map(|v| format!("v{}", v.number()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `0x0102 (2 bytes)` or `0x01020304…0a0b0c0d (192 bytes)`.
pub fn short_hex(bytes: &[u8]) -> String {
    let unit = if bytes.len() == 1 { "byte" } else { "bytes" };
    if bytes.is_empty() {
        "(empty)".to_string()
    } else if bytes.len() <= FULL_HEX_BYTES {
        format!("0x{} ({} {unit})", hex(bytes), bytes.len())
    } else {
        format!(
            "0x{}…{} ({} {unit})",
            hex(&bytes[..EDGE_BYTES]),
            hex(&bytes[bytes.len() - EDGE_BYTES..]),
            bytes.len()
        )
    }
}

fn field(out: &mut String, name: &str, value: impl std::fmt::Display) {
    line(out, format_args!("  {name:<20}{value}"));
}

fn describe_fragment(out: &mut String, f: &Fragment) {
    line(
        out,
        format_args!("OTR v{} fragment {}/{}", f.version.number(), f.k, f.n),
    );
    if f.version == Version::V3 {
        field(
            out,
            "sender instance:",
            format_args!("{:#010x}", f.sender_tag),
        );
        field(
            out,
            "receiver instance:",
            format_args!("{:#010x}", f.receiver_tag),
        );
    }
    field(out, "piece:", format_args!("{} bytes", f.piece.len()));
    let start: String = f.piece.chars().take(16).collect();
    field(out, "piece starts:", start);
    if f.k == 0 || f.n == 0 || f.k > f.n {
        field(out, "note:", "illegal k/n, a receiver discards it");
    }
}

fn describe_encoded(out: &mut String, m: &EncodedMessage) {
    let h = &m.header;
    line(
        out,
        format_args!(
            "OTR v{} {} message (type {:#04x})",
            h.version.number(),
            m.body.name(),
            m.body.message_type()
        ),
    );
    if h.version == Version::V3 {
        field(
            out,
            "sender instance:",
            format_args!("{:#010x}", h.sender_tag),
        );
        let unknown = if h.receiver_tag == 0 {
            " (unknown)"
        } else {
            ""
        };
        field(
            out,
            "receiver instance:",
            format_args!("{:#010x}{unknown}", h.receiver_tag),
        );
    }
    match &m.body {
        Body::DhCommit(b) => {
            field(out, "encrypted gx:", short_hex(&b.encrypted_gx));
            field(out, "hashed gx:", short_hex(&b.hashed_gx));
        }
        Body::DhKey(b) => field(out, "gy (MPI):", short_hex(&b.gy)),
        Body::RevealSignature(b) => {
            field(out, "revealed key:", short_hex(&b.revealed_key));
            field(out, "encrypted sig:", short_hex(&b.encrypted_sig));
            field(out, "MAC:", hex(&b.mac));
        }
        Body::Signature(b) => {
            field(out, "encrypted sig:", short_hex(&b.encrypted_sig));
            field(out, "MAC:", hex(&b.mac));
        }
        Body::Data(d) => {
            let ignore = if d.ignore_unreadable() {
                " (IGNORE_UNREADABLE)"
            } else {
                ""
            };
            field(out, "flags:", format_args!("{:#04x}{ignore}", d.flags));
            field(out, "sender keyid:", d.sender_keyid);
            field(out, "recipient keyid:", d.recipient_keyid);
            field(out, "next DH (MPI):", short_hex(&d.next_dh));
            field(out, "counter:", hex(&d.ctr));
            field(
                out,
                "encrypted:",
                format_args!("{} bytes", d.encrypted.len()),
            );
            field(out, "MAC:", hex(&d.mac));
            let keys = &d.revealed_mac_keys;
            let whole = keys.len() / 20;
            let odd = if keys.len() % 20 == 0 {
                String::new()
            } else {
                format!(", {} stray bytes", keys.len() % 20)
            };
            field(
                out,
                "revealed MAC keys:",
                format_args!("{whole} ({} bytes{odd})", keys.len()),
            );
            for key in keys.chunks_exact(20).take(MAX_LISTED_KEYS) {
                field(out, "", hex(key));
            }
            if whole > MAX_LISTED_KEYS {
                field(out, "", format_args!("… {} more", whole - MAX_LISTED_KEYS));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otr::message::{
        DataMessage, DhKey, Header, error_message, query_message, whitespace_tag,
    };

    #[test]
    fn describes_a_data_message() {
        let m = EncodedMessage {
            header: Header::v3(0x100, 0),
            body: Body::Data(DataMessage {
                flags: 1,
                sender_keyid: 3,
                recipient_keyid: 4,
                next_dh: (1..=192).collect(),
                ctr: [0, 0, 0, 0, 0, 0, 0, 9],
                encrypted: vec![0; 31],
                mac: [0xaa; 20],
                revealed_mac_keys: vec![0xbb; 40],
            }),
        };
        let d = describe(&m.to_armored()).unwrap();
        assert!(d.starts_with("OTR v3 Data message (type 0x03)\n"), "{d}");
        assert!(d.contains("0x00000100"));
        assert!(d.contains("0x00000000 (unknown)"));
        assert!(d.contains("IGNORE_UNREADABLE"));
        assert!(d.contains("0x01020304…bdbebfc0 (192 bytes)"), "{d}");
        assert!(d.contains("0000000000000009"));
        assert!(d.contains("31 bytes"));
        assert!(d.contains("revealed MAC keys:  2 (40 bytes)"), "{d}");
        assert!(d.contains(&"bb".repeat(20)));
    }

    #[test]
    fn describes_every_kind() {
        let key = EncodedMessage {
            header: Header::v2(),
            body: Body::DhKey(DhKey { gy: vec![1, 2] }),
        };
        assert!(
            describe(&key.to_armored())
                .unwrap()
                .contains("gy (MPI):           0x0102 (2 bytes)")
        );
        assert!(
            describe(&query_message(&[Version::V2, Version::V3], "a"))
                .unwrap()
                .contains("versions: v2, v3")
        );
        assert!(describe("?OTR?").unwrap().contains("none supported"));
        assert!(
            describe(&error_message("oops"))
                .unwrap()
                .contains("text: oops")
        );
        let tagged = format!("hi{}", whitespace_tag(&[Version::V3]));
        assert_eq!(
            describe(&tagged).unwrap(),
            "Plaintext (2 bytes)\n  whitespace tag: v3\n"
        );
        let frag = describe("?OTR|00000100|00000200,00002,00003,abcdef,").unwrap();
        assert!(frag.starts_with("OTR v3 fragment 2/3\n"));
        assert!(frag.contains("0x00000200"));
        assert!(
            describe("?OTR,1,2,?OTR:AAID,")
                .unwrap()
                .contains("piece starts:       ?OTR:AAID")
        );
    }

    #[test]
    fn errors_are_returned_not_printed() {
        assert_eq!(describe("?OTR:AAEK."), Err(MessageError::UnknownVersion(1)));
        assert!(describe("?OTR:####.").is_err());
        assert!(describe("?OTR|1|0,1,1,a,").is_err());
    }

    #[test]
    fn short_hex_forms() {
        assert_eq!(short_hex(&[]), "(empty)");
        assert_eq!(short_hex(&[0xab]), "0xab (1 byte)");
        assert_eq!(short_hex(&[0; 8]), "0x0000000000000000 (8 bytes)");
    }
}
