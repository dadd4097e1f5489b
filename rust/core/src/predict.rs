//! Predicting the next transfers from what serving has done so far, for the
//! predictor that needs no hint: it learns the request stream's repetition. Transfers are
//! identified by opaque `u64` keys (the Python layer maps buffers to keys).
//!
//! Two models, used in this order:
//! 1. **Period**: if the recent history repeats with a period `p` (the smallest one that
//!    explains the last `CONFIRM * p` requests, capped), the next requests are the ones `p`
//!    back. This is the shape of layer-by-layer weight streaming and of any fixed schedule.
//! 2. **Successors**: otherwise, from the last key, follow the most frequent successor seen
//!    (a first-order Markov chain), which still catches loops with irregular lengths.

use crate::error::{Error, Result};
use std::collections::{HashMap, VecDeque};

/// How many periods of history must agree before a period is trusted.
const CONFIRM: usize = 2;

/// Most requests a predictor remembers (`capacity`): 8 MiB of history.
pub const MAX_HISTORY: usize = 1 << 20;

/// Most keys one `predict` call returns.
pub const MAX_PREDICT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct Learned {
    history: VecDeque<u64>,
    capacity: usize,
    max_period: usize,
    /// successor counts: key -> (next key -> count)
    successors: HashMap<u64, HashMap<u64, u32>>,
    period: Option<usize>,
}

impl Learned {
    /// `capacity`: requests remembered; `max_period`: longest cycle looked for (at most
    /// `capacity / CONFIRM`).
    /// `capacity` is clamped to `4..=MAX_HISTORY`.
    pub fn new(capacity: usize, max_period: usize) -> Self {
        let capacity = capacity.clamp(4, MAX_HISTORY);
        Self {
            history: VecDeque::new(),
            capacity,
            max_period: max_period.clamp(1, capacity / CONFIRM),
            successors: HashMap::new(),
            period: None,
        }
    }

    /// As `new`, but a `capacity` above `MAX_HISTORY` is an error, and the history's memory
    /// is reserved up front (`OutOfMemory` if it cannot be).
    pub fn try_new(capacity: usize, max_period: usize) -> Result<Self> {
        if capacity > MAX_HISTORY {
            return Err(Error::InvalidArgument(format!(
                "history must be at most {MAX_HISTORY}, got {capacity}"
            )));
        }
        let mut l = Self::new(capacity, max_period);
        l.history.try_reserve_exact(l.capacity).map_err(|_| {
            Error::OutOfMemory(format!("could not allocate a history of {capacity} keys"))
        })?;
        Ok(l)
    }

    pub fn period(&self) -> Option<usize> {
        self.period
    }

    fn at_back(&self, k: usize) -> u64 {
        // k = 0 is the newest
        self.history[self.history.len() - 1 - k]
    }

    fn holds(&self, p: usize) -> bool {
        let n = self.history.len();
        let span = (CONFIRM * p).min(n);
        span > p && (0..span - p).all(|k| self.at_back(k) == self.at_back(k + p))
    }

    /// Records that `key` was requested.
    pub fn observe(&mut self, key: u64) {
        if let Some(&prev) = self.history.back() {
            let e = self
                .successors
                .entry(prev)
                .or_default()
                .entry(key)
                .or_insert(0);
            *e = e.saturating_add(1);
        }
        if self.history.len() == self.capacity {
            self.history.pop_front();
        }
        self.history.push_back(key);
        // Keep the current period while it explains the newest request (O(1)); otherwise
        // look for the smallest one that explains the recent history.
        let n = self.history.len();
        let still = self
            .period
            .is_some_and(|p| n > p && self.at_back(0) == self.at_back(p));
        if !still {
            self.period = (1..=self.max_period.min(n / CONFIRM)).find(|&p| self.holds(p));
        }
    }

    /// The next `n` keys expected, most likely first (`n` is clamped to `MAX_PREDICT`).
    pub fn predict(&self, n: usize) -> Vec<u64> {
        self.try_predict(n.min(MAX_PREDICT)).unwrap_or_default()
    }

    /// As `predict`, but an `n` above `MAX_PREDICT` is an error, and so is a failure to
    /// allocate the result (`OutOfMemory`).
    pub fn try_predict(&self, n: usize) -> Result<Vec<u64>> {
        if n > MAX_PREDICT {
            return Err(Error::InvalidArgument(format!(
                "n must be at most {MAX_PREDICT}, got {n}"
            )));
        }
        let mut out = Vec::new();
        out.try_reserve_exact(n)
            .map_err(|_| Error::OutOfMemory(format!("could not allocate {n} predictions")))?;
        if let Some(p) = self.period {
            // The request after the newest is the one p - 1 back from it, and so on.
            for j in 0..n {
                let k = (p - 1) - (j % p);
                out.push(self.at_back(k));
            }
            return Ok(out);
        }
        let Some(mut cur) = self.history.back().copied() else {
            return Ok(out);
        };
        for _ in 0..n {
            let next = self.successors.get(&cur).and_then(|m| {
                // Most frequent successor; ties go to the smaller key, so it is deterministic.
                m.iter()
                    .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                    .map(|(k, _)| *k)
            });
            match next {
                Some(k) => {
                    out.push(k);
                    cur = k;
                }
                None => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accuracy(seq: &[u64], warmup: usize) -> f64 {
        let mut l = Learned::new(4096, 1024);
        let (mut hit, mut total) = (0, 0);
        for (i, &k) in seq.iter().enumerate() {
            if i >= warmup {
                total += 1;
                hit += (l.predict(1).first() == Some(&k)) as usize;
            }
            l.observe(k);
        }
        hit as f64 / total as f64
    }

    #[test]
    fn learns_a_layer_cycle() {
        let seq: Vec<u64> = (0..50).flat_map(|_| 0..48u64).collect();
        assert!(accuracy(&seq, 2 * 48) > 0.999);
        let mut l = Learned::new(4096, 1024);
        seq.iter().for_each(|&k| l.observe(k));
        assert_eq!(l.period(), Some(48));
        assert_eq!(l.predict(3), vec![0, 1, 2]);
    }

    #[test]
    fn learns_cycles_with_repeated_keys() {
        // A period in which keys repeat (e.g. a shared embedding fetched twice per step).
        let cycle = [7u64, 1, 2, 7, 3, 4];
        let seq: Vec<u64> = (0..100).flat_map(|_| cycle).collect();
        assert!(accuracy(&seq, 12) > 0.999);
    }

    #[test]
    fn falls_back_to_successors_without_a_period() {
        // 0 -> 1 -> 2 -> 0 with a random extra key inserted now and then: no clean period,
        // but successor statistics still predict most steps.
        let mut seq = vec![];
        let mut x = 12345u64;
        for _ in 0..400 {
            seq.extend([0u64, 1, 2]);
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            if x >> 60 == 0 {
                seq.push(100 + (x >> 32) % 50);
            }
        }
        assert!(accuracy(&seq, 30) > 0.85, "{}", accuracy(&seq, 30));
    }

    #[test]
    fn sizes_from_the_caller_are_bounded() {
        assert!(matches!(
            Learned::try_new(MAX_HISTORY + 1, 8),
            Err(Error::InvalidArgument(_))
        ));
        let mut l = Learned::try_new(MAX_HISTORY, 8).unwrap();
        l.observe(1);
        l.observe(1);
        l.observe(1);
        assert!(matches!(
            l.try_predict(MAX_PREDICT + 1),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(l.predict(usize::MAX).len(), MAX_PREDICT);
        assert_eq!(Learned::new(usize::MAX, usize::MAX).capacity, MAX_HISTORY);
    }

    #[test]
    fn random_requests_predict_little_and_never_fail() {
        let mut x = 99u64;
        let seq: Vec<u64> = (0..5000)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) % 1000
            })
            .collect();
        assert!(accuracy(&seq, 100) < 0.05);
    }
}
