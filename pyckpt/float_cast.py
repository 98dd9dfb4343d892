"""Floating-point casts of raw storage bytes: the pure-Python twin of ``csrc/io/float_cast.cpp``.

Both give the bytes torch's ``Tensor.to(dtype)`` gives: every source is widened to float32
(float64 rounds there first, as torch does) and rounded to nearest-even into the target. A
NaN stays a NaN of the same sign; its payload is not kept (torch's own vectorised and scalar
paths disagree on it). Written with numpy, bit for bit the native core's arithmetic, so both
backends write the same bytes. No torch: the command line casts without importing it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .index.symbols import DTYPES, DType

if TYPE_CHECKING:  # numpy is imported when a cast runs: choosing a dtype costs nothing
    import numpy as np

# The dtypes a cast reads (torch's floating-point dtypes but float4, which packs two values
# in a byte) and the ones it writes (casting down to float8 needs scales, not a dtype).
CAST_SOURCES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
     "float8_e5m2fnuz", "float8_e8m0fnu"}
)
CAST_TARGETS = frozenset({"float32", "float16", "bfloat16"})

_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "f16": "float16", "half": "float16", "float16": "float16",
    "fp32": "float32", "f32": "float32", "float": "float32", "float32": "float32",
}

CHUNK_ELEMENTS = 1 << 20


def cast_target(value: object) -> DType:
    """The target of ``dtype=`` / ``--dtype``: a torch dtype, or bf16, fp16, fp32 and their names."""
    name = getattr(value, "__module__", None) == "torch" and str(value).removeprefix("torch.")
    if not name and isinstance(value, str):
        name = _ALIASES.get(value.strip().lower().removeprefix("torch."))
    if not name or name not in CAST_TARGETS:
        raise ValueError(f"dtype must be bfloat16 (bf16), float16 (fp16) or float32 (fp32), not {value!r}")
    return DTYPES[name]


def casts(source: DType, target: DType | None) -> bool:
    """Whether a storage of ``source`` elements changes under a cast to ``target``."""
    return target is not None and source.name in CAST_SOURCES and source.name != target.name


def cast_bytes(data: bytes | bytearray | memoryview | np.ndarray, source: str, target: str) -> np.ndarray:
    """``data`` (whole ``source`` elements) cast to ``target``, as raw bytes (uint8)."""
    import numpy as np

    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).reshape(-1)
    if source == target:
        return raw.copy()
    widened = _widen(raw, source)
    if target == "float32":
        return widened.view(np.uint8)
    if target == "bfloat16":
        return _to_bfloat16(widened).view(np.uint8)
    return _to_half(widened).view(np.uint8)


def _widen(raw: np.ndarray, source: str) -> np.ndarray:
    import numpy as np

    if source == "float64":
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: infinity, as in torch
            return raw.view("<f8").astype(np.float32)
    if source == "float32":
        return raw.view("<f4")
    if source == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if source == "float16":
        return raw.view("<f2").astype(np.float32)  # exact: every half is a float
    return _float8_table(source)[raw]


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    import numpy as np

    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def _to_half(values: np.ndarray) -> np.ndarray:
    """float32 to IEEE half bits, rounding to nearest-even (the core's integer algorithm)."""
    import numpy as np

    bits = values.view(np.uint32)
    sign = ((bits >> 16) & 0x8000).astype(np.uint32)
    magnitude = bits & 0x7FFFFFFF
    out = np.empty(bits.shape, dtype=np.uint32)
    normal = (magnitude >= 0x38800000) & (magnitude < 0x477FF000)
    m = magnitude[normal]
    out[normal] = ((m + np.uint32(0xC8000FFF) + ((m >> 13) & 1)) & 0xFFFFFFFF) >> 13
    out[magnitude >= 0x477FF000] = 0x7C00
    nan = magnitude > 0x7F800000
    out[nan] = 0x7E00 | ((magnitude[nan] >> 13) & 0x1FF)
    out[magnitude < 0x33000000] = 0
    small = (magnitude >= 0x33000000) & (magnitude < 0x38800000)
    if small.any():
        m = magnitude[small]
        mantissa = (m & 0x7FFFFF) | 0x800000
        shift = 126 - (m >> 23)
        rest = mantissa & ((np.uint32(1) << shift) - 1)
        halfway = np.uint32(1) << (shift - 1)
        result = mantissa >> shift
        result += (rest > halfway) | ((rest == halfway) & ((result & 1) == 1))
        out[small] = result
    return (out | sign).astype(np.uint16)


# (exponent bits, mantissa bits, bias, IEEE infinities/NaNs, S.1111.111 is NaN, 0x80 is NaN, signed)
_FLOAT8_LAYOUTS = {
    "float8_e4m3fn": (4, 3, 7, False, True, False, True),
    "float8_e5m2": (5, 2, 15, True, False, False, True),
    "float8_e4m3fnuz": (4, 3, 8, False, False, True, True),
    "float8_e5m2fnuz": (5, 2, 16, False, False, True, True),
    "float8_e8m0fnu": (8, 0, 127, False, True, False, False),
}


@functools.lru_cache(maxsize=None)
def _float8_table(name: str) -> np.ndarray:
    import numpy as np

    exponent_bits, mantissa_bits, bias, ieee, all_ones_nan, zero_nan, signed = _FLOAT8_LAYOUTS[name]
    table = np.empty(256, dtype=np.float32)
    for code in range(256):
        negative = signed and bool(code & 0x80)
        magnitude = code & 0x7F if signed else code
        exponent, mantissa = magnitude >> mantissa_bits, magnitude & ((1 << mantissa_bits) - 1)
        if (zero_nan and code == 0x80) or (all_ones_nan and magnitude == (0x7F if signed else 0xFF)):
            value = float("nan")
        elif ieee and exponent == (1 << exponent_bits) - 1:
            value = float("nan") if mantissa else float("inf")
        elif exponent == 0 and mantissa_bits:
            value = mantissa * 2.0 ** (1 - bias - mantissa_bits)
        else:
            value = (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)
        table[code] = -value if negative else value
    return table
