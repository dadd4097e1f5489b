//! What kind of mapping holds a range: write tracking is exact only for private anonymous
//! memory. A shared mapping (shared memory, a `MAP_SHARED` file) can be rewritten through
//! another process's mapping, and a file mapping (even private, for pages this process
//! never wrote) changes when the file does: no write by this process happens, so no tracker
//! of this process sees it. Such ranges are refused and validated by fingerprint instead.
//!
//! Asked of the kernel at registration: `PROCMAP_QUERY` (Linux 6.11) on `/proc/self/maps`,
//! one call per mapping, or the text of `/proc/self/maps` where that ioctl is missing. A
//! mapping replaced after registration (`mmap(MAP_FIXED)` over a watched source) is not
//! seen: the docs tell programs not to do that to a source in use.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;

#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)` in the generic ioctl encoding.
const PROCMAP_QUERY: u64 =
    (3 << 30) | ((std::mem::size_of::<ProcmapQuery>() as u64) << 16) | ((b'f' as u64) << 8) | 17;
const PROCMAP_QUERY_VMA_SHARED: u64 = 0x8;

/// True if every byte of `[start, end)` lies in private anonymous mappings.
pub(super) fn private_anonymous(start: usize, end: usize) -> bool {
    let Ok(maps) = File::open("/proc/self/maps") else {
        return false;
    };
    match by_query(&maps, start, end) {
        Some(answer) => answer,
        None => by_text(maps, start, end),
    }
}

/// The answer from `PROCMAP_QUERY`, or None where the kernel does not have it.
fn by_query(maps: &File, start: usize, end: usize) -> Option<bool> {
    let mut at = start as u64;
    while at < end as u64 {
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_addr: at,
            ..ProcmapQuery::default()
        };
        // SAFETY: PROCMAP_QUERY reads and writes the struct we pass (no name or build-id
        // buffers are asked for: their sizes are 0).
        let rc = unsafe { libc::ioctl(maps.as_raw_fd(), PROCMAP_QUERY as _, &mut q) };
        if rc != 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            // ENOENT: no mapping covers `at` (a hole); anything else: no such ioctl.
            return if e == Some(libc::ENOENT) {
                Some(false)
            } else {
                None
            };
        }
        if q.vma_start > at || q.vma_flags & PROCMAP_QUERY_VMA_SHARED != 0 || q.inode != 0 {
            return Some(false);
        }
        at = q.vma_end;
    }
    Some(true)
}

fn by_text(mut maps: File, start: usize, end: usize) -> bool {
    let mut text = String::new();
    if maps.read_to_string(&mut text).is_err() {
        return false;
    }
    let mut at = start;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return false;
        };
        let Some((s, e)) = range.split_once('-') else {
            return false;
        };
        let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) else {
            return false;
        };
        if e <= at {
            continue;
        }
        if s > at {
            return false; // a hole
        }
        if perms.as_bytes().get(3) != Some(&b'p') || inode != "0" {
            return false;
        }
        at = e;
        if at >= end {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(flags: libc::c_int, fd: libc::c_int) -> (usize, usize) {
        // SAFETY: a fresh mapping of our own; unmapped by the caller.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (p as usize, p as usize + 8192)
    }

    fn unmap((s, e): (usize, usize)) {
        // SAFETY: a mapping made by `map`.
        unsafe { libc::munmap(s as *mut libc::c_void, e - s) };
    }

    #[test]
    fn both_ways_tell_the_same_kinds_apart() {
        let file = std::env::temp_dir().join(format!("pipellm-vma-{}", std::process::id()));
        let f = std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        f.set_len(8192).unwrap();
        let fd = f.as_raw_fd();
        let cases = [
            (map(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1), true),
            (map(libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1), false),
            (map(libc::MAP_SHARED, fd), false),
            (map(libc::MAP_PRIVATE, fd), false),
        ];
        for &((s, e), want) in &cases {
            assert_eq!(private_anonymous(s, e), want, "query {s:#x}");
            assert_eq!(private_anonymous(s + 100, s + 200), want);
            let maps = File::open("/proc/self/maps").unwrap();
            assert_eq!(by_text(maps, s, e), want, "text {s:#x}");
        }
        // A range running past the end of its mapping into a hole is refused.
        let (s, e) = cases[0].0;
        unmap((s, e));
        assert!(!private_anonymous(s, e));
        for &(r, _) in &cases[1..] {
            unmap(r);
        }
        std::fs::remove_file(file).unwrap();
    }
}
