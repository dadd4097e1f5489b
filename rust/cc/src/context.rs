//! What the interposer keeps per EVP encryption context: its key and confirmation, its IV
//! model, where its current message stands, the chunks prepared for its next IVs and those
//! being made, and what it has learned of the chunks it encrypts (the learned model, the
//! current copy's stream, the outcomes of recent predictions). The decisions made on it are
//! the engine's (`engine`); what is planned next, `plan`.

use crate::ivmodel::{Iv, IvModel};
use pipellm_core::crypto::AeadKey;
use pipellm_core::fingerprint::Fingerprint;
use pipellm_core::predict::Learned;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use zeroize::Zeroizing;

pub const TAG_LEN: usize = 16;
pub type Tag = [u8; TAG_LEN];

/// A pre-encrypted chunk, ready for the message that uses `iv`.
pub struct Prepared {
    pub input: usize,
    pub len: usize,
    pub ct: Vec<u8>,
    pub tag: Tag,
    /// The message cut into pieces, and each piece's fingerprint at encryption time (no
    /// fingerprints for a chunk of a watched range: `watch_ranges` validates it instead).
    pub ranges: Vec<(usize, usize)>,
    pub fps: Vec<Fingerprint>,
    pub watched: Option<crate::watch_ranges::SpanStamp>,
}

/// Where the current message of a context stands.
pub enum Msg {
    /// No message started since the last tag, or one we do not follow.
    Idle,
    /// Init with an IV seen, no data yet.
    Fresh,
    /// Served from a pre-encrypted chunk; the real context has not seen the data. It stays
    /// here until the next init with an IV (or reset, free), so that every call until then
    /// answers as OpenSSL would: a second Final fails, GET_TAG repeats the tag, and any other
    /// call first replays the message into the real context (`take_hit_for_resync`).
    Hit {
        prepared: Prepared,
        finalized: bool,
        /// GET_TAG answered once: the message was learned and the next ones planned.
        planned: bool,
    },
    /// Encrypted by the real library in one Update call. `ours`: the tag our AES-GCM gave
    /// the same input, when this message confirms the key (computed during the Update,
    /// checked at GET_TAG: no buffer of the caller is read after its call returned).
    Missed {
        input: usize,
        len: usize,
        ours: Option<Tag>,
    },
    /// Something else (AAD, several updates, other calls): forwarded only.
    Untracked,
    /// A message that started as the driver's pattern (its first Update is known) and then
    /// took an extra Update: forwarded, but still learned, so the history keeps every message.
    Diverted { input: usize, len: usize },
}

pub struct CtxState {
    /// AES-256-GCM, encrypting, default engine and IV length.
    pub tracked: bool,
    pub key: Option<Arc<AeadKey>>,
    /// The raw key, to tell a re-init with the same key (kept state) from a new key.
    pub(crate) key_bytes: Option<Zeroizing<[u8; 32]>>,
    /// OpenSSL's context holds `key` now (an init naming a cipher drops it until one comes).
    pub(crate) key_set: bool,
    /// The tag OpenSSL's context would hold as its last one, where the real context holds an
    /// older one: set when a served, finalized message ends at an init (the real context
    /// never computed its tag), cleared when the real context finishes a message of its own.
    /// GET_TAG and get_params answer with it (after the real call validated the request).
    /// Kept across key changes and untracking: only reset, free and a real Final end it.
    pub buf_tag: Option<Tag>,
    /// The real context finished the current message (its Final succeeded): only then does a
    /// GET_TAG return this message's tag, which may confirm the key and is learned.
    pub(crate) final_seen: bool,
    /// Bumped at every key change: pre-encryption results for an older key are discarded.
    pub gen: u64,
    /// Our AES-GCM reproduced the real library's output under this key.
    pub confirmed: bool,
    /// True once confirmation failed for this key: never try again (log once).
    pub refused: bool,
    pub iv: Option<Iv>,
    pub msg: Msg,
    pub model: IvModel,
    pub(crate) model_logged: bool,
    pub history: Learned,
    /// Learned works on u64 keys: each (input, len) pair gets one.
    pub(crate) keys: HashMap<(usize, usize), u64>,
    pub(crate) spans: Vec<(usize, usize)>,
    pub prepared: HashMap<Iv, Prepared>,
    /// The chunk of the message before, and how many messages in a row continued the one
    /// before them (the current stream's length so far).
    pub(crate) last_span: Option<(usize, usize)>,
    pub(crate) streak: usize,
    /// The current stream's number: bumped by every message that does not continue the one
    /// before it.
    pub(crate) stream: u64,
    /// IVs whose in-flight or prepared chunk is a continuation guess, with the stream that
    /// guessed it: a guess of a stream that has since ended (a copy's continuation past its
    /// end) gives way to the continuation of the stream that began instead.
    pub(crate) guesses: HashMap<Iv, u64>,
    /// IVs a chunk was queued for (since their message came): a message whose IV had one but
    /// finds nothing prepared or in flight (the guess was thrown away as the prediction
    /// changed) is a prediction that failed, for probing as much as one made from other
    /// memory; without it, a pattern whose guesses change before their IVs come (a random
    /// order) would keep the workers busy and never be counted.
    pub(crate) planned: std::collections::HashSet<Iv>,
    /// IVs being pre-encrypted, each with the chunk it is being encrypted from: a result
    /// for a chunk the prediction no longer expects at that IV is thrown away (`settle`).
    pub inflight: HashMap<Iv, (usize, usize)>,
    /// When a worker began each in-flight chunk (absent while it waits in the queue).
    pub(crate) started: HashMap<Iv, Instant>,
    /// While probing: the message predicted for an IV, not encrypted (see PROBE_BELOW_HITS).
    pub(crate) shadow: Option<(Iv, (usize, usize))>,
    /// Outcomes of the last 32 messages that had a prediction (bit set: served), newest in
    /// bit 0; `outcomes_seen` counts them up to 32.
    pub(crate) outcomes: u32,
    pub(crate) outcomes_seen: u32,
    /// The IV of the message whose outcome was recorded last (see `record`).
    pub(crate) recorded_for: Option<Iv>,
}

/// A context whose recent predictions mostly failed is only *probed*: its next message is
/// predicted but not encrypted (a shadow prediction, checked when the message comes), so
/// an unpredictable pattern costs the workers nothing and the caller only the bookkeeping;
/// once enough shadow predictions hold, pre-encryption resumes.
pub(crate) const PROBE_BELOW_HITS: u32 = 8;

impl CtxState {
    /// Records the outcome of the current message's prediction, once per message: the first
    /// outcome stands (a probed message's shadow, whatever then happens to a chunk prepared
    /// for its IV before probing began).
    pub(crate) fn record(&mut self, served: bool) {
        if self.iv.is_some() {
            if self.recorded_for == self.iv {
                return;
            }
            self.recorded_for = self.iv;
        }
        self.outcomes = (self.outcomes << 1) | served as u32;
        self.outcomes_seen = (self.outcomes_seen + 1).min(32);
    }

    pub(crate) fn probing(&self) -> bool {
        self.outcomes_seen >= 32 && self.outcomes.count_ones() < PROBE_BELOW_HITS
    }

    pub(crate) fn new(gen: u64) -> Self {
        Self {
            tracked: false,
            key: None,
            key_bytes: None,
            key_set: false,
            buf_tag: None,
            final_seen: false,
            gen,
            confirmed: false,
            refused: false,
            iv: None,
            msg: Msg::Idle,
            model: IvModel::new(),
            model_logged: false,
            history: Learned::new(4096, 1024),
            keys: HashMap::new(),
            spans: Vec::new(),
            prepared: HashMap::new(),
            last_span: None,
            streak: 0,
            stream: 0,
            guesses: HashMap::new(),
            planned: std::collections::HashSet::new(),
            inflight: HashMap::new(),
            started: HashMap::new(),
            shadow: None,
            outcomes: 0,
            outcomes_seen: 0,
            recorded_for: None,
        }
    }

    pub(crate) fn key_of(&mut self, span: (usize, usize)) -> u64 {
        if let Some(&k) = self.keys.get(&span) {
            return k;
        }
        if self.spans.len() >= 1 << 16 {
            // A program touching this many distinct buffers gets no benefit from the table;
            // start over rather than grow without bound.
            self.keys.clear();
            self.spans.clear();
            self.history = Learned::new(4096, 1024);
        }
        let k = self.spans.len() as u64;
        self.spans.push(span);
        self.keys.insert(span, k);
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_predictions_switch_to_probing_and_hits_end_it() {
        let mut st = CtxState::new(1);
        assert!(!st.probing(), "no evidence yet");
        for _ in 0..32 {
            st.record(false);
        }
        assert!(st.probing());
        for _ in 0..PROBE_BELOW_HITS - 1 {
            st.record(true);
        }
        assert!(st.probing(), "one hit short");
        st.record(true);
        assert!(!st.probing());
    }

    #[test]
    fn a_message_has_one_outcome() {
        let mut st = CtxState::new(1);
        st.iv = Some([1; 12]);
        st.record(true); // its shadow held
        st.record(false); // then the chunk prepared before probing turned out stale
        assert_eq!(
            (st.outcomes, st.outcomes_seen),
            (1, 1),
            "the first outcome stands"
        );
        st.iv = Some([2; 12]);
        st.record(false);
        assert_eq!(
            (st.outcomes, st.outcomes_seen),
            (0b10, 2),
            "the next message's own"
        );
    }
}
