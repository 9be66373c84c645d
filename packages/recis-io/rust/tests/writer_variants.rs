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
    let options = Options {
        batch_size: batch,
        drop_last: false,
        sharding: Sharding {
            shuffle: false,
            seed: 0,
            window: 8,
            shard: 0,
            shards: 1,
        },
        epochs: 1,
        pack: false,
        threads: 2,
        prefetch: 1,
    };
    let mut reader = Reader::new(Arc::new(src), options).unwrap();
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
