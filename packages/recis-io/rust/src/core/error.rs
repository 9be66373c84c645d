//! The single error type of the reader core.

/// Everything that can go wrong while planning or reading.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// A path that does not exist.
    #[error("file not found: {0}")]
    NotFound(String),
    /// A missing column, a type the reader cannot produce, files that disagree, or nulls
    /// where a column has no fill value.
    #[error("{0}")]
    Schema(String),
    /// A file that is not a valid Parquet/ORC file, or is truncated.
    #[error("cannot read {path}: {msg}")]
    Corrupt { path: String, msg: String },
    /// An option out of range (batch size, shard, cursor).
    #[error("{0}")]
    InvalidArgument(String),
    /// The reader was closed or a worker thread died.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn corrupt(path: &str, msg: impl std::fmt::Display) -> Self {
        let text = msg.to_string();
        let mut chars = text.chars();
        let lowered = match chars.next() {
            Some(c) => c.to_lowercase().chain(chars).collect(),
            None => String::new(),
        };
        Error::Corrupt {
            path: path.to_string(),
            msg: lowered.trim_end_matches('.').to_string(),
        }
    }
}
