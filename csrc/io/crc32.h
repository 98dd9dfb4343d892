// CRC-32 (the zip/IEEE polynomial), fast enough to check records at page-cache speed:
// slice-by-16 per thread, and crc32_combine to join pieces computed on several threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/byte_source.h"

namespace pyckpt {

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t length);
// CRC of A+B from crc(A), crc(B) and len(B).
uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b);

struct CrcRange {
  uint64_t offset;
  uint64_t length;
};

// The CRC of each range of `source`, read with pread on `threads` threads.
std::vector<uint32_t> parallel_crc32(const ByteSource& source, const std::vector<CrcRange>& ranges,
                                     int threads, uint64_t chunk_bytes = uint64_t{8} << 20);

}  // namespace pyckpt
