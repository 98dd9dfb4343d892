"""Copy storage bytes from a checkpoint into an output file at planned offsets.

Stored records go file to file (``copy_file_range`` where the kernel can) and keep the
CRC the source's central directory already holds; anything else (legacy data, partial
records, missing CRCs) is copied through user space with its CRC computed on the way, and
deflate records are inflated once. Work runs in batches so progress can be reported.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..index.checkpoint import CheckpointIndex, iter_inflated
from ..index.records import METHOD_DEFLATE, StorageRecord
from .file_copy import write_all

if TYPE_CHECKING:
    from .._backend import Backend

Progress = Callable[[int], None]
BATCH_BYTES = 256 << 20


@dataclass(slots=True)
class RangeCopy:
    """Bytes ``[start, start + length)`` of ``storage`` go to ``dest_offset`` of the output."""

    storage: StorageRecord
    start: int
    length: int
    dest_offset: int
    want_crc: bool = True
    crc32: int = 0


def known_crc(storage: StorageRecord) -> int | None:
    """The CRC of the whole record, if the source states one we can pass through."""
    whole = storage.record_size == storage.nbytes
    if storage.record is None or storage.method == METHOD_DEFLATE or not storage.crc32 or not whole:
        return None
    return storage.crc32


def run_copies(
    index: CheckpointIndex, copies: list[RangeCopy], dest_fd: int, backend: Backend, progress: Progress | None
) -> None:
    batch: list[RangeCopy] = []
    batch_bytes = 0
    batch_index: CheckpointIndex | None = None  # every copy of a batch comes from one file

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        source_fd = batch_index.source.fd  # type: ignore[union-attr]
        jobs = [(c.storage.data_offset + c.start, c.length, c.dest_offset, c.want_crc) for c in batch]
        for copy, crc in zip(batch, backend.copy_ranges(source_fd, dest_fd, jobs)):
            if copy.want_crc:
                copy.crc32 = crc
        if progress is not None:
            progress(batch_bytes)
        batch, batch_bytes = [], 0

    for copy in copies:
        part = index.part_for(copy.storage)
        if copy.storage.method == METHOD_DEFLATE:
            flush()
            copy.crc32 = _inflate_to_file(part, copy, dest_fd, progress)
            continue
        if part is not batch_index:
            flush()
            batch_index = part
        batch.append(copy)
        batch_bytes += copy.length
        if batch_bytes >= BATCH_BYTES:
            flush()
    flush()


def _inflate_to_file(index: CheckpointIndex, copy: RangeCopy, dest_fd: int, progress: Progress | None) -> int:
    crc = 0
    offset = copy.dest_offset
    storage = copy.storage
    chunks = iter_inflated(
        index.source, storage.data_offset, storage.stored_size, copy.start, copy.start + copy.length, storage.record,
        declared=storage.record_size,
    )
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
        write_all(dest_fd, chunk, offset)
        offset += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return crc
