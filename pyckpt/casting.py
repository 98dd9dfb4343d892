"""The cast stage, between renaming and planning: floating-point tensors take another dtype.

Casting is decided on the index, before a byte is read: each floating-point storage gets a
stand-in record of the target dtype that remembers the record it is read from and the dtype
of its elements (``cast_from``), and each tensor over it takes the new dtype with its offset,
sizes and strides unchanged, so views and tied weights still share one storage. The executors and
writers then cast while they copy, a chunk at a time (``float_cast``).

Integer, bool, complex and quantized tensors are left as they are, and so is any storage
that also backs a value the index does not build itself (a sparse or subclass tensor's
call): rebuilding it would need its own rules.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError
from .float_cast import casts
from .index.opaque import Opaque
from .index.records import CastSource, CallRecord, ParameterRecord, StorageRecord, StorageRef, TensorRecord
from .index.symbols import DType
from .plan import iter_records
from .rename import copy_mapping


def cast_tree(root: Any, target: DType | None) -> Any:
    """``root`` with every castable tensor record cast to ``target`` (rebuilt only where it changes)."""
    if target is None:
        return root
    return _Caster(target, _element_dtypes(root, target)).cast(root)


def _element_dtypes(root: Any, target: DType) -> dict[int, DType]:
    """The storages to cast, by id, with the dtype of their elements: the dtype of the tensors
    over them (a float8 tensor's storage is pickled as bytes). A storage is cast only if every
    tensor over it has one castable dtype and no call the index does not build uses it."""
    seen: dict[int, DType | None] = {}
    for _, record in iter_records(root):
        if isinstance(record, (TensorRecord, StorageRef)):
            key = id(record.storage)
            dtype = record.dtype if casts(record.dtype, target) else None
            seen[key] = dtype if seen.get(key, dtype) == dtype else None
        elif isinstance(record, CallRecord):
            for _, inner in iter_records((record.args, record.build_states)):
                if isinstance(inner, (TensorRecord, StorageRef)):
                    seen[id(inner.storage)] = None
    return {key: dtype for key, dtype in seen.items() if dtype is not None}


class _Caster:
    def __init__(self, target: DType, element_dtypes: dict[int, DType]) -> None:
        self.target = target
        self.element_dtypes = element_dtypes
        self.storages: dict[int, StorageRecord] = {}
        self.done: dict[int, Any] = {}

    def cast(self, value: Any) -> Any:
        if id(value) in self.done:
            return self.done[id(value)]
        self.done[id(value)] = value  # a reference back to an object being cast keeps the original
        result: Any = value
        if isinstance(value, TensorRecord):
            storage = self.storage(value.storage)
            if storage is not value.storage:
                result = TensorRecord(storage, self.target, value.storage_offset, value.size, value.stride,
                                      value.requires_grad, value.metadata)
        elif isinstance(value, StorageRef):
            storage = self.storage(value.storage)
            if storage is not value.storage:
                result = StorageRef(storage, self.target)
        elif isinstance(value, ParameterRecord):
            data = self.cast(value.data)
            if data is not value.data:
                result = ParameterRecord(data, value.requires_grad, value.state)
        elif isinstance(value, dict):
            for key, item in value.items():
                new = self.cast(item)
                if new is not item:
                    if result is value:
                        result = copy_mapping(value)
                    result[key] = new
        elif isinstance(value, (list, tuple)):
            items = [self.cast(item) for item in value]
            if any(a is not b for a, b in zip(items, value)):
                result = items if isinstance(value, list) else tuple(items)
        elif isinstance(value, Opaque) and value.called:
            fields = (value.args, value.kwargs, value.state, value.items, value.dict_items)
            new_fields = [self.cast(field) for field in fields]
            if any(a is not b for a, b in zip(new_fields, fields)):
                args, kwargs, state, items, dict_items = new_fields
                result = Opaque(value.module, value.name, args, kwargs, new_object=value.new_object, state=state,
                                items=items, dict_items=dict_items)
        self.done[id(value)] = result
        return result

    def storage(self, record: StorageRecord) -> StorageRecord:
        if id(record) in self.storages:
            return self.storages[id(record)]
        cast = record
        elements = self.element_dtypes.get(id(record))
        if elements is not None:
            cast = cast_storage(record, elements, self.target)
            if record.view_of is not None:  # a 0.3-era storage view: its base is cast alike
                self.element_dtypes.setdefault(id(record.view_of), elements)
                base = self.storage(record.view_of)
                cast.view_of = base
                cast.view_start = record.view_start // elements.itemsize * self.target.itemsize
        self.storages[id(record)] = cast
        return cast


def cast_storage(record: StorageRecord, elements: DType, target: DType) -> StorageRecord:
    """The stand-in of ``record``, whose bytes are ``elements``, holding them as ``target``."""
    count, rest = divmod(record.nbytes, elements.itemsize)
    if rest:
        raise CheckpointError(
            f"storage '{record.key}' holds {record.nbytes} bytes, not a whole number of "
            f"{elements.name} elements", record=record.record,
        )
    return StorageRecord(
        record.key, target, count * target.itemsize, record.location, record.record, record.data_offset,
        record.stored_size, record.method, None, record.byteswap, record.record_size,
        cast_from=CastSource(record, elements),
    )
