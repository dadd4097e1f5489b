//! The hit helpers' waking rule, in a process of its own (the helper pool and the counters are
//! process-wide): hits posted at a steady pace get helpers that are awake for them, every
//! window is paid for by a served hit, and once hits stop every helper sleeps until notified.
//!
//! The pace below is this test's input (the driver's cadence), not a measurement: what is
//! asserted does not depend on how fast the machine is (windows that a loaded machine wakes
//! too late for are skipped, and 200 hits leave room for many of them).

use pipellm_cc::pieces::{fingerprints, helpers_asleep, serve, split};
use pipellm_cc::stats::stats;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[test]
fn helpers_wake_for_hits_at_a_pace_and_sleep_once_they_stop() {
    const HELPERS: usize = 1;
    const HITS: u64 = 200;
    let len = 1 << 20;
    let src: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
    let ct: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    let ranges = split(len, HELPERS + 1);
    let fps = fingerprints(&src, &ranges);
    for _ in 0..HITS {
        let mut out = vec![0u8; len];
        // SAFETY: all three buffers are ours, live across the call, of `len` bytes, and
        // `ct` and `out` are distinct.
        let ok = unsafe {
            serve(
                src.as_ptr(),
                ct.as_ptr(),
                out.as_mut_ptr(),
                ranges.clone(),
                fps.clone(),
                HELPERS,
            )
        };
        assert!(ok && out == ct, "a served hit is the stored ciphertext");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Wait for the state, not for time: every helper asleep with no window ahead. The
    // deadline only turns a helper that never stops into a failure instead of a hang.
    let deadline = Instant::now() + Duration::from_secs(60);
    while helpers_asleep() < HELPERS {
        assert!(
            Instant::now() < deadline,
            "a hit helper still awake a minute after the last hit"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = stats();
    let awake = s.helpers_awake.load(Ordering::Relaxed);
    let ready = s.helpers_ready.load(Ordering::Relaxed);
    assert!(
        awake > 0,
        "no helper ever woke ahead of a hit at a 1 ms pace"
    );
    assert!(
        awake <= HITS * HELPERS as u64,
        "at most one window per helper per hit served: {awake}"
    );
    assert!(ready <= awake, "{ready} caught in {awake} windows");
}
