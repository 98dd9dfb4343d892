// Registers pyckpt._core's I/O functions (reads, CRCs, copies, the file mapping).
#pragma once

#include <pybind11/pybind11.h>

namespace pyckpt::bindings {

void register_io(pybind11::module_& m);

}  // namespace pyckpt::bindings
