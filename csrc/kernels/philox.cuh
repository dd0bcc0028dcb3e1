// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), host and device. Counter layout
// follows curand: key = seed, counter = (offset / 4, subsequence). Every random number is a pure function of
// (seed, offset, element index), so results do not depend on thread counts, block sizes or launch order, and the
// CPU and CUDA builds draw the same numbers for the same (seed, offset).
#pragma once

#include "common.cuh"

namespace es_kernels {

struct Philox4 {
  uint32_t x, y, z, w;
};

// Seed and offset of one call. On CUDA under graph capture the values live in device memory and are read inside
// the kernel, exactly as at::cuda::philox::unpack does (a torch-free mirror of at::PhiloxCudaState); without an
// offset pointer the offset is the constant `offset`.
struct PhiloxArgs {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  bool captured = false;
};

ES_HD void unpack_philox(const PhiloxArgs& args, uint64_t* seed, uint64_t* offset) {
  if (args.captured) {
    *seed = args.seed_ptr != nullptr ? static_cast<uint64_t>(*args.seed_ptr) : args.seed;
    *offset = (args.offset_ptr != nullptr ? static_cast<uint64_t>(*args.offset_ptr) : args.offset) +
              args.offset_intragraph;
  } else {
    *seed = args.seed;
    *offset = args.offset;
  }
}

ES_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

ES_HD Philox4 philox4x32_10(uint64_t seed, uint64_t offset, uint64_t subsequence) {
  const uint64_t block = offset >> 2;  // the offset counts 32-bit outputs; a block yields four
  Philox4 c{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), static_cast<uint32_t>(subsequence),
            static_cast<uint32_t>(subsequence >> 32)};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c.z, &hi1);
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

ES_HD uint32_t philox_word(const Philox4& r, int lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

// Uniforms in (0, 1) built like torch.rand (53 or 24 random bits, scaled) and clamped from below like
// reference/sampling.py, so E = -log1p(-u) is strictly positive and no key becomes +inf.
ES_HD double uniform_double(uint32_t hi, uint32_t lo) {
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  const double u = static_cast<double>(bits) * (1.0 / 9007199254740992.0);  // 2^-53
  return u > 0.0 ? u : 1.0 / 9007199254740992.0;
}

ES_HD float uniform_float(uint32_t word) {
  const float u = static_cast<float>(word >> 8) * (1.0f / 16777216.0f);  // 2^-24
  return u > 0.0f ? u : 1.0f / 16777216.0f;
}

// Meta-batch draws: position i takes two words of block (subsequence i / 2). Pruning draws: id i takes one word of
// block (subsequence i / 4). One block per subsequence, so a call consumes 4 offset units.
constexpr uint64_t kPhiloxOffsetPerCall = 4;

ES_HD double meta_batch_uniform(uint64_t seed, uint64_t offset, int64_t position) {
  const Philox4 r = philox4x32_10(seed, offset, static_cast<uint64_t>(position) >> 1);
  return (position & 1) ? uniform_double(r.z, r.w) : uniform_double(r.x, r.y);
}

}  // namespace es_kernels
