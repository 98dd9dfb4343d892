"""pyckpt.load follows torch 2.13's global settings and stream/legacy behaviour, like torch.load.

Each test runs torch.load(..., weights_only=True) and pyckpt.load on the same file, under
the same setting, and compares the results (nothing here hard-codes torch's answer):

* ``torch.serialization.set_default_load_endianness`` decides the byte order of zip files
  without a ``byteorder`` record (BIG, LITTLE, NATIVE, unset); a file with the record
  ignores the setting.
* ``torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)`` makes writes to tensors
  loaded with ``mmap=True`` reach the file; with MAP_PRIVATE, ``mmap=False`` or pyckpt's
  default ``mmap=None`` they never do.
* a file-like object holding several legacy checkpoints back to back is left just past
  each one, so they load one after another (io.BytesIO and a real file).
* legacy files with PyTorch 0.3-era storage views (crafted here, since torch no longer
  writes them) load with the same values, layouts and memory sharing between the views
  and their root storage.

Every setting changed here is put back afterwards.
"""

from __future__ import annotations

import collections
import io
import mmap as mmap_module
import pickle
import shutil
import struct
import warnings
import zipfile
from typing import Any, Callable

import factory
import pytest
import torch
from compare import assert_same

import pyckpt

serialization = torch.serialization


def torch_load(f, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(f, weights_only=True, **kwargs)


# ---------------------------------------------------------------------------------------
# 1. set_default_load_endianness, for zip files without a byteorder record
# ---------------------------------------------------------------------------------------


@pytest.fixture
def load_endianness():
    """Sets the default load endianness for one test and always restores the previous one."""
    before = serialization.get_default_load_endianness()
    try:
        yield serialization.set_default_load_endianness
    finally:
        serialization.set_default_load_endianness(before)
    assert serialization.get_default_load_endianness() == before


def endian_sensitive() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    floats = torch.randn(4, 6, generator=g)
    base = torch.arange(-20, 28, dtype=torch.int64).reshape(6, 8)
    return {
        "float32": floats,
        "int64": base,
        "int64_view": base[1:5, ::3],  # shares int64's storage
        "float16": floats.half(),
        "complex64": torch.complex(floats, floats * 3),
        "float64": floats.double().t(),
        "uint8": torch.arange(7, dtype=torch.uint8),  # one byte: order never matters
    }


def _without_byteorder(tmp_path) -> str:
    """torch.save's output re-zipped without its byteorder record (as torch < 2.1 wrote it).

    (torch.save's ``_disable_byteorder_record=True`` still writes the record in 2.13.)
    """
    original = factory.save(endian_sensitive(), tmp_path / "original.pt")
    path = factory.rezip(
        original, str(tmp_path / "rezipped.pt"), zipfile.ZIP_STORED,
        transform=lambda name, data: None if name.endswith("/byteorder") else data,
    )
    with zipfile.ZipFile(original) as z:
        kept = [name for name in z.namelist() if not name.endswith("/byteorder")]
    with zipfile.ZipFile(path) as z:
        assert z.namelist() == kept  # same records, same order, same top folder
    return path


ENDIANNESS = [None, "LITTLE", "BIG", "NATIVE"]


@pytest.mark.parametrize("endianness", ENDIANNESS)
def test_default_load_endianness_without_byteorder_record(backend, tmp_path, load_endianness, endianness):
    path = _without_byteorder(tmp_path)
    load_endianness(None if endianness is None else serialization.LoadEndianness[endianness])
    expected = torch_load(path)
    if endianness == "BIG":  # the setting matters for this file: torch swapped the bytes
        assert not torch.equal(expected["float32"], endian_sensitive()["float32"])
    for mmap in (None, True, False):
        assert_same(expected, pyckpt.load(path, mmap=mmap))
    with open(path, "rb") as f:
        data = f.read()
    assert_same(torch_load(io.BytesIO(data)), pyckpt.load(io.BytesIO(data)))


@pytest.mark.parametrize("endianness", ["BIG", "LITTLE"])
def test_byteorder_record_overrides_default_load_endianness(backend, tmp_path, load_endianness, endianness):
    path = factory.save(endian_sensitive(), tmp_path / "with_record.pt")
    load_endianness(serialization.LoadEndianness[endianness])
    expected = torch_load(path)
    for mmap in (None, True, False):
        assert_same(expected, pyckpt.load(path, mmap=mmap))


def test_load_endianness_setting_is_read_at_each_load(backend, tmp_path, load_endianness):
    """The same file, loaded under BIG then LITTLE then BIG, follows the setting each time."""
    path = _without_byteorder(tmp_path)
    for endianness in ("BIG", "LITTLE", "BIG"):
        load_endianness(serialization.LoadEndianness[endianness])
        assert_same(torch_load(path), pyckpt.load(path))


# ---------------------------------------------------------------------------------------
# 2. set_default_mmap_options(MAP_SHARED): writes reach the file only with mmap=True
# ---------------------------------------------------------------------------------------


@pytest.fixture
def mmap_options():
    """Checks that a test leaves the default mmap options as it found them (and restores them)."""
    before = serialization.get_default_mmap_options()
    try:
        yield
    finally:
        after = serialization.get_default_mmap_options()
        if after != before and before is not None:
            serialization.set_default_mmap_options(before)
    assert after == before, "a test left set_default_mmap_options changed"


def writable() -> dict[str, Any]:
    base = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    return {
        "float32": base,
        "view": base[1:3, 2:],  # shares float32's storage
        "int64": torch.arange(-8, 8, dtype=torch.int64),
        "float16": torch.linspace(-2, 2, 9).half(),
    }


def _write_into(obj: dict[str, Any]) -> None:
    with torch.no_grad():
        for key in sorted(obj):
            obj[key].add_(7)


def _load_write(load: Callable[[str], Any], path: str) -> tuple[bytes, Any, Any]:
    """Load ``path``, write into every tensor; the file's bytes, what torch re-reads, what was written."""
    obj = load(path)
    _write_into(obj)
    with open(path, "rb") as f:
        on_disk = f.read()
    return on_disk, torch_load(path), obj


@pytest.mark.parametrize("mmap", [True, None, False])
@pytest.mark.parametrize("flags", ["MAP_PRIVATE", "MAP_SHARED"])
def test_default_mmap_options(backend, tmp_path, mmap_options, flags, mmap):
    original = factory.save(writable(), tmp_path / "original.pt")
    with open(original, "rb") as f:
        original_bytes = f.read()
    torch_path = shutil.copy(original, tmp_path / "torch.pt")
    ours_path = shutil.copy(original, tmp_path / "pyckpt.pt")
    with serialization.set_default_mmap_options(getattr(mmap_module, flags)):
        torch_disk, torch_reread, torch_obj = _load_write(lambda p: torch_load(p, mmap=bool(mmap)), torch_path)
        ours_disk, ours_reread, ours_obj = _load_write(lambda p: pyckpt.load(p, mmap=mmap), ours_path)
    # the written values are in the loaded tensors either way
    assert_same(torch_obj, ours_obj)
    # and they reach the file exactly when they reach it with torch
    assert (ours_disk != original_bytes) == (torch_disk != original_bytes)
    assert ours_disk == torch_disk
    assert_same(torch_reread, ours_reread)
    if mmap is True and flags == "MAP_SHARED":
        assert torch_disk != original_bytes  # the case where writes do reach the file
    else:
        assert ours_disk == original_bytes, "a write to a loaded tensor changed the file"


def test_mmap_shared_writes_are_visible_to_a_second_load(backend, tmp_path, mmap_options):
    """Under MAP_SHARED two mmap=True loads of one file see each other's writes, as with torch."""
    results = {}
    for name, load in (("torch", lambda p: torch_load(p, mmap=True)), ("pyckpt", lambda p: pyckpt.load(p, mmap=True))):
        path = factory.save(writable(), tmp_path / f"{name}.pt")
        with serialization.set_default_mmap_options(mmap_module.MAP_SHARED):
            first, second = load(path), load(path)
            with torch.no_grad():
                first["int64"][3] = 12345
        results[name] = second
    assert_same(results["torch"], results["pyckpt"])


# ---------------------------------------------------------------------------------------
# 3. A stream of legacy checkpoints: each load leaves the stream just past its checkpoint
# ---------------------------------------------------------------------------------------


def stream_objects() -> list[Any]:
    base = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    return [
        {"weight": base, "bias": torch.zeros(5)},
        [torch.arange(6, dtype=torch.int64), "text", base[1:3]],
        base.t(),
        {"only_values": [1, 2.5, None, (3, "x")]},  # no storage at all
        collections.OrderedDict(tied=base, again=base, half=base.half()),
    ]


def _legacy_stream(prefix: bytes) -> bytes:
    buffer = io.BytesIO()
    buffer.write(prefix)
    for obj in stream_objects():
        torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _load_all(load: Callable[[Any], Any], f: Any, count: int) -> list[tuple[Any, int]]:
    out = []
    for _ in range(count):
        obj = load(f)
        out.append((obj, f.tell()))
    return out


@pytest.mark.parametrize("prefix", [b"", b"a header before the first checkpoint\n"])
@pytest.mark.parametrize("kind", ["bytesio", "file"])
def test_legacy_checkpoints_back_to_back_in_one_stream(backend, tmp_path, kind, prefix):
    data = _legacy_stream(prefix)
    path = tmp_path / "stream.bin"
    path.write_bytes(data)
    count = len(stream_objects())

    def open_stream():
        f = io.BytesIO(data) if kind == "bytesio" else open(path, "rb")
        f.seek(len(prefix))
        return f

    with open_stream() as f:
        expected = _load_all(torch_load, f, count)
    assert expected[-1][1] == len(data)  # torch read the whole stream, one checkpoint at a time
    with open_stream() as f:
        got = _load_all(pyckpt.load, f, count)
    assert [pos for _, pos in got] == [pos for _, pos in expected]
    for (expected_obj, _), (got_obj, _) in zip(expected, got):
        assert_same(expected_obj, got_obj)


# ---------------------------------------------------------------------------------------
# 4. Legacy files with PyTorch 0.3-era storage views
# ---------------------------------------------------------------------------------------

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
FIRST_ROOT = "140230001"  # sorts first: its bytes follow the storage key list
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


class RootStorage:
    """A storage as the legacy pickle names it: a key and its elements."""

    def __init__(self, key: str, values: torch.Tensor) -> None:
        self.key = key
        self.values = values.contiguous()


class StorageView:
    """A 0.3-era view: ``size`` elements of ``root`` from element ``offset``, under its own key."""

    def __init__(self, root: RootStorage, key: str, offset: int, size: int) -> None:
        self.root, self.key, self.offset, self.size = root, key, offset, size


class LegacyTensor:
    """Pickles as torch's _legacy_save pickles a tensor: _rebuild_tensor_v2 on the storage."""

    def __init__(self, storage: RootStorage | StorageView, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def craft_legacy(obj: Any, roots: list[RootStorage]) -> bytes:
    """The legacy format, with storage views in persistent ids (what torch 0.3 wrote)."""

    class ViewPickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> tuple | None:
            if isinstance(o, RootStorage):
                root, view = o, None
            elif isinstance(o, StorageView):
                root, view = o.root, (o.key, o.offset, o.size)
            else:
                return None
            storage_type = getattr(torch, _STORAGE_NAMES[root.values.dtype])
            return ("storage", storage_type, root.key, "cpu", root.values.numel(), view)

    f = io.BytesIO()
    pickle.dump(MAGIC_NUMBER, f, protocol=2)
    pickle.dump(PROTOCOL_VERSION, f, protocol=2)
    pickle.dump(SYS_INFO, f, protocol=2)
    ViewPickler(f, protocol=2).dump(obj)
    keys = sorted(root.key for root in roots)
    pickle.dump(keys, f, protocol=2)
    by_key = {root.key: root for root in roots}
    for key in keys:
        values = by_key[key].values
        f.write(struct.pack("<q", values.numel()))
        f.write(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return f.getvalue()


_STORAGE_NAMES = {
    torch.float32: "FloatStorage",
    torch.float64: "DoubleStorage",
    torch.int64: "LongStorage",
    torch.int16: "ShortStorage",
}


def storage_views_checkpoint(note: str = "0.3-era") -> dict[str, Any]:
    """Tensors on two views of one root, on the root itself, on overlapping views, and a
    second root (another dtype) with a view of its own."""
    floats = RootStorage(FIRST_ROOT, torch.arange(40, dtype=torch.float32) * 0.5)
    first = StorageView(floats, "140230100", 0, 16)  # elements 0..15
    second = StorageView(floats, "140230200", 12, 20)  # 12..31: overlaps first at 12..15
    disjoint = StorageView(floats, "140230300", 32, 8)  # 32..39
    longs = RootStorage("140230002", torch.arange(-6, 6, dtype=torch.int64) * 1000)
    long_view = StorageView(longs, "140230400", 3, 6)
    shorts = RootStorage("140230003", torch.arange(5, dtype=torch.int16))
    return {
        "first": LegacyTensor(first, 2, (3, 4), (4, 1)),
        "first_again": LegacyTensor(first, 0, (8,), (2,)),  # same view: same storage
        "second": LegacyTensor(second, 1, (4, 3), (1, 4)),
        "disjoint": LegacyTensor(disjoint, 0, (2, 4), (4, 1)),
        "root": LegacyTensor(floats, 10, (6,), (3,)),
        "whole_root": LegacyTensor(floats, 0, (40,), (1,)),
        "empty_on_view": LegacyTensor(second, 5, (0,), (1,)),
        "longs": [LegacyTensor(long_view, 1, (2, 2), (1, 2)), LegacyTensor(longs, 0, (12,), (1,))],
        "shorts_root": LegacyTensor(shorts, 1, (4,), (1,)),
        "values": {"epoch": 3, "name": note},
    }


def _roots(tree: dict[str, Any]) -> list[RootStorage]:
    found: dict[str, RootStorage] = {}

    def walk(node: Any) -> None:
        if isinstance(node, LegacyTensor):
            storage = node.args[0]
            root = storage.root if isinstance(storage, StorageView) else storage
            found[root.key] = root
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree)
    return list(found.values())


@pytest.fixture(params=["aligned", "unaligned"])
def storage_views_file(request, tmp_path) -> str:
    """The crafted file; "aligned" pads a string so the first root's bytes start at a
    multiple of 64 (pyckpt may then map it, and its views slice the mapping)."""
    want_aligned = request.param == "aligned"
    for pad in range(64):
        tree = storage_views_checkpoint("0.3-era" + "-" * pad)
        roots = _roots(tree)
        data = craft_legacy(tree, roots)
        stored = sum(8 + root.values.numel() * root.values.element_size() for root in roots)
        first_data = len(data) - stored + 8
        assert sorted(root.key for root in roots)[0] == FIRST_ROOT
        if (first_data % 64 == 0) == want_aligned:
            break
    else:
        raise AssertionError("no padding puts the first storage where wanted")
    path = tmp_path / "storage_views.pt"
    path.write_bytes(data)
    return str(path)


def _flat_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_flat_tensors(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(_flat_tensors(value, f"{prefix}[{i}]"))
    return out


def _aliasing(load: Callable[[], Any]) -> dict[str, dict[str, list[bool]]]:
    """For each tensor: write into it (in a fresh load) and record which elements of every
    tensor changed. Equal maps mean the same memory sharing, element by element."""
    names = list(_flat_tensors(load()))
    out = {}
    for name in names:
        tensors = _flat_tensors(load())
        before = {key: t.clone() for key, t in tensors.items()}
        with torch.no_grad():
            tensors[name].add_(1)
        out[name] = {key: (t != before[key]).flatten().tolist() for key, t in tensors.items()}
    return out


def test_crafted_storage_views_are_read_by_torch(storage_views_file):
    """The crafted file is a valid legacy file for torch, with views sharing the root's memory."""
    loaded = torch_load(storage_views_file)
    assert torch.equal(loaded["first"], torch.arange(2, 14, dtype=torch.float32).reshape(3, 4) * 0.5)
    assert torch.equal(loaded["second"], (torch.arange(13, 25, dtype=torch.float32) * 0.5).reshape(3, 4).t())
    assert loaded["values"]["epoch"] == 3
    changed = _aliasing(lambda: torch_load(storage_views_file))["first"]
    assert any(changed["second"]) and any(changed["root"]) and not any(changed["disjoint"])


@pytest.mark.parametrize("mmap", [None, False])
def test_legacy_storage_views_like_torch(backend, storage_views_file, mmap):
    expected = torch_load(storage_views_file)
    assert_same(expected, pyckpt.load(storage_views_file, mmap=mmap))
    assert _aliasing(lambda: pyckpt.load(storage_views_file, mmap=mmap)) == _aliasing(
        lambda: torch_load(storage_views_file)
    )


def test_legacy_storage_views_from_a_buffer(backend, storage_views_file):
    with open(storage_views_file, "rb") as f:
        data = f.read()
    torch_buffer, buffer = io.BytesIO(data), io.BytesIO(data)
    assert_same(torch_load(torch_buffer), pyckpt.load(buffer))
    assert buffer.tell() == torch_buffer.tell()
    assert _aliasing(lambda: pyckpt.load(io.BytesIO(data))) == _aliasing(lambda: torch_load(io.BytesIO(data)))
