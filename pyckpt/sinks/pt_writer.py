"""Write a torch zip checkpoint: a new ``data.pkl`` plus each storage passed through."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..index.checkpoint import CheckpointIndex
from .range_copy import Progress, RangeCopy, known_crc, run_copies
from .file_copy import write_all
from .pickle_writer import pickle_tree
from .storage_span import DATA_DESCRIPTOR_FLAG, SpanCopy, StorageSpan
from .torch_zip import ALIGNMENT, ZipRecord, central_directory, end_data_at, lay_out, local_header

if TYPE_CHECKING:
    from .._backend import Backend

FORMAT_VERSION = b"1"
STORAGE_ALIGNMENT = b"64"
VERSION = b"3\n"


@dataclass
class WrittenFile:
    tensors_bytes: int
    storages: int
    file_bytes: int


def top_folder_for(destination: str) -> str:
    """torch names the top folder after the file's stem, or 'archive' when it is not plain ASCII."""
    stem = re.sub(r"\.[^.]*$", "", destination.rsplit("/", 1)[-1])
    return stem if re.fullmatch(r"[A-Za-z0-9_.\-]+", stem or "") else "archive"


def write_pt(
    index: CheckpointIndex,
    root: Any,
    dest_fd: int,
    destination: str,
    backend: Backend,
    progress: Progress | None = None,
    *,
    base: int = 0,
) -> WrittenFile:
    """``root`` as a torch file at ``base`` in ``dest_fd`` (its offsets relative to ``base``:
    a DCP chunk is such a file inside a larger one)."""
    data_pkl, storages = pickle_tree(root)
    top = top_folder_for(destination)
    small = {f"{top}/data.pkl": data_pkl, **dict(_head(top, index.byteorder.encode()))}
    layout = [(name, len(data)) for name, data in small.items()]
    layout += [(f"{top}/data/{key}", record.nbytes) for key, record in storages]
    layout.append((f"{top}/version", len(VERSION)))
    small[f"{top}/version"] = VERSION
    records, cd_offset = lay_out(layout)
    by_name = {record.name: record for record in records}

    copies = []
    for (_, storage), record in zip(storages, records[4 : 4 + len(storages)]):
        crc = known_crc(storage)
        copies.append(
            RangeCopy(storage, 0, storage.nbytes, base + record.data_offset, want_crc=crc is None, crc32=crc or 0)
        )
    run_copies(index, copies, dest_fd, backend, progress)
    for copy, record in zip(copies, records[4 : 4 + len(storages)]):
        record.crc32 = copy.crc32

    for name, data in small.items():
        record = by_name[name]
        record.crc32 = zlib.crc32(data)
        write_all(dest_fd, data, base + record.data_offset)
    for record in records:
        write_all(dest_fd, local_header(record), base + record.header_offset)
    tail = central_directory(records, cd_offset)
    write_all(dest_fd, tail, base + cd_offset)
    return WrittenFile(
        tensors_bytes=sum(storage.nbytes for _, storage in storages),
        storages=len(storages),
        file_bytes=cd_offset + len(tail),
    )


# -- the storage span copied whole (see storage_span.py) ---------------------------------


def _head(top: str, byteorder: bytes) -> list[tuple[str, bytes]]:
    """The small records torch writes after data.pkl, in its order."""
    return [
        (f"{top}/.format_version", FORMAT_VERSION),
        (f"{top}/.storage_alignment", STORAGE_ALIGNMENT),
        (f"{top}/byteorder", byteorder),
    ]


def span_destination(span: StorageSpan) -> int:
    """Where the span goes: after the small head records, congruent to its source offset mod 64.

    It cannot depend on the byte order, which is not read yet when the copy starts: the head
    is laid out as if the byteorder record held the longer value, b"little".
    """
    _, end = lay_out([(name, len(data)) for name, data in _head(span.top, b"little")])
    return end + (span.start - end) % ALIGNMENT


def write_pt_around_span(index: CheckpointIndex, root: Any, dest_fd: int, copying: SpanCopy) -> WrittenFile | None:
    """The file as write_pt would write it, around the span ``copying`` copies (placed by
    :func:`span_destination`); None if the pickle names other storages than the span's
    records (nothing is written then)."""
    data_pkl, storages = pickle_tree(root)
    span = copying.span
    span_entries = span.records_named_by(storages, index.entries)
    if span_entries is None:
        return None
    top, span_at = span.top, copying.dest_start
    head = _head(top, index.byteorder.encode())
    head_records, _ = lay_out([(name, len(data)) for name, data in head])
    end_data_at(head_records[-1], span_at)
    shift = span_at - span.start
    span_records = [
        ZipRecord(
            entry.name,
            entry.size,
            header_offset=entry.header_offset + shift,
            data_offset=entry.data_offset + shift,
            crc32=entry.crc32,
            kept_flags=entry.flags & DATA_DESCRIPTOR_FLAG,
        )
        for entry in span_entries
    ]
    tail = [(f"{top}/data.pkl", data_pkl), (f"{top}/version", VERSION)]
    tail_records, cd_offset = lay_out([(name, len(data)) for name, data in tail], start=span_at + span.length)
    for record, (_, data) in zip(head_records + tail_records, head + tail):
        record.crc32 = zlib.crc32(data)
        write_all(dest_fd, local_header(record) + data, record.header_offset)
    # data.pkl first in the directory, as torch lists it: torch's reader takes the archive's
    # top folder from the first entry.
    records = tail_records[:1] + head_records + span_records + tail_records[1:]
    directory = central_directory(records, cd_offset)
    # Written while the span is still being copied (it lies past the span), so that once
    # the copy ends only the commit is left.
    write_all(dest_fd, directory, cd_offset)
    copying.wait()
    return WrittenFile(
        tensors_bytes=sum(entry.size for entry in span_entries),
        storages=len(span_entries),
        file_bytes=cd_offset + len(directory),
    )
