"""dtype-cast benchmark: an fp32 checkpoint into a bf16 model, and ``load(dtype=)``.

    python benchmarks/bench_cast.py [--size-gib 2] [--repeat 3] [--data-dir DIR]

On the transformer-shaped DataParallel checkpoint of common.py (float32, >= 2 GiB, warm page
cache), each row in a fresh process, timed inside it, with the child's own peak RSS (VmHWM)
above what it held before the timed call (the built model, for the rows that fill one):

- ``pyckpt.load_state_dict`` into the model built in bfloat16 (each record cast straight into
  the parameter), against torch's recipe (``torch.load(mmap=True)``, strip ``module.``,
  ``model.load_state_dict``, whose ``copy_`` casts) and against pyckpt into an fp32 model;
- ``pyckpt.load(dtype=torch.bfloat16)`` against ``torch.load(mmap=True)`` followed by ``.to``.

Every row's result is checked against torch's own cast of the checkpoint before it counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import DEFAULT_DATA_DIR, MIB, REPO_ROOT, prepare_checkpoint, text_table, warm_page_cache

CHILD = r"""
import sys, time, json
sys.path.insert(0, "benchmarks")
import torch, pyckpt
from bench_load_cpu import model_for
from common import Checkpoint
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

checkpoint = Checkpoint.read(Path(sys.argv[1]))
how = sys.argv[2]
model = model_for(checkpoint) if "into" in how else None
if "into bf16" in how:
    model = model.bfloat16()
before = hwm()
started = time.perf_counter()
if how in ("pyckpt into bf16", "pyckpt into fp32"):
    pyckpt.load_state_dict(model, checkpoint.pt_path, strict=False)
    result = model.state_dict()
elif how == "torch recipe into bf16":
    state = torch.load(checkpoint.pt_path, mmap=True, weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=False)
    result = model.state_dict()
elif how == "pyckpt.load(dtype=bf16)":
    result = pyckpt.load(checkpoint.pt_path, dtype=torch.bfloat16, strip_prefix="module.")
else:
    state = torch.load(checkpoint.pt_path, mmap=True, weights_only=True)
    result = {k.removeprefix("module."): v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
seconds = time.perf_counter() - started
peak = hwm() - before
# the check: against torch's own cast of the same file, on a sample of tensors
reference = torch.load(checkpoint.pt_path, mmap=True, weights_only=True)
problems = []
want = torch.float32 if how == "pyckpt into fp32" else torch.bfloat16
for key, value in list(reference.items())[::7]:
    name = key.removeprefix("module.")
    expected = value.to(want) if value.is_floating_point() else value
    if name not in result or result[name].dtype != expected.dtype or not torch.equal(result[name], expected):
        problems.append(name)
print(json.dumps({"seconds": seconds, "peak": peak, "problems": problems}))
"""

ROWS = ["pyckpt into bf16", "torch recipe into bf16", "pyckpt into fp32", "pyckpt.load(dtype=bf16)",
        "torch.load(mmap) + .to(bf16)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    checkpoint = prepare_checkpoint(args.data_dir, args.size_gib, with_safetensors=False)
    print(f"checkpoint  {checkpoint.pt_path} ({checkpoint.pt_path.stat().st_size / MIB:.0f} MiB, float32), "
          f"{args.repeat} runs per row, median shown")
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    peaks: dict[str, list[int]] = {row: [] for row in ROWS}
    for _ in range(args.repeat):
        for row in ROWS:
            warm_page_cache(checkpoint.pt_path)
            done = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint.directory), row],
                                  capture_output=True, text=True, cwd=REPO_ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"{row}: {done.stderr.strip().splitlines()[-1]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if result["problems"]:
                raise RuntimeError(f"{row}: differs from torch's cast: {result['problems'][:3]}")
            times[row].append(result["seconds"])
            peaks[row].append(result["peak"])
    into = statistics.median(times["torch recipe into bf16"])
    loads = statistics.median(times["torch.load(mmap) + .to(bf16)"])
    rows = []
    for row in ROWS:
        median = statistics.median(times[row])
        base = loads if "load" in row and "into" not in row else into
        rows.append([row, f"{median:.3f}", f"{(max(times[row]) - min(times[row])) / median:.0%}",
                     f"{median / base:.2f}", f"{max(peaks[row]) // MIB}"])
    print("\nx torch: against torch's recipe for the same job (into a bf16 model, or a bf16 state dict)")
    print("\n".join(text_table(["row", "median s", "spread", "x torch", "peak RSS MiB above the start"], rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
