// The one translation of native errors into Python ones, for all three extension modules:
// pyckpt::CheckpointError into pyckpt.CheckpointError (or the subclass its kind names), with
// the record; std::system_error into OSError with its errno, as os.pread raises.
#pragma once

#include <pybind11/pybind11.h>

#include <cstring>
#include <exception>
#include <string>
#include <system_error>

#include "core/error.h"

namespace pyckpt::bindings {

inline pybind11::object decode_record_name(const std::string& raw) {
  return pybind11::module_::import("pyckpt.index.zip_index").attr("decode_name")(pybind11::bytes(raw));
}

// `path`: the file the error is from, where the caller knows it (None otherwise).
inline void raise_checkpoint_error(const CheckpointError& error, pybind11::handle path = pybind11::none()) {
  namespace py = pybind11;
  const char* class_name = error.kind() == ErrorKind::kUnsafe      ? "UnsafeCheckpointError"
                           : error.kind() == ErrorKind::kTruncated ? "TruncatedCheckpointError"
                                                                   : "CheckpointError";
  py::object cls = py::module_::import("pyckpt.errors").attr(class_name);
  py::object record = error.record().empty() ? py::none() : decode_record_name(error.record());
  py::object instance = cls(decode_record_name(error.message()), py::arg("record") = record, py::arg("path") = path);
  PyErr_SetObject(cls.ptr(), instance.ptr());
}

inline void register_exception_translation() {
  pybind11::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const CheckpointError& error) {
      raise_checkpoint_error(error);
    } catch (const std::system_error& error) {
      pybind11::object exc = pybind11::module_::import("builtins").attr("OSError")(
          error.code().value(), std::string(std::strerror(error.code().value())));
      PyErr_SetObject(PyExc_OSError, exc.ptr());
    }
  });
}

}  // namespace pyckpt::bindings
