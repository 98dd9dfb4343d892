// pyckpt's C++ API (include/pyckpt/pyckpt.h): the state-dict subset of torch.save's format,
// interpreted in C++ over the same restricted unpickler and zip index the Python package
// uses. The pickle's tree stays symbolic (index/pickle_vm.h); this file reads only what a
// state dict is made of: (Ordered)Dicts of rebuilt tensors and Parameters over persistent
// storages. Anything else under the state dict (quantized or sparse tensors, conj/neg bits,
// opaque objects, compressed records, big-endian files) is refused, never approximated.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <fcntl.h>
#include <map>
#include <memory>
#include <regex>
#include <thread>
#include <unistd.h>
#include <unordered_map>

#include "api/state_dict_tree.h"
#include "core/error.h"
#include "device/ring_loader.h"
#include "index/zip_index.h"
#include "io/mapped_file.h"
#include "io/parallel_read.h"
#include "pyckpt/pyckpt.h"

namespace pyckpt {
namespace {

class OpenFile {
 public:
  explicit OpenFile(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    if (fd_ < 0) fail("cannot open the file: " + std::string(std::strerror(errno)));
    const off_t size = ::lseek(fd_, 0, SEEK_END);
    if (size < 0) fail("cannot read the file's size: " + std::string(std::strerror(errno)));
    source_ = std::make_unique<FdSource>(fd_, static_cast<uint64_t>(size));
  }
  ~OpenFile() { ::close(fd_); }
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
  const ByteSource& source() const { return *source_; }

 private:
  int fd_;
  std::unique_ptr<FdSource> source_;
};

int reader_threads() { return static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 8u)); }

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
std::unordered_map<std::string, at::Storage> read_storages(const std::string& path, const ByteSource& source,
                                                           const ZipIndexView& zip,
                                                           const std::vector<StorageUse>& uses,
                                                           const LoadOptions& options) {
  const bool to_cuda = options.device && options.device->is_cuda();
  if (options.device && !to_cuda && !options.device->is_cpu()) {
    fail("device " + options.device->str() + " is not supported by the C++ API (cpu or cuda)");
  }
  std::unordered_map<std::string, at::Storage> storages;
  std::shared_ptr<MappedFile> mapping;
  std::vector<ReadJob> reads;
  std::vector<DevicePiece> pieces;
  for (const StorageUse& use : uses) {
    if (storages.count(use.key)) continue;
    const ZipEntry& entry = zip.storage_entry(use.key);
    if (entry.method != kMethodStored) {
      fail("storage '" + use.key + "' is a compressed record: only the Python package inflates them", entry.name);
    }
    if (entry.size != use.nbytes) {
      fail("storage '" + use.key + "' holds " + std::to_string(entry.size) + " bytes, the pickle says " +
               std::to_string(use.nbytes),
           entry.name);
    }
    source.check_range(entry.data_offset, entry.size, "storage record");
    at::Tensor bytes;
    if (to_cuda) {
      bytes = at::empty({static_cast<int64_t>(use.nbytes)}, at::TensorOptions().dtype(at::kByte).device(*options.device));
      if (use.nbytes) pieces.push_back({entry.data_offset, use.nbytes, bytes, 0});
    } else if (options.mmap && entry.data_offset % 64 == 0 && use.nbytes) {
      if (!mapping) mapping = MappedFile::open(path);
      uint8_t* start = mapping->data() + entry.data_offset;
      bytes = at::from_blob(start, {static_cast<int64_t>(use.nbytes)}, [mapping](void*) {},
                            at::TensorOptions().dtype(at::kByte));
    } else {
      bytes = at::empty({static_cast<int64_t>(use.nbytes)}, at::TensorOptions().dtype(at::kByte));
      if (use.nbytes) reads.push_back({entry.data_offset, use.nbytes, bytes.data_ptr<uint8_t>()});
    }
    storages.emplace(use.key, bytes.storage());
  }
  if (!reads.empty()) parallel_read(source, reads, reader_threads());
  if (!pieces.empty()) copy_through_ring(source, pieces, RingConfig{}, *options.device);
  return storages;
}

at::Tensor make_tensor(const TensorSpec& spec, const at::Storage& storage) {
  at::Tensor tensor = at::empty({0}, at::TensorOptions().dtype(spec.dtype).device(storage.device()));
  tensor.set_(storage, spec.offset, spec.size, spec.stride);
  if (spec.requires_grad) tensor.requires_grad_(true);
  return tensor;
}

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
    std::vector<std::pair<std::regex, std::string>> rules;
    for (const auto& [pattern, replacement] : options.rename) rules.emplace_back(std::regex(pattern), replacement);
    OpenFile file(path);
    const ZipIndexView zip(file.source(), reader_threads());
    const StateDictSpec spec = read_state_dict_spec(file.source(), zip);
    const auto storages = read_storages(path, file.source(), zip, spec.storages, options);
    c10::Dict<std::string, at::Tensor> out;
    for (const auto& [key, tensor] : spec.tensors) {
      const std::string name = renamed(key, options, rules);
      if (out.contains(name)) fail("keys '" + key + "' and another both become '" + name + "'");
      out.insert(name, make_tensor(tensor, storages.at(tensor.storage)));
    }
    return out;
  });
}

std::vector<std::string> load_into(const std::string& path, c10::Dict<std::string, at::Tensor> targets,
                                   const LoadOptions& options) {
  LoadOptions mapped = options;
  mapped.device.reset();
  mapped.mmap = true;  // read by the copies themselves, page by page: no host copy of the file
  const c10::Dict<std::string, at::Tensor> loaded = load_state_dict(path, mapped);
  std::unordered_map<std::string, std::string> by_canonical;
  for (const auto& item : loaded) by_canonical.emplace(strip_auto(item.key()), item.key());
  std::vector<std::string> missing;
  c10::AutoGradMode no_grad(false);  // filling parameters in place, as torch.no_grad() would
  for (const auto& item : targets) {
    auto found = loaded.find(item.key());
    if (found == loaded.end()) {
      auto canonical = by_canonical.find(strip_auto(item.key()));
      if (canonical != by_canonical.end()) found = loaded.find(canonical->second);
    }
    if (found == loaded.end()) {
      missing.push_back(item.key());
      continue;
    }
    at::Tensor target = item.value();
    TORCH_CHECK(target.sizes() == found->value().sizes(), "pyckpt: ", path, ": key '", item.key(),
                "' has shape ", found->value().sizes(), " in the checkpoint and ", target.sizes(), " in the target");
    target.copy_(found->value());
  }
  return missing;
}

}  // namespace pyckpt
