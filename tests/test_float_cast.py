"""The cast kernels, native and pure Python, against torch's own ``Tensor.to(dtype)``.

Every source format is fed every bit pattern it has (float8, 16-bit) or a random sample with
the special values mixed in (32 and 64 bits). Both backends must write the same bytes,
NaNs included; against torch every value must match bit for bit except NaNs, which only have
to stay NaN (torch's own scalar and vectorised paths give NaNs different payloads).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import pyckpt
from pyckpt.float_cast import CAST_SOURCES, CAST_TARGETS, cast_bytes, cast_target
from pyckpt.index.source import open_source

SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0, 6.1e-5, 5.96e-8,
            2.98e-8, 2.99e-8, 1e-40, -1e-45, 3.4e38, 1 + 2**-11, 1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40, 448.0, 57344.0]


def _all_values(name: str) -> torch.Tensor:
    dtype = getattr(torch, name)
    if dtype.itemsize == 1:
        return torch.arange(256, dtype=torch.uint8).view(dtype)
    if dtype.itemsize == 2:
        return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    generator = torch.Generator().manual_seed(len(name))
    bits = torch.randint(-(1 << 62), 1 << 62, (300_000,), generator=generator)
    sample = bits.view(torch.float64) if dtype == torch.float64 else bits.to(torch.int32).view(torch.float32)
    # and values near every rounding boundary of the narrow formats
    near = torch.randn(200_000, generator=generator, dtype=torch.float64) * torch.logspace(-9, 5, 200_000, dtype=torch.float64)
    return torch.cat([sample.to(dtype), near.to(dtype), torch.tensor(SPECIALS, dtype=torch.float64).to(dtype)])


def _native():
    from conftest import require_backend

    require_backend("native")
    from pyckpt import _core  # type: ignore[attr-defined]

    return _core


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.uint8).numpy()


CASES = [(a, b) for a in sorted(CAST_SOURCES) for b in sorted(CAST_TARGETS) if hasattr(torch, a)]


@pytest.mark.parametrize("source,target", CASES)
def test_both_kernels_cast_as_torch_does(source, target):
    values = _all_values(source)
    expected = values.to(getattr(torch, target))
    raw = _bits(values).tobytes()
    python = cast_bytes(raw, source, target)
    native = np.empty(len(expected) * expected.element_size(), dtype=np.uint8)
    _native().cast_into(raw, len(raw), [(0, len(values), source, target, native)], 2)
    assert np.array_equal(python, native), "the two backends disagree"
    got = torch.from_numpy(native.copy()).view(getattr(torch, target))
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert np.array_equal(_bits(got[~nan]), _bits(expected[~nan]))


def test_nan_keeps_its_sign():
    patterns = {"float32": [0x7FC00001, 0xFF800001], "float64": [0x7FF8000000000001, 0xFFF0000000000001],
                "float16": [0x7E01, 0xFC01], "bfloat16": [0x7FC1, 0xFF81]}
    for source, bits in patterns.items():
        width = getattr(torch, source).itemsize
        raw = b"".join(value.to_bytes(width, "little") for value in bits)
        for target in sorted(CAST_TARGETS - {source}):
            got = torch.from_numpy(cast_bytes(raw, source, target).copy()).view(getattr(torch, target))
            assert got.isnan().all() and got.signbit().tolist() == [False, True], (source, target)


@pytest.mark.parametrize("backend_name", ["native", "python"])
def test_file_to_file_cast_writes_the_bytes_and_their_crc(backend_name, tmp_path):
    from conftest import require_backend
    from pyckpt._backend import use_backend
    import zlib

    require_backend(backend_name)
    values = torch.randn(3_000_001, dtype=torch.float32)  # more than one chunk of elements
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 100 + _bits(values).tobytes())
    dest = tmp_path / "dst.bin"
    expected = _bits(values.bfloat16()).tobytes()
    with use_backend(backend_name) as backend, open(source, "rb") as src, open(dest, "wb") as dst:
        crcs = backend.cast_copy_ranges(src.fileno(), dst.fileno(), [(100, values.numel(), "float32", "bfloat16", 8)])
    assert dest.read_bytes()[8:] == expected
    assert crcs == [zlib.crc32(expected)]


@pytest.mark.parametrize("backend_name", ["native", "python"])
def test_cast_reads_refuse_a_range_past_the_end(backend_name, tmp_path):
    from conftest import require_backend
    from pyckpt._backend import use_backend

    require_backend(backend_name)
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(100))
    dest = torch.empty(100, dtype=torch.uint8)
    with use_backend(backend_name) as backend:
        source = open_source(str(path))
        try:
            with pytest.raises(pyckpt.CheckpointError, match="truncated|lies|past|end|shrank"):
                backend.cast_into(source, [(60, 50, "float32", "float16", dest)])
        finally:
            source.close()


@pytest.mark.parametrize("value,name", [(torch.bfloat16, "bfloat16"), ("bf16", "bfloat16"), ("fp16", "float16"),
                                        ("half", "float16"), (torch.float32, "float32"), ("FP32", "float32")])
def test_cast_targets_by_name(value, name):
    assert cast_target(value).name == name


@pytest.mark.parametrize("value", [torch.float64, torch.int8, "fp8", "float8_e4m3fn", 3, None])
def test_other_targets_are_refused(value):
    with pytest.raises(ValueError, match="bfloat16"):
        cast_target(value)
