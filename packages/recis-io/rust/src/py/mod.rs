//! Python bindings: the private `recis_io._recis_io` module.

mod dlpack;
mod errors;
mod memory;
mod reader;

use pyo3::prelude::*;

use crate::core::hash::HashKind;
use crate::core::Error;
use errors::IntoPyResult;

pub(crate) fn hash_kind(name: &str) -> Result<HashKind, Error> {
    match name {
        "farm" => Ok(HashKind::Farm),
        "murmur" => Ok(HashKind::Murmur),
        other => Err(Error::InvalidArgument(format!(
            "hash must be 'farm' or 'murmur', got '{other}'"
        ))),
    }
}

/// Hashes `data` as the reader hashes strings, returning the id as a signed 64-bit integer.
#[pyfunction]
#[pyo3(signature = (data, kind, buckets = 0))]
fn hash_bytes(data: &[u8], kind: &str, buckets: u64) -> PyResult<i64> {
    let h = hash_kind(kind).py()?.hash(data);
    Ok((if buckets > 0 { h % buckets } else { h }) as i64)
}

#[pymodule]
fn _recis_io(m: &Bound<'_, PyModule>) -> PyResult<()> {
    memory::configure_allocator();
    m.add_class::<reader::Reader>()?;
    m.add_function(wrap_pyfunction!(hash_bytes, m)?)?;
    Ok(())
}
