// Torch-free interface of the deferred-check launchers (cuda/deferred.cu); the torch glue is deferred_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/deferred.cuh"

namespace es_kernels {
namespace cuda {

// `findings` is device scratch of kFindingsWords int64; the result goes to `status` (device, 2 int64).
cudaError_t launch_deferred_guard(const deferred::GuardInputs& in, int64_t* findings, int64_t* status,
                                  cudaStream_t stream);
cudaError_t launch_deferred_settle(const deferred::SettleInputs& in, cudaStream_t stream);

}  // namespace cuda
}  // namespace es_kernels
