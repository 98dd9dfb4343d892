"""Storages on an accelerator: through the native pinned ring where it can, else staged.

The ring (``PYCKPT_RING_BUFFERS`` x ``PYCKPT_RING_MB`` MiB of pinned host memory, 32 x 8
by default) is allocated once per process and reused; ``release_buffers()`` frees it.
``PYCKPT_STREAMS`` (default 2) copies run concurrently while ``PYCKPT_READERS`` threads
(default: one per CPU, at most 16) read the next spans of the file.

The defaults come from ``benchmarks/gpu_ring_sweep.py`` on an H200 with 16 CPUs: reading
from the page cache, not the copy engine, is what limits a load, so many readers on small
buffers beat few on large ones (4 readers on 4 x 64 MiB fed 29% of the pinned bandwidth on
a warm load, 16 on 32 x 8 MiB fed 61%, with the same 256 MiB pinned).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._env import env_positive
from ..errors import announce_fallback
from ..index.checkpoint import CheckpointIndex
from ..index.records import METHOD_STORED, StorageRecord
from ..index.source import FileSource, Source

if TYPE_CHECKING:
    from .._backend import Backend
    from ..plan import StoragePlan


@dataclass(frozen=True)
class RingConfig:
    buffer_bytes: int = 8 << 20
    buffers: int = 32
    streams: int = 2
    readers: int = 16

    def as_dict(self) -> dict[str, int]:
        return {"buffer_bytes": self.buffer_bytes, "buffers": self.buffers, "streams": self.streams, "readers": self.readers}


def ring_config(**overrides: int) -> RingConfig:
    """The ring sizes: arguments first, then environment variables, then defaults."""
    cpus = os.cpu_count() or 1
    config = RingConfig(
        buffer_bytes=env_positive("PYCKPT_RING_MB", RingConfig.buffer_bytes >> 20) << 20,
        buffers=env_positive("PYCKPT_RING_BUFFERS", RingConfig.buffers),
        streams=env_positive("PYCKPT_STREAMS", RingConfig.streams),
        readers=env_positive("PYCKPT_READERS", max(1, min(RingConfig.readers, cpus))),
    )
    fields = {**config.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    return RingConfig(**fields)


def ring_capable(record: StorageRecord) -> bool:
    """Raw bytes in native order: the ring copies them as they are (casts are made on the host)."""
    return record.method == METHOD_STORED and not record.byteswap and record.cast_from is None


_ring_module: Any = None
_ring_reason: str | None = None


def ring_module() -> Any | None:
    """The native ring (``pyckpt._ring``, a torch extension), or None with ``ring_reason()`` set."""
    global _ring_module, _ring_reason
    if _ring_module is None and _ring_reason is None:
        try:
            from .. import _ring  # type: ignore[attr-defined]

            _ring_module = _ring
        except ImportError as exc:
            _ring_reason = f"the extension pyckpt._ring could not be imported: {exc}"
    return _ring_module


def ring_reason() -> str | None:
    ring_module()
    return _ring_reason


def _warn_staged() -> None:
    """No silent fallback: say once why CUDA loads go the slow way (or refuse, if asked to)."""
    announce_fallback(f"pyckpt: loads to CUDA are staged through host memory because {ring_reason()}")


def copy_pieces(
    ring: Any, source: Source, pieces: list[tuple[int, int, torch.Tensor, int]], device: torch.device, config: RingConfig
) -> dict[str, Any]:
    """Run ``(file_offset, length, dest_uint8, dest_offset)`` copies through the native ring."""
    if isinstance(source, FileSource):
        return ring.copy_to_device_fd(source.fd, source.size, pieces, config.as_dict(), str(device))
    return ring.copy_to_device_buffer(source.buffer(), pieces, config.as_dict(), str(device))


def read_to_devices(
    index: CheckpointIndex, plans: list[StoragePlan], backend: Backend
) -> dict[str, torch.UntypedStorage]:
    """Storages on accelerator devices: CUDA ones through the native pinned ring (native
    backend), anything else staged one storage at a time through host memory, so host memory
    holds one staged storage, not the checkpoint."""
    from torch.serialization import default_restore_location

    from .cpu import read_storages

    result: dict[str, torch.UntypedStorage] = {}
    rest = plans
    if backend.name == "native":
        result, rest = storages_through_ring(index, plans)
    for plan in rest:
        key = plan.record.key
        staged = read_storages(index, [plan.record], backend)
        result[key] = default_restore_location(staged.pop(key), plan.location)
    return result


def storages_through_ring(
    index: CheckpointIndex, plans: list[StoragePlan], config: RingConfig | None = None
) -> tuple[dict[str, torch.UntypedStorage], list[StoragePlan]]:
    """Fresh device storages for the ring-capable plans; returns them and the plans left over
    (all of them when the ring extension is missing: they are then staged through host memory)."""
    ring = ring_module()
    if ring is None:
        if any(plan.device is not None and plan.device.type == "cuda" for plan in plans):
            _warn_staged()
        return {}, list(plans)
    config = config or ring_config()
    result: dict[str, torch.UntypedStorage] = {}
    rest: list[StoragePlan] = []
    by_device: dict[torch.device, list[tuple[int, int, torch.Tensor, int]]] = {}
    for plan in plans:
        device = plan.device
        if device is None or device.type != "cuda" or not ring_capable(plan.record):
            rest.append(plan)
            continue
        device, piece = ring_piece(plan)
        by_device.setdefault(device, []).append(piece)
        result[plan.record.key] = piece[2].untyped_storage()
    for device, pieces in by_device.items():
        with torch.cuda.device(device):
            copy_pieces(ring, index.source, pieces, device, config)
    return result, rest


def ring_piece(plan: StoragePlan) -> tuple[torch.device, tuple[int, int, torch.Tensor, int]]:
    """A fresh buffer on a CUDA plan's device, and the ring piece that fills it with the record."""
    from torch.serialization import validate_cuda_device  # torch's own error when CUDA is absent

    device = torch.device("cuda", validate_cuda_device(plan.location))
    dest = torch.empty(plan.record.nbytes, dtype=torch.uint8, device=device)
    return device, (plan.record.data_offset, plan.record.nbytes, dest, 0)


def release_buffers() -> None:
    """Free the pinned ring the native CUDA path keeps for the next load."""
    ring = ring_module()
    if ring is not None:
        ring.release_ring()
