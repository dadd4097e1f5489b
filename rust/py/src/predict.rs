//! The learned predictor for Python (keys are ints; `pipellm.predictors` maps transfers).

use crate::args::Int;
use crate::errors::to_py;
use pipellm_core::locks::lock;
use pipellm_core::predict::{Learned, MAX_HISTORY, MAX_PREDICT};
use pyo3::prelude::*;
use std::sync::Mutex;

/// Learns repetition in a stream of integer keys: a period when the history repeats, the
/// most frequent successor otherwise.
#[pyclass(frozen, module = "pipellm", name = "LearnedPredictor")]
pub struct PyLearned {
    inner: Mutex<Learned>,
}

impl PyLearned {
    fn lock(&self) -> std::sync::MutexGuard<'_, Learned> {
        lock(&self.inner)
    }
}

#[pymethods]
impl PyLearned {
    /// `history`: keys remembered, 4..=MAX_HISTORY; `max_period`: longest cycle looked for
    /// (>= 1; capped at history / 2).
    #[new]
    #[pyo3(signature = (history = Int::Fits(4096), max_period = Int::Fits(1024)))]
    fn new(py: Python<'_>, history: Int, max_period: Int) -> PyResult<Self> {
        let history: usize = history.get("history", 4, MAX_HISTORY as i128)?;
        let max_period: usize = max_period.get("max_period", 1, i128::from(u64::MAX))?;
        let inner = Learned::try_new(history, max_period).map_err(|e| to_py(py, e))?;
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    /// Records that `key` (0..2**64) was requested.
    fn observe(&self, key: Int) -> PyResult<()> {
        let key: u64 = key.at_most("key", u64::MAX)?;
        self.lock().observe(key);
        Ok(())
    }

    /// The next `n` keys expected (0..=MAX_PREDICT), most likely first (fewer if it knows no
    /// more).
    fn predict(&self, py: Python<'_>, n: Int) -> PyResult<Vec<u64>> {
        let n: usize = n.at_most("n", MAX_PREDICT as u64)?;
        self.lock().try_predict(n).map_err(|e| to_py(py, e))
    }

    /// The detected period, if the history currently repeats.
    #[getter]
    fn period(&self) -> Option<usize> {
        self.lock().period()
    }
}
