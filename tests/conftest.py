"""Shared fixtures: every behaviour test runs on both backends.

With the extension built, the ``native`` parameter must work: a missing or broken
extension fails those tests instead of silently falling back. With
``PYCKPT_DISABLE_EXT=1`` the native parameter is skipped and the default path is Python.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import pyckpt  # noqa: E402
from pyckpt._backend import native_backend, use_backend  # noqa: E402

EXT_DISABLED = os.environ.get("PYCKPT_DISABLE_EXT", "").strip() in ("1", "true", "yes", "on")
BACKENDS = ["native", "python"]


def require_backend(name: str) -> None:
    if name == "native":
        if EXT_DISABLED:
            pytest.skip("PYCKPT_DISABLE_EXT=1 switches the native backend off for this run")
        if native_backend() is None:
            pytest.fail(f"native extension is not available: {pyckpt.backend_info().reason}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    """Run the test with ``pyckpt``'s public API on the given backend."""
    require_backend(request.param)
    with use_backend(request.param):
        yield request.param


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: multi-GB or long-running; run with -m slow")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    # torch's own notices about the exotic tensors the tests build on purpose
    for pattern in (
        "ignore:Sparse invariant checks:UserWarning",
        "ignore:Sparse CSR tensor support:UserWarning",
        "ignore:.*quantize_per_tensor.*:UserWarning",
        "ignore:ComplexHalf support is experimental:UserWarning",
        "ignore:TypedStorage is deprecated:UserWarning",
        "ignore:`torch.jit.*` is deprecated:DeprecationWarning",
        "ignore:.*looks like a TorchScript archive:UserWarning",
    ):
        config.addinivalue_line("filterwarnings", pattern)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests run only when asked for (``-m slow``), keeping the default run short."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
