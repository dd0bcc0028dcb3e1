// Torch glue of the deferred value checks on CUDA: outputs on the caching allocator, the current stream, no sync.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/deferred_launch.h"
#include "deferred.h"

namespace es_kernels {

namespace {

GuardResult deferred_guard_cuda(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& indices,
                                const c10::optional<at::Tensor>& visited, const c10::optional<at::Tensor>& labels_a,
                                const c10::optional<at::Tensor>& labels_b, int64_t num_classes,
                                const c10::optional<at::Tensor>& losses,
                                const c10::optional<at::Tensor>& soft_targets,
                                const c10::optional<at::Tensor>& token_targets, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(score.device());
  PreparedGuard p = prepare_guard(score, weight, indices, visited, labels_a, labels_b, num_classes, losses,
                                  soft_targets, token_targets, ignore_index);
  const at::Tensor findings = at::empty({deferred::kFindingsWords}, score.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::launch_deferred_guard(p.in, findings.data_ptr<int64_t>(), p.status.data_ptr<int64_t>(),
                                             c10::cuda::getCurrentCUDAStream()));
  return {p.safe_ids, p.snapshot, p.status};
}

void deferred_settle_cuda(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& safe_ids,
                          const at::Tensor& snapshot, const at::Tensor& status,
                          const c10::optional<at::Tensor>& losses, const c10::optional<at::Tensor>& visited,
                          const at::Tensor& scored, const at::Tensor& error_record, const at::Tensor& calls,
                          int64_t classes) {
  const c10::cuda::CUDAGuard guard(score.device());
  const PreparedSettle p = prepare_settle(score, weight, safe_ids, snapshot, status, losses, visited, scored,
                                          error_record, calls, classes);
  C10_CUDA_CHECK(cuda::launch_deferred_settle(p.in, c10::cuda::getCurrentCUDAStream()));
  score.unsafeGetTensorImpl()->bump_version();
  weight.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

}  // namespace es_kernels

TORCH_LIBRARY_IMPL(es_kernels_C, CUDA, m) {
  m.impl("deferred_guard", &es_kernels::deferred_guard_cuda);
  m.impl("deferred_settle", &es_kernels::deferred_settle_cuda);
}
