"""What a checkpoint may name, known without importing torch.

The index stage is pure data: dtypes are :class:`DType` descriptors and allowlisted globals
are :class:`Symbol` names. torch objects appear only when a sink materialises the tree (and
there every symbol is checked once more against the installed torch's own allowlist). So
``pyckpt convert | inspect | verify`` never pay for ``import torch``.

``ALLOWED_GLOBALS`` is torch's ``weights_only`` allowlist (``_get_allowed_globals``) as of
torch 2.13; ``tests/test_symbols.py`` compares it with the installed torch's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DType:
    """A torch dtype by name: what the index needs to know about it."""

    name: str  # "float32"
    itemsize: int
    is_complex: bool
    storage_class: str | None  # the typed storage torch.save writes it with, if any

    def __str__(self) -> str:
        return f"torch.{self.name}"

    def __repr__(self) -> str:
        return f"torch.{self.name}"


@dataclass(frozen=True, slots=True)
class Symbol:
    """An allowlisted global named by the file (a rebuild function, ``torch.Size``...)."""

    name: str  # full dotted name, e.g. "torch._utils._rebuild_qtensor"

    def __repr__(self) -> str:
        return self.name

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def attribute(self) -> str:
        return self.name.rsplit(".", 1)[1]


_DTYPE_FACTS = [
    # name, itemsize, is_complex, typed storage class
    ("float64", 8, False, "DoubleStorage"),
    ("float32", 4, False, "FloatStorage"),
    ("float16", 2, False, "HalfStorage"),
    ("bfloat16", 2, False, "BFloat16Storage"),
    ("int64", 8, False, "LongStorage"),
    ("int32", 4, False, "IntStorage"),
    ("int16", 2, False, "ShortStorage"),
    ("int8", 1, False, "CharStorage"),
    ("uint8", 1, False, "ByteStorage"),
    ("bool", 1, False, "BoolStorage"),
    ("complex128", 16, True, "ComplexDoubleStorage"),
    ("complex64", 8, True, "ComplexFloatStorage"),
    ("qint8", 1, False, "QInt8Storage"),
    ("qint32", 4, False, "QInt32Storage"),
    ("quint8", 1, False, "QUInt8Storage"),
    ("quint4x2", 1, False, "QUInt4x2Storage"),
    ("quint2x4", 1, False, "QUInt2x4Storage"),
    ("complex32", 4, True, None),
    ("uint16", 2, False, None),
    ("uint32", 4, False, None),
    ("uint64", 8, False, None),
    ("float8_e4m3fn", 1, False, None),
    ("float8_e5m2", 1, False, None),
    ("float8_e4m3fnuz", 1, False, None),
    ("float8_e5m2fnuz", 1, False, None),
    ("float8_e8m0fnu", 1, False, None),
    ("float4_e2m1fn_x2", 1, False, None),
    ("bits8", 1, False, None),
    ("bits16", 2, False, None),
    ("bits1x8", 1, False, None),
    ("bits2x4", 1, False, None),
    ("bits4x2", 1, False, None),
    *[(f"int{n}", 1, False, None) for n in range(1, 8)],
    *[(f"uint{n}", 1, False, None) for n in range(1, 8)],
]
DTYPES: dict[str, DType] = {name: DType(name, size, cplx, storage) for name, size, cplx, storage in _DTYPE_FACTS}
UINT8 = DTYPES["uint8"]

_CUDA_STORAGES = {"DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
                  "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
                  "ComplexDoubleStorage", "ComplexFloatStorage"}
UNTYPED_STORAGE = "torch.storage.UntypedStorage"
TYPED_STORAGE = "torch.storage.TypedStorage"

# Storage class name (as a persistent id names it) -> the dtype of its elements.
STORAGE_TYPES: dict[str, DType] = {UNTYPED_STORAGE: UINT8}
for _dtype in DTYPES.values():
    if _dtype.storage_class is not None:
        STORAGE_TYPES[f"torch.{_dtype.storage_class}"] = _dtype
        if _dtype.storage_class in _CUDA_STORAGES:
            STORAGE_TYPES[f"torch.cuda.{_dtype.storage_class}"] = _dtype

_TENSOR_TYPES = ["BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short"]
QSCHEMES = frozenset(
    f"torch.{name}"
    for name in ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                 "per_channel_symmetric", "per_channel_affine_float_qparams")
)
LAYOUTS = frozenset(
    f"torch.{name}" for name in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged")
)

REBUILD_FUNCTIONS = frozenset(
    f"torch._utils.{name}"
    for name in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
    )
) | {"torch._tensor._rebuild_from_type_v2"}

ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device",
        "_codecs.encode", "builtins.bytearray", "builtins.set", "builtins.complex",
        UNTYPED_STORAGE, TYPED_STORAGE,
    }
    | {str(dtype) for dtype in DTYPES.values()}
    | (set(STORAGE_TYPES) - {UNTYPED_STORAGE})
    | {f"torch.{t}Tensor" for t in _TENSOR_TYPES}
    | {f"torch.cuda.{t}Tensor" for t in _TENSOR_TYPES}
    | {f"torch.sparse.{t}Tensor" for t in _TENSOR_TYPES if t != "Bool"}
    | {f"torch.cuda.sparse.{t}Tensor" for t in _TENSOR_TYPES if t != "Bool"}
    | QSCHEMES
    | REBUILD_FUNCTIONS
)

# Globals that name values, not callables: a REDUCE on one of them is refused.
NOT_CALLABLE = frozenset({str(dtype) for dtype in DTYPES.values()}) | QSCHEMES | frozenset(STORAGE_TYPES)

_symbols: dict[str, Symbol] = {}


def symbol(name: str) -> Symbol:
    """The one Symbol for a name (so identity is kept, as with the objects it stands for)."""
    found = _symbols.get(name)
    if found is None:
        found = _symbols[name] = Symbol(name)
    return found


def dtype_of_global(name: str) -> DType | None:
    return DTYPES.get(name.removeprefix("torch.")) if name.startswith("torch.") and name.count(".") == 1 else None
