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


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        wrote = os.pwrite(fd, view, offset)
        view = view[wrote:]
        offset += wrote
