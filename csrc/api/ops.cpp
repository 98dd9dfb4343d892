// The C++ API as TorchScript operators: torch.ops.pyckpt.load_state_dict / load_into, callable
// from Python, from torch.jit.script code and from C++ through the dispatcher.
#include <torch/library.h>

#include "pyckpt/pyckpt.h"

namespace {

c10::Dict<std::string, at::Tensor> load_state_dict_op(const std::string& path, const std::string& strip_prefix,
                                                      std::optional<c10::Device> device) {
  pyckpt::LoadOptions options;
  options.strip_prefix = strip_prefix;
  options.device = device;
  return pyckpt::load_state_dict(path, options);
}

std::vector<std::string> load_into_op(const std::string& path, c10::Dict<std::string, at::Tensor> targets,
                                      const std::string& strip_prefix) {
  pyckpt::LoadOptions options;
  options.strip_prefix = strip_prefix;
  return pyckpt::load_into(path, std::move(targets), options);
}

}  // namespace

TORCH_LIBRARY(pyckpt, m) {
  m.def("load_state_dict(str path, str strip_prefix=\"auto\", Device? device=None) -> Dict(str, Tensor)",
        &load_state_dict_op);
  m.def("load_into(str path, Dict(str, Tensor) targets, str strip_prefix=\"auto\") -> str[]", &load_into_op);
}
