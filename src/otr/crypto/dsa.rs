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
    W1024(ModP<{ U1024::LIMBS }>),
    W2048(ModP<{ U2048::LIMBS }>),
    W3072(ModP<{ U3072::LIMBS }>),
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
        let v = FixedMontyForm::multi_exponentiate_bounded_exp(
            &[(self.g, *u1), (self.y, *u2)],
            Q_BITS,
        );
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
            Arith::W1024(ModP::new(p, q, g, y)?)
        } else if p_bits <= 2048 {
            Arith::W2048(ModP::new(p, q, g, y)?)
        } else {
            Arith::W3072(ModP::new(p, q, g, y)?)
        };
        let q_int = Odd::new(uint_from_be::<SC_LIMBS>(q).ok_or(CryptoError::InvalidKey("DSA q"))?)
            .into_option()
            .ok_or(CryptoError::InvalidKey("DSA q is even"))?;
        let prepared = Prepared {
            arith,
            q: q_int.to_nz().into_option().ok_or(CryptoError::InvalidKey("DSA q"))?,
            q_params: FixedMontyParams::new_vartime(q_int),
        };
        Ok(Self {
            p: p.to_vec(),
            q: q.to_vec(),
            g: g.to_vec(),
            y: y.to_vec(),
            prepared,
        })
    }

    /// Writes the PUBKEY encoding: SHORT type 0x0000, MPIs p, q, g, y.
    pub fn encode(&self, w: &mut Writer) {
        w.short(PUBKEY_TYPE_DSA);
        self.encode_mpis(w);
    }

    fn encode_mpis(&self, w: &mut Writer) {
        w.mpi(&self.p).mpi(&self.q).mpi(&self.g).mpi(&self.y);
    }

    /// The PUBKEY encoding as a vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(18 + self.p.len() + self.q.len() + self.g.len() + self.y.len());
        self.encode(&mut w);
        w.into_vec()
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
        let mut w = Writer::with_capacity(16 + self.p.len() + self.q.len() + self.g.len() + self.y.len());
        self.encode_mpis(&mut w);
        Fingerprint(sym::sha1(w.as_slice()))
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
            let q_nz = match uint_from_be::<SC_LIMBS>(&q)
                .and_then(|q| NonZero::new(q).into_option())
            {
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
    pub fn sign<R: rand_core::CryptoRng + ?Sized>(&self, value: &[u8; 32], rng: &mut R) -> [u8; 40] {
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
        let mut w = Writer::with_capacity(
            40 + pk.p.len() + pk.q.len() + pk.g.len() + pk.y.len() + x.len(),
        );
        pk.encode_mpis(&mut w);
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
