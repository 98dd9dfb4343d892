"""Write an index tree back as a torch ``data.pkl`` (protocol 2), without torch.

Records become the calls torch itself writes (``_rebuild_tensor_v2``/``_v3``,
``_rebuild_parameter``, persistent ids for storages), globals are written by name, and
storages are renumbered ``0..N-1`` in the order the pickle first meets them. The memo keeps
every shared object (tied weights, views, repeated containers) shared. Only opcodes that
torch's ``weights_only`` unpickler (and pyckpt's own) accept are written.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from typing import Any

from ..errors import CheckpointError
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

_pack_i32 = struct.Struct("<i").pack
_pack_u32 = struct.Struct("<I").pack
_pack_f64 = struct.Struct(">d").pack


class PickleWriter:
    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo: dict[int, int] = {}
        self.alive: list[Any] = []  # keeps memoised temporaries alive, so ids stay unique
        self.storages: dict[str, tuple[str, StorageRecord]] = {}  # source key -> (new key, record)

    # -- memo ---------------------------------------------------------------------------
    def _memoize(self, obj: Any) -> None:
        index = len(self.memo)
        self.memo[id(obj)] = index
        self.alive.append(obj)
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + _pack_u32(index)

    def _recall(self, obj: Any) -> bool:
        index = self.memo.get(id(obj))
        if index is None:
            return False
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + _pack_u32(index)
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
        elif kind is ScriptObject:
            raise CheckpointError(f"cannot write TorchScript object {obj.qualified_name} to a checkpoint")
        else:
            raise CheckpointError(f"cannot write a {kind.__name__} to a checkpoint")

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
        pairs = list(mapping.items())
        for start in range(0, len(pairs), BATCH):
            self.out += b"("
            for key, value in pairs[start : start + BATCH]:
                self.save(key)
                self.save(value)
            self.out += b"u"

    def _global(self, name: str) -> None:
        module, attribute = name.rsplit(".", 1)
        self.out += b"c" + module.encode() + b"\n" + attribute.encode() + b"\n"

    def _call(self, func: Symbol, args: tuple[Any, ...], *, new_object: bool = False) -> None:
        self.save(func)
        self.save(args)
        self.out += b"\x81" if new_object else b"R"

    def _persistent(self, record: StorageRecord) -> None:
        key = self.storages.get(record.key)
        if key is None:
            key = self.storages[record.key] = (str(len(self.storages)), record)
        dtype = record.dtype
        if dtype.storage_class is not None:
            storage_type, numel = symbol(f"torch.{dtype.storage_class}"), record.nbytes // dtype.itemsize
        else:
            storage_type, numel = symbol(UNTYPED_STORAGE), record.nbytes
        self.save(("storage", storage_type, key[0], record.location, numel))
        self.out += b"Q"  # BINPERSID

    def _tensor(self, record: TensorRecord) -> None:
        storage = record.storage
        # v2 when the storage's typed class already says the dtype; v3 carries it explicitly.
        typed = record.dtype == storage.dtype and storage.dtype.storage_class is not None
        self.save(REBUILD_V2 if typed else REBUILD_V3)
        self.out += b"("
        self._persistent(storage)
        for value in (record.storage_offset, record.size, record.stride, record.requires_grad, OrderedDict()):
            self.save(value)
        if not typed:
            self.save(record.dtype)
        if record.metadata:
            self.save(record.metadata)
        self.out += b"tR"
        self._memoize(record)


def pickle_tree(root: Any) -> tuple[bytes, list[tuple[str, StorageRecord]]]:
    """``data.pkl`` bytes, and the storages it names in order as ``(new key, record)``."""
    writer = PickleWriter()
    writer.save(root)
    writer.out += b"."
    return bytes(writer.out), list(writer.storages.values())
