"""Boxes of a row-major tensor: which contiguous byte runs a sub-block occupies.

A rank whose parameter is a DTensor holds one box of the global tensor (its offset and
local shape, from the placements); a DCP checkpoint holds its tensors as boxes too (chunks).
Copying the intersection of two boxes is a set of runs, each contiguous on both sides, so
it can be read straight from the file into the destination without staging the whole tensor.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Runs:
    """``count`` runs of ``length`` elements: run ``i`` starts at element ``source[i]`` of
    the source layout and at element ``dest[i]`` of the destination layout."""

    source: torch.Tensor  # int64 element offsets
    dest: torch.Tensor
    length: int

    @property
    def count(self) -> int:
        return int(self.source.numel())


def box_runs(
    size: tuple[int, ...],
    source_shape: tuple[int, ...],
    source_start: tuple[int, ...],
    dest_shape: tuple[int, ...],
    dest_start: tuple[int, ...],
) -> Runs:
    """The runs that copy a box of ``size`` found at ``source_start`` of a contiguous
    ``source_shape`` tensor to ``dest_start`` of a contiguous ``dest_shape`` tensor.

    Trailing dimensions that both sides hold whole merge into one run, so a box split only
    along dimension 0 (FSDP's ``Shard(0)``) is a single run."""
    empty = torch.zeros(0, dtype=torch.int64)
    if any(s == 0 for s in size):
        return Runs(empty, empty, 0)
    whole_from = len(size)  # dims from here on are whole on both sides
    while whole_from > 0 and size[whole_from - 1] == source_shape[whole_from - 1] == dest_shape[whole_from - 1]:
        whole_from -= 1
    if whole_from == 0:
        return Runs(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), math.prod(size))
    split = whole_from - 1  # the last dimension a run covers only part of
    length = size[split] * math.prod(size[split + 1 :])
    source_strides, dest_strides = _row_major(source_shape), _row_major(dest_shape)
    source = torch.tensor([source_start[split] * source_strides[split]], dtype=torch.int64)
    dest = torch.tensor([dest_start[split] * dest_strides[split]], dtype=torch.int64)
    for dim in reversed(range(split)):  # outer dims, each a factor in the run grid
        steps = torch.arange(size[dim], dtype=torch.int64)
        source = ((source_start[dim] + steps) * source_strides[dim])[:, None] + source[None, :]
        dest = ((dest_start[dim] + steps) * dest_strides[dim])[:, None] + dest[None, :]
        source, dest = source.reshape(-1), dest.reshape(-1)
    return Runs(source, dest, length)


def intersect(
    start_a: tuple[int, ...], size_a: tuple[int, ...], start_b: tuple[int, ...], size_b: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The common box of two boxes (start, size), or None when they do not meet."""
    start = tuple(max(a, b) for a, b in zip(start_a, start_b))
    end = tuple(min(a + sa, b + sb) for a, sa, b, sb in zip(start_a, size_a, start_b, size_b))
    if any(e <= s for s, e in zip(start, end)):
        return None
    return start, tuple(e - s for s, e in zip(start, end))


def _row_major(shape: tuple[int, ...]) -> list[int]:
    strides = [1] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * max(shape[dim + 1], 1)
    return strides


# --- DTensor targets ---------------------------------------------------------------------


@dataclass(frozen=True)
class LocalBox:
    """The part of a global tensor this rank holds: ``local`` (this rank's tensor) is the box
    of ``shape`` at ``start`` of the ``global_shape`` tensor."""

    local: torch.Tensor
    start: tuple[int, ...]
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor, without importing torch.distributed to find out: no
    DTensor can exist before its module is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is not None and isinstance(value, module.DTensor):
        return True
    legacy = sys.modules.get("torch.distributed._tensor")  # torch 2.4
    return legacy is not None and isinstance(value, legacy.DTensor)


def local_box(target: Any, key: str) -> LocalBox:
    """This rank's box of a DTensor target. Only ``Shard(d)`` and ``Replicate()`` placements
    say which elements a rank holds; a ``Partial`` one holds summands, which a checkpoint
    cannot be split into, and is refused."""
    try:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import Replicate, Shard  # type: ignore[no-redef]
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset  # type: ignore[no-redef]
    for placement in target.placements:
        if type(placement) not in (Shard, Replicate):
            raise ValueError(
                f"cannot load {key!r}: its DTensor placement {type(placement).__name__} ({placement}) "
                "does not say which elements this rank holds (only Shard(dim) and Replicate() do)"
            )
    global_shape = tuple(target.shape)
    shape, start = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    with torch.no_grad():  # the local tensor itself, not a view tracked by autograd
        local = target.to_local()
    if tuple(local.shape) != tuple(shape):
        raise ValueError(
            f"cannot load {key!r}: its local tensor has shape {list(local.shape)}, but its "
            f"placements {list(target.placements)} give this rank {list(shape)}"
        )
    return LocalBox(local, tuple(start), tuple(shape), global_shape)


def wrap_local(target: Any, local: torch.Tensor) -> Any:
    """A DTensor like ``target`` (mesh, placements, global shape) over this rank's ``local``."""
    return type(target).from_local(
        local, target.device_mesh, target.placements, run_check=False, shape=target.shape, stride=target.stride()
    )
