"""``pyckpt.Opaque``: an object of a class pyckpt will not import, kept as what the pickle said.

In opaque mode (``unknown_globals="opaque"``) every global beyond torch's allowlist becomes
one of these instead of an error. Nothing is imported, no attribute is looked up and nothing
is called: the record holds the global's name, the arguments of the REDUCE / NEWOBJ /
NEWOBJ_EX that made it, the state BUILD gave it, and whatever APPEND(S) / SETITEM(S) added.
Tensors anywhere inside are real tensors once loaded, with the usual storage sharing.

A bare global (a class or function named but never called, such as the ``numpy.ndarray``
argument of ``numpy.core.multiarray._reconstruct``) is an Opaque whose ``args`` is None.
"""

from __future__ import annotations

import reprlib
import sys
from typing import Any


class Opaque:
    """An object the checkpoint describes but pyckpt never built.

    Attributes:
        module, name: the global, as the pickle names it (``"argparse"``, ``"Namespace"``).
        args: the positional arguments of the call that made it, or None for a bare global.
        kwargs: keyword arguments (NEWOBJ_EX only), else None.
        new_object: True when made by NEWOBJ / NEWOBJ_EX (``cls.__new__(cls, *args)``),
            False for REDUCE (``func(*args)``).
        state: what BUILD gave it (usually the instance ``__dict__``), None without BUILD.
        items: values APPEND(S) added (list-like classes), in order.
        dict_items: ``(key, value)`` pairs SETITEM(S) added (dict-like classes), in order.
    """

    __slots__ = ("module", "name", "args", "kwargs", "new_object", "state", "items", "dict_items", "__weakref__")

    def __init__(
        self,
        module: str,
        name: str,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        new_object: bool = False,
        state: Any = None,
        items: list[Any] | None = None,
        dict_items: list[tuple[Any, Any]] | None = None,
    ) -> None:
        self.module = module
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.new_object = new_object
        self.state = state
        self.items: list[Any] = items if items is not None else []
        self.dict_items: list[tuple[Any, Any]] = dict_items if dict_items is not None else []

    @property
    def qualified_name(self) -> str:
        """``module.name``, as ``pyckpt.unknown_globals`` and torch's messages spell it."""
        return f"{self.module}.{self.name}"

    @property
    def called(self) -> bool:
        """False for a bare global (the class or function itself), True for an instance."""
        return self.args is not None

    def _fields(self) -> tuple[Any, ...]:
        return (self.module, self.name, self.args, self.kwargs, self.new_object, self.state, self.items, self.dict_items)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not Opaque:
            return NotImplemented
        return same_value(self._fields(), other._fields())

    def __hash__(self) -> int:
        # Only the name: the rest can change while the pickle is still being read (BUILD
        # comes after the object is used), and equal objects must hash equal.
        return hash((self.module, self.name))

    @reprlib.recursive_repr("<...>")
    def __repr__(self) -> str:
        if self.args is None:
            return self.qualified_name
        parts = [repr(arg) for arg in self.args]
        parts += [f"{key}={value!r}" for key, value in (self.kwargs or {}).items()]
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) and (
            state[0] is None or isinstance(state[0], dict)
        ):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) as pickle's BUILD takes it
        if isinstance(state, dict) and all(isinstance(k, str) and k.isidentifier() for k in state):
            parts += [f"{key}={value!r}" for key, value in state.items()]
        elif state is not None:
            parts.append(f"state={state!r}")
        if self.items:
            parts.append(f"items={self.items!r}")
        if self.dict_items:
            parts.append("dict_items={" + ", ".join(f"{k!r}: {v!r}" for k, v in self.dict_items) + "}")
        return f"{self.qualified_name}({', '.join(parts)})"


def same_value(a: Any, b: Any, _comparing: set[tuple[int, int]] | None = None) -> bool:
    """Equality that also holds for tensors inside (same type, dtype, shape and values), and
    for objects that refer back to themselves (a config node's parent, say)."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind in (tuple, list, Opaque) or isinstance(a, dict):
        comparing = _comparing if _comparing is not None else set()
        pair = (id(a), id(b))
        if pair in comparing:
            return True  # already being compared further up: equal unless something else differs
        comparing.add(pair)
        if kind is Opaque:
            return same_value(a._fields(), b._fields(), comparing)
        if kind in (tuple, list):
            return len(a) == len(b) and all(same_value(x, y, comparing) for x, y in zip(a, b))
        attributes = getattr(a, "__dict__", None), getattr(b, "__dict__", None)  # a state dict's _metadata
        return (
            list(a.keys()) == list(b.keys())
            and all(same_value(a[k], b[k], comparing) for k in a)
            and (attributes[0] == attributes[1] if not any(attributes) else same_value(*attributes, comparing))
        )
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and a.requires_grad == b.requires_grad
            and bool(torch.equal(a.detach(), b.detach()))
        )
    try:
        result = a == b
        if isinstance(result, bool):
            return result
        if hasattr(result, "all"):  # numpy arrays of trusted globals compare elementwise
            return getattr(a, "shape", None) == getattr(b, "shape", None) and bool(result.all())
        return bool(result)
    except (TypeError, ValueError):
        return False
