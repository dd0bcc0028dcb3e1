// Per-token log-sum-exp statistics of the sequence-level losses (docs/architecture.md §3, token level), shared by
// the CPU (.cpp) and CUDA (.cu) builds. No torch headers: nvcc compiles the CUDA kernels below without ATen.
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

// Rows of one launch of the CUDA row kernel: row r is (r / rows_per_outer, r % rows_per_outer) with strides (outer,
// inner), and it is token token_offset + r of the (B, T) targets. (B, T, V) logits: rows_per_outer = T; a contiguous
// (rows, columns) chunk of the hidden-state form: rows_per_outer = rows, inner stride = columns.
struct SequenceRows {
  int64_t rows_per_outer, outer_stride, inner_stride, column_stride, columns, column_offset, token_offset;
};

struct SequenceTargets {
  const int64_t* data;
  int64_t batch_stride, time_stride, time;
};

ES_HD int64_t sequence_target(const SequenceTargets& y, int64_t token) {
  return y.data[(token / y.time) * y.batch_stride + (token % y.time) * y.time_stride];
}

#if defined(__CUDACC__)
}  // namespace es_kernels

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace es_kernels {
namespace cuda {

constexpr int kSequenceThreads = 256;

__device__ __forceinline__ float sequence_load(const float* p) { return *p; }
__device__ __forceinline__ float sequence_load(const double* p) { return static_cast<float>(*p); }
__device__ __forceinline__ float sequence_load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float sequence_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// One block per row: the row's statistics over `columns` columns (a max pass, then one exp per column, each thread
// over a fixed strided set, then a fixed tree: deterministic), absorbed into the token's running statistics
// (`first`: overwrite instead, so no initialisation launch is needed); the target's logit is taken when the
// target's column lies in this launch. Rows of ignored tokens return at once.
template <typename T>
__global__ void sequence_rows_kernel(const T* logits, SequenceRows rows, SequenceTargets targets,
                                     SequenceLossParams params, bool first, LsePartial* stats, float* target_logit) {
  __shared__ LsePartial partials[kSequenceThreads];
  const int64_t r = blockIdx.x;
  const int64_t token = rows.token_offset + r;
  const int64_t target = sequence_target(targets, token);
  if (target == params.ignore_index) return;
  const T* row = logits + (r / rows.rows_per_outer) * rows.outer_stride + (r % rows.rows_per_outer) * rows.inner_stride;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < rows.columns; j += kSequenceThreads) {
    const float z = sequence_load(row + j * rows.column_stride);
    m = z > m ? z : m;
  }
  partials[threadIdx.x].max = m;
  __syncthreads();
  for (int width = kSequenceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      const float other = partials[threadIdx.x + width].max;
      partials[threadIdx.x].max = other > partials[threadIdx.x].max ? other : partials[threadIdx.x].max;
    }
    __syncthreads();
  }
  const float top = partials[0].max;
  const float anchor = top == -INFINITY ? 0.0f : top;
  __syncthreads();
  LsePartial mine{top, 0.0f, 0.0f, 0};
  for (int64_t j = threadIdx.x; j < rows.columns; j += kSequenceThreads) {
    const float d = sequence_load(row + j * rows.column_stride) - anchor;
    mine.exp_sum += expf(d);
    mine.shifted_sum += d;
    ++mine.count;
  }
  partials[threadIdx.x] = mine;
  __syncthreads();
  for (int width = kSequenceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      LsePartial& a = partials[threadIdx.x];
      const LsePartial& b = partials[threadIdx.x + width];
      a.exp_sum += b.exp_sum;
      a.shifted_sum += b.shifted_sum;
      a.count += b.count;
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const LsePartial chunk = partials[0];
  stats[token] = first ? chunk : lse_combine(stats[token], chunk);
  const int64_t local = target - rows.column_offset;
  if (!sequence_target_valid(target, params.vocab)) {
    target_logit[token] = NAN;
  } else if (local >= 0 && local < rows.columns) {
    target_logit[token] = sequence_load(row + local * rows.column_stride);
  }
}

// One block per sequence: its scored tokens' losses summed over a fixed strided split and a fixed tree.
__global__ void sequence_reduce_kernel(const LsePartial* stats, const float* target_logit, SequenceTargets targets,
                                       SequenceLossParams params, bool mean, float* out) {
  __shared__ float totals[kSequenceThreads];
  __shared__ int64_t counts[kSequenceThreads];
  const int64_t b = blockIdx.x;
  float total = 0.0f;
  int64_t count = 0;
  for (int64_t t = threadIdx.x; t < targets.time; t += kSequenceThreads) {
    const int64_t token = b * targets.time + t;
    if (sequence_target(targets, token) == params.ignore_index) continue;
    total += sequence_token_loss(stats[token], target_logit[token], params);
    ++count;
  }
  totals[threadIdx.x] = total;
  counts[threadIdx.x] = count;
  __syncthreads();
  for (int width = kSequenceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      totals[threadIdx.x] += totals[threadIdx.x + width];
      counts[threadIdx.x] += counts[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t scored = counts[0];
    out[b] = mean && scored > 0 ? totals[0] / static_cast<float>(scored) : totals[0];
  }
}

}  // namespace cuda
#endif  // __CUDACC__

}  // namespace es_kernels
