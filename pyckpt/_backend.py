"""The one guarded import of the native core, and the two backends behind one face.

The native core (``pyckpt._core``) is plain C++ with pybind11: importing it does not load
torch. Two torch extensions are imported only when a load needs them: the bulk host storages
and tensors (``pyckpt._tensors``, below) and the CUDA ring (``pyckpt._ring``, imported by
:mod:`pyckpt.execute.device`).

``PYCKPT_DISABLE_EXT=1`` forces the pure-Python backend; ``PYCKPT_REQUIRE_EXT=1`` turns a
missing or broken extension into an ImportError instead of a silent fallback (CI sets it).
``backend_info()`` always says which backend runs and why the extension is not in use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from ._env import env_flag, io_threads
from .errors import ExtensionUnavailableError, announce_fallback

if TYPE_CHECKING:
    import torch

    from .index.interpret import Interpreter
    from .index.records import TensorRecord, ZipEntry
    from .index.source import Source


class Backend(Protocol):
    name: str

    def zip_entries(self, source: Source) -> Mapping[str, ZipEntry]:
        """The central directory by record name, in directory order."""
        ...

    def unpickle(self, data: bytes, interpreter: Interpreter, *, start: int = 0) -> tuple[Any, int]: ...

    def map_file(self, source: Source, *, shared: bool = False) -> torch.UntypedStorage:
        """The whole file as one private (copy-on-write) mapping; ``shared``: MAP_SHARED."""
        ...

    def read_into(self, source: Source, jobs: list[tuple[int, torch.Tensor]]) -> None:
        """Fill each contiguous host tensor with the file bytes starting at its offset."""
        ...

    def copy_ranges(self, source_fd: int, dest_fd: int, jobs: list[tuple[int, int, int, bool]]) -> list[int]:
        """Copy ``(source_offset, length, dest_offset, want_crc)`` jobs file to file; CRCs (0 if not asked)."""
        ...

    def slice_storage(self, base: torch.UntypedStorage, ranges: list[tuple[int, int]]) -> list[torch.UntypedStorage]:
        """Storages sharing ``base``'s memory, one per ``(offset, length)`` range."""
        ...

    def read_fresh(self, source: Source, ranges: list[tuple[int, int]]) -> list[torch.UntypedStorage]:
        """A new host storage holding each raw ``(offset, length)`` range of the source."""
        ...

    def make_tensors(
        self, records: list[TensorRecord], storages: dict[str, torch.UntypedStorage]
    ) -> dict[int, torch.Tensor]:
        """Tensors for the records it can make in bulk, by ``id(record)`` (others: none)."""
        ...

    def fill_directly(self, files: list[tuple[Source, list[FillPair]]]) -> list[list[bool]]:
        """Read each raw stored record straight into its host target where it fits as it is,
        every file's reads in one pool; per file, one flag per pair (False: left for the
        caller's one-by-one path). A read error names its file."""
        ...

    def crc32_ranges(self, source: Source, ranges: list[tuple[int, int]]) -> list[int]:
        """CRC-32 of each ``(offset, length)`` range of the source."""
        ...

    def cast_into(self, source: Source, jobs: list[CastJob]) -> None:
        """Read ``count`` elements of dtype ``source_dtype`` at ``offset`` and write them,
        cast to ``target_dtype``, into the contiguous host byte tensor ``dest``."""
        ...

    def cast_copy_ranges(
        self, source_fd: int, dest_fd: int, jobs: list[tuple[int, int, str, str, int]]
    ) -> list[int]:
        """File to file, cast on the way: ``(source_offset, count, source_dtype, target_dtype,
        dest_offset)``; the CRC-32 of each job's output bytes."""
        ...


# A record and the host tensor its bytes may go straight into.
FillPair = tuple["TensorRecord", "torch.Tensor"]
# (offset, element count, source dtype name, target dtype name, destination bytes)
CastJob = tuple[int, int, str, str, "torch.Tensor"]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    extension_loaded: bool
    reason: str | None
    extension_path: str | None


class _SharedPaths:
    """What both backends do the same way (the native one where its torch extension is absent)."""

    def slice_storage(self, base: torch.UntypedStorage, ranges: list[tuple[int, int]]) -> list[torch.UntypedStorage]:
        return [base[offset : offset + length] for offset, length in ranges]

    def read_fresh(self, source: Source, ranges: list[tuple[int, int]]) -> list[torch.UntypedStorage]:
        import torch

        buffers = [torch.empty(length, dtype=torch.uint8) for _, length in ranges]
        jobs = [(offset, buffer) for (offset, _), buffer in zip(ranges, buffers) if buffer.numel()]
        self.read_into(source, jobs)  # type: ignore[attr-defined]
        return [buffer.untyped_storage() for buffer in buffers]

    def make_tensors(
        self, records: list[TensorRecord], storages: dict[str, torch.UntypedStorage]
    ) -> dict[int, torch.Tensor]:
        return {}  # the object builder makes each tensor itself

    def fill_directly(self, files: list[tuple[Source, list[FillPair]]]) -> list[list[bool]]:
        return [[False] * len(pairs) for _, pairs in files]  # model_fill fills them one by one


class PythonBackend(_SharedPaths):
    name = "python"

    def map_file(self, source: Source, *, shared: bool = False) -> torch.UntypedStorage:
        import torch

        return torch.UntypedStorage.from_file(source.path, shared, source.size)

    def read_into(self, source: Source, jobs: list[tuple[int, torch.Tensor]]) -> None:
        for offset, tensor in jobs:
            source.readinto(offset, memoryview(tensor.numpy()))

    def copy_ranges(self, source_fd: int, dest_fd: int, jobs: list[tuple[int, int, int, bool]]) -> list[int]:
        from .sinks.file_copy import copy_ranges

        return copy_ranges(source_fd, dest_fd, jobs)

    def crc32_ranges(self, source: Source, ranges: list[tuple[int, int]]) -> list[int]:
        import zlib

        crcs = []
        for offset, length in ranges:
            crc = 0
            for start in range(offset, offset + length, 8 << 20):
                crc = zlib.crc32(source.read(start, min(8 << 20, offset + length - start)), crc)
            crcs.append(crc)
        return crcs

    def cast_into(self, source: Source, jobs: list[CastJob]) -> None:
        from .float_cast import CHUNK_ELEMENTS, cast_bytes
        from .index.symbols import DTYPES

        for offset, count, source_dtype, target_dtype, dest in jobs:
            out = dest.numpy()
            width, at = DTYPES[source_dtype].itemsize, 0
            for first in range(0, count, CHUNK_ELEMENTS):
                n = min(CHUNK_ELEMENTS, count - first)
                cast = cast_bytes(source.read(offset + first * width, n * width), source_dtype, target_dtype)
                out[at : at + len(cast)] = cast
                at += len(cast)

    def cast_copy_ranges(
        self, source_fd: int, dest_fd: int, jobs: list[tuple[int, int, str, str, int]]
    ) -> list[int]:
        from .sinks.file_copy import cast_copy_ranges

        return cast_copy_ranges(source_fd, dest_fd, jobs)

    def zip_entries(self, source: Source) -> Mapping[str, ZipEntry]:
        from .index.zip_index import read_zip_entries

        return {entry.name: entry for entry in read_zip_entries(source)}

    def unpickle(self, data: bytes, interpreter: Interpreter, *, start: int = 0) -> tuple[Any, int]:
        from .index.pickle_vm import unpickle

        return unpickle(data, interpreter, start=start)


class NativeBackend(_SharedPaths):
    name = "native"

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def slice_storage(self, base: torch.UntypedStorage, ranges: list[tuple[int, int]]) -> list[torch.UntypedStorage]:
        tensors = tensors_module()
        if tensors is None:
            return super().slice_storage(base, ranges)
        return list(tensors.slice_storage(base, ranges))

    def read_fresh(self, source: Source, ranges: list[tuple[int, int]]) -> list[torch.UntypedStorage]:
        from .index.source import FileSource

        tensors = tensors_module()
        if tensors is None:
            return super().read_fresh(source, ranges)
        if isinstance(source, FileSource):
            return list(tensors.read_storages_fd(source.fd, source.size, ranges, io_threads()))
        return list(tensors.read_storages_buffer(source.buffer(), ranges, io_threads()))

    def make_tensors(
        self, records: list[TensorRecord], storages: dict[str, torch.UntypedStorage]
    ) -> dict[int, torch.Tensor]:
        tensors = tensors_module()
        if tensors is None or not records:
            return {}
        from .sinks.torch_values import torch_dtypes

        plain = [r for r in records if not r.metadata and r.storage.key in storages]
        try:
            made = tensors.make_tensors(plain, storages, torch_dtypes())
        except RuntimeError:  # torch refused one (requires_grad on integers...): the builder names it
            return {}
        return {id(record): tensor for record, tensor in zip(plain, made)}

    def fill_directly(self, files: list[tuple[Source, list[FillPair]]]) -> list[list[bool]]:
        from .index.native_bridge import native_source
        from .sinks.torch_values import torch_dtypes

        tensors = tensors_module()
        if tensors is None:
            return super().fill_directly(files)
        native = [(native_source(source), source.size, pairs, source.display) for source, pairs in files]
        return tensors.fill_directly(native, torch_dtypes(), io_threads())

    def zip_entries(self, source: Source) -> Mapping[str, ZipEntry]:
        from .index.native_bridge import zip_entries

        return zip_entries(self.module, source)

    def unpickle(self, data: bytes, interpreter: Interpreter, *, start: int = 0) -> tuple[Any, int]:
        from .index.native_bridge import unpickle

        return unpickle(self.module, data, interpreter, start=start)

    def map_file(self, source: Source, *, shared: bool = False) -> torch.UntypedStorage:
        import torch

        # The tensor keeps the mapping object (and so the mapping) alive.
        mapping = self.module.map_file(source.path, shared)
        return torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()

    def read_into(self, source: Source, jobs: list[tuple[int, torch.Tensor]]) -> None:
        from .index.native_bridge import native_source

        buffers = [(offset, tensor.numpy()) for offset, tensor in jobs]
        self.module.read_into(native_source(source), source.size, buffers, io_threads())

    def copy_ranges(self, source_fd: int, dest_fd: int, jobs: list[tuple[int, int, int, bool]]) -> list[int]:
        return list(self.module.copy_ranges(source_fd, dest_fd, jobs, io_threads()))

    def cast_into(self, source: Source, jobs: list[CastJob]) -> None:
        from .index.native_bridge import native_source

        parsed = [(offset, count, a, b, dest.numpy()) for offset, count, a, b, dest in jobs]
        self.module.cast_into(native_source(source), source.size, parsed, io_threads())

    def cast_copy_ranges(
        self, source_fd: int, dest_fd: int, jobs: list[tuple[int, int, str, str, int]]
    ) -> list[int]:
        return list(self.module.cast_copy_ranges(source_fd, dest_fd, jobs, io_threads()))

    def crc32_ranges(self, source: Source, ranges: list[tuple[int, int]]) -> list[int]:
        from .index.native_bridge import native_source

        return list(self.module.crc32_ranges(native_source(source), source.size, ranges, io_threads()))


_state: tuple[Backend, BackendInfo] | None = None


def _load() -> tuple[Backend, BackendInfo]:
    if env_flag("PYCKPT_DISABLE_EXT"):
        return PythonBackend(), BackendInfo("python", False, "disabled by PYCKPT_DISABLE_EXT=1", None)
    try:
        from . import _core  # type: ignore[attr-defined]
    except ImportError as exc:
        reason = f"the extension pyckpt._core could not be imported: {exc}"
        if env_flag("PYCKPT_REQUIRE_EXT"):
            raise ExtensionUnavailableError(f"{reason} (PYCKPT_REQUIRE_EXT=1 forbids the fallback)") from exc
        return PythonBackend(), BackendInfo("python", False, reason, None)
    return NativeBackend(_core), BackendInfo("native", True, None, getattr(_core, "__file__", None))


_tensors_module: Any = None
_tensors_reason: str | None = None


def tensors_module() -> Any | None:
    """The bulk host storages and tensors (``pyckpt._tensors``, a torch extension), or None.

    Imported on first use, by a load (it links libtorch; the command line never needs it).
    No silent fallback: a native backend without it warns once (or refuses, with
    ``PYCKPT_REQUIRE_EXT=1``) and makes its tensors one by one, as the Python backend does.
    """
    global _tensors_module, _tensors_reason
    if _tensors_module is None and _tensors_reason is None:
        try:
            from . import _tensors  # type: ignore[attr-defined]

            _tensors_module = _tensors
        except ImportError as exc:
            _tensors_reason = f"the extension pyckpt._tensors could not be imported: {exc}"
    if _tensors_module is None:
        announce_fallback(f"pyckpt: tensors are made one by one in Python because {_tensors_reason}")
    return _tensors_module


def _ensure() -> tuple[Backend, BackendInfo]:
    global _state
    if _state is None:
        _state = _load()
    return _state


def current_backend() -> Backend:
    return _ensure()[0]


def backend_info() -> BackendInfo:
    return _ensure()[1]


class use_backend:
    """Run a block with the given backend (``"native"`` or ``"python"``); for tests and tools."""

    def __init__(self, name: str) -> None:
        if name == "python":
            chosen: Backend = PythonBackend()
            info = BackendInfo("python", False, "selected explicitly", None)
        elif name == "native":
            native = native_backend()
            if native is None:
                raise ExtensionUnavailableError(f"native backend requested but {backend_info().reason}")
            chosen = native
            info = BackendInfo("native", True, None, getattr(native.module, "__file__", None))
        else:
            raise ValueError(f"unknown backend {name!r}")
        self.state = (chosen, info)

    def __enter__(self) -> Backend:
        global _state
        self.saved = _state
        _state = self.state
        return self.state[0]

    def __exit__(self, *exc: Any) -> None:
        global _state
        _state = self.saved


def python_backend() -> Backend:
    return PythonBackend()


def native_backend() -> NativeBackend | None:
    """The native backend if the extension imports (ignoring PYCKPT_DISABLE_EXT), for parity tests."""
    try:
        from . import _core  # type: ignore[attr-defined]
    except ImportError:
        return None
    return NativeBackend(_core)
