#include "io/copy_ranges.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <system_error>

#include "core/byte_source.h"
#include "core/error.h"
#include "core/parallel.h"
#include "io/crc32.h"

namespace pyckpt {
namespace {

constexpr uint64_t kBufferBytes = uint64_t{4} << 20;

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

// Kernel-side copy; returns false if this kernel/filesystem pair cannot do it.
bool kernel_copy(int source_fd, int dest_fd, const CopyJob& job) {
  loff_t in = static_cast<loff_t>(job.source_offset);
  loff_t out = static_cast<loff_t>(job.dest_offset);
  uint64_t left = job.length;
  while (left) {
    const ssize_t copied = ::copy_file_range(source_fd, &in, dest_fd, &out,
                                             static_cast<size_t>(std::min<uint64_t>(left, 1 << 30)), 0);
    if (copied < 0) {
      if (errno == EINTR) continue;
      if (left == job.length && (errno == EXDEV || errno == ENOSYS || errno == EINVAL ||
                                 errno == EOPNOTSUPP || errno == EBADF)) {
        return false;
      }
      throw std::system_error(errno, std::generic_category(), "copy failed");
    }
    if (copied == 0) fail("file shrank while being read (at offset " + std::to_string(in) + ")");
    left -= static_cast<uint64_t>(copied);
  }
  return true;
}

uint32_t user_copy(int source_fd, int dest_fd, const CopyJob& job, std::vector<uint8_t>& buffer) {
  uint32_t crc = 0;
  for (uint64_t done = 0; done < job.length; done += buffer.size()) {
    const uint64_t length = std::min<uint64_t>(buffer.size(), job.length - done);
    pread_exact(source_fd, buffer.data(), length, job.source_offset + done);
    if (job.want_crc) crc = crc32_update(crc, buffer.data(), static_cast<size_t>(length));
    pwrite_all(dest_fd, buffer.data(), length, job.dest_offset + done);
  }
  return crc;
}

}  // namespace

std::vector<uint32_t> copy_ranges(int source_fd, int dest_fd, const std::vector<CopyJob>& jobs,
                                  int threads) {
  std::vector<uint32_t> crcs(jobs.size(), 0);
  std::atomic<bool> kernel_ok{true};
  parallel_for<std::vector<uint8_t>>(jobs.size(), threads, [&](size_t i, std::vector<uint8_t>& buffer) {
    const CopyJob& job = jobs[i];
    if (job.length == 0) return;
    const bool copied = !job.want_crc && kernel_ok.load() && kernel_copy(source_fd, dest_fd, job);
    if (!copied) {
      if (!job.want_crc) kernel_ok = false;  // this filesystem pair cannot: copy in user space
      if (buffer.empty()) buffer.resize(kBufferBytes);
      crcs[i] = user_copy(source_fd, dest_fd, job, buffer);
    }
    // Start writing these pages back now, so the caller's final fsync overlaps the copy
    // instead of following it. Advisory: an error here changes nothing.
    ::sync_file_range(dest_fd, static_cast<off64_t>(job.dest_offset), static_cast<off64_t>(job.length),
                      SYNC_FILE_RANGE_WRITE);
  });
  return crcs;
}

}  // namespace pyckpt
