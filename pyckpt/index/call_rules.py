"""The rules for what a checkpoint may call, and the values the index builds itself.

Names and facts come from :mod:`pyckpt.index.symbols` (torch's allowlist, known without
importing torch); what a run may accept beyond it is :mod:`pyckpt.index.policy`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from .policy import PY2_MODULES
from .symbols import LAYOUTS

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


def resolve_module(module: str) -> str:
    return PY2_MODULES.get(module, module)


def plain_value(name: str, args: tuple[Any, ...]) -> tuple[bool, Any]:
    """Evaluate the allowlisted constructors of plain Python values, with safe argument checks.

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
    return False, None


def check_torch_value(name: str, args: tuple[Any, ...]) -> bool:
    """Validate the arguments of torch's value constructors (built at materialisation).

    Returns False when ``name`` is none of them; raises ValueError on arguments torch.save
    never writes.
    """
    if name == TORCH_SIZE:
        if len(args) == 1 and isinstance(args[0], (tuple, list)) and all(type(v) is int for v in args[0]):
            return True
        raise ValueError("torch.Size takes one sequence of ints")
    if name == TORCH_DEVICE:
        if 1 <= len(args) <= 2 and isinstance(args[0], str) and (len(args) == 1 or type(args[1]) is int):
            if len(args[0]) <= 64:
                return True
        raise ValueError("torch.device takes a string and an optional index")
    if name == GET_LAYOUT:
        if len(args) == 1 and isinstance(args[0], str) and args[0] in LAYOUTS:
            return True
        raise ValueError("_get_layout takes the name of a torch layout")
    return False


def _is_real(value: Any) -> bool:
    return type(value) in (int, float, bool)


def _pairs(items: list[Any]) -> list[tuple[Any, Any]]:
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in items):
        raise ValueError("OrderedDict takes a list of (key, value) pairs")
    return [(k, v) for k, v in items]
