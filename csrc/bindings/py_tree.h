// The unpickler's arena turned into Python objects (part of the Python boundary): calls, builds and persistent ids go to the shared Python Interpreter in the
// order the pickle created them, exactly as the Python unpickler would have applied them.
#pragma once

#include <pybind11/pybind11.h>

#include "index/pickle_vm.h"

namespace pyckpt::bindings {

// The VM's rules from the keyword arguments pyckpt.index.native_bridge passes (the Python
// policy is the one source of them).
pickle::Rules rules_from(const pybind11::dict& rules);

// Every call, persistent id, mapping and build is evaluated, reachable or not, so the
// native and Python backends reject exactly the same pickles. `max_nesting` bounds depth.
pybind11::object tree_to_python(const pickle::Tree& tree, pybind11::object interpreter, int max_nesting);

// Registers unpickle(data, start, interpreter, rules, max_nesting) -> (root, end).
void register_unpickler(pybind11::module_& m);

}  // namespace pyckpt::bindings
