"""The ``load`` sink: the object tree with every record replaced by its torch object.

Tensors are made the way torch's rebuild functions make them (an empty tensor ``set_`` onto
the storage), so dtype, shape, stride, offset, ``requires_grad``, Parameter-ness, conj/neg
bits and storage sharing all match ``torch.load``. Identity is kept: an object the pickle
memoised twice comes back as one object.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import torch

from ..errors import CheckpointError
from ..index.opaque import Opaque
from ..index.records import CallRecord, ParameterRecord, ScriptObject, StorageRef, TensorRecord
from ..index.symbols import DType, Symbol
from .torch_values import torch_dtype, torch_object, user_trusted_globals


class ObjectBuilder:
    def __init__(self, storages: dict[str, torch.UntypedStorage], prebuilt: dict[int, torch.Tensor] | None = None) -> None:
        self.storages = storages
        # Tensors made in bulk beforehand, by id(record): every record is built once, so a
        # record's entry is used at most once and identity is kept as with self.built.
        self.prebuilt = prebuilt or {}
        self.built: dict[int, Any] = {}
        self.key = ""
        self.trusted = user_trusted_globals()

    def build(self, value: Any) -> Any:
        try:
            result = self._build(value, "")
        finally:
            torch._utils._validate_loaded_sparse_tensors()
        return result

    def _build(self, value: Any, path: str) -> Any:
        kind = type(value)
        if kind in (str, int, float, bool, type(None), bytes, complex):
            return value
        done = self.built.get(id(value))
        if done is not None:
            return done
        if kind is TensorRecord:
            result: Any = self._tensor(value, path)
        elif kind is dict or kind is OrderedDict or kind is Counter:
            result = kind()
            self.built[id(value)] = result
            prebuilt = self.prebuilt
            for key, item in value.items():
                # A state dict: tensors made in bulk go in as they are, without a call per entry.
                made = prebuilt.get(id(item)) if type(item) is TensorRecord and type(key) is str else None
                if made is not None:
                    result[key] = made
                    continue
                child = key if isinstance(key, str) else repr(key)
                result[self._build(key, path)] = self._build(item, f"{path}/{child}" if path else child)
            extra = getattr(value, "__dict__", None)
            if extra:
                result.__dict__.update(self._build(extra, path))
        # Plain loops, not comprehensions: one Python frame per nesting level, so the
        # deepest tree the plan accepts (MAX_NESTING) stays far from the recursion limit.
        elif kind is list:
            result = []
            self.built[id(value)] = result
            for i, item in enumerate(value):
                result.append(self._build(item, f"{path}[{i}]"))
        elif kind is tuple:
            items = []
            for i, item in enumerate(value):
                items.append(self._build(item, f"{path}[{i}]"))
            result = tuple(items)
        elif kind is set:
            result = set()
            for item in value:
                result.add(self._build(item, path))
        elif kind is ParameterRecord:
            result = self._parameter(value, path)
        elif kind is StorageRef:
            result = torch.storage.TypedStorage(
                wrap_storage=self.storages[value.storage.key], dtype=torch_dtype(value.dtype), _internal=True
            )
        elif kind is DType:
            result = torch_dtype(value)
        elif kind is Symbol:
            result = torch_object(value)
        elif kind is CallRecord:
            result = self._call(value, path)
        elif kind is Opaque:
            return self._opaque(value, path)
        elif kind is frozenset:
            result = frozenset(self._build(item, path) for item in value)
        elif kind is ScriptObject:
            raise CheckpointError("TorchScript objects cannot be loaded as Python objects", key=path or None)
        else:
            return value
        self.built[id(value)] = result
        return result

    def _opaque(self, record: Opaque, path: str) -> Any:
        """A copy with real tensors inside; or, for a global the user trusted, the real object."""
        trusted = self.trusted.get(record.qualified_name)
        if trusted is not None:
            return self._trusted(record, trusted, path)
        if not record.called:
            self.built[id(record)] = record
            return record
        result = Opaque(record.module, record.name, new_object=record.new_object)
        self.built[id(record)] = result  # before the parts: the state may refer to the object
        result.args = self._build(record.args, path)
        result.kwargs = self._build(record.kwargs, path)
        result.state = self._build(record.state, path)
        result.items = [self._build(item, f"{path}[{i}]") for i, item in enumerate(record.items)]
        result.dict_items = [(self._build(k, path), self._build(v, path)) for k, v in record.dict_items]
        return result

    def _trusted(self, record: Opaque, func: Any, path: str) -> Any:
        """What torch.load(weights_only=True) does with a global from add_safe_globals."""
        if not record.called:
            self.built[id(record)] = func
            return func
        name = record.qualified_name
        if record.kwargs is not None or record.items or record.dict_items:
            raise CheckpointError(
                f"{name} is built with keyword arguments, APPENDS or SETITEMS, which torch's "
                "weights_only unpickler refuses even for safe globals", key=path or None
            )
        args = self._build(record.args, path)
        try:
            result = func.__new__(func, *args) if record.new_object else func(*args)
        except Exception as exc:  # the user's own class
            raise CheckpointError(f"{name} failed: {exc}", key=path or None) from None
        self.built[id(record)] = result
        if record.state is not None:
            state = self._build(record.state, path)
            try:
                _apply_build(result, state)
            except Exception as exc:
                raise CheckpointError(f"BUILD of {name} failed: {exc}", key=path or None) from None
        return result

    def _tensor(self, record: TensorRecord, path: str) -> torch.Tensor:
        made = self.prebuilt.get(id(record))
        if made is not None:
            return made
        storage = self.storages[record.storage.key]
        tensor = torch.empty((0,), dtype=torch_dtype(record.dtype), device=storage.device)
        try:
            tensor.set_(storage, record.storage_offset, record.size, record.stride)
            if record.requires_grad:
                tensor.requires_grad_(True)
            if record.metadata:
                torch._utils.set_tensor_metadata(tensor, record.metadata)
        except RuntimeError as exc:
            raise CheckpointError(f"cannot rebuild tensor: {exc}", key=path or None) from None
        return tensor

    def _parameter(self, record: ParameterRecord, path: str) -> torch.nn.Parameter:
        data = self._build(record.data, path)
        if not isinstance(data, torch.Tensor):
            raise CheckpointError("Parameter data is not a tensor", key=path or None)
        try:
            param = torch.nn.Parameter(data, record.requires_grad)
        except RuntimeError as exc:
            raise CheckpointError(f"cannot rebuild Parameter: {exc}", key=path or None) from None
        if record.state is not None:
            param = torch._utils._set_obj_state(param, self._build(record.state, path))
        return param

    def _call(self, record: CallRecord, path: str) -> Any:
        """An allowlisted torch function, run exactly as torch's weights-only load runs it."""
        args = self._build(record.args, path)
        func = torch_object(record.func)
        try:
            result = func.__new__(func, *args) if record.new_object else func(*args)
            for state in record.build_states:
                _apply_build(result, self._build(state, path))
        except CheckpointError:
            raise
        except Exception as exc:  # torch's rebuild functions raise many kinds of errors
            raise CheckpointError(f"{record.func_name} failed: {exc}", key=path or None) from None
        return result


def _apply_build(obj: Any, state: Any) -> None:
    """BUILD on an allowlisted object, as torch's weights-only unpickler does it."""
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
        return
    slotstate = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slotstate = state
    if state:
        obj.__dict__.update(state)
    if slotstate:
        for name, value in slotstate.items():
            setattr(obj, name, value)


def build_objects(
    root: Any, storages: dict[str, torch.UntypedStorage], prebuilt: dict[int, torch.Tensor] | None = None
) -> Any:
    """The tree with torch objects for records; ``prebuilt`` tensors (by id(record)) are used as is."""
    return ObjectBuilder(storages, prebuilt).build(root)
