"""pyckpt: load, rename and convert PyTorch checkpoints fast and without running pickle.

Importing pyckpt is cheap: it imports neither the native extension nor CUDA; everything
below is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, KeyCollisionError, UnsafeCheckpointError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConvertReport",
    "KeyCollisionError",
    "Opaque",
    "UnsafeCheckpointError",
    "backend",
    "backend_info",
    "cmake_prefix_path",
    "convert",
    "include_path",
    "library_path",
    "load",
    "load_ops",
    "load_state_dict",
    "release_buffers",
    "state_dict_of",
    "unknown_globals",
]

if TYPE_CHECKING:
    from ._backend import BackendInfo
    from .converting import ConvertReport, convert
    from .cpp import cmake_prefix_path, include_path, library_path, load_ops
    from .execute.device import release_buffers
    from .index.opaque import Opaque
    from .inspection import unknown_globals
    from .loading import load
    from .module_loading import load_state_dict
    from .pickled_module import state_dict_of

_LAZY = {
    "load": "loading",
    "load_state_dict": "module_loading",
    "convert": "converting",
    "ConvertReport": "converting",
    "release_buffers": "execute.device",
    "Opaque": "index.opaque",
    "state_dict_of": "pickled_module",
    "unknown_globals": "inspection",
    "library_path": "cpp",
    "include_path": "cpp",
    "cmake_prefix_path": "cpp",
    "load_ops": "cpp",
}


def backend() -> str:
    """``"native"`` or ``"python"``: which backend this process uses."""
    from ._backend import backend_info as info

    return info().name


def backend_info() -> BackendInfo:
    """Which backend runs, and why the native extension is not in use when it is not."""
    from ._backend import backend_info as info

    return info()


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pyckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def _register_ops_if_torch_is_loaded() -> None:
    """``torch.ops.pyckpt.*`` once pyckpt is imported, where that costs no torch import: with
    torch not yet imported, ``pyckpt.load_ops()`` (or ``torch.ops.load_library``) does it."""
    import os
    import sys

    if "torch" not in sys.modules or os.environ.get("PYCKPT_DISABLE_EXT", "").strip() in ("1", "true", "yes", "on"):
        return
    from .cpp import load_ops

    try:
        load_ops()
    except (OSError, RuntimeError):  # no C++ library built: pyckpt.backend_info() says why
        pass


_register_ops_if_torch_is_loaded()
