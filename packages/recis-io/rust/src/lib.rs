//! recis-io: a multithreaded Parquet/ORC reader producing packed training batches.
//!
//! `core` is plain Rust (tested with `cargo test`); `py` holds the Python bindings and is
//! compiled only with the `python` feature.

pub mod core;

#[cfg(feature = "python")]
mod py;
