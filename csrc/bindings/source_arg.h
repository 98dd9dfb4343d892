// A checkpoint's bytes as Python hands them to the core: an open file descriptor (with the
// size taken when it was opened) or a buffer already in memory. One argument instead of an
// fd/buffer pair of every function.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>

#include "bindings/buffer_view.h"
#include "core/byte_source.h"

namespace pyckpt::bindings {

class __attribute__((visibility("hidden"))) SourceArg {
 public:
  // `source` is an int (a file descriptor of `size` bytes) or a contiguous byte buffer.
  SourceArg(const pybind11::object& source, uint64_t size) {
    if (pybind11::isinstance<pybind11::int_>(source)) {
      fd_.emplace(source.cast<int>(), size);
    } else {
      view_.emplace(view_of(source.cast<pybind11::buffer>()));
      memory_.emplace(view_->data, view_->size);
    }
  }
  const ByteSource& get() const {
    if (fd_) return *fd_;
    return *memory_;
  }

 private:
  std::optional<FdSource> fd_;
  std::optional<BufferView> view_;
  std::optional<MemorySource> memory_;
};

}  // namespace pyckpt::bindings
