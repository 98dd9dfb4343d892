"""What ``pyckpt.load(f, unknown_globals="opaque")`` must return, derived from torch's own load.

``opaque_view(torch.load(f, weights_only=False))`` rewrites every object that is not a plain
value, a container or an allowlisted torch object into the :class:`pyckpt.Opaque` record of
how pickle writes it at protocol 2 (``obj.__reduce_ex__(2)``: the callable, its arguments,
the state, the list and dict items). It runs where the classes are importable, so the
expected result comes from the real objects, not from pyckpt's reading of the file. Shared
objects stay shared, tensors stay the tensors torch loaded.
"""

from __future__ import annotations

import copyreg
import pickle
import types
from collections import Counter, OrderedDict
from typing import Any

import torch

from pyckpt import Opaque

# What pyckpt builds for real (torch's allowlist, plain values) rather than as records. Exact
# types: a subclass (numpy.float64 is a float) is pickled by its own reduction.
_PLAIN_TYPES = (type(None), bool, int, float, str, complex, bytearray, torch.dtype, torch.device, torch.Size,
                torch.layout, torch.qscheme, torch.storage.TypedStorage, torch.UntypedStorage)


def opaque_view(obj: Any) -> Any:
    return _View().convert(obj)


class _View:
    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}
        self.alive: list[Any] = []

    def convert(self, obj: Any) -> Any:
        if type(obj) in _PLAIN_TYPES or isinstance(obj, torch.Tensor) or (type(obj) is bytes and obj):
            return obj
        found = self.memo.get(id(obj))
        if found is not None:
            return found
        self.alive.append(obj)
        kind = type(obj)
        if kind is bytes:  # only b"": protocol 2 writes it as REDUCE of builtins.bytes
            result: Any = Opaque("builtins", "bytes", ())
        elif kind in (dict, OrderedDict, Counter):
            result = kind()
            self.memo[id(obj)] = result
            for key, value in obj.items():
                result[self.convert(key)] = self.convert(value)
            if getattr(obj, "__dict__", None):
                result.__dict__.update(self.convert(dict(vars(obj))))
        elif kind is list:
            result = []
            self.memo[id(obj)] = result
            result.extend(self.convert(item) for item in obj)
        elif kind is tuple:
            result = tuple(self.convert(item) for item in obj)
        elif kind is set:
            result = {self.convert(item) for item in obj}
        elif kind is frozenset:  # protocol 2: REDUCE of builtins.frozenset over a list
            result = Opaque("builtins", "frozenset", ([self.convert(item) for item in obj],))
        elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            result = self._global(obj, getattr(obj, "__qualname__", obj.__name__))
        else:
            result = self._reduced(obj)
        self.memo[id(obj)] = result
        return result

    def _global(self, obj: Any, name: str) -> Opaque:
        return Opaque(pickle.whichmodule(obj, name), name)

    def _reduced(self, obj: Any) -> Opaque:
        reduced = obj.__reduce_ex__(2)
        if isinstance(reduced, str):
            return self._global(obj, reduced)
        func, args, *rest = reduced
        state, list_items, dict_items = (list(rest) + [None, None, None])[:3]
        kwargs = None
        if func is copyreg.__newobj__:
            cls, args = args[0], args[1:]
            result = Opaque(pickle.whichmodule(cls, cls.__qualname__), cls.__qualname__, new_object=True)
        elif func is copyreg.__newobj_ex__:  # as protocol 4 writes it: NEWOBJ_EX (the test's only use)
            cls, args, kwargs = args
            result = Opaque(pickle.whichmodule(cls, cls.__qualname__), cls.__qualname__, new_object=True)
        else:
            name = getattr(func, "__qualname__", func.__name__)
            result = Opaque(pickle.whichmodule(func, name), name)
        self.memo[id(obj)] = result
        result.args = tuple(self.convert(arg) for arg in args)
        result.kwargs = self.convert(kwargs) if kwargs is not None else None
        result.state = self.convert(state)
        result.items = [self.convert(item) for item in list_items or ()]
        result.dict_items = [(self.convert(k), self.convert(v)) for k, v in dict_items or ()]
        return result
