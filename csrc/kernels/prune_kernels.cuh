// CUDA device code of the pruning draw over n ids: keys, a three-digit radix select of the keep-th largest key
// (histogram passes, each followed by a one-thread bucket choice that stays on the device), then an ordered
// compaction by tiles so the ids come out ascending with ties taken lowest id first. Same arithmetic as the CPU
// build (race.cuh), which the tests exercise.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cooperative_groups.h>

#include "common.cuh"
#include "philox.cuh"
#include "race.cuh"

namespace es_kernels {
namespace cuda {

constexpr int kPruneThreads = 256;
constexpr int kTileItems = 16;  // per thread: a tile is 4096 consecutive ids
constexpr int64_t kTile = kPruneThreads * kTileItems;

// Adds one to bin `bin` of a shared histogram, one atomic per distinct bin in the warp: keys cluster in a few bins
// (a pruning state's weights span a few octaves, and the top digit is mostly the exponent), and plain shared atomics
// on one address serialise the whole warp.
__device__ __forceinline__ void count_in_warp(unsigned* histogram, uint32_t bin) {
  namespace cg = cooperative_groups;
  const cg::coalesced_group active = cg::coalesced_threads();
  const cg::coalesced_group peers = cg::labeled_partition(active, bin);
  if (peers.thread_rank() == 0) atomicAdd(&histogram[bin], peers.size());
}

__device__ __forceinline__ void flush_histogram(const unsigned* shared, int64_t* global) {
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) {
    if (shared[b] != 0) atomicAdd(reinterpret_cast<unsigned long long*>(global + b), shared[b]);
  }
}

__global__ void __launch_bounds__(kPruneThreads)
    prune_keys_kernel(const float* __restrict__ values, bool aligned, int64_t n, PhiloxArgs philox,
                      uint32_t* __restrict__ keys, int64_t* __restrict__ histogram) {
  __shared__ unsigned local[kRadixBins];
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  uint64_t seed, offset;
  unpack_philox(philox, &seed, &offset);
  const int64_t blocks = (n + 3) / 4;
  for (int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; block < blocks;
       block += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 r = philox4x32_10(seed, offset, static_cast<uint64_t>(block));
    const int64_t base = block * 4;
    if (aligned && base + 4 <= n) {
      // A whole Philox block: one 16-byte load and one 16-byte store (`keys` is 16-byte aligned: workspace).
      const float4 w = reinterpret_cast<const float4*>(values)[block];
      const uint4 bits{order_bits(prune_key(w.x, uniform_float(r.x))), order_bits(prune_key(w.y, uniform_float(r.y))),
                       order_bits(prune_key(w.z, uniform_float(r.z))), order_bits(prune_key(w.w, uniform_float(r.w)))};
      reinterpret_cast<uint4*>(keys)[block] = bits;
      count_in_warp(local, bits.x >> radix_shift(0));
      count_in_warp(local, bits.y >> radix_shift(0));
      count_in_warp(local, bits.z >> radix_shift(0));
      count_in_warp(local, bits.w >> radix_shift(0));
      continue;
    }
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = base + lane;
      if (i >= n) break;
      const uint32_t bits = order_bits(prune_key(values[i], uniform_float(philox_word(r, lane))));
      keys[i] = bits;
      atomicAdd(&local[bits >> radix_shift(0)], 1u);
    }
  }
  flush_histogram(local, histogram);
}

__global__ void __launch_bounds__(kPruneThreads)
    prune_histogram_kernel(const uint32_t* __restrict__ keys, int64_t n, int pass, const RadixState* state,
                           int64_t* __restrict__ histogram) {
  __shared__ unsigned local[kRadixBins];
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const uint32_t prefix = state->prefix;
  const int shift = radix_shift(pass);
  const uint32_t mask = radix_digit_mask(pass);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t bits = keys[i];
    // Only keys in the chosen bucket count; those are spread over the next digit, so plain atomics do.
    if (radix_matches(bits, pass, prefix)) atomicAdd(&local[(bits >> shift) & mask], 1u);
  }
  flush_histogram(local, histogram);
}

// One thread: 2048 bins, once per pass; cheaper than a round trip to the host.
__global__ void prune_choose_kernel(const int64_t* histogram, int pass, int64_t keep, RadixState* state) {
  if (pass == 0) *state = RadixState{0, keep};
  radix_choose_bucket(histogram, pass, state);
}

// Per tile: how many keys are above the threshold and how many equal it.
__global__ void __launch_bounds__(kPruneThreads)
    prune_tile_count_kernel(const uint32_t* __restrict__ keys, int64_t n, const RadixState* state,
                            int64_t* __restrict__ greater, int64_t* __restrict__ equal) {
  using Reduce = cub::BlockReduce<int, kPruneThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const uint32_t threshold = state->prefix;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kTile;
  int g = 0, e = 0;
  for (int j = 0; j < kTileItems; ++j) {
    const int64_t i = begin + static_cast<int64_t>(j) * kPruneThreads + threadIdx.x;  // coalesced
    if (i < n) {
      g += keys[i] > threshold;
      e += keys[i] == threshold;
    }
  }
  const int tile_g = Reduce(storage).Sum(g);
  __syncthreads();
  const int tile_e = Reduce(storage).Sum(e);
  if (threadIdx.x == 0) {
    greater[blockIdx.x] = tile_g;
    equal[blockIdx.x] = tile_e;
  }
}

// Exclusive prefix sums over tiles, in place, by one block: each thread scans a contiguous run.
__global__ void __launch_bounds__(1024) prune_tile_scan_kernel(int64_t* greater, int64_t* equal, int64_t tiles) {
  using Scan = cub::BlockScan<long long, 1024>;
  __shared__ typename Scan::TempStorage storage;
  const int64_t per_thread = (tiles + 1023) / 1024;
  const int64_t begin = threadIdx.x * per_thread;
  const int64_t end = begin + per_thread < tiles ? begin + per_thread : tiles;
  for (int which = 0; which < 2; ++which) {
    int64_t* v = which == 0 ? greater : equal;
    long long run = 0;
    for (int64_t t = begin; t < end; ++t) run += v[t];
    long long before;
    Scan(storage).ExclusiveSum(run, before);
    __syncthreads();
    for (int64_t t = begin; t < end; ++t) {
      const long long here = v[t];
      v[t] = before;
      before += here;
    }
  }
}

// Writes the kept ids of one tile in order. Items are blocked per thread (thread j owns ids j*16 .. j*16+15 of
// the tile) so that two block scans give each thread its rank among equal keys and its output position.
__global__ void __launch_bounds__(kPruneThreads)
    prune_tile_write_kernel(const uint32_t* __restrict__ keys, int64_t n, const RadixState* state,
                            const int64_t* __restrict__ greater_before, const int64_t* __restrict__ equal_before,
                            int64_t* __restrict__ out) {
  using Scan = cub::BlockScan<int, kPruneThreads>;
  __shared__ typename Scan::TempStorage storage;
  const uint32_t threshold = state->prefix;
  const int64_t take_equal = state->remaining;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTile + static_cast<int64_t>(threadIdx.x) * kTileItems;
  uint32_t bits[kTileItems];
  int equal_here = 0;
  for (int j = 0; j < kTileItems; ++j) {
    const int64_t i = first + j;
    bits[j] = i < n ? keys[i] : 0u;  // 0 is below any threshold: -inf keys map to 0x007FFFFF
    equal_here += (i < n && bits[j] == threshold);
  }
  int equal_rank;
  Scan(storage).ExclusiveSum(equal_here, equal_rank);
  __syncthreads();
  int64_t equal_seen = equal_before[blockIdx.x] + equal_rank;
  bool chosen[kTileItems];
  int chosen_here = 0;
  for (int j = 0; j < kTileItems; ++j) {
    const int64_t i = first + j;
    chosen[j] = false;
    if (i >= n) continue;
    if (bits[j] > threshold) {
      chosen[j] = true;
    } else if (bits[j] == threshold) {
      chosen[j] = equal_seen < take_equal;
      ++equal_seen;
    }
    chosen_here += chosen[j];
  }
  int position_rank;
  Scan(storage).ExclusiveSum(chosen_here, position_rank);
  const int64_t equal_taken_before =
      equal_before[blockIdx.x] < take_equal ? equal_before[blockIdx.x] : take_equal;
  int64_t position = greater_before[blockIdx.x] + equal_taken_before + position_rank;
  for (int j = 0; j < kTileItems; ++j) {
    if (chosen[j]) out[position++] = first + j;
  }
}

}  // namespace cuda
}  // namespace es_kernels
