// pyckpt's C++ API: a checkpoint's state dict, read without Python and without running
// pickle, its wrapper prefixes ("module.", "_orig_mod.", FSDP segments) stripped. `path` is a
// torch.save file, a safetensors file, or a Hugging Face model directory / shard index
// (model.safetensors.index.json, pytorch_model.bin.index.json) with shards of either kind.
//
//   #include <pyckpt/pyckpt.h>
//   pyckpt::LoadOptions options;
//   options.device = at::Device("cuda:0");
//   c10::Dict<std::string, at::Tensor> weights = pyckpt::load_state_dict("dp.pt", options);
//
// Link against pyckpt.library_path() (CMake: find_package(pyckpt), target pyckpt::pyckpt).
// Every failure (a damaged or hostile file, one that needs what only the Python layer reads)
// throws c10::Error naming the file and the reason; nothing in the file is ever run.
#pragma once

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace pyckpt {

struct LoadOptions {
  // "auto": strip leading "module." / "_orig_mod." and every "_fsdp_wrapped_module." or
  // "_checkpoint_wrapped_module." segment; "" keeps keys as they are; anything else is one
  // prefix to remove where present.
  std::string strip_prefix = "auto";
  // (ECMAScript regex, replacement) pairs applied with std::regex_replace after strip_prefix.
  std::vector<std::pair<std::string, std::string>> rename;
  // Where the tensors go (default: host memory). CUDA devices are filled through the
  // pinned ring the Python package uses.
  std::optional<c10::Device> device;
  // Host tensors over a private (copy-on-write) mapping of the file instead of memory of
  // their own, like torch.load(mmap=True); ignored for other devices.
  bool mmap = false;
};

// The checkpoint's state dict (the root, or a training checkpoint's "state_dict", "model"...
// entry), in the file's key order (a safetensors file's data order; a shard index's order),
// tensors sharing storage as they were saved. A Parameter
// comes back as a tensor (C++ has no Parameter type) with its requires_grad.
c10::Dict<std::string, at::Tensor> load_state_dict(const std::string& path, const LoadOptions& options = {});

// Copies each checkpoint tensor into the target of the same (or the same wrapper-free) key,
// casting as Tensor::copy_ does; a shape mismatch throws. Targets that are one memory (tied
// weights) end as copies in the dict's order leave them: the last one's bytes. Returns the
// target keys the checkpoint did not have. `options.device` and `options.mmap` are not used.
std::vector<std::string> load_into(const std::string& path, c10::Dict<std::string, at::Tensor> targets,
                                   const LoadOptions& options = {});

}  // namespace pyckpt
