//! End-to-end tests of the core: write Parquet files, read them back through the reader.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use _recis_io::core::column::ColumnSpec;
use _recis_io::core::plan::Sharding;
use _recis_io::core::reader::{Options, Reader};
use _recis_io::core::source::{Format, Source};
use _recis_io::core::Error;
use arrow::array::{ArrayRef, Int64Array, ListArray, RecordBatch};
use arrow::datatypes::Int64Type;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

fn write_file(path: &Path, start: i64, rows: i64, group: usize) {
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(start..start + rows));
    let lists: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(
        (start..start + rows).map(|i| Some((0..i % 3).map(Some).collect::<Vec<_>>())),
    ));
    let batch = RecordBatch::try_from_iter([("id", ids), ("seq", lists)]).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let mut w =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn options(batch: usize, shuffle: bool, shard: usize, shards: usize, threads: usize) -> Options {
    Options {
        batch_size: batch,
        drop_last: false,
        sharding: Sharding {
            shuffle,
            seed: 4,
            window: 8,
            shard,
            shards,
            even: true,
        },
        epochs: 1,
        pack: false,
        threads,
        prefetch: 1,
    }
}

/// Reads every batch; returns the ids and the per-batch row counts.
fn read_all(reader: &mut Reader) -> (Vec<i64>, Vec<usize>) {
    let mut ids = Vec::new();
    let mut sizes = Vec::new();
    while let Some(layout) = reader.prepare_next().unwrap() {
        let mut buf = vec![0u8; layout.nbytes];
        let layout = reader.fill_pending(&mut buf).unwrap();
        let col = &layout.columns[0];
        let bytes = &buf[col.values_at..col.values_at + col.values_len * 8];
        ids.extend(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap())),
        );
        sizes.push(layout.rows);
    }
    (ids, sizes)
}

fn source(dir: &Path) -> Arc<Source> {
    write_file(&dir.join("a.parquet"), 0, 50, 16);
    write_file(&dir.join("b.parquet"), 50, 23, 7);
    let paths = ["a.parquet", "b.parquet"]
        .map(|n| (dir.join(n).to_string_lossy().into_owned(), Format::Parquet));
    Arc::new(Source::open(&paths, &[ColumnSpec::plain("id"), ColumnSpec::plain("seq")]).unwrap())
}

#[test]
fn batches_are_full_across_files_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let mut reader = Reader::new(src, options(10, false, 0, 1, 3)).unwrap();
    let (ids, sizes) = read_all(&mut reader);
    assert_eq!(ids, (0..73).collect::<Vec<_>>());
    assert_eq!(sizes, vec![10, 10, 10, 10, 10, 10, 10, 3]);
}

#[test]
fn resume_from_the_cursor_is_exact_with_shuffle() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let mut full = Reader::new(src.clone(), options(6, true, 1, 2, 2)).unwrap();
    let (all, _) = read_all(&mut full);
    assert_eq!(all.len(), 36);
    for cut in [0, 1, 3, 6] {
        let mut first = Reader::new(src.clone(), options(6, true, 1, 2, 1)).unwrap();
        let mut head = Vec::new();
        for _ in 0..cut {
            let layout = first.prepare_next().unwrap().unwrap();
            let mut buf = vec![0u8; layout.nbytes];
            let layout = first.fill_pending(&mut buf).unwrap();
            let c = &layout.columns[0];
            head.extend(
                buf[c.values_at..c.values_at + c.values_len * 8]
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap())),
            );
        }
        let (epoch, pos) = first.cursor();
        let mut second = Reader::new(src.clone(), options(6, true, 1, 2, 3)).unwrap();
        second.seek(epoch, pos).unwrap();
        let (tail, _) = read_all(&mut second);
        head.extend(tail);
        assert_eq!(head, all, "cut at batch {cut}");
    }
}

#[test]
fn missing_and_corrupt_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir
        .path()
        .join("none.parquet")
        .to_string_lossy()
        .into_owned();
    let err = Source::open(&[(missing, Format::Parquet)], &[])
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotFound(_)));
    let bad = dir.path().join("bad.parquet");
    std::fs::write(&bad, b"PAR1 not really").unwrap();
    let err = Source::open(
        &[(bad.to_string_lossy().into_owned(), Format::Parquet)],
        &[],
    )
    .err()
    .unwrap();
    assert!(matches!(err, Error::Corrupt { .. }));
    assert!(err.to_string().contains("bad.parquet"));
}

/// `ids` and `seq` values of a batch's buffer, as bytes.
fn batch_bytes(buf: &[u8], layout: &_recis_io::core::assemble::BatchLayout) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for c in &layout.columns {
        out.push(buf[c.values_at..c.values_at + c.values_len * 8].to_vec());
        for &(at, n) in &c.offsets {
            out.push(buf[at..at + n * 8].to_vec());
        }
    }
    out
}

#[test]
fn grouped_batches_equal_batches_one_by_one() {
    // Enough rows that shuffled batches are read in source order (more than 64 pieces), so
    // groups take the joint gather; window 8 of `options` gives room for multi-row pieces.
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("a.parquet"), 0, 1500, 400);
    write_file(&dir.path().join("b.parquet"), 1500, 1001, 333);
    let paths = ["a.parquet", "b.parquet"].map(|n| {
        (
            dir.path().join(n).to_string_lossy().into_owned(),
            Format::Parquet,
        )
    });
    let src = Arc::new(
        Source::open(&paths, &[ColumnSpec::plain("id"), ColumnSpec::plain("seq")]).unwrap(),
    );
    for shuffle in [true, false] {
        let mut opts = options(150, shuffle, 0, 1, 2);
        opts.sharding.window = 1000;
        opts.epochs = 2;
        let mut one = Reader::new(src.clone(), opts).unwrap();
        let mut want = Vec::new();
        while let Some((buf, layout)) = one.next_buffer().unwrap() {
            let bytes = &buf.slab().as_bytes()[..layout.nbytes];
            want.push((batch_bytes(bytes, &layout), one.cursor()));
        }
        assert_eq!(want.len(), 2 * 2501usize.div_ceil(150));
        // Groups of 1, 3 and 8 batches, and of 8 capped by bytes to two batches (of about 3.7 kB).
        for (max, max_bytes) in [(1, usize::MAX), (3, usize::MAX), (8, usize::MAX), (8, 8000)] {
            let mut grouped = Reader::new(src.clone(), opts).unwrap();
            let mut got = Vec::new();
            let mut out = Vec::new();
            loop {
                grouped.next_buffers(max, max_bytes, &mut out).unwrap();
                if out.is_empty() {
                    break;
                }
                assert!(out.len() <= max);
                for (buf, layout, cursor) in out.drain(..) {
                    let bytes = &buf.slab().as_bytes()[..layout.nbytes];
                    got.push((batch_bytes(bytes, &layout), cursor));
                }
            }
            assert_eq!(
                got, want,
                "shuffle {shuffle}, groups of {max} up to {max_bytes} bytes"
            );
        }
    }
}
