//! The kernel's asynchronous write-protect tracking (userfaultfd `WP_ASYNC`, Linux 6.7+):
//! the write tracker [`super`] prefers where the kernel offers it.
//!
//! Ranges are registered with one process-wide userfaultfd in write-protect mode and made
//! write-protected (`PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`, which also reports the pages
//! written since they were last protected). With `UFFD_FEATURE_WP_ASYNC` a write to such a
//! page never reaches user space: the kernel clears the page's write-protect bit and lets the
//! write go ahead, so the page reads back as "written" in `/proc/self/pagemap`
//! (`PAGEMAP_SCAN`, `PAGE_IS_WRITTEN`). Why this is preferred to `mprotect` + SIGSEGV:
//! - no signal handler is involved, so a handler another library installs later cannot
//!   turn a write into a crash or a hang;
//! - writes by the kernel on the process's behalf (`read(2)`, `recv_into`) and through
//!   pinned pages succeed and are recorded, instead of failing with `EFAULT`;
//! - a page dropped by `madvise(MADV_DONTNEED)` reads back as written too
//!   (`UFFD_FEATURE_WP_UNPOPULATED` keeps a marker where the page was).
//!
//! What it cannot see, like any per-process tracker: writes through another process's
//! mapping of shared memory (the caller refuses shared and file mappings, see
//! [`super::vma`]).
//!
//! The file descriptors belong to the process that opened them: a forked child inherits
//! them, but they still name the parent's address space, so after a fork the child never
//! issues these calls (`usable` is false there) and its watches fall back to fingerprints.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// `_IOWR` as the generic Linux ioctl encoding (x86, arm, riscv): direction in bits
/// 30-31, argument size in 16-29, type in 8-15, number in 0-7.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const READ_WRITE: u64 = 3;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// One run of pages with the same categories, as `PAGEMAP_SCAN` reports it.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub(super) struct PageRegion {
    pub start: u64,
    pub end: u64,
    categories: u64,
}

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_API: u64 = ioc(READ_WRITE, 0xAA, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    READ_WRITE,
    0xAA,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const PAGEMAP_SCAN: u64 = ioc(
    READ_WRITE,
    b'f' as u64,
    16,
    std::mem::size_of::<PmScanArg>(),
);
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

pub(super) struct Tracker {
    uffd: OwnedFd,
    pagemap: std::fs::File,
}

static TRACKER: OnceLock<Option<Tracker>> = OnceLock::new();
/// Set in a forked child (see the module comment).
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn in_child() {
    FORKED.store(true, Ordering::Relaxed);
}

/// The tracker if this process may use it now: opened (once) where the kernel offers
/// asynchronous write protection and `PIPELLM_WRITE_TRACKER` does not ask for `mprotect`;
/// never in a forked child.
pub(super) fn tracker() -> Option<&'static Tracker> {
    if FORKED.load(Ordering::Relaxed) {
        return None;
    }
    TRACKER.get_or_init(open).as_ref()
}

/// The tracker a process uses, decided once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    Uffd,
    Mprotect,
    /// `PIPELLM_WRITE_TRACKER=uffd` where the kernel does not offer it: watches are refused.
    Unavailable,
}

pub(super) fn tracker_kind() -> Kind {
    // Decided with the tracker: every registration asks, and reading the environment each
    // time would take its lock and allocate.
    static KIND: OnceLock<Kind> = OnceLock::new();
    *KIND.get_or_init(|| {
        if TRACKER.get_or_init(open).is_some() {
            Kind::Uffd
        } else if requested() == Some("uffd") {
            Kind::Unavailable
        } else {
            Kind::Mprotect
        }
    })
}

/// Which tracker `PIPELLM_WRITE_TRACKER` asks for: `uffd` (fail where unavailable: tests),
/// `mprotect`, or anything else / unset for the best available.
fn requested() -> Option<&'static str> {
    match std::env::var("PIPELLM_WRITE_TRACKER").ok().as_deref() {
        Some("mprotect") => Some("mprotect"),
        Some("uffd") => Some("uffd"),
        _ => None,
    }
}

fn open() -> Option<Tracker> {
    if requested() == Some("mprotect") {
        return None;
    }
    // User-mode-only handling is all we need (the kernel resolves every write itself in
    // asynchronous mode) and is what an unprivileged process may ask for.
    // SAFETY: a plain syscall with integer flags; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the struct we pass, which lives across the call.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
        return None;
    }
    let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    if api.features & want != want {
        return None;
    }
    // (std opens it close-on-exec.)
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    // SAFETY: registers a function with no preconditions, run in the child after fork.
    unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    let t = Tracker { uffd, pagemap };
    // PAGEMAP_SCAN (6.7) is the part older kernels lack: probe it on an empty range.
    t.scan(0, 0, 0, &mut []).ok()?;
    Some(t)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Tracker {
    /// Registers `[start, end)` (page-aligned) for write-protect tracking. Fails where the
    /// pages are not anonymous or shared memory, or belong to another userfaultfd.
    pub fn register(&self, start: usize, end: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: (end - start) as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass; it changes only the
        // tracking of the range (which the caller owns), not its contents or access.
        check(unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })
    }

    /// Write-protects every page of `[start, end)` (registered) that was written since it
    /// was last protected, and reports those pages in `out` (runs of pages); returns how
    /// many runs were written into `out`. When `out` fills up, the scan stops early: the
    /// caller calls again from the returned walk end.
    pub fn protect_written(
        &self,
        start: usize,
        end: usize,
        out: &mut [PageRegion],
    ) -> io::Result<(usize, usize)> {
        self.scan(start, end, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, out)
    }

    /// True if any page of `[start, end)` was written since it was last protected (or an
    /// error made it impossible to tell).
    pub fn any_written(&self, start: usize, end: usize) -> bool {
        let mut one = [PageRegion::default(); 1];
        !matches!(self.scan(start, end, 0, &mut one), Ok((0, _)))
    }

    /// `PAGEMAP_SCAN` for written pages; returns (runs found, walk end).
    fn scan(
        &self,
        start: usize,
        end: usize,
        flags: u64,
        out: &mut [PageRegion],
    ) -> io::Result<(usize, usize)> {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start: start as u64,
            end: end as u64,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            category_anyof_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        // SAFETY: PAGEMAP_SCAN reads the struct we pass and writes at most `vec_len` regions
        // into `out`, which is that long and lives across the call; with
        // PM_SCAN_WP_MATCHING it write-protects pages of the range, which only changes how
        // later writes are recorded, not whether they succeed.
        let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok((n as usize, arg.walk_end as usize))
        }
    }
}
