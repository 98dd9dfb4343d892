#include "core/byte_source.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "core/error.h"

namespace pyckpt {

void ByteSource::check_range(uint64_t offset, uint64_t length, const char* what) const {
  if (offset > size_ || length > size_ - offset) {
    fail("file is truncated or lies about an offset: " + std::string(what) + " of " +
         std::to_string(length) + " bytes at offset " + std::to_string(offset) +
         " passes the end of the file (" + std::to_string(size_) + " bytes)");
  }
}

std::vector<uint8_t> ByteSource::read(uint64_t offset, uint64_t length) const {
  check_range(offset, length, "read");
  std::vector<uint8_t> out(length);
  if (length) read_raw(offset, length, out.data());
  return out;
}

void ByteSource::read_into(uint64_t offset, uint64_t length, uint8_t* dest) const {
  check_range(offset, length, "read");
  if (length) read_raw(offset, length, dest);
}

void FdSource::read_raw(uint64_t offset, uint64_t length, uint8_t* dest) const {
  pread_exact(fd_, dest, length, offset);
}

void MemorySource::read_raw(uint64_t offset, uint64_t length, uint8_t* dest) const {
  std::memcpy(dest, data_ + offset, length);
}

void pread_exact(int fd, uint8_t* dest, uint64_t length, uint64_t offset) {
  constexpr uint64_t kMaxChunk = uint64_t{1} << 30;
  while (length) {
    const size_t want = static_cast<size_t>(length < kMaxChunk ? length : kMaxChunk);
    const ssize_t got = ::pread(fd, dest, want, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      fail("read failed at offset " + std::to_string(offset) + ": " + std::strerror(errno));
    }
    if (got == 0) fail("file shrank while being read (at offset " + std::to_string(offset) + ")");
    dest += got;
    offset += static_cast<uint64_t>(got);
    length -= static_cast<uint64_t>(got);
  }
}

void pwrite_all(int fd, const uint8_t* data, uint64_t length, uint64_t offset) {
  while (length) {
    const ssize_t wrote = ::pwrite(fd, data, static_cast<size_t>(std::min<uint64_t>(length, 1 << 30)),
                                   static_cast<off_t>(offset));
    if (wrote < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::generic_category(), "write failed");
    }
    data += wrote;
    offset += static_cast<uint64_t>(wrote);
    length -= static_cast<uint64_t>(wrote);
  }
}

}  // namespace pyckpt
