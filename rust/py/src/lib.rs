//! `pipellm._core`: thin PyO3 bindings over `pipellm-core`. No logic lives here beyond
//! argument conversion, error mapping and releasing the GIL around heavy work. Where this
//! sits among the crates: `docs/architecture.md`.

#![deny(clippy::undocumented_unsafe_blocks)]

mod args;
mod buffers;
mod channel;
mod errors;
mod hostpool;
mod pipeline;
mod predict;

use pyo3::prelude::*;

/// Which write tracker `validation="protect"` uses in this process: "uffd" (the kernel's
/// asynchronous write protection), "mprotect" (page protection and a SIGSEGV handler) or
/// "unavailable" (`PIPELLM_WRITE_TRACKER=uffd` where the kernel lacks it).
#[pyfunction]
fn write_tracker() -> &'static str {
    pipellm_core::writeguard::tracker_name()
}

/// True if this extension registers its ranges in another copy's address-space table: the
/// interposer's, when `pipellm run` loaded it (see `rust/core/src/space/mod.rs`).
#[pyfunction]
fn _space_shared() -> bool {
    pipellm_core::space::shared()
}

/// Every range in the process's address-space table: `(start, end, kind, mine)`, `mine`
/// true for this extension's own (for tests and diagnostics).
#[pyfunction]
fn _space_entries() -> Vec<(usize, usize, &'static str, bool)> {
    pipellm_core::space::entries()
        .into_iter()
        .map(|(s, k, mine)| (s.start, s.end, k.name(), mine))
        .collect()
}

/// Which SIGSEGV handler serves this extension's page protection: "delegated" (the
/// interposer's, when `pipellm run` loaded it: one handler per process), "own" or "none".
#[pyfunction]
fn _segv_handler() -> &'static str {
    pipellm_core::writeguard::handler()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<channel::PySessionKey>()?;
    m.add_class::<channel::PySender>()?;
    m.add_class::<channel::PyReceiver>()?;
    m.add_class::<channel::PyMessage>()?;
    m.add_class::<pipeline::PyPipeline>()?;
    m.add_class::<hostpool::PyHostPool>()?;
    m.add_function(wrap_pyfunction!(hostpool::_in_host_pool, m)?)?;
    m.add_function(wrap_pyfunction!(hostpool::_host_pool_lend, m)?)?;
    m.add_function(wrap_pyfunction!(hostpool::_host_pool_end_loan, m)?)?;
    m.add_function(wrap_pyfunction!(buffers::_buffer_span, m)?)?;
    m.add_function(wrap_pyfunction!(write_tracker, m)?)?;
    m.add_function(wrap_pyfunction!(_space_shared, m)?)?;
    m.add_function(wrap_pyfunction!(_space_entries, m)?)?;
    m.add_function(wrap_pyfunction!(_segv_handler, m)?)?;
    m.add_class::<pipeline::PyTransfer>()?;
    m.add_class::<predict::PyLearned>()?;
    m.add(
        "DEFAULT_USAGE_LIMIT",
        pipellm_core::schedule::DEFAULT_USAGE_LIMIT,
    )?;
    m.add("MAX_CHANNEL", pipellm_core::header::MAX_CHANNEL)?;
    m.add("HEADER_LEN", pipellm_core::header::HEADER_LEN)?;
    m.add("MAX_KEEP_ARMED", pipellm_core::pipeline::MAX_KEEP_ARMED)?;
    m.add(
        "MAX_TRANSFER_CHUNKS",
        pipellm_core::pipeline::MAX_TRANSFER_CHUNKS,
    )?;
    m.add("MAX_HISTORY", pipellm_core::predict::MAX_HISTORY)?;
    m.add("MAX_PREDICT", pipellm_core::predict::MAX_PREDICT)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
