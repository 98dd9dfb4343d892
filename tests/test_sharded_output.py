"""convert --max-shard-size: Hugging Face sharded directories (safetensors or pt shards), packed
greedily in key order with an exact weight map and total size, written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import factory
import pytest
import torch
from compare import assert_same
from safetensors import safe_open
from safetensors.torch import load_file

import pyckpt
from pyckpt.sinks import sharded_writer
from pyckpt.sinks.sharded_writer import pack_shards, parse_size


def _source(tmp_path, width=8) -> tuple[str, dict[str, torch.Tensor]]:
    state_dict = factory.dp_state_dict(factory.seeded_net(width=width))
    path = factory.save(state_dict, tmp_path / "src.pt")
    reference = {key.removeprefix("module."): value for key, value in torch.load(path, weights_only=True).items()}
    return path, reference


def assert_same_values(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Key by key: safetensors keeps no sharing, so tied weights come back as two tensors."""
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert_same({key: tensor}, {key: got[key]})


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def test_sharded_safetensors(backend, tmp_path):
    src, reference = _source(tmp_path, width=16)
    limit = 600
    report = pyckpt.convert(src, tmp_path / "out", max_shard_size=limit)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(name for name in os.listdir(tmp_path / "out") if name.endswith(".safetensors"))
    count = len(shards)
    assert count > 2 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    held: dict[str, str] = {}
    for name in shards:
        with safe_open(tmp_path / "out" / name, "pt") as f:
            keys = list(f.keys())
        size = sum(_nbytes(reference[key]) for key in keys)
        assert size <= limit or len(keys) == 1, (name, size)  # over the limit only alone
        held.update((key, name) for key in keys)
    assert index["weight_map"] == {key: held[key] for key in reference}  # exact, in key order
    assert list(index["weight_map"]) == list(reference)
    assert index["metadata"]["total_size"] == sum(_nbytes(t) for t in reference.values()) == report.tensor_bytes
    # greedy in key order: each shard's first tensor would not have fit in the one before
    order = list(reference)
    for before, after in zip(shards, shards[1:]):
        first_after = next(key for key in order if held[key] == after)
        size_before = sum(_nbytes(reference[key]) for key in order if held[key] == before)
        assert size_before + _nbytes(reference[first_after]) > limit
    merged = {}
    for name in shards:
        merged.update(load_file(tmp_path / "out" / name))
    assert_same_values(reference, {key: merged[key] for key in reference})
    assert_same_values(reference, dict(pyckpt.load(tmp_path / "out")))


def test_sharded_pt_keeps_tied_weights_in_one_shard(backend, tmp_path):
    src, reference = _source(tmp_path, width=16)
    pyckpt.convert(src, tmp_path / "out", max_shard_size=700, format="pt")
    index = json.loads((tmp_path / "out" / "pytorch_model.bin.index.json").read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == list(reference)
    assert weight_map["embed.weight"] == weight_map["head.weight"]  # tied in seeded_net
    shard = torch.load(tmp_path / "out" / weight_map["embed.weight"], weights_only=True)
    assert shard["embed.weight"].untyped_storage().data_ptr() == shard["head.weight"].untyped_storage().data_ptr()
    shards = {name for name in os.listdir(tmp_path / "out") if name.endswith(".bin")}
    assert len(shards) > 1 and set(weight_map.values()) == shards
    stored = 0
    for name in shards:
        part = torch.load(tmp_path / "out" / name, weights_only=True)
        assert set(part) == {key for key, file in weight_map.items() if file == name}
        stored += sum(s.nbytes() for s in {id(t.untyped_storage()): t.untyped_storage() for t in part.values()}.values())
    assert index["metadata"]["total_size"] == stored
    assert_same(reference, dict(pyckpt.load(tmp_path / "out")))


def test_one_shard_is_written_without_an_index(backend, tmp_path):
    src, reference = _source(tmp_path)
    pyckpt.convert(src, tmp_path / "out", max_shard_size="5GB")
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    assert_same_values(reference, {key: load_file(tmp_path / "out" / "model.safetensors")[key] for key in reference})


def test_sharded_output_loads_into_a_model(backend, tmp_path):
    src, _ = _source(tmp_path, width=16)
    pyckpt.convert(src, tmp_path / "out", max_shard_size=500)
    model = factory.seeded_net(seed=5, width=16)
    pyckpt.load_state_dict(model, tmp_path / "out")
    assert_same(factory.seeded_net(width=16).state_dict(), model.state_dict())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5KB") == 1500
    assert parse_size(123) == 123
    for bad in ("5 parsecs", "-1", "0", "GB", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_pack_shards_greedy_in_order():
    groups = [(["a"], 4), (["b"], 4), (["c"], 3), (["big"], 20), (["d"], 1), (["e", "f"], 9)]
    assert pack_shards(groups, 10) == [["a", "b"], ["c"], ["big"], ["d", "e", "f"]]
    assert pack_shards([], 10) == [[]]


def test_failure_leaves_nothing_and_keeps_an_old_destination(backend, tmp_path, monkeypatch):
    src, reference = _source(tmp_path, width=16)
    real = sharded_writer.write_safetensors
    calls = []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(sharded_writer, "write_safetensors", failing_second)
    with pytest.raises(OSError, match="No space left"):
        pyckpt.convert(src, tmp_path / "out", max_shard_size=500)
    assert sorted(os.listdir(tmp_path)) == ["src.pt"]  # no destination, no temporary directory
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep").write_text("old")
    calls.clear()
    with pytest.raises(OSError):
        pyckpt.convert(src, tmp_path / "old", max_shard_size=500, overwrite=True)
    assert os.listdir(tmp_path / "old") == ["keep"] and sorted(os.listdir(tmp_path)) == ["old", "src.pt"]
    monkeypatch.setattr(sharded_writer, "write_safetensors", real)
    with pytest.raises(FileExistsError):
        pyckpt.convert(src, tmp_path / "old", max_shard_size=500)
    pyckpt.convert(src, tmp_path / "old", max_shard_size=500, overwrite=True)
    assert "keep" not in os.listdir(tmp_path / "old") and sorted(os.listdir(tmp_path)) == ["old", "src.pt"]
    assert_same_values(reference, dict(pyckpt.load(tmp_path / "old")))


def test_command_line(backend, tmp_path):
    src, reference = _source(tmp_path, width=16)
    env = {**os.environ, **({"PYCKPT_DISABLE_EXT": "1"} if backend == "python" else {})}
    done = subprocess.run([sys.executable, "-m", "pyckpt", "convert", src, str(tmp_path / "hf"), "--max-shard-size",
                           "1KB"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "(safetensors, sharded)" in done.stderr
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert_same_values(reference, dict(pyckpt.load(tmp_path / "hf")))
    bad = subprocess.run([sys.executable, "-m", "pyckpt", "convert", src, str(tmp_path / "x"), "--max-shard-size",
                          "lots"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "shard size must be" in bad.stderr and not (tmp_path / "x").exists()


def test_a_failed_flush_fails_the_conversion_and_leaks_nothing(backend, tmp_path, monkeypatch):
    """Shards are fsynced on a background thread while the next is written: an fsync error
    there must still fail the conversion, leave nothing at DST and close every descriptor."""
    src, _ = _source(tmp_path, width=16)
    real_fsync = os.fsync
    calls = []

    def failing_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(sharded_writer.os, "fsync", failing_second)
    with pytest.raises(OSError, match="Input/output error"):
        pyckpt.convert(src, tmp_path / "out", max_shard_size=500)
    monkeypatch.setattr(sharded_writer.os, "fsync", real_fsync)
    assert len(calls) >= 2
    assert sorted(os.listdir(tmp_path)) == ["src.pt"]
    assert set(os.listdir("/proc/self/fd")) <= before
