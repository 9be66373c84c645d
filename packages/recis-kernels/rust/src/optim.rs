//! Sparse optimizer updates of rows on the CPU: `torch.optim.Adam` / `AdamW` with torch's
//! float32 numerics, and row-wise Adagrad in place in a blocked row store.
//!
//! Adam: the same operations in the same order as the torch spelling of `adam_rows_` (and the
//! `adam_rows` CUDA kernel): `lerp_` as one fused multiply-add from the nearer end,
//! `mul_(beta2).addcmul_` as one fused multiply-add, the per-row step sizes in float64 rounded
//! to float32, and `param + (-step_size * m) / denom`. Fused multiply-adds are exact
//! (`f32::mul_add`), compiled to the FMA instruction where the CPU has it. The square roots
//! between the two halves are torch's own (see [`adam_moments`]).

use crate::block_rows::Blocks;
use crate::idmap::prefetch;

/// The hyperparameters the moments take, as `adam_rows_` derives them from its arguments.
#[derive(Clone, Copy, Debug)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    /// The L2 penalty added to the gradient (Adam's weight decay; 0 for AdamW).
    pub l2: f32,
    /// The factor AdamW scales the parameter by first (1 for Adam).
    pub decay: f32,
}

/// `n` rows of `d` floats: row `i` starts `i * stride` floats after `ptr`, its elements
/// consecutive.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub ptr: *mut f32,
    pub stride: usize,
}

/// The first half of an update of `n` rows of `d` parameters, in place: each row's count (in
/// `step`'s first column) goes up by one, the parameters are scaled by `decay` and the moments
/// move toward the gradient (plus the `l2` penalty on the parameters as they were).
///
/// The second half, [`adam_apply`], takes the square roots of the second moments as torch
/// computes them: its vectorized float32 `sqrt` is not correctly rounded on every CPU (the
/// AVX-512 kernels round about one value in five otherwise), so it is left to torch.
///
/// # Safety
///
/// Every `Rows` addresses `n` rows of its width (`d`, or 1 for `step`) of valid floats, and no
/// two of them share an element.
#[allow(clippy::too_many_arguments)]
pub unsafe fn adam_moments(
    param: Rows,
    grad: Rows,
    exp_avg: Rows,
    exp_avg_sq: Rows,
    step: Rows,
    n: usize,
    d: usize,
    h: &Adam,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        return adam_moments_fma(param, grad, exp_avg, exp_avg_sq, step, n, d, h);
    }
    adam_moments_body(param, grad, exp_avg, exp_avg_sq, step, n, d, h);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn adam_moments_fma(
    param: Rows,
    grad: Rows,
    exp_avg: Rows,
    exp_avg_sq: Rows,
    step: Rows,
    n: usize,
    d: usize,
    h: &Adam,
) {
    adam_moments_body(param, grad, exp_avg, exp_avg_sq, step, n, d, h);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn adam_moments_body(
    param: Rows,
    grad: Rows,
    exp_avg: Rows,
    exp_avg_sq: Rows,
    step: Rows,
    n: usize,
    d: usize,
    h: &Adam,
) {
    let k = Moments::new(h);
    for i in 0..n {
        *step.ptr.add(i * step.stride) += 1.0;
        let p_row = std::slice::from_raw_parts_mut(param.ptr.add(i * param.stride), d);
        let g_row = std::slice::from_raw_parts(grad.ptr.add(i * grad.stride) as *const f32, d);
        let m_row = std::slice::from_raw_parts_mut(exp_avg.ptr.add(i * exp_avg.stride), d);
        let v_row = std::slice::from_raw_parts_mut(exp_avg_sq.ptr.add(i * exp_avg_sq.stride), d);
        for j in 0..d {
            k.update(&mut p_row[j], g_row[j], &mut m_row[j], &mut v_row[j]);
        }
    }
}

/// The float32 constants of the moment update, and the update of one element.
#[derive(Clone, Copy)]
struct Moments {
    w: f32,
    near_m: bool,
    beta2: f32,
    one_minus_beta2: f32,
    l2: f32,
    decay: f32,
}

impl Moments {
    fn new(h: &Adam) -> Self {
        let w = (1.0 - h.beta1) as f32;
        Moments {
            w,
            near_m: w.abs() < 0.5,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            l2: h.l2,
            decay: h.decay,
        }
    }

    /// One parameter scaled by `decay`, its moments moved toward the gradient `g` (plus the
    /// `l2` penalty on the parameter as it was).
    #[inline(always)]
    fn update(&self, p: &mut f32, mut g: f32, m: &mut f32, v: &mut f32) {
        let p0 = *p;
        if self.l2 != 0.0 {
            g = p0.mul_add(self.l2, g); // grad.add(param, alpha=l2)
        }
        *p = p0 * self.decay;
        let m0 = *m;
        *m = if self.near_m {
            self.w.mul_add(g - m0, m0)
        } else {
            (self.w - 1.0).mul_add(g - m0, g)
        };
        *v = (self.one_minus_beta2 * g).mul_add(g, *v * self.beta2);
    }
}

/// The second half of the update begun by [`adam_moments`]: `param += (step_size[i] * m) /
/// (root / bc2_sqrt[i] + eps)`, with `root` torch's square roots of the second moments and the
/// per-row (negated) step sizes and bias corrections as torch computes them from the counts
/// (in float64, rounded to float32), one float per row each in `scalars`.
///
/// # Safety
///
/// As [`adam_moments`], `root` and both `scalars` included.
pub unsafe fn adam_apply(
    param: Rows,
    exp_avg: Rows,
    root: Rows,
    scalars: [Rows; 2],
    n: usize,
    d: usize,
    eps: f32,
) {
    let [step_size, bc2] = scalars;
    for i in 0..n {
        let neg_step_size = *step_size.ptr.add(i * step_size.stride);
        let bc2_sqrt = *bc2.ptr.add(i * bc2.stride);
        let p_row = std::slice::from_raw_parts_mut(param.ptr.add(i * param.stride), d);
        let m_row =
            std::slice::from_raw_parts(exp_avg.ptr.add(i * exp_avg.stride) as *const f32, d);
        let r_row = std::slice::from_raw_parts(root.ptr.add(i * root.stride) as *const f32, d);
        for j in 0..d {
            let denom = r_row[j] / bc2_sqrt + eps;
            p_row[j] += (neg_step_size * m_row[j]) / denom;
        }
    }
}

/// The columns of a row of a blocked row store that an in-place Adam update reads and writes:
/// the first float of the parameters, the first and the second moments (`d` each), and the
/// update count (one float).
#[derive(Clone, Copy, Debug)]
pub struct AdamColumns {
    pub param: usize,
    pub exp_avg: usize,
    pub exp_avg_sq: usize,
    pub step: usize,
}

/// Per-row step sizes computed since the call began, by update count: rows share few counts,
/// and each takes two `pow`s.
struct StepSizes {
    entries: Vec<(u32, f32, f32)>,
}

impl StepSizes {
    const SLOTS: usize = 256;

    fn new() -> Self {
        StepSizes {
            entries: vec![(u32::MAX, 0.0, 0.0); Self::SLOTS],
        }
    }

    /// `(-lr / (1 - beta1^count), sqrt(1 - beta2^count))`, in float64 rounded to float32: the
    /// Python-float arithmetic of `torch.optim.Adam`.
    #[inline]
    fn get(&mut self, count: f32, lr: f64, beta1: f64, beta2: f64) -> (f32, f32) {
        let key = count as u32;
        let slot = &mut self.entries[key as usize % Self::SLOTS];
        if slot.0 != key || key as f32 != count {
            let s = f64::from(count);
            let size = (-lr / (1.0 - beta1.powf(s))) as f32;
            let bc2 = (1.0 - beta2.powf(s)).sqrt() as f32;
            if key as f32 != count {
                return (size, bc2); // not a whole count: not kept
            }
            *slot = (key, size, bc2);
        }
        (slot.1, slot.2)
    }
}

/// `torch.optim.Adam` / `AdamW` on rows of a blocked row store, in place and in one pass: for
/// `i` in `0..rows.len()`, store row `rows[i]` takes the gradient `grad[i * d..(i + 1) * d]`.
///
/// Each element goes through the operations of [`adam_moments`] then [`adam_apply`], with two
/// differences: the square root of the second moment is the correctly rounded one (torch's
/// vectorized float32 `sqrt` is not on every CPU, so a result can be an ulp apart from the
/// two-pass update where torch takes the roots), and the per-row step size and bias correction
/// come from `f64::powf`, the `pow` of the Python floats `torch.optim.Adam` computes them with.
/// No gather of the rows into a buffer, no scatter back, no pass between the halves.
///
/// # Safety
///
/// Every block holds `1 << shift` rows of `row_bytes` bytes of float32s, every row is in range
/// (see [`Blocks::first_bad`]) and listed once, the columns' `d`, `d`, `d` and 1 floats fit in
/// a row without overlapping, and `grad` overlaps no block.
#[allow(clippy::too_many_arguments)]
pub unsafe fn adam_block_rows(
    blocks: &Blocks<'_>,
    rows: &[i64],
    grad: &[f32],
    d: usize,
    cols: AdamColumns,
    h: &Adam,
    lr: f64,
    eps: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        return adam_block_rows_fma(blocks, rows, grad, d, cols, h, lr, eps);
    }
    adam_block_rows_body(blocks, rows, grad, d, cols, h, lr, eps);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn adam_block_rows_fma(
    blocks: &Blocks<'_>,
    rows: &[i64],
    grad: &[f32],
    d: usize,
    cols: AdamColumns,
    h: &Adam,
    lr: f64,
    eps: f32,
) {
    adam_block_rows_body(blocks, rows, grad, d, cols, h, lr, eps);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn adam_block_rows_body(
    blocks: &Blocks<'_>,
    rows: &[i64],
    grad: &[f32],
    d: usize,
    cols: AdamColumns,
    h: &Adam,
    lr: f64,
    eps: f32,
) {
    debug_assert_eq!(grad.len(), rows.len() * d);
    let k = Moments::new(h);
    let mut sizes = StepSizes::new();
    for (i, &r) in rows.iter().enumerate() {
        if let Some(&next) = rows.get(i + AHEAD) {
            let row = blocks.row_ptr(next);
            for line in (0..blocks.row_bytes).step_by(64) {
                prefetch(row.add(line));
            }
            prefetch(row.add(blocks.row_bytes - 1));
        }
        let row = blocks.row_ptr(r) as *mut f32;
        let count = &mut *row.add(cols.step);
        *count += 1.0;
        let (neg_step_size, bc2_sqrt) = sizes.get(*count, lr, h.beta1, h.beta2);
        let p = std::slice::from_raw_parts_mut(row.add(cols.param), d);
        let m = std::slice::from_raw_parts_mut(row.add(cols.exp_avg), d);
        let v = std::slice::from_raw_parts_mut(row.add(cols.exp_avg_sq), d);
        let g = &grad[i * d..(i + 1) * d];
        for j in 0..d {
            k.update(&mut p[j], g[j], &mut m[j], &mut v[j]);
            let denom = v[j].sqrt() / bc2_sqrt + eps;
            p[j] += (neg_step_size * m[j]) / denom;
        }
    }
}

/// Row-wise Adagrad's hyperparameters (FBGEMM's `EXACT_ROWWISE_ADAGRAD`).
#[derive(Clone, Copy, Debug)]
pub struct RowwiseAdagrad {
    pub lr: f32,
    pub eps: f32,
    /// The L2 penalty added to the gradient.
    pub weight_decay: f32,
}

/// Rows between the one updated and the one whose lines are prefetched.
const AHEAD: usize = 8;

/// Row-wise Adagrad on rows of a blocked row store, in place: for `i` in `0..rows.len()`, the
/// `d` parameters at float `param` of store row `rows[i]` and its accumulator at float
/// `state` take the gradient `grad[i * d..(i + 1) * d]`:
/// `g += weight_decay * p; G += sum(g * g) / d; p += -lr * (g / (sqrt(G) + eps))`, in float32,
/// the operations of the torch spelling of `rowwise_adagrad_rows_` (its sum of squares is
/// accumulated in order, where torch's vectorized mean may pair the terms differently).
///
/// One pass over the rows, with no gather into a buffer and no scatter back: the update reads
/// and writes each row where it lives.
///
/// # Safety
///
/// Every block holds `1 << shift` rows of `row_bytes` bytes of float32s, every row is in range
/// (see [`Blocks::first_bad`]) and listed once, `param + d` and `state + 1` floats fit in a row,
/// the two ranges do not overlap, and `grad` overlaps no block.
pub unsafe fn rowwise_adagrad_block_rows(
    blocks: &Blocks<'_>,
    rows: &[i64],
    grad: &[f32],
    d: usize,
    param: usize,
    state: usize,
    h: &RowwiseAdagrad,
) {
    debug_assert_eq!(grad.len(), rows.len() * d);
    let mut g = vec![0.0f32; d];
    for (i, &r) in rows.iter().enumerate() {
        if let Some(&next) = rows.get(i + AHEAD) {
            let row = blocks.row_ptr(next);
            prefetch(row.add(param * 4));
            prefetch(row.add(state * 4));
        }
        let row = blocks.row_ptr(r) as *mut f32;
        let p = std::slice::from_raw_parts_mut(row.add(param), d);
        let acc = &mut *row.add(state);
        let gi = &grad[i * d..(i + 1) * d];
        let mut sum = 0.0f32;
        for ((gj, &gij), &pj) in g.iter_mut().zip(gi).zip(p.iter()) {
            *gj = if h.weight_decay != 0.0 {
                gij + h.weight_decay * pj
            } else {
                gij
            };
            sum += *gj * *gj;
        }
        *acc += sum / d as f32;
        let denom = acc.sqrt() + h.eps;
        let step = -h.lr;
        for (pj, &gj) in p.iter_mut().zip(&g) {
            *pj += step * (gj / denom);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_parameter_by_about_lr_against_its_gradient() {
        // Step 1 of Adam: m = (1 - b1) g, v = (1 - b2) g^2, the update -lr * sign(g) (eps aside).
        let (n, d) = (3, 4);
        let mut param = vec![1.0f32; n * d];
        let grad: Vec<f32> = (0..n * d).map(|k| k as f32 - 5.5).collect();
        let (mut m, mut v, mut step) = (vec![0.0f32; n * d], vec![0.0f32; n * d], vec![0.0f32; n]);
        let h = Adam {
            beta1: 0.9,
            beta2: 0.999,
            l2: 0.0,
            decay: 1.0,
        };
        let rows = |p: &mut Vec<f32>, w: usize| Rows {
            ptr: p.as_mut_ptr(),
            stride: w,
        };
        let mut g = grad.clone();
        unsafe {
            adam_moments(
                rows(&mut param, d),
                rows(&mut g, d),
                rows(&mut m, d),
                rows(&mut v, d),
                rows(&mut step, 1),
                n,
                d,
                &h,
            );
            let mut root: Vec<f32> = v.iter().map(|x| x.sqrt()).collect();
            // Step 1: step size lr / (1 - b1), bias correction sqrt(1 - b2).
            let mut size = vec![(-0.01 / (1.0 - 0.9f64)) as f32; n];
            let mut bc2 = vec![(1.0 - 0.999f64).sqrt() as f32; n];
            adam_apply(
                rows(&mut param, d),
                rows(&mut m, d),
                rows(&mut root, d),
                [rows(&mut size, 1), rows(&mut bc2, 1)],
                n,
                d,
                1e-8,
            );
        }
        assert_eq!(step, [1.0; 3]);
        for k in 0..n * d {
            assert!((m[k] - 0.1 * grad[k]).abs() <= 1e-6 * grad[k].abs().max(1.0));
            let moved = param[k] - 1.0;
            assert!(
                (moved + 0.01 * grad[k].signum()).abs() < 1e-5,
                "element {k}: {moved}"
            );
        }
    }

    #[test]
    fn adam_on_store_rows_is_the_two_halves_on_a_gathered_buffer() {
        // Rows of 3d + 2 floats: parameters, first moments, a spare column, second moments,
        // the count; in three blocks of 2 rows, listed out of order, updated twice. The halves
        // on a buffer take correctly rounded roots and the pow-derived step sizes here, so
        // every bit agrees.
        let (d, shift) = (3usize, 1u32);
        let width = 3 * d + 2;
        let cols = AdamColumns {
            param: 0,
            exp_avg: d,
            exp_avg_sq: 2 * d + 1,
            step: 3 * d + 1,
        };
        let mut store: Vec<Vec<f32>> = (0..3)
            .map(|b| {
                (0..2 * width)
                    .map(|k| ((b * 37 + k * 11) % 17) as f32 * 0.05 + 0.01)
                    .collect()
            })
            .collect();
        for block in &mut store {
            block[cols.step] = 2.0; // rows updated twice before
            block[width + cols.step] = 2.0;
        }
        let before = store.clone();
        let rows = [5i64, 0, 3];
        let n = rows.len();
        let h = Adam {
            beta1: 0.8,
            beta2: 0.99,
            l2: 0.1,
            decay: 1.0,
        };
        let (lr, eps) = (0.01f64, 1e-6f32);
        let mut buf: Vec<f32> = rows
            .iter()
            .flat_map(|&r| {
                let at = (r as usize & 1) * width;
                before[(r >> shift) as usize][at..at + width].to_vec()
            })
            .collect();
        let ptrs: Vec<usize> = store.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
        let blocks = Blocks {
            ptrs: &ptrs,
            shift,
            row_bytes: width * 4,
        };
        for round in 0..2 {
            let grad: Vec<f32> = (0..n * d)
                .map(|k| (k as f32 - 4.0) * 0.3 + round as f32)
                .collect();
            let b = buf.as_mut_ptr();
            let view = |c: usize| Rows {
                ptr: unsafe { b.add(c) },
                stride: width,
            };
            let g = Rows {
                ptr: grad.as_ptr() as *mut f32,
                stride: d,
            };
            unsafe {
                adam_block_rows(&blocks, &rows, &grad, d, cols, &h, lr, eps);
                adam_moments(
                    view(0),
                    g,
                    view(cols.exp_avg),
                    view(cols.exp_avg_sq),
                    view(cols.step),
                    n,
                    d,
                    &h,
                );
                let mut root: Vec<f32> = (0..n * d)
                    .map(|k| buf[(k / d) * width + cols.exp_avg_sq + k % d].sqrt())
                    .collect();
                let counts: Vec<f64> = (0..n)
                    .map(|i| f64::from(buf[i * width + cols.step]))
                    .collect();
                let mut size: Vec<f32> = counts
                    .iter()
                    .map(|&s| (-lr / (1.0 - 0.8f64.powf(s))) as f32)
                    .collect();
                let mut bc2: Vec<f32> = counts
                    .iter()
                    .map(|&s| (1.0 - 0.99f64.powf(s)).sqrt() as f32)
                    .collect();
                let dense = |v: &mut Vec<f32>, w: usize| Rows {
                    ptr: v.as_mut_ptr(),
                    stride: w,
                };
                let scalars = [dense(&mut size, 1), dense(&mut bc2, 1)];
                adam_apply(
                    view(0),
                    view(cols.exp_avg),
                    dense(&mut root, d),
                    scalars,
                    n,
                    d,
                    eps,
                );
            }
        }
        for (i, &r) in rows.iter().enumerate() {
            let at = (r as usize & 1) * width;
            let got = &store[(r >> shift) as usize][at..at + width];
            let want = &buf[i * width..(i + 1) * width];
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got), bits(want), "row {r}");
            assert_eq!(got[cols.step], 4.0, "row {r} counted twice more");
            assert_eq!(
                got[2 * d],
                before[(r >> shift) as usize][at + 2 * d],
                "spare column"
            );
            assert_ne!(
                got[..d],
                before[(r >> shift) as usize][at..at + d],
                "row {r} moved"
            );
        }
        // The rows listed nowhere (1, 2 and 4) are untouched.
        assert_eq!(store[0][width..], before[0][width..]);
        assert_eq!(store[1][..width], before[1][..width]);
        assert_eq!(store[2][..width], before[2][..width]);
    }

    #[test]
    fn step_sizes_are_the_pow_of_each_count_whole_or_not() {
        let mut sizes = StepSizes::new();
        for count in [1.0f32, 257.0, 1.0, 3.5, 2.0e7, 513.0] {
            let s = f64::from(count);
            let want = (
                (-0.1 / (1.0 - 0.9f64.powf(s))) as f32,
                (1.0 - 0.999f64.powf(s)).sqrt() as f32,
            );
            assert_eq!(sizes.get(count, 0.1, 0.9, 0.999), want, "count {count}");
        }
    }

    #[test]
    fn rowwise_adagrad_updates_rows_in_place_across_blocks() {
        // Two blocks of 4 rows of 6 floats: 4 parameters, the accumulator, one spare column.
        let (d, width, shift) = (4usize, 6usize, 2u32);
        let mut store: Vec<Vec<f32>> = (0..2)
            .map(|b| {
                (0..4 * width)
                    .map(|k| (b * 100 + k) as f32 * 0.01)
                    .collect()
            })
            .collect();
        let before = store.clone();
        let rows = [6i64, 1];
        let grad: Vec<f32> = (0..rows.len() * d).map(|k| k as f32 - 3.0).collect();
        let ptrs: Vec<usize> = store.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
        let blocks = Blocks {
            ptrs: &ptrs,
            shift,
            row_bytes: width * 4,
        };
        let h = RowwiseAdagrad {
            lr: 0.1,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        unsafe { rowwise_adagrad_block_rows(&blocks, &rows, &grad, d, 0, d, &h) };
        for (i, &r) in rows.iter().enumerate() {
            let (b, at) = ((r >> shift) as usize, (r as usize & 3) * width);
            let old = &before[b][at..at + width];
            let g: Vec<f64> = (0..d)
                .map(|j| grad[i * d + j] as f64 + 0.01 * old[j] as f64)
                .collect();
            let acc = old[d] as f64 + g.iter().map(|x| x * x).sum::<f64>() / d as f64;
            let new = &store[b][at..at + width];
            assert!((new[d] as f64 - acc).abs() < 1e-5 * acc.max(1.0));
            for j in 0..d {
                let want = old[j] as f64 - 0.1 * g[j] / (acc.sqrt() + 1e-8);
                assert!((new[j] as f64 - want).abs() < 1e-5, "row {r} column {j}");
            }
            assert_eq!(new[d + 1], old[d + 1], "the spare column stays");
        }
        // Rows not listed are untouched.
        for (b, block) in store.iter().enumerate() {
            for row in 0..4 {
                let r = (b << shift) + row;
                if !rows.contains(&(r as i64)) {
                    let at = row * width;
                    assert_eq!(block[at..at + width], before[b][at..at + width]);
                }
            }
        }
    }
}
