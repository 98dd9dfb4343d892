// A checkpoint as the C++ API reads it, whatever its layout: a torch zip file, a safetensors
// file, or a Hugging Face directory / index of shards of either kind. Every file is opened and
// indexed, and the state dict comes out as plain specifications in key order, each tensor
// over a storage that is one checked byte range of one file. Nothing is read beyond indexes.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "api/state_dict_tree.h"
#include "core/byte_source.h"

namespace pyckpt {

class OpenFile {
 public:
  explicit OpenFile(const std::string& path);
  ~OpenFile();
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
  const ByteSource& source() const { return *source_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_;
  std::unique_ptr<FdSource> source_;
};

// Where a storage's bytes lie: checked against the file, stored as they are (never compressed).
struct StoragePlace {
  size_t file;
  uint64_t offset;
  uint64_t nbytes;
  uint64_t view_alignment;  // a tensor may view the file's mapping only where offset % this == 0
};

struct CheckpointContents {
  std::vector<std::unique_ptr<OpenFile>> files;
  std::vector<std::pair<std::string, TensorSpec>> tensors;  // the state dict, in key order
  std::unordered_map<std::string, StoragePlace> storages;   // by TensorSpec::storage

  const ByteSource& source(size_t file) const { return files.at(file)->source(); }
};

CheckpointContents open_checkpoint(const std::string& path, int threads);

}  // namespace pyckpt
