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
            .spawn(move || loop {
                let message = next_batch(&mut reader);
                let last = !matches!(message, Ok(Some(_)));
                // A send fails once the receiver is gone: the caller stopped reading.
                if tx.send(message).is_err() || last {
                    break;
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

fn next_batch(reader: &mut Reader) -> Message {
    let next = reader.next_buffer()?;
    Ok(next.map(|(buffer, layout)| Assembled {
        buffer,
        layout,
        cursor: reader.cursor(),
    }))
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
