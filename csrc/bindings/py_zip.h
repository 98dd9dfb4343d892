// A zip central directory kept on the native side, looked up by name from Python and from the
// tree converter: an archive of 50,000 records then costs no Python object per record until
// Python asks for one (pyckpt.index.native_bridge.NativeZipEntries wraps it as a Mapping).
#pragma once

#include <pybind11/pybind11.h>

#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "index/zip_index.h"

namespace pyckpt::bindings {

class ZipDirectory {
 public:
  explicit ZipDirectory(std::vector<ZipEntry> entries);

  size_t size() const { return entries_.size(); }
  // By the name as Python decodes it (UTF-8, else cp437), as UTF-8 bytes; null if absent.
  const ZipEntry* find(const std::string& decoded_name) const;
  pybind11::object entry(const std::string& decoded_name) const;  // the tuple, or None
  pybind11::list names() const;                                   // decoded, in directory order
  pybind11::list all() const;                                     // every entry tuple, in order
  // (start, end, count) of the records named `prefix`..., or None: see index/storage_span.h.
  pybind11::object storage_span(const std::string& prefix, uint64_t alignment, uint64_t max_gap) const;

  ZipDirectory(const ZipDirectory&) = delete;  // by_name_ views into decoded_
  ZipDirectory& operator=(const ZipDirectory&) = delete;

 private:
  std::vector<ZipEntry> entries_;
  std::vector<std::string> decoded_;  // UTF-8 of each entry's decoded name; never regrown
  std::unordered_map<std::string_view, size_t> by_name_;  // views into decoded_
};

// Registers ZipDirectory and zip_directory(source, size, threads) (see source_arg.h).
void register_zip(pybind11::module_& m);

}  // namespace pyckpt::bindings
