"""Sweep the pinned ring's settings on a CUDA machine: which readers x buffers x MiB feed the copies.

    python benchmarks/gpu_ring_sweep.py [--size-gib 4] [--repeat 2] [--settings 4x4x64,8x8x32,...]
                                        [--build] [--tests] [--trace PATH]

Each setting is READERSxBUFFERSxMIB. Each row is ``pyckpt.load(map_location="cuda")`` in a fresh
process (gpu_bench.py's child), checked against the checkpoint's checksums, reported as GB/s
and as a share of the pinned host-to-device bandwidth measured in the same run. The fastest
setting is then profiled with gpu_overlap.py. ``--build`` and ``--tests`` run gpu_bench.py's
steps 1 and 2 first, so that one call on a fresh machine does everything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

import gpu_bench
from common import DEFAULT_DATA_DIR, prepare_checkpoint, text_table, warm_page_cache

DEFAULT_SETTINGS = "4x4x64,8x8x32,8x16x16,12x12x32,16x16x16,16x32x8"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"default {DEFAULT_SETTINGS}")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--tests", action="store_true")
    parser.add_argument("--trace", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    failures = []
    if args.build:
        gpu_bench.section("build")
        if not gpu_bench.build_extension():
            return 1
    if args.tests:
        gpu_bench.section("CUDA tests")
        outcome = gpu_bench.run_tests()
        print(f"tests: {outcome.summary()}")
        if not outcome.ok:
            failures.append("tests")

    gpu_bench.section("bandwidth and checkpoint")
    rates = gpu_bench.h2d_bandwidth(gpu_bench.BANDWIDTH_BYTES, gpu_bench.BANDWIDTH_REPEAT)
    pinned = max(rates["pinned"])
    print(f"pinned H2D best {pinned:.2f} GB/s, pageable best {max(rates['pageable']):.2f} GB/s")
    checkpoint = prepare_checkpoint(args.data_dir, args.size_gib, with_safetensors=False)
    warm_page_cache(checkpoint.pt_path)
    size = checkpoint.pt_path.stat().st_size

    gpu_bench.section("sweep")
    row = next(r for r in gpu_bench.ROWS if r.key == "pyckpt-load")
    results: dict[str, list[gpu_bench.LoadRun]] = {}
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for round_number in range(1, args.repeat + 1):
        for setting in settings:
            readers, buffers, mib = (int(v) for v in setting.split("x"))
            os.environ.update(PYCKPT_READERS=str(readers), PYCKPT_RING_BUFFERS=str(buffers), PYCKPT_RING_MB=str(mib))
            run = gpu_bench.spawn_child(row, checkpoint, "cuda")
            results.setdefault(setting, []).append(run)
            print(f"  [{round_number}/{args.repeat}] {setting}: {run.error or f'{run.first_s:.3f} s, again {run.again_s:.3f} s'}"
                  + (" WRONG" if run.problems else ""), flush=True)

    header = ("readers x buffers x MiB", "first s", "GB/s", "% pinned", "2nd load GB/s", "% pinned", "check")
    table = []
    best, best_rate = settings[0], 0.0
    for setting, runs in results.items():
        ok = [r for r in runs if r.error is None]
        wrong = any(r.problems for r in runs) or len(ok) < len(runs)
        if wrong:
            failures.append(setting)
        if not ok:
            table.append((setting, "-", "-", "-", "-", "-", "FAILED"))
            continue
        first = statistics.median(r.first_s for r in ok)
        again = statistics.median(r.again_s for r in ok)
        if size / again > best_rate and not wrong:
            best, best_rate = setting, size / again
        table.append((setting, f"{first:.3f}", f"{size / first / 1e9:.2f}", f"{size / first / 1e9 / pinned:.0%}",
                      f"{size / again / 1e9:.2f}", f"{size / again / 1e9 / pinned:.0%}", "WRONG" if wrong else "ok"))
    print(f"{size / 1e9:.2f} GB checkpoint, {os.cpu_count()} CPUs, pinned H2D {pinned:.2f} GB/s, median of {args.repeat}")
    for line in text_table(header, table):
        print(line)

    gpu_bench.section(f"overlap at {best}")
    readers, buffers, mib = (int(v) for v in best.split("x"))
    os.environ.update(PYCKPT_READERS=str(readers), PYCKPT_RING_BUFFERS=str(buffers), PYCKPT_RING_MB=str(mib))
    if not gpu_bench.profile_overlap(checkpoint, args.trace):
        failures.append("overlap")
    print("FAILED: " + ", ".join(failures) if failures else "all ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
