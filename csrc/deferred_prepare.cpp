// Device-independent half of the deferred value checks: argument checks and layouts (see deferred.h).
#include "deferred.h"

#include "checks.h"

namespace es_kernels {

namespace {

at::Tensor optional_as(const c10::optional<at::Tensor>& t, at::ScalarType dtype, const at::Tensor& state) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  CHECK_SAME_DEVICE("deferred check input", *t, state);
  return t->to(dtype).contiguous();
}

template <typename T>
const T* pointer(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

void check_state(const at::Tensor& score, const at::Tensor& weight) {
  CHECK_DTYPE("score", score, at::kFloat);
  CHECK_DTYPE("weight", weight, at::kFloat);
  CHECK_DIM("score", score, 1);
  TORCH_CHECK_VALUE(score.is_contiguous() && weight.is_contiguous() && weight.sizes() == score.sizes(),
                    "score and weight must be contiguous and of one shape");
}

}  // namespace

PreparedGuard prepare_guard(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& indices,
                            const c10::optional<at::Tensor>& visited, const c10::optional<at::Tensor>& labels_a,
                            const c10::optional<at::Tensor>& labels_b, int64_t num_classes,
                            const c10::optional<at::Tensor>& losses, const c10::optional<at::Tensor>& soft_targets,
                            const c10::optional<at::Tensor>& token_targets, int64_t ignore_index) {
  check_state(score, weight);
  CHECK_DIM("indices", indices, 1);
  CHECK_SAME_DEVICE("indices", indices, score);
  TORCH_CHECK_VALUE(indices.numel() > 0, "indices must not be empty");
  PreparedGuard p;
  p.ids = indices.to(at::kLong).contiguous();
  p.visited = optional_as(visited, at::kBool, score);
  p.labels_a = optional_as(labels_a, at::kLong, score);
  p.labels_b = optional_as(labels_b, at::kLong, score);
  p.losses = optional_as(losses, at::kFloat, score);
  p.soft_targets = optional_as(soft_targets, at::kFloat, score);
  p.tokens = optional_as(token_targets, at::kLong, score);
  const int64_t batch = p.ids.numel();
  TORCH_CHECK_VALUE(!p.visited.defined() || p.visited.numel() == score.numel(), "visited must have the state's length");
  for (const auto* t : {&p.labels_a, &p.labels_b, &p.losses}) {
    TORCH_CHECK_VALUE(!t->defined() || t->numel() == batch, "labels and losses must have one entry per id");
  }
  TORCH_CHECK_VALUE(!p.soft_targets.defined() || p.soft_targets.numel() == batch * num_classes,
                    "soft_targets must have shape (B, num_classes)");
  TORCH_CHECK_VALUE(!p.tokens.defined() || (p.tokens.dim() == 2 && p.tokens.size(0) == batch),
                    "token_targets must have shape (B, T)");
  const auto options = score.options();
  p.safe_ids = at::empty({batch}, options.dtype(at::kLong));
  p.snapshot = at::empty({2, batch}, options.dtype(at::kFloat));
  p.status = at::empty({2}, options.dtype(at::kLong));
  auto& in = p.in;
  in.ids = p.ids.data_ptr<int64_t>();
  in.batch = batch;
  in.num_samples = score.numel();
  in.visited = pointer<bool>(p.visited);
  in.labels_a = pointer<int64_t>(p.labels_a);
  in.labels_b = pointer<int64_t>(p.labels_b);
  in.num_classes = num_classes;
  in.losses = pointer<float>(p.losses);
  in.soft_targets = pointer<float>(p.soft_targets);
  in.tokens = pointer<int64_t>(p.tokens);
  in.tokens_count = p.tokens.defined() ? p.tokens.numel() : 0;
  in.ignore_index = ignore_index;
  in.vocab = num_classes;
  in.score = score.data_ptr<float>();
  in.weight = weight.data_ptr<float>();
  in.safe_ids = p.safe_ids.data_ptr<int64_t>();
  in.snapshot = p.snapshot.data_ptr<float>();
  return p;
}

PreparedSettle prepare_settle(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& safe_ids,
                              const at::Tensor& snapshot, const at::Tensor& status,
                              const c10::optional<at::Tensor>& losses, const c10::optional<at::Tensor>& visited,
                              const at::Tensor& scored, const at::Tensor& error_record, const at::Tensor& calls,
                              int64_t classes) {
  check_state(score, weight);
  const int64_t batch = safe_ids.numel();
  CHECK_DTYPE("safe_ids", safe_ids, at::kLong);
  CHECK_DTYPE("snapshot", snapshot, at::kFloat);
  CHECK_DTYPE("status", status, at::kLong);
  CHECK_DTYPE("error_record", error_record, at::kLong);
  CHECK_DTYPE("calls", calls, at::kLong);
  TORCH_CHECK_VALUE(safe_ids.is_contiguous() && snapshot.is_contiguous() && snapshot.numel() == 2 * batch &&
                        status.numel() == 2 && error_record.numel() == 4 && calls.numel() == 1 &&
                        error_record.is_contiguous(),
                    "deferred_settle: the guard's outputs and the state's error record, as deferred_guard made them");
  PreparedSettle p;
  p.losses = optional_as(losses, at::kFloat, score);
  TORCH_CHECK_VALUE(!p.losses.defined() || p.losses.numel() == batch, "losses must have one entry per id");
  at::Tensor marks = visited.has_value() ? *visited : at::Tensor();
  if (marks.defined()) {
    CHECK_DTYPE("visited", marks, at::kBool);
    TORCH_CHECK_VALUE(marks.is_contiguous() && marks.numel() == score.numel(), "visited must have the state's length");
  }
  CHECK_DTYPE("scored", scored, at::kBool);
  TORCH_CHECK_VALUE(scored.is_contiguous() && scored.numel() == score.numel(), "scored must have the state's length");
  auto& in = p.in;
  in.score = score.data_ptr<float>();
  in.weight = weight.data_ptr<float>();
  in.scored = scored.data_ptr<bool>();
  in.safe_ids = safe_ids.data_ptr<int64_t>();
  in.snapshot = snapshot.data_ptr<float>();
  in.batch = batch;
  in.status = status.data_ptr<int64_t>();
  in.losses = p.losses.defined() ? p.losses.data_ptr<float>() : nullptr;
  in.visited = marks.defined() ? marks.data_ptr<bool>() : nullptr;
  in.error_record = error_record.data_ptr<int64_t>();
  in.calls = calls.data_ptr<int64_t>();
  in.classes = classes;
  return p;
}

}  // namespace es_kernels
