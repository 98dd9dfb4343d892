"""File-to-file range copies for the Python backend (the native one does this in C++)."""

from __future__ import annotations

import os
import zlib

from ..errors import CheckpointError

CHUNK = 8 << 20


def copy_ranges(source_fd: int, dest_fd: int, jobs: list[tuple[int, int, int, bool]]) -> list[int]:
    """Copy each ``(source_offset, length, dest_offset, want_crc)``; kernel-side where possible."""
    crcs = []
    kernel = hasattr(os, "copy_file_range")
    for source_offset, length, dest_offset, want_crc in jobs:
        if not want_crc and kernel:
            try:
                _kernel_copy(source_fd, dest_fd, source_offset, length, dest_offset)
                crcs.append(0)
                continue
            except OSError as exc:
                if exc.errno not in (18, 38, 22, 95, 9):  # EXDEV ENOSYS EINVAL EOPNOTSUPP EBADF
                    raise
                kernel = False
        crcs.append(_user_copy(source_fd, dest_fd, source_offset, length, dest_offset, want_crc))
    return crcs


def _kernel_copy(source_fd: int, dest_fd: int, source_offset: int, length: int, dest_offset: int) -> None:
    done = 0
    while done < length:
        copied = os.copy_file_range(
            source_fd, dest_fd, min(length - done, 1 << 30), source_offset + done, dest_offset + done
        )
        if copied == 0:
            raise CheckpointError(f"file shrank while being read (at offset {source_offset + done})")
        done += copied


def _user_copy(source_fd: int, dest_fd: int, source_offset: int, length: int, dest_offset: int, want_crc: bool) -> int:
    crc = 0
    done = 0
    while done < length:
        chunk = os.pread(source_fd, min(CHUNK, length - done), source_offset + done)
        if not chunk:
            raise CheckpointError(f"file shrank while being read (at offset {source_offset + done})")
        if want_crc:
            crc = zlib.crc32(chunk, crc)
        write_all(dest_fd, chunk, dest_offset + done)
        done += len(chunk)
    return crc


def cast_copy_ranges(source_fd: int, dest_fd: int, jobs: list[tuple[int, int, str, str, int]]) -> list[int]:
    """Each ``(source_offset, count, source_dtype, target_dtype, dest_offset)``, cast a chunk
    at a time on the way; the CRC-32 of each job's output."""
    from ..float_cast import CHUNK_ELEMENTS, cast_bytes
    from ..index.symbols import DTYPES

    crcs = []
    for source_offset, count, source_dtype, target_dtype, dest_offset in jobs:
        width, crc, at = DTYPES[source_dtype].itemsize, 0, dest_offset
        for first in range(0, count, CHUNK_ELEMENTS):
            length = min(CHUNK_ELEMENTS, count - first) * width
            chunk = os.pread(source_fd, length, source_offset + first * width)
            if len(chunk) != length:
                raise CheckpointError(f"file shrank while being read (at offset {source_offset + first * width})")
            cast = cast_bytes(chunk, source_dtype, target_dtype)
            crc = zlib.crc32(cast, crc)
            write_all(dest_fd, cast, at)
            at += len(cast)
        crcs.append(crc)
    return crcs


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        wrote = os.pwrite(fd, view, offset)
        view = view[wrote:]
        offset += wrote
