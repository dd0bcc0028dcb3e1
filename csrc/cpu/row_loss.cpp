// Per-sample cross-entropy on CPU: one row at a time, the row's log-sum-exp partial by the SIMD loop of
// cpu/lse_vector.h (two passes over a row that sits in L1, fp32 accumulation whatever the logits' dtype), then the
// loss in closed form (kernels/lse.cuh). The row loop is compiled for the baseline ISA, AVX2+FMA and AVX-512 (16
// lanes, the width torch's own log-softmax uses on such machines) and picked once at run time by CPUID.
//
// Contraction into fused multiply-adds is allowed in this file only: losses are compared with a tolerance, while
// the state update (update.cuh, compiled in fused_select.cpp) must round exactly like the reference.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
// The wide helpers are always inlined, so no vector crosses a call boundary of the baseline build.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "cpu/row_loss.h"

#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/lse_vector.h"

namespace es_kernels {
namespace cpu {

namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define ES_X86_DISPATCH 1
#endif

// The logit at a label; with value checks off a bad label must not be read: NaN makes the sample's weight lose
// every race.
ES_INLINE float label_logit(const float* x, int64_t label, int64_t num_classes) {
  return label >= 0 && label < num_classes ? x[label] : std::numeric_limits<float>::quiet_NaN();
}

template <typename T>
ES_INLINE const float* widen_row(const T* row, int64_t n, float* scratch) {
  for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<float>(row[j]);
  return scratch;
}

template <int kWidth>
ES_INLINE void loss_rows_body(const RowLossArgs& a, int64_t begin, int64_t end, float* scratch) {
  const int64_t n = a.params.num_classes;
  const bool soft = a.params.kind == TargetKind::kSoft;
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
    bool finite = true;
    const LsePartial p =
        vector_row_partial<kWidth>(x, soft ? a.soft_targets + r * n : nullptr, n, a.finite_rows ? &finite : nullptr);
    const float label_a = soft ? 0.0f : label_logit(x, a.labels[r], n);
    const float label_b = a.params.kind == TargetKind::kMixup ? label_logit(x, a.labels_b[r], n)
                                                               : std::numeric_limits<float>::quiet_NaN();
    a.out[r] = lse_loss(a.params, p, label_a, label_b);
    if (a.finite_rows != nullptr) a.finite_rows[r] = finite;
  }
}

void loss_rows_baseline(const RowLossArgs& a, int64_t begin, int64_t end, float* scratch) {
  loss_rows_body<4>(a, begin, end, scratch);
}

LsePartial row_partial_baseline(const float* x, int64_t n) { return vector_row_partial<4>(x, nullptr, n, nullptr); }

#ifdef ES_X86_DISPATCH
__attribute__((target("avx2,fma"))) void loss_rows_avx2(const RowLossArgs& a, int64_t begin, int64_t end,
                                                         float* scratch) {
  loss_rows_body<8>(a, begin, end, scratch);
}

__attribute__((target("avx2,fma"))) LsePartial row_partial_avx2(const float* x, int64_t n) {
  return vector_row_partial<8>(x, nullptr, n, nullptr);
}

__attribute__((target("avx512f,avx512dq,avx2,fma"))) void loss_rows_avx512(const RowLossArgs& a, int64_t begin,
                                                                           int64_t end, float* scratch) {
  loss_rows_body<16>(a, begin, end, scratch);
}

__attribute__((target("avx512f,avx512dq,avx2,fma"))) LsePartial row_partial_avx512(const float* x, int64_t n) {
  return vector_row_partial<16>(x, nullptr, n, nullptr);
}

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa detect_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kBaseline;
}

const Isa kIsa = detect_isa();
#endif

}  // namespace

void loss_rows(const RowLossArgs& args, int64_t begin, int64_t end, float* scratch) {
#ifdef ES_X86_DISPATCH
  if (kIsa == Isa::kAvx512) return loss_rows_avx512(args, begin, end, scratch);
  if (kIsa == Isa::kAvx2) return loss_rows_avx2(args, begin, end, scratch);
#endif
  loss_rows_baseline(args, begin, end, scratch);
}

LsePartial row_partial(const float* x, int64_t n) {
#ifdef ES_X86_DISPATCH
  if (kIsa == Isa::kAvx512) return row_partial_avx512(x, n);
  if (kIsa == Isa::kAvx2) return row_partial_avx2(x, n);
#endif
  return row_partial_baseline(x, n);
}

}  // namespace cpu
}  // namespace es_kernels
