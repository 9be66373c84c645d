//! Batches assembled ahead on a thread of their own.
//!
//! A shuffled batch is gathered row by row from the decoded window, which takes a few
//! milliseconds per batch. Done on the caller's thread it stalls the training step that waits
//! for the batch; here a second reader, started at the caller's cursor, prepares and packs the
//! next batches into ring buffers while the caller computes, and hands them over in order
//! through a bounded channel. Each batch carries the cursor after it, so what the caller sees
//! (batches, cursor, errors) is exactly what the reader would give on the caller's thread.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::assemble::BatchLayout;
use super::error::{Error, Result};
use super::process::Process;
use super::reader::Reader;
use super::ring::SlabRef;

/// One assembled batch and the cursor after it.
pub struct Assembled {
    pub buffer: SlabRef,
    pub layout: BatchLayout,
    pub cursor: (u64, usize),
}

/// Batches gathered together (see [`Reader::next_buffers`]). A shuffled batch of 4096 rows
/// from a 65,536-row window reads one value of 8 bytes from about 40% of the cache lines of
/// each flat column of the window; eight batches gathered in one pass read each line about
/// once for all of them instead of about three times. The reader's CPU time a batch on the
/// end-to-end benchmark's data (41 columns, a list column among them, 4096-row shuffled
/// batches, one decode thread, a 2-core AMD EPYC; medians of five passes): 4.81 ms one batch
/// at a time, 4.65 in pairs, 4.34 by four, 4.16 by eight, 4.00 by sixteen.
const GROUP: usize = 8;
/// A group holds at most this many bytes of batches (its first batch always goes in), so
/// large batches are not held eight at a time.
const GROUP_BYTES: usize = 32 << 20;

/// `Ok(None)` marks the end of the last epoch.
type Message = Result<Option<Assembled>>;

/// The assembling thread and the receiving end of its batches.
pub struct Ahead {
    /// In a mutex only to be `Sync` (the Python object holding it must be); one caller uses it.
    rx: Option<Mutex<Receiver<Message>>>,
    handle: Option<JoinHandle<()>>,
    done: bool,
    process: Process,
}

impl Ahead {
    /// Starts assembling with `reader` (positioned at the caller's cursor), keeping at most
    /// `depth` batches ready.
    pub fn start(mut reader: Reader, depth: usize) -> Result<Ahead> {
        let (tx, rx) = sync_channel::<Message>(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("recis-io-assemble".into())
            .spawn(move || {
                let mut group = Vec::with_capacity(GROUP);
                loop {
                    let result = reader.next_buffers(GROUP, GROUP_BYTES, &mut group);
                    let end = group.is_empty();
                    for (buffer, layout, cursor) in group.drain(..) {
                        let batch = Assembled {
                            buffer,
                            layout,
                            cursor,
                        };
                        // A send fails once the receiver is gone: the caller stopped reading.
                        if tx.send(Ok(Some(batch))).is_err() {
                            return;
                        }
                    }
                    match result {
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                        Ok(()) if end => {
                            let _ = tx.send(Ok(None));
                            return;
                        }
                        Ok(()) => {}
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the assembling thread: {e}")))?;
        Ok(Ahead {
            rx: Some(Mutex::new(rx)),
            handle: Some(handle),
            done: false,
            process: Process::current(),
        })
    }

    /// The next batch in order, `None` after the last one (waits for the thread).
    pub fn recv(&mut self) -> Result<Option<Assembled>> {
        if self.done {
            return Ok(None);
        }
        let rx = self.rx.as_ref().expect("receiver lives until drop");
        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
        let message = rx.recv().unwrap_or_else(|_| {
            Err(Error::Internal(
                "the assembling thread stopped unexpectedly".into(),
            ))
        });
        if !matches!(message, Ok(Some(_))) {
            self.done = true;
        }
        message
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if self.process.forked() {
            // A forked copy: the thread is not in this process, and it may have held the
            // channel's lock at the fork (see `process`).
            std::mem::forget(self.rx.take());
            std::mem::forget(self.handle.take());
            return;
        }
        // Dropping the receiver first makes a blocked send fail, so the thread ends (after
        // the batch it is working on) and can be joined.
        drop(self.rx.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
