"""How a process group splits a load's fill jobs: regions of destination memory, cut into N
equal contiguous stretches (one per rank, in file order) and packed into batches, each of
which one broadcast carries. Pure planning: nothing here reads or communicates."""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..index.records import METHOD_DEFLATE
from ..index.source import Source
from .cpu import CopyJob
from .fill_jobs import FillJobs

if TYPE_CHECKING:
    from .._backend import Backend


@dataclass
class Region:
    source: int  # which of the move's sources the job reads
    kind: str  # "host", "cast" or "device"
    job: Any
    dest: torch.Tensor  # the contiguous bytes the job fills

    @property
    def nbytes(self) -> int:
        return int(self.dest.numel())

    @property
    def file_offset(self) -> int:
        """Where the job starts reading (in the record's bytes, for a deflate record)."""
        if self.kind == "host":
            return self.job.record.data_offset + self.job.start
        return self.job[1][0]


@dataclass
class Batch:
    owner: int
    regions: list[Region]
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def nbytes(self) -> int:
        return sum(region.nbytes for region in self.regions)


def regions_of(source: int, jobs: FillJobs) -> list[Region]:
    """Every job as the region of destination memory it fills."""
    regions = [Region(source, "host", job, job.dest) for job in jobs.host]
    for device, cast_jobs in jobs.cast.items():
        regions += [Region(source, "cast", (device, job), job[4]) for job in cast_jobs]
    for device, pieces in jobs.device.items():
        regions += [Region(source, "device", (device, piece), piece[2][piece[3] : piece[3] + piece[1]]) for piece in pieces]
    return regions


def _cut(regions: list[Region], world: int, chunk: int) -> list[tuple[int, Region]]:
    """Regions cut at most ``chunk`` bytes long and at the byte positions that split the total
    into ``world`` equal shares; each with its owner, the rank whose share it starts in."""
    total = sum(region.nbytes for region in regions)
    bounds = [rank * total // world for rank in range(1, world)] + [total]
    out: list[tuple[int, Region]] = []
    seen = 0
    for region in regions:
        start, end, at = seen, seen + region.nbytes, 0
        seen = end
        unit = _cut_unit(region)
        while start + at < end:
            owner = next(rank for rank, bound in enumerate(bounds) if bound > start + at)
            stop = min(end - start, at + chunk, bounds[owner] - start)
            if unit == 0:
                stop = end - start
            elif stop < end - start:  # a cut inside: at a whole unit, past ``at``
                stop = max(at + unit, stop - (stop - at) % unit)
            out.append((owner, _piece(region, at, stop)))
            at = stop
    return out


def _cut_unit(region: Region) -> int:
    """The granularity a region can be cut at (0: not at all)."""
    if region.kind == "host":
        return 0 if region.job.record.method == METHOD_DEFLATE else 1  # inflation starts at the start
    if region.kind == "cast":
        return _itemsize(region.job[1][3])  # whole output elements
    return 1


def _piece(region: Region, first: int, stop: int) -> Region:
    """Bytes ``[first, stop)`` of a region's destination, with the job that fills them."""
    if first == 0 and stop == region.nbytes:
        return region
    dest = region.dest[first:stop]
    if region.kind == "host":
        return Region(region.source, "host", CopyJob(region.job.record, region.job.start + first, dest), dest)
    device, job = region.job
    if region.kind == "cast":
        offset, _, source_dtype, target_dtype, _ = job
        out_width = _itemsize(target_dtype)
        count = (stop - first) // out_width
        moved = (offset + first // out_width * _itemsize(source_dtype), count, source_dtype, target_dtype, dest)
        return Region(region.source, "cast", (device, moved), dest)
    offset, _, whole, dest_at = job
    return Region(region.source, "device", (device, (offset + first, stop - first, whole, dest_at + first)), dest)


def _itemsize(dtype_name: str) -> int:
    from ..index.symbols import DTYPES

    return DTYPES[dtype_name].itemsize


# Regions under chunk / PACK_FRACTION bytes travel packed: one broadcast per small tensor
# would cost more than it carries, and a copy in and out of staging costs little for them.
PACK_FRACTION = 32


def batches_of(regions: list[Region], world: int, chunk: int) -> list[Batch]:
    """Consecutive small regions of one owner, source and device packed into batches of at
    most ``chunk`` bytes, the others alone, in file order."""
    batches: list[Batch] = []
    for owner, region in _cut(regions, world, chunk):
        last = batches[-1] if batches else None
        small = region.nbytes < chunk // PACK_FRACTION
        if (
            small
            and last is not None
            and last.owner == owner
            and last.regions[-1].nbytes < chunk // PACK_FRACTION
            and last.regions[-1].source == region.source
            and last.regions[-1].dest.device == region.dest.device
            and last.nbytes + region.nbytes <= chunk
        ):
            last.regions.append(region)
        else:
            batches.append(Batch(owner, [region]))
    return batches


def run_regions(regions: list[Region], sources: list[Source], backend: Backend, ring: Any) -> None:
    by_source: dict[int, FillJobs] = {}
    for region in regions:
        jobs = by_source.setdefault(region.source, FillJobs())
        if region.kind == "host":
            jobs.host.append(region.job)
        elif region.kind == "cast":
            jobs.add_cast(*region.job)
        else:
            jobs.add_device(*region.job)
    for at, jobs in by_source.items():
        jobs.run(sources[at], backend, ring)


def plan_digest(regions: list[Region]) -> tuple[int, int, int]:
    digest = 0
    for region in regions:
        line = f"{region.source}:{region.kind}:{region.file_offset}:{region.nbytes}\n"
        digest = zlib.crc32(line.encode(), digest)
    return len(regions), sum(region.nbytes for region in regions), digest
