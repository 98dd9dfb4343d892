"""What the pickle's calls mean: shared by the Python and the native unpickler.

Both virtual machines only move values around; every REDUCE, NEWOBJ, BUILD and
persistent id goes through an :class:`Interpreter`, so the two backends cannot disagree on
meaning. Nothing here executes code from the file: tensor rebuilds become records, a short
list of value constructors is evaluated with argument checks, and any other allowlisted
callable is recorded for torch's own function to run at materialisation, exactly as
``torch.load(weights_only=True)`` would.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError, UnsafeCheckpointError
from . import allowlist as names
from .records import CallRecord, ParameterRecord, ScriptObject, StorageRecord, StorageRef, TensorRecord
from .symbols import ALLOWED_GLOBALS, NOT_CALLABLE, STORAGE_TYPES, DType, Symbol, dtype_of_global, symbol

PersistentLoad = Callable[[str, DType, str, int, Any], StorageRecord]

INT64_MAX = (1 << 63) - 1
REFUSED_BUILD = "refused BUILD: only Parameter, OrderedDict and allowlisted objects may be built"


class _at_offset:
    """Suffix a CheckpointError raised while interpreting an opcode with the opcode's offset."""

    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, traceback: Any) -> None:
        if isinstance(exc, CheckpointError) and "offset" not in exc.problem:
            exc.problem = f"{exc.problem} (pickle offset {self.offset})"
            exc.args = (exc._format(),)


class ScriptClass:
    """A ``__torch__.*`` class named by a TorchScript archive; never imported."""

    __slots__ = ("qualified_name",)

    def __init__(self, qualified_name: str) -> None:
        self.qualified_name = qualified_name

    def __repr__(self) -> str:
        return f"ScriptClass({self.qualified_name})"


class Interpreter:
    """Turns the unpickler's GLOBAL / REDUCE / NEWOBJ / BUILD / BINPERSID into values."""

    def __init__(self, persistent_load: PersistentLoad, *, torchscript: bool = False) -> None:
        self.allowed = ALLOWED_GLOBALS
        self.persistent_load_fn = persistent_load
        self.torchscript = torchscript
        self._script_classes: dict[str, ScriptClass] = {}

    # -- GLOBAL -----------------------------------------------------------------------
    def check_global(self, module: str, name: str) -> str:
        """Return the full name if the global may be named, else raise."""
        module = names.resolve_module(module)
        full = f"{module}.{name}"
        if module in names.BLOCKED_MODULES or module.split(".", 1)[0] in names.BLOCKED_MODULES:
            raise UnsafeCheckpointError(f"refused global {full}: module {module} is always blocked")
        if full in self.allowed:
            return full
        if self.torchscript and (
            full.startswith(names.TORCHSCRIPT_CLASS_PREFIX) or full in names.TORCHSCRIPT_IDENTITY_HELPERS
        ):
            return full
        raise UnsafeCheckpointError(
            f"refused global {full}: it is not on torch's weights_only allowlist "
            "(load with weights_only=False only if you trust the file)"
        )

    def resolve_global(self, full_name: str) -> Any:
        """The value a GLOBAL pushes: a DType, a Symbol, or a TorchScript class marker."""
        if full_name in self.allowed:
            return dtype_of_global(full_name) or symbol(full_name)
        script_class = self._script_classes.get(full_name)
        if script_class is None:
            script_class = self._script_classes[full_name] = ScriptClass(full_name)
        return script_class

    def global_name(self, obj: Any) -> str | None:
        """The name of a value a GLOBAL pushed (None for anything else)."""
        if isinstance(obj, Symbol):
            return obj.name
        if isinstance(obj, DType):
            return str(obj)
        if isinstance(obj, ScriptClass):
            return obj.qualified_name
        return None

    # -- the entry points both VMs use, with the opcode offset for messages --------------
    def call_at(self, func_name: str, args: Any, new_object: bool, offset: int) -> Any:
        with _at_offset(offset):
            return self.call(func_name, args, new_object=new_object)

    def build_at(self, obj: Any, state: Any, offset: int) -> None:
        with _at_offset(offset):
            self.build(obj, state)

    def persistent_at(self, pid: Any, offset: int) -> StorageRef:
        with _at_offset(offset):
            return self.persistent(pid)

    # -- REDUCE / NEWOBJ --------------------------------------------------------------
    def call(self, func_name: str, args: Any, *, new_object: bool = False) -> Any:
        op = "NEWOBJ" if new_object else "REDUCE"
        if type(args) is not tuple:
            raise CheckpointError(f"{op} of {func_name} with arguments that are not a tuple")
        try:
            return self._call(func_name, args, new_object)
        except CheckpointError:
            raise
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise CheckpointError(f"bad arguments for {func_name}: {exc}") from None

    def _call(self, name: str, args: tuple[Any, ...], new_object: bool) -> Any:
        if name in (names.REBUILD_TENSOR_V2, names.REBUILD_TENSOR_V3, names.REBUILD_TENSOR):
            return self._tensor(name, args)
        if name in (names.REBUILD_PARAMETER, names.REBUILD_PARAMETER_WITH_STATE):
            expected = 3 if name == names.REBUILD_PARAMETER else 4
            if len(args) != expected:
                raise ValueError(f"expected {expected} arguments, got {len(args)}")
            state = args[3] if expected == 4 else None
            return ParameterRecord(args[0], _flag(args[1], "requires_grad"), state)
        if name == names.PARAMETER:
            if not 1 <= len(args) <= 2:
                raise ValueError("Parameter takes data and an optional requires_grad")
            requires_grad = _flag(args[1], "requires_grad") if len(args) == 2 else True
            return ParameterRecord(args[0], requires_grad, None)
        if name.startswith(names.TORCHSCRIPT_CLASS_PREFIX):
            if not new_object or args != ():
                raise ValueError("TorchScript classes are only created empty with NEWOBJ")
            return ScriptObject(name)
        if name in names.TORCHSCRIPT_IDENTITY_HELPERS:
            if not args:
                raise ValueError("expected at least one argument")
            return args[0]
        if new_object and name in (names.ORDERED_DICT, names.COUNTER, names.SET) and args == ():
            return names.plain_value(name, ())[1]
        handled, value = names.plain_value(name, args)
        if handled:
            return value
        if name not in self.allowed or name in NOT_CALLABLE:
            raise ValueError("it cannot be called")
        names.check_torch_value(name, args)
        return CallRecord(symbol(name), args, new_object=new_object)

    def _tensor(self, name: str, args: tuple[Any, ...]) -> TensorRecord:
        if name == names.REBUILD_TENSOR:
            if len(args) != 4:
                raise ValueError(f"expected 4 arguments, got {len(args)}")
            ref, offset, size, stride = args
            requires_grad, metadata, dtype = False, None, None
        elif name == names.REBUILD_TENSOR_V2:
            if len(args) not in (6, 7):
                raise ValueError(f"expected 6 or 7 arguments, got {len(args)}")
            ref, offset, size, stride, requires_grad = args[:5]
            metadata, dtype = (args[6] if len(args) == 7 else None), None
        else:
            if len(args) not in (7, 8):
                raise ValueError(f"expected 7 or 8 arguments, got {len(args)}")
            ref, offset, size, stride, requires_grad = args[:5]
            dtype = args[6]
            metadata = args[7] if len(args) == 8 else None
            if not isinstance(dtype, DType):
                raise ValueError("the dtype argument is not a torch dtype")
        if not isinstance(ref, StorageRef):
            raise ValueError("the storage argument is not a storage")
        if metadata is not None and not (
            type(metadata) is dict and all(type(k) is str and type(v) is bool for k, v in metadata.items())
        ):
            raise ValueError("tensor metadata must map names to bools")
        size_t = _int_tuple(size, "size")
        stride_t = _int_tuple(stride, "stride")
        if len(size_t) != len(stride_t):
            raise ValueError(f"size {size_t} and stride {stride_t} differ in length")
        return TensorRecord(
            storage=ref.storage,
            dtype=dtype if dtype is not None else ref.dtype,
            storage_offset=_index(offset, "storage offset"),
            size=size_t,
            stride=stride_t,
            requires_grad=_flag(requires_grad, "requires_grad"),
            metadata=metadata or None,
        )

    # -- BUILD ------------------------------------------------------------------------
    def build(self, obj: Any, state: Any) -> None:
        if type(obj) in (OrderedDict, Counter):
            if not isinstance(state, dict) or not all(type(k) is str for k in state):
                raise CheckpointError(f"BUILD of {type(obj).__name__} with a state that is not a dict of names")
            obj.__dict__.update(state)
        elif isinstance(obj, ScriptObject):
            if obj.state is not None or type(state) is not dict:
                raise CheckpointError(f"BUILD of {obj.qualified_name} with a bad or repeated state")
            obj.state = state
        elif isinstance(obj, (ParameterRecord, CallRecord)):
            if isinstance(obj, ParameterRecord):
                if obj.state is not None:
                    raise CheckpointError("BUILD of a Parameter that already has a state")
                obj.state = state
            else:
                obj.build_states.append(state)
        else:
            raise UnsafeCheckpointError(REFUSED_BUILD)

    # -- BINPERSID ----------------------------------------------------------------------
    def persistent(self, pid: Any) -> StorageRef:
        if type(pid) is not tuple or not pid:
            raise CheckpointError("persistent id is not a non-empty tuple")
        tag = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if tag != "storage":
            raise UnsafeCheckpointError(f"refused persistent id of type {tag!r}: only storages may be loaded")
        if len(pid) not in (5, 6):
            raise CheckpointError(f"storage persistent id has {len(pid)} fields, expected 5 or 6")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        dtype = STORAGE_TYPES.get(storage_type.name) if isinstance(storage_type, Symbol) else None
        if dtype is None:
            raise CheckpointError("storage persistent id names no storage type")
        if isinstance(key, int) and type(key) is not bool:
            key = str(key)
        if isinstance(location, bytes):
            location = location.decode("ascii", "replace")
        if type(key) is not str or type(location) is not str:
            raise CheckpointError("storage key and location must be strings")
        _check_storage_key(key)
        try:
            numel = _index(numel, f"storage '{key}' element count")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        record = self.persistent_load_fn(key, dtype, location, numel, view)
        return StorageRef(record, dtype)


def _check_storage_key(key: str) -> None:
    if not key or "/" in key or "\\" in key or "\0" in key or key in (".", ".."):
        raise CheckpointError(f"storage key {key!r} is not a plain record name")


def _flag(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{what} is not a bool")
    return value


def _index(value: Any, what: str) -> int:
    if type(value) is not int or value < 0 or value > INT64_MAX:
        raise ValueError(f"{what} {value!r} is not a non-negative 64-bit integer")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list):
        raise ValueError(f"{what} is not a tuple")
    for item in value:
        _index(item, what)
    return tuple(value)
