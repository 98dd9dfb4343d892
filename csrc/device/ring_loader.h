// Move file bytes into device memory through a ring of reused pinned host buffers.
//
// Reader threads pread spans of the file into free ring buffers; the calling thread issues
// an asynchronous host-to-device copy per piece on one of several streams and records an
// event per buffer, so a buffer is refilled only once the copies out of it are done, those
// of the previous call included (a call returns with its last copies still in flight). The
// copy streams first wait for the caller's current stream, and at the end the caller's
// stream waits on them: ordered as copies on the caller's stream, with no device-wide
// synchronisation. Reads overlap copies, and nothing is copied twice on the host.
//
// Written against device-generic c10/ATen APIs (streams from the guard implementation,
// c10::Event, Tensor::copy_ from pinned memory), so it compiles with a CPU-only torch. The
// "cpu" transfer runs the same pipeline with synchronous copies, which is how it is tested
// on machines without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "core/byte_source.h"

namespace pyckpt {

struct DevicePiece {
  uint64_t file_offset;
  uint64_t length;
  at::Tensor dest;  // contiguous uint8 tensor on the target device
  uint64_t dest_offset;
};

struct RingConfig {
  uint64_t buffer_bytes = uint64_t{8} << 20;  // defaults as pyckpt/execute/device.py's, which always passes them
  int buffers = 32;
  int streams = 2;
  int readers = 16;
  uint64_t max_gap = uint64_t{64} << 10;  // file bytes worth reading to merge two pieces' spans
};

struct RingStats {
  uint64_t spans = 0;
  uint64_t copies = 0;
  uint64_t bytes = 0;
  bool ring_reused = false;  // the pinned buffers existed before this call
};

RingStats copy_through_ring(const ByteSource& source, const std::vector<DevicePiece>& pieces,
                            const RingConfig& config, const at::Device& device);

// Free the process-wide pinned ring (it is otherwise kept for the next load).
void release_ring();

}  // namespace pyckpt
