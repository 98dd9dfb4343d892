"""What an index holds: the storage table and the object tree's special leaves.

Both backends build exactly these records (the parity tests compare them), and nothing in
them has read a tensor byte or needed torch. Plain Python values (dicts, lists, numbers,
strings, sets, bytes) appear in the object tree as themselves; dtypes as
:class:`~pyckpt.index.symbols.DType`, other allowlisted globals as
:class:`~pyckpt.index.symbols.Symbol`, and torch values such as ``torch.Size`` as calls.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .symbols import DType, Symbol

METHOD_STORED = 0
METHOD_DEFLATE = 8


class ZipEntry(NamedTuple):
    """One entry of a zip central directory, with its data offset already resolved.

    A named tuple: an archive of 100,000 records makes 100,000 of them, and a tuple is the
    cheapest immutable record Python has.
    """

    name: str
    method: int
    flags: int
    crc32: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int


@dataclass(eq=False, slots=True)
class StorageRecord:
    """One storage of the checkpoint: where its bytes are and what they are.

    ``nbytes`` is what the pickle declares; ``stored_size`` is how many bytes the file
    holds for it (compressed size for DEFLATE records). ``record`` is the zip record name
    (None for the legacy format, whose storages are not zip records).
    """

    key: str
    dtype: DType
    nbytes: int
    location: str
    record: str | None
    data_offset: int
    stored_size: int
    method: int = METHOD_STORED
    crc32: int | None = None
    byteswap: bool = False
    # The uncompressed size the zip directory declares (None for the legacy format): a
    # DEFLATE stream read up to it must end there, or the record lies about its size.
    record_size: int | None = None
    # A PyTorch 0.3-era storage view (legacy format only): these bytes are
    # ``view_of``'s, from ``view_start``, and the two storages share memory once loaded.
    view_of: StorageRecord | None = None
    view_start: int = 0
    # A stand-in made by the cast stage: these are the elements of ``cast_from.record`` in
    # ``dtype``, converted while they are copied (the file holds the original's bytes).
    cast_from: CastSource | None = None
    # A storage the file holds in pieces (a tensor a sharded DCP save split into chunks): its
    # bytes are assembled from them, in order; the other location fields mean nothing then.
    pieces: tuple[StoragePiece, ...] | None = None

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    def mappable(self, alignment: int = 64) -> bool:
        """Stored raw, in file byte order, at an aligned offset: safe to hand out as a view."""
        return (
            self.method == METHOD_STORED
            and self.cast_from is None
            and self.pieces is None
            and not self.byteswap
            and self.data_offset % alignment == 0
        )


@dataclass(frozen=True, slots=True)
class StoragePiece:
    """Bytes ``[start, start + length)`` of ``source`` are bytes ``[at, at + length)`` of
    the storage they assemble."""

    source: StorageRecord
    start: int
    length: int
    at: int


@dataclass(frozen=True, slots=True)
class CastSource:
    """Where a cast storage's elements come from: a storage of the file, holding ``dtype``
    elements (its own dtype may say bytes: float8 storages are pickled untyped)."""

    record: StorageRecord
    dtype: DType


@dataclass(eq=False, slots=True)
class TensorRecord:
    """A dense tensor over a storage (``_rebuild_tensor``, ``_v2`` or ``_v3``)."""

    storage: StorageRecord
    dtype: DType
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    metadata: dict[str, Any] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.size:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes the tensor's elements take (not its storage)."""
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.size), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass(eq=False, slots=True)
class ParameterRecord:
    """``torch.nn.Parameter`` around ``data`` (``_rebuild_parameter[_with_state]`` or NEWOBJ)."""

    data: Any
    requires_grad: bool = True
    state: Any = None


@dataclass(eq=False, slots=True)
class StorageRef:
    """A storage that appears as a value of its own (not under a tensor): a TypedStorage."""

    storage: StorageRecord
    dtype: DType


@dataclass(eq=False, slots=True)
class CallRecord:
    """A call of an allowlisted function the index does not interpret itself.

    Materialising it calls torch's own function (as ``torch.load(weights_only=True)``
    would) once the storages among ``args`` exist. ``build_states`` collects BUILD states.
    """

    func: Symbol
    args: tuple[Any, ...]
    new_object: bool = False
    build_states: list[Any] = field(default_factory=list)

    @property
    def func_name(self) -> str:
        return self.func.name


@dataclass(eq=False, slots=True)
class ScriptObject:
    """An instance of a TorchScript class (``__torch__.*``), built without running any code."""

    qualified_name: str
    state: dict[str, Any] | None = None


TENSOR_REBUILD_PREFIXES = ("torch._utils._rebuild_", "torch._tensor._rebuild_from_type")


def without_parameter(value: Any) -> Any:
    """The value a ``ParameterRecord`` wraps (its tensor record), or the value itself."""
    return value.data if isinstance(value, ParameterRecord) else value


def is_tensor_like(value: Any) -> bool:
    """Whether the value materialises as a tensor (for deciding which mappings are state dicts)."""
    if isinstance(value, (TensorRecord, ParameterRecord)):
        return True
    torch = sys.modules.get("torch")  # trees from torch.load hold real tensors
    if torch is not None and isinstance(value, torch.Tensor):
        return True
    return isinstance(value, CallRecord) and value.func_name.startswith(TENSOR_REBUILD_PREFIXES)


def describe_value(value: Any) -> str:
    """A short, user-facing name for what a tree value is."""
    if isinstance(value, TensorRecord):
        return f"tensor {value.dtype.name} {list(value.size)}"
    if isinstance(value, ParameterRecord):
        return "Parameter"
    if isinstance(value, StorageRef):
        return "storage"
    if isinstance(value, CallRecord):
        return value.func_name.rsplit(".", 1)[-1]
    qualified_name = getattr(value, "qualified_name", None)  # an Opaque object or class
    if isinstance(qualified_name, str):
        return qualified_name
    if isinstance(value, dict):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, (list, tuple, set)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__
