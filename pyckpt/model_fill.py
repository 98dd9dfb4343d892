"""Which checkpoint bytes go straight into a model's own memory, and the jobs that move them.

A parameter or buffer of the checkpoint's shape, dtype and plain layout, owned by a module
that loads its state as ``nn.Module`` does, is filled where it lies: host memory by
(parallel) reads, CUDA memory through the native pinned ring, other float dtypes cast on
the way. DTensor targets get only this rank's box. Everything else is left to the caller's
staged path, which ``load_state_dict`` then copies as torch would. A checkpoint of several
files (shards) is planned as one: its host reads run in one pool. Keys the model ties to one
memory are filled as torch's copies would leave them (see tied_targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .boxes import is_dtensor
from .dtensor_loading import plan_dtensor_fill
from .execute.cpu import CopyJob
from .execute.device import ring_capable, ring_module
from .execute.fill_jobs import FillJobs
from .float_cast import CAST_SOURCES, CAST_TARGETS
from .errors import CheckpointError
from .index.checkpoint import CheckpointIndex
from .index.records import METHOD_STORED, TensorRecord, without_parameter
from .plan import check_view
from .sinks.torch_values import same_dtype, takes_bytes_as_they_are
from .tied_targets import TiedKeys, tied_keys


# Modules whose own _load_from_state_dict only adds or adjusts bookkeeping entries and then
# copies parameters like nn.Module does, so their parameters may be filled directly.
_DIRECT_FILL_SAFE_LOADERS = {nn.Module._load_from_state_dict}
try:
    from torch.nn.modules.batchnorm import _NormBase

    _DIRECT_FILL_SAFE_LOADERS.add(_NormBase._load_from_state_dict)
except ImportError:  # pragma: no cover - torch layout change
    pass


@dataclass
class DirectFill:
    """What goes straight into the model: the value each filled key gets, the jobs that fill
    memory every rank holds alike (``shared``: a process group may split them) and those
    that fill this rank's own DTensor boxes (``own``)."""

    values: dict[str, Any]
    shared: FillJobs = field(default_factory=FillJobs)
    own: FillJobs = field(default_factory=FillJobs)
    ring: Any = None

    def run(self, index: CheckpointIndex, backend: Any) -> None:
        self.shared.run(index.source, backend, self.ring)
        self.own.run(index.source, backend, self.ring)


def plan_direct_fills(
    files: Sequence[tuple[CheckpointIndex, Mapping[str, Any]]],
    targets: Mapping[str, Any],
    model: nn.Module,
    backend: Any,
    *,
    assign: bool,
    for_group: bool = False,
) -> list[DirectFill]:
    """For each file of a checkpoint (one file, or every shard with its part of the state
    dict), the entries that go straight into the model's memory and the jobs that fill it.
    The plain host targets of every file are checked and read at once by one native call,
    whose threads run through the files' reads as through one file's.
    ``for_group``: a process group will share the jobs out, so nothing is read now, and
    DTensor boxes are shared too: the group's ranks hold the same ones (the replicas of TP x DP
    or HSDP), which the group checks by comparing every rank's planned reads."""
    owners = owners_allowing_direct_fill(model)
    on_cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in targets.values())
    ring = ring_module() if on_cuda and backend.name == "native" else None
    tied = tied_keys(targets, {name: _shape(value) for _, part in files for name, value in part.items()},
                     lambda name: owner_of(name) in owners, assign=assign)
    plans = []
    for index, part in files:
        plan = _FilePlan(index, DirectFill({}, ring=ring))
        try:
            _collect(plan, part, targets, owners, tied, assign=assign, for_group=for_group)
        except CheckpointError as exc:
            raise exc.located(path=index.display)
        plans.append(plan)
    # Host targets of raw stored records, of every file: checked and read in one native call
    # (the rest, or all of them without the native extension, one by one below). A read error
    # names its file already.
    bulk = [[(record, target) for _, record, target in plan.candidates if target.device.type == "cpu"] for plan in plans]
    done = backend.fill_directly([(plan.index.source, pairs) for plan, pairs in zip(plans, bulk)]) \
        if any(bulk) and not for_group else [[False] * len(pairs) for pairs in bulk]
    for plan, flags in zip(plans, done):
        try:
            _plan_one_by_one(plan, iter(flags), ring)
        except CheckpointError as exc:
            raise exc.located(path=plan.index.display)
    # A key tied to a later one is left as that one's bytes leave it (see tied_targets); if the
    # later one is not filled here, they all go the staged way, copied in the model's order.
    filled_anywhere = {name for plan in plans for name in plan.direct.values}
    for plan in plans:
        for name in plan.deferred:
            if tied.later[name] in filled_anywhere:
                plan.direct.values[name] = targets[name]
    return [plan.direct for plan in plans]


@dataclass
class _FilePlan:
    index: CheckpointIndex
    direct: DirectFill
    candidates: list[tuple[str, TensorRecord, torch.Tensor]] = field(default_factory=list)
    boxes: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)  # DTensor local tensors planned
    deferred: list[str] = field(default_factory=list)  # keys tied to a later key


def _collect(plan: _FilePlan, part: Mapping[str, Any], targets: Mapping[str, Any], owners: set[str],
             tied: TiedKeys, *, assign: bool, for_group: bool) -> None:
    """Plan this file's DTensor targets, and gather its candidates for a plain fill."""
    for name, value in part.items():
        target = targets.get(name)
        record = without_parameter(value)
        owner = owner_of(name)
        if type(record) is not TensorRecord or name in tied.staged:
            continue
        if name in tied.later:
            plan.deferred.append(name)
            continue
        if is_dtensor(target):  # this rank's shard only, in place or into a DTensor like it
            jobs = plan.direct.shared if for_group else plan.direct.own
            filled = plan_dtensor_fill(name, record, target, owner in owners and not assign, jobs, plan.direct.ring, plan.boxes)
            if filled is not None:
                plan.direct.values[name] = filled
        elif not assign and owner in owners and type(target) in (torch.Tensor, nn.Parameter):
            plan.candidates.append((name, record, target))


def _shape(value: Any) -> tuple[int, ...] | None:
    record = without_parameter(value)
    return record.size if type(record) is TensorRecord else None


def _plan_one_by_one(plan: _FilePlan, done: Iterator[bool], ring: Any) -> None:
    """The candidates the bulk read did not take: cast on the way, read one by one on the
    host (without the native extension), or through the CUDA ring."""
    jobs, filled = plan.direct.shared, plan.direct.values
    scheduled: set[tuple[Any, ...]] = set()
    for name, record, target in plan.candidates:
        on_host = target.device.type == "cpu"
        if on_host and next(done):
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
                jobs.add_cast(target.device, (record.storage.data_offset + record.storage_offset * width, record.numel,
                              record.dtype.name, str(target.dtype).removeprefix("torch."), dest))
            continue
        if not fillable(record, target):
            continue
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
            jobs.host.append(CopyJob(record.storage, start, dest))
        else:
            jobs.add_device(target.device, (record.storage.data_offset + start, dest.numel(), dest, 0))


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


def fillable(record: TensorRecord, target: Any) -> bool:
    return isinstance(target, torch.Tensor) and same_dtype(record.dtype, target.dtype) and _same_layout(record, target)


def _same_layout(record: TensorRecord, target: torch.Tensor) -> bool:
    """Both dense, contiguous, of one shape, with nothing to resolve on either side."""
    return (
        not nn.parameter.is_lazy(target)
        and type(target) in (torch.Tensor, nn.Parameter)
        and not target.is_quantized
        and tuple(target.shape) == record.size
        and takes_bytes_as_they_are(target)
        and record.is_contiguous()
        and not record.metadata
        and not record.storage.byteswap
    )


def owner_of(name: str) -> str:
    """The path of the module a state-dict key belongs to ("" for the root)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def owners_allowing_direct_fill(model: nn.Module) -> set[str]:
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
