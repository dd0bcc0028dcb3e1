// Launchers of the sequence-loss kernels (kernels/sequence.cuh): one block per row, one block per sequence.
#include "cuda/sequence_launch.h"

namespace es_kernels {
namespace cuda {

namespace {

template <typename T>
void rows_for(const void* logits, int64_t num_rows, const SequenceRows& rows, const SequenceTargets& targets,
              const SequenceLossParams& params, bool first, LsePartial* stats, float* target_logit,
              cudaStream_t stream) {
  sequence_rows_kernel<T><<<static_cast<unsigned>(num_rows), kSequenceThreads, 0, stream>>>(
      static_cast<const T*>(logits), rows, targets, params, first, stats, target_logit);
}

}  // namespace

cudaError_t launch_sequence_rows(const void* logits, SequenceDtype dtype, int64_t num_rows, const SequenceRows& rows,
                                 const SequenceTargets& targets, const SequenceLossParams& params, bool first,
                                 LsePartial* stats, float* target_logit, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  switch (dtype) {
    case SequenceDtype::kFloat16:
      rows_for<__half>(logits, num_rows, rows, targets, params, first, stats, target_logit, stream);
      break;
    case SequenceDtype::kBFloat16:
      rows_for<__nv_bfloat16>(logits, num_rows, rows, targets, params, first, stats, target_logit, stream);
      break;
    case SequenceDtype::kFloat64:
      rows_for<double>(logits, num_rows, rows, targets, params, first, stats, target_logit, stream);
      break;
    default:
      rows_for<float>(logits, num_rows, rows, targets, params, first, stats, target_logit, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_sequence_reduce(const LsePartial* stats, const float* target_logit, int64_t batch,
                                   const SequenceTargets& targets, const SequenceLossParams& params, bool mean,
                                   float* out, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  sequence_reduce_kernel<<<static_cast<unsigned>(batch), kSequenceThreads, 0, stream>>>(stats, target_logit, targets,
                                                                                         params, mean, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace es_kernels
