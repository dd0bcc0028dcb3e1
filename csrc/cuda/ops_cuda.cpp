// Torch glue of the CUDA build, compiled by the host compiler: checks, output and workspace allocation on the
// caching allocator, the current stream, and the philox seed/offset of the user's CUDA generator — reserved under
// the generator's mutex exactly as torch.multinomial's CUDA kernel does, so CUDA graphs capture it correctly.
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/all.h>
#include <ATen/ops/any.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/lt.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>

#include "checks.h"
#include "cuda/launch.h"
#include "ops.h"

namespace es_kernels {

namespace {

PhiloxArgs reserve_philox(const std::optional<at::Generator>& generator, const at::Device& device) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(kPhiloxOffsetPerCall);
  }
  PhiloxArgs args;
  args.captured = state.captured_;
  if (state.captured_) {
    args.seed_ptr = state.seed_.ptr;
    args.offset_ptr = state.offset_.ptr;
    args.offset_intragraph = state.offset_intragraph_;
  } else {
    args.seed = state.seed_.val;
    args.offset = state.offset_.val;
  }
  return args;
}

at::Tensor workspace(size_t bytes, const at::Device& device) {
  return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_select_cuda(const SelectArgs& args) {
  const PreparedSelect p = prepare_select(args);
  const at::Device device = args.score.device();
  const c10::cuda::CUDAGuard guard(device);
  const LossParams params = make_loss_params(p, args.label_smoothing, args.lam);
  const auto float_options = at::TensorOptions().dtype(at::kFloat).device(device);

  cuda::FusedSelectLaunch launch{};
  launch.score = args.score.data_ptr<float>();
  launch.weight = args.weight.data_ptr<float>();
  launch.num_samples = args.score.numel();
  launch.indices = p.indices.data_ptr<int64_t>();
  launch.batch = p.batch;
  launch.k = args.k;
  launch.params = params;
  launch.betas = make_betas(args.beta1, args.beta2);
  at::Tensor losses;
  if (params.kind == TargetKind::kNone) {
    losses = p.losses;
    launch.given_losses = losses.data_ptr<float>();
  } else {
    losses = at::empty({p.batch}, float_options);
    launch.logits = p.logits.data_ptr();
    launch.logits_row_stride = p.logits.stride(0);
    const auto dtype = p.logits.scalar_type();
    launch.logits_type = dtype == at::kHalf       ? LogitsType::kFloat16
                         : dtype == at::kBFloat16 ? LogitsType::kBFloat16
                                                  : LogitsType::kFloat32;
    if (params.kind == TargetKind::kSoft) {
      launch.soft_targets = p.target.data_ptr<float>();
    } else {
      launch.labels = p.target.data_ptr<int64_t>();
      if (params.kind == TargetKind::kMixup) launch.labels_b = p.target_b.data_ptr<int64_t>();
    }
  }
  launch.losses_out = losses.data_ptr<float>();
  at::Tensor positions = at::empty({args.k}, at::TensorOptions().dtype(at::kLong).device(device));
  launch.positions_out = positions.data_ptr<int64_t>();
  const at::Tensor scratch = workspace(cuda::fused_select_workspace_bytes(p.batch, args.k), device);
  launch.workspace = scratch.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (args.check_losses && params.kind != TargetKind::kNone) {
    // Value checks already synchronise in select.py; one more sync lets the state stay untouched on bad losses.
    launch.losses_only = true;
    C10_CUDA_CHECK(cuda::launch_fused_select(launch, stream));
    TORCH_CHECK_VALUE(at::isfinite(losses).all().item<bool>(), kComputedLossesName,
                      " must be finite (found NaN or inf)");
    TORCH_CHECK_VALUE(!at::lt(losses, 0).any().item<bool>(), kComputedLossesName,
                      " must be non-negative (weights are proportional to losses)");
    launch.losses_only = false;
    launch.logits = nullptr;  // second pass: update and draw from the checked losses
    launch.given_losses = losses.data_ptr<float>();
  }
  launch.philox = reserve_philox(args.generator, device);
  C10_CUDA_CHECK(cuda::launch_fused_select(launch, stream));
  // Raw-pointer writes do not bump autograd's version counters; do it so misuse of the buffers is detected.
  args.score.unsafeGetTensorImpl()->bump_version();
  args.weight.unsafeGetTensorImpl()->bump_version();
  return {positions, losses};
}

at::Tensor prune_select_cuda(const at::Tensor& values_in, int64_t keep, std::optional<at::Generator> generator) {
  CHECK_DEFINED("values", values_in);
  CHECK_DTYPE("values", values_in, at::kFloat);
  CHECK_DIM("values", values_in, 1);
  const at::Tensor values = values_in.contiguous();
  const int64_t n = values.numel();
  CHECK_RANGE("keep", keep, int64_t{0}, n);
  const at::Device device = values.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto long_options = at::TensorOptions().dtype(at::kLong).device(device);
  // Reserve the offset even when the answer is forced, so the generator advances the same way for every keep.
  cuda::PruneLaunch launch{};
  launch.philox = reserve_philox(generator, device);
  if (keep == 0) return at::empty({0}, long_options);
  if (keep == n) return at::arange(n, long_options);
  at::Tensor kept = at::empty({keep}, long_options);
  const at::Tensor scratch = workspace(cuda::prune_workspace_bytes(n), device);
  launch.values = values.data_ptr<float>();
  launch.n = n;
  launch.keep = keep;
  launch.out = kept.data_ptr<int64_t>();
  launch.workspace = scratch.data_ptr();
  C10_CUDA_CHECK(cuda::launch_prune(launch, c10::cuda::getCurrentCUDAStream()));
  return kept;
}

}  // namespace es_kernels
