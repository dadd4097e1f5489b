//! Poison-tolerant locking: the one policy for every `std` mutex in the workspace (the core,
//! the bindings and the interposer), so that it is argued once.
//!
//! A mutex is poisoned when a thread panicked while holding it. Every panic that can happen
//! with one of ours held is caught (by a worker's `catch_unwind`, by the bindings, by the
//! interposer's FFI boundary, which then forwards every call to the real library), and the
//! sections they guard keep their data consistent at every point where code that may panic
//! runs: a panic leaves at most a count or a queue entry that the next holder reads as it
//! is. Refusing the lock forever would turn one caught panic into a hang or an abort of the
//! whole process (a serving stack, or any program the interposer is loaded into), so the
//! data is taken as it is. Where a section must not be interrupted half-way, its own comment
//! says how it avoids that.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, WaitTimeoutResult};
use std::time::Duration;

/// Locks `m`, poisoned or not.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `cv.wait(g)`, poisoned or not.
pub fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(PoisonError::into_inner)
}

/// `cv.wait_timeout(g, d)`, poisoned or not.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    d: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cv.wait_timeout(g, d)
        .unwrap_or_else(PoisonError::into_inner)
}

/// The data of a mutex we own exclusively, poisoned or not.
pub fn get_mut<T: ?Sized>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let m = std::sync::Arc::new(Mutex::new(5));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 6);
        let cv = Condvar::new();
        let (g, r) = wait_timeout(&cv, lock(&m), Duration::from_millis(1));
        assert!(r.timed_out());
        assert_eq!(*g, 6);
    }
}
