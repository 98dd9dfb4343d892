"""Where index symbols become torch objects: the one bridge from names to torch.

Every symbol is looked up in the *installed* torch's ``weights_only`` allowlist, so what
pyckpt materialises is exactly what ``torch.load(weights_only=True)`` would have produced.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from ..index.symbols import DType, Symbol


@functools.lru_cache(maxsize=1)
def _torch_allowlist() -> dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return dict(_get_allowed_globals())


def torch_dtype(dtype: DType) -> torch.dtype:
    value = getattr(torch, dtype.name, None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(f"dtype {dtype} does not exist in torch {torch.__version__}")
    return value


@functools.lru_cache(maxsize=1)
def torch_dtypes() -> dict[str, torch.dtype]:
    """Every dtype the index knows that this torch has, by name."""
    from ..index.symbols import DTYPES

    return {name: value for name in DTYPES if isinstance(value := getattr(torch, name, None), torch.dtype)}


def same_dtype(dtype: DType, value: torch.dtype) -> bool:
    return getattr(torch, dtype.name, None) == value


def takes_bytes_as_they_are(tensor: torch.Tensor) -> bool:
    """Dense, contiguous memory with no conj/neg bit to resolve: a file's row-major bytes of
    its dtype can be written into it directly."""
    return tensor.layout == torch.strided and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()


def torch_object(name: Symbol) -> Any:
    value = _torch_allowlist().get(name.name)
    if value is None:
        raise UnsafeCheckpointError(
            f"global {name.name} is not on the weights_only allowlist of torch {torch.__version__}"
        )
    return value


def user_trusted_globals() -> dict[str, Any]:
    """What the user registered with ``torch.serialization.add_safe_globals``, by name.

    Read when a tree is built, as torch reads it at load time, so ``with safe_globals([...])``
    counts.
    """
    from torch._weights_only_unpickler import _get_user_allowed_globals

    return dict(_get_user_allowed_globals())
