"""GPU load benchmark: one prepared run on a CUDA machine, from a fresh copy of the repository.

    python benchmarks/gpu_bench.py [--size-gib 4] [--repeat 2] [--data-dir DIR] [--skip-build] [--skip-tests]
                                   [--ring-mb M] [--ring-buffers N] [--streams S] [--readers R] [--dry-run]
                                   [--trace PATH] [--deadline-s 540]

1. builds the extension in place (``setup.py build_ext --inplace``), prints the backend;
2. runs the CUDA tests (``tests/test_device.py tests/test_load.py tests/test_distributed.py tests/test_cpp_api.py tests/test_dcp_input.py -k "cuda or device"``);
3. measures pinned and pageable host-to-device bandwidth with plain torch copies;
4. generates (once, cached) a DataParallel checkpoint and warms the page cache;
5. times pyckpt, torch and safetensors loading it to the GPU, each run in a fresh subprocess;
6. checks every result against the checksums saved with the checkpoint;
7. profiles one more load (``gpu_overlap.py``): copies per stream, their overlap, the caller;
8. runs ``bench_distributed.py`` on one rank over NCCL (cooperative and FSDP2 loads, <= 1 GiB).

The exit status is 1 when the build, a test or a check failed (the benchmark runs anyway), or
when a step was skipped for ``--deadline-s`` (seconds from the start of the script, default 540,
under the 600 s a command may run): a step, or a child load, that would not fit in the time left
is skipped with a ``SKIPPED: deadline`` line, every subprocess's timeout is cut to the time left,
and a timed-out subprocess is killed with its whole process group (ranks, compilers, pytest's
workers). A load that times out skips its row's other repeats and the profile (step 7).
``--dry-run`` runs every step with a tiny checkpoint, on the CPU where there is no CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRIPT_START = time.monotonic()  # --deadline-s counts from here, before torch's import

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bounded_run import Deadline, limit_text, output_tail, run_bounded, tail  # noqa: E402
from common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    DP_PREFIX,
    GIB,
    MIB,
    REPO_ROOT,
    RESULT_MARKER,
    TIED_NAMES,
    Checkpoint,
    LMConfig,
    build_model,
    cached_fraction,
    check_model,
    check_state_dict,
    check_tensors,
    checkpoint_directory,
    current_rss,
    filesystem_of,
    markdown_table,
    peak_rss,
    prepare_checkpoint,
    preload_imports,
    reset_peak_rss,
    text_table,
    warm_page_cache,
)

DEFAULT_SIZE_GIB = 4.0
DEFAULT_REPEAT = 2
DEFAULT_DEADLINE_S = 540.0  # from the start of the script; one command may run 600 s
DRY_RUN_SIZE_GIB = 0.05
BANDWIDTH_BYTES = 1 << 30
BANDWIDTH_REPEAT = 10
BUILD_TIMEOUT_S = 480
TESTS_TIMEOUT_S = 300
CHILD_TIMEOUT_S = 90  # one load of 4 GiB by the slowest row (torch.load) takes a few seconds
DISTRIBUTED_TIMEOUT_S = 180  # generating its <= 1 GiB checkpoint once, then six loads
TAIL_LINES = 40  # of a timed-out or failed subprocess's output
# The least time left, in seconds, for which a step (or one child load) is started at all.
STEP_MIN_S = {
    "build": 60,
    "tests": 20,
    "bandwidth": 10,
    "checkpoint": 30,
    "load": 20,
    "profile": 30,
    "distributed": 60,
}
DISTRIBUTED_MAX_GIB = 1.0  # world size 1 says whether the NCCL paths work, not how they scale
DISK_MARGIN = 2 * GIB
TARGET_PINNED_SHARE = 0.80
AIM_PINNED_SHARE = 0.90
TARGET_SPEEDUP = 3.0
RING_SETTINGS = {  # flag -> environment variable read by pyckpt.execute.device.ring_config
    "ring_mb": "PYCKPT_RING_MB",
    "ring_buffers": "PYCKPT_RING_BUFFERS",
    "streams": "PYCKPT_STREAMS",
    "readers": "PYCKPT_READERS",
}


def section(title: str) -> None:
    print(f"\n{'=' * 20} {title} {'=' * max(0, 58 - len(title))}", flush=True)


# --------------------------------------------------------------------------- 1. build


def build_extension(deadline: Deadline) -> bool:
    """Compile ``pyckpt._core`` and ``pyckpt._ring`` in place (the repository is on sys.path via common.py)."""
    ninja = shutil.which("ninja") is not None
    print(f"$ {sys.executable} setup.py build_ext --inplace   (ninja: {'yes' if ninja else 'NO, serial compile'})")
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 1)}
    start = time.perf_counter()
    limit = deadline.limit(BUILD_TIMEOUT_S)
    returncode, stdout, stderr = run_bounded(
        [sys.executable, "setup.py", "build_ext", "--inplace"], limit, cwd=REPO_ROOT, env=env
    )
    if returncode is None:
        print(f"BUILD TIMED OUT after {limit_text(limit, BUILD_TIMEOUT_S)}:\n{output_tail(stdout, stderr)}")
        return False
    seconds = time.perf_counter() - start
    if returncode != 0:
        print(f"BUILD FAILED (exit {returncode}, {seconds:.0f} s):\n{tail(stdout + stderr, TAIL_LINES)}")
        return False
    print(f"built in {seconds:.0f} s")
    return True


# --------------------------------------------------------------------------- 2. tests


@dataclass
class TestOutcome:
    ran: bool
    ok: bool
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.ran:
            return "NOT RUN"
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts.items()) or "no summary line"
        return f"{'ok' if self.ok else 'FAILED'} ({counts})"


def run_tests(deadline: Deadline) -> TestOutcome:
    try:
        import pytest  # noqa: F401
    except ImportError:
        print("pytest is not installed: the tests were NOT run")
        return TestOutcome(ran=False, ok=False)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "tests/test_device.py",
        "tests/test_load.py",
        "tests/test_distributed.py",
        "tests/test_cpp_api.py",
        "tests/test_dcp_input.py",
        "-k",
        "cuda or device",
        "-o",
        "faulthandler_timeout=120",  # a hung test dumps every thread's stack into the output
    ]
    print("$ " + shlex.join(["python", *command[1:]]))
    limit = deadline.limit(TESTS_TIMEOUT_S)
    returncode, stdout, stderr = run_bounded(command, limit, cwd=REPO_ROOT)
    if returncode is None:
        print(f"TESTS TIMED OUT after {limit_text(limit, TESTS_TIMEOUT_S)}:\n{output_tail(stdout, stderr)}")
        return TestOutcome(ran=True, ok=False)
    output = stdout + stderr
    print(tail(output, 30 if returncode else 3))
    summary = next(
        (line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error)", line)), ""
    )
    counts = {
        kind: int(n)
        for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summary)
    }
    return TestOutcome(ran=True, ok=returncode == 0, counts=counts)


# --------------------------------------------------------------------------- 3. bandwidth


def h2d_bandwidth(nbytes: int, repeat: int) -> dict[str, list[float]]:
    """GB/s of plain ``tensor.copy_`` host -> device, from pinned and from pageable memory.

    Wall time around the copy and a synchronize, as the loads are timed. The host buffers
    are touched first, so no page fault is timed."""
    device_buffer = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates: dict[str, list[float]] = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).fill_(1)
        device_buffer.copy_(host, non_blocking=pinned)  # warm-up: driver mappings, staging buffers
        torch.cuda.synchronize()
        rates[kind] = []
        for _ in range(repeat):
            start = time.perf_counter()
            device_buffer.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize()
            rates[kind].append(nbytes / (time.perf_counter() - start) / 1e9)
        del host
    del device_buffer
    torch.cuda.empty_cache()
    return rates


# --------------------------------------------------------------------------- 4. checkpoint


def wants_safetensors(data_dir: Path, size_gib: float) -> tuple[bool, str]:
    """Whether to write (or use) the safetensors copy: the package must exist and, if the
    copy is not cached yet, the disk must hold it beside the .pt file."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False, "safetensors is not installed: its row is skipped"
    config = LMConfig.for_size(size_gib)
    cached = Checkpoint(checkpoint_directory(data_dir, config), config, {})
    missing = [path for path in (cached.pt_path, cached.safetensors_path) if not path.exists()]
    needed = config.nbytes() * len(missing) + DISK_MARGIN
    data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data_dir).free
    if free < needed:
        return (
            False,
            f"{free / GIB:.1f} GiB free, {needed / GIB:.1f} GiB needed with the safetensors copy: its row is skipped",
        )
    return True, f"{free / GIB:.1f} GiB free"


def warm(path: Path) -> None:
    """Read ``path`` through unless it is (almost) all cached already: checking is cheaper."""
    if cached_fraction(path) < 0.99:
        warm_page_cache(path)


# --------------------------------------------------------------------------- 5. the rows


def on_device(tensors: Mapping[str, Any], device: torch.device) -> list[str]:
    return [
        f"{name} on {t.device}"
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.device.type != device.type
    ]


def load_torch(checkpoint: Checkpoint, device: torch.device, _: None) -> Any:
    return torch.load(checkpoint.pt_path, map_location=device, weights_only=True)


def load_pyckpt(checkpoint: Checkpoint, device: torch.device, _: None) -> Any:
    import pyckpt

    return pyckpt.load(checkpoint.pt_path, map_location=device)


def load_into_model(checkpoint: Checkpoint, device: torch.device, model: nn.Module) -> Any:
    import pyckpt

    return pyckpt.load_state_dict(model, checkpoint.pt_path)


def load_torch_mmap_then_move(checkpoint: Checkpoint, device: torch.device, _: None) -> Any:
    state_dict = torch.load(checkpoint.pt_path, mmap=True, weights_only=True)
    return {name: tensor.to(device) for name, tensor in state_dict.items()}


def load_safetensors(checkpoint: Checkpoint, device: torch.device, _: None) -> Any:
    from safetensors.torch import load_file

    return load_file(checkpoint.safetensors_path, device=str(device))


def check_dict(checkpoint: Checkpoint, device: torch.device, _: None, output: Any) -> list[str]:
    return check_state_dict(output, checkpoint) + on_device(output, device)


def check_into_model(checkpoint: Checkpoint, device: torch.device, model: nn.Module, _: Any) -> list[str]:
    return check_model(model, checkpoint) + on_device(model.state_dict(), device)


def check_moved(checkpoint: Checkpoint, device: torch.device, _: None, output: Any) -> list[str]:
    # Bytes only: .to() on each tensor copies the tied weight twice, by design of this recipe.
    return check_tensors(output, checkpoint, DP_PREFIX) + on_device(output, device)


def check_safetensors(checkpoint: Checkpoint, device: torch.device, _: None, output: Any) -> list[str]:
    # The file holds the tied weight once, under its owner's name.
    problems = [p for p in check_tensors(output, checkpoint) if p.removeprefix("missing ") not in TIED_NAMES]
    return problems + on_device(output, device)


def model_on(checkpoint: Checkpoint, device: torch.device) -> nn.Module:
    return build_model(checkpoint.config, device)


@dataclass(frozen=True)
class LoadRow:
    """One row: ``prepare`` (untimed) builds what ``load`` needs; ``check`` returns problems."""

    key: str  # the row's id on the command line of its child process
    label: str  # "{device}" is replaced by the device's name
    load: Callable[[Checkpoint, torch.device, Any], Any]
    check: Callable[[Checkpoint, torch.device, Any, Any], list[str]]
    prepare: Callable[[Checkpoint, torch.device], Any] = lambda checkpoint, device: None
    reads_safetensors: bool = False
    tolerated: str = ""  # what the check lets pass, shown beside "ok"

    def name(self, device: str) -> str:
        return self.label.format(device=device)

    def input_path(self, checkpoint: Checkpoint) -> Path:
        return checkpoint.safetensors_path if self.reads_safetensors else checkpoint.pt_path


BASELINE = "torch"
CONTENDERS = ("pyckpt-load", "pyckpt-model")
ROWS = [
    LoadRow(BASELINE, 'torch.load(map_location="{device}")', load_torch, check_dict),
    LoadRow("pyckpt-load", 'pyckpt.load(map_location="{device}")', load_pyckpt, check_dict),
    LoadRow("pyckpt-model", "pyckpt.load_state_dict({device} model)", load_into_model, check_into_model, model_on),
    LoadRow(
        "torch-mmap-to",
        'torch.load(mmap=True) + .to("{device}")',
        load_torch_mmap_then_move,
        check_moved,
        tolerated="tie not checked: .to copies each tensor",
    ),
    LoadRow(
        "safetensors",
        'safetensors load_file(device="{device}")',
        load_safetensors,
        check_safetensors,
        reads_safetensors=True,
        tolerated="tied head not in file",
    ),
]


# --------------------------------------------------------------------------- one run (child)


@dataclass
class LoadRun:
    """One fresh process: the first load, then the same load again in that process."""

    first_s: float = float("nan")
    again_s: float = float("nan")
    host_rss_growth: int = 0  # bytes the first load added to the resident set at its peak
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    timed_out: bool = False
    output_tail: str = ""  # the parent's: a failed or timed-out child's last output lines


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_child(row: LoadRow, checkpoint: Checkpoint, device: torch.device) -> None:
    preload_imports()
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context is no part of a load
    state = row.prepare(checkpoint, device)
    synchronize(device)
    run = LoadRun()
    for attempt in ("first", "again"):
        if isinstance(state, nn.Module):  # so a skipped tensor shows, on the second load too
            with torch.no_grad():
                for parameter in state.parameters():
                    parameter.fill_(float("nan"))
            synchronize(device)
        reset_peak_rss()
        rss_before = current_rss()
        start = time.perf_counter()
        output = row.load(checkpoint, device, state)
        synchronize(device)  # pyckpt returns with copies queued on the caller's stream
        seconds = time.perf_counter() - start
        if attempt == "first":
            run.first_s, run.host_rss_growth = seconds, peak_rss() - rss_before
        else:
            run.again_s = seconds
        run.problems += [f"{p} ({attempt} load)" for p in row.check(checkpoint, device, state, output)]
        del output
    print(RESULT_MARKER + json.dumps(asdict(run)), flush=True)


def spawn_child(row: LoadRow, checkpoint: Checkpoint, device: str, deadline: Deadline) -> LoadRun:
    script = str(Path(__file__).resolve())
    command = [
        sys.executable,
        script,
        "--child",
        row.key,
        "--checkpoint-dir",
        str(checkpoint.directory),
        "--device",
        device,
    ]
    limit = deadline.limit(CHILD_TIMEOUT_S)
    returncode, stdout, stderr = run_bounded(command, limit, cwd=REPO_ROOT)
    if returncode is None:
        return LoadRun(
            error=f"TIMED OUT after {limit_text(limit, CHILD_TIMEOUT_S)}",
            timed_out=True,
            output_tail=output_tail(stdout, stderr),
        )
    last = (stderr.strip().splitlines() or [f"exit status {returncode}"])[-1]
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            run = LoadRun(**json.loads(line[len(RESULT_MARKER) :]))
            if returncode != 0:  # a crash after the result (teardown, the ring's threads) is a failure too
                run.error = f"child exited {returncode} after its result: {last}"
                run.output_tail = output_tail("", stderr)
            return run
    return LoadRun(error=f"child exited {returncode}: {last}", output_tail=output_tail("", stderr))


# --------------------------------------------------------------------------- reporting


@dataclass
class RowResult:
    row: LoadRow
    runs: list[LoadRun]
    skipped: int = 0  # runs not started for the deadline

    @property
    def timed_out(self) -> bool:
        return any(run.timed_out for run in self.runs)

    @property
    def ok_runs(self) -> list[LoadRun]:
        return [run for run in self.runs if run.error is None]

    def median(self, attempt: str) -> float:
        times = [getattr(run, f"{attempt}_s") for run in self.ok_runs]
        return statistics.median(times) if times else float("nan")

    @property
    def failure(self) -> str | None:
        errors = sorted({run.error for run in self.runs if run.error})
        if errors:
            return "FAILED: " + "; ".join(errors)
        problems = sorted({p for run in self.runs for p in run.problems})
        if problems:
            return (
                "WRONG RESULT: "
                + "; ".join(problems[:3])
                + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
            )
        return None


def measure(
    rows: Sequence[LoadRow], checkpoint: Checkpoint, device: str, repeat: int, deadline: Deadline
) -> dict[str, RowResult]:
    """Every row ``repeat`` times, round-robin so drifts of the machine hit all rows alike.

    A row whose load timed out is not run again; a run that would not fit before the deadline
    is skipped (counted in ``RowResult.skipped``)."""
    results = {row.key: RowResult(row, []) for row in rows}
    for round_number in range(1, repeat + 1):
        for row in rows:
            result = results[row.key]
            prefix = f"  [{round_number}/{repeat}] {row.name(device)}: "
            if result.timed_out:
                print(prefix + "skipped (an earlier run of this row timed out)", flush=True)
                continue
            if not deadline.allows("load", indent=prefix):
                result.skipped += 1
                continue
            warm(row.input_path(checkpoint))
            run = spawn_child(row, checkpoint, device, deadline)
            result.runs.append(run)
            status = run.error or f"{run.first_s:.3f} s, again {run.again_s:.3f} s" + (" WRONG" if run.problems else "")
            print(prefix + status, flush=True)
            if run.output_tail:
                print("\n".join("      " + line for line in run.output_tail.splitlines()), flush=True)
    return results


def result_rows(
    results: Mapping[str, RowResult], checkpoint: Checkpoint, device: str, pinned_best: float | None
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header: tuple[str, ...] = (
        "row",
        "median s",
        "GB/s",
        "% pinned H2D",
        "x torch.load",
        "2nd load GB/s",
        "host RSS +MiB",
        "check",
    )
    baseline = results.get(BASELINE)
    rows: list[tuple[str, ...]] = []
    for result in results.values():
        size = result.row.input_path(checkpoint).stat().st_size
        seconds = result.median("first")
        rate = size / seconds / 1e9
        usable = baseline is not None and not baseline.failure and baseline.ok_runs
        speedup = baseline.median("first") / seconds if usable else float("nan")
        growth = max((run.host_rss_growth for run in result.ok_runs), default=0)
        if result.failure:
            check = result.failure
        elif not result.runs:
            check = "SKIPPED: deadline"
        else:
            notes = [result.row.tolerated] if result.row.tolerated else []
            if result.skipped:
                notes.append(f"{len(result.runs)} of {len(result.runs) + result.skipped} runs: deadline")
            check = "ok" + (f" ({'; '.join(notes)})" if notes else "")
        rows.append(
            (
                result.row.name(device),
                f"{seconds:.3f}",
                f"{rate:.2f}",
                f"{rate / pinned_best:.0%}" if pinned_best else "n/a",
                "baseline" if result is baseline else f"{speedup:.2f}x",
                f"{size / result.median('again') / 1e9:.2f}",
                f"{growth / MIB:.0f}",
                check,
            )
        )
    return header, rows


def verdict(
    results: Mapping[str, RowResult], checkpoint: Checkpoint, device: str, pinned_best: float | None
) -> list[str]:
    baseline = results.get(BASELINE)
    lines = []
    for key in CONTENDERS:
        result = results.get(key)
        if any(r is None or r.failure or not r.ok_runs for r in (result, baseline)):
            lines.append(f"verdict ({key}): none (the row or the torch.load baseline was not run, failed or was wrong)")
            continue
        rate = checkpoint.pt_path.stat().st_size / result.median("first") / 1e9
        speedup = baseline.median("first") / result.median("first")
        fast_enough = "met" if speedup >= TARGET_SPEEDUP else "MISSED"
        parts = [f"{speedup:.2f}x torch.load (target >= {TARGET_SPEEDUP:g}x: {fast_enough})"]
        if pinned_best:
            share = rate / pinned_best
            status = "met" if share >= TARGET_PINNED_SHARE else "MISSED"
            aim = ", aim reached" if share >= AIM_PINNED_SHARE else ""
            parts.insert(0, f"{share:.0%} of pinned H2D (target >= {TARGET_PINNED_SHARE:.0%}: {status}{aim})")
        else:
            parts.insert(0, "no pinned H2D figure (no CUDA)")
        lines.append(f"verdict ({result.row.name(device)}, first load {rate:.2f} GB/s): " + ", ".join(parts))
    return lines


def print_results(
    results: Mapping[str, RowResult],
    checkpoint: Checkpoint,
    device: str,
    repeat: int,
    pinned_best: float | None,
    has_cuda: bool,
    failures: list[str],
) -> None:
    """Step 6: the table, the verdicts and a markdown copy; a wrong or failed row adds "checks"."""
    import pyckpt

    cfg = checkpoint.config
    print(
        f"checkpoint: DataParallel LM fp32, width {cfg.width}, {cfg.depth} blocks, tied embedding, "
        f"{checkpoint.pt_path.stat().st_size / 1e9:.2f} GB; {repeat} runs per row; device {device}; "
        f"pyckpt backend {pyckpt.backend()}" + (f"; pinned H2D best {pinned_best:.2f} GB/s" if pinned_best else "")
    )
    header, table = result_rows(results, checkpoint, device, pinned_best)
    for line in text_table(header, table):
        print(line)
    wrong = [result.row.name(device) for result in results.values() if result.failure]
    if wrong:
        failures.append("checks")
        print("!" * 80)
        print(f"!!! WRONG OR FAILED RESULTS in: {', '.join(wrong)}. Their times mean nothing.")
        print("!" * 80)
    for line in verdict(results, checkpoint, device, pinned_best):
        print(line)

    print("\nmarkdown:\n")
    gpu = torch.cuda.get_device_name() if has_cuda else "no GPU (dry run)"
    print(
        f"{gpu}, torch {torch.__version__}, {checkpoint.pt_path.stat().st_size / 1e9:.3g} GB DataParallel checkpoint "
        f"(fp32, tied embedding) from a warm page cache, median of {repeat} fresh processes"
        + (f"; pinned host-to-device copy: {pinned_best:.1f} GB/s" if pinned_best else "")
        + ".\n"
    )
    for line in markdown_table(header[:-1] + ("check",), [row[:-1] + (row[-1].split(" (")[0],) for row in table]):
        print(line)


def nvidia_smi() -> str:
    query = "name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi unavailable ({exc.__class__.__name__})"


def profile_overlap(checkpoint: Checkpoint, trace: Path | None, deadline: Deadline) -> bool:
    script = Path(__file__).resolve().with_name("gpu_overlap.py")
    command = [sys.executable, str(script), "--checkpoint-dir", str(checkpoint.directory)]
    command += ["--trace", str(trace)] if trace else []
    limit = deadline.limit(CHILD_TIMEOUT_S)
    returncode, stdout, stderr = run_bounded(command, limit, cwd=REPO_ROOT)
    if returncode is None:
        print(f"PROFILE TIMED OUT after {limit_text(limit, CHILD_TIMEOUT_S)}:\n{output_tail(stdout, stderr)}")
        return False
    print((stdout + stderr).rstrip())
    return returncode == 0


def distributed_loads(data_dir: Path, size_gib: float, has_cuda: bool, deadline: Deadline) -> bool:
    """``bench_distributed.py`` on one rank: NCCL on the GPU, gloo on the CPU without CUDA."""
    script = Path(__file__).resolve().with_name("bench_distributed.py")
    backend = "nccl" if has_cuda else "gloo"
    size = min(DISTRIBUTED_MAX_GIB, size_gib)  # --dry-run's size is already tiny
    arguments = ["--backend", backend, "--world-sizes", "1", "--size-gib", f"{size:g}", "--cache", "warm"]
    command = [sys.executable, str(script), *arguments, "--data-dir", str(data_dir)]
    print("$ " + shlex.join(["python", "benchmarks/bench_distributed.py", *arguments]))
    limit = deadline.limit(DISTRIBUTED_TIMEOUT_S)
    returncode, stdout, stderr = run_bounded(command, limit, cwd=REPO_ROOT)
    if returncode is None:
        print(
            f"DISTRIBUTED LOADS TIMED OUT after {limit_text(limit, DISTRIBUTED_TIMEOUT_S)}:\n"
            f"{output_tail(stdout, stderr)}"
        )
        return False
    print(stdout.rstrip())
    if returncode != 0:
        print(f"exit status {returncode}:\n{tail(stderr, 30)}")
    return returncode == 0


# --------------------------------------------------------------------------- entry point


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-gib",
        type=float,
        help=f"checkpoint size (default {DEFAULT_SIZE_GIB:g}; {DRY_RUN_SIZE_GIB} with --dry-run)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"fresh processes per row; the median is shown (default {DEFAULT_REPEAT}; 1 with --dry-run)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"checkpoint cache (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument("--skip-build", action="store_true", help="use the extension as it is")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    parser.add_argument("--trace", type=Path, help="where step 7 writes its chrome trace (default: the data dir)")
    parser.add_argument("--dry-run", action="store_true", help="tiny checkpoint; on the CPU where there is no CUDA")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help=f"seconds from the start of the script after which no step starts and every subprocess is "
        f"killed; the results measured by then are printed (default {DEFAULT_DEADLINE_S:g})",
    )
    for flag, variable in RING_SETTINGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), type=int, help=f"sets {variable}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.child is not None:
        row = next(row for row in ROWS if row.key == args.child)
        run_child(row, Checkpoint.read(args.checkpoint_dir), torch.device(args.device))
        return 0

    deadline = Deadline(args.deadline_s, SCRIPT_START, STEP_MIN_S)
    for flag, variable in RING_SETTINGS.items():  # children and tests inherit them
        if getattr(args, flag) is not None:
            os.environ[variable] = str(getattr(args, flag))
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run to exercise the script on the CPU", file=sys.stderr)
        return 2
    device = "cuda" if has_cuda else "cpu"
    size_gib = args.size_gib or (DRY_RUN_SIZE_GIB if args.dry_run else DEFAULT_SIZE_GIB)
    repeat = args.repeat or (1 if args.dry_run else DEFAULT_REPEAT)
    failures: list[str] = []
    skipped: list[str] = []  # steps (or loads) left out, for the deadline unless they say why

    print(
        f"date     {datetime.datetime.now().isoformat(timespec='seconds')}" + ("   (DRY RUN)" if args.dry_run else "")
    )
    print(f"GPU      {torch.cuda.get_device_name() if has_cuda else 'none (no CUDA): loads go to the CPU'}")
    print(f"         nvidia-smi: {nvidia_smi()}")
    print(f"software python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    print(f"machine  {os.cpu_count()} CPUs, {mem_kib / (1 << 20):.0f} GiB RAM, {platform.platform()}")
    print(f"deadline {deadline.seconds:g} s from the start of the script ({deadline.left():.0f} s left)")

    section("1. build")
    if args.skip_build:
        print("skipped (--skip-build)")
    elif not deadline.allows("build"):
        skipped.append("build")
    elif not build_extension(deadline):
        failures.append("build")
    import pyckpt
    from pyckpt._env import io_threads
    from pyckpt.execute.device import ring_config

    print(f"pyckpt.backend_info(): {pyckpt.backend_info()}")
    ring = ring_config()
    settings = ", ".join(f"{v}={os.environ.get(v, '(default)')}" for v in RING_SETTINGS.values())
    print(
        f"ring     {ring.buffers} x {ring.buffer_bytes >> 20} MiB pinned, {ring.streams} streams, "
        f"{ring.readers} readers  [{settings}]; {io_threads()} host io threads (PYCKPT_THREADS)"
    )

    section("2. CUDA tests")
    if args.skip_tests:
        print("skipped (--skip-tests)")
    elif not deadline.allows("tests"):
        skipped.append("tests")
    else:
        outcome = run_tests(deadline)
        print(f"tests: {outcome.summary()}")
        if not outcome.ok:
            failures.append("tests")

    section("3. host-to-device bandwidth")
    pinned_best: float | None = None
    if not has_cuda:
        print("skipped: no CUDA (the % of pinned bandwidth column reads n/a)")
    elif not deadline.allows("bandwidth"):
        skipped.append("bandwidth")
    else:
        rates = h2d_bandwidth(BANDWIDTH_BYTES, BANDWIDTH_REPEAT)
        for kind, values in rates.items():
            best, median = max(values), statistics.median(values)
            print(
                f"{kind:9s} {BANDWIDTH_BYTES >> 20} MiB x {len(values)}: best {best:.2f} GB/s, median {median:.2f} GB/s"
            )
        pinned_best = max(rates["pinned"])

    section("4. checkpoint")
    checkpoint: Checkpoint | None = None
    if not deadline.allows("checkpoint"):
        skipped.append("checkpoint")
    else:
        with_safetensors, disk_note = wants_safetensors(args.data_dir, size_gib)
        print(f"data dir {args.data_dir}: {filesystem_of(args.data_dir)}; {disk_note}")
        checkpoint = prepare_checkpoint(args.data_dir, size_gib, with_safetensors=with_safetensors)
        rows = [row for row in ROWS if with_safetensors or not row.reads_safetensors]
        for path in sorted({row.input_path(checkpoint) for row in rows}):
            warm_page_cache(path)
            print(f"{path} ({path.stat().st_size / GIB:.2f} GiB), {cached_fraction(path):.0%} in the page cache")

    section("5. loads")
    results: dict[str, RowResult] = {}
    if checkpoint is None:
        print("SKIPPED: no checkpoint (step 4 was skipped)")
        skipped.append("loads (no checkpoint)")
    else:
        print(
            f"each run: a fresh subprocess; untimed: imports, the CUDA context, the model (built on {device}, filled\n"
            f"with NaN); timed: the call + torch.cuda.synchronize(); '2nd load': the same call again in that process\n"
            f"(pinned ring and caching allocator warm). GB/s = file bytes / median time of the first load."
        )
        results = measure(rows, checkpoint, device, repeat, deadline)
        left_out = [f"{result.row.key} x{result.skipped}" for result in results.values() if result.skipped]
        if left_out:
            skipped.append(f"loads ({', '.join(left_out)})")
    timed_out = [result.row.name(device) for result in results.values() if result.timed_out]

    section("6. results")
    if checkpoint is None:
        print("SKIPPED: nothing was measured (no checkpoint)")
    else:
        print_results(results, checkpoint, device, repeat, pinned_best, has_cuda, failures)

    section("7. overlap of reads, copies and the caller")
    if timed_out:
        print(f"SKIPPED: a load timed out in step 5 ({', '.join(timed_out)}): the ring is suspect")
        skipped.append("overlap profile (a load timed out)")
    elif not has_cuda:
        print("skipped: no CUDA")
    elif checkpoint is None:
        print("SKIPPED: no checkpoint (step 4 was skipped)")
        skipped.append("overlap profile (no checkpoint)")
    elif not deadline.allows("profile"):
        skipped.append("overlap profile")
    elif not profile_overlap(checkpoint, args.trace, deadline):
        failures.append("overlap profile")

    section("8. distributed loads (one rank)")
    if not deadline.allows("distributed"):
        skipped.append("distributed loads")
    elif not distributed_loads(args.data_dir, size_gib, has_cuda, deadline):
        failures.append("distributed loads")

    outcome_parts = [f"FAILED: {', '.join(failures)}"] if failures else []
    outcome_parts += [f"SKIPPED (--deadline-s {deadline.seconds:g}): {', '.join(skipped)}"] if skipped else []
    print(f"\ntotal {time.monotonic() - SCRIPT_START:.0f} s; " + ("; ".join(outcome_parts) or "all steps ok"))
    return 1 if failures or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
