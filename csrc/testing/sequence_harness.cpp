// Test-only binding of the sequence-loss entry points (csrc/sequence_loss.h) until they are registered with the
// dispatcher (issue 10's contract). Built by tests/test_sequence.py with torch.utils.cpp_extension.load; never part
// of the shipped extension (setup.py compiles csrc/*.cpp, csrc/cpu and csrc/cuda only).
#include <torch/extension.h>

#include "sequence_loss.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("token_sequence_losses_cpu",
        [](const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, const std::string& reduction,
           double label_smoothing) {
          return es_kernels::token_sequence_losses_cpu(logits, targets, ignore_index, reduction, label_smoothing);
        });
  m.def("hidden_sequence_losses_cpu",
        [](const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
           const at::Tensor& targets, int64_t ignore_index, const std::string& reduction, double label_smoothing,
           double logit_scale, std::optional<double> logit_softcap, int64_t token_block, int64_t vocab_chunk) {
          return es_kernels::hidden_sequence_losses_cpu(hidden, weight, bias, targets, ignore_index, reduction,
                                                        label_smoothing, logit_scale, logit_softcap, token_block,
                                                        vocab_chunk);
        });
}
