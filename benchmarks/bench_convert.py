"""Convert benchmark: strip DataParallel's ``module.`` from a checkpoint into a new file.

    python benchmarks/bench_convert.py [--sizes-gib 2] [--repeat 3] [--data-dir DIR] [--only ROW ...]

Every row reads the same warm DataParallel checkpoint (>= 2 GiB by default, tied embedding)
and writes DST beside it, on the same filesystem; DST is removed before and after each run.
Rows: ``pyckpt convert`` (the API, and the CLI in a subprocess) against ``cp`` (the floor for
a pass-through copy), ``cp`` + fsync (pyckpt fsyncs before its atomic rename, cp does not),
and the seed recipe ``torch.load`` -> strip -> ``torch.save`` (eager and mmap). With several
``--sizes-gib`` the pyckpt rows run at every size, to show that their memory stays flat.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from common import (
    DEFAULT_DATA_DIR,
    DP_PREFIX,
    GIB,
    MIB,
    REPO_ROOT,
    RESULT_MARKER,
    Checkpoint,
    Contender,
    Measurement,
    RunResult,
    CLI_BASELINE_RSS_CODE,
    baseline_rss,
    cached_fraction,
    check_state_dict,
    current_rss,
    filesystem_of,
    peak_rss,
    prepare_checkpoint,
    preload_imports,
    reset_peak_rss,
    spawn_child,
    text_table,
    warm_page_cache,
)

CP = "cp"
CP_FSYNC = "cp + fsync"
API = "pyckpt.convert (API)"
CLI = "pyckpt convert (CLI)"
SEED = "seed: torch.load + strip + torch.save"
SEED_MMAP = "seed: torch.load(mmap) + strip + torch.save"
PYCKPT_ROWS = (API, CLI)  # run at every size of --sizes-gib
NOT_PYTHON = (CP, CP_FSYNC)  # their RSS is cp's own: no torch import to subtract

TARGET_VS_CP = 1.25  # pyckpt time / cp time, at most
TARGET_VS_SEED = 0.4  # pyckpt time / seed-recipe time, at most
TARGET_RSS_MIB = 256  # above the import baseline, at most
CLI_FLOOR = [0]  # peak RSS of a bare `import pyckpt`, measured once per run
FLAT_SHARE = 0.05  # "flat": RSS grows by under 5% of what the checkpoint grows between sizes
POLL_SECONDS = 0.005
OUTPUT_NAME = "converted.pt"


# --------------------------------------------------------------------------- the rows


def output_path(checkpoint: Checkpoint) -> Path:
    """DST beside SRC: same filesystem for every row, so cp and copy_file_range compete fairly."""
    return checkpoint.directory / OUTPUT_NAME


def vm_hwm(pid: int) -> int:
    """A live process's peak RSS in bytes; 0 once it has exited (a zombie has no memory)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def run_watched(command: Sequence[str]) -> int:
    """Run ``command`` to completion and return its peak RSS.

    A child's ``ru_maxrss`` cannot be used: it starts from its parent's high-water mark at
    exec (see common.py). A thread reads the child's VmHWM instead while the main thread
    waits, so the wall time stays exact; the last reading misses at most the final
    POLL_SECONDS, where a copy finishes (fsync, rename) and does not grow.
    """
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    finished = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not finished.is_set():
            peak = max(peak, vm_hwm(process.pid))
            finished.wait(POLL_SECONDS)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, stderr = process.communicate()
    finished.set()
    watcher.join()
    if process.returncode != 0:
        last = (stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{command[0]} exited {process.returncode}: {last}")
    return peak


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_cp(checkpoint: Checkpoint, dst: Path) -> int:
    return run_watched(["cp", str(checkpoint.pt_path), str(dst)])


def run_cp_fsync(checkpoint: Checkpoint, dst: Path) -> int:
    """cp, then what pyckpt's atomic write also pays: fsync of the file and of its directory."""
    peak = run_cp(checkpoint, dst)
    fsync_path(dst)
    fsync_path(dst.parent)
    return peak


def run_api(checkpoint: Checkpoint, dst: Path) -> None:
    import pyckpt

    pyckpt.convert(checkpoint.pt_path, dst)  # strip_prefix="auto"


def run_cli(checkpoint: Checkpoint, dst: Path) -> int:
    # cwd is the repository root, so ``-m pyckpt`` is this checkout's.
    return run_watched(
        [sys.executable, "-m", "pyckpt", "convert", str(checkpoint.pt_path), str(dst), "--quiet", "--force"]
    )


def run_seed(mmap: bool) -> Callable[[Checkpoint, Path], None]:
    def run(checkpoint: Checkpoint, dst: Path) -> None:
        state_dict = torch.load(checkpoint.pt_path, mmap=mmap, weights_only=True)
        consume_prefix_in_state_dict_if_present(state_dict, DP_PREFIX)
        torch.save(state_dict, dst)

    return run


def fresh_output(checkpoint: Checkpoint) -> Path:
    dst = output_path(checkpoint)
    dst.unlink(missing_ok=True)
    if dst.exists():
        raise RuntimeError(f"{dst} still exists")
    return dst


def check_output(prefix: str) -> Callable[[Checkpoint, Path, object], list[str]]:
    """Load DST as a user would (torch, mmap, weights_only) and compare every tensor's checksum
    under the expected names; the tied head must still share the embedding's storage."""

    def check(checkpoint: Checkpoint, dst: Path, _: object) -> list[str]:
        state_dict = torch.load(dst, mmap=True, weights_only=True)
        return check_state_dict(state_dict, checkpoint, prefix)

    return check


STRIPPED = check_output("")
COPIED = check_output(DP_PREFIX)  # cp keeps the names as they are

ROWS = [
    Contender(CP, "copy", run_cp, COPIED, fresh_output, baseline=True),
    Contender(CP_FSYNC, "copy", run_cp_fsync, COPIED, fresh_output),
    Contender(API, "pyckpt", run_api, STRIPPED, fresh_output),
    Contender(CLI, "pyckpt", run_cli, STRIPPED, fresh_output),
    Contender(SEED, "seed", run_seed(mmap=False), STRIPPED, fresh_output, baseline=True),
    Contender(SEED_MMAP, "seed", run_seed(mmap=True), STRIPPED, fresh_output),
]


# --------------------------------------------------------------------------- one run (child)


def run_child(row: Contender, checkpoint: Checkpoint) -> None:
    """Time one conversion, read the peak RSS of whichever process did the work, check DST,
    remove it, and print one JSON line for the parent."""
    preload_imports()
    import pyckpt

    pyckpt.convert  # noqa: B018 (imports the convert module before timing, as load is)
    dst = row.prepare(checkpoint)
    reset_peak_rss()
    result = RunResult(rss_before=current_rss())
    try:
        start = time.perf_counter()
        worker_peak = row.run(checkpoint, dst)
        result.seconds = time.perf_counter() - start
        result.peak_rss = peak_rss() if worker_peak is None else worker_peak
        result.problems = row.check(checkpoint, dst, None)
    finally:
        dst.unlink(missing_ok=True)
    print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)


# --------------------------------------------------------------------------- measuring (parent)


def measure_size(
    script: Path, rows: Sequence[Contender], checkpoint: Checkpoint, repeat: int
) -> dict[str, Measurement]:
    """Every row ``repeat`` times, round-robin. Before each run: DST removed, dirty pages
    flushed (so no run pays for the previous one's writeback), the input read through."""
    results = {row.name: Measurement(row, []) for row in rows}
    size = checkpoint.pt_path.stat().st_size / GIB
    for round_number in range(1, repeat + 1):
        for row in rows:
            output_path(checkpoint).unlink(missing_ok=True)
            os.sync()
            warm_page_cache(checkpoint.pt_path)
            run = spawn_child(script, row, checkpoint, os.environ)
            output_path(checkpoint).unlink(missing_ok=True)  # a crashed child may leave it
            results[row.name].runs.append(run)
            status = f"{run.seconds:.3f} s" if run.error is None else run.error
            print(f"  [{size:.2f} GiB, {round_number}/{repeat}] {row.name}: {status}", flush=True)
    return results


def extra_rss(m: Measurement, floor: int) -> int:
    """Peak RSS above what the process needs before working (cp's own RSS for cp; the CLI
    against a bare `import pyckpt`, since it never imports torch)."""
    if m.contender.name in NOT_PYTHON:
        return m.peak_rss
    if m.contender.name == CLI:
        return m.peak_rss - CLI_FLOOR[0]
    return m.peak_rss - floor


def ratio(results: Mapping[str, Measurement], row: str, baseline: str) -> float | None:
    if row not in results or baseline not in results or results[baseline].failure:
        return None
    return results[row].seconds / results[baseline].seconds


def main_table(results: Mapping[str, Measurement], file_bytes: int, floor: int) -> list[str]:
    header = ("row", "median s", "spread", "GB/s", "x cp", "x cp+fsync", "x seed", "peak RSS MiB", "check")
    lines = []
    for name, m in results.items():
        ratios = [ratio(results, name, base) for base in (CP, CP_FSYNC, SEED)]
        lines.append(
            (
                name,
                f"{m.seconds:.3f}",
                f"{m.spread:.0%}",
                f"{file_bytes / m.seconds / 1e9:.2f}",
                *("-" if r is None else f"{r:.2f}" for r in ratios),
                f"{extra_rss(m, floor) / MIB:.0f}" + (" (cp)" if name in NOT_PYTHON else ""),
                m.failure or "ok",
            )
        )
    return text_table(header, lines)


def size_table(by_size: Mapping[int, Mapping[str, Measurement]], floor: int) -> list[str]:
    header = ("checkpoint GiB", "row", "median s", "GB/s", "peak RSS MiB", "check")
    lines = []
    for file_bytes, results in by_size.items():
        for name in PYCKPT_ROWS:
            if name in results:
                m = results[name]
                lines.append(
                    (
                        f"{file_bytes / GIB:.2f}",
                        name,
                        f"{m.seconds:.3f}",
                        f"{file_bytes / m.seconds / 1e9:.2f}",
                        f"{extra_rss(m, floor) / MIB:.0f}",
                        m.failure or "ok",
                    )
                )
    return text_table(header, lines)


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def verdict(row: str, by_size: Mapping[int, Mapping[str, Measurement]], floor: int) -> str:
    sizes = [size for size, results in by_size.items() if row in results]
    if not sizes:
        return f"verdict ({row}): not run"
    largest = by_size[sizes[-1]]
    if largest[row].failure:
        return f"verdict ({row}): none, the row failed or was wrong"
    parts = []
    vs_cp, vs_fsync, vs_seed = (ratio(largest, row, base) for base in (CP, CP_FSYNC, SEED))
    if vs_cp is not None:
        fsync_note = "" if vs_fsync is None else f"; {vs_fsync:.2f}x cp + fsync"
        parts.append(f"{vs_cp:.2f}x cp (target <= {TARGET_VS_CP}x: {met(vs_cp <= TARGET_VS_CP)}{fsync_note})")
    if vs_seed is not None:
        parts.append(f"{vs_seed:.2f}x the seed recipe (target <= {TARGET_VS_SEED}x: {met(vs_seed <= TARGET_VS_SEED)})")
    rss = [extra_rss(by_size[size][row], floor) for size in sizes]
    rss_ok = max(rss) <= TARGET_RSS_MIB * MIB
    parts.append(f"peak RSS {max(rss) / MIB:.0f} MiB above baseline (target <= {TARGET_RSS_MIB}: {met(rss_ok)})")
    if len(sizes) > 1:
        flat = rss[-1] - rss[0] <= FLAT_SHARE * (sizes[-1] - sizes[0])
        trend = " -> ".join(f"{r / MIB:.0f}" for r in rss)
        span = " -> ".join(f"{s / GIB:.2f}" for s in sizes)
        parts.append(f"RSS {trend} MiB at {span} GiB (flat: {met(flat)})")
    return f"verdict ({row}, {sizes[-1] / GIB:.2f} GiB): " + ", ".join(parts)


# --------------------------------------------------------------------------- entry point


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gib", type=float, nargs="+", default=[2.0], help="checkpoint sizes (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown (default 3)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"cache (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows (by name)")
    parser.add_argument("--every-size", action="store_true", help="run every row at every size, not only pyckpt's")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def header_lines(checkpoints: Sequence[Checkpoint], data_dir: Path, floor: int, load_before: float) -> list[str]:
    import pyckpt

    cp_version = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    cpus = os.cpu_count() or 1
    lines = [
        f"date        {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine     {cpus} CPUs, {platform.platform()}; 1-min load {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end (above {cpus}: other work competed)",
        f"software    python {platform.python_version()}, torch {torch.__version__}, pyckpt {pyckpt.__version__} "
        f"(backend {pyckpt.backend()}), {' '.join(cp_version)}",
        f"filesystem  data dir {data_dir}: {filesystem_of(data_dir)}; /tmp: {filesystem_of(Path('/tmp'))}",
        "            cp and copy_file_range may share extents (reflink) on btrfs/xfs: then neither copies bytes",
    ]
    for checkpoint in checkpoints:
        lines.append(
            f"checkpoint  {checkpoint.pt_path} ({checkpoint.pt_path.stat().st_size / GIB:.2f} GiB, "
            f"cached now {cached_fraction(checkpoint.pt_path):.0%}); DST {output_path(checkpoint)}"
        )
    lines += [
        "page cache  SRC read through before every run (warm); DST deleted after every run (its pages go with",
        "            it; nothing is dropped otherwise) and sync() before every run, so no run pays for",
        "            another's writeback. Rows without fsync end with DST still dirty in the page cache.",
        f"each row    median of fresh subprocesses; peak RSS above the {floor / MIB:.0f} MiB of `import torch, pyckpt`",
        f"            (the CLI, which never imports torch: above the {CLI_FLOOR[0] / MIB:.0f} MiB of `import pyckpt`;",
        "            cp: cp's own peak); x ROW = this time / ROW's time",
    ]
    return lines


def main() -> int:
    args = parse_args()
    script = Path(__file__).resolve()
    by_name = {row.name: row for row in ROWS}
    if args.child is not None:
        run_child(by_name[args.child], Checkpoint.read(args.checkpoint_dir))
        return 0

    chosen = [by_name[name] for name in args.only] if args.only else ROWS
    sizes = sorted(set(args.sizes_gib))
    # No safetensors copy: convert reads only the .pt file.
    checkpoints = [prepare_checkpoint(args.data_dir, size, with_safetensors=False) for size in sizes]
    load_before = os.getloadavg()[0]
    floor = baseline_rss(os.environ)
    CLI_FLOOR[0] = baseline_rss(os.environ, CLI_BASELINE_RSS_CODE)
    by_size: dict[int, dict[str, Measurement]] = {}  # file bytes -> row -> runs
    all_rows_at: list[int] = []  # the sizes where every chosen row ran
    for checkpoint in checkpoints:
        file_bytes = checkpoint.pt_path.stat().st_size
        every_row = args.every_size or checkpoint is checkpoints[-1]
        rows = [row for row in chosen if every_row or row.name in PYCKPT_ROWS]
        by_size[file_bytes] = measure_size(script, rows, checkpoint, args.repeat)
        if every_row:
            all_rows_at.append(file_bytes)

    print()
    for line in header_lines(checkpoints, args.data_dir, floor, load_before):
        print(line)
    for file_bytes in all_rows_at:
        print(f"\n{file_bytes / GIB:.2f} GiB checkpoint, {args.repeat} runs per row:")
        for line in main_table(by_size[file_bytes], file_bytes, floor):
            print(line)
    if len(by_size) > 1:
        print("\npyckpt at every size (memory should not grow with the checkpoint):")
        for line in size_table(by_size, floor):
            print(line)
    print()
    wrong = sorted(
        {f"{name} ({size / GIB:.2f} GiB)" for size, res in by_size.items() for name, m in res.items() if m.failure}
    )
    if wrong:
        print("!" * 80)
        print(f"!!! WRONG OR FAILED RESULTS in: {', '.join(wrong)}. Their times mean nothing.")
        print("!" * 80)
    for row in PYCKPT_ROWS:
        print(verdict(row, by_size, floor))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
