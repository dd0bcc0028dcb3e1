// Shared by the CPU (.cpp, host compiler) and CUDA (.cu, nvcc) builds. No torch headers here: nvcc compiles these
// files without ATen, which keeps CUDA builds fast and lets the CPU build test the very same arithmetic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ES_HD __host__ __device__ __forceinline__
#else
#define ES_HD inline
#endif

namespace es_kernels {

// How the targets of a row are given; the loss formulas below switch on it.
enum class TargetKind : int32_t {
  kNone = 0,   // losses were given, no logits
  kHard = 1,   // int64 class ids (B,)
  kSoft = 2,   // dense fp32 targets (B, C)
  kMixup = 3,  // lam * CE(y_a) + (1 - lam) * CE(y_b)
};

// Storage type of the logits; fp64 logits are rounded to fp32 on the host first, as the reference does.
enum class LogitsType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Everything a row needs besides its logits; scalars are rounded to fp32 once, where the reference rounds them.
struct LossParams {
  int64_t num_classes;
  TargetKind kind;
  float keep;             // 1 - label_smoothing
  float smooth_per_class; // label_smoothing / C
  float smoothing;        // label_smoothing
  float lam_a;            // mixup: lam
  float lam_b;            // mixup: 1 - lam (computed in double, as Python does)
};

// Per-row sufficient statistics, all relative to the row maximum m so large logits lose nothing to cancellation:
// log_sum = log(sum exp(x - m)), shifted_sum = sum (x - m), target_sum = sum t, target_dot = sum t * (x - m).
// The loss is then closed-form (docs/architecture.md §3; label smoothing folded into the same pass):
//   hard:  log_sum - keep * (x_y - m) - (eps / C) * shifted_sum
//   soft:  keep * (T * log_sum - D) + eps * log_sum - (eps / C) * shifted_sum
ES_HD float hard_label_loss(const LossParams& p, float log_sum, float shifted_label, float shifted_sum) {
  float loss = log_sum - p.keep * shifted_label;
  if (p.smoothing != 0.0f) loss -= p.smooth_per_class * shifted_sum;
  return loss;
}

ES_HD float soft_target_loss(const LossParams& p, float log_sum, float target_sum, float target_dot,
                             float shifted_sum) {
  float loss = p.keep * (target_sum * log_sum - target_dot);
  if (p.smoothing != 0.0f) loss += p.smoothing * log_sum - p.smooth_per_class * shifted_sum;
  return loss;
}

ES_HD float mixup_loss(const LossParams& p, float loss_a, float loss_b) {
  // Same rounding as the reference: each product in fp32, then the sum.
  float a = p.lam_a * loss_a;
  float b = p.lam_b * loss_b;
  return a + b;
}

}  // namespace es_kernels
