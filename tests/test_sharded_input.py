"""Sharded Hugging Face checkpoints (a directory with a weight-map index, or the index file
itself) as input to load and load_state_dict: one flat state dict in the index's order,
equal to loading every shard with its own library and merging; renaming and its collision
errors span the shards; every lie of the index is a CheckpointError naming the file."""

from __future__ import annotations

import os

import factory
import pytest
import torch
from compare import assert_same
from safetensors.torch import load_file, save_file
from sharded_cases import lying_sharded_checkpoints, rewrite_index, write_sharded
from torch import nn

import pyckpt


def dp_state_dict() -> dict[str, torch.Tensor]:
    return factory.dp_state_dict(factory.seeded_net())


def _thirds(keys: list[str]) -> list[list[str]]:
    return [keys[0::3], keys[1::3], keys[2::3]]  # interleaved: a shard's keys are not a run


@pytest.mark.parametrize("kinds", [["safetensors"] * 3, ["bin"] * 3, ["safetensors", "bin", "safetensors"]])
def test_load_merges_the_shards_in_index_order(backend, tmp_path, kinds):
    state_dict = dp_state_dict()
    index = write_sharded(tmp_path / "m", state_dict, shard_keys=_thirds(list(state_dict)), kinds=kinds)
    expected: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(tmp_path / "m")):
        path = str(tmp_path / "m" / name)
        if name.endswith(".safetensors"):
            expected.update(load_file(path))
        elif name.endswith(".bin"):
            expected.update(torch.load(path, weights_only=True))
    expected = {key: expected[key] for key in state_dict}  # the index's order
    for f in (tmp_path / "m", index, str(index)):
        got = pyckpt.load(f)
        assert list(got) == list(state_dict)
        assert_same(expected, dict(got))
    stripped = pyckpt.load(tmp_path / "m", strip_prefix="auto")
    assert list(stripped) == [key.removeprefix("module.") for key in state_dict]


def test_directory_with_one_file(backend, tmp_path):
    state_dict = dp_state_dict()
    (tmp_path / "st").mkdir()
    save_file({k: v.clone() for k, v in state_dict.items()}, tmp_path / "st" / "model.safetensors")
    (tmp_path / "pt").mkdir()
    torch.save(state_dict, tmp_path / "pt" / "pytorch_model.bin")
    assert_same(load_file(tmp_path / "st" / "model.safetensors"), dict(pyckpt.load(tmp_path / "st")))
    assert_same(torch.load(tmp_path / "pt" / "pytorch_model.bin", weights_only=True), pyckpt.load(tmp_path / "pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(pyckpt.CheckpointError, match="directory holds no checkpoint"):
        pyckpt.load(tmp_path / "empty")


@pytest.mark.parametrize("kinds", [["safetensors"] * 3, ["bin", "safetensors", "bin"]])
def test_load_state_dict_from_shards(backend, tmp_path, kinds):
    source = factory.seeded_net(seed=1)
    state_dict = factory.dp_state_dict(source)
    write_sharded(tmp_path / "m", state_dict, shard_keys=_thirds(list(state_dict)), kinds=kinds)
    model = factory.seeded_net(seed=2)
    result = pyckpt.load_state_dict(model, tmp_path / "m")
    assert not result.missing_keys and not result.unexpected_keys
    assert_same(source.state_dict(), model.state_dict())
    partial = factory.seeded_net(seed=3)
    keys = list(state_dict)
    write_sharded(tmp_path / "part", state_dict, shard_keys=[keys[:2], keys[2:4]], kinds=kinds[:2])
    result = pyckpt.load_state_dict(partial, tmp_path / "part", strict=False)
    reference = factory.seeded_net(seed=3)
    expected = reference.load_state_dict({k.removeprefix("module."): state_dict[k] for k in keys[:4]}, strict=False)
    assert sorted(result.missing_keys) == sorted(expected.missing_keys) and expected.missing_keys
    assert_same(reference.state_dict(), partial.state_dict())


def test_renaming_collisions_span_the_shards(backend, tmp_path):
    state_dict = {"module.w": torch.ones(2), "w": torch.zeros(2)}
    write_sharded(tmp_path / "m", state_dict, shard_keys=[["module.w"], ["w"]], kinds=["safetensors"] * 2)
    with pytest.raises(pyckpt.CheckpointError, match="module.w") as caught:
        pyckpt.load(tmp_path / "m", strip_prefix="auto")
    assert "'w'" in str(caught.value)


def test_lying_index_is_refused(backend, tmp_path):
    model = nn.Sequential()
    for name, (directory, message) in lying_sharded_checkpoints(tmp_path).items():
        for call in (lambda: pyckpt.load(directory), lambda: pyckpt.load_state_dict(model, directory, strict=False)):
            with pytest.raises(pyckpt.CheckpointError) as caught:
                call()
            assert message in str(caught.value), f"{name}: {caught.value}"
            assert str(directory) in str(caught.value), f"{name}: the message does not name the file: {caught.value}"


def test_duplicate_keys_in_the_index(backend, tmp_path):
    index = write_sharded(tmp_path / "m", {"a": torch.ones(1)}, shard_keys=[["a"]], kinds=["safetensors"])
    text = open(index).read().replace('"weight_map": {', '"weight_map": {"a": "model-00001-of-00001.safetensors", ', 1)
    open(index, "w").write(text)
    with pytest.raises(pyckpt.CheckpointError, match="index names 'a' twice"):
        pyckpt.load(tmp_path / "m")


@pytest.mark.parametrize("output", ["pt", "safetensors", "sharded", "dcp"])
def test_convert_from_shards(backend, tmp_path, output):
    """Each tensor is copied from its own shard into one file, new shards or DCP."""
    state_dict = factory.dp_state_dict(factory.seeded_net(width=16))
    write_sharded(tmp_path / "m", state_dict, shard_keys=_thirds(list(state_dict)), kinds=["bin", "safetensors", "bin"])
    dst = tmp_path / "out"
    kwargs = {"sharded": {"max_shard_size": 2000}, "dcp": {"format": "dcp"}}.get(output, {"format": output})
    report = pyckpt.convert(tmp_path / "m", dst, **kwargs)
    assert report.tensors == len(state_dict) and report.renamed_keys == len(state_dict)
    got = pyckpt.load(dst)
    assert list(got) == [key.removeprefix("module.") for key in state_dict]
    for key, tensor in state_dict.items():
        assert_same({key: tensor}, {key: got[key.removeprefix("module.")]})



def test_inspect_and_verify_a_sharded_directory(backend, tmp_path):
    from pyckpt.inspection import inspect_checkpoint
    from pyckpt.verification import verify_checkpoint

    state_dict = factory.dp_state_dict(factory.seeded_net(width=16))
    index = write_sharded(tmp_path / "m", state_dict, shard_keys=_thirds(list(state_dict)), kinds=["bin", "safetensors", "bin"])
    info = inspect_checkpoint(tmp_path / "m")
    assert info["format"] == "sharded" and info["path"] == index
    assert len(info["files"]) == 3 and all(os.path.dirname(f) == str(tmp_path / "m") for f in info["files"])
    assert info["tensors"] == len(state_dict)
    assert [row["key"] for row in info["table"]] == list(state_dict)
    assert info["tensor_bytes"] == sum(t.numel() * t.element_size() for t in state_dict.values())
    assert info["file_bytes"] == sum(os.path.getsize(f) for f in info["files"])
    assert info["unaligned_storages"] == 0  # safetensors shards map at their natural alignment
    assert info["state_dicts"][0]["auto_strip"]["renamed"] == len(state_dict)
    report = verify_checkpoint(tmp_path / "m")
    assert report.ok and report.format == "sharded" and report.tensors == len(state_dict)
    assert report.records > 0  # the .bin shards' records were CRC-checked
    rewrite_index(index, lambda d: d["weight_map"].update({"module.ghost": d["weight_map"]["module.scale"]}))
    report = verify_checkpoint(tmp_path / "m")
    assert not report.ok and "'module.ghost'" in report.problems[0]


def test_a_shard_that_shrinks_before_its_read_is_named(backend, tmp_path, monkeypatch):
    """The shards' reads run as one pool; an error in one of them still names its file."""
    import pyckpt.model_fill as model_fill

    source = factory.seeded_net(seed=1)
    state_dict = factory.dp_state_dict(source)
    write_sharded(tmp_path / "m", state_dict, shard_keys=_thirds(list(state_dict)), kinds=["safetensors"] * 3)
    shrinking = str(tmp_path / "m" / "model-00002-of-00003.safetensors")
    indexed = model_fill.owners_allowing_direct_fill

    with open(shrinking, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")

    def shrink_then_plan(model):  # planning starts once every shard is indexed, before any read
        os.truncate(shrinking, data_start + 4)  # every tensor of the shard is cut short
        return indexed(model)

    monkeypatch.setattr(model_fill, "owners_allowing_direct_fill", shrink_then_plan)
    with pytest.raises(pyckpt.CheckpointError, match="file shrank while being read") as error:
        pyckpt.load_state_dict(factory.seeded_net(seed=2), tmp_path / "m")
    assert error.value.path == shrinking
    assert str(error.value).startswith(shrinking + ": ")
