"""Checkpoints for the tests, made with torch.save (and rewritten where a case needs it)."""

from __future__ import annotations

import collections
import io
import os
import struct
import zipfile
from typing import Any, Callable

import torch
from torch import nn

# ---------------------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------------------


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=g)
    ints = torch.randint(-100, 100, (3, 5), generator=g)
    out: dict[str, torch.Tensor] = {
        "float32": floats,
        "float64": floats.double(),
        "float16": floats.half(),
        "bfloat16": floats.bfloat16(),
        "complex64": torch.complex(floats, -floats),
        "complex128": torch.complex(floats, floats).to(torch.complex128),
        "complex32": torch.complex(floats, floats).to(torch.complex32),
        "bool": floats > 0,
        "int8": ints.to(torch.int8),
        "int16": ints.to(torch.int16),
        "int32": ints.to(torch.int32),
        "int64": ints,
        "uint8": ints.abs().to(torch.uint8),
        "uint16": (ints.abs() * 300).to(torch.uint16),
        "uint32": (ints.abs() * 70000).to(torch.uint32),
        "uint64": (ints.abs() * 2**40).to(torch.uint64),
    }
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
        dtype = getattr(torch, name, None)
        if dtype is not None:
            out[name] = floats.abs().to(dtype)
    raw = ints.abs().to(torch.uint8)
    for name in ("float4_e2m1fn_x2", "bits8"):
        dtype = getattr(torch, name, None)
        if dtype is not None:
            out[name] = raw.view(dtype)
    out["bits16"] = ints.to(torch.int16).view(torch.bits16)
    return out


CLASSIC_DTYPES = {
    "float32", "float64", "float16", "bfloat16", "complex64", "complex128", "bool",
    "int8", "int16", "int32", "int64", "uint8",
}


def classic_dtypes() -> dict[str, torch.Tensor]:
    """The dtypes with typed storage classes: the only ones torch's legacy format can load."""
    return {k: v for k, v in every_dtype().items() if k in CLASSIC_DTYPES}


def views() -> dict[str, Any]:
    base = torch.arange(120, dtype=torch.float32).reshape(4, 5, 6)
    big = torch.arange(100_000, dtype=torch.int32)
    return {
        "base": base,
        "transposed": base.transpose(0, 2),
        "sliced": base[1:3, ::2, 1::3],
        "offset": base.view(-1)[17:29],
        "expanded": torch.tensor([1.5, 2.5]).expand(4, 2),  # stride 0
        "zero_stride_row": base[0, 0].unsqueeze(0).expand(3, 6),
        "small_slice_of_large": big[50_000:50_004],
        "empty": torch.empty(0, 3),
        "empty_view": base[:, :0],
        "scalar": torch.tensor(3.25),
        "scalar_view": base[1, 2, 3],
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    }


def shared() -> dict[str, Any]:
    embedding = torch.randn(10, 4)
    base = torch.randn(6, 6)
    return collections.OrderedDict(
        [
            ("embed.weight", embedding),
            ("head.weight", embedding),  # tied: the same tensor twice
            ("a", base[:3]),
            ("b", base[3:]),
            ("c", base.t()),
        ]
    )


def parameters() -> dict[str, Any]:
    return {
        "param": nn.Parameter(torch.randn(3, 2)),
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "grad_tensor": torch.randn(4, requires_grad=True),
        "param_view_base": nn.Parameter(torch.randn(4, 4)),
    }


def conj_neg() -> dict[str, Any]:
    z = torch.complex(torch.randn(5), torch.randn(5))
    return {"z": z, "conj": z.conj(), "neg": torch._neg_view(torch.randn(5)), "conj_slice": z.conj()[1:4]}


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
        self.head = nn.Linear(width, 16, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x).mean(1))) * self.scale


def seeded_net(seed: int = 0, width: int = 8) -> Net:
    torch.manual_seed(seed)
    net = Net(width)
    with torch.no_grad():
        for buffer in net.buffers():
            if buffer.is_floating_point():
                buffer.uniform_()
        net.block[1].num_batches_tracked.fill_(7)
    return net


def training_checkpoint() -> dict[str, Any]:
    net = seeded_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randint(0, 16, (4, 3))).sum().backward()
    optimizer.step()
    return {
        "epoch": 3,
        "state_dict": dp_state_dict(net),
        "optimizer": optimizer.state_dict(),
        "hparams": {"lr": 0.1, "name": "run-α", "layers": [1, 2, 3], "nothing": None},
        "rng": torch.get_rng_state(),
    }


def plain_values() -> dict[str, Any]:
    return {
        "ints": [0, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**63 - 1, -(2**63), 2**100, -(2**70)],
        "floats": [0.0, -1.5, 1e308, float("inf"), float("-inf")],
        "strings": ["", "ascii", "ünïcödé", "🐍 non-BMP", "x" * 300],
        "bytes": b"\x00\x01\xffbinary",
        "bool": [True, False, None],
        "tuple": (1, (2, (3,))),
        "set": {1, 2, 3},
        "complex": complex(1.5, -2.0),
        "size": torch.Size([2, 3, 4]),
        "device": torch.device("cuda", 1),
        "dtype": torch.bfloat16,
        "counter": collections.Counter({"a": 2, "b": 1}),
        "nested": {"a": {"b": {"c": [torch.ones(2)]}}},
        1: "int key",
        (1, 2): "tuple key",
    }


def exotic() -> dict[str, Any]:
    """Rebuilds pyckpt leaves to torch's own functions: quantized, sparse, tensor attributes."""
    t = torch.randn(3)
    t.note = "attribute"  # _rebuild_from_type_v2
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.quint8)
    coo = torch.sparse_coo_tensor([[0, 1, 2], [2, 0, 1]], [1.0, 2.0, 3.0], (3, 3))
    csr = torch.tensor([[0.0, 1.0], [2.0, 0.0]]).to_sparse_csr()
    return {"with_attr": t, "quantized": q, "coo": coo, "csr": csr}


def many_tensors(count: int = 20_000) -> dict[str, torch.Tensor]:
    return collections.OrderedDict((f"layer.{i}.weight", torch.full((2,), float(i))) for i in range(count))


OBJECT_CASES: dict[str, Callable[[], Any]] = {
    "every_dtype": every_dtype,
    "classic_dtypes": classic_dtypes,
    "views": views,
    "shared": shared,
    "parameters": parameters,
    "conj_neg": conj_neg,
    "training_checkpoint": training_checkpoint,
    "plain_values": plain_values,
    "exotic": exotic,
    "module_state_dict": lambda: seeded_net().state_dict(),
    "list": lambda: [torch.ones(2), torch.zeros(3), {"x": torch.arange(3)}],
    "bare_tensor": lambda: torch.arange(10.0).reshape(2, 5)[:, 1:],
}

# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def dp_state_dict(module: nn.Module) -> dict[str, Any]:
    """What ``nn.DataParallel(module).state_dict()`` gives (``module.`` keys, the same
    ``_metadata``), with the tensors left where they are: with one GPU, DataParallel moves its
    module to cuda:0, and the tests' checkpoints would hold CUDA tensors where they expect host ones."""
    wrapper = nn.Module()
    wrapper.module = module
    return wrapper.state_dict()


def save(obj: Any, path: str | os.PathLike[str], **kwargs: Any) -> str:
    torch.save(obj, path, **kwargs)
    return os.fspath(path)


def save_to_buffer(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rezip(
    src: str, dst: str, compression: int, *, transform: Callable[[str, bytes], bytes | None] | None = None
) -> str:
    """Copy a torch zip record by record with Python's zipfile (no 64-byte alignment).

    ``transform`` may rewrite a record's bytes, or return None to drop the record.
    """
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w", compression=compression) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if transform is not None:
                data = transform(info.filename, data)
                if data is None:
                    continue
            target.writestr(info.filename, data, compress_type=compression)
    return dst


def make_big_endian(src: str, dst: str, storage_widths: dict[str, int]) -> str:
    """Rewrite a little-endian checkpoint as a big-endian one (what torch writes on s390x)."""

    def transform(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/data/", 1)[-1] if "/data/" in name else None
        width = storage_widths.get(key) if key is not None else None
        if width and width > 1:
            count = len(data) // width
            fmt = {2: "H", 4: "I", 8: "Q"}[width]
            return struct.pack(f">{count}{fmt}", *struct.unpack(f"<{count}{fmt}", data))
        return data

    return rezip(src, dst, zipfile.ZIP_STORED, transform=transform)


def data_offsets(path: str) -> list[int]:
    """Offsets of each data/ record's bytes (to show a file really is unaligned)."""
    offsets = []
    with open(path, "rb") as f, zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset + 26)
                name_length, extra_length = struct.unpack("<HH", f.read(4))
                offsets.append(info.header_offset + 30 + name_length + extra_length)
    return offsets
