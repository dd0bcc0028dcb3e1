// Torch glue of the CUDA build, compiled by the host compiler: checks, output and workspace allocation on the
// caching allocator, the current stream, and the Philox seed, which the kernels read from the caller's one-element
// device tensor (no host sync, and a captured CUDA graph replays with whatever seed the tensor then holds).
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/all.h>
#include <ATen/ops/any.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.h"
#include "ops.h"

namespace es_kernels {

namespace {

// The kernels read the seed from device memory, as in a captured graph; the Philox offset is the constant 0 (every
// call has its own seed, so its counters start at zero), which costs no fill launch.
PhiloxArgs device_philox(const at::Tensor& seed) {
  PhiloxArgs args;
  args.captured = true;
  args.seed_ptr = seed.data_ptr<int64_t>();
  args.offset_ptr = nullptr;
  args.offset = 0;
  return args;
}

at::Tensor workspace(size_t bytes, const at::Device& device) {
  return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
}

}  // namespace

SelectResult fused_select_cuda(const SelectArgs& args) {
  // Reading CUDA values means a host sync per check; select.py runs those checks itself on CUDA.
  TORCH_CHECK_VALUE(!args.check_inputs, "check_inputs is for CPU tensors only");
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
  // Always a fresh output: the kernels read the given losses and write this through __restrict__ pointers, and a
  // custom op's output must not alias an input.
  at::Tensor losses = at::empty({p.batch}, float_options);
  if (params.kind == TargetKind::kNone) {
    launch.given_losses = p.losses.data_ptr<float>();
  } else {
    point_at_loss_inputs(launch, p);
  }
  launch.losses_out = losses.data_ptr<float>();
  at::Tensor positions = at::empty({args.k}, at::TensorOptions().dtype(at::kLong).device(device));
  launch.positions_out = positions.data_ptr<int64_t>();
  const at::Tensor scratch = workspace(cuda::fused_select_workspace_bytes(p.batch, args.k, p.num_classes), device);
  launch.workspace = scratch.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor checked;
  if (args.check_losses && params.kind != TargetKind::kNone) {
    // Value checks already synchronise in select.py; one more sync lets the state stay untouched on bad losses.
    launch.losses_only = true;
    C10_CUDA_CHECK(cuda::launch_fused_select(launch, stream));
    CheckResult computed;
    if (!at::isfinite(losses).all().item<bool>()) {
      computed = {CheckCode::kComputedLossesNotFinite, 0};
    } else if (at::lt(losses, 0).any().item<bool>()) {
      computed = {CheckCode::kComputedLossesNegative, 0};
    }
    if (!computed.ok()) return {at::zeros({args.k}, positions.options()), losses, check_status(computed)};
    launch.losses_only = false;
    launch.logits = nullptr;  // second pass: update and draw from the checked losses
    checked = losses;         // kept alive until the second pass is enqueued
    launch.given_losses = checked.data_ptr<float>();
    losses = at::empty({p.batch}, float_options);  // the output never aliases what the kernel reads
    launch.losses_out = losses.data_ptr<float>();
  }
  launch.philox = device_philox(args.seed);
  C10_CUDA_CHECK(cuda::launch_fused_select(launch, stream));
  // Raw-pointer writes do not bump autograd's version counters; do it so misuse of the buffers is detected.
  args.score.unsafeGetTensorImpl()->bump_version();
  args.weight.unsafeGetTensorImpl()->bump_version();
  return {positions, losses, check_status({})};
}

at::Tensor prune_select_cuda(const at::Tensor& values_in, const at::Tensor& seed, int64_t keep) {
  const at::Tensor values = prepare_prune(values_in, seed, keep);
  const int64_t n = values.numel();
  const at::Device device = values.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto long_options = at::TensorOptions().dtype(at::kLong).device(device);
  if (keep == 0) return at::empty({0}, long_options);
  if (keep == n) return at::arange(n, long_options);
  at::Tensor kept = at::empty({keep}, long_options);
  cuda::PruneLaunch launch{};
  launch.philox = device_philox(seed);
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

TORCH_LIBRARY_IMPL(es_kernels_C, CUDA, m) {
  m.impl("fused_select", &es_kernels::FusedSelectOp<&es_kernels::fused_select_cuda>);
  m.impl("prune_select", &es_kernels::prune_select_cuda);
}
