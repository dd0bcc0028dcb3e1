// The k largest race keys of a small meta-batch inside one CUDA block (select_kernels.cuh): a bitonic sort of
// (complemented key, position) pairs, ascending, so the largest key comes first and equal keys keep the lower
// position first, the rule of the radix-sort schedule and of the CPU build. Torch-free, so tests replay the
// network on the host (tests/cuda_row_loss_host.cpp).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace es_kernels {

// The sort runs over the next power of two; padding sorts after every real entry (a real complemented key is
// never all ones: that would be a NaN key).
ES_HD int top_k_padded_size(int batch) {
  int padded = 1;
  while (padded < batch) padded <<= 1;
  return padded;
}

ES_HD void top_k_pad(uint64_t* keys, uint16_t* order, int i) {
  keys[i] = ~uint64_t{0};
  order[i] = 0xFFFFu;
}

ES_HD bool top_k_before(uint64_t key_a, uint16_t order_a, uint64_t key_b, uint16_t order_b) {
  return key_a < key_b || (key_a == key_b && order_a < order_b);
}

// One compare-exchange of the stage (size, stride) of the bitonic network, at entry i; every i of the stage may
// run concurrently (each pair is touched by its lower index only).
ES_HD void bitonic_exchange(uint64_t* keys, uint16_t* order, int size, int stride, int i) {
  const int j = i ^ stride;
  if (j <= i) return;
  const bool ascending = (i & size) == 0;
  const bool out_of_order = ascending ? top_k_before(keys[j], order[j], keys[i], order[i])
                                      : top_k_before(keys[i], order[i], keys[j], order[j]);
  if (out_of_order) {
    const uint64_t key = keys[i];
    keys[i] = keys[j];
    keys[j] = key;
    const uint16_t position = order[i];
    order[i] = order[j];
    order[j] = position;
  }
}

}  // namespace es_kernels
