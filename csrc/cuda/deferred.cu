// Deferred value checks on CUDA tensors (kernels/deferred.cuh): a few small launches, no host synchronisation.
#include <algorithm>

#include "cuda/deferred_launch.h"

namespace es_kernels {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

using deferred::Findings;

__global__ void reset_findings_kernel(Findings* findings) { *findings = deferred::fresh_findings(); }

// Every row and every target element: per-thread findings, merged per block in shared memory, then once per block
// into the global findings with atomics (each field combines by min, max or or, so the order does not matter).
__global__ void guard_kernel(deferred::GuardInputs in, Findings* out, int64_t elements) {
  __shared__ Findings block;
  if (threadIdx.x == 0) block = deferred::fresh_findings();
  __syncthreads();
  Findings f = deferred::fresh_findings();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = start; i < in.batch; i += stride) deferred::guard_row(in, i, f);
  for (int64_t e = start; e < elements; e += stride) deferred::guard_element(in, e, f);
  auto* words = reinterpret_cast<unsigned long long*>(&block);
  auto* signed_words = reinterpret_cast<long long*>(&block);
  atomicMin(&signed_words[0], static_cast<long long>(f.min_id));
  atomicMax(&signed_words[1], static_cast<long long>(f.max_id));
  atomicMin(&signed_words[3], static_cast<long long>(f.first_revisit));
  const int64_t flags[] = {f.losses_nonfinite, f.losses_negative, f.labels_a_bad, f.labels_b_bad, f.soft_bad,
                           f.tokens_bad};
  for (int w = 0; w < 6; ++w) {
    if (flags[w]) atomicOr(&words[4 + w], 1ull);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* global_words = reinterpret_cast<unsigned long long*>(out);
    auto* global_signed = reinterpret_cast<long long*>(out);
    atomicMin(&global_signed[0], signed_words[0]);
    atomicMax(&global_signed[1], signed_words[1]);
    atomicMin(&global_signed[3], signed_words[3]);
    for (int w = 4; w < deferred::kFindingsWords; ++w) {
      if (words[w]) atomicOr(&global_words[w], words[w]);
    }
  }
}

// A repeated id: each thread compares its id with every later one, a shared-memory tile of ids at a time.
__global__ void repeat_kernel(const int64_t* __restrict__ ids, int64_t batch, Findings* out) {
  __shared__ int64_t tile[kThreads];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t mine = i < batch ? ids[i] : 0;
  bool repeat = false;
  // Tiles from this block's own start on: pairs (i, j) with j > i only.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < batch; base += blockDim.x) {
    __syncthreads();
    if (base + threadIdx.x < batch) tile[threadIdx.x] = ids[base + threadIdx.x];
    __syncthreads();
    const int64_t remaining = batch - base;
    const int64_t count = remaining < blockDim.x ? remaining : static_cast<int64_t>(blockDim.x);
    for (int64_t t = 0; t < count && i < batch; ++t) {
      if (base + t > i && tile[t] == mine) repeat = true;
    }
  }
  if (repeat) atomicOr(reinterpret_cast<unsigned long long*>(&out->repeat), 1ull);
}

__global__ void compose_kernel(deferred::GuardInputs in, const Findings* findings, int64_t* status) {
  deferred::compose_status(in, *findings, status);
}

// One block: the computed losses' findings, then every row, then the record.
__global__ void settle_kernel(deferred::SettleInputs in) {
  __shared__ int nonfinite, negative;
  if (threadIdx.x == 0) nonfinite = negative = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; in.losses != nullptr && i < in.batch; i += blockDim.x) {
    const float loss = in.losses[i];
    if (!deferred::finite(loss)) nonfinite = 1;
    if (loss < 0.0f) negative = 1;
  }
  __syncthreads();
  int64_t value = 0;
  const int64_t code = deferred::settled_code(in, nonfinite, negative, &value);
  for (int64_t i = threadIdx.x; i < in.batch; i += blockDim.x) deferred::settle_row(in, i, code == deferred::kOk);
  if (threadIdx.x == 0) deferred::settle_record(in, code, value);
}

int blocks_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (work + kThreads - 1) / kThreads)));
}

}  // namespace

cudaError_t launch_deferred_guard(const deferred::GuardInputs& in, int64_t* findings, int64_t* status,
                                  cudaStream_t stream) {
  auto* f = reinterpret_cast<Findings*>(findings);
  reset_findings_kernel<<<1, 1, 0, stream>>>(f);
  const int64_t elements =
      std::max(in.soft_targets != nullptr ? in.batch * in.num_classes : int64_t{0}, in.tokens_count);
  guard_kernel<<<blocks_for(std::max(in.batch, elements)), kThreads, 0, stream>>>(in, f, elements);
  repeat_kernel<<<static_cast<int>((in.batch + kThreads - 1) / kThreads), kThreads, 0, stream>>>(in.ids, in.batch, f);
  compose_kernel<<<1, 1, 0, stream>>>(in, f, status);
  return cudaGetLastError();
}

cudaError_t launch_deferred_settle(const deferred::SettleInputs& in, cudaStream_t stream) {
  settle_kernel<<<1, 1024, 0, stream>>>(in);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace es_kernels
