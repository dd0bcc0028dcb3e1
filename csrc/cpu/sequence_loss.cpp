// Per-sequence cross-entropy on CPU (docs/architecture.md §3, token level): token losses with at::parallel_for over
// token rows, then a sequential per-sequence sum in a fixed order (deterministic whatever the thread count).
//
// The hidden-state form never holds the (B*T, V) logits: for each block of tokens and each chunk of the vocabulary
// one fp32 GEMM (at::mm_out into a reused buffer) produces the chunk's logits, bias/scale/soft cap are applied in
// place, and each row of the chunk, still in cache, gives its log-sum-exp partial (the SIMD loop of cpu/lse_vector.h)
// merged into the token's (kernels/lse.cuh), so peak extra memory is one chunk however large V is.
#include "sequence_loss.h"

#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/row_loss.h"
#include "kernels/sequence.cuh"

namespace es_kernels {

namespace detail {

namespace {

// What both call forms share once their own tensors are checked.
bool check_sequence_arguments(const at::Tensor& targets, int64_t batch, int64_t time, int64_t vocab,
                              c10::string_view reduction, double label_smoothing) {
  CHECK_DEFINED("targets", targets);
  CHECK_DTYPE("targets", targets, at::kLong);
  TORCH_CHECK_VALUE(targets.dim() == 2 && targets.size(0) == batch && targets.size(1) == time,
                    "targets must have shape (B, T) = (", batch, ", ", time, "), got ", targets.sizes());
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "sequence_reduction must be \"mean\" or \"sum\", got \"", reduction, "\"");
  CHECK_RANGE("label_smoothing", label_smoothing, 0.0, 1.0);
  TORCH_CHECK_VALUE(vocab >= 1, "the vocabulary must have at least one entry, got V = ", vocab);
  return reduction == "mean";
}

}  // namespace

bool check_token_arguments(const at::Tensor& logits, const at::Tensor& targets, c10::string_view reduction,
                           double label_smoothing) {
  CHECK_DEFINED("logits", logits);
  CHECK_DIM("logits", logits, 3);
  return check_sequence_arguments(targets, logits.size(0), logits.size(1), logits.size(2), reduction, label_smoothing);
}

bool check_hidden_arguments(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& targets, c10::string_view reduction, double label_smoothing,
                            double logit_scale, std::optional<double> logit_softcap, int64_t token_block,
                            int64_t vocab_chunk) {
  CHECK_DEFINED("hidden_states", hidden);
  CHECK_DEFINED("lm_head_weight", weight);
  TORCH_CHECK_TYPE(at::isFloatingType(hidden.scalar_type()), "hidden_states must be a floating-point tensor, got ",
                   hidden.scalar_type());
  CHECK_DIM("hidden_states", hidden, 3);
  CHECK_DIM("lm_head_weight", weight, 2);
  TORCH_CHECK_VALUE(weight.scalar_type() == hidden.scalar_type() && weight.device() == hidden.device(),
                    "lm_head_weight must have the dtype and device of hidden_states (", hidden.scalar_type(), ", ",
                    hidden.device(), "), got ", weight.scalar_type(), ", ", weight.device());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(2), "lm_head_weight must have D = ", hidden.size(2),
                    " columns, got shape ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "lm_head_bias must be a floating-point tensor");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->device() == hidden.device(),
                      "lm_head_bias must have shape (V,) = (", weight.size(0), ",) on ", hidden.device(), ", got ",
                      bias->sizes(), " on ", bias->device());
  }
  TORCH_CHECK_VALUE(logit_scale > 0.0, "logit_scale must be positive, got ", logit_scale);
  TORCH_CHECK_VALUE(!logit_softcap.has_value() || *logit_softcap > 0.0, "logit_softcap must be positive or None");
  TORCH_CHECK_VALUE(token_block >= 1 && vocab_chunk >= 1, "token_block and vocab_chunk must be positive");
  return check_sequence_arguments(targets, hidden.size(0), hidden.size(1), weight.size(0), reduction,
                                  label_smoothing);
}

}  // namespace detail

namespace {

SequenceLossParams make_params(int64_t vocab, int64_t ignore_index, double label_smoothing) {
  return make_sequence_params(vocab, ignore_index, label_smoothing);
}

int64_t target_at(const at::Tensor& targets, int64_t b, int64_t t) {
  return targets.const_data_ptr<int64_t>()[b * targets.stride(0) + t * targets.stride(1)];
}

// (B, T) token losses (0 where unscored) -> fp32 (B,), summed in token order in double.
at::Tensor reduce_per_sequence(const std::vector<float>& token_losses, const at::Tensor& targets,
                               int64_t ignore_index, bool mean) {
  const int64_t batch = targets.size(0), time = targets.size(1);
  at::Tensor out = at::empty({batch}, targets.options().dtype(at::kFloat));
  float* result = out.mutable_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    double total = 0.0;
    int64_t scored = 0;
    for (int64_t t = 0; t < time; ++t) {
      if (target_at(targets, b, t) == ignore_index) continue;
      total += token_losses[b * time + t];
      ++scored;
    }
    result[b] = static_cast<float>(mean && scored > 0 ? total / static_cast<double>(scored) : total);
  }
  return out;
}

// Rows of fp32 logits with unit stride are read in place; others are widened into a per-chunk scratch row first.
template <typename T>
void token_losses_rows(const at::Tensor& logits, const at::Tensor& targets, const SequenceLossParams& p,
                       std::vector<float>& out) {
  const int64_t time = logits.size(1), vocab = logits.size(2);
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1), s2 = logits.stride(2);
  const T* base = logits.const_data_ptr<T>();
  const bool in_place = std::is_same<T, float>::value && s2 == 1;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, logits.size(0) * time, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(in_place ? 0 : vocab);
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / time, t = token % time;
      const int64_t target = target_at(targets, b, t);
      if (target == p.ignore_index) {
        out[token] = 0.0f;
        continue;
      }
      const T* row = base + b * s0 + t * s1;
      const float* z = reinterpret_cast<const float*>(row);
      if (!in_place) {
        for (int64_t j = 0; j < vocab; ++j) scratch[j] = static_cast<float>(row[j * s2]);
        z = scratch.data();
      }
      const LsePartial stats = cpu::row_partial(z, vocab);
      const float target_logit =
          sequence_target_valid(target, vocab) ? z[target] : std::numeric_limits<float>::quiet_NaN();
      out[token] = sequence_token_loss(stats, target_logit, p);
    }
  });
}

}  // namespace

at::Tensor token_sequence_losses_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                     c10::string_view reduction, double label_smoothing) {
  const bool mean = detail::check_token_arguments(logits, targets, reduction, label_smoothing);
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "logits must be a floating-point tensor, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.device().is_cpu() && targets.device().is_cpu(), "logits and targets must be CPU tensors");
  const SequenceLossParams p = make_params(logits.size(2), ignore_index, label_smoothing);
  std::vector<float> token_losses(static_cast<size_t>(logits.size(0) * logits.size(1)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_sequence_losses_cpu",
                                  [&] { token_losses_rows<scalar_t>(logits, targets, p, token_losses); });
  return reduce_per_sequence(token_losses, targets, ignore_index, mean);
}

at::Tensor hidden_sequence_losses_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                      int64_t ignore_index, c10::string_view reduction, double label_smoothing,
                                      double logit_scale, std::optional<double> logit_softcap, int64_t token_block,
                                      int64_t vocab_chunk) {
  const bool mean = detail::check_hidden_arguments(hidden, weight, bias, targets, reduction, label_smoothing,
                                                    logit_scale, logit_softcap, token_block, vocab_chunk);
  const int64_t batch = hidden.size(0), time = hidden.size(1), dim = hidden.size(2), vocab = weight.size(0);
  TORCH_CHECK_VALUE(hidden.device().is_cpu() && targets.device().is_cpu(),
                    "hidden_states and targets must be CPU tensors");
  const SequenceLossParams p = make_params(vocab, ignore_index, label_smoothing);
  const int64_t tokens = batch * time;
  std::vector<float> token_losses(static_cast<size_t>(tokens), 0.0f);
  if (tokens == 0) return reduce_per_sequence(token_losses, targets, ignore_index, mean);

  // A view whenever the strides allow one; otherwise a copy of H, which is V / D times smaller than the logits.
  const at::Tensor flat_hidden = hidden.reshape({tokens, dim});
  const bool widen = hidden.scalar_type() != at::kFloat;
  const std::optional<at::Tensor> bias32 =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  const int64_t block = std::min(token_block, tokens), chunk = std::min(vocab_chunk, vocab);
  at::Tensor scratch = at::empty({block * chunk}, hidden.options().dtype(at::kFloat));
  std::vector<LsePartial> stats(static_cast<size_t>(block));
  std::vector<float> target_logit(static_cast<size_t>(block));
  const float scale = static_cast<float>(logit_scale);

  for (int64_t row0 = 0; row0 < tokens; row0 += block) {
    const int64_t rows = std::min(block, tokens - row0);
    at::Tensor h = flat_hidden.narrow(0, row0, rows);
    if (widen) h = h.to(at::kFloat);
    std::fill(stats.begin(), stats.end(), lse_empty());
    std::fill(target_logit.begin(), target_logit.end(), std::numeric_limits<float>::quiet_NaN());
    for (int64_t column0 = 0; column0 < vocab; column0 += chunk) {
      const int64_t columns = std::min(chunk, vocab - column0);
      at::Tensor w = weight.narrow(0, column0, columns);
      if (widen) w = w.to(at::kFloat);
      at::Tensor z = scratch.narrow(0, 0, rows * columns).view({rows, columns});
      at::mm_out(z, h, w.t());
      if (bias32.has_value()) z.add_(bias32->narrow(0, column0, columns));
      if (scale != 1.0f) z.mul_(scale);
      if (logit_softcap.has_value()) z.div_(*logit_softcap).tanh_().mul_(*logit_softcap);
      // One more pass per row of the chunk: its partial by the SIMD loop, merged into the token's.
      const float* chunk_data = z.const_data_ptr<float>();
      at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / columns), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float* row = chunk_data + r * columns;
          stats[r] = lse_merge(stats[r], cpu::row_partial(row, columns));
          const int64_t local = target_at(targets, (row0 + r) / time, (row0 + r) % time) - column0;
          if (local >= 0 && local < columns) target_logit[r] = row[local];
        }
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t target = target_at(targets, (row0 + r) / time, (row0 + r) % time);
      token_losses[row0 + r] = target == ignore_index ? 0.0f : sequence_token_loss(stats[r], target_logit[r], p);
    }
  }
  return reduce_per_sequence(token_losses, targets, ignore_index, mean);
}

}  // namespace es_kernels

TORCH_LIBRARY_IMPL(es_kernels_C, CPU, m) {
  m.impl("token_sequence_losses", &es_kernels::token_sequence_losses_cpu);
  m.impl("hidden_sequence_losses", &es_kernels::hidden_sequence_losses_cpu);
}
