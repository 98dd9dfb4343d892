"""The index of one checkpoint: its format, storage table and object tree."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from .records import METHOD_DEFLATE, StorageRecord, ZipEntry
from .source import Source

FORMAT_ZIP = "zip"
FORMAT_TORCHSCRIPT = "torchscript"
FORMAT_LEGACY = "legacy"
INFLATE_CHUNK = 4 << 20
TORCH_ALIGNMENT = 64  # of every storage record torch writes


@dataclass(eq=False)
class CheckpointIndex:
    """Everything known about a checkpoint before any tensor byte is read."""

    source: Source
    format: str
    root: Any
    storages: dict[str, StorageRecord]
    byteorder: str = "little"
    top_folder: str | None = None
    entries: Mapping[str, ZipEntry] = field(default_factory=dict)
    # Globals kept opaque (beyond the allowlist and not trusted), with how often each is named.
    unknown_globals: dict[str, int] = field(default_factory=dict)
    # Every dense tensor record the pickle made (reachable or not: torch builds them all), and
    # those whose view against its storage is still to be checked by the plan.
    tensor_records: list[Any] = field(default_factory=list)
    unchecked_views: list[Any] = field(default_factory=list)
    # Where the checkpoint ends within the source (a stream holding several checkpoints is
    # left positioned there, as torch leaves it).
    end: int | None = None
    # A safetensors file's ``__metadata__`` strings.
    metadata: dict[str, str] | None = None
    # Storages may be mapped wherever their dtype is aligned (safetensors, whose offsets are
    # only that), rather than only at the 64-byte boundaries torch's own files give them.
    natural_alignment: bool = False

    @property
    def file_bytes(self) -> int:
        return self.source.size

    def part_for(self, storage: StorageRecord) -> CheckpointIndex:
        """The index of the file holding ``storage``: this one (a sharded checkpoint's
        composite index answers with the shard's)."""
        return self

    def can_view(self, storage: StorageRecord) -> bool:
        """Whether ``storage`` may be handed out as a view of the file mapping."""
        return storage.mappable(storage.dtype.itemsize if self.natural_alignment else TORCH_ALIGNMENT)

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
    if entry.method == METHOD_DEFLATE:
        inflated = iter_inflated(
            source, entry.data_offset, entry.compressed_size, 0, entry.size, entry.name, declared=entry.size
        )
        raw = b"".join(inflated)
    else:
        raw = source.read(entry.data_offset, entry.compressed_size)
    # torch can be told not to compute CRCs, in which case it writes 0.
    if entry.crc32 != 0 and zlib.crc32(raw) != entry.crc32:
        raise CheckpointError(
            f"CRC32 mismatch (central directory says {entry.crc32:08x}, data is {zlib.crc32(raw):08x})",
            record=entry.name,
        )
    return raw


def iter_inflated(
    source: Source, data_offset: int, stored_size: int, start: int, end: int, name: str | None,
    *, declared: int | None = None,
) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of the deflate record ``name``, in chunks; never inflates past ``end``.

    ``declared`` is the record's uncompressed size from the zip directory: when ``end``
    reaches it, the stream must end there too (a bomb that declares a small size and
    inflates to gigabytes is refused after one more byte, not silently cut).
    """
    inflater = zlib.decompressobj(-15)
    produced = 0  # bytes of the record inflated so far
    consumed = 0
    pending = b""

    def inflate(limit: int) -> bytes:
        nonlocal consumed, pending
        if not pending and consumed < stored_size:
            take = min(INFLATE_CHUNK, stored_size - consumed)
            pending = source.read(data_offset + consumed, take)
            consumed += take
        out = inflater.decompress(pending, limit)
        pending = inflater.unconsumed_tail
        return out

    def exhausted() -> bool:
        return not pending and consumed >= stored_size

    try:
        while produced < end and not inflater.eof:
            out = inflate(min(end - produced, INFLATE_CHUNK))
            if not out and exhausted():
                break  # input exhausted and nothing more comes out
            skip = max(start - produced, 0)
            produced += len(out)
            if skip < len(out):
                yield out[skip:]
        if declared is not None and produced >= end >= declared:
            while not inflater.eof:
                if inflate(1):
                    raise CheckpointError(f"deflate data inflates past the {declared} bytes it declares", record=name)
                if exhausted():
                    break
    except zlib.error as exc:
        raise CheckpointError(f"corrupt deflate data: {exc}", record=name) from None
    if produced < end:
        raise CheckpointError(
            f"deflate data inflates to {produced} bytes, fewer than the {end} the storage needs",
            record=name,
        )
