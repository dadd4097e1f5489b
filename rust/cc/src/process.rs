//! Process-wide facts of the interposer, the leaf every other module may use: whether this
//! is a forked child, whether serving has stopped for good, the workers' scheduling
//! priority, and reading our own memory without faulting.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set in a child forked from a process that had started threads of ours (`enter_child`,
/// from the fork handler in `exports`). None of them came along, and what they had in hand
/// (a chunk being encrypted, a decryption, a pool's pending count) never completes there:
/// the child serves nothing new, plans nothing, forwards D2H calls and waits for no worker;
/// it only keeps every context answering as OpenSSL would.
static FORKED: AtomicBool = AtomicBool::new(false);

/// Set once for good when a D2H chunk failed its tag (see `d2h`): nothing is served,
/// deferred or pre-encrypted any more.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Set once any thread of ours was started (`spawn`): a process forked before that lost
/// nothing at the fork, and its child is a process like any other.
static THREADS: AtomicBool = AtomicBool::new(false);

/// Called in a forked child, before anything else runs there. A parent that never started
/// a thread of ours held nothing a thread of ours would release (the fork handlers held
/// every lock): its child goes on as a fresh process would.
pub fn enter_child() {
    // Relaxed: set by the only thread of the child before it returns from `fork`; THREADS
    // was set by a thread of the parent that made the spawn, before the fork.
    if THREADS.load(Ordering::Relaxed) {
        FORKED.store(true, Ordering::Relaxed);
    }
}

/// Starts a thread of ours (every one goes through here; see `enter_child`).
pub fn spawn(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    THREADS.store(true, Ordering::Relaxed);
    std::thread::Builder::new().name(name).spawn(f)
}

pub fn forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}

/// Stops serving for good: no chunk is served, deferred or pre-encrypted from now on (every
/// context leaves tracking at its next init). True if this call stopped it.
pub fn stop() -> bool {
    let first = !STOPPED.swap(true, Ordering::AcqRel);
    if first {
        crate::stats::Stats::add(&crate::stats::stats().stops, 1);
    }
    first
}

pub fn stopped() -> bool {
    STOPPED.load(Ordering::Acquire)
}

/// Marks the calling thread as background work (Linux `SCHED_BATCH`): woken, it does not
/// preempt the thread that woke it. Waking a worker is otherwise a context switch on the
/// driver's critical path: measured on 2 cores, `GET_TAG` took 24-550 µs whenever it woke
/// one. Best effort: on failure the thread keeps the normal policy. For the pre-encryption
/// workers and the D2H decryption threads.
pub fn background_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes only the calling thread's policy (pid 0), with a valid parameter.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

/// Copies `buf.len()` bytes of our own memory at `addr` into `buf`, or returns false if any
/// of it is not mapped readable. A predicted source may have been freed since it was last
/// used: reading it directly could crash the process, `process_vm_readv` reports EFAULT.
pub fn read_own_memory(addr: usize, buf: &mut [u8]) -> bool {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which we own and may write; the kernel validates the
    // remote range itself and fails with EFAULT instead of faulting.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n >= 0 && n as usize == buf.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_memory_is_reported_not_faulted() {
        let mut buf = vec![0u8; 64];
        assert!(!read_own_memory(8, &mut buf), "page 0 is never mapped");
        let src = vec![5u8; 64];
        assert!(read_own_memory(src.as_ptr() as usize, &mut buf));
        assert_eq!(buf, src);
    }
}
