"""pyckpt.load returns what torch.load(weights_only=True) returns, on both backends."""

from __future__ import annotations

import io
import os
import warnings
import zipfile

import factory
import pytest
import torch
from compare import assert_same

import pyckpt


def torch_load(f, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(f, weights_only=True, **kwargs)


@pytest.mark.parametrize("case", sorted(factory.OBJECT_CASES))
@pytest.mark.parametrize("mmap", [None, True, False])
def test_parity_with_torch(backend, tmp_path, case, mmap):
    path = factory.save(factory.OBJECT_CASES[case](), tmp_path / f"{case}.pt")
    expected = torch_load(path)
    got = pyckpt.load(path, mmap=mmap)
    assert_same(expected, got)


@pytest.mark.parametrize("case", ["classic_dtypes", "views", "shared", "training_checkpoint", "exotic", "plain_values"])
def test_legacy_format(backend, tmp_path, case):
    path = factory.save(factory.OBJECT_CASES[case](), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        assert not zipfile.is_zipfile(f)
    assert_same(torch_load(path), pyckpt.load(path))


def _nested_tensors() -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        ragged = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(1, 3), torch.randn(4, 3)])
    # What the Python fuzzer found: an entry whose huge size is multiplied by a zero, so it
    # holds no elements. torch accepts it; sizes, strides and offsets must come back as given.
    empty_but_huge = torch._nested_view_from_buffer(
        torch.ones(1), torch.tensor([[2**55, 0]]), torch.tensor([[1, 1]]), torch.tensor([0])
    )
    return {"ragged": ragged, "empty_but_huge": empty_but_huge}


@pytest.mark.parametrize("mmap", [None, True])
def test_nested_tensors_keep_their_sizes_strides_and_buffer(backend, tmp_path, mmap):
    path = factory.save(_nested_tensors(), tmp_path / "nested.pt")
    expected = torch_load(path)
    got = pyckpt.load(path, mmap=mmap)
    assert got["ragged"].is_nested and got["ragged"]._nested_tensor_size().tolist() == [[2, 3], [1, 3], [4, 3]]
    assert_same(expected, got)


def test_buffer_saved_file_uses_archive_folder(backend, tmp_path):
    data = factory.save_to_buffer(factory.views())
    assert zipfile.ZipFile(io.BytesIO(data)).namelist()[0].startswith("archive/")
    path = tmp_path / "renamed_on_disk.pt"
    path.write_bytes(data)
    assert_same(torch_load(path), pyckpt.load(path))
    assert_same(torch_load(io.BytesIO(data)), pyckpt.load(io.BytesIO(data)))


def test_file_like_objects(backend, tmp_path):
    path = factory.save(factory.shared(), tmp_path / "f.pt")
    with open(path, "rb") as f:
        got = pyckpt.load(f)
    assert_same(torch_load(path), got)


@pytest.mark.parametrize("name", ["modèle-ü.pt", "模型.pt", "имя файла.pt"])
def test_non_ascii_file_names(backend, tmp_path, name):
    path = factory.save(factory.shared(), tmp_path / name)
    assert_same(torch_load(path), pyckpt.load(path))


def test_twenty_thousand_tensors(backend, tmp_path):
    path = factory.save(factory.many_tensors(20_000), tmp_path / "many.pt")
    expected = torch_load(path)
    got = pyckpt.load(path)
    assert len(got) == 20_000
    assert_same(expected, got)


def test_deflate_rezipped_file(backend, tmp_path):
    original = factory.save(factory.OBJECT_CASES["every_dtype"](), tmp_path / "orig.pt")
    path = factory.rezip(original, str(tmp_path / "deflated.pt"), zipfile.ZIP_DEFLATED)
    expected = torch_load(original)
    assert_same(expected, torch_load(path))
    for mmap in (None, True, False):
        assert_same(expected, pyckpt.load(path, mmap=mmap))


def test_torch_mmap_returns_garbage_on_deflate_but_pyckpt_does_not(backend, tmp_path):
    """The bug pyckpt exists to avoid: torch maps compressed bytes as if they were raw."""
    tensor = torch.arange(4096, dtype=torch.float32)
    original = factory.save({"t": tensor}, tmp_path / "orig.pt")
    path = factory.rezip(original, str(tmp_path / "deflated.pt"), zipfile.ZIP_DEFLATED)
    try:
        wrong = torch_load(path, mmap=True)["t"]
        assert not torch.equal(wrong, tensor)
    except RuntimeError:
        pass  # a newer torch may refuse instead; either way pyckpt must be right
    assert torch.equal(pyckpt.load(path, mmap=True)["t"], tensor)


def test_unaligned_rezipped_file(backend, tmp_path):
    original = factory.save(factory.OBJECT_CASES["every_dtype"](), tmp_path / "orig.pt")
    path = factory.rezip(original, str(tmp_path / "unaligned.pt"), zipfile.ZIP_STORED)
    assert any(offset % 64 for offset in factory.data_offsets(path))
    expected = torch_load(original)
    for mmap in (None, True, False):
        assert_same(expected, pyckpt.load(path, mmap=mmap))


def test_without_byteorder_record(backend, tmp_path):
    """Files from torch < 2.1 have no byteorder record: they are little-endian."""
    original = factory.save(factory.every_dtype(), tmp_path / "o.pt")
    path = factory.rezip(
        original, str(tmp_path / "nbo.pt"), zipfile.ZIP_STORED,
        transform=lambda name, data: None if name.endswith("/byteorder") else data,
    )
    with zipfile.ZipFile(path) as z:
        assert not any(n.endswith("/byteorder") for n in z.namelist())
    assert_same(torch_load(path), pyckpt.load(path))


def test_big_endian_file_is_byteswapped_like_torch(backend, tmp_path):
    obj = {k: v for k, v in factory.every_dtype().items()}
    original = factory.save(obj, tmp_path / "le.pt")
    with pyckpt._backend.use_backend("python"):
        from pyckpt.index import index_checkpoint
        from pyckpt.index.zip_format import swap_width

        with index_checkpoint(original) as index:
            widths = {key: swap_width(record) for key, record in index.storages.items()}
    path = factory.make_big_endian(original, str(tmp_path / "be.pt"), widths)
    expected = torch_load(path)
    for mmap in (None, True, False):
        got = pyckpt.load(path, mmap=mmap)
        assert_same(expected, got)
    # torch swaps typed storages only; for those, the values are the original ones.
    assert torch.equal(got["float32"], obj["float32"])
    assert torch.equal(got["complex128"], obj["complex128"])


def test_torchscript_archive_gives_state_dict(backend, tmp_path):
    net = factory.seeded_net()
    path = str(tmp_path / "scripted.pt")
    torch.jit.script(net).save(path)
    expected = torch.jit.load(path).state_dict()
    got = pyckpt.load(path)
    assert type(got) is type(expected)
    assert_same(expected, got)
    assert got._metadata == expected._metadata


def test_torchscript_is_read_without_running_torchscript(backend, tmp_path, monkeypatch):
    path = str(tmp_path / "scripted.pt")
    torch.jit.script(factory.seeded_net()).save(path)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch._C, "import_ir_module", forbidden, raising=False)
    assert "block.0.weight" in pyckpt.load(path)


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}, "meta"],
    ids=["str", "device", "dict", "dict-unmatched", "meta"],
)
def test_map_location_forms(backend, tmp_path, map_location):
    path = factory.save(factory.shared(), tmp_path / "s.pt")
    assert_same(torch_load(path, map_location=map_location), pyckpt.load(path, map_location=map_location))


def test_map_location_callable_sees_cpu_storage_and_location(backend, tmp_path):
    path = factory.save(factory.shared(), tmp_path / "s.pt")
    seen = []

    def where(storage, location):
        seen.append((type(storage).__name__, storage.device.type, location))
        return None

    assert_same(torch_load(path, map_location=lambda s, loc: None), pyckpt.load(path, map_location=where))
    assert seen and all(entry == ("UntypedStorage", "cpu", "cpu") for entry in seen)


def test_map_location_to_missing_cuda_fails_like_torch(backend, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    path = factory.save(factory.shared(), tmp_path / "s.pt")
    with pytest.raises(RuntimeError) as torch_error:
        torch_load(path, map_location="cuda")
    with pytest.raises(RuntimeError) as ours:
        pyckpt.load(path, map_location="cuda")
    assert str(ours.value) == str(torch_error.value)


def _file_backed_by(tensor: torch.Tensor, path: str) -> bool:
    """Whether the tensor's memory lies in a mapping of ``path`` (read from /proc/self/maps)."""
    address = tensor.untyped_storage().data_ptr()
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end:
                return len(parts) == 6 and parts[5].strip() == real
    return False


def test_mmap_true_is_zero_copy_and_false_owns_memory(backend, tmp_path):
    path = factory.save({"w": torch.randn(256, 256), "b": torch.randn(256)}, tmp_path / "m.pt")
    mapped = pyckpt.load(path, mmap=True)
    assert all(_file_backed_by(t, path) for t in mapped.values())
    chosen = pyckpt.load(path)  # None: pyckpt maps on CPU when it can
    assert all(_file_backed_by(t, path) for t in chosen.values())
    owned = pyckpt.load(path, mmap=False)
    assert not any(_file_backed_by(t, path) for t in owned.values())
    # Writing to a mapped tensor never modifies the file (copy-on-write mapping).
    before = open(path, "rb").read()
    mapped["w"].add_(1)
    assert open(path, "rb").read() == before


def test_mmap_true_reads_unmappable_records(backend, tmp_path):
    tensor = torch.randn(64, 64)
    original = factory.save({"t": tensor}, tmp_path / "o.pt")
    path = factory.rezip(original, str(tmp_path / "d.pt"), zipfile.ZIP_DEFLATED)
    got = pyckpt.load(path, mmap=True)["t"]
    assert torch.equal(got, tensor) and not _file_backed_by(got, path)


def test_mmap_needs_a_path(backend):
    with pytest.raises(ValueError, match="file path"):
        pyckpt.load(io.BytesIO(factory.save_to_buffer({})), mmap=True)


def test_weights_only_false_delegates_to_torch_with_warning(backend, tmp_path):
    path = factory.save(factory.shared(), tmp_path / "s.pt")
    with pytest.warns(UserWarning, match="arbitrary code"):
        got = pyckpt.load(path, weights_only=False, strip_prefix="auto")
    assert_same(torch.load(path, weights_only=False), got)


@pytest.mark.slow
def test_zip64_file_over_4_gib(backend, tmp_path):
    big = torch.ones(1_100_000_000, dtype=torch.float32)  # 4.4 GB
    path = factory.save({"big": big, "small": torch.arange(5)}, tmp_path / "big.pt")
    del big
    got = pyckpt.load(path, mmap=True)
    assert got["big"].numel() == 1_100_000_000
    assert got["big"][-3:].tolist() == [1.0, 1.0, 1.0]
    assert got["small"].tolist() == list(range(5))


def test_requires_grad_on_an_integer_tensor_is_a_checkpoint_error(backend, tmp_path):
    """torch refuses to make such a tensor (a RuntimeError in torch.load); the bulk tensor
    maker must not let that escape: the per-record builder names the key instead."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"ints": torch.arange(4)}, buf)
    source = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path = tmp_path / "grad_ints.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(b"\x89") == 1  # the tensor's requires_grad=False
                data = data.replace(b"\x89", b"\x88")
            out.writestr(info.filename, data)
    with pytest.raises(RuntimeError, match="require gradients"):
        torch.load(path, weights_only=True)
    for mmap in (None, False, True):
        with pytest.raises(pyckpt.CheckpointError, match="require gradients"):
            pyckpt.load(path, mmap=mmap)
