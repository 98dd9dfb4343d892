"""Stage 1 of the pipeline: index a checkpoint without reading tensor bytes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .checkpoint import FORMAT_LEGACY, FORMAT_TORCHSCRIPT, FORMAT_ZIP, CheckpointIndex
from .legacy_format import index_legacy, looks_legacy
from .policy import GlobalsPolicy
from .safetensors_format import FORMAT_SAFETENSORS, index_safetensors, looks_safetensors
from .source import BufferSource, FileArg, Source, open_source
from .zip_format import index_zip

if TYPE_CHECKING:
    from .._backend import Backend

__all__ = [
    "FORMAT_LEGACY",
    "FORMAT_SAFETENSORS",
    "FORMAT_TORCHSCRIPT",
    "FORMAT_ZIP",
    "CheckpointIndex",
    "index_any",
    "index_checkpoint",
    "index_opened",
    "index_source",
]

LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def index_checkpoint(
    f: FileArg, backend: Backend | None = None, *, policy: GlobalsPolicy | None = None
) -> CheckpointIndex:
    """Open ``f`` and index it; the index owns the open source (close it, or use ``with``).

    ``policy`` says what becomes of globals beyond torch's allowlist (refused by default).
    A file-like ``f`` is left positioned just past the checkpoint, as torch leaves it.
    """
    source = open_source(f)
    try:
        return index_opened(source, backend, policy=policy)
    except BaseException:
        source.close()
        raise


def index_any(f: FileArg, backend: Backend | None = None, *, policy: GlobalsPolicy | None = None) -> CheckpointIndex:
    """:func:`index_checkpoint` of whatever ``f`` names: one file, a model directory holding
    one, a Hugging Face sharded checkpoint (its directory or index file) or a DCP directory;
    the files of the last two are indexed as one (a :class:`~pyckpt.index.sharded.CompositeIndex`)."""
    from .dcp_format import index_dcp, is_dcp_directory
    from .sharded import ShardedCheckpoint, checkpoint_files, open_sharded

    if is_dcp_directory(f):
        return index_dcp(os.fspath(f), backend or _current_backend(), policy)  # type: ignore[arg-type]
    files = checkpoint_files(f)
    if isinstance(files, ShardedCheckpoint):
        return open_sharded(files, backend or _current_backend(), policy)
    return index_checkpoint(f if files is None else files, backend, policy=policy)


def _current_backend() -> Backend:
    from .._backend import current_backend

    return current_backend()


def index_opened(source: Source, backend: Backend | None = None, *, policy: GlobalsPolicy | None = None) -> CheckpointIndex:
    """:func:`index_checkpoint` of a source already open (the index then owns it)."""
    index = index_source(source, backend, policy=policy)
    if isinstance(source, BufferSource):
        source.leave_stream_at(index.end if index.end is not None else source.size)
    return index


def index_source(
    source: Source, backend: Backend | None = None, *, policy: GlobalsPolicy | None = None
) -> CheckpointIndex:
    if backend is None:
        backend = _current_backend()
    try:
        return _dispatch(source, backend, policy if policy is not None else GlobalsPolicy())
    except CheckpointError as exc:
        raise exc.located(path=source.display)
    except RecursionError:
        raise CheckpointError("object tree nests too deeply", path=source.display) from None


def _dispatch(source: Source, backend: Backend, policy: GlobalsPolicy) -> CheckpointIndex:
    if source.size == 0:
        raise CheckpointError("file is empty")
    head = source.read(0, min(source.size, len(LFS_POINTER)))
    if head.startswith(LFS_POINTER):
        raise CheckpointError(
            "this is a Git LFS pointer file, not the checkpoint itself (run `git lfs pull`)"
        )
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return index_zip(source, backend, policy)
    # Before the legacy test: a header of about 9 MB has a length that starts like a legacy
    # file's magic number, but no legacy file has a '{' where the header starts.
    if looks_safetensors(source, head):
        return index_safetensors(source)
    if looks_legacy(head):
        return index_legacy(source, backend, policy)
    if source.size >= 262 and source.read(257, 5) == b"ustar":
        raise CheckpointError(
            "this is the pre-1.0 tar checkpoint format, which cannot be read without running "
            "pickle (torch refuses it under weights_only=True as well)"
        )
    raise CheckpointError(f"not a PyTorch checkpoint (unknown format, starts with {head[:8]!r})")

