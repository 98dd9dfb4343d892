// pyckpt's C++ API (include/pyckpt/pyckpt.h): a state dict from a torch zip file, a
// safetensors file or a Hugging Face directory of shards (api/checkpoint_files.h finds and
// indexes them), renamed, then read into host or device memory. Torch files go through the
// same restricted unpickler and zip index the Python package uses, and only what a state dict
// is made of is accepted: (Ordered)Dicts of rebuilt tensors and Parameters over persistent
// storages. Anything else under the state dict (quantized or sparse tensors, conj/neg bits,
// opaque objects, compressed records, big-endian files) is refused, never approximated.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <regex>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "api/checkpoint_files.h"
#include "core/error.h"
#include "device/ring_loader.h"
#include "index/zip_index.h"
#include "io/mapped_file.h"
#include "io/parallel_read.h"
#include "pyckpt/pyckpt.h"

namespace pyckpt {
namespace {

int reader_threads() { return static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 8u)); }

// Every file's reads as one pool (see parallel_read), so a directory of shards reads as one
// file of the same bytes does; an error names the shard it came from.
void read_files(const CheckpointContents& contents, std::vector<std::vector<ReadJob>> reads) {
  std::vector<SourceReads> sources;
  std::vector<size_t> file_of;
  for (size_t file = 0; file < contents.files.size(); ++file) {
    if (reads[file].empty()) continue;
    sources.push_back({&contents.source(file), std::move(reads[file])});
    file_of.push_back(file);
  }
  try {
    parallel_read(sources, reader_threads());
  } catch (const SourceReadError& error) {
    if (contents.files.size() == 1) throw;  // with_path names the file
    throw CheckpointError(error.kind(), "shard '" + contents.files[file_of[error.source()]]->path() + "': " +
                          error.message(), error.record());
  }
}

std::string without_prefix(std::string key, const std::string& prefix) {
  return key.compare(0, prefix.size(), prefix) == 0 ? key.substr(prefix.size()) : key;
}

std::string strip_auto(std::string key) {
  for (bool again = true; again;) {
    again = false;
    for (const char* wrapper : {"module.", "_orig_mod."}) {
      if (key.rfind(wrapper, 0) == 0) {
        key = key.substr(std::strlen(wrapper));
        again = true;
      }
    }
  }
  if (key.find("_fsdp_wrapped_module") == std::string::npos &&
      key.find("_checkpoint_wrapped_module") == std::string::npos) {
    return key;
  }
  std::string out;
  size_t start = 0;
  while (start <= key.size()) {
    const size_t dot = std::min(key.find('.', start), key.size());
    const std::string part = key.substr(start, dot - start);
    if (part != "_fsdp_wrapped_module" && part != "_checkpoint_wrapped_module") {
      out += (out.empty() ? "" : ".") + part;
    }
    start = dot + 1;
  }
  return out;
}

std::string renamed(const std::string& key, const LoadOptions& options,
                    const std::vector<std::pair<std::regex, std::string>>& rules) {
  std::string out = options.strip_prefix == "auto" ? strip_auto(key)
                    : options.strip_prefix.empty() ? key
                                                   : without_prefix(key, options.strip_prefix);
  for (const auto& [pattern, replacement] : rules) out = std::regex_replace(out, pattern, replacement);
  return out;
}

// Each storage the state dict uses, as host or device memory (shared by every tensor over it).
std::unordered_map<std::string, at::Storage> read_storages(const CheckpointContents& contents,
                                                           const std::vector<std::string>& used,
                                                           const LoadOptions& options) {
  const bool to_cuda = options.device && options.device->is_cuda();
  if (options.device && !to_cuda && !options.device->is_cpu()) {
    fail("device " + options.device->str() + " is not supported by the C++ API (cpu or cuda)");
  }
  std::unordered_map<std::string, at::Storage> storages;
  std::vector<std::shared_ptr<MappedFile>> mappings(contents.files.size());
  std::vector<std::vector<ReadJob>> reads(contents.files.size());
  std::vector<std::vector<DevicePiece>> pieces(contents.files.size());
  for (const std::string& key : used) {
    if (storages.count(key)) continue;
    const StoragePlace& place = contents.storages.at(key);
    const auto nbytes = static_cast<int64_t>(place.nbytes);
    at::Tensor bytes;
    if (to_cuda) {
      bytes = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(*options.device));
      if (nbytes) pieces[place.file].push_back({place.offset, place.nbytes, bytes, 0});
    } else if (options.mmap && place.offset % place.view_alignment == 0 && nbytes) {
      auto& mapping = mappings[place.file];
      if (!mapping) mapping = MappedFile::open(contents.files[place.file]->path());
      bytes = at::from_blob(mapping->data() + place.offset, {nbytes}, [mapping](void*) {},
                            at::TensorOptions().dtype(at::kByte));
    } else {
      bytes = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
      if (nbytes) reads[place.file].push_back({place.offset, place.nbytes, bytes.data_ptr<uint8_t>()});
    }
    storages.emplace(key, bytes.storage());
  }
  read_files(contents, std::move(reads));
  for (size_t file = 0; file < contents.files.size(); ++file) {
    if (!pieces[file].empty()) copy_through_ring(contents.source(file), pieces[file], RingConfig{}, *options.device);
  }
  return storages;
}

at::Tensor make_tensor(const TensorSpec& spec, const at::Storage& storage) {
  at::Tensor tensor = at::empty({0}, at::TensorOptions().dtype(spec.dtype).device(storage.device()));
  tensor.set_(storage, spec.offset, spec.size, spec.stride);
  if (spec.requires_grad) tensor.requires_grad_(true);
  return tensor;
}

bool is_row_major(const TensorSpec& tensor) {
  int64_t expected = 1;
  for (size_t d = tensor.size.size(); d-- > 0;) {
    if (tensor.size[d] != 1 && tensor.stride[d] != expected) return false;
    expected *= tensor.size[d];
  }
  return true;
}

// A checkpoint opened and indexed, with its state dict's keys as the options rename them.
struct OpenCheckpoint {
  OpenCheckpoint(const std::string& path, const LoadOptions& options)
      : rules(compiled(options)), contents(open_checkpoint(path, reader_threads())) {
    std::unordered_map<std::string, const std::string*> origin;  // renamed key -> the key it came from
    for (const auto& [key, tensor] : contents.tensors) {
      names.push_back(renamed(key, options, rules));
      const auto [first, fresh] = origin.emplace(names.back(), &key);
      if (!fresh) fail("keys '" + *first->second + "' and '" + key + "' both become '" + names.back() + "'");
    }
  }

  // Compiled first: a bad pattern is reported before the file is opened.
  static std::vector<std::pair<std::regex, std::string>> compiled(const LoadOptions& options) {
    std::vector<std::pair<std::regex, std::string>> out;
    for (const auto& [pattern, replacement] : options.rename) out.emplace_back(std::regex(pattern), replacement);
    return out;
  }

  std::vector<std::pair<std::regex, std::string>> rules;
  CheckpointContents contents;
  std::vector<std::string> names;  // contents.tensors' keys, renamed
};

template <typename Body>
auto with_path(const std::string& path, Body body) -> decltype(body()) {
  try {
    return body();
  } catch (const CheckpointError& error) {
    const std::string record = error.record().empty() ? "" : "record '" + error.record() + "': ";
    TORCH_CHECK(false, "pyckpt: ", path, ": ", record, error.message());
  } catch (const std::regex_error& error) {
    TORCH_CHECK(false, "pyckpt: a rename pattern is not a valid regular expression: ", error.what());
  } catch (const std::system_error& error) {
    TORCH_CHECK(false, "pyckpt: ", path, ": ", error.what());
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& error) {  // a structure the checks above let through: still an error
    TORCH_CHECK(false, "pyckpt: ", path, ": malformed checkpoint (", error.what(), ")");
  }
}

}  // namespace

c10::Dict<std::string, at::Tensor> load_state_dict(const std::string& path, const LoadOptions& options) {
  return with_path(path, [&] {
    const OpenCheckpoint checkpoint(path, options);
    const auto& tensors = checkpoint.contents.tensors;
    std::vector<std::string> used;
    for (const auto& [key, tensor] : tensors) used.push_back(tensor.storage);
    const auto storages = read_storages(checkpoint.contents, used, options);
    c10::Dict<std::string, at::Tensor> out;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TensorSpec& tensor = tensors[i].second;
      out.insert(checkpoint.names[i], make_tensor(tensor, storages.at(tensor.storage)));
    }
    return out;
  });
}

std::vector<std::string> load_into(const std::string& path, c10::Dict<std::string, at::Tensor> targets,
                                   const LoadOptions& options) {
  return with_path(path, [&] {
    const OpenCheckpoint checkpoint(path, options);
    const CheckpointContents& contents = checkpoint.contents;
    std::unordered_map<std::string, size_t> by_name;
    std::unordered_map<std::string, size_t> by_canonical;
    for (size_t i = 0; i < contents.tensors.size(); ++i) {
      by_name.emplace(checkpoint.names[i], i);
      by_canonical.emplace(strip_auto(checkpoint.names[i]), i);
    }

    // Targets whose bytes lie as they are in the file are read straight into (CPU: parallel
    // reads; CUDA: the pinned ring); the others are copied, casting, from a mapping.
    std::vector<std::vector<ReadJob>> reads(contents.files.size());
    std::vector<std::unordered_map<c10::Device, std::vector<DevicePiece>>> pieces(contents.files.size());
    std::vector<std::pair<at::Tensor, size_t>> copies;
    std::vector<std::string> missing;
    // Each target with its checkpoint tensor, in the dict's order; the keys the checkpoint lacks.
    std::vector<std::tuple<std::string, at::Tensor, size_t>> found;
    for (const auto& item : targets) {
      auto exact = by_name.find(item.key());
      auto canonical = by_canonical.find(strip_auto(item.key()));
      if (exact == by_name.end() && canonical == by_canonical.end()) {
        missing.push_back(item.key());
      } else {
        found.emplace_back(item.key(), item.value(), exact != by_name.end() ? exact->second : canonical->second);
      }
    }
    // Targets that are one memory (tied weights) take only the last one's bytes, as copies in
    // the dict's order would leave them; reading them all at once would race.
    using Memory = std::tuple<int, int, const void*, int64_t>;
    auto memory_of = [](const at::Tensor& t) -> Memory {
      return {static_cast<int>(t.device().type()), t.device().index(), t.data_ptr(), static_cast<int64_t>(t.nbytes())};
    };
    std::map<Memory, std::string> last_of_memory;
    for (const auto& [key, target, index] : found) {
      if (target.numel() > 0) last_of_memory[memory_of(target)] = key;
    }
    for (const auto& [key, target, index] : found) {
      const TensorSpec& tensor = contents.tensors[index].second;
      TORCH_CHECK(target.sizes().vec() == tensor.size, "pyckpt: ", path, ": key '", key, "' has shape ",
                  at::IntArrayRef(tensor.size), " in the checkpoint and ", target.sizes(), " in the target");
      if (target.numel() > 0 && last_of_memory.at(memory_of(target)) != key) continue;
      const StoragePlace& place = contents.storages.at(tensor.storage);
      const uint64_t width = c10::elementSize(tensor.dtype);
      const uint64_t nbytes = static_cast<uint64_t>(target.numel()) * width;
      const bool raw = target.scalar_type() == tensor.dtype && target.layout() == at::kStrided &&
                       target.is_contiguous() && !target.is_conj() && !target.is_neg() && is_row_major(tensor) &&
                       (target.is_cpu() || target.is_cuda());
      if (!raw || nbytes == 0) {
        copies.emplace_back(target, index);
        continue;
      }
      const uint64_t offset = place.offset + static_cast<uint64_t>(tensor.offset) * width;
      contents.source(place.file).check_range(offset, nbytes, "tensor");
      if (target.is_cpu()) {
        reads[place.file].push_back({offset, nbytes, static_cast<uint8_t*>(target.data_ptr())});
      } else {
        pieces[place.file][target.device()].push_back(
            {offset, nbytes, target.detach().view({-1}).view(at::kByte), 0});
      }
    }
    read_files(contents, std::move(reads));
    for (size_t file = 0; file < contents.files.size(); ++file) {
      for (const auto& [device, device_pieces] : pieces[file]) {
        copy_through_ring(contents.source(file), device_pieces, RingConfig{}, device);
      }
    }
    if (!copies.empty()) {
      std::vector<std::string> used;
      for (const auto& [target, index] : copies) used.push_back(contents.tensors[index].second.storage);
      LoadOptions mapped;
      mapped.mmap = true;  // read by the copies themselves, page by page: no host copy of the file
      const auto storages = read_storages(contents, used, mapped);
      c10::AutoGradMode no_grad(false);  // filling parameters in place, as torch.no_grad() would
      for (auto& [target, index] : copies) {
        const TensorSpec& tensor = contents.tensors[index].second;
        target.copy_(make_tensor(tensor, storages.at(tensor.storage)));
      }
    }
    return missing;
  });
}

}  // namespace pyckpt
