//! The single error type of the reader core.

use std::cell::Cell;
use std::sync::Once;

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
    /// A read the operating system refused or failed (permission denied, an I/O error, a
    /// directory where a file was planned); `errno` is its error number.
    #[error("cannot read {path}: {msg}")]
    Os {
        path: String,
        errno: i32,
        msg: String,
    },
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

    /// A corrupt-data error said of the column `name` gives, when it gives one; other errors,
    /// and those that name their column already, as they are, without asking.
    pub(crate) fn in_column<'a>(self, name: impl FnOnce() -> Option<&'a str>) -> Self {
        match self {
            Error::Corrupt { path, msg } if msg.starts_with("column '") => {
                Error::Corrupt { path, msg }
            }
            Error::Corrupt { path, msg } => match name() {
                Some(name) => Error::Corrupt {
                    path,
                    msg: format!("column '{name}': {msg}"),
                },
                None => Error::Corrupt { path, msg },
            },
            e => e,
        }
    }

    /// A corrupt-file or operating-system error said of `at` (the file with its row group or
    /// stripe) instead of the bare path; other errors as they are.
    pub(crate) fn at(self, at: &str) -> Self {
        match self {
            Error::Corrupt { msg, .. } => Error::Corrupt {
                path: at.to_string(),
                msg,
            },
            Error::Os { errno, msg, .. } => Error::Os {
                path: at.to_string(),
                errno,
                msg,
            },
            other => other,
        }
    }

    /// The error for a failed read of `path`: the operating system's refusal (permission
    /// denied, an I/O error) when `e` or an error behind it carries one, else a corrupt file.
    /// Decoders wrap the `io::Error` of the file they read; one without an error number (a
    /// short read, a bad compressed block) says the data is wrong, not the system.
    pub(crate) fn read(path: &str, e: &(dyn std::error::Error + 'static)) -> Self {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                if let Some(errno) = io.raw_os_error() {
                    if io.kind() == std::io::ErrorKind::NotFound {
                        return Error::NotFound(path.to_string());
                    }
                    let text = std::io::Error::from_raw_os_error(errno).to_string();
                    let suffix = format!(" (os error {errno})");
                    return Error::Os {
                        path: path.to_string(),
                        errno,
                        msg: lower_first_word(text.strip_suffix(&suffix).unwrap_or(&text)),
                    };
                }
            }
            cause = c.source();
        }
        Error::corrupt(path, e)
    }
}

thread_local! {
    /// How many [`guard`] calls this thread is inside. Their panics are caught and reported in
    /// the error they become, so the panic hook keeps quiet about them.
    static GUARDED: Cell<usize> = const { Cell::new(0) };
}

/// Whether this thread is inside [`guard`], where a panic becomes an error instead of a message.
pub(crate) fn in_guard() -> bool {
    GUARDED.try_with(|g| g.get() > 0).unwrap_or(false)
}

/// Installs, once per process, a panic hook that stays silent for panics inside [`guard`] and
/// hands every other panic to the hook that was installed before it (the default hook prints
/// "thread ... panicked at ..."), so only panics nobody catches are printed.
fn install_quiet_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !in_guard() {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic inside it into a corrupt-file error naming `path` and carrying the
/// panic's message. The decoder crates assert (or `unwrap`) on some malformed input instead of
/// returning an error; a file that trips one is corrupt, whatever thread reads it. The panic is
/// not printed (see [`install_quiet_hook`]): the error says it all.
pub(crate) fn guard<T>(path: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    install_quiet_hook();
    GUARDED.with(|g| g.set(g.get() + 1));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get() - 1));
    caught.unwrap_or_else(|panic| {
        Err(Error::corrupt(
            path,
            format!("the decoder failed: {}", panic_message(panic.as_ref())),
        ))
    })
}

/// The message a panic was raised with (empty when it carried something else).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
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

    #[test]
    fn os_errors_are_told_from_corrupt_data() {
        let denied = std::io::Error::from_raw_os_error(13);
        let err = Error::read("f.parquet", &denied);
        assert!(matches!(&err, Error::Os { errno: 13, .. }));
        assert_eq!(err.to_string(), "cannot read f.parquet: permission denied");
        // Found behind the errors that wrap it, as the decoders report it.
        let wrapped = parquet::errors::ParquetError::from(std::io::Error::from_raw_os_error(21));
        assert_eq!(
            Error::read("f", &wrapped).to_string(),
            "cannot read f: is a directory"
        );
        let gone = std::io::Error::from_raw_os_error(2);
        assert!(matches!(Error::read("f", &gone), Error::NotFound(p) if p == "f"));
        // An io::Error without an error number is about the data.
        let short = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read");
        assert!(matches!(Error::read("f", &short), Error::Corrupt { .. }));
        let general = parquet::errors::ParquetError::General("bad page".into());
        assert_eq!(
            Error::read("f", &general).to_string(),
            "cannot read f: parquet error: bad page"
        );
    }

    #[test]
    fn guard_turns_a_panic_into_a_corrupt_file_error() {
        let err = super::guard::<u8>("f.orc", || Ok("x".parse::<u8>().unwrap())).unwrap_err();
        assert!(matches!(&err, Error::Corrupt { path, .. } if path == "f.orc"));
        assert_eq!(
            err.to_string(),
            "cannot read f.orc: the decoder failed: called `Result::unwrap()` on an `Err` value: \
             ParseIntError { kind: InvalidDigit }"
        );
        assert_eq!(super::guard("f.orc", || Ok(3)).unwrap(), 3);
    }

    #[test]
    fn guards_nest_and_end_with_their_call() {
        assert!(!super::in_guard());
        let inside = super::guard("f.orc", || Ok(super::in_guard())).unwrap();
        assert!(inside);
        // Nested guards: the outer one is still active after the inner one caught its panic.
        let outer = super::guard("f.orc", || {
            let inner = super::guard::<()>("f.orc", || panic!("inner"));
            assert!(inner.is_err());
            Ok(super::in_guard())
        });
        assert!(outer.unwrap());
        assert!(!super::in_guard());
    }
}
