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
        Error::Corrupt {
            path: path.to_string(),
            msg: lower_first_word(&msg.to_string())
                .trim_end_matches('.')
                .to_string(),
        }
    }
}

/// `text` with its first letter lowered to read on after "cannot read …:", unless the first
/// word is an acronym ("EOF: …" stays "EOF: …").
fn lower_first_word(text: &str) -> String {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(a), Some(b)) if a.is_uppercase() && b.is_uppercase() => text.to_string(),
        (Some(a), _) => a.to_lowercase().chain(text.chars().skip(1)).collect(),
        (None, _) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn corrupt_messages_read_on_and_keep_acronyms() {
        let msg = |e: Error| e.to_string();
        assert_eq!(
            msg(Error::corrupt("f.parquet", "Invalid page header.")),
            "cannot read f.parquet: invalid page header"
        );
        assert_eq!(
            msg(Error::corrupt("f.parquet", "EOF: file too small")),
            "cannot read f.parquet: EOF: file too small"
        );
        assert_eq!(msg(Error::corrupt("f", "")), "cannot read f: ");
    }
}
