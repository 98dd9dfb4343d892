"""Calls into the native extension's index functions, in the shapes the pipeline uses."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

from . import call_rules as names
from .._env import io_threads
from .interpret import Interpreter
from .policy import BLOCKED_MODULES, MAX_NESTING, PY2_MODULES
from .records import ZipEntry
from .source import FileSource, Source


def zip_entries(native: ModuleType, source: Source) -> NativeZipEntries:
    threads = io_threads()
    return NativeZipEntries(native.zip_directory(native_source(source), source.size, threads))


def native_source(source: Source) -> Any:
    """What the native core takes for a source: its file descriptor, or its buffer."""
    return source.fd if isinstance(source, FileSource) else source.buffer()


class NativeZipEntries(Mapping[str, ZipEntry]):
    """The central directory, kept natively: a ZipEntry is made only when Python asks for it.

    The tree converter looks storage records up in ``directory`` itself, so a checkpoint of
    50,000 tensors makes no Python object per record to index them.
    """

    def __init__(self, directory: Any) -> None:
        self.directory = directory
        self._made: dict[str, ZipEntry] = {}
        self._names: list[str] | None = None

    def __getitem__(self, name: str) -> ZipEntry:
        entry = self._made.get(name)
        if entry is None:
            raw = self.directory.entry(name) if isinstance(name, str) else None
            if raw is None:
                raise KeyError(name)
            entry = self._made[name] = ZipEntry(*raw)
        return entry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._made or self.directory.entry(name) is not None)

    def __iter__(self) -> Iterator[str]:
        if self._names is None:
            self._names = self.directory.names()
        return iter(self._names)

    def __len__(self) -> int:
        return len(self.directory)

    def values(self) -> list[ZipEntry]:  # type: ignore[override]
        return [ZipEntry(*raw) for raw in self.directory.all()]


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
