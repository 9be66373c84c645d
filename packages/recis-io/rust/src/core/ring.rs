//! A small ring of reusable batch buffers. Writing into fresh memory is slow because of page
//! faults, so buffers return here when the last view of a batch is dropped.

use std::sync::{Arc, Mutex, Weak};

use super::process::Process;

/// Free buffers, kept up to `keep` of them.
pub struct Ring {
    free: Mutex<Vec<Vec<u64>>>,
    keep: usize,
    process: Process,
}

/// One batch buffer; goes back to its ring on drop.
pub struct Slab {
    buf: Vec<u64>,
    len: usize,
    ring: Weak<Ring>,
}

impl Ring {
    pub fn new(keep: usize) -> Arc<Ring> {
        Arc::new(Ring {
            free: Mutex::new(Vec::new()),
            keep: keep.max(1),
            process: Process::current(),
        })
    }

    /// A buffer of at least `nbytes` bytes (8-byte aligned), reused when one is large enough.
    pub fn take(self: &Arc<Ring>, nbytes: usize) -> Slab {
        let words = nbytes.div_ceil(8).max(1);
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= words)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        // Ragged columns vary in size from batch to batch: leave headroom so a slightly larger
        // batch can still reuse this buffer.
        let buf = reused.unwrap_or_else(|| vec![0u64; words + words / 4]);
        Slab {
            buf,
            len: nbytes,
            ring: Arc::downgrade(self),
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Slab {
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: a u64 buffer viewed as bytes; u8 has no alignment or validity requirements
        // and `len <= 8 * buf.len()`.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<u8>(), len) }
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: as in `as_mut_bytes`, read-only.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.len) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.buf.as_ptr().cast()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        if let Some(ring) = self.ring.upgrade() {
            if ring.process.forked() {
                // A batch kept across a fork: a thread of the parent may have held the
                // ring's lock at the fork (see `process`), so the buffer is just freed.
                return;
            }
            let mut free = ring.free.lock().unwrap_or_else(|p| p.into_inner());
            if free.len() < ring.keep {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

/// A batch buffer as it is handed out: one of its own, or a packed chunk shared with the
/// decoded segment that views it.
pub enum SlabRef {
    Own(Slab),
    Shared(Arc<Slab>),
}

impl SlabRef {
    pub fn slab(&self) -> &Slab {
        match self {
            SlabRef::Own(s) => s,
            SlabRef::Shared(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_after_drop() {
        let ring = Ring::new(2);
        let a = ring.take(100);
        let ptr = a.as_ptr();
        drop(a);
        assert_eq!(ring.free_count(), 1);
        let b = ring.take(90);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 90);
        let c = ring.take(10_000);
        assert_ne!(c.as_ptr(), ptr);
    }
}
