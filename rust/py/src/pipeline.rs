//! Python classes of the speculative pipeline: Pipeline and Transfer.

use crate::args::Int;
use crate::buffers::Buffer;
use crate::channel::{parse_end, PyMessage, PySessionKey};
use crate::errors::{detached, to_py};
use pipellm_core::locks::{get_mut, lock};
use pipellm_core::pipeline::{
    Payload, Pipeline, PipelineConfig, Source, SourceBytes, StatValue, Transfer, Validation,
};
use pipellm_core::schedule::DEFAULT_USAGE_LIMIT;
use pipellm_core::staging::StagingBuf;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Buffer views whose last Rust owner was dropped on a thread that may not hold the GIL
/// (a worker): releasing a view needs the GIL, and taking it there could deadlock against a
/// thread that holds the GIL while it waits for that worker. They wait here until a call
/// that holds the GIL releases them: every method of `Pipeline` and `Transfer` holds a
/// [`Call`] for its whole length, whose drop does it, and so does dropping a `Transfer`.
///
/// A lock-free stack (push one, take all), not a mutex: a process forked while a pipeline
/// thread held a mutex here would find it locked forever.
static GRAVEYARD: AtomicPtr<Grave> = AtomicPtr::new(std::ptr::null_mut());

struct Grave {
    view: Buffer,
    next: *mut Grave,
}

fn bury(view: Buffer) {
    let node = Box::into_raw(Box::new(Grave {
        view,
        next: std::ptr::null_mut(),
    }));
    let mut head = GRAVEYARD.load(Ordering::Relaxed);
    loop {
        // SAFETY: `node` came from Box::into_raw above and is not shared until the CAS
        // below publishes it, so this thread may write it.
        unsafe { (*node).next = head };
        match GRAVEYARD.compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(h) => head = h,
        }
    }
}

/// Held by a method for the length of its call (`PyPipeline::enter`, `Call::new`): when it
/// goes, after the method's own locals (sources, specs, retired entries), the views that
/// died meanwhile are released. No call site drains by hand.
struct Call<'py>(Python<'py>);

impl<'py> Call<'py> {
    fn new(py: Python<'py>) -> Self {
        Self(py)
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        release_dead_views(self.0);
    }
}

fn release_dead_views(_py: Python<'_>) {
    // Taking the whole list at once: no node is ever popped singly, so there is no ABA.
    let mut p = GRAVEYARD.swap(std::ptr::null_mut(), Ordering::Acquire);
    while !p.is_null() {
        // SAFETY: every node was made by Box::into_raw in `bury` and published by its CAS
        // (the Acquire swap sees its writes); the swap took the list out of the stack, so
        // this thread owns each node exactly once.
        let Grave { view, next } = *unsafe { Box::from_raw(p) };
        p = next;
        drop(view); // GIL held: Buffer::drop releases the view
    }
}

/// A Python buffer as a pipeline source. Holding the view keeps the exporter alive and its
/// memory in place (a bytearray cannot be resized while exported).
struct PySource {
    view: ManuallyDrop<Buffer>,
}

impl SourceBytes for PySource {
    fn bytes(&self) -> &[u8] {
        self.view.as_slice()
    }
}

impl Drop for PySource {
    fn drop(&mut self) {
        // SAFETY: `view` is taken exactly once, here, and never used again.
        let view = unsafe { ManuallyDrop::take(&mut self.view) };
        bury(view);
    }
}

/// Keeps a writable view alive for a caller-provided staging buffer; released like PySource.
struct ViewKeeper(ManuallyDrop<Buffer>);

impl Drop for ViewKeeper {
    fn drop(&mut self) {
        // SAFETY: taken exactly once, here.
        let view = unsafe { ManuallyDrop::take(&mut self.0) };
        bury(view);
    }
}

fn staging_of(list: &Bound<'_, PyAny>) -> PyResult<Vec<StagingBuf>> {
    let mut out = Vec::new();
    for (i, item) in list.try_iter()?.enumerate() {
        let mut view = Buffer::get(&item?, true, &format!("staging[{i}]"))?;
        let slice = view.as_mut_slice();
        let (ptr, len) = (slice.as_mut_ptr(), slice.len());
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| PyValueError::new_err(format!("staging[{i}] is empty")))?;
        // SAFETY: the view (kept alive by the StagingBuf through ViewKeeper) pins `len`
        // writable bytes at `ptr` for as long as the StagingBuf lives. The caller hands the
        // memory over: the documentation of `staging` says not to touch it while the
        // pipeline is open.
        out.push(unsafe {
            StagingBuf::external(ptr, len, Box::new(ViewKeeper(ManuallyDrop::new(view))))
        });
    }
    Ok(out)
}

fn source_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Source> {
    let view = Buffer::get(obj, false, what)?;
    Ok(Arc::new(PySource {
        view: ManuallyDrop::new(view),
    }))
}

fn index(v: &Bound<'_, PyAny>, what: &str) -> PyResult<usize> {
    Int::of(v, what)?.usize(what)
}

/// `buf` or `(buf, offset, length)` (length None: to the end) → (source, offset, length).
fn transfer_spec(item: &Bound<'_, PyAny>, what: &str) -> PyResult<(Source, usize, Option<usize>)> {
    if let Ok(t) = item.cast::<PyTuple>() {
        if t.len() != 3 {
            return Err(PyValueError::new_err(format!(
                "{what}: a tuple must be (buffer, offset, length), got {} items",
                t.len()
            )));
        }
        let src = source_of(&t.get_item(0)?, what)?;
        let off = index(&t.get_item(1)?, &format!("{what} offset"))?;
        let len = t.get_item(2)?;
        let len = if len.is_none() {
            None
        } else {
            Some(index(&len, &format!("{what} length"))?)
        };
        return Ok((src, off, len));
    }
    Ok((source_of(item, what)?, 0, None))
}

fn log_warnings(py: Python<'_>, pipe: &Pipeline) -> PyResult<()> {
    let warnings = pipe.take_warnings();
    if warnings.is_empty() {
        return Ok(());
    }
    let logger = py
        .import("logging")?
        .call_method1("getLogger", ("pipellm",))?;
    for w in warnings {
        logger.call_method1("warning", (w,))?;
    }
    Ok(())
}

fn message_obj(offset: u64, m: pipellm_core::Message<Payload>) -> PyMessage {
    PyMessage { inner: m, offset }
}

/// Speculative pipelined encryption for one channel direction: predict the next transfers,
/// they are encrypted ahead of time; request the real transfer, its messages come back in
/// the order the receiver needs.
#[pyclass(frozen, module = "pipellm", name = "Pipeline")]
pub struct PyPipeline {
    inner: Pipeline,
}

impl PyPipeline {
    /// Starts a call: PipelineClosedError in a process forked from the pipeline's creator,
    /// else the [`Call`] that releases dead views when the method returns.
    fn enter<'py>(&self, py: Python<'py>) -> PyResult<Call<'py>> {
        self.inner.check_owner().map_err(|e| to_py(py, e))?;
        Ok(Call::new(py))
    }
}

#[pymethods]
impl PyPipeline {
    #[new]
    #[pyo3(signature = (key, channel = Int::Fits(0), slots = Int::Fits(64), chunk_bytes = Int::Fits(4 << 20), workers = Int::Fits(2), *, direction = "h2d", usage_limit = Int::Fits(DEFAULT_USAGE_LIMIT as i128), rotate = true, max_staging_bytes = Int::Fits(1 << 30), validation = "fingerprint", staging = None, keep_armed = Int::Fits(0)))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        key: &PySessionKey,
        channel: Int,
        slots: Int,
        chunk_bytes: Int,
        workers: Int,
        direction: &str,
        usage_limit: Int,
        rotate: bool,
        max_staging_bytes: Int,
        validation: &str,
        staging: Option<&Bound<'_, PyAny>>,
        keep_armed: Int,
    ) -> PyResult<Self> {
        let _call = Call::new(py); // releases the views of refused staging buffers
        let validation = match validation {
            "fingerprint" => Validation::Fingerprint,
            "protect" => Validation::PageProtection,
            v => {
                return Err(PyValueError::new_err(format!(
                    "validation must be 'fingerprint' or 'protect', got {v:?}"
                )))
            }
        };
        let (channel, direction, policy) = parse_end(channel, direction, usage_limit, rotate)?;
        let cfg = PipelineConfig {
            channel,
            direction,
            policy,
            slots: slots.usize("slots")?,
            chunk_bytes: chunk_bytes.usize("chunk_bytes")?,
            workers: workers.usize("workers")?,
            max_staging_bytes: max_staging_bytes.usize("max_staging_bytes")?,
            validation,
            keep_armed: keep_armed.usize("keep_armed")?,
        };
        let session = key.inner.clone();
        let inner = match staging {
            None => detached(py, move || Pipeline::new(&session, cfg))?,
            Some(list) => {
                let bufs = staging_of(list)?;
                detached(py, move || Pipeline::with_staging(&session, cfg, bufs))?
            }
        };
        Ok(Self { inner })
    }

    /// Queues the expected next transfers, in order: each a buffer or (buffer, offset,
    /// length). Never blocks on the ring.
    fn predict(&self, py: Python<'_>, transfers: &Bound<'_, PyAny>) -> PyResult<()> {
        let _call = self.enter(py)?;
        let mut specs = Vec::new();
        for (i, item) in transfers.try_iter()?.enumerate() {
            specs.push(transfer_spec(&item?, &format!("transfers[{i}]"))?);
        }
        let r = detached(py, || self.inner.predict(&specs));
        log_warnings(py, &self.inner)?;
        r
    }

    /// The real transfer of `length` bytes of `buf` from `offset` (default: all of it).
    /// Returns its messages, in order, as a Transfer (iterate it; each message says where
    /// its payload lands: `m.offset`). The source must not change until every message of the
    /// transfer has been taken.
    #[pyo3(signature = (buf, offset = Int::Fits(0), length = None))]
    fn request(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: Int,
        length: Option<Int>,
    ) -> PyResult<PyTransfer> {
        let _call = self.enter(py)?;
        let src = source_of(buf, "buf")?;
        let offset = offset.usize("offset")?;
        let length = length.map(|l| l.usize("length")).transpose()?;
        let t = detached(py, || self.inner.request(&src, offset, length))?;
        log_warnings(py, &self.inner)?;
        Ok(PyTransfer {
            inner: Mutex::new(Some(t)),
            interrupted: Mutex::default(),
        })
    }

    /// NOPs for every position still reserved in the ring (and pending predictions are
    /// dropped): send them and the receiver has every position this pipeline reserved.
    fn relinquish(&self, py: Python<'_>) -> PyResult<Vec<PyMessage>> {
        let _call = self.enter(py)?;
        let out = detached(py, || self.inner.relinquish_all())?;
        Ok(out.into_iter().map(|(o, m)| message_obj(o, m)).collect())
    }

    /// The pipeline's counters by name (`PipelineStats` in the stub; each is described in
    /// `pipellm_core::pipeline::StatsSnapshot`); times in seconds.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let _call = self.enter(py)?;
        let d = PyDict::new(py);
        for (name, value) in self.inner.stats().fields() {
            match value {
                StatValue::Count(n) => d.set_item(name, n)?,
                StatValue::Seconds(s) => d.set_item(name, s)?,
            }
        }
        Ok(d)
    }

    /// Holds (True) or releases (False) the worker threads: held, they finish the chunk in
    /// hand and start nothing new. For simulations that stop their clock.
    fn hold_workers(&self, py: Python<'_>, held: bool) -> PyResult<()> {
        let _call = self.enter(py)?;
        self.inner.hold_workers(held);
        Ok(())
    }

    /// Releases the chunks of `buf` kept write-protected between uses (`keep_armed`): its
    /// pages become writable again and the pipeline drops its reference to the buffer.
    /// Returns how many chunks were released.
    fn unwatch(&self, py: Python<'_>, buf: &Bound<'_, PyAny>) -> PyResult<usize> {
        let _call = self.enter(py)?;
        let src = source_of(buf, "buf")?;
        let n = detached(py, || Ok(self.inner.unwatch(&src)))?;
        Ok(n)
    }

    /// Forgets predictions not yet in the ring; returns how many.
    fn clear_plan(&self, py: Python<'_>) -> PyResult<usize> {
        let _call = self.enter(py)?;
        Ok(py.detach(|| self.inner.clear_plan()))
    }

    /// (entries in the ring, predictions waiting for a slot), read at one moment.
    fn queued(&self, py: Python<'_>) -> PyResult<(usize, usize)> {
        let _call = self.enter(py)?;
        // Takes the request path's locks: wait for them without the GIL.
        Ok(py.detach(|| self.inner.queued()))
    }

    /// Waits until the workers have nothing to do: the ring is refilled from the pending
    /// predictions, then every queued chunk is encrypted and no worker is busy (with workers
    /// held: only the chunks in hand; with none: returns after the refill). For tests and
    /// simulations whose outcome must not depend on the machine's speed. Returns False if
    /// `timeout` seconds passed first.
    #[pyo3(signature = (timeout = 10.0))]
    fn wait_idle(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let _call = self.enter(py)?;
        let timeout = if timeout == f64::INFINITY {
            Duration::MAX // no deadline
        } else {
            Duration::try_from_secs_f64(timeout).map_err(|_| {
                PyValueError::new_err(format!("timeout must be >= 0 seconds, got {timeout}"))
            })?
        };
        // Retired entries dropped meanwhile: `_call` releases their sources' views.
        detached(py, || Ok(self.inner.wait_idle(timeout)))
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Stops the threads, drops unsent reserved positions and wipes staging memory. In a
    /// process forked from the creator it does nothing (the child's copy is leaked).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let _call = Call::new(py);
        py.detach(|| self.inner.close());
        log_warnings(py, &self.inner)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _t: &Bound<'_, PyAny>,
        _v: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    /// Test hook: the next `speculative` speculative jobs and `on_demand` on-demand jobs
    /// panic inside the worker (as a crashing thread would).
    #[pyo3(signature = (speculative = Int::Fits(0), on_demand = Int::Fits(0)))]
    fn _inject_worker_panics(
        &self,
        py: Python<'_>,
        speculative: Int,
        on_demand: Int,
    ) -> PyResult<()> {
        let _call = self.enter(py)?;
        use std::sync::atomic::Ordering::Relaxed;
        let speculative: u32 = speculative.at_most("speculative", u32::MAX.into())?;
        let on_demand: u32 = on_demand.at_most("on_demand", u32::MAX.into())?;
        self.inner
            .faults()
            .panic_speculative
            .store(speculative, Relaxed);
        self.inner
            .faults()
            .panic_on_demand
            .store(on_demand, Relaxed);
        Ok(())
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Pipeline(channel={}, slots={}, chunk_bytes={}, workers={}{})",
            c.channel,
            c.slots,
            c.chunk_bytes,
            c.workers,
            if self.inner.is_closed() {
                ", closed"
            } else {
                ""
            }
        )
    }
}

/// The messages of one request, in order. Iterating waits for (or performs) each on-demand
/// encryption with the GIL released.
#[pyclass(frozen, module = "pipellm", name = "Transfer")]
pub struct PyTransfer {
    inner: Mutex<Option<Transfer>>,
    /// Messages `messages()` had taken when a signal handler raised (Ctrl-C): handed out
    /// first by the next call, so an interrupt loses no position of the stream.
    interrupted: Mutex<std::collections::VecDeque<PyMessage>>,
}

impl PyTransfer {
    fn interrupted(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<PyMessage>> {
        lock(&self.interrupted)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Transfer) -> R) -> Option<R> {
        lock(&self.inner).as_mut().map(f)
    }
}

impl Drop for PyTransfer {
    fn drop(&mut self) {
        let t = get_mut(&mut self.inner).take();
        if let Some(t) = t {
            // Dropping finishes the on-demand chunks nobody took (no pipeline thread needs
            // the GIL, see GRAVEYARD) and drops the transfer's retired entries; then the
            // views of its sources are released (a pyclass is dropped with the GIL held).
            drop(t);
            Python::attach(release_dead_views);
        }
    }
}

#[pymethods]
impl PyTransfer {
    /// Number of messages (taken or not).
    fn __len__(&self) -> usize {
        self.with(|t| t.len()).unwrap_or(0)
    }

    /// Messages not taken yet.
    #[getter]
    fn remaining(&self) -> usize {
        let held = self.interrupted().len();
        held + self.with(|t| t.remaining()).unwrap_or(0)
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyMessage>> {
        // After the last message the pipeline dropped its references to the source: the
        // views are released when this call returns rather than at the next pipeline call.
        let _call = Call::new(py);
        let held = self.interrupted().pop_front();
        if let Some(m) = held {
            return Ok(Some(m));
        }
        // The lock is taken with the GIL released (see Receiver.open_into).
        let next = py.detach(|| self.with(|t| t.next_message()).flatten());
        match next {
            None => Ok(None),
            Some(Ok((offset, m))) => Ok(Some(message_obj(offset, m))),
            Some(Err(e)) => Err(to_py(py, e)),
        }
    }

    /// All remaining messages, in order. Signal handlers run between messages: if one
    /// raises (Ctrl-C), the messages taken so far are kept and come first from the next
    /// call, and the exception propagates.
    fn messages(&self, py: Python<'_>) -> PyResult<Vec<PyMessage>> {
        let mut out = Vec::new();
        loop {
            if let Err(e) = py.check_signals() {
                let mut held = self.interrupted();
                for m in out.into_iter().rev() {
                    held.push_front(m);
                }
                return Err(e);
            }
            match self.__next__(py)? {
                Some(m) => out.push(m),
                None => return Ok(out),
            }
        }
    }

    fn __repr__(&self) -> String {
        self.with(|t| {
            format!(
                "Transfer({} messages, {} remaining)",
                t.len(),
                t.remaining()
            )
        })
        .unwrap_or_else(|| "Transfer(empty)".into())
    }
}
