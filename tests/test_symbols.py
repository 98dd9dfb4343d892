"""The index knows torch's rules without importing torch; these tests hold it to torch's."""

from __future__ import annotations

import os
import subprocess
import sys

import factory
import pytest
import torch
from torch._weights_only_unpickler import _get_allowed_globals

from pyckpt.index.symbols import ALLOWED_GLOBALS, DTYPES, STORAGE_TYPES


def test_allowlist_snapshot_matches_the_installed_torch():
    installed = set(_get_allowed_globals())
    # Never accept a name the installed torch refuses, unless it names something this
    # torch does not have at all (a dtype added in a later release): loading then fails
    # cleanly when the symbol is materialised.
    for name in ALLOWED_GLOBALS - installed:
        module, attribute = name.rsplit(".", 1)
        assert module == "torch" and not hasattr(torch, attribute), f"pyckpt allows {name}, torch does not"
    assert installed <= ALLOWED_GLOBALS, f"torch allows what pyckpt refuses: {sorted(installed - ALLOWED_GLOBALS)}"


def test_dtype_facts_match_torch():
    typed = torch.storage._dtype_to_storage_type_map()
    for name, dtype in DTYPES.items():
        real = getattr(torch, name, None)
        if real is None:
            continue
        assert (dtype.itemsize, dtype.is_complex) == (real.itemsize, real.is_complex), name
        assert dtype.storage_class == typed.get(real), name
    for name, dtype in STORAGE_TYPES.items():
        value = _get_allowed_globals()[name]
        expected = torch.uint8 if value is torch.UntypedStorage else value.dtype
        assert getattr(torch, dtype.name) == expected, name


@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_command_line_never_imports_torch(tmp_path, command):
    """Indexing and kernel-side copies need no torch, so the CLI does not pay for importing it."""
    path = factory.save(factory.training_checkpoint(), tmp_path / "t.pt")
    argv = {"inspect": ["inspect", path], "verify": ["verify", path], "convert": ["convert", path, str(tmp_path / "o.pt")]}
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('TORCH_IMPORTED', 'torch' in sys.modules))\n"
        f"sys.argv = ['pyckpt'] + {argv[command]!r}\n"
        "runpy.run_module('pyckpt', run_name='__main__')\n"
    )
    env = {**os.environ, "PYCKPT_DISABLE_EXT": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "TORCH_IMPORTED False" in result.stdout
