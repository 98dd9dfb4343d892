#include "index/storage_span.h"

#include <algorithm>

namespace pyckpt {

std::optional<StorageSpanBounds> find_storage_span(const std::vector<ZipEntry>& entries,
                                                   const std::vector<bool>& is_storage, uint64_t alignment,
                                                   uint64_t max_gap) {
  std::vector<const ZipEntry*> storages;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (is_storage[i]) storages.push_back(&entries[i]);
  }
  if (storages.empty() || alignment == 0) return std::nullopt;
  std::stable_sort(storages.begin(), storages.end(),
                   [](const ZipEntry* a, const ZipEntry* b) { return a->header_offset < b->header_offset; });
  for (const ZipEntry* entry : storages) {
    const bool stated_crc = entry->crc32 != 0 || entry->size == 0;
    if (entry->method != kMethodStored || entry->compressed_size != entry->size || !stated_crc ||
        entry->data_offset % alignment != 0) {
      return std::nullopt;
    }
  }
  for (size_t i = 0; i + 1 < storages.size(); ++i) {
    const uint64_t data_end = storages[i]->data_offset + storages[i]->size;
    const uint64_t next_header = storages[i + 1]->header_offset;
    if (next_header < data_end || next_header - data_end > max_gap) return std::nullopt;
  }
  const uint64_t start = storages.front()->header_offset;
  const uint64_t end = storages.back()->data_offset + storages.back()->size;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!is_storage[i] && start <= entries[i].header_offset && entries[i].header_offset < end) return std::nullopt;
  }
  return StorageSpanBounds{start, end, storages.size()};
}

}  // namespace pyckpt
