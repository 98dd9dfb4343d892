"""Copy storage bytes from a checkpoint into an output file at planned offsets.

Stored records go file to file (``copy_file_range`` where the kernel can) and keep the
CRC the source's central directory already holds; anything else (legacy data, partial
records, missing CRCs) is copied through user space with its CRC computed on the way, and
deflate records are inflated once. Work runs in batches so progress can be reported.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..index.checkpoint import CheckpointIndex, iter_inflated
from ..index.records import METHOD_DEFLATE, StoragePiece, StorageRecord
from ..index.symbols import DTYPES
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

    casts = [copy for copy in copies if copy.storage.cast_from is not None]
    assembled = [copy for copy in copies if copy.storage.pieces is not None and copy.storage.cast_from is None]
    copies = _pieces_copied(copy for copy in copies if copy.storage.cast_from is None)
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
    # Last: a batch of small copies is written as one span, gaps included, and may cover the
    # places of cast storages between them.
    if casts:
        _run_casts(index, casts, dest_fd, backend, progress)
    for copy in assembled + [c for c in casts if c.storage.cast_from.record.pieces]:  # type: ignore[union-attr]
        if copy.want_crc:
            copy.crc32 = _crc_written(dest_fd, copy.dest_offset, copy.length)


def _pieces_copied(copies: Iterable[RangeCopy]) -> list[RangeCopy]:
    """Copies of assembled storages as copies of their pieces' bytes, in place of them (in
    output order: a batch of small copies is written as one span, so none may cover another's)."""
    result = []
    for copy in copies:
        pieces = copy.storage.pieces
        if pieces is None:
            result.append(copy)
            continue
        for piece, low, high in _overlaps(pieces, copy.start, copy.start + copy.length):
            result.append(RangeCopy(piece.source, piece.start + low - piece.at, high - low,
                                    copy.dest_offset + low - copy.start, want_crc=False))
    return result


def _overlaps(pieces: tuple[StoragePiece, ...], start: int, end: int) -> Iterator[tuple[StoragePiece, int, int]]:
    """Each piece meeting bytes ``[start, end)`` of the assembled storage, with the overlap."""
    for piece in pieces:
        low, high = max(start, piece.at), min(end, piece.at + piece.length)
        if low < high:
            yield piece, low, high


def _crc_written(fd: int, offset: int, length: int) -> int:
    """The CRC of bytes already written (an assembled storage's pieces arrive out of order)."""
    crc = 0
    for at in range(offset, offset + length, 8 << 20):
        crc = zlib.crc32(os.pread(fd, min(8 << 20, offset + length - at), at), crc)
    return crc


def _run_casts(
    index: CheckpointIndex, copies: list[RangeCopy], dest_fd: int, backend: Backend, progress: Progress | None
) -> None:
    """Copies of cast stand-ins: elements read from the original record and cast on the way,
    file to file, a chunk at a time; compressed or byte-swapped originals are read whole,
    cast, then written."""
    by_part: dict[int, tuple[CheckpointIndex, list[tuple[RangeCopy, tuple[int, int, str, str, int]]]]] = {}
    for copy in copies:
        if _read_whole(copy.storage):
            continue
        source = copy.storage.cast_from
        original, elements, target = source.record, source.dtype, copy.storage.dtype  # type: ignore[union-attr]
        def out(source_bytes: int) -> int:  # where a source byte's element lands in the output
            return source_bytes // elements.itemsize * target.itemsize

        begin = copy.start // target.itemsize * elements.itemsize
        end = (copy.start + copy.length) // target.itemsize * elements.itemsize
        spans = (
            [(original, original.data_offset + begin, begin, end)]
            if original.pieces is None
            else [(piece.source, piece.source.data_offset + piece.start + low - piece.at, low, high)
                  for piece, low, high in _overlaps(original.pieces, begin, end)]
        )
        for record, source_offset, low, high in spans:
            job = (source_offset, (high - low) // elements.itemsize, elements.name, target.name,
                   copy.dest_offset + out(low) - copy.start)
            part = index.part_for(record)
            by_part.setdefault(id(part), (part, []))[1].append((copy, job))
    for part, group in by_part.values():
        for start in range(0, len(group), 256):  # batches, so progress moves
            batch = group[start : start + 256]
            crcs = backend.cast_copy_ranges(part.source.fd, dest_fd, [job for _, job in batch])  # type: ignore[attr-defined]
            for (copy, _), crc in zip(batch, crcs):
                copy.crc32 = crc  # the whole copy's when it has one job; else recomputed after
            if progress is not None:
                progress(sum(job[1] * DTYPES[job[3]].itemsize for _, job in batch))
    for copy in copies:
        if _read_whole(copy.storage):  # rare (old or big-endian files): torch is imported
            import torch

            from ..execute.cpu import read_storages

            part = index.part_for(copy.storage)
            held = read_storages(part, [copy.storage], backend)[copy.storage.key]
            whole = torch.empty(0, dtype=torch.uint8).set_(held).numpy()  # type: ignore[call-overload]
            data = memoryview(whole[copy.start : copy.start + copy.length])
            copy.crc32 = zlib.crc32(data)
            write_all(dest_fd, data, copy.dest_offset)
            if progress is not None:
                progress(copy.length)


def _read_whole(storage: StorageRecord) -> bool:
    source = storage.cast_from
    return source is not None and (source.record.method == METHOD_DEFLATE or source.record.byteswap)


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
