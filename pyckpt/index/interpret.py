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
from . import call_rules as names
from .opaque import Opaque
from .policy import BLOCKED_MODULES, GlobalsPolicy
from .records import CallRecord, ParameterRecord, ScriptObject, StorageRecord, StorageRef, TensorRecord
from .symbols import ALLOWED_GLOBALS, NOT_CALLABLE, STORAGE_TYPES, DType, Symbol, dtype_of_global, symbol

PersistentLoad = Callable[[str, DType, str, int, Any], StorageRecord]

INT64_MAX = (1 << 63) - 1
GETATTR = "builtins.getattr"
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
    """Turns the unpickler's GLOBAL / REDUCE / NEWOBJ / BUILD / BINPERSID into values.

    ``policy`` says what happens to globals beyond torch's allowlist: refused (the default,
    torch's weights_only behaviour) or kept as inert :class:`Opaque` records.
    """

    def __init__(
        self, persistent_load: PersistentLoad, *, torchscript: bool = False, policy: GlobalsPolicy | None = None
    ) -> None:
        self.allowed = ALLOWED_GLOBALS
        self.persistent_load_fn = persistent_load
        self.torchscript = torchscript
        self.policy = policy if policy is not None else GlobalsPolicy()
        # Globals kept opaque that are not user-trusted, with how often the pickle names them.
        self.unknown_names: dict[str, int] = {}
        # Every dense tensor record made, in order, and those whose view is not checked yet
        # (the native converter checks the views of the records it makes itself).
        self.tensor_records: list[TensorRecord] = []
        self.unchecked_views: list[TensorRecord] = []
        # Set by the zip index: lets the native converter make storage records itself.
        self.zip_storages: Any = None
        self._classes: dict[tuple[str, str], Any] = {}

    # -- GLOBAL -----------------------------------------------------------------------
    def check_global(self, module: str, name: str) -> tuple[str, str]:
        """The (module, name) a GLOBAL names, Python 2 names mapped, if it may be named; else raise."""
        module = names.resolve_module(module)
        full = f"{module}.{name}"
        blocked = module in BLOCKED_MODULES or module.split(".", 1)[0] in BLOCKED_MODULES
        if blocked and not self.policy.list_blocked:
            raise UnsafeCheckpointError(f"refused global {full}: module {module} is always blocked")
        if not blocked and full in self.allowed:
            return module, name
        if self.torchscript and (
            full.startswith(names.TORCHSCRIPT_CLASS_PREFIX) or full in names.TORCHSCRIPT_IDENTITY_HELPERS
        ):
            return module, name
        if full in self.policy.trusted and not blocked:
            return module, name
        if self.policy.opaque:
            self.unknown_names[full] = self.unknown_names.get(full, 0) + 1
            return module, name
        raise UnsafeCheckpointError(
            f"refused global {full}: it is not on torch's weights_only allowlist (load with "
            "unknown_globals='opaque' to keep it as an inert record, or weights_only=False only "
            "if you trust the file)"
        )

    def resolve_global(self, module: str, name: str) -> Any:
        """What a GLOBAL pushes: a DType, a Symbol, a TorchScript class or a bare Opaque."""
        full = f"{module}.{name}"
        if full in self.allowed and module.split(".", 1)[0] not in BLOCKED_MODULES:
            return dtype_of_global(full) or symbol(full)
        found = self._classes.get((module, name))
        if found is None:
            if self.torchscript and (
                full.startswith(names.TORCHSCRIPT_CLASS_PREFIX) or full in names.TORCHSCRIPT_IDENTITY_HELPERS
            ):
                found = ScriptClass(full)
            else:
                found = Opaque(module, name)
            self._classes[(module, name)] = found
        return found

    def global_name(self, obj: Any) -> str | None:
        """The name of a value a GLOBAL pushed (None for anything else)."""
        if isinstance(obj, Symbol):
            return obj.name
        if isinstance(obj, DType):
            return str(obj)
        if isinstance(obj, ScriptClass):
            return obj.qualified_name
        if isinstance(obj, Opaque) and not obj.called:
            return obj.qualified_name
        return None

    def fast_path(self) -> tuple[Any, ...]:
        """What the native tree converter needs to build the common records itself.

        It handles only well-formed ``_rebuild_tensor(_v2/_v3)`` calls and 5- or 6-field
        storage persistent ids, exactly as :meth:`call` and :meth:`persistent` would, and hands
        anything else (including everything malformed) to them, so errors stay this class's.
        """
        return (TensorRecord, StorageRef, DType, STORAGE_TYPES, self.persistent_load_fn, self.tensor_records,
                self.zip_storages)

    # -- the entry points both VMs use, with the opcode offset for messages --------------
    def call_at(self, func: Any, args: Any, new_object: bool, offset: int, kwargs: Any = None) -> Any:
        with _at_offset(offset):
            return self.call(func, args, new_object=new_object, kwargs=kwargs)

    def build_at(self, obj: Any, state: Any, offset: int) -> None:
        with _at_offset(offset):
            self.build(obj, state)

    def extend_at(self, obj: Any, items: list[Any], offset: int) -> None:
        """APPEND(S) onto something that is not a list: only an opaque object records it."""
        if not (isinstance(obj, Opaque) and obj.called):
            raise CheckpointError(f"bad pickle at offset {offset}: APPENDS to something that is not a list")
        obj.items.extend(items)

    def set_items_at(self, obj: Any, items: list[Any], offset: int) -> None:
        """SETITEM(S) (``items`` flat: key, value, ...) onto an opaque object."""
        if not (isinstance(obj, Opaque) and obj.called):
            raise CheckpointError(f"bad pickle at offset {offset}: SETITEM on something that is not a dict")
        if len(items) % 2:
            raise CheckpointError(f"bad pickle at offset {offset}: SETITEMS with an odd number of items")
        obj.dict_items.extend(zip(items[0::2], items[1::2]))

    def persistent_at(self, pid: Any, offset: int) -> StorageRef:
        with _at_offset(offset):
            return self.persistent(pid)

    # -- REDUCE / NEWOBJ --------------------------------------------------------------
    def call(self, func: Any, args: Any, *, new_object: bool = False, kwargs: Any = None) -> Any:
        op = ("NEWOBJ_EX" if kwargs is not None else "NEWOBJ") if new_object else "REDUCE"
        if isinstance(func, Opaque):
            if func.called:
                raise UnsafeCheckpointError(f"refused {op}: the callable is an object, not a global")
            return self._opaque_call(func, args, kwargs, new_object, op)
        func_name = self.global_name(func)
        if func_name is None:
            raise UnsafeCheckpointError(f"refused {op}: the callable is not an allowlisted global")
        if type(args) is not tuple:
            raise CheckpointError(f"{op} of {func_name} with arguments that are not a tuple")
        if kwargs is not None:
            raise UnsafeCheckpointError(f"refused NEWOBJ_EX of {func_name}: only opaque classes take keyword arguments")
        try:
            return self._call(func_name, args, new_object)
        except CheckpointError:
            raise
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise CheckpointError(f"bad arguments for {func_name}: {exc}") from None

    def _opaque_call(self, func: Opaque, args: Any, kwargs: Any, new_object: bool, op: str) -> Opaque:
        if type(args) is not tuple:
            raise CheckpointError(f"{op} of {func.qualified_name} with arguments that are not a tuple")
        if kwargs is not None and not (type(kwargs) is dict and all(type(k) is str for k in kwargs)):
            raise CheckpointError(f"{op} of {func.qualified_name} with keyword arguments that are not a dict of names")
        base = args[0] if len(args) == 2 else None
        if (
            func.qualified_name == GETATTR
            and not new_object
            and kwargs is None
            and isinstance(base, Opaque)
            and not base.called
            and type(args[1]) is str
        ):
            # How protocol 2 names a nested class: getattr(Outer, "Inner"). Pure name
            # arithmetic, so the result is the bare global Outer.Inner; nothing is looked up.
            return self.resolve_global(base.module, f"{base.name}.{args[1]}")
        return Opaque(func.module, func.name, args, kwargs, new_object=new_object)

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
        record = TensorRecord(
            storage=ref.storage,
            dtype=dtype if dtype is not None else ref.dtype,
            storage_offset=_index(offset, "storage offset"),
            size=size_t,
            stride=stride_t,
            requires_grad=_flag(requires_grad, "requires_grad"),
            metadata=metadata or None,
        )
        self.tensor_records.append(record)
        self.unchecked_views.append(record)
        return record

    # -- BUILD ------------------------------------------------------------------------
    def build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, Opaque):
            if not obj.called:
                raise UnsafeCheckpointError(f"refused BUILD of {obj.qualified_name}: it is a class, not an object")
            if obj.state is not None:
                raise CheckpointError(f"BUILD of {obj.qualified_name} with a repeated state")
            obj.state = state
        elif type(obj) in (OrderedDict, Counter):
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
    def persistent(self, pid: Any) -> Any:
        if type(pid) is not tuple or not pid:
            raise CheckpointError("persistent id is not a non-empty tuple")
        tag = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if tag == "module" and self.policy.opaque and len(pid) == 4 and isinstance(pid[1], Opaque):
            # The legacy format's torch.save(model) names each module class once this way,
            # with its source code (which torch only compares, and pyckpt ignores).
            if pid[1].called:
                raise CheckpointError("module persistent id names an object, not a class")
            return pid[1]
        if tag != "storage":
            raise UnsafeCheckpointError(f"refused persistent id of type {tag!r}: only storages may be loaded")
        if len(pid) not in (5, 6):
            raise CheckpointError(f"storage persistent id has {len(pid)} fields, expected 5 or 6")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        dtype = STORAGE_TYPES.get(storage_type.name) if isinstance(storage_type, Symbol) else None
        if dtype is None:
            raise CheckpointError("storage persistent id names no storage type")
        key = _storage_key(key)
        if isinstance(location, bytes):
            location = location.decode("ascii", "replace")
        if type(key) is not str or type(location) is not str:
            raise CheckpointError("storage key and location must be strings")
        _check_storage_key(key)
        if view is not None:
            view = _storage_view(view)
        try:
            numel = _index(numel, f"storage '{key}' element count")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        record = self.persistent_load_fn(key, dtype, location, numel, view)
        return StorageRef(record, dtype)


def _storage_key(key: Any) -> Any:
    return str(key) if isinstance(key, int) and type(key) is not bool else key


def _storage_view(view: Any) -> tuple[str, int, int]:
    """A PyTorch 0.3-era storage view: ``(view_key, offset, size)`` in elements of the root."""
    if type(view) is not tuple or len(view) != 3:
        raise CheckpointError("storage view is not a (key, offset, size) tuple")
    key = _storage_key(view[0])
    if type(key) is not str:
        raise CheckpointError("storage view key must be a string")
    _check_storage_key(key)
    try:
        return key, _index(view[1], "storage view offset"), _index(view[2], "storage view size")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


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
