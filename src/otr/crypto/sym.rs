//! Symmetric primitives used by OTR v3 (spec §"Computing AES keys and MAC
//! keys", §"Data Message"): AES-128 in counter mode with OTR's counter
//! layout, SHA-1, SHA-256, HMAC-SHA1, HMAC-SHA256 (full and truncated to
//! 160 bits, as the AKE uses), and a constant-time byte comparison.
//!
//! The data-message path uses the prepared forms [`AesCtrKey`] and
//! [`HmacSha1Key`]: a session key is used for many messages (a one-way burst
//! never changes it), so its AES key schedule and its HMAC inner and outer
//! hash states are computed once per key instead of once per message (two
//! SHA-1 compressions and a key expansion saved per message and side, as
//! libotr does by caching its session keys).

use aes::{Aes128, Aes128Enc};
use ctr::Ctr128BE;
use ctr::cipher::array::Array;
use ctr::cipher::{BlockCipherEncrypt, KeyIvInit, StreamCipher};
use hmac::{Hmac, KeyInit, Mac};
use sha1::{Digest, Sha1};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Encrypts or decrypts `data` in place with AES-128 in counter mode.
///
/// The initial counter block is `ctr_top` (the 8-byte top half sent in a
/// data message) followed by 8 zero bytes; the whole 16-byte block is
/// incremented as one big-endian integer per block, which is exactly OTR's
/// layout.
pub fn aes128_ctr(key: &[u8; 16], ctr_top: &[u8; 8], data: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(ctr_top);
    let mut cipher = Ctr128BE::<Aes128>::new(key.into(), &iv.into());
    cipher.apply_keystream(data);
}

/// An expanded AES-128 key for OTR's counter mode (encryption direction
/// only: counter mode never decrypts a block). Wiped on drop (the `aes`
/// crate's `zeroize` feature).
pub struct AesCtrKey(Aes128Enc);

/// Counter blocks encrypted per call of the block cipher. The AES-NI
/// backend pipelines eight, each bound by the latency of its rounds; given
/// 32 at a time it runs four such groups back to back with nothing in
/// between, which the CPU overlaps (a 1 KiB burst message ~3 % and a
/// 16 KiB one ~7 % faster than with eight per call on this VM). The key
/// stream buffer is 512 bytes on the stack.
const CTR_PAR_BLOCKS: usize = 32;

impl AesCtrKey {
    /// Expands `key`.
    pub fn new(key: &[u8; 16]) -> Self {
        Self(Aes128Enc::new(key.into()))
    }

    /// Encrypts or decrypts `data` in place; the same as [`aes128_ctr`]
    /// with this key.
    pub fn apply(&self, ctr_top: &[u8; 8], data: &mut [u8]) {
        // The whole 16-byte block is one big-endian counter.
        let mut ctr = u128::from(u64::from_be_bytes(*ctr_top)) << 64;
        // The key stream as 128-bit words: each block is XORed as one word
        // and the buffer is wiped with one store per block (the byte-wise
        // wipe and block copies were a fifth of this function). Whole
        // groups of blocks go through a loop of fixed length, which the
        // compiler unrolls.
        let mut stream = [0u128; CTR_PAR_BLOCKS];
        let mut chunks = data.chunks_exact_mut(CTR_PAR_BLOCKS * 16);
        for chunk in &mut chunks {
            self.key_stream(&mut stream, &mut ctr);
            for (piece, key) in chunk.chunks_exact_mut(16).zip(stream.iter()) {
                if let Ok(block) = <&mut [u8; 16]>::try_from(piece) {
                    *block = (u128::from_ne_bytes(*block) ^ key).to_ne_bytes();
                }
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let blocks = rest.len().div_ceil(16);
            self.key_stream(&mut stream[..blocks], &mut ctr);
            for (piece, key) in rest.chunks_mut(16).zip(stream.iter()) {
                for (d, k) in piece.iter_mut().zip(key.to_ne_bytes()) {
                    *d ^= k;
                }
            }
        }
        // The key stream is as secret as the plaintext it covers.
        stream.zeroize();
    }

    /// Fills `stream` with the encrypted counter blocks from `ctr` on.
    #[inline(always)]
    fn key_stream(&self, stream: &mut [u128], ctr: &mut u128) {
        for s in stream.iter_mut() {
            // The native word whose bytes in memory are the big-endian
            // counter.
            *s = ctr.to_be();
            *ctr = ctr.wrapping_add(1);
        }
        let bytes: &mut [[u8; 16]] = bytemuck::cast_slice_mut(stream);
        self.0
            .encrypt_blocks(Array::cast_slice_from_core_mut(bytes));
    }
}

/// An HMAC-SHA1 key with its inner and outer hash states computed once;
/// each MAC clones them. Wiped on drop (`hmac`/`sha1` `zeroize` features).
#[derive(Clone)]
pub struct HmacSha1Key(Hmac<Sha1>);

impl HmacSha1Key {
    /// Prepares `key` (any length).
    pub fn new(key: &[u8]) -> Self {
        Self(
            <Hmac<Sha1> as KeyInit>::new_from_slice(key)
                .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length")),
        )
    }

    /// HMAC-SHA1 of the concatenation of `parts` (no copy into one buffer).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 20] {
        let mut mac = self.0.clone();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
}

/// SHA-1 of `data`.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    Sha1::digest(data).into()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// HMAC-SHA1 of `data` under `key` (any key length).
pub fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
    let mut mac = <Hmac<Sha1> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 of `data` under `key` (any key length).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The first 160 bits of HMAC-SHA256 (the AKE's `MAC_{m2}` truncation).
pub fn hmac_sha256_160(key: &[u8], data: &[u8]) -> [u8; 20] {
    let full = hmac_sha256(key, data);
    let mut out = [0u8; 20];
    out.copy_from_slice(&full[..20]);
    out
}

/// Constant-time equality of two byte strings; `false` if the lengths
/// differ (the length itself is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::BlockCipherEncrypt;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn aes_ctr_matches_otr_counter_layout() {
        let key = [0x2bu8; 16];
        let top = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut data = [0u8; 48];
        aes128_ctr(&key, &top, &mut data);
        let aes = Aes128::new(&key.into());
        for (i, chunk) in data.chunks(16).enumerate() {
            let mut block = [0u8; 16];
            block[..8].copy_from_slice(&top);
            block[15] = i as u8;
            let mut b = block.into();
            aes.encrypt_block(&mut b);
            assert_eq!(chunk, b.as_slice(), "block {i}");
        }
        // Decryption is the same operation.
        aes128_ctr(&key, &top, &mut data);
        assert_eq!(data, [0u8; 48]);
    }

    #[test]
    fn aes_ctr_carries_into_the_top_half() {
        // A counter block of top || ff..ff must roll over into top+1 || 00..00.
        let key = [7u8; 16];
        let top = [0, 0, 0, 0, 0, 0, 0, 1];
        let mut long = vec![0u8; 32];
        aes128_ctr(&key, &top, &mut long);
        let aes = Aes128::new(&key.into());
        let mut b = [0u8; 16];
        b[7] = 1;
        let mut blk = b.into();
        aes.encrypt_block(&mut blk);
        assert_eq!(&long[..16], blk.as_slice());
    }

    #[test]
    fn hmac_sha1_rfc2202() {
        assert_eq!(
            hmac_sha1(&[0x0b; 20], b"Hi There").to_vec(),
            hex("b617318655057264e28bc0b6fb378c8ef146be00")
        );
        assert_eq!(
            hmac_sha1(b"Jefe", b"what do ya want for nothing?").to_vec(),
            hex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
        );
        assert_eq!(
            hmac_sha1(
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )
            .to_vec(),
            hex("aa4ae5e15272d00e95705637ce8a3b55ed402112")
        );
    }

    #[test]
    fn prepared_aes_ctr_equals_the_one_shot_form() {
        let key = [0x5au8; 16];
        let top = [9, 8, 7, 6, 5, 4, 3, 2];
        // Lengths around the 8-block pipeline, the 32-block groups and
        // partial blocks.
        for len in [
            0usize, 1, 15, 16, 17, 127, 128, 129, 300, 511, 512, 513, 1024, 1031, 1535, 1536, 1537,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut a = plain.clone();
            aes128_ctr(&key, &top, &mut a);
            let mut b = plain.clone();
            AesCtrKey::new(&key).apply(&top, &mut b);
            assert_eq!(a, b, "length {len}");
        }
    }

    #[test]
    fn prepared_hmac_sha1_equals_the_one_shot_form() {
        let key = HmacSha1Key::new(b"Jefe");
        assert_eq!(
            key.mac(&[b"what do ya ", b"", b"want for nothing?"])
                .to_vec(),
            hex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
        );
        // Reusable: the prepared state is not consumed.
        assert_eq!(
            key.mac(&[b"what do ya want for nothing?"]),
            hmac_sha1(b"Jefe", b"what do ya want for nothing?")
        );
        let long = [0xaau8; 80];
        let data = [0x42u8; 1000];
        assert_eq!(
            HmacSha1Key::new(&long).mac(&[&data[..333], &data[333..]]),
            hmac_sha1(&long, &data)
        );
    }

    #[test]
    fn hmac_sha256_rfc4231() {
        assert_eq!(
            hmac_sha256(&[0x0b; 20], b"Hi There").to_vec(),
            hex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        );
        assert_eq!(
            hmac_sha256(b"Jefe", b"what do ya want for nothing?").to_vec(),
            hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
        assert_eq!(
            hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )
            .to_vec(),
            hex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
        );
        assert_eq!(
            hmac_sha256_160(b"Jefe", b"what do ya want for nothing?").to_vec(),
            hex("5bdcc146bf60754e6a042426089575c75a003f08")
        );
    }

    #[test]
    fn hashes_known_answers() {
        assert_eq!(
            sha1(b"abc").to_vec(),
            hex("a9993e364706816aba3e25717850c26c9cd0d89d")
        );
        assert_eq!(
            sha256(b"abc").to_vec(),
            hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
    }

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }
}
