// The one log-sum-exp of the C++/CUDA build: the online partial statistics of a range of logits, their merge, and
// the cross-entropy of every loss form in closed form from them. Every loss kernel uses it: class logits with hard
// labels, mixup or soft targets (CUDA select_kernels.cuh, CPU cpu/row_loss.cpp), token logits and hidden-state
// tiles of the sequence losses (CUDA sequence.cuh, CPU cpu/sequence_loss.cpp); the CPU's SIMD loop
// (cpu/lse_vector.h) fills the same partial. A new loss form is a new case of `lse_loss`, nothing else.
//
// Torch- and CUDA-runtime-free, so the host compiler builds the very same arithmetic for tests
// (tests/cuda_row_loss_host.cpp replays the CUDA thread striding and shuffle tree with these functions).
//
// Every linear sum is kept relative to the running max: sum(x) and sum(t * x) taken plainly and shifted by n * m at
// the end cancel catastrophically when the logits share a large offset (relative error ~2e-4 at an offset of 1e4
// with soft targets and label smoothing). The closed forms (docs/architecture.md §3), with log_sum = log(sum_exp):
//   hard:  log_sum - keep * (x_y - m) - (eps / C) * shifted_sum
//   soft:  keep * (T * log_sum - D) + eps * log_sum - (eps / C) * shifted_sum
//   mixup: lam * hard(y_a) + (1 - lam) * hard(y_b)
// which is torch.nn.functional.cross_entropy's label smoothing (eps / C of the mass on every class).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "common.cuh"

namespace es_kernels {

// Statistics of the columns seen so far, relative to the anchor a = max (0 while max is -inf, so -inf logits never
// turn a shift into NaN). `count` is a float so the whole partial is six fp32 lanes (one shuffle each); it is exact
// up to 2^24 columns.
struct LsePartial {
  float max;         // -inf while no finite-or-+inf column was seen
  float sum_exp;     // sum exp(x - max)
  float shifted_sum; // sum (x - a)
  float count;       // columns seen
  float target_sum;  // soft targets: sum t
  float target_dot;  // soft targets: sum t * (x - a)
};

// exp(d) for d = x - max <= 0. On the GPU one multiply and the hardware exp2 (MUFU.EX2, ~2 ulp): the full expf
// costs three times the instructions, which at 16 bf16 logits per SM clock (bandwidth of a reduced row) would make
// the loss pass compute-bound. The rounding of d * log2(e) costs a relative |d| * 6e-8 on a term e^d, so at most
// ~2e-8 of the sum (largest at d = -1), below fp32 accumulation error. The host keeps expf.
ES_HD float lse_exp(float d) {
#if defined(__CUDA_ARCH__)
  return exp2f(__fmul_rn(d, 1.44269504088896341f));
#else
  return expf(d);
#endif
}

ES_HD LsePartial lse_empty() { return LsePartial{-INFINITY, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}; }

ES_HD float lse_anchor(float max) { return max == -INFINITY ? 0.0f : max; }

// The same partial, re-expressed relative to a max `new_max` >= p.max.
ES_HD LsePartial lse_rebase(LsePartial p, float new_max) {
  const float shift = lse_anchor(p.max) - lse_anchor(new_max);
  // An empty (or all -inf) side has sum_exp 0; skip it rather than compute exp(-inf - -inf) = NaN.
  p.sum_exp = p.max == -INFINITY ? 0.0f : p.sum_exp * expf(p.max - new_max);
  p.shifted_sum += p.count * shift;
  p.target_dot += p.target_sum * shift;
  p.max = new_max;
  return p;
}

// Two ranges' statistics combined exactly, in any grouping; a NaN max (NaN logits) stays NaN.
ES_HD LsePartial lse_merge(const LsePartial& a, const LsePartial& b) {
  const bool has_nan = a.max != a.max || b.max != b.max;
  const float max = has_nan ? NAN : (a.max > b.max ? a.max : b.max);
  const LsePartial ra = lse_rebase(a, max), rb = lse_rebase(b, max);
  return LsePartial{max, ra.sum_exp + rb.sum_exp, ra.shifted_sum + rb.shifted_sum, ra.count + rb.count,
                    ra.target_sum + rb.target_sum, ra.target_dot + rb.target_dot};
}

// `n` columns at once (a vector load): one rebase for the group, then one exponential per column. `t` is read only
// for soft targets. NaN logits make the sums NaN, as they should.
template <bool kSoft, int n>
ES_HD void lse_add(LsePartial& p, const float (&x)[n], const float (&t)[n]) {
  float top = p.max;
  for (int j = 0; j < n; ++j) top = x[j] > top ? x[j] : top;
  if (top > p.max) p = lse_rebase(p, top);
  const float a = lse_anchor(p.max);
  for (int j = 0; j < n; ++j) {
    const float d = x[j] - a;
    if (x[j] != -INFINITY) p.sum_exp += lse_exp(d);
    p.shifted_sum += d;
    if (kSoft) {
      p.target_sum += t[j];
      p.target_dot += t[j] * d;
    }
  }
  p.count += static_cast<float>(n);
}

// One column.
template <bool kSoft>
ES_HD void lse_add(LsePartial& p, float x, float t) {
  const float xs[1] = {x}, ts[1] = {t};
  lse_add<kSoft, 1>(p, xs, ts);
}

// A range's statistics in two passes over `load(j)`, j < n (a max pass, then one exponential per column): what a
// loop over a row that stays in cache does.
template <bool kSoft, typename Load, typename LoadTarget>
ES_HD LsePartial lse_of_range(Load load, LoadTarget load_target, int64_t n) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float x = load(j);
    m = x > m ? x : m;
  }
  LsePartial p = lse_empty();
  p.max = m;
  const float a = lse_anchor(m);
  for (int64_t j = 0; j < n; ++j) {
    const float x = load(j);
    const float d = x - a;
    if (x != -INFINITY) p.sum_exp += lse_exp(d);
    p.shifted_sum += d;
    if (kSoft) {
      const float t = load_target(j);
      p.target_sum += t;
      p.target_dot += t * d;
    }
  }
  p.count = static_cast<float>(n);
  return p;
}

// Every loss of a row from its complete statistics. `label_a`/`label_b` are the logits at the labels (NaN when a
// label is out of range, so such a row never wins a race), unused for soft targets; a token of a sequence is the
// hard-label form with C = V.
ES_HD float lse_loss(const LossParams& params, const LsePartial& p, float label_a, float label_b) {
  const float m = p.max;
  const float log_sum = logf(p.sum_exp);
  float loss;
  if (params.kind == TargetKind::kSoft) {
    loss = soft_target_loss(params, log_sum, p.target_sum, p.target_dot, p.shifted_sum);
  } else {
    loss = hard_label_loss(params, log_sum, label_a - m, p.shifted_sum);
    if (params.kind == TargetKind::kMixup) {
      loss = mixup_loss(params, loss, hard_label_loss(params, log_sum, label_b - m, p.shifted_sum));
    }
  }
  // NaN or +inf logits (NaN shifted sum), or a row of -inf logits: NaN loss, as the reference gives.
  if (p.shifted_sum != p.shifted_sum || m == -INFINITY) loss = NAN;
  return loss;
}

// ----------------------------------------------------------------------------------- one thread's share of a row
//
// The schedule of the CUDA loss kernels, shared with the host so tests can replay it: thread `thread` of `threads`
// reads the columns [0, n) of a row as a scalar head up to the first 16-byte boundary, then 16-byte groups (kVec =
// 16 / sizeof(T) columns, one vector load each, two in flight per iteration) strided over the threads, then a
// scalar tail. Soft targets (a second row with its own alignment) and strided rows read one column at a time
// (kVec = 1, any `stride`).

ES_HD float lse_to_float(float x) { return x; }
ES_HD float lse_to_float(double x) { return static_cast<float>(x); }
#if defined(__CUDACC__)
__device__ __forceinline__ float lse_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float lse_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
#endif

// Columns per 16-byte group.
template <typename T>
constexpr int kLseVectorWidth = 16 / static_cast<int>(sizeof(T));

// kVec columns at p, 16-byte aligned, widened to fp32.
template <int kVec, typename T>
ES_HD void lse_load_group(const T* p, float (&out)[kVec]) {
  static_assert(kVec * sizeof(T) == 16, "a group is one 16-byte load");
  T values[kVec];
#if defined(__CUDA_ARCH__)
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  memcpy(values, &raw, sizeof values);
#else
  memcpy(values, p, sizeof values);
#endif
  for (int j = 0; j < kVec; ++j) out[j] = lse_to_float(values[j]);
}

template <bool kSoft, int kVec, typename T>
ES_HD LsePartial lse_thread_partial(const T* x, const float* t, int64_t n, int64_t stride, int64_t thread,
                                    int64_t threads) {
  LsePartial p = lse_empty();
  if constexpr (kVec == 1) {
    for (int64_t c = thread; c < n; c += threads) lse_add<kSoft>(p, lse_to_float(x[c * stride]), kSoft ? t[c] : 0.0f);
    return p;
  } else {
    static_assert(!kSoft, "soft targets are read one column at a time");
    const float none[kVec] = {};
    const int64_t misaligned =
        static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) % 16) / static_cast<int64_t>(sizeof(T));
    int64_t head = misaligned == 0 ? 0 : kVec - misaligned;
    head = head < n ? head : n;
    for (int64_t c = thread; c < head; c += threads) lse_add<false>(p, lse_to_float(x[c]), 0.0f);
    const T* body = x + head;
    const int64_t groups = (n - head) / kVec;
    int64_t g = thread;
    for (; g + threads < groups; g += 2 * threads) {
      float first[kVec], second[kVec];
      lse_load_group<kVec>(body + g * kVec, first);
      lse_load_group<kVec>(body + (g + threads) * kVec, second);
      lse_add<false, kVec>(p, first, none);
      lse_add<false, kVec>(p, second, none);
    }
    if (g < groups) {
      float last[kVec];
      lse_load_group<kVec>(body + g * kVec, last);
      lse_add<false, kVec>(p, last, none);
    }
    for (int64_t c = head + groups * kVec + thread; c < n; c += threads) lse_add<false>(p, lse_to_float(x[c]), 0.0f);
    return p;
  }
}

}  // namespace es_kernels
