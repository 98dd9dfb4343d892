"""Calls into the native extension's index functions, in the shapes the pipeline uses."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import allowlist as names
from .interpret import Interpreter
from .policy import BLOCKED_MODULES, MAX_NESTING, PY2_MODULES
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
    """The native VM, given exactly the rules the Python VM reads from the policy."""
    policy = interpreter.policy
    rules = {
        "allowed": interpreter.allowed,
        "torchscript_helpers": names.TORCHSCRIPT_IDENTITY_HELPERS,
        "trusted": policy.trusted,
        "blocked_modules": BLOCKED_MODULES,
        "module_aliases": PY2_MODULES,
        "torchscript": interpreter.torchscript,
        "opaque": policy.opaque,
        "list_blocked": policy.list_blocked,
        "max_values": policy.max_objects,
    }
    obj, end = native.unpickle(data, start, interpreter, rules=rules, max_nesting=MAX_NESTING)
    return obj, end
