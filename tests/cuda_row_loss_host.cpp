// Host build of the CUDA row-loss arithmetic (csrc/kernels/row_partial.cuh) for tests/test_build.py:
// replays loss_row_kernel's schedule exactly — 256 threads striding over the columns, then the butterfly shuffle
// tree within each warp and across the warps' results (select_kernels.cuh, block_reduce) — with the same functions.
#include <cstdint>
#include <vector>

#include "kernels/row_partial.cuh"

namespace {

constexpr int kThreads = es_kernels::kRowLossThreads, kWarp = 32;

// One butterfly level applied to all lanes at once, as __shfl_xor_sync does.
void butterfly(std::vector<es_kernels::RowPartial>& lanes) {
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) {
    const std::vector<es_kernels::RowPartial> before = lanes;
    for (int lane = 0; lane < kWarp; ++lane) lanes[lane] = es_kernels::merge(before[lane], before[lane ^ mask]);
  }
}

}  // namespace

extern "C" void row_losses(const float* logits, const float* soft_targets, const int64_t* labels,
                           const int64_t* labels_b, int64_t batch, int64_t classes, int32_t kind, float smoothing,
                           float lam, float* out) {
  using namespace es_kernels;
  LossParams params{classes, static_cast<TargetKind>(kind), 1.0f - smoothing,
                    static_cast<float>(static_cast<double>(smoothing) / classes), smoothing, lam,
                    static_cast<float>(1.0 - static_cast<double>(lam))};
  for (int64_t row = 0; row < batch; ++row) {
    const float* x = logits + row * classes;
    const float* t = soft_targets != nullptr ? soft_targets + row * classes : nullptr;
    std::vector<RowPartial> threads(kThreads, empty_partial());
    for (int thread = 0; thread < kThreads; ++thread) {
      for (int64_t c = thread; c < classes; c += kThreads) {
        if (t != nullptr) {
          accumulate<true>(threads[thread], x[c], t[c]);
        } else {
          accumulate<false>(threads[thread], x[c], 0.0f);
        }
      }
    }
    std::vector<RowPartial> warp_results(kWarp, empty_partial());
    for (int warp = 0; warp < kThreads / kWarp; ++warp) {
      std::vector<RowPartial> lanes(threads.begin() + warp * kWarp, threads.begin() + (warp + 1) * kWarp);
      butterfly(lanes);
      warp_results[warp] = lanes[0];
    }
    butterfly(warp_results);
    float label_a = NAN, label_b = NAN;
    if (labels != nullptr && labels[row] >= 0 && labels[row] < classes) label_a = x[labels[row]];
    if (labels_b != nullptr && labels_b[row] >= 0 && labels_b[row] < classes) label_b = x[labels_b[row]];
    out[row] = partial_loss(params, warp_results[0], label_a, label_b);
  }
}
