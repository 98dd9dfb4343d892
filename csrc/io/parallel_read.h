// Copy byte ranges of a source into memory that already exists, on several threads.
// Called with the GIL released; touches no Python or torch state.
#pragma once

#include <cstdint>
#include <vector>

#include "core/byte_source.h"

namespace pyckpt {

struct ReadJob {
  uint64_t offset;  // in the source
  uint64_t length;
  uint8_t* dest;
};

// Large jobs are split into `chunk_bytes` pieces so threads stay balanced. The first
// error stops the remaining work and is rethrown once every thread has finished.
void parallel_read(const ByteSource& source, const std::vector<ReadJob>& jobs, int threads,
                   uint64_t chunk_bytes = uint64_t{16} << 20);

}  // namespace pyckpt
