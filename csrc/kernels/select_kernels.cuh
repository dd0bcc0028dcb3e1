// CUDA device code of the fused select: one block per meta-batch row computes the loss (online log-sum-exp in fp32
// over the row), applies the visit rule to the state and writes the row's race key. The k largest keys are then
// found with a stable radix sort (cub), so equal keys keep position order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common.cuh"
#include "philox.cuh"
#include "race.cuh"
#include "row_partial.cuh"
#include "update.cuh"

namespace es_kernels {
namespace cuda {

constexpr int kRowThreads = kRowLossThreads;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ RowPartial shuffle_xor(const RowPartial& p, int lane_mask) {
  return RowPartial{__shfl_xor_sync(0xffffffffu, p.max, lane_mask), __shfl_xor_sync(0xffffffffu, p.sum_exp, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.shifted_x, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.sum_t, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.shifted_tx, lane_mask),
                    __shfl_xor_sync(0xffffffffu, p.count, lane_mask)};
}

// Result valid in thread 0. tests/cuda_row_loss_host.cpp replays this tree on the host: keep the two in step.
__device__ RowPartial block_reduce(RowPartial p) {
  __shared__ RowPartial warp_results[kRowThreads / 32];
  for (int mask = 16; mask > 0; mask >>= 1) p = merge(p, shuffle_xor(p, mask));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_results[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kRowThreads / 32 ? warp_results[lane] : empty_partial();
    for (int mask = 16; mask > 0; mask >>= 1) p = merge(p, shuffle_xor(p, mask));
  }
  return p;
}

// Shared tail of both row kernels: the visit rule at the row's dataset id, then the race key. The sort is
// ascending, so the key is stored complemented (largest key first); the position rides along as the sort value.
__device__ __forceinline__ void update_and_key(int64_t row, float loss, float* score, float* weight,
                                               int64_t num_samples, const int64_t* indices, const Betas& betas,
                                               const PhiloxArgs& philox, uint64_t* keys, int64_t* positions) {
  const int64_t id = indices[row];
  float w = NAN;  // an id outside [0, n) (value checks off) is neither read nor written and never preferred
  if (id >= 0 && id < num_samples) {
    w = visit(score + id, loss, betas);
    weight[id] = w;
  }
  uint64_t seed, offset;
  unpack_philox(philox, &seed, &offset);
  keys[row] = ~order_bits(race_key(w, meta_batch_uniform(seed, offset, row)));
  positions[row] = row;
}

template <typename T, TargetKind kKind>
__global__ void __launch_bounds__(kRowThreads)
    loss_row_kernel(const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ labels,
                    const int64_t* __restrict__ labels_b, const float* __restrict__ soft_targets, LossParams params,
                    float* score, float* weight, int64_t num_samples, const int64_t* __restrict__ indices,
                    Betas betas, PhiloxArgs philox, float* __restrict__ losses, uint64_t* __restrict__ keys,
                    int64_t* __restrict__ positions, bool losses_only) {
  const int64_t row = blockIdx.x;
  const int64_t n = params.num_classes;
  const T* x = logits + row * row_stride;
  const float* t = kKind == TargetKind::kSoft ? soft_targets + row * n : nullptr;
  RowPartial p = empty_partial();
  for (int64_t c = threadIdx.x; c < n; c += kRowThreads) {
    accumulate<kKind == TargetKind::kSoft>(p, to_float(x[c]), kKind == TargetKind::kSoft ? t[c] : 0.0f);
  }
  p = block_reduce(p);
  if (threadIdx.x != 0) return;

  // A label outside [0, C) (value checks off) is not read: the loss is NaN and the row never wins a race.
  float label_a = NAN, label_b = NAN;
  if (kKind != TargetKind::kSoft) {
    const int64_t y = labels[row];
    if (y >= 0 && y < n) label_a = to_float(x[y]);
  }
  if (kKind == TargetKind::kMixup) {
    const int64_t y_b = labels_b[row];
    if (y_b >= 0 && y_b < n) label_b = to_float(x[y_b]);
  }
  const float loss = partial_loss(params, p, label_a, label_b);
  losses[row] = loss;
  if (losses_only) return;
  update_and_key(row, loss, score, weight, num_samples, indices, betas, philox, keys, positions);
}

// Losses given: one thread per row.
__global__ void given_loss_kernel(const float* __restrict__ given, int64_t batch, float* score, float* weight,
                                  int64_t num_samples, const int64_t* __restrict__ indices, Betas betas,
                                  PhiloxArgs philox, float* losses, uint64_t* __restrict__ keys,
                                  int64_t* __restrict__ positions) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= batch) return;
  const float loss = given[row];
  losses[row] = loss;
  update_and_key(row, loss, score, weight, num_samples, indices, betas, philox, keys, positions);
}

}  // namespace cuda
}  // namespace es_kernels
