// Launchers of the sequence-loss kernels (kernels/sequence.cuh): one block per row, one block per sequence.
#include "cuda/sequence_launch.h"

namespace es_kernels {
namespace cuda {

namespace {

template <typename T>
void rows_for(const void* logits, int64_t num_rows, const SequenceRows& rows, const SequenceTargets& targets,
              const SequenceLossParams& params, bool first, LsePartial* stats, float* target_logit,
              cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_rows), static_cast<unsigned>(rows.splits));
  sequence_rows_kernel<T><<<grid, kSequenceThreads, 0, stream>>>(
      static_cast<const T*>(logits), rows, targets, params, first, stats, target_logit);
}

// A split is worth a block's setup only above this many columns; 8 blocks of 256 threads fill an SM.
constexpr int64_t kMinSplitColumns = 4096;
constexpr int64_t kBlocksPerSm = 8;

}  // namespace

int64_t sequence_splits(int64_t num_rows, int64_t columns) {
  static int counts[64] = {};
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess && device >= 0 && device < 64) {
    if (counts[device] == 0 &&
        cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      counts[device] = 132;
    }
    sms = counts[device];
  }
  if (num_rows <= 0) return 1;
  int64_t splits = (kBlocksPerSm * sms + num_rows - 1) / num_rows;
  const int64_t most = (columns + kMinSplitColumns - 1) / kMinSplitColumns;
  splits = splits < most ? splits : most;
  return splits > 1 ? splits : 1;
}

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

cudaError_t launch_sequence_reduce(const LsePartial* stats, int64_t splits, const float* target_logit, int64_t batch,
                                   const SequenceTargets& targets, const SequenceLossParams& params, bool mean,
                                   float* out, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  sequence_reduce_kernel<<<static_cast<unsigned>(batch), kSequenceThreads, 0, stream>>>(stats, splits, target_logit,
                                                                                         targets, params, mean, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace es_kernels
