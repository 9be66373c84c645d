//! The kernels bound to the memory of torch tensors.
//!
//! Tensors cross as `(address, length)` pairs from `data_ptr()` and `numel()`: the Python side
//! (`recis_kernels/ops/_cpu_kernels.py`) passes contiguous CPU tensors of the named element type, keeps
//! them alive for the call and gives every call a fresh output that overlaps no input. What is
//! checked here is what that contract cannot promise by construction: matching list lengths,
//! parameters in range, and addresses that are non-null and aligned for the element type.

use std::mem::align_of;
use std::sync::{Arc, Condvar, Mutex};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::block_rows::{copy_rows as copy_block_rows_into, Blocks, Direction};
use crate::bucketize::bucketize_into;
use crate::cross::pair_hash_into;
use crate::divide::Divisor;
use crate::group::{group_pairs as group_pairs_into, Groups, Positions};
use crate::idmap::{claim, claim_blank, find, find_rows, Slots, SlotsMut};
use crate::interleave::{count_items, interleave, Interleaved, Member};
use crate::optim::{
    adam_apply as adam_apply_into, adam_block_rows as adam_block_rows_into,
    adam_moments as adam_moments_into, rowwise_adagrad_block_rows as rowwise_adagrad_into, Adam,
    AdamColumns, Rows, RowwiseAdagrad,
};
use crate::radix::sort_by_high_bits;
use crate::rows_grad::{rows_grad as rows_grad_into, Pooled};
use crate::shares::{share_count, split, Run};
use crate::truncate::{plan, Part};
use crate::uniform::hashed_uniform_into;

/// Fewest elements worth a thread of their own for the arithmetic kernels (a hand-off to a
/// pool thread costs a few microseconds, waking a sleeping one tens, and between the calls of
/// a feature pipeline the pool's threads fall asleep; this many remainders take about a
/// hundred; measured: 2**15 made the features benchmark slower on two threads).
const MIN_SHARE: usize = 1 << 17;

/// Fewest bytes worth a thread of their own for a copy: memory-bound, a copy gains from a
/// second thread only when it is large (measured: 800 KB copy faster on one thread than two).
const MIN_COPY_SHARE_BYTES: usize = 1 << 20;

fn value_error(message: String) -> PyErr {
    PyValueError::new_err(message)
}

fn check_address<T>(op: &str, what: &str, address: usize, len: usize) -> PyResult<()> {
    if len > 0 && (address == 0 || !address.is_multiple_of(align_of::<T>())) {
        return Err(value_error(format!(
            "{op}: {what} has address {address:#x}, null or not aligned to {} bytes",
            align_of::<T>()
        )));
    }
    Ok(())
}

fn check_parts<T>(op: &str, parts: &[(usize, usize)]) -> PyResult<Vec<usize>> {
    for (k, &(address, len)) in parts.iter().enumerate() {
        check_address::<T>(op, &format!("parts[{k}]"), address, len)?;
    }
    Ok(parts.iter().map(|&(_, len)| len).collect())
}

/// Offsets of consecutive blocks of lengths `lens`.
fn starts(lens: &[usize]) -> Vec<usize> {
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            let s = at;
            at += n;
            s
        })
        .collect()
}

/// The thread pool of this process. A forked child inherits the parent's pool object but not
/// its threads (work handed to them would wait forever), so a pool belongs to the process id
/// that built it and a child builds its own (the parent's is left alone, never dropped: its
/// threads cannot be joined there).
fn pool() -> Arc<ThreadPool> {
    static POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((owner, pool)) = guard.as_ref() {
        if *owner == pid {
            return Arc::clone(pool);
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("recis-kernels-{i}"))
            .build()
            .expect("building the CPU kernels' thread pool"),
    );
    if let Some(inherited) = guard.replace((pid, Arc::clone(&pool))) {
        std::mem::forget(inherited);
    }
    pool
}

/// Runs `work` over every element run of parts of lengths `lens`, shared out between up to
/// `threads` threads (the calling one included), each share at least `min_share` elements,
/// without the GIL.
fn run_shared<F>(py: Python<'_>, lens: &[usize], threads: usize, min_share: usize, work: F)
where
    F: Fn(Run) + Sync,
{
    let total = lens.iter().sum();
    let shares = split(lens, share_count(total, threads, min_share));
    let work = &work;
    let do_share = move |share: &[Run]| share.iter().for_each(|&r| work(r));
    py.detach(|| {
        if let [only] = shares.as_slice() {
            do_share(only);
            return;
        }
        pool().in_place_scope(|scope| {
            for share in &shares[1..] {
                scope.spawn(move |_| do_share(share));
            }
            do_share(&shares[0]);
        });
    });
}

/// Runs `job` on a pool thread; the returned [`Pending`] says when it is done (and waits for
/// it when dropped).
fn in_background(job: impl FnOnce() + Send + 'static) -> Pending {
    let state = Arc::new((Mutex::new(false), Condvar::new()));
    let signal = Arc::clone(&state);
    pool().spawn(move || {
        job();
        let (done, wake) = &*signal;
        *done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
    });
    Pending::new(state)
}

/// [`run_shared`], or with `background` every run on one pool thread while the caller goes on
/// (the caller keeps the memory `work` reads and writes alive and unread until the returned
/// [`Pending`] is done).
fn run_parts<F>(
    py: Python<'_>,
    lens: &[usize],
    threads: usize,
    min_share: usize,
    background: bool,
    work: F,
) -> Option<Pending>
where
    F: Fn(Run) + Send + Sync + 'static,
{
    if !background {
        run_shared(py, lens, threads, min_share, work);
        return None;
    }
    let runs: Vec<Run> = split(lens, 1).into_iter().flatten().collect();
    Some(in_background(move || runs.into_iter().for_each(work)))
}

/// `out[part k] = (uint64)parts[k] % divisors[k]`, the parts written one after another. With
/// `background`, the work runs on a pool thread and a `Pending` is returned (as for
/// `copy_rows`).
#[pyfunction]
#[pyo3(signature = (parts, divisors, out, threads, background=false))]
fn umod_parts(
    py: Python<'_>,
    parts: Vec<(usize, usize)>,
    divisors: Vec<u64>,
    out: usize,
    threads: usize,
    background: bool,
) -> PyResult<Option<Pending>> {
    let op = "umod_parts";
    if parts.len() != divisors.len() {
        return Err(value_error(format!(
            "{op}: got {} parts but {} divisors",
            parts.len(),
            divisors.len()
        )));
    }
    let divs = divisors
        .iter()
        .enumerate()
        .map(|(k, &d)| {
            Divisor::new(d).ok_or_else(|| {
                value_error(format!(
                    "{op}: divisors[{k}] = {d} is not in [1, 2**63 - 1]"
                ))
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let lens = check_parts::<u64>(op, &parts)?;
    let total: usize = lens.iter().sum();
    check_address::<u64>(op, "out", out, total)?;
    let at = starts(&lens);
    Ok(run_parts(
        py,
        &lens,
        threads,
        MIN_SHARE,
        background,
        move |r| {
            let n = r.end - r.start;
            // SAFETY: the caller's contract (module docs): part r.part holds lens[r.part] u64s
            // at its address, out holds `total`, and out overlaps no part. Runs are disjoint.
            let (x, o) = unsafe {
                (
                    std::slice::from_raw_parts((parts[r.part].0 as *const u64).add(r.start), n),
                    std::slice::from_raw_parts_mut((out as *mut u64).add(at[r.part] + r.start), n),
                )
            };
            divs[r.part].rem_into(x, o);
        },
    ))
}

/// `out[part k]` = the hash of each pair `(a[i], b[i])` of `a_parts[k]` and `b_parts[k]` (int64
/// ids, the parts of a pair equally long), as int64: the crossed ids of single-valued features;
/// with `divisors`, each part's hashes reduced to their unsigned remainder by `divisors[k]` (0:
/// kept whole) in the same pass.
#[pyfunction]
#[pyo3(signature = (a_parts, b_parts, out, threads, divisors=None))]
fn pair_hash_parts(
    py: Python<'_>,
    a_parts: Vec<(usize, usize)>,
    b_parts: Vec<(usize, usize)>,
    out: usize,
    threads: usize,
    divisors: Option<Vec<u64>>,
) -> PyResult<()> {
    let op = "pair_hash_parts";
    if a_parts.len() != b_parts.len() {
        return Err(value_error(format!(
            "{op}: got {} a parts but {} b parts",
            a_parts.len(),
            b_parts.len()
        )));
    }
    let divs: Vec<Option<Divisor>> = match &divisors {
        None => vec![None; a_parts.len()],
        Some(ds) => {
            if ds.len() != a_parts.len() {
                return Err(value_error(format!(
                    "{op}: got {} parts but {} divisors",
                    a_parts.len(),
                    ds.len()
                )));
            }
            ds.iter()
                .enumerate()
                .map(|(k, &d)| match d {
                    0 => Ok(None),
                    _ => Divisor::new(d).map(Some).ok_or_else(|| {
                        value_error(format!(
                            "{op}: divisors[{k}] = {d} is not 0 or in [1, 2**63 - 1]"
                        ))
                    }),
                })
                .collect::<PyResult<_>>()?
        }
    };
    let lens = check_parts::<u64>(op, &a_parts)?;
    check_parts::<u64>(op, &b_parts)?;
    if let Some(k) = (0..lens.len()).find(|&k| b_parts[k].1 != lens[k]) {
        return Err(value_error(format!(
            "{op}: part {k} has {} a ids but {} b ids",
            lens[k], b_parts[k].1
        )));
    }
    let total: usize = lens.iter().sum();
    check_address::<u64>(op, "out", out, total)?;
    let at = starts(&lens);
    run_shared(py, &lens, threads, MIN_SHARE, |r| {
        let n = r.end - r.start;
        // SAFETY: as in umod_parts, for both sides of each pair.
        let (a, b, o) = unsafe {
            (
                std::slice::from_raw_parts((a_parts[r.part].0 as *const u64).add(r.start), n),
                std::slice::from_raw_parts((b_parts[r.part].0 as *const u64).add(r.start), n),
                std::slice::from_raw_parts_mut((out as *mut u64).add(at[r.part] + r.start), n),
            )
        };
        match &divs[r.part] {
            None => pair_hash_into(a, b, o),
            Some(div) => {
                // Hashed a block at a time into the cache, then reduced into the output.
                let mut block = [0u64; 256];
                for ((a, b), o) in a.chunks(256).zip(b.chunks(256)).zip(o.chunks_mut(256)) {
                    let h = &mut block[..a.len()];
                    pair_hash_into(a, b, h);
                    div.rem_into(h, o);
                }
            }
        }
    });
    Ok(())
}

fn bucketize_typed<T: PartialOrd + Copy + Sync>(
    py: Python<'_>,
    parts: &[(usize, usize)],
    bounds: usize,
    bound_lens: &[usize],
    nan_buckets: &[i64],
    out: usize,
    threads: usize,
) -> PyResult<()> {
    let op = "bucketize_parts";
    let lens = check_parts::<T>(op, parts)?;
    let total: usize = lens.iter().sum();
    check_address::<T>(op, "bounds", bounds, bound_lens.iter().sum())?;
    check_address::<i64>(op, "out", out, total)?;
    let at = starts(&lens);
    let bound_at = starts(bound_lens);
    run_shared(py, &lens, threads, MIN_SHARE, |r| {
        let n = r.end - r.start;
        let b_len = bound_lens[r.part];
        // SAFETY: as in umod_parts; bounds holds the boundary lists back to back.
        let (b, x, o) = unsafe {
            (
                if b_len == 0 {
                    &[][..]
                } else {
                    std::slice::from_raw_parts((bounds as *const T).add(bound_at[r.part]), b_len)
                },
                std::slice::from_raw_parts((parts[r.part].0 as *const T).add(r.start), n),
                std::slice::from_raw_parts_mut((out as *mut i64).add(at[r.part] + r.start), n),
            )
        };
        bucketize_into(b, x, o, nan_buckets[r.part]);
    });
    Ok(())
}

/// `out[part k]` = the bucket of each value of `parts[k]` against boundary list k of `bounds`
/// (the lists back to back, `bound_lens[k]` each, sorted and NaN-free), as int64; the parts and
/// the boundaries are of `dtype` ("float32", "float64" or "int64"). NaN values of part k land
/// in bucket `nan_buckets[k]` (0 when `nan_buckets` is not given).
#[allow(clippy::too_many_arguments)]
#[pyfunction]
#[pyo3(signature = (dtype, parts, bounds, bound_lens, out, threads, nan_buckets=None))]
fn bucketize_parts(
    py: Python<'_>,
    dtype: &str,
    parts: Vec<(usize, usize)>,
    bounds: usize,
    bound_lens: Vec<usize>,
    out: usize,
    threads: usize,
    nan_buckets: Option<Vec<i64>>,
) -> PyResult<()> {
    if parts.len() != bound_lens.len() {
        return Err(value_error(format!(
            "bucketize_parts: got {} parts but {} boundary lists",
            parts.len(),
            bound_lens.len()
        )));
    }
    let nan = nan_buckets.unwrap_or_else(|| vec![0; parts.len()]);
    if nan.len() != parts.len() {
        return Err(value_error(format!(
            "bucketize_parts: got {} parts but {} NaN buckets",
            parts.len(),
            nan.len()
        )));
    }
    let (lens, nan) = (&bound_lens, &nan);
    match dtype {
        "float32" => bucketize_typed::<f32>(py, &parts, bounds, lens, nan, out, threads),
        "float64" => bucketize_typed::<f64>(py, &parts, bounds, lens, nan, out, threads),
        "int64" => bucketize_typed::<i64>(py, &parts, bounds, lens, nan, out, threads),
        other => Err(value_error(format!(
            "bucketize_parts: dtype must be float32, float64 or int64, got {other:?}"
        ))),
    }
}

/// The ranges a 2-level truncation keeps (see `truncate::plan`): rows `offsets[i]..offsets[i +
/// 1]` (`rows + 1` int64s at `offsets`) in consecutive parts `(rows, max_len, tail)`; `out`
/// holds `4 * rows + 1` int64s, written as the new offsets (`rows + 1`), then the rows' first
/// kept items, dropped counts and padded counts (`rows` each). Returns the kept items' count.
#[pyfunction]
fn truncate_plan(
    offsets: usize,
    rows: usize,
    parts: Vec<(usize, i64, bool)>,
    out: usize,
) -> PyResult<i64> {
    let op = "truncate_plan";
    if parts.iter().map(|p| p.0).sum::<usize>() != rows {
        return Err(value_error(format!(
            "{op}: the parts' rows do not add up to {rows}"
        )));
    }
    if parts.iter().any(|p| p.1 < 0) {
        return Err(value_error(format!("{op}: a max_len is negative")));
    }
    check_address::<i64>(op, "offsets", offsets, rows + 1)?;
    check_address::<i64>(op, "out", out, 4 * rows + 1)?;
    let parts: Vec<Part> = parts
        .into_iter()
        .map(|(rows, max_len, tail)| Part {
            rows,
            max_len,
            tail,
        })
        .collect();
    // SAFETY: the caller's contract: rows + 1 int64 offsets, and 4 * rows + 1 int64s at out,
    // a fresh buffer overlapping the offsets nowhere.
    let (offsets, out) = unsafe {
        (
            std::slice::from_raw_parts(offsets as *const i64, rows + 1),
            std::slice::from_raw_parts_mut(out as *mut i64, 4 * rows + 1),
        )
    };
    let (new_offsets, rest) = out.split_at_mut(rows + 1);
    let (starts, rest) = rest.split_at_mut(rows);
    let (dropped, padded) = rest.split_at_mut(rows);
    Ok(plan(offsets, &parts, new_offsets, starts, dropped, padded))
}

/// `out` (`n` rows of `dim` float64s) = the uniforms of `ids` (`n` int64s), column `j` of id
/// `i` under `seeds[i]`, or under `seeds[0]` for every id when `seed_count` is 1 (see
/// `uniform`): the random draws of the embedding initializers.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn hashed_uniform(
    py: Python<'_>,
    ids: usize,
    n: usize,
    seeds: usize,
    seed_count: usize,
    dim: usize,
    out: usize,
    threads: usize,
) -> PyResult<()> {
    let op = "hashed_uniform";
    if seed_count != 1 && seed_count != n {
        return Err(value_error(format!(
            "{op}: got {seed_count} seeds for {n} ids: one seed, or one per id"
        )));
    }
    let total = n
        .checked_mul(dim)
        .ok_or_else(|| value_error(format!("{op}: {n} ids of {dim} columns overflow")))?;
    check_address::<i64>(op, "ids", ids, n)?;
    check_address::<i64>(op, "seeds", seeds, seed_count)?;
    check_address::<f64>(op, "out", out, total)?;
    if total == 0 {
        return Ok(());
    }
    run_shared(py, &[n], threads, (MIN_SHARE / dim).max(1), |r| {
        let count = r.end - r.start;
        let (first, seeds_len) = if seed_count == 1 {
            (0, 1)
        } else {
            (r.start, count)
        };
        // SAFETY: the caller's contract (module docs): n int64 ids, seed_count int64 seeds and
        // n * dim float64s at out, which overlaps neither. Runs are disjoint row ranges.
        let (ids, seeds, out) = unsafe {
            (
                std::slice::from_raw_parts((ids as *const i64).add(r.start), count),
                std::slice::from_raw_parts((seeds as *const i64).add(first), seeds_len),
                std::slice::from_raw_parts_mut((out as *mut f64).add(r.start * dim), count * dim),
            )
        };
        hashed_uniform_into(ids, seeds, dim, out);
    });
    Ok(())
}

/// Work running on a pool thread (`copy_rows(..., background=True)`, `umod_parts(...,
/// background=True)`): `wait()` returns once it is done. The buffers the work reads and writes
/// are handed to `hold()` and released only once it is done, and dropping the object waits for
/// the work first, so they are never freed under it whatever order the caller lets go of
/// things in. A forked child inherits the object but not the pool thread: there `wait()` raises
/// (the work never runs in the child) and dropping it does not wait.
#[pyclass(frozen, module = "recis_kernels._native")]
struct Pending {
    state: Arc<(Mutex<bool>, Condvar)>,
    /// The process whose pool runs the work.
    pid: u32,
    /// What the work reads and writes, kept alive until it is done (and this is dropped).
    held: Mutex<Vec<Py<PyAny>>>,
}

impl Pending {
    fn new(state: Arc<(Mutex<bool>, Condvar)>) -> Pending {
        Pending {
            state,
            pid: std::process::id(),
            held: Mutex::new(Vec::new()),
        }
    }

    fn block(&self) {
        let (done, signal) = &*self.state;
        let mut done = done.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while !*done {
            done = signal
                .wait(done)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

#[pymethods]
impl Pending {
    /// Blocks, without the GIL, until the work is done.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let here = std::process::id();
        if here != self.pid {
            return Err(PyRuntimeError::new_err(format!(
                "this work was started in process {} before it forked; it never runs in this \
                 process ({here}), so its results are never complete here",
                self.pid
            )));
        }
        py.detach(|| self.block());
        Ok(())
    }

    /// Keeps `objects` (the buffers the work reads and writes) alive until the work is done.
    #[pyo3(signature = (*objects))]
    fn hold(&self, objects: Vec<Py<PyAny>>) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(objects);
    }

    /// Whether the work is done.
    #[getter]
    fn done(&self) -> bool {
        *self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // In a forked child the work never runs: waiting would never end, and the buffers
        // held are the child's copies, which nothing writes to.
        if std::process::id() == self.pid {
            self.block();
        }
        // `held` is released after this, once the work is done.
    }
}

/// Copies rows of `item`-byte items: row i's `dst_offsets[i + 1] - dst_offsets[i]` items from
/// item `src_starts[i]` of `src` (`src_len` items) to item `dst_offsets[i]` of `dst` (`dst_len`
/// items); `src_starts` holds `rows` int64s, `dst_offsets` `rows + 1`. Every range is checked to
/// lie in its buffer before anything is copied. With `background`, the copy itself runs on a
/// pool thread and a `Pending` is returned: the caller keeps `src` and `dst` alive and leaves
/// `dst` unread until its `wait()` returns.
#[allow(clippy::too_many_arguments)]
#[pyfunction]
#[pyo3(signature = (src, src_len, dst, dst_len, item, src_starts, dst_offsets, rows, threads, background=false))]
fn copy_rows(
    py: Python<'_>,
    src: usize,
    src_len: usize,
    dst: usize,
    dst_len: usize,
    item: usize,
    src_starts: usize,
    dst_offsets: usize,
    rows: usize,
    threads: usize,
    background: bool,
) -> PyResult<Option<Pending>> {
    let op = "copy_rows";
    check_address::<i64>(op, "src_starts", src_starts, rows)?;
    check_address::<i64>(op, "dst_offsets", dst_offsets, rows + 1)?;
    // SAFETY: the caller's contract: rows int64 starts and rows + 1 int64 offsets.
    let (starts, offsets) = unsafe {
        (
            if rows == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(src_starts as *const i64, rows)
            },
            std::slice::from_raw_parts(dst_offsets as *const i64, rows + 1),
        )
    };
    // Rows whose source ranges follow one another (rows that keep all their items) are merged
    // into one block copy: (source item, destination item, items).
    let mut blocks: Vec<(usize, usize, usize)> = Vec::new();
    for i in 0..rows {
        let (start, lo, hi) = (starts[i], offsets[i], offsets[i + 1]);
        let fits = start >= 0
            && lo >= 0
            && hi >= lo
            && (hi as u64) <= dst_len as u64
            && (start as u64).saturating_add((hi - lo) as u64) <= src_len as u64;
        if !fits {
            return Err(value_error(format!(
                "{op}: row {i} copies items {start}..{} of {src_len} into {lo}..{hi} of {dst_len}",
                start.saturating_add(hi.saturating_sub(lo).max(0))
            )));
        }
        let (from, to, n) = (start as usize, lo as usize, (hi - lo) as usize);
        if n == 0 {
            continue;
        }
        match blocks.last_mut() {
            Some(last) if last.0 + last.2 == from && last.1 + last.2 == to => last.2 += n,
            _ => blocks.push((from, to, n)),
        }
    }
    if blocks.is_empty() || item == 0 {
        return Ok(None);
    }
    check_address::<u8>(op, "src", src, src_len)?;
    check_address::<u8>(op, "dst", dst, dst_len)?;
    if background {
        return Ok(Some(in_background(move || {
            for (from, to, n) in blocks {
                // SAFETY: as below; the caller keeps both buffers alive until the copy is done.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (src as *const u8).add(from * item),
                        (dst as *mut u8).add(to * item),
                        n * item,
                    );
                }
            }
        })));
    }
    let lens: Vec<usize> = blocks.iter().map(|b| b.2).collect();
    run_shared(py, &lens, threads, MIN_COPY_SHARE_BYTES / item, |r| {
        let (from, to, _) = blocks[r.part];
        // SAFETY: every row's ranges were checked to lie in their buffers above (a block spans
        // whole rows), dst is a fresh output overlapping no input (the module's contract), and
        // runs are disjoint.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (src as *const u8).add((from + r.start) * item),
                (dst as *mut u8).add((to + r.start) * item),
                (r.end - r.start) * item,
            );
        }
    });
    Ok(None)
}

/// Sorts the `len` int64 values at `data` in place, stably by the signed value of their bits
/// above the lowest `low_bits` (0 to 63; 0 sorts the whole values), without the GIL.
#[pyfunction]
fn sort_int64_by_high_bits(py: Python<'_>, data: usize, len: usize, low_bits: u32) -> PyResult<()> {
    let op = "sort_int64_by_high_bits";
    if low_bits > 63 {
        return Err(value_error(format!(
            "{op}: low_bits must be 0 to 63, got {low_bits}"
        )));
    }
    check_address::<i64>(op, "data", data, len)?;
    if len < 2 {
        return Ok(());
    }
    // SAFETY: the caller's contract: len int64 values at data, not read elsewhere meanwhile.
    let values = unsafe { std::slice::from_raw_parts_mut(data as *mut i64, len) };
    py.detach(|| sort_by_high_bits(values, low_bits));
    Ok(())
}

/// Slices over the slot arrays of an `IdMap` of `capacity` slots (a power of two): int64 ids,
/// int32 tables, int8 states.
fn check_slots(op: &str, slots: (usize, usize, usize), capacity: usize) -> PyResult<()> {
    if !capacity.is_power_of_two() {
        return Err(value_error(format!(
            "{op}: capacity must be a power of two, got {capacity}"
        )));
    }
    check_address::<i64>(op, "slot_keys", slots.0, capacity)?;
    check_address::<i32>(op, "slot_tabs", slots.1, capacity)?;
    check_address::<i8>(op, "slot_state", slots.2, capacity)
}

/// The `n` queries: int64 ids at `keys`, int32 tables at `tabs`, and `n` int64s at `out`.
fn check_queries(op: &str, keys: usize, tabs: usize, out: usize, n: usize) -> PyResult<()> {
    check_address::<i64>(op, "keys", keys, n)?;
    check_address::<i32>(op, "tabs", tabs, n)?;
    check_address::<i64>(op, "out", out, n)
}

/// # Safety
///
/// `n` elements of `T` at `address`, checked non-null and aligned unless `n == 0`.
unsafe fn slice<'a, T>(address: usize, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(address as *const T, n)
    }
}

/// # Safety
///
/// As `slice`, and nothing else reads or writes the memory meanwhile.
unsafe fn slice_mut<'a, T>(address: usize, n: usize) -> &'a mut [T] {
    if n == 0 {
        &mut []
    } else {
        std::slice::from_raw_parts_mut(address as *mut T, n)
    }
}

/// The slot of each of `n` pairs in the map's slot arrays `slots` (ids, tables, states), or
/// -1 where absent, written to `out`, without the GIL; given the map's slot rows (`rows`,
/// `capacity` int64s), the row of each found pair instead of its slot.
#[pyfunction]
#[pyo3(signature = (slots, capacity, keys, tabs, n, out, rows=None))]
#[allow(clippy::too_many_arguments)]
fn idmap_find(
    py: Python<'_>,
    slots: (usize, usize, usize),
    capacity: usize,
    keys: usize,
    tabs: usize,
    n: usize,
    out: usize,
    rows: Option<usize>,
) -> PyResult<()> {
    let op = "idmap_find";
    check_slots(op, slots, capacity)?;
    check_queries(op, keys, tabs, out, n)?;
    if let Some(address) = rows {
        check_address::<i64>(op, "rows", address, capacity)?;
    }
    // SAFETY: the caller's contract: the map's slot arrays of `capacity` slots, `n` queries and
    // a fresh output of `n` int64s; addresses checked above.
    let (map, keys, tabs, out) = unsafe {
        (
            Slots {
                keys: slice(slots.0, capacity),
                tabs: slice(slots.1, capacity),
                state: slice(slots.2, capacity),
            },
            slice::<i64>(keys, n),
            slice::<i32>(tabs, n),
            slice_mut::<i64>(out, n),
        )
    };
    // SAFETY: the caller's contract: the map's `capacity` slot rows.
    let rows = rows.map(|address| unsafe { slice::<i64>(address, capacity) });
    py.detach(|| match rows {
        Some(rows) => find_rows(&map, rows, keys, tabs, out),
        None => find(&map, keys, tabs, out),
    });
    Ok(())
}

/// The pairs a claim kernel places and where it writes: the map's slot arrays `slots` of
/// `capacity` slots, `n` int64 ids at `keys` and int32 tables at `tabs`, and `n` int64 slots at
/// `out`, checked.
///
/// # Safety
///
/// The caller's contract of the claim kernels: the slot arrays are the map's own, written by
/// this call only, and `out` is a fresh output of `n` int64s.
#[allow(clippy::type_complexity)]
unsafe fn claim_args<'a>(
    op: &str,
    slots: (usize, usize, usize),
    capacity: usize,
    (keys, tabs, n, out): (usize, usize, usize, usize),
) -> PyResult<(SlotsMut<'a>, &'a [i64], &'a [i32], &'a mut [i64])> {
    check_slots(op, slots, capacity)?;
    check_queries(op, keys, tabs, out, n)?;
    Ok((
        SlotsMut {
            keys: slice_mut(slots.0, capacity),
            tabs: slice_mut(slots.1, capacity),
            state: slice_mut(slots.2, capacity),
        },
        slice::<i64>(keys, n),
        slice::<i32>(tabs, n),
        slice_mut::<i64>(out, n),
    ))
}

/// Places `n` distinct pairs absent from the map into its slot arrays `slots` in claim rounds
/// (see `idmap::claim`), writing their slots to `out`; returns how many tombstones they took.
#[pyfunction]
fn idmap_claim(
    py: Python<'_>,
    slots: (usize, usize, usize),
    capacity: usize,
    keys: usize,
    tabs: usize,
    n: usize,
    out: usize,
) -> PyResult<usize> {
    let op = "idmap_claim";
    // SAFETY: as in idmap_find; the slot arrays are the map's own, written by this call only.
    let (mut map, keys_in, tabs_in, out) =
        unsafe { claim_args(op, slots, capacity, (keys, tabs, n, out))? };
    py.detach(|| claim(&mut map, keys_in, tabs_in, out))
        .map_err(|i| {
            PyRuntimeError::new_err(format!(
                "{op}: no free slot for pair {i} of {n} in a map of {capacity} slots (the map \
                 grows before this can happen; please report it)"
            ))
        })
}

/// Places `n` distinct pairs into the slot arrays `slots` of a map whose slots are all empty
/// (see `idmap::claim_blank`), writing their slots to `out`.
#[pyfunction]
fn idmap_claim_blank(
    py: Python<'_>,
    slots: (usize, usize, usize),
    capacity: usize,
    keys: usize,
    tabs: usize,
    n: usize,
    out: usize,
) -> PyResult<()> {
    let op = "idmap_claim_blank";
    if n > capacity {
        return Err(value_error(format!(
            "{op}: {n} pairs do not fit a map of {capacity} slots"
        )));
    }
    // SAFETY: as in idmap_claim.
    let (mut map, keys_in, tabs_in, out) =
        unsafe { claim_args(op, slots, capacity, (keys, tabs, n, out))? };
    py.detach(|| claim_blank(&mut map, keys_in, tabs_in, out));
    Ok(())
}

/// Groups `n` pairs (int64 ids at `keys`, int32 tables at `tabs`) by equal pair; `out` is
/// `(keys, tabs, inverse)`: `n` int64s, `n` int32s and `n` int64s, and `positions`, when given,
/// `(order, offsets)`: `n` and `n + 1` int64s (see `group::Groups`). Returns the number of
/// distinct pairs.
#[pyfunction]
#[pyo3(signature = (keys, tabs, n, out, positions=None))]
fn group_pairs(
    py: Python<'_>,
    keys: usize,
    tabs: usize,
    n: usize,
    out: (usize, usize, usize),
    positions: Option<(usize, usize)>,
) -> PyResult<usize> {
    let op = "group_pairs";
    if n >= u32::MAX as usize {
        return Err(value_error(format!("{op}: {n} pairs, more than it groups")));
    }
    check_address::<i64>(op, "keys", keys, n)?;
    check_address::<i32>(op, "tabs", tabs, n)?;
    check_address::<i64>(op, "out keys", out.0, n)?;
    check_address::<i32>(op, "out tabs", out.1, n)?;
    check_address::<i64>(op, "inverse", out.2, n)?;
    if let Some((order, offsets)) = positions {
        check_address::<i64>(op, "order", order, n)?;
        check_address::<i64>(op, "offsets", offsets, n + 1)?;
    }
    // SAFETY: the caller's contract: the inputs, and fresh outputs overlapping nothing.
    let (keys, tabs, mut groups) = unsafe {
        (
            slice::<i64>(keys, n),
            slice::<i32>(tabs, n),
            Groups {
                keys: slice_mut(out.0, n),
                tabs: slice_mut(out.1, n),
                inverse: slice_mut(out.2, n),
                positions: positions.map(|(order, offsets)| Positions {
                    order: slice_mut(order, n),
                    offsets: std::slice::from_raw_parts_mut(offsets as *mut i64, n + 1),
                }),
            },
        )
    };
    Ok(py.detach(|| group_pairs_into(keys, tabs, &mut groups)))
}

/// Checks rows of float32s given as `(address, row stride in floats)`: non-null and aligned,
/// each stride at least its row's width (`widths`).
fn check_float_rows<const K: usize>(
    op: &str,
    rows: [(usize, usize); K],
    widths: [usize; K],
    n: usize,
) -> PyResult<()> {
    for (k, (&(address, stride), &width)) in rows.iter().zip(&widths).enumerate() {
        if n > 1 && stride < width {
            return Err(value_error(format!(
                "{op}: rows[{k}] has stride {stride}, narrower than its rows of {width}"
            )));
        }
        check_address::<f32>(op, &format!("rows[{k}]"), address, n * width)?;
    }
    Ok(())
}

/// `(address, row stride)` pairs as row views.
fn float_rows<const K: usize>(rows: [(usize, usize); K]) -> [Rows; K] {
    rows.map(|(address, stride)| Rows {
        ptr: address as *mut f32,
        stride,
    })
}

/// The first half of `torch.optim.Adam`/`AdamW` on `n` rows of `d` float32s (see
/// `optim::adam_moments`): `rows` is `(param, grad, exp_avg, exp_avg_sq, step)`, each
/// `(address, row stride in floats)` (`step` one float per row); `hyper` is `(beta1, beta2, l2,
/// decay)`. Without the GIL.
#[pyfunction]
fn adam_moments(
    py: Python<'_>,
    rows: [(usize, usize); 5],
    n: usize,
    d: usize,
    hyper: (f64, f64, f32, f32),
) -> PyResult<()> {
    check_float_rows("adam_moments", rows, [d, d, d, d, 1], n)?;
    let (beta1, beta2, l2, decay) = hyper;
    let h = Adam {
        beta1,
        beta2,
        l2,
        decay,
    };
    // Raw pointers are not Send: the addresses cross into the GIL-free closure as integers.
    py.detach(move || {
        let [param, grad, exp_avg, exp_avg_sq, step] = float_rows(rows);
        // SAFETY: the caller's contract: five views of n rows of valid float32s, sharing no
        // element (columns of one gathered buffer, or separate tensors); addresses checked.
        unsafe { adam_moments_into(param, grad, exp_avg, exp_avg_sq, step, n, d, &h) }
    });
    Ok(())
}

/// The second half (see `optim::adam_apply`): `rows` is `(param, exp_avg, root, step_size,
/// bc2_sqrt)`, `root` the square roots of the second moments, the last two one float per row.
#[pyfunction]
fn adam_apply(
    py: Python<'_>,
    rows: [(usize, usize); 5],
    n: usize,
    d: usize,
    eps: f32,
) -> PyResult<()> {
    check_float_rows("adam_apply", rows, [d, d, d, 1, 1], n)?;
    py.detach(move || {
        let [param, exp_avg, root, step_size, bc2] = float_rows(rows);
        // SAFETY: as in adam_moments.
        unsafe { adam_apply_into(param, exp_avg, root, [step_size, bc2], n, d, eps) }
    });
    Ok(())
}

/// A member of `interleave_bags` as Python passes it: `(values, len, offsets, label, scale)`.
type MemberArgs = (usize, usize, Option<usize>, i32, Option<usize>);

/// Lays ragged members out row by row (see `interleave::interleave`). Each member is
/// `(values, len, offsets, label, scale)`: `len` int64 values, `rows + 1` int64 offsets or
/// `None` for one value per row, its label, and `rows` float32 scales or `None`; `out` is
/// `(values, labels, weights, bags)` for `n` int64s, `n` int32s, `n` float32s or `None`, and
/// `rows * members + 1` int64s. The members are checked first: a bad one raises, naming it,
/// and so does an `n` that is not their item count. Without the GIL.
#[pyfunction]
fn interleave_bags(
    py: Python<'_>,
    members: Vec<MemberArgs>,
    rows: usize,
    n: usize,
    out: (usize, usize, Option<usize>, usize),
) -> PyResult<()> {
    let op = "interleave_bags";
    for (k, &(values, len, offsets, _, scale)) in members.iter().enumerate() {
        check_address::<i64>(op, &format!("members[{k}] values"), values, len)?;
        if let Some(offsets) = offsets {
            check_address::<i64>(op, &format!("members[{k}] offsets"), offsets, rows + 1)?;
        }
        if let Some(scale) = scale {
            check_address::<f32>(op, &format!("members[{k}] scale"), scale, rows)?;
        }
    }
    check_address::<i64>(op, "values", out.0, n)?;
    check_address::<i32>(op, "labels", out.1, n)?;
    if let Some(weights) = out.2 {
        check_address::<f32>(op, "weights", weights, n)?;
    }
    check_address::<i64>(op, "bags", out.3, rows * members.len() + 1)?;
    // SAFETY: the caller's contract: each member's buffers hold the lengths given, and the
    // outputs are fresh buffers of the lengths above, overlapping nothing.
    let views: Vec<Member<'_>> = members
        .iter()
        .map(|&(values, len, offsets, label, scale)| unsafe {
            Member {
                values: slice(values, len),
                offsets: offsets.map(|o| std::slice::from_raw_parts(o as *const i64, rows + 1)),
                label,
                scale: scale.map(|s| slice(s, rows)),
            }
        })
        .collect();
    let total = count_items(&views, rows).map_err(|e| value_error(format!("{op}: {e}")))?;
    if total != n {
        return Err(value_error(format!(
            "{op}: the members hold {total} items, the outputs {n}"
        )));
    }
    let mut target = unsafe {
        Interleaved {
            values: slice_mut(out.0, n),
            labels: slice_mut(out.1, n),
            weights: out.2.map(|w| slice_mut(w, n)),
            bags: std::slice::from_raw_parts_mut(out.3 as *mut i64, rows * members.len() + 1),
        }
    };
    py.detach(|| interleave(&views, rows, &mut target));
    Ok(())
}

/// Copies bytes `[start, start + len)` of the rows `rows` (`n` int64s) of a blocked row store
/// (`blocks`: each block's address, `1 << shift` rows of `row_bytes` bytes) to consecutive
/// rows of `stride` bytes at `data` (`gather`) or back (`!gather`), in the order listed,
/// without the GIL. A row outside the store raises before anything is copied.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn copy_block_rows(
    py: Python<'_>,
    blocks: Vec<usize>,
    shift: u32,
    row_bytes: usize,
    rows: usize,
    n: usize,
    start: usize,
    len: usize,
    data: usize,
    stride: usize,
    gather: bool,
) -> PyResult<()> {
    let op = "copy_block_rows";
    if shift > 40 || start.checked_add(len).is_none_or(|end| end > row_bytes) || stride < len {
        return Err(value_error(format!(
            "{op}: bytes {start}..{} of rows of {row_bytes} into rows of {stride} (shift {shift})",
            start.saturating_add(len)
        )));
    }
    check_address::<i64>(op, "rows", rows, n)?;
    for (k, &b) in blocks.iter().enumerate() {
        check_address::<u8>(op, &format!("blocks[{k}]"), b, 1)?;
    }
    check_address::<u8>(op, "data", data, n * len)?;
    // SAFETY: the caller's contract: n int64 rows.
    let rows = unsafe { slice::<i64>(rows, n) };
    let store = Blocks {
        ptrs: &blocks,
        shift,
        row_bytes,
    };
    if let Some(i) = store.first_bad(rows) {
        return Err(value_error(format!(
            "{op}: rows[{i}] = {} is outside the {} rows of the store",
            rows[i],
            blocks.len() << shift
        )));
    }
    let direction = if gather {
        Direction::Gather
    } else {
        Direction::Scatter
    };
    // SAFETY: blocks of 1 << shift rows of row_bytes bytes and a buffer of n rows of stride
    // bytes overlapping no block (the caller's contract); the byte range and every row were
    // checked above.
    py.detach(|| unsafe {
        copy_block_rows_into(&store, rows, start, len, data as *mut u8, stride, direction)
    });
    Ok(())
}

/// What an in-place update of store rows takes, checked: `columns` (each `(first column,
/// width)`) inside rows of `width` floats and apart, `n` int64 rows at `rows` in range, every
/// block an address, and the `(n, d)` float32 gradient at `grad`. Returns the rows, the
/// gradient and the blocks (`1 << shift` rows of `width` floats each).
#[allow(clippy::too_many_arguments)]
fn store_update<'a>(
    op: &str,
    blocks: &'a [usize],
    shift: u32,
    width: usize,
    rows: usize,
    n: usize,
    (grad, d): (usize, usize),
    columns: &[(usize, usize)],
) -> PyResult<(&'a [i64], &'a [f32], Blocks<'a>)> {
    // Checked sums: columns near usize::MAX must not wrap into range.
    let end = |c: usize, w: usize| c.checked_add(w).filter(|&e| w > 0 && e <= width);
    let inside = columns.iter().all(|&(c, w)| end(c, w).is_some());
    let apart = inside
        && columns.iter().enumerate().all(|(k, &(c, w))| {
            columns[..k]
                .iter()
                .all(|&(c2, w2)| c + w <= c2 || c2 + w2 <= c)
        });
    if shift > 40 || !apart {
        return Err(value_error(format!(
            "{op}: columns (first, width) {columns:?} must lie apart in rows of {width} floats \
             (shift {shift})"
        )));
    }
    check_address::<i64>(op, "rows", rows, n)?;
    let len = n.checked_mul(d).ok_or_else(|| {
        value_error(format!(
            "{op}: a gradient of {n} rows of {d} floats is too large"
        ))
    })?;
    check_address::<f32>(op, "grad", grad, len)?;
    for (k, &b) in blocks.iter().enumerate() {
        check_address::<f32>(op, &format!("blocks[{k}]"), b, 1)?;
    }
    // SAFETY: the caller's contract: n int64 rows and n * d float32 gradients.
    let (rows, grad) = unsafe { (slice::<i64>(rows, n), slice::<f32>(grad, len)) };
    let store = Blocks {
        ptrs: blocks,
        shift,
        row_bytes: width * 4,
    };
    if let Some(i) = store.first_bad(rows) {
        return Err(value_error(format!(
            "{op}: rows[{i}] = {} is outside the {} rows of the store",
            rows[i],
            blocks.len() << shift
        )));
    }
    Ok((rows, grad, store))
}

/// `torch.optim.Adam` / `AdamW` (see `optim::adam_block_rows`) on `n` distinct rows (int64 at
/// `rows`) of a blocked row store of float32 rows (`blocks`: each block's address, `1 << shift`
/// rows of `width` floats), in one pass where they live: `columns` are the first columns of
/// the `d` parameters, the `d` first and `d` second moments and the update count; the `(n, d)`
/// float32 gradient is at `grad`; `hyper` is `(beta1, beta2, l2, decay)`. A row outside the
/// store raises before anything is updated. Without the GIL.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn adam_block_rows(
    py: Python<'_>,
    blocks: Vec<usize>,
    shift: u32,
    width: usize,
    rows: usize,
    n: usize,
    grad: usize,
    d: usize,
    columns: (usize, usize, usize, usize),
    hyper: (f64, f64, f32, f32),
    lr: f64,
    eps: f32,
) -> PyResult<()> {
    let op = "adam_block_rows";
    let (param, exp_avg, exp_avg_sq, step) = columns;
    let spans = [(param, d), (exp_avg, d), (exp_avg_sq, d), (step, 1)];
    let (rows, grad, store) = store_update(op, &blocks, shift, width, rows, n, (grad, d), &spans)?;
    let (beta1, beta2, l2, decay) = hyper;
    let h = Adam {
        beta1,
        beta2,
        l2,
        decay,
    };
    let cols = AdamColumns {
        param,
        exp_avg,
        exp_avg_sq,
        step,
    };
    // SAFETY: every row in range and (the caller's contract) listed once, the columns inside
    // a row and apart (checked above), the gradient overlapping no block (the caller's
    // contract).
    py.detach(|| unsafe { adam_block_rows_into(&store, rows, grad, d, cols, &h, lr, eps) });
    Ok(())
}

/// Row-wise Adagrad (see `optim::rowwise_adagrad_block_rows`) on `n` distinct rows (int64 at
/// `rows`) of a blocked row store of float32 rows (`blocks`: each block's address, `1 << shift`
/// rows of `width` floats): the `d` parameters from column `param` and the accumulator in
/// column `state` of each take the `(n, d)` float32 gradient at `grad`, where the rows live,
/// without the GIL. A row outside the store raises before anything is updated.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn rowwise_adagrad_block_rows(
    py: Python<'_>,
    blocks: Vec<usize>,
    shift: u32,
    width: usize,
    rows: usize,
    n: usize,
    grad: usize,
    d: usize,
    columns: (usize, usize),
    hyper: (f32, f32, f32),
) -> PyResult<()> {
    let op = "rowwise_adagrad_block_rows";
    let (param, state) = columns;
    let spans = [(param, d), (state, 1)];
    let (rows, grad, store) = store_update(op, &blocks, shift, width, rows, n, (grad, d), &spans)?;
    let (lr, eps, weight_decay) = hyper;
    let h = RowwiseAdagrad {
        lr,
        eps,
        weight_decay,
    };
    // SAFETY: blocks of 1 << shift rows of width float32s and a gradient overlapping no block
    // (the caller's contract); the columns and every row were checked above, the rows are
    // distinct (the caller's contract).
    py.detach(|| unsafe { rowwise_adagrad_into(&store, rows, grad, d, param, state, &h) });
    Ok(())
}

/// The gradient of a sum-pooled lookup for its `rows` distinct rows (see
/// `rows_grad::rows_grad`), added into the zeroed `rows * d` float32s at `out`, without the
/// GIL: `grad_out` holds `m * d` float32s (`bags`: `m + 1` int64 offsets from 0 to `n`) or
/// `n * d` (no bags), `inverse` `n` int64 rows, `weights` `n` float32s or none. Malformed bags
/// raise before anything is added, a row out of range when it is met.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn pooled_rows_grad(
    py: Python<'_>,
    grad_out: usize,
    m: usize,
    d: usize,
    bags: Option<usize>,
    inverse: usize,
    n: usize,
    weights: Option<usize>,
    out: usize,
    rows: usize,
) -> PyResult<()> {
    let op = "pooled_rows_grad";
    if d == 0 || (bags.is_none() && m != n) {
        return Err(value_error(format!(
            "{op}: {m} bags of {d} floats for {n} ids"
        )));
    }
    check_address::<f32>(op, "grad_out", grad_out, m * d)?;
    check_address::<i64>(op, "inverse", inverse, n)?;
    check_address::<f32>(op, "out", out, rows * d)?;
    // SAFETY: the caller's contract: valid inputs of these lengths and a fresh output.
    let (grad_out, inverse, out) = unsafe {
        (
            slice::<f32>(grad_out, m * d),
            slice::<i64>(inverse, n),
            slice_mut::<f32>(out, rows * d),
        )
    };
    let bags = match bags {
        None => None,
        Some(address) => {
            check_address::<i64>(op, "bags", address, m + 1)?;
            // SAFETY: the caller's contract: m + 1 int64 offsets.
            let b = unsafe { slice::<i64>(address, m + 1) };
            if b[0] != 0 || b[m] != n as i64 {
                return Err(value_error(format!(
                    "{op}: bag offsets run from {} to {}, expected 0 to {n}",
                    b[0], b[m]
                )));
            }
            if let Some(k) = b.windows(2).position(|w| w[1] < w[0]) {
                return Err(value_error(format!(
                    "{op}: bag offsets decrease at {}: {} then {}",
                    k + 1,
                    b[k],
                    b[k + 1]
                )));
            }
            Some(b)
        }
    };
    let weights = match weights {
        None => None,
        Some(address) => {
            check_address::<f32>(op, "weights", address, n)?;
            // SAFETY: the caller's contract: n float32 weights.
            Some(unsafe { slice::<f32>(address, n) })
        }
    };
    let pooled = Pooled {
        grad_out,
        d,
        bags,
        inverse,
        weights,
    };
    py.detach(|| rows_grad_into(&pooled, out)).map_err(|i| {
        value_error(format!(
            "{op}: inverse[{i}] = {} is outside the {rows} rows",
            inverse[i]
        ))
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(umod_parts, m)?)?;
    m.add_function(wrap_pyfunction!(bucketize_parts, m)?)?;
    m.add_function(wrap_pyfunction!(copy_rows, m)?)?;
    m.add_function(wrap_pyfunction!(adam_block_rows, m)?)?;
    m.add_class::<Pending>()?;
    m.add_function(wrap_pyfunction!(truncate_plan, m)?)?;
    m.add_function(wrap_pyfunction!(pair_hash_parts, m)?)?;
    m.add_function(wrap_pyfunction!(sort_int64_by_high_bits, m)?)?;
    m.add_function(wrap_pyfunction!(idmap_find, m)?)?;
    m.add_function(wrap_pyfunction!(idmap_claim, m)?)?;
    m.add_function(wrap_pyfunction!(idmap_claim_blank, m)?)?;
    m.add_function(wrap_pyfunction!(group_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(copy_block_rows, m)?)?;
    m.add_function(wrap_pyfunction!(interleave_bags, m)?)?;
    m.add_function(wrap_pyfunction!(adam_moments, m)?)?;
    m.add_function(wrap_pyfunction!(adam_apply, m)?)?;
    m.add_function(wrap_pyfunction!(rowwise_adagrad_block_rows, m)?)?;
    m.add_function(wrap_pyfunction!(pooled_rows_grad, m)?)?;
    m.add_function(wrap_pyfunction!(hashed_uniform, m)?)?;
    Ok(())
}
