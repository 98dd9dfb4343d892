// A C++ program using pyckpt's C++ API with no Python in the process (tests/test_cpp_api.py
// compiles and runs it).
//
//   load_checkpoint load PATH [DEVICE [mmap]]
//                                       one line per tensor: key, dtype, sizes, strides, the
//                                       index of the first tensor sharing its storage, checksum;
//                                       PATH is a file, a model directory or a shard index
//   load_checkpoint into PATH           fills zeroed tensors of the checkpoint's shapes through
//                                       load_into; prints their checksums, then the keys missing
//   load_checkpoint attack PATH...      loads each file; "error" with the message, or "ok"
#include <ATen/ATen.h>
#include <pyckpt/pyckpt.h>

#include <iostream>
#include <map>
#include <string>

namespace {

// The same checksum tests/test_cpp_api.py computes with torch: each byte weighted by its
// position modulo 251, summed in int64.
int64_t checksum(const at::Tensor& tensor) {
  const at::Tensor bytes = tensor.detach().contiguous().cpu().view({-1}).view(at::kByte).to(at::kLong);
  const at::Tensor weights = at::arange(bytes.numel(), at::kLong).remainder(251).add(1);
  return bytes.mul(weights).sum().item<int64_t>();
}

std::string join(at::IntArrayRef values) {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + std::to_string(values[i]);
  return out;
}

void print_tensors(const c10::Dict<std::string, at::Tensor>& tensors) {
  std::map<const void*, size_t> first_user;
  size_t index = 0;
  for (const auto& item : tensors) {
    const at::Tensor& t = item.value();
    const void* storage = t.storage().data();
    const size_t sharer = t.storage().nbytes() ? first_user.emplace(storage, index).first->second : index;
    std::cout << item.key() << '\t' << c10::toString(t.scalar_type()) << '\t' << join(t.sizes()) << '\t' << join(t.strides())
              << '\t' << t.storage_offset() << '\t' << sharer << '\t' << t.device().str() << '\t' << checksum(t)
              << '\n';
    ++index;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: load_checkpoint load|into|attack PATH...\n";
    return 2;
  }
  const std::string mode = argv[1];
  try {
    if (mode == "load") {
      pyckpt::LoadOptions options;
      if (argc > 3) options.device = c10::Device(argv[3]);
      options.mmap = argc > 4 && std::string(argv[4]) == "mmap";
      print_tensors(pyckpt::load_state_dict(argv[2], options));
    } else if (mode == "into") {
      c10::Dict<std::string, at::Tensor> targets;
      for (const auto& item : pyckpt::load_state_dict(argv[2])) targets.insert(item.key(), at::zeros_like(item.value()));
      targets.insert("not.in.the.checkpoint", at::zeros({2}));
      const std::vector<std::string> missing = pyckpt::load_into(argv[2], targets);
      print_tensors(targets);
      for (const std::string& key : missing) std::cout << "missing\t" << key << '\n';
    } else if (mode == "attack") {
      for (int i = 2; i < argc; ++i) {
        try {
          pyckpt::load_state_dict(argv[i]);
          std::cout << argv[i] << "\tok\n";
        } catch (const c10::Error& error) {
          std::string message = error.what_without_backtrace();
          std::cout << argv[i] << "\terror\t" << message.substr(0, message.find('\n')) << '\n';
        }
      }
    } else {
      std::cerr << "unknown mode " << mode << '\n';
      return 2;
    }
  } catch (const c10::Error& error) {
    std::cerr << error.what_without_backtrace() << '\n';
    return 1;
  }
  return 0;
}
