//! The ring of pre-encrypted chunks, in IV order: a bounded lock-free queue (after Dmitry
//! Vyukov's bounded MPMC queue) with many producers and one consumer that may look at the
//! whole window of queued entries, not only the head.
//!
//! The pipeline's planner pushes an entry for each predicted chunk in the order its IV was
//! reserved; workers fill the entries' staging buffers out of order (entries carry their own
//! synchronisation for that); the request path, the single [`Consumer`], looks for a match in
//! the window and takes entries strictly from the head. Each slot has a sequence number that
//! says which lap may use it next:
//!
//! - `seq == i`: free for the producer that claims index `i`;
//! - `seq == i + 1`: holds the entry of index `i`, readable by the consumer;
//! - after the consumer takes index `i`: `seq = i + capacity`, free for index `i + capacity`.
//!
//! Memory orderings (every atomic access is listed):
//! - producer `seq.load(Acquire)`: pairs with the consumer's `Release` store that frees the
//!   slot, so the consumer's move out of the cell happens-before our write into it;
//! - producer `tail.compare_exchange_weak(Relaxed, Relaxed)`: only arbitrates which producer
//!   gets index `i`; the data hand-off is ordered by `seq`, not by `tail`;
//! - `tail.load(Relaxed)`: a stale value only makes the CAS fail or the slot look busy;
//! - producer `seq.store(i + 1, Release)`: publishes the written entry;
//! - consumer `seq.load(Acquire)`: pairs with that store, so the entry is fully visible;
//! - consumer `seq.store(i + capacity, Release)`: hands the emptied slot to the next lap.
//!
//! The consumer's head is plain data: only the one `Consumer` value (which is not `Clone` and
//! whose methods take `&mut self`) reads or writes it.

use crate::sync::{AtomicU64, Ordering, UnsafeCell};
use std::sync::Arc;

struct Slot<T> {
    seq: AtomicU64,
    value: UnsafeCell<Option<T>>,
}

struct Shared<T> {
    slots: Box<[Slot<T>]>,
    tail: AtomicU64,
}

// SAFETY: entries move between threads (producer writes, consumer reads and takes), so T must
// be Send; access to each cell is exclusive by the seq protocol documented above (a producer
// writes only after winning index i on a slot with seq == i; the consumer reads only when
// seq == i + 1 and no producer may touch the slot again until the consumer's release store).
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as for Send; the consumer hands out `&T` from a shared reference only through
// `Consumer`, which requires T: Sync for that (see `Consumer::window`).
unsafe impl<T: Send> Sync for Shared<T> {}

/// The pushing side; cloneable, usable from any thread.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Producer<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// The one consuming side.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    head: u64,
}

/// A ring of `capacity` entries. At least 2: with one slot, "holds the entry of index i"
/// (`seq == i + 1`) and "free for index i + capacity" would be the same sequence number, and a
/// producer could write the slot while the consumer still reads it (loom found this).
pub fn ring<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let capacity = capacity.max(2);
    let slots = (0..capacity as u64)
        .map(|i| Slot {
            seq: AtomicU64::new(i),
            value: UnsafeCell::new(None),
        })
        .collect();
    let shared = Arc::new(Shared {
        slots,
        tail: AtomicU64::new(0),
    });
    (
        Producer {
            shared: shared.clone(),
        },
        Consumer { shared, head: 0 },
    )
}

impl<T> Shared<T> {
    fn cap(&self) -> u64 {
        self.slots.len() as u64
    }
    fn slot(&self, index: u64) -> &Slot<T> {
        &self.slots[(index % self.cap()) as usize]
    }
}

impl<T: Send> Producer<T> {
    /// Appends `value` at the next index, or gives it back when the ring is full.
    pub fn try_push(&self, value: T) -> Result<u64, T> {
        let sh = &*self.shared;
        let mut index = sh.tail.load(Ordering::Relaxed);
        loop {
            let slot = sh.slot(index);
            let seq = slot.seq.load(Ordering::Acquire);
            if seq == index {
                match sh.tail.compare_exchange_weak(
                    index,
                    index + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: we won index `index` on a slot whose seq == index: no other
                        // producer can write it (they lost the CAS) and the consumer will not
                        // read it until our release store below.
                        slot.value.with_mut(|p| unsafe { *p = Some(value) });
                        slot.seq.store(index + 1, Ordering::Release);
                        return Ok(index);
                    }
                    Err(current) => index = current,
                }
            } else if seq < index {
                // The slot still holds the entry of the previous lap: full.
                return Err(value);
            } else {
                // Another producer took this index; retry with the newer tail.
                index = sh.tail.load(Ordering::Relaxed);
            }
        }
    }

    pub fn capacity(&self) -> usize {
        self.shared.slots.len()
    }
}

impl<T: Send> Consumer<T> {
    /// Index of the head entry (the next to take), whether or not it is published yet.
    pub fn head_index(&self) -> u64 {
        self.head
    }

    fn published(&self, index: u64) -> Option<&Slot<T>> {
        let slot = self.shared.slot(index);
        (slot.seq.load(Ordering::Acquire) == index + 1).then_some(slot)
    }

    /// The entry at `head + k`, if it is published.
    pub fn get(&self, k: usize) -> Option<&T>
    where
        T: Sync,
    {
        if k >= self.shared.slots.len() {
            return None;
        }
        let index = self.head + k as u64;
        let slot = self.published(index)?;
        // SAFETY: seq == index + 1 (Acquire) means the producer's write is visible and no
        // producer writes this slot until we release it in `pop`, which needs `&mut self`
        // and so cannot run while the returned shared borrow of `self` lives.
        slot.value.with(|p| unsafe { (*p).as_ref() })
    }

    /// Number of published entries from the head on, without gaps.
    pub fn len(&self) -> usize {
        (0..self.shared.slots.len())
            .take_while(|&k| self.published(self.head + k as u64).is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.published(self.head).is_none()
    }

    /// Takes the head entry, if published, and frees its slot for the next lap.
    pub fn pop(&mut self) -> Option<T> {
        let index = self.head;
        let slot = self.published(index)?;
        // SAFETY: as in `get`; we have `&mut self`, so no borrow from `get` is alive, and
        // the slot is ours until the release store below.
        let value = slot.value.with_mut(|p| unsafe { (*p).take() });
        slot.seq.store(index + self.shared.cap(), Ordering::Release);
        self.head += 1;
        value
    }

    pub fn capacity(&self) -> usize {
        self.shared.slots.len()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fifo_with_window_and_wraparound() {
        assert_eq!(ring::<u8>(1).0.capacity(), 2, "capacity 1 is raised to 2");
        let (p, mut c) = ring::<u32>(3);
        assert_eq!(p.try_push(1), Ok(0));
        assert_eq!(p.try_push(2), Ok(1));
        assert_eq!(p.try_push(3), Ok(2));
        assert_eq!(p.try_push(4), Err(4), "full");
        assert_eq!(
            (c.len(), c.get(0), c.get(2), c.get(3)),
            (3, Some(&1), Some(&3), None)
        );
        assert_eq!(c.pop(), Some(1));
        assert_eq!(p.try_push(4), Ok(3));
        assert_eq!(
            [c.pop(), c.pop(), c.pop(), c.pop()],
            [Some(2), Some(3), Some(4), None]
        );
        assert!(c.is_empty());
    }

    #[test]
    fn many_producers_one_consumer_keep_every_value_once_in_index_order() {
        let (p, mut c) = ring::<(u64, u32)>(8);
        let per = 20_000u32;
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for v in 0..per {
                        let mut item = (t, v);
                        loop {
                            match p.try_push(item) {
                                Ok(_) => break,
                                Err(back) => {
                                    item = back;
                                    std::thread::yield_now();
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        let mut last = [None::<u32>; 4];
        let mut got = 0;
        while got < 4 * per {
            if let Some((t, v)) = c.pop() {
                // Each producer's own pushes come out in its order.
                assert!(last[t as usize].is_none_or(|l| v == l + 1));
                last[t as usize] = Some(v);
                got += 1;
            } else {
                std::thread::yield_now();
            }
        }
        for h in handles {
            h.join().unwrap();
        }
        assert!(c.pop().is_none());
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// Two producers race for indices while the consumer drains: every value arrives exactly
    /// once, a slot is never written while the consumer reads it (loom's cell checks), and the
    /// window the consumer sees is always the published prefix.
    #[test]
    fn producers_and_consumer() {
        loom::model(|| {
            let (p, mut c) = ring::<u32>(2);
            let p2 = p.clone();
            let t1 = thread::spawn(move || p.try_push(1).is_ok() as u32);
            let t2 = thread::spawn(move || p2.try_push(2).is_ok() as u32);
            let mut seen = vec![];
            for _ in 0..2 {
                if let Some(v) = c.get(0).copied() {
                    assert_eq!(c.pop(), Some(v));
                    seen.push(v);
                }
            }
            let pushed = t1.join().unwrap() + t2.join().unwrap();
            while let Some(v) = c.pop() {
                seen.push(v);
            }
            assert_eq!(pushed, 2, "capacity 2 holds both");
            seen.sort();
            assert_eq!(seen, vec![1, 2]);
        });
    }

    /// Wrap-around: the consumer frees a slot while a producer waits to reuse it.
    #[test]
    fn reuse_after_pop() {
        loom::model(|| {
            let (p, mut c) = ring::<u32>(2);
            assert_eq!(p.try_push(0), Ok(0));
            assert_eq!(p.try_push(1), Ok(1));
            let t = thread::spawn(move || {
                let mut v = 2;
                loop {
                    match p.try_push(v) {
                        Ok(i) => return i,
                        Err(back) => {
                            v = back;
                            thread::yield_now();
                        }
                    }
                }
            });
            assert_eq!(c.pop(), Some(0));
            let i = t.join().unwrap();
            assert_eq!(i, 2);
            assert_eq!([c.pop(), c.pop()], [Some(1), Some(2)]);
        });
    }
}
