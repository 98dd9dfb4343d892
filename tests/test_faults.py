"""A file truncated by another process while pyckpt has it open: paths pyckpt controls read
with pread, so they fail with a CheckpointError instead of dying of SIGBUS."""

from __future__ import annotations

import os

import factory
import pytest
import torch
from torch import nn

import pyckpt
from pyckpt import converting, loading, module_loading, source_loading, verification
from pyckpt.execute.direct import load_direct as real_load_direct
from pyckpt.index import index_checkpoint as real_index_checkpoint
from pyckpt.index import index_opened as real_index_opened

real_storage_span = converting._storage_span


@pytest.fixture
def truncated_after_indexing(monkeypatch):
    """Make every pipeline truncate its input to half right after indexing it."""

    def indexing_then_truncating(f, backend=None, **options):
        index = real_index_checkpoint(f, backend, **options)
        os.truncate(index.source.path, index.source.size // 2)
        return index

    for module in (module_loading, verification):
        monkeypatch.setattr(module, "index_checkpoint", indexing_then_truncating)

    # pyckpt.load indexes a source it opened itself, or reads it in one native pass (which
    # then finds the file truncated and leaves it to the general path).
    def opened_then_truncating(source, backend=None, **options):
        index = real_index_opened(source, backend, **options)
        os.truncate(index.source.path, index.source.size // 2)
        return index

    def truncating_then_direct(source, *args, **options):
        os.truncate(source.path, source.size // 2)
        return real_load_direct(source, *args, **options)

    for module in (loading, source_loading):  # one file by source_loading, a process group's by loading
        monkeypatch.setattr(module, "index_opened", opened_then_truncating)
    monkeypatch.setattr(source_loading, "load_direct", truncating_then_direct)

    # convert reads the zip directory first and starts copying the storages while it
    # indexes: truncated before that copy starts, and (for outputs it writes otherwise)
    # after indexing.
    def span_then_truncating(source, backend):
        span = real_storage_span(source, backend)
        os.truncate(source.path, source.size // 2)
        return span

    monkeypatch.setattr(converting, "_storage_span", span_then_truncating)
    monkeypatch.setattr(converting, "index_opened", opened_then_truncating)


def _checkpoint(tmp_path):
    state = {f"module.layer{i}.weight": torch.randn(256, 256) for i in range(4)}
    return factory.save(state, tmp_path / "ckpt.pt")


class Four(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i in range(4):
            setattr(self, f"layer{i}", nn.Linear(256, 256, bias=False))


def test_load_state_dict(backend, tmp_path, truncated_after_indexing):
    path = _checkpoint(tmp_path)
    with pytest.raises(pyckpt.CheckpointError, match="truncated|shrank") as error:
        pyckpt.load_state_dict(Four(), path)
    assert path in str(error.value)


def test_load_into_owned_memory(backend, tmp_path, truncated_after_indexing):
    with pytest.raises(pyckpt.CheckpointError, match="truncated|shrank"):
        pyckpt.load(_checkpoint(tmp_path), mmap=False)


@pytest.mark.parametrize("name", ["out.pt", "out.safetensors"])
def test_convert(backend, tmp_path, truncated_after_indexing, name):
    destination = tmp_path / name
    with pytest.raises(pyckpt.CheckpointError, match="truncated|shrank"):
        pyckpt.convert(_checkpoint(tmp_path), destination)
    assert not destination.exists()


def test_verify(backend, tmp_path, truncated_after_indexing):
    report = verification.verify_checkpoint(_checkpoint(tmp_path))
    assert not report.ok and any("truncated" in p or "shrank" in p for p in report.problems)
