//! Turns one decoded Arrow column into flat output form: the values in the output element type
//! with nulls already filled (or an error), and the list offsets of every level rebased to 0.
//! This runs on the decode threads, so hashing and casting stay off the consumer's path.

use arrow::array::{Array, ArrayRef, AsArray, DictionaryArray, GenericByteArray};
use arrow::buffer::{BooleanBuffer, Buffer, NullBuffer};
use arrow::compute::cast;
use arrow::datatypes::{
    ArrowNativeType, ByteArrayType, DataType, Float16Type, Float32Type, Float64Type,
    GenericBinaryType, GenericStringType, Int32Type,
};
use arrow::util::display::array_value_to_string;

use std::sync::Arc;

use super::assemble::{Packed, Piece};
use super::column::{ColumnPlan, DType, Fill, Leaf};
use super::error::{Error, Result};
use super::hash::HashKind;

/// One column of one decoded unit, ready to be copied into batch buffers.
#[derive(Debug)]
pub struct Prepared {
    /// Little-endian elements of the output type (the bytes of unhashed strings); no nulls.
    pub values: Buffer,
    /// Offsets of each ragged level, outermost first, each starting at 0.
    pub offsets: Vec<Vec<i64>>,
}

/// All requested columns of one decoded (file, row group / stripe, row range) unit.
#[derive(Debug)]
pub struct PreparedUnit {
    pub rows: usize,
    pub columns: Vec<Prepared>,
    /// The unit already packed as a batch of its rows (see [`assemble::pack`]).
    ///
    /// [`assemble::pack`]: super::assemble::pack
    pub packed: Option<Packed>,
}

/// A decoded segment as a list of chunks of at most a few thousand rows. Decoding in chunks
/// keeps each allocation small enough for the allocator to recycle, instead of faulting in
/// fresh pages for whole-row-group arrays.
#[derive(Debug)]
pub struct PreparedSegment {
    pub chunks: Vec<Arc<PreparedUnit>>,
    /// First row of each chunk within the segment; one extra entry at the end.
    pub starts: Vec<usize>,
}

impl PreparedSegment {
    /// Appends the pieces covering rows `[a, b)` of the segment.
    pub fn pieces(&self, a: usize, b: usize, out: &mut Vec<Piece>) {
        let mut i = self.starts.partition_point(|&s| s <= a).saturating_sub(1);
        let mut pos = a;
        while pos < b {
            let (s, e) = (self.starts[i], self.starts[i + 1]);
            let end = b.min(e);
            out.push((self.chunks[i].clone(), pos - s, end - s));
            pos = end;
            i += 1;
        }
    }
}

/// The hashes of the entries of one string dictionary, each computed the first time a row uses
/// it. Dictionary-encoded string columns repeat few distinct values, so a hashed column costs
/// one hash per distinct value instead of one per row.
#[derive(Default)]
pub struct DictHashes {
    /// The dictionary the hashes belong to, held so its buffers stay the same while compared.
    dict: Option<ArrayRef>,
    hashes: Vec<u64>,
    known: Vec<bool>,
}

impl DictHashes {
    /// Starts over unless `values` is the dictionary already memoized (the same buffers).
    fn use_dict(&mut self, values: &ArrayRef) {
        let same = self.dict.as_ref().is_some_and(|d| {
            let (a, b) = (d.to_data(), values.to_data());
            a.len() == b.len()
                && a.offset() == b.offset()
                && a.buffers().len() == b.buffers().len()
                && (a.buffers().iter().zip(b.buffers()))
                    .all(|(x, y)| x.as_ptr() == y.as_ptr() && x.len() == y.len())
        });
        if !same {
            self.dict = Some(values.clone());
            self.hashes.clear();
            self.hashes.resize(values.len(), 0);
            self.known.clear();
            self.known.resize(values.len(), false);
        }
    }
}

/// Prepares `array` according to `plan`; `at` names the file and unit for error messages.
/// `memo` carries the dictionary hashes of a hashed string column from one chunk to the next.
pub fn prepare(
    plan: &ColumnPlan,
    array: &ArrayRef,
    memo: &mut DictHashes,
    at: &str,
) -> Result<Prepared> {
    let mut offsets = Vec::with_capacity(plan.ragged_levels());
    let mut arr = array.clone();
    for _ in 0..plan.list_levels {
        let (level, child) = match arr.data_type() {
            DataType::List(_) => {
                let l = arr.as_list::<i32>();
                rebase(l.offsets().iter().map(|&o| o as i64), l.values())
            }
            DataType::LargeList(_) => {
                let l = arr.as_list::<i64>();
                rebase(l.offsets().iter().copied(), l.values())
            }
            other => return Err(changed_type(plan, other, at)),
        };
        offsets.push(level);
        arr = child;
    }
    let mut extra_nulls = None;
    if let Some(k) = plan.fixed {
        let DataType::FixedSizeList(_, _) = arr.data_type() else {
            return Err(changed_type(plan, arr.data_type(), at));
        };
        let l = arr.as_fixed_size_list();
        let child = l.values().slice(0, l.len() * k);
        extra_nulls = l.nulls().filter(|n| n.null_count() > 0).map(|n| {
            NullBuffer::new(BooleanBuffer::from_iter(
                (0..l.len() * k).map(|i| n.is_valid(i / k)),
            ))
        });
        arr = child;
    }
    let values = match plan.leaf {
        Leaf::Number(_) => numbers(plan, &arr, extra_nulls, at)?,
        Leaf::Text => text(plan, &arr, extra_nulls, &mut offsets, memo, at)?,
    };
    Ok(Prepared { values, offsets })
}

fn rebase(offsets: impl Iterator<Item = i64>, values: &ArrayRef) -> (Vec<i64>, ArrayRef) {
    let raw: Vec<i64> = offsets.collect();
    let first = raw[0];
    let last = *raw.last().unwrap_or(&first);
    let level = raw.iter().map(|o| o - first).collect();
    (level, values.slice(first as usize, (last - first) as usize))
}

fn changed_type(plan: &ColumnPlan, found: &DataType, at: &str) -> Error {
    Error::Schema(format!(
        "column '{}' has type {found}, expected {} ({at})",
        plan.spec.name, plan.file_type
    ))
}

fn no_fill(plan: &ColumnPlan, at: &str) -> Error {
    Error::Schema(format!(
        "column '{}' has nulls and no fill value, give Column('{}', fill=...) ({at})",
        plan.spec.name, plan.spec.name
    ))
}

fn merged_nulls(arr: &ArrayRef, extra: Option<NullBuffer>) -> Option<NullBuffer> {
    let own = arr.logical_nulls().filter(|n| n.null_count() > 0);
    NullBuffer::union(own.as_ref(), extra.as_ref()).filter(|n| n.null_count() > 0)
}

/// The bytes written for a null: the fill, NaN for floats without one.
pub(crate) fn null_bytes(plan: &ColumnPlan, at: &str) -> Result<Vec<u8>> {
    let out = plan.out;
    let as_f64 = match (&plan.spec.fill, out.is_float()) {
        (Some(Fill::Int(v)), _) => *v as f64,
        (Some(Fill::Float(v)), _) => *v,
        (None, true) => f64::NAN,
        _ => return Err(no_fill(plan, at)),
    };
    // `ColumnPlan::resolve` checked that the fill fits `out`, so these casts are exact.
    let as_int = match &plan.spec.fill {
        Some(Fill::Int(v)) => *v,
        _ => as_f64 as i128,
    };
    Ok(match out {
        DType::Bool => vec![u8::from(as_int != 0)],
        DType::I8 | DType::U8 => vec![as_int as u8],
        DType::I16 | DType::U16 => (as_int as u16).to_le_bytes().to_vec(),
        DType::I32 | DType::U32 => (as_int as u32).to_le_bytes().to_vec(),
        DType::I64 | DType::U64 => (as_int as u64).to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(as_f64).to_le_bytes().to_vec(),
        DType::F32 => (as_f64 as f32).to_le_bytes().to_vec(),
        DType::F64 => as_f64.to_le_bytes().to_vec(),
    })
}

fn numbers(
    plan: &ColumnPlan,
    arr: &ArrayRef,
    extra: Option<NullBuffer>,
    at: &str,
) -> Result<Buffer> {
    // A dictionary-encoded column is read as its values (keys that are null stay null).
    let unpacked;
    let arr = match arr.data_type() {
        DataType::Dictionary(_, value) => {
            unpacked = cast(arr, value).map_err(|e| Error::corrupt(at, e))?;
            &unpacked
        }
        _ => arr,
    };
    let target = plan.out.arrow();
    let arr = if arr.data_type() == &target {
        arr.clone()
    } else {
        let cast_arr = cast(arr, &target).map_err(|e| {
            Error::Schema(format!(
                "column '{}' cannot be cast to {}: {e} ({at})",
                plan.spec.name,
                plan.out.name()
            ))
        })?;
        check_cast(plan, arr, &cast_arr, at)?;
        cast_arr
    };
    let nulls = merged_nulls(&arr, extra);
    let n = arr.len();
    let size = plan.out.size();
    if plan.out == DType::Bool {
        let bits = arr.as_boolean().values();
        let mut bytes: Vec<u8> = bits.iter().map(u8::from).collect();
        if let Some(nulls) = &nulls {
            let fill = null_bytes(plan, at)?[0];
            for i in nulls.iter().enumerate().filter(|(_, v)| !v).map(|(i, _)| i) {
                bytes[i] = fill;
            }
        }
        return Ok(Buffer::from_vec(bytes));
    }
    let data = arr.to_data();
    let raw = data.buffers()[0].slice_with_length(data.offset() * size, n * size);
    let Some(nulls) = nulls else {
        return Ok(raw);
    };
    let fill = null_bytes(plan, at)?;
    let mut bytes = raw.as_slice().to_vec();
    for i in nulls.iter().enumerate().filter(|(_, v)| !v).map(|(i, _)| i) {
        bytes[i * size..(i + 1) * size].copy_from_slice(&fill);
    }
    Ok(Buffer::from_vec(bytes))
}

/// Refuses a cast that lost a value: Arrow's cast turns a value the target cannot hold (an
/// integer out of range, a NaN or infinite float cast to an integer) into a null, a float
/// too large for a narrower float into an infinity, and every number but 0 into `true`.
fn check_cast(plan: &ColumnPlan, from: &ArrayRef, to: &ArrayRef, at: &str) -> Result<()> {
    if plan.out == DType::Bool {
        return check_bool(plan, from, at);
    }
    let lost = |i: usize| {
        if from.is_null(i) {
            return false;
        }
        if to.is_null(i) {
            return true;
        }
        let became_infinite = match plan.out {
            DType::F16 => to.as_primitive::<Float16Type>().value(i).is_infinite(),
            DType::F32 => to.as_primitive::<Float32Type>().value(i).is_infinite(),
            _ => false,
        };
        became_infinite && !is_infinite(from, i)
    };
    let any_infinite = match plan.out {
        DType::F16 => (to.as_primitive::<Float16Type>().values().iter()).any(|v| v.is_infinite()),
        DType::F32 => (to.as_primitive::<Float32Type>().values().iter()).any(|v| v.is_infinite()),
        _ => false,
    };
    if to.null_count() == from.null_count() && !any_infinite {
        return Ok(());
    }
    let Some(i) = (0..from.len()).find(|&i| lost(i)) else {
        return Ok(());
    };
    Err(overflow(plan, from, i, at))
}

/// Refuses numbers other than 0 and 1 cast to bool (2, -1, 0.5 or NaN would read as `true`),
/// as a fill of 2 is refused for a bool column.
fn check_bool(plan: &ColumnPlan, from: &ArrayRef, at: &str) -> Result<()> {
    if from.data_type() == &DataType::Boolean {
        return Ok(());
    }
    // Exact for 0 and 1; every other integer or float stays off both (NaN included).
    let as_f64 = cast(from, &DataType::Float64).map_err(|e| Error::corrupt(at, e))?;
    let values = as_f64.as_primitive::<Float64Type>();
    let bad = (0..from.len()).find(|&i| {
        let v = values.value(i);
        !from.is_null(i) && v != 0.0 && v != 1.0
    });
    match bad {
        Some(i) => Err(overflow(plan, from, i, at)),
        None => Ok(()),
    }
}

fn overflow(plan: &ColumnPlan, from: &ArrayRef, i: usize, at: &str) -> Error {
    // A narrow float's shortest text names a nearby decimal (2^31 in float32 reads
    // "2147483600"), which may fit the target: print its exact value instead.
    let exact = match from.data_type() {
        DataType::Float16 | DataType::Float32 => cast(from, &DataType::Float64)
            .ok()
            .map(|a| a.as_primitive::<Float64Type>().value(i).to_string()),
        _ => None,
    };
    let value = exact
        .or_else(|| array_value_to_string(from, i).ok())
        .unwrap_or_else(|| "?".into());
    Error::Schema(format!(
        "column '{}' has value {value} that overflows {} ({at})",
        plan.spec.name,
        plan.out.name()
    ))
}

/// Whether element `i` of a float array is infinite (an infinity cast to a narrower float is
/// not an overflow).
fn is_infinite(arr: &ArrayRef, i: usize) -> bool {
    match arr.data_type() {
        DataType::Float16 => arr.as_primitive::<Float16Type>().value(i).is_infinite(),
        DataType::Float32 => arr.as_primitive::<Float32Type>().value(i).is_infinite(),
        DataType::Float64 => arr.as_primitive::<Float64Type>().value(i).is_infinite(),
        _ => false,
    }
}

fn text(
    plan: &ColumnPlan,
    arr: &ArrayRef,
    extra: Option<NullBuffer>,
    offsets: &mut Vec<Vec<i64>>,
    memo: &mut DictHashes,
    at: &str,
) -> Result<Buffer> {
    let nulls = merged_nulls(arr, extra.clone());
    if let DataType::Dictionary(key, value) = arr.data_type() {
        if let (Some(kind), DataType::Int32) = (plan.spec.hash, key.as_ref()) {
            let dict = arr.as_dictionary::<Int32Type>();
            memo.use_dict(dict.values());
            return match value.as_ref() {
                DataType::Utf8 => {
                    dict_ids::<GenericStringType<i32>>(plan, kind, dict, nulls, memo, at)
                }
                DataType::LargeUtf8 => {
                    dict_ids::<GenericStringType<i64>>(plan, kind, dict, nulls, memo, at)
                }
                DataType::Binary => {
                    dict_ids::<GenericBinaryType<i32>>(plan, kind, dict, nulls, memo, at)
                }
                DataType::LargeBinary => {
                    dict_ids::<GenericBinaryType<i64>>(plan, kind, dict, nulls, memo, at)
                }
                other => Err(changed_type(plan, other, at)),
            };
        }
        let plain = cast(arr, value).map_err(|e| Error::corrupt(at, e))?;
        return text(plan, &plain, extra, offsets, memo, at);
    }
    let arr = match arr.data_type() {
        DataType::Utf8View => cast(arr, &DataType::LargeUtf8),
        DataType::BinaryView => cast(arr, &DataType::LargeBinary),
        _ => Ok(arr.clone()),
    }
    .map_err(|e| Error::corrupt(at, e))?;
    match arr.data_type() {
        DataType::Utf8 => bytes_of::<GenericStringType<i32>>(plan, &arr, nulls, offsets, at),
        DataType::LargeUtf8 => bytes_of::<GenericStringType<i64>>(plan, &arr, nulls, offsets, at),
        DataType::Binary => bytes_of::<GenericBinaryType<i32>>(plan, &arr, nulls, offsets, at),
        DataType::LargeBinary => bytes_of::<GenericBinaryType<i64>>(plan, &arr, nulls, offsets, at),
        other => Err(changed_type(plan, other, at)),
    }
}

/// The ids of a dictionary-encoded string column: each entry is hashed once (see
/// [`DictHashes`]), the same bits `bytes_of` gives for the strings themselves.
fn dict_ids<T: ByteArrayType>(
    plan: &ColumnPlan,
    kind: HashKind,
    dict: &DictionaryArray<Int32Type>,
    nulls: Option<NullBuffer>,
    memo: &mut DictHashes,
    at: &str,
) -> Result<Buffer>
where
    T::Native: AsRef<[u8]>,
{
    let values: &GenericByteArray<T> = dict.values().as_bytes::<T>();
    let keys = dict.keys().values();
    let buckets = plan.spec.buckets;
    let fill = match &plan.spec.fill {
        // A hashed column's fill was checked to fit int64.
        Some(Fill::Int(v)) => Some(*v as i64),
        _ => None,
    };
    let mut ids = Vec::with_capacity(keys.len());
    for (i, &k) in keys.iter().enumerate() {
        if nulls.as_ref().is_some_and(|m| m.is_null(i)) {
            ids.push(fill.ok_or_else(|| no_fill(plan, at))?);
            continue;
        }
        let k = usize::try_from(k)
            .ok()
            .filter(|&k| k < values.len())
            .ok_or_else(|| {
                Error::corrupt(
                    at,
                    format!(
                        "column '{}': dictionary key {k} out of range",
                        plan.spec.name
                    ),
                )
            })?;
        if !memo.known[k] {
            memo.hashes[k] = kind.hash(values.value(k).as_ref());
            memo.known[k] = true;
        }
        let h = memo.hashes[k];
        ids.push((if buckets > 0 { h % buckets } else { h }) as i64);
    }
    Ok(Buffer::from_vec(ids))
}

fn bytes_of<T: ByteArrayType>(
    plan: &ColumnPlan,
    arr: &ArrayRef,
    nulls: Option<NullBuffer>,
    offsets: &mut Vec<Vec<i64>>,
    at: &str,
) -> Result<Buffer>
where
    T::Native: AsRef<[u8]>,
{
    let a: &GenericByteArray<T> = arr.as_bytes::<T>();
    let n = a.len();
    let is_null = |i: usize| nulls.as_ref().is_some_and(|m| m.is_null(i));
    if let Some(kind) = plan.spec.hash {
        let fill = match &plan.spec.fill {
            // A hashed column's fill was checked to fit int64.
            Some(Fill::Int(v)) => Some(*v as i64),
            _ => None,
        };
        let buckets = plan.spec.buckets;
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = if is_null(i) {
                fill.ok_or_else(|| no_fill(plan, at))?
            } else {
                let h = kind.hash(a.value(i).as_ref());
                (if buckets > 0 { h % buckets } else { h }) as i64
            };
            ids.push(id);
        }
        return Ok(Buffer::from_vec(ids));
    }
    if nulls.is_none() {
        let offs = a.value_offsets();
        let first = offs[0].as_usize();
        let last = offs[n].as_usize();
        offsets.push(offs.iter().map(|o| (o.as_usize() - first) as i64).collect());
        // The batch's own value bytes, shared rather than copied.
        return Ok(a.values().slice_with_length(first, last - first));
    }
    let fill = match &plan.spec.fill {
        Some(Fill::Text(t)) => t.as_slice(),
        _ => return Err(no_fill(plan, at)),
    };
    let mut bytes = Vec::new();
    let mut level = Vec::with_capacity(n + 1);
    level.push(0i64);
    for i in 0..n {
        bytes.extend_from_slice(if is_null(i) {
            fill
        } else {
            a.value(i).as_ref()
        });
        level.push(bytes.len() as i64);
    }
    offsets.push(level);
    Ok(Buffer::from_vec(bytes))
}
