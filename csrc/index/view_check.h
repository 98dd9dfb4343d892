// Whether a tensor view fits its storage: plan.check_view's arithmetic (the Python stage
// raises the error with the key; native fast paths only ask, and leave misfits to it).
#pragma once

#include <cstdint>
#include <vector>

namespace pyckpt {

inline bool view_fits(int64_t offset, const std::vector<int64_t>& size, const std::vector<int64_t>& stride,
                      int64_t itemsize, uint64_t storage_bytes) {
  if (itemsize <= 0 || offset < 0) return false;
  unsigned __int128 numel = 1, extent = 0;
  const unsigned __int128 limit = static_cast<unsigned __int128>(INT64_MAX);
  for (size_t i = 0; i < size.size(); ++i) {
    if (size[i] < 0 || stride[i] < 0) return false;
    numel *= static_cast<unsigned __int128>(size[i]);
    if (numel > limit) return false;
    if (size[i] != 0) extent += static_cast<unsigned __int128>(size[i] - 1) * static_cast<unsigned __int128>(stride[i]);
    if (extent > limit) return false;
  }
  if (static_cast<unsigned __int128>(offset) + extent > limit) return false;
  if (numel == 0) return true;
  return (static_cast<unsigned __int128>(offset) + extent + 1) * static_cast<unsigned __int128>(itemsize) <=
         storage_bytes;
}

}  // namespace pyckpt
