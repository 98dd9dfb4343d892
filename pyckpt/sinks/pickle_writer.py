"""Write an index tree back as a torch ``data.pkl`` (protocol 2), without torch.

Records become the calls torch itself writes (``_rebuild_tensor_v2``/``_v3``,
``_rebuild_parameter``, persistent ids for storages), globals are written by name, and
storages are renumbered ``0..N-1`` in the order the pickle first meets them. The memo keeps
every shared object (tied weights, views, repeated containers) shared. Only opcodes that
torch's ``weights_only`` unpickler (and pyckpt's own) accept are written; opaque objects
are written back with the globals they were read with, which only opaque mode (or
``weights_only=False``) reads again.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from typing import Any

from ..errors import CheckpointError
from ..index.opaque import Opaque
from ..index.records import CallRecord, ParameterRecord, ScriptObject, StorageRecord, StorageRef, TensorRecord
from ..index.symbols import UNTYPED_STORAGE, DType, Symbol, symbol

BATCH = 1000  # items per APPENDS / SETITEMS, as the standard pickler batches them

REBUILD_V2 = symbol("torch._utils._rebuild_tensor_v2")
REBUILD_V3 = symbol("torch._utils._rebuild_tensor_v3")
REBUILD_PARAMETER = symbol("torch._utils._rebuild_parameter")
REBUILD_PARAMETER_WITH_STATE = symbol("torch._utils._rebuild_parameter_with_state")
ORDERED_DICT = symbol("collections.OrderedDict")
COUNTER = symbol("collections.Counter")
SET = symbol("builtins.set")
COMPLEX = symbol("builtins.complex")
BYTEARRAY = symbol("builtins.bytearray")
ENCODE = symbol("_codecs.encode")
FROZENSET = symbol("builtins.frozenset")
NEWOBJ_EX = symbol("copyreg.__newobj_ex__")
GETATTR = symbol("builtins.getattr")


class PairDict(list):  # type: ignore[type-arg]
    """``(key, value)`` pairs written as a dict: for keys that hash slowly or not at all here
    (opaque objects, which all of one class hash alike), and are hashed by whoever reads."""


_pack_i32 = struct.Struct("<i").pack
_pack_u32 = struct.Struct("<I").pack
_pack_f64 = struct.Struct(">d").pack


class PickleWriter:
    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo: dict[int, bytes] = {}  # id(obj) -> the opcode that fetches it from the memo
        self.alive: list[Any] = []  # keeps memoised temporaries alive, so ids stay unique
        # id(record) -> (new key, record): by identity, as the files of a sharded checkpoint
        # each number their storages from "0"
        self.storages: dict[int, tuple[str, StorageRecord]] = {}
        self.bare_globals: dict[tuple[str, str], Opaque] = {}  # one object per class, memoised once
        # (dtype, location) -> the bytes of a storage id before and after its key
        self.id_parts: dict[tuple[DType, str], tuple[bytes, bytes]] = {}
        self.shape_bytes: dict[tuple[int, ...], bytes] = {}  # a size or stride tuple, written

    # -- memo ---------------------------------------------------------------------------
    def _memoize(self, obj: Any) -> None:
        index = len(self.memo)
        self.memo[id(obj)] = b"h" + bytes((index,)) if index < 256 else b"j" + _pack_u32(index)
        self.alive.append(obj)
        self.out += b"q" + bytes((index,)) if index < 256 else b"r" + _pack_u32(index)

    def _recall(self, obj: Any) -> bool:
        fetch = self.memo.get(id(obj))
        if fetch is None:
            return False
        self.out += fetch
        return True

    # -- values -------------------------------------------------------------------------
    def save(self, obj: Any) -> None:
        kind = type(obj)
        if obj is None:
            self.out += b"N"
        elif kind is bool:
            self.out += b"\x88" if obj else b"\x89"
        elif kind is int:
            self._int(obj)
        elif kind is float:
            self.out += b"G" + _pack_f64(obj)
        elif self._recall(obj):
            return
        elif kind is str:
            encoded = obj.encode("utf-8", "surrogatepass")
            self.out += b"X" + _pack_u32(len(encoded)) + encoded
            self._memoize(obj)
        elif kind is tuple:
            self._tuple(obj)
        elif kind is list:
            self.out += b"]"
            self._memoize(obj)
            self._batched(obj, b"e")
        elif kind is dict:
            self.out += b"}"
            self._memoize(obj)
            self._items(obj)
        elif kind is PairDict:
            self.out += b"}"
            self._memoize(obj)
            self._pairs(obj)
        elif kind is OrderedDict:
            self._call(ORDERED_DICT, ())
            self._memoize(obj)
            self._items(obj)
            if vars(obj):
                self.save(dict(vars(obj)))
                self.out += b"b"  # BUILD: OrderedDict.__dict__ (the state dict's _metadata)
        elif kind is Counter:
            self._call(COUNTER, (dict(obj),))
            self._memoize(obj)
        elif kind is set:
            self._call(SET, (list(obj),))
            self._memoize(obj)
        elif kind is complex:
            self._call(COMPLEX, (obj.real, obj.imag))
        elif kind is bytes:
            self._call(ENCODE, (obj.decode("latin-1"), "latin1"))
            self._memoize(obj)
        elif kind is bytearray:
            self._call(BYTEARRAY, (bytes(obj),))
            self._memoize(obj)
        elif kind is Symbol:
            self._global(obj.name)
            self._memoize(obj)
        elif kind is DType:
            self._global(str(obj))
            self._memoize(obj)
        elif kind is TensorRecord:
            self._tensor(obj)
        elif kind is ParameterRecord:
            if obj.state is not None:
                self._call(REBUILD_PARAMETER_WITH_STATE, (obj.data, obj.requires_grad, OrderedDict(), obj.state))
            else:
                self._call(REBUILD_PARAMETER, (obj.data, obj.requires_grad, OrderedDict()))
            self._memoize(obj)
        elif kind is StorageRef:
            self._persistent(obj.storage)
            self._memoize(obj)
        elif kind is CallRecord:
            self._call(obj.func, obj.args, new_object=obj.new_object)
            self._memoize(obj)
            for state in obj.build_states:
                self.save(state)
                self.out += b"b"
        elif kind is Opaque:
            self._opaque(obj)
        elif kind is frozenset:
            self._call(FROZENSET, (list(obj),))
            self._memoize(obj)
        elif kind is ScriptObject:
            raise CheckpointError(f"cannot write TorchScript object {obj.qualified_name} to a checkpoint")
        else:
            raise CheckpointError(f"cannot write a {kind.__name__} to a checkpoint")

    def _opaque(self, obj: Opaque) -> None:
        """An opaque object as it was read: the same global, arguments, items and state.

        The opcodes are the ones Python's own pickler writes for such objects at protocol 2
        (REDUCE or NEWOBJ, then APPENDS, SETITEMS and BUILD), so ``torch.load(out,
        weights_only=False)``, where the classes are importable, rebuilds objects equal to the
        input's. Keyword arguments (NEWOBJ_EX, protocol 4) go through ``copyreg.__newobj_ex__``,
        as protocol 2 spells them.
        """
        if not obj.called:
            if "." in obj.name:  # a nested class: protocol 2 names it getattr(Outer, "Inner")
                parent, attribute = obj.name.rsplit(".", 1)
                parent_global = self.bare_globals.setdefault((obj.module, parent), Opaque(obj.module, parent))
                self._call(GETATTR, (parent_global, attribute))
            else:
                self._global(f"{obj.module}\n{obj.name}", split=False)
            self._memoize(obj)
            return
        callable_global = self.bare_globals.setdefault((obj.module, obj.name), Opaque(obj.module, obj.name))
        if obj.kwargs is not None:
            self._call(NEWOBJ_EX, (callable_global, obj.args, obj.kwargs))
        else:
            self.save(callable_global)
            self.save(obj.args)
            self.out += b"\x81" if obj.new_object else b"R"
        self._memoize(obj)
        if obj.items:
            self._batched(obj.items, b"e")
        if obj.dict_items:
            for start in range(0, len(obj.dict_items), BATCH):
                self.out += b"("
                for key, value in obj.dict_items[start : start + BATCH]:
                    self.save(key)
                    self.save(value)
                self.out += b"u"
        if obj.state is not None:
            self.save(obj.state)
            self.out += b"b"

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + _pack_i32(value)
        else:
            encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            if len(encoded) > 255:
                raise CheckpointError(f"integer with {len(encoded)} bytes is too large to write")
            self.out += b"\x8a" + bytes([len(encoded)]) + encoded

    def _tuple(self, items: tuple[Any, ...]) -> None:
        if not items:
            self.out += b")"
            return
        if len(items) <= 3:
            for item in items:
                self.save(item)
            if id(items) in self.memo:  # reached through one of its own items
                raise CheckpointError("cannot write a tuple that contains itself")
            self.out += (b"\x85", b"\x86", b"\x87")[len(items) - 1]
        else:
            self.out += b"("
            for item in items:
                self.save(item)
            if id(items) in self.memo:
                raise CheckpointError("cannot write a tuple that contains itself")
            self.out += b"t"
        self._memoize(items)

    def _batched(self, items: list[Any], opcode: bytes) -> None:
        for start in range(0, len(items), BATCH):
            self.out += b"("
            for item in items[start : start + BATCH]:
                self.save(item)
            self.out += opcode

    def _items(self, mapping: dict[Any, Any]) -> None:
        self._pairs(list(mapping.items()))

    def _pairs(self, pairs: list[tuple[Any, Any]]) -> None:
        out, memo, save = self.out, self.memo, self.save
        for start in range(0, len(pairs), BATCH):
            out += b"("
            for key, value in pairs[start : start + BATCH]:
                # A state dict's entries, new string keys and tensors, skip save()'s dispatch:
                # 50,000 of them are most of a many-tensor checkpoint's pickle.
                if type(key) is str and id(key) not in memo:
                    encoded = key.encode("utf-8", "surrogatepass")
                    out += b"X" + _pack_u32(len(encoded)) + encoded
                    self._memoize(key)
                else:
                    save(key)
                if type(value) is TensorRecord and id(value) not in memo:
                    self._tensor(value)
                else:
                    save(value)
            out += b"u"

    def _global(self, name: str, *, split: bool = True) -> None:
        """GLOBAL of a dotted name, or (``split=False``) of an exact ``module\\nname``."""
        module, attribute = name.rsplit(".", 1) if split else name.split("\n", 1)
        self.out += b"c" + module.encode("utf-8") + b"\n" + attribute.encode("utf-8") + b"\n"

    def _call(self, func: Symbol, args: tuple[Any, ...], *, new_object: bool = False) -> None:
        self.save(func)
        self.save(args)
        self.out += b"\x81" if new_object else b"R"

    def _persistent(self, record: StorageRecord) -> None:
        if record.view_of is not None:
            raise CheckpointError(f"storage view '{record.key}' cannot be written as a storage of its own")
        key = self.storages.get(id(record))
        if key is None:
            key = self.storages[id(record)] = (str(len(self.storages)), record)
        dtype = record.dtype
        numel = record.nbytes // dtype.itemsize if dtype.storage_class is not None else record.nbytes
        encoded = key[0].encode("ascii")  # "0", "1", ...: new for every storage, never memoised
        key_bytes = b"X" + _pack_u32(len(encoded)) + encoded
        # The id tuple is written unmemoised: nothing refers to it again. What surrounds the
        # key is the same for every storage of a dtype and location once it is in the memo.
        around = self.id_parts.get((dtype, record.location))
        if around is not None:
            self.out += around[0] + key_bytes + around[1] + _int_bytes(numel) + b"tQ"  # BINPERSID
            return
        if dtype.storage_class is not None:
            storage_type = symbol(f"torch.{dtype.storage_class}")
        else:
            storage_type = symbol(UNTYPED_STORAGE)
        self.out += b"("
        self._save_memoised("storage")
        self._save_memoised(storage_type)
        self.out += key_bytes
        self._save_memoised(record.location)
        self.out += _int_bytes(numel) + b"tQ"
        memo = self.memo
        self.id_parts[(dtype, record.location)] = (
            b"(" + memo[id("storage")] + memo[id(storage_type)],
            memo[id(record.location)],
        )

    def _save_memoised(self, obj: Any) -> None:
        """``save`` for an object written many times (a symbol, "storage", "cpu")."""
        fetch = self.memo.get(id(obj))
        if fetch is None:
            self.save(obj)
        else:
            self.out += fetch

    def _tensor(self, record: TensorRecord) -> None:
        storage = record.storage
        storage_offset = record.storage_offset
        if storage.view_of is not None:
            # The zip format has no storage views: the tensor goes onto the viewed storage, so
            # the sharing survives.
            storage_offset += storage.view_start // record.dtype.itemsize
            storage = storage.view_of
        # v2 when the storage's typed class already says the dtype; v3 carries it explicitly.
        typed = (record.dtype is storage.dtype or record.dtype == storage.dtype) and storage.dtype.storage_class is not None
        self._save_memoised(REBUILD_V2 if typed else REBUILD_V3)
        self.out += b"("
        self._persistent(storage)
        # Offset, size, stride and requires_grad written directly, and the empty hooks
        # OrderedDict unmemoised: a checkpoint of 50,000 tensors is written in a fraction of
        # the time the generic path takes, with the same opcodes torch's pickler uses.
        shapes = self.shape_bytes  # sizes and strides repeat: many tensors share a shape
        size_bytes = shapes.get(record.size)
        if size_bytes is None:
            size_bytes = shapes[record.size] = _int_tuple_bytes(record.size)
        stride_bytes = shapes.get(record.stride)
        if stride_bytes is None:
            stride_bytes = shapes[record.stride] = _int_tuple_bytes(record.stride)
        self.out += (
            _int_bytes(storage_offset) + size_bytes + stride_bytes + (b"\x88" if record.requires_grad else b"\x89")
        )
        self._save_memoised(ORDERED_DICT)
        self.out += b")R"
        if not typed:
            self.save(record.dtype)
        if record.metadata:
            self.save(record.metadata)
        self.out += b"tR"
        self._memoize(record)


_SMALL_INTS = [b"K" + bytes((value,)) for value in range(256)]


def _int_bytes(value: int) -> bytes:
    """A non-negative int as the standard pickler writes it (BININT1, BININT2, BININT, LONG1)."""
    if value < 256:
        return _SMALL_INTS[value]
    if value < 65536:
        return b"M" + value.to_bytes(2, "little")
    if value < 2**31:
        return b"J" + value.to_bytes(4, "little")
    encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes((len(encoded),)) + encoded


_TUPLE_OPS = (b")", b"\x85", b"\x86", b"\x87")


def _int_tuple_bytes(values: tuple[int, ...]) -> bytes:
    """A tuple of non-negative ints (a size or a stride), unmemoised."""
    body = b"".join([_SMALL_INTS[v] if v < 256 else _int_bytes(v) for v in values])
    if len(values) <= 3:
        return body + _TUPLE_OPS[len(values)]
    return b"(" + body + b"t"


def pickle_tree(root: Any) -> tuple[bytes, list[tuple[str, StorageRecord]]]:
    """``data.pkl`` bytes, and the storages it names in order as ``(new key, record)``."""
    writer = PickleWriter()
    writer.save(root)
    writer.out += b"."
    return bytes(writer.out), list(writer.storages.values())
