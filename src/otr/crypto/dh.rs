//! Diffie-Hellman over the RFC 3526 1536-bit MODP group (group 5, g = 2),
//! as the OTR v3 spec §"Notation and definitions" prescribes, plus the key
//! derivation helpers `h1`/`h2` of §"Computing AES keys and MAC keys" and
//! §"The Authenticated Key Exchange (AKE)".
//!
//! Secret exponents are 320 random bits (as libotr uses). All arithmetic on
//! them is constant-time: Montgomery multiplication specialised to this
//! prime (module `mont`, product scanning) with fixed 4-bit windows over
//! the 320-bit exponent, so an exponentiation costs 320 squarings, not
//! 1536. Key generation uses a precomputed fixed-base table for g = 2 (see
//! [`DhKeyPair::generate`]) with constant-time table look-ups.

use core::fmt;
use std::sync::OnceLock;

use crypto_bigint::modular::ConstMontyForm;
use crypto_bigint::{Random, U320, U1536, const_monty_params};
use zeroize::{Zeroize, Zeroizing};

use super::secret::SecretArray;
use super::{CryptoError, sym, uint_from_be, uint_to_minimal_be};

/// Length of the DH modulus in bytes (1536 bits).
pub const DH_MODULUS_BYTES: usize = 192;

/// Bits in a secret exponent.
const SECRET_BITS: u32 = 320;
/// Bytes in the serialized secret exponent.
const SECRET_BYTES: usize = 40;

const P_HEX: &str = concat!(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1",
    "29024E088A67CC74020BBEA63B139B22514A08798E3404DD",
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245",
    "E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED",
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3D",
    "C2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F",
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D",
    "670C354E4ABC9804F1746C08CA237327FFFFFFFFFFFFFFFF",
);

const_monty_params!(
    DhModulus,
    U1536,
    P_HEX,
    "The RFC 3526 1536-bit MODP prime used by OTR."
);

/// An element of the DH group in Montgomery form.
type Fe = ConstMontyForm<DhModulus, { U1536::LIMBS }>;

/// The modulus p.
const P: U1536 = U1536::from_be_hex(P_HEX);
/// p - 2, the largest acceptable public value.
const P_MINUS_2: U1536 = P.wrapping_sub(&U1536::from_u8(2));

/// The group arithmetic type, for the Socialist Millionaires' Protocol
/// (spec §"Socialist Millionaires' Protocol (SMP)"), which works in the same
/// group with 1536-bit exponents.
pub(crate) type GroupElement = Fe;

/// Whether `v` is an acceptable received group element: `2 <= v <= p-2`
/// (the check the spec asks for on every SMP value). Variable-time: the
/// values checked are public.
pub(crate) fn in_group_range(v: &U1536) -> bool {
    !(v.cmp_vartime(&U1536::from_u8(2)).is_lt() || v.cmp_vartime(&P_MINUS_2).is_gt())
}

/// A Diffie-Hellman public value `g^x mod p`, known to lie in `2 ..= p-2`.
///
/// Ordered numerically (the data-key derivation compares public values).
/// Keeps its MPI encoding too: every data message we send carries our
/// newest public value and every snapshot holds four, so it is encoded once.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DhPublicKey {
    value: U1536,
    /// The minimal big-endian magnitude of `value`.
    mpi: Box<[u8]>,
}

impl DhPublicKey {
    /// Parses a big-endian magnitude (leading zeros allowed), as carried in
    /// an MPI, rejecting values outside `2 ..= p-2`.
    pub fn from_mpi(magnitude: &[u8]) -> Result<Self, CryptoError> {
        let v = uint_from_be::<{ U1536::LIMBS }>(magnitude).ok_or(CryptoError::DhOutOfRange)?;
        Self::checked(v)
    }

    fn checked(v: U1536) -> Result<Self, CryptoError> {
        // Public values: variable-time comparisons are fine.
        if v.cmp_vartime(&U1536::from_u8(2)).is_lt() || v.cmp_vartime(&P_MINUS_2).is_gt() {
            return Err(CryptoError::DhOutOfRange);
        }
        Ok(Self {
            value: v,
            mpi: uint_to_minimal_be(&v).as_slice().into(),
        })
    }

    /// The minimal big-endian magnitude (no leading zeros), for an MPI.
    pub fn to_mpi(&self) -> Vec<u8> {
        self.mpi.to_vec()
    }

    /// [`to_mpi`](Self::to_mpi) without the copy.
    pub fn as_mpi(&self) -> &[u8] {
        &self.mpi
    }
}

impl fmt::Debug for DhPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_mpi();
        write!(f, "DhPublicKey(")?;
        for b in bytes.iter().take(8) {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Our DH key pair: a 320-bit secret exponent `x` and `g^x mod p`.
///
/// The secret is zeroized on drop (clones too) and never printed.
#[derive(Clone)]
pub struct DhKeyPair {
    secret: Zeroizing<U320>,
    public: DhPublicKey,
}

impl fmt::Debug for DhKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DhKeyPair")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl DhKeyPair {
    /// A fresh key pair with a uniformly random 320-bit secret exponent.
    pub fn generate<R: rand_core::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        loop {
            let secret = Zeroizing::new(U320::random_from_rng(rng));
            // Only x = 0 (probability 2^-320) gives an out-of-range value.
            if let Ok(pair) = Self::from_secret(secret) {
                return pair;
            }
        }
    }

    fn from_secret(secret: Zeroizing<U320>) -> Result<Self, CryptoError> {
        let public = DhPublicKey::checked(fixed_base_pow(&secret))?;
        Ok(Self { secret, public })
    }

    /// Our public value `g^x mod p`.
    pub fn public(&self) -> &DhPublicKey {
        &self.public
    }

    /// The shared secret `theirs^x mod p`, constant-time in `x`.
    pub fn shared_secret(&self, theirs: &DhPublicKey) -> SharedSecret {
        let mut v = Zeroizing::new(mont::pow(&theirs.value, &self.secret));
        let bytes = uint_to_minimal_be(&*v);
        v.zeroize();
        SharedSecret(bytes)
    }

    /// Length of [`dangerous_secret_bytes`](Self::dangerous_secret_bytes)
    /// (fixed: 320 bits).
    pub const SECRET_LEN: usize = SECRET_BYTES;

    /// The secret exponent as 40 big-endian bytes, for the durable key
    /// snapshot. Handle with care: this is the key. An array, not a
    /// `Vec`: every snapshot (one per message and side) writes three.
    pub fn dangerous_secret_bytes(&self) -> SecretArray<SECRET_BYTES> {
        let mut out = SecretArray([0u8; SECRET_BYTES]);
        for (chunk, limb) in out
            .0
            .chunks_exact_mut(crypto_bigint::Limb::BYTES)
            .zip(self.secret.as_limbs().iter().rev())
        {
            chunk.copy_from_slice(&limb.0.to_be_bytes());
        }
        out
    }

    /// Rebuilds a key pair from [`dangerous_secret_bytes`](Self::dangerous_secret_bytes)
    /// (any big-endian encoding of at most 320 bits), recomputing the public
    /// value.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        if bytes.len() - start > SECRET_BYTES {
            return Err(CryptoError::InvalidKey("DH secret longer than 320 bits"));
        }
        let secret = Zeroizing::new(
            uint_from_be::<{ U320::LIMBS }>(bytes)
                .ok_or(CryptoError::InvalidKey("DH secret longer than 320 bits"))?,
        );
        Self::from_secret(secret)
            .map_err(|_| CryptoError::InvalidKey("DH secret gives a degenerate public value"))
    }

    /// Rebuilds a key pair from [`dangerous_secret_bytes`](Self::dangerous_secret_bytes)
    /// and the public value stored next to it, without the exponentiation
    /// of [`from_secret_bytes`](Self::from_secret_bytes). For our own
    /// durable snapshot only: nothing checks that `public` is `g^secret`
    /// (whoever can write the snapshot can replace the secret as well).
    pub fn from_stored(secret: &[u8], public: DhPublicKey) -> Result<Self, CryptoError> {
        let start = secret.iter().position(|&b| b != 0).unwrap_or(secret.len());
        if secret.len() - start > SECRET_BYTES {
            return Err(CryptoError::InvalidKey("DH secret longer than 320 bits"));
        }
        let secret = Zeroizing::new(
            uint_from_be::<{ U320::LIMBS }>(secret)
                .ok_or(CryptoError::InvalidKey("DH secret longer than 320 bits"))?,
        );
        if *secret == U320::ZERO {
            return Err(CryptoError::InvalidKey("DH secret is zero"));
        }
        Ok(Self { secret, public })
    }
}

/// The DH shared secret `s`, held as its minimal big-endian magnitude.
/// Zeroized on drop.
pub struct SharedSecret(Zeroizing<Vec<u8>>);

impl SharedSecret {
    /// The minimal big-endian magnitude of `s` (what the MPI carries).
    pub fn mpi_magnitude(&self) -> &[u8] {
        &self.0
    }

    /// `b || MPI(s)`: the hash input for `h1`/`h2` ("secbytes" prefixed).
    fn prefixed_secbytes(&self, b: u8) -> Zeroizing<Vec<u8>> {
        let mut buf = Zeroizing::new(Vec::with_capacity(5 + self.0.len()));
        buf.push(b);
        // The magnitude is at most 192 bytes; the cast cannot truncate.
        buf.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        buf.extend_from_slice(&self.0);
        buf
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

/// `h1(b) = SHA1(b || secbytes)`, where secbytes is `s` as an MPI.
pub fn h1(b: u8, s: &SharedSecret) -> Zeroizing<[u8; 20]> {
    Zeroizing::new(sym::sha1(&s.prefixed_secbytes(b)))
}

/// `h2(b) = SHA256(b || secbytes)`, where secbytes is `s` as an MPI.
pub fn h2(b: u8, s: &SharedSecret) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(sym::sha256(&s.prefixed_secbytes(b)))
}

// ---------------------------------------------------------------------------
// Fixed-base exponentiation for g = 2.
//
// The exponent is split into WINDOWS windows of WINDOW_BITS bits; the table
// holds TABLE[i][d] = g^(d * 2^(WINDOW_BITS * i)) in Montgomery form, so
// g^x = prod_i TABLE[i][x_i]: one multiplication per window and no
// squarings. Each look-up reads the whole row and selects with
// constant-time masks, so the memory access pattern does not depend on x.

const WINDOW_BITS: u32 = 4;
const WINDOW_ENTRIES: usize = 1 << WINDOW_BITS;
const WINDOWS: usize = (SECRET_BITS / WINDOW_BITS) as usize;

type Table = Vec<[mont::Limbs; WINDOW_ENTRIES]>;

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let one = mont::ONE;
        let mut base = mont::to_montgomery(&U1536::from_u8(2));
        let mut rows = Vec::with_capacity(WINDOWS);
        for _ in 0..WINDOWS {
            let mut row = [one; WINDOW_ENTRIES];
            for d in 1..WINDOW_ENTRIES {
                row[d] = mont::mul(&row[d - 1], &base);
            }
            // Next row's base: base^(2^WINDOW_BITS) = row[15] * base.
            base = mont::mul(&row[WINDOW_ENTRIES - 1], &base);
            rows.push(row);
        }
        rows
    })
}

/// `2^x mod p`, constant-time in `x`.
fn fixed_base_pow(x: &U320) -> U1536 {
    let table = table();
    let mut acc = Zeroizing::new(mont::ONE);
    let mut pick = Zeroizing::new([0; mont::L]);
    for (i, row) in table.iter().enumerate() {
        mont::select(row, mont::window(x, i as u32 * WINDOW_BITS), &mut pick);
        *acc = mont::mul(&acc, &pick);
    }
    mont::from_montgomery(&acc)
}

/// Montgomery arithmetic specialised to the group-5 prime, on plain limb
/// arrays: the multiplication in crypto-bigint's `ConstMontyForm::mul` is
/// about twice slower than this one for 1536 bits, and an exponentiation is
/// ~400 of them. Everything here is constant-time: no branch or memory
/// index depends on the operands (table look-ups scan every entry and
/// select with masks).
mod mont {
    use crypto_bigint::{Limb, U320, U1536, WideWord, Word};
    use subtle::ConstantTimeEq;
    use zeroize::{Zeroize, Zeroizing};

    use super::{Fe, P, SECRET_BITS};

    /// Limbs of a 1536-bit value, least significant first.
    pub(super) const L: usize = U1536::LIMBS;
    pub(super) type Limbs = [Word; L];

    const BITS: u32 = Word::BITS;
    const P_LIMBS: Limbs = limbs_of(&P);
    /// 1 in Montgomery form (R mod p).
    pub(super) const ONE: Limbs = limbs_of(Fe::ONE.as_montgomery());

    const fn limbs_of(v: &U1536) -> Limbs {
        let src = v.as_limbs();
        let mut out = [0; L];
        let mut i = 0;
        while i < L {
            out[i] = src[i].0;
            i += 1;
        }
        out
    }

    // The lowest limb of p is all ones, so -p^-1 mod 2^BITS = 1 and the
    // Montgomery quotient digit of each round is the low limb itself.
    const _: () = assert!(P_LIMBS[0] == Word::MAX);

    /// `acc += x * y`, with `acc` a 192-bit column accumulator held as a
    /// 128-bit low part and a carry word.
    #[inline(always)]
    fn mac(acc: &mut WideWord, hi: &mut Word, x: Word, y: Word) {
        let (s, o) = acc.overflowing_add((x as WideWord) * (y as WideWord));
        *acc = s;
        *hi += o as Word;
    }

    /// Shifts the column accumulator down by one limb (to the next column).
    #[inline(always)]
    fn next_column(acc: &mut WideWord, hi: &mut Word) {
        *acc = (*acc >> BITS) | ((*hi as WideWord) << BITS);
        *hi = 0;
    }

    /// `a * b / R mod p`, for `a, b < p`; the result is `< p`.
    ///
    /// Product scanning (FIPS, "finely integrated product scanning"):
    /// column by column, the products `a[j] * b[i-j]` and the reduction
    /// terms `m[j] * p[i-j]` go into one three-limb accumulator that stays
    /// in registers. About 25% faster than the operand-scanning CIOS form,
    /// which loads and stores a limb of the intermediate result for every
    /// multiply-add.
    pub(super) fn mul(a: &Limbs, b: &Limbs) -> Limbs {
        let mut m = [0 as Word; L];
        let mut u = [0 as Word; L];
        let mut acc: WideWord = 0;
        let mut hi: Word = 0;
        for i in 0..L {
            for j in 0..i {
                mac(&mut acc, &mut hi, a[j], b[i - j]);
                mac(&mut acc, &mut hi, m[j], P_LIMBS[i - j]);
            }
            mac(&mut acc, &mut hi, a[i], b[0]);
            // m = acc * (-p^-1) mod 2^BITS = the low limb; adding m * p[0]
            // clears it.
            m[i] = acc as Word;
            mac(&mut acc, &mut hi, m[i], P_LIMBS[0]);
            next_column(&mut acc, &mut hi);
        }
        for i in L..2 * L {
            for j in i - L + 1..L {
                mac(&mut acc, &mut hi, a[j], b[i - j]);
                mac(&mut acc, &mut hi, m[j], P_LIMBS[i - j]);
            }
            u[i - L] = acc as Word;
            next_column(&mut acc, &mut hi);
        }
        let mut r = [0 as Word; L];
        final_subtract(&u, acc as Word, &mut r);
        m.zeroize();
        u.zeroize();
        acc.zeroize();
        r
    }

    /// `a^2 / R mod p` for `a < p`, product scanning like [`mul`]; each
    /// column sums its cross products `a[j] * a[i-j]` (`j < i-j`) once and
    /// doubles them, so a squaring does ~3/4 of the multiplications.
    pub(super) fn square(a: &Limbs) -> Limbs {
        let mut m = [0 as Word; L];
        let mut u = [0 as Word; L];
        let mut acc: WideWord = 0;
        let mut hi: Word = 0;
        for i in 0..2 * L - 1 {
            let lo = if i >= L { i - L + 1 } else { 0 };
            let mut cross: WideWord = 0;
            let mut cross_hi: Word = 0;
            let mut j = lo;
            while 2 * j < i {
                mac(&mut cross, &mut cross_hi, a[j], a[i - j]);
                j += 1;
            }
            // acc += 2 * cross (cross_hi is at most L, so nothing is lost).
            cross_hi = (cross_hi << 1) | (cross >> (2 * BITS - 1)) as Word;
            let (s, o) = acc.overflowing_add(cross << 1);
            acc = s;
            hi += cross_hi + o as Word;
            cross.zeroize();
            if i % 2 == 0 {
                mac(&mut acc, &mut hi, a[i / 2], a[i / 2]);
            }
            if i < L {
                for j in 0..i {
                    mac(&mut acc, &mut hi, m[j], P_LIMBS[i - j]);
                }
                m[i] = acc as Word;
                mac(&mut acc, &mut hi, m[i], P_LIMBS[0]);
            } else {
                for j in i - L + 1..L {
                    mac(&mut acc, &mut hi, m[j], P_LIMBS[i - j]);
                }
                u[i - L] = acc as Word;
            }
            next_column(&mut acc, &mut hi);
        }
        // The last column (2L - 1) has no products, only the carry.
        u[L - 1] = acc as Word;
        let top = (acc >> BITS) as Word;
        let mut r = [0 as Word; L];
        final_subtract(&u, top, &mut r);
        m.zeroize();
        u.zeroize();
        acc.zeroize();
        r
    }

    /// `r = t - p` if `t + carry * R >= p`, else `t` (for `t < 2p`).
    fn final_subtract(t: &[Word], carry: Word, r: &mut Limbs) {
        let mut borrow: Word = 0;
        for j in 0..L {
            let (d1, b1) = t[j].overflowing_sub(P_LIMBS[j]);
            let (d2, b2) = d1.overflowing_sub(borrow);
            r[j] = d2;
            borrow = (b1 | b2) as Word;
        }
        // Keep t iff the subtraction borrowed and there is no carry limb.
        let keep_mask = (borrow & (carry ^ 1)).wrapping_neg();
        for j in 0..L {
            r[j] ^= keep_mask & (r[j] ^ t[j]);
        }
    }

    /// `v * R mod p`.
    pub(super) fn to_montgomery(v: &U1536) -> Limbs {
        limbs_of(Fe::new(v).as_montgomery())
    }

    /// Back from Montgomery form: `a / R mod p`, fully reduced.
    pub(super) fn from_montgomery(a: &Limbs) -> U1536 {
        let mut one = [0; L];
        one[0] = 1;
        let v = Zeroizing::new(mul(a, &one));
        U1536::new(v.map(Limb))
    }

    /// The `WINDOW`-bit digit of `x` starting at bit `shift` (4 bits).
    pub(super) fn window(x: &U320, shift: u32) -> Word {
        let limb = x.as_limbs()[(shift / BITS) as usize].0;
        (limb >> (shift % BITS)) & 0xf
    }

    /// `out = table[digit]`, reading every entry.
    ///
    /// The match of each entry comes from `subtle` (whose `Choice` hides
    /// the value from the optimiser); it is widened to an all-ones or zero
    /// mask once per entry, and the masked merge of the 24 limbs is plain
    /// bitwise arithmetic the compiler vectorises — `conditional_assign`
    /// limb by limb costs ~3x more.
    pub(super) fn select(table: &[Limbs; 16], digit: Word, out: &mut Limbs) {
        *out = [0; L];
        for (d, entry) in table.iter().enumerate() {
            let hit = digit.ct_eq(&(d as Word));
            let mask = Word::from(hit.unwrap_u8()).wrapping_neg();
            for (o, e) in out.iter_mut().zip(entry.iter()) {
                *o |= mask & e;
            }
        }
    }

    /// `base^x mod p` for a 320-bit secret `x`, constant-time in `x`
    /// (fixed 4-bit windows: 320 squarings and 80 multiplications).
    pub(super) fn pow(base: &U1536, x: &U320) -> U1536 {
        let b = to_montgomery(base);
        let mut powers = Zeroizing::new([ONE; 16]);
        powers[1] = b;
        for d in 2..16 {
            powers[d] = mul(&powers[d - 1], &b);
        }
        let mut acc = Zeroizing::new(ONE);
        let mut pick = Zeroizing::new([0; L]);
        let windows = SECRET_BITS / 4;
        for w in (0..windows).rev() {
            if w != windows - 1 {
                for _ in 0..4 {
                    *acc = square(&acc);
                }
            }
            select(&powers, window(x, w * 4), &mut pick);
            *acc = mul(&acc, &pick);
        }
        from_montgomery(&acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn p_bytes() -> Vec<u8> {
        unhex(P_HEX)
    }

    /// p + delta (delta may be negative), big-endian.
    fn p_plus(delta: i64) -> Vec<u8> {
        let v = P.wrapping_add(&U1536::from_u64(delta.unsigned_abs()));
        let v = if delta < 0 {
            P.wrapping_sub(&U1536::from_u64(delta.unsigned_abs()))
        } else {
            v
        };
        let mut out = crate::otr::crypto::uint_to_be(&v).to_vec();
        if delta > 0 && v < P {
            out.insert(0, 1); // carried past 1536 bits
        }
        out
    }

    #[test]
    fn known_powers_of_the_generator() {
        let one = DhKeyPair::from_secret_bytes(&[1]).unwrap();
        assert_eq!(one.public().to_mpi(), vec![2]);
        let two = DhKeyPair::from_secret_bytes(&[0, 0, 2]).unwrap();
        assert_eq!(two.public().to_mpi(), vec![4]);
        // 2^0x102 = 2^258 = 0x04 followed by 32 zero bytes (also what
        // libotr's otr_sesskeys prints for secret 0102).
        let k = DhKeyPair::from_secret_bytes(&[1, 2]).unwrap();
        let mut want = vec![4u8];
        want.extend([0u8; 32]);
        assert_eq!(k.public().to_mpi(), want);
    }

    #[test]
    fn fixed_base_table_agrees_with_generic_exponentiation() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for _ in 0..4 {
            let x = U320::random_from_rng(&mut rng);
            let generic = Fe::new(&U1536::from_u8(2))
                .pow_bounded_exp(&x, SECRET_BITS)
                .retrieve();
            assert_eq!(fixed_base_pow(&x), generic);
        }
        assert_eq!(
            fixed_base_pow(&U320::MAX),
            Fe::new(&U1536::from_u8(2)).pow(&U320::MAX).retrieve()
        );
    }

    #[test]
    fn montgomery_arithmetic_agrees_with_crypto_bigint() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let p_minus_2 = P.wrapping_sub(&U1536::from_u8(2));
        let p_minus_1 = P.wrapping_sub(&U1536::ONE);
        let mut bases = vec![U1536::from_u8(2), U1536::from_u8(3), p_minus_2, p_minus_1];
        for _ in 0..4 {
            bases.push(U1536::random_from_rng(&mut rng).wrapping_rem_vartime(&P.to_nz().unwrap()));
        }
        let mut exps = vec![U320::ZERO, U320::ONE, U320::MAX];
        for _ in 0..3 {
            exps.push(U320::random_from_rng(&mut rng));
        }
        for a in &bases {
            for b in &bases {
                let want = Fe::new(a).mul(&Fe::new(b));
                let got = mont::mul(&mont::to_montgomery(a), &mont::to_montgomery(b));
                assert_eq!(mont::from_montgomery(&got), want.retrieve());
                if a == b {
                    let sq = mont::square(&mont::to_montgomery(a));
                    assert_eq!(sq, got);
                }
            }
            for x in &exps {
                let want = Fe::new(a).pow_bounded_exp(x, SECRET_BITS).retrieve();
                assert_eq!(mont::pow(a, x), want);
            }
        }
    }

    #[test]
    fn shared_secret_is_symmetric() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let a = DhKeyPair::generate(&mut rng);
        let b = DhKeyPair::generate(&mut rng);
        assert_ne!(a.public(), b.public());
        let sa = a.shared_secret(b.public());
        let sb = b.shared_secret(a.public());
        assert_eq!(sa.mpi_magnitude(), sb.mpi_magnitude());
        assert_ne!(sa.mpi_magnitude().first(), Some(&0));
        assert_eq!(*h1(1, &sa), *h1(1, &sb));
    }

    #[test]
    fn rejects_dh_outside_range() {
        for v in [
            vec![],
            vec![0],
            vec![1],
            vec![0, 0, 1],
            p_plus(-1),
            p_bytes(),
            p_plus(1),
            vec![1; DH_MODULUS_BYTES + 1],
        ] {
            assert_eq!(
                DhPublicKey::from_mpi(&v),
                Err(CryptoError::DhOutOfRange),
                "{}",
                hex(&v)
            );
        }
        assert_eq!(DhPublicKey::from_mpi(&[0, 2]).unwrap().to_mpi(), vec![2]);
        let max = DhPublicKey::from_mpi(&p_plus(-2)).unwrap();
        assert_eq!(max.to_mpi(), p_plus(-2));
        // A full-width value with a leading zero byte is fine.
        let mut padded = vec![0];
        padded.extend(p_plus(-2));
        assert_eq!(DhPublicKey::from_mpi(&padded).unwrap(), max);
    }

    #[test]
    fn public_keys_order_numerically() {
        let small = DhPublicKey::from_mpi(&[0xff]).unwrap();
        let big = DhPublicKey::from_mpi(&[1, 0]).unwrap();
        assert!(small < big);
        assert!(DhPublicKey::from_mpi(&p_plus(-2)).unwrap() > big);
    }

    #[test]
    fn secret_bytes_round_trip() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let a = DhKeyPair::generate(&mut rng);
        let bytes = a.dangerous_secret_bytes();
        assert_eq!(bytes.len(), SECRET_BYTES);
        // The snapshot bytes as before the array: fixed-width big-endian.
        assert_eq!(&*bytes, &*crate::otr::crypto::uint_to_be(&*a.secret));
        let b = DhKeyPair::from_secret_bytes(&bytes).unwrap();
        assert_eq!(a.public(), b.public());
        let c = a.clone();
        assert_eq!(c.public(), a.public());
        assert!(DhKeyPair::from_secret_bytes(&[0; 8]).is_err());
        assert!(DhKeyPair::from_secret_bytes(&[1; SECRET_BYTES + 1]).is_err());
        // Leading zeros beyond 40 bytes are fine.
        let mut padded = vec![0; 8];
        padded.extend_from_slice(&bytes);
        assert_eq!(
            DhKeyPair::from_secret_bytes(&padded).unwrap().public(),
            a.public()
        );
    }

    #[test]
    fn stored_key_pair_keeps_secret_and_public() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let a = DhKeyPair::generate(&mut rng);
        let b = DhKeyPair::generate(&mut rng);
        let c = DhKeyPair::from_stored(&a.dangerous_secret_bytes(), a.public().clone()).unwrap();
        assert_eq!(c.public(), a.public());
        assert_eq!(
            c.shared_secret(b.public()).mpi_magnitude(),
            a.shared_secret(b.public()).mpi_magnitude()
        );
        assert!(DhKeyPair::from_stored(&[0; 40], a.public().clone()).is_err());
        assert!(DhKeyPair::from_stored(&[1; SECRET_BYTES + 1], a.public().clone()).is_err());
    }

    #[test]
    fn debug_does_not_print_secrets() {
        let k = DhKeyPair::from_secret_bytes(&[0xab; 40]).unwrap();
        let s = k.shared_secret(&DhPublicKey::from_mpi(&[3]).unwrap());
        let dbg = format!("{k:?} {s:?}");
        assert!(!dbg.contains("abab"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn kdf_hashes_the_mpi_encoding() {
        let k = DhKeyPair::from_secret_bytes(&[1]).unwrap();
        // s = 5^1 = 5, secbytes = 00 00 00 01 05.
        let s = k.shared_secret(&DhPublicKey::from_mpi(&[5]).unwrap());
        assert_eq!(s.mpi_magnitude(), &[5]);
        assert_eq!(*h1(0x01, &s), sym::sha1(&[1, 0, 0, 0, 1, 5]));
        assert_eq!(*h2(0xff, &s), sym::sha256(&[0xff, 0, 0, 0, 1, 5]));
    }

    /// Cross-checks the data-key derivation (spec §"Computing AES keys and
    /// MAC keys") against libotr's `otr_sesskeys`.
    #[test]
    fn data_keys_match_libotr_otr_sesskeys() {
        let tool = std::path::Path::new("/usr/bin/otr_sesskeys");
        if !tool.exists() {
            eprintln!("skipping: /usr/bin/otr_sesskeys missing (apt-get install libotr5-bin)");
            return;
        }
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        for _ in 0..3 {
            let ours = DhKeyPair::generate(&mut rng);
            let theirs = DhKeyPair::generate(&mut rng);
            let out = std::process::Command::new(tool)
                .arg(hex(&ours.dangerous_secret_bytes()))
                .arg(hex(&theirs.public().to_mpi()))
                .output()
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            let field = |name: &str| -> String {
                text.lines()
                    .find(|l| l.starts_with(name))
                    .unwrap_or_else(|| panic!("{name} missing in {text}"))
                    .rsplit(' ')
                    .next()
                    .unwrap()
                    .to_string()
            };
            assert_eq!(field("Our public key:"), hex(&ours.public().to_mpi()));
            let s = ours.shared_secret(theirs.public());
            let (send, recv) = if ours.public() > theirs.public() {
                (0x01, 0x02)
            } else {
                (0x02, 0x01)
            };
            let send_aes = &h1(send, &s)[..16];
            let recv_aes = &h1(recv, &s)[..16];
            assert_eq!(field("Session id:"), hex(&*h1(0x00, &s)));
            assert_eq!(field("Sending   AES key:"), hex(send_aes));
            assert_eq!(field("Receiving AES key:"), hex(recv_aes));
            assert_eq!(field("Sending   MAC key:"), hex(&sym::sha1(send_aes)));
            assert_eq!(field("Receiving MAC key:"), hex(&sym::sha1(recv_aes)));
        }
    }
}
