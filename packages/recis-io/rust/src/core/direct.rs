//! Direct Parquet decoding for the common column shapes: a flat number column, or a list of
//! numbers, whose file type already is the output type. Values are decoded straight into the
//! vectors that become the prepared buffers, nulls are filled in place, and list offsets come
//! from the repetition levels, so no Arrow arrays, validity bitmaps or second copies are made.
//! Every other column of the same file goes through the Arrow reader and `prepare`, and the two
//! are merged chunk by chunk.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use arrow::buffer::Buffer;
use parquet::basic::{Repetition, Type as PhysicalType};
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::DataType as ParquetType;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::ReaderProperties;
use parquet::file::reader::RowGroupReader;
use parquet::file::serialized_reader::SerializedRowGroupReader;

use super::assemble::{layout_of_counts, view_slab, write_offsets, Packed};
use super::chunks::Chunks;
use super::column::{ColumnPlan, DType, Leaf};
use super::error::{Error, Result};
use super::parquet_pages;
use super::prepare::{null_bytes, Prepared};
use super::ring::Ring;

/// How one requested column is read directly from one file.
#[derive(Clone, Copy, Debug)]
pub struct DirectColumn {
    /// Index of the leaf column in the file's Parquet schema.
    leaf: usize,
    /// For a list: the definition level from which a level is an element (below it the row's
    /// list is null or empty). `None` for a flat column.
    element_def: Option<i16>,
    /// Definition level of a present value.
    max_def: i16,
}

/// The direct plan of each requested column of a file: `None` for a column that needs the Arrow
/// reader.
pub fn plan(meta: &ParquetMetaData, columns: &[ColumnPlan]) -> Vec<Option<DirectColumn>> {
    // The leaves of each top-level column, found in one pass over the schema (a scan of every
    // leaf per requested column cost C² comparisons for a file of C columns).
    let schema = meta.file_metadata().schema_descr();
    let mut leaves: HashMap<&str, Vec<usize>> = HashMap::with_capacity(schema.num_columns());
    for i in 0..schema.num_columns() {
        leaves
            .entry(schema.get_column_root(i).name())
            .or_default()
            .push(i);
    }
    columns
        .iter()
        .map(|c| plan_column(meta, c, leaves.get(c.spec.name.as_str()).map(Vec::as_slice)))
        .collect()
}

fn plan_column(
    meta: &ParquetMetaData,
    plan: &ColumnPlan,
    leaves: Option<&[usize]>,
) -> Option<DirectColumn> {
    let Leaf::Number(d) = plan.leaf else {
        return None;
    };
    if plan.out != d || plan.fixed.is_some() || plan.list_levels > 1 {
        return None;
    }
    let physical = match d {
        DType::I32 => PhysicalType::INT32,
        DType::I64 => PhysicalType::INT64,
        DType::F32 => PhysicalType::FLOAT,
        DType::F64 => PhysicalType::DOUBLE,
        _ => return None,
    };
    let schema = meta.file_metadata().schema_descr();
    // One leaf: a nested column's several leaves need the Arrow reader.
    let &[leaf] = leaves? else {
        return None;
    };
    let descr = schema.column(leaf);
    if descr.physical_type() != physical {
        return None;
    }
    let root = schema.get_column_root(leaf);
    let max_def = descr.max_def_level();
    if plan.list_levels == 0 {
        let flat = root.is_primitive()
            && root.get_basic_info().repetition() != Repetition::REPEATED
            && descr.max_rep_level() == 0
            && max_def <= 1;
        return flat.then_some(DirectColumn {
            leaf,
            element_def: None,
            max_def,
        });
    }
    // The standard three-level list: `optional group (LIST) { repeated group { leaf } }`.
    if !root.is_group() || root.get_fields().len() != 1 || descr.max_rep_level() != 1 {
        return None;
    }
    let rep = &root.get_fields()[0];
    if !rep.is_group()
        || rep.get_basic_info().repetition() != Repetition::REPEATED
        || rep.get_fields().len() != 1
    {
        return None;
    }
    let item = &rep.get_fields()[0];
    if !item.is_primitive() || item.get_basic_info().repetition() == Repetition::REPEATED {
        return None;
    }
    let element_def = i16::from(root.is_optional()) + 1;
    if max_def != element_def + i16::from(item.is_optional()) {
        return None;
    }
    Some(DirectColumn {
        leaf,
        element_def: Some(element_def),
        max_def,
    })
}

/// A value type the direct path decodes.
trait Native: Copy + Default {
    fn from_le(bytes: &[u8]) -> Self;
}

macro_rules! native {
    ($($t:ty),*) => {$(
        impl Native for $t {
            fn from_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("fill has the element size"))
            }
        }
    )*};
}
native!(i32, i64, f32, f64);

/// One column's reader, typed.
enum Typed {
    I32(ColumnReaderImpl<parquet::data_type::Int32Type>),
    I64(ColumnReaderImpl<parquet::data_type::Int64Type>),
    F32(ColumnReaderImpl<parquet::data_type::FloatType>),
    F64(ColumnReaderImpl<parquet::data_type::DoubleType>),
}

/// Level buffers reused across chunks of one column.
#[derive(Default)]
struct Levels {
    def: Vec<i16>,
    rep: Vec<i16>,
    /// Values (with nulls) of the previous chunk: the capacity to reserve for the next one.
    values: usize,
}

/// Where chunks are packed as batches: every output column (all decoded here, in this order),
/// the ring of batch buffers, and the batch size (only chunks of exactly that many rows are
/// packed).
pub type PackInto<'a> = (&'a [ColumnPlan], &'a std::sync::Arc<Ring>, usize);

/// Decodes rows `[start, end)` of row group `group` of the columns `cols` (each with its plan),
/// in consecutive chunks of `sizes` rows. Returns, per chunk, the prepared columns in the order
/// of `cols`, and the chunk packed as a batch when `pack` asks for it.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    file: File,
    meta: &ParquetMetaData,
    group: usize,
    cols: &[(DirectColumn, &ColumnPlan)],
    start: usize,
    sizes: &[usize],
    pack: Option<PackInto<'_>>,
    at: &str,
) -> Result<Vec<(Vec<Prepared>, Option<Packed>)>> {
    let corrupt = |e: parquet::errors::ParquetError| Error::corrupt(at, e);
    let props = Arc::new(ReaderProperties::builder().build());
    let group_meta = meta.row_group(group);
    let spans = cols
        .iter()
        .map(|(c, _)| group_meta.column(c.leaf).byte_range());
    let chunks = Arc::new(Chunks::read(file, spans, at)?);
    parquet_pages::check(&chunks, group_meta, cols.iter().map(|(c, _)| c.leaf), at)?;
    let rg =
        SerializedRowGroupReader::new(chunks.clone(), group_meta, None, props).map_err(corrupt)?;
    let mut readers = Vec::with_capacity(cols.len());
    for (c, plan) in cols {
        let corrupt = |e| corrupt(e).in_column(|| Some(&plan.spec.name));
        let mut r = match rg.get_column_reader(c.leaf).map_err(corrupt)? {
            ColumnReader::Int32ColumnReader(r) => Typed::I32(r),
            ColumnReader::Int64ColumnReader(r) => Typed::I64(r),
            ColumnReader::FloatColumnReader(r) => Typed::F32(r),
            ColumnReader::DoubleColumnReader(r) => Typed::F64(r),
            _ => return Err(Error::Internal("direct column of another type".into())),
        };
        if start > 0 {
            let skipped = match &mut r {
                Typed::I32(r) => r.skip_records(start),
                Typed::I64(r) => r.skip_records(start),
                Typed::F32(r) => r.skip_records(start),
                Typed::F64(r) => r.skip_records(start),
            }
            .map_err(corrupt)?;
            if skipped != start {
                return Err(Error::corrupt(
                    at,
                    format!(
                        "column '{}': expected to skip {start} rows, skipped {skipped}",
                        plan.spec.name
                    ),
                ));
            }
        }
        readers.push(r);
    }
    let decoded = decode_chunks(cols, &mut readers, sizes, pack, at);
    drop(readers);
    drop(rg);
    Chunks::recycle_shared(chunks);
    decoded
}

/// Reads consecutive chunks of `sizes` rows from `readers` (one per column of `cols`).
fn decode_chunks(
    cols: &[(DirectColumn, &ColumnPlan)],
    readers: &mut [Typed],
    sizes: &[usize],
    pack: Option<PackInto<'_>>,
    at: &str,
) -> Result<Vec<(Vec<Prepared>, Option<Packed>)>> {
    let mut levels: Vec<Levels> = cols.iter().map(|_| Levels::default()).collect();
    let mut out = Vec::with_capacity(sizes.len());
    let mut read = |k: usize, lv: &mut Levels, rows: usize| -> Result<Prepared> {
        let (c, plan) = &cols[k];
        match &mut readers[k] {
            Typed::I32(r) => read_column(r, c, plan, lv, rows, at),
            Typed::I64(r) => read_column(r, c, plan, lv, rows, at),
            Typed::F32(r) => read_column(r, c, plan, lv, rows, at),
            Typed::F64(r) => read_column(r, c, plan, lv, rows, at),
        }
        .map_err(|e| e.in_column(|| Some(&plan.spec.name)))
    };
    for &rows in sizes {
        match pack {
            Some((plans, ring, batch)) if rows == batch && plans.len() == cols.len() => {
                out.push(decode_packed(
                    cols,
                    plans,
                    ring,
                    &mut levels,
                    rows,
                    &mut read,
                )?);
            }
            _ => {
                let columns = (0..cols.len())
                    .zip(&mut levels)
                    .map(|(k, lv)| read(k, lv, rows))
                    .collect::<Result<Vec<_>>>()?;
                out.push((columns, None));
            }
        }
    }
    Ok(out)
}

/// Decodes one chunk straight into a batch buffer: list columns first (their lengths fix the
/// layout), then every flat column, each copied into the buffer right after decoding while it
/// is still in cache, so its decode buffer is reused at once by the next column.
fn decode_packed(
    cols: &[(DirectColumn, &ColumnPlan)],
    plans: &[ColumnPlan],
    ring: &std::sync::Arc<Ring>,
    levels: &mut [Levels],
    rows: usize,
    read: &mut impl FnMut(usize, &mut Levels, usize) -> Result<Prepared>,
) -> Result<(Vec<Prepared>, Option<Packed>)> {
    let mut lists: Vec<Option<Prepared>> = Vec::with_capacity(cols.len());
    for (k, ((c, _), lv)) in cols.iter().zip(levels.iter_mut()).enumerate() {
        lists.push(match c.element_def {
            Some(_) => Some(read(k, lv, rows)?),
            None => None,
        });
    }
    let counts = lists.iter().map(|l| match l {
        Some(p) => {
            let off = &p.offsets[0];
            (vec![off.len() - 1], off[off.len() - 1] as usize)
        }
        None => (Vec::new(), rows),
    });
    let layout = layout_of_counts(plans, rows, counts);
    let mut slab = ring.take(layout.nbytes);
    let dst = slab.as_mut_bytes();
    let mut columns = Vec::with_capacity(cols.len());
    for (k, (list, cl)) in lists.into_iter().zip(&layout.columns).enumerate() {
        let p = match list {
            Some(p) => p,
            None => read(k, &mut levels[k], rows)?,
        };
        let bytes = p.values.as_slice();
        dst[cl.values_at..cl.values_at + bytes.len()].copy_from_slice(bytes);
        for (off, &(at, n)) in p.offsets.iter().zip(&cl.offsets) {
            write_offsets(&mut dst[at..at + n * 8], 0, off);
        }
        columns.push(p);
    }
    let packed = view_slab(plans, &mut columns, slab, layout);
    Ok((columns, Some(packed)))
}

/// Decodes `rows` rows of one direct column (its caller names the column in the errors).
fn read_column<T>(
    reader: &mut ColumnReaderImpl<T>,
    col: &DirectColumn,
    plan: &ColumnPlan,
    lv: &mut Levels,
    rows: usize,
    at: &str,
) -> Result<Prepared>
where
    T: ParquetType,
    T::T: Native,
    Vec<T::T>: Into<Buffer>,
{
    lv.def.clear();
    lv.rep.clear();
    // List columns vary in length from chunk to chunk: leave headroom over the previous chunk
    // so the vector is not reallocated (and copied) while decoding.
    let mut values: Vec<T::T> = Vec::with_capacity(rows.max(lv.values + lv.values / 4));
    let mut got = 0;
    while got < rows {
        let (records, _, levels) = reader
            .read_records(
                rows - got,
                (col.max_def > 0).then_some(&mut lv.def),
                col.element_def.is_some().then_some(&mut lv.rep),
                &mut values,
            )
            .map_err(|e| Error::corrupt(at, e))?;
        if records == 0 && levels == 0 {
            break;
        }
        got += records;
    }
    if got != rows {
        return Err(Error::corrupt(
            at,
            format!("expected {rows} rows, decoded {got}"),
        ));
    }
    lv.values = lv.def.len().max(values.len());
    let fill = |plan: &ColumnPlan| -> Result<T::T> { Ok(T::T::from_le(&null_bytes(plan, at)?)) };
    match col.element_def {
        None => {
            if col.max_def > 0 && values.len() < rows {
                spread(&mut values, &lv.def, col.max_def, fill(plan)?);
            }
            Ok(Prepared {
                values: values.into(),
                offsets: Vec::new(),
            })
        }
        Some(element_def) => {
            // Branch-free: every level writes the running count to the slot of the next list
            // start, and a level that starts a list (repetition level 0) moves to the next
            // slot. The count is clamped to the last slot, so corrupt levels cannot write
            // outside the vector; they are reported below.
            let mut offsets = vec![0i64; rows + 2];
            let last = rows + 1;
            let (mut k, mut n) = (0usize, 0i64);
            for (&r, &d) in lv.rep.iter().zip(&lv.def) {
                offsets[k] = n;
                k = (k + usize::from(r == 0)).min(last);
                n += i64::from(d >= element_def);
            }
            if k != rows {
                return Err(Error::corrupt(
                    at,
                    format!("expected {rows} lists, decoded {k}"),
                ));
            }
            offsets[k] = n;
            offsets.truncate(rows + 1);
            if (values.len() as i64) < n {
                let value = fill(plan)?;
                let elements: Vec<i16> = lv
                    .def
                    .iter()
                    .copied()
                    .filter(|&d| d >= element_def)
                    .collect();
                spread(&mut values, &elements, col.max_def, value);
            }
            Ok(Prepared {
                values: values.into(),
                offsets: vec![offsets],
            })
        }
    }
}

/// Turns the dense non-null `values` into one value per entry of `def`, writing `fill` where the
/// level is below `present`. Works in place from the back, so each value moves once.
fn spread<V: Copy>(values: &mut Vec<V>, def: &[i16], present: i16, fill: V) {
    let mut j = values.len();
    values.resize(def.len(), fill);
    for (i, &d) in def.iter().enumerate().rev() {
        if d >= present {
            j -= 1;
            values[i] = values[j];
        } else {
            values[i] = fill;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn spread_fills_nulls_in_place() {
        let mut v = vec![1i64, 2, 3];
        spread(&mut v, &[0, 1, 1, 0, 1, 0], 1, -7);
        assert_eq!(v, vec![-7, 1, 2, -7, 3, -7]);
        let mut all = vec![5i64, 6];
        spread(&mut all, &[1, 1], 1, 0);
        assert_eq!(all, vec![5, 6]);
    }
}
