"""The native and the Python index produce the same records, before any tensor is read."""

from __future__ import annotations

import dataclasses
import io
import zipfile

import factory
import pytest
import torch

from conftest import require_backend
from pyckpt._backend import native_backend, python_backend
from pyckpt.index import index_checkpoint
from pyckpt.index.records import CallRecord, ParameterRecord, ScriptObject, StorageRecord, StorageRef, TensorRecord


@pytest.fixture
def both():
    require_backend("native")
    return native_backend(), python_backend()


def _record_fields(record):
    out = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, StorageRecord):
            value = value.key
        out[field.name] = value
    return out


def assert_same_records(a, b, path="", seen=None):
    """Structural equality of two index trees, records compared field by field."""
    seen = {} if seen is None else seen
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if id(a) in seen:
        assert seen[id(a)] is b, f"{path}: sharing differs"
        return
    if not isinstance(a, (int, float, str, bool, type(None))):
        seen[id(a)] = b
    if isinstance(a, (TensorRecord, StorageRecord, StorageRef)):
        assert _record_fields(a) == _record_fields(b), path
        if isinstance(a, TensorRecord):
            assert_same_records(a.storage, b.storage, path + ".storage", seen)
    elif isinstance(a, ParameterRecord):
        assert a.requires_grad == b.requires_grad
        assert_same_records(a.data, b.data, path + ".data", seen)
        assert_same_records(a.state, b.state, path + ".state", seen)
    elif isinstance(a, CallRecord):
        assert a.func is b.func and a.new_object == b.new_object
        assert_same_records(a.args, b.args, path + ".args", seen)
        assert_same_records(a.build_states, b.build_states, path + ".builds", seen)
    elif isinstance(a, ScriptObject):
        assert a.qualified_name == b.qualified_name
        assert_same_records(a.state, b.state, path + ".state", seen)
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_same_records(a[key], b[key], f"{path}/{key}", seen)
        if hasattr(a, "__dict__") or hasattr(b, "__dict__"):
            assert_same_records(dict(vars(a)), dict(vars(b)), path + ".__dict__", seen)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_records(x, y, f"{path}[{i}]", seen)
    elif isinstance(a, set):
        assert len(a) == len(b)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_same_index(native, python, f_native, f_python):
    with index_checkpoint(f_native, native) as a, index_checkpoint(f_python, python) as b:
        assert (a.format, a.top_folder, a.byteorder) == (b.format, b.top_folder, b.byteorder)
        assert a.entries == b.entries
        assert list(a.storages) == list(b.storages)
        for key in a.storages:
            assert _record_fields(a.storages[key]) == _record_fields(b.storages[key])
        assert_same_records(a.root, b.root)


@pytest.mark.parametrize("case", sorted(factory.OBJECT_CASES))
def test_zip_index_parity(both, tmp_path, case):
    path = factory.save(factory.OBJECT_CASES[case](), tmp_path / f"{case}.pt")
    assert_same_index(*both, path, path)


def test_buffer_index_parity(both):
    data = factory.save_to_buffer(factory.training_checkpoint())
    assert_same_index(*both, io.BytesIO(data), io.BytesIO(data))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_rezipped_index_parity(both, tmp_path, compression):
    original = factory.save(factory.every_dtype(), tmp_path / "o.pt")
    path = factory.rezip(original, str(tmp_path / "r.pt"), compression)
    assert_same_index(*both, path, path)


def test_legacy_index_parity(both, tmp_path):
    path = factory.save(factory.training_checkpoint(), tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    assert_same_index(*both, path, path)


def test_torchscript_index_parity(both, tmp_path):
    path = str(tmp_path / "s.pt")
    torch.jit.script(factory.seeded_net()).save(path)
    assert_same_index(*both, path, path)


def test_index_reads_no_tensor_bytes(both, tmp_path, monkeypatch):
    """Indexing touches metadata records only: every read lies outside the storage data."""
    path = factory.save({"w": torch.randn(1024, 1024)}, tmp_path / "w.pt")
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    from pyckpt.index.source import FileSource

    reads = []
    real_read = FileSource._read

    def tracking(self, offset, length):
        reads.append((offset, length))
        return real_read(self, offset, length)

    monkeypatch.setattr(FileSource, "_read", tracking)
    with index_checkpoint(path, both[1]) as index:
        record = index.storages["0"]
    start, end = record.data_offset, record.data_offset + record.nbytes
    assert end - start == 1024 * 1024 * 4 and info.file_size == end - start
    assert all(offset + length <= start or offset >= end for offset, length in reads)
