// pyckpt._core's I/O functions: parallel reads, CRC-32 of ranges, file-to-file copies and
// the file mapping, with their arguments turned from Python lists into the core's types.
#include "bindings/io_bindings.h"

#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <vector>

#include "bindings/source_arg.h"
#include "io/copy_ranges.h"
#include "io/crc32.h"
#include "io/float_cast.h"
#include "io/mapped_file.h"
#include "io/parallel_read.h"

namespace py = pybind11;

namespace pyckpt::bindings {
namespace {

std::vector<CrcRange> crc_ranges(const py::list& ranges) {
  std::vector<CrcRange> result;
  result.reserve(ranges.size());
  for (py::handle item : ranges) {
    auto range = item.cast<py::tuple>();
    result.push_back({range[0].cast<uint64_t>(), range[1].cast<uint64_t>()});
  }
  return result;
}

// Destinations are writable contiguous byte buffers (a uint8 view of a tensor, as numpy).
struct ReadJobs {
  std::vector<ReadJob> jobs;
  std::vector<py::buffer_info> exports;  // every destination stays exported during the read
};

ReadJobs read_jobs(const py::list& jobs) {
  ReadJobs result;
  result.jobs.reserve(jobs.size());
  result.exports.reserve(jobs.size());
  for (py::handle item : jobs) {
    auto job = item.cast<py::tuple>();
    const auto offset = job[0].cast<uint64_t>();
    py::buffer_info info = job[1].cast<py::buffer>().request(/*writable=*/true);
    if (info.itemsize != 1 || info.ndim != 1 || info.strides[0] != 1) {
      throw std::invalid_argument("read destinations must be contiguous byte buffers");
    }
    result.jobs.push_back({offset, static_cast<uint64_t>(info.size), static_cast<uint8_t*>(info.ptr)});
    result.exports.push_back(std::move(info));
  }
  return result;
}

std::vector<CopyJob> copy_jobs(const py::list& jobs) {
  std::vector<CopyJob> parsed;
  parsed.reserve(jobs.size());
  for (py::handle item : jobs) {
    auto job = item.cast<py::tuple>();
    parsed.push_back({job[0].cast<uint64_t>(), job[1].cast<uint64_t>(), job[2].cast<uint64_t>(), job[3].cast<bool>()});
  }
  return parsed;
}

// Cast jobs name their formats by torch dtype name: ("float32", "bfloat16", ...).
struct CastReadJobs {
  std::vector<CastReadJob> jobs;
  std::vector<py::buffer_info> exports;
};

CastReadJobs cast_read_jobs(const py::list& jobs) {
  CastReadJobs result;
  for (py::handle item : jobs) {
    auto job = item.cast<py::tuple>();
    const auto offset = job[0].cast<uint64_t>();
    const auto count = job[1].cast<uint64_t>();
    const FloatFormat from = float_format_named(job[2].cast<std::string>());
    const FloatFormat to = float_format_named(job[3].cast<std::string>());
    py::buffer_info info = job[4].cast<py::buffer>().request(/*writable=*/true);
    if (info.itemsize != 1 || info.ndim != 1 || info.strides[0] != 1 ||
        static_cast<uint64_t>(info.size) != count * format_bytes(to)) {
      throw std::invalid_argument("cast destinations must be contiguous byte buffers of the cast's size");
    }
    result.jobs.push_back({offset, count, from, to, static_cast<uint8_t*>(info.ptr)});
    result.exports.push_back(std::move(info));
  }
  return result;
}

std::vector<CastCopyJob> cast_copy_jobs(const py::list& jobs) {
  std::vector<CastCopyJob> parsed;
  for (py::handle item : jobs) {
    auto job = item.cast<py::tuple>();
    parsed.push_back({job[0].cast<uint64_t>(), job[1].cast<uint64_t>(), float_format_named(job[2].cast<std::string>()),
                      float_format_named(job[3].cast<std::string>()), job[4].cast<uint64_t>()});
  }
  return parsed;
}

}  // namespace

void register_io(py::module_& m) {
  py::class_<MappedFile, std::shared_ptr<MappedFile>>(m, "Mapping", py::buffer_protocol())
      .def_buffer([](MappedFile& mapping) {
        return py::buffer_info(mapping.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(mapping.size())}, {static_cast<py::ssize_t>(1)},
                               /*readonly=*/false);
      })
      .def("__len__", [](const MappedFile& mapping) { return mapping.size(); });
  m.def(
      "read_into",
      [](const py::object& source, uint64_t size, const py::list& jobs, int threads) {
        const SourceArg bytes(source, size);
        const ReadJobs parsed = read_jobs(jobs);
        py::gil_scoped_release release;
        parallel_read(bytes.get(), parsed.jobs, threads);
      },
      py::arg("source"), py::arg("size"), py::arg("jobs"), py::arg("threads"));
  m.def(
      "crc32_ranges",
      [](const py::object& source, uint64_t size, const py::list& ranges, int threads) {
        const SourceArg bytes(source, size);
        const std::vector<CrcRange> parsed = crc_ranges(ranges);
        py::gil_scoped_release release;
        return parallel_crc32(bytes.get(), parsed, threads);
      },
      py::arg("source"), py::arg("size"), py::arg("ranges"), py::arg("threads"));
  m.def("crc32", [](const py::buffer& buffer, uint32_t crc) {
    BufferView view = view_of(buffer);
    return crc32_update(crc, view.data, static_cast<size_t>(view.size));
  });
  m.def("copy_ranges", [](int source_fd, int dest_fd, const py::list& jobs, int threads) {
    const std::vector<CopyJob> parsed = copy_jobs(jobs);
    py::gil_scoped_release release;
    return copy_ranges(source_fd, dest_fd, parsed, threads);
  });
  m.def(
      "cast_into",
      [](const py::object& source, uint64_t size, const py::list& jobs, int threads) {
        const SourceArg bytes(source, size);
        const CastReadJobs parsed = cast_read_jobs(jobs);
        py::gil_scoped_release release;
        parallel_cast_read(bytes.get(), parsed.jobs, threads);
      },
      py::arg("source"), py::arg("size"), py::arg("jobs"), py::arg("threads"));
  m.def("cast_copy_ranges", [](int source_fd, int dest_fd, const py::list& jobs, int threads) {
    const std::vector<CastCopyJob> parsed = cast_copy_jobs(jobs);
    py::gil_scoped_release release;
    return cast_copy_ranges(source_fd, dest_fd, parsed, threads);
  });
  // The whole file mapped copy-on-write, as a buffer: torch.frombuffer makes it a tensor
  // whose storage keeps the mapping alive.
  m.def("map_file", &MappedFile::open, py::arg("path"), py::arg("shared") = false);
}

}  // namespace pyckpt::bindings
