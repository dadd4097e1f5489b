//! Properties of the speculative pipeline: whatever is predicted and whatever is requested,
//! the receiver gets exactly the bytes each source held at request time, in order, and every
//! reserved position is delivered exactly once (as data or NOP).

use pipellm_core::pipeline::{Outgoing, Pipeline, PipelineConfig, Source, SourceBytes, Validation};
use pipellm_core::*;
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A source whose bytes the test can change in place (same address, new contents).
struct Mutable(Mutex<()>, std::cell::UnsafeCell<Vec<u8>>);
// SAFETY: tests only write through `set` while no transfer of this source is in flight.
unsafe impl Sync for Mutable {}
// SAFETY: as above; the Vec itself is Send.
unsafe impl Send for Mutable {}
impl Mutable {
    fn new(v: Vec<u8>) -> Arc<Self> {
        Arc::new(Self(Mutex::new(()), std::cell::UnsafeCell::new(v)))
    }
    fn set(&self, pos: usize, b: u8) {
        let _g = self.0.lock().unwrap();
        // SAFETY: see the Sync impl.
        unsafe { (&mut *self.1.get())[pos] = b };
    }
}
impl SourceBytes for Mutable {
    fn bytes(&self) -> &[u8] {
        // SAFETY: see the Sync impl.
        unsafe { &*self.1.get() }
    }
}

const KEY: [u8; 32] = [0x42; 32];

/// How long a test waits for the workers to go idle before it fails (never reached unless
/// something hangs: `wait_idle` returns as soon as they are).
const IDLE: Duration = Duration::from_secs(60);

fn cfg(slots: usize, chunk: usize, workers: usize) -> PipelineConfig {
    PipelineConfig {
        slots,
        chunk_bytes: chunk,
        workers,
        ..PipelineConfig::default()
    }
}

fn receiver() -> Receiver {
    Receiver::new(
        &SessionKey::from_bytes(&KEY).unwrap(),
        0,
        Direction::HostToDevice,
        KeyPolicy::default(),
    )
    .unwrap()
}

/// Delivers `msgs` (one transfer) and returns the reassembled plaintext.
fn deliver(rx: &mut Receiver, msgs: &[Outgoing], total: usize) -> Vec<u8> {
    let mut out = vec![0xEEu8; total];
    for (offset, m) in msgs {
        let o = *offset as usize;
        let dst = &mut out[o..o + m.len()];
        rx.open_into(m.header(), m.tag(), m.ciphertext(), dst)
            .expect("receiver rejected a message");
    }
    out
}

#[derive(Debug, Clone)]
enum Step {
    Predict(Vec<(usize, usize, usize)>),
    Request(usize, usize, usize),
    Modify(usize, usize),
}

fn step(nsrc: usize) -> impl Strategy<Value = Step> {
    let range = (0..nsrc, 0usize..3000, 0usize..3000);
    prop_oneof![
        2 => proptest::collection::vec(range.clone(), 1..5).prop_map(Step::Predict),
        3 => range.prop_map(|(s, o, l)| Step::Request(s, o, l)),
        1 => (0..nsrc, 0usize..3000).prop_map(|(s, p)| Step::Modify(s, p)),
    ]
}

fn clamp(total: usize, off: usize, len: usize) -> (usize, usize) {
    let off = off % (total + 1);
    (off, len % (total - off + 1))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(60))]

    #[test]
    fn receiver_gets_the_bytes_at_request_time(steps in proptest::collection::vec(step(3), 1..25),
                                               slots in 1usize..6, workers in 0usize..3, protect in 0u8..3) {
        let srcs: Vec<Arc<Mutable>> = (0..3).map(|i| Mutable::new((0..3000u32).map(|j| (j * 7 + i) as u8).collect())).collect();
        let as_source = |i: usize| -> Source { srcs[i].clone() };
        let key = SessionKey::from_bytes(&KEY).unwrap();
        // 0: fingerprints; 1: page protection; 2: page protection, watches kept between uses.
        let validation = if protect > 0 { Validation::PageProtection } else { Validation::Fingerprint };
        let keep_armed = if protect == 2 { 4 } else { 0 };
        let pipe = Pipeline::new(&key, PipelineConfig { validation, keep_armed, ..cfg(slots, 512, workers) }).unwrap();
        let mut rx = receiver();
        for st in steps {
            match st {
                Step::Predict(list) => {
                    let preds: Vec<_> = list.iter().map(|&(s, o, l)| {
                        let (o, l) = clamp(3000, o, l);
                        (as_source(s), o, Some(l))
                    }).collect();
                    pipe.predict(&preds).unwrap();
                }
                Step::Request(s, o, l) => {
                    let (o, l) = clamp(3000, o, l);
                    let expected = srcs[s].bytes()[o..o + l].to_vec();
                    let msgs = pipe.request(&as_source(s), o, Some(l)).unwrap().collect_all().unwrap();
                    let data_msgs = msgs.iter().filter(|(_, m)| !m.is_nop()).count();
                    prop_assert_eq!(data_msgs, l.div_ceil(512));
                    prop_assert_eq!(deliver(&mut rx, &msgs, l), expected);
                }
                Step::Modify(s, p) => srcs[s].set(p, srcs[s].bytes()[p].wrapping_add(1)),
            }
        }
        let tail = pipe.relinquish_all().unwrap();
        prop_assert!(tail.iter().all(|(_, m)| m.is_nop()));
        deliver(&mut rx, &tail, 0);
        let st = pipe.stats();
        prop_assert_eq!(st.positions_reserved, st.hits + st.chunks_on_demand + st.nops, "{:?}", st);
        prop_assert_eq!(rx.cursor(), pipe.cursor(), "receiver saw every reserved position");
        pipe.close();
    }
}

fn wait_ready(pipe: &Pipeline, n: u64) {
    let t0 = std::time::Instant::now();
    while pipe.stats().chunks_pre_encrypted < n {
        assert!(
            t0.elapsed().as_secs() < 20,
            "workers did not pre-encrypt: {:?}",
            pipe.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn predicted_requests_hit_and_skips_become_nops() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(8, 1024, 2)).unwrap();
    let srcs: Vec<Source> = (0..4u8)
        .map(|i| Arc::new(vec![i; 4096]) as Source)
        .collect();
    pipe.predict(
        &srcs
            .iter()
            .map(|s| (s.clone(), 0, None))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    wait_ready(&pipe, 8); // 4 sources x 4 chunks, 8 slots
    let mut rx = receiver();
    let m0 = pipe
        .request(&srcs[0], 0, None)
        .unwrap()
        .collect_all()
        .unwrap();
    assert_eq!(deliver(&mut rx, &m0, 4096), vec![0u8; 4096]);
    assert_eq!(pipe.stats().hits, 4);
    drop(m0); // the device copied it: its staging buffers go back to the pool
              // Skip source 1: its 4 positions become NOPs, then source 2 is served.
    wait_ready(&pipe, 12);
    let m2 = pipe
        .request(&srcs[2], 0, None)
        .unwrap()
        .collect_all()
        .unwrap();
    assert_eq!(m2.iter().filter(|(_, m)| m.is_nop()).count(), 4);
    assert_eq!(deliver(&mut rx, &m2, 4096), vec![2u8; 4096]);
    let st = pipe.stats();
    assert_eq!((st.nops, st.misses, st.stale), (4, 0, 0));
    assert!(st.hits >= 4 && st.wasted_bytes >= 4096 - 1024);
}

#[test]
fn unpredicted_request_takes_the_head_position_and_keeps_the_rest() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(4, 1024, 1)).unwrap();
    let a: Source = Arc::new(vec![1u8; 1024]);
    let b: Source = Arc::new(vec![2u8; 1024]);
    let x: Source = Arc::new(vec![9u8; 1024]);
    pipe.predict(&[(a.clone(), 0, None), (b.clone(), 0, None)])
        .unwrap();
    wait_ready(&pipe, 2);
    let mut rx = receiver();
    // X replaces A (a wrong prediction): X is a substitute at A's position; B still hits.
    let mx = pipe.request(&x, 0, None).unwrap().collect_all().unwrap();
    assert_eq!(mx.len(), 1);
    assert_eq!(mx[0].1.header().kind, Kind::Substitute);
    assert_eq!(deliver(&mut rx, &mx, 1024), vec![9u8; 1024]);
    let mb = pipe.request(&b, 0, None).unwrap().collect_all().unwrap();
    assert_eq!(deliver(&mut rx, &mb, 1024), vec![2u8; 1024]);
    let st = pipe.stats();
    assert_eq!((st.misses, st.hits), (1, 1));
}

#[test]
fn modified_source_is_never_delivered_stale() {
    for validation in [Validation::Fingerprint, Validation::PageProtection] {
        modified_source_check(validation);
    }
}

fn modified_source_check(validation: Validation) {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(
        &key,
        PipelineConfig {
            validation,
            ..cfg(4, 1024, 1)
        },
    )
    .unwrap();
    let src = Mutable::new(vec![3u8; 2048]);
    let s: Source = src.clone();
    pipe.predict(&[(s.clone(), 0, None)]).unwrap();
    wait_ready(&pipe, 2);
    src.set(1500, 77);
    let mut rx = receiver();
    let m = pipe.request(&s, 0, None).unwrap().collect_all().unwrap();
    let got = deliver(&mut rx, &m, 2048);
    assert_eq!(got[1500], 77);
    assert_eq!(got, src.bytes().to_vec());
    let st = pipe.stats();
    match validation {
        Validation::Fingerprint => {
            assert_eq!((st.hits, st.stale), (1, 1), "{st:?}");
            assert_eq!(
                st.validation_bytes_hashed, 2048,
                "both chunks hashed: {st:?}"
            );
        }
        // Both chunks share a page: a write to one dirties both (safe, only slower).
        Validation::PageProtection => assert_eq!(st.hits + st.stale, 2, "{st:?}"),
    }
}

#[test]
fn page_protection_tracks_writes_per_page_and_costs_no_hashing() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let chunk = 64 << 10;
    let pipe = Pipeline::new(
        &key,
        PipelineConfig {
            validation: Validation::PageProtection,
            ..cfg(16, chunk, 2)
        },
    )
    .unwrap();
    // Page-aligned chunks: no page of theirs holds other heap data, whose writes (by another
    // test's thread, whenever they come) would count as writes to the chunk sharing the page.
    let src = Mutable::new(vec![5u8; (1 << 20) + 4096]);
    let base = (4096 - src.bytes().as_ptr() as usize % 4096) % 4096;
    let s: Source = src.clone();
    pipe.predict(&[(s.clone(), base, Some(1 << 20))]).unwrap();
    wait_ready(&pipe, 16);
    src.set(base + 5 * chunk + 30_000, 6); // the middle of chunk 5: its pages only
    let mut rx = receiver();
    let m = pipe
        .request(&s, base, Some(1 << 20))
        .unwrap()
        .collect_all()
        .unwrap();
    assert_eq!(
        deliver(&mut rx, &m, 1 << 20),
        src.bytes()[base..base + (1 << 20)].to_vec()
    );
    let st = pipe.stats();
    assert_eq!((st.hits, st.stale), (15, 1), "{st:?}");
    // 16 checks of 64 KiB each: loads of a write counter, not hashes of the bytes.
    assert_eq!(st.validation_bytes_hashed, 0, "{st:?}");
    drop(m);
    pipe.close();
    src.set(0, 1); // writable again once the pipeline let go
}

#[test]
fn kept_watches_skip_rearming_and_still_catch_writes_between_uses() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let chunk = 16 << 10;
    let pipe = Pipeline::new(
        &key,
        PipelineConfig {
            validation: Validation::PageProtection,
            keep_armed: 8,
            ..cfg(4, chunk, 1)
        },
    )
    .unwrap();
    // Page-aligned chunks, so that no page is shared with other heap data (whose writes
    // would count as writes to the chunk sharing the page).
    let src = Mutable::new(vec![9u8; 4 * chunk + 4096]);
    let base = (4096 - src.bytes().as_ptr() as usize % 4096) % 4096;
    let s: Source = src.clone();
    let mut rx = receiver();
    let mut round = |modify: Option<usize>| {
        let before = pipe.stats();
        pipe.predict(&[(s.clone(), base, Some(4 * chunk))]).unwrap();
        wait_ready(&pipe, before.chunks_pre_encrypted + 4);
        if let Some(at) = modify {
            src.set(base + at, src.bytes()[base + at].wrapping_add(1));
        }
        let m = pipe
            .request(&s, base, Some(4 * chunk))
            .unwrap()
            .collect_all()
            .unwrap();
        let expected = src.bytes()[base..base + 4 * chunk].to_vec();
        assert_eq!(deliver(&mut rx, &m, 4 * chunk), expected);
        drop(m);
        let after = pipe.stats();
        (after.hits - before.hits, after.stale - before.stale)
    };
    // Consumed entries are retired to the planner thread; `wait_idle` drops them (the
    // planner's job) before it returns, so their watches are kept by then.
    let settle = || {
        assert!(
            pipe.wait_idle(IDLE),
            "workers still busy: {:?}",
            pipe.stats()
        );
        assert_eq!(pipe.stats().watches_kept, 4, "{:?}", pipe.stats());
    };
    assert_eq!(round(None), (4, 0));
    settle();
    assert_eq!(round(None), (4, 0));
    assert_eq!(
        pipe.stats().watches_reused,
        4,
        "second round re-armed nothing"
    );
    // A write while the chunks are kept (between uses): the chunk is armed afresh and the new
    // bytes are encrypted, not the old ciphertext delivered.
    settle();
    src.set(base + 2 * chunk + 5, 1);
    assert_eq!(round(None), (4, 0));
    assert_eq!(
        pipe.stats().watches_reused,
        7,
        "all but the written chunk reused"
    );
    // A write after the kept watch was re-armed for the next use is caught as stale.
    assert_eq!(round(Some(chunk + 3)), (3, 1));
    settle();
    assert_eq!(pipe.unwatch(&s), 4);
    assert_eq!(pipe.stats().watches_kept, 0);
    pipe.close();
    assert_eq!(pipe.stats().watches_kept, 0);
    src.set(0, 1);
}

#[test]
fn keep_armed_needs_page_protection_and_a_bound() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let no_protect = PipelineConfig {
        keep_armed: 4,
        ..cfg(4, 1024, 1)
    };
    assert!(Pipeline::new(&key, no_protect).is_err());
    let too_many = PipelineConfig {
        validation: Validation::PageProtection,
        keep_armed: pipellm_core::pipeline::MAX_KEEP_ARMED + 1,
        ..cfg(4, 1024, 1)
    };
    assert!(Pipeline::new(&key, too_many).is_err());
}

#[test]
fn insertion_relinquishes_the_window_and_requeues_it() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(2, 512, 1)).unwrap();
    let s: Vec<Source> = (0..4u8).map(|i| Arc::new(vec![i; 512]) as Source).collect();
    pipe.predict(&s.iter().map(|x| (x.clone(), 0, None)).collect::<Vec<_>>())
        .unwrap();
    wait_ready(&pipe, 2);
    let mut rx = receiver();
    // Request 2 while the ring holds 0 and 1: they are relinquished and queued again.
    let m = pipe.request(&s[2], 0, None).unwrap().collect_all().unwrap();
    assert_eq!(m.iter().filter(|(_, m)| m.is_nop()).count(), 2);
    assert_eq!(deliver(&mut rx, &m, 512), vec![2u8; 512]);
    for i in [0usize, 1, 3] {
        let m = pipe.request(&s[i], 0, None).unwrap().collect_all().unwrap();
        assert_eq!(deliver(&mut rx, &m, 512), vec![i as u8; 512]);
    }
    let tail = pipe.relinquish_all().unwrap();
    deliver(&mut rx, &tail, 0);
    assert_eq!(rx.cursor(), pipe.cursor());
}

#[test]
fn large_request_is_split_and_encrypted_in_parallel_on_demand() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(2, 64 << 10, 2)).unwrap();
    let data: Vec<u8> = (0..(1 << 20) + 123).map(|i| (i % 251) as u8).collect();
    let src: Source = Arc::new(data.clone());
    let t = pipe.request(&src, 0, None).unwrap();
    assert_eq!(t.len(), 17);
    let msgs = t.collect_all().unwrap();
    let mut rx = receiver();
    assert_eq!(deliver(&mut rx, &msgs, data.len()), data);
    assert_eq!(pipe.stats().chunks_on_demand, 17);
}

#[test]
fn workers_that_panic_degrade_to_on_demand() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(4, 1024, 2)).unwrap();
    pipe.faults()
        .panic_speculative
        .store(3, std::sync::atomic::Ordering::Relaxed);
    pipe.faults()
        .panic_on_demand
        .store(2, std::sync::atomic::Ordering::Relaxed);
    let srcs: Vec<Source> = (0..6u8)
        .map(|i| Arc::new(vec![i; 1024]) as Source)
        .collect();
    pipe.predict(
        &srcs
            .iter()
            .map(|s| (s.clone(), 0, None))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    while pipe.stats().worker_failures + pipe.stats().chunks_pre_encrypted < 4 {
        assert!(t0.elapsed().as_secs() < 20);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut rx = receiver();
    for (i, s) in srcs.iter().enumerate() {
        let m = pipe.request(s, 0, None).unwrap().collect_all().unwrap();
        assert_eq!(deliver(&mut rx, &m, 1024), vec![i as u8; 1024]);
    }
    let x: Source = Arc::new(vec![7u8; 4096]);
    let m = pipe.request(&x, 0, None).unwrap().collect_all().unwrap();
    assert_eq!(deliver(&mut rx, &m, 4096), vec![7u8; 4096]);
    let st = pipe.stats();
    assert_eq!(
        st.worker_failures, 5,
        "3 speculative + 2 on-demand injected: {st:?}"
    );
    assert!(
        st.late >= 3,
        "failed speculative chunks are served on demand: {st:?}"
    );
    assert!(!pipe.take_warnings().is_empty());
}

#[test]
fn concurrent_predict_and_request_from_8_threads() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Arc::new(Pipeline::new(&key, cfg(8, 4096, 2)).unwrap());
    let srcs: Arc<Vec<Source>> = Arc::new(
        (0..16u8)
            .map(|i| Arc::new(vec![i; 8192]) as Source)
            .collect(),
    );
    let delivered = Arc::new(Mutex::new(Vec::<(
        Position,
        Message<pipellm_core::pipeline::Payload>,
        Vec<u8>,
    )>::new()));
    const THREADS: usize = 8;
    const ROUNDS: usize = 200;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pipe, srcs, delivered) = (pipe.clone(), srcs.clone(), delivered.clone());
            std::thread::spawn(move || {
                let mut i = t;
                for _ in 0..ROUNDS {
                    let s = &srcs[i % 16];
                    if i % 3 == 0 {
                        pipe.predict(&[
                            (srcs[(i + 1) % 16].clone(), 0, None),
                            (s.clone(), 0, None),
                        ])
                        .unwrap();
                    }
                    let msgs = pipe.request(s, 0, None).unwrap().collect_all().unwrap();
                    let mut d = delivered.lock().unwrap();
                    for (off, m) in msgs {
                        let exp = if m.is_nop() {
                            vec![]
                        } else {
                            s.bytes()[off as usize..off as usize + m.len()].to_vec()
                        };
                        d.push((m.position(), m, exp));
                    }
                    i += 7;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut all = std::mem::take(&mut *delivered.lock().unwrap());
    for (_, m) in pipe.relinquish_all().unwrap() {
        all.push((m.position(), m, vec![]));
    }
    all.sort_by_key(|(p, _, _)| *p);
    let mut rx = receiver();
    for (_, m, exp) in &all {
        let mut out = vec![0u8; m.len()];
        rx.open_into(m.header(), m.tag(), m.ciphertext(), &mut out)
            .unwrap();
        assert_eq!(&out, exp);
    }
    assert_eq!(rx.cursor(), pipe.cursor());
    let st = pipe.stats();
    assert_eq!(
        st.positions_reserved,
        st.hits + st.chunks_on_demand + st.nops
    );
    assert_eq!(
        st.requests,
        (THREADS * ROUNDS) as u64,
        "every thread ran every round: {st:?}"
    );
    assert_eq!(
        st.bytes_requested,
        (THREADS * ROUNDS * 8192) as u64,
        "{st:?}"
    );
}

#[test]
fn close_stops_everything_and_wipes_staging() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(4, 1024, 2)).unwrap();
    let s: Source = Arc::new(vec![1u8; 8192]);
    pipe.predict(&[(s.clone(), 0, None)]).unwrap();
    let t = pipe.request(&s, 0, Some(1024)).unwrap();
    pipe.close();
    pipe.close();
    assert!(matches!(pipe.request(&s, 0, None), Err(Error::Closed)));
    assert!(matches!(
        pipe.predict(&[(s.clone(), 0, None)]),
        Err(Error::Closed)
    ));
    // A transfer made before close still completes.
    let msgs = t.collect_all().unwrap();
    assert_eq!(msgs.iter().filter(|(_, m)| !m.is_nop()).count(), 1);
}

#[test]
fn bad_ranges_and_configs_are_typed_errors() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(2, 1024, 0)).unwrap();
    let s: Source = Arc::new(vec![0u8; 100]);
    assert!(matches!(
        pipe.request(&s, 101, None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        pipe.request(&s, 50, Some(51)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        pipe.predict(&[(s.clone(), 0, Some(1000))]),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(pipe.queued(), (0, 0), "a refused predict queues nothing");
    for bad in [
        cfg(0, 1024, 1),
        cfg(2, 8, 1),
        PipelineConfig {
            max_staging_bytes: 1000,
            ..cfg(2, 1024, 1)
        },
    ] {
        assert!(matches!(
            Pipeline::new(&key, bad),
            Err(Error::InvalidArgument(_))
        ));
    }
}

#[test]
fn caller_provided_staging_is_used_and_checked() {
    use pipellm_core::staging::StagingBuf;
    use std::ptr::NonNull;
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let mut mems: Vec<&'static mut [u8]> = (0..3)
        .map(|_| Box::leak(vec![0u8; 4096].into_boxed_slice()))
        .collect();
    let bufs: Vec<StagingBuf> = mems
        .iter_mut()
        // SAFETY: leaked (lives forever) and used only through the StagingBuf.
        .map(|m| unsafe {
            StagingBuf::external(NonNull::new(m.as_mut_ptr()).unwrap(), 4096, Box::new(()))
        })
        .collect();
    let addrs: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
    let pipe = Pipeline::with_staging(&key, cfg(99, 4096, 1), bufs).unwrap();
    assert_eq!(pipe.config().slots, 3);
    let s: Source = Arc::new(vec![4u8; 4096]);
    pipe.predict(&[(s.clone(), 0, None)]).unwrap();
    wait_ready(&pipe, 1);
    let m = pipe.request(&s, 0, None).unwrap().collect_all().unwrap();
    assert!(
        addrs.contains(&(m[0].1.ciphertext().as_ptr() as usize)),
        "the hit lives in caller memory"
    );
    let mut rx = receiver();
    assert_eq!(deliver(&mut rx, &m, 4096), vec![4u8; 4096]);
    // SAFETY: as above.
    let short = vec![unsafe {
        StagingBuf::external(
            NonNull::new(mems[0].as_mut_ptr()).unwrap(),
            100,
            Box::new(()),
        )
    }];
    assert!(matches!(
        Pipeline::with_staging(&key, cfg(1, 4096, 1), short),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn wait_idle_leaves_every_ring_entry_encrypted_so_predicted_requests_hit() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(4, 1024, 2)).unwrap();
    let srcs: Vec<Source> = (0..10u8)
        .map(|i| Arc::new(vec![i; 1024]) as Source)
        .collect();
    pipe.predict(
        &srcs
            .iter()
            .map(|s| (s.clone(), 0, None))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(pipe.wait_idle(IDLE));
    assert_eq!(pipe.stats().chunks_pre_encrypted, 4, "one per slot");
    assert_eq!(pipe.queued(), (4, 6));
    let mut rx = receiver();
    for (i, s) in srcs.iter().enumerate() {
        let m = pipe.request(s, 0, None).unwrap().collect_all().unwrap();
        assert_eq!(deliver(&mut rx, &m, 1024), vec![i as u8; 1024]);
        drop(m); // its staging buffer goes back: the next prediction gets a slot
        assert!(pipe.wait_idle(IDLE));
        assert_eq!(
            pipe.queued(),
            ((9 - i).min(4), 6usize.saturating_sub(i + 1))
        );
    }
    let st = pipe.stats();
    assert_eq!(
        (st.hits, st.late, st.misses, st.chunks_pre_encrypted),
        (10, 0, 0, 10),
        "every request found its chunk encrypted: {st:?}"
    );
}

#[test]
fn wait_idle_with_workers_held_or_none_returns_after_the_refill() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let srcs: Vec<Source> = (0..3u8)
        .map(|i| Arc::new(vec![i; 1024]) as Source)
        .collect();
    let all: Vec<_> = srcs.iter().map(|s| (s.clone(), 0, None)).collect();
    // Held before anything is queued: no job is in hand, so nothing is encrypted.
    let pipe = Pipeline::new(&key, cfg(2, 1024, 1)).unwrap();
    pipe.hold_workers(true);
    pipe.predict(&all).unwrap();
    assert!(pipe.wait_idle(IDLE));
    assert_eq!(pipe.stats().chunks_pre_encrypted, 0);
    assert_eq!(pipe.queued(), (2, 1));
    pipe.hold_workers(false);
    assert!(pipe.wait_idle(IDLE));
    assert_eq!(pipe.stats().chunks_pre_encrypted, 2);
    pipe.close();
    assert!(pipe.wait_idle(IDLE), "a closed pipeline is idle");
    // No workers: the request path encrypts everything; wait_idle still refills the ring.
    let pipe = Pipeline::new(&key, cfg(2, 1024, 0)).unwrap();
    pipe.predict(&all).unwrap();
    assert_eq!(pipe.queued(), (2, 1));
    let m = pipe
        .request(&srcs[0], 0, None)
        .unwrap()
        .collect_all()
        .unwrap();
    drop(m); // the buffer returns: the plan's last prediction may take it
    assert!(pipe.wait_idle(IDLE));
    assert_eq!(pipe.queued(), (2, 0));
    assert_eq!(pipe.stats().late, 1, "no worker ever started it");
}

/// A source whose bytes a worker thread cannot read until the test opens the gate.
struct Gated {
    data: Vec<u8>,
    open: Mutex<bool>,
    cv: Condvar,
    blocked: AtomicUsize,
}

impl SourceBytes for Gated {
    fn bytes(&self) -> &[u8] {
        let worker = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("pipellm-worker"));
        if worker {
            let mut open = self.open.lock().unwrap();
            self.blocked.fetch_add(1, Ordering::SeqCst);
            self.cv.notify_all();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
        &self.data
    }
}

#[test]
fn wait_idle_times_out_while_a_worker_is_busy() {
    let key = SessionKey::from_bytes(&KEY).unwrap();
    let pipe = Pipeline::new(&key, cfg(2, 1024, 1)).unwrap();
    let gated = Arc::new(Gated {
        data: vec![6u8; 1024],
        open: Mutex::new(false),
        cv: Condvar::new(),
        blocked: AtomicUsize::new(0),
    });
    let s: Source = gated.clone();
    pipe.predict(&[(s.clone(), 0, None)]).unwrap();
    {
        // Until the worker is inside the job (reading the source), with a bound.
        let open = gated.open.lock().unwrap();
        let (_open, t) = gated
            .cv
            .wait_timeout_while(open, IDLE, |_| gated.blocked.load(Ordering::SeqCst) == 0)
            .unwrap();
        assert!(!t.timed_out(), "the worker never started the job");
    }
    assert!(!pipe.wait_idle(Duration::ZERO), "a worker is busy");
    assert!(!pipe.wait_idle(Duration::from_millis(20)), "still busy");
    *gated.open.lock().unwrap() = true;
    gated.cv.notify_all();
    assert!(pipe.wait_idle(IDLE));
    assert_eq!(pipe.stats().chunks_pre_encrypted, 1);
    let m = pipe.request(&s, 0, None).unwrap().collect_all().unwrap();
    assert_eq!(deliver(&mut receiver(), &m, 1024), vec![6u8; 1024]);
    assert_eq!(pipe.stats().hits, 1);
}
