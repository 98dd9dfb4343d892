"""Seed inputs for both fuzzers: small real checkpoints, made here with torch.

``write_seeds(directory)`` writes, for a handful of small objects, the torch zip file, the
legacy file, the zip re-written with DEFLATE, its bare ``data.pkl``, a TorchScript archive
and its pickles, plus the small cases of the hostile corpus (``tests/attacks.py``). Nothing
is checked in: every seed is generated, so the corpus follows the installed torch.

Some objects hold classes beyond torch's weights_only allowlist (stdlib, numpy, a pickled
``nn.Module``), some saved with pickle protocol 4 or 5: the default mode refuses them, and
``unknown_globals="opaque"`` reads them as ``pyckpt.Opaque`` records, so both paths get seeds.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import pathlib
import sys
import warnings
import zipfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

MAX_SEED_BYTES = 64 << 10


def _objects() -> dict[str, Any]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    linear = nn.Linear(3, 2)
    state = linear.state_dict()
    return {
        "tensor": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "views": {"base": base, "t": base.transpose(0, 2), "s": base[:, 1:, ::2], "e": torch.ones(2).expand(3, 2)},
        "state_dict": state,
        "mixed": {
            "epoch": 3,
            "lr": 0.5,
            "name": "ünï",
            "flags": [True, None, (1, 2)],
            "size": torch.Size([2, 3]),
            "dtype": torch.bfloat16,
            "bytes": b"\x00\xff",
            "big": 2**70,
            "counter": collections.Counter({"a": 1}),
            "set": {1, 2},
            "w": nn.Parameter(torch.randn(2, 2)),
            "half": torch.randn(3).half(),
            "long": torch.arange(3),
            "complex": torch.complex(torch.randn(2), torch.randn(2)).conj(),
        },
        "tied": collections.OrderedDict([("a.weight", base), ("b.weight", base), ("c", base[1])]),
        "list": [torch.zeros(1), torch.tensor(True), torch.tensor([1, 2], dtype=torch.uint8)],
    }


def _opaque_objects() -> dict[str, Any]:
    """Objects beyond the allowlist: refused by default, Opaque records in opaque mode.

    Only stdlib, numpy and torch classes: a class defined here would be pickled as
    ``seeds.X`` or ``__main__.X`` depending on how this file was run, so the seeds would
    depend on the caller, and torch could not load them back without importing this file.
    """
    import numpy
    import torch
    from torch import nn

    torch.manual_seed(0)
    shared = torch.arange(6, dtype=torch.float32)
    looped = argparse.Namespace(name="loop", w=shared[2:])
    looped.me = looped  # BUILD state that refers back to its own object
    return {
        "opaque_mixed": {
            "args": argparse.Namespace(lr=0.1, betas=(0.9, 0.99)),
            "model": {"w": torch.ones(2)},
            "path": pathlib.PurePosixPath("a/b"),
            "n": numpy.float64(1.5),
            "array": numpy.arange(3, dtype=numpy.int32),  # a bare global (numpy.ndarray) inside
        },
        # APPENDS on an Opaque (items), SETITEMS on one (dict_items), a tensor shared across them
        "opaque_deque": collections.deque([1, shared, "x"], maxlen=4),
        "opaque_defaultdict": {"d": collections.defaultdict(list, {"a": [shared], "b": [shared[1:]]}), "t": shared},
        "opaque_cycle": [looped, looped, shared],
        # a whole pickled module: Linear's NEWOBJ + BUILD with _parameters (Parameters) inside
        "opaque_module": nn.Linear(2, 2),
    }


# (object name, pickle protocol): protocols 3-5 are read in opaque mode only.
_PROTOCOL_SEEDS = [("opaque_mixed", 4), ("opaque_module", 4), ("opaque_defaultdict", 5), ("state_dict", 4)]


def _zip_bytes(obj: Any, protocol: int = 2) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_protocol=protocol)
    return buffer.getvalue()


def _legacy_bytes(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _rezip(data: bytes, compression: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", compression=compression) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename), compress_type=compression)
    return out.getvalue()


def _records(data: bytes, suffix: str) -> list[bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [archive.read(name) for name in archive.namelist() if name.endswith(suffix)]


def _torchscript_bytes() -> bytes:
    import torch
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def _safetensors_seeds() -> dict[str, bytes]:
    """safetensors files: one of every dtype the format has, and one with metadata."""
    import torch
    from safetensors.torch import save

    tensors = {
        "module.w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "module.h": torch.arange(5, dtype=torch.float16),
        "module.b": torch.arange(6, dtype=torch.float32).bfloat16(),
        "module.i": torch.arange(-3, 3),
        "module.m": torch.tensor([True, False]),
        "module.s": torch.tensor(1.5),
        "module.e": torch.zeros(0, 2),
    }
    return {
        "safetensors_dtypes": save(tensors),
        "safetensors_metadata": save({"w": tensors["module.w"]}, metadata={"format": "pt"}),
        # A shard index, read by the same JSON reader: escapes, non-ASCII, every value kind.
        "shard_index": b'{"metadata": {"total_size": 48, "ratio": 1.5e-3, "ok": true, "none": null}, '
                       b'"weight_map": {"a.\\u00e9\\n": "model-00001-of-00002.safetensors", '
                       b'"b\xc3\xa9": "model-00002-of-00002.safetensors", "c": ["x", -0, NaN]}}',
    }


def seed_inputs(*, include_attacks: bool = True) -> dict[str, bytes]:
    """name -> bytes, each at most MAX_SEED_BYTES."""
    seeds: dict[str, bytes] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = {**_objects(), **_opaque_objects()}
        for name, obj in objects.items():
            zipped = _zip_bytes(obj)
            seeds[f"zip_{name}"] = zipped
            seeds[f"legacy_{name}"] = _legacy_bytes(obj)
            seeds[f"deflate_{name}"] = _rezip(zipped, zipfile.ZIP_DEFLATED)
            seeds[f"pkl_{name}"] = _records(zipped, "/data.pkl")[0]
        for name, protocol in _PROTOCOL_SEEDS:
            zipped = _zip_bytes(objects[name], protocol)
            seeds[f"zip_p{protocol}_{name}"] = zipped
            seeds[f"pkl_p{protocol}_{name}"] = _records(zipped, "/data.pkl")[0]
        script = _torchscript_bytes()
        seeds["torchscript"] = script
        for i, pickle_bytes in enumerate(_records(script, ".pkl")):
            seeds[f"torchscript_pkl_{i}"] = pickle_bytes
        seeds.update(_safetensors_seeds())
    if include_attacks:
        import attacks

        for case in attacks.small_cases():
            seeds[f"attack_{case.name}"] = case.data
    return {name: data for name, data in seeds.items() if len(data) <= MAX_SEED_BYTES}


def write_seeds(directory: str, *, include_attacks: bool = True) -> int:
    """Write the seeds as files named by content hash (as libFuzzer names its corpus)."""
    os.makedirs(directory, exist_ok=True)
    count = 0
    for _name, data in sorted(seed_inputs(include_attacks=include_attacks).items()):
        path = os.path.join(directory, hashlib.sha1(data).hexdigest())
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        count += 1
    return count


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")
    print(f"wrote {write_seeds(target)} seeds to {target}")
