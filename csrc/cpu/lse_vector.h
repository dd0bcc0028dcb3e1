// The CPU's SIMD fill of the log-sum-exp partial (kernels/lse.cuh) over one contiguous fp32 row: a max pass, then
// one pass for the exponentials and the linear sums, over a row that sits in L1. Every CPU loss form calls it (class
// logits in row_loss.cpp, token logits and hidden-state chunks in sequence_loss.cpp); the loss itself is then
// kernels/lse.cuh's lse_loss, as on the GPU.
//
// Vectorisation: ATen's Vectorized<float> only uses AVX2/AVX-512 when the including file is compiled for them, and
// an extension must run on any x86-64, so the loops are written with GCC/Clang vector extensions and a polynomial
// exp, instantiated per vector width and compiled for the baseline ISA, AVX2+FMA and AVX-512, one picked once at
// run time by CPUID (row_loss.cpp). Other compilers get the scalar loop of lse.cuh.
//
// Include only from files that allow contraction into fused multiply-adds (`#pragma GCC optimize
// ("fp-contract=fast")` before any include): losses are compared with a tolerance, while the state update
// (update.cuh, compiled in fused_select.cpp) must round exactly like the reference.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/lse.cuh"

namespace es_kernels {
namespace cpu {

#if defined(__GNUC__)
#define ES_INLINE inline __attribute__((always_inline))
#define ES_VECTOR_EXTENSIONS 1

// GCC ignores a vector_size that depends on a template parameter, hence one specialisation per width.
template <int kWidth>
struct VectorTypes;
template <>
struct VectorTypes<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
};
template <>
struct VectorTypes<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
template <>
struct VectorTypes<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
};

template <int kWidth>
struct Lanes {
  typedef typename VectorTypes<kWidth>::f f;
  typedef typename VectorTypes<kWidth>::i i;

  static ES_INLINE f load(const float* p) {
    f v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static ES_INLINE f splat(float x) { return f{} + x; }
  static ES_INLINE f select(i mask, f a, f b) {
    return reinterpret_cast<f>((mask & reinterpret_cast<i>(a)) | (~mask & reinterpret_cast<i>(b)));
  }
  static ES_INLINE f max(f a, f b) { return select(a > b, a, b); }
  static ES_INLINE float sum(f v) {
    float total = 0.0f;
    for (int lane = 0; lane < kWidth; ++lane) total += v[lane];
    return total;
  }
  static ES_INLINE float top(f v) {
    float m = v[0];
    for (int lane = 1; lane < kWidth; ++lane) m = v[lane] > m ? v[lane] : m;
    return m;
  }

  // exp(x) for x <= 0 (x = logit - row max): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' expf
  // polynomial (about 1 ulp). x is clamped at ln(FLT_MIN), so a term below FLT_MIN (a -inf logit included) counts
  // as FLT_MIN: one max instead of a compare, a blend and a mask, and nothing next to the term exp(0) = 1 of the
  // row's max (it would take 2^100 such terms to move the sum by one ulp).
  static ES_INLINE f exp_nonpositive(f x) {
    x = max(x, splat(-87.33654f));
    // x * log2(e) - 0.5 is negative, so truncation rounds it up: n = ceil(x log2 e - 0.5), nearest to x log2 e.
    const i n = __builtin_convertvector(x * splat(1.44269504088896341f) - splat(0.5f), i);
    const f nf = __builtin_convertvector(n, f);
    f r = x - nf * splat(0.693359375f);
    r = r - nf * splat(-2.12194440e-4f);
    const f z = r * r;
    f p = splat(1.9875691500E-4f);
    p = p * r + splat(1.3981999507E-3f);
    p = p * r + splat(8.3334519073E-3f);
    p = p * r + splat(4.1665795894E-2f);
    p = p * r + splat(1.6666665459E-1f);
    p = p * r + splat(5.0000001201E-1f);
    p = p * z + r + splat(1.0f);
    const i scale_bits = (n + 127) << 23;
    return p * reinterpret_cast<f>(scale_bits);
  }
};

// The partial of x[0..n) (soft targets t, or nullptr for labels). With `finite` non-null it also says whether
// every logit is finite: x - x is 0 for a finite x and NaN for inf or NaN, summed in the max pass (the max alone
// skips NaN), one vector add per kWidth logits.
template <int kWidth>
ES_INLINE LsePartial vector_row_partial(const float* x, const float* t, int64_t n, bool* finite) {
  using L = Lanes<kWidth>;
  typedef typename L::f vf;
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
  float finite_probe = 0.0f;
  if (n >= 2 * kWidth) {
    // Two accumulators hide the latency of the compare-select chain.
    vf m0 = L::load(x), m1 = L::load(x + kWidth);
    vf probe = (m0 - m0) + (m1 - m1);
    for (j = 2 * kWidth; j + 2 * kWidth <= n; j += 2 * kWidth) {
      const vf v0 = L::load(x + j), v1 = L::load(x + j + kWidth);
      m0 = L::max(v0, m0);
      m1 = L::max(v1, m1);
      if (finite != nullptr) probe += (v0 - v0) + (v1 - v1);
    }
    m = L::top(L::max(m0, m1));
    finite_probe = L::sum(probe);
  }
  for (; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    finite_probe += x[j] - x[j];
  }
  if (finite != nullptr) *finite = finite_probe == 0.0f;

  LsePartial p = lse_empty();
  p.max = m;
  p.count = static_cast<float>(n);
  const float a = lse_anchor(m);
  j = 0;
  const vf va = L::splat(a);
  vf acc_exp0 = L::splat(0.0f), acc_exp1 = acc_exp0, acc_shift = acc_exp0, acc_t = acc_exp0, acc_dot = acc_exp0;
  if (t == nullptr) {
    for (; j + 2 * kWidth <= n; j += 2 * kWidth) {
      const vf d0 = L::load(x + j) - va, d1 = L::load(x + j + kWidth) - va;
      acc_exp0 += L::exp_nonpositive(d0);
      acc_exp1 += L::exp_nonpositive(d1);
      acc_shift += d0 + d1;
    }
  } else {
    for (; j + kWidth <= n; j += kWidth) {
      const vf d = L::load(x + j) - va;
      acc_exp0 += L::exp_nonpositive(d);
      acc_shift += d;
      const vf w = L::load(t + j);
      acc_t += w;
      acc_dot += w * d;
    }
  }
  p.sum_exp = L::sum(acc_exp0 + acc_exp1);
  p.shifted_sum = L::sum(acc_shift);
  p.target_sum = L::sum(acc_t);
  p.target_dot = L::sum(acc_dot);
  for (; j < n; ++j) {
    const float d = x[j] - a;
    // exp(d) of the last < 2 * kWidth columns: d = -inf (a -inf logit) gives 0, NaN stays NaN (its shifted sum is
    // NaN too, so the loss is).
    p.sum_exp += std::exp(d);
    p.shifted_sum += d;
    if (t != nullptr) {
      p.target_sum += t[j];
      p.target_dot += t[j] * d;
    }
  }
  return p;
}
#else
#define ES_INLINE inline

template <int kWidth>
inline LsePartial vector_row_partial(const float* x, const float* t, int64_t n, bool* finite) {
  if (finite != nullptr) {
    float probe = 0.0f;
    for (int64_t j = 0; j < n; ++j) probe += x[j] - x[j];
    *finite = probe == 0.0f;
  }
  const auto load = [x](int64_t j) { return x[j]; };
  const auto load_target = [t](int64_t j) { return t[j]; };
  return t == nullptr ? lse_of_range<false>(load, load_target, n) : lse_of_range<true>(load, load_target, n);
}
#endif

}  // namespace cpu
}  // namespace es_kernels
