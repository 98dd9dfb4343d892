// The one worker pool of the native core: run work(i, scratch) for i in [0, count) on up to
// `threads` threads (the caller's thread is one of them). Each thread owns a default-made
// Scratch (a reusable buffer, say). The first exception stops the remaining items and is
// rethrown once every thread has finished, so no thread outlives the call.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pyckpt {

template <typename Scratch, typename Work>
void parallel_for(size_t count, int threads, Work&& work) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first_error;
  std::mutex error_lock;
  auto worker = [&] {
    Scratch scratch{};
    while (!failed.load(std::memory_order_relaxed)) {
      const size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= count) return;
      try {
        work(i, scratch);
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!first_error) first_error = std::current_exception();
        failed = true;
      }
    }
  };
  const size_t workers = std::min<size_t>(static_cast<size_t>(std::max(1, threads)), count);
  std::vector<std::thread> pool;
  pool.reserve(workers > 0 ? workers - 1 : 0);
  for (size_t i = 1; i < workers; ++i) pool.emplace_back(worker);
  if (workers > 0) worker();
  for (std::thread& thread : pool) thread.join();
  if (first_error) std::rethrow_exception(first_error);
}

struct NoScratch {};

}  // namespace pyckpt
