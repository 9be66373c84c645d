//! Maps core errors onto the exception classes of `recis_io.exceptions`.

use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::core::Error;

fn class_name(e: &Error) -> &'static str {
    match e {
        Error::NotFound(_) => "DataFileNotFoundError",
        Error::Schema(_) => "SchemaError",
        Error::Corrupt { .. } => "CorruptFileError",
        Error::Os { .. } => "DataFileReadError",
        Error::InvalidArgument(_) => "InvalidArgumentError",
        Error::Internal(_) => "RecisIOError",
    }
}

/// Converts a core error, importing the class from Python so `except` clauses written against
/// `recis_io.exceptions` catch it.
pub fn to_pyerr(e: Error) -> PyErr {
    Python::attach(|py| {
        let class = py
            .import("recis_io.exceptions")
            .and_then(|m| m.getattr(class_name(&e)))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match class {
            // OSError's two-argument form sets `errno` (and `strerror`, the message).
            Ok(class) => match &e {
                Error::Os { errno, .. } => PyErr::from_type(class, (*errno, e.to_string())),
                // A FileNotFoundError with its errno and file, as `open()` gives one, so
                // `e.errno == errno.ENOENT` and `e.filename` hold.
                Error::NotFound(path) => not_found(&class, path),
                _ => PyErr::from_type(class, e.to_string()),
            },
            Err(import_error) => import_error,
        }
    })
}

/// `class(ENOENT, "file not found", path)`: OSError's three-argument form sets `errno`,
/// `strerror` and `filename`, and reads `[Errno 2] file not found: '<path>'`.
fn not_found(class: &Bound<'_, PyType>, path: &str) -> PyErr {
    const ENOENT: i32 = 2; // the same number wherever Python runs
    match class.call1((ENOENT, "file not found", path)) {
        Ok(value) => PyErr::from_value(value),
        Err(err) => err,
    }
}

pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}
