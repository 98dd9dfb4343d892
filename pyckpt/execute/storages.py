"""Turn planned storages into ``torch.UntypedStorage`` objects on their target devices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._device import MapLocation
from ..errors import CheckpointError
from ..index.checkpoint import CheckpointIndex
from ..plan import HOW_MAP, HOW_META, HOW_READ, HOW_RESTORE, HOW_VIEW, StoragePlan
from .cpu import CopyJob, allocate_bytes, cast_job, casts_by_range, read_storages
from .device import read_to_devices, ring_capable, ring_piece
from .fill_jobs import FillJobs

if TYPE_CHECKING:
    from .._backend import Backend


def execute_plan(
    index: CheckpointIndex,
    plans: dict[str, StoragePlan],
    map_location: MapLocation,
    backend: Backend,
    *,
    shared_mapping: bool = False,
    ready: dict[str, torch.UntypedStorage] | None = None,
) -> dict[str, torch.UntypedStorage]:
    """Storages by key; ``shared_mapping`` maps the file MAP_SHARED (writes reach it);
    ``ready``: storages already filled (by a process group), taken as they are."""
    result: dict[str, torch.UntypedStorage] = dict(ready or {})
    plans = {key: plan for key, plan in plans.items() if key not in result}
    mapped = [p.record for p in plans.values() if p.how == HOW_MAP]
    if mapped:
        mapping = backend.map_file(index.source, shared=shared_mapping)
        slices = backend.slice_storage(mapping, [(record.data_offset, record.nbytes) for record in mapped])
        result.update(zip([record.key for record in mapped], slices))

    to_read = [p for p in plans.values() if p.how in (HOW_READ, HOW_RESTORE)]
    cpu_targets = [p for p in to_read if p.device is None or p.device.type == "cpu"]
    device_targets = [p for p in to_read if p.device is not None and p.device.type != "cpu"]
    if cpu_targets:
        result.update(read_storages(index, [p.record for p in cpu_targets], backend))
    if device_targets:
        result.update(read_to_devices(index, device_targets, backend))

    for plan in plans.values():
        record = plan.record
        if plan.how == HOW_META:
            result[record.key] = torch.UntypedStorage(record.nbytes, device="meta")
        elif plan.how == HOW_RESTORE:
            result[record.key] = _restore(result[record.key], plan, map_location)
    for plan in plans.values():
        if plan.how == HOW_VIEW:  # after the bases, restored or not: views share their memory
            record = plan.record
            base = result[record.view_of.key]  # type: ignore[union-attr]
            result[record.key] = base[record.view_start : record.view_start + record.nbytes]
    return result


def _restore(storage: torch.UntypedStorage, plan: StoragePlan, map_location: MapLocation) -> torch.UntypedStorage:
    """Other devices and callables: torch's own restore logic, on a CPU storage."""
    from torch.serialization import default_restore_location

    location = plan.record.location
    if plan.location is not None:
        try:
            restored: Any = default_restore_location(storage, plan.location)
        except RuntimeError as exc:  # a location no backend registered ("cpo", "xyz:0", ...)
            raise CheckpointError(
                f"storage '{plan.record.key}' cannot be restored to location {plan.location!r}: {exc}",
                record=plan.record.record,
            ) from None
    else:
        restored = map_location(storage, location)  # type: ignore[operator]
        if restored is None:
            restored = default_restore_location(storage, location)
    if isinstance(restored, torch.storage.TypedStorage):
        restored = restored._untyped_storage
    if not isinstance(restored, torch.UntypedStorage):
        raise TypeError(f"map_location returned {type(restored).__name__}, not a storage")
    return restored


def plan_storage_fills(plans: dict[str, StoragePlan], ring: Any) -> tuple[dict[str, torch.UntypedStorage], FillJobs]:
    """Fresh storages for the plans read into host or CUDA memory, and the jobs that fill
    them (for a process group to share out); the other plans are left to ``execute_plan``."""
    ready: dict[str, torch.UntypedStorage] = {}
    jobs = FillJobs()
    for key, plan in plans.items():
        record, device = plan.record, plan.device
        if plan.how != HOW_READ or record.byteswap or record.pieces is not None or record.view_of is not None:
            continue
        if device is None or device.type == "cpu":
            if record.cast_from is not None and not casts_by_range(record):
                continue
            dest = allocate_bytes(record.nbytes, record)
            if record.cast_from is None:
                jobs.host.append(CopyJob(record, 0, dest))
            else:
                jobs.add_cast(dest.device, cast_job(record, dest))
        elif device.type == "cuda" and ring is not None and ring_capable(record):
            device, piece = ring_piece(plan)
            dest = piece[2]
            jobs.add_device(device, piece)
        else:
            continue
        ready[key] = dest.untyped_storage()
    return ready, jobs
