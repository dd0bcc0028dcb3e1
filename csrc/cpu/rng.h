// Randomness on CPU: one 64-bit draw from the user's CPU generator (under its mutex) keys Philox for the call.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Generator.h>

namespace es_kernels {

uint64_t draw_cpu_seed(const std::optional<at::Generator>& generator);

}  // namespace es_kernels
