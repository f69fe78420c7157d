//! SMP (spec §"Socialist Millionaires' Protocol"): a live exchange whose
//! message 1, 2, 3 or 4 is damaged by the peer that sends it (a malicious
//! peer holds the session keys, so the TLV is authentic): group elements
//! 0/1/p-1/p/>p, exponents 0 or >= q, bad proofs, wrong MPI counts, bad
//! TLV values, messages out of order. The receiver aborts SMP and tells
//! its user; nothing is verified; the session goes on; a new SMP works.

use o2tr_proxy::otr::codec::CodecError;
use o2tr_proxy::otr::conversation::Notice;
use o2tr_proxy::otr::message::FLAG_IGNORE_UNREADABLE;
use o2tr_proxy::otr::smp::SmpError as S;
use o2tr_proxy::otr::tlv::{self, Tlv, TlvError, types};

use crate::pair::{ALICE_TAG, BOB_TAG, Pair};
use crate::support::*;

const SECRET: &str = "the colour of the kitchen door";

enum Damage {
    /// Edit the MPI list of the SMP TLV.
    Mpis(fn(&mut Vec<Vec<u8>>)),
    /// Edit the raw TLV value.
    Value(fn(&mut Vec<u8>)),
    /// Replace the whole TLV.
    Whole(fn() -> Tlv),
    /// Send it as another SMP message type.
    Type(u16),
}

struct Case {
    name: &'static str,
    /// Which SMP message (1..=4) is damaged.
    stage: usize,
    question: bool,
    damage: Damage,
    want: S,
}

fn flip(v: &mut [u8]) {
    if let Some(b) = v.last_mut() {
        *b ^= 1;
    }
}

fn cases() -> Vec<Case> {
    use Damage::*;
    let ge = S::GroupElement;
    let ex = S::Exponent;
    vec![
        // SMP message 1: g2a, c2, D2, g3a, c3, D3.
        Case {
            name: "smp1: g2a = 0",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[0] = vec![]),
            want: ge("g2a"),
        },
        Case {
            name: "smp1: g2a = 1",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[0] = vec![1]),
            want: ge("g2a"),
        },
        Case {
            name: "smp1: g2a = p-1",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[0] = p_plus(-1)),
            want: ge("g2a"),
        },
        Case {
            name: "smp1: g2a = p",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[0] = p()),
            want: ge("g2a"),
        },
        Case {
            name: "smp1: g3a = p+1",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[3] = p_plus(1)),
            want: ge("g3a"),
        },
        Case {
            name: "smp1: g3a of 300 bytes",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[3] = vec![0x33; 300]),
            want: ge("g3a"),
        },
        Case {
            name: "smp1: D2 = q",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[2] = q()),
            want: ex("D2"),
        },
        Case {
            name: "smp1: D2 = 0",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[2] = vec![]),
            want: ex("D2"),
        },
        Case {
            name: "smp1: D3 = p",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[5] = p()),
            want: ex("D3"),
        },
        Case {
            name: "smp1: c2 = q",
            stage: 1,
            question: false,
            damage: Mpis(|m| m[1] = q()),
            want: ex("c2"),
        },
        Case {
            name: "smp1: c2 altered (proof fails)",
            stage: 1,
            question: false,
            damage: Mpis(|m| flip(&mut m[1])),
            want: S::Proof("c2"),
        },
        Case {
            name: "smp1: D3 altered (proof fails)",
            stage: 1,
            question: false,
            damage: Mpis(|m| flip(&mut m[5])),
            want: S::Proof("c3"),
        },
        Case {
            name: "smp1: 5 MPIs",
            stage: 1,
            question: false,
            damage: Mpis(|m| {
                m.pop();
            }),
            want: S::MpiCount { got: 5, want: 6 },
        },
        Case {
            name: "smp1: 7 MPIs",
            stage: 1,
            question: false,
            damage: Mpis(|m| m.push(vec![5])),
            want: S::MpiCount { got: 7, want: 6 },
        },
        Case {
            name: "smp1: MPI count 0xffffffff",
            stage: 1,
            question: false,
            damage: Value(|v| v[..4].copy_from_slice(&[0xff; 4])),
            want: S::Tlv(TlvError::TooManyMpis(u32::MAX)),
        },
        Case {
            name: "smp1: value truncated",
            stage: 1,
            question: false,
            damage: Value(|v| {
                v.truncate(v.len() - 10);
            }),
            want: S::Tlv(TlvError::Codec(CodecError::Truncated {
                what: "SMP MPI",
                needed: 10,
            })),
        },
        Case {
            name: "smp1: trailing bytes",
            stage: 1,
            question: false,
            damage: Value(|v| v.extend_from_slice(&[0, 0])),
            want: S::Tlv(TlvError::Codec(CodecError::TrailingBytes(2))),
        },
        Case {
            name: "smp1: empty value",
            stage: 1,
            question: false,
            damage: Value(|v| v.clear()),
            want: S::Tlv(TlvError::Codec(CodecError::Truncated {
                what: "SMP MPI count",
                needed: 4,
            })),
        },
        Case {
            name: "smp1q: question without its NUL",
            stage: 1,
            question: true,
            damage: Whole(|| Tlv::new(types::SMP1Q, b"where did we meet?".to_vec())),
            want: S::Tlv(TlvError::MissingQuestion),
        },
        Case {
            name: "smp1q: g2a = 1 after a question",
            stage: 1,
            question: true,
            damage: Mpis(|m| m[0] = vec![1]),
            want: ge("g2a"),
        },
        // SMP message 2: g2b, c2, D2, g3b, c3, D3, Pb, Qb, cP, D5, D6.
        Case {
            name: "smp2: g2b = 1",
            stage: 2,
            question: false,
            damage: Mpis(|m| m[0] = vec![1]),
            want: ge("g2b"),
        },
        Case {
            name: "smp2: Pb = p-1",
            stage: 2,
            question: false,
            damage: Mpis(|m| m[6] = p_plus(-1)),
            want: ge("Pb"),
        },
        Case {
            name: "smp2: Qb = 0",
            stage: 2,
            question: false,
            damage: Mpis(|m| m[7] = vec![]),
            want: ge("Qb"),
        },
        Case {
            name: "smp2: D5 = q",
            stage: 2,
            question: false,
            damage: Mpis(|m| m[9] = q()),
            want: ex("D5"),
        },
        Case {
            name: "smp2: cP altered (proof fails)",
            stage: 2,
            question: false,
            damage: Mpis(|m| flip(&mut m[8])),
            want: S::Proof("cP"),
        },
        Case {
            name: "smp2: 10 MPIs",
            stage: 2,
            question: false,
            damage: Mpis(|m| {
                m.pop();
            }),
            want: S::MpiCount { got: 10, want: 11 },
        },
        // SMP message 3: Pa, Qa, cP, D5, D6, Ra, cR, D7.
        Case {
            name: "smp3: Pa = p",
            stage: 3,
            question: false,
            damage: Mpis(|m| m[0] = p()),
            want: ge("Pa"),
        },
        Case {
            name: "smp3: Ra = 1",
            stage: 3,
            question: false,
            damage: Mpis(|m| m[5] = vec![1]),
            want: ge("Ra"),
        },
        Case {
            name: "smp3: D7 = 0",
            stage: 3,
            question: false,
            damage: Mpis(|m| m[7] = vec![]),
            want: ex("D7"),
        },
        Case {
            name: "smp3: cR altered (proof fails)",
            stage: 3,
            question: false,
            damage: Mpis(|m| flip(&mut m[6])),
            want: S::Proof("cR"),
        },
        // SMP message 4: Rb, cR, D7.
        Case {
            name: "smp4: Rb = p-1",
            stage: 4,
            question: false,
            damage: Mpis(|m| m[0] = p_plus(-1)),
            want: ge("Rb"),
        },
        Case {
            name: "smp4: D7 = q",
            stage: 4,
            question: false,
            damage: Mpis(|m| m[2] = q()),
            want: ex("D7"),
        },
        Case {
            name: "smp4: 2 MPIs",
            stage: 4,
            question: false,
            damage: Mpis(|m| {
                m.pop();
            }),
            want: S::MpiCount { got: 2, want: 3 },
        },
        // Out of order.
        Case {
            name: "smp order: message 2 when expecting 1",
            stage: 1,
            question: false,
            damage: Type(types::SMP2),
            want: S::Unexpected(types::SMP2),
        },
        Case {
            name: "smp order: message 3 when expecting 1",
            stage: 1,
            question: false,
            damage: Type(types::SMP3),
            want: S::Unexpected(types::SMP3),
        },
        Case {
            name: "smp order: message 4 when expecting 1",
            stage: 1,
            question: false,
            damage: Type(types::SMP4),
            want: S::Unexpected(types::SMP4),
        },
        Case {
            name: "smp order: message 1 when expecting 2",
            stage: 2,
            question: false,
            damage: Type(types::SMP1),
            want: S::Unexpected(types::SMP1),
        },
        Case {
            name: "smp order: message 3 when expecting 2",
            stage: 2,
            question: false,
            damage: Type(types::SMP3),
            want: S::Unexpected(types::SMP3),
        },
        Case {
            name: "smp order: message 4 when expecting 3",
            stage: 3,
            question: false,
            damage: Type(types::SMP4),
            want: S::Unexpected(types::SMP4),
        },
    ]
}

/// The SMP TLV of a data message `to` would receive from `from_tag`.
fn smp_tlv(to: &crate::pair::Side, from_tag: u32, m: &str) -> Tlv {
    peek_tlvs(to, from_tag, m)
        .into_iter()
        .find(|t| (types::SMP1..=types::SMP1Q).contains(&t.typ) && t.typ != types::SMP_ABORT)
        .expect("an SMP TLV")
}

fn damaged(t: Tlv, d: &Damage) -> Tlv {
    match d {
        Damage::Mpis(f) => {
            let (question, value) = if t.typ == types::SMP1Q {
                let (q, v) = tlv::split_smp1q(&t.value).expect("1Q");
                (Some(q.to_vec()), v.to_vec())
            } else {
                (None, t.value.clone())
            };
            let mut m = tlv::parse_smp_mpis(&value).expect("MPIs");
            f(&mut m);
            let refs: Vec<&[u8]> = m.iter().map(|x| x.as_slice()).collect();
            let v = tlv::encode_smp_mpis(&refs);
            let v = match question {
                Some(q) => tlv::join_smp1q(&q, &v),
                None => v,
            };
            Tlv::new(t.typ, v)
        }
        Damage::Value(f) => {
            let mut v = t.value;
            f(&mut v);
            Tlv::new(t.typ, v)
        }
        Damage::Whole(f) => f(),
        Damage::Type(typ) => Tlv::new(*typ, t.value),
    }
}

/// Runs SMP from Alice up to message `stage`, which its sender damages.
fn run_to(p: &mut Pair, c: &Case) -> Result<(), String> {
    let now = p.now;
    let q = c.question.then_some("where did we meet?");
    let a = p
        .alice
        .conv
        .handle_smp_start(SECRET, q, now, &mut p.alice.rng);
    p.alice.apply(a);
    for stage in 1..=4 {
        let alice_sends = stage % 2 == 1;
        if stage == 2 {
            let a = p.bob.conv.handle_smp_answer(SECRET, now, &mut p.bob.rng);
            p.bob.apply(a);
        }
        let (sender, receiver, from_tag) = if alice_sends {
            (&mut p.alice, &mut p.bob, ALICE_TAG)
        } else {
            (&mut p.bob, &mut p.alice, BOB_TAG)
        };
        if sender.outbox.len() != 1 {
            return Err(format!("stage {stage}: {} messages", sender.outbox.len()));
        }
        let m = sender.outbox.pop_front().unwrap_or_default();
        if stage == c.stage {
            let t = damaged(smp_tlv(receiver, from_tag, &m), &c.damage);
            let body = tlv::join_plaintext(b"", &[t]);
            let forged = forge(sender, alice_sends, FLAG_IGNORE_UNREADABLE, &body);
            receiver.notices.clear();
            receiver.receive(&forged, now);
            return Ok(());
        }
        receiver.receive(&m, now);
    }
    Err("stage not reached".into())
}

#[test]
fn smp_messages() {
    let cases = cases();
    run_table(
        "SMP",
        &cases,
        |c| c.name,
        |i, c| {
            let mut p = private_pair(1100 + i as u64);
            run_to(&mut p, c)?;
            let victim = if c.stage % 2 == 1 { &p.bob } else { &p.alice };
            check(victim, &Want::Smp(c.want.clone()))?;
            if victim.conv.smp_in_progress() {
                return Err("SMP still in progress after the error".into());
            }
            // The victim answered with an abort; let it through.
            p.run();
            // (At message 4 the sender has already verified the victim, from
            // the genuine message 3; the victim must not verify anyone.)
            let victim = if c.stage % 2 == 1 { &p.bob } else { &p.alice };
            if victim
                .notices
                .iter()
                .any(|n| matches!(n, Notice::SmpSucceeded { .. }))
            {
                return Err("the victim verified its peer".into());
            }
            still_private(&mut p, c.name)?;
            // A new, honest SMP succeeds on both sides.
            clear(&mut p);
            let now = p.now;
            let a = p
                .alice
                .conv
                .handle_smp_start(SECRET, None, now, &mut p.alice.rng);
            p.alice.apply(a);
            p.run();
            let a = p.bob.conv.handle_smp_answer(SECRET, now, &mut p.bob.rng);
            p.bob.apply(a);
            p.run();
            for s in [&p.alice, &p.bob] {
                if !s
                    .notices
                    .iter()
                    .any(|n| matches!(n, Notice::SmpSucceeded { .. }))
                {
                    return Err(format!(
                        "the SMP afterwards did not succeed: {:?}",
                        s.notices
                    ));
                }
            }
            Ok(())
        },
    );
}
