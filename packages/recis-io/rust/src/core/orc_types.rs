//! A check of an ORC file's type tree before orc-rust parses it.
//!
//! orc-rust builds the schema by following each type's subtype ids recursively, so a corrupt
//! footer whose ids loop back (or nest absurdly deep) overflows the stack and kills the
//! process. The ORC specification stores types in pre-order: every subtype id is larger than
//! its parent's. This module reads the footer's type list and rejects a file that breaks that
//! rule or nests deeper than [`MAX_DEPTH`]. Anything else it cannot make sense of is left for
//! orc-rust to report, so this check only ever adds an error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use super::error::{Error, Result};

/// Deepest type nesting accepted.
pub const MAX_DEPTH: usize = 256;

/// Largest footer read (decompressed or not).
const MAX_FOOTER: u64 = 64 << 20;

/// Largest compression block size accepted. A compression chunk's 3-byte header holds its
/// length in 23 bits, so writers keep blocks within 8 MiB (orc-rust's and ORC's default is
/// 256 KiB); orc-rust allocates a whole block up front for some codecs (LZ4), and a corrupt
/// postscript claiming exabytes would abort the process.
const MAX_BLOCK: u64 = 1 << 30;

/// Fails when the postscript of the ORC file `file` claims a footer and metadata section
/// larger than the file holds before it or an impossible compression block size, or its
/// footer holds a type tree orc-rust cannot parse safely.
pub fn check(file: &mut File, path: &str) -> Result<()> {
    let Some(ps) = Postscript::read(file) else {
        return Ok(());
    };
    // The footer and the metadata section lie just before the postscript.
    let (footer, metadata) = (ps.footer.unwrap_or(0), ps.metadata);
    if footer.checked_add(metadata).is_none_or(|n| n > ps.start) {
        return Err(Error::corrupt(
            path,
            format!(
                "malformed postscript: a {footer}-byte footer and {metadata} bytes of \
                 metadata claimed before byte {}",
                ps.start
            ),
        ));
    }
    if ps.kind != 0 && ps.block > MAX_BLOCK {
        return Err(Error::corrupt(
            path,
            format!(
                "malformed postscript: compression block size {} bytes, beyond {MAX_BLOCK} \
                 (chunk headers hold at most 8 MiB)",
                ps.block
            ),
        ));
    }
    let Some(footer) = read_footer(file, &ps) else {
        return Ok(());
    };
    let Some(types) = subtypes(&footer) else {
        return Ok(());
    };
    check_tree(&types).map_err(|msg| Error::corrupt(path, msg))
}

/// Checks pre-order ids and depth of the subtype lists, one per type.
fn check_tree(types: &[Vec<u64>]) -> std::result::Result<(), String> {
    let mut depth = vec![0usize; types.len()];
    for (i, subs) in types.iter().enumerate() {
        for &s in subs {
            if s <= i as u64 || s >= types.len() as u64 {
                return Err(format!(
                    "malformed footer: type {i} lists subtype {s} (of {} types)",
                    types.len()
                ));
            }
            depth[s as usize] = depth[i] + 1;
            if depth[s as usize] > MAX_DEPTH {
                return Err(format!(
                    "malformed footer: types nest deeper than {MAX_DEPTH} levels"
                ));
            }
        }
    }
    Ok(())
}

/// The fields of an ORC postscript this module reads.
struct Postscript {
    /// Where it starts in the file.
    start: u64,
    /// Footer length (field 1), metadata length (5), compression kind (2) and block size (3).
    footer: Option<u64>,
    metadata: u64,
    kind: u64,
    block: u64,
}

impl Postscript {
    /// `None` when the tail does not parse.
    fn read(file: &File) -> Option<Postscript> {
        let len = file.metadata().ok()?.len();
        let last = read_at(file, len.checked_sub(1)?, 1)?;
        let ps_len = u64::from(last[0]);
        let start = len.checked_sub(1 + ps_len)?;
        let bytes = read_at(file, start, ps_len)?;
        let mut ps = Postscript {
            start,
            footer: None,
            metadata: 0,
            kind: 0,
            block: 256 * 1024,
        };
        for (field, value) in fields(&bytes)? {
            match (field, value) {
                (1, Value::Varint(v)) => ps.footer = Some(v),
                (2, Value::Varint(v)) => ps.kind = v,
                (3, Value::Varint(v)) => ps.block = v,
                (5, Value::Varint(v)) => ps.metadata = v,
                _ => {}
            }
        }
        Some(ps)
    }
}

/// The decompressed footer bytes, `None` when the tail does not parse.
fn read_footer(file: &File, ps: &Postscript) -> Option<Vec<u8>> {
    let footer_len = ps.footer?;
    if footer_len > MAX_FOOTER {
        return None;
    }
    let raw = read_at(file, ps.start.checked_sub(footer_len)?, footer_len)?;
    if ps.kind == 0 {
        return Some(raw);
    }
    decompress(&raw, ps.kind, ps.block.min(MAX_FOOTER) as usize)
}

pub(super) fn read_at(mut file: &File, start: u64, len: u64) -> Option<Vec<u8>> {
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::with_capacity(usize::try_from(len).ok()?);
    file.take(len).read_to_end(&mut buf).ok()?;
    (buf.len() as u64 == len).then_some(buf)
}

/// Decodes ORC compression blocks: a 3-byte little-endian header `len << 1 | original`, then
/// `len` bytes, stored as is or compressed with `kind` (zlib 1, snappy 2, zstd 5; other codecs
/// are not checked).
fn decompress(mut data: &[u8], kind: u64, block: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let header = data.get(..3)?;
        let h = u32::from(header[0]) | u32::from(header[1]) << 8 | u32::from(header[2]) << 16;
        let n = (h >> 1) as usize;
        let chunk = data.get(3..3 + n)?;
        data = &data[3 + n..];
        if h & 1 == 1 {
            out.extend_from_slice(chunk);
            continue;
        }
        let plain = match kind {
            1 => {
                let mut buf = Vec::new();
                flate2::read::DeflateDecoder::new(chunk)
                    .take(block as u64)
                    .read_to_end(&mut buf)
                    .ok()?;
                buf
            }
            2 => {
                if snap::raw::decompress_len(chunk).ok()? > block {
                    return None;
                }
                snap::raw::Decoder::new().decompress_vec(chunk).ok()?
            }
            5 => zstd::bulk::decompress(chunk, block).ok()?,
            _ => return None,
        };
        out.extend_from_slice(&plain);
        if out.len() as u64 > MAX_FOOTER {
            return None;
        }
    }
    Some(out)
}

/// The subtype ids of each type of a `Footer` message (field 4 `types`, each a `Type` whose
/// field 2 holds the subtypes, packed or not).
fn subtypes(footer: &[u8]) -> Option<Vec<Vec<u64>>> {
    let mut types = Vec::new();
    for (field, value) in fields(footer)? {
        let (4, Value::Bytes(ty)) = (field, value) else {
            continue;
        };
        let mut subs = Vec::new();
        for (field, value) in fields(ty)? {
            match (field, value) {
                (2, Value::Varint(v)) => subs.push(v),
                (2, Value::Bytes(mut packed)) => {
                    while !packed.is_empty() {
                        subs.push(varint(&mut packed)?);
                    }
                }
                _ => {}
            }
        }
        types.push(subs);
    }
    Some(types)
}

pub(super) enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The `(field number, value)` pairs of a protobuf message, `None` if it is malformed.
pub(super) fn fields(mut data: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let key = varint(&mut data)?;
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut data)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                data = data.get(n..)?;
                Value::Fixed
            }
            2 => {
                let n = usize::try_from(varint(&mut data)?).ok()?;
                let bytes = data.get(..n)?;
                data = &data[n..];
                Value::Bytes(bytes)
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

fn varint(data: &mut &[u8]) -> Option<u64> {
    varint_from(|| {
        let (&b, rest) = data.split_first()?;
        *data = rest;
        Some(b)
    })
}

/// A base-128 varint (protobuf's, and ORC's unsigned integers) from the bytes `next` yields,
/// `None` when they end early or run past 64 bits.
pub(super) fn varint_from(mut next: impl FnMut() -> Option<u8>) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = next()?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_order_trees_pass_and_loops_fail() {
        // struct<a: int, b: list<int>>
        let ok = vec![vec![1, 2], vec![], vec![3], vec![]];
        assert!(check_tree(&ok).is_ok());
        let looped = vec![vec![1], vec![0]];
        assert_eq!(
            check_tree(&looped).unwrap_err(),
            "malformed footer: type 1 lists subtype 0 (of 2 types)"
        );
        assert!(check_tree(&[vec![0]]).is_err());
        assert!(check_tree(&[vec![5]]).is_err());
        let chain = |levels: u64| -> Vec<Vec<u64>> {
            (1..=levels).map(|s| vec![s]).chain([vec![]]).collect()
        };
        assert!(check_tree(&chain(MAX_DEPTH as u64)).is_ok());
        let err = check_tree(&chain(MAX_DEPTH as u64 + 1)).unwrap_err();
        assert!(err.contains("deeper than"), "{err}");
    }

    #[test]
    fn footer_types_are_parsed_from_protobuf() {
        // Footer { types: [Type { kind: STRUCT, subtypes: [1] (packed) }, Type { kind: LONG }] }
        let footer = [
            0x22, 0x05, 0x08, 0x0c, 0x12, 0x01, 0x01, 0x22, 0x02, 0x08, 0x04,
        ];
        assert_eq!(subtypes(&footer).unwrap(), vec![vec![1], vec![]]);
        // Unpacked subtypes, a varint over one byte.
        let footer = [0x22, 0x05, 0x10, 0x81, 0x01, 0x10, 0x02];
        assert_eq!(subtypes(&footer).unwrap(), vec![vec![129, 2]]);
        assert!(subtypes(&[0x22, 0x09, 0x08]).is_none());
    }
}
