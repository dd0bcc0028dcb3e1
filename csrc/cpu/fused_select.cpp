// CPU fused select: per-sample losses (parallel over rows), the state update, and the exponential race over the
// meta-batch, in one call with no intermediate tensors.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "checks.h"
#include "cpu/row_loss.h"
#include "cpu/rng.h"
#include "kernels/philox.cuh"
#include "kernels/race.cuh"
#include "kernels/update.cuh"
#include "ops.h"

namespace es_kernels {

uint64_t draw_cpu_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  // One 64-bit draw per call advances the user's generator (so successive calls differ and torch.manual_seed
  // reproduces them); every per-element number then comes from Philox keyed by it.
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

namespace {

// Below this many logits per chunk, thread start-up costs more than the rows (measured: B = 64, C = 10 runs
// fastest single-threaded).
constexpr int64_t kLossGrainElements = 16384;

void compute_losses(const PreparedSelect& p, const LossParams& params, float* out, uint8_t* finite_rows) {
  cpu::RowLossArgs args{};
  const auto dtype = p.logits.scalar_type();
  args.logits = p.logits.data_ptr();
  args.logits_row_stride = p.logits.stride(0);
  args.logits_type = dtype == at::kHalf       ? LogitsType::kFloat16
                     : dtype == at::kBFloat16 ? LogitsType::kBFloat16
                                              : LogitsType::kFloat32;
  if (params.kind == TargetKind::kSoft) {
    args.soft_targets = p.target.data_ptr<float>();
  } else {
    args.labels = p.target.data_ptr<int64_t>();
    if (params.kind == TargetKind::kMixup) args.labels_b = p.target_b.data_ptr<int64_t>();
  }
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

void check_computed_losses(const float* losses, int64_t batch) {
  for (int64_t r = 0; r < batch; ++r) {
    TORCH_CHECK_VALUE(std::isfinite(losses[r]), kComputedLossesName, " must be finite (found NaN or inf)");
    TORCH_CHECK_VALUE(losses[r] >= 0.0f, kComputedLossesName,
                      " must be non-negative (weights are proportional to losses)");
  }
}

void check_class_ids(const char* name, const at::Tensor& labels, int64_t num_classes) {
  const int64_t* ids = labels.data_ptr<int64_t>();
  bool bad = false;
  for (int64_t r = 0; r < labels.numel(); ++r) bad |= ids[r] < 0 || ids[r] >= num_classes;
  TORCH_CHECK_VALUE(!bad, name, " must hold class ids in [0, ", num_classes, ")");
}

// select.py's value checks of the ids and given losses, in its order and with its messages (es_kernels/_checks.py).
void check_ids_and_given_losses(const PreparedSelect& p, int64_t num_samples) {
  std::vector<int64_t> ids(p.indices.data_ptr<int64_t>(), p.indices.data_ptr<int64_t>() + p.batch);
  std::sort(ids.begin(), ids.end());
  const int64_t bad = ids.front() < 0 ? ids.front() : ids.back();
  TORCH_CHECK_VALUE(ids.front() >= 0 && ids.back() < num_samples, "indices must be in [0, ", num_samples,
                    "), got ", bad);
  TORCH_CHECK_VALUE(std::adjacent_find(ids.begin(), ids.end()) == ids.end(),
                    "indices must not repeat an id within one call (each sample is visited once)");
  if (static_cast<TargetKind>(p.kind) != TargetKind::kNone) return;
  const float* losses = p.losses.data_ptr<float>();
  bool finite = true, non_negative = true;
  for (int64_t r = 0; r < p.batch; ++r) {
    finite &= std::isfinite(losses[r]);
    non_negative &= losses[r] >= 0.0f;
  }
  TORCH_CHECK_VALUE(finite, "losses must be finite (found NaN or inf)");
  TORCH_CHECK_VALUE(non_negative, "losses must be non-negative (weights are proportional to losses)");
}

// select.py's checks of the logits (finiteness comes from the loss pass) and targets, in its order.
void check_logits_and_targets(const PreparedSelect& p, const std::vector<uint8_t>& finite_rows) {
  TORCH_CHECK_VALUE(std::all_of(finite_rows.begin(), finite_rows.end(), [](uint8_t f) { return f != 0; }),
                    "logits must be finite (found NaN or inf)");
  switch (static_cast<TargetKind>(p.kind)) {
    case TargetKind::kHard:
      check_class_ids("targets", p.target, p.num_classes);
      break;
    case TargetKind::kMixup:
      check_class_ids("targets[0] (y_a)", p.target, p.num_classes);
      check_class_ids("targets[1] (y_b)", p.target_b, p.num_classes);
      break;
    default: {
      const float* t = p.target.data_ptr<float>();
      bool good = true;
      for (int64_t j = 0; j < p.target.numel(); ++j) good &= std::isfinite(t[j]) && t[j] >= 0.0f;
      TORCH_CHECK_VALUE(good, "targets as soft labels must be finite and non-negative");
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

std::tuple<at::Tensor, at::Tensor> fused_select_cpu(const SelectArgs& args) {
  const PreparedSelect p = prepare_select(args);
  if (args.check_inputs) check_ids_and_given_losses(p, args.score.numel());
  const LossParams params = make_loss_params(p, args.label_smoothing, args.lam);
  at::Tensor losses = p.losses;
  if (params.kind != TargetKind::kNone) {
    losses = at::empty({p.batch}, at::TensorOptions().dtype(at::kFloat));
    std::vector<uint8_t> finite_rows(args.check_inputs ? p.batch : 0);
    compute_losses(p, params, losses.data_ptr<float>(), args.check_inputs ? finite_rows.data() : nullptr);
    if (args.check_inputs) check_logits_and_targets(p, finite_rows);
    if (args.check_losses) check_computed_losses(losses.data_ptr<float>(), p.batch);
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
  return {race_top_k(fresh, args.k, draw_cpu_seed(args.generator)), losses};
}

}  // namespace es_kernels
