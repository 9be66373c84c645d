//! A check of an ORC stripe's length streams before orc-rust decodes it.
//!
//! orc-rust sizes its buffers from values it reads out of the file: a list (or map) column
//! decodes a batch of rows' lengths and allocates their sum for the child values at once, and a
//! dictionary-encoded string column allocates its dictionary size from the stripe footer. A
//! corrupt length stream that claims billions of values therefore asks for more memory than
//! the machine has, and a failed allocation aborts the process instead of returning an error.
//! This module decodes those lengths first (the integer run-length encodings of the ORC
//! specification, version 1 and 2) and rejects a stripe whose batches could not fit in memory.
//! Anything it cannot make sense of is left for orc-rust to report, so it only ever adds an
//! error, and only for buffers larger than the machine's memory, which no file can need.

use std::fs::File;
use std::io::Read;
use std::sync::OnceLock;

use bytes::Bytes;
use orc_rust::compression::Decompressor;
use orc_rust::reader::metadata::FileMetadata;
use orc_rust::schema::DataType;

use super::error::{Error, Result};
use super::orc_types::{fields, read_at, varint_from, Value};

/// Largest stripe footer read (decompressed or not).
const MAX_FOOTER: u64 = 64 << 20;

/// Bytes orc-rust keeps per length or child value while decoding a batch: lengths are `i64`
/// and no child value is narrower than a byte, so this is a lower bound of what it allocates.
const BYTES_PER_VALUE: u128 = 8;

/// Stream kinds and column encodings of the ORC specification used here.
const LENGTH: u64 = 2;
const DICTIONARY: u64 = 1;
const DICTIONARY_V2: u64 = 3;
const DIRECT_V2: u64 = 2;

/// Fails when a stripe of `meta` lies outside the file's `len` bytes, or the stripes' rows do
/// not add up to the file's: orc-rust reads a stripe's parts into buffers of the lengths
/// the file claims (a corrupt length of exabytes aborts the process), and skips a stripe
/// whose row count was damaged to 0. `path` names the file in the error.
pub fn check_layout(meta: &FileMetadata, len: u64, path: &str) -> Result<()> {
    let mut rows: u64 = 0;
    for (i, s) in meta.stripe_metadatas().iter().enumerate() {
        let end = [s.index_length(), s.data_length(), s.footer_length()]
            .into_iter()
            .try_fold(s.offset(), u64::checked_add);
        if end.is_none_or(|end| end > len) {
            return Err(Error::corrupt(
                path,
                format!(
                    "stripe {i} claims {} index, {} data and {} footer bytes from byte {}, \
                     beyond the file's {len} bytes",
                    s.index_length(),
                    s.data_length(),
                    s.footer_length(),
                    s.offset()
                ),
            ));
        }
        rows = rows.saturating_add(s.number_of_rows());
    }
    if rows != meta.number_of_rows() {
        return Err(Error::corrupt(
            path,
            format!(
                "the stripes hold {rows} rows, the file footer says {}",
                meta.number_of_rows()
            ),
        ));
    }
    Ok(())
}

/// Fails when a list, map or dictionary column of `roots` in stripe `stripe` of `meta` claims
/// more values in one batch of `batch_rows` rows than this machine's memory can hold, or a
/// stream of the stripe claims more bytes than the stripe holds. `at` names the file in the
/// error.
pub fn check(
    file: &File,
    meta: &FileMetadata,
    stripe: usize,
    roots: &[&str],
    batch_rows: usize,
    at: &str,
) -> Result<()> {
    let Some(info) = meta.stripe_metadatas().get(stripe) else {
        return Ok(());
    };
    let columns: Vec<(&str, &DataType)> = (meta.root_data_type().children().iter())
        .filter(|c| roots.contains(&c.name()))
        .map(|c| (c.name(), c.data_type()))
        .collect();
    if info.footer_length() > MAX_FOOTER {
        return Ok(());
    }
    let Some(raw) = read_at(file, info.footer_offset(), info.footer_length()) else {
        return Ok(());
    };
    let Some(footer) = decompress(raw, meta, MAX_FOOTER) else {
        return Ok(());
    };
    let Some(footer) = StripeFooter::parse(&footer, info.offset()) else {
        return Ok(());
    };
    // The streams lie end to end over the stripe's index and data bytes.
    let body = info.index_length().saturating_add(info.data_length());
    let mut used: u64 = 0;
    for s in &footer.streams {
        used = used.saturating_add(s.length);
        if used > body {
            return Err(Error::corrupt(
                at,
                format!(
                    "a stream of column {} claims {} bytes, beyond the \
                     stripe's {body} bytes of index and data",
                    s.column, s.length
                ),
            ));
        }
    }
    if !columns.iter().any(|(_, t)| sizes_from_file(t)) {
        return Ok(());
    }
    let stripe = Stripe {
        file,
        meta,
        footer: &footer,
        limit: memory_limit(),
        at,
    };
    let rows = Level {
        values: info.number_of_rows(),
        batch: batch_rows as u128,
    };
    for (name, data_type) in columns {
        stripe.column(name, data_type, rows)?;
    }
    Ok(())
}

/// Whether orc-rust sizes a buffer of `t` (or of a type inside it) from the file's contents.
fn sizes_from_file(t: &DataType) -> bool {
    match t {
        DataType::List { .. } | DataType::Map { .. } => true,
        DataType::String { .. }
        | DataType::Varchar { .. }
        | DataType::Char { .. }
        | DataType::Binary { .. } => true,
        DataType::Struct { children, .. } => {
            children.iter().any(|c| sizes_from_file(c.data_type()))
        }
        DataType::Union { variants, .. } => variants.iter().any(sizes_from_file),
        _ => false,
    }
}

/// How many values a column holds in the stripe, and at most in one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Level {
    values: u64,
    batch: u128,
}

struct Stripe<'a> {
    file: &'a File,
    meta: &'a FileMetadata,
    footer: &'a StripeFooter,
    limit: u128,
    at: &'a str,
}

impl Stripe<'_> {
    /// Checks column `name` of type `t`, whose parent holds `parent` values.
    fn column(&self, name: &str, t: &DataType, parent: Level) -> Result<()> {
        match t {
            DataType::List { child, .. } => {
                let level = self.lengths(name, t, parent)?;
                self.column(name, child, level)
            }
            DataType::Map { key, value, .. } => {
                let level = self.lengths(name, t, parent)?;
                self.column(name, key, level)?;
                self.column(name, value, level)
            }
            DataType::Struct { children, .. } => {
                (children.iter()).try_for_each(|c| self.column(name, c.data_type(), parent))
            }
            DataType::String { .. }
            | DataType::Varchar { .. }
            | DataType::Char { .. }
            | DataType::Binary { .. } => self.dictionary(name, t),
            _ => Ok(()),
        }
    }

    /// The values of the list or map column `t`'s children, from its length stream.
    fn lengths(&self, name: &str, t: &DataType, parent: Level) -> Result<Level> {
        let id = t.column_index();
        let Some(stream) = self.stream(id, LENGTH) else {
            return Ok(Level {
                values: 0,
                batch: 0,
            });
        };
        let v2 = self.footer.encoding(id).0 == DIRECT_V2;
        let window = parent.batch.min(u128::from(parent.values)).max(1);
        let sums = Sums::of(stream, v2, parent.values, window).map_err(|value| {
            Error::corrupt(
                self.at,
                format!("column '{name}' has a list length of {value}, beyond any size"),
            )
        })?;
        let needed = sums.batch * BYTES_PER_VALUE;
        if needed > self.limit {
            return Err(Error::corrupt(
                self.at,
                format!(
                    "column '{name}' claims {} values in {} rows, up to {} in one batch of \
                     {window} rows: more than the {} bytes of memory of this machine hold at \
                     {BYTES_PER_VALUE} bytes each, so its length stream is corrupt",
                    sums.total, parent.values, sums.batch, self.limit
                ),
            ));
        }
        Ok(Level {
            values: u64::try_from(sums.total).unwrap_or(u64::MAX),
            batch: sums.batch,
        })
    }

    fn dictionary(&self, name: &str, t: &DataType) -> Result<()> {
        check_dictionary(self.footer, t.column_index(), name, self.limit, self.at)
    }

    /// The decompressed bytes of column `id`'s stream of kind `kind`, read lazily.
    fn stream(&self, id: usize, kind: u64) -> Option<Decompressor> {
        let s = (self.footer.streams.iter()).find(|s| s.column == id as u64 && s.kind == kind)?;
        let raw = read_at(self.file, s.offset, s.length)?;
        Some(Decompressor::new(
            Bytes::from(raw),
            self.meta.compression(),
            vec![],
        ))
    }
}

/// A dictionary-encoded string column is decoded with its whole dictionary at once: fails
/// when column `id`'s dictionary size in `footer` could not fit in `limit` bytes.
fn check_dictionary(
    footer: &StripeFooter,
    id: usize,
    name: &str,
    limit: u128,
    at: &str,
) -> Result<()> {
    let (kind, size) = footer.encoding(id);
    if kind != DICTIONARY && kind != DICTIONARY_V2 {
        return Ok(());
    }
    let needed = u128::from(size) * BYTES_PER_VALUE;
    if needed > limit {
        return Err(Error::corrupt(
            at,
            format!(
                "column '{name}' claims a dictionary of {size} strings: more than the {limit} \
                 bytes of memory of this machine hold at {BYTES_PER_VALUE} bytes each, so its \
                 stripe footer is corrupt"
            ),
        ));
    }
    Ok(())
}

fn decompress(raw: Vec<u8>, meta: &FileMetadata, cap: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    Decompressor::new(Bytes::from(raw), meta.compression(), vec![])
        .take(cap + 1)
        .read_to_end(&mut out)
        .ok()?;
    (out.len() as u64 <= cap).then_some(out)
}

struct StreamInfo {
    kind: u64,
    column: u64,
    offset: u64,
    length: u64,
}

/// The parts of a `StripeFooter` message this check needs: its streams (field 1: kind 1,
/// column 2, length 3), placed one after the other from the stripe's start, and the column
/// encodings (field 2: kind 1, dictionary size 2).
struct StripeFooter {
    streams: Vec<StreamInfo>,
    encodings: Vec<(u64, u64)>,
}

impl StripeFooter {
    fn parse(footer: &[u8], start: u64) -> Option<Self> {
        let (mut streams, mut encodings, mut offset) = (Vec::new(), Vec::new(), start);
        for (field, value) in fields(footer)? {
            match (field, value) {
                (1, Value::Bytes(msg)) => {
                    let (mut kind, mut column, mut length) = (0, 0, 0);
                    for (f, v) in fields(msg)? {
                        match (f, v) {
                            (1, Value::Varint(v)) => kind = v,
                            (2, Value::Varint(v)) => column = v,
                            (3, Value::Varint(v)) => length = v,
                            _ => {}
                        }
                    }
                    streams.push(StreamInfo {
                        kind,
                        column,
                        offset,
                        length,
                    });
                    offset = offset.checked_add(length)?;
                }
                (2, Value::Bytes(msg)) => {
                    let (mut kind, mut size) = (0, 0);
                    for (f, v) in fields(msg)? {
                        match (f, v) {
                            (1, Value::Varint(v)) => kind = v,
                            (2, Value::Varint(v)) => size = v,
                            _ => {}
                        }
                    }
                    encodings.push((kind, size));
                }
                _ => {}
            }
        }
        Some(Self { streams, encodings })
    }

    /// Column `id`'s encoding kind and dictionary size (`DIRECT`, 0 when absent).
    fn encoding(&self, id: usize) -> (u64, u64) {
        self.encodings.get(id).copied().unwrap_or((0, 0))
    }
}

/// The physical memory of this machine in bytes (`MemTotal` of `/proc/meminfo`), or 1 TiB
/// where that cannot be read.
fn memory_limit() -> u128 {
    static LIMIT: OnceLock<u128> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            })
            .unwrap_or(1 << 40)
    })
}

/// What stops the decoding of a length stream.
#[derive(Debug, PartialEq)]
enum Malformed {
    /// A length above `i64::MAX`: orc-rust reads lengths as `i64`, so it would be negative.
    Negative(u64),
    /// The run-length encoding itself is broken: orc-rust reports that.
    Stream,
}

/// The sum of a length stream's values (`total`), and `batch`, a bound of the sum of any
/// `window` consecutive ones: each such window lies within two neighbouring aligned blocks of
/// `window` values, so the largest sum of two neighbouring blocks is at least every window's
/// sum and at most twice the largest, in constant memory.
#[derive(Debug, PartialEq)]
struct Sums {
    total: u128,
    batch: u128,
}

impl Sums {
    /// Decodes up to `count` unsigned values of `stream` (RLE version 2 if `v2`, else 1).
    fn of(stream: impl Read, v2: bool, count: u64, window: u128) -> std::result::Result<Self, u64> {
        let (mut total, mut seen) = (0u128, 0u64);
        let (mut block, mut previous, mut in_block, mut batch) = (0u128, 0u128, 0u128, 0u128);
        let mut add = |v: u64| -> std::result::Result<bool, Malformed> {
            if v > i64::MAX as u64 {
                return Err(Malformed::Negative(v));
            }
            total += u128::from(v);
            block += u128::from(v);
            in_block += 1;
            batch = batch.max(previous + block);
            if in_block == window {
                (previous, block, in_block) = (block, 0, 0);
            }
            seen += 1;
            Ok(seen < count)
        };
        if count > 0 {
            let mut runs = Runs {
                bytes: std::io::BufReader::new(stream).bytes(),
            };
            let more = if v2 {
                runs.for_each_v2(&mut add)
            } else {
                runs.for_each_v1(&mut add)
            };
            // A malformed run ends the values orc-rust would decode too; those before it count.
            if let Err(Malformed::Negative(value)) = more {
                return Err(value);
            }
        }
        Ok(Self { total, batch })
    }
}

/// Reads the runs of an unsigned integer RLE stream and hands each value to `f`, which
/// returns `Ok(false)` to stop. The end of the stream ends the decoding (`Ok`); a run cut
/// short or a malformed header is `Malformed::Stream`.
struct Runs<R: Read> {
    bytes: std::io::Bytes<R>,
}

type Visit<'a> = dyn FnMut(u64) -> std::result::Result<bool, Malformed> + 'a;

impl<R: Read> Runs<R> {
    fn byte(&mut self) -> std::result::Result<u8, Malformed> {
        match self.bytes.next() {
            Some(Ok(b)) => Ok(b),
            _ => Err(Malformed::Stream),
        }
    }

    fn varint(&mut self) -> std::result::Result<u64, Malformed> {
        varint_from(|| self.bytes.next()?.ok()).ok_or(Malformed::Stream)
    }

    /// Big-endian unsigned integer of `n` bytes.
    fn big_endian(&mut self, n: u32) -> std::result::Result<u64, Malformed> {
        let mut v = 0u64;
        for _ in 0..n {
            v = v << 8 | u64::from(self.byte()?);
        }
        Ok(v)
    }

    /// `n` values of `width` bits packed most significant bit first.
    fn packed(&mut self, n: usize, width: u32) -> std::result::Result<Vec<u64>, Malformed> {
        let mut out = Vec::with_capacity(n);
        let (mut acc, mut bits) = (0u128, 0u32);
        for _ in 0..n {
            while bits < width {
                acc = acc << 8 | u128::from(self.byte()?);
                bits += 8;
            }
            bits -= width;
            let mask = if width == 64 {
                u64::MAX
            } else {
                (1u64 << width) - 1
            };
            out.push((acc >> bits) as u64 & mask);
            acc &= (1u128 << bits) - 1;
        }
        Ok(out)
    }

    /// Version 1: a control byte `c`; `c >= 0` is a run of `c + 3` values from a delta byte
    /// and a base varint, `c < 0` is `-c` literal varints.
    fn for_each_v1(&mut self, f: &mut Visit<'_>) -> std::result::Result<(), Malformed> {
        loop {
            let Some(control) = self.bytes.next() else {
                return Ok(());
            };
            let control = control.map_err(|_| Malformed::Stream)? as i8;
            if control >= 0 {
                let delta = i64::from(self.byte()? as i8);
                let base = self.varint()?;
                for i in 0..i64::from(control) + 3 {
                    if !f(base.wrapping_add_signed(i * delta))? {
                        return Ok(());
                    }
                }
            } else {
                for _ in 0..-i32::from(control) {
                    if !f(self.varint()?)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Version 2: short repeat, direct, patched base and delta runs.
    fn for_each_v2(&mut self, f: &mut Visit<'_>) -> std::result::Result<(), Malformed> {
        loop {
            let Some(first) = self.bytes.next() else {
                return Ok(());
            };
            let first = first.map_err(|_| Malformed::Stream)?;
            let values = match first >> 6 {
                0 => {
                    let width = u32::from(first >> 3 & 7) + 1;
                    let value = self.big_endian(width)?;
                    vec![value; usize::from(first & 7) + 3]
                }
                1 => {
                    let width = bit_width(first >> 1 & 0x1f);
                    let n = self.run_length(first)?;
                    self.packed(n, width)?
                }
                2 => self.patched_base(first)?,
                _ => self.delta(first)?,
            };
            for v in values {
                if !f(v)? {
                    return Ok(());
                }
            }
        }
    }

    /// The 9-bit run length of a direct, patched base or delta header, plus one.
    fn run_length(&mut self, first: u8) -> std::result::Result<usize, Malformed> {
        Ok(((usize::from(first & 1) << 8) | usize::from(self.byte()?)) + 1)
    }

    fn patched_base(&mut self, first: u8) -> std::result::Result<Vec<u64>, Malformed> {
        let width = bit_width(first >> 1 & 0x1f);
        let n = self.run_length(first)?;
        let third = self.byte()?;
        let base_bytes = u32::from(third >> 5) + 1;
        let patch_width = bit_width(third & 0x1f);
        let fourth = self.byte()?;
        let gap_width = u32::from(fourth >> 5) + 1;
        let patches = usize::from(fourth & 0x1f);
        let raw = self.big_endian(base_bytes)?;
        let sign = 1u64 << (base_bytes * 8 - 1);
        let base = if raw & sign != 0 {
            -((raw & !sign) as i128)
        } else {
            i128::from(raw)
        };
        let mut data = self.packed(n, width)?;
        let entry_width = closest_fixed_bits(gap_width + patch_width);
        if entry_width > 64 || patch_width + width > 64 {
            return Err(Malformed::Stream);
        }
        let entries = self.packed(patches, entry_width)?;
        let patch_mask = if patch_width == 64 {
            u64::MAX
        } else {
            (1u64 << patch_width) - 1
        };
        let mut at = 0usize;
        for entry in entries {
            let gap = (entry >> (patch_width % 64)) as usize * usize::from(patch_width < 64);
            let patch = entry & patch_mask;
            at += gap;
            if gap == 255 && patch == 0 {
                continue;
            }
            let slot = data.get_mut(at).ok_or(Malformed::Stream)?;
            *slot |= patch << width;
        }
        data.iter()
            .map(|&d| u64::try_from(base + i128::from(d)).map_err(|_| Malformed::Stream))
            .collect()
    }

    fn delta(&mut self, first: u8) -> std::result::Result<Vec<u64>, Malformed> {
        let code = first >> 1 & 0x1f;
        let width = if code == 0 { 0 } else { bit_width(code) };
        let n = self.run_length(first)?;
        let base = i128::from(self.varint()?);
        let zigzag = self.varint()?;
        let step = i128::from((zigzag >> 1) as i64 ^ -((zigzag & 1) as i64));
        let mut out = Vec::with_capacity(n);
        out.push(base);
        if n > 1 {
            out.push(base + step);
        }
        if width == 0 {
            for i in 2..n {
                out.push(out[i - 1] + step);
            }
        } else {
            for d in self.packed(n.saturating_sub(2), width)? {
                let last = out[out.len() - 1];
                out.push(if step < 0 {
                    last - i128::from(d)
                } else {
                    last + i128::from(d)
                });
            }
        }
        out.into_iter()
            .map(|v| u64::try_from(v).map_err(|_| Malformed::Stream))
            .collect()
    }
}

/// The 5-bit width codes of RLE version 2.
fn bit_width(code: u8) -> u32 {
    match code {
        0..=23 => u32::from(code) + 1,
        24 => 26,
        25 => 28,
        26 => 30,
        27 => 32,
        28 => 40,
        29 => 48,
        30 => 56,
        _ => 64,
    }
}

/// The smallest width of the code table that holds `n` bits.
fn closest_fixed_bits(n: u32) -> u32 {
    match n {
        0 => 1,
        1..=24 => n,
        25..=26 => 26,
        27..=28 => 28,
        29..=30 => 30,
        31..=32 => 32,
        33..=40 => 40,
        41..=48 => 48,
        49..=56 => 56,
        57..=64 => 64,
        _ => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], v2: bool) -> std::result::Result<Vec<u64>, Malformed> {
        let mut out = Vec::new();
        let mut runs = Runs {
            bytes: bytes.bytes(),
        };
        let mut push = |v: u64| {
            out.push(v);
            Ok(true)
        };
        if v2 {
            runs.for_each_v2(&mut push)?;
        } else {
            runs.for_each_v1(&mut push)?;
        }
        Ok(out)
    }

    // The examples of the ORC specification's integer run-length encodings.
    #[test]
    fn version_2_runs_decode_as_specified() {
        assert_eq!(decode(&[0x0a, 0x27, 0x10], true), Ok(vec![10000; 5]));
        assert_eq!(
            decode(
                &[0x5e, 0x03, 0x5c, 0xa1, 0xab, 0x1e, 0xde, 0xad, 0xbe, 0xef],
                true
            ),
            Ok(vec![23713, 43806, 57005, 48879])
        );
        let patched = [
            0x8e, 0x13, 0x2b, 0x21, 0x07, 0xd0, 0x1e, 0x00, 0x14, 0x70, 0x28, 0x32, 0x3c, 0x46,
            0x50, 0x5a, 0x64, 0x6e, 0x78, 0x82, 0x8c, 0x96, 0xa0, 0xaa, 0xb4, 0xbe, 0xfc, 0xe8,
        ];
        let mut expected = vec![2030, 2000, 2020, 1_000_000];
        expected.extend((2040..=2190).step_by(10));
        assert_eq!(decode(&patched, true), Ok(expected));
        assert_eq!(
            decode(&[0xc6, 0x09, 0x02, 0x02, 0x22, 0x42, 0x42, 0x46], true),
            Ok(vec![2, 3, 5, 7, 11, 13, 17, 19, 23, 29])
        );
        // A fixed delta (width 0): 2, 5, 8, 11.
        assert_eq!(
            decode(&[0xc0, 0x03, 0x02, 0x06], true),
            Ok(vec![2, 5, 8, 11])
        );
        // A decreasing delta run: 20, 17, 15.
        assert_eq!(
            decode(&[0xc2, 0x02, 0x14, 0x05, 0x80], true),
            Ok(vec![20, 17, 15])
        );
        // Runs follow one another; a run cut short is malformed.
        assert_eq!(
            decode(&[0x0a, 0x27, 0x10, 0x00, 0x07], true).unwrap().len(),
            8
        );
        assert_eq!(decode(&[0x5e, 0x03, 0x5c], true), Err(Malformed::Stream));
    }

    #[test]
    fn version_1_runs_decode_as_specified() {
        assert_eq!(decode(&[0x61, 0x00, 0x07], false), Ok(vec![7; 100]));
        assert_eq!(
            decode(&[0x61, 0xff, 0x64], false),
            Ok((1..=100).rev().collect())
        );
        assert_eq!(
            decode(&[0xfb, 0x02, 0x03, 0x06, 0x07, 0x0b], false),
            Ok(vec![2, 3, 6, 7, 11])
        );
    }

    fn sums(values: &[u64], count: u64, window: u128) -> std::result::Result<Sums, u64> {
        // Literal runs of version 1 carry any values.
        let mut bytes = Vec::new();
        for chunk in values.chunks(128) {
            bytes.push((256 - chunk.len()) as u8);
            for &v in chunk {
                let mut v = v;
                loop {
                    let b = (v & 0x7f) as u8;
                    v >>= 7;
                    bytes.push(if v > 0 { b | 0x80 } else { b });
                    if v == 0 {
                        break;
                    }
                }
            }
        }
        Sums::of(bytes.as_slice(), false, count, window)
    }

    #[test]
    fn stripe_footers_place_streams_and_dictionaries_are_bounded() {
        // StripeFooter { streams: [{kind 2, column 1, length 3}, {kind 1, column 1, length 5}],
        //                columns: [{kind 0}, {kind 3 (DICTIONARY_V2), dictionarySize 300}] }
        let footer = [
            0x0a, 0x06, 0x08, 0x02, 0x10, 0x01, 0x18, 0x03, 0x0a, 0x06, 0x08, 0x01, 0x10, 0x01,
            0x18, 0x05, 0x12, 0x02, 0x08, 0x00, 0x12, 0x05, 0x08, 0x03, 0x10, 0xac, 0x02,
        ];
        let parsed = StripeFooter::parse(&footer, 100).unwrap();
        let placed: Vec<(u64, u64, u64, u64)> = (parsed.streams.iter())
            .map(|s| (s.kind, s.column, s.offset, s.length))
            .collect();
        assert_eq!(placed, vec![(2, 1, 100, 3), (1, 1, 103, 5)]);
        assert_eq!(parsed.encoding(1), (DICTIONARY_V2, 300));
        assert_eq!(parsed.encoding(7), (0, 0));
        assert!(check_dictionary(&parsed, 1, "s", 300 * 8, "f.orc").is_ok());
        let err = check_dictionary(&parsed, 1, "s", 300 * 8 - 1, "f.orc").unwrap_err();
        assert!(
            err.to_string()
                .contains("column 's' claims a dictionary of 300"),
            "{err}"
        );
        assert!(check_dictionary(&parsed, 0, "s", 0, "f.orc").is_ok());
    }

    #[test]
    fn batch_bound_covers_every_window_within_twice_its_size() {
        let values: Vec<u64> = (0..1000).map(|i| (i * 7919 % 613) as u64).collect();
        for window in [1usize, 3, 64, 999, 1000, 5000] {
            let got = sums(&values, 1000, window as u128).unwrap();
            let best = (values.windows(window.min(values.len())))
                .map(|w| w.iter().map(|&v| u128::from(v)).sum::<u128>())
                .max()
                .unwrap();
            assert!(
                got.batch >= best && got.batch <= 2 * best,
                "{window}: {got:?} vs {best}"
            );
            assert_eq!(
                got.total,
                values.iter().map(|&v| u128::from(v)).sum::<u128>()
            );
        }
        // Only the first `count` values are the column's.
        assert_eq!(sums(&[5, 6, 7], 2, 10).unwrap().total, 11);
        assert_eq!(sums(&[5, 6, 7], 0, 10).unwrap().total, 0);
        // A length orc-rust would read as a negative i64.
        assert_eq!(sums(&[1, 1 << 63], 2, 10), Err(1 << 63));
    }
}
