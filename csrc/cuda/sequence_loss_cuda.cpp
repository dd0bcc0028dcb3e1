// Torch glue of the CUDA sequence losses: checks, the fp32 GEMM per (token block, vocabulary chunk) through ATen
// (cuBLAS), bias/scale/soft cap in place, then the torch-free row and reduction kernels (sequence_loss.cu) on the
// current stream. No host synchronisation. Peak extra memory: one token_block x vocab_chunk fp32 chunk plus the
// per-token statistics (24 bytes a token).
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/sequence_launch.h"
#include "sequence_loss.h"

namespace es_kernels {

namespace {

cuda::SequenceDtype sequence_dtype(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return cuda::SequenceDtype::kFloat16;
    case at::kBFloat16:
      return cuda::SequenceDtype::kBFloat16;
    case at::kDouble:
      return cuda::SequenceDtype::kFloat64;
    case at::kFloat:
      return cuda::SequenceDtype::kFloat32;
    default:
      TORCH_CHECK_TYPE(false, "logits must be fp32, fp16, bf16 or fp64, got ", type);
  }
}

SequenceTargets sequence_targets(const at::Tensor& targets) {
  return SequenceTargets{targets.const_data_ptr<int64_t>(), targets.stride(0), targets.stride(1),
                               targets.size(1)};
}

SequenceLossParams sequence_params(int64_t vocab, int64_t ignore_index, double label_smoothing) {
  return make_sequence_params(vocab, ignore_index, label_smoothing);
}

// Token statistics: LsePartial per token (as raw bytes) and the target logits.
struct TokenState {
  at::Tensor stats, target_logit;
  int64_t splits;
  LsePartial* stats_ptr() { return reinterpret_cast<LsePartial*>(stats.mutable_data_ptr<uint8_t>()); }
};

// `splits` partials per token (column splits of the token-logit form), one otherwise.
TokenState token_state(int64_t tokens, const at::Device& device, int64_t splits = 1) {
  const auto options = at::TensorOptions().device(device);
  return TokenState{at::empty({tokens * splits * static_cast<int64_t>(sizeof(LsePartial))}, options.dtype(at::kByte)),
                    at::empty({tokens}, options.dtype(at::kFloat)), splits};
}

at::Tensor reduce(TokenState& state, const at::Tensor& targets, const SequenceLossParams& params, bool mean,
                  cudaStream_t stream) {
  at::Tensor out = at::empty({targets.size(0)}, targets.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_sequence_reduce(state.stats_ptr(), state.splits,
                                              state.target_logit.const_data_ptr<float>(),
                                              targets.size(0), sequence_targets(targets), params, mean,
                                              out.mutable_data_ptr<float>(), stream));
  return out;
}

}  // namespace

at::Tensor token_sequence_losses_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                      c10::string_view reduction, double label_smoothing) {
  const bool mean = detail::check_token_arguments(logits, targets, reduction, label_smoothing);
  TORCH_CHECK_VALUE(logits.is_cuda() && targets.device() == logits.device(),
                    "logits and targets must be on the same CUDA device");
  const cuda::SequenceDtype dtype = sequence_dtype(logits.scalar_type());
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index());
  const int64_t batch = logits.size(0), time = logits.size(1);
  const SequenceLossParams params = sequence_params(logits.size(2), ignore_index, label_smoothing);
  const int64_t vocab = logits.size(2);
  // Few tokens: split each row's columns over several blocks so every SM has work, in chunks of a multiple of 16
  // columns so every split of a contiguous row starts at the row's own alignment.
  int64_t splits = batch * time > 0 ? cuda::sequence_splits(batch * time, vocab) : 1;
  const int64_t split_columns = ((vocab + splits - 1) / splits + 15) / 16 * 16;
  splits = (vocab + split_columns - 1) / split_columns;
  TokenState state = token_state(batch * time, logits.device(), splits);
  if (batch * time > 0) {
    SequenceRows rows{time, logits.stride(0), logits.stride(1), logits.stride(2), vocab, 0, 0};
    rows.splits = splits;
    rows.split_columns = split_columns;
    C10_CUDA_CHECK(cuda::launch_sequence_rows(logits.const_data_ptr(), dtype, batch * time, rows,
                                              sequence_targets(targets), params, true, state.stats_ptr(),
                                              state.target_logit.mutable_data_ptr<float>(), stream));
  }
  return reduce(state, targets, params, mean, stream);
}

at::Tensor hidden_sequence_losses_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                       int64_t ignore_index, c10::string_view reduction, double label_smoothing,
                                       double logit_scale, std::optional<double> logit_softcap, int64_t token_block,
                                       int64_t vocab_chunk) {
  const bool mean = detail::check_hidden_arguments(hidden, weight, bias, targets, reduction, label_smoothing,
                                                    logit_scale, logit_softcap, token_block, vocab_chunk);
  const int64_t batch = hidden.size(0), time = hidden.size(1), dim = hidden.size(2), vocab = weight.size(0);
  TORCH_CHECK_VALUE(hidden.is_cuda() && targets.device() == hidden.device(),
                    "hidden_states and targets must be on the same CUDA device");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index());
  const SequenceLossParams params = sequence_params(vocab, ignore_index, label_smoothing);
  const int64_t tokens = batch * time;
  TokenState state = token_state(tokens, hidden.device());
  if (tokens == 0) return reduce(state, targets, params, mean, stream);

  const at::Tensor flat_hidden = hidden.reshape({tokens, dim});
  // fp16/bf16 GEMMs accumulate in fp32 and write fp32 (cuBLAS through mm's out_dtype); fp64 runs in fp32.
  const bool half_precision = hidden.scalar_type() == at::kHalf || hidden.scalar_type() == at::kBFloat16;
  const bool widen = hidden.scalar_type() == at::kDouble;
  const std::optional<at::Tensor> bias32 =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  const int64_t block = std::min(token_block, tokens), chunk = std::min(vocab_chunk, vocab);
  at::Tensor scratch = at::empty({block * chunk}, hidden.options().dtype(at::kFloat));
  const float scale = static_cast<float>(logit_scale);
  for (int64_t row0 = 0; row0 < tokens; row0 += block) {
    const int64_t rows = std::min(block, tokens - row0);
    at::Tensor h = flat_hidden.narrow(0, row0, rows);
    if (widen) h = h.to(at::kFloat);
    for (int64_t column0 = 0; column0 < vocab; column0 += chunk) {
      const int64_t columns = std::min(chunk, vocab - column0);
      at::Tensor w = weight.narrow(0, column0, columns);
      if (widen) w = w.to(at::kFloat);
      at::Tensor z = scratch.narrow(0, 0, rows * columns).view({rows, columns});
      if (half_precision) {
        at::mm_out(z, h, w.t(), at::kFloat);
      } else {
        at::mm_out(z, h, w.t());
      }
      if (bias32.has_value()) z.add_(bias32->narrow(0, column0, columns));
      if (scale != 1.0f) z.mul_(scale);
      if (logit_softcap.has_value()) z.div_(*logit_softcap).tanh_().mul_(*logit_softcap);
      const SequenceRows chunk_rows{rows, 0, columns, 1, columns, column0, row0};
      C10_CUDA_CHECK(cuda::launch_sequence_rows(z.const_data_ptr(), cuda::SequenceDtype::kFloat32, rows, chunk_rows,
                                                sequence_targets(targets), params, column0 == 0, state.stats_ptr(),
                                                state.target_logit.mutable_data_ptr<float>(), stream));
    }
  }
  return reduce(state, targets, params, mean, stream);
}

}  // namespace es_kernels

TORCH_LIBRARY_IMPL(es_kernels_C, CUDA, m) {
  m.impl("token_sequence_losses", &es_kernels::token_sequence_losses_cuda);
  m.impl("hidden_sequence_losses", &es_kernels::hidden_sequence_losses_cuda);
}
