//! What to pre-encrypt next for a context, once a message is finished: the learned model's
//! prediction where it has one, else the copy's continuation (docs/driver-backend.md, "What
//! is pre-encrypted"), paired with the IV model's next IVs, minus what is prepared or being
//! made already; what is no longer expected is thrown away here too.

use crate::config::config;
use crate::context::CtxState;
use crate::ivmodel::{Iv, ModelState};
use crate::stats::{stats, Stats};
use crate::workers::{workers, Job};
use std::collections::HashMap;

/// Learns a finished message and lists the chunks to pre-encrypt next.
pub fn complete(ctx: usize, st: &mut CtxState, span: (usize, usize)) -> Vec<Job> {
    let k = st.key_of(span);
    st.history.observe(k);
    // How far a copy's continuation is guessed grows with the stream seen so far: two
    // chunks ahead after a copy's first (one would leave a worker a single device gap to
    // encrypt it in), one more for each chunk that continued the one before, up to the
    // lookahead. A long copy (a model load) is soon covered as far as
    // the lookahead goes; short copies and unrelated chunks cost the workers little (what
    // a stream's end wastes is about as long as the stream was, at most the lookahead).
    let continues = st
        .last_span
        .is_some_and(|(i, l)| l == span.1 && i.checked_add(l) == Some(span.0));
    st.streak = if continues { st.streak + 1 } else { 0 };
    if !continues {
        st.stream += 1;
    }
    st.last_span = Some(span);
    let mut jobs = Vec::new();
    let cfg = config();
    let Some(key) = st.key.clone() else {
        return jobs;
    };
    if !st.confirmed
        || st.model.state() != ModelState::Bound
        || crate::process::stopped()
        || crate::process::forked()
        || workers().unavailable()
    {
        return jobs; // nothing in flight would ever settle (see `Workers::unavailable`)
    }
    let mut wanted = HashMap::new();
    let probing = st.probing();
    st.shadow = None;
    let depth = if probing { 1 } else { cfg.depth };
    // Messages ahead already covered (pre-encrypted, in flight, or too small to bother),
    // counted from the next one until the first that is not.
    let mut covered_ahead = 0;
    let mut counting = true;
    // What the learned model expects, or where it expects nothing (a copy this context
    // never made: a model load, a first KV restore), the copy's continuation: the next
    // chunks of the same length right after this one. A stream that ends there costs at
    // most `depth` encryptions (`jobs_dropped`; unmapped memory beyond an allocation is
    // never read, `jobs_unreadable`), and a context whose predictions keep failing is
    // only probed (see `probing`).
    let learned = st.history.predict(depth);
    let continued = learned.is_empty();
    let ahead: Vec<(usize, usize)> = if continued {
        let mut next = continuation(span, depth.min(st.streak + 1));
        // A copy from a watched range does not go on past the range's end: the
        // registrant said where that buffer ends.
        if let Some(end) = crate::watch_ranges::range_end(span.0, span.1) {
            next.retain(|&(i, l)| i.checked_add(l).is_some_and(|e| e <= end));
        }
        // Nor into memory this context already sent (the copy before it, laid out
        // next to it): a copy made for the first time reads each chunk once.
        if let Some(seen) = next.iter().position(|s| st.keys.contains_key(s)) {
            next.truncate(seen);
        }
        next
    } else {
        learned.into_iter().map(|k| st.spans[k as usize]).collect()
    };
    for (j, (input, len)) in ahead.into_iter().enumerate() {
        let Some(iv) = st.model.predict(j as u64 + 1) else {
            break;
        };
        if probing {
            st.shadow = Some((iv, (input, len)));
            break;
        }
        // Covered: a chunk for this IV made (or being made) from this very memory. One
        // from other memory (an earlier guess: a continuation past the end of a copy) is
        // replaced where the learned model says so. A continuation is only a guess: it
        // fills IVs that have nothing, and displaces nothing (so a moment without a
        // learned prediction costs a learned pattern nothing).
        let made = st.prepared.get(&iv).map(|p| (p.input, p.len));
        let making = st.inflight.get(&iv).copied();
        // The exception: what is there was guessed by a stream that has ended since.
        let superseded = continued && st.guesses.get(&iv).is_some_and(|&s| s != st.stream);
        let covered = if continued {
            (made.is_some() || making.is_some()) && !superseded
        } else {
            made == Some((input, len)) || making == Some((input, len))
        };
        wanted.insert(iv, (!continued).then_some((input, len)));
        if len < cfg.min_bytes.max(1) || covered {
            covered_ahead += counting as usize;
            continue;
        }
        counting = false;
        if continued {
            Stats::add(&stats().continued, 1);
        }
        jobs.push(Job {
            ctx,
            gen: st.gen,
            key: key.clone(),
            iv,
            input,
            len,
        });
    }
    // A continuation keeps whatever is there for every IV of the lookahead, not only those
    // it guessed: a window cut short (a stream's first chunks, a watched range's end,
    // memory already sent) says nothing of the later IVs, whose chunks (learned earlier)
    // may still come; one that does not is thrown away when its IV comes (`settle`).
    if continued {
        for j in 1..=depth as u64 {
            let Some(iv) = st.model.predict(j) else {
                break;
            };
            wanted.entry(iv).or_insert(None);
        }
    }
    // Refill in batches: while the next messages are covered, wait until half the
    // lookahead is missing, so that one worker wake-up (a syscall on the driver's
    // critical path) queues several chunks instead of one per message.
    let half = (depth / 2).max(1);
    if jobs.len() < half && covered_ahead >= half {
        jobs.clear();
    }
    if st.planned.len() > 4 * depth {
        st.planned.clear(); // IVs that never came (a bound, not a rule)
    }
    for j in &jobs {
        st.inflight.insert(j.iv, (j.input, j.len));
        st.planned.insert(j.iv);
        if continued {
            if st.guesses.insert(j.iv, st.stream).is_some() {
                // It replaces an ended stream's guess (`superseded`): that result, made
                // or to come, is thrown away (`settle` compares the in-flight chunk).
                st.started.remove(&j.iv);
                if let Some(p) = st.prepared.remove(&j.iv) {
                    Stats::add(&stats().jobs_dropped, 1);
                    workers().recycle(p.ct);
                }
            }
        } else {
            st.guesses.remove(&j.iv);
        }
    }
    // Chunks for IVs the prediction no longer expects (or expects from other memory)
    // will never be used.
    let expected = |iv: &Iv, span: (usize, usize)| match wanted.get(iv) {
        Some(None) => true, // a continuation keeps whatever is there
        Some(Some(w)) => *w == span,
        None => false,
    };
    let stale: Vec<Iv> = st
        .prepared
        .iter()
        .filter(|(iv, p)| !expected(iv, (p.input, p.len)))
        .map(|(iv, _)| *iv)
        .collect();
    for iv in stale {
        if let Some(p) = st.prepared.remove(&iv) {
            Stats::add(&stats().jobs_dropped, 1);
            workers().recycle(p.ct);
        }
    }
    st.inflight.retain(|iv, span| expected(iv, *span));
    let (inflight, prepared) = (&st.inflight, &st.prepared);
    st.started.retain(|iv, _| inflight.contains_key(iv));
    st.guesses
        .retain(|iv, _| inflight.contains_key(iv) || prepared.contains_key(iv));
    jobs
}

/// The `n` chunks that follow `(input, len)` in the same copy: `(input + len, len)`, then
/// `(input + 2 len, len)`, and so on (fewer where the addresses would wrap).
fn continuation((input, len): (usize, usize), n: usize) -> Vec<(usize, usize)> {
    if len == 0 {
        return Vec::new();
    }
    (1..=n)
        .map_while(|k| Some((input.checked_add(len.checked_mul(k)?)?, len)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Prepared;
    use pipellm_core::crypto::AeadKey;
    use std::sync::Arc;

    /// A context bound to a counter IV layout, its key confirmed, that never sent anything.
    fn bound_context() -> CtxState {
        let mut st = CtxState::new(1);
        st.key = Some(Arc::new(AeadKey::new(&[5u8; 32]).unwrap()));
        st.confirmed = true;
        for c in 1..=4u32 {
            let mut iv = [0u8; 12];
            iv[..4].copy_from_slice(&c.to_le_bytes());
            st.model.observe(&iv);
        }
        assert_eq!(st.model.state(), ModelState::Bound);
        st
    }

    fn prepared(input: usize, len: usize) -> Prepared {
        Prepared {
            input,
            len,
            ct: vec![0; 16],
            tag: [0; 16],
            ranges: Vec::new(),
            fps: Vec::new(),
            watched: None,
        }
    }

    #[test]
    fn a_short_continuation_keeps_what_is_prepared_for_later_ivs() {
        let mut st = bound_context();
        let len = 1 << 20;
        // Chunks made for IVs three and five ahead, from memory elsewhere (learned earlier).
        let (third, fifth) = (st.model.predict(3).unwrap(), st.model.predict(5).unwrap());
        st.prepared.insert(third, prepared(0x9000_0000, len));
        st.prepared.insert(fifth, prepared(0xa000_0000, len));
        // A copy's first chunk: nothing learned, so its continuation, one chunk ahead.
        let jobs = complete(0, &mut st, (0x4000_0000, len));
        assert_eq!(jobs.len(), 1, "one chunk of the continuation");
        assert_eq!(
            (jobs[0].input, jobs[0].iv),
            (0x4000_0000 + len, st.model.predict(1).unwrap())
        );
        assert!(
            st.prepared.contains_key(&third) && st.prepared.contains_key(&fifth),
            "a window cut short threw away chunks for IVs it said nothing of"
        );
        // Past the lookahead, nothing is kept.
        let far = st.model.predict(config().depth as u64 + 1).unwrap();
        st.prepared.insert(far, prepared(0xb000_0000, len));
        complete(0, &mut st, (0x4000_0000 + len, len));
        assert!(
            !st.prepared.contains_key(&far),
            "a chunk beyond the lookahead is stale"
        );
    }

    #[test]
    fn the_continuation_of_a_chunk_is_the_next_chunks_of_its_copy() {
        assert_eq!(
            continuation((0x1000, 0x100), 3),
            vec![(0x1100, 0x100), (0x1200, 0x100), (0x1300, 0x100)]
        );
        assert_eq!(continuation((0x1000, 0), 3), vec![]);
        assert_eq!(
            continuation((usize::MAX - 0x250, 0x100), 3),
            vec![(usize::MAX - 0x150, 0x100), (usize::MAX - 0x50, 0x100)],
            "no address wraps"
        );
    }
}
