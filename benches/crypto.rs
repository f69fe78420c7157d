//! Criterion benchmarks of the OTR crypto primitives: the costs that
//! dominate an AKE (DH key generation and shared secret, DSA sign and
//! verify) plus the symmetric per-message work.

use criterion::{Criterion, criterion_group, criterion_main};
use o2tr_proxy::otr::crypto::{DhKeyPair, DsaPrivateKey, aes128_ctr, h1, hmac_sha1};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let a = DhKeyPair::generate(&mut rng);
    let b = DhKeyPair::generate(&mut rng);

    c.bench_function("modexp/dh_shared", |bench| {
        bench.iter(|| black_box(a.shared_secret(black_box(b.public()))))
    });
    c.bench_function("dh/keygen", |bench| {
        bench.iter(|| black_box(DhKeyPair::generate(&mut rng)))
    });
    let s = a.shared_secret(b.public());
    c.bench_function("dh/h1", |bench| {
        bench.iter(|| black_box(h1(1, black_box(&s))))
    });

    let key = DsaPrivateKey::generate(&mut rng);
    let value = [0xa5u8; 32];
    c.bench_function("dsa/sign", |bench| {
        bench.iter(|| black_box(key.sign(black_box(&value), &mut rng)))
    });
    let sig = key.sign(&value, &mut rng);
    let pk = key.public_key().clone();
    c.bench_function("dsa/verify", |bench| {
        bench.iter(|| black_box(pk.verify(black_box(&value), black_box(&sig))))
    });

    let mut buf = vec![0u8; 1024];
    c.bench_function("sym/aes128_ctr_1k", |bench| {
        bench.iter(|| aes128_ctr(&[1; 16], &[2; 8], black_box(&mut buf)))
    });
    c.bench_function("sym/hmac_sha1_1k", |bench| {
        bench.iter(|| black_box(hmac_sha1(&[3; 20], black_box(&buf))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
