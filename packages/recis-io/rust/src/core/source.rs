//! Files and their metadata, read once, and the decoding of one unit with projection.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
    RowSelector,
};
use parquet::arrow::ProjectionMask;

use super::chunks::{Chunks, SharedChunks};
use super::column::{ColumnPlan, ColumnSpec, Leaf};
use super::direct::{self, DirectColumn};
use super::error::{guard, Error, Result};
use super::plan::{Segment, Unit};
use super::prepare::{prepare, DictHashes, PreparedSegment, PreparedUnit};
use super::ring::Ring;
use super::{orc_lengths, orc_types, parquet_footer, parquet_pages};

/// Rows per decoded chunk, `RECIS_IO_DECODE_ROWS` or 8192. Small chunks let the allocator
/// recycle memory between chunks; large ones lower per-chunk overhead.
fn chunk_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("RECIS_IO_DECODE_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(8192)
    })
}

/// Packing of decoded chunks as batches. Chunks are cut at batch boundaries, and each chunk of
/// exactly `batch` rows is packed into a buffer from `ring` on the decode thread, so the batch
/// it makes is handed to the consumer without another copy. Used for files whose columns all
/// decode directly (the others are read in chunks that do not line up with batches).
#[derive(Clone)]
pub struct Packing {
    pub ring: Arc<Ring>,
    pub batch: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Parquet,
    Orc,
}

impl Format {
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "parquet" => Ok(Format::Parquet),
            "orc" => Ok(Format::Orc),
            other => Err(Error::InvalidArgument(format!(
                "format must be 'parquet' or 'orc', got '{other}'"
            ))),
        }
    }

    fn unit_name(self) -> &'static str {
        match self {
            Format::Parquet => "row group",
            Format::Orc => "stripe",
        }
    }
}

enum Meta {
    Parquet(ArrowReaderMetadata),
    /// Stripe byte offsets: orc-rust re-reads the small footer per unit, the stripes are
    /// picked by offset.
    Orc(Vec<u64>),
}

struct FileMeta {
    path: String,
    format: Format,
    schema: SchemaRef,
    meta: Meta,
    /// Per requested column, how it is decoded without the Arrow reader, when it can be
    /// (Parquet only; empty for ORC).
    direct: Vec<Option<DirectColumn>>,
    /// Leaf columns (indexes in the Parquet schema) whose chunks are encrypted with Parquet
    /// modular encryption, which this reader cannot decrypt.
    encrypted: Vec<usize>,
    /// The file as planned: every later read checks that it is still the same.
    stamp: Stamp,
}

/// A file's size and modification time: what tells that it was rewritten after planning (its
/// footer, row groups and column offsets then describe other bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    dir: bool,
}

impl Stamp {
    fn of(file: &File, path: &str) -> Result<Stamp> {
        let m = file.metadata().map_err(|e| Error::read(path, &e))?;
        Ok(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            dir: m.is_dir(),
        })
    }
}

/// `ESTALE` ("stale file handle"), the error number of a read whose file changed under it.
#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
const ESTALE: i32 = 70;
#[cfg(not(any(target_os = "macos", target_os = "ios", target_os = "freebsd")))]
const ESTALE: i32 = 116;

/// The data set: files, their units, and the columns to read.
pub struct Source {
    files: Vec<FileMeta>,
    pub units: Vec<Unit>,
    pub columns: Vec<ColumnPlan>,
}

fn open(path: &str) -> Result<File> {
    File::open(path).map_err(|e| Error::read(path, &e))
}

/// A planned file opened again to read its data, refused when it is no longer the file that
/// was planned: decoded with the old footer, a rewritten file gives another column's values,
/// or fails as if it were corrupt.
fn open_planned(fm: &FileMeta) -> Result<File> {
    let file = open(&fm.path)?;
    let now = Stamp::of(&file, &fm.path)?;
    if now == fm.stamp || now.dir {
        return Ok(file); // a directory now: its read fails with the system's own error
    }
    let what = if now.len != fm.stamp.len {
        format!("its size was {} bytes, now {}", fm.stamp.len, now.len)
    } else {
        "its modification time changed".to_string()
    };
    Err(Error::Os {
        path: fm.path.clone(),
        errno: ESTALE,
        msg: format!(
            "the file changed after the Dataset read its metadata ({what}); create a new \
             Dataset to read it as it is now"
        ),
    })
}

fn read_meta(path: &str, format: Format) -> Result<(FileMeta, Vec<usize>)> {
    let mut file = open(path)?;
    let stamp = Stamp::of(&file, path)?;
    check_magic(&file, stamp.len, path, format)?;
    let encrypted = match format {
        Format::Orc => {
            orc_types::check(&mut file, path)?;
            Vec::new()
        }
        Format::Parquet => parquet_footer::check(&file, path)?,
    };
    let (mut fm, rows) = guard(path, || read_meta_of(file, path, format, stamp))?;
    fm.encrypted = encrypted;
    Ok((fm, rows))
}

/// Fails when the file `file` of `len` bytes is not empty and does not begin with its format's
/// magic bytes (`PAR1` or `PARE`, `ORC`): a file of the other format, or no data file at all,
/// named as such rather than as whatever the decoder stumbles on in its tail. An empty file is
/// left to the decoder ("empty file").
fn check_magic(file: &File, len: u64, path: &str, format: Format) -> Result<()> {
    // An encrypted Parquet file (encrypted footer) begins with `PARE`; its footer check names it.
    let (magics, name): (&[&[u8]], &str) = match format {
        Format::Parquet => (&[b"PAR1", b"PARE"], "a Parquet"),
        Format::Orc => (&[b"ORC"], "an ORC"),
    };
    let head = orc_types::read_at(file, 0, len.min(4)).unwrap_or_default();
    if head.is_empty() || magics.iter().any(|m| head.starts_with(m)) {
        return Ok(());
    }
    let other = match format {
        Format::Parquet if head.starts_with(b"ORC") => {
            "; it begins like an ORC file: pass format='orc' or give it the .orc suffix"
        }
        Format::Orc if head.starts_with(b"PAR1") => {
            "; it begins like a Parquet file: pass format='parquet' or give it the .parquet suffix"
        }
        _ => "",
    };
    Err(Error::corrupt(
        path,
        format!(
            "not {name} file: it does not begin with the magic bytes '{}'{other}",
            String::from_utf8_lossy(magics[0])
        ),
    ))
}

fn read_meta_of(
    file: File,
    path: &str,
    format: Format,
    stamp: Stamp,
) -> Result<(FileMeta, Vec<usize>)> {
    let (schema, meta, rows) = match format {
        Format::Parquet => {
            let m = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
                .map_err(|e| Error::read(path, &e))?;
            let m = without_list_views(m, path)?;
            check_parquet_rows(m.metadata(), path)?;
            let rows = m
                .metadata()
                .row_groups()
                .iter()
                .map(|g| g.num_rows().max(0) as usize)
                .collect();
            (m.schema().clone(), Meta::Parquet(m), rows)
        }
        Format::Orc => {
            let len = file.metadata().map_err(|e| Error::read(path, &e))?.len();
            let b = orc_rust::arrow_reader::ArrowReaderBuilder::try_new(file)
                .map_err(|e| Error::read(path, &e))?;
            orc_lengths::check_layout(b.file_metadata(), len, path)?;
            let stripes = b.file_metadata().stripe_metadatas();
            let rows = stripes
                .iter()
                .map(|s| s.number_of_rows() as usize)
                .collect();
            let offsets = stripes.iter().map(|s| s.offset()).collect();
            (b.schema(), Meta::Orc(offsets), rows)
        }
    };
    let fm = FileMeta {
        path: path.to_string(),
        format,
        schema,
        meta,
        direct: Vec::new(),
        encrypted: Vec::new(),
        stamp,
    };
    Ok((fm, rows))
}

/// The reader metadata of a Parquet file, with list views read as lists. pyarrow writes a
/// `list_view` column as a plain Parquet LIST and records the view type in the Arrow schema it
/// stores in the file, from which the parquet crate takes its Arrow types: such columns are
/// lists in the file, and read as lists.
fn without_list_views(m: ArrowReaderMetadata, path: &str) -> Result<ArrowReaderMetadata> {
    Ok(retyped(&m, path, |f| plain_lists(f.data_type()))?.unwrap_or(m))
}

/// Reader metadata `m` with the Arrow type of each root field that `retype` gives a type for
/// replaced by it (the parquet crate decodes to the types of the schema it is given); `None`
/// when `retype` replaces none.
fn retyped(
    m: &ArrowReaderMetadata,
    path: &str,
    retype: impl Fn(&Field) -> Option<DataType>,
) -> Result<Option<ArrowReaderMetadata>> {
    let schema = m.schema();
    let types: Vec<Option<DataType>> = schema.fields().iter().map(|f| retype(f)).collect();
    if types.iter().all(Option::is_none) {
        return Ok(None);
    }
    let fields: Vec<Field> = (schema.fields().iter().zip(types))
        .map(|(f, t)| match t {
            Some(t) => f.as_ref().clone().with_data_type(t),
            None => f.as_ref().clone(),
        })
        .collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    let options = ArrowReaderOptions::new().with_schema(schema);
    ArrowReaderMetadata::try_new(m.metadata().clone(), options)
        .map(Some)
        .map_err(|e| Error::corrupt(path, e))
}

/// `dt` with every list view in it (at any list level) made the list of the same offset
/// width; `None` when it holds none.
fn plain_lists(dt: &DataType) -> Option<DataType> {
    let item = |f: &FieldRef| {
        plain_lists(f.data_type()).map(|t| Arc::new(f.as_ref().clone().with_data_type(t)))
    };
    match dt {
        DataType::ListView(f) => Some(DataType::List(item(f).unwrap_or_else(|| f.clone()))),
        DataType::LargeListView(f) => {
            Some(DataType::LargeList(item(f).unwrap_or_else(|| f.clone())))
        }
        DataType::List(f) => item(f).map(DataType::List),
        DataType::LargeList(f) => item(f).map(DataType::LargeList),
        DataType::FixedSizeList(f, k) => item(f).map(|f| DataType::FixedSizeList(f, *k)),
        _ => None,
    }
}

/// Fails when a column of `plans` is stored (in some row group of the Parquet file `f`) in
/// chunks encrypted with Parquet modular encryption, which this reader cannot decrypt.
fn refuse_encrypted(f: &FileMeta, m: &ArrowReaderMetadata, plans: &[ColumnPlan]) -> Result<()> {
    let schema = m.parquet_schema();
    for &leaf in f.encrypted.iter().filter(|&&l| l < schema.num_columns()) {
        let root = schema.get_column_root(leaf).name();
        if plans.iter().any(|p| p.spec.name == root) {
            return Err(Error::Schema(format!(
                "column '{root}' is encrypted (Parquet modular encryption), which recis-io does \
                 not read (file {})",
                f.path
            )));
        }
    }
    Ok(())
}

/// Fails when a Parquet row group's row count is impossible: every row puts at least one
/// value (or null) into each leaf column, so no row group holds more rows than any of its
/// column chunks holds values, and the row groups' rows add up to the file's. Reading sizes
/// its work by the row count: a damaged count of exabytes would abort the process.
fn check_parquet_rows(meta: &parquet::file::metadata::ParquetMetaData, path: &str) -> Result<()> {
    let mut total: i64 = 0;
    for (i, g) in meta.row_groups().iter().enumerate() {
        let values = g.columns().iter().map(|c| c.num_values()).min();
        if g.num_rows() < 0 || values.is_some_and(|v| g.num_rows() > v) {
            return Err(Error::corrupt(
                path,
                format!(
                    "row group {i} claims {} rows, more than its column chunks hold values \
                     ({})",
                    g.num_rows(),
                    values.unwrap_or(0)
                ),
            ));
        }
        total = total.saturating_add(g.num_rows());
    }
    let claimed = meta.file_metadata().num_rows();
    if total != claimed {
        return Err(Error::corrupt(
            path,
            format!("the row groups hold {total} rows, the file footer says {claimed}"),
        ));
    }
    Ok(())
}

impl Source {
    /// Reads every file's metadata and checks the requested columns against each schema.
    /// `specs` empty means every column of the first file with rows (of the first file when
    /// none has any). Files without rows contribute nothing, so their schemas are not checked
    /// (writers give an empty file's all-null column the `Null` type, for one).
    pub fn open(paths: &[(String, Format)], specs: &[ColumnSpec]) -> Result<Source> {
        if paths.is_empty() {
            return Err(Error::InvalidArgument("no input files".into()));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut units = Vec::new();
        let mut has_rows = Vec::with_capacity(paths.len());
        for (i, (path, format)) in paths.iter().enumerate() {
            let (fm, rows) = read_meta(path, *format)?;
            has_rows.push(rows.iter().any(|&r| r > 0));
            units.extend(rows.into_iter().enumerate().filter(|(_, r)| *r > 0).map(
                |(group, rows)| Unit {
                    file: i,
                    group,
                    rows,
                },
            ));
            files.push(fm);
        }
        let reference = has_rows.iter().position(|&r| r).unwrap_or(0);
        let first = &files[reference];
        let any_rows = has_rows.iter().any(|&r| r);
        let specs: Vec<ColumnSpec> = if specs.is_empty() {
            first
                .schema
                .fields()
                .iter()
                // A data set of empty files only may type a column `null` (a writer with no
                // values to type it by): it has no rows to read, so such columns are left out.
                .filter(|f| any_rows || f.data_type() != &DataType::Null)
                .map(|f| ColumnSpec::plain(f.name()))
                .collect()
        } else {
            specs.to_vec()
        };
        let names = FieldNames::of(&first.schema);
        let columns = specs
            .iter()
            .map(|s| {
                let field = names.find(&s.name, &first.path)?;
                ColumnPlan::resolve(s, field).map_err(|e| in_file(e, &first.path))
            })
            .collect::<Result<Vec<_>>>()?;
        // Each file's own plan of each column: the same layout as the first file's, the leaf
        // type may differ where `dtype` casts every file's numbers to one output type.
        let mut file_plans = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            if i == reference || !has_rows[i] {
                // A file without rows is never decoded: the reference plans stand in.
                file_plans.push(columns.clone());
                continue;
            }
            let names = FieldNames::of(&f.schema);
            let plans = columns
                .iter()
                .map(|c| {
                    let field = names.find(&c.spec.name, &f.path)?;
                    file_plan(c, field, &f.path, &first.path)
                })
                .collect::<Result<Vec<_>>>()?;
            file_plans.push(plans);
        }
        for ((f, plans), rows) in files.iter_mut().zip(&file_plans).zip(&has_rows) {
            if !rows {
                continue;
            }
            if let Meta::Parquet(m) = &f.meta {
                refuse_encrypted(f, m, plans)?;
                f.direct = direct::plan(m.metadata(), plans);
                if let Some(hinted) = dictionary_hint(m, &columns, &f.path)? {
                    f.meta = Meta::Parquet(hinted);
                }
            }
        }
        Ok(Source {
            files,
            units,
            columns,
        })
    }

    pub fn total_rows(&self) -> usize {
        self.units.iter().map(|u| u.rows).sum()
    }

    /// Rows of each file, in the order the files were given.
    pub fn file_rows(&self) -> Vec<usize> {
        let mut rows = vec![0; self.files.len()];
        for u in &self.units {
            rows[u.file] += u.rows;
        }
        rows
    }

    /// Decodes rows `[start, end)` of one unit and prepares every requested column. Columns
    /// with a direct plan are decoded straight into their buffers; the others are read with the
    /// Arrow reader (projected to just them) and prepared, and both land in the same chunks.
    /// `pos` is the segment's first position in the shard's sequence, which places batch
    /// boundaries for `packing`.
    pub fn decode(
        &self,
        seg: &Segment,
        pos: usize,
        packing: Option<&Packing>,
    ) -> Result<PreparedSegment> {
        let unit = self.units[seg.unit];
        let fm = &self.files[unit.file];
        let at = format!("{}, {} {}", fm.path, fm.format.unit_name(), unit.group);
        guard(&at, || self.decode_unit(fm, unit, seg, pos, packing, &at))
    }

    fn decode_unit(
        &self,
        fm: &FileMeta,
        unit: Unit,
        seg: &Segment,
        pos: usize,
        packing: Option<&Packing>,
        at: &str,
    ) -> Result<PreparedSegment> {
        let direct_of = |i: usize| fm.direct.get(i).copied().flatten();
        let direct: Vec<(DirectColumn, &ColumnPlan)> = (self.columns.iter().enumerate())
            .filter_map(|(i, c)| direct_of(i).map(|d| (d, c)))
            .collect();
        let rest: Vec<&ColumnPlan> = (self.columns.iter().enumerate())
            .filter(|(i, _)| direct_of(*i).is_none())
            .map(|(_, c)| c)
            .collect();
        let want = seg.end - seg.start;
        let batches = if rest.is_empty() {
            Vec::new()
        } else {
            self.decode_arrow(fm, unit, seg, &rest, at)?
        };
        let packing = packing.filter(|p| rest.is_empty() && !direct.is_empty() && p.batch > 0);
        let sizes: Vec<usize> = if let Some(p) = packing {
            let lead = ((p.batch - pos % p.batch) % p.batch).min(want);
            let mut sizes = Vec::with_capacity(want / p.batch + 2);
            if lead > 0 {
                sizes.push(lead);
            }
            let mut left = want - lead;
            while left > 0 {
                sizes.push(left.min(p.batch));
                left -= left.min(p.batch);
            }
            sizes
        } else if rest.is_empty() {
            let chunk = chunk_rows();
            (0..want.div_ceil(chunk))
                .map(|k| chunk.min(want - k * chunk))
                .collect()
        } else {
            batches.iter().map(|b| b.num_rows()).collect()
        };
        let mut decoded = match (&fm.meta, direct.is_empty()) {
            (_, true) => Vec::new(),
            (Meta::Parquet(m), false) => direct::decode(
                open_planned(fm).map_err(|e| e.at(at))?,
                m.metadata(),
                unit.group,
                &direct,
                seg.start,
                &sizes,
                packing.map(|p| (self.columns.as_slice(), &p.ring, p.batch)),
                at,
            )?,
            (Meta::Orc(_), false) => {
                return Err(Error::Internal("direct plan for an ORC file".into()))
            }
        }
        .into_iter();
        let mut memos: Vec<DictHashes> = self.columns.iter().map(|_| Default::default()).collect();
        let mut chunks = Vec::with_capacity(sizes.len());
        let mut starts = vec![0];
        for (k, &rows) in sizes.iter().enumerate() {
            let (from_direct, packed) = decoded.next().unwrap_or_default();
            let mut from_direct = from_direct.into_iter();
            let columns = (self.columns.iter().enumerate().zip(&mut memos))
                .map(|((i, c), memo)| match direct_of(i) {
                    Some(_) => from_direct
                        .next()
                        .ok_or_else(|| Error::Internal("direct column missing".into())),
                    None => {
                        let array = batches[k].column_by_name(&c.spec.name).ok_or_else(|| {
                            Error::Schema(format!("column '{}' not found ({at})", c.spec.name))
                        })?;
                        prepare(c, array, memo, at)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            chunks.push(Arc::new(PreparedUnit {
                rows,
                columns,
                packed,
            }));
            starts.push(starts[starts.len() - 1] + rows);
        }
        Ok(PreparedSegment { chunks, starts })
    }

    /// The non-empty Arrow batches of rows `[start, end)` of one unit, projected to `cols`.
    fn decode_arrow(
        &self,
        fm: &FileMeta,
        unit: Unit,
        seg: &Segment,
        cols: &[&ColumnPlan],
        at: &str,
    ) -> Result<Vec<RecordBatch>> {
        let batches = match &fm.meta {
            Meta::Parquet(m) => self.decode_parquet(fm, m, unit, seg, cols),
            Meta::Orc(offsets) => self.decode_orc(fm, offsets, unit, seg, cols),
        }
        .map_err(|e| e.at(at))?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows != seg.end - seg.start {
            return Err(Error::corrupt(
                at,
                format!("expected {} rows, decoded {rows}", seg.end - seg.start),
            ));
        }
        Ok(batches.into_iter().filter(|b| b.num_rows() > 0).collect())
    }

    fn decode_parquet(
        &self,
        fm: &FileMeta,
        m: &ArrowReaderMetadata,
        unit: Unit,
        seg: &Segment,
        cols: &[&ColumnPlan],
    ) -> Result<Vec<RecordBatch>> {
        let file = open_planned(fm)?;
        let roots: Vec<(usize, &str)> = (cols.iter())
            .filter_map(|c| {
                let name = c.spec.name.as_str();
                fm.schema.index_of(name).ok().map(|root| (root, name))
            })
            .collect();
        let schema = m.parquet_schema();
        let group = m.metadata().row_group(unit.group);
        let leaves: Vec<usize> = (0..schema.num_columns())
            .filter(|&leaf| {
                roots
                    .iter()
                    .any(|r| r.0 == schema.get_column_root_idx(leaf))
            })
            .collect();
        let spans = leaves.iter().map(|&leaf| group.column(leaf).byte_range());
        let chunks = SharedChunks(Arc::new(Chunks::read(file, spans, &fm.path)?));
        parquet_pages::check(&chunks.0, group, leaves, &fm.path)?;
        let decode = |roots: &[(usize, &str)]| -> Result<Vec<RecordBatch>> {
            let mask = ProjectionMask::roots(schema, roots.iter().map(|r| r.0));
            let mut builder =
                ParquetRecordBatchReaderBuilder::new_with_metadata(chunks.clone(), m.clone())
                    .with_row_groups(vec![unit.group])
                    .with_projection(mask)
                    .with_batch_size(chunk_rows());
            if seg.start > 0 || seg.end < unit.rows {
                let sel = vec![
                    RowSelector::skip(seg.start),
                    RowSelector::select(seg.end - seg.start),
                ];
                builder = builder.with_row_selection(RowSelection::from(sel));
            }
            let reader = builder.build().map_err(|e| Error::corrupt(&fm.path, e))?;
            reader
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::corrupt(&fm.path, e))
        };
        let batches = guard(&fm.path, || decode(&roots)).map_err(|e| {
            e.in_column(|| {
                let alone = |&root: &(usize, &str)| guard(&fm.path, || decode(&[root])).is_err();
                blame(&roots, false, alone).map(|r| r.1)
            })
        });
        chunks.recycle();
        batches
    }

    fn decode_orc(
        &self,
        fm: &FileMeta,
        offsets: &[u64],
        unit: Unit,
        seg: &Segment,
        cols: &[&ColumnPlan],
    ) -> Result<Vec<RecordBatch>> {
        let names: Vec<&str> = cols.iter().map(|c| c.spec.name.as_str()).collect();
        let decode = |names: &[&str]| {
            guard(&fm.path, || {
                self.decode_orc_columns(fm, offsets, unit, seg, names)
            })
        };
        decode(&names).map_err(|e| {
            e.in_column(|| {
                // A column read alone is told from damage to the whole stripe by another
                // column of the file, decoded as a witness.
                let witness = match names[..] {
                    [only] => (fm.schema.fields().iter())
                        .map(|f| f.name().as_str())
                        .find(|&name| name != only),
                    _ => None,
                };
                let parts: Vec<&str> = names.iter().copied().chain(witness).collect();
                let blamed = blame(&parts, true, |name| decode(&[name]).is_err());
                blamed.copied().filter(|&name| Some(name) != witness)
            })
        })
    }

    /// The batches of rows `[seg.start, seg.end)` of stripe `unit.group`, root columns `names`.
    fn decode_orc_columns(
        &self,
        fm: &FileMeta,
        offsets: &[u64],
        unit: Unit,
        seg: &Segment,
        names: &[&str],
    ) -> Result<Vec<RecordBatch>> {
        let file = open_planned(fm)?;
        let probe = file.try_clone().map_err(|e| Error::read(&fm.path, &e))?;
        let b = orc_rust::arrow_reader::ArrowReaderBuilder::try_new(file)
            .map_err(|e| Error::read(&fm.path, &e))?;
        let meta = b.file_metadata();
        orc_lengths::check(&probe, meta, unit.group, names, chunk_rows(), &fm.path)?;
        let mask = orc_rust::projection::ProjectionMask::named_roots(
            b.file_metadata().root_data_type(),
            names,
        );
        let offset = offsets[unit.group] as usize;
        let reader = b
            .with_projection(mask)
            .with_file_byte_range(offset..offset + 1)
            .with_batch_size(chunk_rows())
            .build();
        let batches = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::read(&fm.path, &e))?;
        Ok(slice_rows(batches, seg.start, seg.end))
    }
}

/// The column to name in the error of a decode of `parts` that failed: the first part whose
/// decode alone fails, as `fails` says. A part alone is that part, when the decode reads only
/// its own bytes (a Parquet column chunk). Parts that share bytes (an ORC stripe's footer)
/// are named only when another part decodes alone: damage every part fails on is not one
/// column's (the ORC decode adds a witness column to a column read alone).
fn blame<P>(parts: &[P], shared: bool, fails: impl Fn(&P) -> bool) -> Option<&P> {
    match (parts, shared) {
        ([one], false) => Some(one),
        ([_], true) => None,
        (_, false) => parts.iter().find(|p| fails(p)),
        (_, true) => {
            let failing: Vec<&P> = parts.iter().filter(|p| fails(p)).collect();
            (failing.len() < parts.len()).then(|| failing.first().copied())?
        }
    }
}

/// Reader metadata that reads hashed flat string columns as dictionaries (`Dictionary(Int32, _)`),
/// so dictionary-encoded pages arrive as keys into one dictionary per column chunk and each
/// distinct string is hashed once. `None` when no column is hashed.
fn dictionary_hint(
    m: &ArrowReaderMetadata,
    columns: &[ColumnPlan],
    path: &str,
) -> Result<Option<ArrowReaderMetadata>> {
    let hashed = |name: &str| {
        columns.iter().any(|c| {
            c.spec.name == name && c.spec.hash.is_some() && c.list_levels == 0 && c.fixed.is_none()
        })
    };
    retyped(m, path, |f| match f.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary | DataType::LargeBinary
            if hashed(f.name()) =>
        {
            let value = Box::new(f.data_type().clone());
            Some(DataType::Dictionary(Box::new(DataType::Int32), value))
        }
        _ => None,
    })
}

/// How column `c` (planned from the first file, `first`) is read from a later file whose field
/// is `field`. The types must agree up to [`logical`], except that with an explicit `dtype` the
/// numbers of each file may have any numeric type: they are cast while decoding, and a value
/// the dtype cannot hold is an error then (see `prepare`).
fn file_plan(c: &ColumnPlan, field: &Field, path: &str, first: &str) -> Result<ColumnPlan> {
    if logical(field.data_type()) == logical(&c.file_type) {
        return Ok(c.clone());
    }
    let mismatch = |hint: &str| {
        Error::Schema(format!(
            "column '{}' has type {} in {path}, but {} in {first}{hint}",
            c.spec.name,
            field.data_type(),
            c.file_type
        ))
    };
    let Ok(own) = ColumnPlan::resolve(&c.spec, field) else {
        return Err(mismatch(""));
    };
    let same_layout = own.list_levels == c.list_levels && own.fixed == c.fixed;
    match (own.leaf, c.leaf) {
        (Leaf::Number(_), Leaf::Number(_)) if same_layout && c.spec.dtype.is_some() => Ok(own),
        (Leaf::Number(_), Leaf::Number(_)) if same_layout => Err(mismatch(&format!(
            "; give Column('{}', dtype=...) to read both as one type",
            c.spec.name
        ))),
        _ => Err(mismatch("")),
    }
}

/// `dt` without what does not change how a column is read (the decode step takes either form):
/// list item names and nullability (Parquet writers name items `element`, ORC `item`), 32- or
/// 64-bit offsets and views, and dictionary encoding (of strings and of numbers).
fn logical(dt: &DataType) -> DataType {
    let item = |f: &FieldRef| Arc::new(Field::new("item", logical(f.data_type()), true));
    match dt {
        DataType::List(f) | DataType::LargeList(f) => DataType::List(item(f)),
        DataType::FixedSizeList(f, k) => DataType::FixedSizeList(item(f), *k),
        DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
        DataType::LargeBinary | DataType::BinaryView => DataType::Binary,
        DataType::Dictionary(_, v) => logical(v),
        other => other.clone(),
    }
}

/// Rows `[start, end)` of a sequence of batches.
fn slice_rows(batches: Vec<RecordBatch>, start: usize, end: usize) -> Vec<RecordBatch> {
    let mut out = Vec::with_capacity(batches.len());
    let mut pos = 0;
    for b in batches {
        let (a, z) = (pos.max(start), (pos + b.num_rows()).min(end));
        if a < z {
            out.push(b.slice(a - pos, z - a));
        }
        pos += b.num_rows();
    }
    out
}

/// An error of the column plan (a schema problem, or an option that does not fit the column's
/// type), naming the file whose schema it was planned from.
fn in_file(e: Error, path: &str) -> Error {
    match e {
        Error::Schema(msg) => Error::Schema(format!("{msg} (file {path})")),
        Error::InvalidArgument(msg) => Error::InvalidArgument(format!("{msg} (file {path})")),
        other => other,
    }
}

/// A schema's fields by name, indexed once per file: looking each requested column up by a
/// scan of every field made a file of C columns cost C² comparisons to plan (seconds per file
/// at thousands of columns).
struct FieldNames<'s> {
    schema: &'s Schema,
    /// Each name's first position and how many fields carry it.
    by_name: HashMap<&'s str, (usize, usize)>,
}

impl<'s> FieldNames<'s> {
    fn of(schema: &'s Schema) -> Self {
        let mut by_name: HashMap<&'s str, (usize, usize)> =
            HashMap::with_capacity(schema.fields().len());
        for (i, f) in schema.fields().iter().enumerate() {
            by_name.entry(f.name().as_str()).or_insert((i, 0)).1 += 1;
        }
        FieldNames { schema, by_name }
    }

    fn find(&self, name: &str, path: &str) -> Result<&'s arrow::datatypes::Field> {
        match self.by_name.get(name) {
            None => Err(Error::Schema(format!(
                "column '{name}' not found in {path}"
            ))),
            Some(&(i, 1)) => Ok(self.schema.field(i)),
            Some(&(_, n)) => Err(Error::Schema(format!(
                "column '{name}' appears {n} times in {path}; columns must have distinct names"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::column::DType;

    fn list(name: &str, dt: DataType, nullable: bool) -> DataType {
        DataType::List(Arc::new(Field::new(name, dt, nullable)))
    }

    fn plan_of(dt: DataType, dtype: Option<DType>) -> ColumnPlan {
        let mut spec = ColumnSpec::plain("x");
        spec.dtype = dtype;
        ColumnPlan::resolve(&spec, &Field::new("x", dt, true)).unwrap()
    }

    #[test]
    fn blame_names_the_column_that_fails_alone() {
        let bad = |names: &'static [&'static str]| move |p: &&str| names.contains(p);
        // A column chunk of its own: the only one, or the first failing.
        assert_eq!(blame(&["a"], false, |_| unreachable!()), Some(&"a"));
        assert_eq!(blame(&["a", "b", "c"], false, bad(&["b", "c"])), Some(&"b"));
        assert_eq!(blame(&["a", "b"], false, bad(&[])), None);
        // Shared bytes: named only when another column decodes alone; one alone is not tried.
        assert_eq!(blame(&["a"], true, |_| unreachable!()), None);
        assert_eq!(blame(&["a", "b", "c"], true, bad(&["c"])), Some(&"c"));
        assert_eq!(blame(&["a", "b"], true, bad(&["a", "b"])), None);
        let e = Error::corrupt("f.orc", "Bad stream").in_column(|| Some("id"));
        assert_eq!(e.to_string(), "cannot read f.orc: column 'id': bad stream");
        let os = Error::Os {
            path: "f".into(),
            errno: 5,
            msg: "i/o error".into(),
        };
        assert_eq!(
            os.in_column(|| unreachable!()).to_string(),
            "cannot read f: i/o error"
        );
        let named = Error::corrupt("f.orc", "column 's' claims 9 values").in_column(|| None);
        assert_eq!(
            named.to_string(),
            "cannot read f.orc: column 's' claims 9 values"
        );
    }

    #[test]
    fn other_number_types_in_later_files_need_a_dtype() {
        let later = |first: &ColumnPlan, dt: DataType| {
            file_plan(first, &Field::new("x", dt, true), "b.parquet", "a.parquet")
        };
        let err = later(&plan_of(DataType::Int32, None), DataType::Int64).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column 'x' has type Int64 in b.parquet, but Int32 in a.parquet; \
             give Column('x', dtype=...) to read both as one type"
        );
        let first = plan_of(DataType::Int32, Some(DType::I64));
        let own = later(&first, DataType::Int64).unwrap();
        assert_eq!((own.leaf, own.out), (Leaf::Number(DType::I64), DType::I64));
        let own = later(&first, DataType::Float64).unwrap();
        assert_eq!((own.leaf, own.out), (Leaf::Number(DType::F64), DType::I64));
        let lists = plan_of(list("item", DataType::Float32, true), Some(DType::F64));
        let own = later(&lists, list("element", DataType::Float64, true)).unwrap();
        assert_eq!((own.list_levels, own.out), (1, DType::F64));
        // Another layout, or strings, stay mismatches whatever the dtype.
        for dt in [list("item", DataType::Int64, true), DataType::Utf8] {
            let err = later(&first, dt).unwrap_err().to_string();
            assert!(err.ends_with("but Int32 in a.parquet"), "{err}");
        }
    }

    #[test]
    fn logical_types_ignore_item_names_and_encodings() {
        let parquet = list("element", DataType::Int64, true);
        let orc = list("item", DataType::Int64, false);
        assert_eq!(logical(&parquet), logical(&orc));
        let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::LargeUtf8));
        assert_eq!(logical(&dict), DataType::Utf8);
        assert_ne!(
            logical(&parquet),
            logical(&list("item", DataType::Int32, true))
        );
        assert_ne!(logical(&DataType::Utf8), logical(&DataType::Binary));
        let num_dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Int64));
        assert_eq!(logical(&num_dict), DataType::Int64);
    }
}
