// The state dict inside a torch zip checkpoint, read from the unpickler's symbolic tree into
// plain specifications (storage keys, dtypes, offsets, sizes, strides): no tensor made, no
// tensor byte read. The C++ API's loader (state_dict_reader.cpp) turns them into tensors.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/byte_source.h"
#include "index/zip_index.h"

namespace pyckpt {

// A torch zip checkpoint's records by name, with its top folder (named after the file's
// stem when it was saved; never assumed to be "archive").
class ZipIndexView {
 public:
  ZipIndexView(const ByteSource& source, int threads);
  const ZipEntry& record(const std::string& name) const;  // "<top>/name", or CheckpointError
  const ZipEntry* find(const std::string& name) const;
  const ZipEntry& storage_entry(const std::string& key) const { return record("data/" + key); }

 private:
  std::vector<ZipEntry> entries_;
  std::unordered_map<std::string, size_t> by_name_;
  std::string top_;
};

struct StorageUse {
  std::string key;
  uint64_t nbytes;
};

struct TensorSpec {
  std::string storage;
  c10::ScalarType dtype;
  int64_t offset;
  std::vector<int64_t> size;
  std::vector<int64_t> stride;
  bool requires_grad;
};

struct StateDictSpec {
  std::vector<std::pair<std::string, TensorSpec>> tensors;  // in the file's key order
  std::vector<StorageUse> storages;
};

// The root state dict, or a training checkpoint's "state_dict", "model_state_dict", "model",
// "module", "net" or "network" entry, or its one entry that is a state dict.
StateDictSpec read_state_dict_spec(const ByteSource& source, const ZipIndexView& zip);

}  // namespace pyckpt
