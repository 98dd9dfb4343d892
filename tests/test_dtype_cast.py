"""dtype casts: ``load(dtype=)``, ``convert(dtype=)`` / ``--dtype`` and ``load_state_dict``
into a model of another floating-point dtype, on both backends.

The reference is torch's own: ``torch.load`` of the same file, then each floating-point
storage cast whole with ``Tensor.to`` and every tensor rebuilt over it with its offset, sizes
and strides, so values, dtypes, layouts and storage sharing are all compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict

import factory
import pytest
import safetensors.torch
import torch
from compare import assert_same
from torch import nn

import pyckpt
from pyckpt.float_cast import CAST_SOURCES

TARGETS = [torch.bfloat16, torch.float16, torch.float32]


def torch_cast(obj, dtype):
    """What a cast load must equal: storages cast whole by torch, tensors rebuilt over them."""
    storages: dict[int, torch.UntypedStorage] = {}

    def cast(value):
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized:
            name = str(value.dtype).removeprefix("torch.")
            if name not in CAST_SOURCES or value.dtype == dtype:
                return value
            storage = value.untyped_storage()
            if storage.data_ptr() not in storages:
                whole = torch.empty(0, dtype=value.dtype).set_(storage)
                storages[storage.data_ptr()] = whole.to(dtype).untyped_storage()
            rebuilt = torch.empty(0, dtype=dtype).set_(
                storages[storage.data_ptr()], value.storage_offset(), value.size(), value.stride()
            )
            if isinstance(value, nn.Parameter):
                return nn.Parameter(rebuilt, requires_grad=value.requires_grad)
            return rebuilt.requires_grad_(value.requires_grad)
        if isinstance(value, dict):
            out = type(value)((k, cast(v)) for k, v in value.items())
            if getattr(value, "__dict__", None):
                out.__dict__.update(value.__dict__)
            return out
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        return value

    return cast(obj)


def _checkpoint() -> dict:
    state = OrderedDict()
    state.update({f"dtype.{k}": v for k, v in factory.every_dtype().items()})
    state.update({f"shared.{k}": v for k, v in factory.shared().items()})
    state.update({f"views.{k}": v for k, v in factory.views().items()})
    state.update({f"param.{k}": v for k, v in factory.parameters().items()})
    state["int8_quantized"] = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    return state


@pytest.fixture(scope="module")
def source_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cast") / "source.pt"
    torch.save(_checkpoint(), path)
    return str(path)


@pytest.mark.parametrize("dtype", TARGETS, ids=str)
@pytest.mark.parametrize("mmap", [None, True, False])
def test_load_casts_as_torch_does(backend, source_pt, dtype, mmap):
    expected = torch_cast(torch.load(source_pt, weights_only=True), dtype)
    got = pyckpt.load(source_pt, dtype=dtype, mmap=mmap)
    assert_same(expected, got)
    assert got["dtype.int64"].dtype == torch.int64 and got["dtype.complex64"].dtype == torch.complex64
    assert got["int8_quantized"].dtype == torch.qint8
    # tied weights and views still share one (cast) storage
    assert got["shared.embed.weight"].data_ptr() == got["shared.head.weight"].data_ptr()
    assert got["shared.a"].untyped_storage().data_ptr() == got["shared.c"].untyped_storage().data_ptr()


def test_load_casts_compressed_and_big_endian_records(backend, tmp_path):
    import zipfile

    values = {"w": torch.randn(40, 3), "d": torch.randn(7).double(), "n": torch.arange(4)}
    plain = factory.save(values, tmp_path / "plain.pt")
    compressed = factory.rezip(plain, str(tmp_path / "deflate.pt"), zipfile.ZIP_DEFLATED)
    widths = {"0": 4, "1": 8, "2": 8}
    big = factory.make_big_endian(plain, str(tmp_path / "big.pt"), widths)
    for path in (compressed, big):
        assert_same(torch_cast(torch.load(path, weights_only=True), torch.bfloat16), pyckpt.load(path, dtype="bf16"))


def test_load_from_safetensors_shards_and_dcp_casts(backend, tmp_path):
    net = factory.seeded_net(seed=3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    single = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, single)
    expected = torch_cast(OrderedDict(safetensors.torch.load_file(single)), torch.float16)
    assert_same(expected, pyckpt.load(str(single), dtype=torch.float16))

    shards = tmp_path / "shards"
    pyckpt.convert(str(single), str(shards), max_shard_size=200)
    assert_same(expected, pyckpt.load(str(shards), dtype="fp16"))

    import torch.distributed.checkpoint as dcp
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state, "step": 3}, checkpoint_id=str(tmp_path / "dcp"))
    got = pyckpt.load(str(tmp_path / "dcp"), dtype="fp16")
    assert got["step"] == 3
    for key, tensor in state.items():
        assert got["model"][key].dtype == (torch.float16 if tensor.is_floating_point() else tensor.dtype)
        assert torch.equal(got["model"][key], tensor.to(got["model"][key].dtype))


@pytest.mark.parametrize("bad", [torch.float64, torch.int32, "fp8", "bf17"])
def test_load_refuses_other_dtypes(backend, source_pt, bad):
    with pytest.raises(ValueError, match="bfloat16"):
        pyckpt.load(source_pt, dtype=bad)


def test_load_dtype_needs_weights_only(backend, source_pt):
    with pytest.raises(ValueError, match="weights_only"):
        pyckpt.load(source_pt, dtype="bf16", weights_only=False)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_convert_to_pt_casts_and_keeps_sharing(backend, source_pt, tmp_path, dtype):
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = tmp_path / "out.pt"
    report = pyckpt.convert(source_pt, out, dtype=dtype, strip_prefix=None)
    expected = torch_cast(torch.load(source_pt, weights_only=True), target)
    assert_same(expected, torch.load(out, weights_only=True))  # torch itself reads the output
    assert report.tensor_bytes == sum(
        s.nbytes() for s in {t.untyped_storage().data_ptr(): t.untyped_storage() for t in expected.values()}.values()
    )


def test_convert_to_safetensors_sharded_and_dcp_casts(backend, tmp_path):
    net = factory.seeded_net(seed=5, width=32)
    src = factory.save(factory.dp_state_dict(net), tmp_path / "ddp.pt")
    expected = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in net.state_dict().items()}

    single = tmp_path / "model.safetensors"
    pyckpt.convert(src, single, dtype="bf16")
    got = safetensors.torch.load_file(single)
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key

    shards = tmp_path / "shards"
    pyckpt.convert(src, shards, dtype="bf16", max_shard_size=2000)
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    total = sum(t.numel() * t.element_size() for t in expected.values())
    assert index["metadata"]["total_size"] == total
    merged = {}
    for name in sorted(set(index["weight_map"].values())):
        merged.update(safetensors.torch.load_file(shards / name))
    for key in expected:
        assert merged[key].dtype == expected[key].dtype and torch.equal(merged[key], expected[key]), key

    import torch.distributed.checkpoint as dcp

    pyckpt.convert(src, tmp_path / "dcp", format="dcp", dtype="bf16")
    into = {k: torch.empty_like(v) for k, v in expected.items()}
    dcp.load(into, checkpoint_id=str(tmp_path / "dcp"))
    for key in expected:
        assert torch.equal(into[key], expected[key]), key


def test_convert_casts_from_safetensors_with_unaligned_offsets(backend, tmp_path):
    tensors = {"a": torch.randn(3, dtype=torch.float16), "b": torch.randn(5, 2), "c": torch.randn(3).double()}
    src = tmp_path / "odd.safetensors"
    safetensors.torch.save_file(tensors, src)  # b and c start at offsets that are not 4- or 8-aligned
    out = tmp_path / "out.pt"
    pyckpt.convert(str(src), out, dtype="fp32")
    got = torch.load(out, weights_only=True)
    for key, tensor in tensors.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor.float())


def test_command_line_dtype(backend, tmp_path):
    src = factory.save({"module.w": torch.randn(6, 3), "module.n": torch.arange(3)}, tmp_path / "a.pt")
    out = tmp_path / "b.safetensors"
    env = {**os.environ, "PYCKPT_DISABLE_EXT": "1" if backend == "python" else ""}
    done = subprocess.run([sys.executable, "-m", "pyckpt", "convert", src, str(out), "--dtype", "fp16", "--quiet"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    got = safetensors.torch.load_file(out)
    assert got["w"].dtype == torch.float16 and torch.equal(got["w"], torch.load(src)["module.w"].half())
    assert got["n"].dtype == torch.int64
    done = subprocess.run([sys.executable, "-m", "pyckpt", "convert", src, str(tmp_path / "c.pt"), "--dtype", "int8"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "--dtype" in done.stderr and not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("model_dtype,file_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                    (torch.float16, torch.bfloat16)])
def test_load_state_dict_casts_into_the_parameters(backend, tmp_path, monkeypatch, model_dtype, file_dtype):
    source_net = factory.seeded_net(seed=1, width=64).to(file_dtype)
    path = factory.save(factory.dp_state_dict(source_net), tmp_path / "ddp.pt")
    expected = factory.seeded_net(seed=2, width=64).to(model_dtype)
    expected.load_state_dict(source_net.state_dict())  # torch's own copy_ casts

    import pyckpt.module_loading as module_loading

    staged = []
    real_execute = module_loading.execute_plan

    def spy(index, plans, *args, **kwargs):
        staged.extend(plan.record.key for plan in plans.values())
        return real_execute(index, plans, *args, **kwargs)

    monkeypatch.setattr(module_loading, "execute_plan", spy)
    model = factory.seeded_net(seed=2, width=64).to(model_dtype)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    result = pyckpt.load_state_dict(model, path)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same(expected.state_dict(), model.state_dict())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # filled in place
    float_storages = {t.untyped_storage().data_ptr() for t in source_net.state_dict().values() if t.is_floating_point()}
    assert float_storages and not staged, f"staged in host memory instead of cast in place: {staged}"
