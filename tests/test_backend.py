"""Which backend runs, why, the switches that choose it, and what `import pyckpt` costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import EXT_DISABLED, require_backend

import pyckpt


def run_python(code: str, **env: str) -> str:
    environment = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_backend_reports_name_and_reason():
    info = pyckpt.backend_info()
    assert pyckpt.backend() == info.name in ("native", "python")
    if info.name == "python":
        assert info.reason  # never a silent fallback
    else:
        assert info.reason is None and info.extension_path


def test_disable_switch_forces_python_and_says_so():
    out = run_python(
        "import json, pyckpt; i = pyckpt.backend_info(); print(json.dumps([pyckpt.backend(), i.reason]))",
        PYCKPT_DISABLE_EXT="1",
    )
    name, reason = json.loads(out)
    assert name == "python" and "PYCKPT_DISABLE_EXT" in reason


def test_default_is_native_when_built():
    require_backend("native")
    assert run_python("import pyckpt; print(pyckpt.backend())", PYCKPT_DISABLE_EXT="") == "native"


def test_require_switch_turns_a_missing_extension_into_an_error():
    """A broken build must not hide behind the fallback when PYCKPT_REQUIRE_EXT=1."""
    # sys.modules[name] = None makes `from . import _core` raise ImportError, as a
    # missing or unloadable .so would.
    code = "import sys; sys.modules['pyckpt._core'] = None; import pyckpt; print(pyckpt.backend_info().reason)"
    environment = {**os.environ, "PYCKPT_REQUIRE_EXT": "1", "PYCKPT_DISABLE_EXT": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert result.returncode != 0 and "PYCKPT_REQUIRE_EXT=1 forbids the fallback" in result.stderr
    reason = run_python(code, PYCKPT_REQUIRE_EXT="", PYCKPT_DISABLE_EXT="")
    assert "could not be imported" in reason


def test_import_is_cheap_and_leaves_cuda_alone():
    out = run_python(
        "import sys, torch, pyckpt, json;"
        "print(json.dumps([torch.cuda.is_initialized(), 'pyckpt._core' in sys.modules,"
        " 'pyckpt.loading' in sys.modules]))"
    )
    assert json.loads(out) == [False, False, False]


def test_loading_does_not_initialise_cuda(tmp_path):
    import torch

    path = tmp_path / "t.pt"
    torch.save({"w": torch.ones(3)}, path)
    out = run_python(f"import torch, pyckpt; pyckpt.load({str(path)!r}); print(torch.cuda.is_initialized())")
    assert out == "False"


def test_import_time_over_torch_is_small():
    code = (
        "import time; import torch; t = time.perf_counter(); import pyckpt; "
        "print(time.perf_counter() - t)"
    )
    timings = sorted(float(run_python(code)) for _ in range(3))
    assert timings[0] < 0.05, f"import pyckpt took {timings[0] * 1000:.1f} ms after torch"


@pytest.mark.skipif(EXT_DISABLED, reason="extension switched off")
def test_io_threads_switch(monkeypatch):
    from pyckpt._env import io_threads

    monkeypatch.setenv("PYCKPT_THREADS", "3")
    assert io_threads() == 3
    monkeypatch.setenv("PYCKPT_THREADS", "zero")
    with pytest.raises(ValueError, match="PYCKPT_THREADS"):
        io_threads()
    monkeypatch.setenv("PYCKPT_THREADS", "0")
    with pytest.raises(ValueError, match="PYCKPT_THREADS"):
        io_threads()
