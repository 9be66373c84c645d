//! A check of a Parquet footer's list sizes before the parquet crate decodes it.
//!
//! The footer is a Thrift message in the compact protocol. The decoder reserves room for a
//! list's elements from the count in the list's header before reading them, so a corrupt
//! footer whose row-group list claims two billion entries asks for hundreds of gigabytes and a
//! failed allocation aborts the process. Every element of every Thrift type takes at least one
//! byte, so no list can hold more elements than the bytes after its header: this module walks
//! the footer and rejects one that claims more. Anything it cannot make sense of is left for
//! the decoder to report, so this check only ever adds an error.
//!
//! The same walk finds the column chunks encrypted with Parquet modular encryption in a file
//! whose footer is plaintext (their `crypto_metadata`): the parquet crate is built without
//! decryption, so their pages cannot be read, and telling them apart here gives an error that
//! names them instead of one about page headers that do not parse. A file whose footer itself
//! is encrypted (magic `PARE`) is refused as a whole.

use std::fs::File;

use super::error::{Error, Result};
use super::orc_types::read_at;

/// Deepest nesting of structs and lists walked (the footer's own is a few levels).
const MAX_DEPTH: usize = 64;

/// Fails when the footer of the Parquet file `file` holds a list claiming more elements than
/// the footer has bytes left, or is encrypted. Returns the leaf columns (indexes in the file's
/// schema) whose chunks are encrypted in some row group.
pub fn check(file: &File, path: &str) -> Result<Vec<usize>> {
    let footer = match read_footer(file) {
        Tail::Plain(footer) => footer,
        Tail::Encrypted => {
            return Err(Error::Schema(format!(
                "{path} has an encrypted footer (Parquet modular encryption), which recis-io \
                 does not read"
            )))
        }
        Tail::Unknown => return Ok(Vec::new()),
    };
    let mut walk = Walk {
        data: &footer,
        at: 0,
    };
    match walk.value(STRUCT, 0) {
        Err(Found::Oversized { count, left }) => Err(Error::corrupt(
            path,
            format!("malformed footer: a list claims {count} entries in the {left} bytes after it"),
        )),
        // A footer the walk cannot read is left to the decoder, which reports it.
        Err(Found::Unreadable) => Ok(Vec::new()),
        Ok(()) => Ok(encrypted_columns(&footer).unwrap_or_default()),
    }
}

/// What the last bytes of a file say of its footer.
enum Tail {
    /// A plain footer: its bytes.
    Plain(Vec<u8>),
    /// An encrypted footer (magic `PARE`).
    Encrypted,
    /// Neither, or unreadable: left to the decoder.
    Unknown,
}

fn read_footer(file: &File) -> Tail {
    let plain = || {
        let len = file.metadata().ok()?.len();
        let tail = read_at(file, len.checked_sub(8)?, 8)?;
        match &tail[4..] {
            b"PAR1" => {}
            b"PARE" => return Some(Tail::Encrypted),
            _ => return None,
        }
        let footer_len = u64::from(u32::from_le_bytes(tail[..4].try_into().ok()?));
        let start = len.checked_sub(8)?.checked_sub(footer_len)?;
        read_at(file, start, footer_len).map(Tail::Plain)
    };
    plain().unwrap_or(Tail::Unknown)
}

/// The leaf columns whose chunk carries `crypto_metadata` (field 8 of `ColumnChunk`) in some
/// row group (field 4 of `FileMetaData`, its chunks in field 1 of `RowGroup`, in the order of
/// the schema's leaves).
fn encrypted_columns(footer: &[u8]) -> std::result::Result<Vec<usize>, Found> {
    let mut found = Vec::new();
    let mut walk = Walk {
        data: footer,
        at: 0,
    };
    walk.fields(0, |w, id, kind| {
        if (id, kind) != (4, LIST) {
            return Ok(false);
        }
        w.list(1, |w, kind| {
            if kind != STRUCT {
                return Err(Found::Unreadable);
            }
            w.fields(2, |w, id, kind| {
                if (id, kind) != (1, LIST) {
                    return Ok(false);
                }
                let mut leaf = 0;
                w.list(3, |w, kind| {
                    if kind != STRUCT {
                        return Err(Found::Unreadable);
                    }
                    let mut encrypted = false;
                    w.fields(4, |_, id, _| {
                        encrypted |= id == 8;
                        Ok(false)
                    })?;
                    if encrypted && !found.contains(&leaf) {
                        found.push(leaf);
                    }
                    leaf += 1;
                    Ok(())
                })?;
                Ok(true)
            })
        })?;
        Ok(true)
    })?;
    Ok(found)
}

// Compact-protocol type ids.
const BOOL_TRUE: u8 = 1;
const BOOL_FALSE: u8 = 2;
const BYTE: u8 = 3;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const DOUBLE: u8 = 7;
const BINARY: u8 = 8;
const LIST: u8 = 9;
const SET: u8 = 10;
const MAP: u8 = 11;
pub(super) const STRUCT: u8 = 12;

/// Why a walk stopped early.
#[derive(Debug, PartialEq)]
pub(super) enum Found {
    /// A list or map claims more elements than bytes follow it.
    Oversized { count: u64, left: usize },
    /// Something else the walk cannot read: left to the decoder.
    Unreadable,
}

/// A walk over a compact-protocol message in `data`, now at byte `at`.
pub(super) struct Walk<'a> {
    pub data: &'a [u8],
    pub at: usize,
}

impl Walk<'_> {
    fn byte(&mut self) -> std::result::Result<u8, Found> {
        let b = *self.data.get(self.at).ok_or(Found::Unreadable)?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> std::result::Result<u64, Found> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7F) << shift;
            if b < 0x80 {
                return Ok(value);
            }
        }
        Err(Found::Unreadable)
    }

    fn skip(&mut self, n: u64) -> std::result::Result<(), Found> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.data.len())
            .ok_or(Found::Unreadable)?;
        self.at = end;
        Ok(())
    }

    /// Refuses `count` elements when fewer bytes than that follow.
    fn fits(&self, count: u64) -> std::result::Result<(), Found> {
        let left = self.data.len() - self.at;
        if count > left as u64 {
            return Err(Found::Oversized { count, left });
        }
        Ok(())
    }

    /// Walks a list or set (`depth` levels down), handing each element's compact type to
    /// `element`, which reads the element.
    fn list(
        &mut self,
        depth: usize,
        mut element: impl FnMut(&mut Self, u8) -> std::result::Result<(), Found>,
    ) -> std::result::Result<(), Found> {
        if depth > MAX_DEPTH {
            return Err(Found::Unreadable);
        }
        let header = self.byte()?;
        let count = match header >> 4 {
            15 => self.varint()?,
            n => u64::from(n),
        };
        self.fits(count)?;
        for _ in 0..count {
            element(self, header & 0x0F)?;
        }
        Ok(())
    }

    /// Walks the fields of a struct (`depth` levels down), handing each to `field` with its
    /// id and compact type: `field` reads the value and returns `true`, or returns `false` and
    /// the value is skipped. A bool field's value is its type ([`BOOL_TRUE`], [`BOOL_FALSE`]),
    /// with nothing to read.
    pub fn fields(
        &mut self,
        depth: usize,
        mut field: impl FnMut(&mut Self, i16, u8) -> std::result::Result<bool, Found>,
    ) -> std::result::Result<(), Found> {
        if depth > MAX_DEPTH {
            return Err(Found::Unreadable);
        }
        let mut id: i16 = 0;
        loop {
            let header = self.byte()?;
            if header == 0 {
                return Ok(());
            }
            let kind = header & 0x0F;
            id = match header >> 4 {
                0 => i16::try_from(zigzag(self.varint()?)).map_err(|_| Found::Unreadable)?,
                delta => id.checked_add(i16::from(delta)).ok_or(Found::Unreadable)?,
            };
            if !field(self, id, kind)? && !matches!(kind, BOOL_TRUE | BOOL_FALSE) {
                self.value(kind, depth + 1)?;
            }
        }
    }

    /// An integer value of compact type `kind` that must fit an `i32`.
    pub fn i32(&mut self, kind: u8) -> std::result::Result<i32, Found> {
        if !matches!(kind, I16 | I32) {
            return Err(Found::Unreadable);
        }
        i32::try_from(zigzag(self.varint()?)).map_err(|_| Found::Unreadable)
    }

    /// Walks one value of compact type `kind` (`depth` levels down).
    pub fn value(&mut self, kind: u8, depth: usize) -> std::result::Result<(), Found> {
        if depth > MAX_DEPTH {
            return Err(Found::Unreadable);
        }
        match kind {
            BOOL_TRUE | BOOL_FALSE | BYTE => self.skip(1),
            I16 | I32 | I64 => self.varint().map(|_| ()),
            DOUBLE => self.skip(8),
            BINARY => {
                let n = self.varint()?;
                self.skip(n)
            }
            LIST | SET => self.list(depth, |w, element| {
                // A bool element of a list is one byte, not folded into a field header.
                if matches!(element, BOOL_TRUE | BOOL_FALSE) {
                    w.skip(1)
                } else {
                    w.value(element, depth + 1)
                }
            }),
            MAP => {
                let count = self.varint()?;
                if count == 0 {
                    return Ok(());
                }
                self.fits(count)?;
                let kinds = self.byte()?;
                for _ in 0..count {
                    self.value(kinds >> 4, depth + 1)?;
                    self.value(kinds & 0x0F, depth + 1)?;
                }
                Ok(())
            }
            STRUCT => self.fields(depth, |_, _, _| Ok(false)),
            _ => Err(Found::Unreadable),
        }
    }
}

/// The signed value of a zigzag-encoded varint.
fn zigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(data: &[u8]) -> std::result::Result<(), Found> {
        Walk { data, at: 0 }.value(STRUCT, 0)
    }

    #[test]
    fn a_list_of_structs_that_fits_is_walked() {
        // field 1: list of 2 structs, each with field 1 = i32 5; then stop.
        let msg = [0x19, 0x2C, 0x15, 0x0A, 0x00, 0x15, 0x0A, 0x00, 0x00];
        assert_eq!(walk(&msg), Ok(()));
    }

    #[test]
    fn a_list_claiming_more_elements_than_bytes_is_found() {
        // field 4 (delta 4): list of structs, long count 2**31 - 1, then one struct.
        let mut msg = vec![0x49, 0xFC, 0xFF, 0xFF, 0xFF, 0xFF, 0x07];
        msg.extend([0x15, 0x0A, 0x00, 0x00]);
        assert_eq!(
            walk(&msg),
            Err(Found::Oversized {
                count: (1 << 31) - 1,
                left: 4
            })
        );
    }

    #[test]
    fn bool_fields_and_list_elements_and_binaries_are_skipped() {
        // field 1 bool true (header only), field 2 binary "ab", field 3 list of 2 bools,
        // field 4 double, stop.
        let mut msg = vec![0x11, 0x18, 0x02, b'a', b'b', 0x19, 0x21, 0x01, 0x02, 0x17];
        msg.extend([0u8; 8]);
        msg.push(0x00);
        assert_eq!(walk(&msg), Ok(()));
    }

    #[test]
    fn encrypted_column_chunks_are_found_by_their_crypto_metadata() {
        // FileMetaData field 4: one row group, whose field 1 lists two column chunks (each
        // with field 2, file_offset 0); the second has field 8, crypto_metadata (the union's
        // field 1, encryption with the footer key: an empty struct).
        let msg = [
            0x49, 0x1C, // field 4: list of 1 struct
            0x19, 0x2C, // field 1: list of 2 structs
            0x26, 0x00, 0x00, // file_offset 0, stop
            0x26, 0x00, 0x6C, 0x1C, 0x00, 0x00, 0x00, // file_offset 0, crypto_metadata, stop
            0x00, 0x00, // row group, file metadata: stop
        ];
        assert_eq!(walk(&msg), Ok(()));
        assert_eq!(encrypted_columns(&msg), Ok(vec![1]));
        // Without field 8 nothing is encrypted.
        let plain = [0x49, 0x1C, 0x19, 0x1C, 0x26, 0x00, 0x00, 0x00, 0x00];
        assert_eq!(encrypted_columns(&plain), Ok(vec![]));
    }

    #[test]
    fn a_truncated_message_is_left_to_the_decoder() {
        assert_eq!(walk(&[0x18, 0x05, b'a']), Err(Found::Unreadable));
    }
}
