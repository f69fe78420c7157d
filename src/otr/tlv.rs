//! TLV records inside a decrypted data message (spec §"Data Message": the
//! plaintext is a human-readable part, optionally a NUL and TLV records),
//! and the SMP TLV value format (an INT count, then that many MPIs).

use thiserror::Error;
use zeroize::Zeroize;

use super::codec::{CodecError, Reader, Writer};

/// One type/length/value record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlv {
    /// Record type (see [`types`]).
    pub typ: u16,
    /// Record value; at most 65535 bytes can be encoded.
    pub value: Vec<u8>,
}

impl Tlv {
    /// A record of type `typ` with `value`.
    pub fn new(typ: u16, value: Vec<u8>) -> Self {
        Self { typ, value }
    }
}

/// The TLV types the spec defines.
pub mod types {
    /// Padding, to be ignored.
    pub const PADDING: u16 = 0;
    /// The sender closed the private connection.
    pub const DISCONNECTED: u16 = 1;
    /// SMP message 1.
    pub const SMP1: u16 = 2;
    /// SMP message 2.
    pub const SMP2: u16 = 3;
    /// SMP message 3.
    pub const SMP3: u16 = 4;
    /// SMP message 4.
    pub const SMP4: u16 = 5;
    /// SMP abort.
    pub const SMP_ABORT: u16 = 6;
    /// SMP message 1 with a question.
    pub const SMP1Q: u16 = 7;
    /// Use of the extra symmetric key.
    pub const EXTRA_SYMMETRIC_KEY: u16 = 8;
}

/// The largest MPI count an SMP TLV may announce: SMP message 2 carries 11
/// (g2b, c2, D2, g3b, c3, D3, Pb, Qb, cP, D5, D6).
pub const MAX_SMP_MPIS: u32 = 11;

/// A malformed TLV area or SMP value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TlvError {
    /// A record or MPI ran past the end of its buffer, or bytes were left
    /// over.
    #[error("malformed TLV data: {0}")]
    Codec(#[from] CodecError),
    /// An SMP TLV announced more MPIs than any SMP message has.
    #[error("SMP TLV announces {0} MPIs (at most {MAX_SMP_MPIS})")]
    TooManyMpis(u32),
    /// An SMP 1Q value has no NUL ending its question.
    #[error("SMP 1Q value has no NUL-terminated question")]
    MissingQuestion,
    /// A TLV value longer than 65535 bytes cannot be encoded.
    #[error("TLV value of {0} bytes exceeds 65535")]
    ValueTooLong(usize),
}

/// Splits decrypted plaintext into its human-readable part (up to the
/// first NUL, or everything if there is none) and the TLV records after
/// the NUL. A truncated record is an error.
pub fn split_plaintext(decrypted: &[u8]) -> Result<(Vec<u8>, Vec<Tlv>), TlvError> {
    let Some(nul) = find_nul(decrypted) else {
        return Ok((decrypted.to_vec(), Vec::new()));
    };
    let text = decrypted[..nul].to_vec();
    let mut r = Reader::new(&decrypted[nul + 1..]);
    let mut tlvs = Vec::new();
    while r.remaining() > 0 {
        let typ = r.short("TLV type")?;
        let len = r.short("TLV length")?;
        let value = r.take(usize::from(len), "TLV value")?.to_vec();
        tlvs.push(Tlv { typ, value });
    }
    Ok((text, tlvs))
}

/// [`split_plaintext`] without copying the human part: it is `decrypted`
/// itself, truncated at the NUL (the TLV bytes after it are wiped first),
/// and `decrypted` is left empty. On error `decrypted` is unchanged.
pub fn take_plaintext(decrypted: &mut Vec<u8>) -> Result<(Vec<u8>, Vec<Tlv>), TlvError> {
    let Some(nul) = find_nul(decrypted) else {
        return Ok((std::mem::take(decrypted), Vec::new()));
    };
    let (_, tlvs) = split_plaintext(&decrypted[nul..])?;
    decrypted[nul..].zeroize();
    decrypted.truncate(nul);
    Ok((std::mem::take(decrypted), tlvs))
}

/// Position of the first NUL byte (`memchr`: SIMD; a data message body
/// is usually all text, so this scans every byte of it).
fn find_nul(bytes: &[u8]) -> Option<usize> {
    memchr::memchr(0, bytes)
}

/// The plaintext to encrypt: `text`, then, if there are records, a NUL and
/// the records. A value longer than 65535 bytes is truncated to 65535
/// (use [`try_join_plaintext`] to have that rejected instead).
pub fn join_plaintext(text: &[u8], tlvs: &[Tlv]) -> Vec<u8> {
    let mut w = Writer::with_capacity(
        text.len() + 1 + tlvs.iter().map(|t| 4 + t.value.len()).sum::<usize>(),
    );
    w.raw(text);
    if !tlvs.is_empty() {
        w.byte(0);
        for t in tlvs {
            let value = &t.value[..t.value.len().min(usize::from(u16::MAX))];
            let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
            w.short(t.typ).short(len).raw(value);
        }
    }
    w.into_vec()
}

/// Like [`join_plaintext`], but a value longer than 65535 bytes is an
/// error.
pub fn try_join_plaintext(text: &[u8], tlvs: &[Tlv]) -> Result<Vec<u8>, TlvError> {
    if let Some(t) = tlvs.iter().find(|t| t.value.len() > usize::from(u16::MAX)) {
        return Err(TlvError::ValueTooLong(t.value.len()));
    }
    Ok(join_plaintext(text, tlvs))
}

/// Reads an SMP TLV value (types 2–5): an INT count (at most
/// [`MAX_SMP_MPIS`]) and that many MPIs, nothing after. Returns the MPI
/// magnitudes (leading zero bytes stripped).
pub fn parse_smp_mpis(value: &[u8]) -> Result<Vec<Vec<u8>>, TlvError> {
    let mut r = Reader::new(value);
    let count = r.int("SMP MPI count")?;
    if count > MAX_SMP_MPIS {
        return Err(TlvError::TooManyMpis(count));
    }
    let mut mpis = Vec::with_capacity(count as usize);
    for _ in 0..count {
        mpis.push(r.mpi("SMP MPI")?.to_vec());
    }
    r.finish()?;
    Ok(mpis)
}

/// Encodes an SMP TLV value: the INT count, then each MPI (leading zero
/// bytes stripped).
pub fn encode_smp_mpis(mpis: &[&[u8]]) -> Vec<u8> {
    let mut w = Writer::new();
    w.int(u32::try_from(mpis.len()).unwrap_or(u32::MAX));
    for m in mpis {
        w.mpi(m);
    }
    w.into_vec()
}

/// Splits an SMP 1Q value (type 7) into the question (without its NUL)
/// and the SMP message 1 value that follows.
pub fn split_smp1q(value: &[u8]) -> Result<(&[u8], &[u8]), TlvError> {
    let nul = value
        .iter()
        .position(|&b| b == 0)
        .ok_or(TlvError::MissingQuestion)?;
    Ok((&value[..nul], &value[nul + 1..]))
}

/// Builds an SMP 1Q value: the question, a NUL, then the SMP message 1
/// value. A NUL inside `question` would end it early, so the question is
/// cut at its first NUL.
pub fn join_smp1q(question: &[u8], smp1_value: &[u8]) -> Vec<u8> {
    let q = question
        .iter()
        .position(|&b| b == 0)
        .map_or(question, |i| &question[..i]);
    let mut out = Vec::with_capacity(q.len() + 1 + smp1_value.len());
    out.extend_from_slice(q);
    out.push(0);
    out.extend_from_slice(smp1_value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        let (text, tlvs) = split_plaintext(b"hi\0\x00\x01\x00\x00\x00\x00\x00\x05hello").unwrap();
        assert_eq!(text, b"hi");
        assert_eq!(
            tlvs,
            vec![
                Tlv::new(types::DISCONNECTED, vec![]),
                Tlv::new(types::PADDING, b"hello".to_vec())
            ]
        );
        assert_eq!(
            join_plaintext(b"hi", &tlvs),
            b"hi\0\x00\x01\x00\x00\x00\x00\x00\x05hello"
        );
    }

    #[test]
    fn take_plaintext_agrees_with_split_and_keeps_input_on_error() {
        for input in [
            &b"hi\0\x00\x01\x00\x00\x00\x00\x00\x05hello"[..],
            b"no tlvs at all",
            b"\0\x00\x00\x00\x00",
            b"",
        ] {
            let mut buf = input.to_vec();
            let (text, tlvs) = take_plaintext(&mut buf).unwrap();
            assert_eq!((text, tlvs), split_plaintext(input).unwrap());
            assert!(buf.is_empty());
        }
        let bad = b"hi\0\x00\x01\x00\x09x".to_vec();
        let mut buf = bad.clone();
        assert!(take_plaintext(&mut buf).is_err());
        assert_eq!(buf, bad);
    }

    #[test]
    fn find_nul_agrees_with_a_byte_scan() {
        for len in 0..40 {
            for at in 0..=len {
                let mut v = vec![b'x'; len];
                if at < len {
                    v[at] = 0;
                    // A later NUL and high bytes must not confuse it.
                    v.extend_from_slice(&[0x80, 0, 0xff]);
                }
                assert_eq!(find_nul(&v), v.iter().position(|&b| b == 0), "{len} {at}");
            }
        }
        assert_eq!(
            find_nul(&[0x01, 0x80, 0xff, 0x7f, 0x01, 0x01, 0x01, 0x01, 0]),
            Some(8)
        );
    }

    #[test]
    fn no_nul_means_no_tlvs_and_heartbeat_is_empty() {
        assert_eq!(split_plaintext(b"abc").unwrap(), (b"abc".to_vec(), vec![]));
        assert_eq!(split_plaintext(b"").unwrap(), (vec![], vec![]));
        // libotr always appends the NUL, even without TLVs.
        assert_eq!(
            split_plaintext(b"abc\0").unwrap(),
            (b"abc".to_vec(), vec![])
        );
        assert_eq!(join_plaintext(b"abc", &[]), b"abc");
    }

    #[test]
    fn truncated_tlvs_are_errors() {
        for bad in [&b"x\0\x00"[..], b"x\0\x00\x01\x00", b"x\0\x00\x01\x00\x02a"] {
            assert!(
                matches!(split_plaintext(bad), Err(TlvError::Codec(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn oversized_values() {
        let big = Tlv::new(types::PADDING, vec![1; 70_000]);
        assert_eq!(
            try_join_plaintext(b"", std::slice::from_ref(&big)),
            Err(TlvError::ValueTooLong(70_000))
        );
        let joined = join_plaintext(b"", &[big]);
        let (_, tlvs) = split_plaintext(&joined).unwrap();
        assert_eq!(tlvs[0].value.len(), 65535);
    }

    #[test]
    fn smp_mpis_round_trip_and_bounds() {
        let a = [1u8, 2, 3];
        let b = [0u8, 0, 9];
        let v = encode_smp_mpis(&[&a, &b, &[]]);
        assert_eq!(
            v,
            [0, 0, 0, 3, 0, 0, 0, 3, 1, 2, 3, 0, 0, 0, 1, 9, 0, 0, 0, 0]
        );
        assert_eq!(
            parse_smp_mpis(&v).unwrap(),
            vec![vec![1, 2, 3], vec![9], vec![]]
        );
        assert_eq!(
            parse_smp_mpis(&[0, 0, 0, 12]),
            Err(TlvError::TooManyMpis(12))
        );
        assert!(matches!(
            parse_smp_mpis(&[0, 0, 0, 1]),
            Err(TlvError::Codec(_))
        ));
        assert!(matches!(parse_smp_mpis(&[0, 0]), Err(TlvError::Codec(_))));
        let mut trailing = v.clone();
        trailing.push(0);
        assert!(matches!(
            parse_smp_mpis(&trailing),
            Err(TlvError::Codec(CodecError::TrailingBytes(1)))
        ));
        let eleven: Vec<&[u8]> = vec![&a[..]; 11];
        assert_eq!(parse_smp_mpis(&encode_smp_mpis(&eleven)).unwrap().len(), 11);
    }

    #[test]
    fn smp1q_question() {
        let v = join_smp1q(b"colour?", &[0, 0, 0, 0]);
        assert_eq!(
            split_smp1q(&v).unwrap(),
            (&b"colour?"[..], &[0u8, 0, 0, 0][..])
        );
        assert_eq!(split_smp1q(b"no nul"), Err(TlvError::MissingQuestion));
        assert_eq!(split_smp1q(&join_smp1q(b"a\0b", b"x")).unwrap().0, b"a");
    }
}
