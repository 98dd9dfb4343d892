"""Opaque mode: every pickle checkpoint opens, and nothing in it runs.

The checkpoints hold what real ones hold: argparse namespaces, pathlib paths, dataclass
configs, enums, numpy scalars and arrays, omegaconf configs, Lightning-style dicts and whole
pickled modules (``torch.save(model)``) of classes from a package made for the test. They are
written by a child process that can import that package; this process never can, so every
test also shows that loading needs none of the classes. The expected results come from
torch's own ``torch.load(weights_only=False)`` of the same files, in that child.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
from torch import nn

import pyckpt
from compare import assert_same

PACKAGE = f"ckptpkg_{uuid.uuid4().hex[:8]}"  # a name no other process has ever imported

MODELS = textwrap.dedent(
    """
    import collections, dataclasses, enum
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.bn = nn.BatchNorm1d(4)
            self.register_buffer("scale", torch.arange(4.0))
            self.register_buffer("scratch", torch.zeros(2), persistent=False)
            self.register_buffer("missing", None)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = nn.Linear(4, 2)
            self.tied = self.head  # the same module twice: state_dict lists it twice
            self.act = torch.nn.functional.relu
            self.register_parameter("unused", None)
            self.add_module("skipped", None)
            self.blocks = nn.ModuleList([Block(), Block()])


    @dataclasses.dataclass
    class TrainConfig:
        depth: int
        name: str
        tags: list


    class Color(enum.Enum):
        RED = 1
        GREEN = 2


    class Outer:
        class Inner:
            def __init__(self, value):
                self.value = value


    class Bag(list):
        pass


    class Registry(dict):
        pass


    class Slotted:
        __slots__ = ("a", "b")

        def __init__(self, a, b):
            self.a, self.b = a, b


    class WithKeywords:
        def __new__(cls, *args, **kwargs):
            return super().__new__(cls)

        def __init__(self, size, *, scale):
            self.size, self.scale = size, scale

        def __getnewargs_ex__(self):
            return (self.size,), {"scale": self.scale}
    """
)

WRITER = textwrap.dedent(
    """
    import argparse, collections, io, json, pathlib, pickle, sys
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from torch import nn
    sys.path.insert(0, sys.argv[1])
    out = pathlib.Path(sys.argv[2])
    sys.path.insert(0, sys.argv[3])  # tests/: the oracle
    import {package} as m
    from opaque_oracle import opaque_view

    torch.manual_seed(0)
    net = m.Net()
    net.block.bn.running_mean.add_(1.5)
    dp = nn.DataParallel(net)
    args = argparse.Namespace(lr=0.1, epochs=3, init=net.head.weight, name="run")
    train = {{
        "args": args,
        "cfg": m.TrainConfig(4, "deep", ["a", "b"]),
        "path": pathlib.PosixPath("/data/run1/ckpt"),
        "best": np.float64(0.9125),
        "history": np.arange(6.0).reshape(2, 3),
        "steps": np.int64(1200),
        "omega": OmegaConf.create({{"model": {{"depth": 4, "act": "relu"}}, "lr": 0.1}}),
        "color": m.Color.GREEN,
        "inner": m.Outer.Inner(7),
        "bag": m.Bag([1, "two", torch.ones(2)]),
        "registry": m.Registry(first=torch.zeros(3), second=2),
        "slots": m.Slotted(1, [2]),
        "frozen": frozenset({{1, 2}}),
        "empty_bytes": b"",
        "model": dp.state_dict(),
    }}
    lightning = {{
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {{"model." + k: v for k, v in net.state_dict().items()}},
        "hyper_parameters": {{"lr": 0.1, "cfg": OmegaConf.create({{"width": 8}}), "root": pathlib.PosixPath("/tmp")}},
        "optimizer_states": [torch.optim.Adam(net.parameters()).state_dict()],
        "callbacks": {{"ModelCheckpoint{{'monitor': 'val'}}": {{"best_model_score": torch.tensor(0.5),
                                                                 "dirpath": pathlib.PosixPath("/ckpt")}}}},
        "hparams_name": "kwargs",
    }}
    files = {{
        "train.pt": (train, {{}}),
        "lightning.ckpt": (lightning, {{}}),
        "module.pt": (net, {{}}),
        "module_in_dict.pt": ({{"model": net, "epoch": 3, "args": args}}, {{}}),
        "module_p4.pt": (net, {{"pickle_protocol": 4}}),
        "keywords_p4.pt": ({{"kw": m.WithKeywords(3, scale=0.5), "w": torch.ones(2)}}, {{"pickle_protocol": 4}}),
        "dp_module_legacy.pt": (dp, {{"_use_new_zipfile_serialization": False}}),
    }}
    facts = {{}}
    for name, (obj, options) in files.items():
        torch.save(obj, out / name, **options)
        loaded = torch.load(out / name, weights_only=False)
        torch.save(opaque_view(loaded), out / (name + ".opaque"))
        module = loaded if isinstance(loaded, nn.Module) else loaded.get("model") if isinstance(loaded, dict) else None
        if isinstance(module, nn.Module):
            torch.save(module.state_dict(), out / (name + ".state_dict"))
        if "legacy" not in name and "p4" not in name:  # torch's scan reads protocol-2 zip files only
            facts[name] = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(out / name))
    (out / "facts.json").write_text(json.dumps(facts))
    """
)

CHECK_ROUND_TRIP = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from compare import assert_same
    from opaque_oracle import opaque_view
    source = opaque_view(torch.load(sys.argv[3], weights_only=False))
    converted = opaque_view(torch.load(sys.argv[4], weights_only=False))
    assert_same(source, converted)
    print("same")
    """
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FILES = ["train.pt", "lightning.ckpt", "module.pt", "module_in_dict.pt", "module_p4.pt", "keywords_p4.pt",
         "dp_module_legacy.pt"]
MODULE_FILES = {"module.pt": None, "module_in_dict.pt": "model", "module_p4.pt": None, "dp_module_legacy.pt": None}


def _child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The checkpoints, their expected opaque views and reference state dicts."""
    root = tmp_path_factory.mktemp("opaque")
    package_root = root / "site"
    (package_root / PACKAGE).mkdir(parents=True)
    (package_root / PACKAGE / "__init__.py").write_text(MODELS)
    out = root / "files"
    out.mkdir()
    subprocess.run([sys.executable, "-c", WRITER.format(package=PACKAGE), str(package_root), str(out), TESTS_DIR],
                   check=True, env=_child_env(), capture_output=True, timeout=300)
    out.joinpath("site").write_text(str(package_root))
    return out


def _expected(made: pathlib.Path, name: str, suffix: str) -> object:
    return torch.load(made / (name + suffix), weights_only=False)


def _not_imported() -> None:
    assert PACKAGE not in sys.modules and not any(m.startswith(PACKAGE + ".") for m in sys.modules)


# -- the default mode stays torch's -----------------------------------------------------------


@pytest.mark.parametrize("name", ["train.pt", "module.pt", "keywords_p4.pt"])
def test_default_mode_refuses_what_torch_refuses(backend, made, name):
    with pytest.raises(pickle.UnpicklingError):
        torch.load(made / name, weights_only=True)
    with pytest.raises(pyckpt.UnsafeCheckpointError) as caught:
        pyckpt.load(made / name)
    assert isinstance(caught.value, pickle.UnpicklingError)  # code written against torch catches it
    assert str(made / name) in str(caught.value)
    assert "unknown_globals='opaque'" in str(caught.value)


@pytest.mark.parametrize("name", [n for n in FILES if "legacy" not in n and "p4" not in n])
def test_unknown_globals_match_torch(backend, made, name):
    expected = json.loads((made / "facts.json").read_text())[name]
    assert pyckpt.unknown_globals(made / name) == expected
    with torch.serialization.safe_globals([argparse.Namespace]):
        trusted = pyckpt.unknown_globals(made / name)
        assert trusted == sorted(torch.serialization.get_unsafe_globals_in_checkpoint(made / name))
    assert "argparse.Namespace" not in trusted
    _not_imported()


def test_unknown_globals_beyond_torchs_scan(backend, made):
    """Legacy and protocol-4 files, which torch's scan refuses, give the same names as the
    protocol-2 zip of the same object."""
    same_object = pyckpt.unknown_globals(made / "module.pt")
    assert pyckpt.unknown_globals(made / "module_p4.pt") == same_object
    legacy = pyckpt.unknown_globals(made / "dp_module_legacy.pt")
    assert legacy == sorted(set(same_object) | {"torch.nn.parallel.data_parallel.DataParallel"})


# -- opaque mode against torch's own objects --------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_opaque_load_equals_torchs_objects(backend, made, name):
    """Every object as pickle describes it, with torch's tensors, values and sharing."""
    got = pyckpt.load(made / name, unknown_globals="opaque")
    assert_same(_expected(made, name, ".opaque"), got)
    _not_imported()


def test_opaque_records_read_as_the_objects_were_written(backend, made):
    got = pyckpt.load(made / "train.pt", unknown_globals="opaque")
    args = got["args"]
    assert isinstance(args, pyckpt.Opaque) and args.qualified_name == "argparse.Namespace"
    assert args.called and args.new_object and args.args == () and args.kwargs is None
    assert repr(args).startswith("argparse.Namespace(lr=0.1, epochs=3, init=Parameter containing:")
    # A tensor inside an opaque object is a real tensor, sharing storage with the model's.
    head = got["model"]["module.head.weight"]
    assert isinstance(args.state["init"], nn.Parameter)
    assert args.state["init"].untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert got["path"].args == pathlib.PosixPath("/data/run1/ckpt").__reduce__()[1]
    assert got["color"].args == (2,) and not got["color"].new_object
    assert got["inner"].qualified_name == f"{PACKAGE}.Outer.Inner"  # getattr(Outer, "Inner") at protocol 2
    assert got["bag"].items[:2] == [1, "two"] and torch.equal(got["bag"].items[2], torch.ones(2))
    assert [key for key, _ in got["registry"].dict_items] == ["first", "second"]
    assert got["slots"].state == (None, {"a": 1, "b": [2]})
    assert got["frozen"] == pyckpt.Opaque("builtins", "frozenset", ([1, 2],))
    kw = pyckpt.load(made / "keywords_p4.pt", unknown_globals="opaque")["kw"]
    assert kw.kwargs == {"scale": 0.5} and kw.args == (3,) and kw.new_object


def test_opaque_compares_by_value():
    a = pyckpt.Opaque("m", "C", (1,), state={"w": torch.ones(2)})
    b = pyckpt.Opaque("m", "C", (1,), state={"w": torch.ones(2)})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    b.state["w"][0] = 5
    assert a != b
    assert a != pyckpt.Opaque("m", "D", (1,), state=a.state)
    assert repr(pyckpt.Opaque("m", "C")) == "m.C"
    looped = pyckpt.Opaque("m", "Node", ())
    looped.state = {"next": looped}
    assert repr(looped) == "m.Node(next=<...>)"


# -- pickled modules --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODULE_FILES))
def test_state_dict_of_a_pickled_module(backend, made, name):
    """state_dict_of equals torch's model.state_dict() where the classes are importable."""
    loaded = pyckpt.load(made / name, unknown_globals="opaque")
    module = loaded[MODULE_FILES[name]] if MODULE_FILES[name] else loaded
    got = pyckpt.state_dict_of(module)
    assert_same(_expected(made, name, ".state_dict"), got)
    assert got._metadata == _expected(made, name, ".state_dict")._metadata
    _not_imported()


def test_state_dict_of_rejects_what_is_not_a_module(made):
    with pytest.raises(TypeError, match="argparse.Namespace is not a pickled nn.Module"):
        pyckpt.state_dict_of(pyckpt.load(made / "train.pt", unknown_globals="opaque")["args"])
    real = nn.Linear(2, 3)
    assert list(pyckpt.state_dict_of(real)) == ["weight", "bias"]


class _Block(nn.Module):  # the package's classes, rebuilt here under other names
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.zeros(4))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(4, 2)
        self.tied = self.head
        self.blocks = nn.ModuleList([_Block(), _Block()])


@pytest.mark.parametrize("name", [*MODULE_FILES, "train.pt", "lightning.ckpt"])
def test_load_state_dict_from_any_pickle_checkpoint(backend, made, name):
    """The model's weights come out of pickled modules and training checkpoints alike."""
    model = _Net()
    if name == "lightning.ckpt":  # "model." is not a wrapper prefix: torch reports the mismatch
        result = pyckpt.load_state_dict(model, made / name, key="state_dict", strict=False)
        assert "model.head.weight" in result.unexpected_keys and "head.weight" in result.missing_keys
        return
    pyckpt.load_state_dict(model, made / name)
    reference = _expected(made, "module.pt", ".state_dict")
    assert list(model.state_dict()) == list(reference)
    for key_name, value in model.state_dict().items():
        assert torch.equal(value, reference[key_name]), key_name
    _not_imported()


# -- convert ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train.pt", "lightning.ckpt", "module.pt", "dp_module_legacy.pt", "keywords_p4.pt"])
def test_convert_writes_opaque_objects_back(backend, made, tmp_path, name):
    """pt output keeps the structure: torch.load(out, weights_only=False) gives equal objects."""
    out = tmp_path / "out.pt"
    pyckpt.convert(made / name, out, strip_prefix=None)
    # Keyword arguments (NEWOBJ_EX) are spelled through copyreg.__newobj_ex__ at protocol 2.
    written = [g for g in pyckpt.unknown_globals(out) if g != "copyreg.__newobj_ex__" or name != "keywords_p4.pt"]
    assert written == pyckpt.unknown_globals(made / name)
    checked = subprocess.run(
        [sys.executable, "-c", CHECK_ROUND_TRIP, (made / "site").read_text(), TESTS_DIR, str(made / name), str(out)],
        env=_child_env(), capture_output=True, text=True, timeout=300,
    )
    assert checked.returncode == 0 and checked.stdout.strip() == "same", checked.stderr[-3000:]
    _not_imported()


@pytest.mark.parametrize("name", list(MODULE_FILES))
@pytest.mark.parametrize("output", ["pt", "safetensors"])
def test_convert_extracts_the_state_dict(backend, made, tmp_path, name, output):
    dst = tmp_path / f"out.{output}"
    if output == "safetensors" and name == "module_in_dict.pt":  # beside the model: an argparse.Namespace
        with pytest.raises(pyckpt.CheckpointError, match=r"would be lost: 'args' \(argparse.Namespace\)"):
            pyckpt.convert(made / name, dst)
        assert not dst.exists()
        assert pyckpt.convert(made / name, dst, drop_extra=True).dropped == ["'args' (argparse.Namespace)"]
    else:
        pyckpt.convert(made / name, dst, extract_state_dict=True)
    reference = _expected(made, name, ".state_dict")
    stripped = {k.removeprefix("module."): v for k, v in reference.items()}
    if output == "pt":
        got = torch.load(dst, weights_only=True)
        assert list(got) == list(stripped)
        expected_metadata = pyckpt.load(made / name, unknown_globals="opaque", strip_prefix="auto")
        module = expected_metadata["model"] if name == "module_in_dict.pt" else expected_metadata
        assert got._metadata == _stripped_metadata(pyckpt.state_dict_of(module)._metadata)
    else:
        from safetensors.torch import load_file

        got = load_file(dst)
        assert sorted(got) == sorted(stripped)
    for key, value in stripped.items():
        assert torch.equal(got[key], value), key


def _stripped_metadata(metadata: dict) -> dict:
    """_metadata as --strip-prefix auto leaves it: DataParallel's own entry gives way to its module's."""
    from pyckpt.rename import module_map_for, rename_metadata, strip_auto

    return dict(rename_metadata(metadata, module_map_for(strip_auto)))


def test_convert_command_line(made, tmp_path):
    dst = tmp_path / "sd.pt"
    done = subprocess.run([sys.executable, "-m", "pyckpt", "convert", str(made / "module.pt"), str(dst),
                           "--extract-state-dict", "--quiet"], capture_output=True, text=True, env=_child_env())
    assert done.returncode == 0, done.stderr
    assert list(torch.load(dst, weights_only=True)) == list(_expected(made, "module.pt", ".state_dict"))


# -- inspect ----------------------------------------------------------------------------------


def test_inspect_lists_unknown_globals_and_where_they_sit(backend, made):
    from pyckpt.inspection import inspect_checkpoint

    info = inspect_checkpoint(made / "train.pt")
    names = [entry["name"] for entry in info["unknown_globals"]]
    assert names == pyckpt.unknown_globals(made / "train.pt")
    where = {entry["name"]: entry["where"] for entry in info["unknown_globals"]}
    assert where["argparse.Namespace"] == ["args"] and where[f"{PACKAGE}.TrainConfig"] == ["cfg"]
    assert all(not entry["blocked"] for entry in info["unknown_globals"])
    args_entry = next(e for e in info["entries"] if e["key"] == "args")
    assert args_entry["type"] == "argparse.Namespace" and args_entry["value"].startswith("argparse.Namespace(lr=0.1")

    module_info = inspect_checkpoint(made / "module_in_dict.pt")
    (state_dict,) = module_info["state_dicts"]
    assert state_dict["entry"] == "model" and state_dict["module_class"] == f"{PACKAGE}.Net"
    assert state_dict["keys"] == len(_expected(made, "module_in_dict.pt", ".state_dict"))
    _not_imported()


def test_inspect_never_refuses_and_flags_blocked_globals(tmp_path):
    import attacks

    path = tmp_path / "evil.pt"
    path.write_bytes(attacks.torch_zip(attacks.proto2(
        attacks.glob2("os", "system") + attacks.pstr("true") + b"\x85R")))
    done = subprocess.run([sys.executable, "-m", "pyckpt", "inspect", str(path), "--json"], capture_output=True,
                          text=True, env=_child_env())
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(done.stdout)["unknown_globals"]
    assert entry == {"name": "os.system", "blocked": True, "where": [""]}
    with pytest.raises(pyckpt.UnsafeCheckpointError, match="module os is always blocked"):
        pyckpt.load(path, unknown_globals="opaque")


# -- globals the user trusts ------------------------------------------------------------------


def test_safe_globals_are_rebuilt_for_real(backend, tmp_path):
    path = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(lr=0.5, w=torch.ones(2)), "p": pathlib.PurePosixPath("a/b")}, path)
    with torch.serialization.safe_globals([argparse.Namespace, pathlib.PurePosixPath]):
        expected = torch.load(path, weights_only=True)
        got = pyckpt.load(path)
    assert type(got["args"]) is argparse.Namespace and got["args"].lr == 0.5
    assert torch.equal(got["args"].w, expected["args"].w)
    assert got["p"] == expected["p"] and type(got["p"]) is pathlib.PurePosixPath
    with pytest.raises(pyckpt.UnsafeCheckpointError):
        pyckpt.load(path)  # outside the context the trust is gone, as in torch


# -- nothing is imported, in a fresh process --------------------------------------------------


def test_nothing_named_by_the_file_is_imported(made, tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        import torch, pyckpt
        from torch import nn
        before = set(sys.modules)
        for name in {FILES!r}:
            pyckpt.load({str(made)!r} + "/" + name, unknown_globals="opaque")
        pyckpt.state_dict_of(pyckpt.load({str(made)!r} + "/module.pt", unknown_globals="opaque"))
        pyckpt.convert({str(made)!r} + "/train.pt", {str(tmp_path)!r} + "/out.pt")
        print(json.dumps(sorted(set(sys.modules) - before)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_child_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    new = json.loads(done.stdout)
    named = {name.split(".")[0] for file in FILES for name in pyckpt.unknown_globals(made / file)} - {"torch", "builtins"}
    assert {"omegaconf", "numpy", "pathlib", "argparse", PACKAGE} <= named | {"pathlib", "argparse"}
    assert not [m for m in new if m.split(".")[0] in named], new


# -- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["error", "opaque"])
def test_value_limit(backend, tmp_path, monkeypatch, mode):
    path = tmp_path / "sd.pt"
    torch.save({f"w{i}": torch.ones(1) for i in range(50)}, path)
    assert len(pyckpt.load(path, unknown_globals=mode)) == 50
    monkeypatch.setenv("PYCKPT_MAX_OBJECTS", "1000")
    with pytest.raises(pyckpt.CheckpointError, match="pickle pushes more than 1000 values"):
        pyckpt.load(path, unknown_globals=mode)


def test_value_limit_leaves_room_for_large_checkpoints(backend, tmp_path):
    """A state dict of 120,000 tensors (more than any shipped model) is far inside the limit."""
    from pyckpt.index import index_checkpoint
    from pyckpt.index.policy import GlobalsPolicy

    base = torch.zeros(4)
    path = tmp_path / "many.pt"
    torch.save({f"layers.{i}.experts.{i % 64}.w": base[i % 4 :] for i in range(120_000)}, path)
    # Index with a limit ten times lower than the default: it still fits.
    with index_checkpoint(path, policy=GlobalsPolicy(max_objects=(1 << 25) // 10)) as index:
        assert len(index.root) == 120_000


def test_unknown_globals_argument_is_checked(made):
    with pytest.raises(ValueError, match="unknown_globals must be 'error' or 'opaque'"):
        pyckpt.load(made / "train.pt", unknown_globals="allow")
