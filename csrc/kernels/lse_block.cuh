// CUDA only: one block's log-sum-exp partial of a row range (kernels/lse.cuh's thread schedule, then a fixed
// shuffle tree: deterministic for a given launch shape). Used by the class-logit kernels (select_kernels.cuh) and
// the token-logit kernel (sequence.cuh). tests/cuda_row_loss_host.cpp replays the schedule and the tree on the host
// with the same functions: keep the two in step.
#pragma once

#include "lse.cuh"

namespace es_kernels {
namespace cuda {

// Threads per row block; the host replay strides over the columns the same way.
constexpr int kRowThreads = 256;

__device__ __forceinline__ LsePartial shuffle_xor(const LsePartial& p, int lane_mask) {
  return LsePartial{__shfl_xor_sync(0xffffffffu, p.max, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.sum_exp, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.shifted_sum, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.count, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.target_sum, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.target_dot, lane_mask)};
}

// Result valid in thread 0; every thread of the block must call it.
__device__ inline LsePartial block_reduce(LsePartial p) {
  __shared__ LsePartial warp_results[kRowThreads / 32];
  for (int mask = 16; mask > 0; mask >>= 1) p = lse_merge(p, shuffle_xor(p, mask));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_results[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kRowThreads / 32 ? warp_results[lane] : lse_empty();
    for (int mask = 16; mask > 0; mask >>= 1) p = lse_merge(p, shuffle_xor(p, mask));
  }
  return p;
}

// The block's partial of x[0..n) (column stride `stride`; soft targets t with unit stride): 16-byte vector loads
// when the row has unit stride and no soft targets.
template <typename T, bool kSoft>
__device__ __forceinline__ LsePartial block_partial(const T* x, const float* t, int64_t n, int64_t stride) {
  LsePartial p;
  if (kSoft || stride != 1) {
    p = lse_thread_partial<kSoft, 1>(x, t, n, stride, threadIdx.x, kRowThreads);
  } else {
    p = lse_thread_partial<false, kLseVectorWidth<T>>(x, t, n, 1, threadIdx.x, kRowThreads);
  }
  return block_reduce(p);
}

}  // namespace cuda
}  // namespace es_kernels
