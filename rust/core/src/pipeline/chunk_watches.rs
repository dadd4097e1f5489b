//! Write watches over source chunks (page-protection validation), optionally kept armed
//! between uses.
//!
//! Arming a chunk costs two `mprotect` calls over its pages (read-only before the snapshot,
//! writable again when the watch is dropped), and the first one shoots down the TLB entries
//! of every core running this process. Sources that a serving loop sends again and again
//! without writing them (offloaded weights, LoRA adapters, KV blocks between swaps) pay that
//! on every prediction. With `keep_armed = N`, a consumed chunk's watch is not dropped but
//! kept, still armed, for the next prediction of the same memory range: if nothing wrote the
//! pages meanwhile, arming it again is a load. Up to `N` chunks are kept (least recently used
//! ones are released first); each keeps its source alive and its pages read-only until it is
//! released: by eviction, by [`ChunkWatches::forget`] or when the pipeline closes.
//!
//! Only pages wholly inside the chunk's source are watched: a source that does not start or
//! end on a page boundary shares its first or last page with other memory (a neighbouring
//! allocation, the allocator's header), whose writes would cost spurious re-encryptions and,
//! with the mprotect tracker, make kernel writes into it fail with EFAULT. The chunk's bytes
//! on such a page ([`Edges`]: less than a page at either end) are validated by fingerprint
//! instead; a chunk with no whole page of its source is validated by fingerprint alone.
//!
//! Safety argument for keeping pages protected past the request: a kept watch holds a
//! reference to its source, so the memory cannot be freed (and the range reused by another
//! mapping) while it is protected; a write by this process's code faults once, is recorded
//! and goes ahead exactly as during speculation.

use super::source::{ChunkKey, Source};
use crate::locks::lock;
use crate::writeguard::{Stamp, WriteWatch};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Most chunks a pipeline may keep armed: half the process-wide region table, so in-flight
/// watches (and other pipelines) still find slots.
pub const MAX_KEEP_ARMED: usize = crate::writeguard::MAX_REGIONS / 2;

struct Kept {
    watch: WriteWatch,
    source: Source,
    tick: u64,
}

#[derive(Default)]
struct State {
    kept: HashMap<ChunkKey, Kept>,
    /// Use order of `kept`: the smallest tick is released first.
    order: BTreeMap<u64, ChunkKey>,
    tick: u64,
    closed: bool,
}

impl State {
    fn remove(&mut self, key: &ChunkKey) -> Option<Kept> {
        let k = self.kept.remove(key)?;
        self.order.remove(&k.tick);
        Some(k)
    }
}

/// A pipeline's write watches.
pub(crate) struct ChunkWatches {
    keep: usize,
    state: Mutex<State>,
    /// Arms that found the chunk's pages still protected from an earlier use.
    reused: AtomicU64,
}

/// The bytes at the start (`head`) and end (`tail`) of a chunk that lie on pages its source
/// shares with other memory: not watched, validated by fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Edges {
    pub head: usize,
    pub tail: usize,
}

impl Edges {
    pub fn is_empty(&self) -> bool {
        self.head == 0 && self.tail == 0
    }
}

/// The part of `key`'s chunk to watch, as (start, length), and its edges; None if no page
/// of the chunk lies wholly inside the source.
fn watched_part(key: &ChunkKey, page: usize) -> Option<(usize, usize, Edges)> {
    let (src_start, src_end) = (key.addr, key.addr + key.source_len);
    let (start, end) = (src_start + key.offset, src_start + key.offset + key.len);
    // Pages wholly inside the source, clipped to the chunk's pages.
    let first = src_start.div_ceil(page) * page;
    let last = src_end / page * page;
    let from = start.max(first);
    let to = end.min(last);
    if from >= to {
        return None;
    }
    Some((
        from,
        to - from,
        Edges {
            head: from - start,
            tail: end - to,
        },
    ))
}

/// A watch in use by one ring entry. Dropping it hands it back to its pipeline's keep (or,
/// without one, unregisters it: its pages become writable).
pub(crate) struct HeldWatch {
    watch: Option<WriteWatch>,
    edges: Edges,
    source: Option<Source>,
    key: ChunkKey,
    home: Weak<ChunkWatches>,
}

impl HeldWatch {
    /// The chunk's bytes this watch does not cover (see [`Edges`]).
    pub fn edges(&self) -> Edges {
        self.edges
    }

    pub fn unchanged_since(&self, stamp: Stamp) -> bool {
        self.watch
            .as_ref()
            .is_some_and(|w| w.unchanged_since(stamp))
    }
}

impl Drop for HeldWatch {
    fn drop(&mut self) {
        let (Some(watch), Some(source)) = (self.watch.take(), self.source.take()) else {
            return;
        };
        match self.home.upgrade() {
            Some(home) => home.put_back(self.key, watch, source),
            None => release(watch, source),
        }
    }
}

/// Unprotects and unregisters `watch`, then lets go of the memory: in that order, so the
/// pages are never protected after their owner may have freed them.
fn release(watch: WriteWatch, source: Source) {
    drop(watch);
    drop(source);
}

impl ChunkWatches {
    pub fn new(keep: usize) -> Arc<Self> {
        Arc::new(Self {
            keep,
            state: Mutex::new(State::default()),
            reused: AtomicU64::new(0),
        })
    }

    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    pub fn kept(&self) -> usize {
        lock(&self.state).kept.len()
    }

    /// Write-protects the memory of `key` (a range of `source`) and returns the watch with
    /// the stamp to check it against later; None where the pages cannot be protected (the
    /// caller then falls back to fingerprints).
    pub fn arm(self: &Arc<Self>, source: &Source, key: ChunkKey) -> Option<(HeldWatch, Stamp)> {
        let (from, len, edges) = watched_part(&key, crate::writeguard::page())?;
        let kept = if self.keep > 0 {
            lock(&self.state).remove(&key)
        } else {
            None
        };
        let (watch, source) = match kept {
            Some(k) => (k.watch, k.source),
            None => {
                // SAFETY: the returned HeldWatch holds `source` (a reference to this memory)
                // for as long as it holds the watch, and drops the watch first (`release`), so
                // the memory stays mapped while it is watched. The pipeline's documentation of
                // `Validation::PageProtection` makes the caller promise that only user-space
                // code writes its sources.
                // `[from, from + len)` lies inside the source's bytes (`watched_part`).
                let w = unsafe { WriteWatch::register(from as *const u8, len) }.ok()?;
                (w, source.clone())
            }
        };
        let stamp = match watch.arm_again() {
            Ok((s, still_protected)) => {
                // Only a kept watch can have been armed before.
                if still_protected {
                    self.reused.fetch_add(1, Ordering::Relaxed);
                }
                s
            }
            Err(_) => {
                release(watch, source);
                return None;
            }
        };
        let home = if self.keep > 0 {
            Arc::downgrade(self)
        } else {
            Weak::new()
        };
        Some((
            HeldWatch {
                watch: Some(watch),
                edges,
                source: Some(source),
                key,
                home,
            },
            stamp,
        ))
    }

    fn put_back(&self, key: ChunkKey, watch: WriteWatch, source: Source) {
        let mut out = Vec::new();
        {
            let mut st = lock(&self.state);
            if st.closed || st.kept.contains_key(&key) {
                out.push((watch, source));
            } else {
                st.tick += 1;
                let tick = st.tick;
                st.order.insert(tick, key);
                st.kept.insert(
                    key,
                    Kept {
                        watch,
                        source,
                        tick,
                    },
                );
                while st.kept.len() > self.keep {
                    let (_, oldest) = st.order.pop_first().expect("order mirrors kept");
                    let k = st.kept.remove(&oldest).expect("order mirrors kept");
                    out.push((k.watch, k.source));
                }
            }
        }
        // The mprotect calls happen outside the lock.
        for (w, s) in out {
            release(w, s);
        }
    }

    /// Releases the kept watches over any byte of `[addr, addr + len)`; returns how many.
    pub fn forget(&self, addr: usize, len: usize) -> usize {
        let forgotten = crate::span::Span::of(addr, len.max(1));
        let gone: Vec<Kept> = {
            let mut st = lock(&self.state);
            let keys: Vec<ChunkKey> = st
                .kept
                .keys()
                .filter(|k| {
                    crate::span::Span::of(k.addr + k.offset, k.len.max(1)).overlaps(forgotten)
                })
                .copied()
                .collect();
            keys.iter().filter_map(|k| st.remove(k)).collect()
        };
        let n = gone.len();
        for k in gone {
            release(k.watch, k.source);
        }
        n
    }

    /// Releases every kept watch; watches handed back later are released at once.
    pub fn close(&self) {
        let gone: Vec<Kept> = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.order.clear();
            st.kept.drain().map(|(_, k)| k).collect()
        };
        for k in gone {
            release(k.watch, k.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::source::split;
    use crate::pipeline::SourceBytes;
    use crate::staging::StagingBuf;

    struct Pages(StagingBuf);
    impl SourceBytes for Pages {
        fn bytes(&self) -> &[u8] {
            self.0.as_slice()
        }
    }

    fn source(pages: usize) -> (Source, *mut u8) {
        let mut b = StagingBuf::alloc(pages * 4096).unwrap();
        let p = b.as_mut_slice().as_mut_ptr();
        (Arc::new(Pages(b)), p)
    }

    #[test]
    fn only_pages_wholly_inside_the_source_are_watched() {
        let key = |addr, source_len, offset, len| ChunkKey {
            addr,
            source_len,
            offset,
            len,
        };
        let p = 4096;
        // Page-aligned source, chunks of whole pages: all watched.
        assert_eq!(
            watched_part(&key(p, 4 * p, 0, 2 * p), p),
            Some((p, 2 * p, Edges::default()))
        );
        // A source starting 16 bytes into a page (a large malloc): its first page is
        // shared with the allocator's header, its last with whatever follows.
        let k = key(p + 16, 3 * p, 0, 3 * p);
        assert_eq!(
            watched_part(&k, p),
            Some((
                2 * p,
                2 * p,
                Edges {
                    head: p - 16,
                    tail: 16
                }
            ))
        );
        // A chunk of that source starting on its shared first page and ending inside the
        // source: the head by fingerprint, the end's page (all the source's) watched.
        let k = key(p + 16, 3 * p, 100, 2 * p);
        assert_eq!(
            watched_part(&k, p),
            Some((
                2 * p,
                p + 116,
                Edges {
                    head: p - 16 - 100,
                    tail: 0
                }
            ))
        );
        // A small source on a shared page: nothing to watch.
        assert_eq!(watched_part(&key(p + 8, 100, 0, 100), p), None);
    }

    #[test]
    fn a_kept_watch_is_reused_until_its_pages_are_written() {
        let w = ChunkWatches::new(4);
        let (src, p) = source(2);
        let key = split(&src, 0, None, 8192).unwrap()[0].key;
        let (h, s) = w.arm(&src, key).unwrap();
        assert!(h.unchanged_since(s));
        drop(h);
        assert_eq!(w.kept(), 1);
        let (h, s) = w.arm(&src, key).unwrap();
        assert_eq!(w.reused(), 1, "still protected: no mprotect");
        assert!(h.unchanged_since(s));
        drop(h);
        // A write while it is kept (between uses) is recorded and goes ahead.
        // SAFETY: `p` points into the 2-page buffer that `src` owns and keeps alive; the
        // write faults once (protected page) and the handler lets it through.
        unsafe { std::ptr::write_volatile(p.add(100), 7) };
        assert_eq!(src.bytes()[100], 7);
        let (h, s2) = w.arm(&src, key).unwrap();
        assert_eq!(w.reused(), 1, "written: armed afresh, not reused");
        assert_ne!(s, s2, "a fresh stamp after the write");
        assert!(h.unchanged_since(s2));
        // SAFETY: as above, offset 5000 is inside the buffer.
        unsafe { std::ptr::write_volatile(p.add(5000), 8) };
        assert!(!h.unchanged_since(s2), "a write while in use is seen");
    }

    #[test]
    fn the_least_recently_used_watch_is_released_first() {
        let w = ChunkWatches::new(2);
        let srcs: Vec<(Source, *mut u8)> = (0..3).map(|_| source(1)).collect();
        for (s, _) in &srcs {
            let key = split(s, 0, None, 4096).unwrap()[0].key;
            drop(w.arm(s, key).unwrap());
        }
        assert_eq!(w.kept(), 2);
        // The first source was released: its pages are writable without a fault being
        // needed, and arming it again is not a reuse.
        let key0 = split(&srcs[0].0, 0, None, 4096).unwrap()[0].key;
        drop(w.arm(&srcs[0].0, key0).unwrap());
        assert_eq!(w.reused(), 0);
        let key2 = split(&srcs[2].0, 0, None, 4096).unwrap()[0].key;
        drop(w.arm(&srcs[2].0, key2).unwrap());
        assert_eq!(w.reused(), 1, "the most recent one was kept");
    }

    #[test]
    fn forget_and_close_make_pages_writable_and_let_sources_go() {
        let w = ChunkWatches::new(8);
        let (src, p) = source(2);
        let key = split(&src, 0, None, 8192).unwrap()[0].key;
        drop(w.arm(&src, key).unwrap());
        assert_eq!(
            Arc::strong_count(&src),
            2,
            "the kept watch holds the source"
        );
        assert!(!writable(p as usize), "kept armed between uses");
        assert_eq!(w.forget(p as usize + 4096, 1), 1);
        assert_eq!(Arc::strong_count(&src), 1);
        // (The userfaultfd tracker leaves released pages protected: writes to them always
        // succeed, see `writeguard`.)
        assert!(
            uffd() || writable(p as usize),
            "forget made the pages writable"
        );
        drop(w.arm(&src, key).unwrap());
        w.close();
        assert_eq!(w.kept(), 0);
        assert_eq!(Arc::strong_count(&src), 1);
        // After close, a handed-back watch is released at once.
        let (h, _) = w.arm(&src, key).unwrap();
        drop(h);
        assert_eq!(w.kept(), 0);
        assert_eq!(Arc::strong_count(&src), 1);
        assert!(
            uffd() || writable(p as usize),
            "close left the pages writable"
        );
    }

    fn uffd() -> bool {
        crate::writeguard::tracker_name() == "uffd"
    }

    fn writable(addr: usize) -> bool {
        !crate::writeguard::page_protected(addr)
    }

    #[test]
    fn without_keep_every_watch_is_released_after_use() {
        let w = ChunkWatches::new(0);
        let (src, _) = source(1);
        let key = split(&src, 0, None, 4096).unwrap()[0].key;
        drop(w.arm(&src, key).unwrap());
        assert_eq!(w.kept(), 0);
        assert_eq!(Arc::strong_count(&src), 1);
    }
}
