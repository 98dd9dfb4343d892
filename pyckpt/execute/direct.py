"""``pyckpt.load`` of a plain torch zip checkpoint to CPU in one native pass.

The general pipeline (index -> plan -> execute -> objects) makes a Python record for every
tensor and storage; for a state dict of 50,000 tensors that costs more than the bytes. Where
the native extension is built and the call asks for nothing but CPU tensors, the native
direct loader (``csrc/bindings/direct_load.cpp``) runs the same restricted opcodes and
makes the result itself: storages sliced from the file mapping (or read), tensors over them.
It accepts only what a state dict or a training checkpoint of plain values holds, and gives
up on anything else or anything malformed; the general path then runs from the start, so
results, refusals and messages are the general path's in every case.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from .._env import io_threads
from ..index.policy import MAX_NESTING, GlobalsPolicy
from ..index.source import BufferSource, FileSource, Source
from ..index.zip_format import default_load_byteorder

if TYPE_CHECKING:
    from .._backend import Backend
    from .._device import MapLocation

NOTHING = object()  # load_direct's answer when the general path must run


def cpu_only(map_location: MapLocation) -> bool:
    """Whether the call leaves CPU storages on the CPU and does nothing else with them."""
    if map_location is None:
        return True
    if isinstance(map_location, str):
        return map_location == "cpu"
    return isinstance(map_location, torch.device) and map_location.type == "cpu" and map_location.index is None


def load_direct(
    source: Source, backend: Backend, policy: GlobalsPolicy, *, mmap: bool | None, shared_mapping: bool
) -> Any:
    """The loaded object, or NOTHING where the general path must run."""
    from .._backend import tensors_module

    native = tensors_module() if backend.name == "native" else None
    if native is None or source.size < 4 or source.read(0, 4) != b"PK\x03\x04":
        return NOTHING
    tables = dict(_tables(), max_values=policy.max_objects, default_byteorder=default_load_byteorder())
    if isinstance(source, FileSource):
        mapping = backend.map_file(source, shared=shared_mapping) if mmap is not False and source.size else None
        result = native.load_direct_fd(source.fd, source.size, mapping, tables, io_threads())
    elif isinstance(source, BufferSource):
        result = native.load_direct_buffer(source.buffer(), tables, io_threads())
    else:
        return NOTHING
    return NOTHING if result is None else result


@functools.lru_cache(maxsize=1)
def _tables() -> dict[str, Any]:
    from ..index.symbols import STORAGE_TYPES
    from ..sinks.torch_values import torch_dtypes

    dtypes = torch_dtypes()
    return {
        "storage_types": {
            name: (dtypes[dtype.name], dtype.itemsize) for name, dtype in STORAGE_TYPES.items() if dtype.name in dtypes
        },
        "dtypes": {f"torch.{name}": value for name, value in dtypes.items()},
        "ordered_dict": OrderedDict,
        "parameter": torch.nn.Parameter,
        "max_nesting": MAX_NESTING,
    }
