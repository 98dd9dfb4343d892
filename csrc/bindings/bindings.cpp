// pyckpt._core: the native core registered with pybind11. Registration only: each part's
// conversions live beside it (py_zip.cpp: the zip directory; py_tree.cpp: the unpickler and
// its tree as Python objects; io_bindings.cpp: reads, CRCs, copies, the mapping), and
// exceptions.h turns pyckpt::CheckpointError into pyckpt.CheckpointError. No torch:
// importing the core does not load libtorch.
#include <pybind11/pybind11.h>

#include "bindings/exceptions.h"
#include "bindings/io_bindings.h"
#include "bindings/py_tree.h"
#include "bindings/py_zip.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyckpt native core: zip index, restricted unpickler, parallel I/O, CRC-32";
  pyckpt::bindings::register_exception_translation();
  pyckpt::bindings::register_io(m);
  pyckpt::bindings::register_zip(m);
  pyckpt::bindings::register_unpickler(m);
}
