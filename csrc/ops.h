// The operations of the es_kernels_C dispatcher library, one implementation per device (cpu/, cuda/). The schemas
// are in bindings.cpp; their argument lists are es_kernels.call.OP_ARGUMENTS plus the two check switches (checked by
// tests/test_ops.py). FusedSelectOp below is the only C++ place that spells the flat list out.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "kernels/common.cuh"

namespace es_kernels {

// One call, as es_kernels.call.SelectCall: targets are `labels_a` (int64 class ids; with `labels_b` and `lam` the
// mixup form), or `soft_targets` (B, C); or `losses` (any float dtype, (B,)) replace logits and targets. `seed` is a
// one-element int64 tensor on the state's device, drawn by the caller from its generator.
struct SelectArgs {
  at::Tensor score, weight, indices, seed;
  int64_t k;
  double beta1, beta2;
  std::optional<at::Tensor> logits, labels_a, labels_b, soft_targets;
  double lam;
  std::optional<at::Tensor> losses;
  double label_smoothing;
  // CPU only: run select.py's input value checks (ids in range and unique, finite given losses, finite logits,
  // class ids in range, finite non-negative soft targets) inside this call, before the state is touched. A few
  // microseconds here against tens in Python, where they dominate a small call.
  bool check_inputs;
  // Refuse losses computed from logits that are not finite and non-negative, before the state is touched (finite
  // logits can still overflow; select.py's value checks cannot see that before the fused update).
  bool check_losses;
};

// A failed value check, returned (not raised) so Python raises it with the message of es_kernels/_checks.py, which
// is the only place the messages are written. The numbering is _checks.ValueCheck's.
enum class CheckCode : int64_t {
  kOk = 0,
  kIndicesOutOfRange = 1,  // value: the offending id
  kIndicesRepeat = 2,
  kLossesNotFinite = 3,
  kLossesNegative = 4,
  kLogitsNotFinite = 5,
  kLabelsOutOfRange = 6,   // value: 0 targets, 1 y_a, 2 y_b
  kSoftTargetsBad = 7,
  kComputedLossesNotFinite = 8,
  kComputedLossesNegative = 9,
};

struct CheckResult {
  CheckCode code = CheckCode::kOk;
  int64_t value = 0;
  bool ok() const { return code == CheckCode::kOk; }
};

// (positions int64 (k,) ascending, losses fp32 (B,) never aliasing an input, status int64 (2,) on the CPU holding
// (CheckCode, value); with a failed check the state is untouched and positions are unspecified).
using SelectResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

SelectResult fused_select_cpu(const SelectArgs& args);
at::Tensor prune_select_cpu(const at::Tensor& values, const at::Tensor& seed, int64_t keep);
#ifdef ES_KERNELS_WITH_CUDA
SelectResult fused_select_cuda(const SelectArgs& args);
at::Tensor prune_select_cuda(const at::Tensor& values, const at::Tensor& seed, int64_t keep);
#endif

// The dispatcher's flat signature of fused_select, forwarding to one device implementation.
template <SelectResult (*Impl)(const SelectArgs&)>
SelectResult FusedSelectOp(const at::Tensor& score, const at::Tensor& weight, const at::Tensor& indices,
                           const at::Tensor& seed, int64_t k, double beta1, double beta2,
                           const std::optional<at::Tensor>& logits, const std::optional<at::Tensor>& labels_a,
                           const std::optional<at::Tensor>& labels_b, const std::optional<at::Tensor>& soft_targets,
                           double lam, const std::optional<at::Tensor>& losses, double label_smoothing,
                           bool check_inputs, bool check_losses) {
  return Impl(SelectArgs{score, weight, indices, seed, k, beta1, beta2, logits, labels_a, labels_b, soft_targets, lam,
                         losses, label_smoothing, check_inputs, check_losses});
}

// The status tensor of SelectResult.
at::Tensor check_status(CheckResult result);

// Shared by both devices: checks the tensors of a call and returns them in the layouts the kernels read (logits
// with unit column stride, fp32 contiguous soft targets, contiguous int64 labels and indices, fp32 losses).
struct PreparedSelect {
  at::Tensor logits, target, target_b, losses, indices;
  int64_t batch = 0, num_classes = 0;
  int32_t kind = 0;  // TargetKind
};
PreparedSelect prepare_select(const SelectArgs& args);

// Points a kernel's loss inputs at the prepared logits and targets: cpu::RowLossArgs and cuda::FusedSelectLaunch
// carry the same six fields (logits, logits_row_stride, logits_type, labels, labels_b, soft_targets).
template <typename KernelArgs>
void point_at_loss_inputs(KernelArgs& args, const PreparedSelect& p) {
  const auto dtype = p.logits.scalar_type();
  args.logits = p.logits.data_ptr();
  args.logits_row_stride = p.logits.stride(0);
  args.logits_type = dtype == at::kHalf       ? LogitsType::kFloat16
                     : dtype == at::kBFloat16 ? LogitsType::kBFloat16
                                              : LogitsType::kFloat32;
  const auto kind = static_cast<TargetKind>(p.kind);
  if (kind == TargetKind::kSoft) {
    args.soft_targets = p.target.data_ptr<float>();
  } else {
    args.labels = p.target.data_ptr<int64_t>();
    if (kind == TargetKind::kMixup) args.labels_b = p.target_b.data_ptr<int64_t>();
  }
}

// The seed the caller drew, read on the host (CPU tensors only).
uint64_t host_seed(const at::Tensor& seed);
void check_seed(const at::Tensor& seed, const at::Tensor& like);

// Shared by both devices: checks the arguments of prune_select and returns the values contiguous.
at::Tensor prepare_prune(const at::Tensor& values, const at::Tensor& seed, int64_t keep);

LossParams make_loss_params(const PreparedSelect& p, double label_smoothing, double lam);

}  // namespace es_kernels
