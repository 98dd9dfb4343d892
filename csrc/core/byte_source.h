// Random access to a checkpoint's bytes, bounds-checked against the size taken at open.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pyckpt {

class ByteSource {
 public:
  virtual ~ByteSource() = default;
  uint64_t size() const { return size_; }

  // Exactly `length` bytes at `offset`, or CheckpointError naming the overrun.
  std::vector<uint8_t> read(uint64_t offset, uint64_t length) const;
  void read_into(uint64_t offset, uint64_t length, uint8_t* dest) const;
  // Throws the same "truncated or lies about an offset" error as the Python Source.
  void check_range(uint64_t offset, uint64_t length, const char* what) const;

 protected:
  explicit ByteSource(uint64_t size) : size_(size) {}
  virtual void read_raw(uint64_t offset, uint64_t length, uint8_t* dest) const = 0;

 private:
  uint64_t size_;
};

// A file read with pread(2); the descriptor is borrowed, not owned.
class FdSource final : public ByteSource {
 public:
  FdSource(int fd, uint64_t size) : ByteSource(size), fd_(fd) {}

 private:
  void read_raw(uint64_t offset, uint64_t length, uint8_t* dest) const override;
  int fd_;
};

// Bytes already in memory (a BytesIO buffer); borrowed, not owned.
class MemorySource final : public ByteSource {
 public:
  MemorySource(const uint8_t* data, uint64_t size) : ByteSource(size), data_(data) {}

 private:
  void read_raw(uint64_t offset, uint64_t length, uint8_t* dest) const override;
  const uint8_t* data_;
};

// pread until `length` bytes arrive; a zero-byte read means the file shrank.
void pread_exact(int fd, uint8_t* dest, uint64_t length, uint64_t offset);
// pwrite until all `length` bytes are written; std::system_error (ENOSPC, EIO...) otherwise.
void pwrite_all(int fd, const uint8_t* data, uint64_t length, uint64_t offset);

}  // namespace pyckpt
