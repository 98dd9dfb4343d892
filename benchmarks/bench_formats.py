"""Formats benchmark: safetensors, sharded Hugging Face directories and DCP, in and out.

    python benchmarks/bench_formats.py [--size-gib 2] [--repeat 3] [--warm-rounds 9] [--only ROW ...]

One run, two tables, on the transformer-shaped DataParallel checkpoint of common.py
(>= 2 GiB, warm page cache), each row in a fresh process:

- load_state_dict into a built model from the pt file (the baseline), from the same tensors
  as one safetensors file and as a sharded safetensors directory (500 MB shards), and
  safetensors' own load_file + load_state_dict; x baseline below 1 is faster than from pt.
  Each layout also gets its ceiling: a plain 2-thread pread of its tensors' bytes into the
  parameters (planned untimed), which shows what the page cache gives each layout's files.
  Before each round every input is dropped from the page cache and read back alike, in
  alternating orders (see common.recache); each ratio is the median of the rounds' own ratios.
  Each row runs as the first call of a fresh process (serving warm-up), then all rows again in
  one warm process, round after round (``--warm-rounds``), where the machine's noise is least.
- conversions by the command line, a whole process each, against cp + fsync of the source:
  pt to safetensors, to sharded safetensors, to DCP; sharded and safetensors back to pt; DCP
  to safetensors, against torch's own recipe for it (dcp_to_torch_save, then safetensors'
  save_file). Peak RSS is shown above a bare ``import pyckpt`` (the CLI never needs more
  unless it writes DCP, whose metadata classes are torch's). The ``--dtype`` rows cast
  float32 to half width while copying, so they write half the bytes cp does.

Inputs derived from the checkpoint (the sharded directory, the DCP directory) are made once,
by pyckpt and by torch's dcp.save, and cached beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_convert import fsync_path, run_watched
from common import CLI_BASELINE_RSS_CODE, DEFAULT_DATA_DIR, MIB, REPO_ROOT, baseline_rss, prepare_checkpoint, recache, text_table, warm_page_cache

SHARD_SIZE = "500MB"
TARGET_RSS_MIB = 256

LOAD_CHILD = r"""
import sys, time, json
sys.path.insert(0, "benchmarks")
import torch, pyckpt
from bench_load_cpu import model_for, plan_file_preads, read_file_preads
from common import Checkpoint, check_model
from pathlib import Path
checkpoint = Checkpoint.read(Path(sys.argv[1]))
rows, rounds = json.loads(sys.argv[2]), int(sys.argv[3])  # rounds 0: each row's first call, timed
model = model_for(checkpoint)
preads = {}  # the ceiling for a layout's files: each tensor's bytes read into its parameter, planned untimed
for name, (source, how) in rows.items():
    if how == "pread":
        files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else [Path(source)]
        preads[name] = (files, plan_file_preads(model, files))

def run(name):
    source, how = rows[name]
    started = time.perf_counter()
    if how == "pread":
        read_file_preads(*preads[name])
    elif how == "pyckpt":
        pyckpt.load_state_dict(model, source, strict=False)
    else:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(source), strict=False)
    seconds = time.perf_counter() - started
    model.head.weight = model.embed.weight  # safetensors stores the tied weight once
    return seconds

times, problems = {name: [] for name in rows}, {}
for name in rows:  # the first calls: timed when that is the measurement, checked always
    seconds = run(name)
    problems[name] = check_model(model, checkpoint)
    if rounds == 0:
        times[name].append(seconds)
for number in range(rounds):  # warm: every row once a round, in alternating orders
    for name in (list(rows) if number % 2 == 0 else list(rows)[::-1]):
        times[name].append(run(name))
print(json.dumps({"times": times, "problems": problems}))
"""

DCP_RECIPE = r"""
import sys, warnings
warnings.simplefilter("ignore")
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
dcp_to_torch_save(sys.argv[1], sys.argv[2] + ".tmp.pt")
state = torch.load(sys.argv[2] + ".tmp.pt", weights_only=True)
import os
os.remove(sys.argv[2] + ".tmp.pt")
save_file({k: v.contiguous() for k, v in state.items() if k != "head.weight"}, sys.argv[2])
fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

DCP_SAVE = r"""
import sys, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed.checkpoint as dcp
state = torch.load(sys.argv[1], weights_only=True, mmap=True)
dcp.save({k.removeprefix("module."): v for k, v in state.items()}, checkpoint_id=sys.argv[2])
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyckpt", *args, "--quiet", "--force"]


def derived_inputs(checkpoint) -> dict[str, Path]:
    """The sharded and DCP forms of the checkpoint, made once and cached beside it."""
    directory = checkpoint.directory
    sharded, dcp_dir = directory / "sharded-safetensors", directory / "dcp"
    if not (sharded / "model.safetensors.index.json").exists():
        # From the safetensors file, so it holds the same tensors (the tied weight once).
        print("making the sharded directory ...", flush=True)
        subprocess.run(cli("convert", str(checkpoint.safetensors_path), str(sharded), "--max-shard-size", SHARD_SIZE),
                       check=True, cwd=REPO_ROOT)
    if not (dcp_dir / ".metadata").exists():
        print("making the DCP directory with torch's dcp.save ...", flush=True)
        shutil.rmtree(dcp_dir, ignore_errors=True)
        subprocess.run([sys.executable, "-c", DCP_SAVE, str(checkpoint.pt_path), str(dcp_dir)], check=True)
    return {"pt": checkpoint.pt_path, "safetensors": checkpoint.safetensors_path, "sharded": sharded, "dcp": dcp_dir}


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def timed_process(command: list[str], output: Path) -> tuple[float, int]:
    remove(output)
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    peak = run_watched(command)
    if output.is_file():
        fsync_path(output)  # cp's copy is fsynced here; pyckpt fsyncs its own before renaming
    fsync_path(output.parent)
    seconds = time.perf_counter() - started
    return seconds, peak


CEILINGS = {"pt": "2-thread pread of the pt file's tensors (ceiling)",
            "safetensors": "2-thread pread of the safetensors file's tensors (ceiling)",
            "sharded safetensors": "2-thread pread of the shards' tensors (ceiling)"}


def paired(times: list[float], against: list[float]) -> str:
    """Median of the rounds' own ratios [their range]: each round's ratio is taken within that
    round, so the machine's slow drifts cancel."""
    ratios = sorted(t / b for t, b in zip(times, against))
    return f"{statistics.median(ratios):.3f} [{ratios[0]:.2f}-{ratios[-1]:.2f}]"


def print_load_table(title: str, load_times: dict[str, list[float]]) -> None:
    baseline = load_times["pyckpt.load_state_dict from pt"]

    def own_ceiling(name: str) -> str:
        ceiling = CEILINGS.get(name.removeprefix("pyckpt.load_state_dict from "))
        if not name.startswith("pyckpt.") or ceiling not in load_times:
            return ""
        return paired(load_times[name], load_times[ceiling])

    rows = [[name, f"{statistics.median(t):.3f}", f"{(max(t) - min(t)) / statistics.median(t):.0%}",
             "baseline" if name.endswith("from pt") else paired(t, baseline), own_ceiling(name)]
            for name, t in load_times.items()]
    print(f"\n{title}")
    print("   (x baseline below 1: faster than from the pt file; x own ceiling: over the plain pread of the same")
    print("   layout's files; both the median of each round's own ratio, with their range)")
    print("\n".join(text_table(["row", "median s", "spread", "x baseline", "x own ceiling"], rows)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--only", nargs="*", default=None, help="run only rows whose name contains one of these")
    parser.add_argument("--warm-rounds", type=int, default=9,
                        help="rounds of the load rows in one warm process, after the fresh-process rounds (0: none)")
    args = parser.parse_args()

    def wanted(name: str) -> bool:
        return args.only is None or any(part in name for part in args.only)

    checkpoint = prepare_checkpoint(args.data_dir, args.size_gib)
    inputs = derived_inputs(checkpoint)
    out = checkpoint.directory / "bench-out"
    floor = baseline_rss(dict(os.environ), CLI_BASELINE_RSS_CODE)
    file_bytes = checkpoint.pt_path.stat().st_size
    print(f"checkpoint  {checkpoint.pt_path} ({file_bytes / MIB:.0f} MiB), {args.repeat} runs per row, median shown")
    print(f"floor       a bare `import pyckpt` peaks at {floor // MIB} MiB")

    loads = {
        "pyckpt.load_state_dict from pt": (inputs["pt"], "pyckpt"),
        "pyckpt.load_state_dict from safetensors": (inputs["safetensors"], "pyckpt"),
        "pyckpt.load_state_dict from sharded safetensors": (inputs["sharded"], "pyckpt"),
        "safetensors load_file + load_state_dict": (inputs["safetensors"], "library"),
        "2-thread pread of the pt file's tensors (ceiling)": (inputs["pt"], "pread"),
        "2-thread pread of the safetensors file's tensors (ceiling)": (inputs["safetensors"], "pread"),
        "2-thread pread of the shards' tensors (ceiling)": (inputs["sharded"], "pread"),
    }
    loads = {name: spec for name, spec in loads.items() if wanted(name) or name.endswith("from pt")}
    load_inputs = sorted({path for source, _ in loads.values() for path in (source.glob("*") if source.is_dir() else [source])})

    def loaded(rows: dict[str, tuple[Path, str]], rounds: int) -> dict[str, list[float]]:
        done = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(checkpoint.directory),
                               json.dumps({name: [str(source), how] for name, (source, how) in rows.items()}), str(rounds)],
                              capture_output=True, text=True, cwd=REPO_ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{list(rows)}: {done.stderr.strip().splitlines()[-1]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for name, problems in result["problems"].items():
            if problems:
                raise RuntimeError(f"{name}: wrong result: {problems[:3]}")
        return result["times"]

    fresh: dict[str, list[float]] = {name: [] for name in loads}
    for round_number in range(args.repeat):
        # every layout's pages enter the cache alike, anew each round, in alternating orders
        recache(load_inputs if round_number % 2 == 0 else load_inputs[::-1])
        for name, spec in loads.items():
            fresh[name] += loaded({name: spec}, 0)[name]
    print_load_table("A. into a built model, each row's first call in a fresh process; before each round every input is\n"
                     "   dropped from the page cache and read back alike, in alternating orders", fresh)
    if args.warm_rounds:
        recache(load_inputs)
        print_load_table(f"A2. into a built model in one warm process: every row once per round, {args.warm_rounds} rounds in\n"
                         "   alternating orders, after one untimed call each", loaded(loads, args.warm_rounds))

    conversions = {
        "cp + fsync": (["cp", str(inputs["pt"]), str(out / "copy.pt")], out / "copy.pt"),
        "pt -> safetensors": (cli("convert", str(inputs["pt"]), str(out / "m.safetensors")), out / "m.safetensors"),
        f"pt -> sharded safetensors ({SHARD_SIZE})": (
            cli("convert", str(inputs["pt"]), str(out / "shards"), "--max-shard-size", SHARD_SIZE), out / "shards"),
        "pt -> dcp": (cli("convert", str(inputs["pt"]), str(out / "dcp"), "--format", "dcp"), out / "dcp"),
        "sharded -> pt": (cli("convert", str(inputs["sharded"]), str(out / "from-shards.pt")), out / "from-shards.pt"),
        "safetensors -> pt": (cli("convert", str(inputs["safetensors"]), str(out / "from-st.pt")), out / "from-st.pt"),
        "dcp -> safetensors": (cli("convert", str(inputs["dcp"]), str(out / "from-dcp.safetensors")),
                               out / "from-dcp.safetensors"),
        "pt -> pt --dtype bf16": (cli("convert", str(inputs["pt"]), str(out / "bf16.pt"), "--dtype", "bf16"),
                                  out / "bf16.pt"),
        "pt -> sharded safetensors --dtype bf16": (
            cli("convert", str(inputs["pt"]), str(out / "bf16-shards"), "--max-shard-size", SHARD_SIZE, "--dtype", "bf16"),
            out / "bf16-shards"),
        "sharded -> dcp --dtype fp16": (
            cli("convert", str(inputs["sharded"]), str(out / "fp16-dcp"), "--format", "dcp", "--dtype", "fp16"),
            out / "fp16-dcp"),
        "dcp -> safetensors --dtype bf16": (
            cli("convert", str(inputs["dcp"]), str(out / "bf16-from-dcp.safetensors"), "--dtype", "bf16"),
            out / "bf16-from-dcp.safetensors"),
        "torch: dcp_to_torch_save + save_file": (
            [sys.executable, "-c", DCP_RECIPE, str(inputs["dcp"]), str(out / "recipe.safetensors")],
            out / "recipe.safetensors"),
    }
    conversions = {name: spec for name, spec in conversions.items() if wanted(name) or name == "cp + fsync"}
    out.mkdir(exist_ok=True)
    times: dict[str, list[float]] = {name: [] for name in conversions}
    peaks: dict[str, list[int]] = {name: [] for name in conversions}
    try:
        for _ in range(args.repeat):
            for name, (command, output) in conversions.items():
                warm_page_cache(inputs["pt"])
                seconds, peak = timed_process(command, output)
                times[name].append(seconds)
                peaks[name].append(peak)
                remove(output)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(times["cp + fsync"])
    rows = []
    for name, t in times.items():
        python_row = not name.startswith("cp")
        extra = max(peaks[name]) - (floor if python_row else 0)
        rows.append([name, f"{statistics.median(t):.3f}", f"{(max(t) - min(t)) / statistics.median(t):.0%}",
                     "baseline" if name == "cp + fsync" else f"{statistics.median(t) / base:.2f}",
                     f"{extra // MIB}" + (" (above import)" if python_row else " (own)")])
    print(f"\nB. conversions, a whole process each (baseline: cp + fsync of the {file_bytes / MIB:.0f} MiB pt file)")
    print("\n".join(text_table(["row", "median s", "spread", "x baseline", "peak RSS MiB"], rows)))
    recipe = "torch: dcp_to_torch_save + save_file"
    if "dcp -> safetensors" in times and recipe in times:
        share = statistics.median(times["dcp -> safetensors"]) / statistics.median(times[recipe])
        print(f"\ndcp -> safetensors: {share:.2f}x the time of torch's recipe (target ≤ 0.4x)")
    print(f"targets: sharded ≤ 1.3x cp + fsync; every pyckpt conversion ≤ {TARGET_RSS_MIB} MiB above import; "
          "loading from safetensors or shards ≤ 1.0x from pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
