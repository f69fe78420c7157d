//! OTR's long-term DSA keys (spec §"Public keys, signatures, and
//! fingerprints"): the PUBKEY encoding, fingerprints, and signatures over a
//! 32-byte value (`M_A`/`M_B` in the AKE) **taken modulo q**.
//!
//! # Why the signing and verification arithmetic is our own
//!
//! Only parameter generation comes from the `dsa` crate. Signing and
//! verification are written here directly on crypto-bigint because:
//!
//! * OTR signs `value mod q`, not the FIPS 186 leftmost-bits truncation that
//!   `dsa`'s prehash API applies; reducing ourselves removes the trap
//!   entirely (libotr, pycrypto and python-otr all reduce mod q).
//! * `dsa` 0.7 exponentiates at the full width of p (1024 bits) although
//!   every exponent (k, u1, u2) is below q (160 bits). Bounding the
//!   exponent to 160 bits makes signing about 4× and verifying about 5×
//!   faster (verification also shares squarings between `g^u1` and `y^u2`),
//!   and signing is the largest single cost of an AKE side.
//! * Signing stays constant-time in the secrets: `g^k` uses a fixed
//!   160-bit window exponentiation, `k^-1`, `x·r` and the sum are
//!   Montgomery arithmetic mod q with constant-time inversion, and the
//!   nonce `k` is drawn uniformly from `[1, q-1]` by rejection sampling
//!   from the caller's `rng`.
//!
//! Verification handles public values only and may use variable-time steps.
//!
//! Arithmetic mod p uses fixed-width integers chosen by the size of p
//! (1024, 2048 or 3072 bits); q must be exactly 160 bits, as the spec's
//! 40-byte signature format requires.

use core::fmt;

use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{
    MultiExponentiateBoundedExp, NonZero, Odd, RandomMod, U192, U256, U1024, U2048, U3072, Uint,
};
use zeroize::{Zeroize, Zeroizing};

use super::{CryptoError, sym, uint_from_be, uint_to_be};
use crate::otr::codec::{Reader, Writer};

/// PUBKEY type of a DSA key, the only type OTR v3 defines.
pub const PUBKEY_TYPE_DSA: u16 = 0x0000;

/// Bits in q (and so in every exponent).
const Q_BITS: u32 = 160;
/// Bytes in q, and in each half of a signature.
const Q_BYTES: usize = 20;
/// Smallest and largest accepted size of p, in bits.
const P_MIN_BITS: u32 = 1024;
const P_MAX_BITS: u32 = 3072;

/// Integers below q.
type Sc = U192;
const SC_LIMBS: usize = U192::LIMBS;

/// Arithmetic context for one width of p.
#[derive(Clone)]
struct ModP<const L: usize> {
    g: FixedMontyForm<L>,
    y: FixedMontyForm<L>,
    q: NonZero<Uint<L>>,
}

/// p-width dispatch.
#[derive(Clone)]
enum Arith {
    W1024(Box<ModP<{ U1024::LIMBS }>>),
    W2048(Box<ModP<{ U2048::LIMBS }>>),
    W3072(Box<ModP<{ U3072::LIMBS }>>),
}

/// Everything derived from (p, q, g, y) once at construction.
#[derive(Clone)]
struct Prepared {
    arith: Arith,
    q: NonZero<Sc>,
    q_params: FixedMontyParams<SC_LIMBS>,
}

/// Number of bits in a minimal big-endian magnitude.
fn bit_len(minimal: &[u8]) -> u32 {
    match minimal.first() {
        None => 0,
        Some(&top) => (minimal.len() as u32 - 1) * 8 + (8 - top.leading_zeros()),
    }
}

/// Strips leading zero bytes.
fn minimal(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Numeric comparison of two minimal big-endian magnitudes.
fn cmp_minimal(a: &[u8], b: &[u8]) -> core::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

impl<const L: usize> ModP<L> {
    fn new(p: &[u8], q: &[u8], g: &[u8], y: &[u8]) -> Result<Self, CryptoError> {
        let bad = CryptoError::InvalidKey("DSA parameter does not fit its width");
        let p = uint_from_be::<L>(p).ok_or(bad.clone())?;
        let p = Odd::new(p)
            .into_option()
            .ok_or(CryptoError::InvalidKey("DSA p is even"))?;
        let params = FixedMontyParams::new_vartime(p);
        let g = uint_from_be::<L>(g).ok_or(bad.clone())?;
        let y = uint_from_be::<L>(y).ok_or(bad.clone())?;
        let q = uint_from_be::<L>(q).ok_or(bad)?;
        let q = NonZero::new(q)
            .into_option()
            .ok_or(CryptoError::InvalidKey("DSA q is zero"))?;
        Ok(Self {
            g: FixedMontyForm::new(&g, &params),
            y: FixedMontyForm::new(&y, &params),
            q,
        })
    }

    /// `(g^k mod p) mod q`, constant-time in `k` (`k < 2^160`).
    fn g_pow_mod_q(&self, k: &Sc) -> Sc {
        let gk = Zeroizing::new(self.g.pow_bounded_exp(k, Q_BITS).retrieve());
        gk.rem_vartime(&self.q).resize()
    }

    /// `g^x mod p` as big-endian bytes (for checking a private key).
    fn g_pow(&self, x: &Sc) -> Zeroizing<Vec<u8>> {
        uint_to_be(&self.g.pow_bounded_exp(x, Q_BITS).retrieve())
    }

    /// `(g^u1 · y^u2 mod p) mod q` (public values, for verification).
    fn verify_value(&self, u1: &Sc, u2: &Sc) -> Sc {
        let v =
            FixedMontyForm::multi_exponentiate_bounded_exp(&[(self.g, *u1), (self.y, *u2)], Q_BITS);
        v.retrieve().rem_vartime(&self.q).resize()
    }
}

macro_rules! with_arith {
    ($arith:expr, $m:ident => $body:expr) => {
        match $arith {
            Arith::W1024($m) => $body,
            Arith::W2048($m) => $body,
            Arith::W3072($m) => $body,
        }
    };
}

/// An OTR DSA public key (p, q, g, y).
#[derive(Clone)]
pub struct DsaPublicKey {
    p: Vec<u8>,
    q: Vec<u8>,
    g: Vec<u8>,
    y: Vec<u8>,
    /// The PUBKEY encoding, made once: every EKM snapshot (one per
    /// message and side) holds the peer's key.
    encoded: Box<[u8]>,
    prepared: Prepared,
}

impl PartialEq for DsaPublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.p == other.p && self.q == other.q && self.g == other.g && self.y == other.y
    }
}

impl Eq for DsaPublicKey {}

impl fmt::Debug for DsaPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DsaPublicKey")
            .field("p_bits", &bit_len(&self.p))
            .field("fingerprint", &self.fingerprint().to_hex())
            .finish()
    }
}

impl DsaPublicKey {
    /// Validates and prepares a key from big-endian magnitudes.
    ///
    /// Checks: q is exactly 160 bits and odd; p is 1024..=3072 bits and
    /// odd; `2 <= g < p` and `2 <= y < p`. (Subgroup membership of g and y
    /// is not checked: a bad key can only make its own signatures fail.)
    pub fn from_components(p: &[u8], q: &[u8], g: &[u8], y: &[u8]) -> Result<Self, CryptoError> {
        let (p, q, g, y) = (minimal(p), minimal(q), minimal(g), minimal(y));
        if bit_len(q) != Q_BITS {
            return Err(CryptoError::InvalidKey("DSA q must be 160 bits"));
        }
        let p_bits = bit_len(p);
        if !(P_MIN_BITS..=P_MAX_BITS).contains(&p_bits) {
            return Err(CryptoError::InvalidKey("DSA p must be 1024 to 3072 bits"));
        }
        for (v, what) in [(g, "DSA g out of range"), (y, "DSA y out of range")] {
            if bit_len(v) < 2 || cmp_minimal(v, p).is_ge() {
                return Err(CryptoError::InvalidKey(what));
            }
        }
        let arith = if p_bits <= 1024 {
            Arith::W1024(Box::new(ModP::new(p, q, g, y)?))
        } else if p_bits <= 2048 {
            Arith::W2048(Box::new(ModP::new(p, q, g, y)?))
        } else {
            Arith::W3072(Box::new(ModP::new(p, q, g, y)?))
        };
        let q_int = Odd::new(uint_from_be::<SC_LIMBS>(q).ok_or(CryptoError::InvalidKey("DSA q"))?)
            .into_option()
            .ok_or(CryptoError::InvalidKey("DSA q is even"))?;
        let prepared = Prepared {
            arith,
            q: q_int
                .to_nz()
                .into_option()
                .ok_or(CryptoError::InvalidKey("DSA q"))?,
            q_params: FixedMontyParams::new_vartime(q_int),
        };
        let mut w = Writer::with_capacity(18 + p.len() + q.len() + g.len() + y.len());
        w.short(PUBKEY_TYPE_DSA);
        w.mpi(p).mpi(q).mpi(g).mpi(y);
        Ok(Self {
            p: p.to_vec(),
            q: q.to_vec(),
            g: g.to_vec(),
            y: y.to_vec(),
            encoded: w.into_vec().into_boxed_slice(),
            prepared,
        })
    }

    /// Writes the PUBKEY encoding: SHORT type 0x0000, MPIs p, q, g, y.
    pub fn encode(&self, w: &mut Writer) {
        w.raw(&self.encoded);
    }

    /// The PUBKEY encoding.
    pub fn encoding(&self) -> &[u8] {
        &self.encoded
    }

    /// Length of the PUBKEY encoding.
    pub fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    /// The PUBKEY encoding as a vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encoded.to_vec()
    }

    /// Reads a PUBKEY, rejecting other key types and invalid parameters
    /// (see [`from_components`](Self::from_components)).
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, CryptoError> {
        let kind = r.short("pubkey type")?;
        if kind != PUBKEY_TYPE_DSA {
            return Err(CryptoError::UnsupportedPubkeyType(kind));
        }
        let p = r.mpi("DSA p")?;
        let q = r.mpi("DSA q")?;
        let g = r.mpi("DSA g")?;
        let y = r.mpi("DSA y")?;
        Self::from_components(p, q, g, y)
    }

    /// Verifies `sig` (r || s, 20 bytes each, big-endian) over
    /// `value mod q`.
    pub fn verify(&self, value: &[u8; 32], sig: &[u8]) -> bool {
        if sig.len() != 2 * Q_BYTES {
            return false;
        }
        let pre = &self.prepared;
        let (Some(r), Some(s)) = (
            uint_from_be::<SC_LIMBS>(&sig[..Q_BYTES]),
            uint_from_be::<SC_LIMBS>(&sig[Q_BYTES..]),
        ) else {
            return false;
        };
        let q = pre.q.get();
        for v in [&r, &s] {
            if bool::from(v.is_zero()) || v.cmp_vartime(&q).is_ge() {
                return false;
            }
        }
        let h = reduce_value(value, &pre.q);
        let Some(w) = FixedMontyForm::new(&s, &pre.q_params)
            .invert_vartime()
            .into_option()
        else {
            return false;
        };
        let u1 = FixedMontyForm::new(&h, &pre.q_params).mul(&w).retrieve();
        let u2 = FixedMontyForm::new(&r, &pre.q_params).mul(&w).retrieve();
        let v = with_arith!(&pre.arith, m => m.verify_value(&u1, &u2));
        v == r
    }

    /// The OTR fingerprint: SHA-1 of the PUBKEY encoding without its
    /// leading 2-byte type (the spec's backwards-compatibility rule).
    pub fn fingerprint(&self) -> Fingerprint {
        // The MPIs, without the type SHORT.
        Fingerprint(sym::sha1(&self.encoded[2..]))
    }
}

/// The 32-byte value as a big-endian integer, reduced mod q (constant-time
/// in the value).
fn reduce_value(value: &[u8; 32], q: &NonZero<Sc>) -> Sc {
    let v = Zeroizing::new(U256::from_be_slice(value));
    v.rem_vartime(q)
}

/// Our long-term DSA private key. `x` is zeroized on drop and never printed.
#[derive(Clone)]
pub struct DsaPrivateKey {
    public: DsaPublicKey,
    x: Zeroizing<Sc>,
}

impl fmt::Debug for DsaPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DsaPrivateKey")
            .field("public", &self.public)
            .field("x", &"<redacted>")
            .finish()
    }
}

impl DsaPrivateKey {
    /// Generates fresh 1024/160 parameters and a key. Parameter generation
    /// searches for primes and takes from tens of milliseconds to a few
    /// seconds in release builds.
    pub fn generate<R: rand_core::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        #[allow(deprecated)] // OTR v3 mandates 1024/160 keys.
        let size = ::dsa::KeySize::DSA_1024_160;
        loop {
            let Ok(components) =
                ::dsa::Components::try_generate_from_rng_with_key_size(&mut *rng, size);
            let p = components.p().to_be_bytes();
            let q = components.q().to_be_bytes();
            let g = components.g().to_be_bytes();
            let q_nz =
                match uint_from_be::<SC_LIMBS>(&q).and_then(|q| NonZero::new(q).into_option()) {
                    Some(q) => q,
                    None => continue,
                };
            let x = Zeroizing::new(random_below(&q_nz, rng));
            // y is computed with a placeholder, then the key is rebuilt
            // with the real y (validation needs y in range).
            let Ok(tmp) = DsaPublicKey::from_components(&p, &q, &g, &g) else {
                continue;
            };
            let y = with_arith!(&tmp.prepared.arith, m => m.g_pow(&x));
            if let Ok(key) = Self::from_parts(&p, &q, &g, &y, x) {
                return key;
            }
        }
    }

    fn from_parts(
        p: &[u8],
        q: &[u8],
        g: &[u8],
        y: &[u8],
        x: Zeroizing<Sc>,
    ) -> Result<Self, CryptoError> {
        let public = DsaPublicKey::from_components(p, q, g, y)?;
        if bool::from(x.is_zero()) || x.cmp_vartime(&public.prepared.q.get()).is_ge() {
            return Err(CryptoError::InvalidKey("DSA x out of range"));
        }
        let y_check = with_arith!(&public.prepared.arith, m => m.g_pow(&x));
        if cmp_minimal(minimal(&y_check), &public.y).is_ne() {
            return Err(CryptoError::InvalidKey("DSA y does not match x"));
        }
        Ok(Self { public, x })
    }

    /// Our public key.
    pub fn public_key(&self) -> &DsaPublicKey {
        &self.public
    }

    /// Signs `value` (a 32-byte big-endian integer, reduced mod q, neither
    /// truncated nor hashed again). Returns r || s, 20 bytes each.
    pub fn sign<R: rand_core::CryptoRng + ?Sized>(
        &self,
        value: &[u8; 32],
        rng: &mut R,
    ) -> [u8; 40] {
        let pre = &self.public.prepared;
        let qp = &pre.q_params;
        let h = Zeroizing::new(reduce_value(value, &pre.q));
        loop {
            let k = Zeroizing::new(random_below(&pre.q, rng));
            let r = with_arith!(&pre.arith, m => m.g_pow_mod_q(&k));
            if bool::from(r.is_zero()) {
                continue;
            }
            let mut km = FixedMontyForm::new(&k, qp);
            let Some(mut k_inv) = km.invert().into_option() else {
                km.zeroize();
                continue;
            };
            km.zeroize();
            let mut xm = FixedMontyForm::new(&self.x, qp);
            let mut t = FixedMontyForm::new(&h, qp).add(&xm.mul(&FixedMontyForm::new(&r, qp)));
            let s = Zeroizing::new(k_inv.mul(&t).retrieve());
            xm.zeroize();
            t.zeroize();
            k_inv.zeroize();
            if bool::from(s.is_zero()) {
                continue;
            }
            let mut out = [0u8; 40];
            let r_bytes = uint_to_be(&r);
            let s_bytes = uint_to_be(&*s);
            out[..Q_BYTES].copy_from_slice(&r_bytes[r_bytes.len() - Q_BYTES..]);
            out[Q_BYTES..].copy_from_slice(&s_bytes[s_bytes.len() - Q_BYTES..]);
            return out;
        }
    }

    /// Our storage format: MPIs p, q, g, y, x.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let pk = &self.public;
        let x = uint_to_be(&*self.x);
        let mut w =
            Writer::with_capacity(40 + pk.p.len() + pk.q.len() + pk.g.len() + pk.y.len() + x.len());
        // The MPIs of the PUBKEY encoding, without its type SHORT.
        w.raw(&pk.encoded[2..]);
        w.mpi(&x);
        Zeroizing::new(w.into_vec())
    }

    /// Parses [`to_bytes`](Self::to_bytes), validating sizes and that
    /// `y == g^x mod p`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut r = Reader::new(bytes);
        let p = r.mpi("DSA p")?;
        let q = r.mpi("DSA q")?;
        let g = r.mpi("DSA g")?;
        let y = r.mpi("DSA y")?;
        let x = r.mpi("DSA x")?;
        r.finish()?;
        Self::from_components(p, q, g, y, x)
    }

    /// Builds a key from big-endian magnitudes (e.g. imported from libotr's
    /// `otr.private_key`), validating as [`from_bytes`](Self::from_bytes).
    pub fn from_components(
        p: &[u8],
        q: &[u8],
        g: &[u8],
        y: &[u8],
        x: &[u8],
    ) -> Result<Self, CryptoError> {
        let x = Zeroizing::new(
            uint_from_be::<SC_LIMBS>(x).ok_or(CryptoError::InvalidKey("DSA x out of range"))?,
        );
        Self::from_parts(p, q, g, y, x)
    }
}

/// Uniform in `[1, q-1]` by rejection sampling (the loop count leaks
/// nothing about the accepted value).
fn random_below<R: rand_core::CryptoRng + ?Sized>(q: &NonZero<Sc>, rng: &mut R) -> Sc {
    loop {
        let mut k = Sc::random_mod_vartime(rng, q);
        if !bool::from(k.is_zero()) {
            return k;
        }
        k.zeroize();
    }
}

/// An OTR key fingerprint: SHA-1 over the public key (see
/// [`DsaPublicKey::fingerprint`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Fingerprint(pub [u8; 20]);

impl Fingerprint {
    /// 40 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 40 hex digits (either case); whitespace is ignored, so
    /// libotr's grouped form is accepted.
    pub fn from_hex(s: &str) -> Option<Self> {
        let digits: Vec<u8> = s
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| c.to_digit(16).map(|d| d as u8))
            .collect::<Option<_>>()?;
        if digits.len() != 40 {
            return None;
        }
        let mut out = [0u8; 20];
        for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            *o = (pair[0] << 4) | pair[1];
        }
        Some(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    /// libotr's human form: five groups of eight uppercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, chunk) in self.0.chunks(4).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            for b in chunk {
                write!(f, "{b:02X}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;
    use std::sync::OnceLock;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    // A key generated by libotr 4.1.1 (otrl_privkey_generate); libotr
    // shows its fingerprint as below.
    const P: &str = "0090C6A78E47BFFEC522617023195484501904BFEE9E2B982E711992CFE0717D7893A054F0CB53C606E4E02AB08E4E2445C94CA4AE7470315AD7ABC55F16590F95939563DDB3F42C9E07398655E3B3C4516FAC313BC564FE0CCEA2DE5EF89E35C68851C27A0D071B7C1C83135693CE5B1CCEC402E70646DAD3E607B26369CC3BC3";
    const Q: &str = "00D51B6645B8BA6C06700347500CD3AB6C8689B975";
    const G: &str = "539D74A912B239AE16E6B234128E40A4CBC99E773343B3A8D516D55917B318779B627E00ED473E71146CE47AA30AEA18FDB725809A7BF9106D1400D2A49737E04C2D3441C8127AE930EA2AF62ACEA9CFE4E2BFCAE442DFA14372DBA153432CE5287FE148AD74F89DF48430972C7626AC545048F4BAA713E9425EEDC31DC6D7BD";
    const Y: &str = "008DA709643BAD1732878C1B4A47F1E3C6A4BE91D36CD53855BA13D900EB6B28A366CB5F8E29AB7690419EAA494F24B7B692FFF1E0EF4C13256957AE84E923E5BD394998A72A4E89390FD4B4B65352B2F9C1C7253B28E73322CA9F82B09DCC26BCB8D2F85E0A3437793CFCB3B766ECB4F202414AEB6A5522E3CF4857F0FC4BC73E";
    const X: &str = "00C890B18BB94945569233F0A5AFD793BF99C7151A";
    const LIBOTR_FINGERPRINT: &str = "ED2F1F2F 288D960A EEF7F8D6 951FFE9F 0A725B3D";

    fn libotr_key() -> DsaPrivateKey {
        DsaPrivateKey::from_components(&unhex(P), &unhex(Q), &unhex(G), &unhex(Y), &unhex(X))
            .unwrap()
    }

    /// A key generated by our own code, once per test run.
    fn generated_key() -> &'static DsaPrivateKey {
        static KEY: OnceLock<DsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| DsaPrivateKey::generate(&mut ChaCha20Rng::seed_from_u64(7)))
    }

    fn q_plus(k: &DsaPrivateKey, delta: u64) -> [u8; 20] {
        let q = k.public.prepared.q.get().wrapping_add(&Sc::from_u64(delta));
        let b = uint_to_be(&q);
        b[b.len() - 20..].try_into().unwrap()
    }

    #[test]
    fn fingerprint_matches_libotr() {
        let key = libotr_key();
        let fp = key.public_key().fingerprint();
        assert_eq!(fp.to_string(), LIBOTR_FINGERPRINT);
        assert_eq!(
            fp.to_hex(),
            LIBOTR_FINGERPRINT.replace(' ', "").to_lowercase()
        );
        assert_eq!(Fingerprint::from_hex(LIBOTR_FINGERPRINT), Some(fp));
        assert_eq!(Fingerprint::from_hex(&fp.to_hex()), Some(fp));
        assert_eq!(Fingerprint::from_hex("abcd"), None);
        assert_eq!(Fingerprint::from_hex(&"g".repeat(40)), None);
        // The fingerprint hashes the PUBKEY without its 2-byte type.
        let bytes = key.public_key().to_bytes();
        assert_eq!(&bytes[..2], &[0, 0]);
        assert_eq!(fp.0, sym::sha1(&bytes[2..]));
    }

    #[test]
    fn sign_verify_round_trip() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for key in [&libotr_key(), generated_key()] {
            let pk = key.public_key();
            let value = [0x5a; 32];
            let sig = key.sign(&value, &mut rng);
            assert!(pk.verify(&value, &sig));
            // Randomised: a second signature differs and also verifies.
            let sig2 = key.sign(&value, &mut rng);
            assert_ne!(sig, sig2);
            assert!(pk.verify(&value, &sig2));
            let mut other = value;
            other[31] ^= 1;
            assert!(!pk.verify(&other, &sig));
            for i in [0, 19, 20, 39] {
                let mut bad = sig;
                bad[i] ^= 0x80;
                assert!(!pk.verify(&value, &bad), "flipped byte {i}");
            }
            assert!(!pk.verify(&value, &sig[..39]));
            let mut long = sig.to_vec();
            long.push(0);
            assert!(!pk.verify(&value, &long));
        }
    }

    #[test]
    fn verify_rejects_r_or_s_out_of_range() {
        let key = libotr_key();
        let pk = key.public_key();
        let value = [7; 32];
        let sig = key.sign(&value, &mut ChaCha20Rng::seed_from_u64(2));
        let (r, s) = sig.split_at(20);
        let zero = [0u8; 20];
        for (nr, ns) in [
            (&zero[..], s),
            (r, &zero[..]),
            (&q_plus(&key, 0)[..], s),
            (r, &q_plus(&key, 0)[..]),
            (&[0xff; 20][..], s),
            (r, &[0xff; 20][..]),
        ] {
            let mut bad = [0u8; 40];
            bad[..20].copy_from_slice(nr);
            bad[20..].copy_from_slice(ns);
            assert!(!pk.verify(&value, &bad));
        }
    }

    #[test]
    fn signs_the_value_mod_q_not_truncated() {
        // value and value + q reduce to the same number mod q, so a
        // signature on one verifies the other; truncation would differ.
        let key = libotr_key();
        let value = [0x11; 32];
        let v = U256::from_be_slice(&value);
        let q = key.public.prepared.q.get().resize::<{ U256::LIMBS }>();
        let shifted: [u8; 32] = uint_to_be(&v.wrapping_add(&q))
            .as_slice()
            .try_into()
            .unwrap();
        let sig = key.sign(&value, &mut ChaCha20Rng::seed_from_u64(3));
        assert!(key.public_key().verify(&shifted, &sig));
    }

    #[test]
    fn agrees_with_the_dsa_crate_given_value_mod_q() {
        use ::dsa::signature::hazmat::PrehashVerifier;
        let key = libotr_key();
        let pk = key.public_key();
        let boxed = |h: &str| crypto_bigint::BoxedUint::from_be_slice_vartime(minimal(&unhex(h)));
        #[allow(deprecated)]
        let comps = ::dsa::Components::from_components(boxed(P), boxed(Q), boxed(G)).unwrap();
        let vk = ::dsa::VerifyingKey::from_components(comps, boxed(Y)).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        for i in 0..3u8 {
            let value = [0xf0 ^ i; 32];
            let sig = key.sign(&value, &mut rng);
            let h = reduce_value(&value, &key.public.prepared.q);
            let prehash = &uint_to_be(&h)[4..];
            let theirs = ::dsa::Signature::from_components(
                crypto_bigint::BoxedUint::from_be_slice_vartime(&sig[..20]),
                crypto_bigint::BoxedUint::from_be_slice_vartime(&sig[20..]),
            )
            .unwrap();
            vk.verify_prehash(prehash, &theirs).unwrap();
            assert!(pk.verify(&value, &sig));
        }
    }

    #[test]
    fn private_key_bytes_round_trip_and_validate() {
        let key = libotr_key();
        let bytes = key.to_bytes();
        let back = DsaPrivateKey::from_bytes(&bytes).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        assert_eq!(*back.x, *key.x);
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert!(DsaPrivateKey::from_bytes(&trailing).is_err());
        assert!(DsaPrivateKey::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        // x that does not match y.
        let mut x = unhex(X);
        x[20] ^= 1;
        assert_eq!(
            DsaPrivateKey::from_components(&unhex(P), &unhex(Q), &unhex(G), &unhex(Y), &x)
                .unwrap_err(),
            CryptoError::InvalidKey("DSA y does not match x")
        );
        assert!(
            DsaPrivateKey::from_components(&unhex(P), &unhex(Q), &unhex(G), &unhex(Y), &[0])
                .is_err()
        );
        let ours = generated_key();
        let back = DsaPrivateKey::from_bytes(&ours.to_bytes()).unwrap();
        assert_eq!(back.public_key(), ours.public_key());
    }

    #[test]
    fn generated_keys_have_otr_sizes() {
        let key = generated_key();
        assert_eq!(bit_len(&key.public.p), 1024);
        assert_eq!(bit_len(&key.public.q), 160);
        assert_ne!(key.public_key(), libotr_key().public_key());
    }

    #[test]
    fn pubkey_encoding_round_trips() {
        let pk = libotr_key().public_key().clone();
        let bytes = pk.to_bytes();
        let mut w = Writer::new();
        pk.encode(&mut w);
        assert_eq!(w.as_slice(), bytes.as_slice());
        let mut r = Reader::new(&bytes);
        assert_eq!(DsaPublicKey::decode(&mut r).unwrap(), pk);
        r.finish().unwrap();
        // p's MPI is 128 bytes (its top bit is set; no leading zero).
        assert_eq!(&bytes[2..6], &[0, 0, 0, 128]);
    }

    fn pubkey(
        kind: u16,
        p: &[u8],
        q: &[u8],
        g: &[u8],
        y: &[u8],
    ) -> Result<DsaPublicKey, CryptoError> {
        let mut w = Writer::new();
        w.short(kind).mpi(p).mpi(q).mpi(g).mpi(y);
        let bytes = w.into_vec();
        DsaPublicKey::decode(&mut Reader::new(&bytes))
    }

    #[test]
    fn decode_rejects_bad_keys() {
        let (p, q, g, y) = (unhex(P), unhex(Q), unhex(G), unhex(Y));
        assert!(pubkey(0, &p, &q, &g, &y).is_ok());
        assert_eq!(
            pubkey(1, &p, &q, &g, &y).unwrap_err(),
            CryptoError::UnsupportedPubkeyType(1)
        );
        let mut q161 = vec![1];
        q161.extend(&q[1..]);
        assert!(pubkey(0, &p, &q161, &g, &y).is_err());
        assert!(pubkey(0, &p, &q[2..], &g, &y).is_err());
        assert!(pubkey(0, &p[..65], &q, &g[..10], &y[..10]).is_err()); // 512-bit p
        let mut p_even = p.clone();
        *p_even.last_mut().unwrap() ^= 1;
        assert!(pubkey(0, &p_even, &q, &g, &y).is_err());
        assert!(pubkey(0, &p, &q, &[1], &y).is_err());
        assert!(pubkey(0, &p, &q, &g, &[0]).is_err());
        assert!(pubkey(0, &p, &q, &g, &p).is_err());
        assert!(pubkey(0, &p, &q, &p, &y).is_err());
        let huge = vec![0xff; 400]; // 3200-bit p
        assert!(pubkey(0, &huge, &q, &g, &y).is_err());
        assert!(matches!(
            DsaPublicKey::decode(&mut Reader::new(&[0, 0, 0, 0])),
            Err(CryptoError::Codec(_))
        ));
    }

    #[test]
    fn debug_does_not_print_x() {
        let key = libotr_key();
        let dbg = format!("{key:?}");
        assert!(
            !dbg.to_lowercase().contains(&X[2..12].to_lowercase()),
            "{dbg}"
        );
        assert!(dbg.contains("redacted"));
    }

    /// Signs with libotr and verifies with us, and the other way round,
    /// through a small C program built against libotr (skipped when gcc or
    /// the libotr headers are missing).
    #[test]
    fn interoperates_with_libotr_signatures() {
        let header = std::path::Path::new("/usr/include/libotr/privkey.h");
        let gcc = std::path::Path::new("/usr/bin/gcc");
        if !header.exists() || !gcc.exists() {
            eprintln!("skipping: needs gcc and libotr5-dev");
            return;
        }
        let dir = std::env::temp_dir().join(format!("o2tr-dsa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("dsatool.c");
        std::fs::write(&src, DSATOOL_C).unwrap();
        let bin = dir.join("dsatool");
        let status = std::process::Command::new(gcc)
            .arg(&src)
            .arg("-o")
            .arg(&bin)
            .args(["-lotr", "-lgcrypt"])
            .status()
            .unwrap();
        assert!(status.success(), "building the libotr helper failed");
        let keyfile = dir.join("key.priv");
        std::fs::write(
            &keyfile,
            format!(
                "(privkeys (account (name \"a\") (protocol p) (private-key (dsa \
                 (p #{P}#) (q #{Q}#) (g #{G}#) (y #{Y}#) (x #{X}#)))))\n"
            ),
        )
        .unwrap();
        let key = libotr_key();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        for i in 0..4u8 {
            // High bytes set so that the value exceeds q (mod q matters).
            let value = [0xff - i; 32];
            // libotr signs, we verify.
            let out = std::process::Command::new(&bin)
                .arg("sign")
                .arg(&keyfile)
                .arg(hex(&value))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let sig = unhex(String::from_utf8(out.stdout).unwrap().trim());
            assert_eq!(sig.len(), 40);
            assert!(
                key.public_key().verify(&value, &sig),
                "libotr signature rejected"
            );
            // We sign, libotr verifies.
            let ours = key.sign(&value, &mut rng);
            let st = std::process::Command::new(&bin)
                .arg("verify")
                .arg(&keyfile)
                .arg(hex(&value))
                .arg(hex(&ours))
                .status()
                .unwrap();
            assert!(st.success(), "libotr rejected our signature");
            // And libotr rejects a corrupted one (the harness can fail).
            let mut bad = ours;
            bad[5] ^= 1;
            let st = std::process::Command::new(&bin)
                .arg("verify")
                .arg(&keyfile)
                .arg(hex(&value))
                .arg(hex(&bad))
                .status()
                .unwrap();
            assert!(!st.success());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    const DSATOOL_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libotr/proto.h>
#include <libotr/privkey.h>
static size_t unhex(const char *s, unsigned char *out) {
    size_t n = strlen(s) / 2;
    for (size_t i = 0; i < n; i++) sscanf(s + 2 * i, "%2hhx", &out[i]);
    return n;
}
int main(int argc, char **argv) {
    if (argc < 4) return 2;
    OTRL_INIT;
    OtrlUserState us = otrl_userstate_create();
    if (otrl_privkey_read(us, argv[2])) return 3;
    OtrlPrivKey *k = otrl_privkey_find(us, "a", "p");
    if (!k) return 4;
    unsigned char value[64];
    size_t vlen = unhex(argv[3], value);
    if (!strcmp(argv[1], "sign")) {
        unsigned char *sig; size_t siglen;
        if (otrl_privkey_sign(&sig, &siglen, k, value, vlen)) return 5;
        for (size_t i = 0; i < siglen; i++) printf("%02x", sig[i]);
        printf("\n");
        return 0;
    }
    unsigned char sig[128];
    size_t siglen = unhex(argv[4], sig);
    return otrl_privkey_verify(sig, siglen, k->pubkey_type, k->privkey, value, vlen) ? 1 : 0;
}
"#;
}
