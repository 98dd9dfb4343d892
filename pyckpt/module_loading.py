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
from collections import OrderedDict
from contextlib import ExitStack
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._collector import without_collector
from ._backend import current_backend
from ._device import MapLocation, check_map_location
from .errors import CheckpointError
from .execute import execute_plan
from .execute.cast_fill import cast_into_device
from .execute.cpu import CopyJob, run_copy_jobs
from .execute.device import copy_pieces, ring_capable, ring_config, ring_module
from .index import index_checkpoint
from .index.checkpoint import CheckpointIndex
from .index.dcp_format import is_dcp_directory
from .index.policy import UNKNOWN_OPAQUE, policy_for
from .float_cast import CAST_SOURCES, CAST_TARGETS
from .index.records import METHOD_STORED, ParameterRecord, TensorRecord
from .index.sharded import ShardedCheckpoint, checkpoint_files
from .index.source import FileArg
from .plan import check_view, plan_storages
from .rename import find_state_dict, rename_state_dict, strip_auto
from .sinks.objects import build_objects
from .sinks.torch_values import same_dtype


# Modules whose own _load_from_state_dict only adds or adjusts bookkeeping entries and then
# copies parameters like nn.Module does, so their parameters may be filled directly.
_DIRECT_FILL_SAFE_LOADERS = {nn.Module._load_from_state_dict}
try:
    from torch.nn.modules.batchnorm import _NormBase

    _DIRECT_FILL_SAFE_LOADERS.add(_NormBase._load_from_state_dict)
except ImportError:  # pragma: no cover - torch layout change
    pass


@without_collector
def load_state_dict(
    model: nn.Module,
    f: FileArg,
    *,
    strict: bool = True,
    map_location: MapLocation = None,
    key: str | None = None,
    assign: bool = False,
) -> Any:
    """Load a checkpoint into ``model`` like ``model.load_state_dict(torch.load(f))``.

    Wrapper prefixes are resolved in both directions (a DataParallel/DDP, ``torch.compile``
    or FSDP checkpoint into a plain model and the reverse), the state dict is found inside
    training checkpoints or pickled modules (``torch.save(model)``), and tensors are written
    straight into the model's memory. The file is read in opaque mode: objects of classes
    beyond torch's allowlist around the state dict are never imported or run.

    Args:
        model: the module to fill.
        f: a path or a binary file-like object.
        strict: as in ``nn.Module.load_state_dict``.
        map_location: where checkpoint tensors that cannot be written directly are staged
            (default: host memory).
        key: the entry of a training checkpoint that holds the state dict (or the module).
        assign: as in ``nn.Module.load_state_dict``: the checkpoint's tensors replace the
            parameters (they keep the parameters' ``requires_grad``).

    Returns:
        torch's ``_IncompatibleKeys`` (``missing_keys``, ``unexpected_keys``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
    check_map_location(map_location)
    backend = current_backend()
    targets = model.state_dict(keep_vars=True)
    staged_location = "cpu" if map_location is None else map_location
    if is_dcp_directory(f):
        from .dcp_loading import load_dcp_into

        return load_dcp_into(model, os.fspath(f), targets, key=key, strict=strict, assign=assign,
                             map_location=map_location)
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
        filled: dict[str, Any] = {}
        for index in indexes:
            # This file's part of the (renamed) state dict: renaming keeps the key order.
            part = state_dict if sharded is None else type(state_dict)(
                (new, value) for (new, value), owner in zip(state_dict.items(), owners) if owner is index
            )
            try:
                filled.update(_fill_from(index, part, targets, model, backend, staged_location, assign))
            except CheckpointError as exc:
                raise exc.located(path=index.display)
    final = type(state_dict)()
    for name in state_dict:
        final[name] = filled[name]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        final._metadata = metadata  # type: ignore[attr-defined]
    return _load_into(model, final, strict=strict, assign=assign)


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


def _fill_from(
    index: CheckpointIndex,
    state_dict: Any,
    targets: dict[str, Any],
    model: nn.Module,
    backend: Any,
    staged_location: MapLocation,
    assign: bool,
) -> dict[str, Any]:
    """One file's entries: written straight into the model where they can be, else staged."""
    values = _direct_fill(index, state_dict, targets, model, backend) if not assign else {}
    staged = {k: v for k, v in state_dict.items() if k not in values}
    # Staged tensors are read, not mapped: a file truncated under us must not SIGBUS the copy
    # into the model. With assign=True they become the parameters, so they are mapped like
    # torch.load(mmap=True) would.
    plans = plan_storages(staged, staged_location, mmap=None if assign else False, can_map=index.source.path is not None)
    storages = execute_plan(index, plans, staged_location, backend)
    built = build_objects(staged, storages)
    return {name: values[name] if name in values else built[name] for name in state_dict}


def _load_into(model: nn.Module, state_dict: Any, *, strict: bool, assign: bool) -> Any:
    """``model.load_state_dict(state_dict, strict=strict, assign=assign)``, in linear time.

    torch's own driver gives each child module the entries of its parent's dict that start
    with the child's prefix by scanning the whole parent dict: a ModuleList of 6,000 blocks
    under a 50,000-key dict costs 300 million comparisons (a minute) before any byte moves.
    This driver is torch's, step for step (every module's own ``_load_from_state_dict``, the
    same local dicts in the same order, post hooks, strict handling, the same messages),
    except that each parent's dict is split by child name in one pass. A model that
    overrides ``load_state_dict`` gets its own.
    """
    if type(model).load_state_dict is not nn.Module.load_state_dict:
        return model.load_state_dict(state_dict, strict=strict, assign=assign)
    from torch.nn.modules.module import _IncompatibleKeys

    missing_keys: list[str] = []
    unexpected_keys: list[str] = []
    error_msgs: list[str] = []
    metadata = getattr(state_dict, "_metadata", None)
    state_dict = OrderedDict(state_dict)
    if metadata is not None:
        state_dict._metadata = metadata  # type: ignore[attr-defined]

    def load(module: nn.Module, local_state_dict: dict[str, Any], prefix: str = "") -> None:
        local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
        if assign:
            local_metadata["assign_to_params_buffers"] = assign
        module._load_from_state_dict(
            local_state_dict, prefix, local_metadata, True, missing_keys, unexpected_keys, error_msgs
        )
        children = module._modules
        if children:
            by_child: dict[str, dict[str, Any]] = {}
            start = len(prefix)
            for key, value in local_state_dict.items():
                dot = key.find(".", start)
                if dot > start and key.startswith(prefix):
                    name = key[start:dot]
                    if name in children:
                        by_child.setdefault(name, {})[key] = value
            for name, child in children.items():
                if child is not None:
                    load(child, by_child.get(name, {}), prefix + name + ".")
        incompatible_keys = _IncompatibleKeys(missing_keys, unexpected_keys)
        for hook in module._load_state_dict_post_hooks.values():
            out = hook(module, incompatible_keys)
            if out is not None:
                raise AssertionError(
                    "Hooks registered with ``register_load_state_dict_post_hook`` are not "
                    "expected to return new values, if incompatible_keys need to be modified, "
                    "it should be done inplace."
                )

    load(model, state_dict)
    if strict:
        if unexpected_keys:
            error_msgs.insert(
                0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected_keys))
            )
        if missing_keys:
            error_msgs.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing_keys)))
    if error_msgs:
        raise RuntimeError(
            "Error(s) in loading state_dict for {}:\n\t{}".format(model.__class__.__name__, "\n\t".join(error_msgs))
        )
    return _IncompatibleKeys(missing_keys, unexpected_keys)


def key_matcher(state_dict: Mapping[str, Any], targets: Mapping[str, Any]):  # type: ignore[no-untyped-def]
    """Map checkpoint keys onto the model's through wrapper prefixes on either side."""
    wanted = set(targets)
    by_canonical: dict[str, str | None] = {}
    for name in targets:
        canonical = strip_auto(name)
        by_canonical[canonical] = None if canonical in by_canonical else name

    def match(name: str) -> str:
        if name in wanted:
            return name
        found = by_canonical.get(strip_auto(name))
        return found if found is not None else name

    return match


def module_matcher(model: nn.Module):  # type: ignore[no-untyped-def]
    """Map checkpoint module paths (``_metadata``) onto the model's; the innermost wins."""
    paths = [name for name, _ in model.named_modules()]
    present = set(paths)
    by_canonical = {_canonical_module(path): path for path in paths}

    def match(path: str) -> str:
        if path in present:
            return path
        return by_canonical.get(_canonical_module(path), path)

    return match


def _canonical_module(path: str) -> str:
    return strip_auto(path + ".")[:-1] if path else ""


def _direct_fill(
    index: CheckpointIndex,
    state_dict: Mapping[str, Any],
    targets: Mapping[str, Any],
    model: nn.Module,
    backend: Any,
) -> dict[str, torch.Tensor]:
    """Write checkpoint bytes straight into matching parameters; returns what was filled.

    Host memory is filled by (parallel) reads or inflation; CUDA memory through the native
    pinned ring, for raw stored records. Everything else is left to the staged path.
    """
    owners = _owners_allowing_direct_fill(model)
    on_cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in targets.values())
    ring = ring_module() if on_cuda and backend.name == "native" else None
    host_jobs: list[CopyJob] = []
    cast_jobs: dict[torch.device, list[Any]] = {}  # checkpoint elements cast into another dtype
    device_pieces: dict[torch.device, list[tuple[int, int, torch.Tensor, int]]] = {}
    filled: dict[str, torch.Tensor] = {}
    scheduled: set[tuple[Any, ...]] = set()
    candidates = []
    for name, value in state_dict.items():
        target = targets.get(name)
        record = value.data if isinstance(value, ParameterRecord) else value
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if type(record) is TensorRecord and owner in owners and type(target) in (torch.Tensor, nn.Parameter):
            candidates.append((name, record, target))
    # Host targets of raw stored records: checked and read in one native call (the rest, or
    # all of them without the native extension, one by one below).
    on_host = [target.device.type == "cpu" for _, _, target in candidates]
    bulk = [(record, target) for (_, record, target), host in zip(candidates, on_host) if host]
    done = iter(backend.fill_directly(index.source, bulk) if bulk else ())
    for (name, record, target), host in zip(candidates, on_host):
        if host and next(done):
            filled[name] = target
            continue
        if _cast_fillable(record, target):
            check_view(record, name)
            filled[name] = target
            signature = (target.data_ptr(), target.device, record.storage.key, record.storage_offset)
            if signature not in scheduled:
                scheduled.add(signature)
                width = record.dtype.itemsize
                dest = target.detach().reshape(-1).view(torch.uint8)
                job = (record.storage.data_offset + record.storage_offset * width, record.numel,
                       record.dtype.name, str(target.dtype).removeprefix("torch."), dest)
                cast_jobs.setdefault(target.device, []).append(job)
            continue
        if not _fillable(record, target):
            continue
        on_host = target.device.type == "cpu"
        if not on_host and not (ring is not None and target.device.type == "cuda" and ring_capable(record.storage)):
            continue
        check_view(record, name)
        start = record.storage_offset * record.dtype.itemsize
        filled[name] = target
        # Tied weights: one parameter under several keys, fed from one storage range.
        signature = (target.data_ptr(), target.device, record.storage.key, start)
        if signature in scheduled:
            continue
        scheduled.add(signature)
        dest = target.detach().reshape(-1).view(torch.uint8)
        if on_host:
            host_jobs.append(CopyJob(record.storage, start, dest))
        else:
            piece = (record.storage.data_offset + start, dest.numel(), dest, 0)
            device_pieces.setdefault(target.device, []).append(piece)
    with torch.no_grad():
        run_copy_jobs(index.source, host_jobs, backend)
        for device, jobs in cast_jobs.items():
            if device.type == "cpu":
                backend.cast_into(index.source, jobs)
            else:
                cast_into_device(index.source, jobs, device, backend)
        for device, pieces in device_pieces.items():
            with torch.cuda.device(device):
                copy_pieces(ring, index.source, pieces, device, ring_config())
    return filled


def _cast_fillable(record: TensorRecord, target: Any) -> bool:
    """A floating-point record stored raw, into a parameter of another floating-point dtype
    (on the host, or on CUDA): cast on the way, as ``param.copy_`` would cast."""
    return (
        isinstance(target, torch.Tensor)
        and (target.device.type == "cpu" or target.device.type == "cuda")
        and record.dtype.name in CAST_SOURCES
        and str(target.dtype).removeprefix("torch.") in CAST_TARGETS
        and not same_dtype(record.dtype, target.dtype)
        and _same_layout(record, target)
        and record.storage.method == METHOD_STORED
    )


def _fillable(record: TensorRecord, target: Any) -> bool:
    return isinstance(target, torch.Tensor) and same_dtype(record.dtype, target.dtype) and _same_layout(record, target)


def _same_layout(record: TensorRecord, target: torch.Tensor) -> bool:
    """Both dense, contiguous, of one shape, with nothing to resolve on either side."""
    return (
        not nn.parameter.is_lazy(target)
        and type(target) in (torch.Tensor, nn.Parameter)
        and target.layout == torch.strided
        and not target.is_quantized
        and tuple(target.shape) == record.size
        and target.is_contiguous()
        and record.is_contiguous()
        and not record.metadata
        and not record.storage.byteswap
        and not target.is_conj()
        and not target.is_neg()
    )


def _owners_allowing_direct_fill(model: nn.Module) -> set[str]:
    """Module paths whose parameters may be written directly (default loading, no pre-hooks)."""
    allowed: set[str] = set()
    blocked_prefixes: list[str] = []
    for path, module in model.named_modules(remove_duplicate=False):
        if getattr(module, "_load_state_dict_pre_hooks", None):
            blocked_prefixes.append(path)
        if type(module)._load_from_state_dict not in _DIRECT_FILL_SAFE_LOADERS:
            continue
        allowed.add(path)
    return {
        path
        for path in allowed
        if not any(path == p or path.startswith(p + ".") or p == "" for p in blocked_prefixes)
    }
