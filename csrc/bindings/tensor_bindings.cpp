// Registers the bulk host storages and tensors (csrc/materialize) as pyckpt._tensors, a torch
// extension imported only by loads, never by the command line. Conversion only; no logic.
#include <torch/extension.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <system_error>
#include <vector>

#include "bindings/buffer_view.h"
#include "bindings/exceptions.h"
#include "bindings/source_arg.h"
#include "bindings/direct_load.h"
#include "core/byte_source.h"
#include "core/error.h"
#include "io/parallel_read.h"
#include "materialize/host_tensors.h"

namespace py = pybind11;
namespace mt = pyckpt::materialize;

namespace {

std::vector<mt::ByteRange> byte_ranges(const py::list& ranges) {
  std::vector<mt::ByteRange> result;
  result.reserve(ranges.size());
  for (py::handle item : ranges) {
    auto range = item.cast<py::tuple>();
    result.push_back({range[0].cast<uint64_t>(), range[1].cast<uint64_t>()});
  }
  return result;
}

py::list storage_list(const std::vector<at::Storage>& storages) {
  py::list result;
  for (const at::Storage& storage : storages) result.append(py::cast(storage));
  return result;
}

std::vector<int64_t> int_vector(const py::handle& values) {
  std::vector<int64_t> result;
  for (py::handle value : values) result.push_back(value.cast<int64_t>());
  return result;
}

// Tensors for index TensorRecords: each record's storage by key, its dtype by name.
py::list make_tensors(const py::list& records, const py::dict& storages, const py::dict& dtypes) {
  // Interned once and never released: Python objects must not be destroyed after finalization.
  static const py::handle kStorage = PyUnicode_InternFromString("storage"), kKey = PyUnicode_InternFromString("key"),
                          kDtype = PyUnicode_InternFromString("dtype"), kName = PyUnicode_InternFromString("name"),
                          kOffset = PyUnicode_InternFromString("storage_offset"),
                          kSize = PyUnicode_InternFromString("size"), kStride = PyUnicode_InternFromString("stride"),
                          kRequiresGrad = PyUnicode_InternFromString("requires_grad");
  std::vector<at::Storage> unique;
  std::unordered_map<PyObject*, size_t> storage_index;  // by StorageRecord: records outlive the call
  std::unordered_map<PyObject*, at::ScalarType> scalar_type;  // by DType
  std::vector<mt::TensorSpec> specs;
  specs.reserve(records.size());
  for (py::handle record : records) {
    py::object storage_record = record.attr(kStorage);
    auto found = storage_index.find(storage_record.ptr());
    if (found == storage_index.end()) {
      PyObject* storage = PyDict_GetItemWithError(storages.ptr(), storage_record.attr(kKey).ptr());
      if (storage == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        throw std::invalid_argument("a record's storage was not made");
      }
      unique.push_back(py::handle(storage).cast<at::Storage>());
      found = storage_index.emplace(storage_record.ptr(), unique.size() - 1).first;
    }
    py::object dtype = record.attr(kDtype);
    auto type = scalar_type.find(dtype.ptr());
    if (type == scalar_type.end()) {
      type = scalar_type.emplace(dtype.ptr(), dtypes[dtype.attr(kName)].cast<at::ScalarType>()).first;
    }
    specs.push_back({found->second, type->second, record.attr(kOffset).cast<int64_t>(), int_vector(record.attr(kSize)),
                     int_vector(record.attr(kStride)), record.attr(kRequiresGrad).cast<bool>()});
  }
  const std::vector<at::Tensor> tensors = mt::make_tensors(unique, specs);
  py::list result(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) result[i] = py::cast(tensors[i]);
  return result;
}

// The pairs (record, target) whose bytes can go straight into the target: the record stored
// raw, in order, contiguous and inside its storage, the target fillable. Returns one flag per
// pair; the fills themselves go on `fills`.
std::vector<bool> direct_fills(const py::list& pairs, const py::dict& dtypes, std::vector<mt::DirectFill>* fills) {
  static const py::handle kStorage = PyUnicode_InternFromString("storage"), kDtype = PyUnicode_InternFromString("dtype"),
                          kName = PyUnicode_InternFromString("name"), kItemsize = PyUnicode_InternFromString("itemsize"),
                          kOffset = PyUnicode_InternFromString("storage_offset"),
                          kSize = PyUnicode_InternFromString("size"), kStride = PyUnicode_InternFromString("stride"),
                          kMetadata = PyUnicode_InternFromString("metadata"),
                          kByteswap = PyUnicode_InternFromString("byteswap"),
                          kMethod = PyUnicode_InternFromString("method"), kNbytes = PyUnicode_InternFromString("nbytes"),
                          kDataOffset = PyUnicode_InternFromString("data_offset"),
                          kViewOf = PyUnicode_InternFromString("view_of");
  std::vector<bool> result;
  result.reserve(pairs.size());
  for (py::handle item : pairs) {
    auto pair = item.cast<py::tuple>();
    py::handle record = pair[0];
    py::object storage = record.attr(kStorage);
    const std::vector<int64_t> size = int_vector(record.attr(kSize));
    const std::vector<int64_t> stride = int_vector(record.attr(kStride));
    bool contiguous = true;
    int64_t expected = 1;
    for (size_t i = size.size(); i-- > 0;) {
      if (size[i] != 1 && stride[i] != expected) contiguous = false;
      expected *= size[i];
    }
    py::object dtype = record.attr(kDtype);
    const uint64_t itemsize = dtype.attr(kItemsize).cast<uint64_t>();
    const uint64_t start = record.attr(kOffset).cast<uint64_t>() * itemsize;
    const uint64_t nbytes = static_cast<uint64_t>(expected) * itemsize;
    const uint64_t storage_bytes = storage.attr(kNbytes).cast<uint64_t>();
    bool ok = contiguous && record.attr(kMetadata).is_none() && !storage.attr(kByteswap).cast<bool>() &&
              storage.attr(kMethod).cast<int>() == 0 && storage.attr(kViewOf).is_none() && start <= storage_bytes &&
              nbytes <= storage_bytes - start && dtypes.contains(dtype.attr(kName));
    if (ok) {
      at::Tensor target = pair[1].cast<at::Tensor>();
      ok = mt::fillable(target, dtypes[dtype.attr(kName)].cast<at::ScalarType>(), size);
      if (ok) fills->push_back({storage.attr(kDataOffset).cast<uint64_t>() + start, std::move(target)});
    }
    result.push_back(ok);
  }
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyckpt bulk host storages and tensors: the per-tensor end of a CPU load";
  pyckpt::bindings::register_exception_translation();
  m.def("slice_storage", [](const at::Storage& base, const py::list& ranges) {
    return storage_list(mt::slice_storage(base, byte_ranges(ranges)));
  });
  m.def("read_storages_fd", [](int fd, uint64_t size, const py::list& ranges, int threads) {
    const std::vector<mt::ByteRange> parsed = byte_ranges(ranges);
    std::vector<at::Storage> storages;
    {
      py::gil_scoped_release release;
      storages = mt::read_storages(pyckpt::FdSource(fd, size), parsed, threads);
    }
    return storage_list(storages);
  });
  m.def("read_storages_buffer", [](const py::buffer& buffer, const py::list& ranges, int threads) {
    pyckpt::bindings::BufferView view = pyckpt::bindings::view_of(buffer);
    const std::vector<mt::ByteRange> parsed = byte_ranges(ranges);
    std::vector<at::Storage> storages;
    {
      py::gil_scoped_release release;
      storages = mt::read_storages(pyckpt::MemorySource(view.data, view.size), parsed, threads);
    }
    return storage_list(storages);
  });
  m.def("make_tensors", &make_tensors, py::arg("records"), py::arg("storages"), py::arg("dtypes"));
  m.def("load_direct_fd", [](int fd, uint64_t size, py::object mapping, const py::dict& tables, int threads) {
    return pyckpt::bindings::load_direct(pyckpt::FdSource(fd, size), std::move(mapping), tables, threads);
  });
  m.def("load_direct_buffer", [](const py::buffer& buffer, const py::dict& tables, int threads) {
    pyckpt::bindings::BufferView view = pyckpt::bindings::view_of(buffer);
    return pyckpt::bindings::load_direct(pyckpt::MemorySource(view.data, view.size), py::none(), tables, threads);
  });
  // files: [(source, size, pairs, display)], source an fd or a buffer (see source_arg.h).
  // One flag list per file; a read error names its file by display.
  m.def("fill_directly", [](const py::list& files, const py::dict& dtypes, int threads) {
    std::vector<pyckpt::bindings::SourceArg> sources;
    std::vector<mt::SourceFills> fills;
    sources.reserve(files.size());
    fills.reserve(files.size());
    py::list flags;
    for (py::handle item : files) {
      auto file = item.cast<py::tuple>();
      const pyckpt::bindings::SourceArg& source = sources.emplace_back(file[0].cast<py::object>(), file[1].cast<uint64_t>());
      mt::SourceFills& mine = fills.emplace_back(mt::SourceFills{&source.get(), {}});
      flags.append(py::cast(direct_fills(file[2].cast<py::list>(), dtypes, &mine.fills)));
    }
    try {
      py::gil_scoped_release release;
      mt::fill_directly(fills, threads);
    } catch (const pyckpt::SourceReadError& error) {
      pyckpt::bindings::raise_checkpoint_error(error, files[error.source()].cast<py::tuple>()[3]);
      throw py::error_already_set();
    }
    return flags;
  });
}
