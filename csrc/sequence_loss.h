// Per-sequence cross-entropy for language models (docs/architecture.md §3, token level): C++ entry points, one per
// device and call form, registered as the dispatcher ops es_kernels_C::{token,hidden}_sequence_losses (schemas in
// bindings.cpp, the CPU and CUDA registrations beside each implementation, fakes in es_kernels/extension.py).
//
// Semantics (es_kernels/reference/sequence.py is the oracle): the loss of sequence b is the mean ("mean") or sum
// ("sum") of its token cross-entropies over positions whose target is not ignore_index, 0 for a sequence with no
// scored token; label smoothing per token as torch.nn.functional.cross_entropy. Returns fp32 (B,). A target outside
// [0, V) other than ignore_index gives that sequence a NaN loss (value checks belong to the caller).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace es_kernels {

// Vocabulary chunk and token block of the hidden-state form: one fp32 chunk of token_block x vocab_chunk logits
// (16 MiB) is the only buffer that grows with V (plus, for fp16/bf16 inputs, the fp32 copies of one block of H and
// one chunk of W).
constexpr int64_t kSequenceTokenBlock = 1024;
constexpr int64_t kSequenceVocabChunk = 4096;

// logits: (B, T, V) fp32/fp16/bf16/fp64, any strides; targets: int64 (B, T), any strides.
at::Tensor token_sequence_losses_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                     c10::string_view reduction, double label_smoothing);

// hidden: (B, T, D), weight: (V, D) of the same float dtype, bias: (V,) any float dtype; logits are
// ((hidden @ weight.T) + bias) * logit_scale, then logit_softcap * tanh(z / logit_softcap) if a soft cap is given,
// all in fp32. V is walked in chunks of vocab_chunk columns and tokens in blocks of token_block rows; the (B*T, V)
// logits never exist.
at::Tensor hidden_sequence_losses_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                      int64_t ignore_index, c10::string_view reduction, double label_smoothing,
                                      double logit_scale, std::optional<double> logit_softcap,
                                      int64_t token_block = kSequenceTokenBlock,
                                      int64_t vocab_chunk = kSequenceVocabChunk);

#ifdef ES_KERNELS_WITH_CUDA
at::Tensor token_sequence_losses_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                      c10::string_view reduction, double label_smoothing);
at::Tensor hidden_sequence_losses_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                       int64_t ignore_index, c10::string_view reduction, double label_smoothing,
                                       double logit_scale, std::optional<double> logit_softcap,
                                       int64_t token_block = kSequenceTokenBlock,
                                       int64_t vocab_chunk = kSequenceVocabChunk);
#endif

namespace detail {
// Host-side argument checks shared by both devices (ValueError/TypeError naming the argument); each returns whether
// the reduction is the mean. The device check stays with each device's entry point.
bool check_token_arguments(const at::Tensor& logits, const at::Tensor& targets, c10::string_view reduction,
                           double label_smoothing);
bool check_hidden_arguments(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& targets, c10::string_view reduction, double label_smoothing,
                            double logit_scale, std::optional<double> logit_softcap, int64_t token_block,
                            int64_t vocab_chunk);
}  // namespace detail

}  // namespace es_kernels
