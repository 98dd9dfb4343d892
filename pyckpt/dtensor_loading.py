"""DTensor parameters (FSDP2 ``fully_shard``, tensor parallel, ``distribute_tensor``) as
``load_state_dict`` targets: each rank reads only the bytes of its own box.

No collective runs and no rank holds a full tensor: the box the placements give this rank
is cut into runs that are contiguous in the file and in the local tensor, and each run is
read (or cast) straight into place. A parameter whose module loads its state its own way
gets a new DTensor over a local tensor filled the same way, which torch's ``copy_`` then
copies locally. Records that cannot be read by range (compressed, byte-swapped, with
conj/neg bits) are read whole and their box copied out, one tensor at a time.
"""

from __future__ import annotations

from typing import Any

import torch

from .boxes import box_runs, local_box, wrap_local
from .execute.cpu import CopyJob
from .execute.device import ring_capable
from .execute.fill_jobs import FillJobs
from .float_cast import CAST_SOURCES, CAST_TARGETS
from .index.records import METHOD_STORED, TensorRecord
from .plan import check_view
from .sinks.torch_values import same_dtype, takes_bytes_as_they_are


def plan_dtensor_fill(
    name: str, record: TensorRecord, target: Any, in_place: bool, jobs: FillJobs, ring: Any,
    planned: dict[Any, torch.Tensor],
) -> Any | None:
    """Schedule this rank's box of ``record`` into ``target`` (in place) or into a new DTensor
    like it; returns the value ``load_state_dict`` gets for ``name``, or None when the record
    must be read whole first (``dtensor_from_full``). ``planned`` holds the local tensors
    already planned: a tied weight (one DTensor under two keys, one storage in the file) is
    read once, and with ``assign=True`` its new DTensors share one local tensor, as torch's
    share one storage."""
    box = local_box(target, name)
    if tuple(record.size) != box.global_shape or not readable_by_range(record):
        return None
    local = box.local
    same = same_dtype(record.dtype, local.dtype)
    cast = not same and record.dtype.name in CAST_SOURCES and str(local.dtype).removeprefix("torch.") in CAST_TARGETS
    if not (same or cast) or not takes_bytes_as_they_are(local):
        return None
    device = local.device
    on_host = device.type == "cpu"
    if not on_host and not (device.type == "cuda" and (cast or (ring is not None and ring_capable(record.storage)))):
        return None
    check_view(record, name)
    # the same bytes into the same box: one read, and (assign=True) one local tensor
    signature = (record.storage.key, record.storage_offset, box.start, box.shape, local.dtype, device,
                 local.data_ptr() if in_place else None)
    dest = planned.get(signature)
    if dest is not None:
        return target if in_place else wrap_local(target, dest)
    dest = local if in_place else torch.empty(box.shape, dtype=local.dtype, device=device)
    planned[signature] = dest
    dest_bytes = dest.detach().reshape(-1).view(torch.uint8)
    runs = box_runs(box.shape, record.size, box.start, box.shape, (0,) * len(box.shape))
    source_width, dest_width = record.dtype.itemsize, dest.element_size()
    base = record.storage.data_offset + record.storage_offset * source_width
    for source_at, dest_at in zip((runs.source * source_width).tolist(), (runs.dest * dest_width).tolist()):
        if cast:
            piece = dest_bytes[dest_at : dest_at + runs.length * dest_width]
            jobs.add_cast(device, (base + source_at, runs.length, record.dtype.name, str(local.dtype).removeprefix("torch."), piece))
        elif on_host:
            start = record.storage_offset * source_width + source_at
            jobs.host.append(CopyJob(record.storage, start, dest_bytes[dest_at : dest_at + runs.length * dest_width]))
        else:
            jobs.add_device(device, (base + source_at, runs.length * dest_width, dest_bytes, dest_at))
    return target if in_place else wrap_local(target, dest)


def dtensor_from_full(name: str, full: torch.Tensor, target: Any) -> Any:
    """A DTensor like ``target`` holding this rank's box of ``full`` (the whole tensor, read
    because its record could not be read by range)."""
    box = local_box(target, name)
    if tuple(full.shape) != box.global_shape:
        return full  # torch's load_state_dict reports the shape mismatch
    part = full[tuple(slice(start, start + size) for start, size in zip(box.start, box.shape))]
    local = torch.empty(box.shape, dtype=full.dtype, device=box.local.device)
    local.copy_(part)
    return wrap_local(target, local)


def readable_by_range(record: TensorRecord) -> bool:
    """Raw bytes in native order, laid out row-major: any box of it is a set of file ranges."""
    storage = record.storage
    return (
        storage.method == METHOD_STORED
        and not storage.byteswap
        and storage.cast_from is None
        and storage.pieces is None
        and storage.view_of is None
        and not record.metadata
        and record.is_contiguous()
    )
