//! Python classes of the secure channel: SessionKey, Sender, Receiver, Message.

use crate::args::Int;
use crate::buffers::Buffer;
use crate::errors::{detached, to_py};
use pipellm_core::header::{IV_LEN, MAX_CHANNEL};
use pipellm_core::locks::lock;
use pipellm_core::pipeline::Payload;
use pipellm_core::schedule::DEFAULT_USAGE_LIMIT;
use pipellm_core::{Direction, KeyPolicy, Kind, Message, Receiver, Sender, SessionKey};
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::os::raw::c_int;
use std::sync::Mutex;

pub fn parse_direction(s: &str) -> PyResult<Direction> {
    match s {
        "h2d" => Ok(Direction::HostToDevice),
        "d2h" => Ok(Direction::DeviceToHost),
        _ => Err(PyValueError::new_err(format!(
            "direction must be 'h2d' or 'd2h', got {s:?}"
        ))),
    }
}

pub fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::HostToDevice => "h2d",
        Direction::DeviceToHost => "d2h",
    }
}

pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Data => "data",
        Kind::Substitute => "substitute",
        Kind::Nop => "nop",
    }
}

pub fn parse_channel(channel: Int) -> PyResult<u32> {
    channel.at_most("channel", u64::from(MAX_CHANNEL))
}

/// The arguments Sender and Receiver share, checked: (channel, direction, policy).
pub fn parse_end(
    channel: Int,
    direction: &str,
    usage_limit: Int,
    rotate: bool,
) -> PyResult<(u32, Direction, KeyPolicy)> {
    Ok((
        parse_channel(channel)?,
        parse_direction(direction)?,
        parse_policy(usage_limit, rotate)?,
    ))
}

pub fn parse_policy(usage_limit: Int, rotate: bool) -> PyResult<KeyPolicy> {
    Ok(KeyPolicy {
        usage_limit: usage_limit.get("usage_limit", 2, i128::from(u64::MAX))?,
        rotate,
    })
}

/// The 32-byte secret shared by the CPU and the device.
#[pyclass(frozen, module = "pipellm", name = "SessionKey")]
pub struct PySessionKey {
    pub inner: SessionKey,
}

#[pymethods]
impl PySessionKey {
    #[new]
    fn new(py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Self> {
        let buf = Buffer::get(key, false, "key")?;
        let inner = SessionKey::from_bytes(buf.as_slice()).map_err(|e| to_py(py, e))?;
        Ok(Self { inner })
    }

    /// A fresh random key.
    #[staticmethod]
    fn generate(py: Python<'_>) -> PyResult<Self> {
        let inner = SessionKey::generate().map_err(|e| to_py(py, e))?;
        Ok(Self { inner })
    }

    /// The raw 32 bytes, to hand the key to the other end. Treat the result as a secret.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.expose_secret())
    }

    fn __repr__(&self) -> &'static str {
        "SessionKey(<secret>)"
    }
}

/// A sealed message: header fields, tag and ciphertext. Exports its ciphertext through the
/// buffer protocol (read-only, zero-copy).
#[pyclass(frozen, module = "pipellm", name = "Message")]
pub struct PyMessage {
    pub inner: Message<Payload>,
    /// Where the payload lands in the transfer it belongs to (0 for a single message).
    pub offset: u64,
}

#[pymethods]
impl PyMessage {
    #[getter]
    fn counter(&self) -> u64 {
        self.inner.position().counter
    }
    #[getter]
    fn epoch(&self) -> u32 {
        self.inner.position().epoch
    }
    #[getter]
    fn channel(&self) -> u32 {
        self.inner.header().channel
    }
    #[getter]
    fn direction(&self) -> &'static str {
        direction_name(self.inner.header().direction)
    }
    #[getter]
    fn is_nop(&self) -> bool {
        self.inner.is_nop()
    }
    /// 'data', 'substitute' (replaces an undelivered speculative chunk) or 'nop'.
    #[getter]
    fn kind(&self) -> &'static str {
        kind_name(self.inner.header().kind)
    }
    #[getter]
    fn charge(&self) -> u64 {
        self.inner.header().charge
    }
    #[getter]
    fn offset(&self) -> u64 {
        self.offset
    }
    #[getter]
    fn iv<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let iv: [u8; IV_LEN] = self.inner.iv();
        PyBytes::new(py, &iv)
    }
    #[getter]
    fn tag<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.tag())
    }
    /// A read-only memoryview of the ciphertext (no copy).
    #[getter]
    fn ciphertext<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        // SAFETY: `slf` is a live object that exports the buffer protocol (below); the new
        // memoryview holds its own reference to it.
        let mv = unsafe { ffi::PyMemoryView_FromObject(slf.as_ptr()) };
        // SAFETY: a null result means Python set an exception, which from_owned_ptr_or_err
        // fetches; otherwise we own the returned reference.
        unsafe { Bound::from_owned_ptr_or_err(py, mv) }
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    /// Wire encoding: header (48 bytes) ‖ tag (16 bytes) ‖ ciphertext.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_wire())
    }
    /// Parses the wire encoding (raises ValueError if malformed; authenticity is checked only
    /// by a Receiver).
    #[staticmethod]
    #[pyo3(signature = (data, offset = Int::Fits(0)))]
    fn from_bytes(py: Python<'_>, data: &Bound<'_, PyAny>, offset: Int) -> PyResult<Self> {
        let offset: u64 = offset.at_most("offset", u64::MAX)?;
        let buf = Buffer::get(data, false, "data")?;
        let inner = Message::from_wire(buf.as_slice()).map_err(|e| to_py(py, e))?;
        Ok(Self {
            inner: inner.map_payload(Payload::Owned),
            offset,
        })
    }
    fn __repr__(&self) -> String {
        let h = self.inner.header();
        format!(
            "Message({} channel={} {} epoch={} counter={} len={} offset={})",
            kind_name(h.kind),
            h.channel,
            direction_name(h.direction),
            h.position.epoch,
            h.position.counter,
            h.length,
            self.offset
        )
    }

    // SAFETY: PyO3 calls this with the `view` and `flags` of a buffer request on `slf`; the
    // body fills the view only through PyBuffer_FillInfo (argued below).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let ct = slf.get().inner.ciphertext();
        // SAFETY: `view` is the Py_buffer Python passed for `slf`. The ciphertext lives in a
        // Vec owned by this frozen (immutable) object, so it stays valid and in place while
        // the export keeps the object alive.
        unsafe { crate::buffers::export_read_only(slf.as_any(), view, ct, flags) }
    }

    // SAFETY: nothing to free: the view borrows the ciphertext and FillInfo's reference to
    // the owner is dropped by Python itself when the view is released.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// The sending end of one direction of a channel (H2D: the CPU). Thread-safe: concurrent
/// `seal` calls get distinct, gap-free counters.
#[pyclass(frozen, module = "pipellm", name = "Sender")]
pub struct PySender {
    pub inner: Sender,
}

#[pymethods]
impl PySender {
    #[new]
    #[pyo3(signature = (key, channel = Int::Fits(0), *, direction = "h2d", usage_limit = Int::Fits(DEFAULT_USAGE_LIMIT as i128), rotate = true))]
    fn new(
        py: Python<'_>,
        key: &PySessionKey,
        channel: Int,
        direction: &str,
        usage_limit: Int,
        rotate: bool,
    ) -> PyResult<Self> {
        let (channel, direction, policy) = parse_end(channel, direction, usage_limit, rotate)?;
        let inner =
            Sender::new(&key.inner, channel, direction, policy).map_err(|e| to_py(py, e))?;
        Ok(Self { inner })
    }

    /// Seals the bytes of `buf` as the next message (GIL released while encrypting).
    fn seal(&self, py: Python<'_>, buf: &Bound<'_, PyAny>) -> PyResult<PyMessage> {
        let src = Buffer::get(buf, false, "buf")?;
        let inner = detached(py, || self.inner.seal(src.as_slice()))?;
        Ok(PyMessage {
            inner: inner.map_payload(Payload::Owned),
            offset: 0,
        })
    }

    /// Burns the next IV with an empty NOP message.
    fn seal_nop(&self, py: Python<'_>) -> PyResult<PyMessage> {
        let inner = self.inner.seal_nop().map_err(|e| to_py(py, e))?;
        Ok(PyMessage {
            inner: inner.map_payload(Payload::Owned),
            offset: 0,
        })
    }

    #[getter]
    fn channel(&self) -> u32 {
        self.inner.channel()
    }
    #[getter]
    fn direction(&self) -> &'static str {
        direction_name(self.inner.direction())
    }
    /// Counter the next message will carry (in the current epoch).
    #[getter]
    fn next_counter(&self) -> u64 {
        self.inner.cursor().next_counter
    }
    #[getter]
    fn epoch(&self) -> u32 {
        self.inner.cursor().epoch
    }
    /// Usage units charged to the current epoch's key.
    #[getter]
    fn usage(&self) -> u64 {
        self.inner.cursor().usage
    }
    fn __repr__(&self) -> String {
        let c = self.inner.cursor();
        format!(
            "Sender(channel={}, direction='{}', epoch={}, next_counter={})",
            self.inner.channel(),
            direction_name(self.inner.direction()),
            c.epoch,
            c.next_counter
        )
    }
}

/// The receiving end: the CPU model of the device's checks (H2D) or the CPU end of D2H.
#[pyclass(frozen, module = "pipellm", name = "Receiver")]
pub struct PyReceiver {
    inner: Mutex<Receiver>,
}

impl PyReceiver {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Receiver> {
        // Receiver methods commit state only after every check passed, so a poisoned lock
        // still guards a consistent receiver.
        lock(&self.inner)
    }
}

#[pymethods]
impl PyReceiver {
    #[new]
    #[pyo3(signature = (key, channel = Int::Fits(0), *, direction = "h2d", usage_limit = Int::Fits(DEFAULT_USAGE_LIMIT as i128), rotate = true))]
    fn new(
        py: Python<'_>,
        key: &PySessionKey,
        channel: Int,
        direction: &str,
        usage_limit: Int,
        rotate: bool,
    ) -> PyResult<Self> {
        let (channel, direction, policy) = parse_end(channel, direction, usage_limit, rotate)?;
        let inner =
            Receiver::new(&key.inner, channel, direction, policy).map_err(|e| to_py(py, e))?;
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    /// Verifies `m`, then decrypts it into `dst` (a writable buffer of the same length).
    /// `dst` is written only after the tag verified. GIL released while decrypting.
    fn open_into(
        &self,
        py: Python<'_>,
        m: &Bound<'_, PyMessage>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut out = Buffer::get(dst, true, "dst")?;
        let msg = &m.get().inner;
        // The lock is taken with the GIL released, so a thread waiting for it never holds
        // the GIL that the thread inside needs to return.
        detached(py, || {
            self.lock().open_into(
                msg.header(),
                msg.tag(),
                msg.ciphertext(),
                out.as_mut_slice(),
            )
        })
    }

    /// Verifies and decrypts `m`, returning the plaintext as bytes.
    fn open<'py>(
        &self,
        py: Python<'py>,
        m: &Bound<'py, PyMessage>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let msg = &m.get().inner;
        // The bytes object is private until returned: one pass, and on failure it is freed
        // unseen.
        PyBytes::new_with(py, msg.len(), |out| {
            detached(py, || {
                self.lock()
                    .open_into_private(msg.header(), msg.tag(), msg.ciphertext(), out)
            })
        })
    }

    #[getter]
    fn channel(&self) -> u32 {
        self.lock().channel()
    }
    #[getter]
    fn direction(&self) -> &'static str {
        direction_name(self.lock().direction())
    }
    /// Counter the next accepted message must carry (unless it opens a new epoch).
    #[getter]
    fn expected_counter(&self) -> u64 {
        self.lock().cursor().next_counter
    }
    #[getter]
    fn epoch(&self) -> u32 {
        self.lock().cursor().epoch
    }
    #[getter]
    fn usage(&self) -> u64 {
        self.lock().cursor().usage
    }
    fn __repr__(&self) -> String {
        let rx = self.lock();
        format!(
            "Receiver(channel={}, direction='{}', epoch={}, expected_counter={})",
            rx.channel(),
            direction_name(rx.direction()),
            rx.cursor().epoch,
            rx.cursor().next_counter
        )
    }
}
