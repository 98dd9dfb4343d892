"""torch.distributed.checkpoint (DCP) directories as input to load and load_state_dict,
compared with what torch's own dcp_to_torch_save writes for the same directory, loaded back."""

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
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import pyckpt


def _save(state_dict, directory) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state_dict, checkpoint_id=str(directory))
    return str(directory)


def _reference(directory, tmp_path):
    out = tmp_path / f"{os.path.basename(directory)}-reference.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=False)  # written by torch from our own test data


def _training_state():
    net = factory.seeded_net()
    return {
        "model": factory.dp_state_dict(net),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, 2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "extras": [torch.arange(5), {"inner": torch.zeros(2, dtype=torch.float16)}],
        "epoch": 7,
        "name": "run-1",
        "f8": torch.randn(3).to(torch.float8_e5m2),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
    }


def test_load_equals_dcp_to_torch_save(backend, tmp_path):
    directory = _save(_training_state(), tmp_path / "ckpt")
    expected = _reference(directory, tmp_path)
    got = pyckpt.load(directory)
    assert_same(expected, got)
    assert list(got) == list(expected) and list(got["model"]) == list(expected["model"])


def test_renaming_and_load_state_dict(backend, tmp_path):
    net = factory.seeded_net(seed=4)
    directory = _save({"model": factory.dp_state_dict(net), "step": 2}, tmp_path / "ckpt")
    got = pyckpt.load(directory, strip_prefix="auto")
    assert list(got["model"]) == list(net.state_dict())
    for key, tensor in net.state_dict().items():  # DCP keeps no sharing: tied weights come back apart
        assert_same({key: tensor}, {key: got["model"][key]})
    model = factory.seeded_net(seed=9)
    result = pyckpt.load_state_dict(model, directory)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same(net.state_dict(), model.state_dict())


def test_load_state_dict_assembles_into_the_parameters_and_reads_only_the_state_dict(backend, tmp_path, monkeypatch):
    net = factory.seeded_net(seed=4)
    big = torch.randn(256, 256)
    directory = _save({"model": factory.dp_state_dict(net), "optimizer": {"big": big}, "step": 2}, tmp_path / "ckpt")
    from pyckpt import dcp_loading
    from pyckpt._backend import current_backend
    from pyckpt.index.dcp_format import read_dcp_metadata

    touched = []  # every chunk loaded, or indexed to be read straight into its parameter
    real_load, real_index = dcp_loading._load_chunk, dcp_loading.DcpSkeleton._chunk_root

    def loading(place, *args, **kwargs):
        touched.append(("loaded", place))
        return real_load(place, *args, **kwargs)

    def indexing(self, place):
        touched.append(("read in place", place))
        return real_index(self, place)

    monkeypatch.setattr(dcp_loading, "_load_chunk", loading)
    monkeypatch.setattr(dcp_loading.DcpSkeleton, "_chunk_root", indexing)
    model = factory.seeded_net(seed=9)
    pointers = {key: tensor.data_ptr() for key, tensor in model.state_dict().items()}
    result = pyckpt.load_state_dict(model, directory, key="model")
    assert not result.missing_keys and not result.unexpected_keys
    assert_same(net.state_dict(), model.state_dict())
    assert {key: tensor.data_ptr() for key, tensor in model.state_dict().items()} == pointers  # filled in place
    entries = read_dcp_metadata(directory, current_backend()).entries
    # factory.Net ties embed.weight to head.weight: DCP holds both, torch's copies leave head's
    # bytes in the tied memory, so only head's chunk is read (see pyckpt/tied_targets.py)
    model_places = {entries[f"model.module.{key}"].chunks[0] for key in net.state_dict() if key != "embed.weight"}
    assert entries["model.module.embed.weight"].chunks[0] not in model_places
    assert {place for how, place in touched if how == "read in place"} == model_places  # straight into the model
    assert [place for how, place in touched if how == "loaded"] == [entries["step"].place]  # and the optimizer never


def test_load_state_dict_casts_into_another_dtype_and_assigns(backend, tmp_path):
    net = factory.seeded_net(seed=5)
    directory = _save({"model": factory.dp_state_dict(net)}, tmp_path / "ckpt")
    expected = factory.seeded_net(seed=0).to(torch.bfloat16)
    expected.load_state_dict(net.state_dict())  # torch casts in param.copy_
    model = factory.seeded_net(seed=9).to(torch.bfloat16)
    pyckpt.load_state_dict(model, directory)
    for key, tensor in expected.state_dict().items():
        assert model.state_dict()[key].dtype == tensor.dtype and torch.equal(model.state_dict()[key], tensor), key
    model = factory.seeded_net(seed=9)
    pointers = {key: tensor.data_ptr() for key, tensor in model.state_dict().items()}
    pyckpt.load_state_dict(model, directory, assign=True)
    for key, tensor in net.state_dict().items():  # DCP keeps no sharing: the tied pair comes back apart
        assert_same({key: tensor}, {key: model.state_dict()[key]})
    assert all(model.state_dict()[key].data_ptr() != pointer for key, pointer in pointers.items())


def _same_placement(expected, got, where="root"):
    """Trees alike, with tensors alike in device, dtype and shape (meta tensors hold no values)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert (got.device, got.dtype, got.shape) == (expected.device, expected.dtype, expected.shape), where
    elif isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            _same_placement(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for position, (e, g) in enumerate(zip(expected, got)):
            _same_placement(e, g, f"{where}[{position}]")
    else:
        assert got == expected, where


def _tensors_in(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [tensor for item in items for tensor in _tensors_in(item)]


@pytest.mark.parametrize("map_location", ["meta", torch.device("meta"), {"cpu": "meta"}, {"cuda:0": "meta"}])
def test_map_location_sends_tensors_where_torch_load_would(backend, tmp_path, map_location):
    """DCP's chunks count as saved on the CPU: each form of map_location places every tensor,
    those inside pickled values too, where torch.load places them in dcp_to_torch_save's file."""
    directory = _save(_training_state(), tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(directory, tmp_path / "reference.pt")
    expected = torch.load(tmp_path / "reference.pt", weights_only=False, map_location=map_location)
    got = pyckpt.load(directory, map_location=map_location)
    _same_placement(expected, got)
    placed = {tensor.device.type for tensor in _tensors_in(got)}
    assert placed == {"cpu" if map_location == {"cuda:0": "meta"} else "meta"}  # and not vacuously: tensors exist


def test_map_location_that_cannot_apply_is_refused(backend, tmp_path):
    directory = _save({"w": torch.ones(2)}, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="callable map_location is not supported for DCP"):
        pyckpt.load(directory, map_location=lambda storage, location: storage)
    with pytest.raises(ValueError, match="names no device"):
        pyckpt.load(directory, map_location="mps")


RANK_SCRIPT = r"""
import os, sys, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard, Replicate
rank, world, directory, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
mesh = init_device_mesh("cpu", (world,))
torch.manual_seed(0)
full = {"rows": torch.randn(7, 3), "cols": torch.randn(4, 5).bfloat16(), "rep": torch.arange(6.0), "uneven": torch.arange(5)}
state = {"model": {
    "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
    "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
    "rep": distribute_tensor(full["rep"], mesh, [Replicate()]),
    "uneven": distribute_tensor(full["uneven"], mesh, [Shard(0)]),
}, "step": 11}
dcp.save(state, checkpoint_id=directory)
if rank == 0:
    torch.save(full, os.path.join(os.path.dirname(directory), "full.pt"))
# Both ranks are done once the barrier passes. Leaving through os._exit skips gloo's teardown,
# whose threads have aborted the process ("terminate called without an active exception") in CI.
dist.barrier()
os._exit(0)
"""


@pytest.fixture(scope="module")
def sharded_dcp(tmp_path_factory):
    """A DCP checkpoint saved by two gloo ranks from DTensors sharded on rows and on columns."""
    for attempt in range(3):  # a rank killed by a signal is torch's teardown, not the save: try afresh
        root = tmp_path_factory.mktemp("dcp2")
        directory, store = str(root / "ckpt"), str(root / "store")
        ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), "2", directory, store],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        outcomes = [(process.communicate(timeout=240)[1], process.returncode) for process in ranks]
        for err, returncode in outcomes:
            assert returncode <= 0, err
        if all(returncode == 0 for _, returncode in outcomes):
            return directory, torch.load(root / "full.pt", weights_only=True)
    pytest.fail(f"the two-rank save was killed by a signal three times: {outcomes}")


def test_tensors_saved_in_several_chunks(backend, sharded_dcp, tmp_path):
    directory, full = sharded_dcp
    from pyckpt.index.dcp_format import read_dcp_metadata
    from pyckpt._backend import current_backend

    chunks = {key: len(entry.chunks) for key, entry in read_dcp_metadata(directory, current_backend()).entries.items()
              if hasattr(entry, "chunks")}
    assert chunks["model.rows"] == 2 and chunks["model.cols"] == 2 and chunks["model.uneven"] == 2  # really sharded
    got = pyckpt.load(directory)
    assert_same(_reference(directory, tmp_path), got)
    for key, tensor in full.items():
        assert torch.equal(got["model"][key], tensor), key
    assert got["step"] == 11


def test_chunks_bound_for_cuda_are_planned_through_the_ring(sharded_dcp, monkeypatch):
    """Row, column, replicated and uneven chunks bound for CUDA become ring pieces (file
    offset, length, destination, offset in it) with no host assembly; run by the ring's CPU
    transfer, which moves the same spans through the same buffers, they rebuild every tensor."""
    from conftest import require_backend
    from ring_probe import ring_on_the_host, skeleton_fills
    from pyckpt import dcp_loading
    from pyckpt._backend import use_backend
    from pyckpt.index.policy import UNKNOWN_OPAQUE

    require_backend("native")
    directory, full = sharded_dcp
    with use_backend("native"), ring_on_the_host() as sent, dcp_loading.DcpSkeleton(directory, UNKNOWN_OPAQUE) as skeleton:
        monkeypatch.setattr(dcp_loading, "_load_chunk", lambda *a, **k: pytest.fail("a chunk was assembled on the host"))
        fills = skeleton_fills(skeleton)  # the skeleton loaded "step" above, as it must
        skeleton.fill([(placeholder, fake, (0,) * placeholder.dim()) for placeholder, fake in fills.values()])
    assert set(fills) == {"model." + key for key in full}
    for key, tensor in full.items():
        assert torch.equal(fills["model." + key][1].memory, tensor), key
    assert sum(sent) == sum(t.nbytes for t in full.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_tensors_saved_in_several_chunks(backend, sharded_dcp, monkeypatch):
    """Row and column chunks assembled on CUDA: on the native backend each chunk's runs go
    through the ring into their places in the CUDA tensor (a column chunk is one run per row)."""
    from ring_probe import ring_bytes

    directory, full = sharded_dcp
    sent = ring_bytes(monkeypatch)
    got = pyckpt.load(directory, map_location="cuda")
    for key, tensor in full.items():
        assert got["model"][key].device.type == "cuda" and torch.equal(got["model"][key].cpu(), tensor), key
    assert got["step"] == 11
    assert sum(sent) == (sum(t.nbytes for t in full.values()) if backend == "native" else 0)


# -- hostile and damaged DCP directories -----------------------------------------------------


def _metadata(directory):
    with open(os.path.join(directory, ".metadata"), "rb") as f:
        return pickle.load(f)  # our own test file, written by torch just above


def _write_metadata(directory, metadata):
    with open(os.path.join(directory, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


class Payload:
    def __reduce__(self):
        return (subprocess.Popen, (["touch", "/tmp/pyckpt-dcp-should-not-exist"],))


def _cases(tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 3}

    def made(name):
        return _save(state, tmp_path / name)

    cases = {}
    d = made("foreign")
    meta = _metadata(d)
    meta.storage_meta = Payload()
    _write_metadata(d, meta)
    cases["foreign global"] = (d, "metadata names globals DCP never writes: subprocess.Popen")
    d = made("blocked")
    with open(os.path.join(d, ".metadata"), "wb") as f:
        f.write(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")
    cases["blocked module"] = (d, "module os is always blocked")
    d = made("truncated")
    distcp = [n for n in os.listdir(d) if n.endswith(".distcp")][0]
    size = os.path.getsize(os.path.join(d, distcp))
    os.truncate(os.path.join(d, distcp), size - 100)
    cases["chunk past the end"] = (d, "runs past the end of '" + distcp)
    d = made("overlap")
    meta = _metadata(d)
    w = meta.state_dict_metadata["w"]
    first = w.chunks[0]
    w.chunks.append(type(first)(offsets=torch.Size([1, 0]), sizes=torch.Size([1, 4])))
    from torch.distributed.checkpoint.metadata import MetadataIndex

    (where,) = [index for index in meta.storage_data if index.fqn == "w"]
    meta.storage_data[MetadataIndex("w", torch.Size([1, 0]), 1)] = meta.storage_data[where]
    _write_metadata(d, meta)
    cases["overlapping chunks"] = (d, "chunks at [0, 0] and [1, 0] overlap")
    d = made("incomplete")
    meta = _metadata(d)
    w = meta.state_dict_metadata["w"]
    w.chunks[0] = type(w.chunks[0])(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 4]))
    _write_metadata(d, meta)
    cases["incomplete tensor"] = (d, "chunks cover 8 of the tensor's 12 elements")
    d = made("escape")
    meta = _metadata(d)
    for index, info in meta.storage_data.items():
        info.relative_path = "../elsewhere.distcp"
    _write_metadata(d, meta)
    cases["path escape"] = (d, "storage file '../elsewhere.distcp' is not a file name in the checkpoint directory")
    d = made("missing")
    os.remove(os.path.join(d, distcp))
    cases["missing file"] = (d, f"storage file '{distcp}' is missing")
    return cases


def test_damaged_dcp_is_refused(backend, tmp_path):
    for name, (directory, message) in _cases(tmp_path).items():
        with pytest.raises(pyckpt.CheckpointError) as caught:
            pyckpt.load(directory)
        assert message in str(caught.value), f"{name}: {caught.value}"
        assert directory in str(caught.value), f"{name}: the message does not name the file: {caught.value}"
    assert not os.path.exists("/tmp/pyckpt-dcp-should-not-exist")


def test_2_4_era_layout(backend, tmp_path):
    """torch 2.4 wrote no ``version`` and a 3-field ``_StorageInfo``: read the same."""
    directory = _save({"w": torch.arange(6.0), "step": 1}, tmp_path / "old")
    expected = _reference(directory, tmp_path)
    meta = _metadata(directory)
    meta.__dict__.pop("version", None)
    for info in meta.storage_data.values():
        info.__dict__.pop("transform_descriptors", None)
    _write_metadata(directory, meta)
    with open(os.path.join(directory, ".metadata"), "rb") as f:
        raw = f.read()
    assert b"transform_descriptors" not in raw and b"version" not in raw
    assert_same(expected, pyckpt.load(directory))


@pytest.mark.parametrize("output", ["pt", "safetensors", "sharded"])
def test_convert_from_dcp(backend, tmp_path, output):
    """A DCP save converted with each tensor copied from its chunk; equal to torch's own
    dcp_to_torch_save of the same directory."""
    from safetensors.torch import load_file

    net = factory.seeded_net(width=16)
    state = {"model": factory.dp_state_dict(net), "epoch": 4}
    directory = _save(state, tmp_path / "ckpt")
    reference = _reference(directory, tmp_path)
    kwargs = {"pt": {"format": "pt"}, "safetensors": {"format": "safetensors"}, "sharded": {"max_shard_size": 2000}}
    dst = tmp_path / "out"
    report = pyckpt.convert(directory, dst, **kwargs[output])
    model_reference = {key.removeprefix("module."): value for key, value in reference["model"].items()}
    assert report.tensors == len(model_reference)
    if output == "pt":
        got = torch.load(dst, weights_only=True)
        assert got["epoch"] == 4
        got = got["model"]
    elif output == "safetensors":
        got = load_file(dst)
    else:
        got = pyckpt.load(dst)
    assert list(got) == list(model_reference)
    for key, tensor in model_reference.items():  # DCP keeps no sharing: key by key
        assert_same({key: tensor}, {key: got[key]})


def test_inspect_and_verify_dcp(backend, tmp_path):
    from pyckpt.inspection import inspect_checkpoint
    from pyckpt.verification import verify_checkpoint

    state = _training_state()
    directory = _save(state, tmp_path / "ckpt")
    info = inspect_checkpoint(directory)
    assert info["format"] == "dcp" and info["path"] == directory
    assert info["files"] == [os.path.join(directory, "__0_0.distcp")]
    expected = _reference(directory, tmp_path)
    tensors = [key for key, _ in _flat_tensors(expected)]
    assert info["tensors"] == len(tensors)
    assert sorted(row["key"] for row in info["table"]) == sorted(tensors)
    assert any(sd["entry"] == "model" and sd["wrapper_prefixes"] == {"module.": len(state["model"])}
               for sd in info["state_dicts"])
    report = verify_checkpoint(directory)
    assert report.ok and report.format == "dcp" and report.tensors == len(tensors)
    distcp = os.path.join(directory, "__0_0.distcp")
    os.truncate(distcp, os.path.getsize(distcp) - 10)
    report = verify_checkpoint(directory)
    assert not report.ok and "runs past the end" in report.problems[0]


@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_sharded_save_converts_to_every_format(backend, sharded_dcp, tmp_path, dtype):
    """Tensors split in chunks by rows, by columns and unevenly are assembled piece by piece
    into one file, new shards or DCP; cast on the way with a dtype."""
    import json

    import safetensors.torch

    directory, full = sharded_dcp
    cast = (lambda t: t.float() if t.is_floating_point() else t) if dtype else (lambda t: t)
    expected = {key: cast(value) for key, value in full.items()}

    pyckpt.convert(directory, tmp_path / "out.pt", dtype=dtype)
    got = torch.load(tmp_path / "out.pt", weights_only=True)  # torch checks every record's CRC
    assert got["step"] == 11
    for key, tensor in expected.items():
        assert got["model"][key].dtype == tensor.dtype and torch.equal(got["model"][key], tensor), key

    pyckpt.convert(directory, tmp_path / "out.safetensors", dtype=dtype)
    got = safetensors.torch.load_file(tmp_path / "out.safetensors")
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key

    pyckpt.convert(directory, tmp_path / "shards", max_shard_size=40, dtype=dtype)
    weight_map = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())["weight_map"]
    merged = {}
    for name in set(weight_map.values()):
        merged.update(safetensors.torch.load_file(tmp_path / "shards" / name))
    for key, tensor in expected.items():
        assert torch.equal(merged[key], tensor), key

    pyckpt.convert(directory, tmp_path / "dcp", format="dcp", dtype=dtype)
    into = {"model": {key: torch.empty_like(tensor) for key, tensor in expected.items()}, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(into, checkpoint_id=str(tmp_path / "dcp"))
    for key, tensor in expected.items():
        assert torch.equal(into["model"][key], tensor), key
    assert into["step"] == 11

    from pyckpt.inspection import inspect_checkpoint

    summary = inspect_checkpoint(directory)
    assert summary["tensors"] == len(full)
    assert summary["tensor_bytes"] == sum(t.numel() * t.element_size() for t in full.values())
    from pyckpt.verification import verify_checkpoint

    assert verify_checkpoint(directory).ok  # verify assembles, as load does


def _flat_tensors(tree, path=""):
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat_tensors(value, f"{path}/{key}" if path else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _flat_tensors(value, f"{path}[{i}]")
