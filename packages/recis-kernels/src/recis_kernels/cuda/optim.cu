#include "recis_common.cuh"

// Sparse optimizer updates of N touched rows of D columns, all arrays contiguous (N, D) float32
// (step and row-wise sums: (N,)). Scalars are computed in double and rounded to float where
// torch rounds a Python float applied to a float32 tensor, so results match torch.optim.

extern "C" __global__ void sgd_rows(float* param, const float* grad, i64 n, i64 d, float lr,
                                    float weight_decay) {
  RECIS_GRID_STRIDE(t, n * d) {
    float g = grad[t];
    if (weight_decay != 0.0f) g = g + weight_decay * param[t];
    param[t] = param[t] - lr * g;
  }
}

// step[i] must already be incremented for the rows being updated.
extern "C" __global__ void adagrad_rows(float* param, const float* grad, float* state_sum,
                                        const float* step, i64 n, i64 d, double lr,
                                        double lr_decay, float weight_decay, float eps) {
  RECIS_GRID_STRIDE(t, n * d) {
    i64 i = t / d;
    float g = grad[t];
    if (weight_decay != 0.0f) g = g + weight_decay * param[t];
    float neg_clr = (float)(-lr / (1.0 + ((double)step[i] - 1.0) * lr_decay));
    float s = state_sum[t] + g * g;
    state_sum[t] = s;
    // torch's addcdiv order: param + (-clr * g) / std.
    param[t] = param[t] + (neg_clr * g) / (sqrtf(s) + eps);
  }
}

// One thread per row: G += mean(g^2); param -= lr * g / (sqrt(G) + eps).
extern "C" __global__ void rowwise_adagrad_rows(float* param, const float* grad, float* state_sum,
                                                i64 n, i64 d, float lr, float eps,
                                                float weight_decay) {
  RECIS_GRID_STRIDE(i, n) {
    float acc = 0.0f;
    for (i64 j = 0; j < d; ++j) {
      float g = grad[i * d + j];
      if (weight_decay != 0.0f) g = g + weight_decay * param[i * d + j];
      acc += g * g;
    }
    float G = state_sum[i] + acc / (float)d;
    state_sum[i] = G;
    float denom = sqrtf(G) + eps;
    for (i64 j = 0; j < d; ++j) {
      float g = grad[i * d + j];
      if (weight_decay != 0.0f) g = g + weight_decay * param[i * d + j];
      param[i * d + j] = param[i * d + j] - lr * g / denom;
    }
  }
}

// step[i] must already be incremented. one_minus_beta1/2 are the float32 roundings of the
// double differences (as torch applies them); l2 is the Adam weight decay (0 for AdamW) and
// decay AdamW's multiplier 1 - lr * weight_decay (1 for Adam).
extern "C" __global__ void adam_rows(float* param, const float* grad, float* exp_avg,
                                     float* exp_avg_sq, const float* step, i64 n, i64 d, double lr,
                                     float one_minus_beta1, float beta2, float one_minus_beta2,
                                     double beta1_d, double beta2_d, float eps, float l2,
                                     float decay) {
  RECIS_GRID_STRIDE(t, n * d) {
    i64 i = t / d;
    float p = param[t] * decay;
    float g = grad[t];
    if (l2 != 0.0f) g = g + l2 * param[t];
    float m = exp_avg[t];
    // torch's lerp_(g, w) on CPU and GPU: one fused multiply-add from the nearer end,
    // m + w (g - m) for |w| < 0.5, else g + (w - 1)(g - m).
    const float w = one_minus_beta1;
    const bool near_m = fabsf(w) < 0.5f;
    m = fmaf(near_m ? w : w - 1.0f, g - m, near_m ? m : g);
    // torch's mul_(beta2).addcmul_(g, g, value=1 - beta2): one fused multiply-add.
    float v = fmaf(one_minus_beta2 * g, g, exp_avg_sq[t] * beta2);
    exp_avg[t] = m;
    exp_avg_sq[t] = v;
    double s = (double)step[i];
    float neg_step_size = (float)(-lr / (1.0 - pow(beta1_d, s)));
    float bc2_sqrt = (float)sqrt(1.0 - pow(beta2_d, s));
    float denom = sqrtf(v) / bc2_sqrt + eps;
    // torch's addcdiv order: param + (-step_size * m) / denom.
    param[t] = p + (neg_step_size * m) / denom;
  }
}

extern "C" __global__ void ftrl_rows(float* param, const float* grad, float* accum, float* linear,
                                     i64 n, i64 d, float lr, float lr_power, float l1, float l2,
                                     float beta) {
  RECIS_GRID_STRIDE(t, n * d) {
    float g = grad[t];
    float a = accum[t];
    float a_new = recis_add_rn(a, recis_mul_rn(g, g));  // torch: accum + g * g, two roundings
    float root_new = lr_power == -0.5f ? sqrtf(a_new) : powf(a_new, -lr_power);
    float root_old = lr_power == -0.5f ? sqrtf(a) : powf(a, -lr_power);
    float z = linear[t] + recis_add_rn(g, -recis_mul_rn((root_new - root_old) / lr, param[t]));
    linear[t] = z;
    float quadratic = (beta + root_new) / lr + 2.0f * l2;
    float sign = z > 0.0f ? 1.0f : (z < 0.0f ? -1.0f : 0.0f);
    param[t] = fabsf(z) > l1 ? (sign * l1 - z) / quadratic : 0.0f;
    accum[t] = a_new;
  }
}
