//! Zero-copy access to Python buffers (bytes, bytearray, memoryview, numpy arrays, and CPU
//! torch tensors through `pipellm._buffers`). A `Buffer` holds the exporter's buffer for as
//! long as it lives, so the memory cannot move or be freed while Rust reads or writes it,
//! including while the GIL is released.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use std::mem::MaybeUninit;

pub struct Buffer {
    view: Box<ffi::Py_buffer>,
}

// SAFETY: a Py_buffer is a plain descriptor of memory whose exporter is pinned for the view's
// lifetime; moving the descriptor to another thread does not touch the exporter. The only
// operation that needs the GIL, PyBuffer_Release, happens in Drop, which PyO3 runs with the
// GIL held (Buffer values are dropped in binding code that holds it).
unsafe impl Send for Buffer {}
// SAFETY: shared access only reads the descriptor's fields.
unsafe impl Sync for Buffer {}

impl Buffer {
    /// Gets a C-contiguous byte view of `obj`; `writable` asks for memory we may write.
    /// `what` names the argument in error messages.
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool, what: &str) -> PyResult<Self> {
        match Self::get_direct(obj, writable, what) {
            Ok(b) => Ok(b),
            Err(e) if e.is_instance_of::<PyTypeError>(obj.py()) && !has_buffer(obj) => {
                // Not a buffer exporter: objects such as torch tensors are adapted in Python.
                let adapted = obj
                    .py()
                    .import("pipellm._buffers")?
                    .call_method1("as_buffer", (obj, what))?;
                Self::get_direct(&adapted, writable, what)
            }
            Err(e) => Err(e),
        }
    }

    fn get_direct(obj: &Bound<'_, PyAny>, writable: bool, what: &str) -> PyResult<Self> {
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::zeroed());
        // SAFETY: `obj` is a live object (we hold a reference and the GIL); `view` is writable
        // memory of Py_buffer's size. PyBUF_STRIDES asks for shape and strides so that
        // non-contiguous exporters succeed and we can give a precise error below.
        let rc =
            unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_STRIDES) };
        if rc != 0 {
            let cause = PyErr::take(obj.py());
            let err = PyTypeError::new_err(format!(
                "{what}: expected a buffer (bytes, bytearray, memoryview, numpy array or CPU \
                 torch tensor), got {}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "?".into())
            ));
            if let Some(c) = cause {
                err.set_cause(obj.py(), Some(c));
            }
            return Err(err);
        }
        // SAFETY: PyObject_GetBuffer returned 0, so it initialised the view.
        let view: Box<ffi::Py_buffer> = unsafe { Box::from_raw(Box::into_raw(view).cast()) };
        let buf = Buffer { view };
        // SAFETY: `buf.view` is a valid, filled view.
        if unsafe { ffi::PyBuffer_IsContiguous(&*buf.view, b'C' as std::os::raw::c_char) } == 0 {
            return Err(PyValueError::new_err(format!(
                "{what}: buffer is not C-contiguous (make a contiguous copy first)"
            )));
        }
        if writable && buf.view.readonly != 0 {
            return Err(PyTypeError::new_err(format!(
                "{what}: buffer is read-only; pass a writable one (bytearray, numpy array, ...)"
            )));
        }
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.view.len as usize
    }

    /// The bytes of the buffer.
    pub fn as_slice(&self) -> &[u8] {
        if self.len() == 0 {
            return &[];
        }
        // SAFETY: the view is C-contiguous (checked in `get`), so `buf` points to `len` bytes
        // that the exporter keeps alive and in place until we release the view. Python code
        // on another thread may write them while the GIL is released; the bytes read are then
        // unspecified, but AWS-LC reads them through raw pointers and no Rust code relies on
        // their values staying fixed, which is the same contract as pyca/cryptography's.
        unsafe { std::slice::from_raw_parts(self.view.buf as *const u8, self.len()) }
    }

    /// The bytes of a buffer obtained with `writable = true`.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.view.readonly == 0, "as_mut_slice on a read-only view");
        if self.len() == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`; the exporter granted write access (readonly == 0) and
        // `&mut self` makes this the only slice we create from this view.
        unsafe { std::slice::from_raw_parts_mut(self.view.buf as *mut u8, self.len()) }
    }
}

fn has_buffer(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: `obj` is a live object and we hold the GIL.
    unsafe { ffi::PyObject_CheckBuffer(obj.as_ptr()) != 0 }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // Dropped with the GIL held (see the Send impl). Attaching is a no-op in that case and
        // makes a stray drop without the GIL safe too.
        Python::attach(|_py| {
            // SAFETY: the view was filled by PyObject_GetBuffer and is released exactly once.
            unsafe { ffi::PyBuffer_Release(&mut *self.view) };
        });
    }
}

/// Fills `view` with a read-only export of `bytes`, owned by `owner`: for `__getbuffer__` of
/// objects that own memory (a message's ciphertext, a host pool's view).
///
/// # Safety
/// `view` must be the Py_buffer that Python passed to `owner`'s `__getbuffer__`, and `bytes`
/// must stay valid and in place for as long as `owner` lives (PyBuffer_FillInfo keeps `owner`
/// alive through `view->obj` until the view is released).
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where
// they call.
pub unsafe fn export_read_only(
    owner: &Bound<'_, PyAny>,
    view: *mut ffi::Py_buffer,
    bytes: &[u8],
    flags: std::os::raw::c_int,
) -> PyResult<()> {
    // SAFETY: the caller's contract above; readonly=1 makes FillInfo refuse PyBUF_WRITABLE
    // requests with BufferError, so nobody writes through the export.
    let rc = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            bytes.as_ptr() as *mut std::os::raw::c_void,
            bytes.len() as ffi::Py_ssize_t,
            1,
            flags,
        )
    };
    if rc != 0 {
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}

/// `(address, length)` of a C-contiguous buffer (or a CPU torch tensor), for code that
/// registers memory by address (`pipellm.cc.watch`). The buffer is released on return: the
/// caller keeps the object alive for as long as it uses the address.
#[pyfunction]
pub fn _buffer_span(buf: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let b = Buffer::get(buf, false, "buf")?;
    Ok((b.as_slice().as_ptr() as usize, b.len()))
}
