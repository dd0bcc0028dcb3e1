// The visit rule of Algorithm 1 with the reference's exact fp32 rounding (reference/update.py): each product is
// rounded to fp32, then the two are added. A fused multiply-add would round once and break bit-equality with the
// reference, so device code uses the explicitly rounded intrinsics and host code is built with -ffp-contract=off.
#pragma once

#include "common.cuh"

namespace es_kernels {

ES_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ES_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Betas as the reference sees them: b rounded to fp32, (1 - b) computed in double and then rounded.
struct Betas {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
};

inline Betas make_betas(double beta1, double beta2) {
  return {static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2)};
}

// Returns the new weight w and stores the new score through `score`; reads the old score first.
ES_HD float visit(float* score, float loss, const Betas& b) {
  const float s_old = *score;
  const float w = add_rn(mul_rn(s_old, b.beta1), mul_rn(loss, b.one_minus_beta1));
  *score = add_rn(mul_rn(s_old, b.beta2), mul_rn(loss, b.one_minus_beta2));
  return w;
}

}  // namespace es_kernels
