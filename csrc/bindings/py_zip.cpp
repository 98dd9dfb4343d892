#include "bindings/py_zip.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "bindings/source_arg.h"
#include "index/storage_span.h"

namespace py = pybind11;

namespace pyckpt::bindings {
namespace {

// Record names are UTF-8 in every torch writer; others go through Python's own cp437
// decoding (pyckpt.index.zip_index.decode_name), rare enough that the import costs nothing.
std::string decoded_utf8(const std::string& raw) {
  const bool ascii = std::all_of(raw.begin(), raw.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
  if (ascii) return raw;  // every torch record name: no Python object made to check it
  PyObject* text = PyUnicode_DecodeUTF8(raw.data(), static_cast<Py_ssize_t>(raw.size()), "strict");
  if (text != nullptr) {
    Py_DECREF(text);
    return raw;
  }
  PyErr_Clear();
  py::object decode = py::module_::import("pyckpt.index.zip_index").attr("decode_name");
  return decode(py::bytes(raw)).cast<std::string>();
}

}  // namespace

ZipDirectory::ZipDirectory(std::vector<ZipEntry> entries) : entries_(std::move(entries)) {
  decoded_.reserve(entries_.size());
  by_name_.reserve(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) {
    decoded_.push_back(decoded_utf8(entries_[i].name));
    by_name_.emplace(decoded_.back(), i);
  }
}

const ZipEntry* ZipDirectory::find(const std::string& decoded_name) const {
  const auto found = by_name_.find(decoded_name);
  return found == by_name_.end() ? nullptr : &entries_[found->second];
}

py::object ZipDirectory::entry(const std::string& decoded_name) const {
  const auto found = by_name_.find(decoded_name);
  if (found == by_name_.end()) return py::none();
  const ZipEntry& e = entries_[found->second];
  return py::make_tuple(py::str(decoded_[found->second]), e.method, e.flags, e.crc32, e.compressed_size, e.size,
                        e.header_offset, e.data_offset);
}

py::list ZipDirectory::names() const {
  py::list result;
  for (const std::string& name : decoded_) result.append(py::str(name));
  return result;
}

py::list ZipDirectory::all() const {
  py::list result;
  for (const std::string& name : decoded_) result.append(entry(name));
  return result;
}

py::object ZipDirectory::storage_span(const std::string& prefix, uint64_t alignment, uint64_t max_gap) const {
  std::vector<bool> is_storage(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) is_storage[i] = decoded_[i].compare(0, prefix.size(), prefix) == 0;
  const std::optional<StorageSpanBounds> bounds = find_storage_span(entries_, is_storage, alignment, max_gap);
  if (!bounds) return py::none();
  return py::make_tuple(bounds->start, bounds->end, bounds->count);
}

void register_zip(py::module_& m) {
  py::class_<ZipDirectory, std::shared_ptr<ZipDirectory>>(m, "ZipDirectory")
      .def("__len__", &ZipDirectory::size)
      .def("entry", &ZipDirectory::entry, py::arg("name"))
      .def("names", &ZipDirectory::names)
      .def("all", &ZipDirectory::all)
      .def("storage_span", &ZipDirectory::storage_span, py::arg("prefix"), py::arg("alignment"), py::arg("max_gap"));
  m.def(
      "zip_directory",
      [](const py::object& source, uint64_t size, int threads) {
        const SourceArg bytes(source, size);
        std::vector<ZipEntry> entries;
        {
          py::gil_scoped_release release;
          entries = read_zip_entries(bytes.get(), threads);
        }
        return std::make_shared<ZipDirectory>(std::move(entries));
      },
      py::arg("source"), py::arg("size"), py::arg("threads"));
}

}  // namespace pyckpt::bindings
