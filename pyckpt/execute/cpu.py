"""Copy storage bytes into host memory that already exists.

Stored records are read by the backend (in parallel, without the GIL, on the native one);
deflate records are inflated in a stream that never produces more than the destination
holds; big-endian data is swapped in place afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError
from ..index.checkpoint import CheckpointIndex, iter_inflated
from ..index.records import METHOD_DEFLATE, StorageRecord
from ..index.source import Source
from ..sinks.torch_values import torch_dtype

if TYPE_CHECKING:
    from .._backend import Backend, CastJob


@dataclass(slots=True)
class CopyJob:
    """Copy ``dest.numel()`` bytes of ``record``, starting ``start`` bytes into it, to ``dest``."""

    record: StorageRecord
    start: int
    dest: torch.Tensor  # contiguous uint8, host memory


def run_copy_jobs(source: Source, jobs: list[CopyJob], backend: Backend) -> None:
    stored: list[tuple[int, torch.Tensor]] = []
    for job in jobs:
        if job.start + job.dest.numel() > job.record.nbytes:
            raise CheckpointError(
                f"copy of {job.dest.numel()} bytes at {job.start} passes the end of storage "
                f"'{job.record.key}' ({job.record.nbytes} bytes)",
                record=job.record.record,
            )
        if job.dest.numel() == 0:
            continue
        if job.record.method == METHOD_DEFLATE:
            inflate_into(source, job.record, job.start, memoryview(job.dest.numpy()))
        else:
            stored.append((job.record.data_offset + job.start, job.dest))
    if stored:
        backend.read_into(source, stored)


def read_storages(
    index: CheckpointIndex, records: list[StorageRecord], backend: Backend
) -> dict[str, torch.UntypedStorage]:
    """Fresh host storages holding ``records``' bytes in native byte order, by storage key
    (cast stand-ins: their original's elements, cast while they are read)."""
    result: dict[str, torch.UntypedStorage] = {}
    cast = [r for r in records if r.cast_from is not None]
    if cast:
        result.update(_read_cast(index, cast, backend))
        records = [r for r in records if r.cast_from is None]
    raw = [r for r in records if r.method != METHOD_DEFLATE and not r.byteswap and r.nbytes < BULK_LIMIT]
    if raw:  # stored records: allocated and read in bulk
        try:
            storages = backend.read_fresh(index.source, [(r.data_offset, r.nbytes) for r in raw])
        except (RuntimeError, MemoryError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            total = sum(r.nbytes for r in raw)
            raise CheckpointError(f"cannot allocate {total} bytes for {len(raw)} storages: {exc}") from None
        result.update(zip([r.key for r in raw], storages))
    rest = [r for r in records if r.key not in result]
    if rest:
        result.update(_read_one_by_one(index, rest, backend))
    return result


# Larger storages are allocated one by one, so a failed allocation names its storage.
BULK_LIMIT = 1 << 30


def _read_one_by_one(
    index: CheckpointIndex, records: list[StorageRecord], backend: Backend
) -> dict[str, torch.UntypedStorage]:
    buffers = {record.key: allocate_bytes(record.nbytes, record) for record in records}
    run_copy_jobs(index.source, [CopyJob(r, 0, buffers[r.key]) for r in records], backend)
    result = {key: buffer.untyped_storage() for key, buffer in buffers.items()}
    for record in records:
        if record.byteswap:
            result[record.key].byteswap(torch_dtype(record.dtype))
    return result


def _read_cast(index: CheckpointIndex, records: list[StorageRecord], backend: Backend) -> dict[str, torch.UntypedStorage]:
    """Stored records are cast a chunk at a time on their way from the file (no second copy of
    the storage is held); compressed or byte-swapped ones are read whole first, then cast."""
    from ..float_cast import cast_bytes

    buffers = {record.key: allocate_bytes(record.nbytes, record) for record in records}
    jobs = []
    for record in records:
        if casts_by_range(record):
            job = cast_job(record, buffers[record.key])
            if job[1]:
                jobs.append(job)
            continue
        original, elements = record.cast_from.record, record.cast_from.dtype  # type: ignore[union-attr]
        held = read_storages(index, [original], backend)[original.key]
        data = torch.empty(0, dtype=torch.uint8).set_(held).numpy()  # type: ignore[call-overload]
        buffers[record.key].numpy()[:] = cast_bytes(data, elements.name, record.dtype.name)
    if jobs:
        backend.cast_into(index.source, jobs)
    return {key: buffer.untyped_storage() for key, buffer in buffers.items()}


def casts_by_range(record: StorageRecord) -> bool:
    """Whether a cast stand-in's original lies raw in the file, to be cast as it is read
    (a compressed or byte-swapped one is read whole first)."""
    original = record.cast_from.record  # type: ignore[union-attr]
    return original.method != METHOD_DEFLATE and not original.byteswap


def cast_job(record: StorageRecord, dest: torch.Tensor) -> CastJob:
    """Read a cast stand-in's elements (``casts_by_range``) and cast them into ``dest``."""
    original, elements = record.cast_from.record, record.cast_from.dtype  # type: ignore[union-attr]
    return (original.data_offset, original.nbytes // elements.itemsize, elements.name, record.dtype.name, dest)


def allocate_bytes(nbytes: int, record: StorageRecord | None = None) -> torch.Tensor:
    try:
        return torch.empty(nbytes, dtype=torch.uint8)
    except RuntimeError as exc:
        what = f" for storage '{record.key}'" if record is not None else ""
        raise CheckpointError(
            f"cannot allocate {nbytes} bytes{what}: {exc}", record=record.record if record else None
        ) from None


def inflate_into(source: Source, record: StorageRecord, start: int, dest: memoryview) -> None:
    """Inflate bytes ``[start, start + len(dest))`` of ``record`` into ``dest``."""
    at = 0
    for chunk in iter_inflated(
        source, record.data_offset, record.stored_size, start, start + len(dest), record.record,
        declared=record.record_size,
    ):
        dest[at : at + len(chunk)] = chunk
        at += len(chunk)
