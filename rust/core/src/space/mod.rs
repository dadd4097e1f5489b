//! The address-space registry: one table per process of the ranges of memory pipellm has
//! taken charge of, each with its kind and its owner (the copy of this library that
//! registered it), and the rules for which kinds may not share a byte. The design of record
//! is docs/architecture.md, "The address-space registry".
//!
//! Kinds ([`Kind`]): write-watched pages (`writeguard`), gated pages (`gate`), host pool
//! views (`hostpool`), pools lent to the driver interposer, and the interposer's watched
//! ranges and receive pools. A registration names the kinds it must not overlap, from any
//! owner or from other owners only ([`Conflicts`]); the check and the insertion are one step
//! under the table's one lock, so two registrations racing cannot both pass.
//!
//! The extension (`pipellm._core`) and the interposer (`libpipellm_cc_shim.so`, loaded as the
//! process's `libcrypto.so.3`) each link their own copy of this crate. The table used is the
//! one in the copy that `dlsym` finds in the process's global scope (the interposer's, when
//! it is loaded; see `crate::peer`), reached through C entry points with a version in their
//! names; without it, each copy's own. So with the interposer loaded, every range of either
//! copy is in one table: no page is write-watched by two copies (each would trust its own
//! bookkeeping: a stale hit), and no copy watches what the other gates or receives into.
//!
//! What stays per copy are the lock-free indexes the SIGSEGV handler reads in signal
//! context (`writeguard`'s regions, [`gate_slots`]): mirrors of that copy's entries here,
//! which the one handler asks copy by copy (`writeguard::delegate`).
//!
//! Locks: the table's is a leaf (held for a scan and an update, never while taking
//! another), taken under `writeguard`'s registry, `gate`'s lock and the interposer's
//! registries. Never in signal context.

pub(crate) mod gate_slots;

use crate::locks::lock;
use crate::span::Span;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// What a range of the table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Pages a write watch protects (`writeguard::WriteWatch`).
    WriteWatch = 1,
    /// Pages held `PROT_NONE` until a deferred decryption is in place (`gate`).
    Gate = 2,
    /// A host pool's view (`hostpool::HostPool`): shared memory a write watch may cover,
    /// since every write through the pool's other mapping is announced to its owner.
    PoolView = 3,
    /// A host pool's view lent to the driver interposer as a D2H destination.
    LentPool = 4,
    /// A range the application registered with the interposer (`pipellm_cc_watch`).
    WatchedRange = 5,
    /// A mapping of a pool the interposer decrypts D2H chunks into (`pipellm_cc_receive`).
    ReceivePool = 6,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::WriteWatch,
        Kind::Gate,
        Kind::PoolView,
        Kind::LentPool,
        Kind::WatchedRange,
        Kind::ReceivePool,
    ];

    /// This kind as a set of one ([`Kinds`]).
    pub const fn set(self) -> Kinds {
        Kinds(1 << self as u32)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::WriteWatch => "write watch",
            Kind::Gate => "gate",
            Kind::PoolView => "host pool view",
            Kind::LentPool => "lent pool",
            Kind::WatchedRange => "watched range",
            Kind::ReceivePool => "receive pool",
        }
    }

    fn from_u32(k: u32) -> Option<Kind> {
        Kind::ALL.into_iter().find(|&x| x as u32 == k)
    }
}

/// A set of kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kinds(u32);

impl Kinds {
    pub const NONE: Kinds = Kinds(0);

    pub const fn with(self, k: Kind) -> Kinds {
        Kinds(self.0 | k.set().0)
    }

    const fn has(self, k: u32) -> bool {
        k < 32 && self.0 & (1 << k) != 0
    }
}

/// The kinds a new range must not overlap: from any owner, or from other owners only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conflicts {
    pub any: Kinds,
    pub foreign: Kinds,
}

/// Whose entries a lookup considers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    Mine,
    Anyone,
}

/// This copy's identity in the table: the address of one of its statics.
static OWNER: u8 = 0;

fn owner() -> usize {
    std::ptr::addr_of!(OWNER) as usize
}

/// One range: `[start, end)`, its kind (`Kind as u32`) and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Entry {
    pub start: usize,
    pub end: usize,
    pub kind: u32,
    pub owner: usize,
}

/// The table, in this copy; the process's if this copy is the one the process uses. At most
/// a few thousand entries (every write watch of each copy is one), scanned in full: a
/// registration costs microseconds beside the `mprotect` it goes with.
static TABLE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Inserts `[start, end)` of `kind` for `owner` unless it overlaps a range of a kind in
/// `any` (any owner's) or in `foreign` (another owner's): 0 if inserted, else the kind of
/// the range in the way; -1 if the arguments are invalid or the insertion failed. A range
/// may be inserted several times (each removal takes one).
#[no_mangle]
pub extern "C" fn pipellm_space_insert_v1(
    start: usize,
    end: usize,
    kind: u32,
    owner: usize,
    any: u32,
    foreign: u32,
) -> i32 {
    insert_here(start, end, kind, owner, any, foreign)
}

/// Removes one entry of exactly `[start, end)`, `kind` and `owner` (inserted by
/// `pipellm_space_insert_v1`); nothing if there is none.
#[no_mangle]
pub extern "C" fn pipellm_space_remove_v1(start: usize, end: usize, kind: u32, owner: usize) {
    remove_here(start, end, kind, owner)
}

/// Finds an entry of a kind in `kinds` (owned by `owner`, or by anyone if `owner` is 0) that
/// overlaps `[start, end)`, or with `contains` != 0 that holds all of it; writes it to `out`
/// and returns 1, or returns 0 if there is none.
///
/// # Safety
/// `out` must be valid for writing one `Entry`.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above, which its callers (the other
// copy's `find`) keep.
#[no_mangle]
pub unsafe extern "C" fn pipellm_space_find_v1(
    start: usize,
    end: usize,
    kinds: u32,
    owner: usize,
    contains: i32,
    out: *mut Entry,
) -> i32 {
    // SAFETY: the caller's promise about `out` is the one `find_here` needs.
    unsafe { find_here(start, end, kinds, owner, contains, out) }
}

/// Copies up to `cap` entries into `out`; returns how many the table holds.
///
/// # Safety
/// `out` must be valid for writing `cap` entries (or null with `cap` 0).
// SAFETY: an `unsafe fn` for the contract in `# Safety` above, which its callers (the other
// copy's `entries`) keep.
#[no_mangle]
pub unsafe extern "C" fn pipellm_space_list_v1(out: *mut Entry, cap: usize) -> usize {
    // SAFETY: the caller's promise about `out` is the one `list_here` needs.
    unsafe { list_here(out, cap) }
}

// The table of this copy. Not exported, so a reference to them is never resolved to another
// copy's (a reference to an exported name may be: ELF interposition). None may unwind into
// C: the only panic possible is a failed allocation.

extern "C" fn insert_here(
    start: usize,
    end: usize,
    kind: u32,
    owner: usize,
    any: u32,
    foreign: u32,
) -> i32 {
    if Kind::from_u32(kind).is_none() || start >= end {
        return -1;
    }
    std::panic::catch_unwind(|| {
        let mut t = lock(&TABLE);
        let r = Span::new(start, end);
        let (any, foreign) = (Kinds(any), Kinds(foreign));
        let in_the_way = t.iter().find(|e| {
            Span::new(e.start, e.end).overlaps(r)
                && (any.has(e.kind) || (e.owner != owner && foreign.has(e.kind)))
        });
        if let Some(e) = in_the_way {
            return e.kind as i32;
        }
        t.push(Entry {
            start,
            end,
            kind,
            owner,
        });
        0
    })
    .unwrap_or(-1)
}

extern "C" fn remove_here(start: usize, end: usize, kind: u32, owner: usize) {
    let _ = std::panic::catch_unwind(|| {
        let mut t = lock(&TABLE);
        let wanted = Entry {
            start,
            end,
            kind,
            owner,
        };
        if let Some(i) = t.iter().position(|e| *e == wanted) {
            t.swap_remove(i);
        }
    });
}

/// # Safety
/// `out` must be valid for writing one `Entry`.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; `find` keeps it.
unsafe extern "C" fn find_here(
    start: usize,
    end: usize,
    kinds: u32,
    owner: usize,
    contains: i32,
    out: *mut Entry,
) -> i32 {
    let r = Span::new(start, end);
    let kinds = Kinds(kinds);
    let found = std::panic::catch_unwind(|| {
        lock(&TABLE).iter().copied().find(|e| {
            let s = Span::new(e.start, e.end);
            kinds.has(e.kind)
                && (owner == 0 || e.owner == owner)
                && if contains != 0 {
                    s.contains(r)
                } else {
                    s.overlaps(r)
                }
        })
    });
    match found {
        Ok(Some(e)) => {
            // SAFETY: the caller vouched for `out`.
            unsafe { out.write(e) };
            1
        }
        _ => 0,
    }
}

/// # Safety
/// `out` must be valid for writing `cap` entries (or null with `cap` 0).
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; `entries` keeps it.
unsafe extern "C" fn list_here(out: *mut Entry, cap: usize) -> usize {
    std::panic::catch_unwind(|| {
        let t = lock(&TABLE);
        for (i, e) in t.iter().take(cap).enumerate() {
            // SAFETY: `i < cap`, and the caller vouched for `cap` entries at `out`.
            unsafe { out.add(i).write(*e) };
        }
        t.len()
    })
    .unwrap_or(0)
}

type InsertFn = extern "C" fn(usize, usize, u32, usize, u32, u32) -> i32;
type RemoveFn = extern "C" fn(usize, usize, u32, usize);
type FindFn = unsafe extern "C" fn(usize, usize, u32, usize, i32, *mut Entry) -> i32;
type ListFn = unsafe extern "C" fn(*mut Entry, usize) -> usize;

struct Api {
    insert: InsertFn,
    remove: RemoveFn,
    find: FindFn,
    list: ListFn,
    shared: bool,
}

static API: OnceLock<Api> = OnceLock::new();

fn api() -> &'static Api {
    API.get_or_init(|| {
        let names = [
            c"pipellm_space_insert_v1",
            c"pipellm_space_remove_v1",
            c"pipellm_space_find_v1",
            c"pipellm_space_list_v1",
        ];
        let Some([i, r, f, l]) = crate::peer::symbols(names, std::ptr::addr_of!(OWNER).cast())
        else {
            // None in the global scope, or this very copy's: this copy's own table.
            return Api {
                insert: insert_here,
                remove: remove_here,
                find: find_here,
                list: list_here,
                shared: false,
            };
        };
        // SAFETY: symbols under these versioned names are the functions above in another
        // copy of this crate (all found in the same object), with exactly these signatures.
        unsafe {
            Api {
                insert: std::mem::transmute::<*mut libc::c_void, InsertFn>(i),
                remove: std::mem::transmute::<*mut libc::c_void, RemoveFn>(r),
                find: std::mem::transmute::<*mut libc::c_void, FindFn>(f),
                list: std::mem::transmute::<*mut libc::c_void, ListFn>(l),
                shared: true,
            }
        }
    })
}

/// Registers `span` as `kind` for this copy, unless it overlaps a range of a kind
/// `conflicts` names: then the kind in the way. An empty span is refused as in the way of
/// itself (nothing registers empty ranges).
pub fn insert(span: Span, kind: Kind, conflicts: Conflicts) -> Result<(), Kind> {
    let rc = (api().insert)(
        span.start,
        span.end,
        kind as u32,
        owner(),
        conflicts.any.0,
        conflicts.foreign.0,
    );
    match rc {
        0 => Ok(()),
        k => Err(Kind::from_u32(k as u32).unwrap_or(kind)),
    }
}

/// Removes one registration of exactly `span` and `kind` by this copy.
pub fn remove(span: Span, kind: Kind) {
    (api().remove)(span.start, span.end, kind as u32, owner())
}

/// The first range of a kind in `kinds` (this copy's, or anyone's) that overlaps `span`.
pub fn overlapping(span: Span, kinds: Kinds, whose: Whose) -> Option<Span> {
    find(span, kinds, whose, false)
}

/// The first range of a kind in `kinds` (this copy's, or anyone's) that holds all of `span`.
pub fn containing(span: Span, kinds: Kinds, whose: Whose) -> Option<Span> {
    find(span, kinds, whose, true)
}

fn find(span: Span, kinds: Kinds, whose: Whose, contains: bool) -> Option<Span> {
    let who = match whose {
        Whose::Mine => owner(),
        Whose::Anyone => 0,
    };
    let mut e = Entry {
        start: 0,
        end: 0,
        kind: 0,
        owner: 0,
    };
    // SAFETY: `e` is a valid place for one entry.
    let found =
        unsafe { (api().find)(span.start, span.end, kinds.0, who, contains as i32, &mut e) };
    (found == 1).then(|| Span::new(e.start, e.end))
}

/// Every range of the process's table: its span, kind, and whether this copy owns it.
pub fn entries() -> Vec<(Span, Kind, bool)> {
    let list = api().list;
    // SAFETY: null with a capacity of 0 is allowed.
    let mut n = unsafe { list(std::ptr::null_mut(), 0) };
    loop {
        let mut v: Vec<Entry> = Vec::with_capacity(n + 8);
        // SAFETY: `v` has room for `v.capacity()` entries; `set_len` only covers those the
        // call wrote.
        let total = unsafe { list(v.as_mut_ptr(), v.capacity()) };
        if total <= v.capacity() {
            // SAFETY: the first `total` entries were written.
            unsafe { v.set_len(total) };
            return v
                .into_iter()
                .filter_map(|e| {
                    let k = Kind::from_u32(e.kind)?;
                    Some((Span::new(e.start, e.end), k, e.owner == owner()))
                })
                .collect();
        }
        n = total; // it grew meanwhile
    }
}

/// True if this copy uses another copy's table (the interposer's, from the extension).
pub fn shared() -> bool {
    api().shared
}

/// For a fork handler (see `writeguard::hold_for_fork`): the process's table, locked, if it
/// is this copy's. Without a lookup made yet (none is made here: `dlsym` in a fork handler
/// could wait on the loader's lock), another copy may still be using this one's through the
/// exported names, so it is locked then too.
pub(crate) fn hold_for_fork() -> Option<MutexGuard<'static, Vec<Entry>>> {
    match API.get() {
        Some(a) if a.shared => None,
        _ => Some(lock(&TABLE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OTHER: usize = 0x51; // an owner that is neither copy

    fn foreign_insert(s: Span, k: Kind, c: Conflicts) -> i32 {
        pipellm_space_insert_v1(s.start, s.end, k as u32, OTHER, c.any.0, c.foreign.0)
    }

    #[test]
    fn conflicts_are_checked_by_kind_and_owner() {
        assert!(!shared(), "a test binary holds one copy");
        let base = 0x7100_0000_0000usize;
        let a = Span::new(base, base + 0x4000);
        let inside = Span::new(base + 0x1000, base + 0x2000);
        let next = Span::new(base + 0x4000, base + 0x5000);
        let watch = Conflicts {
            any: Kinds::NONE.with(Kind::Gate),
            foreign: Kind::WriteWatch.set(),
        };
        assert_eq!(foreign_insert(a, Kind::WriteWatch, watch), 0);
        assert_eq!(
            insert(inside, Kind::WriteWatch, watch),
            Err(Kind::WriteWatch),
            "another owner's watch is in the way"
        );
        assert_eq!(insert(next, Kind::WriteWatch, watch), Ok(()), "next to it");
        assert_eq!(
            insert(next, Kind::WriteWatch, watch),
            Ok(()),
            "an owner may overlap its own"
        );
        assert_eq!(
            insert(
                next,
                Kind::Gate,
                Conflicts {
                    any: Kind::WriteWatch.set(),
                    ..Default::default()
                }
            ),
            Err(Kind::WriteWatch),
            "`any` counts this owner's too"
        );
        assert_eq!(insert(next, Kind::PoolView, Conflicts::default()), Ok(()));
        assert_eq!(
            containing(
                Span::new(next.start + 8, next.end),
                Kind::PoolView.set(),
                Whose::Mine
            ),
            Some(next)
        );
        assert_eq!(
            containing(
                Span::new(next.start, next.end + 1),
                Kind::PoolView.set(),
                Whose::Mine
            ),
            None,
            "not wholly inside"
        );
        assert_eq!(
            overlapping(inside, Kind::WriteWatch.set(), Whose::Mine),
            None
        );
        assert_eq!(
            overlapping(inside, Kind::WriteWatch.set(), Whose::Anyone),
            Some(a)
        );
        let listed = entries();
        assert!(listed.contains(&(a, Kind::WriteWatch, false)));
        assert!(listed.contains(&(next, Kind::PoolView, true)));
        // Removal takes one registration of exactly that range, kind and owner.
        remove(next, Kind::WriteWatch);
        assert_eq!(
            overlapping(next, Kind::WriteWatch.set(), Whose::Mine),
            Some(next)
        );
        remove(next, Kind::WriteWatch);
        remove(next, Kind::PoolView);
        assert_eq!(
            overlapping(
                next,
                Kind::WriteWatch.set().with(Kind::PoolView),
                Whose::Mine
            ),
            None
        );
        pipellm_space_remove_v1(a.start, a.end, Kind::WriteWatch as u32, OTHER);
        assert_eq!(insert(inside, Kind::WriteWatch, watch), Ok(()), "released");
        remove(inside, Kind::WriteWatch);
        assert_eq!(
            pipellm_space_insert_v1(a.start, a.end, 99, OTHER, 0, 0),
            -1,
            "no such kind"
        );
        assert_eq!(
            pipellm_space_insert_v1(a.end, a.start, 1, OTHER, 0, 0),
            -1,
            "empty"
        );
    }
}
