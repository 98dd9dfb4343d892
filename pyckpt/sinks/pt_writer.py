"""Write a torch zip checkpoint: a new ``data.pkl`` plus each storage passed through."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..index.checkpoint import CheckpointIndex
from .copy_plan import Progress, RangeCopy, known_crc, run_copies
from .file_copy import write_all
from .pickle_writer import pickle_tree
from .torch_zip import central_directory, lay_out, local_header

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
) -> WrittenFile:
    data_pkl, storages = pickle_tree(root)
    top = top_folder_for(destination)
    small = {
        f"{top}/data.pkl": data_pkl,
        f"{top}/.format_version": FORMAT_VERSION,
        f"{top}/.storage_alignment": STORAGE_ALIGNMENT,
        f"{top}/byteorder": index.byteorder.encode(),
    }
    layout = [(name, len(data)) for name, data in small.items()]
    layout += [(f"{top}/data/{key}", record.nbytes) for key, record in storages]
    layout.append((f"{top}/version", len(VERSION)))
    small[f"{top}/version"] = VERSION
    records, cd_offset = lay_out(layout)
    by_name = {record.name: record for record in records}

    copies = []
    for (_, storage), record in zip(storages, records[4 : 4 + len(storages)]):
        crc = known_crc(storage)
        copies.append(RangeCopy(storage, 0, storage.nbytes, record.data_offset, want_crc=crc is None, crc32=crc or 0))
    run_copies(index, copies, dest_fd, backend, progress)
    for copy, record in zip(copies, records[4 : 4 + len(storages)]):
        record.crc32 = copy.crc32

    for name, data in small.items():
        record = by_name[name]
        record.crc32 = zlib.crc32(data)
        write_all(dest_fd, data, record.data_offset)
    for record in records:
        write_all(dest_fd, local_header(record), record.header_offset)
    tail = central_directory(records, cd_offset)
    write_all(dest_fd, tail, cd_offset)
    return WrittenFile(
        tensors_bytes=sum(storage.nbytes for _, storage in storages),
        storages=len(storages),
        file_bytes=cd_offset + len(tail),
    )
