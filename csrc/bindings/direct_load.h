// pyckpt.load of a plain torch zip checkpoint to CPU in one native pass (see direct_load.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include "core/byte_source.h"

namespace pyckpt::bindings {

// The loaded object, or None where the general path must decide (anything beyond a plain
// state dict or training checkpoint, and anything malformed). `mapping` is the whole file as
// a torch.UntypedStorage (raw, 64-aligned storages become slices of it), or None to read
// every storage. `tables` holds the storage types and dtypes by name, OrderedDict, Parameter,
// the value and nesting limits and the default byte order.
pybind11::object load_direct(const ByteSource& source, pybind11::object mapping, const pybind11::dict& tables,
                             int threads);

}  // namespace pyckpt::bindings
