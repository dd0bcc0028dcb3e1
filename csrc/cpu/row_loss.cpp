// Per-sample cross-entropy on CPU: one row at a time, two passes over a row that sits in L1 (max, then the
// exponential sum and the linear sums), fp32 accumulation whatever the logits' dtype.
//
// Vectorisation: ATen's Vectorized<float> only uses AVX2 when the including file is compiled for AVX2, and an
// extension must run on any x86-64, so the hot loops are written with GCC/Clang vector extensions and a
// polynomial exp, compiled twice: for the baseline ISA and for AVX2+FMA, picked once at run time by CPUID. Other
// compilers get the scalar loop.
//
// Contraction into fused multiply-adds is allowed in this file only: losses are compared with a tolerance, while
// the state update (update.cuh, compiled in fused_select.cpp) must round exactly like the reference.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
// The 256-bit helpers below are always inlined, so no vector crosses a call boundary of the baseline build.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "cpu/row_loss.h"

#include <cmath>
#include <cstring>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace es_kernels {
namespace cpu {

namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define ES_X86_DISPATCH 1
#endif

#if defined(__GNUC__)
#define ES_INLINE inline __attribute__((always_inline))
#define ES_VECTOR_EXTENSIONS 1
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

ES_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

ES_INLINE v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

ES_INLINE v8f select(v8i mask, v8f a, v8f b) {
  return reinterpret_cast<v8f>((mask & reinterpret_cast<v8i>(a)) | (~mask & reinterpret_cast<v8i>(b)));
}

// exp(x) for x <= 0 (x = logit - row max): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' expf
// polynomial (about 1 ulp). Results below FLT_MIN flush to 0, which cannot matter next to the term exp(0) = 1.
ES_INLINE v8f exp_nonpositive(v8f x) {
  const v8i underflow = x < splat(-87.33654f);
  x = select(underflow, splat(-87.33654f), x);
  // x * log2(e) - 0.5 is negative, so truncation rounds it up: n = ceil(x log2 e - 0.5), nearest to x log2 e.
  const v8i n = __builtin_convertvector(x * splat(1.44269504088896341f) - splat(0.5f), v8i);
  const v8f nf = __builtin_convertvector(n, v8f);
  v8f r = x - nf * splat(0.693359375f);
  r = r - nf * splat(-2.12194440e-4f);
  const v8f z = r * r;
  v8f p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  p = p * z + r + splat(1.0f);
  const v8i scale_bits = (n + 127) << 23;
  const v8f result = p * reinterpret_cast<v8f>(scale_bits);
  return reinterpret_cast<v8f>(reinterpret_cast<v8i>(result) & ~underflow);
}

ES_INLINE float horizontal_sum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
#else
#define ES_INLINE inline
#endif

struct RowStats {
  float max, log_sum, shifted_sum, target_sum, target_dot;
  bool finite;  // every logit of the row is finite
};

// t == nullptr: hard labels (no target sums).
ES_INLINE RowStats row_stats(const float* x, const float* t, int64_t n) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
  // x - x is 0 for a finite x and NaN for inf or NaN, so the sum of them says whether the row is finite; taken in
  // the max pass, where it costs one vector add per 8 logits (the max alone skips NaN).
  float finite_probe = 0.0f;
#ifdef ES_VECTOR_EXTENSIONS
  if (n >= 8) {
    v8f vm = load8(x);
    v8f probe = vm - vm;
    for (j = 8; j + 8 <= n; j += 8) {
      const v8f v = load8(x + j);
      vm = select(v > vm, v, vm);
      probe += v - v;
    }
    for (int lane = 0; lane < 8; ++lane) m = vm[lane] > m ? vm[lane] : m;
    finite_probe = horizontal_sum(probe);
  }
#endif
  for (; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    finite_probe += x[j] - x[j];
  }

  float sum_exp = 0.0f, shifted = 0.0f, target_sum = 0.0f, target_dot = 0.0f;
  j = 0;
#ifdef ES_VECTOR_EXTENSIONS
  {
    const v8f vmax = splat(m);
    v8f acc_exp = splat(0.0f), acc_shift = splat(0.0f), acc_t = splat(0.0f), acc_dot = splat(0.0f);
    for (; j + 8 <= n; j += 8) {
      const v8f d = load8(x + j) - vmax;
      acc_exp += exp_nonpositive(d);
      acc_shift += d;
      if (t != nullptr) {
        const v8f w = load8(t + j);
        acc_t += w;
        acc_dot += w * d;
      }
    }
    sum_exp = horizontal_sum(acc_exp);
    shifted = horizontal_sum(acc_shift);
    target_sum = horizontal_sum(acc_t);
    target_dot = horizontal_sum(acc_dot);
  }
#endif
  for (; j < n; ++j) {
    const float d = x[j] - m;
    sum_exp += std::exp(d);
    shifted += d;
    if (t != nullptr) {
      target_sum += t[j];
      target_dot += t[j] * d;
    }
  }
  return RowStats{m, std::log(sum_exp), shifted, target_sum, target_dot, finite_probe == 0.0f};
}

ES_INLINE float label_term(const float* x, int64_t label, const RowStats& s, const LossParams& p) {
  // With value checks off a bad label must not be read; NaN makes the sample's weight lose every race.
  if (label < 0 || label >= p.num_classes) return std::numeric_limits<float>::quiet_NaN();
  return hard_label_loss(p, s.log_sum, x[label] - s.max, s.shifted_sum);
}

template <typename T>
ES_INLINE const float* widen_row(const T* row, int64_t n, float* scratch) {
  for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<float>(row[j]);
  return scratch;
}

ES_INLINE void loss_rows_body(const RowLossArgs& a, int64_t begin, int64_t end, float* scratch) {
  const int64_t n = a.params.num_classes;
  for (int64_t r = begin; r < end; ++r) {
    const float* x;
    switch (a.logits_type) {
      case LogitsType::kFloat16:
        x = widen_row(static_cast<const c10::Half*>(a.logits) + r * a.logits_row_stride, n, scratch);
        break;
      case LogitsType::kBFloat16:
        x = widen_row(static_cast<const c10::BFloat16*>(a.logits) + r * a.logits_row_stride, n, scratch);
        break;
      default:
        x = static_cast<const float*>(a.logits) + r * a.logits_row_stride;
    }
    const float* targets = a.params.kind == TargetKind::kSoft ? a.soft_targets + r * n : nullptr;
    const RowStats s = row_stats(x, targets, n);
    float loss;
    switch (a.params.kind) {
      case TargetKind::kSoft:
        loss = soft_target_loss(a.params, s.log_sum, s.target_sum, s.target_dot, s.shifted_sum);
        break;
      case TargetKind::kMixup:
        loss = mixup_loss(a.params, label_term(x, a.labels[r], s, a.params), label_term(x, a.labels_b[r], s, a.params));
        break;
      default:
        loss = label_term(x, a.labels[r], s, a.params);
    }
    // A NaN or +inf logit makes the shifted sum NaN; surface it as a NaN loss as the reference does, instead of
    // letting the max pass (which skips NaN) hide it.
    a.out[r] = std::isnan(s.shifted_sum) ? std::numeric_limits<float>::quiet_NaN() : loss;
    if (a.finite_rows != nullptr) a.finite_rows[r] = s.finite;
  }
}

void loss_rows_baseline(const RowLossArgs& a, int64_t begin, int64_t end, float* scratch) {
  loss_rows_body(a, begin, end, scratch);
}

#ifdef ES_X86_DISPATCH
__attribute__((target("avx2,fma"))) void loss_rows_avx2(const RowLossArgs& a, int64_t begin, int64_t end,
                                                         float* scratch) {
  loss_rows_body(a, begin, end, scratch);
}
#endif

}  // namespace

void loss_rows(const RowLossArgs& args, int64_t begin, int64_t end, float* scratch) {
#ifdef ES_X86_DISPATCH
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return loss_rows_avx2(args, begin, end, scratch);
#endif
  loss_rows_baseline(args, begin, end, scratch);
}

}  // namespace cpu
}  // namespace es_kernels
