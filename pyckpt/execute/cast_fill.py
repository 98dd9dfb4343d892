"""Checkpoint elements cast straight into existing memory of another floating-point dtype:
an fp32 checkpoint into a bf16 model, with no host copy of the checkpoint's tensors.

On the host the native core reads and casts a chunk at a time into the parameter itself.
For CUDA parameters each chunk is cast on the host into one of two reused pinned buffers
and copied to the device while the next chunk is cast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..index.source import Source
from ..index.symbols import DTYPES

if TYPE_CHECKING:
    from .._backend import Backend, CastJob

DEVICE_CHUNK_BYTES = 32 << 20  # of cast output per pinned buffer


def cast_into_device(source: Source, jobs: list[CastJob], device: torch.device, backend: Backend) -> None:
    """Each ``(offset, count, source dtype, target dtype, dest)`` with ``dest`` the contiguous
    bytes of a tensor on ``device``."""
    if not jobs:
        return
    buffers = [torch.empty(DEVICE_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    in_flight: list[torch.cuda.Event | None] = [None, None]
    turn = 0
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        for offset, count, source_dtype, target_dtype, dest in jobs:
            width, out_width = DTYPES[source_dtype].itemsize, DTYPES[target_dtype].itemsize
            step = DEVICE_CHUNK_BYTES // out_width
            for first in range(0, count, step):
                n = min(step, count - first)
                event = in_flight[turn]
                if event is not None:
                    event.synchronize()  # the copy out of this buffer is done: it may be refilled
                host = buffers[turn][: n * out_width]
                backend.cast_into(source, [(offset + first * width, n, source_dtype, target_dtype, host)])
                dest[first * out_width : (first + n) * out_width].copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                in_flight[turn] = event
                turn = 1 - turn
        stream.synchronize()
