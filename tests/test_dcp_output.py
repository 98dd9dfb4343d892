"""convert --format dcp: a torch.distributed.checkpoint directory that dcp.load reads with no
process group, laid out as torch's own dcp.save lays out the same state."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings

import factory
import pytest
import torch
import torch.distributed.checkpoint as dcp
from compare import assert_same
from safetensors.torch import save_file

import pyckpt
from pyckpt.sinks import dcp_writer


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dcp: "assuming the intent is to ... in a single process"
        yield


def _state():
    return {
        "model": factory.dp_state_dict(factory.seeded_net()),
        "epoch": 3,
        "extras": [torch.arange(3), {"x": torch.ones(2, dtype=torch.bfloat16)}],
        "name": "run",
    }


def _stripped(obj):
    from pyckpt.rename import make_key_map, rename_tree

    return rename_tree(obj, make_key_map("auto", None))


def _zeros_like(tree):
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {key: _zeros_like(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_zeros_like(value) for value in tree]
    return None if isinstance(tree, (int, str)) else tree


def _metadata(directory):
    with open(os.path.join(directory, ".metadata"), "rb") as f:
        return pickle.load(f)  # written by the code under test or by torch, in this test


def test_dcp_load_reads_the_output(backend, tmp_path):
    src = factory.save(_state(), tmp_path / "src.pt")
    expected = _stripped(torch.load(src, weights_only=True))
    report = pyckpt.convert(src, tmp_path / "out", format="dcp")
    assert sorted(os.listdir(tmp_path / "out")) == [".metadata", "__0_0.distcp"]
    assert report.format == "dcp" and report.tensors == 12
    template = _zeros_like(expected)
    dcp.load(template, checkpoint_id=str(tmp_path / "out"))
    for key, tensor in expected["model"].items():
        assert_same({key: tensor}, {key: template["model"][key]})
    assert torch.equal(template["extras"][0], expected["extras"][0])
    assert torch.equal(template["extras"][1]["x"], expected["extras"][1]["x"])
    # torch's own dcp.save of the same state: the same flat keys, paths and kinds of entry
    dcp.save(expected, checkpoint_id=str(tmp_path / "torch"))
    ours, theirs = _metadata(tmp_path / "out"), _metadata(tmp_path / "torch")
    assert ours.planner_data == theirs.planner_data
    assert list(ours.state_dict_metadata) == list(theirs.state_dict_metadata)
    for key, entry in theirs.state_dict_metadata.items():
        assert type(ours.state_dict_metadata[key]) is type(entry), key
        if hasattr(entry, "size"):
            assert ours.state_dict_metadata[key].size == entry.size
            assert ours.state_dict_metadata[key].properties.dtype == entry.properties.dtype
    assert ours.state_dict_metadata == theirs.state_dict_metadata  # properties, sizes, chunks: all of it
    assert ours.storage_data.keys() == theirs.storage_data.keys()  # MetadataIndex: key and offset (torch orders them otherwise)
    assert all(type(info).__name__ == "_StorageInfo" and info.relative_path == "__0_0.distcp" and info.length > 0
               for info in ours.storage_data.values())
    assert ours.version == theirs.version
    assert type(ours.storage_meta) is type(theirs.storage_meta)
    assert (ours.storage_meta.load_id, ours.storage_meta.modules) == (None, [])
    # and pyckpt reads it back as torch's own converter does
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "out"), tmp_path / "back.pt")
    assert_same(torch.load(tmp_path / "back.pt", weights_only=True), pyckpt.load(tmp_path / "out"))


def test_safetensors_and_state_dict_only_to_dcp(backend, tmp_path):
    net = factory.seeded_net(seed=2)
    st = tmp_path / "m.safetensors"
    save_file({f"module.{k}": v.clone() for k, v in net.state_dict().items()}, st)
    pyckpt.convert(st, tmp_path / "out", format="dcp")
    template = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    dcp.load(template, checkpoint_id=str(tmp_path / "out"))
    for key, tensor in net.state_dict().items():
        assert torch.equal(template[key], tensor), key
    src = factory.save({"model": factory.dp_state_dict(net), "epoch": 1}, tmp_path / "train.pt")
    pyckpt.convert(src, tmp_path / "sd", format="dcp", extract_state_dict=True)
    assert list(_metadata(tmp_path / "sd").state_dict_metadata) == list(net.state_dict())


def test_failure_leaves_nothing(backend, tmp_path, monkeypatch):
    src = factory.save(_state(), tmp_path / "src.pt")
    calls = []
    real = dcp_writer.write_pt

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(dcp_writer, "write_pt", failing)
    with pytest.raises(OSError):
        pyckpt.convert(src, tmp_path / "out", format="dcp")
    assert sorted(os.listdir(tmp_path)) == ["src.pt"]


def test_command_line(backend, tmp_path):
    src = factory.save(_state(), tmp_path / "src.pt")
    env = {**os.environ, **({"PYCKPT_DISABLE_EXT": "1"} if backend == "python" else {})}
    done = subprocess.run([sys.executable, "-m", "pyckpt", "convert", src, str(tmp_path / "ckpt"), "--format", "dcp"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    got = pyckpt.load(tmp_path / "ckpt")
    expected = _stripped(torch.load(src, weights_only=True))
    assert list(got["model"]) == list(expected["model"])
    for key, tensor in expected["model"].items():  # DCP keeps no sharing: key by key
        assert_same({key: tensor}, {key: got["model"][key]})
    assert got["epoch"] == 3 and got["name"] == "run"


def test_flattening_follows_torch_for_every_kind_of_nesting(backend, tmp_path):
    """Lists are walked only when a tensor or a mapping is inside, tuples never, keys become
    strings: the keys and planner paths of torch's own dcp.save, and dcp.load fills them."""
    state = {
        "ints": [1, 2],
        "mixed": [torch.ones(2), 3],
        "deep": [[1], [torch.zeros(2)]],
        "tuple": ({"x": 1}, torch.ones(1)),
        "empty": [],
        "empty_nested": [[]],
        "int_keys": {1: torch.full((2,), 7.0), 2: "two"},
        "dicts_in_list": [{"k": 1}, {"t": torch.arange(3)}],
        "scalar": 5,
    }
    src = factory.save(state, tmp_path / "src.pt")
    pyckpt.convert(src, tmp_path / "out", format="dcp", strip_prefix=None)
    dcp.save(torch.load(src, weights_only=True), checkpoint_id=str(tmp_path / "torch"))
    ours, theirs = _metadata(tmp_path / "out"), _metadata(tmp_path / "torch")
    assert ours.planner_data == theirs.planner_data
    assert list(ours.state_dict_metadata) == list(theirs.state_dict_metadata)
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    template = {"mixed": [torch.zeros(2), 0], "deep": [[0], [torch.ones(2)]], "int_keys": {"1": torch.zeros(2)},
                "dicts_in_list": [{"k": 0}, {"t": torch.zeros(3, dtype=torch.int64)}]}
    dcp.load(template, checkpoint_id=str(tmp_path / "out"))
    assert torch.equal(template["mixed"][0], torch.ones(2)) and torch.equal(template["deep"][1][0], torch.zeros(2))
    assert torch.equal(template["int_keys"]["1"], torch.full((2,), 7.0))
    assert torch.equal(template["dicts_in_list"][1]["t"], torch.arange(3))


def test_dcp_output_runs_without_importing_torch(backend, tmp_path):
    """torch.distributed.checkpoint alone is about 250 MiB resident: the writer needs none of it."""
    src = factory.save(_state(), tmp_path / "src.pt")
    env = {**os.environ, **({"PYCKPT_DISABLE_EXT": "1"} if backend == "python" else {})}
    script = (
        "import sys, pyckpt; "
        f"pyckpt.convert({str(src)!r}, {str(tmp_path / 'out')!r}, format='dcp'); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    template = _zeros_like(_stripped(torch.load(src, weights_only=True)))
    dcp.load(template, checkpoint_id=str(tmp_path / "out"))
    assert torch.equal(template["extras"][0], torch.arange(3))
