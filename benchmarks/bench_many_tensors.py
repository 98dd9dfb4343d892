"""Per-tensor and first-call benchmark: many small tensors, and the first load in a fresh process.

    python benchmarks/bench_many_tensors.py [--part many|first|all] [--tensors 50000] [--repeat 3]
                                            [--data-dir DIR] [--only ROW ...]

Two parts, one table each, from one run:
- many: a MoE-like DataParallel state dict of 50,000 fp32 64x64 tensors (about 833 MB, keys
  ``module.layers.{i//8}.experts.{i%8}.w``). pyckpt.load (mapped and not), pyckpt.load_state_dict,
  the convert and inspect command lines, and pyckpt's Python backend, each against its torch (or
  cp, or interpreter start) baseline; in microseconds per tensor. Also the resident memory that
  50,000 bare tensor objects need: each over a storage of its own sliced from one mapping, in
  an OrderedDict (the floor for a faithful mapped load, the RSS target's reference), and, for
  comparison, all over one shared storage in a dict (less than any faithful load can reach).
  And the floor of an eager load: each storage's bytes read into fresh memory of its own, one
  pread each, nothing else (the time the VM takes to hand out and fault 833 MB of new pages).
- first: the 2 GiB transformer-shaped checkpoint of common.py into a built model, where the
  timed call is the FIRST one in its process, so pyckpt's lazy imports and the load of its
  native extension are part of the time: pyckpt.load_state_dict against torch's recipe and
  against a 2-thread pread of the same bytes (the ceiling).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_convert import fresh_output, output_path, run_cli, run_cp_fsync, run_watched
from bench_load_cpu import (
    check_into_model,
    check_pread,
    model_for,
    plan_pread,
    pread_into_model,
    pyckpt_into_model,
    pyckpt_load,
    torch_into_model,
    torch_load,
)
from common import (
    CLI_BASELINE_RSS_CODE,
    DEFAULT_DATA_DIR,
    DP_PREFIX,
    GIB,
    MIB,
    REPO_ROOT,
    RESULT_MARKER,
    SEED,
    Checkpoint,
    Contender,
    Measurement,
    RunResult,
    _atomic_write,
    baseline_rss,
    byte_compile_pyckpt,
    cached_fraction,
    checksum,
    current_rss,
    filesystem_of,
    peak_rss,
    prepare_checkpoint,
    preload_imports,
    reset_peak_rss,
    text_table,
    warm_page_cache,
)

MANY = "many"
FIRST = "first"
SIDE = 64  # every tensor of part A is SIDE x SIDE fp32
EXPERTS = 8  # tensor i is module.layers.{i // EXPERTS}.experts.{i % EXPERTS}.w
FIRST_SIZE_GIB = 2.0
CEILING_THREADS = 2
INSPECT_TARGET_S = 1.0
STDERR_TAIL = 25  # lines of a failed child's stderr echoed to the console

# Part A, "to a dict"
TORCH_MMAP = "torch.load(mmap=True)"
PYCKPT_MMAP = "pyckpt.load(mmap=True)"
PYCKPT_EAGER = "pyckpt.load(mmap=False)"
OBJECTS = "tensor objects only (reference)"
OWN_STORAGES = "tensor objects, own storages (reference)"
FRESH_READS = "fresh memory, one pread per storage (reference)"
# Part A, "into a built model"
TORCH_RECIPE = "torch.load(mmap) + strip + load_state_dict"
PYCKPT_INTO = "pyckpt.load_state_dict"
# Part A, command lines
CP_FSYNC = "cp + fsync"
CONVERT_CLI = "pyckpt convert (CLI)"
PYTHON_PASS = "python -c pass"
INSPECT_CLI = "pyckpt inspect --json (CLI)"
PY = " (python backend)"
# Part B
CEILING = f"{CEILING_THREADS}-thread pread (ceiling)"
FIRST_TORCH = "torch.load(mmap) + strip + load_state_dict (first call)"
FIRST_PYCKPT = "pyckpt.load_state_dict (first call)"

# Modules that pyckpt imports on the first load_state_dict; a first-call row must find none.
FIRST_CALL_MODULES = ("pyckpt.module_loading", "pyckpt._core")


# --------------------------------------------------------------------------- part A's checkpoint


def many_key(i: int) -> str:
    return f"{DP_PREFIX}layers.{i // EXPERTS}.experts.{i % EXPERTS}.w"


@dataclass(frozen=True)
class ManyCheckpoint:
    """``count`` SIDE x SIDE fp32 tensors saved as one plain (ordered) dict with DataParallel keys."""

    directory: Path
    count: int
    checksums: dict[str, int]  # stripped name -> checksum

    @property
    def pt_path(self) -> Path:
        return self.directory / "many.pt"

    @property
    def meta_path(self) -> Path:
        return self.directory / "meta.json"

    @classmethod
    def read(cls, directory: Path) -> ManyCheckpoint:
        meta = json.loads((directory / "meta.json").read_text())
        return cls(directory, meta["count"], meta["checksums"])


def prepare_many(data_dir: Path, count: int) -> ManyCheckpoint:
    """The cached checkpoint of ``count`` tensors, generated first if missing (meta.json marks it done)."""
    directory = data_dir / f"many-{count}x{SIDE}x{SIDE}"
    cached = ManyCheckpoint(directory, count, {})
    if cached.meta_path.exists() and cached.pt_path.exists():
        return ManyCheckpoint.read(directory)
    directory.mkdir(parents=True, exist_ok=True)
    megabytes = count * SIDE * SIDE * 4 / 1e6
    print(f"generating {count} tensors of {SIDE}x{SIDE} fp32 ({megabytes:.0f} MB) in {directory} ...", flush=True)
    torch.manual_seed(SEED)
    values = torch.randn(count, SIDE, SIDE)
    # Each tensor its own storage, as a trained model's parameters are (not views of one).
    state_dict = OrderedDict((many_key(i), values[i].clone()) for i in range(count))
    _atomic_write(cached.pt_path, lambda tmp: torch.save(state_dict, tmp))
    sums = values.reshape(count, -1).view(torch.int32).sum(dim=1, dtype=torch.int64).tolist()
    checksums = {many_key(i).removeprefix(DP_PREFIX): int(s) for i, s in enumerate(sums)}
    meta = {"count": count, "checksums": checksums}
    _atomic_write(cached.meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))
    return ManyCheckpoint(directory, count, checksums)


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(SIDE, SIDE))


class Layer(nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert() for _ in range(experts))


class ManyModel(nn.Module):
    """``layers.{l}.experts.{e}.w``: the stripped keys of the checkpoint, exactly."""

    def __init__(self, count: int) -> None:
        super().__init__()
        layers = math.ceil(count / EXPERTS)
        self.layers = nn.ModuleList(Layer(min(EXPERTS, count - EXPERTS * layer)) for layer in range(layers))


def many_model(checkpoint: ManyCheckpoint) -> nn.Module:
    """Built and touched before timing, every parameter NaN so a skipped one fails the check."""
    model = ManyModel(checkpoint.count)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    return model


# --------------------------------------------------------------------------- part A's checks


def tensor_problems(tensors: Mapping[str, Any], checkpoint: ManyCheckpoint, prefix: str) -> list[str]:
    """Every expected name present, nothing else, each a SIDE x SIDE fp32 tensor with the saved checksum."""
    plain = {name.removeprefix(prefix): value for name, value in tensors.items()}
    problems = [f"missing {name}" for name in checkpoint.checksums if name not in plain]
    problems += [f"unexpected {name}" for name in plain if name not in checkpoint.checksums]
    for name, expected in checkpoint.checksums.items():
        value = plain.get(name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} is a {type(value).__name__}")
        elif value.dtype != torch.float32 or tuple(value.shape) != (SIDE, SIDE):
            problems.append(f"{name} is {value.dtype} {tuple(value.shape)}")
        elif checksum(value) != expected:
            problems.append(f"{name} differs")
    return problems


def check_many_dict(checkpoint: ManyCheckpoint, _: Any, state_dict: Mapping[str, Any]) -> list[str]:
    return tensor_problems(state_dict, checkpoint, DP_PREFIX)


def check_many_model(checkpoint: ManyCheckpoint, model: nn.Module, _: Any) -> list[str]:
    return tensor_problems(model.state_dict(), checkpoint, "")


def check_converted(checkpoint: ManyCheckpoint, dst: Path, _: Any) -> list[str]:
    """DST as a user loads it: ``torch.load(weights_only=True)``, to the stripped names."""
    return tensor_problems(torch.load(dst, weights_only=True), checkpoint, "")


def check_copied(checkpoint: ManyCheckpoint, dst: Path, _: Any) -> list[str]:
    src, out = checkpoint.pt_path.stat().st_size, dst.stat().st_size
    return [] if src == out else [f"DST has {out} bytes, SRC {src}"]


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyckpt", *args]  # cwd is the repository root: this checkout's pyckpt


def run_inspect(checkpoint: ManyCheckpoint, _: None) -> int:
    # run_watched sends stdout to /dev/null: `python -m pyckpt inspect SRC --json > /dev/null`.
    return run_watched(cli_command("inspect", str(checkpoint.pt_path), "--json"))


def check_inspect(checkpoint: ManyCheckpoint, _: None, __: Any) -> list[str]:
    """The timed run's output went to /dev/null: run it again, untimed, and read its JSON."""
    done = subprocess.run(
        cli_command("inspect", str(checkpoint.pt_path), "--json"), capture_output=True, text=True, cwd=REPO_ROOT
    )
    if done.returncode != 0:
        return [f"inspect exited {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"]
    tensors = json.loads(done.stdout).get("tensors")
    return [] if tensors == checkpoint.count else [f"inspect reports {tensors} tensors, not {checkpoint.count}"]


def run_python_pass(checkpoint: ManyCheckpoint, _: None) -> int:
    return run_watched([sys.executable, "-c", "pass"])


def no_problems(*_: Any) -> list[str]:
    return []


# ------------------------------------------- part A's reference: what the Python objects need


def map_whole_file(checkpoint: ManyCheckpoint) -> torch.UntypedStorage:
    """One private mapping of the whole file: mapped, not resident (nothing touches it)."""
    size = checkpoint.pt_path.stat().st_size
    return torch.UntypedStorage.from_file(str(checkpoint.pt_path), False, size)


def bare_tensor_objects(checkpoint: ManyCheckpoint, storage: torch.UntypedStorage) -> dict[str, torch.Tensor]:
    """``count`` tensors set_ onto consecutive slices of one mapped storage, in a dict under the
    checkpoint's keys: the Python objects a mapped load must build, without any loader around
    them. The slices are not the tensors' bytes (the file's layout is ignored). All tensors
    share one storage, which a faithful load cannot do (see ``tensors_with_own_storages``)."""
    numel = SIDE * SIDE
    tensors = {}
    for i in range(checkpoint.count):
        tensor = torch.empty(0)
        tensor.set_(storage, i * numel, (SIDE, SIDE))
        tensors[many_key(i)] = tensor
    return tensors


def tensors_with_own_storages(
    checkpoint: ManyCheckpoint, storage: torch.UntypedStorage
) -> OrderedDict[str, torch.Tensor]:
    """What a faithful mapped load has to build at the least: each tensor over a storage of its
    own (the file has one storage per tensor, and torch.load keeps them apart), each storage a
    slice of one mapping, in an OrderedDict (what the file holds). The cheapest way torch has:
    slicing an UntypedStorage makes a new storage over the same memory."""
    nbytes = SIDE * SIDE * 4
    tensors = OrderedDict()
    for i in range(checkpoint.count):
        tensor = torch.empty(0)
        tensor.set_(storage[i * nbytes : (i + 1) * nbytes], 0, (SIDE, SIDE))
        tensors[many_key(i)] = tensor
    return tensors


def storage_ranges(checkpoint: ManyCheckpoint) -> tuple[int, list[tuple[str, int, int]]]:
    """An open descriptor and each storage record's (key, data offset, size), from the zip's
    local headers: what an eager load must read, found before the timing starts."""
    import struct
    import zipfile

    fd = os.open(checkpoint.pt_path, os.O_RDONLY)
    ranges = []
    with zipfile.ZipFile(checkpoint.pt_path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename:
                name_length, extra_length = struct.unpack("<HH", os.pread(fd, 4, info.header_offset + 26))
                ranges.append((info.filename, info.header_offset + 30 + name_length + extra_length, info.file_size))
    return fd, ranges


def fresh_reads(checkpoint: ManyCheckpoint, prepared: tuple[int, list[tuple[str, int, int]]]) -> dict[str, torch.Tensor]:
    """The floor of an eager load: every storage's bytes read into fresh memory of its own, one
    pread each on one thread, with no pickle, no keys and no tensor views."""
    fd, ranges = prepared
    storages = {}
    for name, offset, size in ranges:
        buffer = torch.empty(size, dtype=torch.uint8)
        os.preadv(fd, [buffer.numpy()], offset)
        storages[name] = buffer
    os.close(fd)
    return storages


def check_objects(checkpoint: ManyCheckpoint, _: Any, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    if len(tensors) != checkpoint.count:
        return [f"{len(tensors)} tensors, not {checkpoint.count}"]
    return []


# --------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Row(Contender):
    """A contender with what this script also needs to know about it.

    ``env``: extra environment of its child; ``backend``: the pyckpt backend its child must
    report ("native", "python"; None: not checked); ``floor``: what its peak RSS is measured
    above ("imports": `import torch, pyckpt`; "cli": a bare `import pyckpt`, for pyckpt's
    command line, which never imports torch; "own": nothing, the process's own peak);
    ``process``: the timed call runs a whole process and returns that process's peak RSS.
    """

    part: str = MANY
    env: tuple[tuple[str, str], ...] = ()
    backend: str | None = None
    floor: str = "imports"
    process: bool = False


TO_DICT = "to a dict"
INTO_MODEL = "into a built model"
CONVERT = "convert (a whole process)"
INSPECT = "inspect (a whole process)"
INTO_MODEL_FIRST = "first call, into a built model"
PYTHON_BACKEND = (("PYCKPT_DISABLE_EXT", "1"),)

ROWS = [
    Row(TORCH_MMAP, TO_DICT, torch_load(mmap=True), check_many_dict, baseline=True),
    Row(PYCKPT_MMAP, TO_DICT, pyckpt_load(mmap=True), check_many_dict, backend="native"),
    Row(PYCKPT_EAGER, TO_DICT, pyckpt_load(mmap=False), check_many_dict, backend="native"),
    Row(PYCKPT_MMAP + PY, TO_DICT, pyckpt_load(mmap=True), check_many_dict, env=PYTHON_BACKEND, backend="python"),
    Row(PYCKPT_EAGER + PY, TO_DICT, pyckpt_load(mmap=False), check_many_dict, env=PYTHON_BACKEND, backend="python"),
    Row(OBJECTS, TO_DICT, bare_tensor_objects, check_objects, map_whole_file),
    Row(OWN_STORAGES, TO_DICT, tensors_with_own_storages, check_objects, map_whole_file),
    Row(FRESH_READS, TO_DICT, fresh_reads, check_objects, storage_ranges),
    Row(TORCH_RECIPE, INTO_MODEL, torch_into_model(mmap=True), check_many_model, many_model, baseline=True),
    Row(PYCKPT_INTO, INTO_MODEL, pyckpt_into_model, check_many_model, many_model, backend="native"),
    Row(
        PYCKPT_INTO + PY,
        INTO_MODEL,
        pyckpt_into_model,
        check_many_model,
        many_model,
        env=PYTHON_BACKEND,
        backend="python",
    ),
    Row(CP_FSYNC, CONVERT, run_cp_fsync, check_copied, fresh_output, baseline=True, floor="own", process=True),
    Row(CONVERT_CLI, CONVERT, run_cli, check_converted, fresh_output, floor="cli", process=True),
    Row(PYTHON_PASS, INSPECT, run_python_pass, no_problems, baseline=True, floor="own", process=True),
    Row(INSPECT_CLI, INSPECT, run_inspect, check_inspect, floor="cli", process=True),
    # Part B: nothing of pyckpt is imported before the timed call but `import pyckpt` itself.
    Row(
        CEILING,
        INTO_MODEL_FIRST,
        pread_into_model,
        check_pread,
        plan_pread,
        baseline=True,
        part=FIRST,
        env=(("PYCKPT_THREADS", str(CEILING_THREADS)),),
    ),
    Row(FIRST_TORCH, INTO_MODEL_FIRST, torch_into_model(mmap=True), check_into_model, model_for, part=FIRST),
    Row(FIRST_PYCKPT, INTO_MODEL_FIRST, pyckpt_into_model, check_into_model, model_for, part=FIRST, backend="native"),
]


# --------------------------------------------------------------------------- one run (child)


def backend_problems(row: Row) -> list[str]:
    if row.backend is None:
        return []
    import pyckpt

    info = pyckpt.backend_info()
    if info.name == row.backend:
        return []
    return [f"ran on pyckpt's {info.name} backend, not {row.backend} ({info.reason})"]


def run_child(row: Row, directory: Path) -> None:
    """Prepare (untimed), time the call, read peak RSS, check (untimed), print one JSON line.

    Part A pays every import before timing (common.preload_imports); part B imports torch
    and `import pyckpt` only, so whatever pyckpt loads on its first call is timed."""
    checkpoint: Any = ManyCheckpoint.read(directory) if row.part == MANY else Checkpoint.read(directory)
    import pyckpt  # noqa: F401

    if row.part == MANY:
        preload_imports()
    state = row.prepare(checkpoint)
    early = [name for name in FIRST_CALL_MODULES if name in sys.modules] if row.part == FIRST else []
    reset_peak_rss()
    result = RunResult(rss_before=current_rss())
    try:
        start = time.perf_counter()
        output = row.run(checkpoint, state)
        result.seconds = time.perf_counter() - start
        result.peak_rss = output if row.process else peak_rss()
        if row.process:
            result.rss_before = 0
        result.problems = row.check(checkpoint, state, output) + backend_problems(row)
        if early and row.backend is not None:
            result.problems.append(f"not a first call: {', '.join(early)} imported before timing")
    finally:
        if row.part == MANY:
            output_path(checkpoint).unlink(missing_ok=True)
    print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)


# --------------------------------------------------------------------------- measuring (parent)


def spawn(script: Path, row: Row, checkpoint: Any) -> RunResult:
    """One fresh child for one run of ``row``; a failed child's stderr tail is echoed."""
    env = {**os.environ, **dict(row.env)}
    command = [sys.executable, str(script), "--child", row.name, "--checkpoint-dir", str(checkpoint.directory)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return RunResult(**json.loads(line[len(RESULT_MARKER) :]))
    lines = done.stderr.strip().splitlines()
    for line in lines[-STDERR_TAIL:]:
        print(f"      | {line}")
    return RunResult(error=f"child exited {done.returncode}: {(lines or [''])[-1]}")


def measure(script: Path, rows: Sequence[Row], checkpoint: Any, repeat: int, label: str) -> dict[str, Measurement]:
    """Every row ``repeat`` times, round-robin. Before each run: no DST left, dirty pages
    flushed (no run pays for another's writeback), the input read through (warm cache)."""
    results = {row.name: Measurement(row, []) for row in rows}
    for round_number in range(1, repeat + 1):
        for row in rows:
            if row.part == MANY:
                output_path(checkpoint).unlink(missing_ok=True)
            os.sync()
            warm_page_cache(checkpoint.pt_path)
            run = spawn(script, row, checkpoint)
            if row.part == MANY:
                output_path(checkpoint).unlink(missing_ok=True)  # a crashed child may leave it
            results[row.name].runs.append(run)
            status = f"{run.seconds:.3f} s" if run.error is None else run.error
            print(f"  [{label} {round_number}/{repeat}] {row.name}: {status}", flush=True)
    return results


# --------------------------------------------------------------------------- reporting


def extra_rss(m: Measurement, floors: Mapping[str, int]) -> str:
    row: Row = m.contender  # type: ignore[assignment]
    if not m.ok_runs:
        return "-"
    text = f"{(m.peak_rss - floors[row.floor]) / MIB:.0f}"
    return text + " (own)" if row.floor == "own" else text


def grouped(results: Mapping[str, Measurement]) -> dict[str, list[Measurement]]:
    groups: dict[str, list[Measurement]] = {}
    for m in results.values():
        groups.setdefault(m.contender.group, []).append(m)
    return groups


def with_groups(header: Sequence[str], groups: Mapping[str, list[tuple[str, ...]]]) -> list[str]:
    """text_table's lines, each group's rows under a `[group; ...]` line."""
    all_rows = [row for rows in groups.values() for row in rows]
    lines = text_table(header, all_rows)
    out, index = lines[:2], 2
    for title, rows in groups.items():
        out.append(title)
        out += lines[index : index + len(rows)]
        index += len(rows)
    return out


def ratio_text(m: Measurement, base: Measurement) -> str:
    if m is base:
        return "baseline"
    if base.failure or not m.ok_runs:
        return "-"
    return f"{m.seconds / base.seconds:.2f}"


def many_table(results: Mapping[str, Measurement], count: int, floors: Mapping[str, int]) -> list[str]:
    header = ("row", "median s", "spread", "us/tensor", "x baseline", "peak RSS MiB", "during call MiB", "check")
    groups: dict[str, list[tuple[str, ...]]] = {}
    for group, members in grouped(results).items():
        base = next((m for m in members if m.contender.baseline), members[0])
        rows = groups.setdefault(f"[{group}; baseline: {base.contender.name}]", [])
        for m in members:
            row: Row = m.contender  # type: ignore[assignment]
            rows.append(
                (
                    "  " + row.name,
                    f"{m.seconds:.3f}",
                    f"{m.spread:.0%}",
                    f"{m.seconds / count * 1e6:.1f}",
                    ratio_text(m, base),
                    extra_rss(m, floors),
                    "-" if row.process or not m.ok_runs else f"{m.load_rss / MIB:.0f}",
                    m.failure or "ok",
                )
            )
    return with_groups(header, groups)


def first_table(results: Mapping[str, Measurement], file_bytes: int, floors: Mapping[str, int]) -> list[str]:
    header = ("row", "median s", "spread", "GB/s", "x ceiling", "x torch recipe", "peak RSS MiB", "check")
    ceiling, torch_row = results.get(CEILING), results.get(FIRST_TORCH)
    rows = []
    for name, m in results.items():
        rows.append(
            (
                "  " + name,
                f"{m.seconds:.3f}",
                f"{m.spread:.0%}",
                f"{file_bytes / m.seconds / 1e9:.2f}",
                "-" if ceiling is None else ratio_text(m, ceiling),
                "-" if torch_row is None else ratio_text(m, torch_row),
                extra_rss(m, floors),
                m.failure or "ok",
            )
        )
    return with_groups(header, {f"[{INTO_MODEL_FIRST}]": rows})


def usable(results: Mapping[str, Measurement], *names: str) -> bool:
    return all(name in results and not results[name].failure for name in names)


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def many_verdicts(results: Mapping[str, Measurement], count: int, floors: Mapping[str, int]) -> list[str]:
    lines = []
    r = results
    for reference in (OWN_STORAGES, OBJECTS):
        if not usable(r, PYCKPT_MMAP, reference):
            continue
        load, objects = r[PYCKPT_MMAP], r[reference]
        above = load.peak_rss - floors["imports"]
        need = objects.load_rss
        # Judged on the growth during the call, measured the same way for both rows: each
        # child also holds what it loaded before the call (pyckpt's extension among it), the
        # same in every row, which "above imports" counts and the call does not cause.
        target = f" (target <= 1.5x: {met(load.load_rss <= 1.5 * need)})" if reference == OWN_STORAGES else ""
        lines.append(
            f"{PYCKPT_MMAP}: peak growth during the call {load.load_rss / MIB:.0f} MiB against the "
            f"{need / MIB:.0f} MiB of '{reference}': {load.load_rss / need:.2f}x{target} (peak above imports "
            f"{above / MIB:.0f} against {(objects.peak_rss - floors['imports']) / MIB:.0f} MiB)"
        )
    for row, base in ((PYCKPT_MMAP, TORCH_MMAP), (PYCKPT_EAGER, TORCH_MMAP), (PYCKPT_INTO, TORCH_RECIPE)):
        if usable(r, row, base):
            lines.append(
                f"{row}: {r[row].seconds / count * 1e6:.1f} us/tensor, {r[row].seconds / r[base].seconds:.2f}x "
                f"the time of {base} ({r[base].seconds / r[row].seconds:.2f}x as fast)"
            )
    if usable(r, CONVERT_CLI, CP_FSYNC):
        lines.append(f"{CONVERT_CLI}: {r[CONVERT_CLI].seconds / r[CP_FSYNC].seconds:.2f}x the time of {CP_FSYNC}")
    if usable(r, INSPECT_CLI):
        seconds = r[INSPECT_CLI].seconds
        vs_pass = f", {seconds / r[PYTHON_PASS].seconds:.1f}x {PYTHON_PASS}" if usable(r, PYTHON_PASS) else ""
        ok = met(seconds <= INSPECT_TARGET_S)
        lines.append(f"{INSPECT_CLI}: {seconds:.3f} s (target <= {INSPECT_TARGET_S:g} s: {ok}){vs_pass}")
    return lines


def first_verdict(results: Mapping[str, Measurement]) -> list[str]:
    r = results
    if not usable(r, FIRST_PYCKPT):
        return []
    parts = []
    if usable(r, CEILING):
        share = r[CEILING].seconds / r[FIRST_PYCKPT].seconds
        parts.append(f"{share:.0%} of the {CEILING}'s speed")
    if usable(r, FIRST_TORCH):
        parts.append(f"{r[FIRST_TORCH].seconds / r[FIRST_PYCKPT].seconds:.2f}x as fast as {FIRST_TORCH}")
    return [f"{FIRST_PYCKPT}: " + ", ".join(parts)] if parts else []


def header_lines(
    many: ManyCheckpoint | None, first: Checkpoint | None, floors: Mapping[str, int], load_before: float, repeat: int
) -> list[str]:
    import pyckpt
    from pyckpt._env import io_threads

    info = pyckpt.backend_info()
    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    cpus = os.cpu_count() or 1
    backend = info.name + ("" if info.reason is None else f": {info.reason}")
    lines = [
        f"date        {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine     {cpus} CPUs, {mem_kib / (1 << 20):.1f} GiB RAM, {platform.platform()}; 1-min load "
        f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end (above {cpus}: other work competed)",
        f"software    python {platform.python_version()}, torch {torch.__version__}, pyckpt {pyckpt.__version__} "
        f"(backend {backend}; {io_threads()} io threads)",
    ]
    for checkpoint, what in (
        (many, f"{many.count if many else 0} tensors {SIDE}x{SIDE} fp32, DataParallel keys, plain dict"),
        (first, "DataParallel LM, tied embedding (common.py)"),
    ):
        if checkpoint is not None:
            path = checkpoint.pt_path
            size = path.stat().st_size / 1e6
            lines.append(f"checkpoint  {path} ({size:.0f} MB; {what}); cached now {cached_fraction(path):.0%}")
    data_dir = (many or first).directory.parent  # type: ignore[union-attr]
    lines += [
        f"filesystem  {filesystem_of(data_dir)}",
        f"each row    median of {repeat} fresh subprocesses, input read through (warm) and sync() before each;",
        f"            peak RSS above `import torch, pyckpt` ({floors['imports'] / MIB:.0f} MiB); pyckpt's command line",
        f"            above a bare `import pyckpt` ({floors['cli'] / MIB:.0f} MiB); (own): the process's own peak",
        "            x baseline = this row's time / the baseline's (below 1: faster)",
    ]
    return lines


# --------------------------------------------------------------------------- entry point


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("many", "first", "all"), default="all", help="which table (default all)")
    parser.add_argument("--tensors", type=int, default=50000, help="tensors in part A's checkpoint (default 50000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown (default 3)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"cache (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows (by name)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    script = Path(__file__).resolve()
    by_name = {row.name: row for row in ROWS}
    if args.child is not None:
        run_child(by_name[args.child], args.checkpoint_dir)
        return 0

    unknown = [name for name in args.only or [] if name not in by_name]
    if unknown:
        print(f"unknown rows: {unknown}; rows are: {list(by_name)}", file=sys.stderr)
        return 2
    parts = (MANY, FIRST) if args.part == "all" else ((MANY,) if args.part == "many" else (FIRST,))
    chosen = [row for row in ROWS if row.part in parts and (args.only is None or row.name in args.only)]
    many_rows = [row for row in chosen if row.part == MANY]
    first_rows = [row for row in chosen if row.part == FIRST]
    many = prepare_many(args.data_dir, args.tensors) if many_rows else None
    first = prepare_checkpoint(args.data_dir, FIRST_SIZE_GIB, with_safetensors=False) if first_rows else None

    load_before = os.getloadavg()[0]
    compiled = byte_compile_pyckpt()
    floors = {"imports": baseline_rss(os.environ), "cli": baseline_rss(os.environ, CLI_BASELINE_RSS_CODE), "own": 0}
    many_results = measure(script, many_rows, many, args.repeat, "many") if many_rows else {}
    first_results = measure(script, first_rows, first, args.repeat, "first") if first_rows else {}

    print()
    for line in header_lines(many, first, floors, load_before, args.repeat) + [compiled]:
        print(line)
    if many_results:
        assert many is not None
        print(f"\nA. {many.count} tensors of {SIDE}x{SIDE} fp32 (imports paid before timing):")
        for line in many_table(many_results, many.count, floors):
            print(line)
    if first_results:
        assert first is not None
        print(
            f"\nB. first call in a fresh process, {first.pt_path.stat().st_size / GIB:.2f} GiB into a built model "
            "(pyckpt's lazy imports and extension load inside the timed call):"
        )
        for line in first_table(first_results, first.pt_path.stat().st_size, floors):
            print(line)
    print()
    wrong = [name for name, m in {**many_results, **first_results}.items() if m.failure]
    if wrong:
        print("!" * 80)
        print(f"!!! WRONG OR FAILED RESULTS in: {', '.join(wrong)}. Their times mean nothing.")
        print("!" * 80)
    for line in many_verdicts(many_results, many.count if many else 0, floors) + first_verdict(first_results):
        print(line)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
