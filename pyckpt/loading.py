"""``pyckpt.load``: the pipeline index -> rename -> plan -> execute -> objects."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any

import torch

from ._collector import without_collector
from ._backend import current_backend
from ._device import MapLocation, check_map_location
from .errors import CheckpointError
from .execute import execute_plan
from .execute.direct import NOTHING, cpu_only, load_direct
from .index import index_opened
from .index.policy import UNKNOWN_ERROR, GlobalsPolicy, policy_for
from .index.sharded import ShardedCheckpoint, checkpoint_files
from .index.dcp_format import is_dcp_directory
from .index.source import BufferSource, FileArg, Source, open_source
from .plan import plan_index
from .rename import AUTO, KeyMap, RenameRules, make_key_map, rename_tree
from .sinks.objects import build_objects

UNSAFE_WARNING = (
    "pyckpt.load(weights_only=False) hands the file to torch.load with pickle enabled: "
    "a malicious checkpoint can run arbitrary code. Only use it on files you trust."
)


@without_collector
def load(
    f: FileArg,
    map_location: MapLocation = None,
    *,
    weights_only: bool = True,
    mmap: bool | None = None,
    strip_prefix: str | None = None,
    rename: RenameRules | None = None,
    unknown_globals: str = UNKNOWN_ERROR,
) -> Any:
    """Load a checkpoint like ``torch.load(f, weights_only=True)``, without running pickle.

    Args:
        f: a path, or a binary file-like object.
        map_location: where storages go; torch's forms (None, str, device, dict, callable).
        weights_only: False hands the file to ``torch.load`` (runs pickle; trusted files only).
        mmap: None lets pyckpt choose (mapped on CPU when it can), True maps every record
            stored raw and aligned (others are read), False gives tensors their own memory.
        strip_prefix: None, a prefix such as ``"module."``, or ``"auto"`` for wrapper prefixes.
        rename: ``(regex, replacement)`` pairs applied with ``re.sub`` after ``strip_prefix``.
        unknown_globals: ``"error"`` (default: refuse what torch's weights_only refuses) or
            ``"opaque"``: keep every other global as an inert :class:`pyckpt.Opaque` record
            (nothing is imported or run; tensors inside are real).
    """
    policy = policy_for(unknown_globals)
    check_map_location(map_location)
    key_map = make_key_map(_check_strip_prefix(strip_prefix), _check_rules(rename))
    is_path = isinstance(f, (str, os.PathLike))
    if mmap and not is_path:
        raise ValueError("f must be a file path in order to use the mmap argument")
    if not weights_only:
        warnings.warn(UNSAFE_WARNING, UserWarning, stacklevel=2)
        obj = torch.load(f, map_location=map_location, weights_only=False, mmap=mmap)
        return rename_tree(obj, key_map)
    files = checkpoint_files(f)
    if isinstance(files, ShardedCheckpoint):
        return rename_tree(_load_shards(files, map_location, mmap, unknown_globals), key_map)
    if files is not None:  # a model directory holding one file
        f = files
    if is_dcp_directory(f):
        from .dcp_loading import load_dcp

        return rename_tree(load_dcp(os.fspath(f), map_location, unknown_globals), key_map)
    return load_opened(open_source(f), map_location, mmap=mmap, policy=policy, key_map=key_map)


def load_opened(
    source: Source,
    map_location: MapLocation,
    *,
    mmap: bool | None,
    policy: GlobalsPolicy,
    key_map: KeyMap | None = None,
) -> Any:
    """``load`` of a source already open (closed when done)."""
    backend = current_backend()
    shared_mapping = mmap is True and _mmap_shared()
    try:
        if cpu_only(map_location):  # a plain checkpoint to CPU: one native pass, when it can
            direct = load_direct(source, backend, policy, mmap=mmap, shared_mapping=shared_mapping)
            if direct is not NOTHING:
                if isinstance(source, BufferSource):
                    source.leave_stream_at(source.size)
                source.close()  # the tensors keep the mapping, not the descriptor
                try:
                    return rename_tree(direct, key_map)
                except CheckpointError as exc:
                    raise exc.located(path=source.display)
        index = index_opened(source, backend, policy=policy)
    except BaseException:
        source.close()
        raise
    with index:
        try:
            root = rename_tree(index.root, key_map)
            plans = plan_index(index, root, map_location, mmap=mmap, can_map=index.source.path is not None)
            storages = execute_plan(index, plans, map_location, backend, shared_mapping=shared_mapping)
            return build_objects(root, storages, backend.make_tensors(index.tensor_records, storages))
        except CheckpointError as exc:
            raise exc.located(path=index.display)
        except RecursionError:
            raise CheckpointError("object tree nests too deeply", path=index.display) from None


def _load_shards(
    sharded: ShardedCheckpoint, map_location: MapLocation, mmap: bool | None, unknown_globals: str
) -> OrderedDict[str, Any]:
    """Every shard's tensors, as one state dict in the index's key order (renamed after, so
    renaming and its collision errors see every key at once)."""
    parts = []
    for shard in sharded.shards:
        part = load(shard, map_location, mmap=mmap, unknown_globals=unknown_globals)
        if not isinstance(part, dict):
            raise CheckpointError(f"shard holds a {type(part).__name__}, not a state dict", path=shard)
        parts.append((shard, part))
    return sharded.merge(parts)


def _mmap_shared() -> bool:
    """Whether the user told torch to map checkpoints MAP_SHARED (``set_default_mmap_options``).

    Honoured for ``mmap=True`` only, as torch does; pyckpt's own default mapping (``mmap=None``)
    stays private, so writing to a loaded tensor never changes the file unless asked for.
    """
    import mmap as mmap_module

    get = getattr(torch.serialization, "get_default_mmap_options", None)
    return get is not None and get() == getattr(mmap_module, "MAP_SHARED", None)


def _check_strip_prefix(strip_prefix: Any) -> str | None:
    if strip_prefix is None or strip_prefix == AUTO:
        return strip_prefix
    if isinstance(strip_prefix, str):
        return strip_prefix
    raise TypeError(f"strip_prefix must be None, 'auto' or a prefix string, not {type(strip_prefix).__name__}")


def _check_rules(rename: Any) -> RenameRules | None:
    if rename is None:
        return None
    if isinstance(rename, (str, bytes)) or not all(
        isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], str) for rule in rename
    ):
        raise TypeError("rename must be a list of (regex, replacement) pairs")
    return [(pattern, replacement) for pattern, replacement in rename]
