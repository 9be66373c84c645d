//! The reader: walks the plan epoch by epoch, pulls decoded segments from the pool and packs
//! each batch of exactly `batch_size` rows (the last of an epoch may be smaller).

use std::sync::Arc;

use super::assemble::{self, BatchLayout, Piece};
use super::error::{Error, Result};
use super::plan::{rows_per_shard, ShardPlan, Sharding};
use super::pool::Executor;
use super::source::Source;

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub batch_size: usize,
    pub drop_last: bool,
    pub sharding: Sharding,
    pub epochs: u64,
    pub threads: usize,
    /// Decoded segments kept ready beyond the ones the current batch needs.
    pub prefetch: usize,
}

/// A batch whose rows are known and decoded, waiting for a buffer to be packed into.
pub struct Pending {
    pieces: Vec<Piece>,
    pub layout: BatchLayout,
    end: usize,
}

pub struct Reader {
    source: Arc<Source>,
    opts: Options,
    epoch: u64,
    pos: usize,
    plan: Option<ShardPlan>,
    exec: Option<Executor>,
    pending: Option<Pending>,
}

impl Reader {
    pub fn new(source: Arc<Source>, opts: Options) -> Result<Reader> {
        if opts.batch_size == 0 {
            return Err(Error::InvalidArgument("batch_size must be positive".into()));
        }
        let s = &opts.sharding;
        if s.shards == 0 || s.shard >= s.shards {
            return Err(Error::InvalidArgument(format!(
                "shard {} is out of range for {} shards",
                s.shard, s.shards
            )));
        }
        Ok(Reader {
            source,
            opts,
            epoch: 0,
            pos: 0,
            plan: None,
            exec: None,
            pending: None,
        })
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Rows this shard reads per epoch.
    pub fn shard_rows(&self) -> usize {
        rows_per_shard(self.source.total_rows(), self.opts.sharding.shards)
    }

    fn epoch_end(&self) -> usize {
        let rows = self.shard_rows();
        if self.opts.drop_last {
            rows - rows % self.opts.batch_size
        } else {
            rows
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.epoch_end().div_ceil(self.opts.batch_size)
    }

    /// `(epoch, row in the shard sequence)` of the next row to be handed out.
    pub fn cursor(&self) -> (u64, usize) {
        (self.epoch, self.pos)
    }

    /// Moves the cursor; the next batch starts at row `pos` of `epoch`'s shard sequence.
    pub fn seek(&mut self, epoch: u64, pos: usize) -> Result<()> {
        if pos > self.shard_rows() {
            return Err(Error::InvalidArgument(format!(
                "cursor row {pos} is past the {} rows of this shard",
                self.shard_rows()
            )));
        }
        self.pending = None;
        self.exec = None;
        self.plan = None;
        self.epoch = epoch;
        self.pos = pos;
        Ok(())
    }

    /// Stops the decode threads; a later call starts them again from the cursor.
    pub fn pause(&mut self) {
        self.pending = None;
        self.exec = None;
        self.plan = None;
    }

    fn start_epoch(&mut self) -> Result<()> {
        let plan = ShardPlan::new(&self.source.units, &self.opts.sharding, self.epoch)?;
        let first = plan.segment_of(plan.first_needed(self.pos));
        let threads = self.opts.threads.max(1);
        let exec = Executor::start(
            self.source.clone(),
            plan.segments.clone(),
            first,
            threads,
            threads + self.opts.prefetch,
        )?;
        self.plan = Some(plan);
        self.exec = Some(exec);
        Ok(())
    }

    /// Decodes what the next batch needs and computes its layout; `None` after the last epoch.
    pub fn prepare_next(&mut self) -> Result<Option<&BatchLayout>> {
        if self.pending.is_some() {
            return Ok(self.pending.as_ref().map(|p| &p.layout));
        }
        loop {
            if self.epoch >= self.opts.epochs {
                return Ok(None);
            }
            if self.pos >= self.epoch_end() {
                self.epoch += 1;
                self.pos = 0;
                self.exec = None;
                self.plan = None;
                continue;
            }
            if self.plan.is_none() {
                self.start_epoch()?;
            }
            break;
        }
        let plan = self.plan.as_mut().expect("plan started");
        let exec = self.exec.as_ref().expect("executor started");
        let end = (self.pos + self.opts.batch_size).min(plan.rows);
        let mut runs = Vec::new();
        plan.sources(self.pos, end, &mut runs);
        let lo = runs.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = runs.iter().map(|r| r.0).max().unwrap_or(0);
        let segments = exec.get(lo, hi)?;
        let mut pieces: Vec<Piece> = Vec::with_capacity(runs.len());
        for (s, a, b) in runs {
            segments[s - lo].pieces(a, b, &mut pieces);
        }
        let low = if end < plan.rows {
            plan.segment_of(plan.first_needed(end))
        } else {
            plan.segments.len()
        };
        exec.release_below(low);
        let layout = assemble::layout(&self.source.columns, &pieces);
        self.pending = Some(Pending {
            pieces,
            layout,
            end,
        });
        Ok(self.pending.as_ref().map(|p| &p.layout))
    }

    /// Packs the prepared batch into `dst` and advances the cursor past it.
    pub fn fill_pending(&mut self, dst: &mut [u8]) -> Result<BatchLayout> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| Error::Internal("no batch is prepared".into()))?;
        if dst.len() < p.layout.nbytes {
            let need = p.layout.nbytes;
            self.pending = Some(p);
            return Err(Error::InvalidArgument(format!(
                "batch buffer has {} bytes, the batch needs {need}",
                dst.len()
            )));
        }
        assemble::fill(&self.source.columns, &p.pieces, &p.layout, dst);
        self.pos = p.end;
        Ok(p.layout)
    }
}
