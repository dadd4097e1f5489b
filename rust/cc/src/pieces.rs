//! Serving a hit in pieces on several threads: each piece's source bytes are fingerprinted
//! and compared with the piece's fingerprint from encryption time, and its stored ciphertext
//! copied to the driver's output. Both are memory-bound, so on a host with spare cores the
//! pieces run in parallel.
//!
//! The calling thread takes pieces too, so a helper that wakes late costs nothing: the caller
//! may do every piece itself. The caller returns only when every piece that was started has
//! finished, which is what keeps the raw pointers below valid for the helpers.
//!
//! A helper that just took a task sleeps until shortly before the next hit is due at the
//! recent pace, then stays awake for it for a bounded window ([`crate::cadence`]): waking
//! a sleeping thread on an idle CPU can take most of a hit's time.

use crate::cadence::{Cadence, Window};
use crate::stats::{stats, Stats};
use pipellm_core::fingerprint::{fingerprint, Fingerprint};
use pipellm_core::locks::{lock, wait, wait_timeout};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Byte ranges of a message cut into `n` pieces (page multiples, the last one shorter).
pub fn split(len: usize, n: usize) -> Vec<(usize, usize)> {
    let n = n.max(1);
    let step = pipellm_core::page::round_up(len.div_ceil(n));
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    while at < len || out.is_empty() {
        let end = (at + step.max(1)).min(len);
        out.push((at, end));
        at = end;
        if step == 0 {
            break;
        }
    }
    out
}

/// How many pieces a message of `len` bytes is served in: one per `split_bytes`, at most
/// one per helper plus the caller.
pub fn count(len: usize, split_bytes: usize, helpers: usize) -> usize {
    if split_bytes == 0 {
        return 1;
    }
    (len / split_bytes).clamp(1, helpers + 1)
}

/// Fingerprints of each piece of `bytes`.
pub fn fingerprints(bytes: &[u8], ranges: &[(usize, usize)]) -> Vec<Fingerprint> {
    ranges
        .iter()
        .map(|&(a, b)| fingerprint(&bytes[a..b]))
        .collect()
}

struct Task {
    src: usize,
    ct: usize,
    out: usize,
    ranges: Vec<(usize, usize)>,
    /// Per piece, the fingerprint its source bytes must still have; empty: copy only (the
    /// caller validated the source another way).
    fps: Vec<Fingerprint>,
    next: AtomicUsize,
    done: AtomicUsize,
    ok: AtomicBool,
}

impl Task {
    /// Runs pieces until none is left; returns how many this thread ran.
    fn work(&self) -> usize {
        let mut ran = 0;
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.ranges.len() {
                return ran;
            }
            let (a, b) = self.ranges[i];
            // A piece that panics counts as changed (and as done: the caller waits for it).
            let fresh = std::panic::catch_unwind(|| {
                // SAFETY: the caller of `serve` keeps src (readable), ct (readable) and out
                // (writable) valid for the whole message until every started piece is done,
                // and pieces are disjoint, so no two threads write the same output bytes; ct
                // is the engine's own buffer, never the output.
                unsafe {
                    let same = match self.fps.get(i) {
                        Some(fp) => {
                            let src =
                                std::slice::from_raw_parts((self.src + a) as *const u8, b - a);
                            fingerprint(src) == *fp
                        }
                        None => true,
                    };
                    if same {
                        std::ptr::copy_nonoverlapping(
                            (self.ct + a) as *const u8,
                            (self.out + a) as *mut u8,
                            b - a,
                        );
                    }
                    same
                }
            });
            if !matches!(fresh, Ok(true)) {
                self.ok.store(false, Ordering::Release);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
            ran += 1;
        }
    }
}

struct Slot {
    task: Option<Arc<Task>>,
    cadence: Cadence,
}

struct Pool {
    slot: Mutex<Slot>,
    ready: Condvar,
    /// Bumped under the slot's lock with each task put in it: the task's number, which a
    /// helper compares with the last it took (an address could be reused by the next task),
    /// and what an awake helper polls without taking the lock.
    posts: AtomicU64,
}

static POOL: OnceLock<Pool> = OnceLock::new();
static STARTED: std::sync::Once = std::sync::Once::new();
/// Helpers asleep until notified (no window ahead): every helper is, once hits stop coming.
static ASLEEP: AtomicUsize = AtomicUsize::new(0);

/// How many hit helpers are asleep with no window ahead (a test waits for all of them).
pub fn helpers_asleep() -> usize {
    ASLEEP.load(Ordering::Acquire)
}

/// Nanoseconds on one monotonic clock, from the first call in the process.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn pool(helpers: usize) -> &'static Pool {
    let p = POOL.get_or_init(|| Pool {
        slot: Mutex::new(Slot {
            task: None,
            cadence: Cadence::default(),
        }),
        ready: Condvar::new(),
        posts: AtomicU64::new(0),
    });
    STARTED.call_once(|| {
        for i in 0..helpers {
            let _ = crate::process::spawn(format!("pipellm-cc-hit-{i}"), move || helper_loop(p));
        }
    });
    p
}

fn helper_loop(p: &'static Pool) {
    // The kernel's default timer slack (50 µs) would make every timed sleep end that much
    // later than asked; this thread's sleeps are timed to the microsecond. Only this thread.
    // SAFETY: prctl is variadic; PR_SET_TIMERSLACK reads one unsigned long (the unused
    // arguments are passed as 0) and changes only the calling thread's timer slack. Best
    // effort: a failure leaves the default slack, and sleeps end later.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    // The number (`posts`) of the last task this helper took.
    let mut seen: u64 = 0;
    loop {
        let task = next_task(p, &mut seen);
        task.work();
    }
}

/// Waits for a task this helper has not seen: asleep until the next hit's window, awake
/// (polling `posts`) through it, asleep again until notified if none came.
fn next_task(p: &Pool, seen: &mut u64) -> Arc<Task> {
    let mut g = lock(&p.slot);
    let mut window: Option<Window> = g.cadence.window();
    loop {
        // Under the lock `posts` is bumped under: the number of the task in the slot.
        let number = p.posts.load(Ordering::Acquire);
        if let Some(t) = g.task.as_ref().filter(|_| number != *seen) {
            *seen = number;
            return t.clone();
        }
        let now = now_ns();
        match window {
            Some(w) if now < w.wake_at => {
                let (g2, r) = wait_timeout(&p.ready, g, Duration::from_nanos(w.wake_at - now));
                g = g2;
                if r.timed_out() {
                    g.cadence.woke(w.wake_at, now_ns());
                }
            }
            Some(w) => {
                window = None; // one window per task taken
                if now >= w.until {
                    continue;
                }
                drop(g);
                let caught = loop {
                    if p.posts.load(Ordering::Acquire) != number {
                        break true;
                    }
                    for _ in 0..32 {
                        std::hint::spin_loop();
                    }
                    if now_ns() >= w.until {
                        break false;
                    }
                };
                let s = stats();
                Stats::add(&s.helpers_awake, 1);
                Stats::add(&s.helpers_awake_us, now_ns().saturating_sub(now) / 1000);
                if caught {
                    Stats::add(&s.helpers_ready, 1);
                }
                g = lock(&p.slot);
            }
            None => {
                ASLEEP.fetch_add(1, Ordering::AcqRel);
                g = wait(&p.ready, g);
                ASLEEP.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Validates and copies a message in `ranges.len()` pieces with up to `helpers` helper
/// threads. Returns true if every piece's source still has its fingerprint (then `out`
/// holds the whole ciphertext); false if any changed (then `out` is partly written and the
/// caller must have it rewritten, e.g. by encrypting for real). With no fingerprints
/// (`fps` empty: the caller validated the source another way) it only copies, and `src` is
/// never read.
///
/// # Safety
/// `src` (unless `fps` is empty) and `ct` must be readable and `out` writable for the
/// message's length, `ct` must not overlap `out`, and none may be freed or written by others
/// until this returns.
pub unsafe fn serve(
    src: *const u8,
    ct: *const u8,
    out: *mut u8,
    ranges: Vec<(usize, usize)>,
    fps: Vec<Fingerprint>,
    helpers: usize,
) -> bool {
    let n = ranges.len();
    let task = Arc::new(Task {
        src: src as usize,
        ct: ct as usize,
        out: out as usize,
        ranges,
        fps,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        ok: AtomicBool::new(true),
    });
    if n > 1 && helpers > 0 {
        let p = pool(helpers);
        {
            let mut g = lock(&p.slot);
            g.task = Some(task.clone());
            g.cadence.posted(now_ns());
            p.posts.fetch_add(1, Ordering::Release);
        }
        for _ in 0..(n - 1).min(helpers) {
            p.ready.notify_one();
        }
    }
    task.work();
    // Pieces a helper started are finishing now: wait for them (they are short).
    while task.done.load(Ordering::Acquire) < n {
        std::hint::spin_loop();
    }
    task.ok.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_message_exactly() {
        for len in [1usize, 4095, 4096, 100_000, 1 << 20, (1 << 20) + 17] {
            for n in 1..5 {
                let p = split(len, n);
                assert!(p.len() <= n, "{len} {n} {p:?}");
                assert_eq!(p.first().unwrap().0, 0);
                assert_eq!(p.last().unwrap().1, len);
                assert!(p.windows(2).all(|w| w[0].1 == w[1].0));
            }
        }
    }

    #[test]
    fn serve_copies_when_unchanged_and_reports_a_changed_piece() {
        let len = 1 << 20;
        let mut src = vec![3u8; len];
        let ct: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let ranges = split(len, 3);
        let fps = fingerprints(&src, &ranges);
        let mut out = vec![0u8; len];
        // SAFETY: all three buffers are ours, live across the call, of `len` bytes.
        let ok = unsafe {
            serve(
                src.as_ptr(),
                ct.as_ptr(),
                out.as_mut_ptr(),
                ranges.clone(),
                fps.clone(),
                2,
            )
        };
        assert!(ok);
        assert_eq!(out, ct);
        src[len - 1] ^= 1; // the last piece changed
        let mut out2 = vec![0u8; len];
        // SAFETY: as above.
        let ok = unsafe { serve(src.as_ptr(), ct.as_ptr(), out2.as_mut_ptr(), ranges, fps, 2) };
        assert!(!ok, "a changed piece must fail the whole message");
    }

    #[test]
    fn serve_without_fingerprints_only_copies() {
        let len = (1 << 20) + 5;
        let ct: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let mut out = vec![0u8; len];
        // SAFETY: both buffers are ours, live across the call, of `len` bytes, distinct; with
        // no fingerprints the (null) source is never read.
        let ok = unsafe {
            serve(
                std::ptr::null(),
                ct.as_ptr(),
                out.as_mut_ptr(),
                split(len, 3),
                Vec::new(),
                2,
            )
        };
        assert!(ok);
        assert_eq!(out, ct);
    }
}
