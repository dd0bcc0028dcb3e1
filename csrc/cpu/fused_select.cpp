// CPU fused select: per-sample losses (parallel over rows), the state update, and the exponential race over the
// meta-batch, in one call with no intermediate tensors.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/row_loss.h"
#include "kernels/philox.cuh"
#include "kernels/race.cuh"
#include "kernels/update.cuh"
#include "ops.h"

namespace es_kernels {

namespace {

// Below this many logits per chunk, thread start-up costs more than the rows (measured: B = 64, C = 10 runs
// fastest single-threaded).
constexpr int64_t kLossGrainElements = 16384;

void compute_losses(const PreparedSelect& p, const LossParams& params, float* out, uint8_t* finite_rows) {
  cpu::RowLossArgs args{};
  point_at_loss_inputs(args, p);
  args.params = params;
  args.out = out;
  args.finite_rows = finite_rows;
  const int64_t grain = std::max<int64_t>(1, kLossGrainElements / p.num_classes);
  const bool widen = args.logits_type != LogitsType::kFloat32;
  at::parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(widen ? p.num_classes : 0);
    cpu::loss_rows(args, begin, end, scratch.data());
  });
}

CheckResult check_computed_losses(const float* losses, int64_t batch) {
  bool finite = true, non_negative = true;
  for (int64_t r = 0; r < batch; ++r) {
    finite &= std::isfinite(losses[r]);
    non_negative &= losses[r] >= 0.0f;
  }
  if (!finite) return {CheckCode::kComputedLossesNotFinite, 0};
  if (!non_negative) return {CheckCode::kComputedLossesNegative, 0};
  return {};
}

bool class_ids_in_range(const at::Tensor& labels, int64_t num_classes) {
  const int64_t* ids = labels.data_ptr<int64_t>();
  bool bad = false;
  for (int64_t r = 0; r < labels.numel(); ++r) bad |= ids[r] < 0 || ids[r] >= num_classes;
  return !bad;
}

// select.py's value checks of the ids and given losses, in its order (es_kernels/_checks.py).
CheckResult check_ids_and_given_losses(const PreparedSelect& p, int64_t num_samples) {
  std::vector<int64_t> ids(p.indices.data_ptr<int64_t>(), p.indices.data_ptr<int64_t>() + p.batch);
  std::sort(ids.begin(), ids.end());
  if (ids.front() < 0) return {CheckCode::kIndicesOutOfRange, ids.front()};
  if (ids.back() >= num_samples) return {CheckCode::kIndicesOutOfRange, ids.back()};
  if (std::adjacent_find(ids.begin(), ids.end()) != ids.end()) return {CheckCode::kIndicesRepeat, 0};
  if (static_cast<TargetKind>(p.kind) != TargetKind::kNone) return {};
  const float* losses = p.losses.data_ptr<float>();
  bool finite = true, non_negative = true;
  for (int64_t r = 0; r < p.batch; ++r) {
    finite &= std::isfinite(losses[r]);
    non_negative &= losses[r] >= 0.0f;
  }
  if (!finite) return {CheckCode::kLossesNotFinite, 0};
  if (!non_negative) return {CheckCode::kLossesNegative, 0};
  return {};
}

// select.py's checks of the logits (finiteness comes from the loss pass) and targets, in its order.
CheckResult check_logits_and_targets(const PreparedSelect& p, const std::vector<uint8_t>& finite_rows) {
  if (!std::all_of(finite_rows.begin(), finite_rows.end(), [](uint8_t f) { return f != 0; })) {
    return {CheckCode::kLogitsNotFinite, 0};
  }
  switch (static_cast<TargetKind>(p.kind)) {
    case TargetKind::kHard:
      if (!class_ids_in_range(p.target, p.num_classes)) return {CheckCode::kLabelsOutOfRange, 0};
      return {};
    case TargetKind::kMixup:
      if (!class_ids_in_range(p.target, p.num_classes)) return {CheckCode::kLabelsOutOfRange, 1};
      if (!class_ids_in_range(p.target_b, p.num_classes)) return {CheckCode::kLabelsOutOfRange, 2};
      return {};
    default: {
      const float* t = p.target.data_ptr<float>();
      bool good = true;
      for (int64_t j = 0; j < p.target.numel(); ++j) good &= std::isfinite(t[j]) && t[j] >= 0.0f;
      if (!good) return {CheckCode::kSoftTargetsBad, 0};
      return {};
    }
  }
}

struct RaceEntry {
  double key;
  int64_t position;
};

// k largest keys, ties to the lower position, returned ascending.
at::Tensor race_top_k(const std::vector<float>& weights, int64_t k, uint64_t seed) {
  const int64_t batch = static_cast<int64_t>(weights.size());
  std::vector<RaceEntry> entries(batch);
  for (int64_t i = 0; i < batch; i += 2) {
    const Philox4 r = philox4x32_10(seed, 0, static_cast<uint64_t>(i) >> 1);
    entries[i] = {race_key(weights[i], uniform_double(r.x, r.y)), i};
    if (i + 1 < batch) entries[i + 1] = {race_key(weights[i + 1], uniform_double(r.z, r.w)), i + 1};
  }
  at::Tensor positions = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = positions.data_ptr<int64_t>();
  if (k < batch) {
    const auto first = [](const RaceEntry& a, const RaceEntry& b) {
      return a.key > b.key || (a.key == b.key && a.position < b.position);
    };
    std::nth_element(entries.begin(), entries.begin() + k, entries.end(), first);
  }
  for (int64_t j = 0; j < k; ++j) out[j] = entries[j].position;
  std::sort(out, out + k);
  return positions;
}

}  // namespace

SelectResult fused_select_cpu(const SelectArgs& args) {
  const PreparedSelect p = prepare_select(args);
  const auto refuse = [&](CheckResult failed) -> SelectResult {
    return {at::zeros({args.k}, at::TensorOptions().dtype(at::kLong)),
            at::zeros({p.batch}, at::TensorOptions().dtype(at::kFloat)), check_status(failed)};
  };
  if (args.check_inputs) {
    const CheckResult ids = check_ids_and_given_losses(p, args.score.numel());
    if (!ids.ok()) return refuse(ids);
  }
  const LossParams params = make_loss_params(p, args.label_smoothing, args.lam);
  at::Tensor losses;
  if (params.kind == TargetKind::kNone) {
    // A custom op's output must not alias an input: given fp32 contiguous losses come back as a copy.
    losses = p.losses.is_same(*args.losses) ? p.losses.clone() : p.losses;
  } else {
    losses = at::empty({p.batch}, at::TensorOptions().dtype(at::kFloat));
    std::vector<uint8_t> finite_rows(args.check_inputs ? p.batch : 0);
    compute_losses(p, params, losses.data_ptr<float>(), args.check_inputs ? finite_rows.data() : nullptr);
    if (args.check_inputs) {
      const CheckResult inputs = check_logits_and_targets(p, finite_rows);
      if (!inputs.ok()) return refuse(inputs);
    }
    if (args.check_losses) {
      const CheckResult computed = check_computed_losses(losses.data_ptr<float>(), p.batch);
      if (!computed.ok()) return refuse(computed);
    }
  }

  // The update is B scalar operations; doing it serially keeps repeated ids (possible with value checks off)
  // race-free, and an id outside [0, n) is skipped instead of written.
  const Betas betas = make_betas(args.beta1, args.beta2);
  const int64_t n = args.score.numel();
  float* score = args.score.data_ptr<float>();
  float* weight = args.weight.data_ptr<float>();
  const int64_t* indices = p.indices.data_ptr<int64_t>();
  const float* loss = losses.data_ptr<float>();
  std::vector<float> fresh(p.batch);
  for (int64_t r = 0; r < p.batch; ++r) {
    const int64_t id = indices[r];
    if (id < 0 || id >= n) {
      fresh[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    fresh[r] = visit(score + id, loss[r], betas);
    weight[id] = fresh[r];
  }
  // Raw-pointer writes do not bump autograd's version counters; do it so misuse of the buffers is detected.
  args.score.unsafeGetTensorImpl()->bump_version();
  args.weight.unsafeGetTensorImpl()->bump_version();
  return {race_top_k(fresh, args.k, host_seed(args.seed)), losses, check_status({})};
}

}  // namespace es_kernels

TORCH_LIBRARY_IMPL(es_kernels_C, CPU, m) {
  m.impl("fused_select", &es_kernels::FusedSelectOp<&es_kernels::fused_select_cpu>);
  m.impl("prune_select", &es_kernels::prune_select_cpu);
}
