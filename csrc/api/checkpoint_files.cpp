#include "api/checkpoint_files.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_set>

#include "core/error.h"
#include "index/safetensors_index.h"
#include "index/shard_index.h"

namespace pyckpt {
namespace {

c10::ScalarType safetensors_dtype(const std::string& code) {
  static const std::unordered_map<std::string, c10::ScalarType> types = {
      {"F64", c10::kDouble}, {"F32", c10::kFloat}, {"F16", c10::kHalf}, {"BF16", c10::kBFloat16},
      {"I64", c10::kLong}, {"I32", c10::kInt}, {"I16", c10::kShort}, {"I8", c10::kChar}, {"U8", c10::kByte},
      {"BOOL", c10::kBool}, {"C64", c10::kComplexFloat}, {"U64", c10::kUInt64}, {"U32", c10::kUInt32},
      {"U16", c10::kUInt16}, {"F8_E4M3", c10::kFloat8_e4m3fn}, {"F8_E5M2", c10::kFloat8_e5m2},
      {"F8_E4M3FNUZ", c10::kFloat8_e4m3fnuz}, {"F8_E5M2FNUZ", c10::kFloat8_e5m2fnuz}};
  return types.at(code);  // the index refused every other code
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t step = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    strides[d] = step;
    step *= std::max<int64_t>(shape[d], 1);
  }
  return strides;
}

using Tensors = std::vector<std::pair<std::string, TensorSpec>>;

// A torch zip file's state dict; each storage must be a stored record of the size the pickle gives.
Tensors add_zip_file(CheckpointContents& contents, size_t file, int threads) {
  const ByteSource& source = contents.source(file);
  const ZipIndexView zip(source, threads);
  StateDictSpec spec = read_state_dict_spec(source, zip);
  const std::string prefix = std::to_string(file) + "/";
  for (const StorageUse& use : spec.storages) {
    if (contents.storages.count(prefix + use.key)) continue;
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
    contents.storages.emplace(prefix + use.key, StoragePlace{file, entry.data_offset, use.nbytes, 64});
  }
  for (auto& [key, tensor] : spec.tensors) tensor.storage = prefix + tensor.storage;
  return std::move(spec.tensors);
}

// A safetensors file: every tensor a contiguous storage of its own, in data order.
Tensors add_safetensors_file(CheckpointContents& contents, size_t file) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  fail("safetensors data is little-endian and this host is not: only the Python package swaps bytes");
#endif
  const SafetensorsIndex index = read_safetensors_index(contents.source(file));
  Tensors tensors;
  for (const SafetensorsTensor& entry : index.tensors) {
    const std::string storage = std::to_string(file) + "/" + entry.name;
    contents.storages.emplace(storage, StoragePlace{file, entry.data_offset, entry.nbytes, entry.itemsize});
    tensors.emplace_back(entry.name, TensorSpec{storage, safetensors_dtype(entry.dtype), 0, entry.shape,
                                                contiguous_strides(entry.shape), false});
  }
  return tensors;
}

Tensors add_file(CheckpointContents& contents, const std::string& path, int threads) {
  contents.files.push_back(std::make_unique<OpenFile>(path));
  const size_t file = contents.files.size() - 1;
  return looks_safetensors(contents.source(file)) ? add_safetensors_file(contents, file)
                                                  : add_zip_file(contents, file, threads);
}

}  // namespace

OpenFile::OpenFile(const std::string& path) : path_(path), fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
  if (fd_ < 0) fail("cannot open the file: " + std::string(std::strerror(errno)));
  const off_t size = ::lseek(fd_, 0, SEEK_END);
  if (size < 0) {
    const int error = errno;
    ::close(fd_);
    fail("cannot read the file's size: " + std::string(std::strerror(error)));
  }
  source_ = std::make_unique<FdSource>(fd_, static_cast<uint64_t>(size));
}

OpenFile::~OpenFile() { ::close(fd_); }

CheckpointContents open_checkpoint(const std::string& path, int threads) {
  CheckpointContents contents;
  const CheckpointLocation location = locate_checkpoint(path);
  if (!location.file.empty()) {
    contents.tensors = add_file(contents, location.file, threads);
    return contents;
  }
  const ShardIndex& index = location.sharded;
  std::unordered_map<std::string, TensorSpec> found;
  for (size_t shard = 0; shard < index.shards.size(); ++shard) {
    Tensors tensors;
    try {
      tensors = add_file(contents, index.shards[shard], threads);
      std::vector<std::string> keys;
      for (const auto& [key, tensor] : tensors) keys.push_back(key);
      index.check_shard(shard, keys);
    } catch (const CheckpointError& error) {  // name the shard, not only the index
      throw CheckpointError(error.kind(), "shard '" + index.names[shard] + "': " + error.message(),
                            error.record());
    }
    for (auto& [key, tensor] : tensors) found.emplace(key, std::move(tensor));
  }
  for (const auto& [key, shard] : index.weight_map) contents.tensors.emplace_back(key, found.at(key));
  return contents;
}

}  // namespace pyckpt
