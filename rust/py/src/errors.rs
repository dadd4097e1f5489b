//! Python exception classes and the one place core errors become them.

use pipellm_core::{Error, OrderViolation};
use pyo3::exceptions::{PyException, PyMemoryError, PyOSError, PyOverflowError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

pyo3::create_exception!(
    pipellm,
    PipeLLMError,
    PyException,
    "Base class of every error pipellm raises on its own behalf."
);
pyo3::create_exception!(
    pipellm,
    IvOrderError,
    PipeLLMError,
    "A message is not the next one of its stream (gap, reorder, replay or truncated epoch). \
     Attributes: kind ('gap', 'replay' or 'epoch_truncated'), expected and got as \
     (epoch, counter) tuples. The receiver is unchanged."
);
pyo3::create_exception!(
    pipellm,
    AuthenticationError,
    PipeLLMError,
    "Tag, AAD or ciphertext do not verify. The receiver is unchanged; no plaintext was exposed."
);
pyo3::create_exception!(
    pipellm,
    IvExhaustedError,
    PipeLLMError,
    "The key's usage limit is reached and rotation is disabled, or every epoch is used."
);

pyo3::create_exception!(
    pipellm,
    PipelineClosedError,
    PipeLLMError,
    "The pipeline was closed; create a new one."
);

pyo3::create_exception!(
    pipellm,
    CapacityError,
    PipeLLMError,
    "A fixed-size process-wide table is full: write-watched regions (pipellm.MAX_KEEP_ARMED \
     bounds one pipeline's share), closed D2H gates. Release some (close a pipeline, unwatch)."
);

static ARGUMENT_RANGE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `pipellm.ArgumentRangeError`: an int argument out of its range. A `ValueError`, and an
/// `OverflowError` too, which is what such values raised before they were checked by name.
fn argument_range_error_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    ARGUMENT_RANGE_ERROR
        .get_or_try_init(py, || {
            let dict = PyDict::new(py);
            dict.set_item("__module__", "pipellm")?;
            dict.set_item(
                "__doc__",
                "An int argument is negative or too large for its parameter (the message names \
                 it). A ValueError; also an OverflowError, for code written against earlier \
                 versions.",
            )?;
            let bases = (
                py.get_type::<PyValueError>(),
                py.get_type::<PyOverflowError>(),
            );
            let ty = py
                .get_type::<PyType>()
                .call1(("ArgumentRangeError", bases, dict))?;
            Ok::<_, PyErr>(ty.cast_into::<PyType>()?.unbind())
        })
        .map(|t| t.bind(py))
}

/// An `ArgumentRangeError` (a `ValueError`) with `msg`.
pub fn argument_range(msg: String) -> PyErr {
    Python::attach(|py| match argument_range_error_type(py) {
        Ok(ty) => PyErr::from_type(ty.clone(), msg),
        Err(_) => PyValueError::new_err(msg),
    })
}

/// Maps a core error onto its Python exception.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::IvOrder {
            violation,
            expected,
            got,
        } => {
            let err = IvOrderError::new_err(msg);
            let kind = match violation {
                OrderViolation::Gap => "gap",
                OrderViolation::Replay => "replay",
                OrderViolation::EpochTruncated { .. } => "epoch_truncated",
            };
            let v = err.value(py);
            // Attribute assignment on a fresh exception instance cannot fail in practice; if it
            // did, the exception still carries the full message.
            let _ = v.setattr("kind", kind);
            let _ = v.setattr("expected", (expected.epoch, expected.counter));
            let _ = v.setattr("got", (got.epoch, got.counter));
            err
        }
        Error::Authentication(_) => AuthenticationError::new_err(msg),
        Error::IvExhausted(_) => IvExhaustedError::new_err(msg),
        Error::InvalidLength(_) | Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::Backend(_) => PipeLLMError::new_err(msg),
        Error::Closed | Error::Forked { .. } => PipelineClosedError::new_err(msg),
        Error::OutOfMemory(_) => PyMemoryError::new_err(msg),
        // OSError(errno, message): Python picks the subclass (PermissionError for EPERM...).
        Error::Os { errno, .. } => PyOSError::new_err((errno, msg)),
        Error::Capacity(_) => CapacityError::new_err(msg),
    }
}

/// One core error of every kind, each as `to_py` maps it, by variant name: the test of the
/// mapping (tests/test_errors.py) checks every class. A new variant fails to build until
/// `to_py` maps it, and must be added here to be tested.
#[pyo3::pyfunction]
pub fn _error_examples(py: Python<'_>) -> Vec<(&'static str, PyErr)> {
    use pipellm_core::header::Position;
    let at = Position {
        epoch: 0,
        counter: 0,
    };
    let examples = [
        (
            "IvOrder",
            Error::IvOrder {
                violation: OrderViolation::Gap,
                expected: at,
                got: at,
            },
        ),
        ("Authentication", Error::Authentication("tag")),
        ("IvExhausted", Error::IvExhausted("limit")),
        ("InvalidLength", Error::InvalidLength("length".into())),
        ("InvalidArgument", Error::InvalidArgument("argument".into())),
        ("Closed", Error::Closed),
        ("Forked", Error::Forked { owner: 1 }),
        ("OutOfMemory", Error::OutOfMemory("memory".into())),
        ("Backend", Error::Backend("backend")),
        (
            "Os",
            Error::Os {
                what: "mprotect".into(),
                errno: libc::EPERM,
            },
        ),
        ("Capacity", Error::Capacity("table".into())),
    ];
    examples
        .into_iter()
        .map(|(name, e)| (name, to_py(py, e)))
        .collect()
}

/// Runs `f` with the GIL released, turning a panic (a bug) into `PipeLLMError` rather than
/// letting it cross into Python.
pub fn detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Error> + Send,
    T: Send,
{
    match py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(_) => Err(PipeLLMError::new_err(
            "internal error in pipellm (a bug: please report it); the operation did not complete",
        )),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("PipeLLMError", py.get_type::<PipeLLMError>())?;
    m.add("IvOrderError", py.get_type::<IvOrderError>())?;
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    m.add("IvExhaustedError", py.get_type::<IvExhaustedError>())?;
    m.add("PipelineClosedError", py.get_type::<PipelineClosedError>())?;
    m.add("ArgumentRangeError", argument_range_error_type(py)?)?;
    m.add("CapacityError", py.get_type::<CapacityError>())?;
    m.add_function(pyo3::wrap_pyfunction!(_error_examples, m)?)?;
    Ok(())
}
