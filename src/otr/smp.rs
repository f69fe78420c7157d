//! The Socialist Millionaires' Protocol (OTR v3 spec §"Socialist
//! Millionaires' Protocol (SMP)", §"Secret information", §"The SMP state
//! machine", and the TLV types 2–7 of §"Data Message").
//!
//! Sans-IO: [`Smp`] takes user requests ([`Smp::start`], [`Smp::answer`],
//! [`Smp::abort`]) and received SMP TLVs ([`Smp::handle_tlv`]) and returns
//! the TLVs to send (inside an encrypted data message, which is the
//! caller's job) plus an [`SmpEvent`] for the user.
//!
//! States carry the spec's names (`SMPSTATE_EXPECT1..4`); the responder's
//! wait for the user's secret after SMP message 1 is a separate state
//! ([`SmpPhase::AwaitingSecret`]), which like libotr still accepts a new
//! SMP message 1. Every transition consumes the old state (its secret
//! exponents are zeroized on drop); any error or abort returns to
//! `SMPSTATE_EXPECT1`.
//!
//! Arithmetic: group elements live in the RFC 3526 1536-bit group of
//! [`super::crypto::dh`] (g1 = 2, of prime order q = (p-1)/2); random
//! exponents are 1536 bits, as the spec says; proof values `D = r - x·c`
//! are computed mod q in Montgomery form. Exponentiations by secret
//! exponents use crypto-bigint's constant-time `pow`; only public
//! exponents (received `c`/`D` values) use the variable-time one.
//!
//! Checks on received values: every group element must be in `2 ..= p-2`,
//! every `D` in `1 ..= q-1` (libotr's rule), every `c` below q and equal to
//! the hash recomputed from the proof, and each message must carry exactly
//! its number of MPIs.
//!
//! SMP state is deliberately not part of the EKM snapshot: an SMP in
//! progress is abandoned when a session is suspended or the proxy restarts.

use core::fmt;

use crypto_bigint::modular::ConstMontyForm;
use crypto_bigint::{CtEq, Random, U1536, const_monty_params};

use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::crypto::dh::{GroupElement, in_group_range};
use super::crypto::{sha256, uint_from_be, uint_to_minimal_be};
use super::tlv::{self, Tlv, TlvError, types};

const Q_HEX: &str = concat!(
    "7FFFFFFFFFFFFFFFE487ED5110B4611A62633145C06E0E68",
    "948127044533E63A0105DF531D89CD9128A5043CC71A026E",
    "F7CA8CD9E69D218D98158536F92F8A1BA7F09AB6B6A8E122",
    "F242DABB312F3F637A262174D31BF6B585FFAE5B7A035BF6",
    "F71C35FDAD44CFD2D74F9208BE258FF324943328F6722D9E",
    "E1003E5C50B1DF82CC6D241B0E2AE9CD348B1FD47E9267AF",
    "C1B2AE91EE51D6CB0E3179AB1042A95DCF6A9483B84B4B36",
    "B3861AA7255E4C0278BA36046511B993FFFFFFFFFFFFFFFF",
);

const_monty_params!(
    SmpOrder,
    U1536,
    Q_HEX,
    "q = (p-1)/2, the order of g1 = 2 in the OTR group: SMP proofs are computed mod q."
);

/// Exponent arithmetic mod q.
type Exp = ConstMontyForm<SmpOrder, { U1536::LIMBS }>;
/// A group element mod p.
type Ge = GroupElement;

/// q as an integer.
const Q: U1536 = U1536::from_be_hex(Q_HEX);

/// The version byte of §"Secret information".
const SECRET_VERSION: u8 = 1;
/// Bits in the combined secret (a SHA-256 digest).
const SECRET_BITS: u32 = 256;

/// Why an SMP exchange was abandoned.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SmpError {
    /// The TLV value could not be parsed.
    #[error("malformed SMP message: {0}")]
    Tlv(#[from] TlvError),
    /// The message carried the wrong number of MPIs.
    #[error("SMP message has {got} MPIs, expected {want}")]
    MpiCount {
        /// MPIs present.
        got: usize,
        /// MPIs this message type carries.
        want: usize,
    },
    /// A group element was outside `2 ..= p-2`.
    #[error("SMP value {0} is not a valid group element")]
    GroupElement(&'static str),
    /// An exponent or proof value was outside its range mod q.
    #[error("SMP value {0} is out of range mod q")]
    Exponent(&'static str),
    /// A zero-knowledge proof did not verify.
    #[error("SMP proof {0} does not verify")]
    Proof(&'static str),
    /// An SMP message arrived that the current state does not accept.
    #[error("unexpected SMP message (TLV type {0})")]
    Unexpected(u16),
    /// An answer was given but no SMP request is waiting for one.
    #[error("no SMP request is waiting for an answer")]
    NoRequest,
}

/// The identities bound into the secret (§"Secret information"): our and
/// their long-term fingerprints and the session's ssid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmpContext {
    /// Our long-term key's fingerprint.
    pub our_fingerprint: [u8; 20],
    /// The peer's long-term key's fingerprint (authenticated in the AKE).
    pub their_fingerprint: [u8; 20],
    /// The secure session id.
    pub ssid: [u8; 8],
}

/// News for the user from one SMP step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmpEvent {
    /// The peer started SMP; answer with [`Smp::answer`].
    Requested {
        /// The peer's question (SMP message 1Q), if any.
        question: Option<String>,
    },
    /// Our request was answered; the exchange continues.
    InProgress,
    /// Both sides entered the same secret.
    Succeeded,
    /// The secrets differ.
    Failed,
    /// The peer aborted the exchange.
    Aborted,
    /// The peer's message was invalid or unexpected; we sent an abort.
    Invalid(SmpError),
}

/// The result of handling one received SMP TLV.
#[derive(Debug, Default)]
pub struct SmpStep {
    /// TLVs to send back (in one encrypted data message), possibly none.
    pub reply: Vec<Tlv>,
    /// What to tell the user, if anything.
    pub event: Option<SmpEvent>,
}

/// Which state the SMP machine is in (for status displays and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpPhase {
    /// `SMPSTATE_EXPECT1`: no exchange under way.
    Expect1,
    /// SMP message 1 received and verified; waiting for the user's secret.
    AwaitingSecret,
    /// `SMPSTATE_EXPECT2`: we started; waiting for SMP message 2.
    Expect2,
    /// `SMPSTATE_EXPECT3`: we answered; waiting for SMP message 3.
    Expect3,
    /// `SMPSTATE_EXPECT4`: we sent SMP message 3; waiting for message 4.
    Expect4,
}

/// Initiator after sending SMP message 1: x, a2, a3.
#[derive(Zeroize, ZeroizeOnDrop)]
#[cfg_attr(fuzzing, derive(Clone))]
struct Expect2 {
    x: U1536,
    a2: U1536,
    a3: U1536,
}

/// Responder after a verified SMP message 1, before the user answered.
#[derive(Zeroize, ZeroizeOnDrop)]
#[cfg_attr(fuzzing, derive(Clone))]
struct AwaitingSecret {
    question: Option<String>,
    g2a: Ge,
    g3a: Ge,
}

/// Responder after sending SMP message 2: g3a, g2, g3, b3, Pb, Qb.
#[derive(Zeroize, ZeroizeOnDrop)]
#[cfg_attr(fuzzing, derive(Clone))]
struct Expect3 {
    g3a: Ge,
    g2: Ge,
    g3: Ge,
    b3: U1536,
    pb: Ge,
    qb: Ge,
}

/// Initiator after sending SMP message 3: g3b, Pa/Pb, Qa/Qb, a3.
#[derive(Zeroize, ZeroizeOnDrop)]
#[cfg_attr(fuzzing, derive(Clone))]
struct Expect4 {
    g3b: Ge,
    pa_pb: Ge,
    qa_qb: Ge,
    a3: U1536,
}

#[cfg_attr(fuzzing, derive(Clone))]
enum State {
    Expect1,
    AwaitingSecret(Box<AwaitingSecret>),
    Expect2(Box<Expect2>),
    Expect3(Box<Expect3>),
    Expect4(Box<Expect4>),
}

/// The SMP state of one encrypted session.
///
/// Not `Clone`: each step consumes the state, so an old state's secrets
/// cannot be reached again. Fuzz builds (`cfg(fuzzing)`) may clone, to
/// start many inputs from one expensive mid-exchange state.
#[cfg_attr(fuzzing, derive(Clone))]
pub struct Smp {
    state: State,
}

impl Default for Smp {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Smp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smp").field("phase", &self.phase()).finish()
    }
}

impl Smp {
    /// A machine in `SMPSTATE_EXPECT1`.
    pub fn new() -> Self {
        Smp {
            state: State::Expect1,
        }
    }

    /// The current state.
    pub fn phase(&self) -> SmpPhase {
        match self.state {
            State::Expect1 => SmpPhase::Expect1,
            State::AwaitingSecret(_) => SmpPhase::AwaitingSecret,
            State::Expect2(_) => SmpPhase::Expect2,
            State::Expect3(_) => SmpPhase::Expect3,
            State::Expect4(_) => SmpPhase::Expect4,
        }
    }

    /// Whether the peer's request waits for our secret.
    pub fn is_awaiting_secret(&self) -> bool {
        matches!(self.state, State::AwaitingSecret(_))
    }

    /// The question of the request waiting for our secret, if it had one.
    pub fn pending_question(&self) -> Option<&str> {
        match &self.state {
            State::AwaitingSecret(s) => s.question.as_deref(),
            _ => None,
        }
    }

    /// Forget any exchange (secrets are zeroized), without telling the
    /// peer.
    pub fn reset(&mut self) {
        self.state = State::Expect1;
    }

    /// The user aborts: returns the SMP abort TLV to send; back to
    /// `SMPSTATE_EXPECT1`.
    pub fn abort(&mut self) -> Vec<Tlv> {
        self.reset();
        vec![abort_tlv()]
    }

    /// The user starts SMP with `secret` (and optionally a question for the
    /// peer): returns the TLVs to send (an abort first if an exchange was
    /// under way, then SMP message 1 or 1Q). Moves to `SMPSTATE_EXPECT2`.
    pub fn start<R: rand_core::CryptoRng + ?Sized>(
        &mut self,
        ctx: &SmpContext,
        secret: &[u8],
        question: Option<&str>,
        rng: &mut R,
    ) -> Vec<Tlv> {
        let mut out = Vec::new();
        if !matches!(self.state, State::Expect1) {
            self.reset();
            out.push(abort_tlv());
        }
        let x = combined_secret(
            &ctx.our_fingerprint,
            &ctx.their_fingerprint,
            &ctx.ssid,
            secret,
        );
        let a2 = random_exponent(rng);
        let a3 = random_exponent(rng);
        let (g2a, c2, d2) = dh_half_with_proof(1, &a2, rng);
        let (g3a, c3, d3) = dh_half_with_proof(2, &a3, rng);
        let value = encode(&[
            &ge_bytes(&g2a),
            &uint_bytes(&c2),
            &uint_bytes(&d2),
            &ge_bytes(&g3a),
            &uint_bytes(&c3),
            &uint_bytes(&d3),
        ]);
        out.push(match question {
            Some(q) => Tlv::new(types::SMP1Q, tlv::join_smp1q(q.as_bytes(), &value)),
            None => Tlv::new(types::SMP1, value),
        });
        self.state = State::Expect2(Box::new(Expect2 {
            x: *x,
            a2: *a2,
            a3: *a3,
        }));
        out
    }

    /// The user answers the peer's request with `secret`: returns SMP
    /// message 2 to send and moves to `SMPSTATE_EXPECT3`. Fails (changing
    /// nothing) if no request waits for an answer.
    pub fn answer<R: rand_core::CryptoRng + ?Sized>(
        &mut self,
        ctx: &SmpContext,
        secret: &[u8],
        rng: &mut R,
    ) -> Result<Vec<Tlv>, SmpError> {
        let State::AwaitingSecret(req) = std::mem::replace(&mut self.state, State::Expect1) else {
            // Not awaiting: put nothing back (the state was Expect1 or an
            // exchange we must not disturb).
            return Err(SmpError::NoRequest);
        };
        // The peer initiated: their fingerprint comes first.
        let y = combined_secret(
            &ctx.their_fingerprint,
            &ctx.our_fingerprint,
            &ctx.ssid,
            secret,
        );
        let b2 = random_exponent(rng);
        let b3 = random_exponent(rng);
        let (g2b, c2, d2) = dh_half_with_proof(3, &b2, rng);
        let (g3b, c3, d3) = dh_half_with_proof(4, &b3, rng);
        let g2 = Zeroizing::new(req.g2a.pow(&*b2));
        let g3 = Zeroizing::new(req.g3a.pow(&*b3));
        let r4 = random_exponent(rng);
        let r5 = random_exponent(rng);
        let r6 = random_exponent(rng);
        let pb = g3.pow(&*r4);
        let qb = g1().pow(&*r4).mul(&g2.pow_bounded_exp(&*y, SECRET_BITS));
        let cp = hash2(5, &g3.pow(&*r5), &g1().pow(&*r5).mul(&g2.pow(&*r6)));
        let d5 = proof_d(&r5, &r4, &cp);
        let d6 = proof_d(&r6, &y, &cp);
        let value = encode(&[
            &ge_bytes(&g2b),
            &uint_bytes(&c2),
            &uint_bytes(&d2),
            &ge_bytes(&g3b),
            &uint_bytes(&c3),
            &uint_bytes(&d3),
            &ge_bytes(&pb),
            &ge_bytes(&qb),
            &uint_bytes(&cp),
            &uint_bytes(&d5),
            &uint_bytes(&d6),
        ]);
        self.state = State::Expect3(Box::new(Expect3 {
            g3a: req.g3a,
            g2: *g2,
            g3: *g3,
            b3: *b3,
            pb,
            qb,
        }));
        Ok(vec![Tlv::new(types::SMP2, value)])
    }

    /// A TLV arrived in an authentic data message. Non-SMP TLVs are
    /// ignored. An SMP message the state does not expect, or one that
    /// fails a check, returns to `SMPSTATE_EXPECT1` and answers with an
    /// abort.
    pub fn handle_tlv<R: rand_core::CryptoRng + ?Sized>(
        &mut self,
        t: &Tlv,
        rng: &mut R,
    ) -> SmpStep {
        let state = std::mem::replace(&mut self.state, State::Expect1);
        let result = match (t.typ, state) {
            (types::SMP_ABORT, State::Expect1) => return SmpStep::default(),
            (types::SMP_ABORT, _) => {
                return SmpStep {
                    reply: Vec::new(),
                    event: Some(SmpEvent::Aborted),
                };
            }
            (types::SMP1 | types::SMP1Q, State::Expect1 | State::AwaitingSecret(_)) => {
                self.on_smp1(t)
            }
            (types::SMP2, State::Expect2(s)) => self.on_smp2(&s, t, rng),
            (types::SMP3, State::Expect3(s)) => self.on_smp3(&s, t, rng),
            (types::SMP4, State::Expect4(s)) => on_smp4(&s, t),
            (types::SMP1..=types::SMP1Q, _) => Err(SmpError::Unexpected(t.typ)),
            (_, state) => {
                // Not an SMP TLV: leave the state as it was.
                self.state = state;
                return SmpStep::default();
            }
        };
        match result {
            Ok(step) => step,
            Err(e) => {
                self.reset();
                SmpStep {
                    reply: vec![abort_tlv()],
                    event: Some(SmpEvent::Invalid(e)),
                }
            }
        }
    }

    /// SMP message 1 (or 1Q): verify Alice's proofs, then wait for the
    /// user's secret.
    fn on_smp1(&mut self, t: &Tlv) -> Result<SmpStep, SmpError> {
        let (question, value) = if t.typ == types::SMP1Q {
            let (q, v) = tlv::split_smp1q(&t.value)?;
            (Some(String::from_utf8_lossy(q).into_owned()), v)
        } else {
            (None, &t.value[..])
        };
        let m = parse(value, 6)?;
        let g2a = group(&m[0], "g2a")?;
        let c2 = challenge(&m[1], "c2")?;
        let d2 = exponent(&m[2], "D2")?;
        let g3a = group(&m[3], "g3a")?;
        let c3 = challenge(&m[4], "c3")?;
        let d3 = exponent(&m[5], "D3")?;
        check_knowledge(1, &g2a, &c2, &d2, "c2")?;
        check_knowledge(2, &g3a, &c3, &d3, "c3")?;
        self.state = State::AwaitingSecret(Box::new(AwaitingSecret {
            question: question.clone(),
            g2a,
            g3a,
        }));
        Ok(SmpStep {
            reply: Vec::new(),
            event: Some(SmpEvent::Requested { question }),
        })
    }

    /// SMP message 2: verify Bob's proofs, send SMP message 3.
    fn on_smp2<R: rand_core::CryptoRng + ?Sized>(
        &mut self,
        s: &Expect2,
        t: &Tlv,
        rng: &mut R,
    ) -> Result<SmpStep, SmpError> {
        let m = parse(&t.value, 11)?;
        let g2b = group(&m[0], "g2b")?;
        let c2 = challenge(&m[1], "c2")?;
        let d2 = exponent(&m[2], "D2")?;
        let g3b = group(&m[3], "g3b")?;
        let c3 = challenge(&m[4], "c3")?;
        let d3 = exponent(&m[5], "D3")?;
        let pb = group(&m[6], "Pb")?;
        let qb = group(&m[7], "Qb")?;
        let cp = challenge(&m[8], "cP")?;
        let d5 = exponent(&m[9], "D5")?;
        let d6 = exponent(&m[10], "D6")?;
        check_knowledge(3, &g2b, &c2, &d2, "c2")?;
        check_knowledge(4, &g3b, &c3, &d3, "c3")?;
        let g2 = Zeroizing::new(g2b.pow(&s.a2));
        let g3 = Zeroizing::new(g3b.pow(&s.a3));
        check_pq(5, &g2, &g3, &pb, &qb, &cp, &d5, &d6, "cP")?;

        let r4 = random_exponent(rng);
        let r5 = random_exponent(rng);
        let r6 = random_exponent(rng);
        let r7 = random_exponent(rng);
        let pa = g3.pow(&*r4);
        let qa = g1().pow(&*r4).mul(&g2.pow_bounded_exp(&s.x, SECRET_BITS));
        let cp = hash2(6, &g3.pow(&*r5), &g1().pow(&*r5).mul(&g2.pow(&*r6)));
        let d5 = proof_d(&r5, &r4, &cp);
        let d6 = proof_d(&r6, &s.x, &cp);
        let qa_qb = divide(&qa, &qb)?;
        let ra = qa_qb.pow(&s.a3);
        let cr = hash2(7, &g1().pow(&*r7), &qa_qb.pow(&*r7));
        let d7 = proof_d(&r7, &s.a3, &cr);
        let pa_pb = divide(&pa, &pb)?;
        let value = encode(&[
            &ge_bytes(&pa),
            &ge_bytes(&qa),
            &uint_bytes(&cp),
            &uint_bytes(&d5),
            &uint_bytes(&d6),
            &ge_bytes(&ra),
            &uint_bytes(&cr),
            &uint_bytes(&d7),
        ]);
        self.state = State::Expect4(Box::new(Expect4 {
            g3b,
            pa_pb,
            qa_qb,
            a3: s.a3,
        }));
        Ok(SmpStep {
            reply: vec![Tlv::new(types::SMP3, value)],
            event: Some(SmpEvent::InProgress),
        })
    }

    /// SMP message 3: verify Alice's proofs, send SMP message 4, decide.
    fn on_smp3<R: rand_core::CryptoRng + ?Sized>(
        &mut self,
        s: &Expect3,
        t: &Tlv,
        rng: &mut R,
    ) -> Result<SmpStep, SmpError> {
        let m = parse(&t.value, 8)?;
        let pa = group(&m[0], "Pa")?;
        let qa = group(&m[1], "Qa")?;
        let cp = challenge(&m[2], "cP")?;
        let d5 = exponent(&m[3], "D5")?;
        let d6 = exponent(&m[4], "D6")?;
        let ra = group(&m[5], "Ra")?;
        let cr = challenge(&m[6], "cR")?;
        let d7 = exponent(&m[7], "D7")?;
        check_pq(6, &s.g2, &s.g3, &pa, &qa, &cp, &d5, &d6, "cP")?;
        let qa_qb = divide(&qa, &s.qb)?;
        check_r(7, &s.g3a, &qa_qb, &ra, &cr, &d7, "cR")?;

        let r7 = random_exponent(rng);
        let rb = qa_qb.pow(&s.b3);
        let cr = hash2(8, &g1().pow(&*r7), &qa_qb.pow(&*r7));
        let d7 = proof_d(&r7, &s.b3, &cr);
        let rab = Zeroizing::new(ra.pow(&s.b3));
        let pa_pb = divide(&pa, &s.pb)?;
        let same = bool::from((*rab).ct_eq(&pa_pb));
        let value = encode(&[&ge_bytes(&rb), &uint_bytes(&cr), &uint_bytes(&d7)]);
        // Back to SMPSTATE_EXPECT1 (the state was already taken).
        Ok(SmpStep {
            reply: vec![Tlv::new(types::SMP4, value)],
            event: Some(if same {
                SmpEvent::Succeeded
            } else {
                SmpEvent::Failed
            }),
        })
    }
}

/// SMP message 4: verify Bob's proof and decide.
fn on_smp4(s: &Expect4, t: &Tlv) -> Result<SmpStep, SmpError> {
    let m = parse(&t.value, 3)?;
    let rb = group(&m[0], "Rb")?;
    let cr = challenge(&m[1], "cR")?;
    let d7 = exponent(&m[2], "D7")?;
    check_r(8, &s.g3b, &s.qa_qb, &rb, &cr, &d7, "cR")?;
    let rab = Zeroizing::new(rb.pow(&s.a3));
    let same = bool::from((*rab).ct_eq(&s.pa_pb));
    Ok(SmpStep {
        reply: Vec::new(),
        event: Some(if same {
            SmpEvent::Succeeded
        } else {
            SmpEvent::Failed
        }),
    })
}

fn abort_tlv() -> Tlv {
    Tlv::new(types::SMP_ABORT, Vec::new())
}

/// The secret of §"Secret information": SHA256(1 || initiator fingerprint
/// || responder fingerprint || ssid || user secret), as an integer.
fn combined_secret(
    initiator: &[u8; 20],
    responder: &[u8; 20],
    ssid: &[u8; 8],
    user: &[u8],
) -> Zeroizing<U1536> {
    let mut buf = Zeroizing::new(Vec::with_capacity(49 + user.len()));
    buf.push(SECRET_VERSION);
    buf.extend_from_slice(initiator);
    buf.extend_from_slice(responder);
    buf.extend_from_slice(ssid);
    buf.extend_from_slice(user);
    let digest = Zeroizing::new(sha256(&buf));
    digest_to_uint(&digest)
}

fn digest_to_uint(digest: &[u8; 32]) -> Zeroizing<U1536> {
    let mut wide = Zeroizing::new([0u8; 192]);
    wide[160..].copy_from_slice(digest);
    Zeroizing::new(U1536::from_be_slice(&*wide))
}

fn g1() -> Ge {
    Ge::new(&U1536::from_u8(2))
}

/// A uniformly random 1536-bit exponent (the spec's size).
fn random_exponent<R: rand_core::CryptoRng + ?Sized>(rng: &mut R) -> Zeroizing<U1536> {
    Zeroizing::new(U1536::random_from_rng(rng))
}

/// `r - x·c mod q`, constant-time.
fn proof_d(r: &U1536, x: &U1536, c: &U1536) -> Zeroizing<U1536> {
    let r = Zeroizing::new(Exp::new(r));
    let x = Zeroizing::new(Exp::new(x));
    let xc = Zeroizing::new(x.mul(&Exp::new(c)));
    let d = Zeroizing::new(r.sub(&xc));
    Zeroizing::new(d.retrieve())
}

/// `g1^e` with a proof of knowledge of `e` for hash version `v`:
/// returns `(g1^e, c, D)` with `c = SHA256(v, g1^r)` and `D = r - e·c`.
fn dh_half_with_proof<R: rand_core::CryptoRng + ?Sized>(
    v: u8,
    e: &U1536,
    rng: &mut R,
) -> (Ge, U1536, Zeroizing<U1536>) {
    let r = random_exponent(rng);
    let public = g1().pow(e);
    let c = hash1(v, &g1().pow(&*r));
    let d = proof_d(&r, e, &c);
    (public, c, d)
}

/// Checks `c = SHA256(v, g1^D · X^c)`.
fn check_knowledge(
    v: u8,
    x: &Ge,
    c: &U1536,
    d: &U1536,
    name: &'static str,
) -> Result<(), SmpError> {
    let t = g1().pow_vartime(d).mul(&x.pow_vartime(c));
    if hash1(v, &t) == *c {
        Ok(())
    } else {
        Err(SmpError::Proof(name))
    }
}

/// Checks `cP = SHA256(v, g3^D5 · P^cP, g1^D5 · g2^D6 · Q^cP)`.
#[allow(clippy::too_many_arguments)]
fn check_pq(
    v: u8,
    g2: &Ge,
    g3: &Ge,
    p: &Ge,
    q: &Ge,
    cp: &U1536,
    d5: &U1536,
    d6: &U1536,
    name: &'static str,
) -> Result<(), SmpError> {
    let t1 = g3.pow_vartime(d5).mul(&p.pow_vartime(cp));
    let t2 = g1()
        .pow_vartime(d5)
        .mul(&g2.pow_vartime(d6))
        .mul(&q.pow_vartime(cp));
    if hash2(v, &t1, &t2) == *cp {
        Ok(())
    } else {
        Err(SmpError::Proof(name))
    }
}

/// Checks `cR = SHA256(v, g1^D7 · g3x^cR, (Qa/Qb)^D7 · R^cR)`.
fn check_r(
    v: u8,
    g3x: &Ge,
    qa_qb: &Ge,
    r: &Ge,
    cr: &U1536,
    d7: &U1536,
    name: &'static str,
) -> Result<(), SmpError> {
    let t1 = g1().pow_vartime(d7).mul(&g3x.pow_vartime(cr));
    let t2 = qa_qb.pow_vartime(d7).mul(&r.pow_vartime(cr));
    if hash2(v, &t1, &t2) == *cr {
        Ok(())
    } else {
        Err(SmpError::Proof(name))
    }
}

/// `a / b` in the group.
fn divide(a: &Ge, b: &Ge) -> Result<Ge, SmpError> {
    let inv: Option<Ge> = b.invert().into();
    inv.map(|i| a.mul(&i))
        .ok_or(SmpError::GroupElement("divisor"))
}

/// The SMP hash: SHA256(version || MPI(a) [|| MPI(b)]), as an integer.
fn hash1(v: u8, a: &Ge) -> U1536 {
    hash(v, &[a])
}

fn hash2(v: u8, a: &Ge, b: &Ge) -> U1536 {
    hash(v, &[a, b])
}

fn hash(v: u8, values: &[&Ge]) -> U1536 {
    let mut buf = Vec::with_capacity(1 + values.len() * 196);
    buf.push(v);
    for x in values {
        let m = ge_bytes(x);
        // At most 192 bytes: the cast cannot truncate.
        buf.extend_from_slice(&(m.len() as u32).to_be_bytes());
        buf.extend_from_slice(&m);
    }
    *digest_to_uint(&sha256(&buf))
}

fn ge_bytes(x: &Ge) -> Zeroizing<Vec<u8>> {
    uint_to_minimal_be(&x.retrieve())
}

fn uint_bytes(x: &U1536) -> Zeroizing<Vec<u8>> {
    uint_to_minimal_be(x)
}

fn encode(mpis: &[&Zeroizing<Vec<u8>>]) -> Vec<u8> {
    let refs: Vec<&[u8]> = mpis.iter().map(|m| m.as_slice()).collect();
    tlv::encode_smp_mpis(&refs)
}

fn parse(value: &[u8], want: usize) -> Result<Vec<Vec<u8>>, SmpError> {
    let m = tlv::parse_smp_mpis(value)?;
    if m.len() != want {
        return Err(SmpError::MpiCount { got: m.len(), want });
    }
    Ok(m)
}

/// A received group element: `2 <= v <= p-2`.
fn group(bytes: &[u8], name: &'static str) -> Result<Ge, SmpError> {
    uint_from_be::<{ U1536::LIMBS }>(bytes)
        .filter(in_group_range)
        .map(|v| Ge::new(&v))
        .ok_or(SmpError::GroupElement(name))
}

/// A received proof exponent D: `1 <= D < q` (libotr's `check_expon`).
fn exponent(bytes: &[u8], name: &'static str) -> Result<U1536, SmpError> {
    uint_from_be::<{ U1536::LIMBS }>(bytes)
        .filter(|v| !bool::from(v.is_zero()) && v.cmp_vartime(&Q).is_lt())
        .ok_or(SmpError::Exponent(name))
}

/// A received challenge c: below q (it must then equal a SHA-256 digest).
fn challenge(bytes: &[u8], name: &'static str) -> Result<U1536, SmpError> {
    uint_from_be::<{ U1536::LIMBS }>(bytes)
        .filter(|v| v.cmp_vartime(&Q).is_lt())
        .ok_or(SmpError::Exponent(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const ALICE_FPR: [u8; 20] = [0xaa; 20];
    const BOB_FPR: [u8; 20] = [0xbb; 20];
    const SSID: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn ctx_alice() -> SmpContext {
        SmpContext {
            our_fingerprint: ALICE_FPR,
            their_fingerprint: BOB_FPR,
            ssid: SSID,
        }
    }

    fn ctx_bob() -> SmpContext {
        SmpContext {
            our_fingerprint: BOB_FPR,
            their_fingerprint: ALICE_FPR,
            ssid: SSID,
        }
    }

    fn one(tlvs: Vec<Tlv>) -> Tlv {
        assert_eq!(tlvs.len(), 1, "{tlvs:?}");
        tlvs.into_iter().next().unwrap()
    }

    /// Runs a full exchange; returns (Alice's event, Bob's event).
    fn run(
        secret_a: &str,
        secret_b: &str,
        question: Option<&str>,
        ca: SmpContext,
        cb: SmpContext,
        seed: u64,
    ) -> (Option<SmpEvent>, Option<SmpEvent>) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut a = Smp::new();
        let mut b = Smp::new();
        let m1 = one(a.start(&ca, secret_a.as_bytes(), question, &mut rng));
        assert_eq!(a.phase(), SmpPhase::Expect2);
        let s = b.handle_tlv(&m1, &mut rng);
        assert!(s.reply.is_empty());
        assert_eq!(
            s.event,
            Some(SmpEvent::Requested {
                question: question.map(str::to_owned)
            })
        );
        assert_eq!(b.pending_question(), question);
        let m2 = one(b.answer(&cb, secret_b.as_bytes(), &mut rng).unwrap());
        assert_eq!(b.phase(), SmpPhase::Expect3);
        let s = a.handle_tlv(&m2, &mut rng);
        assert_eq!(s.event, Some(SmpEvent::InProgress));
        assert_eq!(a.phase(), SmpPhase::Expect4);
        let m3 = one(s.reply);
        let s = b.handle_tlv(&m3, &mut rng);
        assert_eq!(b.phase(), SmpPhase::Expect1);
        let m4 = one(s.reply);
        let eb = s.event;
        let s = a.handle_tlv(&m4, &mut rng);
        assert!(s.reply.is_empty());
        assert_eq!(a.phase(), SmpPhase::Expect1);
        (s.event, eb)
    }

    #[test]
    fn same_secret_both_succeed() {
        let (a, b) = run("swordfish", "swordfish", None, ctx_alice(), ctx_bob(), 1);
        assert_eq!(a, Some(SmpEvent::Succeeded));
        assert_eq!(b, Some(SmpEvent::Succeeded));
    }

    #[test]
    fn different_secret_both_fail() {
        let (a, b) = run("swordfish", "Swordfish", None, ctx_alice(), ctx_bob(), 2);
        assert_eq!(a, Some(SmpEvent::Failed));
        assert_eq!(b, Some(SmpEvent::Failed));
    }

    #[test]
    fn question_is_delivered() {
        let (a, b) = run(
            "blue",
            "blue",
            Some("favourite colour?"),
            ctx_alice(),
            ctx_bob(),
            3,
        );
        assert_eq!(a, Some(SmpEvent::Succeeded));
        assert_eq!(b, Some(SmpEvent::Succeeded));
    }

    #[test]
    fn a_different_session_id_fails_even_with_the_same_secret() {
        let mut cb = ctx_bob();
        cb.ssid[0] ^= 1;
        let (a, b) = run("swordfish", "swordfish", None, ctx_alice(), cb, 4);
        assert_eq!(a, Some(SmpEvent::Failed));
        assert_eq!(b, Some(SmpEvent::Failed));
    }

    #[test]
    fn abort_mid_way_resets_both_sides() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (ca, cb) = (ctx_alice(), ctx_bob());
        let mut a = Smp::new();
        let mut b = Smp::new();
        let m1 = one(a.start(&ca, b"s", None, &mut rng));
        b.handle_tlv(&m1, &mut rng);
        let m2 = one(b.answer(&cb, b"s", &mut rng).unwrap());
        let m3 = one(a.handle_tlv(&m2, &mut rng).reply);
        // Bob's user aborts before reading message 3.
        let abort = one(b.abort());
        assert_eq!(abort.typ, types::SMP_ABORT);
        assert_eq!(b.phase(), SmpPhase::Expect1);
        let s = a.handle_tlv(&abort, &mut rng);
        assert_eq!(s.event, Some(SmpEvent::Aborted));
        assert!(s.reply.is_empty());
        assert_eq!(a.phase(), SmpPhase::Expect1);
        // A late message 3 is now unexpected: Bob answers with an abort.
        let s = b.handle_tlv(&m3, &mut rng);
        assert_eq!(
            s.event,
            Some(SmpEvent::Invalid(SmpError::Unexpected(types::SMP3)))
        );
        assert_eq!(one(s.reply).typ, types::SMP_ABORT);
        // An abort while idle is silent.
        let s = a.handle_tlv(&abort, &mut rng);
        assert!(s.event.is_none() && s.reply.is_empty());
        // And a new exchange works.
        let (ea, eb) = run("again", "again", None, ca, cb, 6);
        assert_eq!(
            (ea, eb),
            (Some(SmpEvent::Succeeded), Some(SmpEvent::Succeeded))
        );
    }

    #[test]
    fn restarting_sends_an_abort_first() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut a = Smp::new();
        a.start(&ctx_alice(), b"s", None, &mut rng);
        let out = a.start(&ctx_alice(), b"s", Some("q?"), &mut rng);
        assert_eq!(
            out.iter().map(|t| t.typ).collect::<Vec<_>>(),
            vec![types::SMP_ABORT, types::SMP1Q]
        );
        assert_eq!(a.phase(), SmpPhase::Expect2);
    }

    #[test]
    fn answer_without_request_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let mut b = Smp::new();
        assert_eq!(
            b.answer(&ctx_bob(), b"s", &mut rng).unwrap_err(),
            SmpError::NoRequest
        );
    }

    fn p_minus(k: u64) -> Vec<u8> {
        let p = U1536::from_be_hex(Q_HEX)
            .shl_vartime(1)
            .wrapping_add(&U1536::ONE);
        uint_to_minimal_be(&p.wrapping_sub(&U1536::from_u64(k))).to_vec()
    }

    /// Replace MPI `i` of an SMP value.
    fn tamper(t: &Tlv, i: usize, with: &[u8]) -> Tlv {
        let mut m = tlv::parse_smp_mpis(&t.value).unwrap();
        m[i] = with.to_vec();
        let refs: Vec<&[u8]> = m.iter().map(|v| v.as_slice()).collect();
        Tlv::new(t.typ, tlv::encode_smp_mpis(&refs))
    }

    #[test]
    fn rejects_group_elements_out_of_range() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut a = Smp::new();
        let m1 = one(a.start(&ctx_alice(), b"s", None, &mut rng));
        for (bad, name) in [
            (vec![], "g2a"),
            (vec![1], "g2a"),
            (p_minus(1), "g2a"),
            (p_minus(0), "g2a"),
            (vec![0xff; 193], "g2a"),
        ] {
            let mut b = Smp::new();
            let s = b.handle_tlv(&tamper(&m1, 0, &bad), &mut rng);
            assert_eq!(
                s.event,
                Some(SmpEvent::Invalid(SmpError::GroupElement(name)))
            );
            assert_eq!(one(s.reply).typ, types::SMP_ABORT);
            assert_eq!(b.phase(), SmpPhase::Expect1);
        }
        let mut b = Smp::new();
        let s = b.handle_tlv(&tamper(&m1, 3, &[1]), &mut rng);
        assert_eq!(
            s.event,
            Some(SmpEvent::Invalid(SmpError::GroupElement("g3a")))
        );

        // Message 2 with Pb = p - 1.
        let mut b = Smp::new();
        b.handle_tlv(&m1, &mut rng);
        let m2 = one(b.answer(&ctx_bob(), b"s", &mut rng).unwrap());
        let s = a.handle_tlv(&tamper(&m2, 6, &p_minus(1)), &mut rng);
        assert_eq!(
            s.event,
            Some(SmpEvent::Invalid(SmpError::GroupElement("Pb")))
        );
        assert_eq!(a.phase(), SmpPhase::Expect1);
    }

    #[test]
    fn rejects_bad_exponents_and_proofs() {
        let mut rng = ChaCha20Rng::seed_from_u64(10);
        let mut a = Smp::new();
        let m1 = one(a.start(&ctx_alice(), b"s", None, &mut rng));
        let q = uint_to_minimal_be(&Q).to_vec();
        let cases = [
            (2, vec![], SmpError::Exponent("D2")),
            (2, q.clone(), SmpError::Exponent("D2")),
            (1, q, SmpError::Exponent("c2")),
            (1, vec![7], SmpError::Proof("c2")),
            (5, vec![7], SmpError::Proof("c3")),
        ];
        for (i, bad, err) in cases {
            let mut b = Smp::new();
            let s = b.handle_tlv(&tamper(&m1, i, &bad), &mut rng);
            assert_eq!(s.event, Some(SmpEvent::Invalid(err)));
        }
        // Wrong MPI count.
        let mut b = Smp::new();
        let short = Tlv::new(types::SMP1, tlv::encode_smp_mpis(&[&[2u8][..]]));
        let s = b.handle_tlv(&short, &mut rng);
        assert_eq!(
            s.event,
            Some(SmpEvent::Invalid(SmpError::MpiCount { got: 1, want: 6 }))
        );
        // A swapped proof in message 2 (D5 <-> D6) fails cP.
        let mut b = Smp::new();
        b.handle_tlv(&m1, &mut rng);
        let m2 = one(b.answer(&ctx_bob(), b"s", &mut rng).unwrap());
        let m = tlv::parse_smp_mpis(&m2.value).unwrap();
        let swapped = tamper(&tamper(&m2, 9, &m[10]), 10, &m[9]);
        let s = a.handle_tlv(&swapped, &mut rng);
        assert_eq!(s.event, Some(SmpEvent::Invalid(SmpError::Proof("cP"))));
    }

    #[test]
    fn non_smp_tlvs_leave_the_state_alone() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mut a = Smp::new();
        a.start(&ctx_alice(), b"s", None, &mut rng);
        let s = a.handle_tlv(&Tlv::new(types::PADDING, vec![0; 4]), &mut rng);
        assert!(s.event.is_none() && s.reply.is_empty());
        assert_eq!(a.phase(), SmpPhase::Expect2);
    }

    #[test]
    fn exponent_arithmetic_is_mod_q() {
        // Exp::new reduces any 1536-bit integer mod q.
        let v = Q.wrapping_add(&U1536::from_u8(5));
        assert_eq!(Exp::new(&v).retrieve(), U1536::from_u8(5));
        // g1^q = 1: g1 has order q.
        assert_eq!(g1().pow(&Q).retrieve(), U1536::ONE);
        // D = r - x c satisfies g^D g^(x c) = g^r.
        let (r, x, c) = (U1536::from_u8(3), U1536::from_u8(10), U1536::from_u8(7));
        let d = proof_d(&r, &x, &c);
        let lhs = g1().pow(&*d).mul(&g1().pow(&x).pow(&c));
        assert_eq!(lhs.retrieve(), g1().pow(&r).retrieve());
    }
}
