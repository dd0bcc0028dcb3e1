// Deferred value checks (kernels/deferred.cuh): the torch side shared by the CPU and CUDA entry points — argument
// checks (never reading a value), the fp32/int64 contiguous copies the kernels read, and the outputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "kernels/deferred.cuh"

namespace es_kernels {

// The guard's inputs as the kernels read them, with the tensors that own the memory (kept alive for the call).
struct PreparedGuard {
  deferred::GuardInputs in{};
  at::Tensor ids, visited, labels_a, labels_b, losses, soft_targets, tokens;
  at::Tensor safe_ids, snapshot, status;
};

PreparedGuard prepare_guard(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& indices,
                            const c10::optional<at::Tensor>& visited, const c10::optional<at::Tensor>& labels_a,
                            const c10::optional<at::Tensor>& labels_b, int64_t num_classes,
                            const c10::optional<at::Tensor>& losses, const c10::optional<at::Tensor>& soft_targets,
                            const c10::optional<at::Tensor>& token_targets, int64_t ignore_index);

struct PreparedSettle {
  deferred::SettleInputs in{};
  at::Tensor losses;
};

PreparedSettle prepare_settle(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& safe_ids,
                              const at::Tensor& snapshot, const at::Tensor& status,
                              const c10::optional<at::Tensor>& losses, const c10::optional<at::Tensor>& visited,
                              const at::Tensor& scored, const at::Tensor& error_record, const at::Tensor& calls,
                              int64_t classes);

using GuardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

GuardResult deferred_guard_cpu(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& indices,
                               const c10::optional<at::Tensor>& visited, const c10::optional<at::Tensor>& labels_a,
                               const c10::optional<at::Tensor>& labels_b, int64_t num_classes,
                               const c10::optional<at::Tensor>& losses, const c10::optional<at::Tensor>& soft_targets,
                               const c10::optional<at::Tensor>& token_targets, int64_t ignore_index);

void deferred_settle_cpu(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& safe_ids,
                         const at::Tensor& snapshot, const at::Tensor& status, const c10::optional<at::Tensor>& losses,
                         const c10::optional<at::Tensor>& visited, const at::Tensor& scored,
                         const at::Tensor& error_record, const at::Tensor& calls, int64_t classes);

}  // namespace es_kernels
