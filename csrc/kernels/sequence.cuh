// Per-token log-sum-exp statistics of the sequence-level losses (DESIGN §9), shared by the CPU (.cpp) and CUDA
// (.cu) builds. No torch headers: nvcc compiles the CUDA kernels below without ATen.
//
// A token's statistics over the vocabulary columns seen so far are kept relative to their maximum m, so a large
// common offset of the logits cancels nothing away: exp_sum = sum exp(z - m), shifted_sum = sum (z - m), count =
// number of columns. Two partial statistics (of two column ranges) combine exactly, in any grouping; the token's
// cross-entropy then follows in closed form, with the target's raw logit z_y:
//   (1 - eps) * (log exp_sum - (z_y - m)) + eps * (log exp_sum - shifted_sum / V)
// which is torch.nn.functional.cross_entropy's label smoothing (eps / V of the mass on every class).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/common.cuh"

namespace es_kernels {

struct LsePartial {
  float max;          // -inf while no column was seen
  float exp_sum;      // sum exp(z - max)
  float shifted_sum;  // sum (z - max)
  int64_t count;      // columns seen
};

ES_HD LsePartial lse_empty() { return LsePartial{-INFINITY, 0.0f, 0.0f, 0}; }

// Re-expresses a's sums relative to `anchor` (>= a.max); an empty partial stays empty (no 0 * inf = NaN).
ES_HD void lse_rebase(LsePartial& a, float anchor) {
  if (a.count == 0) return;
  const float shift = a.max - anchor;
  a.exp_sum *= expf(shift);
  a.shifted_sum += static_cast<float>(a.count) * shift;
}

ES_HD LsePartial lse_combine(LsePartial a, LsePartial b) {
  const float top = a.max > b.max ? a.max : b.max;
  // Both ranges all -inf (or empty): keep anchor 0 so the rescaling never computes exp(-inf + inf).
  const float anchor = top == -INFINITY ? 0.0f : top;
  lse_rebase(a, anchor);
  lse_rebase(b, anchor);
  return LsePartial{top, a.exp_sum + b.exp_sum, a.shifted_sum + b.shifted_sum, a.count + b.count};
}

// Statistics of one range of fp32 logits `z[j * stride]`, j < n: a max pass, then one exp per column.
template <typename Load>
ES_HD LsePartial lse_of_range(Load load, int64_t n) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float z = load(j);
    m = z > m ? z : m;
  }
  const float anchor = m == -INFINITY ? 0.0f : m;
  float exp_sum = 0.0f, shifted_sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float d = load(j) - anchor;
    exp_sum += expf(d);
    shifted_sum += d;
  }
  return LsePartial{m, exp_sum, shifted_sum, n};
}

// Loss parameters rounded to fp32 once, where the reference rounds them.
struct SequenceLossParams {
  int64_t vocab;
  int64_t ignore_index;
  float smoothing;  // label_smoothing
  float keep;       // 1 - label_smoothing
};

ES_HD float sequence_token_loss(const LsePartial& s, float target_logit, const SequenceLossParams& p) {
  const float log_sum = logf(s.exp_sum);
  float loss = p.keep * (log_sum - (target_logit - s.max));
  // Skipped at 0 so an overflowing logit sum cannot turn 0 * inf into NaN.
  if (p.smoothing != 0.0f) loss += p.smoothing * (log_sum - s.shifted_sum / static_cast<float>(p.vocab));
  return loss;
}

// A target outside [0, V) other than ignore_index (possible only with value checks off) must never be read.
ES_HD bool sequence_target_valid(int64_t target, int64_t vocab) { return target >= 0 && target < vocab; }

}  // namespace es_kernels
