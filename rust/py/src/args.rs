//! Int arguments from Python, checked where their name is known: every integer parameter of
//! the bindings is taken as an [`Int`] and converted with [`Int::get`], so that a negative or
//! too large value is a `ValueError` and a non-int a `TypeError`, both naming the argument
//! (rather than PyO3's unnamed `OverflowError` for values that do not fit a Rust integer).
//! The `ValueError` is `pipellm.ArgumentRangeError`, also an `OverflowError` for callers that
//! caught that.

use crate::errors::argument_range;
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::prelude::*;

/// A Python int as given (anything with `__index__`: int, bool, numpy integers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Int {
    /// The value, when it fits 128 bits.
    Fits(i128),
    /// A value wider than 128 bits, with its sign: out of range of every parameter.
    Huge { negative: bool },
    /// Not an int (no `__index__`): the name of its type. Extraction never fails, so that
    /// `get`, which knows the parameter's name, raises the `TypeError`.
    Other(String),
}

impl Int {
    /// `what` in `min..=max` as a `T`: `ValueError` naming `what` otherwise.
    pub fn get<T: TryFrom<i128>>(self, what: &str, min: i128, max: i128) -> PyResult<T> {
        let v = match self {
            Int::Other(ty) => {
                return Err(PyTypeError::new_err(format!(
                    "{what} must be an int, got {ty}"
                )))
            }
            Int::Fits(v) if v < min => {
                let bound = if min == 0 {
                    ">= 0".to_string()
                } else {
                    format!("at least {min}")
                };
                return Err(argument_range(format!("{what} must be {bound}, got {v}")));
            }
            Int::Fits(v) if v > max => {
                return Err(argument_range(format!(
                    "{what} must be at most {max}, got {v}"
                )))
            }
            Int::Fits(v) => v,
            Int::Huge { negative: true } => {
                return Err(argument_range(format!(
                    "{what} must be >= {min}, got a negative int wider than 128 bits"
                )))
            }
            Int::Huge { negative: false } => {
                return Err(argument_range(format!(
                    "{what} must be at most {max}, got an int wider than 128 bits"
                )))
            }
        };
        T::try_from(v)
            .map_err(|_| argument_range(format!("{what} must be in {min}..={max}, got {v}")))
    }

    /// A size, count or offset: `0..=max`.
    pub fn at_most<T: TryFrom<i128>>(self, what: &str, max: u64) -> PyResult<T> {
        self.get(what, 0, i128::from(max))
    }

    /// A size, count or offset that fits `usize`.
    pub fn usize(self, what: &str) -> PyResult<usize> {
        self.at_most(what, usize::MAX as u64)
    }

    /// Extracts `obj` as an int argument named `what` (for ints inside containers, where
    /// PyO3 does not name the argument).
    pub fn of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        match obj.extract::<Int>()? {
            Int::Other(ty) => Err(PyTypeError::new_err(format!(
                "{what} must be an int, got {ty}"
            ))),
            v => Ok(v),
        }
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let obj = obj.to_owned();
        match obj.extract::<i128>() {
            Ok(v) => Ok(Int::Fits(v)),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Ok(Int::Huge {
                negative: obj.lt(0)?,
            }),
            Err(e) if e.is_instance_of::<PyTypeError>(obj.py()) => Ok(Int::Other(
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "?".into()),
            )),
            Err(e) => Err(e),
        }
    }
}
