//! Criterion benchmark of a full Socialist Millionaires' Protocol exchange
//! (`smp/full`): SMP messages 1–4 computed and verified by both sides, in
//! memory (no encryption or transport).

use criterion::{Criterion, criterion_group, criterion_main};
use o2tr_proxy::otr::smp::{Smp, SmpContext, SmpEvent};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::hint::black_box;

fn full(rng: &mut ChaCha20Rng, ca: &SmpContext, cb: &SmpContext) -> Option<SmpEvent> {
    let mut a = Smp::new();
    let mut b = Smp::new();
    let m1 = a.start(ca, b"secret", None, rng);
    let _ = b.handle_tlv(&m1[0], rng);
    let m2 = b.answer(cb, b"secret", rng).ok()?;
    let m3 = a.handle_tlv(&m2[0], rng).reply;
    let m4 = b.handle_tlv(&m3[0], rng).reply;
    a.handle_tlv(&m4[0], rng).event
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let ca = SmpContext {
        our_fingerprint: [1; 20],
        their_fingerprint: [2; 20],
        ssid: [3; 8],
    };
    let cb = SmpContext {
        our_fingerprint: [2; 20],
        their_fingerprint: [1; 20],
        ssid: [3; 8],
    };
    assert_eq!(full(&mut rng, &ca, &cb), Some(SmpEvent::Succeeded));
    let mut g = c.benchmark_group("smp");
    g.sample_size(10);
    g.bench_function("full", |bench| {
        bench.iter(|| black_box(full(&mut rng, &ca, &cb)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
