"""Show where a CUDA load spends its time: reads, copies on each stream, and the caller.

    python benchmarks/gpu_overlap.py --checkpoint-dir DIR [--trace trace.json] [--columns 72]

Loads the checkpoint once to warm the pinned ring and the caching allocator, then loads it
again under ``torch.profiler`` and reads the host-to-device copies back from the trace:
per stream, how many copies, bytes and busy time; how long two streams copied at once; how
busy the copy engines were between the first copy and the last (reads that did not overlap
the copies show up as gaps); and when ``pyckpt.load`` returned to the caller against when the
last copy finished (the caller's work runs on while the copies drain). An ASCII timeline,
one row per stream, draws the same. The trace itself is written for chrome://tracing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from common import Checkpoint, preload_imports

Interval = tuple[float, float]  # start, end in microseconds on the trace's clock


def union_length(intervals: list[Interval]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def time_with_two_or_more(per_stream: dict[int, list[Interval]]) -> float:
    """Microseconds during which copies ran on at least two streams at once."""
    edges: list[tuple[float, int]] = []
    for intervals in per_stream.values():
        for start, end in _merged(intervals):
            edges += [(start, 1), (end, -1)]
    edges.sort()
    active, since, overlap = 0, 0.0, 0.0
    for at, step in edges:
        if active >= 2:
            overlap += at - since
        active += step
        since = at
    return overlap


def _merged(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def timeline(per_stream: dict[int, list[Interval]], marks: dict[str, float], t0: float, t1: float, columns: int) -> list[str]:
    """One row per stream: '#' where that stream copied for most of the column, '+' for some of it."""
    width = (t1 - t0) / columns
    lines = []
    for stream, intervals in sorted(per_stream.items()):
        row = []
        for c in range(columns):
            lo, hi = t0 + c * width, t0 + (c + 1) * width
            busy = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in intervals)
            row.append("#" if busy >= 0.5 * width else "+" if busy > 0 else ".")
        lines.append(f"stream {stream:>3} |{''.join(row)}|")
    for label, at in marks.items():
        column = min(columns - 1, max(0, int((at - t0) / width)))
        lines.append(f"{label:>10} |{' ' * column}^{' ' * (columns - column - 1)}| {(at - t0) / 1000:.1f} ms")
    lines.append(f"{'':>10}  0 ms{' ' * (columns - 10)}{(t1 - t0) / 1000:.0f} ms")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--trace", type=Path, help="where to write the chrome trace (default: beside the checkpoint)")
    parser.add_argument("--columns", type=int, default=72)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile", file=sys.stderr)
        return 2
    import pyckpt

    checkpoint = Checkpoint.read(args.checkpoint_dir)
    trace_path = args.trace or checkpoint.directory / "overlap_trace.json"
    preload_imports()
    torch.zeros(1, device="cuda")
    warm = pyckpt.load(checkpoint.pt_path, map_location="cuda")  # the ring and the allocator, once
    torch.cuda.synchronize()
    del warm

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        started = time.perf_counter()
        with torch.profiler.record_function("pyckpt.load"):
            loaded = pyckpt.load(checkpoint.pt_path, map_location="cuda")
        returned = time.perf_counter()
        torch.cuda.synchronize()
        finished = time.perf_counter()
    profile.export_chrome_trace(str(trace_path))
    nbytes = sum(t.numel() * t.element_size() for t in loaded.values() if isinstance(t, torch.Tensor))
    del loaded

    events = json.loads(trace_path.read_text())["traceEvents"]
    per_stream: dict[int, list[Interval]] = defaultdict(list)
    bytes_per_stream: dict[int, int] = defaultdict(int)
    call: Interval | None = None
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event.get("name", "")
        if event.get("cat") == "gpu_memcpy" and "HtoD" in name:
            stream = int(event.get("args", {}).get("stream", -1))
            per_stream[stream].append((float(event["ts"]), float(event["ts"]) + float(event["dur"])))
            bytes_per_stream[stream] += int(event.get("args", {}).get("bytes", 0))
        elif name == "pyckpt.load" and event.get("cat") in ("user_annotation", "cpu_op") and call is None:
            call = (float(event["ts"]), float(event["ts"]) + float(event["dur"]))
    if not per_stream or call is None:
        print(f"the trace holds no host-to-device copies or no pyckpt.load range: see {trace_path}")
        return 1

    copies = [interval for intervals in per_stream.values() for interval in intervals]
    first_copy, last_copy = min(s for s, _ in copies), max(e for _, e in copies)
    window = last_copy - first_copy
    busy = union_length(copies)
    both = time_with_two_or_more(per_stream)
    print(f"checkpoint {checkpoint.pt_path} ({nbytes / 1e9:.2f} GB of tensors); trace {trace_path}")
    print(
        f"wall: call {1000 * (returned - started):.1f} ms, until the copies finished {1000 * (finished - started):.1f} ms"
        f" ({nbytes / (finished - started) / 1e9:.2f} GB/s, under the profiler)"
    )
    for stream, intervals in sorted(per_stream.items()):
        stream_busy = union_length(intervals)
        print(
            f"stream {stream}: {len(intervals)} copies, {bytes_per_stream[stream] / 1e9:.2f} GB, busy {stream_busy / 1000:.1f} ms"
            f" ({bytes_per_stream[stream] / max(stream_busy, 1e-9) / 1e3:.1f} GB/s while busy)"
        )
    print(
        f"copies: {len(per_stream)} streams; first copy {(first_copy - call[0]) / 1000:.1f} ms after the call began, "
        f"last copy ended {(last_copy - call[0]) / 1000:.1f} ms after it"
    )
    print(
        f"overlap: some copy ran {busy / window:.0%} of the {window / 1000:.1f} ms copy window; two or more streams "
        f"copied at once for {both / 1000:.1f} ms ({both / window:.0%})"
    )
    print(
        f"caller: pyckpt.load returned {(call[1] - call[0]) / 1000:.1f} ms after it began; the copies drained for "
        f"{max(0.0, last_copy - call[1]) / 1000:.1f} ms more while the caller ran on"
    )
    t0, t1 = min(call[0], first_copy), max(call[1], last_copy)
    for line in timeline(per_stream, {"returned": call[1]}, t0, t1, args.columns):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
