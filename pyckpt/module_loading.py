"""``pyckpt.load_state_dict``: a checkpoint into an existing model, whatever the wrapping.

The checkpoint's state dict is found (``key=``, ``state_dict``, ``model``...), its keys are
matched to the model's through the wrapper prefixes on either side, and the bytes go
straight into the parameters' and buffers' own memory wherever layouts agree. The rest
(dtype changes, odd layouts, modules with custom loading) is staged in host memory.
Finally ``model.load_state_dict`` runs, so ``strict``, ``assign``, hooks, error messages
and the returned ``_IncompatibleKeys`` are torch's own; the directly filled entries are
passed as the parameters themselves, which torch's copy skips.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from ._collector import without_collector
from ._backend import current_backend
from ._device import MapLocation, check_map_location
from .errors import CheckpointError
from .boxes import is_dtensor
from .dtensor_loading import dtensor_from_full
from .execute import execute_plan
from .execute.cooperative import GroupLoad, check_process_group, fingerprint
from .index import index_checkpoint
from .index.checkpoint import CheckpointIndex
from .index.dcp_format import is_dcp_directory
from .index.policy import UNKNOWN_OPAQUE, policy_for
from .index.sharded import ShardedCheckpoint, checkpoint_files
from .index.source import FileArg
from .model_fill import plan_direct_fills
from .plan import plan_storages
from .rename import find_state_dict, key_matcher, module_matcher, rename_state_dict
from .sinks.model_driver import load_into_model
from .sinks.objects import build_objects


@without_collector
def load_state_dict(
    model: nn.Module,
    f: FileArg,
    *,
    strict: bool = True,
    map_location: MapLocation = None,
    key: str | None = None,
    assign: bool = False,
    process_group: Any = None,
) -> Any:
    """Load a checkpoint into ``model`` like ``model.load_state_dict(torch.load(f))``.

    Wrapper prefixes are resolved in both directions (a DataParallel/DDP, ``torch.compile``
    or FSDP checkpoint into a plain model and the reverse), the state dict is found inside
    training checkpoints or pickled modules (``torch.save(model)``), and tensors are written
    straight into the model's memory. The file is read in opaque mode: objects of classes
    beyond torch's allowlist around the state dict are never imported or run.

    Parameters that are DTensors (FSDP2 ``fully_shard``, tensor parallel) get only this
    rank's shard, read straight from the file: no rank holds a full tensor and no collective
    runs. ``Shard(dim)`` and ``Replicate()`` placements are supported, ``Partial`` refused.

    Args:
        model: the module to fill.
        f: a path or a binary file-like object.
        strict: as in ``nn.Module.load_state_dict``.
        map_location: where checkpoint tensors that cannot be written directly are staged
            (default: host memory).
        key: the entry of a training checkpoint that holds the state dict (or the module).
        assign: as in ``nn.Module.load_state_dict``: the checkpoint's tensors replace the
            parameters (they keep the parameters' ``requires_grad``).
        process_group: a ``torch.distributed`` group whose ranks all load the same file into
            the same model (every rank calls this). Each rank then reads about 1/N of the
            bytes that go straight into the model and the ranks share them by broadcast on
            the group's backend (gloo for host memory, NCCL for CUDA). A failure on any rank
            raises ``CheckpointError`` on every rank. None: each rank reads what it needs.

    Returns:
        torch's ``_IncompatibleKeys`` (``missing_keys``, ``unexpected_keys``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
    check_map_location(map_location)
    group = check_process_group(process_group)
    args = (model, f, strict, map_location, key, assign)
    if group is None:
        return _load_state_dict(*args, None)
    with GroupLoad(group, current_backend()) as session:
        return _load_state_dict(*args, session)


def _load_state_dict(
    model: nn.Module, f: FileArg, strict: bool, map_location: MapLocation, key: str | None, assign: bool,
    session: GroupLoad | None,
) -> Any:
    backend = current_backend()
    targets = model.state_dict(keep_vars=True)
    staged_location = "cpu" if map_location is None else map_location
    if is_dcp_directory(f):
        from .dcp_loading import load_dcp_into

        return load_dcp_into(model, os.fspath(f), targets, key=key, strict=strict, assign=assign,
                             map_location=map_location, session=session)
    files = checkpoint_files(f)
    sharded = files if isinstance(files, ShardedCheckpoint) else None
    with ExitStack() as opened:
        # Only the state dict is returned, so objects around it cannot matter: read them opaque.
        indexes = [
            opened.enter_context(index_checkpoint(path, backend, policy=policy_for(UNKNOWN_OPAQUE)))
            for path in (sharded.shards if sharded is not None else [f if files is None else files])
        ]
        found, owners = _found_state_dict(indexes, sharded, key)
        try:
            state_dict = rename_state_dict(found, key_matcher(found, targets), module_map=module_matcher(model))
        except CheckpointError as exc:
            raise exc.located(path=indexes[0].display if sharded is None else sharded.index_path)
        parts = [
            # This file's part of the (renamed) state dict: renaming keeps the key order.
            (index, state_dict if sharded is None else type(state_dict)(
                (new, value) for (new, value), owner in zip(state_dict.items(), owners) if owner is index))
            for index in indexes
        ]
        directs = plan_direct_fills(parts, targets, model, backend, assign=assign, for_group=session is not None)
        if session is not None:  # the ranks split the reads of what every rank holds alike
            session.share([(index.source, fingerprint(index)) for index in indexes], [d.shared for d in directs],
                          ring=next((d.ring for d in directs if d.ring is not None), None))
        filled: dict[str, Any] = {}
        for (index, part), direct in zip(parts, directs):
            try:
                if session is None:
                    direct.run(index, backend)
                else:  # the shared jobs ran in the exchange above
                    direct.own.run(index.source, backend, direct.ring)
                filled.update(_staged(index, part, direct.values, targets, backend, staged_location, assign))
            except CheckpointError as exc:
                raise exc.located(path=index.display)
    final = type(state_dict)()
    for name in state_dict:
        final[name] = filled[name]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        final._metadata = metadata  # type: ignore[attr-defined]
    return load_into_model(model, final, strict=strict, assign=assign)


def _found_state_dict(
    indexes: list[CheckpointIndex], sharded: ShardedCheckpoint | None, key: str | None
) -> tuple[Any, list[Any]]:
    """The state dict (of records) of one file, or of every shard merged in the index's key
    order; and which index each entry is from."""
    if sharded is None:
        try:
            found = find_state_dict(indexes[0].root, key)
        except CheckpointError as exc:
            raise exc.located(path=indexes[0].display)
        return found, [indexes[0]] * len(found)
    parts = []
    for index in indexes:
        try:
            parts.append((index.display, find_state_dict(index.root, key)))
        except CheckpointError as exc:
            raise exc.located(path=index.display)
    by_shard = {index.display: index for index in indexes}
    return sharded.merge(parts), [by_shard[sharded.weight_map[name]] for name in sharded.weight_map]


def _staged(
    index: CheckpointIndex,
    state_dict: Any,
    values: dict[str, Any],
    targets: dict[str, Any],
    backend: Any,
    staged_location: MapLocation,
    assign: bool,
) -> dict[str, Any]:
    """One file's entries: those filled directly (``values``), and the rest staged."""
    staged = {k: v for k, v in state_dict.items() if k not in values}
    # Staged tensors are read, not mapped: a file truncated under us must not SIGBUS the copy
    # into the model. With assign=True they become the parameters, so they are mapped like
    # torch.load(mmap=True) would.
    plans = plan_storages(staged, staged_location, mmap=None if assign else False, can_map=index.source.path is not None)
    storages = execute_plan(index, plans, staged_location, backend)
    built = build_objects(staged, storages)
    for name in staged:  # DTensor targets whose bytes cannot be read by range: cut their box out
        if is_dtensor(targets.get(name)) and isinstance(built[name], torch.Tensor):
            built[name] = dtensor_from_full(name, built[name], targets[name])
    return {name: values[name] if name in values else built[name] for name in state_dict}
