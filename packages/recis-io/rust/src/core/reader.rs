//! The reader: walks the plan epoch by epoch, pulls decoded segments from the pool and packs
//! each batch of exactly `batch_size` rows (the last of an epoch may be smaller).

use std::sync::Arc;

use super::assemble::{self, BatchLayout, Piece};
use super::error::{Error, Result};
use super::plan::{shard_bounds, ShardPlan, Sharding};
use super::pool::Executor;
use super::ring::{Ring, Slab, SlabRef};
use super::source::{Packing, Source};

/// Smallest batch for which decoded chunks are packed as batches: smaller chunks would cost
/// more in per-chunk decoding overhead than packing saves.
pub const PACK_MIN_BATCH: usize = 1024;

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub batch_size: usize,
    pub drop_last: bool,
    pub sharding: Sharding,
    /// The reader ends when its cursor reaches this epoch (see [`Reader::set_end_epoch`]).
    pub epochs: u64,
    pub threads: usize,
    /// Decoded segments kept ready beyond the ones the current batch needs.
    pub prefetch: usize,
    /// Pack decoded chunks as batches on the decode threads (for batches handed out in
    /// reader-owned memory, see [`Reader::next_buffer`]); only without shuffling and for
    /// batches of at least [`PACK_MIN_BATCH`] rows.
    pub pack: bool,
}

/// A batch whose rows are known and decoded, waiting for a buffer to be packed into.
pub struct Pending {
    pieces: Vec<Piece>,
    /// The order to read the pieces in (see [`assemble::source_order`]).
    order: Option<Vec<u32>>,
    pub layout: BatchLayout,
    end: usize,
    /// The batch is one whole packed chunk: its buffer, ready as it is.
    packed: Option<Arc<Slab>>,
}

pub struct Reader {
    source: Arc<Source>,
    opts: Options,
    epoch: u64,
    pos: usize,
    plan: Option<ShardPlan>,
    exec: Option<Executor>,
    pending: Option<Pending>,
    ring: Arc<Ring>,
}

/// How many segments are decoded (or waiting, decoded) ahead of the one being read: one per
/// thread plus `prefetch`.
fn lookahead(opts: &Options) -> usize {
    opts.threads.max(1) + opts.prefetch
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
        // Packed chunks wait in decoded segments: keep enough free buffers for the whole
        // lookahead, so buffers are reused instead of allocated and zeroed again.
        let max_rows = source.units.iter().map(|u| u.rows).max().unwrap_or(0);
        let keep = opts.prefetch + 2 + lookahead(&opts) * max_rows.div_ceil(opts.batch_size);
        Ok(Reader {
            ring: Ring::new(keep.min(4096)),
            source,
            opts,
            epoch: 0,
            pos: 0,
            plan: None,
            exec: None,
            pending: None,
        })
    }

    /// A second reader over the same source and options, at this one's cursor and sharing its
    /// ring of buffers: what [`Ahead`](super::ahead::Ahead) assembles with.
    pub fn fork(&self) -> Result<Reader> {
        let mut other = Reader::new(self.source.clone(), self.opts)?;
        other.ring = self.ring.clone();
        other.seek(self.epoch, self.pos)?;
        Ok(other)
    }

    /// Whether batches are assembled ahead on a thread of their own: for shuffled batches
    /// handed out in reader-owned buffers (each is gathered row by row, which is worth taking
    /// off the caller's thread).
    pub fn assembles_ahead(&self) -> bool {
        self.opts.pack && self.opts.sharding.shuffle
    }

    /// Batches the assembling thread keeps ready.
    pub fn ahead_depth(&self) -> usize {
        // The channel holding them allocates its slots up front (Python allows up to 4096).
        self.opts.prefetch.clamp(1, 4096)
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Rows this shard reads per epoch.
    pub fn shard_rows(&self) -> usize {
        let s = &self.opts.sharding;
        let (lo, hi) = shard_bounds(self.source.total_rows(), s.shard, s.shards, s.even);
        hi - lo
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

    /// Makes the reader end when its cursor reaches epoch `end` (epochs are numbered from 0;
    /// each has its own permutation when shuffling), so a pass can read epochs `k..end`.
    pub fn set_end_epoch(&mut self, end: u64) {
        self.pause();
        self.opts.epochs = end;
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
        let o = &self.opts;
        let packing =
            (o.pack && !o.sharding.shuffle && o.batch_size >= PACK_MIN_BATCH).then(|| Packing {
                ring: self.ring.clone(),
                batch: o.batch_size,
            });
        let exec = Executor::start(
            self.source.clone(),
            plan.segments.clone(),
            plan.starts.clone(),
            packing,
            first,
            o.threads.max(1),
            lookahead(o),
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
        let whole = match pieces.as_slice() {
            [(unit, 0, b)] if *b == unit.rows => unit.packed.as_ref(),
            _ => None,
        };
        let order = assemble::source_order(&pieces);
        let (layout, packed) = match whole {
            Some(p) => (p.layout.clone(), Some(p.slab.clone())),
            None => {
                let layout = assemble::layout_in(&self.source.columns, &pieces, order.as_deref());
                (layout, None)
            }
        };
        self.pending = Some(Pending {
            pieces,
            order,
            layout,
            end,
            packed,
        });
        Ok(self.pending.as_ref().map(|p| &p.layout))
    }

    /// The prepared batch's buffer when the batch is one whole packed chunk (advancing the
    /// cursor past it); `None` leaves the batch to [`Reader::fill_pending`].
    fn take_packed(&mut self) -> Option<(Arc<Slab>, BatchLayout)> {
        let p = self.pending.take_if(|p| p.packed.is_some())?;
        self.pos = p.end;
        Some((p.packed.expect("checked above"), p.layout))
    }

    /// Packs the prepared batch into `dst` and advances the cursor past it.
    pub fn fill_pending(&mut self, dst: &mut [u8]) -> Result<BatchLayout> {
        let p = self
            .pending
            .take()
            .ok_or_else(|| Error::Internal("no batch is prepared".into()))?;
        if let Err(e) = check_fits(dst, p.layout.nbytes) {
            self.pending = Some(p);
            return Err(e);
        }
        let order = p.order.as_deref();
        assemble::fill_in(&self.source.columns, &p.pieces, order, &p.layout, dst);
        self.pos = p.end;
        Ok(p.layout)
    }

    /// The next batch in a buffer of its own, the cursor moved past it: the packed chunk
    /// itself when the batch is one, else a ring buffer packed now. `None` after the last
    /// epoch.
    pub fn next_buffer(&mut self) -> Result<Option<(SlabRef, BatchLayout)>> {
        let mut out = Vec::with_capacity(1);
        self.next_buffers(1, usize::MAX, &mut out)?;
        Ok(out.pop().map(|(buffer, layout, _)| (buffer, layout)))
    }

    /// Up to `max` next batches into `out`, each in a buffer of its own with the cursor after
    /// it, as [`Reader::next_buffer`] gives them one by one, but filled together (see
    /// [`assemble::fill_group`]): what [`Ahead`](super::ahead::Ahead) asks for. The group
    /// stops before it would hold more than `max_bytes` (its first batch always goes in), at
    /// a batch that is one whole packed chunk (given alone), and at the end. An error comes
    /// after the batches prepared before it, which are in `out`.
    pub fn next_buffers(
        &mut self,
        max: usize,
        max_bytes: usize,
        out: &mut Vec<(SlabRef, BatchLayout, (u64, usize))>,
    ) -> Result<()> {
        let mut group: Vec<(Pending, (u64, usize))> = Vec::new();
        let mut bytes = 0;
        let mut failed = None;
        while group.len() < max.clamp(1, assemble::GROUP_MAX) {
            let need = match self.prepare_next() {
                Ok(Some(layout)) => layout.nbytes,
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let packed = self.pending.as_ref().is_some_and(|p| p.packed.is_some());
            if !group.is_empty() && (packed || bytes + need > max_bytes) {
                break; // stays prepared for the next call
            }
            if packed {
                let (slab, layout) = self.take_packed().expect("a packed batch is prepared");
                out.push((SlabRef::Shared(slab), layout, self.cursor()));
                return Ok(());
            }
            let p = self.pending.take().expect("a batch is prepared");
            self.pos = p.end;
            bytes += need;
            group.push((p, self.cursor()));
        }
        let mut slabs: Vec<Slab> = group
            .iter()
            .map(|(p, _)| self.ring.take(p.layout.nbytes))
            .collect();
        let mut batches: Vec<assemble::GroupBatch<'_, _>> = group
            .iter()
            .zip(slabs.iter_mut())
            .map(|((p, _), slab)| assemble::GroupBatch {
                pieces: &p.pieces,
                order: p.order.as_deref(),
                layout: &p.layout,
                dst: slab.as_mut_bytes(),
            })
            .collect();
        assemble::fill_group(&self.source.columns, &mut batches);
        drop(batches);
        for ((p, cursor), slab) in group.into_iter().zip(slabs) {
            out.push((SlabRef::Own(slab), p.layout, cursor));
        }
        failed.map_or(Ok(()), Err)
    }
}

/// An error unless `dst` holds a batch of `need` bytes.
pub fn check_fits(dst: &[u8], need: usize) -> Result<()> {
    if dst.len() < need {
        return Err(Error::InvalidArgument(format!(
            "batch buffer has {} bytes, the batch needs {need}",
            dst.len()
        )));
    }
    Ok(())
}
