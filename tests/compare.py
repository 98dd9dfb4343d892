"""Deep comparison of what pyckpt returns against what torch returns for the same file."""

from __future__ import annotations

from typing import Any

import torch

from pyckpt import Opaque


def storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return untyped_bytes(tensor.untyped_storage())


def untyped_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    if storage.device.type == "meta":
        return torch.empty(0, dtype=torch.uint8)
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device)
    whole.set_(storage)
    return whole.cpu()


def assert_same_tensor(expected: torch.Tensor, got: torch.Tensor, path: str = "") -> None:
    where = path or "<root>"
    assert type(got) is type(expected), f"{where}: type {type(got)} != {type(expected)}"
    assert got.dtype == expected.dtype, f"{where}: dtype {got.dtype} != {expected.dtype}"
    assert got.device == expected.device, f"{where}: device {got.device} != {expected.device}"
    assert got.layout == expected.layout, f"{where}: layout"
    assert got.is_nested == expected.is_nested, f"{where}: is_nested"
    if expected.is_nested:
        # A nested tensor has no one shape or stride (asking raises): compare its per-entry
        # metadata and its one buffer instead.
        for what in ("_nested_tensor_size", "_nested_tensor_strides", "_nested_tensor_storage_offsets"):
            assert torch.equal(getattr(got, what)(), getattr(expected, what)()), f"{where}: nested {what}"
        assert got.requires_grad == expected.requires_grad, f"{where}: requires_grad"
        assert torch.equal(storage_bytes(got), storage_bytes(expected)), f"{where}: nested buffer bytes differ"
        return
    assert got.shape == expected.shape, f"{where}: shape {got.shape} != {expected.shape}"
    assert got.requires_grad == expected.requires_grad, f"{where}: requires_grad"
    if expected.is_quantized:
        assert got.qscheme() == expected.qscheme()
        assert torch.equal(got.int_repr(), expected.int_repr()), f"{where}: quantized values"
        return
    if expected.layout != torch.strided:
        # Part by part, not through to_dense(): a valid sparse tensor may have a size whose
        # dense form would not fit in memory.
        for part, got_part, expected_part in _sparse_parts(got, expected):
            assert torch.equal(got_part, expected_part), f"{where}: sparse {part}"
        return
    assert got.stride() == expected.stride(), f"{where}: stride {got.stride()} != {expected.stride()}"
    assert got.storage_offset() == expected.storage_offset(), f"{where}: storage offset"
    assert got.is_conj() == expected.is_conj(), f"{where}: conj bit"
    assert got.is_neg() == expected.is_neg(), f"{where}: neg bit"
    assert got.untyped_storage().nbytes() == expected.untyped_storage().nbytes(), f"{where}: storage size"
    assert torch.equal(storage_bytes(got), storage_bytes(expected)), f"{where}: storage bytes differ"


def _sparse_parts(got: torch.Tensor, expected: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if expected.layout == torch.sparse_coo:
        assert got.is_coalesced() == expected.is_coalesced(), "sparse coalesced flag"
        names = ("_indices", "_values")
    elif expected.layout in (torch.sparse_csr, torch.sparse_bsr):
        names = ("crow_indices", "col_indices", "values")
    else:  # sparse_csc, sparse_bsc
        names = ("ccol_indices", "row_indices", "values")
    return [(name, getattr(got, name)(), getattr(expected, name)()) for name in names]


def assert_same(expected: Any, got: Any, path: str = "") -> None:
    """Same types, values, tensor layouts, ``_metadata``/attributes, and object sharing."""
    tensors: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    identity: dict[int, int] = {}
    _compare(expected, got, path, tensors, identity, 0)
    _assert_same_sharing(tensors)


def _compare(expected: Any, got: Any, path: str, tensors: list, identity: dict, depth: int) -> None:
    assert depth < 200, f"{path}: comparison nests too deep"
    where = path or "<root>"
    assert type(got) is type(expected), f"{where}: type {type(got).__name__} != {type(expected).__name__}"
    if id(expected) in identity and not isinstance(expected, (int, float, str, bool, type(None))):
        assert identity[id(expected)] == id(got), f"{where}: object sharing differs"
        return
    identity[id(expected)] = id(got)
    if isinstance(expected, torch.Tensor):
        assert_same_tensor(expected, got, path)
        tensors.append((expected, got, where))
        attrs = {k: v for k, v in vars(expected).items() if not k.startswith("_")}
        got_attrs = {k: v for k, v in vars(got).items() if not k.startswith("_")}
        assert attrs.keys() == got_attrs.keys(), f"{where}: tensor attributes"
        for key in attrs:
            _compare(attrs[key], got_attrs[key], f"{where}.{key}", tensors, identity, depth + 1)
    elif isinstance(expected, torch.storage.TypedStorage):
        assert got.dtype == expected.dtype and got.nbytes() == expected.nbytes()
        assert torch.equal(untyped_bytes(got._untyped_storage), untyped_bytes(expected._untyped_storage))
    elif isinstance(expected, dict):
        assert list(got.keys()) == list(expected.keys()), f"{where}: keys {list(got)[:5]} != {list(expected)[:5]}"
        for key in expected:
            _compare(expected[key], got[key], f"{path}/{key}", tensors, identity, depth + 1)
        assert getattr(got, "__dict__", {}) == getattr(expected, "__dict__", {}), f"{where}: mapping attributes (_metadata)"
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), f"{where}: length"
        for i, (a, b) in enumerate(zip(expected, got)):
            _compare(a, b, f"{path}[{i}]", tensors, identity, depth + 1)
    elif isinstance(expected, Opaque):
        for field in ("module", "name", "new_object"):
            assert getattr(got, field) == getattr(expected, field), (
                f"{where}: {field} {getattr(got, field)!r} != {getattr(expected, field)!r}"
            )
        for field in ("args", "kwargs", "state", "items", "dict_items"):
            _compare(getattr(expected, field), getattr(got, field), f"{path}<{field}>", tensors, identity, depth + 1)
    elif isinstance(expected, float) and expected != expected:
        assert got != got, f"{where}: NaN"
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def _assert_same_sharing(tensors: list[tuple[torch.Tensor, torch.Tensor, str]]) -> None:
    """Tensors share a storage in pyckpt's result exactly when they share one in torch's."""
    expected_groups: dict[tuple, int] = {}
    got_groups: dict[tuple, int] = {}
    for expected, got, where in tensors:
        if expected.layout != torch.strided or expected.is_quantized or expected.device.type == "meta":
            continue
        e = expected_groups.setdefault(_storage_id(expected), len(expected_groups))
        g = got_groups.setdefault(_storage_id(got), len(got_groups))
        assert e == g, f"{where}: storage sharing differs from torch"


def _storage_id(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (storage.device.type, storage.data_ptr(), storage.nbytes())
