// The exponential race (docs/architecture.md §3): key = log(w) - log(E), E = -log1p(-u) ~ Exp(1); the k largest
// keys are a draw without replacement with p ∝ w. A weight that is not positive — zero, negative or NaN, the last two only
// reachable with value checks off — gets key -inf, so it is never preferred to a positive weight. Weights below the
// smallest normal fp32 (subnormals) count as zero on every backend: GPU logf flushes them, so only this keeps
// backends equal.
#pragma once

#include <cmath>
#include <cstring>

#include "common.cuh"

namespace es_kernels {

// 2**-126 (FLT_MIN): the smallest weight with a finite key.
constexpr float kSmallestWeight = 1.17549435082228750797e-38f;

ES_HD double race_key(float weight, double uniform) {
  if (!(weight >= kSmallestWeight)) return -INFINITY;
  return log(static_cast<double>(weight)) - log(-log1p(-uniform));
}

ES_HD float race_key(float weight, float uniform) {
  if (!(weight >= kSmallestWeight)) return -INFINITY;
  return logf(weight) - logf(-log1pf(-uniform));
}

// Pruning key over n ids, fp32: w / E orders ids exactly as log(w) - log(E) does, costs one logarithm instead of
// three, and keeps more precision in fp32 (no cancellation between two logarithms).
ES_HD float prune_key(float weight, float uniform) {
  if (!(weight >= kSmallestWeight)) return -INFINITY;
  return weight / -log1pf(-uniform);
}

// Monotone integer images of keys: a > b as floats iff order_bits(a) > order_bits(b) as unsigned. Keys are never
// NaN (see race_key), so the map is a total order; equal keys are broken by position, lower first.
ES_HD uint32_t order_bits(float key) {
  uint32_t bits;
  memcpy(&bits, &key, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

ES_HD uint64_t order_bits(double key) {
  uint64_t bits;
  memcpy(&bits, &key, sizeof bits);
  return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
}

// Radix select over 32-bit order bits in three digits (11, 11, 10 bits), high digit first. After each histogram of
// the digit among keys that share the prefix found so far, pick the bucket holding the `remaining`-th largest.
constexpr int kRadixPasses = 3;
constexpr int kRadixBins = 2048;
ES_HD int radix_shift(int pass) { return pass == 0 ? 21 : pass == 1 ? 10 : 0; }
ES_HD uint32_t radix_digit_mask(int pass) { return pass == 2 ? 0x3FFu : 0x7FFu; }

struct RadixState {
  uint32_t prefix;     // digits chosen so far, right-aligned
  int64_t remaining;   // how many keys are still to be taken among those that match the prefix (>= 1)
};

// Scans the bins from the top; on return `state` holds the extended prefix and the count still needed inside the
// chosen bin. With pass == kRadixPasses - 1 the prefix is the exact threshold key and `remaining` is how many keys
// equal to it are taken (lowest positions first).
ES_HD void radix_choose_bucket(const int64_t* histogram, int pass, RadixState* state) {
  const int bins = static_cast<int>(radix_digit_mask(pass)) + 1;
  int64_t above = 0;
  int bin = bins - 1;
  for (; bin > 0; --bin) {
    if (above + histogram[bin] >= state->remaining) break;
    above += histogram[bin];
  }
  const int width = pass == 2 ? 10 : 11;
  state->prefix = (state->prefix << width) | static_cast<uint32_t>(bin);
  state->remaining -= above;
}

// Whether `bits` matches the prefix chosen before pass `pass` (always true for pass 0).
ES_HD bool radix_matches(uint32_t bits, int pass, uint32_t prefix) {
  if (pass == 0) return true;
  return (bits >> (radix_shift(pass - 1))) == prefix;
}

}  // namespace es_kernels
