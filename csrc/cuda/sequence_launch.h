// Torch-free interface between the CUDA launchers of the sequence losses (sequence_loss.cu, nvcc without ATen) and
// their torch glue (sequence_loss_cuda.cpp): raw pointers, a stream, no host synchronisation; each returns the
// first CUDA error.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/sequence.cuh"

namespace es_kernels {
namespace cuda {

// Element type of the rows the row kernel reads.
enum class SequenceDtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Column splits per row for a launch over `num_rows` rows of `columns` columns: enough blocks to fill every SM of the
// current device, each split at least a few thousand columns wide; 1 for many rows.
int64_t sequence_splits(int64_t num_rows, int64_t columns);

// Statistics of `num_rows` rows (rows.splits blocks each) absorbed into stats/target_logit (indexed by token).
cudaError_t launch_sequence_rows(const void* logits, SequenceDtype dtype, int64_t num_rows, const SequenceRows& rows,
                                 const SequenceTargets& targets, const SequenceLossParams& params, bool first,
                                 LsePartial* stats, float* target_logit, cudaStream_t stream);

// Per-sequence losses (B,) from the token statistics.
cudaError_t launch_sequence_reduce(const LsePartial* stats, int64_t splits, const float* target_logit, int64_t batch,
                                   const SequenceTargets& targets, const SequenceLossParams& params, bool mean,
                                   float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace es_kernels
