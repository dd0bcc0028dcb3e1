// CPU pruning draw over n ids (n up to 1e8 and beyond): keys in parallel, then an exact radix select of the
// keep-th largest key and an ordered compaction, so the output is ascending without a sort and identical for any
// thread count. Memory: 4 bytes per id for the keys plus the output.
#include <ATen/Parallel.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "kernels/philox.cuh"
#include "kernels/race.cuh"
#include "ops.h"

namespace es_kernels {

namespace {

constexpr int64_t kKeyGrainBlocks = 4096;  // Philox blocks (4 ids each) per parallel chunk
constexpr int64_t kTile = int64_t{1} << 16;

}  // namespace

at::Tensor prune_select_cpu(const at::Tensor& values_in, const at::Tensor& seed_tensor, int64_t keep) {
  const at::Tensor values = prepare_prune(values_in, seed_tensor, keep);
  const int64_t n = values.numel();
  const auto long_options = at::TensorOptions().dtype(at::kLong);
  const uint64_t seed = host_seed(seed_tensor);
  if (keep == 0) return at::empty({0}, long_options);
  if (keep == n) return at::arange(n, long_options);

  at::Tensor key_storage = at::empty({n}, at::TensorOptions().dtype(at::kInt));
  uint32_t* keys = reinterpret_cast<uint32_t*>(key_storage.data_ptr<int32_t>());
  const float* w = values.data_ptr<float>();
  const int threads = at::get_num_threads();
  std::vector<int64_t> histograms(static_cast<size_t>(threads) * kRadixBins);

  RadixState state{0, keep};
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    std::fill(histograms.begin(), histograms.end(), 0);
    const int shift = radix_shift(pass);
    const uint32_t mask = radix_digit_mask(pass);
    const uint32_t prefix = state.prefix;
    if (pass == 0) {
      // Key generation fused with the first histogram: the keys are read once more per later pass.
      at::parallel_for(0, (n + 3) / 4, kKeyGrainBlocks, [&](int64_t begin, int64_t end) {
        int64_t* hist = histograms.data() + static_cast<size_t>(at::get_thread_num()) * kRadixBins;
        for (int64_t block = begin; block < end; ++block) {
          const Philox4 r = philox4x32_10(seed, 0, static_cast<uint64_t>(block));
          const int64_t base = block * 4;
          const int lanes = static_cast<int>(std::min<int64_t>(4, n - base));
          for (int lane = 0; lane < lanes; ++lane) {
            const uint32_t bits = order_bits(prune_key(w[base + lane], uniform_float(philox_word(r, lane))));
            keys[base + lane] = bits;
            ++hist[bits >> shift];
          }
        }
      });
    } else {
      at::parallel_for(0, n, kKeyGrainBlocks * 4, [&](int64_t begin, int64_t end) {
        int64_t* hist = histograms.data() + static_cast<size_t>(at::get_thread_num()) * kRadixBins;
        for (int64_t i = begin; i < end; ++i) {
          const uint32_t bits = keys[i];
          if (radix_matches(bits, pass, prefix)) ++hist[(bits >> shift) & mask];
        }
      });
    }
    for (int t = 1; t < threads; ++t) {
      for (int b = 0; b < kRadixBins; ++b) histograms[b] += histograms[static_cast<size_t>(t) * kRadixBins + b];
    }
    radix_choose_bucket(histograms.data(), pass, &state);
  }
  const uint32_t threshold = state.prefix;
  const int64_t take_equal = state.remaining;

  // Ordered compaction: per-tile counts, a prefix over tiles, then each tile writes its ids in order. Keys equal to
  // the threshold are taken lowest id first.
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<int64_t> greater(tiles + 1, 0), equal(tiles + 1, 0);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t g = 0, e = 0;
      for (int64_t i = t * kTile, stop = std::min(n, (t + 1) * kTile); i < stop; ++i) {
        g += keys[i] > threshold;
        e += keys[i] == threshold;
      }
      greater[t + 1] = g;
      equal[t + 1] = e;
    }
  });
  for (int64_t t = 0; t < tiles; ++t) {
    greater[t + 1] += greater[t];
    equal[t + 1] += equal[t];
  }
  at::Tensor kept = at::empty({keep}, long_options);
  int64_t* out = kept.data_ptr<int64_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t equal_seen = equal[t];
      int64_t position = greater[t] + std::min(equal_seen, take_equal);
      for (int64_t i = t * kTile, stop = std::min(n, (t + 1) * kTile); i < stop; ++i) {
        if (keys[i] > threshold) {
          out[position++] = i;
        } else if (keys[i] == threshold && equal_seen++ < take_equal) {
          out[position++] = i;
        }
      }
    }
  });
  return kept;
}

}  // namespace es_kernels
