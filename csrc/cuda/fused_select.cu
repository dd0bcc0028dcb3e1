// Launcher of the CUDA fused select (kernels in kernels/select_kernels.cuh). No host synchronisation; no
// initialisation launches (the Philox offset is a constant, every workspace byte is written before it is read).
//   B <= kOneBlockBatch: row_partial_kernel over rows x column splits, then finish_one_block_kernel: two launches
//     (one with given losses).
//   larger B: loss_row_kernel, then a stable radix sort of the keys and one of the k winning positions: three.
#include <cub/device/device_radix_sort.cuh>

#include "cuda/launch.h"
#include "kernels/select_kernels.cuh"

namespace es_kernels {
namespace cuda {

namespace {

constexpr size_t kAlign = 256;
// A column split is worth a block's setup only above this many columns.
constexpr int64_t kMinSplitColumns = 4096;
// Row blocks wanted in flight per SM before a row is split (8 blocks of 256 threads fill an SM).
constexpr int64_t kBlocksPerSm = 8;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

int sm_count() {
  // Per device, queried once: an attribute query per call would cost host time on every select.
  static int counts[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
    counts[device] = sms;
  }
  return counts[device];
}

bool one_block(int64_t batch) { return batch <= kOneBlockBatch; }

// Column chunk of the split schedule: enough (row, split) blocks to fill every SM, each at least kMinSplitColumns
// wide, a multiple of 16 columns so every split but the first row's starts where the row's alignment does.
int64_t split_chunk(int64_t batch, int64_t classes) {
  const int64_t wanted_blocks = kBlocksPerSm * sm_count();
  int64_t splits = (wanted_blocks + batch - 1) / batch;
  const int64_t most = (classes + kMinSplitColumns - 1) / kMinSplitColumns;
  splits = splits < most ? splits : most;
  splits = splits > 0 ? splits : 1;
  int64_t chunk = (classes + splits - 1) / splits;
  return (chunk + 15) / 16 * 16;
}

int64_t splits_for(int64_t batch, int64_t classes) {
  const int64_t chunk = split_chunk(batch, classes);
  return (classes + chunk - 1) / chunk;
}

// Workspace of the radix-sort schedule: keys in/out (uint64), positions in/out (int64), then cub's scratch.
struct SortWorkspace {
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

SortWorkspace carve(void* base, int64_t batch, int64_t k) {
  char* p = static_cast<char*>(base);
  const size_t vector = align_up(static_cast<size_t>(batch) * 8);
  SortWorkspace w;
  w.keys_in = reinterpret_cast<uint64_t*>(p);
  w.keys_out = reinterpret_cast<uint64_t*>(p + vector);
  w.positions_in = reinterpret_cast<int64_t*>(p + 2 * vector);
  w.positions_out = reinterpret_cast<int64_t*>(p + 3 * vector);
  w.sort_scratch = p + 4 * vector;
  w.sort_scratch_bytes = sort_scratch_bytes(batch, k);
  return w;
}

RowInputs row_inputs(const FusedSelectLaunch& a) {
  return RowInputs{a.logits, a.logits_row_stride, a.labels, a.labels_b, a.soft_targets};
}

template <typename T, TargetKind kKind>
void launch_one_block(const FusedSelectLaunch& a, cudaStream_t stream) {
  LsePartial* partials = static_cast<LsePartial*>(a.workspace);
  int splits = 0;
  if (a.logits != nullptr) {
    const int64_t chunk = split_chunk(a.batch, a.params.num_classes);
    splits = static_cast<int>(splits_for(a.batch, a.params.num_classes));
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(a.batch));
    row_partial_kernel<T, kKind == TargetKind::kSoft>
        <<<grid, kRowThreads, 0, stream>>>(row_inputs(a), a.params.num_classes, chunk, partials);
  }
  finish_one_block_kernel<T, kKind><<<1, kFinishThreads, 0, stream>>>(
      row_inputs(a), a.params, partials, splits, a.logits == nullptr ? a.given_losses : nullptr, a.batch, a.k,
      a.score, a.weight, a.num_samples, a.indices, a.betas, a.philox, a.losses_out, a.positions_out, a.losses_only);
}

template <typename T, TargetKind kKind>
void launch_rows(const FusedSelectLaunch& a, const SortWorkspace& w, cudaStream_t stream) {
  loss_row_kernel<T, kKind><<<static_cast<unsigned>(a.batch), kRowThreads, 0, stream>>>(
      row_inputs(a), a.params, a.score, a.weight, a.num_samples, a.indices, a.betas, a.philox, a.losses_out,
      w.keys_in, w.positions_in, a.losses_only);
}

template <typename T, TargetKind kKind>
struct OneBlock {
  static void run(const FusedSelectLaunch& a, const SortWorkspace*, cudaStream_t stream) {
    launch_one_block<T, kKind>(a, stream);
  }
};

template <typename T, TargetKind kKind>
struct Rows {
  static void run(const FusedSelectLaunch& a, const SortWorkspace* w, cudaStream_t stream) {
    launch_rows<T, kKind>(a, *w, stream);
  }
};

// Launcher<T, kKind>::run for the logits' dtype and the targets' kind.
template <template <typename, TargetKind> class Launcher, typename T>
void by_kind(const FusedSelectLaunch& a, const SortWorkspace* w, cudaStream_t stream) {
  switch (a.params.kind) {
    case TargetKind::kSoft:
      return Launcher<T, TargetKind::kSoft>::run(a, w, stream);
    case TargetKind::kMixup:
      return Launcher<T, TargetKind::kMixup>::run(a, w, stream);
    default:
      return Launcher<T, TargetKind::kHard>::run(a, w, stream);
  }
}

template <template <typename, TargetKind> class Launcher>
void by_dtype_and_kind(const FusedSelectLaunch& a, const SortWorkspace* w, cudaStream_t stream) {
  switch (a.logits_type) {
    case LogitsType::kFloat16:
      return by_kind<Launcher, __half>(a, w, stream);
    case LogitsType::kBFloat16:
      return by_kind<Launcher, __nv_bfloat16>(a, w, stream);
    default:
      return by_kind<Launcher, float>(a, w, stream);
  }
}

}  // namespace

size_t fused_select_workspace_bytes(int64_t batch, int64_t k, int64_t num_classes) {
  if (one_block(batch)) {
    const int64_t splits = num_classes > 0 ? splits_for(batch, num_classes) : 1;
    return align_up(static_cast<size_t>(batch * splits) * sizeof(LsePartial));
  }
  return 4 * align_up(static_cast<size_t>(batch) * 8) + sort_scratch_bytes(batch, k);
}

cudaError_t launch_fused_select(const FusedSelectLaunch& a, cudaStream_t stream) {
  if (one_block(a.batch)) {
    if (a.logits == nullptr) {
      // Given losses: the dtype and kind are not read.
      launch_one_block<float, TargetKind::kNone>(a, stream);
    } else {
      by_dtype_and_kind<OneBlock>(a, nullptr, stream);
    }
    return cudaGetLastError();
  }

  const SortWorkspace w = carve(a.workspace, a.batch, a.k);
  if (a.logits == nullptr) {
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>((a.batch + threads - 1) / threads);
    given_loss_kernel<<<blocks, threads, 0, stream>>>(a.given_losses, a.batch, a.score, a.weight, a.num_samples,
                                                      a.indices, a.betas, a.philox, a.losses_out, w.keys_in,
                                                      w.positions_in);
  } else {
    by_dtype_and_kind<Rows>(a, &w, stream);
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
