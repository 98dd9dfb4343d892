"""The per-tensor fast paths give exactly the general path's results, and are really taken.

- ``pyckpt.load`` of a plain checkpoint to CPU runs in one native pass (the direct load);
  anything beyond a plain state dict or training checkpoint makes it give up, and then the
  general path's result (and error) is the answer. Both are compared with torch here.
- The general path makes tensor and storage records natively, tensors and storages in bulk,
  and fills host parameters in one native call (``load_state_dict``).
- The garbage collector is paused for a call and restored exactly.
- convert gathers runs of small records into one write.
"""

from __future__ import annotations

import gc
import io
import zipfile

import factory
import pytest
import torch
from torch import nn

import pyckpt
import pyckpt.source_loading as source_loading
from compare import assert_same
from conftest import EXT_DISABLED
from pyckpt._backend import current_backend, tensors_module
from pyckpt.execute.direct import NOTHING, load_direct
from pyckpt.index.policy import policy_for
from pyckpt.index.source import open_source


def _direct(path, mmap=None):
    with open_source(path) as source:
        return load_direct(source, current_backend(), policy_for("error"), mmap=mmap, shared_mapping=False)


def _general(path, monkeypatch, **options):
    """pyckpt.load with the direct load switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(pyckpt.source_loading, "cpu_only", lambda map_location: False)
        return pyckpt.load(path, **options)


def _plain_checkpoints(tmp_path):
    torch.manual_seed(0)
    net = factory.Net()
    base = torch.arange(24.0)
    yield "dp_state_dict", factory.dp_state_dict(net)
    yield "training", {
        "epoch": 3,
        "loss": 0.25,
        "model": net.state_dict(),
        "optimizer": torch.optim.Adam(net.parameters()).state_dict(),
        "history": [1.5, None, True, "text", (1, 2), {"nested": [3]}],
    }
    yield "views_and_ties", {"a": base, "b": base[3:9].view(2, 3), "c": base, "t": base.t() if base.dim() > 1 else base}
    yield "parameters", {"p": nn.Parameter(torch.ones(3)), "q": nn.Parameter(torch.ones(2), requires_grad=False)}
    yield "v3_dtypes", {name: t for name, t in factory.every_dtype().items()}
    yield "requires_grad", {"w": torch.ones(3, requires_grad=True)}
    yield "bare_tensor", torch.arange(5)
    yield "empty", {"z": torch.zeros(0), "s": torch.tensor(3.0), "": ""}
    # data.pkl is read through a 1 MiB window: a string three windows long, and records on
    # both sides of window edges.
    yield "pickle_beyond_window", {
        "before": torch.ones(2),
        "note": "n" * (3 << 20),
        **{f"module.block{i}.weight": torch.full((2,), float(i)) for i in range(6000)},
    }


@pytest.mark.skipif(EXT_DISABLED, reason="the direct load is native only")
@pytest.mark.parametrize("mmap", [None, True, False])
def test_direct_load_is_taken_and_equals_torch(tmp_path, monkeypatch, mmap):
    for name, obj in _plain_checkpoints(tmp_path):
        path = factory.save(obj, tmp_path / f"{name}.pt")
        direct = _direct(path, mmap)
        assert direct is not NOTHING, name
        expected = torch.load(path, weights_only=True, mmap=bool(mmap))
        assert_same(expected, direct, name)
        assert_same(_general(path, monkeypatch, mmap=mmap), direct, name)
        assert_same(expected, pyckpt.load(path, mmap=mmap), name)


def _beyond_plain(tmp_path):
    import argparse

    state = {"w": torch.arange(6.0)}
    yield "legacy", factory.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    zipped = factory.save(state, tmp_path / "plain.pt")
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(zipped) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for item in source.infolist():
            out.writestr(item.filename, source.read(item.filename))
    yield "deflated", str(deflated)
    yield "set_and_complex", factory.save({"s": {1, 2}, "c": 1 + 2j, "w": torch.ones(1)}, tmp_path / "values.pt")
    yield "big_int", factory.save({"n": 1 << 80, "w": torch.ones(1)}, tmp_path / "bigint.pt")
    yield "size_object", factory.save({"shape": torch.Size([2, 3]), "w": torch.ones(1)}, tmp_path / "size.pt")
    yield "bytes", factory.save({"b": b"raw", "w": torch.ones(1)}, tmp_path / "bytes.pt")
    yield "opaque", factory.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "opaque.pt")
    yield "quantized", factory.save({"q": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)},
                                    tmp_path / "quantized.pt")
    yield "conj", factory.save({"z": torch.complex(torch.ones(2), torch.ones(2)).conj()}, tmp_path / "conj.pt")


@pytest.mark.skipif(EXT_DISABLED, reason="the direct load is native only")
def test_direct_load_gives_up_beyond_plain_checkpoints(tmp_path, monkeypatch):
    for name, path in _beyond_plain(tmp_path):
        assert _direct(path) is NOTHING, name
        if name == "opaque":
            with pytest.raises(pyckpt.UnsafeCheckpointError):
                pyckpt.load(path)
            continue
        assert_same(torch.load(path, weights_only=True), pyckpt.load(path), name)


@pytest.mark.skipif(EXT_DISABLED, reason="the direct load is native only")
def test_direct_load_leaves_streams_where_torch_does(tmp_path):
    data = io.BytesIO()
    torch.save({"w": torch.ones(2)}, data)
    stream = io.BytesIO(b"x" * 10 + data.getvalue())
    stream.seek(10)
    assert torch.equal(pyckpt.load(stream)["w"], torch.ones(2))
    assert stream.tell() == len(stream.getvalue())


@pytest.mark.skipif(EXT_DISABLED, reason="native bulk paths")
def test_bulk_extension_is_in_use():
    assert tensors_module() is not None  # PYCKPT_REQUIRE_EXT=1 in CI: a missing one fails the suite


# -- the collector ----------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_collector_is_restored_exactly(backend, tmp_path, enabled):
    path = factory.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    seen: list[bool] = []
    original = source_loading.rename_tree

    def spy(root, key_map, *args):  # runs inside the call
        seen.append(gc.isenabled())
        return original(root, key_map, *args)

    (gc.enable if enabled else gc.disable)()
    try:
        source_loading.rename_tree = spy
        pyckpt.load(path)
        assert seen == [False] and gc.isenabled() is enabled
        with pytest.raises(pyckpt.CheckpointError):
            pyckpt.load(bad)
        assert gc.isenabled() is enabled
        with pytest.raises(pyckpt.CheckpointError):
            pyckpt.load_state_dict(nn.Linear(2, 2), bad)
        assert gc.isenabled() is enabled
    finally:
        source_loading.rename_tree = original
        gc.enable()


# -- bulk fills, gathered copies --------------------------------------------------------------


class _Many(nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4, bias=i % 2 == 0) for i in range(count)])


def test_load_state_dict_of_many_small_tensors(backend, tmp_path):
    torch.manual_seed(1)
    source = _Many(300)
    source.blocks[7].weight = source.blocks[3].weight  # tied: one storage, two keys
    path = factory.save(factory.dp_state_dict(source), tmp_path / "many.pt")
    target = _Many(300)
    target.blocks[7].weight = target.blocks[3].weight
    result = pyckpt.load_state_dict(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for (name, expected), got in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(expected, got), name
    assert target.blocks[7].weight is target.blocks[3].weight


def test_convert_gathers_small_records(backend, tmp_path):
    torch.manual_seed(2)
    state = {f"module.w{i}": torch.randn(i % 7 + 1, 3) for i in range(2000)}
    state["module.big"] = torch.randn(512, 1024)  # 2 MiB: copied on its own
    state["module.view"] = state["module.big"][3]
    src = factory.save(state, tmp_path / "src.pt")
    dst = tmp_path / "dst.pt"
    pyckpt.convert(src, dst)
    with zipfile.ZipFile(dst) as archive:
        assert archive.testzip() is None  # every record's CRC-32 matches its bytes
    expected = {k.removeprefix("module."): v for k, v in torch.load(src, weights_only=True).items()}
    assert_same(expected, torch.load(dst, weights_only=True))
