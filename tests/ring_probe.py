"""What the fill jobs send through the native ring to CUDA, on a GPU and without one.

``ring_bytes`` counts the bytes of real ring copies. Without a GPU, ``LooksLikeCuda`` is host
memory that says it is on cuda:0, so planning takes the CUDA path, and ``ring_on_the_host``
runs the ring pieces planned for it through the ring's CPU transfer, which moves the same
spans through the same pinned buffers and reader threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def ring_bytes(monkeypatch: Any) -> list[int]:
    """Bytes of each batch of pieces the fill jobs send through the ring, as they send them."""
    from pyckpt.execute import fill_jobs

    sent: list[int] = []
    real = fill_jobs.copy_pieces

    def counting(ring: Any, source: Any, pieces: Any, device: torch.device, config: Any) -> Any:
        sent.append(sum(length for _, length, _, _ in pieces))
        return real(ring, source, pieces, device, config)

    monkeypatch.setattr(fill_jobs, "copy_pieces", counting)
    return sent


class LooksLikeCuda:
    def __init__(self, memory: torch.Tensor) -> None:
        self.memory = memory
        self.device = torch.device("cuda", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.memory, name)


@contextlib.contextmanager
def ring_on_the_host(buffer_bytes: int = 64) -> Iterator[list[int]]:
    """Yields the bytes of each batch of ring pieces as the fill jobs send them."""
    from pyckpt.execute import fill_jobs
    from pyckpt.execute.device import RingConfig

    real_copy, real_device, sent = fill_jobs.copy_pieces, torch.cuda.device, []

    def on_the_host(ring: Any, source: Any, pieces: Any, device: torch.device, config: Any) -> Any:
        assert device == torch.device("cuda", 0), device
        sent.append(sum(length for _, length, _, _ in pieces))
        return real_copy(ring, source, pieces, torch.device("cpu"), RingConfig(buffer_bytes=buffer_bytes, buffers=2))

    fill_jobs.copy_pieces, torch.cuda.device = on_the_host, lambda device: contextlib.nullcontext()
    try:
        yield sent
    finally:
        fill_jobs.copy_pieces, torch.cuda.device = real_copy, real_device


def skeleton_fills(skeleton: Any) -> dict[str, tuple[torch.Tensor, LooksLikeCuda]]:
    """For each tensor of a ``DcpSkeleton``, by its key: its placeholder and a CUDA-looking
    destination, filled with 7 so that bytes left unwritten show."""
    return {key: (placeholder, LooksLikeCuda(torch.full(placeholder.shape, 7, dtype=placeholder.dtype)))
            for placeholder, _, key in skeleton.tensors.values()}
