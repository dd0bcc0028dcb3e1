// Entry points of the CPU loss kernel (row_loss.cpp): a range of class-logit rows, called from at::parallel_for
// chunks, and one row's log-sum-exp partial.
#pragma once

#include <cstdint>

#include "kernels/lse.cuh"

namespace es_kernels {
namespace cpu {

struct RowLossArgs {
  const void* logits;           // (B, C) rows with unit column stride
  int64_t logits_row_stride;
  LogitsType logits_type;
  const int64_t* labels;        // hard labels or y_a
  const int64_t* labels_b;      // mixup y_b
  const float* soft_targets;    // contiguous (B, C) fp32
  LossParams params;
  float* out;                   // (B,) fp32 losses
  uint8_t* finite_rows;         // optional (B,): whether each row's logits are all finite
};

// `scratch` holds C floats; rows of fp16/bf16 logits are widened into it.
void loss_rows(const RowLossArgs& args, int64_t begin, int64_t end, float* scratch);

// The log-sum-exp partial of n contiguous fp32 logits (no targets), by the same SIMD loop; for the sequence losses.
LsePartial row_partial(const float* x, int64_t n);

}  // namespace cpu
}  // namespace es_kernels
