// The only file of the core that knows about Python: it registers the native core with
// pybind11 as pyckpt._core, converts the unpickler's tree into Python objects through the
// shared Interpreter, and turns pyckpt::CheckpointError into pyckpt.CheckpointError. No
// logic of its own, and no torch: importing the core does not load libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "buffer_view.h"
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

constexpr int kMaxNesting = 512;

py::object errors_module() { return py::module_::import("pyckpt.errors"); }

py::object decode_name(const std::string& raw) {
  return py::module_::import("pyckpt.index.py_zip").attr("decode_name")(py::bytes(raw));
}

void raise_checkpoint_error(const CheckpointError& error) {
  const char* class_name = error.kind() == ErrorKind::kUnsafe      ? "UnsafeCheckpointError"
                           : error.kind() == ErrorKind::kTruncated ? "TruncatedCheckpointError"
                                                                   : "CheckpointError";
  py::object cls = errors_module().attr(class_name);
  py::object record = error.record().empty() ? py::none() : decode_name(error.record());
  py::object instance = cls(decode_name(error.message()), py::arg("record") = record);
  PyErr_SetObject(cls.ptr(), instance.ptr());
}

py::tuple entry_tuple(const pyckpt::ZipEntry& e) {
  return py::make_tuple(py::bytes(e.name), e.method, e.flags, e.crc32, e.compressed_size, e.size,
                        e.header_offset, e.data_offset);
}

py::list entries_list(const std::vector<pyckpt::ZipEntry>& entries) {
  py::list result;
  for (const auto& entry : entries) result.append(entry_tuple(entry));
  return result;
}

// Turns the unpickler's arena into Python objects. Calls, builds and persistent ids go to
// the Python Interpreter, in the order the pickle created them, exactly as the Python
// unpickler would have applied them.
class TreeConverter {
 public:
  TreeConverter(const pk::Tree& tree, py::object interpreter)
      : tree_(tree), interpreter_(std::move(interpreter)), built_(tree.nodes.size()) {
    py::object collections = py::module_::import("collections");
    ordered_dict_ = collections.attr("OrderedDict");
    counter_ = collections.attr("Counter");
    int_from_bytes_ = py::module_::import("builtins").attr("int").attr("from_bytes");
  }

  py::object convert_all() {
    // Evaluate every call, persistent id, mapping and build, reachable or not, so the
    // native and Python backends reject exactly the same pickles.
    for (pk::NodeId id = 0; id < tree_.nodes.size(); ++id) {
      const pk::Node& node = tree_.nodes[id];
      if (node.kind == pk::Kind::kCall || node.kind == pk::Kind::kPersistent ||
          node.kind == pk::Kind::kDict || !node.builds.empty()) {
        convert(id, 0);
      }
    }
    return convert(tree_.root, 0);
  }

 private:
  py::object convert(pk::NodeId id, int depth) {
    if (built_[id]) return built_[id];
    if (depth > kMaxNesting) {
      throw CheckpointError(ErrorKind::kCorrupt, "object tree nests deeper than " +
                                                     std::to_string(kMaxNesting) + " levels");
    }
    const pk::Node& node = tree_.nodes[id];
    py::object result;
    switch (node.kind) {
      case pk::Kind::kNone:
        result = py::none();
        break;
      case pk::Kind::kBool:
        result = py::bool_(node.flag);
        break;
      case pk::Kind::kInt:
        result = py::int_(node.integer);
        break;
      case pk::Kind::kBigInt:
        result = int_from_bytes_(py::bytes(node.text), "little", py::arg("signed") = true);
        break;
      case pk::Kind::kFloat:
        result = py::float_(node.real);
        break;
      case pk::Kind::kString: {
        PyObject* text = PyUnicode_DecodeUTF8(node.text.data(),
                                              static_cast<Py_ssize_t>(node.text.size()),
                                              "surrogatepass");
        if (text == nullptr) throw py::error_already_set();
        result = py::reinterpret_steal<py::object>(text);
        break;
      }
      case pk::Kind::kList: {
        py::list list;
        built_[id] = list;
        for (pk::NodeId item : node.items) list.append(convert(item, depth + 1));
        result = list;
        break;
      }
      case pk::Kind::kTuple: {
        py::tuple tuple(node.items.size());
        for (size_t i = 0; i < node.items.size(); ++i) tuple[i] = convert(node.items[i], depth + 1);
        result = tuple;
        break;
      }
      case pk::Kind::kSet:
        result = py::set();
        break;
      case pk::Kind::kDict:
        result = convert_dict(id, node, depth);
        break;
      case pk::Kind::kGlobal:
        result = interpreter_.attr("resolve_global")(node.text);
        break;
      case pk::Kind::kCall: {
        const std::string& name = tree_.nodes[node.items[0]].text;
        py::object args = convert(node.items[1], depth + 1);
        result = interpreter_.attr("call_at")(name, args, node.flag, node.offset);
        break;
      }
      case pk::Kind::kPersistent: {
        py::object pid = convert(node.items[0], depth + 1);
        result = interpreter_.attr("persistent_at")(pid, node.offset);
        break;
      }
    }
    built_[id] = result;
    for (const pk::Build& build : node.builds) {
      interpreter_.attr("build_at")(result, convert(build.state, depth + 1), build.offset);
    }
    return result;
  }

  py::object convert_dict(pk::NodeId id, const pk::Node& node, int depth) {
    py::object mapping = node.dict_type == pk::DictType::kOrderedDict ? ordered_dict_()
                         : node.dict_type == pk::DictType::kCounter   ? counter_()
                                                                      : py::dict();
    built_[id] = mapping;
    for (size_t i = 0; i + 1 < node.items.size(); i += 2) {
      py::object key = convert(node.items[i], depth + 1);
      py::object value = convert(node.items[i + 1], depth + 1);
      if (PyObject_SetItem(mapping.ptr(), key.ptr(), value.ptr()) != 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();
        PyErr_Clear();
        throw CheckpointError(ErrorKind::kCorrupt,
                              std::string("bad pickle: dict key of type ") +
                                  Py_TYPE(key.ptr())->tp_name + " is not hashable");
      }
    }
    return mapping;
  }

  const pk::Tree& tree_;
  py::object interpreter_;
  std::vector<py::object> built_;
  py::object ordered_dict_, counter_, int_from_bytes_;
};

py::tuple unpickle(const py::buffer& data, uint64_t start, py::object interpreter,
                   const std::vector<std::string>& allowed,
                   const std::vector<std::string>& torchscript_helpers, bool torchscript) {
  BufferView view = view_of(data);
  pk::Rules rules;
  rules.allowed.insert(allowed.begin(), allowed.end());
  rules.torchscript_helpers.insert(torchscript_helpers.begin(), torchscript_helpers.end());
  rules.torchscript = torchscript;
  pk::Tree tree;
  {
    py::gil_scoped_release release;
    tree = pk::unpickle(view.data, view.size, start, rules);
  }
  TreeConverter converter(tree, std::move(interpreter));
  return py::make_tuple(converter.convert_all(), tree.end);
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
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const CheckpointError& error) {
      raise_checkpoint_error(error);
    } catch (const std::system_error& error) {
      // An OSError with the errno, like os.pwrite raises: callers handle ENOSPC/EFBIG.
      py::object exc = py::module_::import("builtins").attr("OSError")(
          error.code().value(), std::string(std::strerror(error.code().value())));
      PyErr_SetObject(PyExc_OSError, exc.ptr());
    }
  });

  m.def("zip_entries_fd", [](int fd, uint64_t size) {
    std::vector<pyckpt::ZipEntry> entries;
    {
      py::gil_scoped_release release;
      entries = pyckpt::read_zip_entries(pyckpt::FdSource(fd, size));
    }
    return entries_list(entries);
  });
  m.def("zip_entries_buffer", [](const py::buffer& buffer) {
    BufferView view = view_of(buffer);
    std::vector<pyckpt::ZipEntry> entries;
    {
      py::gil_scoped_release release;
      entries = pyckpt::read_zip_entries(pyckpt::MemorySource(view.data, view.size));
    }
    return entries_list(entries);
  });
  m.def("unpickle", &unpickle, py::arg("data"), py::arg("start"), py::arg("interpreter"),
        py::arg("allowed"), py::arg("torchscript_helpers"), py::arg("torchscript"));
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
  m.def("map_file", &pyckpt::MappedFile::open, py::arg("path"));
}
