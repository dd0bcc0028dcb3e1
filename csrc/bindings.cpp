// The one Python module es_kernels._C: dispatches each op on the state's device to the CPU or CUDA build.
#include <torch/extension.h>

#include "ops.h"

namespace {

using es_kernels::SelectArgs;

std::tuple<at::Tensor, at::Tensor> fused_select(at::Tensor score, at::Tensor weight, at::Tensor indices, int64_t k,
                                                double beta1, double beta2, std::optional<at::Tensor> logits,
                                                std::optional<at::Tensor> target, std::optional<at::Tensor> target_b,
                                                double lam, std::optional<at::Tensor> losses, double label_smoothing,
                                                std::optional<at::Generator> generator, bool check_losses,
                                                bool check_inputs) {
  SelectArgs args{std::move(score), std::move(weight), std::move(indices), k, beta1, beta2, std::move(logits),
                  std::move(target), std::move(target_b), std::move(losses), lam, label_smoothing,
                  std::move(generator), check_losses, check_inputs};
  if (args.score.is_cuda()) {
    // Reading CUDA values means a host sync per check; select.py runs those checks itself on CUDA.
    TORCH_CHECK_VALUE(!check_inputs, "check_inputs is for CPU tensors only");
#ifdef ES_KERNELS_WITH_CUDA
    return es_kernels::fused_select_cuda(args);
#else
    TORCH_CHECK(false, "es_kernels._C was built without CUDA");
#endif
  }
  TORCH_CHECK_VALUE(args.score.is_cpu(), "score must be on CPU or CUDA, got ", args.score.device());
  return es_kernels::fused_select_cpu(args);
}

at::Tensor prune_select(const at::Tensor& values, int64_t keep, std::optional<at::Generator> generator) {
  if (values.is_cuda()) {
#ifdef ES_KERNELS_WITH_CUDA
    return es_kernels::prune_select_cuda(values, keep, std::move(generator));
#else
    TORCH_CHECK(false, "es_kernels._C was built without CUDA");
#endif
  }
  TORCH_CHECK_VALUE(values.is_cpu(), "values must be on CPU or CUDA, got ", values.device());
  return es_kernels::prune_select_cpu(values, keep, std::move(generator));
}

bool built_with_cuda() {
#ifdef ES_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "es_kernels C++/CUDA kernels: fused loss + state update + exponential-race selection, pruning draw";
  // The GIL is released while kernels run: they touch no Python objects, and training loops with data-loading
  // threads keep going meanwhile.
  m.def("fused_select", &fused_select, py::arg("score"), py::arg("weight"), py::arg("indices"), py::arg("k"),
        py::arg("beta1"), py::arg("beta2"), py::arg("logits"), py::arg("target"), py::arg("target_b"),
        py::arg("lam"), py::arg("losses"), py::arg("label_smoothing"), py::arg("generator"),
        py::arg("check_losses") = false, py::arg("check_inputs") = false, py::call_guard<py::gil_scoped_release>(),
        "(positions int64 (k,) ascending, losses fp32 (B,)); updates score/weight in place at indices");
  m.def("prune_select", &prune_select, py::arg("values"), py::arg("keep"), py::arg("generator"),
        py::call_guard<py::gil_scoped_release>(), "keep ids (ascending int64) drawn without replacement ∝ values");
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled into this module");
}
