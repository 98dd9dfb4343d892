// A whole file mapped copy-on-write (MAP_PRIVATE): tensors over it are writable without
// ever modifying the file, like torch.load(mmap=True). `shared` maps it MAP_SHARED instead,
// so writes reach the file: only when the user asked torch for that
// (torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace pyckpt {

class MappedFile {
 public:
  static std::shared_ptr<MappedFile> open(const std::string& path, bool shared = false);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  MappedFile(uint8_t* data, uint64_t size) : data_(data), size_(size) {}
  uint8_t* data_;
  uint64_t size_;
};

}  // namespace pyckpt
