"""Loading on a process group: each rank reads about 1/N of the bytes, and the ranks share
them with broadcasts on the group's own backend (gloo for host memory, NCCL for CUDA).

The fill jobs of a load are cut into regions of destination memory (at most one chunk
each) and the regions into N contiguous stretches of equal bytes, one per rank, so each
rank reads one stretch of the file in order. A reader thread per rank fills its own
regions while the main thread broadcasts them all, in file order, so reading, host-to-device
copies and communication overlap. A region alone in its batch (a chunk of a big tensor:
most of the bytes) is broadcast out of and into the parameters' own memory; runs of small
ones travel packed in staging buffers, at most ``PYCKPT_GROUP_INFLIGHT`` (default 4) of
``PYCKPT_GROUP_CHUNK_MB`` MiB (default 32) alive per rank.

Failure never leaves a rank waiting in a collective: every rank makes the same calls in
the same order whatever happens. The ranks first agree on the files (sizes and the CRCs
in their indexes) and on the plan; a rank that failed before that reports it there. A
read that fails during the exchange is remembered and the exchange goes on (with bytes
nobody will use); after it the ranks compare outcomes again, and all of them raise. Only
the exchange's own failures (a broken connection, no memory for a staging buffer) are left
to the group's timeout, as any collective's are."""

from __future__ import annotations

import contextlib
import threading
import zlib
from typing import TYPE_CHECKING, Any

import torch

from .._env import env_positive
from ..errors import CheckpointError
from ..index.checkpoint import CheckpointIndex
from ..index.source import Source
from .fill_jobs import FillJobs
from .group_plan import Batch, Region, batches_of, plan_digest, regions_of, run_regions

if TYPE_CHECKING:
    from .._backend import Backend


def group_chunk_bytes() -> int:
    return env_positive("PYCKPT_GROUP_CHUNK_MB", 32) << 20


def group_inflight() -> int:
    return env_positive("PYCKPT_GROUP_INFLIGHT", 4)


def check_process_group(process_group: Any) -> Any:
    """The group to load on, or None; torch.distributed is imported only when one is given."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given, but torch.distributed is not initialised")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, not {type(process_group).__name__}")
    return process_group


def fingerprint(index: CheckpointIndex) -> tuple[int, int]:
    """What must match across ranks: the file's size, and a CRC over its index (each record's
    place, size and CRC-32)."""
    digest = 0
    for key in sorted(index.storages):
        record = index.storages[key]
        line = f"{key}:{record.data_offset}:{record.nbytes}:{record.stored_size}:{record.crc32}\n"
        digest = zlib.crc32(line.encode(), digest)
    return index.source.size, digest


class GroupLoad:
    """One load on a process group; use as a context manager around the whole load, so a
    rank that fails anywhere still takes its part in the agreement."""

    def __init__(self, group: Any, backend: Backend) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = backend
        self.ring: Any = None
        self.settled = False  # every rank knows the outcome: no more collectives
        self.read_error: str | None = None
        self.staging: dict[torch.device, list[torch.Tensor]] = {}

    def __enter__(self) -> GroupLoad:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self.settled or self.world == 1:
            return False
        self.settled = True
        status = _describe(exc) if exc is not None else self.read_error
        outcomes = self._gather((status, None))
        failures = [(rank, error) for rank, (error, _) in enumerate(outcomes) if error is not None]
        if exc is not None or not failures:
            return False
        raise _group_failure(failures)

    def share(self, files: list[tuple[Source, tuple[int, int]]], jobs: list[FillJobs], ring: Any = None) -> None:
        """Agree on the files and the plan, then fill every job's memory on every rank, each
        rank reading its share. ``files`` pairs each source with its ``fingerprint``; ``ring``:
        the native CUDA ring, for jobs into device memory."""
        self.ring = ring
        if self.world == 1:  # nobody to agree with or share among
            for (source, _), file_jobs in zip(files, jobs):
                file_jobs.run(source, self.backend, ring)
            return
        regions = [region for at, file_jobs in enumerate(jobs) for region in regions_of(at, file_jobs)]
        plan = plan_digest(regions)
        outcomes = self._gather((None, ([print_ for _, print_ in files], plan)))
        failures = [(rank, error) for rank, (error, _) in enumerate(outcomes) if error is not None]
        refusal = _group_failure(failures) if failures else _difference(
            [facts for _, facts in outcomes], [source.display for source, _ in files]
        )
        if refusal is not None:  # every rank saw the same outcomes, so every rank raises this
            self.settled = True
            raise refusal
        self._exchange([source for source, _ in files], regions)

    def _gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, value, group=self.group)
        return out

    def _exchange(self, sources: list[Source], regions: list[Region]) -> None:
        batches = batches_of(regions, self.world, group_chunk_bytes())
        mine = [batch for batch in batches if batch.owner == self.rank]
        # CUDA streams are per thread: the reader's copies must be ordered on the stream this
        # thread broadcasts and copies on, not on the reader thread's default stream.
        devices = {region.dest.device for batch in mine for region in batch.regions if region.dest.device.type == "cuda"}
        streams = [torch.cuda.current_stream(device) for device in devices]
        reader = threading.Thread(target=self._read, args=(sources, mine, streams), name="pyckpt-group-reader", daemon=True)
        reader.start()
        pending: list[tuple[Any, Batch, torch.Tensor | None]] = []
        try:
            for batch in batches:
                if batch.owner == self.rank:
                    batch.ready.wait()
                buffer = self._outgoing(batch)
                tensor = buffer if buffer is not None else batch.regions[0].dest
                source_rank = self.dist.get_global_rank(self.group, batch.owner)
                work = self.dist.broadcast(tensor, src=source_rank, group=self.group, async_op=True)
                pending.append((work, batch, buffer))
                while len(pending) > group_inflight():
                    self._finish(*pending.pop(0))
            while pending:
                self._finish(*pending.pop(0))
        finally:
            reader.join()

    def _outgoing(self, batch: Batch) -> torch.Tensor | None:
        """The staging buffer a packed batch travels in (None: its one region goes as it is)."""
        if len(batch.regions) == 1:
            return None
        buffer = self._staging(batch.regions[0].dest.device)[: batch.nbytes]
        if batch.owner == self.rank:
            torch.cat([region.dest for region in batch.regions], out=buffer)
        return buffer

    def _staging(self, device: torch.device) -> torch.Tensor:
        """The next of ``inflight + 1`` staging buffers of this device, reused in turn: a buffer
        is taken again only after the broadcast that used it finished (``_finish`` runs before
        more than ``inflight`` are pending)."""
        pool = self.staging.setdefault(device, [])
        if len(pool) <= group_inflight():
            pool.append(torch.empty(group_chunk_bytes(), dtype=torch.uint8, device=device))
            return pool[-1]
        pool.append(pool.pop(0))
        return pool[-1]

    def _finish(self, work: Any, batch: Batch, buffer: torch.Tensor | None) -> None:
        work.wait()
        if buffer is None or batch.owner == self.rank:
            return
        at = 0
        with torch.no_grad():
            for region in batch.regions:
                region.dest.copy_(buffer[at : at + region.nbytes])
                at += region.nbytes

    def _read(self, sources: list[Source], batches: list[Batch], streams: list[Any]) -> None:
        """This rank's share, in file order, on the exchanging thread's CUDA ``streams``; an
        error is kept for the final agreement and the remaining batches are released unread,
        so the exchange runs to its end."""
        with contextlib.ExitStack() as on_streams:
            try:
                for stream in streams:
                    on_streams.enter_context(torch.cuda.stream(stream))
            except BaseException as exc:  # noqa: BLE001 - reported to every rank
                self.read_error = _describe(exc)
            for batch in batches:
                if self.read_error is None:
                    try:
                        run_regions(batch.regions, sources, self.backend, self.ring)
                    except BaseException as exc:  # noqa: BLE001 - reported to every rank
                        self.read_error = _describe(exc)
                batch.ready.set()


def _difference(facts: list[Any], names: list[str]) -> CheckpointError | None:
    """How a rank's files or plan differ from rank 0's, if they do."""
    first_prints, first_plan = facts[0]
    for rank, (prints, plan) in enumerate(facts[1:], start=1):
        if len(prints) != len(first_prints):
            return CheckpointError(f"rank {rank} loads {len(prints)} files, rank 0 loads {len(first_prints)}")
        for name, (size, digest), (size_0, digest_0) in zip(names, prints, first_prints):
            if size != size_0:
                return CheckpointError(f"rank {rank}'s copy is {size} bytes, rank 0's is {size_0} bytes", path=name)
            if digest != digest_0:
                return CheckpointError(
                    f"rank {rank}'s copy differs from rank 0's: the records or CRC-32s in their indexes differ",
                    path=name,
                )
        if plan != first_plan:
            return CheckpointError(
                f"rank {rank} would load {plan[1]} bytes in {plan[0]} pieces, rank 0 {first_plan[1]} in "
                f"{first_plan[0]}, or other bytes: a process group's ranks must hold the same tensors (for DTensor "
                "models, pass the group of replicas, such as HSDP's replicate dimension)"
            )
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _group_failure(failures: list[tuple[int, str]]) -> CheckpointError:
    said = "; ".join(f"rank {rank}: {error}" for rank, error in failures)
    return CheckpointError(f"the load failed on {len(failures)} rank(s) of the process group: {said}")
