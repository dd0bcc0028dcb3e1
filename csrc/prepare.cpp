// Device-independent argument checks and layout preparation for fused_select (see ops.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/tensor.h>

#include "checks.h"
#include "kernels/common.cuh"
#include "ops.h"

namespace es_kernels {

namespace {

void check_state_vector(const char* name, const at::Tensor& t) {
  CHECK_DEFINED(name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (the state is updated in place)");
}

at::Tensor class_ids(const char* name, const at::Tensor& t, const at::Tensor& score, int64_t batch) {
  TORCH_CHECK_TYPE(!t.is_floating_point() && !t.is_complex() && t.scalar_type() != at::kBool, name,
                   " must be an integer tensor of class ids, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, name, " must have shape (", batch, ",), got ", t.sizes());
  CHECK_SAME_DEVICE(name, t, score);
  return t.to(at::kLong).contiguous();
}

}  // namespace

void check_seed(const at::Tensor& seed, const at::Tensor& like) {
  CHECK_DEFINED("seed", seed);
  CHECK_DTYPE("seed", seed, at::kLong);
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must have one element, got shape ", seed.sizes());
  TORCH_CHECK_VALUE(seed.device() == like.device(), "seed is on ", seed.device(), " but the state lives on ",
                    like.device());
}

uint64_t host_seed(const at::Tensor& seed) { return static_cast<uint64_t>(*seed.data_ptr<int64_t>()); }

at::Tensor prepare_prune(const at::Tensor& values, const at::Tensor& seed, int64_t keep) {
  CHECK_DEFINED("values", values);
  CHECK_DTYPE("values", values, at::kFloat);
  CHECK_DIM("values", values, 1);
  CHECK_RANGE("keep", keep, int64_t{0}, values.numel());
  check_seed(seed, values);
  return values.contiguous();
}

at::Tensor check_status(CheckResult result) {
  return at::tensor({static_cast<int64_t>(result.code), result.value}, at::TensorOptions().dtype(at::kLong));
}

PreparedSelect prepare_select(const SelectArgs& a) {
  check_state_vector("score", a.score);
  check_state_vector("weight", a.weight);
  CHECK_SAME_DEVICE("weight", a.weight, a.score);
  TORCH_CHECK_VALUE(a.weight.numel() == a.score.numel(), "weight must have as many entries as score (",
                    a.score.numel(), "), got ", a.weight.numel());
  check_seed(a.seed, a.score);

  PreparedSelect p;
  CHECK_DEFINED("indices", a.indices);
  TORCH_CHECK_TYPE(!a.indices.is_floating_point() && !a.indices.is_complex() &&
                       a.indices.scalar_type() != at::kBool,
                   "indices must be an integer tensor (int64 ids), got ", a.indices.scalar_type());
  TORCH_CHECK_VALUE(a.indices.dim() == 1 && a.indices.numel() > 0, "indices must be a non-empty 1-D tensor, got shape ",
                    a.indices.sizes());
  CHECK_SAME_DEVICE("indices", a.indices, a.score);
  p.indices = a.indices.to(at::kLong).contiguous();
  p.batch = p.indices.numel();
  CHECK_RANGE("k", a.k, 1, p.batch);
  CHECK_RANGE("beta1", a.beta1, 0.0, 1.0);
  CHECK_RANGE("beta2", a.beta2, 0.0, 1.0);
  CHECK_RANGE("label_smoothing", a.label_smoothing, 0.0, 1.0);
  const bool any_target = a.labels_a.has_value() || a.labels_b.has_value() || a.soft_targets.has_value();

  if (!a.logits.has_value()) {
    TORCH_CHECK_VALUE(a.losses.has_value(), "pass logits together with targets (or per-sample losses)");
    TORCH_CHECK_VALUE(!any_target, "pass either losses, or logits with targets, not both");
    const at::Tensor& losses = *a.losses;
    TORCH_CHECK_TYPE(losses.is_floating_point(), "losses must be a floating-point tensor, got ", losses.scalar_type());
    TORCH_CHECK_VALUE(losses.dim() == 1 && losses.size(0) == p.batch, "losses must have shape (", p.batch,
                      ",) to match indices, got ", losses.sizes());
    CHECK_SAME_DEVICE("losses", losses, a.score);
    p.losses = losses.to(at::kFloat).contiguous();
    p.kind = static_cast<int32_t>(TargetKind::kNone);
    return p;
  }

  TORCH_CHECK_VALUE(!a.losses.has_value(), "pass either losses, or logits with targets, not both");
  TORCH_CHECK_VALUE(any_target, "pass logits together with targets (or per-sample losses)");
  at::Tensor logits = *a.logits;
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   "logits must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(0) == p.batch, "logits must have shape (", p.batch,
                    ", num_classes) to match indices, got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 2, "logits must have at least 2 classes, got ", logits.size(1));
  CHECK_SAME_DEVICE("logits", logits, a.score);
  // The reference rounds fp64 logits to fp32 before anything else; doing the same keeps the kernels fp32-only.
  if (dtype == at::kDouble) logits = logits.to(at::kFloat);
  // Kernels walk a row with unit stride and jump between rows by stride(0): a transposed or column-sliced view is
  // copied, a row-sliced one is read in place.
  if (logits.stride(1) != 1 || logits.stride(0) < logits.size(1)) logits = logits.contiguous();
  p.logits = logits;
  p.num_classes = logits.size(1);

  if (a.soft_targets.has_value()) {
    TORCH_CHECK_VALUE(!a.labels_a.has_value() && !a.labels_b.has_value(),
                      "soft_targets cannot be mixed with label tensors");
    const at::Tensor& target = *a.soft_targets;
    TORCH_CHECK_TYPE(target.is_floating_point(), "soft_targets must be floating point, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), "targets as soft labels must have the logits' shape ",
                      logits.sizes(), ", got ", target.sizes());
    CHECK_SAME_DEVICE("targets", target, a.score);
    p.target = target.to(at::kFloat).contiguous();
    p.kind = static_cast<int32_t>(TargetKind::kSoft);
  } else if (a.labels_b.has_value()) {
    TORCH_CHECK_VALUE(a.labels_a.has_value(), "labels_b needs labels_a");
    CHECK_RANGE("lam", a.lam, 0.0, 1.0);
    p.target = class_ids("targets[0] (y_a)", *a.labels_a, a.score, p.batch);
    p.target_b = class_ids("targets[1] (y_b)", *a.labels_b, a.score, p.batch);
    p.kind = static_cast<int32_t>(TargetKind::kMixup);
  } else {
    p.target = class_ids("targets", *a.labels_a, a.score, p.batch);
    p.kind = static_cast<int32_t>(TargetKind::kHard);
  }
  return p;
}

LossParams make_loss_params(const PreparedSelect& p, double label_smoothing, double lam) {
  LossParams params;
  params.num_classes = p.num_classes;
  params.kind = static_cast<TargetKind>(p.kind);
  params.keep = static_cast<float>(1.0 - label_smoothing);
  params.smooth_per_class = static_cast<float>(label_smoothing / static_cast<double>(p.num_classes));
  params.smoothing = static_cast<float>(label_smoothing);
  params.lam_a = static_cast<float>(lam);
  params.lam_b = static_cast<float>(1.0 - lam);
  return params;
}

}  // namespace es_kernels
