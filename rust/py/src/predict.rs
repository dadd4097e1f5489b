//! The learned predictor for Python (keys are ints; `pipellm.predictors` maps transfers).

use pipellm_core::predict::Learned;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::{Mutex, PoisonError};

/// Learns repetition in a stream of integer keys: a period when the history repeats, the
/// most frequent successor otherwise.
#[pyclass(frozen, module = "pipellm", name = "LearnedPredictor")]
pub struct PyLearned {
    inner: Mutex<Learned>,
}

impl PyLearned {
    fn lock(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[pymethods]
impl PyLearned {
    #[new]
    #[pyo3(signature = (history = 4096, max_period = 1024))]
    fn new(history: i64, max_period: i64) -> PyResult<Self> {
        if history < 4 || max_period < 1 {
            return Err(PyValueError::new_err(format!(
                "history must be >= 4 and max_period >= 1, got {history} and {max_period}"
            )));
        }
        Ok(Self {
            inner: Mutex::new(Learned::new(history as usize, max_period as usize)),
        })
    }

    fn observe(&self, key: u64) {
        self.lock().observe(key);
    }

    /// The next `n` keys expected, most likely first (fewer if it knows no more).
    fn predict(&self, n: usize) -> Vec<u64> {
        self.lock().predict(n)
    }

    /// The detected period, if the history currently repeats.
    #[getter]
    fn period(&self) -> Option<usize> {
        self.lock().period()
    }
}
