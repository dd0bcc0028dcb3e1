// Sequence-level losses (docs/architecture.md §3, token level), shared by the CPU (.cpp) and CUDA (.cu) builds. No
// torch headers: nvcc compiles the CUDA kernels below without ATen.
//
// A token's statistics over the vocabulary columns seen so far are kernels/lse.cuh's log-sum-exp partial: two
// partials (of two column ranges, e.g. two vocabulary chunks of the hidden-state form) merge exactly, and the
// token's cross-entropy is the hard-label closed form with C = V and the target's raw logit.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/lse.cuh"

namespace es_kernels {

// Loss parameters rounded to fp32 once, where the reference rounds them: a token is the hard-label loss over V
// classes (kernels/lse.cuh).
struct SequenceLossParams {
  LossParams loss;
  int64_t ignore_index;
};

inline SequenceLossParams make_sequence_params(int64_t vocab, int64_t ignore_index, double label_smoothing) {
  LossParams loss{};
  loss.num_classes = vocab;
  loss.kind = TargetKind::kHard;
  loss.keep = static_cast<float>(1.0 - label_smoothing);
  loss.smooth_per_class = static_cast<float>(label_smoothing / static_cast<double>(vocab));
  loss.smoothing = static_cast<float>(label_smoothing);
  loss.lam_a = 1.0f;
  loss.lam_b = 0.0f;
  return SequenceLossParams{loss, ignore_index};
}

ES_HD float sequence_token_loss(const LsePartial& s, float target_logit, const SequenceLossParams& p) {
  return lse_loss(p.loss, s, target_logit, NAN);
}

// A target outside [0, V) other than ignore_index (possible only with value checks off) must never be read.
ES_HD bool sequence_target_valid(int64_t target, int64_t vocab) { return target >= 0 && target < vocab; }

// Rows of one launch of the CUDA row kernel: row r is (r / rows_per_outer, r % rows_per_outer) with strides (outer,
// inner), and it is token token_offset + r of the (B, T) targets. (B, T, V) logits: rows_per_outer = T; a contiguous
// (rows, columns) chunk of the hidden-state form: rows_per_outer = rows, inner stride = columns.
// `splits` > 1 (token-logit form only, one launch over the whole vocabulary): each row is read as `splits` column
// ranges of `split_columns` by as many blocks, each writing its own partial (token * splits + split), merged in
// order by the reduction; a small number of tokens then still fills every SM.
struct SequenceRows {
  int64_t rows_per_outer, outer_stride, inner_stride, column_stride, columns, column_offset, token_offset;
  int64_t splits = 1, split_columns = 0;
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

#include "kernels/lse_block.cuh"

namespace es_kernels {
namespace cuda {

constexpr int kSequenceThreads = kRowThreads;

// Block (row, split): the partial of the row's columns in the split (all of them when splits = 1), by one pass with
// vector loads where the row allows, each thread over a fixed set, then a fixed tree (deterministic). With one
// split it is merged into the token's running partial (`first`: overwrite instead, so no initialisation launch is
// needed); with several it is stored in the token's slot `split`. The target's logit is taken by the block whose
// columns hold it. Rows of ignored tokens return at once.
template <typename T>
__global__ void __launch_bounds__(kSequenceThreads)
    sequence_rows_kernel(const T* __restrict__ logits, SequenceRows rows, SequenceTargets targets,
                         SequenceLossParams params, bool first, LsePartial* stats, float* target_logit) {
  const int64_t r = blockIdx.x, split = blockIdx.y;
  const int64_t token = rows.token_offset + r;
  const int64_t target = sequence_target(targets, token);
  if (target == params.ignore_index) return;
  const T* row = logits + (r / rows.rows_per_outer) * rows.outer_stride + (r % rows.rows_per_outer) * rows.inner_stride;
  int64_t begin = 0, end = rows.columns;
  if (rows.splits > 1) {
    begin = split * rows.split_columns;
    end = begin + rows.split_columns < rows.columns ? begin + rows.split_columns : rows.columns;
  }
  const LsePartial part =
      block_partial<T, false>(row + begin * rows.column_stride, nullptr, end - begin, rows.column_stride);
  if (threadIdx.x != 0) return;
  if (rows.splits > 1) {
    stats[token * rows.splits + split] = part;
  } else {
    stats[token] = first ? part : lse_merge(stats[token], part);
  }
  const int64_t local = target - rows.column_offset;
  if (!sequence_target_valid(target, params.loss.num_classes)) {
    if (split == 0) target_logit[token] = NAN;
  } else if (local >= begin && local < end) {
    target_logit[token] = lse_to_float(row[local * rows.column_stride]);
  }
}

// One block per sequence: its scored tokens' losses summed over a fixed strided split and a fixed tree.
// `splits` partials per token (sequence_rows_kernel), merged in split order.
__global__ void sequence_reduce_kernel(const LsePartial* stats, int64_t splits, const float* target_logit,
                                       SequenceTargets targets, SequenceLossParams params, bool mean, float* out) {
  __shared__ float totals[kSequenceThreads];
  __shared__ int64_t counts[kSequenceThreads];
  const int64_t b = blockIdx.x;
  float total = 0.0f;
  int64_t count = 0;
  for (int64_t t = threadIdx.x; t < targets.time; t += kSequenceThreads) {
    const int64_t token = b * targets.time + t;
    if (sequence_target(targets, token) == params.ignore_index) continue;
    LsePartial p = stats[token * splits];
    for (int64_t split = 1; split < splits; ++split) p = lse_merge(p, stats[token * splits + split]);
    total += sequence_token_loss(p, target_logit[token], params);
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
