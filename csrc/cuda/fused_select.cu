// Launcher of the CUDA fused select: row kernel (loss, update, keys), then a stable radix sort of the keys and a
// sort of the k winning positions. Three launches and no host synchronisation.
#include <cub/device/device_radix_sort.cuh>

#include "cuda/launch.h"
#include "kernels/select_kernels.cuh"

namespace es_kernels {
namespace cuda {

namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Workspace: keys in/out (uint64), positions in/out (int64), then cub's scratch for the larger of the two sorts.
struct Workspace {
  uint64_t* keys_in;
  uint64_t* keys_out;
  int64_t* positions_in;
  int64_t* positions_out;
  void* sort_scratch;
  size_t sort_scratch_bytes;
};

size_t sort_scratch_bytes(int64_t batch, int64_t k) {
  size_t pairs = 0, keys = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, pairs, static_cast<const uint64_t*>(nullptr),
                                  static_cast<uint64_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), batch);
  cub::DeviceRadixSort::SortKeys(nullptr, keys, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                 k);
  return pairs > keys ? pairs : keys;
}

Workspace carve(void* base, int64_t batch, int64_t k) {
  char* p = static_cast<char*>(base);
  const size_t vector = align_up(static_cast<size_t>(batch) * 8);
  Workspace w;
  w.keys_in = reinterpret_cast<uint64_t*>(p);
  w.keys_out = reinterpret_cast<uint64_t*>(p + vector);
  w.positions_in = reinterpret_cast<int64_t*>(p + 2 * vector);
  w.positions_out = reinterpret_cast<int64_t*>(p + 3 * vector);
  w.sort_scratch = p + 4 * vector;
  w.sort_scratch_bytes = sort_scratch_bytes(batch, k);
  return w;
}

template <typename T, TargetKind kKind>
void launch_rows(const FusedSelectLaunch& a, const Workspace& w, cudaStream_t stream) {
  loss_row_kernel<T, kKind><<<static_cast<unsigned>(a.batch), kRowThreads, 0, stream>>>(
      static_cast<const T*>(a.logits), a.logits_row_stride, a.labels, a.labels_b, a.soft_targets, a.params, a.score,
      a.weight, a.num_samples, a.indices, a.betas, a.philox, a.losses_out, w.keys_in, w.positions_in,
      a.losses_only);
}

template <typename T>
void launch_rows_for_kind(const FusedSelectLaunch& a, const Workspace& w, cudaStream_t stream) {
  switch (a.params.kind) {
    case TargetKind::kSoft:
      return launch_rows<T, TargetKind::kSoft>(a, w, stream);
    case TargetKind::kMixup:
      return launch_rows<T, TargetKind::kMixup>(a, w, stream);
    default:
      return launch_rows<T, TargetKind::kHard>(a, w, stream);
  }
}

}  // namespace

size_t fused_select_workspace_bytes(int64_t batch, int64_t k) {
  return 4 * align_up(static_cast<size_t>(batch) * 8) + sort_scratch_bytes(batch, k);
}

cudaError_t launch_fused_select(const FusedSelectLaunch& a, cudaStream_t stream) {
  const Workspace w = carve(a.workspace, a.batch, a.k);
  if (a.logits == nullptr) {
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>((a.batch + threads - 1) / threads);
    given_loss_kernel<<<blocks, threads, 0, stream>>>(a.given_losses, a.batch, a.score, a.weight, a.num_samples,
                                                      a.indices, a.betas, a.philox, a.losses_out, w.keys_in,
                                                      w.positions_in);
  } else {
    switch (a.logits_type) {
      case LogitsType::kFloat16:
        launch_rows_for_kind<__half>(a, w, stream);
        break;
      case LogitsType::kBFloat16:
        launch_rows_for_kind<__nv_bfloat16>(a, w, stream);
        break;
      default:
        launch_rows_for_kind<float>(a, w, stream);
    }
  }
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || a.losses_only) return status;

  // Radix sort is stable: equal keys (e.g. all the zero weights) stay in position order, lower position first.
  size_t scratch = w.sort_scratch_bytes;
  status = cub::DeviceRadixSort::SortPairs(w.sort_scratch, scratch, w.keys_in, w.keys_out, w.positions_in,
                                           w.positions_out, a.batch, 0, 64, stream);
  if (status != cudaSuccess) return status;
  scratch = w.sort_scratch_bytes;
  return cub::DeviceRadixSort::SortKeys(w.sort_scratch, scratch, w.positions_out, a.positions_out, a.k, 0, 64,
                                        stream);
}

}  // namespace cuda
}  // namespace es_kernels
