"""What a checkpoint may name: torch's own weights-only allowlist, and nothing else.

Both unpicklers take their rules from here, so pyckpt accepts exactly the globals the
installed torch accepts under ``weights_only=True`` (user additions through
``torch.serialization.add_safe_globals`` are deliberately not honoured), and the modules
torch blocks are refused even if someone allowlists them.
"""

from __future__ import annotations

import functools
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})

# Python 2 module names that torch's unpickler maps (through _compat_pickle) for the
# globals on the allowlist.
PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

# Calls whose result the index builds itself (as records or plain values); every other
# allowlisted callable becomes a CallRecord that torch's own function materialises.
REBUILD_TENSOR = "torch._utils._rebuild_tensor"
REBUILD_TENSOR_V2 = "torch._utils._rebuild_tensor_v2"
REBUILD_TENSOR_V3 = "torch._utils._rebuild_tensor_v3"
REBUILD_PARAMETER = "torch._utils._rebuild_parameter"
REBUILD_PARAMETER_WITH_STATE = "torch._utils._rebuild_parameter_with_state"
PARAMETER = "torch.nn.parameter.Parameter"
ORDERED_DICT = "collections.OrderedDict"
COUNTER = "collections.Counter"
SET = "builtins.set"
COMPLEX = "builtins.complex"
BYTEARRAY = "builtins.bytearray"
CODECS_ENCODE = "_codecs.encode"
TORCH_SIZE = "torch.Size"
TORCH_DEVICE = "torch.device"
GET_LAYOUT = "torch.serialization._get_layout"
UNTYPED_STORAGE = "torch.storage.UntypedStorage"

# TorchScript archives pickle their module tree with a few helpers of their own; the
# index treats them as the identity on their first argument instead of importing them.
TORCHSCRIPT_IDENTITY_HELPERS = frozenset(
    {
        "torch.jit._pickle.restore_type_tag",
        "torch.jit._pickle.build_intlist",
        "torch.jit._pickle.build_doublelist",
        "torch.jit._pickle.build_boollist",
        "torch.jit._pickle.build_tensorlist",
    }
)
TORCHSCRIPT_CLASS_PREFIX = "__torch__."


@dataclass(frozen=True)
class Allowlist:
    """The resolved rules: global name -> object, and storage class name -> dtype."""

    globals: dict[str, Any]
    storage_dtypes: dict[str, torch.dtype]
    dtypes_by_name: dict[str, torch.dtype]

    def resolve_module(self, module: str) -> str:
        return PY2_MODULES.get(module, module)


@functools.lru_cache(maxsize=1)
def allowlist() -> Allowlist:
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    storage_dtypes: dict[str, torch.dtype] = {}
    for name, obj in allowed.items():
        dtype = getattr(obj, "dtype", None)
        if name.endswith("Storage") and isinstance(dtype, torch.dtype):
            storage_dtypes[name] = dtype
    storage_dtypes[UNTYPED_STORAGE] = torch.uint8
    dtypes_by_name = {
        str(value).removeprefix("torch."): value
        for value in vars(torch).values()
        if isinstance(value, torch.dtype)
    }
    return Allowlist(allowed, storage_dtypes, dtypes_by_name)


def plain_value(name: str, args: tuple[Any, ...]) -> tuple[bool, Any]:
    """Evaluate the allowlisted constructors of plain values, with safe argument checks.

    Returns ``(True, value)`` when ``name`` is one of them, else ``(False, None)``. Raises
    ``ValueError`` with a description when the arguments are not what torch.save writes;
    the caller turns that into a CheckpointError with the location.
    """
    if name == ORDERED_DICT:
        if args == ():
            return True, OrderedDict()
        if len(args) == 1 and isinstance(args[0], list):
            return True, OrderedDict(_pairs(args[0]))
        raise ValueError("OrderedDict takes no arguments or a list of pairs")
    if name == COUNTER:
        if args == ():
            return True, Counter()
        if len(args) == 1 and isinstance(args[0], dict):
            return True, Counter(args[0])
        raise ValueError("Counter takes no arguments or a dict")
    if name == SET:
        if args == ():
            return True, set()
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            return True, set(args[0])
        raise ValueError("set takes no arguments or a list")
    if name == COMPLEX:
        if 1 <= len(args) <= 2 and all(_is_real(a) for a in args):
            return True, complex(*args)
        raise ValueError("complex takes one or two real numbers")
    if name == CODECS_ENCODE:
        # Protocol 2 pickles bytes as encode(text, 'latin1'); other codecs (zlib, bz2, ...)
        # could expand without bound, so they are refused.
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            return True, args[0].encode("latin-1")
        raise ValueError("_codecs.encode is only accepted as encode(str, 'latin1')")
    if name == BYTEARRAY:
        # bytearray(n) would allocate n bytes: only copies of byte strings are accepted.
        if args == ():
            return True, bytearray()
        if len(args) == 1 and isinstance(args[0], bytes):
            return True, bytearray(args[0])
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            return True, bytearray(args[0], "latin-1")
        raise ValueError("bytearray is only accepted over bytes or a latin1 string")
    if name == TORCH_SIZE:
        if len(args) == 1 and isinstance(args[0], (tuple, list)) and all(
            type(v) is int for v in args[0]
        ):
            return True, torch.Size(args[0])
        raise ValueError("torch.Size takes one sequence of ints")
    if name == TORCH_DEVICE:
        if 1 <= len(args) <= 2 and isinstance(args[0], str) and (
            len(args) == 1 or type(args[1]) is int
        ):
            return True, torch.device(*args)
        raise ValueError("torch.device takes a string and an optional index")
    if name == GET_LAYOUT:
        if len(args) == 1 and isinstance(args[0], str):
            layout = getattr(torch, args[0].removeprefix("torch."), None)
            if isinstance(layout, torch.layout):
                return True, layout
        raise ValueError("_get_layout takes the name of a torch layout")
    return False, None


def _is_real(value: Any) -> bool:
    return type(value) in (int, float, bool)


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in items):
        raise ValueError("OrderedDict takes a list of (key, value) pairs")
    return [(k, v) for k, v in items]
