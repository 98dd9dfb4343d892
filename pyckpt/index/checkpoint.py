"""The index of one checkpoint: its format, storage table and object tree."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from .records import METHOD_DEFLATE, StorageRecord, ZipEntry
from .source import Source

FORMAT_ZIP = "zip"
FORMAT_TORCHSCRIPT = "torchscript"
FORMAT_LEGACY = "legacy"


@dataclass(eq=False)
class CheckpointIndex:
    """Everything known about a checkpoint before any tensor byte is read."""

    source: Source
    format: str
    root: Any
    storages: dict[str, StorageRecord]
    byteorder: str = "little"
    top_folder: str | None = None
    entries: dict[str, ZipEntry] = field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.source.display

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_small_record(source: Source, entry: ZipEntry, *, limit: int = 1 << 31) -> bytes:
    """A metadata record's bytes (data.pkl, byteorder, code): inflated and CRC-checked."""
    if entry.size > limit:
        raise CheckpointError(f"record declares {entry.size} bytes, more than the {limit} allowed", record=entry.name)
    raw = source.read(entry.data_offset, entry.compressed_size)
    if entry.method == METHOD_DEFLATE:
        raw = inflate_exactly(raw, entry.size, entry.name)
    # torch can be told not to compute CRCs, in which case it writes 0.
    if entry.crc32 != 0 and zlib.crc32(raw) != entry.crc32:
        raise CheckpointError(
            f"CRC32 mismatch (central directory says {entry.crc32:08x}, data is {zlib.crc32(raw):08x})",
            record=entry.name,
        )
    return raw


def inflate_exactly(raw: bytes | memoryview, size: int, name: str) -> bytes:
    """Inflate a raw-deflate record, producing at most ``size`` bytes and demanding exactly that."""
    inflater = zlib.decompressobj(-15)
    try:
        out = inflater.decompress(raw, size)
    except zlib.error as exc:
        raise CheckpointError(f"corrupt deflate data: {exc}", record=name) from None
    if len(out) != size or not inflater.eof:
        raise CheckpointError(
            f"deflate data does not inflate to the declared {size} bytes", record=name
        )
    return out
