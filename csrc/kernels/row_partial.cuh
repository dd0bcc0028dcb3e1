// Per-thread statistics of one row of logits for the CUDA row-loss kernel (select_kernels.cuh), torch- and
// CUDA-runtime-free so the host compiler builds the very same arithmetic for tests (tests/cuda_row_loss_host.cpp
// replays the kernel's thread striding and shuffle tree with these functions).
//
// Every linear sum is kept relative to the running max, as the CPU build (cpu/row_loss.cpp) and the Triton kernel
// do: sum(x) and sum(t * x) taken plainly and shifted by n * m at the end cancel catastrophically when the logits
// share a large offset (relative error ~2e-4 at an offset of 1e4 with soft targets and label smoothing).
#pragma once

#include <cmath>

#include "common.cuh"

namespace es_kernels {

// Threads per row of loss_row_kernel; the host replay strides over the columns the same way.
constexpr int kRowLossThreads = 256;

// max m, sum exp(x - m), and shifted_x = sum (x - a), shifted_tx = sum t * (x - a), sum_t = sum t over `count`
// columns, with the anchor a = m (0 while m is -inf, so -inf logits do not turn the shift into NaN).
struct RowPartial {
  float max, sum_exp, shifted_x, sum_t, shifted_tx, count;
};

ES_HD RowPartial empty_partial() { return RowPartial{-INFINITY, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}; }

ES_HD float partial_anchor(float max) { return max == -INFINITY ? 0.0f : max; }

// The same partial, re-expressed relative to a max `new_max` >= p.max.
ES_HD RowPartial rebase(RowPartial p, float new_max) {
  const float shift = partial_anchor(p.max) - partial_anchor(new_max);
  // An empty (or all -inf) side has sum_exp 0; skip it rather than compute exp(-inf - -inf) = NaN.
  p.sum_exp = p.max == -INFINITY ? 0.0f : p.sum_exp * expf(p.max - new_max);
  p.shifted_x += p.count * shift;
  p.shifted_tx += p.sum_t * shift;
  p.max = new_max;
  return p;
}

// One column: logit v and (soft targets only) target weight t.
template <bool kSoft>
ES_HD void accumulate(RowPartial& p, float v, float t) {
  if (v > p.max) {
    p = rebase(p, v);
    p.sum_exp += 1.0f;
  } else if (v != -INFINITY) {
    p.sum_exp += expf(v - p.max);  // NaN logits make the sum NaN, as they should
  }
  const float shifted = v - partial_anchor(p.max);
  p.shifted_x += shifted;
  p.count += 1.0f;
  if (kSoft) {
    p.sum_t += t;
    p.shifted_tx += t * shifted;
  }
}

ES_HD RowPartial merge(const RowPartial& a, const RowPartial& b) {
  const bool has_nan = a.max != a.max || b.max != b.max;
  const float max = has_nan ? NAN : (a.max > b.max ? a.max : b.max);
  const RowPartial ra = rebase(a, max), rb = rebase(b, max);
  return RowPartial{max, ra.sum_exp + rb.sum_exp, ra.shifted_x + rb.shifted_x, ra.sum_t + rb.sum_t,
                    ra.shifted_tx + rb.shifted_tx, ra.count + rb.count};
}

// The row's loss from its reduced partial; `label_a`/`label_b` are the logits at the labels (NaN when a label is
// out of range), unused for soft targets.
ES_HD float partial_loss(const LossParams& params, const RowPartial& p, float label_a, float label_b) {
  const float m = p.max;
  const float log_sum = logf(p.sum_exp);
  float loss;
  if (params.kind == TargetKind::kSoft) {
    loss = soft_target_loss(params, log_sum, p.sum_t, p.shifted_tx, p.shifted_x);
  } else {
    loss = hard_label_loss(params, log_sum, label_a - m, p.shifted_x);
    if (params.kind == TargetKind::kMixup) {
      loss = mixup_loss(params, loss, hard_label_loss(params, log_sum, label_b - m, p.shifted_x));
    }
  }
  // NaN or +inf logits (NaN shifted sum), or a row of -inf logits: NaN loss, as the reference gives.
  if (p.shifted_x != p.shifted_x || m == -INFINITY) loss = NAN;
  return loss;
}

}  // namespace es_kernels
