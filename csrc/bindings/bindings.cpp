// Registers the native core with pybind11 as pyckpt._core and turns pyckpt::CheckpointError
// into pyckpt.CheckpointError. With py_tree.cpp (the unpickler's tree as Python objects) and
// buffer_view.h, csrc/bindings/ is the only place the core meets Python. No logic of its
// own, and no torch: importing the core does not load libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "bindings/buffer_view.h"
#include "bindings/exceptions.h"
#include "bindings/py_tree.h"
#include "bindings/py_zip.h"
#include "core/byte_source.h"
#include "core/error.h"
#include "index/pickle_vm.h"
#include "index/zip_index.h"
#include "io/copy_ranges.h"
#include "io/crc32.h"
#include "io/mapped_file.h"
#include "io/parallel_read.h"

namespace py = pybind11;
using pyckpt::bindings::BufferView;
using pyckpt::bindings::view_of;
using pyckpt::CheckpointError;
using pyckpt::ErrorKind;
namespace pk = pyckpt::pickle;

namespace {

py::tuple unpickle(const py::buffer& data, uint64_t start, py::object interpreter,
                   const py::dict& rules, int max_nesting) {
  BufferView view = view_of(data);
  const pk::Rules parsed = pyckpt::bindings::rules_from(rules);
  pk::Tree tree;
  {
    py::gil_scoped_release release;
    tree = pk::unpickle(view.data, view.size, start, parsed);
  }
  py::object root = pyckpt::bindings::tree_to_python(tree, std::move(interpreter), max_nesting);
  return py::make_tuple(root, tree.end);
}

std::vector<pyckpt::CrcRange> crc_ranges(const py::list& ranges) {
  std::vector<pyckpt::CrcRange> result;
  result.reserve(ranges.size());
  for (py::handle item : ranges) {
    auto range = item.cast<py::tuple>();
    result.push_back({range[0].cast<uint64_t>(), range[1].cast<uint64_t>()});
  }
  return result;
}

// Destinations are writable contiguous byte buffers (a uint8 view of a tensor, as numpy).
struct ReadJobs {
  std::vector<pyckpt::ReadJob> jobs;
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

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyckpt native core: zip index, restricted unpickler, parallel I/O, CRC-32";
  py::class_<pyckpt::MappedFile, std::shared_ptr<pyckpt::MappedFile>>(m, "Mapping", py::buffer_protocol())
      .def_buffer([](pyckpt::MappedFile& mapping) {
        return py::buffer_info(mapping.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(mapping.size())}, {static_cast<py::ssize_t>(1)},
                               /*readonly=*/false);
      })
      .def("__len__", [](const pyckpt::MappedFile& mapping) { return mapping.size(); });
  pyckpt::bindings::register_exception_translation();

  py::class_<pyckpt::bindings::ZipDirectory, std::shared_ptr<pyckpt::bindings::ZipDirectory>>(m, "ZipDirectory")
      .def("__len__", &pyckpt::bindings::ZipDirectory::size)
      .def("entry", &pyckpt::bindings::ZipDirectory::entry, py::arg("name"))
      .def("names", &pyckpt::bindings::ZipDirectory::names)
      .def("all", &pyckpt::bindings::ZipDirectory::all)
      .def("storage_span", &pyckpt::bindings::ZipDirectory::storage_span, py::arg("prefix"), py::arg("alignment"),
           py::arg("max_gap"));
  m.def("zip_directory_fd", [](int fd, uint64_t size, int threads) {
    std::vector<pyckpt::ZipEntry> entries;
    {
      py::gil_scoped_release release;
      entries = pyckpt::read_zip_entries(pyckpt::FdSource(fd, size), threads);
    }
    return std::make_shared<pyckpt::bindings::ZipDirectory>(std::move(entries));
  });
  m.def("zip_directory_buffer", [](const py::buffer& buffer, int threads) {
    BufferView view = view_of(buffer);
    std::vector<pyckpt::ZipEntry> entries;
    {
      py::gil_scoped_release release;
      entries = pyckpt::read_zip_entries(pyckpt::MemorySource(view.data, view.size), threads);
    }
    return std::make_shared<pyckpt::bindings::ZipDirectory>(std::move(entries));
  });
  m.def("unpickle", &unpickle, py::arg("data"), py::arg("start"), py::arg("interpreter"),
        py::arg("rules"), py::arg("max_nesting"));
  m.def("read_into_fd", [](int fd, uint64_t size, const py::list& jobs, int threads) {
    const ReadJobs parsed = read_jobs(jobs);
    py::gil_scoped_release release;
    pyckpt::parallel_read(pyckpt::FdSource(fd, size), parsed.jobs, threads);
  });
  m.def("read_into_buffer", [](const py::buffer& buffer, const py::list& jobs, int threads) {
    BufferView view = view_of(buffer);
    const ReadJobs parsed = read_jobs(jobs);
    py::gil_scoped_release release;
    pyckpt::parallel_read(pyckpt::MemorySource(view.data, view.size), parsed.jobs, threads);
  });
  m.def("crc32_ranges_fd", [](int fd, uint64_t size, const py::list& ranges, int threads) {
    const std::vector<pyckpt::CrcRange> parsed = crc_ranges(ranges);
    py::gil_scoped_release release;
    return pyckpt::parallel_crc32(pyckpt::FdSource(fd, size), parsed, threads);
  });
  m.def("crc32_ranges_buffer", [](const py::buffer& buffer, const py::list& ranges, int threads) {
    BufferView view = view_of(buffer);
    const std::vector<pyckpt::CrcRange> parsed = crc_ranges(ranges);
    py::gil_scoped_release release;
    return pyckpt::parallel_crc32(pyckpt::MemorySource(view.data, view.size), parsed, threads);
  });
  m.def("crc32", [](const py::buffer& buffer, uint32_t crc) {
    BufferView view = view_of(buffer);
    return pyckpt::crc32_update(crc, view.data, static_cast<size_t>(view.size));
  });
  m.def("copy_ranges", [](int source_fd, int dest_fd, const py::list& jobs, int threads) {
    std::vector<pyckpt::CopyJob> parsed;
    parsed.reserve(jobs.size());
    for (py::handle item : jobs) {
      auto job = item.cast<py::tuple>();
      parsed.push_back({job[0].cast<uint64_t>(), job[1].cast<uint64_t>(), job[2].cast<uint64_t>(),
                        job[3].cast<bool>()});
    }
    py::gil_scoped_release release;
    return pyckpt::copy_ranges(source_fd, dest_fd, parsed, threads);
  });
  // The whole file mapped copy-on-write, as a buffer: torch.frombuffer makes it a tensor
  // whose storage keeps the mapping alive.
  m.def("map_file", &pyckpt::MappedFile::open, py::arg("path"), py::arg("shared") = false);
}
