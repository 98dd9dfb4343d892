"""``pyckpt.load`` of a ``torch.distributed.checkpoint`` directory, with no process group.

Gives what ``dcp_to_torch_save`` writes, loaded back: the same nesting (rebuilt from the
metadata's ``planner_data``), every tensor assembled from its chunks and every other value
from its own small torch file. Each chunk is a torch zip inside a ``.distcp`` file; it is
read with the same restricted loader as any checkpoint, so nothing in it runs.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import torch
from torch import nn

from ._backend import current_backend
from ._device import MapLocation, location_device, target_location
from .errors import CheckpointError
from .index.dcp_format import ChunkPlace, DcpTensor, chunk_source, read_dcp_metadata, set_element
from .index.policy import UNKNOWN_OPAQUE, policy_for
from .index import index_source
from .index.records import METHOD_STORED, TensorRecord
from .index.source import BufferSource, FileSource
from .index.symbols import DType
from .float_cast import casts
from .module_loading import _fillable, _load_into, _owners_allowing_direct_fill, key_matcher, module_matcher
from .rename import find_state_dict, rename_state_dict
from .sinks.torch_values import torch_dtype


def load_dcp(directory: str, map_location: MapLocation, unknown_globals: str, target: DType | None = None) -> dict[str, Any]:
    """Every entry, tensors assembled from their chunks (each chunk cast to ``target`` as it is read)."""
    device = dcp_device(map_location)
    with DcpSkeleton(directory, unknown_globals, map_location) as skeleton:
        fills = []
        for placeholder, entry, _ in skeleton.tensors.values():
            dtype = target if casts(entry.dtype, target) else entry.dtype
            value = torch.empty(entry.size, dtype=torch_dtype(dtype), device=device)  # type: ignore[arg-type]
            fills.append((placeholder, value))
        skeleton.fill(fills, target)
        return skeleton.replaced({id(placeholder): value for placeholder, value in fills})


def load_dcp_into(
    model: nn.Module,
    directory: str,
    targets: dict[str, Any],
    *,
    key: str | None,
    strict: bool,
    assign: bool,
    map_location: MapLocation,
) -> Any:
    """A DCP directory into ``model``: the state dict is found and renamed on a skeleton of
    meta tensors, then each tensor's chunks are assembled straight into the parameter it
    loads (``copy_`` casts across dtypes, as ``load_state_dict`` does), or where
    ``map_location`` stages it when no parameter can take it. Only the state dict's chunks
    are read, and no host copy of the model is made."""
    staged_device = dcp_device(map_location)
    with DcpSkeleton(directory, UNKNOWN_OPAQUE, map_location) as skeleton:
        found = find_state_dict(skeleton.root, key)
        renamed = rename_state_dict(found, key_matcher(found, targets), module_map=module_matcher(model))
        owners = _owners_allowing_direct_fill(model)  # modules that load their state as torch's do
        fills: list[tuple[torch.Tensor, torch.Tensor]] = []
        final = type(renamed)()
        for name, value in renamed.items():
            if not (isinstance(value, torch.Tensor) and id(value) in skeleton.tensors):
                final[name] = value
                continue
            target = targets.get(name)
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            in_place = not assign and owner in owners and _takes_in_place(target, value)
            destination = target.detach() if in_place else torch.empty(value.shape, dtype=value.dtype, device=staged_device)
            fills.append((value, destination))
            final[name] = target if in_place else destination
        skeleton.fill(fills)
    metadata = getattr(renamed, "_metadata", None)
    if metadata is not None:
        final._metadata = metadata  # type: ignore[attr-defined]
    return _load_into(model, final, strict=strict, assign=assign)


def _takes_in_place(target: Any, placeholder: torch.Tensor) -> bool:
    """A plain parameter or buffer the checkpoint tensor can be assembled into: same shape,
    dense, not on meta. Chunks are copied into its slices with ``copy_``, which casts as the
    ``param.copy_(input)`` of ``load_state_dict`` would."""
    return (
        type(target) in (torch.Tensor, nn.Parameter)
        and target.shape == placeholder.shape
        and target.layout == torch.strided
        and target.device.type != "meta"
    )


class DcpSkeleton:
    """A DCP directory's tree with each tensor as a meta tensor of its dtype and shape, and
    every other value loaded (they are small): what a caller needs to choose where each
    tensor goes (``load_state_dict`` fills the model's own parameters) before any tensor
    byte is read. ``fill`` then reads the chosen tensors' chunks, and only theirs."""

    def __init__(self, directory: str, unknown_globals: str, map_location: MapLocation = "cpu") -> None:
        self.metadata = read_dcp_metadata(directory, current_backend())
        self.policy = policy_for(unknown_globals)
        self.files: dict[str, int] = {}
        self.maps: dict[str, Any] = {}  # .distcp file -> a read-only mapping, to index chunks in place
        self.tensors: dict[int, tuple[torch.Tensor, DcpTensor, str]] = {}  # id(placeholder) -> it, entry, key
        self.root: dict[str, Any] = {}
        try:
            for key, entry in self.metadata.entries.items():
                if isinstance(entry, DcpTensor):
                    value: Any = torch.empty(entry.size, dtype=torch_dtype(entry.dtype), device="meta")  # type: ignore[arg-type]
                    self.tensors[id(value)] = (value, entry, key)
                else:  # a pickled value: its own torch file, with its own saved locations
                    value = _load_chunk(entry.place, self.files, self.policy, None, map_location)
                path = self.metadata.paths.get(key)
                if path is None:
                    self.root[key] = value
                else:
                    set_element(self.root, path, value)
        except BaseException:
            self.close()
            raise

    def fill(self, fills: list[tuple[torch.Tensor, torch.Tensor]], target: DType | None = None) -> None:
        """Assemble each placeholder's chunks into its destination, a tensor of its shape on
        any device; ``copy_`` casts where the dtypes differ, as ``param.copy_`` would.

        A whole-tensor chunk bound for a dense host tensor of its own dtype is read straight
        from the ``.distcp`` file into it, with the parallel reads a torch file gets (its
        storage found by indexing the chunk's small zip in place); the others are loaded and
        copied into their slices one chunk at a time."""
        if target is None:
            fills = self._read_directly(fills)
        for placeholder, destination in fills:
            _, entry, key = self.tensors[id(placeholder)]
            expected = torch_dtype(target if casts(entry.dtype, target) else entry.dtype)  # type: ignore[arg-type]
            for chunk in entry.chunks:
                part = _load_chunk(chunk, self.files, self.policy, target)
                if not isinstance(part, torch.Tensor) or part.dtype != expected or tuple(part.shape) != chunk.sizes:
                    raise CheckpointError(
                        f"chunk at {list(chunk.offsets)} holds {_describe(part)}, not a {expected} tensor of "
                        f"shape {list(chunk.sizes)}",
                        key=key,
                    )
                with torch.no_grad():
                    destination[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = part

    def _read_directly(self, fills: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Read what can be read straight into its destination; return the rest."""
        jobs: dict[str, list[tuple[int, torch.Tensor]]] = {}
        rest = []
        for placeholder, destination in fills:
            _, entry, _ = self.tensors[id(placeholder)]
            offset = self._whole_chunk_offset(entry, destination)
            if offset is None:
                rest.append((placeholder, destination))
            elif destination.numel():
                jobs.setdefault(entry.chunks[0].file, []).append((offset, destination.reshape(-1).view(torch.uint8)))
        for path, file_jobs in jobs.items():
            source = FileSource(path)
            try:
                current_backend().read_into(source, file_jobs)
            finally:
                source.close()
        return rest

    def _whole_chunk_offset(self, entry: DcpTensor, destination: torch.Tensor) -> int | None:
        """Where in its ``.distcp`` file the tensor's bytes lie, if one chunk holds all of them
        and they can be read as they are into the destination, a host tensor: the test a torch
        file's records pass to be read straight into a parameter (``_fillable``)."""
        if len(entry.chunks) != 1 or destination.device.type != "cpu":
            return None
        if destination.dtype != torch_dtype(entry.dtype) or tuple(destination.shape) != entry.size:
            return None  # a cast or a reshape: not worth indexing the chunk to find out
        place = entry.chunks[0]
        record = self._chunk_root(place)
        if not isinstance(record, TensorRecord) or (record.size, record.dtype) != (entry.size, entry.dtype):
            return None
        if not _fillable(record, destination):
            return None
        storage = record.storage
        if storage.method != METHOD_STORED or storage.view_of is not None or storage.pieces is not None:
            return None
        start = record.storage_offset * record.dtype.itemsize
        if start + destination.numel() * record.dtype.itemsize > storage.nbytes:
            return None
        return place.offset + storage.data_offset + start

    def _chunk_root(self, place: ChunkPlace) -> Any:
        """The chunk's small torch zip indexed in place: only its directory and pickle are read."""
        mapping = self.maps.get(place.file)
        if mapping is None:
            source = FileSource(place.file)
            try:
                mapping = mmap.mmap(source.fd, 0, access=mmap.ACCESS_READ) if source.size else b""
            finally:
                source.close()
            self.maps[place.file] = mapping
        with index_source(chunk_source(mapping, place), current_backend(), policy=self.policy) as chunk_index:
            return chunk_index.root

    def replaced(self, values: dict[int, Any]) -> dict[str, Any]:
        """The tree with each placeholder (by id) replaced by its value."""

        def swap(node: Any) -> Any:
            if isinstance(node, torch.Tensor):
                return values.get(id(node), node)
            if isinstance(node, dict):
                return {key: swap(item) for key, item in node.items()}
            if isinstance(node, list):
                return [swap(item) for item in node]
            return node

        return swap(self.root)

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        for mapping in self.maps.values():
            if isinstance(mapping, mmap.mmap):
                mapping.close()
        self.maps.clear()

    def __enter__(self) -> DcpSkeleton:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def dcp_device(map_location: MapLocation) -> torch.device:
    """Where DCP's tensors go: their chunks count as saved on "cpu"."""
    location = target_location(map_location, "cpu")
    if location is None:
        raise ValueError(
            "a callable map_location is not supported for DCP directories: pass a device, a string or a dict"
        )
    device = location_device(location)
    if device is None:
        raise ValueError(f"map_location {map_location!r} names no device that DCP tensors can be assembled on")
    return device


def _load_chunk(
    place: ChunkPlace, files: dict[str, int], policy: Any, target: DType | None, map_location: MapLocation = "cpu"
) -> Any:
    from .loading import load_opened

    fd = files.get(place.file)
    if fd is None:
        fd = files[place.file] = os.open(place.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    data = os.pread(fd, place.length, place.offset)
    if len(data) != place.length:
        raise CheckpointError(f"file shrank while being read (chunk at offset {place.offset})", path=place.file)
    source = BufferSource(data, display=f"{place.file} (chunk at offset {place.offset})")
    # Tensor chunks are read to the host and copied into place wherever the tensor is.
    return load_opened(source, map_location, mmap=False, policy=policy, target=target)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
