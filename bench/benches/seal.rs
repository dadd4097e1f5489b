//! Seal and open throughput of pipellm's own channel API (one core), for the chunk sizes that
//! matter: 64 KiB (a KV block), 1 MiB (the driver's chunk) and 16 MiB. `bench/channel_bench.py` runs this beside
//! `openssl speed` and the Python API, and prints them together.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pipellm_core::{Direction, KeyPolicy, Receiver, Sender, SessionKey};
use std::hint::black_box;

const SIZES: [usize; 3] = [64 << 10, 1 << 20, 16 << 20];

fn key() -> SessionKey {
    SessionKey::from_bytes(&[7u8; 32]).unwrap()
}

fn seal(c: &mut Criterion) {
    let tx = Sender::new(&key(), 0, Direction::HostToDevice, KeyPolicy::default()).unwrap();
    let mut g = c.benchmark_group("pipellm/seal_into");
    for &n in &SIZES {
        let src = vec![1u8; n];
        let mut dst = vec![0u8; n];
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let r = tx.reserve_for(n).unwrap();
                black_box(r.seal_into(&src, &mut dst).unwrap());
            })
        });
    }
    g.finish();
}

fn open(c: &mut Criterion) {
    let n = 1 << 20;
    let mut g = c.benchmark_group("pipellm/open");
    g.throughput(Throughput::Bytes(n as u64));
    for (name, verify_first) in [("open_into_private", false), ("open_into", true)] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let k = key();
                    let tx =
                        Sender::new(&k, 0, Direction::HostToDevice, KeyPolicy::default()).unwrap();
                    let rx = Receiver::new(&k, 0, Direction::HostToDevice, KeyPolicy::default())
                        .unwrap();
                    (rx, tx.seal(&vec![3u8; n]).unwrap(), vec![0u8; n])
                },
                |(mut rx, m, mut dst)| {
                    if verify_first {
                        rx.open_into(m.header(), m.tag(), m.ciphertext(), &mut dst)
                            .unwrap();
                    } else {
                        rx.open_into_private(m.header(), m.tag(), m.ciphertext(), &mut dst)
                            .unwrap();
                    }
                    black_box(dst);
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(500));
    targets = seal, open
}
criterion_main!(benches);
