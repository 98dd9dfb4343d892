"""Every byte a ``load_state_dict`` moves from the file into memory that already exists.

Planning collects them first and runs them in one go, so the same list can be run by one
process alone or shared out among the ranks of a process group (``execute.cooperative``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..index.source import Source
from .cast_fill import cast_into_device
from .cpu import CopyJob, run_copy_jobs
from .device import copy_pieces, ring_config

if TYPE_CHECKING:
    from .._backend import Backend, CastJob

# (file offset, length, destination uint8 tensor, offset into the destination)
DevicePiece = tuple[int, int, torch.Tensor, int]


@dataclass
class FillJobs:
    host: list[CopyJob] = field(default_factory=list)  # into host memory, inflating deflate records
    cast: dict[torch.device, list[CastJob]] = field(default_factory=dict)  # floats cast on the way
    device: dict[torch.device, list[DevicePiece]] = field(default_factory=dict)  # raw, through the CUDA ring

    def add_cast(self, device: torch.device, job: CastJob) -> None:
        self.cast.setdefault(device, []).append(job)

    def add_device(self, device: torch.device, piece: DevicePiece) -> None:
        self.device.setdefault(device, []).append(piece)

    def run(self, source: Source, backend: Backend, ring: Any) -> None:
        with torch.no_grad():
            run_copy_jobs(source, self.host, backend)
            for device, jobs in self.cast.items():
                if device.type == "cpu":
                    backend.cast_into(source, jobs)
                else:
                    cast_into_device(source, jobs, device, backend)
            for device, pieces in self.device.items():
                with torch.cuda.device(device):
                    copy_pieces(ring, source, pieces, device, ring_config())
