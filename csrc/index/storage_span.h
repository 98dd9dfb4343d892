// Where a torch zip's storage records sit, when they sit back to back and can be copied as
// one piece: the native twin of pyckpt.sinks.storage_span.find_storage_span, which says why.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "index/zip_index.h"

namespace pyckpt {

struct StorageSpanBounds {
  uint64_t start;  // the first storage record's local header
  uint64_t end;    // just past the last storage record's data
  uint64_t count;  // storage records in it
};

// `is_storage[i]` says whether entries[i] is a storage record (`top/data/...`). None unless
// every storage is stored uncompressed with a stated CRC, its data `alignment`-aligned, the
// records at most `max_gap` bytes apart, and no other record between them.
std::optional<StorageSpanBounds> find_storage_span(const std::vector<ZipEntry>& entries,
                                                   const std::vector<bool>& is_storage, uint64_t alignment,
                                                   uint64_t max_gap);

}  // namespace pyckpt
