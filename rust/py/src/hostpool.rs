//! `HostPool`: host memory that transfers read through one mapping and writes reach through
//! another (see `pipellm_core::hostpool`).

use crate::args::Int;
use crate::buffers::Buffer;
use crate::channel::{PyMessage, PyReceiver};
use crate::errors::detached;
use pipellm_core::hostpool::HostPool;
use pipellm_core::Error;
use pyo3::ffi;
use pyo3::prelude::*;
use std::os::raw::c_int;
use std::sync::Mutex;

/// Host memory for sources that are rewritten between transfers (KV blocks swapped out and
/// in again): read it as a buffer (read-only; `numpy.frombuffer(pool, ...)`, memoryview
/// slices) to predict and request transfers from it, write it with `write` or
/// `receive_into`. Those writes cost no page fault and no `mprotect` under page-protection
/// validation, and still invalidate chunks pre-encrypted from the old bytes.
#[pyclass(frozen, module = "pipellm", name = "HostPool")]
pub struct PyHostPool {
    inner: HostPool,
    /// Serialises writes (`write_with` requires writers of overlapping ranges not to race).
    writing: Mutex<()>,
}

#[pymethods]
impl PyHostPool {
    #[new]
    fn new(py: Python<'_>, nbytes: Int) -> PyResult<Self> {
        let n = nbytes.usize("nbytes")?;
        let inner = detached(py, || HostPool::new(n))?;
        Ok(Self {
            inner,
            writing: Mutex::new(()),
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.len()
    }

    /// Copies `data` (any buffer) into the pool at `offset`.
    #[pyo3(signature = (offset, data))]
    fn write(&self, py: Python<'_>, offset: Int, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let offset = offset.usize("offset")?;
        let src = Buffer::get(data, false, "data")?;
        detached(py, || {
            let _g = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.write(offset, src.as_slice())
        })
    }

    /// Verifies the device-to-host message `m` with `receiver` and decrypts it straight into
    /// the pool at `offset` (nothing is written unless the tag verifies).
    fn receive_into(
        &self,
        py: Python<'_>,
        receiver: &Bound<'_, PyReceiver>,
        m: &Bound<'_, PyMessage>,
        offset: Int,
    ) -> PyResult<()> {
        let offset = offset.usize("offset")?;
        let msg = &m.get().inner;
        let rx = receiver.get();
        detached(py, || {
            let _g = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: writes to the pool are serialised by `writing`, so the slice handed to
            // the closure is not written by anyone else while it runs.
            unsafe {
                self.inner.write_with(offset, msg.len(), |dst| {
                    rx.lock()
                        .open_into(msg.header(), msg.tag(), msg.ciphertext(), dst)
                })
            }
            .and_then(|r: Result<(), Error>| r)
        })
    }

    fn __repr__(&self) -> String {
        format!("HostPool({} bytes)", self.inner.len())
    }

    // SAFETY: PyO3 calls this with the `view` and `flags` of a buffer request on `slf`; the
    // body fills the view only through PyBuffer_FillInfo (argued below).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let pool = &slf.get().inner;
        // SAFETY: `view` is the Py_buffer Python passed for `slf`. The pool's view mapping
        // lives, in place, as long as this object. Read-only: writes go through
        // `write`/`receive_into`.
        unsafe { crate::buffers::export_read_only(slf.as_any(), view, pool.view(), flags) }
    }

    // SAFETY: nothing to free: the view borrows the pool's mapping and FillInfo's reference
    // to the owner is dropped by Python when the view is released.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Lends `pool` to the driver interposer as a D2H destination (see
/// `HostPool::lend_to_driver`) and returns `(view address, alias address, mapped bytes)`
/// for its registration.
#[pyfunction]
pub fn _host_pool_lend(py: Python<'_>, pool: &PyHostPool) -> PyResult<(usize, usize, usize)> {
    let p = &pool.inner;
    p.lend_to_driver()
        .map_err(|e| crate::errors::to_py(py, e))?;
    Ok((p.as_ptr() as usize, p.alias_ptr() as usize, p.mapped_len()))
}

/// Ends `_host_pool_lend` (after the interposer unregistered the pool).
#[pyfunction]
pub fn _host_pool_end_loan(pool: &PyHostPool) {
    pool.inner.end_driver_loan();
}

/// True if any byte of `[addr, addr + length)` is memory of a live `HostPool`.
#[pyfunction]
pub fn _in_host_pool(addr: usize, length: usize) -> bool {
    pipellm_core::hostpool::overlaps_a_host_pool(addr, length)
}
