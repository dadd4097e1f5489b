//! Predicting the IVs a driver's encryption context will use next, without a profiling run.
//!
//! Hopper's layout (as the open-source driver builds it): IV = (32-bit message counter ‖ 64-bit channel counter,
//! little-endian) XOR a 12-byte per-key mask, one counter +1 per chunk. The mask is secret
//! and the counter's start is not visible, so the model keeps a few hypotheses, each a
//! complete explanation of the first IV it saw:
//! - which field counts (the 32-bit word at bytes 0..4 or the 64-bit word at 4..12, in
//!   little- or big-endian order), and
//! - where the counter started: at 0, at 1 (Hopper increments before use), or at the value
//!   the field shows (no mask on that field).
//!
//! Each hypothesis fixes a mask (`first IV XOR encode(start)`) and so predicts every later IV.
//! A hypothesis that mispredicts an observed IV is dropped; the model is *bound* once a
//! hypothesis has predicted `CONFIRM` IVs in a row. If none survives, the model starts again
//! from the IV that broke it (a key rotation or a re-keyed context looks like that); after
//! `MAX_RESEEDS` failed starts it gives up and the context stays in pass-through.
//!
//! Correctness never depends on this model: a pre-encrypted chunk is handed out only when its
//! IV equals, byte for byte, the IV the driver set. A wrong model costs misses, nothing else.

pub const IV_LEN: usize = 12;
pub type Iv = [u8; IV_LEN];

/// Consecutive correct predictions before the model is trusted.
pub const CONFIRM: u32 = 2;
/// Fresh starts allowed after the model breaks, before the context is given up.
pub const MAX_RESEEDS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Msg32Le,
    Chan64Le,
    Msg32Be,
    Chan64Be,
}

impl Field {
    const ALL: [Field; 4] = [
        Field::Msg32Le,
        Field::Chan64Le,
        Field::Msg32Be,
        Field::Chan64Be,
    ];

    fn range(self) -> std::ops::Range<usize> {
        match self {
            Field::Msg32Le | Field::Msg32Be => 0..4,
            Field::Chan64Le | Field::Chan64Be => 4..12,
        }
    }

    fn max(self) -> u64 {
        match self {
            Field::Msg32Le | Field::Msg32Be => u32::MAX as u64,
            Field::Chan64Le | Field::Chan64Be => u64::MAX,
        }
    }

    fn encode(self, v: u64) -> Iv {
        let mut iv = [0u8; IV_LEN];
        match self {
            Field::Msg32Le => iv[0..4].copy_from_slice(&(v as u32).to_le_bytes()),
            Field::Msg32Be => iv[0..4].copy_from_slice(&(v as u32).to_be_bytes()),
            Field::Chan64Le => iv[4..12].copy_from_slice(&v.to_le_bytes()),
            Field::Chan64Be => iv[4..12].copy_from_slice(&v.to_be_bytes()),
        }
        iv
    }

    fn decode(self, iv: &Iv) -> u64 {
        let r = self.range();
        match self {
            Field::Msg32Le => u32::from_le_bytes(iv[r].try_into().expect("4 bytes")) as u64,
            Field::Msg32Be => u32::from_be_bytes(iv[r].try_into().expect("4 bytes")) as u64,
            Field::Chan64Le => u64::from_le_bytes(iv[r].try_into().expect("8 bytes")),
            Field::Chan64Be => u64::from_be_bytes(iv[r].try_into().expect("8 bytes")),
        }
    }
}

fn xor(a: &Iv, b: &Iv) -> Iv {
    let mut o = [0u8; IV_LEN];
    for i in 0..IV_LEN {
        o[i] = a[i] ^ b[i];
    }
    o
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Hypothesis {
    field: Field,
    mask: Iv,
    /// The counter value of the last IV observed.
    counter: u64,
}

impl Hypothesis {
    fn iv_at(&self, ahead: u64) -> Option<Iv> {
        let c = self.counter.checked_add(ahead)?;
        (c <= self.field.max()).then(|| xor(&self.field.encode(c), &self.mask))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    /// Seen fewer than CONFIRM correct predictions since the last (re)start.
    Learning,
    /// Predictions can be used.
    Bound,
    /// Gave up: the context's IVs follow no layout we know.
    Rejected,
}

#[derive(Debug, Clone)]
pub struct IvModel {
    hypotheses: Vec<Hypothesis>,
    streak: u32,
    reseeds: u32,
    rejected: bool,
}

impl Default for IvModel {
    fn default() -> Self {
        Self::new()
    }
}

impl IvModel {
    pub fn new() -> Self {
        Self {
            hypotheses: Vec::new(),
            streak: 0,
            reseeds: 0,
            rejected: false,
        }
    }

    pub fn state(&self) -> ModelState {
        if self.rejected {
            ModelState::Rejected
        } else if self.streak >= CONFIRM && !self.hypotheses.is_empty() {
            ModelState::Bound
        } else {
            ModelState::Learning
        }
    }

    fn seed(&mut self, iv: &Iv) {
        self.hypotheses.clear();
        for f in Field::ALL {
            let shown = f.decode(iv);
            for start in [0, 1, shown] {
                let h = Hypothesis {
                    field: f,
                    mask: xor(iv, &f.encode(start)),
                    counter: start,
                };
                if !self.hypotheses.contains(&h) {
                    self.hypotheses.push(h);
                }
            }
        }
        self.streak = 0;
    }

    /// Records the IV the context was just given. Returns true if the model had predicted it.
    pub fn observe(&mut self, iv: &Iv) -> bool {
        if self.rejected {
            return false;
        }
        if self.hypotheses.is_empty() {
            self.seed(iv);
            return false;
        }
        self.hypotheses.retain_mut(|h| {
            if h.iv_at(1).as_ref() == Some(iv) {
                h.counter += 1;
                true
            } else {
                false
            }
        });
        if self.hypotheses.is_empty() {
            self.reseeds += 1;
            if self.reseeds > MAX_RESEEDS {
                self.rejected = true;
            } else {
                self.seed(iv);
            }
            return false;
        }
        self.streak = self.streak.saturating_add(1);
        true
    }

    /// The IV `ahead` messages after the last one observed (1 = the next), if the model is
    /// bound. Surviving hypotheses agree on everything seen; the first one speaks for all.
    pub fn predict(&self, ahead: u64) -> Option<Iv> {
        if self.state() != ModelState::Bound {
            return None;
        }
        self.hypotheses.first().and_then(|h| h.iv_at(ahead))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// IVs as Hopper lays them out: counter in `field`, XOR `mask`, first value `start`.
    fn stream(field: Field, mask: Iv, start: u64, n: u64) -> Vec<Iv> {
        (0..n)
            .map(|k| xor(&field.encode(start + k), &mask))
            .collect()
    }

    #[test]
    fn binds_on_masked_hopper_layout_and_predicts() {
        let mask = [0x5a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xff];
        for field in Field::ALL {
            for start in [0u64, 1] {
                let ivs = stream(field, mask, start, 10);
                let mut m = IvModel::new();
                for iv in &ivs[..4] {
                    m.observe(iv);
                }
                assert_eq!(m.state(), ModelState::Bound, "{field:?} start {start}");
                for k in 1..6 {
                    assert_eq!(m.predict(k), Some(ivs[3 + k as usize]), "{field:?}");
                }
            }
        }
    }

    #[test]
    fn carries_across_bytes_under_a_mask() {
        // 0x00ff -> 0x0100 flips two bytes: XOR-ing a constant difference would get it wrong.
        let mask = [0xaa; 12];
        let ivs = stream(Field::Chan64Le, mask, 0, 600);
        let mut m = IvModel::new();
        for iv in &ivs[..3] {
            m.observe(iv);
        }
        for k in 1..597u64 {
            assert_eq!(m.predict(k), Some(ivs[2 + k as usize]), "{k} ahead");
        }
    }

    #[test]
    fn random_ivs_are_rejected_and_never_predicted() {
        let mut m = IvModel::new();
        let mut x: u64 = 0x1234_5678;
        for _ in 0..50 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut iv = [0u8; 12];
            iv[..8].copy_from_slice(&x.to_le_bytes());
            iv[8..].copy_from_slice(&(x >> 13).to_le_bytes()[..4]);
            m.observe(&iv);
            assert_eq!(m.predict(1), None);
        }
        assert_eq!(m.state(), ModelState::Rejected);
    }

    #[test]
    fn a_jump_restarts_learning() {
        let mask = [3; 12];
        let mut m = IvModel::new();
        for iv in stream(Field::Msg32Le, mask, 1, 4) {
            m.observe(&iv);
        }
        assert_eq!(m.state(), ModelState::Bound);
        // a re-key: new mask, counter from 1 again
        let fresh = stream(Field::Msg32Le, [9; 12], 1, 4);
        m.observe(&fresh[0]);
        assert_eq!(m.state(), ModelState::Learning);
        assert_eq!(m.predict(1), None);
        for iv in &fresh[1..3] {
            m.observe(iv);
        }
        assert_eq!(m.predict(1), Some(fresh[3]));
    }

    #[test]
    fn counter_end_is_not_wrapped() {
        // Unmasked 32-bit counter running up to its end: after the carries have ruled out
        // every other explanation, nothing is predicted past u32::MAX.
        let ivs = stream(Field::Msg32Le, [0; 12], u32::MAX as u64 - 300, 301);
        let mut m = IvModel::new();
        for iv in &ivs {
            m.observe(iv);
        }
        assert_eq!(m.state(), ModelState::Bound);
        assert_eq!(
            m.predict(1),
            None,
            "a 32-bit counter at its end has no next IV"
        );
    }

    proptest! {
        /// Whatever the IVs, a prediction is only ever made for a model that explained every
        /// IV since its last start, and it is never an IV already observed since then
        /// (a counter never goes back).
        #[test]
        fn predictions_never_repeat_an_observed_iv(
            field in 0usize..4, mask in any::<[u8; 12]>(), start in 0u64..1_000_000,
            n in 1u64..40, noise in proptest::collection::vec(any::<[u8; 12]>(), 0..3)
        ) {
            let f = Field::ALL[field];
            let mut ivs = stream(f, mask, start, n);
            // noise somewhere in the middle
            let at = (n / 2) as usize;
            for (i, x) in noise.into_iter().enumerate() {
                ivs.insert((at + i).min(ivs.len()), x);
            }
            let mut m = IvModel::new();
            let mut since_start: Vec<Iv> = Vec::new();
            for iv in &ivs {
                let predicted = m.observe(iv);
                if !predicted {
                    since_start.clear();
                }
                since_start.push(*iv);
                for k in 1..4 {
                    if let Some(p) = m.predict(k) {
                        prop_assert!(!since_start.contains(&p));
                    }
                }
            }
        }

        /// On a clean Hopper-layout stream the model binds within CONFIRM + 1 IVs and then
        /// predicts every following IV exactly.
        #[test]
        fn clean_streams_are_predicted_exactly(
            field in 0usize..4, mask in any::<[u8; 12]>(), start in 0u64..2
        ) {
            let f = Field::ALL[field];
            let ivs = stream(f, mask, start, 12);
            let mut m = IvModel::new();
            for (i, iv) in ivs.iter().enumerate() {
                if i > CONFIRM as usize {
                    prop_assert_eq!(m.predict(1), Some(*iv));
                }
                m.observe(iv);
            }
        }
    }
}
