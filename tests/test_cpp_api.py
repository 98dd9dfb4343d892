"""pyckpt without Python: the C++ API and the ``torch.ops.pyckpt`` operators.

A C++ program (``tests/cpp/load_checkpoint.cpp``) is built with CMake through
``find_package(Torch)`` and ``find_package(pyckpt)`` and run as its own process; what it prints
is compared with what Python loads from the same files. The operators are checked from
Python, from ``torch.jit.script`` code, and from a scripted module saved and run in a fresh
process that never imports pyckpt. Native only: the C++ library is part of the extension.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import pyckpt
from conftest import require_backend
from factory import dp_state_dict, rezip
from safetensors.torch import load_file, save_file
from sharded_cases import lying_sharded_checkpoints, write_sharded

HERE = os.path.dirname(os.path.abspath(__file__))
SCALAR_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.uint16: "UInt16", torch.uint32: "UInt32",
    torch.uint64: "UInt64", torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2",
}


@pytest.fixture(scope="module", autouse=True)
def native_only() -> None:
    require_backend("native")
    pyckpt.load_ops()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 3)
        self.out = nn.Linear(3, 5, bias=False)


def seeded_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.num_batches_tracked.fill_(3)
    return net


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A DataParallel checkpoint, and one of many dtypes with views and a tied weight."""
    directory = tmp_path_factory.mktemp("cpp-files")
    dp = str(directory / "dp.pt")
    torch.save(dp_state_dict(seeded_net()), dp)
    base = torch.arange(24, dtype=torch.float32)
    mixed = {
        "_orig_mod.matrix": base.reshape(4, 6),
        "_orig_mod.view": base[6:18].reshape(3, 4),  # a view sharing the matrix's storage
        "_orig_mod.transposed": base.reshape(4, 6).t(),
        "_orig_mod.bf16": torch.linspace(-2, 2, 9, dtype=torch.bfloat16),
        "_orig_mod.half": torch.ones(3, 2, dtype=torch.float16),
        "_orig_mod.int": torch.arange(-5, 5, dtype=torch.int32),
        "_orig_mod.mask": torch.tensor([True, False, True]),
        "_orig_mod.scalar": torch.tensor(7, dtype=torch.int64),
        "_orig_mod.empty": torch.zeros(0, 3),
        "_orig_mod.param": nn.Parameter(torch.full((2, 2), 0.5)),
    }
    path = str(directory / "mixed.pt")
    torch.save(mixed, path)
    training = str(directory / "training.pt")
    torch.save({"epoch": 3, "model": dp_state_dict(seeded_net()), "lr": 0.1}, training)
    return {"dp": dp, "mixed": path, "training": training}


def checksum(tensor: torch.Tensor) -> int:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
    weights = torch.arange(data.numel(), dtype=torch.int64).remainder(251).add(1)
    return int((data * weights).sum())


def expected_lines(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """What the C++ program prints for ``state_dict`` (Python's load of the same file)."""
    lines, first_user = [], {}
    for index, (key, tensor) in enumerate(state_dict.items()):
        storage = tensor.untyped_storage()  # an empty storage shares nothing, wherever it points
        sharer = first_user.setdefault(storage.data_ptr(), index) if storage.nbytes() else index
        fields = [key, SCALAR_NAMES[tensor.dtype], ",".join(map(str, tensor.shape)), ",".join(map(str, tensor.stride())),
                  str(tensor.storage_offset()), str(sharer), str(tensor.device), str(checksum(tensor))]
        lines.append("\t".join(fields))
    return lines


# --- the C++ program ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/cpp/load_checkpoint.cpp, built with CMake's find_package(Torch) and find_package(pyckpt),
    or with g++ and the paths pyckpt and torch give where there is no CMake."""
    source = tmp_path_factory.mktemp("cpp-project")
    if not shutil.which("cmake"):
        return compile_with_gxx(source)
    build = source / "build"
    shutil.copy(os.path.join(HERE, "cpp", "load_checkpoint.cpp"), source / "load_checkpoint.cpp")
    (source / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\n"
        "project(load_checkpoint CXX)\n"
        "find_package(Torch REQUIRED)\n"
        "find_package(pyckpt REQUIRED)\n"
        "add_executable(load_checkpoint load_checkpoint.cpp)\n"
        "target_link_libraries(load_checkpoint PRIVATE pyckpt::pyckpt ${TORCH_LIBRARIES})\n"
        "set_property(TARGET load_checkpoint PROPERTY CXX_STANDARD 20)\n"
    )
    prefix = f"{torch.utils.cmake_prefix_path};{pyckpt.cmake_prefix_path()}"
    for command in (["cmake", "-S", str(source), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                     "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return str(build / "load_checkpoint")


def compile_with_gxx(directory) -> str:
    from torch.utils.cpp_extension import include_paths, library_paths

    program = str(directory / "load_checkpoint")
    torch_lib = library_paths()[0]
    command = ["g++", "-std=c++20", "-O1", os.path.join(HERE, "cpp", "load_checkpoint.cpp"), "-o", program,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{pyckpt.include_path()}",
               *[f"-I{path}" for path in include_paths()], pyckpt.library_path(), f"-L{torch_lib}",
               "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"g++ failed:\n{done.stderr[-3000:]}"
    return program


def run_program(program: str, *args: str) -> subprocess.CompletedProcess:
    # No Python in the process: a plain environment, and nothing of Python's on the library path.
    # Error messages may quote record names that are not UTF-8: kept as surrogates.
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run([program, *args], capture_output=True, timeout=300, env=env)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "surrogateescape"),
                                       done.stderr.decode("utf-8", "surrogateescape"))


def test_program_links_no_python(program: str) -> None:
    linked = subprocess.run(["ldd", program], capture_output=True, text=True).stdout
    assert "libtorch_cpu" in linked and "_api" in linked
    assert "libpython" not in linked and "torch_python" not in linked


@pytest.mark.parametrize("name", ["dp", "mixed", "training"])
def test_program_loads_like_python(program: str, checkpoints: dict[str, str], name: str) -> None:
    done = run_program(program, "load", checkpoints[name])
    assert done.returncode == 0, done.stderr
    loaded = pyckpt.load(checkpoints[name], strip_prefix="auto")
    state = loaded["model"] if name == "training" else loaded
    assert done.stdout.splitlines() == expected_lines(state)


def test_program_fills_existing_tensors(program: str, checkpoints: dict[str, str]) -> None:
    done = run_program(program, "into", checkpoints["dp"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    state = pyckpt.load(checkpoints["dp"], strip_prefix="auto")
    got = {line.split("\t")[0]: line.split("\t")[-1] for line in lines if not line.startswith("missing")}
    assert {key: got[key] for key in state} == {key: str(checksum(value)) for key, value in state.items()}
    assert lines[-1] == "missing\tnot.in.the.checkpoint"


def test_attack_corpus_through_the_cpp_api(program: str, tmp_path) -> None:
    """Every hostile file is refused with an error: no crash, no hang, nothing run."""
    import attacks

    sentinels = str(tmp_path / "sentinels")
    os.makedirs(sentinels)
    cases = [case for case in attacks.build_cases(sentinels, include_bombs=False) if not case.slow]
    written = attacks.write_corpus(str(tmp_path / "corpus"), sentinels, cases)
    done = run_program(program, "attack", *[path for _, path in written])
    assert done.returncode == 0, f"the program died: {done.returncode}\n{done.stderr[-2000:]}"
    outcomes = dict(line.split("\t")[:2] for line in done.stdout.splitlines())
    assert len(outcomes) == len(written)
    loaded = [case.name for case, path in written if outcomes[path] != "error"]
    assert loaded == []
    assert os.listdir(sentinels) == []  # no payload ran
    # A lying safetensors header gets the Python package's own words from C++ too.
    messages = {path: line.split("\t", 2)[2] for line in done.stdout.splitlines() for path in [line.split("\t")[0]]}
    headers = [(case, path) for case, path in written if case.name.startswith("st_")]
    assert len(headers) >= 15
    for case, path in headers:
        assert all(fragment in messages[path] for fragment in case.expect), f"{case.name}: {messages[path]}"


# --- safetensors files and sharded directories --------------------------------------------------


def seeded_dp_state_dict() -> dict[str, torch.Tensor]:
    return dp_state_dict(seeded_net())


def thirds(keys: list[str]) -> list[list[str]]:
    return [keys[0::3], keys[1::3], keys[2::3]]  # interleaved: a shard's keys are not a run


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The DP checkpoint as one safetensors file, a directory holding it, and shards of each
    kind (named by directory or by index file); each written by its format's own library."""
    directory = tmp_path_factory.mktemp("cpp-layouts")
    state = seeded_dp_state_dict()
    keys = list(state)
    save_file({k: v.clone() for k, v in state.items()}, directory / "dp.safetensors", metadata={"format": "pt"})
    os.makedirs(directory / "single")
    save_file({k: v.clone() for k, v in state.items()}, directory / "single" / "model.safetensors")
    paths = {"safetensors": str(directory / "dp.safetensors"), "single-file directory": str(directory / "single")}
    for name, kinds in {"safetensors shards": ["safetensors"] * 3, "bin shards": ["bin"] * 3,
                        "mixed shards": ["safetensors", "bin", "safetensors"]}.items():
        index = write_sharded(directory / name.replace(" ", "-"), state, shard_keys=thirds(keys), kinds=kinds)
        paths[name] = index if name == "bin shards" else os.path.dirname(index)  # the index file, or its directory
    dtypes = {
        "module.f32": torch.randn(3, 5), "module.bf16": torch.randn(7, dtype=torch.bfloat16),
        "module.f16": torch.randn(2, 2, dtype=torch.float16), "module.i8": torch.arange(-3, 4, dtype=torch.int8),
        "module.u8": torch.arange(9, dtype=torch.uint8), "module.mask": torch.tensor([True, False]),
        "module.i64": torch.arange(4, dtype=torch.int64), "module.scalar": torch.tensor(2.5),
        "module.empty": torch.zeros(0, 4), "module.e4m3": torch.randn(6).to(torch.float8_e4m3fn),
        "module.e5m2": torch.randn(6).to(torch.float8_e5m2), "module.u16": torch.arange(5).to(torch.uint16),
        "module.u32": torch.arange(5).to(torch.uint32), "module.u64": torch.arange(5).to(torch.uint64),
    }
    save_file(dtypes, directory / "dtypes.safetensors")
    paths["every dtype"] = str(directory / "dtypes.safetensors")
    return paths


def by_libraries(path: str) -> dict[str, torch.Tensor]:
    """What safetensors and torch.load read from ``path``'s files, merged in the index's
    order, wrapper prefix stripped: the reference no pyckpt code touches."""
    if os.path.isdir(path):
        names = os.listdir(path)
        index = next((name for name in names if name.endswith(".index.json")), None)
        path = os.path.join(path, index or "model.safetensors")
    if path.endswith(".index.json"):
        weight_map = json.load(open(path))["weight_map"]
        merged: dict[str, torch.Tensor] = {}
        for shard in dict.fromkeys(weight_map.values()):
            shard_path = os.path.join(os.path.dirname(path), shard)
            merged.update(load_file(shard_path) if shard.endswith(".safetensors") else torch.load(shard_path))
        state = {key: merged[key] for key in weight_map}
    else:
        state = load_file(path)
    return {key.removeprefix("module."): value for key, value in state.items()}


LAYOUTS = ["safetensors", "single-file directory", "safetensors shards", "bin shards", "mixed shards", "every dtype"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_program_loads_every_layout_like_python(program: str, layouts: dict[str, str], layout: str) -> None:
    for mode in ([], ["cpu", "mmap"]):
        done = run_program(program, "load", layouts[layout], *mode)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == expected_lines(pyckpt.load(layouts[layout], strip_prefix="auto")), mode


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ops_read_every_layout_as_the_libraries_do(layouts: dict[str, str], layout: str) -> None:
    from compare import assert_same

    got = torch.ops.pyckpt.load_state_dict(layouts[layout])
    expected = by_libraries(layouts[layout])
    if "shards" in layout:
        assert list(got) == list(expected)  # the index's order
    assert_same(expected, dict(got))


def test_ops_read_header_escapes_as_python_json(tmp_path) -> None:
    """Keys written with JSON escapes (\\u, surrogate pairs, quotes, control characters) and a
    header padded with spaces, as safetensors pads it: the C++ reader gives json.loads' keys."""
    names = ["plain", "caf\u00e9", "line\nbreak", 'quote"d', "back\\slash", "emoji\U0001F600", "tab\t/slash"]
    entries = ", ".join(f'{json.dumps(name)}: {{"dtype": "F32", "shape": [1], "data_offsets": [{4 * i}, {4 * i + 4}]}}'
                        for i, name in enumerate(names))
    header = ("{" + entries + ', "__metadata__": {"k": "v\\u00e9"}}').encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "escaped.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + torch.arange(len(names), dtype=torch.float32).numpy().tobytes())
    got = torch.ops.pyckpt.load_state_dict(str(path), "")
    assert list(got) == list(json.loads(header))[:-1] == names
    assert [float(value) for value in got.values()] == list(range(len(names)))
    assert list(got) == list(load_file(path)) == list(pyckpt.load(path))


def test_ops_bound_the_json_they_parse(tmp_path) -> None:
    """A header of millions of tiny values would cost C++ ~100 bytes each: refused past 4M."""
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "pad": [' + b"0," * (1 << 22) + b"0]}"
    path = tmp_path / "wide.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(RuntimeError, match="safetensors header holds more than 4194304 JSON values"):
        torch.ops.pyckpt.load_state_dict(str(path))


def test_program_fills_existing_tensors_from_shards(program: str, layouts: dict[str, str]) -> None:
    done = run_program(program, "into", layouts["mixed shards"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    expected = by_libraries(layouts["mixed shards"])
    got = {line.split("\t")[0]: line.split("\t")[-1] for line in lines if not line.startswith("missing")}
    assert {key: got[key] for key in expected} == {key: str(checksum(value)) for key, value in expected.items()}
    assert lines[-1] == "missing\tnot.in.the.checkpoint"


def test_ops_load_into_casts_from_shards(layouts: dict[str, str]) -> None:
    expected = by_libraries(layouts["safetensors shards"])
    targets = {key: torch.zeros_like(value, dtype=torch.float64) for key, value in expected.items()
               if value.is_floating_point()}
    assert torch.ops.pyckpt.load_into(layouts["safetensors shards"], targets) == []
    assert all(torch.equal(targets[key], expected[key].double()) for key in targets)


def test_ops_refuse_lying_shard_indexes(tmp_path) -> None:
    """The Python package's lying indexes, refused by C++ with the same words, naming the path."""
    for name, (directory, message) in lying_sharded_checkpoints(tmp_path).items():
        with pytest.raises(RuntimeError) as raised:
            torch.ops.pyckpt.load_state_dict(str(directory))
        assert message in str(raised.value), f"{name}: {raised.value}"
        assert str(directory) in str(raised.value), name


def test_ops_name_the_damaged_shard_and_span_renaming_across_shards(tmp_path) -> None:
    state = seeded_dp_state_dict()
    directory = os.path.dirname(write_sharded(tmp_path / "cut", state, shard_keys=thirds(list(state)),
                                              kinds=["safetensors"] * 3))
    second = os.path.join(directory, "model-00002-of-00003.safetensors")
    os.truncate(second, os.path.getsize(second) - 4)
    with pytest.raises(RuntimeError, match="shard 'model-00002-of-00003.safetensors': .*data") as raised:
        torch.ops.pyckpt.load_state_dict(directory)
    assert directory in str(raised.value)
    colliding = os.path.dirname(write_sharded(tmp_path / "collide", {"module.w": torch.ones(2), "w": torch.zeros(2)},
                                              shard_keys=[["module.w"], ["w"]], kinds=["safetensors"] * 2))
    with pytest.raises(RuntimeError, match="keys 'module.w' and 'w' both become 'w'"):
        torch.ops.pyckpt.load_state_dict(colliding)
    assert list(torch.ops.pyckpt.load_state_dict(colliding, "")) == ["module.w", "w"]


# --- the operators ----------------------------------------------------------------------------


def test_ops_match_python(checkpoints: dict[str, str]) -> None:
    from compare import assert_same

    for name in ("dp", "mixed"):
        got = torch.ops.pyckpt.load_state_dict(checkpoints[name])
        expected = pyckpt.load(checkpoints[name], strip_prefix="auto")
        assert list(got) == list(expected)
        # C++ has no Parameter: one comes back as a tensor over the same bytes, requires_grad kept
        plain = {k: v.detach().requires_grad_(v.requires_grad) if isinstance(v, nn.Parameter) else v
                 for k, v in expected.items()}
        assert_same(plain, dict(got))
    kept = torch.ops.pyckpt.load_state_dict(checkpoints["dp"], "")
    assert all(key.startswith("module.") for key in kept)


def test_ops_load_into_fills_in_place(checkpoints: dict[str, str]) -> None:
    model = Net()
    for p in model.parameters():
        p.data.zero_()
    targets = dict(model.state_dict(keep_vars=True))
    targets["extra.weight"] = torch.zeros(1)
    missing = torch.ops.pyckpt.load_into(checkpoints["dp"], targets)
    assert missing == ["extra.weight"]
    expected = seeded_net().state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("last", ["head.weight", "embed.weight"])
def test_ops_load_into_tied_targets_end_with_the_last_ones_bytes(tmp_path, last: str) -> None:
    """Two targets that are one memory, and different bytes under their keys (the file holds
    head first, transposed, so it is copied while embed is read straight in): the memory ends
    as copies in the dict's order leave it, the last key's bytes."""
    torch.manual_seed(6)
    state = {"head.weight": torch.randn(32, 64).t(), "embed.weight": torch.randn(64, 32), "bias": torch.randn(64)}
    path = str(tmp_path / "untied.pt")
    torch.save(state, path)
    tied, bias = torch.zeros(64, 32), torch.zeros(64)
    first = "embed.weight" if last == "head.weight" else "head.weight"
    assert torch.ops.pyckpt.load_into(path, {first: tied, "bias": bias, last: tied}) == []
    assert torch.equal(tied, state[last]) and torch.equal(bias, state["bias"])


def test_ops_load_into_casts_and_fills_strided_targets(checkpoints: dict[str, str]) -> None:
    """Targets that cannot take the file's bytes as they are (another dtype, a transposed
    layout, a view into a bigger tensor) are filled by copy_, as load_state_dict would."""
    expected = pyckpt.load(checkpoints["mixed"], strip_prefix="auto")
    holder = torch.zeros(6, 4)
    targets = {
        "matrix": torch.zeros(6, 4).t(),  # strides (1, 4): not row-major
        "bf16": torch.zeros(9, dtype=torch.float64),
        "view": holder[1:4],  # a view whose storage is bigger than it
        "int": torch.zeros(10, dtype=torch.int32),  # read straight in
    }
    assert torch.ops.pyckpt.load_into(checkpoints["mixed"], targets) == []
    assert torch.equal(targets["matrix"], expected["matrix"]) and targets["matrix"].stride() == (1, 4)
    assert torch.equal(targets["bf16"], expected["bf16"].double())
    assert torch.equal(holder[1:4], expected["view"]) and holder[0].eq(0).all() and holder[4:].eq(0).all()
    assert torch.equal(targets["int"], expected["int"])


@pytest.mark.parametrize("problem", ["missing", "compressed", "quantized", "conj", "not_zip"])
def test_ops_refuse_what_they_cannot_read(checkpoints: dict[str, str], tmp_path, problem: str) -> None:
    path = str(tmp_path / f"{problem}.pt")
    said = {"missing": "cannot open the file", "compressed": "compressed", "quantized": "refused global",
            "conj": "conj/neg", "not_zip": "end-of-central-directory"}[problem]
    if problem == "compressed":
        rezip(checkpoints["dp"], path, zipfile.ZIP_DEFLATED)
    elif problem == "quantized":
        torch.save({"q": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)}, path)
    elif problem == "conj":
        torch.save({"c": torch.ones(2, dtype=torch.complex64).conj()}, path)
    elif problem == "not_zip":
        with open(path, "wb") as f:
            f.write(b"not a checkpoint" * 10)
    with pytest.raises(RuntimeError, match=said) as raised:
        torch.ops.pyckpt.load_state_dict(path)
    assert path in str(raised.value)


def test_scripted_function_calls_the_op(checkpoints: dict[str, str]) -> None:
    @torch.jit.script
    def first_weight(path: str) -> torch.Tensor:
        return torch.ops.pyckpt.load_state_dict(path, "auto", None)["fc1.weight"]

    assert torch.equal(first_weight(checkpoints["dp"]), seeded_net().fc1.weight)


class SelfLoading(nn.Module):
    """A scripted model that loads its own weights at start-up."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    @torch.jit.export
    def load_weights(self, path: str) -> list[str]:
        targets = {"fc1.weight": self.fc1.weight, "fc1.bias": self.fc1.bias,
                   "fc2.weight": self.fc2.weight, "fc2.bias": self.fc2.bias}
        return torch.ops.pyckpt.load_into(path, targets, "auto")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def test_saved_scripted_module_loads_its_weights_in_a_fresh_process(checkpoints: dict[str, str], tmp_path) -> None:
    scripted = torch.jit.script(SelfLoading())
    saved = str(tmp_path / "self_loading.pt")
    torch.jit.save(scripted, saved)
    out = str(tmp_path / "weights.pt")
    code = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[1])\n"  # the library alone: pyckpt is never imported
        "module = torch.jit.load(sys.argv[2])\n"
        "missing = module.load_weights(sys.argv[3])\n"
        "assert 'pyckpt' not in sys.modules\n"
        "torch.save({'missing': missing, 'state': module.state_dict()}, sys.argv[4])\n"
    )
    done = subprocess.run([sys.executable, "-c", code, pyckpt.library_path(), saved, checkpoints["dp"], out],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out)
    assert result["missing"] == []
    model = SelfLoading()
    pyckpt.load_state_dict(model, checkpoints["dp"], strict=False)  # the Python path, for comparison
    for key, value in model.state_dict().items():
        assert torch.equal(result["state"][key], value), key


def test_library_paths_for_build_systems() -> None:
    assert os.path.isfile(pyckpt.library_path())
    assert os.path.isfile(os.path.join(pyckpt.include_path(), "pyckpt", "pyckpt.h"))
    assert os.path.isfile(os.path.join(pyckpt.cmake_prefix_path(), "pyckpt", "pyckptConfig.cmake"))


def test_importing_pyckpt_after_torch_registers_the_ops(checkpoints: dict[str, str]) -> None:
    code = "import sys, torch, pyckpt; print(len(torch.ops.pyckpt.load_state_dict(sys.argv[1])))"
    done = subprocess.run([sys.executable, "-c", code, checkpoints["dp"]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == len(seeded_net().state_dict())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.cuda
def test_cuda_ops_through_the_ring(checkpoints: dict[str, str]) -> None:
    from compare import assert_same

    got = torch.ops.pyckpt.load_state_dict(checkpoints["mixed"], "auto", torch.device("cuda"))
    expected = pyckpt.load(checkpoints["mixed"], strip_prefix="auto", map_location="cuda")
    plain = {k: v.detach().requires_grad_(v.requires_grad) if isinstance(v, nn.Parameter) else v
             for k, v in expected.items()}
    assert_same(plain, dict(got))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["mixed shards", "every dtype"])
def test_cuda_ops_read_shards_and_safetensors_through_the_ring(layouts: dict[str, str], layout: str) -> None:
    from compare import assert_same

    expected = {key: value.cuda() for key, value in by_libraries(layouts[layout]).items()}
    assert_same(expected, dict(torch.ops.pyckpt.load_state_dict(layouts[layout], "auto", torch.device("cuda"))))
    targets = {key: torch.zeros_like(value) for key, value in expected.items()}  # read straight in, per shard
    assert torch.ops.pyckpt.load_into(layouts[layout], targets) == []
    as_bytes = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731 (float8 and uint64 have no equal on CUDA)
    assert all(torch.equal(as_bytes(targets[key]), as_bytes(expected[key])) for key in expected)
