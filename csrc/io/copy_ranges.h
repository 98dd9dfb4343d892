// Copy byte ranges from one file to another without passing them through Python:
// copy_file_range(2) where the kernel can, pread/pwrite otherwise, on several threads.
#pragma once

#include <cstdint>
#include <vector>

namespace pyckpt {

struct CopyJob {
  uint64_t source_offset;
  uint64_t length;
  uint64_t dest_offset;
  bool want_crc;  // compute the CRC-32 of the bytes on the way (forces a user-space copy)
};

// Returns the CRC of each job (0 where not asked for). Throws std::system_error
// (ENOSPC, EFBIG, EIO...) on a failed write, CheckpointError if the source shrank.
std::vector<uint32_t> copy_ranges(int source_fd, int dest_fd, const std::vector<CopyJob>& jobs,
                                  int threads);

}  // namespace pyckpt
