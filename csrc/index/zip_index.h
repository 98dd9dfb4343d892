// The zip central-directory reader: the native twin of pyckpt/index/zip_index.py.
// Every offset and size is checked against the file; messages match the Python reader.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/byte_source.h"

namespace pyckpt {

constexpr uint16_t kMethodStored = 0;
constexpr uint16_t kMethodDeflate = 8;

struct ZipEntry {
  std::string name;  // raw bytes as stored in the central directory
  uint16_t method = 0;
  uint16_t flags = 0;
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;  // uncompressed
  uint64_t header_offset = 0;
  uint64_t data_offset = 0;  // first byte of the record's data
};

// All entries in central-directory order, data offsets resolved from the local headers
// (read on up to `threads` threads).
std::vector<ZipEntry> read_zip_entries(const ByteSource& source, int threads = 1);

}  // namespace pyckpt
