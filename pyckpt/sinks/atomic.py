"""Write a file so that it appears at its path complete or not at all.

The data goes to an unnamed file in the destination's directory (``O_TMPFILE``; a hidden
named one where the filesystem lacks it), is fsynced, and only then gets its name by a
rename over the destination. SIGKILL or power loss leaves nothing at the destination (and,
with ``O_TMPFILE``, nothing at all); an error or Ctrl-C removes the temporary file. A file
already at the destination stays untouched unless the write succeeds.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, TypeVar

from .file_copy import write_all

_Self = TypeVar("_Self", bound="_Atomic")


class _Atomic:
    """Used as a context manager: committed when the block succeeds, aborted otherwise."""

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, kind: Any, exc: Any, traceback: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


class AtomicFile(_Atomic):
    def __init__(self, destination: str, *, overwrite: bool = False) -> None:
        self.destination = os.path.abspath(destination)
        self.directory = os.path.dirname(self.destination)
        if os.path.isdir(self.destination):
            raise IsADirectoryError(21, "Is a directory", destination)
        if not overwrite and os.path.lexists(self.destination):
            raise FileExistsError(17, "File exists (use --force to replace it)", destination)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(2, "No such directory", self.directory)
        self.temporary_name: str | None = None
        self.fd = self._open()

    def _open(self) -> int:
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        tmpfile = getattr(os, "O_TMPFILE", 0)
        if tmpfile:
            try:
                return os.open(self.directory, flags | tmpfile, 0o666)
            except OSError:
                pass  # filesystem without O_TMPFILE: fall back to a hidden name
        self.temporary_name = self._hidden_name()
        return os.open(self.temporary_name, flags | os.O_CREAT | os.O_EXCL, 0o666)

    def _hidden_name(self) -> str:
        base = os.path.basename(self.destination)
        return os.path.join(self.directory, f".{base}.{secrets.token_hex(4)}.pyckpt-tmp")

    def commit(self) -> None:
        """fsync, then give the file its name (replacing what was there), then fsync the directory."""
        os.fsync(self.fd)
        if self.temporary_name is None:
            self.temporary_name = self._hidden_name()
            # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names an O_TMPFILE file; os.link
            # only uses linkat when given a directory descriptor.
            proc_fds = os.open("/proc/self/fd", os.O_RDONLY)
            try:
                os.link(str(self.fd), self.temporary_name, src_dir_fd=proc_fds, follow_symlinks=True)
            finally:
                os.close(proc_fds)
        os.replace(self.temporary_name, self.destination)
        self.temporary_name = None
        os.close(self.fd)
        self.fd = -1
        _fsync_path(self.directory)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temporary_name is not None:
            try:
                os.unlink(self.temporary_name)
            except FileNotFoundError:
                pass
            self.temporary_name = None


class AtomicDirectory(_Atomic):
    """A directory that appears at its path complete or not at all.

    Its files are written into a hidden directory beside the destination, each fsynced, and
    the directory is renamed into place only when all are. An error or Ctrl-C removes it; a
    SIGKILL leaves only the hidden directory (named ``.NAME.*.pyckpt-tmp``), never a partial
    destination. Replacing (``overwrite``) moves the old directory aside first, so for that
    instant nothing stands at the destination; the old one is then removed.
    """

    def __init__(self, destination: str, *, overwrite: bool = False) -> None:
        self.destination = os.path.abspath(destination)
        self.parent = os.path.dirname(self.destination)
        if not overwrite and os.path.lexists(self.destination):
            raise FileExistsError(17, "File exists (use --force to replace it)", destination)
        if not os.path.isdir(self.parent):
            raise FileNotFoundError(2, "No such directory", self.parent)
        base = os.path.basename(self.destination)
        self.path = os.path.join(self.parent, f".{base}.{secrets.token_hex(4)}.pyckpt-tmp")
        os.mkdir(self.path)

    def create(self, name: str) -> int:
        """A new file in the directory, open for writing."""
        return os.open(os.path.join(self.path, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)

    def write_small(self, name: str, data: bytes) -> None:
        """A small file (an index, DCP metadata) written and fsynced whole."""
        fd = self.create(name)
        try:
            write_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        _fsync_path(self.path)
        old = None
        if os.path.lexists(self.destination):
            old = f"{self.path}-old"
            os.replace(self.destination, old)
        os.replace(self.path, self.destination)
        _fsync_path(self.parent)
        if old is not None:
            _remove(old)

    def abort(self) -> None:
        _remove(self.path)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    import shutil

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
