// Floating-point casts of raw storage bytes, as torch's Tensor.to(dtype) does them: every
// source format is widened to float32 (float64 rounds there first, as torch does), then
// rounded to nearest-even into the target. A NaN stays a NaN of the same sign (its payload
// is not kept: torch's own vectorised and scalar paths disagree on it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/byte_source.h"

namespace pyckpt {

enum class FloatFormat : uint8_t {
  kFloat64,
  kFloat32,
  kFloat16,
  kBFloat16,
  kFloat8E4M3FN,
  kFloat8E5M2,
  kFloat8E4M3FNUZ,
  kFloat8E5M2FNUZ,
  kFloat8E8M0FNU,
};

// The format of a torch dtype name ("float32", "bfloat16", ...); std::invalid_argument if
// the dtype is not a floating-point format this core casts.
FloatFormat float_format_named(const std::string& name);
uint64_t format_bytes(FloatFormat format);
// Only these are targets (casting down to float8 needs scales, which is not a dtype cast).
bool is_cast_target(FloatFormat format);

void cast_elements(const uint8_t* source, FloatFormat from, uint8_t* dest, FloatFormat to, uint64_t count);

struct CastReadJob {
  uint64_t offset;  // of the first element in the source
  uint64_t count;   // elements
  FloatFormat from;
  FloatFormat to;
  uint8_t* dest;    // count * format_bytes(to) bytes
};

// Read and cast in chunks (64 Ki elements in a buffer per thread at a time), so a
// cast never holds a second copy of a storage.
void parallel_cast_read(const ByteSource& source, const std::vector<CastReadJob>& jobs, int threads);

struct CastCopyJob {
  uint64_t source_offset;
  uint64_t count;
  FloatFormat from;
  FloatFormat to;
  uint64_t dest_offset;
};

// File to file, cast on the way; returns the CRC-32 of each job's output bytes.
std::vector<uint32_t> cast_copy_ranges(int source_fd, int dest_fd, const std::vector<CastCopyJob>& jobs, int threads);

}  // namespace pyckpt
