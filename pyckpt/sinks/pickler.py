"""Write an index tree back as a torch ``data.pkl`` (protocol 2), without any tensor bytes.

Records become the calls torch itself writes (``_rebuild_tensor_v2``/``_v3``,
``_rebuild_parameter``, persistent ids for storages), so ``torch.load(weights_only=True)``
reads the result. Storages are renumbered ``0..N-1`` in the order the pickle first meets
them; the pickler's memo keeps every shared object (tied weights, views) shared.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from collections import OrderedDict
from typing import Any

import torch

from ..errors import CheckpointError
from ..index.records import CallRecord, ParameterRecord, ScriptObject, StorageRecord, StorageRef, TensorRecord

_TYPED_STORAGES = {dtype: getattr(torch, name) for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


class TreePickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        self.storages: dict[str, tuple[str, StorageRecord]] = {}  # source key -> (new key, record)

    def storage_key(self, record: StorageRecord) -> str:
        known = self.storages.get(record.key)
        if known is None:
            known = self.storages[record.key] = (str(len(self.storages)), record)
        return known[0]

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            obj = obj.storage
        if isinstance(obj, StorageRecord):
            storage_type = _TYPED_STORAGES.get(obj.dtype, torch.UntypedStorage)
            element = obj.dtype.itemsize if storage_type is not torch.UntypedStorage else 1
            return ("storage", storage_type, self.storage_key(obj), obj.location, obj.nbytes // element)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TensorRecord):
            return _reduce_tensor(obj)
        if isinstance(obj, ParameterRecord):
            if obj.state is not None:
                return torch._utils._rebuild_parameter_with_state, (obj.data, obj.requires_grad, OrderedDict(), obj.state)
            return torch._utils._rebuild_parameter, (obj.data, obj.requires_grad, OrderedDict())
        if isinstance(obj, CallRecord):
            return _reduce_call(obj)
        if isinstance(obj, ScriptObject):
            raise CheckpointError(f"cannot write TorchScript object {obj.qualified_name} to a checkpoint")
        return NotImplemented


def _reduce_tensor(record: TensorRecord) -> tuple[Any, ...]:
    storage = record.storage
    common = (storage, record.storage_offset, record.size, record.stride, record.requires_grad, OrderedDict())
    metadata = (record.metadata,) if record.metadata else ()
    if record.dtype == storage.dtype and storage.dtype in _TYPED_STORAGES:
        return torch._utils._rebuild_tensor_v2, common + metadata
    return torch._utils._rebuild_tensor_v3, common + (record.dtype,) + metadata


def _reduce_call(record: CallRecord) -> tuple[Any, ...]:
    if len(record.build_states) > 1:
        raise CheckpointError(f"cannot rewrite {record.func_name}: it was built more than once")
    state = record.build_states[0] if record.build_states else None
    if record.new_object:
        return copyreg.__newobj__, (record.func, *record.args), state  # type: ignore[attr-defined]
    return record.func, record.args, state


def pickle_tree(root: Any) -> tuple[bytes, list[tuple[str, StorageRecord]]]:
    """``data.pkl`` bytes, and the storages it names in order as ``(new key, record)``."""
    buffer = io.BytesIO()
    pickler = TreePickler(buffer)
    pickler.dump(root)
    return buffer.getvalue(), list(pickler.storages.values())
