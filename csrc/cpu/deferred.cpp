// Deferred value checks on CPU tensors: the same per-row code as the CUDA kernels (kernels/deferred.cuh), in loops.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "deferred.h"

namespace es_kernels {

GuardResult deferred_guard_cpu(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& indices,
                               const c10::optional<at::Tensor>& visited, const c10::optional<at::Tensor>& labels_a,
                               const c10::optional<at::Tensor>& labels_b, int64_t num_classes,
                               const c10::optional<at::Tensor>& losses, const c10::optional<at::Tensor>& soft_targets,
                               const c10::optional<at::Tensor>& token_targets, int64_t ignore_index) {
  PreparedGuard p = prepare_guard(score, weight, indices, visited, labels_a, labels_b, num_classes, losses,
                                  soft_targets, token_targets, ignore_index);
  const auto& in = p.in;
  deferred::Findings f = deferred::fresh_findings();
  for (int64_t i = 0; i < in.batch; ++i) deferred::guard_row(in, i, f);
  const int64_t elements = std::max(p.soft_targets.defined() ? in.batch * in.num_classes : 0, in.tokens_count);
  for (int64_t e = 0; e < elements; ++e) deferred::guard_element(in, e, f);
  std::vector<int64_t> sorted(in.ids, in.ids + in.batch);
  std::sort(sorted.begin(), sorted.end());
  f.repeat = std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end() ? 1 : 0;
  deferred::compose_status(in, f, p.status.data_ptr<int64_t>());
  return {p.safe_ids, p.snapshot, p.status};
}

void deferred_settle_cpu(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& safe_ids,
                         const at::Tensor& snapshot, const at::Tensor& status, const c10::optional<at::Tensor>& losses,
                         const c10::optional<at::Tensor>& visited, const at::Tensor& scored,
                         const at::Tensor& error_record, const at::Tensor& calls, int64_t classes) {
  const PreparedSettle p = prepare_settle(score, weight, safe_ids, snapshot, status, losses, visited, scored,
                                          error_record, calls, classes);
  const auto& in = p.in;
  int64_t nonfinite = 0, negative = 0;
  for (int64_t i = 0; in.losses != nullptr && i < in.batch; ++i) {
    if (!deferred::finite(in.losses[i])) nonfinite = 1;
    if (in.losses[i] < 0.0f) negative = 1;
  }
  int64_t value = 0;
  const int64_t code = deferred::settled_code(in, nonfinite, negative, &value);
  for (int64_t i = 0; i < in.batch; ++i) deferred::settle_row(in, i, code == deferred::kOk);
  deferred::settle_record(in, code, value);
  score.unsafeGetTensorImpl()->bump_version();
  weight.unsafeGetTensorImpl()->bump_version();
}

}  // namespace es_kernels

TORCH_LIBRARY_IMPL(es_kernels_C, CPU, m) {
  m.impl("deferred_guard", &es_kernels::deferred_guard_cpu);
  m.impl("deferred_settle", &es_kernels::deferred_settle_cpu);
}
