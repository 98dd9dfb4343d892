"""Write a state dict as safetensors: an 8-byte header length, a JSON header, then each
tensor's bytes contiguous. Contiguous tensors are copied file to file; views are gathered
one storage at a time, so memory stays bounded by the largest storage, not the checkpoint.
Tied weights are written under every key (safetensors has no aliasing).
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..index.checkpoint import CheckpointIndex
from ..index.records import StorageRecord, TensorRecord, without_parameter
from ..index.safetensors_format import SAFETENSORS_CODES
from ..plan import check_view
from .range_copy import Progress, RangeCopy, run_copies
from .file_copy import write_all
from .pt_writer import WrittenFile

if TYPE_CHECKING:
    from .._backend import Backend

HEADER_ALIGNMENT = 64


def tensor_entries(state_dict: dict[str, Any]) -> list[tuple[str, TensorRecord]]:
    """The dense tensors to write, or a CheckpointError naming the first that cannot be."""
    entries = []
    for key, value in state_dict.items():
        record = without_parameter(value)
        if not isinstance(record, TensorRecord):
            raise CheckpointError(
                "is not a dense tensor (quantized, sparse or subclass), which safetensors cannot hold", key=key
            )
        if record.dtype.name not in SAFETENSORS_CODES:
            raise CheckpointError(f"has dtype {record.dtype}, which safetensors cannot hold", key=key)
        check_view(record, key)
        entries.append((key, record))
    return entries


def write_safetensors(
    index: CheckpointIndex,
    state_dict: dict[str, Any],
    metadata: dict[str, str],
    dest_fd: int,
    backend: Backend,
    progress: Progress | None = None,
) -> WrittenFile:
    entries = tensor_entries(state_dict)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    placed = []
    for key, record in entries:
        nbytes = record.nbytes
        header[key] = {
            "dtype": SAFETENSORS_CODES[record.dtype.name],
            "shape": list(record.size),
            "data_offsets": [offset, offset + nbytes],
        }
        placed.append((record, offset, nbytes))
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * ((-(8 + len(encoded))) % HEADER_ALIGNMENT)
    data_start = 8 + len(encoded)
    write_all(dest_fd, struct.pack("<Q", len(encoded)) + encoded, 0)

    direct: list[RangeCopy] = []
    gathered: list[tuple[TensorRecord, int]] = []
    for record, at, nbytes in placed:
        if _copyable(record):
            start = record.storage_offset * record.dtype.itemsize
            direct.append(RangeCopy(record.storage, start, nbytes, data_start + at, want_crc=False))
        else:
            gathered.append((record, data_start + at))
    run_copies(index, direct, dest_fd, backend, progress)
    if gathered:  # only views need torch, whose import costs a second and 200 MiB
        _write_gathered(index, gathered, dest_fd, backend, progress)
    return WrittenFile(
        tensors_bytes=offset,
        storages=len({id(record.storage) for record, _, _ in placed}),
        file_bytes=data_start + offset,
    )


def _copyable(record: TensorRecord) -> bool:
    """Its bytes are one contiguous, raw, native-order range of the file (or a deflate record)."""
    return record.is_contiguous() and not record.metadata and not record.storage.byteswap


def _write_gathered(
    index: CheckpointIndex,
    gathered: list[tuple[TensorRecord, int]],
    dest_fd: int,
    backend: Backend,
    progress: Progress | None,
) -> None:
    """Views: read their storage (once per storage, in order), make them contiguous, write.

    The only part of a conversion that needs torch (for strided gathers), imported here.
    """
    import torch

    from ..execute.cpu import read_storages
    from .torch_values import torch_dtype

    by_storage: dict[int, tuple[StorageRecord, list[tuple[TensorRecord, int]]]] = {}
    for record, at in gathered:
        by_storage.setdefault(id(record.storage), (record.storage, []))[1].append((record, at))
    for storage, views in by_storage.values():
        untyped = read_storages(index.part_for(storage), [storage], backend)[storage.key]
        for record, at in views:
            tensor = torch.empty((0,), dtype=torch_dtype(record.dtype))
            tensor.set_(untyped, record.storage_offset, record.size, record.stride)
            if record.metadata:
                torch._utils.set_tensor_metadata(tensor, record.metadata)
                tensor = tensor.resolve_conj().resolve_neg()
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            write_all(dest_fd, memoryview(data), at)
            if progress is not None:
                progress(data.nbytes)
        del untyped
