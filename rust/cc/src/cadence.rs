//! When the next hit is due: the arrival model the hit helpers wake up by.
//!
//! Why: a helper asleep on a condition variable takes long to wake where the CPU it runs on
//! is idle. On a virtual machine (and a confidential VM is one) an idle vCPU is halted, and
//! waking it goes through the hypervisor: measured on a 2-vCPU VM, about 100 µs from the
//! driver's notification to the helper's first piece, when a whole fingerprinted 1 MiB hit
//! takes 150 µs. Inside one copy, though, the driver's messages come at a steady pace (its
//! encryption, then the link's time for the chunk). So a helper that just took a task
//! sleeps until shortly before the next message is due, and then stays awake for it, for a
//! bounded window. A message that comes outside the window is served as before (the helper
//! is notified, and the driver takes every piece the helper has not started), so a wrong
//! guess costs at most one window of one core's time. A window opens only after a helper
//! took a task (a hit posted to it), at most one per helper per task taken, and lasts at most
//! `max(20 µs, P/8) + P/8 + max(50 µs, P/8)` for a pace P (3/8 of the pace from a 400 µs
//! pace up; paces up to `MAX_GAP_NS`): counted as `helpers_awake`, `helpers_awake_us` and,
//! for the windows in which their hit came, `helpers_ready`.
//!
//! Pure arithmetic over nanosecond timestamps, so the rules are unit-tested without a clock.

/// Gaps between posts longer than this are no pace: the stream paused (a copy ended, the
/// program did something else). They do not enter the model.
pub const MAX_GAP_NS: u64 = 4_000_000;
/// How many recent gaps the pace is the median of: robust against the odd long gap where
/// one message was not a hit (a copy's first chunk).
const SAMPLES: usize = 8;
/// Before the first timed wake-up is measured: how late a timed sleep is assumed to end.
const FIRST_LATENESS_NS: u64 = 50_000;
/// The least time awake before and after the due time (arrival jitter).
const MIN_EARLY_NS: u64 = 20_000;
const MIN_AFTER_NS: u64 = 50_000;

/// The arrival model: when the last hit was posted, the recent gaps between posts, and how
/// late a helper's timed sleep ends on this machine.
#[derive(Debug, Clone)]
pub struct Cadence {
    last: Option<u64>,
    gaps: [u64; SAMPLES],
    seen: usize,
    lateness: u64,
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence {
            last: None,
            gaps: [0; SAMPLES],
            seen: 0,
            lateness: FIRST_LATENESS_NS,
        }
    }
}

/// When a helper should wake up (`wake_at`: the due time less the sleep's lateness and the
/// early margin) and until when it stays awake (`until`), in the same clock as the posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub wake_at: u64,
    pub until: u64,
}

impl Cadence {
    /// A hit was posted to the helpers at `now`.
    pub fn posted(&mut self, now: u64) {
        if let Some(last) = self.last {
            let gap = now.saturating_sub(last);
            if gap > 0 && gap <= MAX_GAP_NS {
                self.gaps[self.seen % SAMPLES] = gap;
                self.seen += 1;
            }
        }
        self.last = Some(now);
    }

    /// The pace: the median of the recent gaps, once there are at least three.
    pub fn pace(&self) -> Option<u64> {
        let n = self.seen.min(SAMPLES);
        if n < 3 {
            return None;
        }
        let mut g = self.gaps;
        let g = &mut g[..n];
        g.sort_unstable();
        Some(g[n / 2])
    }

    /// When to be awake for the next post, if the posts keep a pace.
    pub fn window(&self) -> Option<Window> {
        let pace = self.pace()?;
        let due = self.last? + pace;
        let early = (pace / 8).max(MIN_EARLY_NS);
        let after = (pace / 8).max(MIN_AFTER_NS);
        // Where sleeps end later than an eighth of the pace (a loaded machine), waking earlier
        // still would spin longer than the hit saves: the lead stays at most an eighth of the
        // pace (so the window at most 3/8 of it above the minimum margins), and a hit that comes before the helper is served
        // as it would be without the window.
        let lead = self.lateness.min(pace / 8);
        Some(Window {
            wake_at: due.saturating_sub(early + lead),
            until: due + after,
        })
    }

    /// A timed sleep asked to end at `asked` ended at `now`: learns how late such sleeps
    /// end (a moving average, an eighth per sample, each sample at most `MAX_GAP_NS`).
    pub fn woke(&mut self, asked: u64, now: u64) {
        let late = now.saturating_sub(asked).min(MAX_GAP_NS);
        self.lateness = (self.lateness * 7 + late) / 8;
    }

    pub fn lateness(&self) -> u64 {
        self.lateness
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1000;

    #[test]
    fn no_window_until_a_pace_is_seen() {
        let mut c = Cadence::default();
        assert_eq!(c.window(), None);
        for t in [0, 600 * US, 1200 * US] {
            c.posted(t);
            assert_eq!(c.window(), None, "two gaps are no pace yet");
        }
        c.posted(1800 * US);
        let w = c.window().expect("three gaps of 600 us");
        // due at 2400 us; early: max(20, 600/8) = 75 us, plus the assumed lateness 50 us
        assert_eq!(w.wake_at, 2400 * US - 75 * US - 50 * US);
        assert_eq!(w.until, 2400 * US + 75 * US);
    }

    #[test]
    fn one_long_gap_does_not_move_the_pace() {
        let mut c = Cadence::default();
        let mut t = 0;
        for k in 0..20 {
            // every eighth message was no hit: its gap is twice the others
            t += if k % 8 == 7 { 1200 * US } else { 600 * US };
            c.posted(t);
        }
        assert_eq!(c.pace(), Some(600 * US));
    }

    #[test]
    fn a_pause_is_no_gap() {
        let mut c = Cadence::default();
        for t in [0, 500 * US, 1000 * US, 1500 * US] {
            c.posted(t);
        }
        c.posted(1500 * US + MAX_GAP_NS + 1);
        assert_eq!(
            c.pace(),
            Some(500 * US),
            "the pause did not enter the model"
        );
        let w = c.window().unwrap();
        assert!(
            w.wake_at > 1500 * US + MAX_GAP_NS,
            "due a pace after the last post"
        );
    }

    #[test]
    fn wakes_earlier_where_sleeps_end_late() {
        let mut c = Cadence::default();
        for t in [0, 600 * US, 1200 * US, 1800 * US] {
            c.posted(t);
        }
        let before = c.window().unwrap().wake_at;
        for _ in 0..64 {
            c.woke(0, 70 * US);
        }
        assert!(c.lateness() > 65 * US && c.lateness() <= 70 * US);
        let after = c.window().unwrap();
        assert_eq!(after.wake_at, 2400 * US - 75 * US - c.lateness());
        assert!(after.wake_at < before, "{} vs {before}", after.wake_at);
        assert_eq!(after.until, 2400 * US + 75 * US, "the window's end stays");
        for _ in 0..64 {
            c.woke(0, 3000 * US); // a loaded machine
        }
        let loaded = c.window().unwrap();
        assert_eq!(
            loaded.wake_at,
            2400 * US - 75 * US - 75 * US,
            "a lead of at most an eighth of the pace"
        );
    }

    #[test]
    fn a_window_is_bounded_by_the_pace() {
        let mut c = Cadence::default();
        for k in 0..10u64 {
            c.posted(k * 3000 * US);
        }
        let w = c.window().unwrap();
        // early 375 + lateness 50 + after 375: a window is a fraction of the pace
        assert_eq!(w.until - w.wake_at, 800 * US);
        for _ in 0..64 {
            c.woke(0, MAX_GAP_NS);
        }
        let w = c.window().unwrap();
        assert_eq!(
            w.until - w.wake_at,
            3 * 3000 * US / 8,
            "at most 3/8 of the pace"
        );
    }

    #[test]
    fn below_a_400_us_pace_the_minimum_margins_bound_the_window() {
        let mut c = Cadence::default();
        for k in 0..10u64 {
            c.posted(k * 320 * US);
        }
        for _ in 0..64 {
            c.woke(0, MAX_GAP_NS);
        }
        let w = c.window().unwrap();
        // early max(20, 40) + lead min(lateness, 40) + after max(50, 40)
        assert_eq!(w.until - w.wake_at, (40 + 40 + 50) * US);
    }
}
