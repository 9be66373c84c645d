//! The reader core: file metadata, the deterministic plan, decoding on a thread pool and
//! packing decoded values into batch buffers. No Python types live here.

pub mod ahead;
pub mod assemble;
pub mod chunks;
pub mod column;
pub mod direct;
pub mod error;
pub mod hash;
pub mod orc_lengths;
pub mod orc_types;
pub mod parquet_footer;
pub mod parquet_pages;
pub mod plan;
pub mod pool;
pub mod prepare;
pub mod process;
pub mod reader;
pub mod ring;
pub mod source;

pub use error::{Error, Result};
