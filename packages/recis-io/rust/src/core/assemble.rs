//! Packing rows of decoded units into one contiguous batch buffer: each value is copied once,
//! columns are laid out one after another, every region aligned to 64 bytes.

use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

use arrow::buffer::Buffer;

use super::column::ColumnPlan;
use super::prepare::{Prepared, PreparedUnit};
use super::ring::Slab;

const ALIGN: usize = 64;

/// Where one column's arrays sit in a batch buffer (byte offsets from the buffer start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnLayout {
    pub values_at: usize,
    /// Number of elements of the output type (for `[B, k]` columns, `B * k`).
    pub values_len: usize,
    /// `(byte offset, length)` of each int64 offsets array, outermost first.
    pub offsets: Vec<(usize, usize)>,
}

/// The layout of a whole batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLayout {
    pub rows: usize,
    pub nbytes: usize,
    pub columns: Vec<ColumnLayout>,
}

/// Rows `[start, end)` of a decoded unit, in batch order.
pub type Piece = (Arc<PreparedUnit>, usize, usize);

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The order in which to read `pieces`: by chunk, then by first row. Shuffled batches hold
/// thousands of one-row pieces from random rows; reading them in batch order jumps through the
/// chunks (a cache miss per row and column), while source order walks each chunk forwards,
/// which the hardware prefetches. `None` for batches of few pieces, read in batch order.
pub fn source_order<U: Deref<Target = PreparedUnit>>(
    pieces: &[(U, usize, usize)],
) -> Option<Vec<u32>> {
    if pieces.len() <= 64 {
        return None;
    }
    // Chunks get small ranks in first-seen order (any grouping by chunk will do), so each
    // piece sorts as one u64 `(rank, first row, index)`, several times as fast as sorting
    // tuples. Batches from more than 64 chunks, or of huge chunks or batches, take the tuple
    // sort.
    let mut units: Vec<*const PreparedUnit> = Vec::new();
    let mut keys: Vec<u64> = Vec::with_capacity(pieces.len());
    let fits = pieces.len() < 1 << 24;
    for (i, (unit, a, _)) in pieces.iter().enumerate() {
        let ptr = &**unit as *const PreparedUnit;
        let rank = match units.iter().rposition(|&u| u == ptr) {
            Some(r) => r,
            None => {
                units.push(ptr);
                units.len() - 1
            }
        };
        if !fits || *a >= 1 << 24 || units.len() > 64 {
            keys.clear();
            break;
        }
        keys.push(((rank as u64) << 48) | ((*a as u64) << 24) | i as u64);
    }
    if keys.len() == pieces.len() {
        keys.sort_unstable();
        return Some(keys.into_iter().map(|k| (k & 0xff_ffff) as u32).collect());
    }
    let mut keyed: Vec<(usize, usize, u32)> = pieces
        .iter()
        .enumerate()
        .map(|(i, (unit, a, _))| (&**unit as *const PreparedUnit as usize, *a, i as u32))
        .collect();
    keyed.sort_unstable();
    Some(keyed.into_iter().map(|(_, _, i)| i).collect())
}

/// The pieces' indices in `order`, or `0..pieces.len()`.
fn visit(order: Option<&[u32]>, n: usize) -> Visit<'_> {
    match order {
        Some(o) => Visit::Ordered(o.iter()),
        None => Visit::All(0..n),
    }
}

/// Iterator of [`visit`].
enum Visit<'a> {
    Ordered(std::slice::Iter<'a, u32>),
    All(std::ops::Range<usize>),
}

impl Iterator for Visit<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            Visit::Ordered(it) => it.next().map(|&i| i as usize),
            Visit::All(range) => range.next(),
        }
    }
}

pub fn layout<U: Deref<Target = PreparedUnit>>(
    plans: &[ColumnPlan],
    pieces: &[(U, usize, usize)],
) -> BatchLayout {
    layout_in(plans, pieces, source_order(pieces).as_deref())
}

/// [`layout`], reading the pieces in `order` (see [`source_order`]).
pub fn layout_in<U: Deref<Target = PreparedUnit>>(
    plans: &[ColumnPlan],
    pieces: &[(U, usize, usize)],
    order: Option<&[u32]>,
) -> BatchLayout {
    let rows: usize = pieces.iter().map(|(_, a, b)| b - a).sum();
    let counts = plans.iter().enumerate().map(|(c, plan)| {
        let mut levels = vec![0usize; plan.ragged_levels()];
        if levels.is_empty() {
            return (levels, rows);
        }
        let mut leaf = 0;
        for i in visit(order, pieces.len()) {
            let (unit, a, b) = &pieces[i];
            // Walk the piece's range down the levels (no allocation per piece: shuffled
            // batches are made of thousands of one-row pieces).
            let mut r = (*a, *b);
            for (n, off) in levels.iter_mut().zip(&unit.columns[c].offsets) {
                *n += r.1 - r.0;
                r = (off[r.0] as usize, off[r.1] as usize);
            }
            leaf += r.1 - r.0;
        }
        (levels, leaf)
    });
    layout_of_counts(plans, rows, counts)
}

/// The layout of a batch of `rows` rows whose column `c` has `counts[c] = (items per ragged
/// level, leaf items)`.
pub fn layout_of_counts(
    plans: &[ColumnPlan],
    rows: usize,
    counts: impl IntoIterator<Item = (Vec<usize>, usize)>,
) -> BatchLayout {
    let mut at = 0;
    let mut columns = Vec::with_capacity(plans.len());
    for (plan, (levels, leaf)) in plans.iter().zip(counts) {
        let values_len = leaf * plan.width();
        let values_at = at;
        at = align(at + values_len * plan.out.size());
        let offsets = levels
            .iter()
            .map(|&n| {
                let here = at;
                at = align(at + (n + 1) * 8);
                (here, n + 1)
            })
            .collect();
        columns.push(ColumnLayout {
            values_at,
            values_len,
            offsets,
        });
    }
    BatchLayout {
        rows,
        nbytes: at.max(ALIGN),
        columns,
    }
}

/// Copies `pieces` into `dst` following `layout`. `dst` must be at least `layout.nbytes` long.
pub fn fill<U: Deref<Target = PreparedUnit>>(
    plans: &[ColumnPlan],
    pieces: &[(U, usize, usize)],
    layout: &BatchLayout,
    dst: &mut [u8],
) {
    fill_in(plans, pieces, source_order(pieces).as_deref(), layout, dst)
}

/// [`fill`], reading the pieces in `order` (see [`source_order`]); each piece is still written
/// to its place in the batch.
pub fn fill_in<U: Deref<Target = PreparedUnit>>(
    plans: &[ColumnPlan],
    pieces: &[(U, usize, usize)],
    order: Option<&[u32]>,
    layout: &BatchLayout,
    dst: &mut [u8],
) {
    assert!(dst.len() >= layout.nbytes, "batch buffer too small");
    let mut own = Owned::new(pieces, order);
    for c in 0..plans.len() {
        fill_column(plans, c, pieces, order, &mut own, layout, dst);
    }
}

/// What [`fill_column`] needs of a batch read in an order: per list column each piece's
/// (first value in its chunk, value count, first value in the batch), and for its flat columns
/// each piece's first row in the batch and their runs, made by the first flat column (a group
/// gathers its flat columns together and never asks for them).
struct Owned {
    spans: Vec<(usize, usize, usize)>,
    flat: Option<(Vec<usize>, Runs)>,
}

impl Owned {
    fn new<U: Deref<Target = PreparedUnit>>(
        pieces: &[(U, usize, usize)],
        order: Option<&[u32]>,
    ) -> Owned {
        let spans = match order {
            Some(_) => vec![(0, 0, 0); pieces.len()],
            None => Vec::new(),
        };
        Owned { spans, flat: None }
    }
}

/// Each piece's first row in its batch.
fn first_rows<U: Deref<Target = PreparedUnit>>(pieces: &[(U, usize, usize)]) -> Vec<usize> {
    let mut at = 0;
    pieces
        .iter()
        .map(|(_, a, b)| {
            let here = at;
            at += b - a;
            here
        })
        .collect()
}

/// Column `c` of one batch (see [`fill_in`]).
fn fill_column<U: Deref<Target = PreparedUnit>>(
    plans: &[ColumnPlan],
    c: usize,
    pieces: &[(U, usize, usize)],
    order: Option<&[u32]>,
    own: &mut Owned,
    layout: &BatchLayout,
    dst: &mut [u8],
) {
    let (plan, cl) = (&plans[c], &layout.columns[c]);
    let size = plan.out.size() * plan.width();
    let v = cl.values_at;
    match (order, cl.offsets.len()) {
        (Some(order), 0) => {
            let region = &mut dst[v..v + cl.values_len * plan.out.size()];
            let (first_row, runs) = own.flat.get_or_insert_with(|| {
                let first_row = first_rows(pieces);
                let runs = Runs::of(pieces, order, &first_row);
                (first_row, runs)
            });
            runs.fill_flat(c, pieces, order, first_row, size, &mut [region], false);
        }
        (None, 0) => {
            let mut at = v;
            for (unit, a, b) in pieces {
                copy_rows(
                    &mut dst[at..],
                    unit.columns[c].values.as_slice(),
                    *a,
                    *b,
                    size,
                );
                at += (b - a) * size;
            }
        }
        (Some(order), 1) => fill_list(c, pieces, order, &mut own.spans, cl, size, dst),
        _ => fill_nested(c, pieces, order, cl, size, dst),
    }
}

/// Most batches [`fill_group`] gathers together.
pub const GROUP_MAX: usize = 1 << 8;
/// A grouped gather's destination: batch `g`, row `r` is `(g << GROUP_SHIFT) | r`.
const GROUP_SHIFT: u32 = 24;

/// One batch of a group (see [`fill_group`]): its pieces, their order, layout and buffer.
pub struct GroupBatch<'a, U> {
    pub pieces: &'a [(U, usize, usize)],
    pub order: Option<&'a [u32]>,
    pub layout: &'a BatchLayout,
    pub dst: &'a mut [u8],
}

/// Fills several batches, each exactly as [`fill_in`] fills it. Batches of a shuffled epoch
/// draw their rows at random from the same decoded chunks: each batch's flat column touches
/// most cache lines of that column in its chunks for a few values each, so gathering a flat
/// column for several batches in one pass (all their rows in source order) reads each line
/// once for all of them. List columns are filled batch by batch. Falls back to one batch at a
/// time where a batch has no order (few pieces) or the batches are too many or too large to
/// be addressed together.
pub fn fill_group<U: Deref<Target = PreparedUnit>>(
    plans: &[ColumnPlan],
    batches: &mut [GroupBatch<'_, U>],
) {
    for b in batches.iter() {
        assert!(b.dst.len() >= b.layout.nbytes, "batch buffer too small");
    }
    let joint = batches.len() > 1
        && batches.len() <= GROUP_MAX
        && batches
            .iter()
            .all(|b| b.order.is_some() && b.layout.rows < 1 << GROUP_SHIFT);
    // Every piece of the group, and where its first row goes (batch and row, packed).
    let mut all: Vec<(&PreparedUnit, usize, usize)> = Vec::new();
    let mut dest: Vec<usize> = Vec::new();
    if joint {
        let n = batches.iter().map(|b| b.pieces.len()).sum();
        all.reserve(n);
        dest.reserve(n);
        for (g, b) in batches.iter().enumerate() {
            for ((unit, a, end), r) in b.pieces.iter().zip(first_rows(b.pieces)) {
                all.push((&**unit, *a, *end));
                dest.push((g << GROUP_SHIFT) | r);
            }
        }
    }
    let order = if joint { source_order(&all) } else { None };
    let Some(order) = order else {
        for b in batches.iter_mut() {
            fill_in(plans, b.pieces, b.order, b.layout, b.dst);
        }
        return;
    };
    let runs = Runs::of(&all, &order, &dest);
    let mut owns: Vec<Option<Owned>> = batches.iter().map(|_| None).collect();
    for (c, plan) in plans.iter().enumerate() {
        if batches[0].layout.columns[c].offsets.is_empty() {
            let size = plan.out.size() * plan.width();
            let mut regions: Vec<&mut [u8]> = batches
                .iter_mut()
                .map(|b| {
                    let cl = &b.layout.columns[c];
                    &mut b.dst[cl.values_at..cl.values_at + cl.values_len * plan.out.size()]
                })
                .collect();
            runs.fill_flat(c, &all, &order, &dest, size, &mut regions, true);
            continue;
        }
        for (b, own) in batches.iter_mut().zip(owns.iter_mut()) {
            let own = own.get_or_insert_with(|| Owned::new(b.pieces, b.order));
            fill_column(plans, c, b.pieces, b.order, own, b.layout, b.dst);
        }
    }
}

/// The pieces in source order cut into runs of one chunk each, with every single-row piece's
/// (row in its chunk, row in the batch): a flat column of a shuffled batch is then gathered
/// chunk by chunk in a tight loop, looking each chunk's column up once instead of per row.
#[derive(Default)]
struct Runs {
    /// One per run: a piece of it, its positions `start..end` in `order` and `rows`, and
    /// whether all its pieces are single rows (else it is copied piece by piece).
    runs: Vec<Run>,
    /// Per position of `order`: `(row in the chunk, row in the batch)` of the piece's first row.
    rows: Vec<(u32, u32)>,
}

struct Run {
    piece: usize,
    start: usize,
    end: usize,
    single: bool,
}

impl Runs {
    fn of<U: Deref<Target = PreparedUnit>>(
        pieces: &[(U, usize, usize)],
        order: &[u32],
        first_row: &[usize],
    ) -> Runs {
        let mut out = Runs {
            runs: Vec::new(),
            rows: Vec::with_capacity(order.len()),
        };
        let mut last: *const PreparedUnit = std::ptr::null();
        for (k, &i) in order.iter().enumerate() {
            let (unit, a, b) = &pieces[i as usize];
            let ptr = &**unit as *const PreparedUnit;
            if ptr != last {
                last = ptr;
                out.runs.push(Run {
                    piece: i as usize,
                    start: k,
                    end: k,
                    single: true,
                });
            }
            let run = out.runs.last_mut().expect("pushed above");
            run.end = k + 1;
            let to = first_row[i as usize];
            run.single &= b - a == 1 && *a <= u32::MAX as usize && to <= u32::MAX as usize;
            out.rows.push((*a as u32, to as u32));
        }
        out
    }

    /// Copies flat column `c` (elements of `size` bytes) of every piece into `regions`, the
    /// column's values in the batch (`grouped`: in each batch of a group, `first_row` holding
    /// the batch and row packed, see [`fill_group`]; else `regions` is the one batch's).
    #[allow(clippy::too_many_arguments)]
    fn fill_flat<U: Deref<Target = PreparedUnit>>(
        &self,
        c: usize,
        pieces: &[(U, usize, usize)],
        order: &[u32],
        first_row: &[usize],
        size: usize,
        regions: &mut [&mut [u8]],
        grouped: bool,
    ) {
        for &Run {
            piece,
            start,
            end,
            single,
        } in &self.runs
        {
            let src = pieces[piece].0.columns[c].values.as_slice();
            let rows = &self.rows[start..end];
            match (single, size, grouped) {
                (true, 8, false) => gather::<8, false>(regions, src, rows),
                (true, 4, false) => gather::<4, false>(regions, src, rows),
                (true, 2, false) => gather::<2, false>(regions, src, rows),
                (true, 1, false) => gather::<1, false>(regions, src, rows),
                (true, 8, true) => gather::<8, true>(regions, src, rows),
                (true, 4, true) => gather::<4, true>(regions, src, rows),
                (true, 2, true) => gather::<2, true>(regions, src, rows),
                (true, 1, true) => gather::<1, true>(regions, src, rows),
                _ => {
                    for &i in &order[start..end] {
                        let (_, a, b) = &pieces[i as usize];
                        let (g, r) = destination(first_row[i as usize], grouped);
                        copy_rows(&mut regions[g][r * size..], src, *a, *b, size);
                    }
                }
            }
        }
    }
}

/// `(batch, row)` of a destination (see [`fill_group`]).
#[inline(always)]
fn destination(to: usize, grouped: bool) -> (usize, usize) {
    if grouped {
        (to >> GROUP_SHIFT, to & ((1 << GROUP_SHIFT) - 1))
    } else {
        (0, to)
    }
}

/// Element `to` of `dst` = element `from` of `src` for each `(from, to)` of `rows`, elements
/// of `N` bytes; `dst` is one batch's region, or with `GROUPED` one per batch of a group and
/// `to` the packed batch and row (see [`fill_group`]).
#[inline]
fn gather<const N: usize, const GROUPED: bool>(
    dst: &mut [&mut [u8]],
    src: &[u8],
    rows: &[(u32, u32)],
) {
    // The source rows ascend with gaps, so nearly every one is a cache miss the hardware does
    // not foresee: ask for the row `AHEAD` places on while copying this one.
    const AHEAD: usize = 16;
    for (k, &(from, to)) in rows.iter().enumerate() {
        if let Some(&(next, _)) = rows.get(k + AHEAD) {
            prefetch(src, next as usize * N);
        }
        let (g, to) = destination(to as usize, GROUPED);
        let (from, to) = (from as usize * N, to * N);
        dst[g][to..to + N].copy_from_slice(&src[from..from + N]);
    }
}

/// Hints that `data[at]` will be read soon (nothing where it is out of range or the target has
/// no prefetch instruction).
#[inline(always)]
fn prefetch(data: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < data.len() {
        // SAFETY: a prefetch never faults and `at` is inside `data` anyway.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(at).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
}

/// One list column (one offsets level) of many pieces: the chunks' offsets are read and the
/// values copied in source `order`; only the batch's own offsets are written in batch order.
fn fill_list<U: Deref<Target = PreparedUnit>>(
    c: usize,
    pieces: &[(U, usize, usize)],
    order: &[u32],
    spans: &mut [(usize, usize, usize)],
    cl: &ColumnLayout,
    size: usize,
    dst: &mut [u8],
) {
    for &i in order {
        let (unit, a, b) = &pieces[i as usize];
        let off = &unit.columns[c].offsets[0];
        let (x, y) = (off[*a] as usize, off[*b] as usize);
        spans[i as usize] = (x, y - x, 0);
    }
    let (at, _) = cl.offsets[0];
    dst[at..at + 8].copy_from_slice(&0i64.to_le_bytes());
    let mut slot = at + 8;
    let mut total = 0usize;
    for ((unit, a, b), span) in pieces.iter().zip(spans.iter_mut()) {
        span.2 = total;
        if b - a == 1 {
            total += span.1;
            dst[slot..slot + 8].copy_from_slice(&(total as i64).to_le_bytes());
        } else {
            let off = &unit.columns[c].offsets[0];
            write_offsets(&mut dst[slot..], total as i64 - off[*a], &off[a + 1..=*b]);
            total += span.1;
        }
        slot += (b - a) * 8;
    }
    for &i in order {
        let (x, n, to) = spans[i as usize];
        let src = pieces[i as usize].0.columns[c].values.as_slice();
        copy_rows(&mut dst[cl.values_at + to * size..], src, x, x + n, size);
    }
}

/// A column of nested lists (or any column of few pieces): offsets level by level in batch
/// order; with an `order`, the values are copied in a second pass in that order.
fn fill_nested<U: Deref<Target = PreparedUnit>>(
    c: usize,
    pieces: &[(U, usize, usize)],
    order: Option<&[u32]>,
    cl: &ColumnLayout,
    size: usize,
    dst: &mut [u8],
) {
    let mut v = cl.values_at;
    // Per level: where the next offset goes and the running count it continues from.
    let mut cursors: Vec<(usize, i64)> = cl.offsets.iter().map(|&(at, _)| (at, 0)).collect();
    for &(at, _) in &cl.offsets {
        dst[at..at + 8].copy_from_slice(&0i64.to_le_bytes());
    }
    // With an order, the first pass notes where each piece's values come from and go.
    let mut leaves: Vec<(usize, usize, usize)> = Vec::new();
    if order.is_some() {
        leaves.reserve(pieces.len());
    }
    for (unit, a, b) in pieces {
        let col = &unit.columns[c];
        let mut r = (*a, *b);
        for (off, cur) in col.offsets.iter().zip(cursors.iter_mut()) {
            let (x, y) = r;
            write_offsets(&mut dst[cur.0 + 8..], cur.1 - off[x], &off[x + 1..=y]);
            cur.0 += (y - x) * 8;
            cur.1 += off[y] - off[x];
            r = (off[x] as usize, off[y] as usize);
        }
        match order {
            Some(_) => leaves.push((r.0, r.1, v)),
            None => copy_rows(&mut dst[v..], col.values.as_slice(), r.0, r.1, size),
        }
        v += (r.1 - r.0) * size;
    }
    if let Some(order) = order {
        for &i in order {
            let (x, y, at) = leaves[i as usize];
            let src = pieces[i as usize].0.columns[c].values.as_slice();
            copy_rows(&mut dst[at..], src, x, y, size);
        }
    }
}

/// Writes `base + o` for each offset `o` of `off` as little-endian int64s at the start of `dst`.
pub fn write_offsets(dst: &mut [u8], base: i64, off: &[i64]) {
    for (slot, o) in dst[..off.len() * 8].chunks_exact_mut(8).zip(off) {
        slot.copy_from_slice(&(base + o).to_le_bytes());
    }
}

/// Copies elements `[a, b)` of `size` bytes each from `src` to the start of `dst`. One element
/// of a common size is copied with a fixed-size move instead of a `memcpy` call (shuffled
/// batches copy row by row).
fn copy_rows(dst: &mut [u8], src: &[u8], a: usize, b: usize, size: usize) {
    match (b - a, size) {
        (1, 8) => dst[..8].copy_from_slice(&src[a * 8..a * 8 + 8]),
        (1, 4) => dst[..4].copy_from_slice(&src[a * 4..a * 4 + 4]),
        (n, _) => {
            let (s, len) = (&src[a * size..b * size], n * size);
            match len {
                // Short strings: two overlapping fixed-size moves instead of a `memcpy` call.
                8..=16 => {
                    dst[..8].copy_from_slice(&s[..8]);
                    dst[len - 8..len].copy_from_slice(&s[len - 8..]);
                }
                4..=7 => {
                    dst[..4].copy_from_slice(&s[..4]);
                    dst[len - 4..len].copy_from_slice(&s[len - 4..]);
                }
                _ => dst[..len].copy_from_slice(s),
            }
        }
    }
}

/// A decoded chunk already packed in the layout of a batch made of exactly its rows. The chunk's
/// columns view this buffer, and a batch that is the whole chunk is handed out as it is.
pub struct Packed {
    pub slab: Arc<Slab>,
    pub layout: BatchLayout,
}

impl fmt::Debug for Packed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Packed({} bytes)", self.layout.nbytes)
    }
}

/// Points the value buffers of `columns` at their regions of `slab`, packed per `layout`.
pub fn view_slab(
    plans: &[ColumnPlan],
    columns: &mut [Prepared],
    slab: Slab,
    layout: BatchLayout,
) -> Packed {
    let slab = Arc::new(slab);
    for ((col, plan), cl) in columns.iter_mut().zip(plans).zip(&layout.columns) {
        let len = cl.values_len * plan.out.size();
        assert!(
            cl.values_at + len <= slab.len(),
            "column region outside the slab"
        );
        // SAFETY: the region lies inside the slab (checked above), and the buffer keeps the
        // slab alive through its owner; nothing writes to a packed chunk.
        col.values = unsafe {
            let ptr = NonNull::new_unchecked(slab.as_ptr().add(cl.values_at).cast_mut());
            Buffer::from_custom_allocation(ptr, len, slab.clone())
        };
    }
    Packed { slab, layout }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::column::{ColumnSpec, DType, Leaf};
    use crate::core::prepare::Prepared;
    use crate::core::ring::Ring;
    use arrow::buffer::Buffer;
    use arrow::datatypes::DataType;

    fn list_plan() -> ColumnPlan {
        ColumnPlan {
            spec: ColumnSpec::plain("x"),
            file_type: DataType::Null,
            list_levels: 1,
            fixed: None,
            leaf: Leaf::Number(DType::I32),
            out: DType::I32,
        }
    }

    fn unit(lists: &[&[i32]]) -> Arc<PreparedUnit> {
        let mut off = vec![0i64];
        let mut vals = Vec::new();
        for l in lists {
            vals.extend_from_slice(l);
            off.push(vals.len() as i64);
        }
        Arc::new(PreparedUnit {
            packed: None,
            rows: lists.len(),
            columns: vec![Prepared {
                values: Buffer::from_vec(vals),
                offsets: vec![off],
            }],
        })
    }

    fn i64s(b: &[u8]) -> Vec<i64> {
        b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn flat_plan(out: DType) -> ColumnPlan {
        ColumnPlan {
            spec: ColumnSpec::plain("f"),
            file_type: DataType::Null,
            list_levels: 0,
            fixed: None,
            leaf: Leaf::Number(out),
            out,
        }
    }

    #[test]
    fn source_order_fills_the_same_bytes_as_batch_order() {
        // Few chunks (ranked keys) and more than 64 (the tuple sort).
        for chunks in [5, 70] {
            source_order_case(chunks);
        }
    }

    /// Chunks with an int64 and an int32 column and a list column, and `n` pieces of them: single
    /// rows in random order plus a few multi-row pieces, as shuffled batches are made.
    fn shuffled_pieces(chunks: usize, n: usize, seed: u64) -> (Vec<ColumnPlan>, Vec<Piece>) {
        let plans = vec![flat_plan(DType::I64), flat_plan(DType::I32), list_plan()];
        let units: Vec<Arc<PreparedUnit>> = (0..chunks)
            .map(|u| {
                let rows = 300 + 7 * u;
                let wide: Vec<i64> = (0..rows).map(|r| (u * 1000 + r) as i64 * -3).collect();
                let narrow: Vec<i32> = (0..rows).map(|r| (u * 1000 + r) as i32).collect();
                let mut off = vec![0i64];
                let mut vals = Vec::new();
                for r in 0..rows {
                    vals.extend((0..(r % 4) as i32).map(|k| (u * 1000 + r) as i32 * 10 + k));
                    off.push(vals.len() as i64);
                }
                Arc::new(PreparedUnit {
                    packed: None,
                    rows,
                    columns: vec![
                        Prepared {
                            values: Buffer::from_vec(wide),
                            offsets: vec![],
                        },
                        Prepared {
                            values: Buffer::from_vec(narrow),
                            offsets: vec![],
                        },
                        Prepared {
                            values: Buffer::from_vec(vals),
                            offsets: vec![off],
                        },
                    ],
                })
            })
            .collect();
        let mut rng = crate::core::plan::Rng::new(&[seed]);
        let mut pieces: Vec<Piece> = Vec::new();
        for k in 0..n {
            let u = &units[rng.below(chunks as u64) as usize];
            let a = rng.below(u.rows as u64 - 3) as usize;
            let len = if k % 97 == 0 { 3 } else { 1 };
            pieces.push((u.clone(), a, a + len));
        }
        (plans, pieces)
    }

    fn source_order_case(chunks: usize) {
        let (plans, pieces) = shuffled_pieces(chunks, 900, 7);
        let order = source_order(&pieces).expect("many pieces are ordered");
        let lay = layout_in(&plans, &pieces, Some(&order));
        assert_eq!(lay, layout_in(&plans, &pieces, None));
        let mut want = vec![0u8; lay.nbytes];
        fill_in(&plans, &pieces, None, &lay, &mut want);
        let mut got = vec![0u8; lay.nbytes];
        fill_in(&plans, &pieces, Some(&order), &lay, &mut got);
        assert_eq!(got, want, "{chunks} chunks");
        // The order visits chunks one at a time, rows ascending within each.
        let key = |i: u32| {
            let (u, a, _) = &pieces[i as usize];
            (Arc::as_ptr(u), *a)
        };
        let mut seen = Vec::new();
        for w in order.windows(2) {
            let (p, q) = (key(w[0]), key(w[1]));
            if p.0 == q.0 {
                assert!(p.1 <= q.1);
            } else {
                assert!(
                    !seen.contains(&q.0),
                    "a chunk visited twice ({chunks} chunks)"
                );
                seen.push(p.0);
            }
        }
    }

    #[test]
    fn a_group_fills_each_batch_as_fill_in_does() {
        // Batches sizes per case: all read in order (one joint gather), one of few pieces among
        // them (read in batch order: each batch alone), a lone batch; over few chunks and over
        // more than 64 (whose joint order is the tuple sort).
        let cases: [(usize, &[usize]); 4] = [
            (5, &[300, 300, 211, 97]),
            (5, &[300, 40, 300]),
            (5, &[500]),
            (70, &[400, 400, 400]),
        ];
        for (case, (chunks, sizes)) in cases.into_iter().enumerate() {
            let total = sizes.iter().sum();
            let (plans, pieces) = shuffled_pieces(chunks, total, 11 + case as u64);
            let mut parts = Vec::new();
            let mut at = 0;
            for &n in sizes {
                let part = &pieces[at..at + n];
                at += n;
                let order = source_order(part);
                let lay = layout_in(&plans, part, order.as_deref());
                // Padding between regions is not written: the same marks on both sides.
                let mut want = vec![0xa5u8; lay.nbytes];
                fill_in(&plans, part, None, &lay, &mut want);
                parts.push((part, order, lay, want));
            }
            // Buffers larger than the batches, their tails marked: they must stay as they are.
            let mut bufs: Vec<Vec<u8>> =
                parts.iter().map(|p| vec![0xa5; p.2.nbytes + 64]).collect();
            let mut group: Vec<GroupBatch<'_, Arc<PreparedUnit>>> = parts
                .iter()
                .zip(bufs.iter_mut())
                .map(|((part, order, lay, _), buf)| GroupBatch {
                    pieces: part,
                    order: order.as_deref(),
                    layout: lay,
                    dst: buf,
                })
                .collect();
            fill_group(&plans, &mut group);
            for (k, ((_, _, lay, want), buf)) in parts.iter().zip(&bufs).enumerate() {
                assert_eq!(&buf[..lay.nbytes], &want[..], "case {case}, batch {k}");
                assert!(
                    buf[lay.nbytes..].iter().all(|&b| b == 0xa5),
                    "case {case}, batch {k}"
                );
            }
        }
    }

    #[test]
    fn pieces_from_two_units_are_joined() {
        let plans = vec![list_plan()];
        let u1 = unit(&[&[1, 2], &[], &[3]]);
        let u2 = unit(&[&[4], &[5, 6, 7]]);
        let pieces: Vec<Piece> = vec![(u1, 1, 3), (u2, 0, 2)];
        let lay = layout(&plans, &pieces);
        assert_eq!(lay.rows, 4);
        let mut buf = vec![0u8; lay.nbytes];
        fill(&plans, &pieces, &lay, &mut buf);
        let cl = &lay.columns[0];
        let vals: Vec<i32> = buf[cl.values_at..cl.values_at + cl.values_len * 4]
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, vec![3, 4, 5, 6, 7]);
        let (at, n) = cl.offsets[0];
        assert_eq!(i64s(&buf[at..at + n * 8]), vec![0, 0, 1, 2, 5]);
        assert_eq!(cl.values_at % ALIGN, 0);
        assert_eq!(at % ALIGN, 0);
    }

    #[test]
    fn a_packed_unit_views_its_slab_and_fills_like_before() {
        let plans = vec![list_plan()];
        let u = unit(&[&[1, 2], &[], &[3, 4, 5]]);
        let batch = layout(&plans, &[(u.clone(), 0, 3)]);
        let mut want = vec![0u8; batch.nbytes];
        fill(&plans, &[(u.clone(), 0, 3)], &batch, &mut want);
        let ring = Ring::new(2);
        let mut plain = Arc::try_unwrap(u).unwrap();
        let mut slab = ring.take(batch.nbytes);
        slab.as_mut_bytes().copy_from_slice(&want);
        plain.packed = Some(view_slab(&plans, &mut plain.columns, slab, batch.clone()));
        let packed = Arc::new(plain);
        let p = packed.packed.as_ref().unwrap();
        assert_eq!(p.layout, batch);
        let ptr = p.slab.as_ptr();
        // SAFETY: the slab holds `nbytes` initialized bytes.
        let got = unsafe { std::slice::from_raw_parts(ptr, batch.nbytes) };
        assert_eq!(got, &want[..]);
        let v = &packed.columns[0].values;
        assert_eq!(v.as_ptr(), ptr.wrapping_add(batch.columns[0].values_at));
        // Rows 1..3 of the packed unit still fill like the unpacked one.
        let part = layout(&plans, &[(packed.clone(), 1, 3)]);
        let mut buf = vec![0u8; part.nbytes];
        fill(&plans, &[(packed, 1, 3)], &part, &mut buf);
        let (at, n) = part.columns[0].offsets[0];
        assert_eq!(i64s(&buf[at..at + n * 8]), vec![0, 0, 3]);
    }
}
