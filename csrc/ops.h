// The operations behind es_kernels._C, one implementation per device. Arguments mirror the Python backend
// contract of es_kernels/select.py; bindings.cpp dispatches on the state's device.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace es_kernels {

// Targets arrive unpacked: `target` is int64 class ids (hard), fp32 (B, C) soft targets, or y_a with `target_b` =
// y_b and `lam` for mixup. Without logits, `losses` (any float dtype, (B,)) are used as given.
struct SelectArgs {
  at::Tensor score, weight, indices;
  int64_t k;
  double beta1, beta2;
  std::optional<at::Tensor> logits, target, target_b, losses;
  double lam, label_smoothing;
  std::optional<at::Generator> generator;
  // Refuse (ValueError, state untouched) losses computed from logits that are not finite and non-negative, e.g.
  // finite logits whose log-sum-exp overflows. select.py's value checks cannot see them before the fused update.
  bool check_losses = false;
  // CPU only: also run select.py's input value checks (ids in range and unique, finite given losses, finite logits,
  // class ids in range, finite non-negative soft targets) inside this call, with select.py's messages, before the
  // state is touched. A few microseconds here against tens in Python, where they dominate a small call.
  bool check_inputs = false;
};

// The message select.py's value checks use for the same condition (es_kernels/_checks.py).
constexpr const char* kComputedLossesName = "losses computed from logits";

// Returns (positions: int64 (k,) ascending, losses: fp32 (B,)).
std::tuple<at::Tensor, at::Tensor> fused_select_cpu(const SelectArgs& args);
at::Tensor prune_select_cpu(const at::Tensor& values, int64_t keep, std::optional<at::Generator> generator);

#ifdef ES_KERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> fused_select_cuda(const SelectArgs& args);
at::Tensor prune_select_cuda(const at::Tensor& values, int64_t keep, std::optional<at::Generator> generator);
#endif

// Shared by both devices: checks the tensors of a call and returns them in the layouts the kernels read (logits
// with unit column stride, fp32 contiguous soft targets, contiguous int64 labels and indices).
struct PreparedSelect {
  at::Tensor logits, target, target_b, losses, indices;
  int64_t batch = 0, num_classes = 0;
  int32_t kind = 0;  // TargetKind
};
PreparedSelect prepare_select(const SelectArgs& args);

struct LossParams;
LossParams make_loss_params(const PreparedSelect& p, double label_smoothing, double lam);

}  // namespace es_kernels
