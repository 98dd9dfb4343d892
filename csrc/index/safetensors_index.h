// A safetensors file's header, checked as strictly as pyckpt/index/safetensors_format.py
// checks it and refused with the same messages: the tensors' data must tile the data section
// exactly (no overlap, no gap, nothing past the end), each dtype must be known and each
// shape must need exactly the bytes its offsets give.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/byte_source.h"

namespace pyckpt {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;  // the safetensors code: "F32", "BF16", ...
  uint64_t itemsize;
  std::vector<int64_t> shape;
  uint64_t data_offset;  // in the file
  uint64_t nbytes;
};

struct SafetensorsIndex {
  std::vector<SafetensorsTensor> tensors;  // in data order, as the Python package lists them
  std::vector<std::pair<std::string, std::string>> metadata;  // "__metadata__", if any
};

// An 8-byte little-endian header length, then a JSON object.
bool looks_safetensors(const ByteSource& source);
SafetensorsIndex read_safetensors_index(const ByteSource& source);

}  // namespace pyckpt
