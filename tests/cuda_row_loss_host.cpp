// Host build of the CUDA loss and top-k arithmetic for tests/test_build.py, replaying the kernels' schedules with
// the very functions they call: lse_thread_partial's column schedule for 256 threads (a scalar head to the 16-byte
// boundary, vector groups, a scalar tail; kernels/lse.cuh), then the butterfly shuffle tree within each warp and
// across the warps' results (kernels/lse_block.cuh, block_reduce), optionally over column splits merged in order
// (row_partial_kernel + finish_one_block_kernel); and the bitonic network of the one-block top-k
// (kernels/top_k.cuh).
#include <cstdint>
#include <vector>

#include "kernels/lse.cuh"
#include "kernels/top_k.cuh"

namespace {

constexpr int kThreads = 256, kWarp = 32;

// One butterfly level applied to all lanes at once, as __shfl_xor_sync does.
void butterfly(std::vector<es_kernels::LsePartial>& lanes) {
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) {
    const std::vector<es_kernels::LsePartial> before = lanes;
    for (int lane = 0; lane < kWarp; ++lane) lanes[lane] = es_kernels::lse_merge(before[lane], before[lane ^ mask]);
  }
}

es_kernels::LsePartial block_partial(const float* x, const float* t, int64_t n) {
  using namespace es_kernels;
  std::vector<LsePartial> threads(kThreads);
  for (int thread = 0; thread < kThreads; ++thread) {
    threads[thread] = t != nullptr ? lse_thread_partial<true, 1>(x, t, n, 1, thread, kThreads)
                                   : lse_thread_partial<false, 4>(x, t, n, 1, thread, kThreads);
  }
  std::vector<LsePartial> warp_results(kWarp, lse_empty());
  for (int warp = 0; warp < kThreads / kWarp; ++warp) {
    std::vector<LsePartial> lanes(threads.begin() + warp * kWarp, threads.begin() + (warp + 1) * kWarp);
    butterfly(lanes);
    warp_results[warp] = lanes[0];
  }
  butterfly(warp_results);
  return warp_results[0];
}

}  // namespace

// `chunk` > 0: the row is read as splits of `chunk` columns, merged in split order.
extern "C" void row_losses(const float* logits, const float* soft_targets, const int64_t* labels,
                           const int64_t* labels_b, int64_t batch, int64_t classes, int32_t kind, float smoothing,
                           float lam, int64_t chunk, float* out) {
  using namespace es_kernels;
  LossParams params{classes, static_cast<TargetKind>(kind), 1.0f - smoothing,
                    static_cast<float>(static_cast<double>(smoothing) / classes), smoothing, lam,
                    static_cast<float>(1.0 - static_cast<double>(lam))};
  if (chunk <= 0) chunk = classes;
  for (int64_t row = 0; row < batch; ++row) {
    const float* x = logits + row * classes;
    const float* t = soft_targets != nullptr ? soft_targets + row * classes : nullptr;
    LsePartial p = lse_empty();
    for (int64_t begin = 0; begin < classes; begin += chunk) {
      const int64_t n = begin + chunk < classes ? chunk : classes - begin;
      const LsePartial split = block_partial(x + begin, t != nullptr ? t + begin : nullptr, n);
      p = begin == 0 ? split : lse_merge(p, split);
    }
    float label_a = NAN, label_b = NAN;
    if (labels != nullptr && labels[row] >= 0 && labels[row] < classes) label_a = x[labels[row]];
    if (labels_b != nullptr && labels_b[row] >= 0 && labels_b[row] < classes) label_b = x[labels_b[row]];
    out[row] = lse_loss(params, p, label_a, label_b);
  }
}

// The one-block top-k: positions of the k smallest complemented keys (ties to the lower position), ascending.
extern "C" void top_k_positions(const uint64_t* complemented_keys, int32_t batch, int32_t k, int64_t* out) {
  using namespace es_kernels;
  const int padded = top_k_padded_size(batch);
  std::vector<uint64_t> keys(padded);
  std::vector<uint16_t> order(padded);
  for (int i = 0; i < padded; ++i) {
    if (i < batch) {
      keys[i] = complemented_keys[i];
      order[i] = static_cast<uint16_t>(i);
    } else {
      top_k_pad(keys.data(), order.data(), i);
    }
  }
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = 0; i < padded; ++i) bitonic_exchange(keys.data(), order.data(), size, stride, i);
    }
  }
  std::vector<uint8_t> chosen(batch, 0);
  for (int i = 0; i < k; ++i) chosen[order[i]] = 1;
  int written = 0;
  for (int i = 0; i < batch; ++i) {
    if (chosen[i]) out[written++] = i;
  }
}
