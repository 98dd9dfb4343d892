// A contiguous byte buffer borrowed from Python (bytes, a BytesIO's buffer, a numpy view),
// for the two binding files; not part of the core, which never sees Python.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <utility>

namespace pyckpt::bindings {

// Hidden like pybind11's own types, so holding a buffer_info raises no visibility warning.
struct __attribute__((visibility("hidden"))) BufferView {
  const uint8_t* data;
  uint64_t size;
  pybind11::buffer_info info;  // keeps the export alive
};

inline BufferView view_of(const pybind11::buffer& buffer) {
  pybind11::buffer_info info = buffer.request();
  if (info.ndim != 1 || info.itemsize != 1 || (!info.strides.empty() && info.strides[0] != 1)) {
    throw std::invalid_argument("expected a contiguous byte buffer");
  }
  return {static_cast<const uint8_t*>(info.ptr), static_cast<uint64_t>(info.size), std::move(info)};
}

}  // namespace pyckpt::bindings
