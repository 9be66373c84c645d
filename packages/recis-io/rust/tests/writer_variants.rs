//! Files written by arrow-rs with writer options other than the defaults (data page v2, page
//! indexes, bloom filters, plain pages, many small pages, every codec, other encodings) pass
//! the page-header checks and read back the values written.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use _recis_io::core::column::{ColumnSpec, Fill};
use _recis_io::core::plan::Sharding;
use _recis_io::core::reader::{Options, Reader};
use _recis_io::core::source::{Format, Source};
use arrow::array::{ArrayRef, Float64Array, Int64Array, ListArray, RecordBatch, StringArray};
use arrow::datatypes::Int64Type;
use parquet::arrow::ArrowWriter;
use parquet::basic::{BrotliLevel, Compression, Encoding, GzipLevel, ZstdLevel};
use parquet::file::properties::{
    BloomFilterPosition, EnabledStatistics, WriterProperties, WriterPropertiesBuilder,
    WriterVersion,
};
use parquet::schema::types::ColumnPath;

const ROWS: i64 = 300;

/// One row as read: id, float (NaN for null), string bytes, list.
#[derive(Debug, PartialEq)]
struct Row(i64, u64, Vec<u8>, Vec<i64>);

fn expected() -> Vec<Row> {
    (0..ROWS)
        .map(|i| {
            let f = if i % 7 == 3 { f64::NAN } else { i as f64 / 4.0 };
            let s = if i % 5 == 1 {
                Vec::new()
            } else {
                format!("v{}", i % 17).into_bytes()
            };
            let l = if i % 11 == 4 {
                Vec::new()
            } else {
                (0..i % 4).map(|j| i * 10 + j).collect()
            };
            Row(i, f.to_bits(), s, l)
        })
        .collect()
}

fn write(path: &Path, props: WriterProperties) {
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..ROWS));
    let floats: ArrayRef = Arc::new(Float64Array::from_iter(
        (0..ROWS).map(|i| (i % 7 != 3).then_some(i as f64 / 4.0)),
    ));
    let strings: ArrayRef = Arc::new(StringArray::from_iter(
        (0..ROWS).map(|i| (i % 5 != 1).then(|| format!("v{}", i % 17))),
    ));
    let lists: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(
        (0..ROWS).map(|i| {
            (i % 11 != 4).then(|| (0..i % 4).map(|j| Some(i * 10 + j)).collect::<Vec<_>>())
        }),
    ));
    let batch =
        RecordBatch::try_from_iter([("id", ids), ("f", floats), ("s", strings), ("l", lists)])
            .unwrap();
    let mut w =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    // Written in pieces, so the writer's per-batch limits cut pages.
    for start in (0..ROWS as usize).step_by(37) {
        w.write(&batch.slice(start, 37.min(ROWS as usize - start)))
            .unwrap();
    }
    w.close().unwrap();
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// One unshuffled, unsharded epoch in batches of `batch` rows, decoded by `threads` threads.
fn in_order(batch: usize, threads: usize) -> Options {
    Options {
        batch_size: batch,
        drop_last: false,
        sharding: Sharding {
            shuffle: false,
            seed: 0,
            window: 8,
            shard: 0,
            shards: 1,
            even: true,
        },
        epochs: 1,
        pack: false,
        threads,
        prefetch: 1,
    }
}

fn read(path: &Path, batch: usize) -> (Vec<Row>, Vec<usize>) {
    let mut s = ColumnSpec::plain("s");
    s.fill = Some(Fill::Text(Vec::new()));
    let specs = [
        ColumnSpec::plain("id"),
        ColumnSpec::plain("f"),
        s,
        ColumnSpec::plain("l"),
    ];
    let src = Source::open(
        &[(path.to_string_lossy().into_owned(), Format::Parquet)],
        &specs,
    )
    .unwrap();
    let mut reader = Reader::new(Arc::new(src), in_order(batch, 2)).unwrap();
    let (mut rows, mut sizes) = (Vec::new(), Vec::new());
    while let Some(layout) = reader.prepare_next().unwrap() {
        let mut buf = vec![0u8; layout.nbytes];
        let layout = reader.fill_pending(&mut buf).unwrap();
        let c = &layout.columns;
        let ids = i64s(&buf[c[0].values_at..][..c[0].values_len * 8]);
        let floats = i64s(&buf[c[1].values_at..][..c[1].values_len * 8]);
        let text = &buf[c[2].values_at..][..c[2].values_len];
        let text_at = i64s(&buf[c[2].offsets[0].0..][..c[2].offsets[0].1 * 8]);
        let items = i64s(&buf[c[3].values_at..][..c[3].values_len * 8]);
        let items_at = i64s(&buf[c[3].offsets[0].0..][..c[3].offsets[0].1 * 8]);
        for r in 0..layout.rows {
            let (a, b) = (text_at[r] as usize, text_at[r + 1] as usize);
            let (x, y) = (items_at[r] as usize, items_at[r + 1] as usize);
            // Every NaN (a null read without fill) as the one NaN the expected rows hold.
            let f = f64::from_bits(floats[r] as u64);
            let f = if f.is_nan() { f64::NAN } else { f };
            rows.push(Row(
                ids[r],
                f.to_bits(),
                text[a..b].to_vec(),
                items[x..y].to_vec(),
            ));
        }
        sizes.push(layout.rows);
    }
    (rows, sizes)
}

fn variants() -> Vec<(&'static str, WriterPropertiesBuilder)> {
    let b = WriterProperties::builder;
    let v2 = || b().set_writer_version(WriterVersion::PARQUET_2_0);
    let mut out = vec![
        ("default", b()),
        ("v2", v2()),
        ("v2 plain", v2().set_dictionary_enabled(false)),
        ("v1 plain", b().set_dictionary_enabled(false)),
        (
            "page index",
            b().set_statistics_enabled(EnabledStatistics::Page),
        ),
        (
            "v2 page index",
            v2().set_statistics_enabled(EnabledStatistics::Page),
        ),
        (
            "no statistics",
            b().set_statistics_enabled(EnabledStatistics::None),
        ),
        (
            "page header statistics",
            b().set_write_page_header_statistics(true)
                .set_statistics_enabled(EnabledStatistics::Page),
        ),
        ("no offset index", b().set_offset_index_disabled(true)),
        ("bloom filters", b().set_bloom_filter_enabled(true)),
        (
            "bloom filters at the end",
            v2().set_bloom_filter_enabled(true)
                .set_bloom_filter_position(BloomFilterPosition::End)
                .set_max_row_group_row_count(Some(64)),
        ),
        (
            "small pages by rows",
            b().set_data_page_row_count_limit(3).set_write_batch_size(3),
        ),
        (
            "v2 small pages by rows",
            v2().set_data_page_row_count_limit(3)
                .set_write_batch_size(3),
        ),
        (
            "small pages by bytes",
            b().set_data_page_size_limit(64).set_write_batch_size(5),
        ),
        (
            "dictionary falls back to plain",
            b().set_dictionary_page_size_limit(16)
                .set_write_batch_size(5),
        ),
        (
            "v2 dictionary falls back to plain",
            v2().set_dictionary_page_size_limit(16)
                .set_write_batch_size(5),
        ),
        (
            "row groups of one row",
            b().set_max_row_group_row_count(Some(1)),
        ),
        (
            "row groups of 64 rows",
            v2().set_max_row_group_row_count(Some(64)),
        ),
        (
            "v2 pages left uncompressed",
            v2().set_compression(Compression::SNAPPY)
                .set_data_page_v2_compression_ratio_threshold(0.5),
        ),
        (
            "delta encodings",
            v2().set_dictionary_enabled(false)
                .set_column_encoding(ColumnPath::from("id"), Encoding::DELTA_BINARY_PACKED)
                .set_column_encoding(ColumnPath::from("s"), Encoding::DELTA_BYTE_ARRAY)
                .set_column_encoding(ColumnPath::from("l"), Encoding::DELTA_BINARY_PACKED)
                .set_column_encoding(ColumnPath::from("f"), Encoding::BYTE_STREAM_SPLIT),
        ),
        (
            "delta length byte array",
            b().set_dictionary_enabled(false)
                .set_column_encoding(ColumnPath::from("s"), Encoding::DELTA_LENGTH_BYTE_ARRAY),
        ),
        ("no path in schema", b().set_write_path_in_schema(false)),
    ];
    for c in [
        Compression::UNCOMPRESSED,
        Compression::SNAPPY,
        Compression::GZIP(GzipLevel::try_new(9).unwrap()),
        Compression::LZ4,
        Compression::LZ4_RAW,
        Compression::ZSTD(ZstdLevel::try_new(19).unwrap()),
        Compression::BROTLI(BrotliLevel::try_new(11).unwrap()),
    ] {
        out.push(("compression v1", b().set_compression(c)));
        out.push(("compression v2", v2().set_compression(c)));
    }
    out
}

#[test]
fn writer_variants_read_back_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let want = expected();
    for (i, (name, props)) in variants().into_iter().enumerate() {
        let path = dir.path().join(format!("v{i}.parquet"));
        write(&path, props.build());
        for batch in [7, 1000] {
            let (rows, sizes) = read(&path, batch);
            let n = ROWS as usize;
            let want_sizes: Vec<usize> = (0..n).step_by(batch).map(|s| batch.min(n - s)).collect();
            assert_eq!(sizes, want_sizes, "{name}");
            assert_eq!(rows, want, "{name} ({i}), batch {batch}");
        }
    }
}

/// Per column of `names` (each a list of int64), the rows read, in batches of `batch` rows.
fn read_lists(path: &Path, names: &[&str], batch: usize) -> Vec<Vec<Vec<i64>>> {
    let specs: Vec<ColumnSpec> = names.iter().map(|n| ColumnSpec::plain(n)).collect();
    let src = Source::open(
        &[(path.to_string_lossy().into_owned(), Format::Parquet)],
        &specs,
    )
    .unwrap();
    let mut reader = Reader::new(Arc::new(src), in_order(batch, 1)).unwrap();
    let mut out = vec![Vec::new(); names.len()];
    while let Some(layout) = reader.prepare_next().unwrap() {
        let mut buf = vec![0u8; layout.nbytes];
        let layout = reader.fill_pending(&mut buf).unwrap();
        for (c, rows) in layout.columns.iter().zip(&mut out) {
            let items = i64s(&buf[c.values_at..][..c.values_len * 8]);
            let at = i64s(&buf[c.offsets[0].0..][..c.offsets[0].1 * 8]);
            rows.extend(
                (0..layout.rows).map(|r| items[at[r] as usize..at[r + 1] as usize].to_vec()),
            );
        }
    }
    out
}

#[test]
fn legacy_list_layouts_read_as_lists() {
    use parquet::data_type::Int64Type as Int64;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    // Two-level lists (older parquet-mr, Hive), a bare repeated field (protobuf and Thrift
    // writers) and a three-level list with other names (Spark's legacy format).
    let schema = parse_message_type(
        "message m {
            optional group two (LIST) { repeated int64 array; }
            repeated int64 bare;
            optional group spark (LIST) { repeated group bag { optional int64 array; } }
        }",
    )
    .unwrap();
    let rows = 50i64;
    let list = |i: i64| (0..i % 4).map(|j| i * 10 + j).collect::<Vec<_>>();
    let null = |i: i64| i % 7 == 3;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.parquet");
    let mut w = SerializedFileWriter::new(
        File::create(&path).unwrap(),
        Arc::new(schema),
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut group = w.next_row_group().unwrap();
    // (definition level of an empty list, of a value, whether rows can be null).
    for (empty, value, nullable) in [(1i16, 2i16, true), (0, 1, false), (1, 3, true)] {
        let (mut values, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..rows {
            let items = list(i);
            if nullable && null(i) {
                def.push(0);
                rep.push(0);
            } else if items.is_empty() {
                def.push(empty);
                rep.push(0);
            } else {
                for (k, &v) in items.iter().enumerate() {
                    values.push(v);
                    def.push(value);
                    rep.push(i16::from(k > 0));
                }
            }
        }
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<Int64>()
            .write_batch(&values, Some(&def), Some(&rep))
            .unwrap();
        col.close().unwrap();
    }
    group.close().unwrap();
    w.close().unwrap();
    let want: Vec<Vec<i64>> = (0..rows)
        .map(|i| if null(i) { Vec::new() } else { list(i) })
        .collect();
    let bare: Vec<Vec<i64>> = (0..rows).map(list).collect();
    for batch in [7, 1000] {
        let got = read_lists(&path, &["two", "bare", "spark"], batch);
        assert_eq!(got[0], want, "two-level list, batch {batch}");
        assert_eq!(got[1], bare, "bare repeated field, batch {batch}");
        assert_eq!(got[2], want, "legacy three-level list, batch {batch}");
    }
}
