//! The `Reader` class: one shard's batch stream, driven by `recis_io.Dataset`.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyString};

use super::dlpack::slab_capsule;
use super::errors::IntoPyResult;
use super::hash_kind;
use crate::core::ahead::{Ahead, Assembled};
use crate::core::assemble::BatchLayout;
use crate::core::column::{ColumnSpec, DType, Fill, Leaf};
use crate::core::plan::Sharding;
use crate::core::reader::{check_fits, Options, Reader as CoreReader};
use crate::core::ring::{Slab, SlabRef};
use crate::core::source::{Format, Source};
use crate::core::Error;

type Layout = (usize, Vec<(usize, usize, Vec<(usize, usize)>)>);

fn layout_tuple(l: &BatchLayout) -> Layout {
    let cols = l
        .columns
        .iter()
        .map(|c| (c.values_at, c.values_len, c.offsets.clone()))
        .collect();
    (l.rows, cols)
}

fn fill_of(name: &str, v: &Bound<'_, PyAny>) -> PyResult<Fill> {
    if v.is_instance_of::<PyBool>() {
        return Ok(Fill::Int(i128::from(v.extract::<bool>()?)));
    }
    if v.is_instance_of::<PyInt>() {
        // Every int64 and uint64 fits; the range of the column's dtype is checked in the core.
        return v.extract::<i128>().map(Fill::Int).or_else(|_| {
            Err(Error::InvalidArgument(format!(
                "column '{name}' has fill {v}, out of range for every dtype"
            )))
            .py()
        });
    }
    if v.is_instance_of::<PyFloat>() {
        return Ok(Fill::Float(v.extract()?));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Fill::Text(s.to_str()?.as_bytes().to_vec()));
    }
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(Fill::Text(b.as_bytes().to_vec()));
    }
    Err(PyTypeError::new_err(format!(
        "fill of column '{name}' must be a number or a string"
    )))
}

type SpecTuple<'py> = (
    String,
    Option<Bound<'py, PyAny>>,
    Option<String>,
    u64,
    Option<String>,
);

fn spec_of(t: SpecTuple<'_>) -> PyResult<ColumnSpec> {
    let (name, fill, hash, buckets, dtype) = t;
    let fill = fill.map(|f| fill_of(&name, &f)).transpose()?;
    let hash = hash.map(|h| hash_kind(&h)).transpose().py()?;
    let dtype = dtype
        .map(|d| {
            DType::from_name(&d).ok_or_else(|| {
                Error::InvalidArgument(format!("column '{name}' has unknown dtype '{d}'"))
            })
        })
        .transpose()
        .py()?;
    Ok(ColumnSpec {
        name,
        fill,
        hash,
        buckets,
        dtype,
    })
}

/// One shard's stream of packed batches.
#[pyclass(module = "recis_io._recis_io")]
pub struct Reader {
    inner: CoreReader,
    /// The assembling thread, when batches are assembled ahead (see `assembles_ahead`).
    ahead: Option<Ahead>,
    /// The next batch, received from `ahead` by `prepare` and not handed out yet.
    ready: Option<Assembled>,
    /// The batch `fill_owned` handed out last, until Python has it (`release_held`): an
    /// exception (a Ctrl-C) raised after the call returned and before Python stored the batch
    /// would lose it, so `prepare` and `fill_owned` give it again instead of the next one.
    held: Option<(Arc<Slab>, BatchLayout)>,
}

impl Reader {
    /// Receives the next assembled batch into `ready` (starting the thread at the cursor if
    /// needed); `None` at the end. On an error the thread is dropped, so a later call starts
    /// again from the cursor.
    fn receive(&mut self) -> Result<Option<usize>, Error> {
        if let Some(a) = &self.ready {
            return Ok(Some(a.layout.nbytes));
        }
        if self.ahead.is_none() {
            self.ahead = Some(Ahead::start(self.inner.fork()?, self.inner.ahead_depth())?);
        }
        let ahead = self.ahead.as_mut().expect("started above");
        match ahead.recv() {
            Ok(Some(a)) => {
                let nbytes = a.layout.nbytes;
                self.ready = Some(a);
                Ok(Some(nbytes))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.ahead = None;
                Err(e)
            }
        }
    }

    /// Hands out the received batch: the cursor moves past it.
    fn deliver(&mut self) -> Result<Assembled, Error> {
        let a = self
            .ready
            .take()
            .ok_or_else(|| Error::Internal("no batch is prepared".into()))?;
        self.inner.seek(a.cursor.0, a.cursor.1)?;
        Ok(a)
    }

    /// Stops the assembling thread and forgets a batch received but not handed out.
    fn stop_ahead(&mut self) {
        self.ready = None;
        self.ahead = None;
        self.held = None;
    }
}

#[pymethods]
impl Reader {
    #[new]
    #[pyo3(signature = (
        paths, columns, *, batch_size, drop_last, shuffle, seed, window, shard, shards,
        epochs, num_threads, prefetch, pack = false, even = true
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        paths: Vec<(String, String)>,
        columns: Option<Vec<SpecTuple<'_>>>,
        batch_size: usize,
        drop_last: bool,
        shuffle: bool,
        seed: u64,
        window: usize,
        shard: usize,
        shards: usize,
        epochs: u64,
        num_threads: usize,
        prefetch: usize,
        pack: bool,
        even: bool,
    ) -> PyResult<Reader> {
        let specs = columns
            .unwrap_or_default()
            .into_iter()
            .map(spec_of)
            .collect::<PyResult<Vec<_>>>()?;
        let files = paths
            .into_iter()
            .map(|(p, f)| Format::from_name(&f).map(|f| (p, f)))
            .collect::<Result<Vec<_>, _>>()
            .py()?;
        let source = py.detach(|| Source::open(&files, &specs)).py()?;
        let opts = Options {
            batch_size,
            drop_last,
            sharding: Sharding {
                shuffle,
                seed,
                window,
                shard,
                shards,
                even,
            },
            epochs,
            threads: num_threads,
            prefetch,
            pack,
        };
        let inner = CoreReader::new(Arc::new(source), opts).py()?;
        Ok(Reader {
            inner,
            ahead: None,
            ready: None,
            held: None,
        })
    }

    /// `(name, dtype, fixed width, ragged levels, text kind)` of every output column; the
    /// text kind is "string" or "binary" for unhashed text, "" otherwise.
    fn schema(&self) -> Vec<(String, String, usize, usize, String)> {
        self.inner
            .source()
            .columns
            .iter()
            .map(|c| {
                let fixed = c.fixed.unwrap_or(0);
                let text = match (c.leaf, c.spec.hash) {
                    (Leaf::Text, None) if c.text_is_utf8() => "string",
                    (Leaf::Text, None) => "binary",
                    _ => "",
                };
                let (name, dtype) = (c.spec.name.clone(), c.out.name().to_string());
                (name, dtype, fixed, c.ragged_levels(), text.to_string())
            })
            .collect()
    }

    #[getter]
    fn total_rows(&self) -> usize {
        self.inner.source().total_rows()
    }

    /// Rows of each file, in the order the paths were given.
    #[getter]
    fn file_rows(&self) -> Vec<usize> {
        self.inner.source().file_rows()
    }

    #[getter]
    fn shard_rows(&self) -> usize {
        self.inner.shard_rows()
    }

    #[getter]
    fn batches_per_epoch(&self) -> usize {
        self.inner.batches_per_epoch()
    }

    fn cursor(&self) -> (u64, usize) {
        self.inner.cursor()
    }

    fn seek(&mut self, py: Python<'_>, epoch: u64, pos: usize) -> PyResult<()> {
        py.detach(|| {
            self.stop_ahead();
            self.inner.seek(epoch, pos)
        })
        .py()
    }

    /// Makes the reader end when its cursor reaches epoch `end`.
    fn set_end_epoch(&mut self, py: Python<'_>, end: u64) {
        py.detach(|| {
            self.stop_ahead();
            self.inner.set_end_epoch(end);
        });
    }

    /// Stops the decode (and assembling) threads; iteration resumes from the cursor.
    fn pause(&mut self, py: Python<'_>) {
        py.detach(|| {
            self.stop_ahead();
            self.inner.pause();
        });
    }

    /// Decodes the next batch (GIL released); returns its size in bytes, `None` at the end.
    fn prepare(&mut self, py: Python<'_>) -> PyResult<Option<usize>> {
        if let Some((_, layout)) = &self.held {
            return Ok(Some(layout.nbytes));
        }
        if self.inner.assembles_ahead() {
            return py.detach(|| self.receive()).py();
        }
        let inner = &mut self.inner;
        py.detach(|| inner.prepare_next().map(|l| l.map(|l| l.nbytes)))
            .py()
    }

    /// Packs the prepared batch into caller-owned memory (`ptr`, `nbytes`), for pinned
    /// buffers allocated by torch.
    fn fill_into(&mut self, py: Python<'_>, ptr: usize, nbytes: usize) -> PyResult<Layout> {
        if ptr == 0 {
            return Err(Error::InvalidArgument(
                "batch buffer pointer is null".into(),
            ))
            .py();
        }
        let layout = py
            .detach(|| {
                // SAFETY: the caller passes the address and size of a live, writable buffer
                // (a torch tensor it keeps alive across this call).
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, nbytes) };
                if let Some((slab, layout)) = &self.held {
                    check_fits(dst, layout.nbytes)?;
                    dst[..layout.nbytes].copy_from_slice(&slab.as_bytes()[..layout.nbytes]);
                    return Ok(layout.clone());
                }
                if !self.inner.assembles_ahead() {
                    return self.inner.fill_pending(dst);
                }
                self.receive()?;
                let need = self.ready.as_ref().map_or(0, |a| a.layout.nbytes);
                check_fits(dst, need)?;
                let a = self.deliver()?;
                dst[..need].copy_from_slice(&a.buffer.slab().as_bytes()[..need]);
                Ok(a.layout)
            })
            .py()?;
        Ok(layout_tuple(&layout))
    }

    /// Returns the prepared batch as a DLPack capsule with its layout: the packed chunk itself
    /// when the batch is one (see `pack`), else a buffer from the ring packed now.
    /// The batch stays held (given again by `prepare` and `fill_owned`) until
    /// `release_held`.
    fn fill_owned<'py>(&mut self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Layout)> {
        if let Some((slab, layout)) = &self.held {
            let shown = layout_tuple(layout);
            return Ok((slab_capsule(py, SlabRef::Shared(Arc::clone(slab)))?, shown));
        }
        let (slab, layout) = py
            .detach(|| {
                let none = || Error::Internal("no batch is prepared".into());
                if self.inner.assembles_ahead() {
                    self.receive()?.ok_or_else(none)?;
                    let a = self.deliver()?;
                    return Ok((a.buffer, a.layout));
                }
                self.inner.next_buffer()?.ok_or_else(none)
            })
            .py()?;
        let slab = match slab {
            SlabRef::Own(s) => Arc::new(s),
            SlabRef::Shared(s) => s,
        };
        self.held = Some((Arc::clone(&slab), layout.clone()));
        Ok((
            slab_capsule(py, SlabRef::Shared(slab))?,
            layout_tuple(&layout),
        ))
    }

    /// Python holds the batch `fill_owned` handed out: the next `prepare` reads on.
    fn release_held(&mut self) {
        self.held = None;
    }
}
