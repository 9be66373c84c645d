//! A check of a Parquet column chunk's page headers before the parquet crate decodes them.
//!
//! The page reader trusts the counts and sizes in each page header: it decompresses a page into
//! a buffer of the uncompressed size its header claims, and the dictionary decoders make room
//! for as many values as the dictionary page header claims, before any of the page is read. A
//! dictionary page claiming two billion values asked for 16 GiB and the failed allocation
//! aborted the process; a page claiming two gigabytes uncompressed had that much zero-filled.
//! Each column chunk is in memory before it is decoded, so this module walks its page headers
//! (Thrift compact-protocol `PageHeader`s, each followed by its page's bytes) and refuses a
//! chunk whose headers cannot be right:
//!
//! - a header that does not parse, or runs past the end of the chunk;
//! - a page whose compressed size is negative or runs past the end of the chunk;
//! - a page whose uncompressed size is negative, or larger than both four times the whole
//!   chunk's (`total_uncompressed_size` of the column chunk's metadata, headers included) and
//!   [`PAGE_BYTES_TRUSTED`]: some writers record that total short (fastparquet leaves the
//!   dictionary page out) or as 0 (DuckDB before 0.6), so it bounds only what is far beyond it;
//! - a data page with a negative value count, or data pages whose value counts do not add up
//!   to the column chunk's `num_values`; a v2 data page with more nulls or rows than values, or
//!   more level bytes than page bytes;
//! - a dictionary page after another page, or with more values than its uncompressed size can
//!   hold (a fixed-width value takes its width, a boolean one bit, a byte array at least its
//!   four-byte length);
//! - a page of a type the format does not define.
//!
//! Only the headers are read (the pages' bytes are skipped), so the cost is a few dozen bytes
//! of parsing per page.

use parquet::basic::Type as PhysicalType;
use parquet::file::metadata::{ColumnChunkMetaData, RowGroupMetaData};

use super::chunks::Chunks;
use super::error::{Error, Result};
use super::parquet_footer::{Found, Walk, STRUCT};

// Page types (`PageType` of the format).
const DATA_PAGE: i32 = 0;
const INDEX_PAGE: i32 = 1;
const DICTIONARY_PAGE: i32 = 2;
const DATA_PAGE_V2: i32 = 3;

/// Fails when a page header of a column chunk `leaves` of row group `group` (all read into
/// `chunks`) cannot be right. `at` names the file and row group.
pub fn check(
    chunks: &Chunks,
    group: &RowGroupMetaData,
    leaves: impl IntoIterator<Item = usize>,
    at: &str,
) -> Result<()> {
    for leaf in leaves {
        let column = group.column(leaf);
        let (start, len) = column.byte_range();
        let data = chunks.bytes(start, len).ok_or_else(|| {
            Error::Internal(format!("column chunk at byte {start} was not read ({at})"))
        })?;
        let expect = Expect {
            values: column.num_values(),
            whole: column.uncompressed_size(),
            bits: value_bits(column),
        };
        check_chunk(expect, start, &data).map_err(|msg| {
            Error::corrupt(
                at,
                format!("column '{}': {msg}", column.column_path().string()),
            )
        })?;
    }
    Ok(())
}

/// The header fields the check reads. A count or size the header lacks is `None`.
#[derive(Debug, Default, PartialEq)]
struct Header {
    kind: Option<i32>,
    uncompressed: Option<i32>,
    compressed: Option<i32>,
    /// `num_values` of a v1 data page header.
    data: Option<i32>,
    /// `num_values` of a dictionary page header.
    dictionary: Option<i32>,
    v2: Option<V2>,
}

/// The counts of a v2 data page header.
#[derive(Debug, Default, PartialEq)]
struct V2 {
    values: Option<i32>,
    nulls: Option<i32>,
    rows: Option<i32>,
    def_bytes: Option<i32>,
    rep_bytes: Option<i32>,
}

/// Reads the page header at the start of `data`: the fields the check needs, and the header's
/// length in bytes.
fn parse(data: &[u8]) -> std::result::Result<(Header, usize), Found> {
    let mut walk = Walk { data, at: 0 };
    let mut h = Header::default();
    walk.fields(0, |w, id, kind| {
        match (id, kind) {
            (1, _) => h.kind = Some(w.i32(kind)?),
            (2, _) => h.uncompressed = Some(w.i32(kind)?),
            (3, _) => h.compressed = Some(w.i32(kind)?),
            (5, STRUCT) => h.data = Some(num_values(w)?),
            (7, STRUCT) => h.dictionary = Some(num_values(w)?),
            (8, STRUCT) => {
                let mut v2 = V2::default();
                w.fields(1, |w, id, kind| {
                    let slot = match id {
                        1 => &mut v2.values,
                        2 => &mut v2.nulls,
                        3 => &mut v2.rows,
                        5 => &mut v2.def_bytes,
                        6 => &mut v2.rep_bytes,
                        _ => return Ok(false),
                    };
                    *slot = Some(w.i32(kind)?);
                    Ok(true)
                })?;
                h.v2 = Some(v2);
            }
            // Fields of the wrong type: the decoder cannot read them either.
            (5 | 7 | 8, _) => return Err(Found::Unreadable),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((h, walk.at))
}

/// Field 1, `num_values`, of a data or dictionary page header.
fn num_values(walk: &mut Walk) -> std::result::Result<i32, Found> {
    let mut values = None;
    walk.fields(1, |w, id, kind| {
        if id != 1 {
            return Ok(false);
        }
        values = Some(w.i32(kind)?);
        Ok(true)
    })?;
    values.ok_or(Found::Unreadable)
}

/// Uncompressed page sizes up to this are taken as they are, whatever the column chunk's
/// metadata says of its total (pages are about 1 MiB in the writers' defaults).
const PAGE_BYTES_TRUSTED: i64 = 256 << 20;

/// What a column chunk's metadata says of its pages.
#[derive(Clone, Copy, Debug)]
struct Expect {
    /// Values (nulls included) of all its data pages (`num_values`).
    values: i64,
    /// Bytes of all its pages uncompressed, headers included (`total_uncompressed_size`).
    whole: i64,
    /// Bits a dictionary value takes at least.
    bits: i64,
}

/// Bits a dictionary value of column `column` takes at least, in the plain encoding of
/// dictionary pages.
fn value_bits(column: &ColumnChunkMetaData) -> i64 {
    match column.column_type() {
        PhysicalType::BOOLEAN => 1,
        PhysicalType::INT32 | PhysicalType::FLOAT => 32,
        PhysicalType::INT64 | PhysicalType::DOUBLE => 64,
        PhysicalType::INT96 => 96,
        // Each value is prefixed with its 4-byte length.
        PhysicalType::BYTE_ARRAY => 32,
        PhysicalType::FIXED_LEN_BYTE_ARRAY => {
            i64::from(column.column_descr().type_length().max(0)) * 8
        }
    }
}

/// Walks the page headers of the column chunk `data` (which starts at file byte `start`),
/// saying what is wrong with them when they do not fit `expect`.
fn check_chunk(expect: Expect, start: u64, data: &[u8]) -> std::result::Result<(), String> {
    let Expect {
        values: want_values,
        whole,
        bits,
    } = expect;
    let mut values: i64 = 0;
    let mut pages = 0usize;
    let mut at = 0usize;
    while at < data.len() {
        let byte = start + at as u64;
        let rest = &data[at..];
        let malformed = || {
            format!(
                "the page header at byte {byte} does not parse within the column chunk \
                 ({} bytes left in it)",
                rest.len()
            )
        };
        let (h, header_len) = parse(rest).map_err(|_| malformed())?;
        let (Some(kind), Some(uncompressed), Some(compressed)) =
            (h.kind, h.uncompressed, h.compressed)
        else {
            return Err(malformed());
        };
        let left = rest.len() - header_len;
        if compressed < 0 || compressed as usize > left {
            return Err(format!(
                "the page at byte {byte} claims {compressed} bytes, the column chunk has {left} \
                 left after its header"
            ));
        }
        let limit = whole.saturating_mul(4).max(PAGE_BYTES_TRUSTED);
        if uncompressed < 0 || i64::from(uncompressed) > limit {
            return Err(format!(
                "the page at byte {byte} claims {uncompressed} bytes uncompressed, more than \
                 four times the whole column chunk's {whole} and than {PAGE_BYTES_TRUSTED}"
            ));
        }
        let page_values = match kind {
            DATA_PAGE => Some(h.data.ok_or_else(malformed)?),
            DATA_PAGE_V2 => {
                let v2 = h.v2.as_ref().ok_or_else(malformed)?;
                let (Some(n), Some(nulls), Some(rows), Some(def), Some(rep)) =
                    (v2.values, v2.nulls, v2.rows, v2.def_bytes, v2.rep_bytes)
                else {
                    return Err(malformed());
                };
                if !(0..=n).contains(&nulls) || !(0..=n).contains(&rows) {
                    return Err(format!(
                        "the data page at byte {byte} claims {nulls} nulls and {rows} rows in \
                         {n} values"
                    ));
                }
                if def < 0 || rep < 0 || i64::from(def) + i64::from(rep) > i64::from(compressed) {
                    return Err(format!(
                        "the data page at byte {byte} claims {def} + {rep} bytes of levels, the \
                         page has {compressed} bytes"
                    ));
                }
                Some(n)
            }
            DICTIONARY_PAGE => {
                let n = h.dictionary.ok_or_else(malformed)?;
                if pages > 0 {
                    return Err(format!(
                        "the dictionary page at byte {byte} is not the column chunk's first page"
                    ));
                }
                if n < 0 || i64::from(n) * bits > i64::from(uncompressed) * 8 {
                    return Err(format!(
                        "the dictionary page at byte {byte} claims {n} values, more than its \
                         {uncompressed} bytes can hold"
                    ));
                }
                None
            }
            INDEX_PAGE => None,
            other => return Err(format!("the page at byte {byte} has unknown type {other}")),
        };
        if let Some(n) = page_values {
            if n < 0 || i64::from(n) > want_values - values {
                return Err(format!(
                    "the data page at byte {byte} claims {n} values, more than the {} the \
                     column chunk's metadata leaves for it (of {want_values})",
                    (want_values - values).max(0)
                ));
            }
            values += i64::from(n);
        }
        pages += 1;
        at += header_len + compressed as usize;
    }
    if values != want_values {
        return Err(format!(
            "the data pages hold {values} values, the column chunk's metadata says {want_values}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compact-protocol i32 field with a delta header.
    fn field(delta: u8, value: i32) -> Vec<u8> {
        let mut out = vec![delta << 4 | 5];
        let mut z = ((value << 1) ^ (value >> 31)) as u32;
        loop {
            let low = (z & 0x7F) as u8;
            z >>= 7;
            if z == 0 {
                out.push(low);
                return out;
            }
            out.push(low | 0x80);
        }
    }

    /// A page header: type, sizes, then a sub-header (field `sub`) holding `num_values`.
    fn header(kind: i32, uncompressed: i32, compressed: i32, sub: u8, n: i32) -> Vec<u8> {
        let mut h = field(1, kind);
        h.extend(field(1, uncompressed));
        h.extend(field(1, compressed));
        h.push((sub - 3) << 4 | STRUCT);
        h.extend(field(1, n));
        h.extend([0, 0]);
        h
    }

    #[test]
    fn headers_are_parsed_and_their_length_found() {
        let h = header(DICTIONARY_PAGE, 40, 30, 7, 5);
        let (parsed, len) = parse(&[h.as_slice(), &[9; 30]].concat()).unwrap();
        assert_eq!(len, h.len());
        assert_eq!(
            parsed,
            Header {
                kind: Some(DICTIONARY_PAGE),
                uncompressed: Some(40),
                compressed: Some(30),
                dictionary: Some(5),
                ..Header::default()
            }
        );
        // A bool field and a skipped long-form field between known ones.
        let mut h = field(1, DATA_PAGE);
        h.extend([0x11]); // field 2: bool true (not an i32: refused below)
        assert_eq!(parse(&h), Err(Found::Unreadable));
        let mut h = field(1, DATA_PAGE);
        h.extend([0x08, 0x12, 0x01, b'x']); // field 9 (long form): binary "x"
        h.push(0);
        assert_eq!(parse(&h).unwrap().0.kind, Some(DATA_PAGE));
    }

    #[test]
    fn a_header_cut_short_does_not_parse() {
        let h = header(DATA_PAGE, 40, 30, 5, 5);
        assert_eq!(parse(&h[..h.len() - 2]), Err(Found::Unreadable));
        // An i32 field whose varint does not fit 32 bits.
        assert_eq!(
            parse(&[0x15, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0]),
            Err(Found::Unreadable)
        );
    }

    /// A chunk of `pages` (header, body length) with zeroed bodies.
    fn chunk(pages: &[(Vec<u8>, usize)]) -> Vec<u8> {
        pages
            .iter()
            .flat_map(|(h, body)| h.iter().copied().chain(std::iter::repeat_n(0, *body)))
            .collect()
    }

    const INT64: Expect = Expect {
        values: 30,
        whole: 1000,
        bits: 64,
    };

    #[test]
    fn a_sound_chunk_passes() {
        let data = chunk(&[
            (header(DICTIONARY_PAGE, 80, 80, 7, 10), 80),
            (header(DATA_PAGE, 20, 12, 5, 20), 12),
            (header(DATA_PAGE, 10, 10, 5, 10), 10),
        ]);
        assert_eq!(check_chunk(INT64, 4, &data), Ok(()));
        assert_eq!(check_chunk(Expect { values: 0, ..INT64 }, 4, &[]), Ok(()));
    }

    #[test]
    fn counts_and_sizes_that_cannot_be_right_are_named() {
        let check = |pages: &[(Vec<u8>, usize)]| check_chunk(INT64, 4, &chunk(pages)).unwrap_err();
        let dict = |n: i32| (header(DICTIONARY_PAGE, 80, 80, 7, n), 80);
        let data = |n: i32| (header(DATA_PAGE, 20, 12, 5, n), 12);
        assert_eq!(
            check(&[dict(i32::MAX), data(30)]),
            "the dictionary page at byte 4 claims 2147483647 values, more than its 80 bytes can \
             hold"
        );
        assert_eq!(
            check(&[dict(11), data(30)]),
            "the dictionary page at byte 4 claims 11 values, more than its 80 bytes can hold"
        );
        assert!(check(&[dict(-1), data(30)]).contains("claims -1 values"));
        assert_eq!(
            check(&[data(10), dict(10)]),
            "the dictionary page at byte 27 is not the column chunk's first page"
        );
        assert_eq!(
            check(&[data(20), data(20)]),
            "the data page at byte 27 claims 20 values, more than the 10 the column chunk's \
             metadata leaves for it (of 30)"
        );
        assert_eq!(
            check(&[data(20)]),
            "the data pages hold 20 values, the column chunk's metadata says 30"
        );
        assert_eq!(
            check(&[(header(DATA_PAGE, i32::MAX, 12, 5, 30), 12)]),
            "the page at byte 4 claims 2147483647 bytes uncompressed, more than four times \
             the whole column chunk's 1000 and than 268435456"
        );
        // A chunk total recorded short (or as 0) still takes pages up to the trusted size.
        for whole in [1000, 0] {
            let short = Expect { whole, ..INT64 };
            let pages = chunk(&[(header(DATA_PAGE, 1 << 20, 12, 5, 30), 12)]);
            assert_eq!(check_chunk(short, 4, &pages), Ok(()));
        }
        assert!(check(&[(header(DATA_PAGE, -1, 12, 5, 30), 12)]).contains("claims -1 bytes"));
        assert_eq!(
            check(&[(header(DATA_PAGE, 20, 13, 5, 30), 12)]),
            "the page at byte 4 claims 13 bytes, the column chunk has 12 left after its header"
        );
        assert!(check(&[(header(DATA_PAGE, 20, -1, 5, 30), 12)]).contains("claims -1 bytes"));
        assert_eq!(
            check(&[(header(7, 20, 12, 5, 30), 12)]),
            "the page at byte 4 has unknown type 7"
        );
        // A data page whose header holds a dictionary page's sub-header.
        assert!(
            check(&[(header(DATA_PAGE, 20, 12, 7, 30), 12)]).starts_with(
                "the page header at byte 4 does not parse within the column chunk (23 bytes left"
            )
        );
        // A header cut by the end of the chunk.
        let mut cut = chunk(&[data(30)]);
        cut.truncate(5);
        assert!(check_chunk(INT64, 4, &cut)
            .unwrap_err()
            .starts_with("the page header at byte 4 does not parse"));
    }

    #[test]
    fn v2_pages_count_nulls_rows_and_level_bytes() {
        let v2 = |n: i32, nulls: i32, rows: i32, def: i32| {
            let mut h = field(1, DATA_PAGE_V2);
            h.extend(field(1, 20));
            h.extend(field(1, 12));
            h.push(5 << 4 | STRUCT); // field 8
            for (delta, v) in [(1, n), (1, nulls), (1, rows), (1, 0), (1, def), (1, 0)] {
                h.extend(field(delta, v));
            }
            h.extend([0, 0]);
            (h, 12)
        };
        let check = |page| check_chunk(INT64, 0, &chunk(&[page]));
        assert_eq!(check(v2(30, 3, 30, 2)), Ok(()));
        assert_eq!(
            check(v2(30, 31, 30, 2)).unwrap_err(),
            "the data page at byte 0 claims 31 nulls and 30 rows in 30 values"
        );
        assert_eq!(
            check(v2(30, 0, -1, 2)).unwrap_err(),
            "the data page at byte 0 claims 0 nulls and -1 rows in 30 values"
        );
        assert_eq!(
            check(v2(30, 0, 30, 13)).unwrap_err(),
            "the data page at byte 0 claims 13 + 0 bytes of levels, the page has 12 bytes"
        );
    }

    #[test]
    fn dictionary_values_of_each_type_take_their_width() {
        let strings = Expect { bits: 32, ..INT64 };
        let page = |n| {
            chunk(&[
                (header(DICTIONARY_PAGE, 80, 80, 7, n), 80),
                (header(DATA_PAGE, 4, 4, 5, 30), 4),
            ])
        };
        assert_eq!(check_chunk(strings, 0, &page(20)), Ok(()));
        assert!(check_chunk(strings, 0, &page(21)).is_err());
        let bools = Expect { bits: 1, ..INT64 };
        assert_eq!(check_chunk(bools, 0, &page(640)), Ok(()));
        assert!(check_chunk(bools, 0, &page(641)).is_err());
    }
}
