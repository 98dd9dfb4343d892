"""What a load returns is freed when the caller lets go of it, not at the next garbage collection.

A reference cycle around loaded tensors (a recursive closure that captures them, say) keeps
the whole checkpoint in memory until Python's cycle collector happens to run, which a serving
process or a conversion loop may not do for a long time; torch.load leaves none. Each case
runs with the collector off, then asks it what it would have had to free: no tensor may be
among that garbage.
"""

from __future__ import annotations

import gc
import warnings

import factory
import pytest
import torch
from safetensors.torch import save_file
from sharded_cases import write_sharded

import pyckpt

LAYOUTS = ["pt", "safetensors", "sharded", "dcp"]


def _write(layout: str, tmp_path) -> str:
    state = factory.seeded_net().state_dict()
    if layout == "pt":
        return factory.save(factory.dp_state_dict(factory.seeded_net()), tmp_path / "dp.pt")
    if layout == "safetensors":
        path = str(tmp_path / "model.safetensors")
        save_file({key: value.clone() for key, value in state.items()}, path)
        return path
    if layout == "sharded":
        keys = list(state)
        return write_sharded(tmp_path / "shards", state, shard_keys=[keys[:3], keys[3:]], kinds=["safetensors", "bin"])
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    return str(tmp_path / "dcp")


def _tensors_left_to_the_collector(run) -> list[str]:
    gc.collect()
    gc.disable()
    try:
        run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return [f"{type(o).__name__} {tuple(o.shape)}" for o in garbage if isinstance(o, torch.Tensor)]


@pytest.mark.parametrize("mmap", [None, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_dropped_load_result_frees_its_tensors_at_once(backend, tmp_path, layout, mmap):
    path = _write(layout, tmp_path)
    pyckpt.load(path, mmap=mmap)  # first call: its imports make garbage of their own

    def run() -> None:
        loaded = pyckpt.load(path, mmap=mmap, strip_prefix="auto")
        assert isinstance(loaded["block.0.weight"], torch.Tensor)

    assert _tensors_left_to_the_collector(run) == []


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_state_dict_leaves_no_tensor_to_the_collector(backend, tmp_path, layout, dtype):
    path = _write(layout, tmp_path)
    model = factory.seeded_net(seed=1)
    if dtype is not None:
        model.to(dtype)  # the cast path: fp32 bytes into bf16 parameters
    pyckpt.load_state_dict(model, path)

    def run() -> None:
        pyckpt.load_state_dict(model, path)

    assert _tensors_left_to_the_collector(run) == []
    expected = {key: value.to(dtype) if dtype is not None and value.is_floating_point() else value
                for key, value in factory.seeded_net().state_dict().items()}
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("output", ["pt", "safetensors", "sharded", "dcp"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_convert_leaves_no_tensor_to_the_collector(backend, tmp_path, layout, output):
    path = _write(layout, tmp_path)
    options = {"max_shard_size": "1KB"} if output == "sharded" else {"format": output}
    if output == "sharded":
        options["format"] = "safetensors"
    pyckpt.convert(path, tmp_path / "first", dtype=torch.bfloat16, **options)

    def run() -> None:
        pyckpt.convert(path, tmp_path / "second", dtype=torch.bfloat16, **options)

    assert _tensors_left_to_the_collector(run) == []
    loaded = pyckpt.load(tmp_path / "second")
    assert loaded["block.0.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["block.0.weight"], factory.seeded_net().state_dict()["block.0.weight"].bfloat16())
