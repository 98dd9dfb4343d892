// Copy byte ranges of a source into memory that already exists, on several threads.
// Called with the GIL released; touches no Python or torch state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/byte_source.h"
#include "core/error.h"

namespace pyckpt {

struct ReadJob {
  uint64_t offset;  // in the source
  uint64_t length;
  uint8_t* dest;
};

// One source's reads, for a checkpoint made of several files.
struct SourceReads {
  const ByteSource* source;
  std::vector<ReadJob> jobs;
};

// A read of the `source`-th of several sources failed: the error as the source gave it, and
// which file it came from, so the caller can name the file.
class SourceReadError : public CheckpointError {
 public:
  SourceReadError(const CheckpointError& error, size_t source) : CheckpointError(error), source_(source) {}
  size_t source() const { return source_; }

 private:
  size_t source_;
};

inline constexpr uint64_t kReadPieceBytes = uint64_t{16} << 20;

// Large jobs are split into `chunk_bytes` pieces so threads stay balanced. The first
// error stops the remaining work and is rethrown once every thread has finished.
void parallel_read(const ByteSource& source, const std::vector<ReadJob>& jobs, int threads,
                   uint64_t chunk_bytes = kReadPieceBytes);

// Every source's pieces in one pool, in order, each source's by file offset: the threads stay
// busy across the files' boundaries, so a checkpoint of N shards costs what one file of the same bytes does instead
// of N pools, each ending with idle threads. Errors are SourceReadErrors.
void parallel_read(const std::vector<SourceReads>& sources, int threads, uint64_t chunk_bytes = kReadPieceBytes);

}  // namespace pyckpt
