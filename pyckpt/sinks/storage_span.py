"""pt to pt conversion of a torch-written file: the storage records copied as one span.

torch writes a checkpoint's storages as consecutive records ``top/data/0 .. N-1``, numbered
in the order its pickle first meets them, and renaming keys changes none of that: only
``data.pkl`` differs. So the bytes from the first storage's local header to the end of the
last storage's data (data descriptors included) go to the output as they are, a few large
``copy_file_range`` calls on a background thread that starts before the pickle is even
read, while the main thread indexes, renames and writes the new pickle. The span lands at
an offset congruent to its source offset modulo 64, so every storage keeps its alignment,
and the new central directory points into it.

A pickle that names the storages otherwise (another order, a storage left out, a storage
shorter than its record) is found out once it is written, and the caller then writes the
file the general way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..index.native_bridge import NativeZipEntries
from ..index.records import METHOD_STORED, StorageRecord, ZipEntry
from .torch_zip import ALIGNMENT

if TYPE_CHECKING:
    from .._backend import Backend

CHUNK_BYTES = 64 << 20  # per copy job: two threads copy at once, and writeback starts early
MAX_GAP = 64  # between two storage records: room for a data descriptor, nothing more
DATA_DESCRIPTOR_FLAG = 0x0008


@dataclass(frozen=True)
class StorageSpan:
    top: str
    start: int  # source offset of the first storage record's local header
    end: int  # source offset just past the last storage record's data
    count: int  # storage records in the span

    @property
    def length(self) -> int:
        return self.end - self.start

    def records_named_by(
        self, storages: list[tuple[str, StorageRecord]], entries: Mapping[str, ZipEntry]
    ) -> list[ZipEntry] | None:
        """The span's records in file order, if a pickle's storages (in the order it names
        them, renumbered) are exactly those records in that order; else None."""
        if len(storages) != self.count:
            return None
        prefix = f"{self.top}/data/"
        records: list[ZipEntry] = []
        previous = self.start - 1
        for key, record in storages:
            name = prefix + key
            entry = entries.get(name) if record.record == name else None
            # Increasing offsets inside the span, as many as it holds: its records, in order.
            if entry is None or entry.size != record.nbytes or not previous < entry.header_offset < self.end:
                return None
            previous = entry.header_offset
            records.append(entry)
        return records


def find_storage_span(entries: Mapping[str, ZipEntry]) -> StorageSpan | None:
    """The span of a torch zip's storage records, if they sit back to back and can be copied as is."""
    names = iter(entries)
    first = next(names, None)
    if first is None or "/" not in first:
        return None
    top = first.split("/", 1)[0]
    if f"{top}/constants.pkl" in entries:  # TorchScript: its tensors are rebuilt from elsewhere
        return None
    prefix = f"{top}/data/"
    if isinstance(entries, NativeZipEntries):  # no Python object per record: the copy starts sooner
        bounds = entries.directory.storage_span(prefix, ALIGNMENT, MAX_GAP)
        return None if bounds is None else StorageSpan(top, *bounds)
    storages: list[ZipEntry] = []
    others: list[ZipEntry] = []
    for entry in entries.values():
        (storages if entry.name.startswith(prefix) else others).append(entry)
    if not storages:
        return None
    storages.sort(key=lambda entry: entry.header_offset)
    for entry in storages:
        stated_crc = entry.crc32 != 0 or entry.size == 0
        aligned = entry.data_offset % ALIGNMENT == 0  # the output keeps each offset mod 64
        if entry.method != METHOD_STORED or entry.compressed_size != entry.size or not stated_crc or not aligned:
            return None
    for before, after in zip(storages, storages[1:]):
        if not 0 <= after.header_offset - (before.data_offset + before.size) <= MAX_GAP:
            return None
    start, end = storages[0].header_offset, storages[-1].data_offset + storages[-1].size
    if any(start <= entry.header_offset < end for entry in others):
        return None
    return StorageSpan(top, start, end, len(storages))


class SpanCopy:
    """Copies a span into the output on a background thread; ``wait`` joins it.

    Used as a context manager, so the thread has always stopped writing before the output
    is closed or removed, whatever happens on the main thread.
    """

    def __init__(
        self,
        span: StorageSpan,
        source_fd: int,
        dest_fd: int,
        dest_start: int,
        backend: Backend,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.span = span
        self.dest_start = dest_start  # where the span's first byte goes in the output
        self.jobs = [
            (span.start + done, min(CHUNK_BYTES, span.length - done), dest_start + done, False)
            for done in range(0, span.length, CHUNK_BYTES)
        ]
        self._copy = backend.copy_ranges
        self._fds = (source_fd, dest_fd)
        self._progress = progress
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pyckpt-span-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for first in range(0, len(self.jobs), 2):
                batch = self.jobs[first : first + 2]
                self._copy(*self._fds, batch)
                if self._progress is not None:
                    self._progress(sum(job[1] for job in batch))
            # Flushing the span here, while the main thread still writes the pickle, leaves
            # the commit's fsync only the pickle to flush instead of the whole file.
            os.fdatasync(self._fds[1])
        except BaseException as exc:  # handed to the main thread by wait()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> SpanCopy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._thread.join()
