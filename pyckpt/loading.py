"""``pyckpt.load``: the pipeline index -> rename -> plan -> execute -> objects."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from contextlib import ExitStack
from typing import Any

import torch

from ._collector import without_collector
from ._backend import current_backend
from ._device import MapLocation, check_map_location
from .errors import CheckpointError
from .execute import execute_plan
from .execute.cooperative import GroupLoad, check_process_group, fingerprint
from .execute.device import ring_module
from .execute.storages import plan_storage_fills
from .casting import cast_tree
from .float_cast import cast_target
from .index import index_opened
from .index.symbols import DType
from .index.policy import UNKNOWN_ERROR, policy_for
from .index.sharded import ShardedCheckpoint, checkpoint_files
from .index.dcp_format import is_dcp_directory
from .index.source import FileArg, open_source
from .plan import plan_storages
from .rename import AUTO, RenameRules, make_key_map, rename_tree
from .sinks.objects import build_objects
from .source_loading import load_opened

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
    dtype: Any = None,
    process_group: Any = None,
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
        dtype: cast floating-point tensors to ``torch.bfloat16``, ``torch.float16`` or
            ``torch.float32`` (or ``"bf16"``, ``"fp16"``, ``"fp32"``) while they are read, a
            chunk at a time; integer, bool, complex and quantized tensors are left as they are.
            Views and tied weights still share one storage.
        process_group: a ``torch.distributed`` group whose ranks all load the same file (every
            rank calls this): each reads about 1/N of its bytes and the ranks share them by
            broadcast (gloo for host memory, NCCL for CUDA), into tensors of their own memory
            (``mmap=True`` cannot be combined with it). A failure on any rank raises
            ``CheckpointError`` on every rank. Files, sharded and DCP directories.
    """
    group = check_process_group(process_group)
    if group is not None:
        if mmap:
            raise ValueError("mmap=True cannot be combined with process_group: shared bytes need memory of their own")
        if not weights_only:
            raise ValueError("process_group cannot be combined with weights_only=False")
        with GroupLoad(group, current_backend()) as session:
            return _load_on_group(f, map_location, session, strip_prefix, rename, unknown_globals, dtype)
    policy = policy_for(unknown_globals)
    target = None if dtype is None else cast_target(dtype)
    check_map_location(map_location)
    key_map = make_key_map(_check_strip_prefix(strip_prefix), _check_rules(rename))
    is_path = isinstance(f, (str, os.PathLike))
    if mmap and not is_path:
        raise ValueError("f must be a file path in order to use the mmap argument")
    if not weights_only:
        if target is not None:
            raise ValueError("dtype= casts what pyckpt reads itself; it cannot be combined with weights_only=False")
        warnings.warn(UNSAFE_WARNING, UserWarning, stacklevel=2)
        obj = torch.load(f, map_location=map_location, weights_only=False, mmap=mmap)
        return rename_tree(obj, key_map)
    files = checkpoint_files(f)
    if isinstance(files, ShardedCheckpoint):
        return rename_tree(_load_shards(files, map_location, mmap, unknown_globals, target), key_map)
    if files is not None:  # a model directory holding one file
        f = files
    if is_dcp_directory(f):
        from .dcp_loading import load_dcp

        return rename_tree(load_dcp(os.fspath(f), map_location, unknown_globals, target), key_map)
    return load_opened(open_source(f), map_location, mmap=mmap, policy=policy, key_map=key_map, target=target)


def _load_on_group(
    f: FileArg, map_location: MapLocation, session: GroupLoad, strip_prefix: str | None, rename: RenameRules | None,
    unknown_globals: str, dtype: Any,
) -> Any:
    """``load`` of one file, a sharded directory or a DCP directory, its bytes read by the ranks
    of a process group together (one exchange for every file)."""
    if not isinstance(f, (str, os.PathLike)):
        raise ValueError("process_group needs the checkpoint's path, not a file object")
    policy = policy_for(unknown_globals)
    target = None if dtype is None else cast_target(dtype)
    check_map_location(map_location)
    key_map = make_key_map(_check_strip_prefix(strip_prefix), _check_rules(rename))
    if is_dcp_directory(f):
        from .dcp_loading import load_dcp

        return rename_tree(load_dcp(os.fspath(f), map_location, unknown_globals, target, session), key_map)
    files = checkpoint_files(f)
    paths = files.shards if isinstance(files, ShardedCheckpoint) else [f if files is None else files]
    backend = current_backend()
    with ExitStack() as opened:
        planned = []
        for path in paths:
            index = opened.enter_context(index_opened(open_source(path), backend, policy=policy))
            try:
                # a shard is renamed with the others (below), so collisions across shards are seen
                root = cast_tree(index.root if len(paths) > 1 else rename_tree(index.root, key_map), target)
                plans = plan_storages(root, map_location, mmap=False, can_map=False)
            except CheckpointError as exc:
                raise exc.located(path=index.display)
            planned.append((index, root, plans))
        on_cuda = any(p.device is not None and p.device.type == "cuda" for _, _, plans in planned for p in plans.values())
        ring = ring_module() if on_cuda and backend.name == "native" else None
        fills = [plan_storage_fills(plans, ring) for _, _, plans in planned]
        session.share([(index.source, fingerprint(index)) for index, _, _ in planned], [jobs for _, jobs in fills], ring=ring)
        loaded = []
        for (index, root, plans), (ready, _) in zip(planned, fills):
            try:
                storages = execute_plan(index, plans, map_location, backend, ready=ready)
                loaded.append((index.display, build_objects(root, storages)))
            except CheckpointError as exc:
                raise exc.located(path=index.display)
            except RecursionError:
                raise CheckpointError("object tree nests too deeply", path=index.display) from None
    if len(paths) == 1:
        return loaded[0][1]
    for shard, part in loaded:
        if not isinstance(part, dict):
            raise CheckpointError(f"shard holds a {type(part).__name__}, not a state dict", path=shard)
    return rename_tree(files.merge(loaded), key_map)  # type: ignore[union-attr]


def _load_shards(
    sharded: ShardedCheckpoint, map_location: MapLocation, mmap: bool | None, unknown_globals: str,
    target: DType | None,
) -> OrderedDict[str, Any]:
    """Every shard's tensors, as one state dict in the index's key order (renamed after, so
    renaming and its collision errors see every key at once)."""
    parts = []
    for shard in sharded.shards:
        part = load(shard, map_location, mmap=mmap, unknown_globals=unknown_globals, dtype=target and target.name)
        if not isinstance(part, dict):
            raise CheckpointError(f"shard holds a {type(part).__name__}, not a state dict", path=shard)
        parts.append((shard, part))
    return sharded.merge(parts)


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
