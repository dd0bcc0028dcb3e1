// Launcher of the CUDA pruning draw (kernels in kernels/prune_kernels.cuh): 3 histogram passes with on-device
// bucket choices, then count / scan / write over tiles. Nine kernels and a memset, no host synchronisation;
// workspace is 4 bytes per id plus O(n / 4096).
#include "cuda/launch.h"
#include "kernels/prune_kernels.cuh"

namespace es_kernels {
namespace cuda {

namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }
int64_t tiles_for(int64_t n) { return (n + kTile - 1) / kTile; }

}  // namespace

size_t prune_workspace_bytes(int64_t n) {
  const int64_t tiles = tiles_for(n);
  return align_up(static_cast<size_t>(n) * 4) + align_up(sizeof(int64_t) * kRadixPasses * kRadixBins) +
         align_up(sizeof(RadixState)) + 2 * align_up(static_cast<size_t>(tiles) * 8);
}

cudaError_t launch_prune(const PruneLaunch& a, cudaStream_t stream) {
  const int64_t tiles = tiles_for(a.n);
  char* p = static_cast<char*>(a.workspace);
  uint32_t* keys = reinterpret_cast<uint32_t*>(p);
  p += align_up(static_cast<size_t>(a.n) * 4);
  int64_t* histograms = reinterpret_cast<int64_t*>(p);
  p += align_up(sizeof(int64_t) * kRadixPasses * kRadixBins);
  RadixState* state = reinterpret_cast<RadixState*>(p);
  p += align_up(sizeof(RadixState));
  int64_t* greater = reinterpret_cast<int64_t*>(p);
  p += align_up(static_cast<size_t>(tiles) * 8);
  int64_t* equal = reinterpret_cast<int64_t*>(p);

  int device = 0, sms = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  // Grid-stride passes: enough blocks to fill the GPU a few times over, never more than the work.
  const auto grid_for = [sms](int64_t work) {
    const int64_t wanted = (work + kPruneThreads - 1) / kPruneThreads;
    const int64_t cap = static_cast<int64_t>(sms) * 8;
    return static_cast<unsigned>(wanted < cap ? (wanted > 0 ? wanted : 1) : cap);
  };

  status = cudaMemsetAsync(histograms, 0, sizeof(int64_t) * kRadixPasses * kRadixBins, stream);
  if (status != cudaSuccess) return status;
  const bool aligned = reinterpret_cast<uintptr_t>(a.values) % 16 == 0;
  prune_keys_kernel<<<grid_for((a.n + 3) / 4), kPruneThreads, 0, stream>>>(a.values, aligned, a.n, a.philox, keys,
                                                                           histograms);
  prune_choose_kernel<<<1, 1, 0, stream>>>(histograms, 0, a.keep, state);
  for (int pass = 1; pass < kRadixPasses; ++pass) {
    int64_t* histogram = histograms + static_cast<int64_t>(pass) * kRadixBins;
    prune_histogram_kernel<<<grid_for(a.n), kPruneThreads, 0, stream>>>(keys, a.n, pass, state, histogram);
    prune_choose_kernel<<<1, 1, 0, stream>>>(histogram, pass, a.keep, state);
  }
  prune_tile_count_kernel<<<static_cast<unsigned>(tiles), kPruneThreads, 0, stream>>>(keys, a.n, state, greater,
                                                                                      equal);
  prune_tile_scan_kernel<<<1, 1024, 0, stream>>>(greater, equal, tiles);
  prune_tile_write_kernel<<<static_cast<unsigned>(tiles), kPruneThreads, 0, stream>>>(keys, a.n, state, greater,
                                                                                      equal, a.out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace es_kernels
