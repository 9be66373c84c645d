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

pub fn layout<U: Deref<Target = PreparedUnit>>(
    plans: &[ColumnPlan],
    pieces: &[(U, usize, usize)],
) -> BatchLayout {
    let rows: usize = pieces.iter().map(|(_, a, b)| b - a).sum();
    let counts = plans.iter().enumerate().map(|(c, plan)| {
        let mut levels = vec![0usize; plan.ragged_levels()];
        if levels.is_empty() {
            return (levels, rows);
        }
        let mut leaf = 0;
        for (unit, a, b) in pieces {
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
        let values_len = leaf * plan.fixed;
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
    assert!(dst.len() >= layout.nbytes, "batch buffer too small");
    // Flat columns of a shuffled batch (thousands of one-row pieces) are gathered in source
    // order, each piece written to its place in the batch: reads then walk each chunk forwards
    // (which the hardware prefetches) and the scattered writes stay within the batch's column.
    let by_source = (pieces.len() > 64).then(|| {
        let mut at = 0;
        // (chunk address, first row in the chunk, piece, first row in the batch)
        let mut order: Vec<(usize, usize, usize, usize)> = pieces
            .iter()
            .enumerate()
            .map(|(i, (unit, a, b))| {
                let row = at;
                at += b - a;
                (&**unit as *const PreparedUnit as usize, *a, i, row)
            })
            .collect();
        order.sort_unstable_by_key(|&(unit, a, _, _)| (unit, a));
        order
    });
    for (c, (plan, cl)) in plans.iter().zip(&layout.columns).enumerate() {
        let size = plan.out.size() * plan.fixed;
        let mut v = cl.values_at;
        if cl.offsets.is_empty() {
            match &by_source {
                Some(order) => {
                    for &(_, _, i, row) in order {
                        let (unit, a, b) = &pieces[i];
                        let src = unit.columns[c].values.as_slice();
                        copy_rows(&mut dst[v + row * size..], src, *a, *b, size);
                    }
                }
                None => {
                    for (unit, a, b) in pieces {
                        let src = unit.columns[c].values.as_slice();
                        copy_rows(&mut dst[v..], src, *a, *b, size);
                        v += (b - a) * size;
                    }
                }
            }
            continue;
        }
        // Per level: where the next offset goes and the running count it continues from.
        let mut cursors: Vec<(usize, i64)> = cl.offsets.iter().map(|&(at, _)| (at, 0)).collect();
        for &(at, _) in &cl.offsets {
            dst[at..at + 8].copy_from_slice(&0i64.to_le_bytes());
        }
        // With many pieces, the values are copied in a second pass in source order (see
        // `by_source`); the first pass, in batch order, writes the offsets and notes where each
        // piece's values come from and go.
        let mut leaves: Vec<(usize, usize, usize)> = Vec::new();
        if by_source.is_some() {
            leaves.reserve(pieces.len());
        }
        for (unit, a, b) in pieces {
            let col = &unit.columns[c];
            let mut r = (*a, *b);
            for (off, cur) in col.offsets.iter().zip(cursors.iter_mut()) {
                let (x, y) = r;
                let base = cur.1 - off[x];
                write_offsets(&mut dst[cur.0 + 8..], base, &off[x + 1..=y]);
                cur.0 += (y - x) * 8;
                cur.1 += off[y] - off[x];
                r = (off[x] as usize, off[y] as usize);
            }
            match by_source {
                Some(_) => leaves.push((r.0, r.1, v)),
                None => copy_rows(&mut dst[v..], col.values.as_slice(), r.0, r.1, size),
            }
            v += (r.1 - r.0) * size;
        }
        if let Some(order) = &by_source {
            for &(_, _, i, _) in order {
                let (x, y, at) = leaves[i];
                let src = pieces[i].0.columns[c].values.as_slice();
                copy_rows(&mut dst[at..], src, x, y, size);
            }
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
        (n, _) => dst[..n * size].copy_from_slice(&src[a * size..b * size]),
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
            fixed: 1,
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
