"""A checkpoint made of several files: a Hugging Face model directory or its index file.

``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) maps every key to the
shard file that holds it: ``{"metadata": {"total_size": N}, "weight_map": {key: file}}``. A
directory without an index holds one ``model.safetensors`` or ``pytorch_model.bin``. This
module finds the files and checks the index against the shards; each shard is then indexed
like any single file, and the callers merge the shards' state dicts in the index's order.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..errors import CheckpointError
from .checkpoint import CheckpointIndex
from .records import StorageRecord

# In the order transformers prefers them.
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
MAX_INDEX_BYTES = 100_000_000


@dataclass(frozen=True)
class ShardedCheckpoint:
    """The shard files in first-use order, and which file each key is in (index order)."""

    index_path: str
    shards: list[str]  # absolute paths
    weight_map: dict[str, str]  # key -> absolute shard path

    @cached_property
    def keys_by_shard(self) -> dict[str, set[str]]:
        by_shard: dict[str, set[str]] = {path: set() for path in self.shards}
        for key, path in self.weight_map.items():
            by_shard[path].add(key)
        return by_shard

    def merge(self, parts: list[tuple[str, dict[str, Any]]]) -> OrderedDict[str, Any]:
        """The shards' ``(path, state dict)`` as one state dict in the index's key order, each
        shard checked against the index first."""
        found: dict[str, Any] = {}
        for shard, state_dict in parts:
            self.check_shard(shard, list(state_dict))
            found.update(state_dict)
        return OrderedDict((key, found[key]) for key in self.weight_map)

    def check_shard(self, shard: str, keys: list[str]) -> None:
        """A shard must hold exactly the keys the index gives it."""
        listed = self.keys_by_shard[shard]
        unlisted = [key for key in keys if key not in listed]
        if unlisted:
            raise CheckpointError(
                f"shard holds {len(unlisted)} keys the index does not list there, e.g. '{unlisted[0]}'"
                + (f" (the index puts it in '{os.path.basename(self.weight_map[unlisted[0]])}')"
                   if unlisted[0] in self.weight_map else ""),
                path=shard,
            )
        held = set(keys)
        absent = [key for key in listed if key not in held]
        if absent:
            raise CheckpointError(
                f"the index lists {len(absent)} keys in this shard that it does not hold, e.g. '{absent[0]}'", path=shard
            )


def checkpoint_files(f: Any) -> ShardedCheckpoint | str | None:
    """What ``f`` names: a sharded checkpoint, the one file a model directory holds, or None
    when ``f`` is not a directory or an index file (then it is read as one checkpoint)."""
    if not isinstance(f, (str, os.PathLike)):
        return None
    path = os.fspath(f)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ".metadata")):  # torch.distributed.checkpoint's: dcp_format
            return None
        for name in INDEX_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return read_index(candidate)
        for name in SINGLE_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise CheckpointError(
            f"directory holds no checkpoint: none of {', '.join(INDEX_NAMES + SINGLE_NAMES)}, nor a DCP .metadata",
            path=path,
        )
    if path.endswith(".index.json"):
        return read_index(path)
    return None


def read_index(index_path: str) -> ShardedCheckpoint:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise CheckpointError(f"index names '{key}' twice", path=index_path)
            result[key] = value
        return result

    try:
        size = os.path.getsize(index_path)
    except FileNotFoundError:
        raise FileNotFoundError(2, "No such file or directory", index_path) from None
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"index of {size} bytes is over the {MAX_INDEX_BYTES} byte limit", path=index_path)
    with open(index_path, "rb") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    try:
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"index is not valid JSON ({exc})", path=index_path) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError("index has no weight_map of key -> shard file names", path=index_path)
    if not weight_map:
        raise CheckpointError("index has an empty weight_map", path=index_path)
    directory = os.path.dirname(os.path.abspath(index_path))
    shards: dict[str, str] = {}  # as named -> absolute path, in first-use order
    resolved: dict[str, str] = {}
    for key, name in weight_map.items():
        if name not in shards:
            shards[name] = _shard_path(directory, name, index_path)
        resolved[key] = shards[name]
    return ShardedCheckpoint(os.path.abspath(index_path), list(shards.values()), resolved)


def _shard_path(directory: str, name: str, index_path: str) -> str:
    """The shard's path, which must be a file directly beside the index."""
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or any(part in ("", ".", "..") for part in parts) or len(parts) != 1:
        raise CheckpointError(f"shard '{name}' is not a file name beside the index (it would escape the directory)",
                              path=index_path)
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"shard '{name}' named by the index is missing", path=index_path)
    return path


@dataclass(eq=False)
class CompositeIndex(CheckpointIndex):
    """The shards' indexes as one: the merged state dict is the root, and each storage is read
    from the shard it belongs to (``part_for``)."""

    parts: list[CheckpointIndex] = field(default_factory=list)
    label: str = ""
    owners: dict[int, CheckpointIndex] = field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.label

    @property
    def file_bytes(self) -> int:
        return sum(part.source.size for part in self.parts)

    def part_for(self, storage: StorageRecord) -> CheckpointIndex:
        held = storage.cast_from.record if storage.cast_from else storage  # a cast is read from its original
        return self.owners[id(held.view_of or held)]

    def can_view(self, storage: StorageRecord) -> bool:
        if storage.pieces is not None:  # assembled from several files: never one view of a file
            return False
        return self.part_for(storage).can_view(storage)

    def close(self) -> None:
        for part in self.parts:
            part.close()


def open_sharded(sharded: ShardedCheckpoint, backend: Any, policy: Any) -> CompositeIndex:
    """Index every shard and merge them (the caller closes the result)."""
    from . import index_checkpoint

    parts: list[CheckpointIndex] = []
    try:
        for shard in sharded.shards:
            parts.append(index_checkpoint(shard, backend, policy=policy))
        owners: dict[int, CheckpointIndex] = {}
        storages: dict[str, StorageRecord] = {}
        for part in parts:
            if not isinstance(part.root, dict):
                raise CheckpointError(f"shard holds a {type(part.root).__name__}, not a state dict", path=part.display)
        root = sharded.merge([(part.display, part.root) for part in parts])
        for part in parts:
            for key, storage in part.storages.items():
                owners[id(storage)] = part
                storages[f"{os.path.basename(part.display)}/{key}"] = storage
        orders = {part.byteorder for part in parts}
        if len(orders) > 1:
            raise CheckpointError("shards differ in byte order", path=sharded.index_path)
        return CompositeIndex(
            source=parts[0].source,
            format="sharded",
            root=root,
            storages=storages,
            byteorder=orders.pop() if orders else "little",
            tensor_records=[record for part in parts for record in part.tensor_records],
            unknown_globals={name: sum(part.unknown_globals.get(name, 0) for part in parts)
                             for part in parts for name in part.unknown_globals},
            unchecked_views=[record for part in parts for record in part.unchecked_views],
            parts=parts,
            label=sharded.index_path,
            owners=owners,
        )
    except BaseException:
        for part in parts:
            part.close()
        raise
