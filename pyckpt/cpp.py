"""Where the C++ API lives, for build systems and for ``torch.ops``.

``library_path()`` is the torch-linked library holding ``pyckpt::load_state_dict`` /
``pyckpt::load_into`` and the ``torch.ops.pyckpt`` operators; it needs libtorch, not Python.
"""

from __future__ import annotations

import glob
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_ops_loaded = False


def library_path() -> str:
    """The C++ API's shared library (``pyckpt/_api*.so``), for linking or ``torch.ops.load_library``."""
    found = sorted(glob.glob(os.path.join(_PACKAGE, "_api*.so")))
    if not found:
        raise FileNotFoundError(
            f"pyckpt's C++ library is not in {_PACKAGE}: build the extensions "
            "(pip install --no-build-isolation ., or python setup.py build_ext --inplace)"
        )
    return found[0]


def include_path() -> str:
    """The folder to add to the include path for ``#include <pyckpt/pyckpt.h>``."""
    return os.path.join(_PACKAGE, "include")


def cmake_prefix_path() -> str:
    """For ``CMAKE_PREFIX_PATH``, next to ``torch.utils.cmake_prefix_path``: holds ``pyckptConfig.cmake``."""
    return os.path.join(_PACKAGE, "share", "cmake")


def load_ops() -> None:
    """Register ``torch.ops.pyckpt.load_state_dict`` and ``load_into`` in this process (what
    ``torch.ops.load_library(pyckpt.library_path())`` does; ``import pyckpt`` does it when torch
    is already imported)."""
    global _ops_loaded
    if not _ops_loaded:
        import torch

        torch.ops.load_library(library_path())
        _ops_loaded = True
