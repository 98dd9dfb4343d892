"""Write a state dict as a Hugging Face sharded checkpoint: ``model-00001-of-0000N.safetensors``
(or ``pytorch_model-00001-of-0000N.bin``) files and their ``*.index.json``, in a directory
that appears complete or not at all.

Tensors are packed greedily in key order into shards of at most the given size; a tensor
larger than that gets a shard of its own. In pt shards, tensors that share a storage (tied
weights, views) go into the same shard, so they stay one storage; safetensors has no
sharing, so there each key is written (and counted) on its own. A checkpoint that fits in
one shard is written as ``model.safetensors`` (``pytorch_model.bin``) without an index, as
Hugging Face writes it.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..index.checkpoint import CheckpointIndex
from ..index.records import TensorRecord, without_parameter
from .atomic import AtomicDirectory
from .pt_writer import WrittenFile, write_pt
from .safetensors_writer import tensor_entries, write_safetensors

if TYPE_CHECKING:
    from .._backend import Backend

SAFETENSORS_NAMES = ("model.safetensors", "model-{:05d}-of-{:05d}.safetensors", "model.safetensors.index.json")
PT_NAMES = ("pytorch_model.bin", "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin.index.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB`` / ``500MB`` (decimal, as Hugging Face counts) or ``2GiB`` (binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"shard size must be a number of bytes or like 5GB, 500MB, 2GiB; not {size!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"shard size must be positive, not {size!r}")
    return value


def pack_shards(groups: list[tuple[list[str], int]], limit: int) -> list[list[str]]:
    """Greedy, in order: ``groups`` are (keys that must stay together, their bytes)."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for keys, nbytes in groups:
        if current and (current_bytes + nbytes > limit or nbytes > limit):
            shards.append(current)
            current, current_bytes = [], 0
        current.extend(keys)
        current_bytes += nbytes
        if nbytes > limit:  # a shard of its own
            shards.append(current)
            current, current_bytes = [], 0
    if current or not shards:
        shards.append(current)
    return shards


def _groups(state_dict: dict[str, Any], safetensors: bool) -> list[tuple[list[str], int]]:
    if safetensors:
        return [([key], record.nbytes) for key, record in tensor_entries(state_dict)]
    by_storage: dict[int, tuple[list[str], int]] = {}
    groups: list[tuple[list[str], int]] = []
    for key, value in state_dict.items():
        record = without_parameter(value)
        if not isinstance(record, TensorRecord):
            raise CheckpointError("is not a dense tensor, which a sharded checkpoint cannot hold", key=key)
        storage = record.storage.view_of or record.storage
        group = by_storage.get(id(storage))
        if group is None:
            group = by_storage[id(storage)] = ([], storage.nbytes)
            groups.append(group)
        group[0].append(key)
    return groups


def _flush_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_sharded(
    index: CheckpointIndex,
    state_dict: dict[str, Any],
    metadata: dict[str, str],
    destination: str,
    *,
    safetensors: bool,
    limit: int,
    overwrite: bool,
    backend: Backend,
    progress: Callable[[int], None] | None = None,
) -> WrittenFile:
    single, numbered, index_name = SAFETENSORS_NAMES if safetensors else PT_NAMES
    shards = pack_shards(_groups(state_dict, safetensors), limit)
    weight_map: dict[str, str] = {}
    total = WrittenFile(tensors_bytes=0, storages=0, file_bytes=0)
    # Each shard is flushed on a thread of its own as soon as it is written, while the next
    # is copied: the disk writes one back as the next fills the page cache, and no fsync
    # holds up the copy. Every flush has finished before the directory gets its name.
    flushes: list[tuple[int, Future[None]]] = []
    with AtomicDirectory(destination, overwrite=overwrite) as directory, ThreadPoolExecutor(1) as flusher:
        try:
            for number, keys in enumerate(shards, start=1):
                name = single if len(shards) == 1 else numbered.format(number, len(shards))
                part = type(state_dict)((key, state_dict[key]) for key in keys)
                fd = directory.create(name)
                try:
                    if safetensors:
                        written = write_safetensors(index, part, metadata, fd, backend, progress)
                    else:
                        written = write_pt(index, part, fd, name, backend, progress)
                except BaseException:
                    os.close(fd)
                    raise
                flushes.append((fd, flusher.submit(_flush_and_close, fd)))
                weight_map.update((key, name) for key in keys)
                total.tensors_bytes += written.tensors_bytes
                total.storages += written.storages
                total.file_bytes += written.file_bytes
        except BaseException:
            for fd, flush in flushes:
                if flush.cancel():  # never started: nothing will close it
                    os.close(fd)
                else:
                    flush.exception()  # wait: the directory must not be removed under a flush
            raise
        for _, flush in flushes:
            flush.result()  # an fsync that failed fails the conversion
        if len(shards) > 1:
            in_key_order = {key: weight_map[key] for key in state_dict}  # as a reader merges them
            document = {"metadata": {"total_size": total.tensors_bytes}, "weight_map": in_key_order}
            encoded = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            directory.write_small(index_name, encoded)
            total.file_bytes += len(encoded)
    return total
