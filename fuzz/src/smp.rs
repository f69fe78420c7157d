//! Body of the `smp` target: an SMP machine in each of its states receives
//! arbitrary SMP TLVs — random, the real messages of an exchange with
//! byte edits, or the real messages with one MPI replaced by an edge value
//! (0, 1, p-1, p, q, huge).

use std::sync::OnceLock;

use o2tr_proxy::otr::smp::{Smp, SmpContext, SmpEvent, SmpPhase};
use o2tr_proxy::otr::tlv::{Tlv, encode_smp_mpis, parse_smp_mpis, split_smp1q, types};

use super::fixture::{Input, edit, rng};

/// The 1536-bit modulus p of the OTR group (RFC 3526 group 5).
const P_HEX: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA237327FFFFFFFFFFFFFFFF";

fn p() -> Vec<u8> {
    (0..P_HEX.len() / 2)
        .map(|i| u8::from_str_radix(&P_HEX[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect()
}

/// Values a careless range check lets through.
fn edge_value(which: u8) -> Vec<u8> {
    let p = p();
    let minus = |k: u8| {
        let mut v = p.clone();
        if let Some(last) = v.last_mut() {
            *last = last.wrapping_sub(k);
        }
        v
    };
    match which % 10 {
        0 => Vec::new(),
        1 => vec![1],
        2 => vec![2],
        3 => minus(1),
        4 => minus(2),
        5 => p.clone(),
        6 => minus(0).into_iter().chain([0]).collect(), // p * 256
        7 => {
            // q = (p - 1) / 2
            let mut q = Vec::with_capacity(p.len());
            let mut carry = 0u16;
            for b in minus(1) {
                let cur = (carry << 8) | u16::from(b);
                q.push((cur / 2) as u8);
                carry = cur % 2;
            }
            q
        }
        8 => vec![0xff; 193],
        _ => vec![0; 1],
    }
}

/// The real SMP exchange and the machine in each state, built once.
struct Exchange {
    /// SMP message 1Q, 2, 3, 4 as sent.
    msgs: [Tlv; 4],
    /// Fresh machines in Expect1, AwaitingSecret, Expect2, Expect3, Expect4.
    #[cfg(fuzzing)]
    states: Vec<Smp>,
}

const ALICE_CTX: SmpContext = SmpContext {
    our_fingerprint: [0xaa; 20],
    their_fingerprint: [0xbb; 20],
    ssid: [7; 8],
};
const BOB_CTX: SmpContext = SmpContext {
    our_fingerprint: [0xbb; 20],
    their_fingerprint: [0xaa; 20],
    ssid: [7; 8],
};

/// Runs the real exchange (seeded) up to state `stop` (0..5) and returns
/// the machine in that state; `stop == 5` runs it to the end and returns
/// the four messages instead.
fn replay(stop: usize) -> (Option<Smp>, Option<[Tlv; 4]>) {
    let mut r = rng(0x5a9);
    let mut alice = Smp::new();
    let mut bob = Smp::new();
    if stop == 0 {
        return (Some(alice), None);
    }
    let m1 = alice
        .start(&ALICE_CTX, b"secret", Some("who?"), &mut r)
        .pop()
        .expect("SMP 1Q");
    if stop == 2 {
        return (Some(alice), None);
    }
    let step = bob.handle_tlv(&m1, &mut r);
    assert!(matches!(step.event, Some(SmpEvent::Requested { .. })));
    if stop == 1 {
        return (Some(bob), None);
    }
    let m2 = bob
        .answer(&BOB_CTX, b"secret", &mut r)
        .expect("answer")
        .pop()
        .expect("SMP 2");
    if stop == 3 {
        return (Some(bob), None);
    }
    let m3 = alice.handle_tlv(&m2, &mut r).reply.pop().expect("SMP 3");
    if stop == 4 {
        return (Some(alice), None);
    }
    let step = bob.handle_tlv(&m3, &mut r);
    assert_eq!(step.event, Some(SmpEvent::Succeeded));
    let m4 = step.reply.into_iter().next().expect("SMP 4");
    let step = alice.handle_tlv(&m4, &mut r);
    assert_eq!(step.event, Some(SmpEvent::Succeeded));
    (None, Some([m1, m2, m3, m4]))
}

fn exchange() -> &'static Exchange {
    static EX: OnceLock<Exchange> = OnceLock::new();
    EX.get_or_init(|| Exchange {
        msgs: replay(5).1.expect("full exchange"),
        #[cfg(fuzzing)]
        states: (0..5).filter_map(|i| replay(i).0).collect(),
    })
}

/// A machine in state `i` (0..5). Fuzz builds clone a cached one; the
/// stable smoke test replays the exchange.
fn machine(i: usize) -> Smp {
    #[cfg(fuzzing)]
    {
        exchange().states[i].clone()
    }
    #[cfg(not(fuzzing))]
    {
        replay(i).0.expect("state reached")
    }
}

const PHASES: [SmpPhase; 5] = [
    SmpPhase::Expect1,
    SmpPhase::AwaitingSecret,
    SmpPhase::Expect2,
    SmpPhase::Expect3,
    SmpPhase::Expect4,
];

/// The next TLV to deliver, read from `input`.
fn next_tlv(input: &mut Input<'_>, msgs: &[Tlv; 4]) -> Tlv {
    match input.byte() % 4 {
        // Random type (mostly SMP types) and value.
        0 => {
            let typ = u16::from(input.byte() % 12);
            Tlv::new(typ, input.chunk().to_vec())
        }
        // A real message with byte edits.
        1 => {
            let m = &msgs[usize::from(input.byte() % 4)];
            let mut v = m.value.clone();
            let n = usize::from(input.byte() % 4) + 1;
            edit(&mut v, input, n);
            Tlv::new(m.typ, v)
        }
        // A real message with one MPI replaced by an edge value, or by bytes.
        2 => {
            let m = &msgs[usize::from(input.byte() % 4)];
            let (question, value) = match m.typ {
                types::SMP1Q => match split_smp1q(&m.value) {
                    Ok((q, v)) => (Some(q.to_vec()), v.to_vec()),
                    Err(_) => (None, m.value.clone()),
                },
                _ => (None, m.value.clone()),
            };
            let mut mpis = parse_smp_mpis(&value).expect("real SMP message parses");
            let k = usize::from(input.byte()) % mpis.len().max(1);
            let choice = input.byte();
            let new = if choice < 200 {
                edge_value(choice)
            } else {
                input.chunk().to_vec()
            };
            if let Some(slot) = mpis.get_mut(k) {
                *slot = new;
            }
            let refs: Vec<&[u8]> = mpis.iter().map(Vec::as_slice).collect();
            let mut v = encode_smp_mpis(&refs);
            if let Some(q) = question {
                let mut qv = q;
                qv.push(0);
                qv.extend(v);
                v = qv;
            }
            Tlv::new(m.typ, v)
        }
        // A real message unchanged (maybe in the wrong state).
        _ => msgs[usize::from(input.byte() % 4)].clone(),
    }
}

/// First byte: the state; then up to 4 TLVs. An invalid or unexpected SMP
/// message must reset to Expect1 and answer with exactly one abort; a
/// non-SMP TLV changes nothing; a success needs a real message.
pub fn smp(data: &[u8]) {
    let ex = exchange();
    let mut input = Input::new(data);
    let i = usize::from(input.byte()) % 5;
    let mut m = machine(i);
    assert_eq!(m.phase(), PHASES[i]);
    let mut r = rng(u64::from(input.byte()));
    for _ in 0..4 {
        if input.is_empty() {
            break;
        }
        let t = next_tlv(&mut input, &ex.msgs);
        let before = m.phase();
        let step = m.handle_tlv(&t, &mut r);
        let smp_type = (types::SMP1..=types::SMP1Q).contains(&t.typ);
        if !smp_type {
            assert!(step.reply.is_empty() && step.event.is_none());
            assert_eq!(m.phase(), before);
            continue;
        }
        match &step.event {
            Some(SmpEvent::Invalid(_)) => {
                assert_eq!(m.phase(), SmpPhase::Expect1);
                assert_eq!(step.reply.len(), 1);
                assert_eq!(step.reply[0].typ, types::SMP_ABORT);
            }
            Some(SmpEvent::Aborted) | None => {
                assert_eq!(m.phase(), SmpPhase::Expect1);
                assert!(step.reply.is_empty());
            }
            Some(SmpEvent::Requested { .. }) => {
                assert_eq!(m.phase(), SmpPhase::AwaitingSecret);
                assert!(step.reply.is_empty());
            }
            Some(SmpEvent::InProgress) => {
                assert_eq!(before, SmpPhase::Expect2);
                assert_eq!(m.phase(), SmpPhase::Expect4);
                assert_eq!(step.reply.len(), 1);
                assert_eq!(step.reply[0].typ, types::SMP3);
            }
            Some(SmpEvent::Succeeded | SmpEvent::Failed) => {
                assert!(matches!(before, SmpPhase::Expect3 | SmpPhase::Expect4));
                assert_eq!(m.phase(), SmpPhase::Expect1);
            }
        }
        if step.event == Some(SmpEvent::Succeeded) {
            // Proofs bind every value: only the real message succeeds.
            assert!(ex.msgs.iter().any(|real| real.value == t.value));
        }
    }
    if m.is_awaiting_secret() {
        let reply = m.answer(&BOB_CTX, b"secret", &mut r).expect("awaiting");
        assert_eq!(reply.len(), 1);
        assert_eq!(m.phase(), SmpPhase::Expect3);
    }
}
