// Torch-free interface between the CUDA launchers (*.cu, compiled by nvcc without ATen) and the torch glue
// (ops_cuda.cpp, compiled by the host compiler). Launchers take raw pointers, a caller-allocated workspace and a
// stream, never synchronise the host, and return the first CUDA error.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/common.cuh"
#include "kernels/philox.cuh"
#include "kernels/update.cuh"

namespace es_kernels {
namespace cuda {

struct FusedSelectLaunch {
  float* score;
  float* weight;
  int64_t num_samples;
  const int64_t* indices;
  int64_t batch;
  int64_t k;
  const void* logits;  // nullptr: `given_losses` are used
  int64_t logits_row_stride;
  LogitsType logits_type;
  const int64_t* labels;
  const int64_t* labels_b;
  const float* soft_targets;
  const float* given_losses;
  LossParams params;
  Betas betas;
  PhiloxArgs philox;
  float* losses_out;      // never equal to given_losses (both are __restrict__ in the kernels)
  int64_t* positions_out; // (k,)
  void* workspace;
  bool losses_only;  // write the losses and stop: no update, no draw (the host checks them first)
};

// num_classes: 0 when losses are given.
size_t fused_select_workspace_bytes(int64_t batch, int64_t k, int64_t num_classes);
cudaError_t launch_fused_select(const FusedSelectLaunch& launch, cudaStream_t stream);

struct PruneLaunch {
  const float* values;
  int64_t n;
  int64_t keep;  // 0 < keep < n
  PhiloxArgs philox;
  int64_t* out;  // (keep,)
  void* workspace;
};

size_t prune_workspace_bytes(int64_t n);
cudaError_t launch_prune(const PruneLaunch& launch, cudaStream_t stream);

}  // namespace cuda
}  // namespace es_kernels
