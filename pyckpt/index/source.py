"""Where checkpoint bytes come from: a file descriptor or an in-memory buffer.

Every read is bounds-checked against the size taken when the source was opened, so a
lying offset becomes a CheckpointError instead of a short read later on.
"""

from __future__ import annotations

import io
import os
from typing import IO, Any, Union

from ..errors import CheckpointError

FileArg = Union[str, "os.PathLike[str]", IO[bytes]]


class Source:
    """Random access to a checkpoint's bytes."""

    display: str
    size: int
    path: str | None = None
    # The zip central directory, once read: convert reads it before indexing (to start
    # copying storages early) and the index then reuses it instead of reading it again.
    zip_directory: Any = None

    def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length, "read")
        return self._read(offset, length)

    def readinto(self, offset: int, buffer: memoryview) -> None:
        self.check_range(offset, len(buffer), "read")
        self._readinto(offset, buffer)

    def check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CheckpointError(
                f"file is truncated or lies about an offset: {what} of {length} bytes at offset "
                f"{offset} passes the end of the file ({self.size} bytes)"
            )

    def _read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def _readinto(self, offset: int, buffer: memoryview) -> None:
        raise NotImplementedError

    def buffer(self) -> memoryview | None:
        """The bytes in memory, when the source is a buffer (the native index reads it in place)."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FileSource(Source):
    def __init__(self, path: str) -> None:
        self.path = path
        self.display = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except IsADirectoryError:
            raise CheckpointError("is a directory, not a checkpoint file", path=path) from None
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file or directory", path) from None
        stat = os.fstat(self.fd)
        self.size = stat.st_size

    def _read(self, offset: int, length: int) -> bytes:
        chunks = []
        while length:
            chunk = os.pread(self.fd, min(length, 1 << 30), offset)
            if not chunk:
                raise CheckpointError(f"file shrank while being read (at offset {offset})")
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def _readinto(self, offset: int, buffer: memoryview) -> None:
        done = 0
        view = buffer.cast("B") if buffer.format != "B" else buffer
        while done < len(view):
            got = os.preadv(self.fd, [view[done : done + (1 << 30)]], offset + done)
            if got <= 0:
                raise CheckpointError(f"file shrank while being read (at offset {offset + done})")
            done += got

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1


class BufferSource(Source):
    def __init__(
        self, data: bytes | bytearray | memoryview, display: str = "<buffer>", *, stream: Any = None, start: int = 0
    ) -> None:
        self.view = memoryview(data).cast("B")
        self.size = len(self.view)
        self.display = display
        self.stream = stream  # the file-like object the bytes came from, if any
        self.start = start  # its position when it was opened

    def leave_stream_at(self, end: int) -> None:
        """Position the stream just past the checkpoint, as torch.load leaves it."""
        if self.stream is not None and getattr(self.stream, "seekable", lambda: False)():
            self.stream.seek(self.start + end)

    def _read(self, offset: int, length: int) -> bytes:
        return bytes(self.view[offset : offset + length])

    def _readinto(self, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" else buffer
        view[:] = self.view[offset : offset + len(view)]

    def buffer(self) -> memoryview:
        return self.view


def open_source(f: FileArg) -> Source:
    """Open a path, or take a file-like object's remaining bytes."""
    if isinstance(f, (str, os.PathLike)):
        return FileSource(os.fspath(f))
    if isinstance(f, (bytes, bytearray, memoryview)):
        return BufferSource(f)
    if hasattr(f, "read"):
        seekable = getattr(f, "seekable", lambda: False)()
        start = f.tell() if seekable else 0
        if isinstance(f, io.BytesIO):
            data: Any = f.getbuffer()[start:]
        else:
            data = f.read()
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError("file-like object must be opened in binary mode")
        name = getattr(f, "name", None)
        display = str(name) if isinstance(name, str) else "<buffer>"
        return BufferSource(data, display=display, stream=f, start=start)
    raise TypeError(f"expected a path or a binary file-like object, got {type(f).__name__}")
