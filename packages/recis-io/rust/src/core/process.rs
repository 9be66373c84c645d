//! Which process made an object.
//!
//! A process forked while a reader runs (a `DataLoader` worker, `os.fork()`) holds copies of
//! the reader's objects, but not the threads behind them, and any lock one of those threads
//! held at the fork stays locked for ever in the child. Dropping such a copy in the child
//! must therefore not join, wake or lock anything: it leaks what the threads own instead,
//! which the child's exit gives back.

/// The process an object was made in.
#[derive(Clone, Copy, Debug)]
pub struct Process(u32);

impl Process {
    pub fn current() -> Process {
        Process(std::process::id())
    }

    /// Whether this is a process forked from the one that made the object, where the
    /// object's threads do not exist.
    pub fn forked(self) -> bool {
        std::process::id() != self.0
    }
}
