// Registers the pinned-ring loader as pyckpt._ring, a torch extension of its own so that
// the core (pyckpt._core) never has to load libtorch. Conversion only; no logic.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "bindings/buffer_view.h"
#include "bindings/exceptions.h"
#include "core/byte_source.h"
#include "core/error.h"
#include "device/ring_loader.h"

namespace py = pybind11;
using pyckpt::bindings::BufferView;
using pyckpt::bindings::view_of;

namespace {

std::vector<pyckpt::DevicePiece> device_pieces(const py::list& pieces) {
  std::vector<pyckpt::DevicePiece> result;
  result.reserve(pieces.size());
  for (py::handle item : pieces) {
    auto piece = item.cast<py::tuple>();
    result.push_back({piece[0].cast<uint64_t>(), piece[1].cast<uint64_t>(), piece[2].cast<torch::Tensor>(),
                      piece[3].cast<uint64_t>()});
  }
  return result;
}

pyckpt::RingConfig ring_config(const py::dict& config) {
  pyckpt::RingConfig result;
  result.buffer_bytes = config["buffer_bytes"].cast<uint64_t>();
  result.buffers = config["buffers"].cast<int>();
  result.streams = config["streams"].cast<int>();
  result.readers = config["readers"].cast<int>();
  return result;
}

py::dict stats_dict(const pyckpt::RingStats& stats) {
  py::dict result;
  result["spans"] = stats.spans;
  result["copies"] = stats.copies;
  result["bytes"] = stats.bytes;
  result["ring_reused"] = stats.ring_reused;
  return result;
}

py::dict copy(const pyckpt::ByteSource& source, const py::list& pieces, const py::dict& config,
              const std::string& device) {
  const std::vector<pyckpt::DevicePiece> parsed = device_pieces(pieces);
  const pyckpt::RingConfig parsed_config = ring_config(config);
  pyckpt::RingStats stats;
  {
    py::gil_scoped_release release;
    stats = pyckpt::copy_through_ring(source, parsed, parsed_config, at::Device(device));
  }
  return stats_dict(stats);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyckpt pinned-ring loader: file bytes to device memory on parallel streams";
  pyckpt::bindings::register_exception_translation();
  m.def("copy_to_device_fd", [](int fd, uint64_t size, const py::list& pieces, const py::dict& config,
                                const std::string& device) {
    return copy(pyckpt::FdSource(fd, size), pieces, config, device);
  });
  m.def("copy_to_device_buffer", [](const py::buffer& buffer, const py::list& pieces, const py::dict& config,
                                    const std::string& device) {
    BufferView view = view_of(buffer);
    return copy(pyckpt::MemorySource(view.data, view.size), pieces, config, device);
  });
  m.def("release_ring", [] {
    py::gil_scoped_release release;
    pyckpt::release_ring();
  });
}
