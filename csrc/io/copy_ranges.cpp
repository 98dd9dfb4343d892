#include "io/copy_ranges.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "core/byte_source.h"
#include "core/error.h"
#include "core/parallel.h"
#include "io/crc32.h"

namespace pyckpt {
namespace {

constexpr uint64_t kBufferBytes = uint64_t{4} << 20;

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

// Small records (a state dict of 50,000 16 KiB tensors, say) are not copied one by one:
// a copy_file_range and a writeback per record cost far more than the record. Runs of them
// that sit next to each other in the output are gathered in memory (one read of the source
// span when they sit next to each other there too) and written with one write.
constexpr uint64_t kSmallJob = uint64_t{1} << 20;
constexpr uint64_t kBatchBytes = uint64_t{32} << 20;
constexpr uint64_t kMaxGap = uint64_t{64} << 10;

struct Batch {
  std::vector<size_t> jobs;  // indices, in output order
  uint64_t dest_begin = 0, dest_end = 0;
};

std::vector<Batch> plan_batches(const std::vector<CopyJob>& jobs) {
  std::vector<size_t> order(jobs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return jobs[a].dest_offset < jobs[b].dest_offset; });
  std::vector<Batch> batches;
  for (size_t i : order) {
    const CopyJob& job = jobs[i];
    if (job.length == 0) continue;
    Batch* last = batches.empty() ? nullptr : &batches.back();
    const bool joins = job.length < kSmallJob && last != nullptr && jobs[last->jobs.back()].length < kSmallJob &&
                       job.dest_offset >= last->dest_end && job.dest_offset - last->dest_end <= kMaxGap &&
                       job.dest_offset + job.length - last->dest_begin <= kBatchBytes;
    if (joins) {
      last->jobs.push_back(i);
      last->dest_end = job.dest_offset + job.length;
    } else {
      batches.push_back({{i}, job.dest_offset, job.dest_offset + job.length});
    }
  }
  return batches;
}

// A run of small jobs: gathered into one buffer, CRCs computed there, written at once. The
// gaps between them (local headers, which the caller writes afterwards) hold whatever the
// reused buffer held: the output is a temporary file until it is complete.
void gather_copy(int source_fd, int dest_fd, const std::vector<CopyJob>& jobs, const Batch& batch,
                 std::vector<uint8_t>& buffer, std::vector<uint8_t>& source, std::vector<uint32_t>& crcs) {
  const uint64_t span = batch.dest_end - batch.dest_begin;
  if (buffer.size() < span) buffer.resize(span);
  const uint64_t source_begin = jobs[batch.jobs.front()].source_offset;
  uint64_t source_end = source_begin;
  bool source_run = true;  // in the same order, with small gaps: one read covers them all
  for (size_t i : batch.jobs) {
    const CopyJob& job = jobs[i];
    if (job.source_offset < source_end || job.source_offset - source_end > kMaxGap) {
      source_run = source_run && job.source_offset == source_begin && source_end == source_begin;
    }
    source_end = std::max(source_end, job.source_offset + job.length);
  }
  if (source_run && source_end - source_begin <= 2 * kBatchBytes) {
    source.resize(source_end - source_begin);
    pread_exact(source_fd, source.data(), source.size(), source_begin);
    for (size_t i : batch.jobs) {
      const CopyJob& job = jobs[i];
      std::memcpy(buffer.data() + (job.dest_offset - batch.dest_begin),
                  source.data() + (job.source_offset - source_begin), job.length);
    }
  } else {
    for (size_t i : batch.jobs) {
      const CopyJob& job = jobs[i];
      pread_exact(source_fd, buffer.data() + (job.dest_offset - batch.dest_begin), job.length, job.source_offset);
    }
  }
  for (size_t i : batch.jobs) {
    const CopyJob& job = jobs[i];
    if (job.want_crc) {
      crcs[i] = crc32_update(0, buffer.data() + (job.dest_offset - batch.dest_begin), static_cast<size_t>(job.length));
    }
  }
  pwrite_all(dest_fd, buffer.data(), span, batch.dest_begin);
}

struct Scratch {
  std::vector<uint8_t> buffer, source;
};

}  // namespace

std::vector<uint32_t> copy_ranges(int source_fd, int dest_fd, const std::vector<CopyJob>& jobs,
                                  int threads) {
  std::vector<uint32_t> crcs(jobs.size(), 0);
  std::atomic<bool> kernel_ok{true};
  const std::vector<Batch> batches = plan_batches(jobs);
  parallel_for<Scratch>(batches.size(), threads, [&](size_t b, Scratch& scratch) {
    const Batch& batch = batches[b];
    const size_t first = batch.jobs.front();
    if (batch.jobs.size() > 1 || jobs[first].length < kSmallJob) {
      gather_copy(source_fd, dest_fd, jobs, batch, scratch.buffer, scratch.source, crcs);
    } else {
      const CopyJob& job = jobs[first];
      const bool copied = !job.want_crc && kernel_ok.load() && kernel_copy(source_fd, dest_fd, job);
      if (!copied) {
        if (!job.want_crc) kernel_ok = false;  // this filesystem pair cannot: copy in user space
        if (scratch.buffer.size() < kBufferBytes) scratch.buffer.resize(kBufferBytes);
        crcs[first] = user_copy(source_fd, dest_fd, job, scratch.buffer);
      }
    }
    // Start writing these pages back now, so the caller's final fsync overlaps the copy
    // instead of following it. Advisory: an error here changes nothing.
    ::sync_file_range(dest_fd, static_cast<off64_t>(batch.dest_begin),
                      static_cast<off64_t>(batch.dest_end - batch.dest_begin), SYNC_FILE_RANGE_WRITE);
  });
  return crcs;
}

}  // namespace pyckpt
