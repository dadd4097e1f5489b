//! Compares the AES-256-GCM implementations we could build on, on this CPU, for the
//! chunk sizes pipellm uses. The winner is the one the core links (see bench/RESULTS.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

const SIZES: [usize; 3] = [64 << 10, 1 << 20, 16 << 20];

/// aws-lc-rs and ring share one API (ring's), so one body serves both.
macro_rules! ring_api_bench {
    ($fn_name:ident, $krate:ident, $label:literal) => {
        fn $fn_name(c: &mut Criterion) {
            use $krate::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
            let mut g = c.benchmark_group(concat!("seal/", $label));
            for &n in &SIZES {
                let mut buf = vec![1u8; n];
                g.throughput(Throughput::Bytes(n as u64));
                g.bench_function(BenchmarkId::from_parameter(n), |b| {
                    b.iter(|| {
                        let tag = key
                            .seal_in_place_separate_tag(
                                Nonce::assume_unique_for_key([0u8; 12]),
                                Aad::from([0u8; 8]),
                                &mut buf,
                            )
                            .unwrap();
                        let _ = black_box(tag);
                    })
                });
            }
            g.finish();
        }
    };
}

ring_api_bench!(aws_lc_rs, aws_lc_rs, "aws-lc-rs");
ring_api_bench!(ring_crate, ring, "ring");

fn rustcrypto(c: &mut Criterion) {
    use aes_gcm::aead::{AeadInOut, KeyInit};
    use aes_gcm::{Aes256Gcm, Nonce};
    let key = Aes256Gcm::new(&[7u8; 32].into());
    let mut g = c.benchmark_group("seal/rustcrypto-aes-gcm");
    for &n in &SIZES {
        let mut buf = vec![1u8; n];
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let tag = key
                    .encrypt_inout_detached(
                        &Nonce::from([0u8; 12]),
                        &[0u8; 8],
                        buf.as_mut_slice().into(),
                    )
                    .unwrap();
                let _ = black_box(tag);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = aws_lc_rs, ring_crate, rustcrypto
}
criterion_main!(benches);
