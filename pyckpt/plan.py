"""Stage 3 of the pipeline: decide which storage bytes go where, and check every view.

The plan is made from the index alone. It names each storage once (so views and tied
weights keep sharing one storage wherever it lands) and checks every tensor against the
storage it views, so that no later stage can be asked to read or expose a byte outside a
record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError
from .index.opaque import Opaque
from .index.policy import MAX_NESTING
from .index.records import CallRecord, ParameterRecord, StorageRecord, StorageRef, TensorRecord

if TYPE_CHECKING:  # checking views needs no torch; placing storages on devices does
    import torch

    from ._device import MapLocation
    from .index.checkpoint import CheckpointIndex

INT64_MAX = (1 << 63) - 1

HOW_MAP = "map"  # zero-copy view of the file mapping (CPU)
HOW_READ = "read"  # read (or inflate) into fresh memory on the target device
HOW_META = "meta"  # no bytes at all
HOW_RESTORE = "restore"  # read on CPU, then torch's restore logic (other devices, callables)
HOW_VIEW = "view"  # a slice of another planned storage (PyTorch 0.3-era storage views)


@dataclass(eq=False, slots=True)
class StoragePlan:
    record: StorageRecord
    how: str
    device: torch.device | None
    location: str | None


def iter_records(root: Any) -> Iterator[tuple[str, Any]]:
    """Every record (tensor-ish or Opaque) in the tree with a readable key path, depth-checked.

    Inside an opaque object the path goes on from the object's own: a tensor in the state of
    ``args: argparse.Namespace(w=...)`` is at ``args/w``.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_NESTING:
            raise CheckpointError(f"object tree nests deeper than {MAX_NESTING} levels", key=path or None)
        if isinstance(value, (TensorRecord, StorageRef)):
            yield path, value
            continue
        if id(value) in seen:
            continue
        if isinstance(value, ParameterRecord):
            seen.add(id(value))
            yield path, value
            stack.append((value.data, path, depth + 1))
            if value.state is not None:
                stack.append((value.state, path, depth + 1))
        elif isinstance(value, CallRecord):
            seen.add(id(value))
            yield path, value
            stack.extend((arg, path, depth + 1) for arg in reversed(value.args))
            stack.extend((state, path, depth + 1) for state in value.build_states)
        elif isinstance(value, Opaque):
            seen.add(id(value))
            yield path, value
            if value.called:
                for part in (value.dict_items, value.items, value.state, value.kwargs, value.args):
                    if part:
                        stack.append((part, path, depth + 1))
        elif isinstance(value, dict):
            seen.add(id(value))
            items = list(value.items())
            for key, item in reversed(items):
                stack.append((item, _join(path, key), depth + 1))
                if not isinstance(key, (str, int, float, bool, type(None))):
                    stack.append((key, _join(path, key), depth + 1))
            extra = getattr(value, "__dict__", None)
            if extra:
                stack.append((extra, path, depth + 1))
        elif isinstance(value, (list, tuple, set, frozenset)):
            seen.add(id(value))
            for i, item in reversed(list(enumerate(value))):
                stack.append((item, f"{path}[{i}]", depth + 1))


def _join(path: str, key: Any) -> str:
    text = key if isinstance(key, str) else repr(key)
    return f"{path}/{text}" if path else text


def check_view(tensor: TensorRecord, key: str) -> None:
    """The view must stay inside its storage, with no arithmetic overflowing int64."""
    storage = tensor.storage
    itemsize = tensor.dtype.itemsize
    if itemsize == 0:
        raise CheckpointError(f"dtype {tensor.dtype} has no byte size", key=key or None)
    numel = 1
    extent = 0
    for size, stride in zip(tensor.size, tensor.stride):
        numel *= size
        if size:
            extent += (size - 1) * stride
    if numel > INT64_MAX or tensor.storage_offset + extent > INT64_MAX:
        raise CheckpointError(
            f"shape {list(tensor.size)} with stride {list(tensor.stride)} overflows int64", key=key or None
        )
    if numel == 0:
        return
    needed = (tensor.storage_offset + extent + 1) * itemsize
    if needed > storage.nbytes:
        raise CheckpointError(
            f"view (offset {tensor.storage_offset}, shape {list(tensor.size)}, stride "
            f"{list(tensor.stride)}, {itemsize}-byte {tensor.dtype}) needs {needed} bytes but "
            f"storage '{storage.key}' has {storage.nbytes}",
            key=key or None,
        )


def plan_index(
    index: CheckpointIndex, root: Any, map_location: MapLocation, *, mmap: bool | None, can_map: bool
) -> dict[str, StoragePlan]:
    """Plan every storage of the index and check every view not checked yet, without walking
    the tree: what ``load`` needs, since the pickle made every record it holds (as torch
    builds every tensor of a pickle, reachable or not). ``root`` is walked only to name the
    key of a view that does not fit."""
    try:
        for record in index.unchecked_views:
            check_view(record, "")
    except CheckpointError:
        plan_storages(root, map_location, mmap=mmap, can_map=can_map)  # raises, naming the key
        raise  # the bad view is not reachable from the root
    plans: dict[str, StoragePlan] = {}
    decided: dict[tuple[str, bool], StoragePlan] = {}  # one device decision per location
    for storage in index.storages.values():
        if storage.view_of is None:
            viewable = index.can_view(storage)
            template = decided.get((storage.location, viewable))
            if template is None:
                template = decided[(storage.location, viewable)] = _plan_one(
                    storage, map_location, mmap=mmap, can_map=can_map, viewable=viewable
                )
            plans[storage.key] = StoragePlan(storage, template.how, template.device, template.location)
    for storage in index.storages.values():
        base = storage.view_of
        if base is not None:
            plans[storage.key] = StoragePlan(storage, HOW_VIEW, plans[base.key].device, plans[base.key].location)
    return plans


def plan_storages(
    root: Any, map_location: MapLocation, *, mmap: bool | None, can_map: bool
) -> dict[str, StoragePlan]:
    """Check every view in ``root`` and plan each storage it uses, keyed by storage key."""
    plans: dict[str, StoragePlan] = {}
    for path, record in iter_records(root):
        if isinstance(record, TensorRecord):
            check_view(record, path)
            storage = record.storage
        elif isinstance(record, StorageRef):
            storage = record.storage
        else:
            continue
        if storage.key in plans:
            continue
        base = storage.view_of
        if base is not None:
            if base.key not in plans:
                plans[base.key] = _plan_one(base, map_location, mmap=mmap, can_map=can_map)
            plans[storage.key] = StoragePlan(storage, HOW_VIEW, plans[base.key].device, plans[base.key].location)
        else:
            plans[storage.key] = _plan_one(storage, map_location, mmap=mmap, can_map=can_map)
    return plans


def _plan_one(
    storage: StorageRecord, map_location: MapLocation, *, mmap: bool | None, can_map: bool, viewable: bool | None = None
) -> StoragePlan:
    from ._device import location_device, target_location

    location = target_location(map_location, storage.location)
    if location is None:
        return StoragePlan(storage, HOW_RESTORE, None, None)
    device = location_device(location)
    if device is None:
        return StoragePlan(storage, HOW_RESTORE, None, location)
    if device.type == "meta":
        return StoragePlan(storage, HOW_META, device, location)
    if viewable is None:
        viewable = storage.mappable()
    if device.type == "cpu" and mmap is not False and can_map and viewable:
        return StoragePlan(storage, HOW_MAP, device, location)
    return StoragePlan(storage, HOW_READ, device, location)
