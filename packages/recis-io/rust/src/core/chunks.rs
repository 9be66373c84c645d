//! Column chunks read into memory. A segment's column chunks are read with one positioned
//! read per run of adjacent chunks and served to the Parquet page readers from memory: no
//! system call, file handle clone or read buffer per page. Each decode thread keeps a few read
//! buffers for its next segments, since the kernel faults in and zeroes fresh ones page by page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};

use super::error::{Error, Result};

/// Read buffers kept per decode thread.
const KEEP_READ_BUFFERS: usize = 4;

thread_local! {
    static READ_BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The error number of a read from a directory (Linux, macOS and the BSDs alike).
const EISDIR: i32 = 21;

/// The column chunks one segment decodes.
pub struct Chunks {
    /// `(file offset, bytes)` of each run, sorted by offset.
    runs: Vec<(u64, Bytes)>,
    file_len: u64,
}

impl Chunks {
    pub fn read(
        mut file: File,
        spans: impl Iterator<Item = (u64, u64)>,
        at: &str,
    ) -> Result<Chunks> {
        let io = |e: std::io::Error| Error::read(at, &e);
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            // Replaced by a directory after planning: its size says nothing of the data, and
            // the read would fail with EISDIR anyway.
            return Err(io(std::io::Error::from_raw_os_error(EISDIR)));
        }
        let file_len = meta.len();
        let mut spans: Vec<(u64, u64)> = spans.map(|(start, len)| (start, start + len)).collect();
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let mut runs = Vec::with_capacity(merged.len());
        for (a, b) in merged {
            if b > file_len {
                return Err(Error::corrupt(
                    at,
                    format!("column data at bytes {a}..{b} is past the end of the file ({file_len} bytes)"),
                ));
            }
            let len = usize::try_from(b - a).map_err(|e| Error::corrupt(at, e))?;
            let mut buf = READ_BUFFERS.with_borrow_mut(|free| {
                let best = (0..free.len())
                    .filter(|&i| free[i].capacity() >= len)
                    .min_by_key(|&i| free[i].capacity());
                best.map(|i| free.swap_remove(i)).unwrap_or_default()
            });
            buf.clear();
            buf.reserve_exact(len);
            file.seek(SeekFrom::Start(a)).map_err(io)?;
            (&mut file).take(b - a).read_to_end(&mut buf).map_err(io)?;
            if buf.len() != len {
                return Err(Error::corrupt(
                    at,
                    format!("expected {len} bytes at offset {a}, read {}", buf.len()),
                ));
            }
            runs.push((a, Bytes::from(buf)));
        }
        Ok(Chunks { runs, file_len })
    }

    /// Keeps this segment's read buffers for the next segment decoded on this thread: fresh
    /// buffers of this size are faulted in (and zeroed) page by page by the kernel.
    pub fn recycle(self) {
        READ_BUFFERS.with_borrow_mut(|free| {
            for (_, bytes) in self.runs {
                if free.len() < KEEP_READ_BUFFERS {
                    if let Ok(m) = bytes.try_into_mut() {
                        free.push(Vec::from(m));
                    }
                }
            }
        });
    }

    /// [`Chunks::recycle`] for chunks that readers shared, once the last reference is dropped
    /// (nothing happens while another reference is alive).
    pub fn recycle_shared(chunks: Arc<Chunks>) {
        if let Ok(chunks) = Arc::try_unwrap(chunks) {
            chunks.recycle();
        }
    }

    /// The `len` bytes at file offset `start`, `None` when they were not read.
    pub fn bytes(&self, start: u64, len: u64) -> Option<Bytes> {
        let rest = self.from(start).ok()?;
        let len = usize::try_from(len).ok()?;
        (len <= rest.len()).then(|| rest.slice(..len))
    }

    /// The bytes from file offset `start` to the end of the run holding it.
    fn from(&self, start: u64) -> parquet::errors::Result<Bytes> {
        let i = self.runs.partition_point(|(base, _)| *base <= start);
        let hit = i.checked_sub(1).map(|i| &self.runs[i]);
        match hit {
            Some((base, data)) if start - base <= data.len() as u64 => {
                Ok(data.slice((start - base) as usize..))
            }
            _ => Err(ParquetError::EOF(format!(
                "no column data was read at file offset {start}"
            ))),
        }
    }
}

impl Length for Chunks {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl ChunkReader for Chunks {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self.from(start)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let rest = self.from(start)?;
        if rest.len() < length {
            return Err(ParquetError::EOF(format!(
                "expected {length} bytes at file offset {start}, the column data has {}",
                rest.len()
            )));
        }
        Ok(rest.slice(..length))
    }
}

/// [`Chunks`] shared with a reader that needs to own its source, so the buffers can be
/// recycled once that reader is done.
#[derive(Clone)]
pub struct SharedChunks(pub Arc<Chunks>);

impl Length for SharedChunks {
    fn len(&self) -> u64 {
        self.0.len()
    }
}

impl ChunkReader for SharedChunks {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        self.0.get_read(start)
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.0.get_bytes(start, length)
    }
}

impl SharedChunks {
    /// Recycles the buffers if no other reference is left.
    pub fn recycle(self) {
        Chunks::recycle_shared(self.0);
    }
}
