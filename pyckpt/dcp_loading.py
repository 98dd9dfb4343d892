"""``pyckpt.load`` and ``load_state_dict`` of a ``torch.distributed.checkpoint`` directory.

Gives what ``dcp_to_torch_save`` writes, loaded back: the same nesting (rebuilt from the
metadata's ``planner_data``), every tensor assembled from its chunks and every other value
from its own small torch file. Each chunk is a torch zip inside a ``.distcp`` file; it is
read with the same restricted loader as any checkpoint, so nothing in it runs. On a process
group, the chunk bytes that go straight into place (into host memory, or into CUDA memory
through the native ring) are read once across the ranks (``execute.cooperative``); chunks
that must be loaded whole are read by each rank.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import zlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._backend import current_backend
from ._device import MapLocation, location_device, target_location
from .errors import CheckpointError
from .boxes import box_runs, intersect, is_dtensor, local_box, wrap_local
from .dtensor_loading import readable_by_range
from .execute.cpu import CopyJob
from .execute.device import ring_capable, ring_module
from .execute.fill_jobs import FillJobs
from .index.dcp_format import ChunkPlace, DcpTensor, chunk_source, read_dcp_metadata, set_element
from .index.policy import UNKNOWN_OPAQUE, policy_for
from .index import index_source
from .index.records import StorageRecord, TensorRecord
from .index.source import BufferSource, FileSource
from .index.symbols import DType
from .float_cast import casts
from .tied_targets import tied_keys
from .model_fill import owner_of, owners_allowing_direct_fill
from .sinks.model_driver import load_into_model
from .rename import find_state_dict, key_matcher, module_matcher, rename_state_dict
from .sinks.torch_values import takes_bytes_as_they_are, torch_dtype
from .source_loading import load_opened

if TYPE_CHECKING:
    from .execute.cooperative import GroupLoad


# (placeholder, destination, start): the destination holds the box of its shape at ``start``
Fill = tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]


def load_dcp(
    directory: str, map_location: MapLocation, unknown_globals: str, target: DType | None = None,
    session: GroupLoad | None = None,
) -> dict[str, Any]:
    """Every entry, tensors assembled from their chunks (each chunk cast to ``target`` as it is read)."""
    device = dcp_device(map_location)
    with DcpSkeleton(directory, unknown_globals, map_location) as skeleton:
        fills = []
        for placeholder, entry, _ in skeleton.tensors.values():
            dtype = target if casts(entry.dtype, target) else entry.dtype
            value = torch.empty(entry.size, dtype=torch_dtype(dtype), device=device)  # type: ignore[arg-type]
            fills.append((placeholder, value, (0,) * value.dim()))
        skeleton.fill(fills, target, session)
        return skeleton.replaced({id(placeholder): value for placeholder, value, _ in fills})


def load_dcp_into(
    model: nn.Module,
    directory: str,
    targets: dict[str, Any],
    *,
    key: str | None,
    strict: bool,
    assign: bool,
    map_location: MapLocation,
    session: GroupLoad | None = None,
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
        owners = owners_allowing_direct_fill(model)  # modules that load their state as torch's do
        tensors = {name: value for name, value in renamed.items()
                   if isinstance(value, torch.Tensor) and id(value) in skeleton.tensors}
        tied = tied_keys(targets, {name: tuple(value.shape) for name, value in tensors.items()},
                         lambda name: owner_of(name) in owners, assign=assign)
        fills: list[Fill] = []
        final = type(renamed)()
        for name, value in renamed.items():
            if name not in tensors:
                final[name] = value
                continue
            target = targets.get(name)
            in_place = not assign and owner_of(name) in owners and name not in tied.staged
            if is_dtensor(target) and tuple(target.shape) == tuple(value.shape):  # this rank's box only
                box = local_box(target, name)
                local = box.local if in_place else torch.empty(box.shape, dtype=value.dtype, device=box.local.device)
                fills.append((value, local, box.start))
                final[name] = target if in_place else wrap_local(target, local)
                continue
            in_place = in_place and _takes_in_place(target, value)
            if in_place and name in tied.later:
                # Left as its later key's bytes leave it (see tied_targets). That key is filled in
                # place too: one memory, one shape, and a module that loads plainly, so the same
                # test holds for it; staged, both would be, and torch copies them in order.
                final[name] = target
                continue
            destination = target.detach() if in_place else torch.empty(value.shape, dtype=value.dtype, device=staged_device)
            fills.append((value, destination, (0,) * value.dim()))
            final[name] = target if in_place else destination
        skeleton.fill(fills, session=session)
    metadata = getattr(renamed, "_metadata", None)
    if metadata is not None:
        final._metadata = metadata  # type: ignore[attr-defined]
    return load_into_model(model, final, strict=strict, assign=assign)


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

    def fill(self, fills: list[Fill], target: DType | None = None, session: GroupLoad | None = None) -> None:
        """Assemble each placeholder's chunks into its destination, the box of the tensor of
        the destination's shape at ``start`` (all of it, or a DTensor's local shard), on any
        device; ``copy_`` casts where the dtypes differ, as ``param.copy_`` would. Only the
        chunks that meet the box are read.

        Where a chunk's bytes lie raw in its ``.distcp`` file and the destination is dense
        memory of their dtype, the part of the chunk inside the box is read straight into
        place, run by run (the chunk's storage found by indexing its small zip in place):
        into host memory with the parallel reads a torch file gets, into CUDA memory through
        the native ring's pinned buffers, as a torch file's tensors go. Other chunks are
        loaded whole and their part copied, one chunk at a time. On a process group
        (``session``) the ranks share the direct reads, each reading about 1/N of them."""
        on_cuda = any(destination.device.type == "cuda" for _, destination, _ in fills)
        ring = ring_module() if on_cuda and current_backend().name == "native" else None
        reads: dict[str, FillJobs] = {}
        records: dict[str, list[StorageRecord]] = {}  # per file, the chunk records read in place
        for placeholder, destination, start in fills:
            _, entry, key = self.tensors[id(placeholder)]
            expected = torch_dtype(target if casts(entry.dtype, target) else entry.dtype)  # type: ignore[arg-type]
            for chunk in entry.chunks:
                common = intersect(chunk.offsets, chunk.sizes, start, tuple(destination.shape))
                if common is None:
                    continue
                at, size = common
                if target is None and self._plan_reads(chunk, entry, destination, start, at, size, reads, records, ring):
                    continue
                part = _load_chunk(chunk, self.files, self.policy, target)
                if not isinstance(part, torch.Tensor) or part.dtype != expected or tuple(part.shape) != chunk.sizes:
                    raise CheckpointError(
                        f"chunk at {list(chunk.offsets)} holds {_describe(part)}, not a {expected} tensor of "
                        f"shape {list(chunk.sizes)}",
                        key=key,
                    )
                with torch.no_grad():
                    destination[_slices(at, size, start)] = part[_slices(at, size, chunk.offsets)]
        sources = []
        try:
            for path in reads:
                sources.append(FileSource(path))
            if session is None:
                for source, jobs in zip(sources, reads.values()):
                    jobs.run(source, current_backend(), ring)
            else:  # every rank calls this, with or without reads of its own
                session.share([(source, (source.size, _chunk_digest(records[path]))) for source, path in zip(sources, reads)],
                              list(reads.values()), ring)
        finally:
            for source in sources:
                source.close()

    def _plan_reads(
        self, chunk: ChunkPlace, entry: DcpTensor, destination: torch.Tensor, start: tuple[int, ...],
        at: tuple[int, ...], size: tuple[int, ...], reads: dict[str, FillJobs],
        records: dict[str, list[StorageRecord]], ring: Any,
    ) -> bool:
        """Plan reading the chunk's part ``(at, size)`` straight into the destination, if its
        bytes can be read as they are (else False): host memory, or CUDA memory when the
        native ring can take raw bytes there."""
        on_host = destination.device.type == "cpu"
        if (
            not (on_host or (ring is not None and destination.device.type == "cuda"))
            or destination.dtype != torch_dtype(entry.dtype)
            or not takes_bytes_as_they_are(destination)
        ):
            return False
        record = self._chunk_root(chunk)
        if not isinstance(record, TensorRecord) or (record.size, record.dtype) != (chunk.sizes, entry.dtype):
            return False
        storage, width = record.storage, record.dtype.itemsize
        if not readable_by_range(record) or (record.storage_offset + record.numel) * width > storage.nbytes:
            return False
        if not on_host and not ring_capable(storage):
            return False
        runs = box_runs(
            size, chunk.sizes, tuple(a - o for a, o in zip(at, chunk.offsets)),
            tuple(destination.shape), tuple(a - s for a, s in zip(at, start)),
        )
        in_file = dataclasses.replace(storage, data_offset=chunk.offset + storage.data_offset)  # the chunk's place
        base = record.storage_offset * width
        dest = destination.reshape(-1).view(torch.uint8)
        jobs = reads.setdefault(chunk.file, FillJobs())
        records.setdefault(chunk.file, []).append(in_file)
        length = runs.length * width
        for source_at, dest_at in zip((runs.source * width).tolist(), (runs.dest * width).tolist()):
            if on_host:
                jobs.host.append(CopyJob(in_file, base + source_at, dest[dest_at : dest_at + length]))
            else:
                jobs.add_device(destination.device, (in_file.data_offset + base + source_at, length, dest, dest_at))
        return True

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
        return _swap(self.root, values)

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


def _swap(node: Any, values: dict[int, Any]) -> Any:
    # A function of the module, not a closure calling itself: that closure would be a reference
    # cycle holding ``values``, every loaded tensor, until the next garbage collection.
    if isinstance(node, torch.Tensor):
        return values.get(id(node), node)
    if isinstance(node, dict):
        return {key: _swap(item, values) for key, item in node.items()}
    if isinstance(node, list):
        return [_swap(item, values) for item in node]
    return node


def _chunk_digest(records: list[StorageRecord]) -> int:
    """What ranks compare for a ``.distcp`` file besides its size: the place and CRC-32 of every
    chunk record read from it, as each chunk's zip gives them (two saves of tensors of the same
    shapes have the same sizes and ``.metadata``, but not the same CRC-32s)."""
    digest = 0
    for record in dict.fromkeys(records):
        digest = zlib.crc32(f"{record.data_offset}:{record.nbytes}:{record.crc32}\n".encode(), digest)
    return digest


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
    fd = files.get(place.file)
    if fd is None:
        fd = files[place.file] = os.open(place.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    data = os.pread(fd, place.length, place.offset)
    if len(data) != place.length:
        raise CheckpointError(f"file shrank while being read (chunk at offset {place.offset})", path=place.file)
    source = BufferSource(data, display=f"{place.file} (chunk at offset {place.offset})")
    # Tensor chunks are read to the host and copied into place wherever the tensor is.
    return load_opened(source, map_location, mmap=False, policy=policy, target=target)


def _slices(at: tuple[int, ...], size: tuple[int, ...], origin: tuple[int, ...]) -> tuple[slice, ...]:
    """The box ``(at, size)`` as indices into a tensor whose element 0 is at ``origin``."""
    return tuple(slice(a - o, a - o + s) for a, s, o in zip(at, size, origin))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
