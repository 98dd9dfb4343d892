"""``pyckpt.load`` of a ``torch.distributed.checkpoint`` directory, with no process group.

Gives what ``dcp_to_torch_save`` writes, loaded back: the same nesting (rebuilt from the
metadata's ``planner_data``), every tensor assembled from its chunks and every other value
from its own small torch file. Each chunk is a torch zip inside a ``.distcp`` file; it is
read with the same restricted loader as any checkpoint, so nothing in it runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ._backend import current_backend
from ._device import MapLocation
from .execute.direct import cpu_only
from .errors import CheckpointError
from .index.dcp_format import ChunkPlace, DcpTensor, read_dcp_metadata, set_element
from .index.policy import policy_for
from .index.source import BufferSource
from .index.symbols import DType
from .float_cast import casts
from .sinks.torch_values import torch_dtype


def load_dcp(directory: str, map_location: MapLocation, unknown_globals: str, target: DType | None = None) -> dict[str, Any]:
    """Every entry, tensors assembled from their chunks (each chunk cast to ``target`` as it is read)."""
    if not cpu_only(map_location):
        raise ValueError("a DCP checkpoint is loaded to CPU for now: pass map_location=None or 'cpu'")
    metadata = read_dcp_metadata(directory, current_backend())
    policy = policy_for(unknown_globals)
    result: dict[str, Any] = {}
    files: dict[str, int] = {}
    try:
        for key, entry in metadata.entries.items():
            if isinstance(entry, DcpTensor):
                dtype = target if casts(entry.dtype, target) else entry.dtype
                value: Any = torch.empty(entry.size, dtype=torch_dtype(dtype))  # type: ignore[arg-type]
                for chunk in entry.chunks:
                    part = _load_chunk(chunk, files, policy, target)
                    if not isinstance(part, torch.Tensor) or part.dtype != value.dtype or tuple(part.shape) != chunk.sizes:
                        raise CheckpointError(
                            f"chunk at {list(chunk.offsets)} holds {_describe(part)}, not a {value.dtype} tensor of "
                            f"shape {list(chunk.sizes)}",
                            key=key,
                        )
                    value[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = part
            else:
                value = _load_chunk(entry.place, files, policy, target)
            path = metadata.paths.get(key)
            if path is None:
                result[key] = value
            else:
                set_element(result, path, value)
    finally:
        for fd in files.values():
            os.close(fd)
    return result


def _load_chunk(place: ChunkPlace, files: dict[str, int], policy: Any, target: DType | None) -> Any:
    from .loading import load_opened

    fd = files.get(place.file)
    if fd is None:
        fd = files[place.file] = os.open(place.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    data = os.pread(fd, place.length, place.offset)
    if len(data) != place.length:
        raise CheckpointError(f"file shrank while being read (chunk at offset {place.offset})", path=place.file)
    source = BufferSource(data, display=f"{place.file} (chunk at offset {place.offset})")
    return load_opened(source, "cpu", mmap=False, policy=policy, target=target)  # assembled on CPU whatever it says


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
