"""A TorchScript archive's state dict, read without running TorchScript.

``torch.jit.save`` pickles the module tree as ``__torch__.*`` objects whose BUILD state holds
every attribute. Which attributes are parameters and buffers is declared in the archive's
``code/`` records (``__parameters__`` / ``__buffers__`` lines), which are parsed here as
text. The result equals ``torch.jit.load(f).state_dict()``: parameters then buffers of each
module in attribute order, then its submodules; detached tensors; ``_metadata`` version 1.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from ..errors import CheckpointError
from .checkpoint import CheckpointIndex, read_small_record
from .records import ParameterRecord, ScriptObject, TensorRecord

_CLASS = re.compile(r"^class (\w+)\((\w*)\):\s*$", re.M)
_LIST = re.compile(r"^  (__parameters__|__buffers__) = \[(.*)\]\s*$", re.M)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
CODE_LIMIT = 64 << 20
MAX_MODULE_DEPTH = 256


@dataclass(frozen=True)
class ScriptModuleClass:
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]


def script_state_dict(index: CheckpointIndex) -> OrderedDict[str, Any]:
    classes = _module_classes(index)
    root = index.root
    if not isinstance(root, ScriptObject):
        raise CheckpointError("TorchScript archive does not hold a module object", record=f"{index.top_folder}/data.pkl")
    state_dict: OrderedDict[str, Any] = OrderedDict()
    metadata: OrderedDict[str, Any] = OrderedDict()
    stack: list[tuple[ScriptObject, str]] = [(root, "")]
    while stack:
        module, prefix = stack.pop()
        if prefix.count(".") > MAX_MODULE_DEPTH:
            raise CheckpointError(f"TorchScript modules nest deeper than {MAX_MODULE_DEPTH} levels")
        info = classes.get(module.qualified_name)
        if info is None:
            raise CheckpointError(f"TorchScript class {module.qualified_name} is not declared in code/")
        metadata[prefix[:-1]] = {"version": 1}
        state = module.state or {}
        for group in (info.parameters, info.buffers):
            for name, value in state.items():
                if name in group and value is not None:
                    state_dict[prefix + name] = _detached(value, prefix + name)
        children = [
            (value, f"{prefix}{name}.")
            for name, value in state.items()
            if isinstance(value, ScriptObject) and value.qualified_name in classes
        ]
        stack.extend(reversed(children))
    state_dict._metadata = metadata  # type: ignore[attr-defined]
    return state_dict


def _detached(value: Any, key: str) -> Any:
    if isinstance(value, ParameterRecord):
        value = value.data
    if isinstance(value, TensorRecord):
        return replace(value, requires_grad=False)
    raise CheckpointError("TorchScript parameter or buffer is not a dense tensor", key=key)


def _module_classes(index: CheckpointIndex) -> dict[str, ScriptModuleClass]:
    code_prefix = f"{index.top_folder}/code/"
    classes: dict[str, ScriptModuleClass] = {}
    for name, entry in index.entries.items():
        if not (name.startswith(code_prefix) and name.endswith(".py")):
            continue
        module_path = name[len(code_prefix) : -len(".py")].replace("/", ".")
        try:
            text = read_small_record(index.source, entry, limit=CODE_LIMIT).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError("TorchScript code is not UTF-8", record=name) from None
        classes.update(_parse_classes(module_path, text))
    return classes


def _parse_classes(module_path: str, text: str) -> dict[str, ScriptModuleClass]:
    found: dict[str, ScriptModuleClass] = {}
    heads = list(_CLASS.finditer(text))
    for i, head in enumerate(heads):
        if head.group(2) != "Module":
            continue
        body = text[head.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        lists = {"__parameters__": (), "__buffers__": ()}
        for match in _LIST.finditer(body):
            lists[match.group(1)] = tuple(_QUOTED.findall(match.group(2)))
        found[f"{module_path}.{head.group(1)}"] = ScriptModuleClass(
            lists["__parameters__"], lists["__buffers__"]
        )
    return found
