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
    let w = (1.0 - h.beta1) as f32;
    let near_m = w.abs() < 0.5;
    let (beta2, one_minus_beta2) = (h.beta2 as f32, (1.0 - h.beta2) as f32);
    for i in 0..n {
        *step.ptr.add(i * step.stride) += 1.0;
        let p_row = std::slice::from_raw_parts_mut(param.ptr.add(i * param.stride), d);
        let g_row = std::slice::from_raw_parts(grad.ptr.add(i * grad.stride) as *const f32, d);
        let m_row = std::slice::from_raw_parts_mut(exp_avg.ptr.add(i * exp_avg.stride), d);
        let v_row = std::slice::from_raw_parts_mut(exp_avg_sq.ptr.add(i * exp_avg_sq.stride), d);
        for j in 0..d {
            let p0 = p_row[j];
            let mut g = g_row[j];
            if h.l2 != 0.0 {
                g = p0.mul_add(h.l2, g); // grad.add(param, alpha=l2)
            }
            p_row[j] = p0 * h.decay;
            let m0 = m_row[j];
            m_row[j] = if near_m {
                w.mul_add(g - m0, m0)
            } else {
                (w - 1.0).mul_add(g - m0, g)
            };
            v_row[j] = (one_minus_beta2 * g).mul_add(g, v_row[j] * beta2);
        }
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
