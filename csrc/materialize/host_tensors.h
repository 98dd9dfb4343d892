// Storages and tensors in host memory, made in bulk: the per-tensor end of a CPU load.
//
// A checkpoint of 50,000 tensors spends most of a Python-built load making objects one by
// one (a storage slice, an empty tensor, set_). Here each costs well under a microsecond.
// torch-linked (ATen, no Python); csrc/bindings/tensor_bindings.cpp makes it pyckpt._tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "core/byte_source.h"

namespace pyckpt::materialize {

struct ByteRange {
  uint64_t offset;
  uint64_t length;
};

// Storages over [offset, offset + length) of `base`, sharing its memory and keeping it alive,
// as torch's UntypedStorage slicing makes them.
std::vector<at::Storage> slice_storage(const at::Storage& base, const std::vector<ByteRange>& ranges);

// A fresh, uninitialised host storage of `nbytes`.
at::Storage new_host_storage(uint64_t nbytes);

// A fresh host storage for each range of `source`, filled by parallel reads.
std::vector<at::Storage> read_storages(const ByteSource& source, const std::vector<ByteRange>& ranges, int threads);

struct TensorSpec {
  size_t storage;  // index into the storages given to make_tensors
  at::ScalarType dtype;
  int64_t storage_offset;  // in elements
  std::vector<int64_t> size;
  std::vector<int64_t> stride;
  bool requires_grad;
};

// Dense tensors over the storages, exactly as torch's rebuild functions make them
// (an empty tensor set_ onto the storage); views were checked before.
std::vector<at::Tensor> make_tensors(const std::vector<at::Storage>& storages, const std::vector<TensorSpec>& specs);

// A stored record's bytes to copy straight into an existing tensor's memory.
struct DirectFill {
  uint64_t file_offset;
  at::Tensor target;
};

// Whether `target` can take a record's bytes as they are: a dense, contiguous host tensor of
// this dtype and shape, with no conj/neg bit.
bool fillable(const at::Tensor& target, at::ScalarType dtype, const std::vector<int64_t>& size);

// One file's fills, for a checkpoint made of several files.
struct SourceFills {
  const ByteSource* source;
  std::vector<DirectFill> fills;
};

// Reads every file's fills as one pool of pieces on several threads (see parallel_read); a
// target named twice at the same place of one file (tied weights) is read once. A read error
// is a SourceReadError naming the file's position in `files`.
void fill_directly(const std::vector<SourceFills>& files, int threads);

}  // namespace pyckpt::materialize
