#include "io/copy_ranges.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

#include "core/byte_source.h"
#include "core/error.h"
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
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::atomic<bool> kernel_ok{true};
  std::exception_ptr first_error;
  std::mutex error_lock;
  auto work = [&] {
    std::vector<uint8_t> buffer;
    while (!failed.load(std::memory_order_relaxed)) {
      const size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= jobs.size()) return;
      try {
        const CopyJob& job = jobs[i];
        if (job.length == 0) continue;
        if (!job.want_crc && kernel_ok.load() && kernel_copy(source_fd, dest_fd, job)) continue;
        if (!job.want_crc) kernel_ok = false;
        if (buffer.empty()) buffer.resize(kBufferBytes);
        crcs[i] = user_copy(source_fd, dest_fd, job, buffer);
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!first_error) first_error = std::current_exception();
        failed = true;
      }
    }
  };
  const size_t count = std::min<size_t>(static_cast<size_t>(std::max(1, threads)), jobs.size());
  std::vector<std::thread> pool;
  for (size_t i = 1; i < count; ++i) pool.emplace_back(work);
  if (count > 0) work();
  for (std::thread& thread : pool) thread.join();
  if (first_error) std::rethrow_exception(first_error);
  return crcs;
}

}  // namespace pyckpt
