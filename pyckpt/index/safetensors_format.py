"""Index a safetensors file into the same records a torch checkpoint gives.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor's
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that
follows the header), and an optional ``"__metadata__"`` of strings. Every tensor becomes a
:class:`StorageRecord` of its own bytes and a contiguous :class:`TensorRecord` over it, so
planning, mapping, renaming, ``load_state_dict`` and every sink work on it unchanged.

The header is checked as strictly as the safetensors library checks it, with messages that
say what is wrong: the data of the tensors must tile the data section exactly (no overlap,
no gap, nothing past the end), each dtype must be known and each shape must need exactly
the bytes its offsets give.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from typing import Any

from ..errors import CheckpointError
from .checkpoint import CheckpointIndex
from .records import METHOD_STORED, StorageRecord, TensorRecord
from .source import Source
from .symbols import DTYPES, DType

FORMAT_SAFETENSORS = "safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
METADATA_KEY = "__metadata__"

# torch dtype name <-> safetensors dtype code: the types safetensors.torch reads and writes.
SAFETENSORS_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "complex64": "C64", "uint64": "U64", "uint32": "U32", "uint16": "U16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
}  # fmt: skip
DTYPE_OF_CODE: dict[str, DType] = {code: DTYPES[name] for name, code in SAFETENSORS_CODES.items()}


def looks_safetensors(source: Source, head: bytes) -> bool:
    """An 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def index_safetensors(source: Source) -> CheckpointIndex:
    header_length = int.from_bytes(source.read(0, 8), "little")
    if header_length > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"safetensors header declares {header_length} bytes, over the {MAX_HEADER_BYTES} byte limit"
        )
    if 8 + header_length > source.size:
        raise CheckpointError(
            f"safetensors header declares {header_length} bytes but the file holds {source.size - 8} after its length"
        )
    header = _parse_header(source.read(8, header_length))
    metadata = _metadata(header.pop(METADATA_KEY, None))
    data_start = 8 + header_length
    data_bytes = source.size - data_start
    placed = sorted(
        ((_entry(name, fields), name) for name, fields in header.items()),
        key=lambda item: item[0][2],  # by begin; sorted() keeps header order among equals
    )
    root: OrderedDict[str, TensorRecord] = OrderedDict()
    storages: dict[str, StorageRecord] = {}
    byteswap = sys.byteorder == "big"
    covered = 0
    for (dtype, shape, begin, end), name in placed:
        if begin != covered:
            what = "overlaps the tensor before it" if begin < covered else f"leaves {begin - covered} bytes unused before it"
            raise CheckpointError(f"data_offsets [{begin}, {end}] {what} (which ends at {covered})", key=name)
        if end > data_bytes:
            raise CheckpointError(
                f"data_offsets [{begin}, {end}] run past the end of the data ({data_bytes} bytes)", key=name
            )
        covered = end
        nbytes = end - begin
        storage = StorageRecord(
            key=name,
            dtype=dtype,
            nbytes=nbytes,
            location="cpu",
            record=None,
            data_offset=data_start + begin,
            stored_size=nbytes,
            method=METHOD_STORED,
            byteswap=byteswap and dtype.itemsize > 1,
        )
        storages[name] = storage
        root[name] = TensorRecord(storage, dtype, 0, shape, _contiguous_strides(shape))
    if covered != data_bytes:
        raise CheckpointError(f"the tensors' data ends at {covered} but the file holds {data_bytes} bytes of data")
    return CheckpointIndex(
        source=source,
        format=FORMAT_SAFETENSORS,
        root=root,
        storages=storages,
        tensor_records=list(root.values()),
        metadata=metadata,
        natural_alignment=True,
    )


def _parse_header(raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise CheckpointError(f"safetensors header names '{key}' twice")
            result[key] = value
        return result

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"safetensors header is not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError("safetensors header nests too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors header is a JSON {type(header).__name__}, not an object")
    return header


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError(f"safetensors {METADATA_KEY} must map names to strings")
    return value


def _entry(name: str, fields: Any) -> tuple[DType, tuple[int, ...], int, int]:
    if not isinstance(fields, dict) or set(fields) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError("header entry must hold exactly dtype, shape and data_offsets", key=name)
    code, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    dtype = DTYPE_OF_CODE.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointError(f"unknown safetensors dtype {code!r}", key=name)
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise CheckpointError(f"shape {shape!r} is not a list of non-negative integers", key=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)) or not (
        0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end", key=name)
    numel = 1
    for n in shape:
        numel *= n
    begin, end = offsets
    if numel * dtype.itemsize != end - begin:
        raise CheckpointError(
            f"shape {shape} of {code} needs {numel * dtype.itemsize} bytes but data_offsets [{begin}, {end}] "
            f"give {end - begin}",
            key=name,
        )
    return dtype, tuple(shape), begin, end


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
