#include "io/parallel_read.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>

namespace pyckpt {

void parallel_read(const ByteSource& source, const std::vector<ReadJob>& jobs, int threads,
                   uint64_t chunk_bytes) {
  std::vector<ReadJob> pieces;
  for (const ReadJob& job : jobs) {
    source.check_range(job.offset, job.length, "read");
    for (uint64_t done = 0; done < job.length; done += chunk_bytes) {
      const uint64_t length = std::min(chunk_bytes, job.length - done);
      pieces.push_back({job.offset + done, length, job.dest + done});
    }
  }
  if (pieces.empty()) return;
  const size_t workers = static_cast<size_t>(std::max(1, threads));
  const size_t count = std::min(workers, pieces.size());

  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first_error;
  std::mutex error_lock;
  auto work = [&] {
    while (!failed.load(std::memory_order_relaxed)) {
      const size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= pieces.size()) return;
      try {
        source.read_into(pieces[i].offset, pieces[i].length, pieces[i].dest);
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!first_error) first_error = std::current_exception();
        failed = true;
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(count - 1);
  for (size_t i = 1; i < count; ++i) pool.emplace_back(work);
  work();
  for (std::thread& thread : pool) thread.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace pyckpt
