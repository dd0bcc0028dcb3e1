// CUDA device code of the fused select: per-sample losses (the log-sum-exp of kernels/lse.cuh, vector loads, one
// pass over the logits), the visit rule on the state, the race keys, and the k largest keys. Two schedules, chosen
// by the launcher (cuda/fused_select.cu):
//   B <= kOneBlockBatch: row_partial_kernel (a grid of rows x column splits, so a small meta-batch still fills every
//     SM) writes one partial per split; finish_one_block_kernel, one block, merges each row's partials in a fixed
//     order, takes the loss, applies the visit rule, draws the keys into shared memory and picks the k largest with
//     a bitonic sort, writing their positions ascending. Two launches.
//   larger B: loss_row_kernel, one block per row (loss, visit rule, key), then a stable radix sort of the keys and
//     of the k winning positions (cub). Three launches.
// Both give the same positions: the k largest keys, equal keys to the lower position.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cmath>

#include "common.cuh"
#include "lse_block.cuh"
#include "philox.cuh"
#include "race.cuh"
#include "top_k.cuh"
#include "update.cuh"

namespace es_kernels {
namespace cuda {

// Largest meta-batch of the one-block schedule: its keys (8 bytes) and positions (2 bytes) and flags (1 byte) fill
// 44 KiB of the 48 KiB of static shared memory.
constexpr int kOneBlockBatch = 4096;
constexpr int kFinishThreads = 1024;

// Where a row's loss inputs are: logits with unit column stride and row stride, labels or soft targets.
struct RowInputs {
  const void* logits;
  int64_t row_stride;
  const int64_t* labels;
  const int64_t* labels_b;
  const float* soft_targets;
};

// The row's loss from its complete partial. A label outside [0, C) (value checks off) is not read: the loss is NaN
// and the row never wins a race.
template <typename T, TargetKind kKind>
__device__ __forceinline__ float row_loss(const RowInputs& in, const LossParams& params, int64_t row,
                                          const LsePartial& p) {
  const T* x = static_cast<const T*>(in.logits) + row * in.row_stride;
  const int64_t n = params.num_classes;
  float label_a = NAN, label_b = NAN;
  if (kKind != TargetKind::kSoft) {
    const int64_t y = in.labels[row];
    if (y >= 0 && y < n) label_a = lse_to_float(x[y]);
  }
  if (kKind == TargetKind::kMixup) {
    const int64_t y_b = in.labels_b[row];
    if (y_b >= 0 && y_b < n) label_b = lse_to_float(x[y_b]);
  }
  return lse_loss(params, p, label_a, label_b);
}

// The visit rule at the row's dataset id and the row's race key, complemented so that an ascending order puts the
// largest key first. An id outside [0, n) (value checks off) is neither read nor written and never preferred.
__device__ __forceinline__ uint64_t visit_and_key(int64_t row, float loss, float* score, float* weight,
                                                  int64_t num_samples, const int64_t* indices, const Betas& betas,
                                                  uint64_t seed, uint64_t offset) {
  const int64_t id = indices[row];
  float w = NAN;
  if (id >= 0 && id < num_samples) {
    w = visit(score + id, loss, betas);
    weight[id] = w;
  }
  return ~order_bits(race_key(w, meta_batch_uniform(seed, offset, row)));
}

// ------------------------------------------------------------------------------------------ B <= kOneBlockBatch

// Block (split, row): the partial of columns [split * chunk, min(C, (split + 1) * chunk)) of the row.
template <typename T, bool kSoft>
__global__ void __launch_bounds__(kRowThreads)
    row_partial_kernel(RowInputs in, int64_t num_classes, int64_t chunk, LsePartial* __restrict__ partials) {
  const int64_t row = blockIdx.y, split = blockIdx.x;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < num_classes ? begin + chunk : num_classes;
  const T* x = static_cast<const T*>(in.logits) + row * in.row_stride + begin;
  const float* t = kSoft ? in.soft_targets + row * num_classes + begin : nullptr;
  const LsePartial p = block_partial<T, kSoft>(x, t, end - begin, 1);
  if (threadIdx.x == 0) partials[row * gridDim.x + split] = p;
}

// One block: losses (from `splits` partials per row, or `given`), then, unless losses_only, the visit rule, the
// keys and the k largest of them, positions ascending.
template <typename T, TargetKind kKind>
__global__ void __launch_bounds__(kFinishThreads)
    finish_one_block_kernel(RowInputs in, LossParams params, const LsePartial* __restrict__ partials, int splits,
                            const float* __restrict__ given, int64_t batch, int64_t k, float* score, float* weight,
                            int64_t num_samples, const int64_t* __restrict__ indices, Betas betas, PhiloxArgs philox,
                            float* __restrict__ losses, int64_t* __restrict__ positions_out, bool losses_only) {
  __shared__ uint64_t keys[kOneBlockBatch];
  __shared__ uint16_t order[kOneBlockBatch];
  __shared__ uint8_t chosen[kOneBlockBatch];
  uint64_t seed = 0, offset = 0;
  if (!losses_only) unpack_philox(philox, &seed, &offset);
  const int padded = top_k_padded_size(static_cast<int>(batch));
  for (int i = threadIdx.x; i < padded; i += kFinishThreads) {
    if (i >= batch) {
      top_k_pad(keys, order, i);
      continue;
    }
    float loss;
    if (given != nullptr) {
      loss = given[i];
    } else {
      LsePartial p = partials[static_cast<int64_t>(i) * splits];
      for (int s = 1; s < splits; ++s) p = lse_merge(p, partials[static_cast<int64_t>(i) * splits + s]);
      loss = row_loss<T, kKind>(in, params, i, p);
    }
    losses[i] = loss;
    if (losses_only) continue;
    keys[i] = visit_and_key(i, loss, score, weight, num_samples, indices, betas, seed, offset);
    order[i] = static_cast<uint16_t>(i);
    chosen[i] = 0;
  }
  if (losses_only) return;
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < padded; i += kFinishThreads) bitonic_exchange(keys, order, size, stride, i);
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < k; i += kFinishThreads) chosen[order[i]] = 1;
  __syncthreads();
  // Ordered compaction: thread j owns the positions [j * per, (j + 1) * per).
  using Scan = cub::BlockScan<int, kFinishThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int per = (static_cast<int>(batch) + kFinishThreads - 1) / kFinishThreads;
  const int first = threadIdx.x * per;
  int mine = 0;
  for (int j = 0; j < per; ++j) mine += first + j < batch && chosen[first + j];
  int before;
  Scan(scan_storage).ExclusiveSum(mine, before);
  for (int j = 0; j < per; ++j) {
    if (first + j < batch && chosen[first + j]) positions_out[before++] = first + j;
  }
}

// ------------------------------------------------------------------------------------------ larger B

// One block per row: the whole row's loss, the visit rule, the key; positions ride along for the sort.
template <typename T, TargetKind kKind>
__global__ void __launch_bounds__(kRowThreads)
    loss_row_kernel(RowInputs in, LossParams params, float* score, float* weight, int64_t num_samples,
                    const int64_t* __restrict__ indices, Betas betas, PhiloxArgs philox, float* __restrict__ losses,
                    uint64_t* __restrict__ keys, int64_t* __restrict__ positions, bool losses_only) {
  const int64_t row = blockIdx.x;
  const int64_t n = params.num_classes;
  const T* x = static_cast<const T*>(in.logits) + row * in.row_stride;
  const float* t = kKind == TargetKind::kSoft ? in.soft_targets + row * n : nullptr;
  const LsePartial p = block_partial<T, kKind == TargetKind::kSoft>(x, t, n, 1);
  if (threadIdx.x != 0) return;
  const float loss = row_loss<T, kKind>(in, params, row, p);
  losses[row] = loss;
  if (losses_only) return;
  uint64_t seed, offset;
  unpack_philox(philox, &seed, &offset);
  keys[row] = visit_and_key(row, loss, score, weight, num_samples, indices, betas, seed, offset);
  positions[row] = row;
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
  uint64_t seed, offset;
  unpack_philox(philox, &seed, &offset);
  keys[row] = visit_and_key(row, loss, score, weight, num_samples, indices, betas, seed, offset);
  positions[row] = row;
}

}  // namespace cuda
}  // namespace es_kernels
