"""safetensors files as input: load, load_state_dict, convert, inspect and verify, each
compared with what the safetensors library itself reads from the same file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from compare import assert_same
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import pyckpt


def _tensors() -> dict[str, torch.Tensor]:
    """Every dtype safetensors.torch writes, with a scalar, an empty and a 3-d tensor."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "module.f64": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "module.f32": torch.randn(7, 3, generator=g),
        "module.f16": torch.randn(9, generator=g).half(),
        "module.bf16": torch.randn(2, 3, 5, generator=g).bfloat16(),
        "module.i64": torch.arange(-5, 6),
        "module.i32": torch.arange(11, dtype=torch.int32),
        "module.i16": torch.arange(3, dtype=torch.int16),
        "module.i8": torch.arange(-3, 4, dtype=torch.int8),
        "module.u8": torch.arange(13, dtype=torch.uint8),
        "module.bool": torch.tensor([True, False, True]),
        "module.c64": torch.randn(4, generator=g, dtype=torch.complex64),
        "module.f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "module.u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
        "module.scalar": torch.tensor(2.5),
        "module.empty": torch.zeros(0, 4),
    }
    return tensors


@pytest.fixture
def st_file(tmp_path) -> str:
    path = str(tmp_path / "model.safetensors")
    save_file(_tensors(), path, metadata={"format": "pt", "step": "100"})
    return path


def _file_order(path: str) -> list[str]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    ranges = []
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.parametrize("mmap", [None, True, False])
def test_load_equals_the_safetensors_library(backend, st_file, mmap):
    expected = load_file(st_file)
    got = pyckpt.load(st_file, mmap=mmap)
    assert type(got) is dict or isinstance(got, dict)
    assert list(got) == _file_order(st_file)  # in file order
    assert_same(dict(sorted(expected.items())), dict(sorted(got.items())))
    storages = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(storages) == sum(1 for t in got.values() if t.numel())  # each tensor its own storage


def test_mapped_load_is_zero_copy_where_aligned(backend, st_file):
    got = pyckpt.load(st_file, mmap=True)
    ranges = _mapped_ranges(st_file)
    assert ranges, "the file is not mapped while its tensors live"
    with open(st_file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    for name, tensor in got.items():
        if tensor.numel() == 0:
            continue
        offset = 8 + length + header[name]["data_offsets"][0]
        pointer = tensor.untyped_storage().data_ptr()
        inside = any(start <= pointer < end for start, end in ranges)
        assert inside == (offset % tensor.element_size() == 0), name
        if inside:  # the page offset matches the file offset: a view of exactly those bytes
            assert pointer % 4096 == offset % 4096, name
    # and the eager load owns its memory
    eager = pyckpt.load(st_file, mmap=False)
    assert not any(start <= t.untyped_storage().data_ptr() < end for t in eager.values() if t.numel()
                   for start, end in ranges)


def test_load_from_a_buffer_and_with_renaming(backend, st_file):
    import io

    expected = {name.removeprefix("module."): t for name, t in load_file(st_file).items()}
    with open(st_file, "rb") as f:
        got = pyckpt.load(io.BytesIO(f.read()), strip_prefix="auto")
    assert_same(dict(sorted(expected.items())), dict(sorted(got.items())))
    renamed = pyckpt.load(st_file, rename=[(r"^module\.(f|i)", r"x.\1")])
    assert "x.f32" in renamed and "x.i64" in renamed and "module.u8" in renamed


def test_load_state_dict_from_safetensors(backend, tmp_path):
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = str(tmp_path / "dp.safetensors")
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}, path)
    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    result = pyckpt.load_state_dict(fresh, path)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same(net.state_dict(), fresh.state_dict())


def test_convert_to_pt_and_back(backend, st_file, tmp_path):
    expected = {name.removeprefix("module."): t for name, t in load_file(st_file).items()}
    pt = tmp_path / "out.pt"
    report = pyckpt.convert(st_file, pt)
    assert report.tensors == len(expected)
    assert any("__metadata__" in note for note in report.dropped)  # pt output cannot keep it
    assert_same(dict(sorted(expected.items())), dict(sorted(torch.load(pt, weights_only=True).items())))
    st = tmp_path / "out.safetensors"
    pyckpt.convert(st_file, st)
    assert_same(dict(sorted(expected.items())), dict(sorted(load_file(st).items())))
    with safe_open(st, "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "100"}  # kept


def test_inspect_and_verify(backend, st_file):
    env = {**os.environ}
    if backend == "python":
        env["PYCKPT_DISABLE_EXT"] = "1"
    info = json.loads(subprocess.run([sys.executable, "-m", "pyckpt", "inspect", "--json", st_file],
                                     capture_output=True, text=True, env=env, check=True).stdout)
    assert info["format"] == "safetensors"
    assert info["metadata"] == {"format": "pt", "step": "100"}
    assert info["tensors"] == len(_tensors())
    assert info["tensor_bytes"] == sum(t.numel() * t.element_size() for t in _tensors().values())
    text = subprocess.run([sys.executable, "-m", "pyckpt", "inspect", st_file], capture_output=True, text=True,
                          env=env, check=True).stdout
    metadata_line = next(line for line in text.splitlines() if line.startswith("  metadata    "))
    assert sorted(metadata_line.removeprefix("  metadata    ").split(", ")) == ["format='pt'", "step='100'"]
    from pyckpt.verification import verify_checkpoint

    report = verify_checkpoint(st_file)
    assert report.ok and report.format == "safetensors" and report.tensors == len(_tensors())
    assert any("records no CRCs" in note for note in report.notes)


def test_damaged_header_leaves_nothing_at_the_destination(backend, st_file, tmp_path):
    with open(st_file, "rb") as f:
        data = bytearray(f.read())
    data[-1:] = b""  # the last tensor now runs past the end
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    dst = tmp_path / "out.pt"
    with pytest.raises(pyckpt.CheckpointError, match="run past the end of the data") as caught:
        pyckpt.convert(bad, dst)
    assert str(bad) in str(caught.value)
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == sorted([os.path.basename(st_file), "bad.safetensors"])
