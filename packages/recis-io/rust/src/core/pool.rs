//! A bounded pool of decode threads. Segments are handed out in plan order and their results
//! kept by index, so what the consumer sees never depends on which thread finished first.
//! Workers run at most `lookahead` segments past the oldest one still needed, which bounds
//! memory whatever the data set size.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::error::{panic_message, Error, Result};
use super::plan::Segment;
use super::prepare::PreparedSegment;
use super::process::Process;
use super::source::{Packing, Source};

type Decoded = std::result::Result<Arc<PreparedSegment>, Error>;

struct State {
    next: usize,
    limit: usize,
    done: BTreeMap<usize, Decoded>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    source: Arc<Source>,
    segments: Vec<Segment>,
    /// Position of each segment's first row in the shard sequence.
    starts: Vec<usize>,
    packing: Option<Packing>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock left consistent data (it only inserts
        // finished results), so the poison flag carries no information here.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Decodes the segments of one shard plan on `threads` threads.
pub struct Executor {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    lookahead: usize,
    process: Process,
}

impl Executor {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        source: Arc<Source>,
        segments: Vec<Segment>,
        starts: Vec<usize>,
        packing: Option<Packing>,
        first: usize,
        threads: usize,
        lookahead: usize,
    ) -> Result<Executor> {
        let lookahead = lookahead.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next: first,
                limit: first + lookahead,
                done: BTreeMap::new(),
                stop: false,
            }),
            wake: Condvar::new(),
            source,
            segments,
            starts,
            packing,
        });
        // Built before the threads start: when one cannot start, dropping it on the way out
        // stops and joins those already running.
        let mut executor = Executor {
            shared,
            threads: Vec::with_capacity(threads.max(1)),
            lookahead,
            process: Process::current(),
        };
        for i in 0..threads.max(1) {
            let shared = executor.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("recis-io-decode-{i}"))
                .spawn(move || work(&shared))
                .map_err(|e| Error::Internal(format!("cannot start a decode thread: {e}")))?;
            executor.threads.push(handle);
        }
        Ok(executor)
    }

    /// Waits for segments `lo..=hi` and returns them in order.
    pub fn get(&self, lo: usize, hi: usize) -> Result<Vec<Arc<PreparedSegment>>> {
        let mut st = self.shared.lock();
        if st.limit <= hi {
            st.limit = hi + 1;
            self.shared.wake.notify_all();
        }
        let mut out = Vec::with_capacity(hi + 1 - lo);
        for idx in lo..=hi {
            loop {
                match st.done.get(&idx) {
                    Some(Ok(unit)) => {
                        out.push(unit.clone());
                        break;
                    }
                    Some(Err(e)) => return Err(e.clone()),
                    None if st.next <= idx && st.stop => {
                        return Err(Error::Internal("the reader was closed".into()))
                    }
                    None => st = self.shared.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
                }
            }
        }
        Ok(out)
    }

    /// Frees segments below `low`; workers may then run up to `low + lookahead`.
    pub fn release_below(&self, low: usize) {
        let mut st = self.shared.lock();
        st.done = st.done.split_off(&low);
        st.limit = st.limit.max(low + self.lookahead);
        self.shared.wake.notify_all();
    }
}

fn work(shared: &Shared) {
    loop {
        let idx = {
            let mut st = shared.lock();
            loop {
                if st.stop {
                    return;
                }
                if st.next < shared.segments.len() && st.next < st.limit {
                    break;
                }
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.next += 1;
            st.next - 1
        };
        let seg = &shared.segments[idx];
        let result = catch_unwind(AssertUnwindSafe(|| {
            let pos = shared.starts.get(idx).copied().unwrap_or(0);
            shared.source.decode(seg, pos, shared.packing.as_ref())
        }))
        .unwrap_or_else(|panic| {
            Err(Error::Internal(format!(
                "decoding failed unexpectedly: {}",
                panic_message(panic.as_ref())
            )))
        })
        .map(Arc::new);
        let mut st = shared.lock();
        st.done.insert(idx, result);
        shared.wake.notify_all();
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if self.process.forked() {
            // A forked copy: the threads are not in this process, and one of them may have
            // held the state's lock at the fork (see `process`). Their clones of `shared`
            // are never dropped, so it is leaked with them.
            std::mem::forget(std::mem::take(&mut self.threads));
            return;
        }
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
