"""Calls into the native extension's index functions, in the shapes the pipeline uses."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import allowlist as names
from .interpret import Interpreter
from .py_zip import decode_name
from .records import ZipEntry
from .source import FileSource, Source


def zip_entries(native: ModuleType, source: Source) -> list[ZipEntry]:
    if isinstance(source, FileSource):
        raw = native.zip_entries_fd(source.fd, source.size)
    else:
        raw = native.zip_entries_buffer(source.buffer())
    return [ZipEntry(decode_name(name), *rest) for name, *rest in raw]


def unpickle(native: ModuleType, data: bytes, interpreter: Interpreter, *, start: int = 0) -> tuple[Any, int]:
    obj, end = native.unpickle(
        data,
        start,
        interpreter,
        allowed=sorted(interpreter.allowed),
        torchscript_helpers=sorted(names.TORCHSCRIPT_IDENTITY_HELPERS),
        torchscript=interpreter.torchscript,
    )
    return obj, end
