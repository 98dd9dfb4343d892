#include "device/ring_loader.h"

#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

namespace pyckpt {
namespace {

// A contiguous range of the file read into one ring buffer, and the pieces it feeds.
struct Span {
  uint64_t file_offset = 0;
  uint64_t length = 0;
  struct Part {
    size_t piece;
    uint64_t span_offset;  // where the part starts inside the span
    uint64_t piece_offset;  // where it lands inside the piece
    uint64_t length;
  };
  std::vector<Part> parts;
};

std::vector<Span> plan_spans(const std::vector<DevicePiece>& pieces, const RingConfig& config) {
  std::vector<size_t> order(pieces.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return pieces[a].file_offset < pieces[b].file_offset;
  });
  std::vector<Span> spans;
  for (size_t index : order) {
    const DevicePiece& piece = pieces[index];
    for (uint64_t done = 0; done < piece.length;) {
      const uint64_t start = piece.file_offset + done;
      Span* span = spans.empty() ? nullptr : &spans.back();
      const bool fits = span != nullptr && start >= span->file_offset + span->length &&
                        start - (span->file_offset + span->length) <= config.max_gap &&
                        start - span->file_offset < config.buffer_bytes;
      if (!fits) {
        spans.emplace_back();
        span = &spans.back();
        span->file_offset = start;
      }
      const uint64_t room = config.buffer_bytes - (start - span->file_offset);
      const uint64_t length = std::min(room, piece.length - done);
      span->parts.push_back({index, start - span->file_offset, done, length});
      span->length = start - span->file_offset + length;
      done += length;
    }
  }
  return spans;
}

// What the pipeline needs from a device. The CUDA (or any stream-capable accelerator)
// version is asynchronous; the CPU version copies at once and needs no events.
class Transfer {
 public:
  virtual ~Transfer() = default;
  virtual at::Tensor allocate_host(uint64_t bytes) = 0;
  virtual void copy(int stream, const at::Tensor& host, const Span::Part& part, const DevicePiece& piece) = 0;
  virtual void buffer_used(int buffer, int stream) = 0;  // after the copies out of `buffer`
  virtual void wait_buffer_free(int buffer) = 0;          // host blocks until they finished
  virtual void finish() = 0;                              // the caller's stream waits for all
};

// The last copy out of each ring buffer. Copies are asynchronous and a call returns once they
// are enqueued, so the copies of one call may still read the buffers when the next call's
// readers want to refill them: the events outlive the call, with the buffers they guard.
struct CopiesOut {
  std::vector<std::optional<c10::Event>> events;  // one per buffer; empty until a copy is recorded
  std::optional<at::Device> device;               // where the recorded events live

  void wait(size_t buffer) {
    if (events[buffer]) events[buffer]->synchronize();
  }
  void wait_all() {
    for (size_t i = 0; i < events.size(); ++i) wait(i);
  }
  // Before a call to `target` with `buffers` buffers: an event records only on its own device.
  void prepare(const at::Device& target, size_t buffers) {
    if (device != target || events.size() != buffers) {
      wait_all();
      events.clear();
      events.resize(buffers);
      device = target;
    }
  }
};

class StreamTransfer final : public Transfer {
 public:
  StreamTransfer(const at::Device& device, int streams, CopiesOut& copies_out)
      : device_(device), guard_impl_(device.type()), copies_out_(copies_out) {
    caller_stream_ = guard_impl_.getStream(device);
    // Work the caller queued before the load (a model's initialisation kernels, say) may still
    // write the destinations: the copies start after it, as copies on the caller's stream would.
    c10::Event caller_ready(device.type());
    caller_ready.record(caller_stream_);
    for (int i = 0; i < streams; ++i) {
      streams_.push_back(guard_impl_.getStreamFromGlobalPool(device, /*isHighPriority=*/false));
      caller_ready.block(streams_.back());
    }
  }

  at::Tensor allocate_host(uint64_t bytes) override {
    return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }

  void copy(int stream, const at::Tensor& host, const Span::Part& part, const DevicePiece& piece) override {
    const c10::Stream& on = streams_[static_cast<size_t>(stream)];
    // The caching allocator orders a freed block only against the stream it was allocated on:
    // a destination made on another stream than the caller's, freed right after the load, must
    // not be handed out again while these copies still write it.
    if (recorded_.emplace(piece.dest.storage().data(), stream).second) piece.dest.record_stream(on);
    c10::StreamGuard guard(on);
    piece.dest.narrow(0, static_cast<int64_t>(piece.dest_offset + part.piece_offset), static_cast<int64_t>(part.length))
        .copy_(host.narrow(0, static_cast<int64_t>(part.span_offset), static_cast<int64_t>(part.length)),
               /*non_blocking=*/true);
  }

  void buffer_used(int buffer, int stream) override {
    std::optional<c10::Event>& event = copies_out_.events[static_cast<size_t>(buffer)];
    if (!event) event.emplace(device_.type());
    event->record(streams_[static_cast<size_t>(stream)]);
  }

  void wait_buffer_free(int buffer) override { copies_out_.wait(static_cast<size_t>(buffer)); }

  void finish() override {
    for (const c10::Stream& stream : streams_) {
      c10::Event done(device_.type());
      done.record(stream);
      done.block(caller_stream_);
    }
  }

 private:
  at::Device device_;
  c10::impl::VirtualGuardImpl guard_impl_;
  CopiesOut& copies_out_;
  c10::Stream caller_stream_{c10::Stream::DEFAULT, at::Device(at::kCPU)};
  std::vector<c10::Stream> streams_;
  std::set<std::pair<const void*, int>> recorded_;  // (destination storage, stream) pairs
};

class CpuTransfer final : public Transfer {
 public:
  at::Tensor allocate_host(uint64_t bytes) override {
    return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  }
  void copy(int, const at::Tensor& host, const Span::Part& part, const DevicePiece& piece) override {
    std::memcpy(static_cast<uint8_t*>(piece.dest.data_ptr()) + piece.dest_offset + part.piece_offset,
                static_cast<const uint8_t*>(host.data_ptr()) + part.span_offset, part.length);
  }
  void buffer_used(int, int) override {}
  void wait_buffer_free(int) override {}
  void finish() override {}
};

// The process-wide ring: allocated once, reused by every load. Deliberately never
// destroyed at exit (pinned memory must not be freed after the device runtime shut down);
// release_ring() frees it on request.
struct Ring {
  std::mutex lock;
  std::vector<at::Tensor> buffers;
  uint64_t buffer_bytes = 0;
  at::DeviceType device_type = at::kCPU;
  CopiesOut copies_out;  // asynchronous transfers only
};

Ring& ring() {
  static Ring* instance = new Ring();
  return *instance;
}

void check_pieces(const ByteSource& source, const std::vector<DevicePiece>& pieces, const at::Device& device) {
  for (const DevicePiece& piece : pieces) {
    source.check_range(piece.file_offset, piece.length, "read");
    TORCH_CHECK(piece.dest.device() == device, "destination is on ", piece.dest.device(), ", expected ", device);
    TORCH_CHECK(piece.dest.is_contiguous() && piece.dest.scalar_type() == at::kByte,
                "destinations must be contiguous uint8 tensors");
    TORCH_CHECK(piece.dest_offset + piece.length <= static_cast<uint64_t>(piece.dest.numel()),
                "destination too small for the piece");
  }
}

}  // namespace

RingStats copy_through_ring(const ByteSource& source, const std::vector<DevicePiece>& pieces,
                            const RingConfig& config, const at::Device& requested) {
  TORCH_CHECK(config.buffer_bytes > 0 && config.buffers > 0 && config.streams > 0 && config.readers > 0,
              "ring sizes must be positive");
  // "cuda" with no index means the current device, where at::empty put the destinations.
  const at::Device device = requested.has_index() || requested.is_cpu()
                                ? requested
                                : c10::impl::VirtualGuardImpl(requested.type()).getDevice();
  check_pieces(source, pieces, device);
  const std::vector<Span> spans = plan_spans(pieces, config);
  RingStats stats;
  stats.spans = spans.size();
  if (spans.empty()) return stats;

  Ring& shared = ring();
  std::lock_guard<std::mutex> exclusive(shared.lock);  // one load uses the ring at a time
  const bool cpu = device.is_cpu();
  if (shared.buffer_bytes != config.buffer_bytes || shared.buffers.size() != static_cast<size_t>(config.buffers) ||
      shared.device_type != device.type()) {
    shared.copies_out.wait_all();  // no copy may still read a buffer that is freed
    shared.buffers.clear();
  } else {
    stats.ring_reused = true;
  }
  std::unique_ptr<Transfer> transfer;
  if (cpu) {
    transfer = std::make_unique<CpuTransfer>();
  } else {
    shared.copies_out.prepare(device, static_cast<size_t>(config.buffers));
    transfer = std::make_unique<StreamTransfer>(device, config.streams, shared.copies_out);
  }
  if (shared.buffers.empty()) {
    for (int i = 0; i < config.buffers; ++i) shared.buffers.push_back(transfer->allocate_host(config.buffer_bytes));
    shared.buffer_bytes = config.buffer_bytes;
    shared.device_type = device.type();
  }
  const size_t buffer_count = shared.buffers.size();

  // Readers fill span i into buffer i % buffers once span i - buffers has been issued and
  // the copies out of that buffer have completed (this call's, or for the first spans, the
  // previous call's); the issuer (this thread) copies spans in order.
  std::mutex state_lock;
  std::condition_variable state_changed;
  size_t issued = 0;                             // spans whose copies are enqueued
  std::vector<bool> ready(spans.size(), false);  // spans read into their buffer
  std::atomic<size_t> next_span{0};
  std::exception_ptr reader_error;
  bool stop = false;

  auto reader = [&] {
    while (true) {
      const size_t i = next_span.fetch_add(1);
      if (i >= spans.size()) return;
      const int buffer = static_cast<int>(i % buffer_count);
      {
        std::unique_lock<std::mutex> guard(state_lock);
        state_changed.wait(guard, [&] { return stop || i < buffer_count || issued + buffer_count > i; });
        if (stop) return;
      }
      try {
        transfer->wait_buffer_free(buffer);
        source.read_into(spans[i].file_offset, spans[i].length,
                         static_cast<uint8_t*>(shared.buffers[static_cast<size_t>(buffer)].data_ptr()));
      } catch (...) {
        std::lock_guard<std::mutex> guard(state_lock);
        if (!reader_error) reader_error = std::current_exception();
        stop = true;
        state_changed.notify_all();
        return;
      }
      std::lock_guard<std::mutex> guard(state_lock);
      ready[i] = true;
      state_changed.notify_all();
    }
  };

  std::vector<std::thread> readers;
  const int reader_count = std::max(1, std::min<int>(config.readers, static_cast<int>(buffer_count)));
  for (int r = 0; r < reader_count; ++r) readers.emplace_back(reader);

  std::exception_ptr issue_error;
  try {
    for (size_t i = 0; i < spans.size(); ++i) {
      {
        std::unique_lock<std::mutex> guard(state_lock);
        state_changed.wait(guard, [&] { return stop || ready[i]; });
        if (reader_error) std::rethrow_exception(reader_error);
      }
      const int buffer = static_cast<int>(i % buffer_count);
      const int stream = static_cast<int>(i % static_cast<size_t>(config.streams));
      const at::Tensor& host = shared.buffers[static_cast<size_t>(buffer)];
      for (const Span::Part& part : spans[i].parts) {
        transfer->copy(stream, host, part, pieces[part.piece]);
        ++stats.copies;
        stats.bytes += part.length;
      }
      transfer->buffer_used(buffer, stream);
      std::lock_guard<std::mutex> guard(state_lock);
      issued = i + 1;
      state_changed.notify_all();
    }
    transfer->finish();
  } catch (...) {
    issue_error = std::current_exception();
    std::lock_guard<std::mutex> guard(state_lock);
    stop = true;
    state_changed.notify_all();
  }
  for (std::thread& thread : readers) thread.join();
  if (issue_error) {
    shared.copies_out.wait_all();  // do not leave copies reading buffers the next call refills
    std::rethrow_exception(issue_error);
  }
  return stats;
}

void release_ring() {
  Ring& shared = ring();
  std::lock_guard<std::mutex> exclusive(shared.lock);
  shared.copies_out.wait_all();
  shared.buffers.clear();
  shared.buffer_bytes = 0;
}

}  // namespace pyckpt
