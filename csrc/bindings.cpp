// The op schemas of the es_kernels_C dispatcher library (implementations: TORCH_LIBRARY_IMPL in cpu/ and cuda/;
// fake implementations: es_kernels/extension.py), and the tiny Python module es_kernels._C whose import loads them.
// The argument names are es_kernels.call.OP_ARGUMENTS plus the two check switches (tests/test_ops.py checks it).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(es_kernels_C, m) {
  m.def(
      "fused_select(Tensor(a!) score, Tensor(b!) weight, Tensor indices, Tensor seed, int k, float beta1, "
      "float beta2, Tensor? logits, Tensor? labels_a, Tensor? labels_b, Tensor? soft_targets, float lam, "
      "Tensor? losses, float label_smoothing, bool check_inputs, bool check_losses) -> (Tensor, Tensor, Tensor)");
  m.def("prune_select(Tensor values, Tensor seed, int keep) -> Tensor");
  // Per-sequence losses of language models (csrc/sequence_loss.h): evolved_select computes them, then
  // calls fused_select with them as its losses. token_block and vocab_chunk only size the scratch chunk (defaults:
  // kSequenceTokenBlock, kSequenceVocabChunk); tests make them small to exercise the merge across chunks.
  m.def(
      "token_sequence_losses(Tensor logits, Tensor targets, int ignore_index, str sequence_reduction, "
      "float label_smoothing) -> Tensor");
  m.def(
      "hidden_sequence_losses(Tensor hidden_states, Tensor lm_head_weight, Tensor? lm_head_bias, Tensor targets, "
      "int ignore_index, str sequence_reduction, float label_smoothing, float logit_scale, float? logit_softcap, "
      "int token_block=1024, int vocab_chunk=4096) -> Tensor");
  // Deferred value checks (csrc/deferred.h): the guard before a call's update, the settle after it.
  m.def(
      "deferred_guard(Tensor score, Tensor weight, Tensor indices, Tensor? visited, Tensor? labels_a, "
      "Tensor? labels_b, int num_classes, Tensor? losses, Tensor? soft_targets, Tensor? token_targets, "
      "int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "deferred_settle(Tensor(a!) score, Tensor(b!) weight, Tensor safe_ids, Tensor snapshot, Tensor status, "
      "Tensor? losses, Tensor(c!)? visited, Tensor(d!) scored, Tensor(e!) error_record, Tensor(f!) calls, "
      "int classes) -> ()");
}

namespace {

bool built_with_cuda() {
#ifdef ES_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "es_kernels C++/CUDA kernels, registered as torch.ops.es_kernels_C.{fused_select,prune_select,token_sequence_losses,hidden_sequence_losses}";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled into this module");
}
