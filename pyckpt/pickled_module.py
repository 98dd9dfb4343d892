"""The state dict of a pickled ``nn.Module`` (``torch.save(model)``), read without its classes.

A pickled module is NEWOBJ of its class plus BUILD with its ``__dict__``, and that dict
holds ``_parameters``, ``_buffers``, ``_non_persistent_buffers_set`` and ``_modules``: exactly
what ``nn.Module.state_dict`` walks. So the walk below, over an :class:`~pyckpt.Opaque`,
gives what ``model.state_dict()`` would give where the classes are importable: parameters,
then persistent buffers, of each module before its children; detached tensors; and
``_metadata`` with each module's ``version``.

What it cannot see is code: a class that overrides ``_save_to_state_dict`` or
``get_extra_state``, or registers state-dict hooks, is read as ``nn.Module`` would read it.
The ``version`` of a class outside torch cannot be known without importing it; it is taken
as 1, nn.Module's, which is what every class that does not set ``_version`` has.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .errors import CheckpointError
from .index.opaque import Opaque
from .index.policy import MAX_NESTING
from .index.records import CallRecord, ParameterRecord, TensorRecord

MODULE_FIELDS = ("_parameters", "_buffers", "_modules")

# The torch.nn classes whose _version is not nn.Module's 1, for when torch is not imported
# (the command line never imports it). tests/test_pickled_modules.py checks it against torch.
TORCH_MODULE_VERSIONS = {
    f"torch.nn.modules.{module}.{name}": 2
    for module, names in {
        "batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
                      "LazyBatchNorm3d", "SyncBatchNorm", "_BatchNorm", "_LazyNormBase", "_NormBase"),
        "instancenorm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyInstanceNorm1d",
                         "LazyInstanceNorm2d", "LazyInstanceNorm3d", "_InstanceNorm"),
    }.items()
    for name in names
}


def module_attributes(value: Any) -> dict[str, Any] | None:
    """The instance ``__dict__`` BUILD gave an opaque object (``state`` or ``(state, slots)``)."""
    if not isinstance(value, Opaque) or not value.called:
        return None
    state = value.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]
    return state if isinstance(state, dict) else None


def is_pickled_module(value: Any) -> bool:
    """An opaque object whose attributes are those of an ``nn.Module``."""
    attributes = module_attributes(value)
    return attributes is not None and all(isinstance(attributes.get(name), dict) for name in MODULE_FIELDS)


def module_version(module: Opaque) -> int:
    """``type(module)._version``, for torch's classes; 1 (nn.Module's) for the rest."""
    if module.module.startswith("torch."):
        loaded = sys.modules.get(module.module)  # torch's own code, already imported: never import
        cls = getattr(loaded, module.name, None) if loaded is not None else None
        version = getattr(cls, "_version", None)
        if type(version) is int:
            return version
    return TORCH_MODULE_VERSIONS.get(module.qualified_name, 1)


def module_state_dict(root: Opaque, detach: Callable[[Any, str], Any]) -> OrderedDict[str, Any]:
    """``root.state_dict()`` for an opaque module; ``detach(value, key)`` makes each entry."""
    state_dict: OrderedDict[str, Any] = OrderedDict()
    metadata: OrderedDict[str, Any] = OrderedDict()
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        module, prefix, depth = stack.pop()
        if depth > MAX_NESTING:
            raise CheckpointError(f"pickled modules nest deeper than {MAX_NESTING} levels", key=prefix or None)
        torch_module = _real_module(module)
        if torch_module is not None:  # a trusted class rebuilt for real: torch does its own part
            child_state = torch_module.state_dict(prefix=prefix)
            state_dict.update(child_state)
            metadata.update(getattr(child_state, "_metadata", {}))
            continue
        attributes = module_attributes(module)
        if attributes is None or not is_pickled_module(module):
            raise CheckpointError("a child of a pickled module is not a module", key=prefix[:-1] or None)
        metadata[prefix[:-1]] = {"version": module_version(module)}
        non_persistent = attributes.get("_non_persistent_buffers_set") or ()
        for name, value in attributes["_parameters"].items():
            if value is not None:
                state_dict[prefix + name] = detach(value, prefix + name)
        for name, value in attributes["_buffers"].items():
            if value is not None and name not in non_persistent:
                state_dict[prefix + name] = detach(value, prefix + name)
        children = [(child, f"{prefix}{name}.", depth + 1)
                    for name, child in attributes["_modules"].items() if child is not None]
        stack.extend(reversed(children))
    state_dict._metadata = metadata  # type: ignore[attr-defined]
    return state_dict


def _real_module(value: Any) -> Any:
    torch = sys.modules.get("torch")
    return value if torch is not None and isinstance(value, torch.nn.Module) else None


def detach_record(value: Any, key: str) -> Any:
    """A state-dict entry from index records: a Parameter's data, without requires_grad."""
    if isinstance(value, ParameterRecord):
        value = value.data
    if isinstance(value, TensorRecord):
        return replace(value, requires_grad=False) if value.requires_grad else value
    if isinstance(value, CallRecord):  # quantized, sparse...: torch's own rebuild, detached later
        return value
    raise CheckpointError(f"parameter or buffer is a {type(value).__name__}, not a tensor", key=key)


def detach_tensor(value: Any, key: str) -> Any:
    """A state-dict entry from built objects: ``tensor.detach()``, as ``state_dict()`` returns."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach()
    raise CheckpointError(f"parameter or buffer is a {type(value).__name__}, not a tensor", key=key)


def state_dict_of(obj: Any) -> OrderedDict[str, Any]:
    """The state dict of a pickled ``nn.Module``, opaque or real.

    ``obj`` is what ``pyckpt.load(f, unknown_globals="opaque")`` returned for a
    ``torch.save(model)`` file (or an entry of it), or a real module. The result equals
    ``model.state_dict()`` where the classes are importable: detached tensors, in torch's
    order, with ``_metadata``.
    """
    real = _real_module(obj)
    if real is not None:
        return real.state_dict()
    if not is_pickled_module(obj):
        what = obj.qualified_name if isinstance(obj, Opaque) else type(obj).__name__
        raise TypeError(f"{what} is not a pickled nn.Module (no _parameters, _buffers and _modules)")
    if _holds_records(obj):
        return module_state_dict(obj, detach_record)
    return module_state_dict(obj, detach_tensor)


def _holds_records(module: Opaque) -> bool:
    """Whether the module comes straight from an index (records) rather than from ``load``."""
    stack: list[Any] = [module]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        attributes = module_attributes(current)
        if attributes is None or not is_pickled_module(current):
            continue
        for group in ("_parameters", "_buffers"):
            for value in attributes[group].values():
                if isinstance(value, (TensorRecord, ParameterRecord, CallRecord)):
                    return True
                if value is not None:
                    return False
        if isinstance(attributes.get("_modules"), Mapping):
            stack.extend(attributes["_modules"].values())
    return False
